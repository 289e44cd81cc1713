"""The XFRM sink's policies on this host's kernel, in network namespaces.

This kernel has XFRM policies but no ESP, so what needs no SA is tested here, with real
traffic; SAs and rollover are tested in User-Mode Linux (test_xfrm_uml.py).

    lan (10.1.0.2) ── gw (10.1.0.1 | 192.0.2.1) ── far (192.0.2.2, 10.2.0.2 on lo)

The namespaces lan-a, gw-a and gw-b of a two-site topology on one wire
(gateway/demo/topology.py). `gw` runs the sink; `far` stands for the peer gateway and the
LAN behind it. gw routes 10.2.0.0/16 to `far` in clear: only the sink's policies stop it.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from common.config import HostPort
from common.sink import EpochMaterial, ProvidedKey, RekeyCause, Role, SinkContext, SinkError
from gateway.core.policy import Policy
from gateway.demo import topology
from gateway.demo.topology import Site, Topology
from ipsec.xfrm.sink import XfrmSink, XfrmSinkConfig
from kdf.schedule import EpochKeys
from tests.helpers import lifetimes

T = TypeVar("T")
CONTROL_PORT = 9443


def _need_root() -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("network namespaces and XFRM need root (CAP_NET_ADMIN)")


class Net:
    """The namespaces (gateway/demo/topology.py) by what they stand for here."""

    topology = Topology(sites=(Site("a"), Site("b", hosts=0)), wan="link")

    def __init__(self) -> None:
        self.net = topology.Net(self.topology, "qh")
        self.lan, self.gw, self.far = (self.net.ns[r] for r in ("lan-a", "gw-a", "gw-b"))

    def policy(self) -> str:
        return self.net.run("gw-a", "ip", "xfrm", "policy")

    def reaches(self, ns: str, target: str, source: str | None = None) -> bool:
        """One ping, 1 s."""
        via = ["-I", source] if source else []
        return subprocess.run(["ip", "netns", "exec", ns, "ping", "-n", "-c", "1", "-W", "1",
                               *via, target], capture_output=True, check=False).returncode == 0

    def far_icmp_received(self) -> int:
        """ICMP echo requests that reached `far` (its kernel's counter)."""
        out = self.net.run("gw-b", "cat", "/proc/net/snmp")
        head, values = [line.split() for line in out.splitlines() if line.startswith("Icmp:")]
        return int(values[head.index("InEchos")])

    def run(self, factory: Callable[[], Awaitable[T]]) -> T:
        """Run a coroutine with every socket it opens inside `gw`."""
        return self.net.in_thread("gw-a", factory)


@pytest.fixture
def net() -> Iterator[Net]:
    _need_root()
    n = Net()
    try:
        n.net.up()
    except (OSError, RuntimeError) as e:
        pytest.skip(f"cannot build network namespaces here: {e}")
    yield n
    n.net.down()
    assert not any(ns in topology.run("ip", "netns", "list") for ns in (n.lan, n.gw, n.far))


class Events:
    def __init__(self) -> None:
        self.soft: list[str] = []

    def rekey_needed(self, link: str, cause: RekeyCause, detail: str) -> None:
        self.soft.append(detail)

    def key_provided(self, link: str, key: ProvidedKey) -> None:
        raise AssertionError("this sink hands out no key")


def tunnel(**kw: Any) -> XfrmSinkConfig:
    return XfrmSinkConfig.model_validate({
        "type": "xfrm", "local": "192.0.2.1", "remote": "192.0.2.2",
        "local_subnets": ["10.1.0.0/16", "fd00:a::/64"],
        "remote_subnets": ["10.2.0.0/16", "fd00:b::/64"], **kw})


def build(config: XfrmSinkConfig, events: Events | None = None) -> XfrmSink:
    context = SinkContext("ab", lifetimes(Policy(interval=60, hard_lifetime=300)),
                          events or Events(), HostPort("192.0.2.1", CONTROL_PORT),
                          HostPort("192.0.2.2", CONTROL_PORT))
    return config.build(context)


def material(epoch: int = 1) -> EpochMaterial:
    return EpochMaterial("ab", epoch, Role.INITIATOR, "qkd+ML-KEM-768+X25519/CatKDF-SHA-384",
                         ("k",), 0x1000 + epoch, 0x2000 + epoch, EpochKeys(epoch, bytes(48)))


def test_before_any_key_traffic_between_the_subnets_is_dropped(net: Net) -> None:
    assert net.reaches(net.lan, "10.2.0.2")  # in clear without the sink: the test can fail
    sink = build(tunnel())
    net.run(sink.start)
    before = net.far_icmp_received()
    assert not net.reaches(net.lan, "10.2.0.2")
    assert net.far_icmp_received() == before  # dropped at gw: nothing reached the far side
    assert net.reaches(net.lan, "10.1.0.1")  # the gateway itself is not cut off
    policy = net.policy()
    assert policy.count("action block") == 2  # IPv4 and IPv6 out
    assert policy.count("dir in") == 2
    assert policy.count("dir fwd") == 2
    assert policy.count("proto esp reqid") == 4  # in and fwd accept ESP only


def test_inbound_clear_text_is_dropped(net: Net) -> None:
    assert net.reaches(net.far, "10.1.0.2", source="10.2.0.2")
    sink = build(tunnel())
    net.run(sink.start)
    # far's LAN -> lan in clear: the fwd policy requires ESP, so gw does not forward it.
    assert not net.reaches(net.far, "10.1.0.2", source="10.2.0.2")


def test_a_kernel_without_esp_is_a_clear_error_and_changes_nothing(net: Net) -> None:
    sink = build(tunnel())
    net.run(sink.start)
    before = net.policy()

    async def install() -> None:
        await sink.install_inbound(material())

    with pytest.raises(SinkError) as e:
        net.run(install)
    text = str(e.value)
    assert "XFRM_MSG_NEWSA SA 192.0.2.2 -> 192.0.2.1 spi 0x00001001" in text
    assert "(Requested AEAD algorithm not found)" in text or "No such" in text, text
    assert net.policy() == before
    assert net.net.run("gw-a", "ip", "xfrm", "state") == ""


def test_stop_leaves_blocking_policies_by_default(net: Net) -> None:
    sink = build(tunnel())

    async def start_and_stop() -> None:
        await sink.start()
        await sink.close()

    net.run(start_and_stop)
    policy = net.policy()
    assert policy.count("action block") == 2
    assert policy.count("proto esp") == 4
    assert not net.reaches(net.lan, "10.2.0.2")


def test_stop_with_remove_deletes_everything(net: Net) -> None:
    sink = build(tunnel(on_stop="remove"))

    async def start_and_stop() -> None:
        await sink.start()
        await sink.close()

    net.run(start_and_stop)
    assert net.policy() == ""
    assert net.reaches(net.lan, "10.2.0.2")  # the operator asked for it: clear again


def test_a_restart_adopts_the_policies_and_keeps_blocking(net: Net) -> None:
    net.run(build(tunnel()).start)  # a "crash": never closed
    second = build(tunnel())
    net.run(second.start)
    assert net.policy().count("action block") == 2  # replaced in place, not duplicated
    assert second.current is None


def test_transport_mode_lets_the_peer_channel_through_and_nothing_else(net: Net) -> None:
    sink = build(XfrmSinkConfig.model_validate(
        {"type": "xfrm", "mode": "transport", "local": "192.0.2.1", "remote": "192.0.2.2"}))
    net.run(sink.start)
    policy = net.policy()
    assert "mode transport" in policy
    assert "dir fwd" not in policy
    assert f"dport {CONTROL_PORT}" in policy
    assert f"sport {CONTROL_PORT}" in policy

    # far listens on the control port and another one; gw connects to both.
    server = subprocess.Popen(
        ["ip", "netns", "exec", net.far, "python3", "-c",
         "import socket,time\n"
         "ss=[socket.create_server(('192.0.2.2',p)) for p in (9443,9444)]\n"
         "time.sleep(5)"])
    try:
        def connect(port: int) -> str:
            async def go() -> str:
                for _ in range(50):
                    try:
                        with socket.create_connection(("192.0.2.2", port), timeout=1):
                            return "connected"
                    except ConnectionRefusedError:
                        await asyncio.sleep(0.05)  # not listening yet
                    except OSError as e:
                        return type(e).__name__ + ":" + str(e.errno)
                return "refused"
            return net.run(go)

        assert connect(CONTROL_PORT) == "connected"
        assert connect(9444) == "PermissionError:1"  # the out policy blocks it locally
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize(("config", "error"), [
    ({"mode": "transport"}, "leave out local_subnets"),
    ({"local_subnets": []}, "needs local_subnets and remote_subnets"),
    ({"remote": "2001:db8::2"}, "both be IPv4 or both IPv6"),
    ({"remote": "192.0.2.1"}, "same address"),
    ({"local_subnets": ["fd00:a::/64"], "remote_subnets": ["10.2.0.0/16"]},
     "no local and remote subnet of the same IP version"),
    ({"local_subnets": ["10.1.0.1/16"]}, "host bits set"),
    ({"replay_window": 5000}, "replay_window"),
    ({"mode": "gre"}, "mode"),
])
def test_bad_configuration_is_a_clear_error(config: dict[str, Any], error: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=error):
        tunnel(**config)


def test_traffic_without_an_sa_makes_the_link_rekey(net: Net) -> None:
    """A policy whose SA is gone (expired while nobody listened, deleted by hand): the
    kernel drops the packets and sends ACQUIRE; the sink asks for a rekey, once."""
    from ipaddress import ip_address

    from ipsec.xfrm.objects import Direction, Mode, PolicySpec, Template

    events = Events()
    sink = build(tunnel(), events)

    async def scenario() -> None:
        await sink.start()
        assert sink.kernel is not None
        for selector in sink.config.selectors():
            await sink.kernel.set_policy(PolicySpec(
                selector, Direction.OUT, sink.config.priority,
                Template(ip_address("192.0.2.1"), ip_address("192.0.2.2"), sink.in_reqid + 1,
                         Mode.TUNNEL)))
        ping = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", net.lan, "ping", "-n", "-c", "3", "-i", "0.2", "-W", "1",
            "10.2.0.2", stdout=asyncio.subprocess.DEVNULL)
        assert await ping.wait() == 1  # nothing came back
        await sink.close()

    before = net.far_icmp_received()
    net.run(scenario)
    assert net.far_icmp_received() == before  # dropped, not sent in clear
    # The kernel's flow selector: ICMP (proto 1), echo request (type 8, in the sport field).
    assert events.soft == ["no SA for outbound traffic 10.1.0.2/32 -> 10.2.0.2/32"
                           " proto 1 sport 8: dropped, rekeying"]

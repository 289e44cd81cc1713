"""The strongSwan sink's configuration checks, and its behaviour against one real charon.

    gw-a (192.0.2.1): charon, VICI socket in the test's directory
                      the sink runs in this test process and talks to it over VICI

No peer here: what needs an IKE SA is in test_strongswan.py. These check what the sink loads,
what it refuses, what it leaves behind after errors, and how it recovers charon's state.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from common.config import HostPort
from common.sink import EpochMaterial, ProvidedKey, RekeyCause, Role, SinkContext, SinkError
from gateway.site import SiteConfig
from ipsec.strongswan.hold import HoldConfig, ResponderHold
from ipsec.strongswan.sink import StrongswanSink, StrongswanSinkConfig, ppk_id
from ipsec.strongswan.vici import Vici, ViciError
from kdf.schedule import EpochKeys, Purpose
from tests.helpers import lifetimes
from tests.ipsec import strongswan_world as sw


def sink_config(**kw: Any) -> StrongswanSinkConfig:
    return StrongswanSinkConfig.model_validate(
        {"type": "strongswan", "vici": "/nonexistent/charon.vici",
         "connection": sw.connection("a"), **kw})


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["psk", "auth", "PSK"])
def test_the_epoch_key_as_ike_auth_psk_is_refused_and_why(value: str) -> None:
    with pytest.raises(ValidationError) as e:
        sink_config(key_as=value)
    text = str(e.value)
    assert "cannot be the IKE AUTH preshared key" in text
    assert "RFC 8784" in text


@pytest.mark.parametrize("key", ["ppk_id", "ppk_required", "rekey_time", "reauth_time",
                                 "unique"])
def test_keys_the_gateway_sets_are_refused(key: str) -> None:
    conn = {**sw.connection("a"), key: "x"}
    with pytest.raises(ValidationError, match=f"{key} set by the gateway"):
        sink_config(connection=conn)


def test_start_action_start_is_refused() -> None:
    conn = sw.connection("a")
    conn["children"]["lan"]["start_action"] = "start"
    with pytest.raises(ValidationError, match=re.escape("children.lan.start_action start")):
        sink_config(connection=conn)
    conn["children"]["lan"]["start_action"] = "trap"
    sink_config(connection=conn)  # trap only drops traffic until the SA is up


@pytest.mark.parametrize(("change", "message"), [
    ({"children": {}}, "children must name at least one CHILD SA"),
    ({"remote_addrs": None}, "remote_addrs missing"),
    ({"proposals": [1.5]}, "connection.proposals: a list may hold only strings"),
    ({"local": {"auth": "psk"}}, "local.auth psk needs an id"),
])
def test_bad_connections_name_the_problem(change: dict[str, Any], message: str) -> None:
    conn = {k: v for k, v in {**sw.connection("a"), **change}.items() if v is not None}
    with pytest.raises(ValidationError, match=message):
        sink_config(connection=conn)


def test_site_config_error_names_the_sink_field(tmp_path: Path) -> None:
    import yaml

    from gateway.initdemo import init_demo

    layout = init_demo(tmp_path)
    config = yaml.safe_load(layout.site_config("a").read_text())
    config["links"][0]["sinks"] = [{"type": "strongswan", "key_as": "psk",
                                    "connection": sw.connection("a")}]
    with pytest.raises(ValidationError) as e:
        SiteConfig.model_validate(config)
    assert "links.0.sinks.0.strongswan.key_as" in str(e.value)


def test_the_hold_is_on_by_default_can_be_turned_off_and_is_checked() -> None:
    assert sink_config().hold == HoldConfig(device="ipsec0", queue=None, max_time=2.0)
    assert sink_config(hold=None).hold is None
    assert sink_config(hold={"queue": 7}).hold == HoldConfig(queue=7)
    with pytest.raises(ValidationError, match=r"hold\.max_time\n.*less than or equal to 10"):
        sink_config(hold={"max_time": 60})
    with pytest.raises(ValidationError, match=r"hold\.queue"):
        sink_config(hold={"queue": 70000})
    with pytest.raises(ValidationError, match=r"hold\.dev\n.*Extra inputs"):
        sink_config(hold={"dev": "ipsec0"})
    # Queue numbers and chain names per link: two links of one host do not collide.
    a, b = ResponderHold("ab", HoldConfig()), ResponderHold("ac", HoldConfig())
    assert a.chain != b.chain
    assert len(a.chain) <= 28
    assert a.queue != b.queue


def test_ppk_ids_are_scoped_to_link_epoch_and_key() -> None:
    assert ppk_id("ab", 7, "0123456789abcdef") == "qkdgw-ab-e7-0123456789ab"
    assert ppk_id("ab", 7, "0123456789abcdef") != ppk_id("ab", 7, "fedcba9876543210")


# -- against charon -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def charon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sw.World]:
    reason = sw.missing_tools()
    if reason:
        pytest.skip(f"no charon here: {reason}")
    world = sw.World(tmp_path_factory.mktemp("charon"), {})
    world.build()
    try:
        world.start_charon("a")
        yield world
    finally:
        world.teardown()


class Events:
    def __init__(self) -> None:
        self.soft: list[str] = []

    def rekey_needed(self, link: str, cause: RekeyCause, detail: str) -> None:
        self.soft.append(detail)

    def key_provided(self, link: str, key: ProvidedKey) -> None:
        raise AssertionError("this sink hands out no key")


def build(world: sw.World, **kw: Any) -> tuple[StrongswanSink, Events]:
    events = Events()
    config = sink_config(vici=str(world.vici_path("a")), **kw)
    context = SinkContext("ab", lifetimes(), events, HostPort(host="192.0.2.1", port=9443),
                          HostPort(host="198.51.100.1", port=9443))
    return config.build(context), events


def material(epoch: int, role: Role = Role.RESPONDER) -> EpochMaterial:
    keys = EpochKeys(epoch, os.urandom(48))
    return EpochMaterial("ab", epoch, role, "qkd+ML-KEM-768+X25519/CatKDF-SHA-384", ("k",),
                         epoch, epoch, keys)


async def charon_state(world: sw.World) -> tuple[list[str], list[str]]:
    v = await Vici.connect(world.vici_path("a"))
    try:
        shared = (await v.request("get-shared")).get("keys", [])
        conns = (await v.request("get-conns")).get("conns", [])
        return shared, conns
    finally:
        await v.close()


def test_install_loads_the_ppk_and_the_connection_and_retire_unloads(charon: sw.World) -> None:
    async def go() -> None:
        sink, _ = build(charon)
        await sink.start()
        m1, m2 = material(1), material(2)
        await sink.install_inbound(m1)
        shared, conns = await charon_state(charon)
        pid1 = ppk_id("ab", 1, m1.fingerprint)
        assert pid1 in shared
        assert "qkdgw-ab" in conns
        assert "ike-sites" in shared  # the operator's own credentials are left alone
        await sink.install_inbound(m2)
        await sink.retire_inbound(sink_ref(m1))
        shared, _ = await charon_state(charon)
        assert pid1 not in shared
        assert ppk_id("ab", 2, m2.fingerprint) in shared
        await sink.close()
        shared, conns = await charon_state(charon)
        assert not [k for k in shared if k.startswith("qkdgw-")]
        assert "qkdgw-ab" not in conns
        assert "ike-sites" in shared

    asyncio.run(go())


def sink_ref(m: EpochMaterial) -> Any:
    from common.sink import EpochRef

    return EpochRef(m.link, m.epoch, m.spi_in, m.spi_out)


def test_the_ppk_sent_to_charon_is_the_epochs_ike_ppk(charon: sw.World) -> None:
    """What the sink loads is the key schedule's IKE PPK: charon accepts it as the secret of
    a PPK whose id it lists (its value is never readable back over VICI, by design)."""
    async def go() -> None:
        sink, _ = build(charon)
        await sink.start()
        m = material(3)
        await sink.install_inbound(m)
        assert sink.ppks[3] == (ppk_id("ab", 3, m.fingerprint), m.key(Purpose.IKE_PPK))
        assert len(m.key(Purpose.IKE_PPK)) == 32
        await sink.close()

    asyncio.run(go())


def test_charon_refusing_the_connection_leaves_no_ppk_behind(charon: sw.World) -> None:
    async def go() -> None:
        conn = {**sw.connection("a"), "proposals": ["aes256gcm16-prfsha384-nosuchgroup"]}
        sink, _ = build(charon, connection=conn)
        await sink.start()
        with pytest.raises(SinkError, match="invalid value for: proposals"):
            await sink.install_inbound(material(4))
        shared, conns = await charon_state(charon)
        assert not [k for k in shared if k.startswith("qkdgw-")]
        assert "qkdgw-ab" not in conns
        await sink.close()

    asyncio.run(go())


def test_no_charon_is_a_clear_error_not_a_crash(tmp_path: Path) -> None:
    async def go() -> None:
        events = Events()
        config = sink_config(vici=str(tmp_path / "charon.vici"))
        sink = config.build(SinkContext("ab", lifetimes(), events, HostPort(host="192.0.2.1",
                            port=9443), HostPort(host="198.51.100.1", port=9443)))
        await sink.start()  # charon may come later: the watchdog keeps trying
        with pytest.raises(SinkError, match=re.escape(f"no charon at {tmp_path}/charon.vici")):
            await sink.install_inbound(material(1))
        await sink.close()

    asyncio.run(go())


def test_unknown_command_and_refusals_are_typed_errors(charon: sw.World) -> None:
    async def go() -> None:
        v = await Vici.connect(charon.vici_path("a"))
        try:
            with pytest.raises(ViciError, match="does not know the VICI command 'no-such'"):
                await v.request("no-such")
            with pytest.raises(ViciError, match="CHILD_SA config 'c' not found"):
                await v.request("initiate", {"ike": "nope", "child": "c", "timeout": "500"})
            assert (await v.request("version"))["daemon"] == "charon"  # session still usable
        finally:
            await v.close()

    asyncio.run(go())


def test_watchdog_reloads_a_ppk_dropped_by_swanctl_load_creds(charon: sw.World) -> None:
    """`swanctl --load-creds` unloads every secret it did not load itself: an operator doing
    that must not take the link down."""
    async def go() -> None:
        sink, _ = build(charon)
        await sink.start()
        m = material(5)
        await sink.install_inbound(m)
        pid = ppk_id("ab", 5, m.fingerprint)
        await asyncio.to_thread(
            sw.run, "swanctl", "--load-creds", "--noprompt", "--uri",
            f"unix://{charon.vici_path('a')}", "--file", str(charon.root / "swanctl-a.conf"))
        assert pid not in (await charon_state(charon))[0]  # the test can fail
        for _ in range(50):
            await asyncio.sleep(0.1)
            if pid in (await charon_state(charon))[0]:
                break
        assert pid in (await charon_state(charon))[0]
        await sink.close()

    asyncio.run(go())


@pytest.mark.parametrize(("text", "parsed"), [("5.9.8", (5, 9, 8)), ("6.0.1dr1", (6, 0, 1)),
                                              ("5.6.3", (5, 6, 3)), ("garbage", (0,))])
def test_charon_versions_are_read_for_the_ppk_check(text: str, parsed: tuple[int, ...]) -> None:
    from ipsec.strongswan.sink import PPK_SINCE, _version

    assert _version(text) == parsed
    assert (_version(text) >= PPK_SINCE) == (parsed >= (5, 7))


def test_watchdog_reloads_the_connection_dropped_by_swanctl_load_conns(
        charon: sw.World) -> None:
    """`swanctl --load-conns` unloads connections its files do not define."""
    async def go() -> None:
        sink, _ = build(charon)
        await sink.start()
        await sink.install_inbound(material(7))
        await asyncio.to_thread(
            sw.run, "swanctl", "--load-conns", "--uri", f"unix://{charon.vici_path('a')}",
            "--file", str(charon.root / "swanctl-a.conf"))
        assert "qkdgw-ab" not in (await charon_state(charon))[1]  # the test can fail
        for _ in range(50):
            await asyncio.sleep(0.1)
            if "qkdgw-ab" in (await charon_state(charon))[1]:
                break
        assert "qkdgw-ab" in (await charon_state(charon))[1]
        await sink.close()

    asyncio.run(go())


def test_restarted_responder_charon_gets_the_ppk_back_and_asks_for_a_new_epoch(
        charon: sw.World) -> None:
    async def go() -> None:
        sink, events = build(charon)
        await sink.start()
        m = material(6)
        await sink.install_inbound(m)
        sink.active = 6  # as after activate_outbound (needs an IKE SA: test_strongswan.py)
        await asyncio.to_thread(charon.kill, "charon-a")
        await asyncio.to_thread(charon.start_charon, "a")
        pid = ppk_id("ab", 6, m.fingerprint)
        for _ in range(50):
            await asyncio.sleep(0.1)
            shared, conns = await charon_state(charon)
            if pid in shared and "qkdgw-ab" in conns and events.soft:
                break
        assert pid in shared
        assert "qkdgw-ab" in conns
        assert events.soft == ["charon restarted: its IKE SAs are gone"]
        await sink.close()

    asyncio.run(go())


def test_the_documented_sample_sink_is_valid() -> None:
    import yaml

    sample = Path(__file__).parents[2] / "docs/examples/strongswan/site-a-sink.yaml"
    config = StrongswanSinkConfig.model_validate(yaml.safe_load(sample.read_text())["sinks"][0])
    assert config.connection["children"]["lan"]["remote_ts"] == ["10.2.0.0/16"]


def test_the_ppk_is_in_the_loop_a_mismatch_fails_ike_auth(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two charons, no gateways: the same PPK id with different secrets must not give an IKE
    SA (ppk_required), the same secret must, with `ppk: yes`. What the sink relies on."""
    reason = sw.missing_tools()
    if reason:
        pytest.skip(f"no charon here: {reason}")
    world = sw.World(tmp_path_factory.mktemp("ppk-mismatch"), {})
    world.build()

    async def attempt(secret_b: bytes) -> tuple[bool, list[Any]]:
        sessions = {s: await Vici.connect(world.vici_path(s)) for s in ("a", "b")}
        try:
            for site, secret in (("a", b"\x11" * 32), ("b", secret_b)):
                v = sessions[site]
                await v.request("load-shared", {"id": "qkdgw-t-e1-000000000000", "type": "PPK",
                                                "data": secret,
                                                "owners": ["qkdgw-t-e1-000000000000"]})
                conn = {**sw.connection(site), "ppk_id": "qkdgw-t-e1-000000000000",
                        "ppk_required": "yes", "encap": "yes", "mobike": "no"}
                await v.request("load-conn", {"t": conn})
            try:
                await sessions["a"].request("initiate", {"ike": "t", "child": "lan",
                                                         "timeout": "5000"}, timeout=8)
                ok = True
            except ViciError:
                ok = False
            sas = await sessions["a"].streamed("list-sas", "list-sa", {"ike": "t"})
            for sa in [sa for e in sas for sa in e.values()]:
                await sessions["a"].request("terminate", {"ike-id": sa["uniqueid"],
                                                          "force": "yes", "timeout": "-1"})
            return ok, [sa for e in sas for sa in e.values()]
        finally:
            for v in sessions.values():
                await v.close()

    try:
        world.start_charon("a")
        world.start_charon("b")
        ok, sas = asyncio.run(attempt(b"\x22" * 32))
        assert not ok
        assert not [sa for sa in sas if sa.get("state") == "ESTABLISHED"]
        ok, sas = asyncio.run(attempt(b"\x11" * 32))
        assert ok
        assert [sa.get("ppk") for sa in sas if sa.get("state") == "ESTABLISHED"] == ["yes"]
    finally:
        world.teardown()

"""One peer channel per peer gateway: a hub and two peer gateways, real processes.

    qkdgw run (B) ◀──1 wss each way──▶ qkdgw run (A, hub) ◀──1 wss each way──▶ qkdgw run (C)
      links ab0..ab3                     ab0..ab3, ac0..ac2                     ac0..ac2
        │ KME-B (sae-b, sae-c) ═══ qkdgw kms-sim ═══ KME-A (sae-a) ─┘              │
        └──────────────────────────────────────────────────────────────────────────┘

Many links share one connection each way per pair of gateways (counted by the daemons
themselves, `qkdgw_peer_channel_connects_total`); a hostile frame for one link is refused for
that link alone, and a flood of them fills that link's queue alone (a daemon in this
process); a link that one side does not have waits (`peer-link-unknown`) without spending
epoch numbers, and keys epoch 1 once the peer has it.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway import pki
from gateway.core.messages import Ack
from gateway.daemon import MAX_PEER_BACKLOG, Daemon
from gateway.demo.topology import until
from gateway.initdemo import DemoLayout, init_demo
from gateway.peer import frame
from gateway.site import SiteConfig
from tests.daemons import Daemons
from tests.helpers import SimProcess, free_base_port, start_sim

pytestmark = pytest.mark.slow

SITES = ("a", "b", "c")
POLICY = {"interval": 1.0, "jitter": 0.1, "hard_lifetime": 60.0, "grace": 0.5,
          "attempt_timeout": 3.0, "retransmit_max": 1.0}


def _link(name: str, role: str, peer: str, address: str, sae: str, site: str,
          policy: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "role": role, "peer": {"address": address, "name": f"gw-{peer}",
                                                  "sae_id": sae}, "policy": policy,
            "sinks": [{"type": "file", "path": f"state-{site}/{name}.psk"}]}


class Hub(Daemons):
    """Sites A (the hub), B and C; B and C are SAEs of one KME (so both share the QKD link
    A-B). LINKS: site -> [(link, role at that site, peer site)]; POLICIES: link -> its
    policy, on both sides."""

    def __init__(self, root: Path, links: dict[str, list[tuple[str, str, str]]],
                 policies: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        d = self.layout = init_demo(root, base_port=free_base_port(24))
        self.root = root
        self.policies = policies or {}
        ca = pki.load(d.pki / "ca.pem", d.pki / "ca.key")
        pki.save(pki.issue(ca, "gw-c", dns=["gw-c"], ips=["127.0.0.1"], server=True,
                           client=True), d.pki / "gw-c.pem", d.pki / "gw-c.key")
        pki.save(pki.issue(ca, "sae-c", dns=["sae-c"], client=True), d.pki / "sae-c.pem",
                 d.pki / "sae-c.key")
        kms = yaml.safe_load(d.kms_config.read_text())
        kms["kmes"][1]["saes"].append("sae-c")
        kms["links"][0].update(key_rate=1e7, max_key_count=100_000)
        d.kms_config.write_text(yaml.safe_dump(kms))
        template = yaml.safe_load(d.site_config("b").read_text())
        self.ports = {"a": d.gateway_port("a"), "b": d.gateway_port("b"),
                      "c": d.base_port + 13}
        self.metrics_ports = {"a": d.metrics_port("a"), "b": d.metrics_port("b"),
                              "c": d.base_port + 23}
        self.configs: dict[str, dict[str, Any]] = {}
        for site in SITES:
            c = yaml.safe_load(d.site_config(site).read_text()) if site != "c" else \
                json.loads(json.dumps(template))
            c.update(site=site, state_dir=f"state-{site}", kms_status_interval=0.5)
            c["policy"].update(POLICY)
            c["kms"].update(sae_id=f"sae-{site}", cert=f"pki/sae-{site}.pem",
                            key=f"pki/sae-{site}.key")
            c["peer_channel"].update(listen=f"127.0.0.1:{self.ports[site]}",
                                     cert=f"pki/gw-{site}.pem", key=f"pki/gw-{site}.key")
            c["metrics"] = {"listen": f"127.0.0.1:{self.metrics_ports[site]}"}
            self.configs[site] = c
            self.set_links(site, links[site])

    def set_links(self, site: str, links: list[tuple[str, str, str]]) -> None:
        c = self.configs[site]
        c["links"] = [_link(name, role, peer, f"127.0.0.1:{self.ports[peer]}", f"sae-{peer}",
                            site, self.policies.get(name, {})) for name, role, peer in links]
        (self.root / f"site-{site}.yaml").write_text(yaml.safe_dump(c))

    @property
    def sites(self) -> Sequence[str]:
        return SITES

    def config_path(self, site: str) -> Path:
        return self.root / f"site-{site}.yaml"

    def log_path(self, site: str) -> Path:
        return self.root / f"site-{site}.log"

    def state_dir(self, site: str) -> Path:
        return self.root / f"state-{site}"

    def gateway_port(self, site: str) -> int:
        return self.ports[site]

    def start(self) -> Hub:
        d = self.layout
        self.sim = start_sim(d.kms_config, d.admin_port, [d.kme_port("a"), d.kme_port("b")],
                             self.root / "sim.log")
        for site in ("b", "c", "a"):  # the hub last: its first Offers find its peers up
            self.start_site(site)
        return self

    # -- observing ---------------------------------------------------------------------------

    def metrics(self, site: str) -> dict[str, float]:
        """The samples of /metrics, by name and labels as written."""
        async def get() -> str:
            url = f"http://127.0.0.1:{self.metrics_ports[site]}/metrics"
            async with aiohttp.ClientSession() as s, s.get(url) as r:
                return await r.text()

        text = asyncio.run(get())
        return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+) (\S+)$", text, flags=re.M)
                if not m[1].startswith("#")}

    def epochs_of(self, site: str, link: str, event: str) -> list[int]:
        """Epochs of LINK's audit records of EVENT, in order."""
        return [r["epoch"] for r in self.audit(site)
                if r.get("link") == link and r["event"] == event]

    def converged(self, link: str, peer: str, at_least: int = 1) -> bool:
        a, p = self.links("a")[link], self.links(peer)[link]
        return (a["epoch"] == p["epoch"] >= at_least and a["fingerprint"] == p["fingerprint"]
                and not a["blocked"] and not p["blocked"])


def _both_ways(links: list[tuple[str, str, str]]) -> dict[str, list[tuple[str, str, str]]]:
    """The hub's LINKS (name, role at A, peer site), and each peer's side of them."""
    other = {"initiator": "responder", "responder": "initiator"}
    return {"a": links, **{p: [(n, other[r], "a") for n, r, q in links if q == p]
                           for p in ("b", "c")}}


HUB = [*((f"ab{i}", "initiator", "b") for i in range(4)), ("ac0", "initiator", "c"),
       ("ac1", "responder", "c"), ("ac2", "initiator", "c")]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    h = Hub(tmp_path, _both_ways(HUB))
    try:
        yield h.start()
    finally:
        h.stop()
    for site in SITES:
        log = h.log(site)
        assert "Traceback" not in log, log[-3000:]


def _connections(hub: Hub, site: str) -> dict[str, tuple[float, float]]:
    """Peer -> (channel connections SITE opened to it, connections it accepted from it)."""
    m = hub.metrics(site)
    out: dict[str, tuple[float, float]] = {}
    for peer in ("gw-a", "gw-b", "gw-c"):
        opened = m.get(f'qkdgw_peer_channel_connects_total{{peer="{peer}"}}')
        accepted = m.get(f'qkdgw_peer_channel_accepts_total{{peer="{peer}"}}')
        if opened is not None or accepted is not None:
            out[peer] = (opened or 0.0, accepted or 0.0)
    return out


def test_all_links_with_a_peer_share_one_connection_each_way(hub: Hub) -> None:
    hub.wait_until("every link on epoch 3 or later, both sides alike", lambda: all(
        hub.converged(name, peer, at_least=3) for name, _, peer in HUB))
    # Seven links, two peers: one connection each way per pair of gateways.
    assert _connections(hub, "a") == {"gw-b": (1.0, 1.0), "gw-c": (1.0, 1.0)}
    assert _connections(hub, "b") == {"gw-a": (1.0, 1.0)}
    assert _connections(hub, "c") == {"gw-a": (1.0, 1.0)}
    peers = {p["peer"]: p for p in hub.status("a")["peers"]}
    assert {p: (v["links"], v["connects"], v["accepted"], v["connected"])
            for p, v in peers.items()} == {"gw-b": (4, 1, 1, True), "gw-c": (3, 1, 1, True)}
    for site in SITES:
        assert "peer-link-unknown" not in hub.log(site)


def _hostile(hub: Hub, cert: str, frames: list[bytes]) -> list[dict[str, Any]]:
    """Open a channel to the hub as CERT, send FRAMES, and collect the refusals that come
    back until the hub has been quiet for a second."""
    p = hub.layout.pki
    ctx = ssl.create_default_context(cafile=str(p / "ca.pem"))
    ctx.load_cert_chain(str(p / f"{cert}.pem"), str(p / f"{cert}.key"))

    async def go() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as s, s.ws_connect(
                f"https://127.0.0.1:{hub.ports['a']}/v1/channel", ssl=ctx,
                server_hostname="gw-a") as ws:
            for f in frames:
                await ws.send_bytes(f)
            while True:
                try:
                    frame = await ws.receive(timeout=1.0)
                except TimeoutError:
                    return out
                assert frame.type is aiohttp.WSMsgType.TEXT, frame
                out.append(json.loads(frame.data))

    return asyncio.run(go())


def test_a_hostile_frame_for_one_link_is_refused_for_it_alone(hub: Hub) -> None:
    hub.wait_until("every link keyed", lambda: all(hub.converged(n, p) for n, _, p in HUB))
    before = {name: hub.links("a")[name]["epoch"] for name, _, _ in HUB}
    stale_ack = {"v": 1, "type": "ack", "link": "ab0", "epoch": 1, "out": 1,
                 "nonce_i": "A" * 43 + "=", "nonce_r": "A" * 43 + "="}
    answers = _hostile(hub, "gw-b", [
        b'ab0\n{"v":1,"type":"offer"',  # truncated: refused for ab0
        b"ac0\n" + json.dumps({**stale_ack, "link": "ac0"}).encode(),  # C's link, not B's
        b"nosuchlink\n{}",  # a link the hub does not have
        b"no tag at all",
        b"ab2\n" + json.dumps({**stale_ack, "link": "ab1"}).encode(),  # tagged for another
        b"ab1\n" + json.dumps({**stale_ack, "link": "ab1"}).encode(),  # stale: no answer
        b"ab0\n" + json.dumps(stale_ack).encode(),  # the channel still reads for ab0
    ])
    assert [(a["link"], a["reason"]) for a in answers] == [
        ("ab0", "malformed"), ("ac0", "wrong-peer"), ("nosuchlink", "unknown-link"),
        (None, "malformed"), ("ab2", "wrong-link")]
    assert answers[0]["error"] == "message is not JSON"
    # Every link goes on rekeying; the hub's own channels were not reopened.
    hub.wait_until("every link two epochs further", lambda: all(
        hub.links("a")[name]["epoch"] >= before[name] + 2 for name, _, _ in HUB))
    m = hub.metrics("a")
    assert m['qkdgw_peer_messages_rejected_total{link="ab0",reason="malformed"}'] == 1.0
    assert m['qkdgw_peer_messages_rejected_total{link="ac0",reason="wrong-peer"}'] == 1.0
    assert m['qkdgw_peer_messages_rejected_total{link="-",reason="unknown-link"}'] == 1.0
    assert m['qkdgw_peer_messages_rejected_total{link="ab2",reason="wrong-link"}'] == 1.0
    assert _connections(hub, "a") == {"gw-b": (1.0, 2.0), "gw-c": (1.0, 1.0)}
    # A gateway that is the peer of none of the hub's links cannot open the channel.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        _hostile(hub, "sae-b", [b"ab0\n{}"])
    assert refused.value.status == 403


def test_a_link_one_side_lacks_waits_without_spending_epochs_and_keys_epoch_1(
        tmp_path: Path) -> None:
    """The hub has links new-i (it initiates) and new-r (C initiates) that C's configuration
    does not have yet; C also has a link to B, which has none with C. Each waits with
    peer-link-unknown, far past attempt_timeout, without offering a second epoch. Restarted
    with the hub's two links, C keys both on epoch 1; B's links were never disturbed."""
    links = _both_ways([("ab0", "initiator", "b"), ("ab1", "responder", "b"),
                        ("ac0", "initiator", "c")])
    links["a"] += [("new-i", "initiator", "c"), ("new-r", "responder", "c")]
    links["c"] += [("cb", "initiator", "b")]
    h = Hub(tmp_path, links, {"cb": {"mode": "pqc-fallback"}})  # B, C: one KME, no QKD
    try:
        h.start()
        h.wait_until("the links both sides have keyed", lambda: all(
            h.converged(n, p, at_least=2) for n, p in (("ab0", "b"), ("ab1", "b"),
                                                       ("ac0", "c"))))
        h.wait_until("the alarms of the links C lacks", lambda: all(
            "peer-link-unknown" in h.links("a")[n]["alarms"] for n in ("new-i", "new-r")))
        h.wait_until("C's alarm for its link B refuses", lambda: "refused the channel: 403"
                     in h.links("c")["cb"]["alarms"].get("peer-link-unknown", ""))
        # What is tested is that nothing happens for this long: far past attempt_timeout,
        # still the one Offer, epoch 1, nothing given up.
        time.sleep(3 * POLICY["attempt_timeout"])
        status = h.links("a")
        assert status["new-i"]["state"] == "offered"
        assert h.epochs_of("a", "new-i", "offered") == [1]
        assert h.epochs_of("a", "new-i", "discarded") == []
        assert status["new-i"]["epoch"] == status["new-r"]["epoch"] == 0
        assert "peer-unreachable" not in status["new-i"]["alarms"]
        unknown = h.metrics("c")[
            'qkdgw_peer_messages_rejected_total{link="-",reason="unknown-link"}']
        assert unknown >= 2  # new-i's Offer and new-r's rekey requests, at least once each
        # Held back with backoff: far fewer than one answer per retransmission.
        assert unknown < 2 * 3 * POLICY["attempt_timeout"] / POLICY["retransmit_max"]
        assert h.links("c")["cb"]["epoch"] == 0
        b_before = {n: h.links("b")[n]["epoch"] for n in ("ab0", "ab1")}

        h.stop_site("c")
        h.set_links("c", [*links["c"][:1], ("new-i", "responder", "a"),
                          ("new-r", "initiator", "a")])
        h.start_site("c")
        h.wait_until("both new links keyed", lambda: all(
            h.converged(n, "c") for n in ("new-i", "new-r")))
        for name in ("new-i", "new-r"):
            assert h.epochs_of("a", name, "rekeyed")[0] == 1
            assert h.epochs_of("c", name, "rekeyed")[0] == 1
            assert "peer-link-unknown" not in h.links("a")[name]["alarms"]
        assert h.epochs_of("a", "new-i", "offered")[0] == 1
        # B's links went on, on the channels they had.
        h.wait_until("B's links further on", lambda: all(
            h.links("b")[n]["epoch"] > b_before[n] for n in ("ab0", "ab1")))
        assert _connections(h, "b") == {"gw-a": (1.0, 1.0)}
        assert _connections(h, "a")["gw-b"] == (1.0, 1.0)
        assert _connections(h, "a")["gw-c"] == (2.0, 2.0)  # again after C's restart
    finally:
        h.stop()
    for site in SITES:
        assert "Traceback" not in h.log(site), h.log(site)[-3000:]


def test_a_flood_for_one_link_is_refused_for_it_alone(setup: tuple[DemoLayout, SimProcess]
                                                      ) -> None:
    """The channel never waits for a link: past MAX_PEER_BACKLOG of its messages waiting,
    one link's frames are refused (`overloaded`) while the next link's are still delivered;
    once the link has caught up it takes messages again. Daemon A in this process, frames
    handed to its channel server one after the other without yielding: what a burst read
    from one connection is."""
    layout, _ = setup
    path = layout.site_config("a")
    config = yaml.safe_load(path.read_text())
    config["links"].append({**config["links"][0], "name": "ab2", "sinks": []})
    path.write_text(yaml.safe_dump(config))
    nonce = b"\x01" * 32
    ack = Ack(link="ab", epoch=1, out=1, nonce_i=nonce, nonce_r=nonce)  # stale: ignored

    async def main() -> None:
        a = Daemon(SiteConfig.load(path))
        await a.start()
        try:
            server, cert = a._peer_server, b"\x02" * 32
            assert server is not None
            answers = [server.receive("gw-b", cert, frame("ab", ack))
                       for _ in range(MAX_PEER_BACKLOG + 8)]
            assert answers[:MAX_PEER_BACKLOG] == [None] * MAX_PEER_BACKLOG
            assert {(r.link, r.reason) for r in answers[MAX_PEER_BACKLOG:] if r} == {
                ("ab", "overloaded")}
            assert all(answers[MAX_PEER_BACKLOG:])
            other = ack.model_copy(update={"link": "ab2"})
            assert server.receive("gw-b", cert, frame("ab2", other)) is None

            async def caught_up() -> bool:
                return a.runners["ab"].peer_backlog == 0

            await until("ab caught up", caught_up)
            assert server.receive("gw-b", cert, frame("ab", ack)) is None
            assert a.metrics.registry.get_sample_value(
                "qkdgw_peer_messages_rejected_total", {"link": "ab", "reason": "overloaded"}
            ) == 8
        finally:
            await a.stop()

    asyncio.run(main())


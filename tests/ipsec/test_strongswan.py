"""The strongSwan sink with real charons: every epoch's key becomes a new IKE SA's RFC 8784 PPK.

Topology and wiring: tests/ipsec/strongswan_world.py. Each phase has a world of its own, and
the first two run for each pair of charons (docs/interop.md):
- "5.9": Debian 12's strongSwan 5.9.8 at both sites;
- "6.0-mlkem": Debian 13's 6.0.1 (with the `ml` plugin) at both sites, ML-KEM-768 as an
  additional key exchange in the IKE and ESP proposals;
- "5.9-6.0" (main only): a 5.9 initiator and a 6.0 responder, without ML-KEM (5.9 has none).
Phases:
- main: UDP both ways at 500 packets/s across 25+ rotations 1.5 s apart; list-sas sampled
  every 50 ms in both charons; the wire between the sites captured and classified.
- restart: a long interval (no rotation during the phase), so what brings the tunnel back
  is the sink's watchdog re-injecting the current epoch: charon-a (the IKE initiator's) is
  SIGKILLed and restarted, then charon-b's.
- no-ml: both sites on Debian 13's strongSwan as packaged (no `ml` plugin) with ML-KEM in the
  proposals, as an operator who skipped docs/strongswan.md would have it: no IKE SA ever
  comes up; the link stays blocked and alarmed, and nothing crosses in clear.
- refused: charon-b loses the sites' IKE secret, so the initiator's switch to a new epoch
  fails its IKE authentication (a real data plane refusing a switch): gw-a blocks, raises
  `sink-failed` and gives the epoch up; once the secret is back, a later epoch recovers.
"""

from __future__ import annotations

import asyncio
import functools
import re
import signal
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.demo.wire import Kind, Tally
from ipsec.strongswan.vici import Vici
from tests.ipsec import strongswan_world as sw

RATE, SECONDS, INTERVAL = 500, 42, 1.5
MAIN_POLICY = {"interval": INTERVAL, "jitter": 0.0, "hard_lifetime": 20.0, "grace": 1.0}
RESTART_POLICY = {"interval": 600.0, "jitter": 0.0, "hard_lifetime": 1200.0, "grace": 1.0}
#: After charon comes back, the tunnel must be up again within this (the responder's case
#: waits for the initiator's dead peer detection: 2 s delay + 3 retransmits, ~9 s).
COMEBACK = 20.0


#: The charons of sites a and b, and whether their proposals ask for ML-KEM.
PAIRS: dict[str, tuple[tuple[sw.Charon, sw.Charon], bool]] = {
    "5.9": ((sw.DEBIAN12, sw.DEBIAN12), False),
    "6.0-mlkem": ((sw.DEBIAN13, sw.DEBIAN13), True),
    "5.9-6.0": ((sw.DEBIAN12, sw.DEBIAN13), False),
}


def _world(tmp_path_factory: pytest.TempPathFactory, name: str, policy: dict[str, Any],
           phase: Callable[[sw.World], Coroutine[Any, Any, dict[str, Any]]],
           pair: str = "5.9") -> Iterator[dict[str, Any]]:
    """One world for PHASE, kept up while the module's tests judge its results."""
    charons, mlkem = PAIRS[pair]
    if reason := sw.missing_tools(*charons):
        pytest.skip(f"no strongSwan world here: {reason}")
    with sw.World(tmp_path_factory.mktemp(f"strongswan-{name}-{pair}"), policy,
                  charons=charons, mlkem=mlkem) as world:
        result = asyncio.run(phase(world))
        result.update(pair=pair, mlkem=mlkem)
        yield result


@pytest.fixture(scope="module", params=list(PAIRS))
def main(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from _world(tmp_path_factory, "main", MAIN_POLICY, _main_phase, request.param)


async def _main_phase(w: sw.World) -> dict[str, Any]:
    await w.start()
    first = (await w.link("a"))["epoch"]
    stop = asyncio.Event()
    sampler = asyncio.create_task(w.sample(stop))
    with w.capture("main") as capture:
        w.start_flows(RATE, SECONDS)
        flows = await w.flows_done()
    stop.set()
    samples = await sampler
    status = {s: await w.link(s) for s in ("a", "b")}
    await _rekey_child(w)  # charon alone: with ML-KEM in the ESP proposal, a CHILD SA's PFS
    return {"root": w.root, "flows": flows, "capture": capture, "samples": samples,
            "status": status, "first_epoch": first,
            "list_sas": {s: w.swanctl(s, "--list-sas") for s in ("a", "b")},
            "versions": {s: w.swanctl(s, "--version", "--daemon") for s in ("a", "b")},
            "charon_a": (w.root / "charon-a.log").read_text(),
            "holds": w.holds("b"), "initiator_holds": w.holds("a")}


async def _rekey_child(w: sw.World) -> None:
    """The initiator's charon rekeys its CHILD SA (same IKE SA, no new PPK)."""
    v = await Vici.connect(w.vici_path("a"))
    try:
        before = await _installed_spis(v)
        await v.request("rekey", {"child": "lan"})

        async def rekeyed() -> bool:
            return bool(await _installed_spis(v) - before)

        await sw.until("the CHILD SA rekeyed", rekeyed, COMEBACK)
    finally:
        await v.close()


async def _installed_spis(v: Vici) -> set[str]:
    events = await v.streamed("list-sas", "list-sa", {"noblock": "yes"})
    return {c["spi-in"] for e in events for sa in e.values() if isinstance(sa, dict)
            for c in (sa.get("child-sas") or {}).values() if c.get("state") == "INSTALLED"}


@pytest.fixture(scope="module", params=["5.9", "6.0-mlkem"])
def restart(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from _world(tmp_path_factory, "restart", RESTART_POLICY, _restart_phase,
                      request.param)


async def _restart_phase(w: sw.World) -> dict[str, Any]:
    await w.start()
    stop = asyncio.Event()
    sampler = asyncio.create_task(w.sample(stop, period=0.1))
    events: dict[str, float] = {}
    epochs: dict[str, int] = {"before": (await w.link("a"))["epoch"]}
    with w.capture("restart") as capture:
        w.start_flows(100, 60)
        await asyncio.sleep(3)
        for site in ("a", "b"):
            events[f"kill-{site}"] = time.time()
            w.kill(f"charon-{site}", signal.SIGKILL)
            await asyncio.sleep(2)
            events[f"start-{site}"] = time.time()
            w.start_charon(site)
            await sw.until(f"tunnel back after charon-{site} restarted",
                           functools.partial(_received_since, w, events[f"start-{site}"]),
                           COMEBACK)
            events[f"back-{site}"] = time.time()
            epochs[f"back-{site}"] = (await w.link("a"))["epoch"]
            await asyncio.sleep(3)
        # The initiator's gateway SIGKILLed and restarted at once: charon keeps the IKE SA,
        # the restarted sink adopts it until a new epoch replaces it.
        before = (await w.link("a"))["epoch"]
        events["kill-gw"] = time.time()
        w.kill("gw-a", signal.SIGKILL)
        w.start_gateway("a")
        await sw.until("gw-a admin socket", functools.partial(_answers, w))
        await w.admin("a", "POST", "/rekey")
        await sw.until("a new epoch after the restart",
                       functools.partial(_rekeyed_past, w, before), COMEBACK)
        epochs["after-gw"] = (await w.link("a"))["epoch"]
        await asyncio.sleep(RESTART_POLICY["grace"] + 2)
        events["end"] = time.time()
        for site in ("a", "b"):
            w.procs[f"send-{site}"].send_signal(signal.SIGTERM)  # they write what they sent
        flows = await w.flows_done()
    stop.set()
    samples = await sampler
    status = {s: await w.link(s) for s in ("a", "b")}
    return {"root": w.root, "events": events, "epochs": epochs, "capture": capture,
            "samples": samples, "status": status, "flows": flows,
            "gw_a": (w.root / "gw-a.log").read_text(),
            "charon_a": (w.root / "charon-a.log").read_text(),
            "charon_b": (w.root / "charon-b.log").read_text()}


async def _answers(w: sw.World) -> bool:
    try:
        await w.link("a")
    except OSError:
        return False
    return True


async def _rekeyed_past(w: sw.World, epoch: int) -> bool:
    a, b = await w.link("a"), await w.link("b")
    return a["epoch"] == b["epoch"] > epoch and not a["blocked"]


async def _received_since(w: sw.World, since: float) -> bool:
    """Both directions have delivered packets sent after SINCE (read from the charons' own
    counters would trust what is being tested; the receivers are independent)."""
    ok = True
    for src in ("a", "b"):
        stats = await asyncio.to_thread(_flow_progress, w, src)
        ok = ok and stats > since
    return ok


def _flow_progress(w: sw.World, src: str) -> float:
    """Send time of the newest packet from SRC that the other side received, from the
    receiver's live log (it prints each second)."""
    log = w.root / f"recv-{'b' if src == 'a' else 'a'}.log"
    times = re.findall(r"^newest (\d+\.\d+)$", log.read_text(), re.M)
    return float(times[-1]) if times else 0.0


# -- the wire -----------------------------------------------------------------------------------


def read_wire(pcap: Path) -> Tally:
    """What crossed wan-a (gateway/demo/wire.py): between the gateways ESP-in-UDP, IKE on
    500/4500 (and NAT-T keepalives) and ICMP errors (a dead charon's port unreachable); TCP
    (the peer channel, the KMEs' mutual TLS); anything else is a leak."""
    return Tally.of(sw.World.topology, {Kind.ESP_IN_UDP, Kind.IKE, Kind.ICMP, Kind.TCP}
                    ).read(pcap)


@pytest.fixture(scope="module")
def main_wire(main: dict[str, Any]) -> Tally:
    return read_wire(Path(main["capture"]["pcap"]))


def rotations(samples: list[dict[str, Any]], site: str = "a") -> list[tuple[float, str]]:
    """(first time seen, unique id) of each IKE SA established in SITE's charon."""
    seen: dict[str, float] = {}
    for s in samples:
        for sa in s.get("sas", []) if s["site"] == site else []:
            if sa["state"] == "ESTABLISHED":
                seen.setdefault(sa["uid"], s["t"])
    return sorted((t, uid) for uid, t in seen.items())


def used_ppk_ids(charon_log: str) -> list[str]:
    return re.findall(r"using PPK for PPK_ID '([^']+)'", charon_log)


# -- main ---------------------------------------------------------------------------------------


def test_at_least_20_rotations_each_a_new_ike_sa_with_a_new_ppk(main: dict[str, Any]) -> None:
    rot = rotations(main["samples"])
    assert len(rot) >= 21, f"only {len(rot)} IKE SAs seen"
    ids = used_ppk_ids(main["charon_a"])
    epochs = [int(re.match(r"qkdgw-ab-e(\d+)-[0-9a-f]{12}$", i).group(1))  # type: ignore[union-attr]
              for i in ids]
    assert len(set(ids)) == len(ids), "a PPK id was used twice"
    assert epochs == list(range(1, len(ids) + 1)), "one PPK per epoch, in order"
    last = main["status"]["a"]["epoch"]  # read before the log: a later epoch may follow
    assert last in epochs[-2:]
    assert main["status"]["b"]["epoch"] in epochs[-2:]
    assert main["status"]["a"]["fingerprint"] == main["status"]["b"]["fingerprint"]


def test_each_site_runs_the_charon_it_should_and_ike_negotiates_what_it_proposes(
        main: dict[str, Any]) -> None:
    """6.0 with ML-KEM: every IKE SA took ML-KEM-768 as its first additional key exchange
    (over VICI `ake1`, and in 6.0's own `swanctl --list-sas`) on top of X25519 and the PPK,
    and so did a CHILD SA rekey; with a 5.9 site nothing but X25519 (and the PPK)."""
    charons, _ = PAIRS[main["pair"]]
    for site, charon in zip(("a", "b"), charons, strict=True):
        assert f"strongSwan {charon.version}." in main["versions"][site], main["versions"][site]
    established = [sa for s in main["samples"] for sa in s.get("sas", [])
                   if sa["state"] == "ESTABLISHED"]
    assert established
    assert {sa["ke"] for sa in established} == {"CURVE_25519"}
    assert {sa["ake1"] for sa in established} == ({"ML_KEM_768"} if main["mlkem"] else {None})
    ike = "AES_GCM_16-256/PRF_HMAC_SHA2_384/CURVE_25519" + (
        "/KE1_ML_KEM_768" if main["mlkem"] else "") + "/PPK"
    for site in ("a", "b"):
        text = main["list_sas"][site]
        sas = re.findall(r"^qkdgw-ab: #\d+, ESTABLISHED, IKEv2", text, re.M)
        assert sas, text
        assert re.findall(r"^  (\S+)$", text, re.M) == [ike] * len(sas), text
        # The CHILD SA charon rekeyed at the end: its own key exchange is ML-KEM too (PFS).
        rekeyed = re.findall(r"INSTALLED, TUNNEL-in-UDP, (ESP:\S+)", text)
        assert ("ESP:AES_GCM_16-256/CURVE_25519/KE1_ML_KEM_768" in rekeyed) == main["mlkem"], text


def test_list_sas_shows_ppk_on_every_ike_sa_and_the_tunnel_never_goes_down(
        main: dict[str, Any]) -> None:
    samples = [s for s in main["samples"] if "sas" in s]
    assert not [s for s in main["samples"] if s.get("down")], "a charon was unreachable"
    for s in samples:
        established = [sa for sa in s["sas"] if sa["state"] == "ESTABLISHED"]
        assert all(sa["ppk"] == "yes" for sa in established), s
        up = [sa for sa in established
              if any(c["state"] == "INSTALLED" for c in sa["children"])]
        assert up, f"no IKE SA with an installed CHILD SA in charon-{s['site']} at {s['t']}"


def test_responder_holds_only_the_live_ppks(main: dict[str, Any]) -> None:
    """The responder has each epoch's PPK loaded from its install to its retirement: a new id
    every epoch, never more than the two of a rotation at once."""
    held = [s["ppks"] for s in main["samples"] if s["site"] == "b" and "ppks" in s]
    assert max(len(h) for h in held) <= 2
    seen = {pid for h in held for pid in h}
    assert len(seen) >= 21
    initiator = [s["ppks"] for s in main["samples"] if s["site"] == "a" and "ppks" in s]
    # The initiator unloads a PPK once its IKE SA is up (the backstop of docs/strongswan.md).
    assert sum(1 for h in initiator if h) < len(initiator) / 4


def test_spis_change_every_rotation(main: dict[str, Any]) -> None:
    spis: dict[str, set[str]] = {}
    for s in main["samples"]:
        for sa in s.get("sas", []) if s["site"] == "a" else []:
            for c in sa["children"]:
                if c["spi_in"]:
                    spis.setdefault(sa["uid"], set()).add(c["spi_in"] + c["spi_out"])
    assert all(len(v) == 1 for v in spis.values()), "a CHILD SA changed SPIs under its IKE SA"
    pairs = [next(iter(v)) for v in spis.values()]
    assert len(set(pairs)) == len(pairs) >= 21


def test_every_packet_between_the_sites_is_esp_in_udp(main: dict[str, Any],
                                                        main_wire: Tally) -> None:
    assert main["capture"]["dropped"] == 0, "the capture missed packets: counts are not exact"
    assert main_wire.leaked == 0, main_wire.leaks
    flows = main["flows"]
    # Every packet a LAN sent crossed the wire encrypted, once: what was lost was lost at the
    # receiving gateway (the responder-side window), not sent in clear or dropped before.
    for src, dst in (("a", "b"), ("b", "a")):
        flow = flows[f"{src}->{dst}"]
        assert flow["send_errors"] == 0
        assert main_wire.esp[f"{src}>{dst}"] == flow["sent"], (src, dst)


def test_no_packet_is_lost_across_rotations_the_responder_holds_its_traffic(
        main: dict[str, Any]) -> None:
    flows, rot = main["flows"], rotations(main["samples"])
    starts = [t for t, _ in rot]
    during = [t for t in starts
              if flows["b->a"]["start"] < t < flows["b->a"]["start"] + SECONDS]
    total = {d: len(f["lost"]) for d, f in flows.items()}
    holds = [(packets, ms) for packets, ms, by in main["holds"] if by == "Commit"]
    print(f"\nstrongSwan PPK rotation at {RATE} packets/s each way, {len(during)} rotations"
          f" under traffic: lost initiator->responder {total['a->b']},"
          f" responder->initiator {total['b->a']}; the responder held its traffic"
          f" {len(holds)} times, {sum(p for p, _ in holds)} packets in all, for"
          f" {min(ms for _, ms in holds)}-{max(ms for _, ms in holds)} ms")
    for flow in flows.values():
        assert flow["sent"] == RATE * SECONDS
    # Initiator to responder: the initiator switches only once the responder has the SA.
    assert total["a->b"] == 0
    # Responder to initiator: strongSwan's responder would send on the new CHILD SA before
    # the initiator has installed it (docs/strongswan.md); its gateway holds that traffic
    # from the Offer to the Commit, and every rotation under traffic held some.
    assert total["b->a"] == 0
    assert len(holds) >= len(rot) - 1
    assert sum(1 for p, _ in holds if p > 0) >= len(during) - 1
    # The initiator never holds anything.
    assert main["initiator_holds"] == []


# -- restart ------------------------------------------------------------------------------------


def test_charon_killed_and_restarted_comes_back_on_the_current_epochs_ppk(
        restart: dict[str, Any]) -> None:
    """charon-a (IKE initiator) restarted: its sink re-injects the current epoch and opens a
    new IKE SA with its PPK, no rotation. charon-b (IKE responder) restarted: its sink
    restores the current PPK and asks for a new epoch at once (charon-a would notice only by
    dead peer detection); the tunnel comes back on that one, or on the one after: charon's
    socket answers before `swanctl --load-all` has loaded the sites' IKE secret (and unloads
    the PPKs it does not know), so the initiator's switch to the new epoch may fail its IKE
    authentication, which blocks, alarms and gives that epoch up (fail closed)."""
    ev, epochs = restart["events"], restart["epochs"]
    for site in ("a", "b"):
        print(f"\ncharon-{site} killed: tunnel back {ev[f'back-{site}'] - ev[f'start-{site}']:.1f}"
              f" s after its restart")
    e = epochs["before"]
    assert epochs["back-a"] == e, "a rotation happened: the comeback would not show re-injection"
    assert set(used_ppk_ids(_after(restart["charon_a"], "a"))) >= {_ppk(restart, e)}
    back = epochs["back-b"]
    assert back in (e + 1, e + 2)
    if back == e + 2:  # the switch to e + 1 raced swanctl: it failed closed, with the alarm
        assert f"epoch {e + 1}: could not switch to its key" in restart["gw_a"]
    # (later: the epoch of the gateway-crash part below)
    assert used_ppk_ids(_after(restart["charon_b"], "b"))[0] == _ppk(restart, back)
    samples = [s for s in restart["samples"] if "sas" in s and s["t"] > ev["back-b"]]
    assert samples
    assert all(any(sa["state"] == "ESTABLISHED" and sa["ppk"] == "yes"
                               for sa in s["sas"]) for s in samples[-5:])


def _after(charon_log: str, site: str) -> str:
    """The log of the restarted charon only (each start logs its version banner)."""
    return charon_log.split("Starting IKE charon daemon")[-1]


def _ppk(restart: dict[str, Any], epoch: int) -> str:
    ids = {i for log in ("charon_a", "charon_b") for i in used_ppk_ids(restart[log])
           if i.startswith(f"qkdgw-ab-e{epoch}-")}
    assert len(ids) == 1, ids
    return ids.pop()


def test_gateway_crash_adopts_the_ike_sa_and_loses_nothing(restart: dict[str, Any]) -> None:
    ev = restart["events"]
    assert restart["epochs"]["after-gw"] > restart["epochs"]["back-b"]
    assert "adopted IKE SA(s)" in restart["gw_a"]
    for direction, flow in restart["flows"].items():
        lost = [t for t in flow["lost_at"] if t > ev["kill-gw"]]
        assert lost == [], f"{direction}: {len(lost)} lost after the gateway was killed"
    # The adopted IKE SA was retired with the first new epoch: one IKE SA left at the end.
    last = [s for s in restart["samples"] if s["site"] == "a" and "sas" in s][-1]
    assert len(last["sas"]) == 1, last
    assert last["sas"][0]["ppk"] == "yes", last


def test_nothing_in_clear_while_charon_was_down(restart: dict[str, Any]) -> None:
    wire = read_wire(Path(restart["capture"]["pcap"]))
    assert restart["capture"]["dropped"] == 0
    assert wire.leaked == 0, wire.leaks
    assert wire.esp["a>b"] > 0
    assert wire.esp["b>a"] > 0


# -- refused ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from _world(tmp_path_factory, "refused", RESTART_POLICY, _refused_phase)


async def _refused_phase(w: sw.World) -> dict[str, Any]:
    await w.start()
    e = (await w.link("a"))["epoch"]
    out: dict[str, Any] = {"before": e}
    with w.capture("refused") as capture:
        w.start_flows(100, 40)  # stopped once the tunnel is back
        start = time.time()
        await sw.until("traffic through the tunnel", functools.partial(_received_since, w, start))
        vici = await Vici.connect(w.vici_path("b"))
        try:
            await vici.request("unload-shared", {"id": "ike-sites"})
        finally:
            await vici.close()
        await w.admin("a", "POST", "/rekey")
        await sw.until("gw-a blocked with sink-failed", functools.partial(_alarmed, w), COMEBACK)
        out["alarmed"] = await w.link("a")
        await asyncio.to_thread(
            sw.run, "swanctl", "--load-creds", "--noprompt", "--uri",
            f"unix://{w.vici_path('b')}", "--file", str(w.root / "swanctl-b.conf"))
        back_at = time.time()
        await sw.until("a new epoch once the IKE secret is back",
                       functools.partial(_rekeyed_past, w, e + 1), COMEBACK)
        out["recovered"] = await w.link("a")
        await sw.until("tunnel back", functools.partial(_received_since, w, back_at), COMEBACK)
        for site in ("a", "b"):
            w.procs[f"send-{site}"].send_signal(signal.SIGTERM)
        out["flows"] = await w.flows_done()
    out.update(capture=capture, gw_a=(w.root / "gw-a.log").read_text(),
               charon_a=(w.root / "charon-a.log").read_text(),
               charon_b=(w.root / "charon-b.log").read_text())
    return out


async def _alarmed(w: sw.World) -> bool:
    try:
        a = await w.link("a")
    except OSError:  # gw-a still starting
        return False
    return bool(a["blocked"]) and "sink-failed" in a["alarms"]


def test_a_switch_charon_refuses_blocks_alarms_and_gives_the_epoch_up(
        refused: dict[str, Any]) -> None:
    e, alarmed, recovered = refused["before"], refused["alarmed"], refused["recovered"]
    assert f"epoch {e + 1}: could not switch to its key" in alarmed["alarms"]["sink-failed"]
    assert f"link ab epoch {e + 1} discarded" in refused["gw_a"]
    # The refused epoch's PPK never keyed an IKE SA; a later one did, and cleared the alarm.
    assert not [i for i in used_ppk_ids(refused["charon_b"]) if i.startswith(f"qkdgw-ab-e{e + 1}-")]
    assert recovered["epoch"] > e + 1
    assert _ppk(refused, recovered["epoch"]) in used_ppk_ids(refused["charon_b"])
    assert not recovered["blocked"]
    assert "sink-failed" not in recovered["alarms"]


def test_nothing_in_clear_while_the_switch_was_refused(refused: dict[str, Any]) -> None:
    wire = read_wire(Path(refused["capture"]["pcap"]))
    assert refused["capture"]["dropped"] == 0
    assert wire.leaked == 0, wire.leaks
    assert wire.esp["a>b"] > 0
    assert wire.esp["b>a"] > 0


# -- no-ml --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_ml(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    charons = (sw.DEBIAN13, sw.DEBIAN13)
    if reason := sw.missing_tools(*charons):
        pytest.skip(f"no strongSwan world here: {reason}")
    with sw.World(tmp_path_factory.mktemp("strongswan-no-ml"), MAIN_POLICY, charons=charons,
                  mlkem=True, ml_plugin=False) as w:
        yield asyncio.run(_no_ml_phase(w))


async def _no_ml_phase(w: sw.World) -> dict[str, Any]:
    w.start_sim()
    for site in ("a", "b"):
        w.start_data_plane(site)
    for site in ("a", "b"):
        w.start_gateway(site)
    with w.capture("no-ml") as capture:
        w.start_flows(100, 8)
        await sw.until("gw-a blocked with sink-failed", functools.partial(_alarmed, w), COMEBACK)
        flows = await w.flows_done()
    return {"capture": capture, "flows": flows, "status": await w.link("a"),
            "list_algs": w.swanctl("a", "--list-algs"),
            "charon_a": (w.root / "charon-a.log").read_text()}


def test_mlkem_without_the_ml_plugin_never_brings_the_tunnel_up_and_fails_closed(
        no_ml: dict[str, Any]) -> None:
    assert "ML_KEM" not in no_ml["list_algs"]
    assert "negotiated key exchange method ML_KEM_768 not supported" in no_ml["charon_a"]
    assert not re.search(r"IKE_SA qkdgw-ab\[\d+\] established", no_ml["charon_a"])
    status = no_ml["status"]
    assert status["blocked"]
    assert "sink-failed" in status["alarms"]
    wire = read_wire(Path(no_ml["capture"]["pcap"]))
    assert no_ml["capture"]["dropped"] == 0
    assert wire.leaked == 0, wire.leaks
    for direction, flow in no_ml["flows"].items():
        assert flow["sent"] > 0
        assert flow["received"] == 0, direction

"""End to end: two `qkdgw run` daemons and `qkdgw kms-sim`, real mTLS on loopback.

    site A: qkdgw run (initiator) ──mTLS peer channel── site B: qkdgw run (responder)
          │ mTLS (ETSI 014)                                     │ mTLS (ETSI 014)
          └────────── KME-A ═══ qkdgw kms-sim ═══ KME-B ─────────┘

Each test gets its own directory, ports and processes; everything stops at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.core.messages import MAX_MESSAGE_BYTES
from gateway.peer import MAX_FRAME_BYTES
from tests.gateway.sites import Sites, file_mode
from tests.helpers import qkdgw_command

pytestmark = pytest.mark.slow


@pytest.fixture
def sites(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sites]:
    policy: dict[str, Any] = getattr(request, "param", {})
    s = Sites(tmp_path, {"interval": 1.0, "jitter": 0.1, "hard_lifetime": 30.0,
                         "grace": 0.5, **policy})
    try:
        yield s.start()
    finally:
        s.stop()
    for site in ("a", "b"):
        log = s.log(site)
        assert "Traceback" not in log, log[-3000:]
        assert "ERROR" not in log, [ln for ln in log.splitlines() if "ERROR" in ln][:5]


def test_one_minute_of_rekeys_every_second(sites: Sites) -> None:
    """60 s at a 1 s interval: every epoch the same on both sides, none failed."""
    sites.wait_until("the first epoch", sites.converged)
    start = sites.link("a")["epoch"]
    time.sleep(60)
    sites.wait_until("both sides on the same epoch", sites.converged, timeout=5)
    a, b = sites.epochs("a"), sites.epochs("b")
    done = [e for e in a if e > start]
    assert len(done) >= 50, f"only {len(done)} rekeys in 60 s"
    assert a == {e: b[e] for e in a}, "an epoch's key differs between the sites"
    assert len(set(a.values())) == len(a), "two epochs share a key"
    for site in ("a", "b"):
        events = {r["event"] for r in sites.audit(site)}
        assert not events & {"discarded", "rejected", "unconfirmed"}, events
        status = sites.link(site)
        assert status["alarms"] == {}
        assert status["rekeys"] >= 50
        assert status["kms"]["ok"]
        assert status["last_rekey_latency"] < 0.5
    # key IDs: one per epoch, never twice
    ids = [k for r in sites.audit("a") if r["event"] == "offered" for k in r["key_ids"]]
    assert len(ids) == len(set(ids)) >= 50
    # the file sinks hold the same, current key, 0600
    assert sites.psk("a") == sites.psk("b")
    assert len(sites.psk("a")) == 64
    assert file_mode(sites.layout.state_dir("a") / "ab.psk") == 0o600
    for site in ("a", "b"):
        r = subprocess.run([*qkdgw_command(), "audit", "verify",
                            str(sites.layout.state_dir(site) / "audit.jsonl")],
                           capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stdout
        assert "OK" in r.stdout, r.stdout
    # each trail holds the other's head as of every epoch, and checkpoints signed by its site
    trails = {s: str(sites.layout.state_dir(s) / "audit.jsonl") for s in ("a", "b")}
    certs = {s: str(sites.layout.pki / f"gw-{s}.pem") for s in ("a", "b")}
    r = subprocess.run([*qkdgw_command(), "audit", "verify", trails["a"], "--cert", certs["a"],
                        "--peer", trails["b"], "--peer-cert", certs["b"]],
                       capture_output=True, text=True, check=False)
    anchors = re.search(r"anchors: (\d+) peer heads checked between site a and site b: OK",
                        r.stdout)
    assert r.returncode == 0, r.stdout
    assert anchors, r.stdout
    assert int(anchors[1]) >= 100, r.stdout
    assert r.stdout.count("signed checkpoints checked") == 2


def _outage(sites: Sites, seconds: float) -> float:
    """Both KMEs unreachable for SECONDS; returns when it ends."""
    assert sites.sim is not None
    sites.sim.fault(kind="unavailable", seconds=seconds)
    return time.time() + seconds


def test_kms_outage_in_qkd_pqc_mode_keeps_the_key_and_recovers(sites: Sites) -> None:
    sites.wait_until("the first epochs", lambda: sites.converged()
                     and sites.link("a")["epoch"] >= 3)
    end = _outage(sites, 10)
    sites.wait_until("the KMS alarm", lambda: "kms-unavailable" in sites.link("a")["alarms"])
    epoch = sites.link("a")["epoch"]
    time.sleep(max(0.0, end - time.time() - 1))
    during = sites.link("a")
    assert during["epoch"] <= epoch + 1
    assert not during["blocked"]  # on its last key
    sites.wait_until("rekeys resume", lambda: sites.converged()
                     and sites.link("a")["epoch"] >= epoch + 3)
    sites.wait_until("the alarm clears", lambda: "kms-unavailable" not in
                     sites.link("a")["alarms"])
    suites = {r["detail"] for r in sites.audit("a") if r["event"] == "offered"}
    assert all(s.startswith("qkd+") for s in suites)  # never without QKD in this mode


@pytest.mark.parametrize("sites", [{"mode": "pqc-fallback"}], indirect=True)
def test_kms_outage_in_fallback_mode_goes_on_without_qkd_and_returns(sites: Sites) -> None:
    sites.wait_until("the first epochs", lambda: sites.converged()
                     and sites.link("a")["epoch"] >= 3)
    end = _outage(sites, 10)
    sites.wait_until("PQC-only epochs and the alarm", lambda: sites.converged()
                     and sites.link("a")["suite"].startswith("pqc+")
                     and "qkd-fallback" in sites.link("a")["alarms"])
    pqc = sites.link("a")["epoch"]
    sites.wait_until("more PQC-only epochs", lambda: sites.link("a")["epoch"] >= pqc + 3)
    assert time.time() < end  # still during the outage
    sites.wait_until("back to QKD", lambda: sites.converged()
                     and sites.link("a")["suite"].startswith("qkd+")
                     and not sites.link("a")["alarms"], timeout=20)
    assert time.time() >= end
    a, b = sites.epochs("a"), sites.epochs("b")
    assert a == {e: b[e] for e in a}


def test_peer_killed_and_restarted_resynchronises(sites: Sites) -> None:
    sites.wait_until("the first epochs", lambda: sites.converged()
                     and sites.link("a")["epoch"] >= 3)
    psk = sites.psk("b")
    sites.stop_site("b", signal.SIGKILL)
    epoch = sites.link("a")["epoch"]
    time.sleep(3)
    a = sites.link("a")
    assert not a["blocked"]
    assert a["epoch"] <= epoch + 1  # keeps its key until hard lifetime
    assert sites.psk("b") == psk  # B's data plane untouched by the crash
    sites.start_site("b")
    sites.wait_until("converged again", lambda: sites.converged()
                     and sites.link("a")["epoch"] > epoch + 1)
    epochs_a, epochs_b = sites.epochs("a"), sites.epochs("b")
    assert epochs_a == {e: epochs_b[e] for e in epochs_a if e in epochs_b}
    assert sites.psk("a") == sites.psk("b")


def test_graceful_stop_and_restart_resume(sites: Sites) -> None:
    sites.wait_until("the first epochs", lambda: sites.converged()
                     and sites.link("a")["epoch"] >= 2)
    stop = subprocess.run([*qkdgw_command(), "stop", "-c", str(sites.layout.site_config("a"))],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (stop.returncode, stop.stdout) == (0, "site a stopped\n"), stop.stderr
    assert sites.procs.pop("a").wait(timeout=20) == 0  # `qkdgw stop` returned: it is gone
    assert sites.stop_site("b") == 0  # SIGTERM
    state = sites.layout.state_dir("a")
    epoch = max(sites.epochs("a"))
    assert (state / "ab.psk").exists()  # the data plane keeps its key
    assert file_mode(state / "links" / "ab.json") == 0o600
    assert [r["event"] for r in sites.audit("a")[-2:]] == ["stopped", "checkpoint"]
    sites.start_site("a")
    sites.start_site("b")
    sites.wait_until("resumed with later epochs", lambda: sites.converged()
                     and sites.link("a")["epoch"] > epoch)


def test_a_stop_during_a_slow_switch_lets_it_finish(sites: Sites) -> None:
    """SIGTERM while A's data plane switches keys (its hook takes a second): the stop waits
    for the switch, so A's state names the key its data plane sends on and the restarted A
    adopts it, instead of blocking as it must after a switch of unknown outcome."""
    sites.wait_until("the first epochs", lambda: sites.converged()
                     and sites.link("a")["epoch"] >= 2)
    marker = sites.layout.root / "switching"
    path = sites.layout.site_config("a")
    config = yaml.safe_load(path.read_text())
    config["links"][0]["sinks"][0]["hook"] = [
        "sh", "-c", f'[ "$QKDGW_EVENT" = activate ] && touch {marker} && sleep 1; exit 0']
    path.write_text(yaml.safe_dump(config))
    assert sites.stop_site("a") == 0
    sites.start_site("a")
    sites.wait_until("A in a slow switch", marker.exists)
    assert sites.stop_site("a") == 0  # SIGTERM mid-switch
    saved = json.loads((sites.layout.state_dir("a") / "links" / "ab.json").read_text())
    assert saved["outbound"] is not None, saved
    assert saved["outbound"]["switched"], saved
    sites.start_site("a")
    sites.wait_until("A restarted", lambda: sites.log("a").count("site a up") == 3)
    assert "restarted while switching" not in sites.log("a")

# -- hostile input on the peer channel ---------------------------------------------------------


def _frames(sites: Sites, bodies: list[bytes], cert: str = "gw-b", link: str = "ab"
            ) -> list[str]:
    """Open the peer channel to A as CERT and send BODIES, each tagged with LINK (none if
    LINK is ""); what comes back: one refusal per refused frame ('REASON: ERROR', about
    LINK), then 'closed <code>' if A closed the channel, or 'handshake <status>'."""
    pki = sites.layout.pki
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    url = f"https://127.0.0.1:{sites.layout.gateway_port('a')}/v1/channel"
    tag = f"{link}\n".encode() if link else b""

    async def go() -> list[str]:
        out: list[str] = []
        async with aiohttp.ClientSession() as s:
            try:
                ws = await s.ws_connect(url, ssl=ctx, server_hostname="gw-a")
            except aiohttp.WSServerHandshakeError as e:
                return [f"handshake {e.status}"]
            for body in bodies:
                await ws.send_bytes(tag + body)
                try:
                    frame = await ws.receive(timeout=1.0)
                except TimeoutError:
                    continue  # accepted: no answer
                if frame.type is aiohttp.WSMsgType.TEXT:
                    answer = json.loads(frame.data)
                    assert answer["link"] == (link or None)
                    out.append(f"{answer['reason']}: {answer['error']}")
                else:
                    out.append(f"closed {ws.close_code}")
                    break
            await ws.close()
        return out

    return asyncio.run(go())


def test_hostile_peer_messages_are_refused_and_change_nothing(sites: Sites) -> None:
    sites.wait_until("the first epochs", lambda: sites.converged()
                     and sites.link("a")["epoch"] >= 2)
    old = {"v": 1, "type": "ack", "link": "ab", "epoch": 1, "out": 1,
           "nonce_i": "A" * 43 + "=", "nonce_r": "A" * 43 + "="}
    before = sites.epochs("a")
    answers = _frames(sites, [
        b'{"v":1,"type":"offer","link":"ab"',  # truncated
        json.dumps({**old, "extra": 1}).encode(),  # unknown field
        json.dumps({**old, "v": 3}).encode(),  # a protocol version nobody speaks
        json.dumps(old).encode(),  # well formed, stale: accepted on the wire, ignored
        b"{" + b" " * MAX_MESSAGE_BYTES + b"}",  # oversized message: refused for the link
        b"{" + b" " * MAX_FRAME_BYTES + b"}",  # oversized frame: the channel is closed
    ])
    assert answers[0] == "malformed: message is not JSON"
    assert answers[1].startswith("malformed: extra: Extra inputs")
    assert answers[2].startswith("malformed: unsupported protocol version")
    # The stale Ack got no answer.
    assert answers[3].startswith("malformed: message of"), answers
    # The oversized frame closed the channel: with 1009, or, when A's close races our
    # still-running write of the frame, a dropped connection (1006). The malformed count
    # below shows A refused it either way.
    assert answers[4] in ("closed 1009", "closed 1006"), answers
    assert _frames(sites, [b"{}"], cert="sae-b") == ["handshake 403"]  # the peer of no link
    assert _frames(sites, [b"{}"], link="zz") == ["unknown-link: no such link"]
    assert _frames(sites, [b"{}"], link="") == [
        "malformed: frame without a link tag (LINK, newline, message)"]
    after = sites.epochs("a")
    assert all(after[e] == f for e, f in before.items())  # no key changed
    metrics = _metrics(sites)
    assert 'qkdgw_peer_messages_rejected_total{link="ab",reason="malformed"} 4.0' in metrics
    # The untagged frame and the closed channel belong to no link.
    assert 'qkdgw_peer_messages_rejected_total{link="-",reason="malformed"} 2.0' in metrics
    assert 'qkdgw_peer_messages_rejected_total{link="-",reason="wrong-peer"} 1.0' in metrics
    assert 'qkdgw_peer_messages_rejected_total{link="-",reason="unknown-link"} 1.0' in metrics
    sites.wait_until("still rekeying", lambda: sites.converged()
                     and sites.link("a")["epoch"] > max(before) + 1)


def test_untrusted_certificate_cannot_connect(sites: Sites, tmp_path: Path) -> None:
    from gateway import pki

    rogue = pki.make_ca("rogue")
    pki.save(pki.issue(rogue, "gw-b", client=True), tmp_path / "r.pem", tmp_path / "r.key")
    ctx = ssl.create_default_context(cafile=str(sites.layout.pki / "ca.pem"))
    ctx.load_cert_chain(str(tmp_path / "r.pem"), str(tmp_path / "r.key"))
    url = f"https://127.0.0.1:{sites.layout.gateway_port('a')}/v1/channel"

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            await s.ws_connect(url, ssl=ctx, server_hostname="gw-a")

    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        asyncio.run(go())


def _metrics(sites: Sites) -> str:
    async def go() -> str:
        async with aiohttp.ClientSession() as s, \
                s.get(f"http://127.0.0.1:{sites.layout.metrics_port('a')}/metrics") as r:
            return await r.text()

    return asyncio.run(go())


def test_status_rekey_and_metrics_from_the_cli(sites: Sites) -> None:
    sites.wait_until("the first epoch", sites.converged)
    config = str(sites.layout.site_config("b"))
    r = subprocess.run([*qkdgw_command(), "status", "-c", config], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0
    assert "responder" in r.stdout
    assert "fingerprint" in r.stdout
    epoch = sites.link("a")["epoch"]
    r = subprocess.run([*qkdgw_command(), "rekey", "-c", config], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0
    assert "rekeying: ab" in r.stdout
    sites.wait_until("the requested epoch", lambda: sites.link("a")["epoch"] > epoch)
    metrics = _metrics(sites)
    for name in ("qkdgw_epoch", "qkdgw_key_age_seconds", "qkdgw_rekeys_total",
                 "qkdgw_rekey_latency_seconds_bucket", "qkdgw_kms_stored_key_count",
                 "qkdgw_kms_qber", "qkdgw_kms_key_rate_bits_per_second", "qkdgw_mode",
                 "qkdgw_audit_records"):
        assert f"\n{name}" in metrics, name
    sock = sites.layout.state_dir("a") / "admin.sock"
    assert file_mode(sock) == 0o600
    key = hashlib.sha256(sites.psk("a")).hexdigest()
    assert key not in metrics
    assert sites.psk("a").decode() not in metrics

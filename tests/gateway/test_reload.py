"""Live reconfiguration end to end: `qkdgw reload` and SIGHUP on two real `qkdgw run`
daemons, the KMS simulator over HTTPS and mutual TLS between the gateways.

Each test starts from init-demo's two sites with two links between them (`ab`, `ac`) at a
slow interval, so that a link nobody touches stays on its first epoch for the whole test:
its epoch counter, its rekey count and its peer channel's connection count are the proof
that a reload did not disturb it.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.gateway.sites import Sites
from tests.helpers import qkdgw_command

pytestmark = pytest.mark.slow

#: Slow enough that no scheduled rekey happens during a test: every new epoch is one the
#: test asked for (or a link's first).
POLICY = {"interval": 600.0, "jitter": 0.1, "hard_lifetime": 2400.0, "grace": 0.5}


def _link(site: str, name: str, sink: str | None = None) -> dict[str, Any]:
    """Link NAME between the demo's gateways: A initiates, B responds; a file sink."""
    peer = "b" if site == "a" else "a"
    return {"name": name, "role": "initiator" if site == "a" else "responder",
            "peer": {"address": "", "name": f"gw-{peer}", "sae_id": f"sae-{peer}"},
            "sinks": [{"type": "file", "path": sink or f"state-{site}/{name}.psk"}]}


class Reloading(Sites):
    """The two sites, each configuration editable as YAML and reloadable."""

    def config(self, site: str) -> dict[str, Any]:
        data: dict[str, Any] = yaml.safe_load(self.layout.site_config(site).read_text())
        return data

    def write(self, site: str, config: dict[str, Any]) -> bytes:
        """CONFIG as SITE's file (peer addresses filled in); the bytes written."""
        peer = "b" if site == "a" else "a"
        for link in config["links"]:
            link["peer"]["address"] = f"127.0.0.1:{self.layout.gateway_port(peer)}"
        raw = yaml.safe_dump(config).encode()
        self.layout.site_config(site).write_bytes(raw)
        return raw

    def add_link(self, site: str, name: str) -> None:
        config = self.config(site)
        config["links"].append(_link(site, name))
        self.write(site, config)

    def remove_link(self, site: str, name: str) -> None:
        config = self.config(site)
        config["links"] = [link for link in config["links"] if link["name"] != name]
        self.write(site, config)

    def reload(self, site: str) -> subprocess.CompletedProcess[str]:
        return self.qkdgw(site, "reload")

    def qkdgw(self, site: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*qkdgw_command(), args[0], "-c",
                               str(self.layout.site_config(site)), *args[1:]],
                              capture_output=True, text=True, timeout=60, check=False)

    def on_same_epoch(self, name: str, above: int = 0) -> bool:
        a, b = self.links("a").get(name), self.links("b").get(name)
        return (a is not None and b is not None and a["epoch"] == b["epoch"] > above
                and a["fingerprint"] == b["fingerprint"] and not a["blocked"]
                and not b["blocked"])

    def untouched(self, name: str) -> dict[str, tuple[int, int, int, str]]:
        """What a reload must leave alone on both sides: the link's epoch, its rekeys, its
        channel's connections, its key's fingerprint."""
        out = {}
        for site in ("a", "b"):
            link = self.links(site)[name]
            out[site] = (link["epoch"], link["rekeys"], link["peer_channel_connects"],
                         link["fingerprint"])
        return out

    def metrics(self, site: str) -> str:
        port = self.config(site)["metrics"]["listen"].rpartition(":")[2]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                    timeout=10) as r:
            text: str = r.read().decode()
            return text

    def path(self, site: str, relative: str) -> Path:
        return self.layout.root / relative


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Reloading]:
    """Two sites with links `ab` and `ac`, both on their first epoch."""
    s = Reloading(tmp_path, POLICY)
    for site in ("a", "b"):
        config = s.config(site)
        config["links"] = [_link(site, "ab"), _link(site, "ac")]
        s.write(site, config)
    try:
        s.start()
        s.wait_until("both links on their first epoch",
                     lambda: s.on_same_epoch("ab") and s.on_same_epoch("ac"))
        yield s
    finally:
        s.stop()
    for site in ("a", "b"):
        log = s.log(site)
        assert "Traceback" not in log, log[-3000:]


def _reloaded(sites: Reloading, site: str) -> dict[str, Any]:
    records = [r for r in sites.audit(site) if r["event"] == "reloaded"]
    assert records, f"no reloaded record in {site}'s audit trail"
    return records[-1]


def test_links_added_and_removed_live_and_the_others_see_nothing(sites: Reloading) -> None:
    before = sites.untouched("ab")
    old = hashlib.sha256(sites.layout.site_config("a").read_bytes()).hexdigest()
    for site in ("a", "b"):
        sites.add_link(site, "ad")
        r = sites.reload(site)
        assert r.returncode == 0, r.stderr
        assert "added: ad" in r.stdout, r.stdout
    new = hashlib.sha256(sites.layout.site_config("a").read_bytes()).hexdigest()
    sites.wait_until("the added link keyed on both sides", lambda: sites.on_same_epoch("ad"))
    assert sites.path("a", "state-a/ad.psk").read_bytes() \
        == sites.path("b", "state-b/ad.psk").read_bytes()
    record = _reloaded(sites, "a")
    assert record["config"]["old_sha256"] == old
    assert record["config"]["new_sha256"] == new
    assert record["config"]["added"] == ["ad"]
    assert record["config"]["removed"] == []
    assert record["config"]["changed"] == {}

    # removed: on A first, then B
    for site in ("a", "b"):
        sites.remove_link(site, "ad")
        r = sites.reload(site)
        assert r.returncode == 0, r.stderr
        assert "removed: ad" in r.stdout, r.stdout
        assert "ad" not in sites.links(site)
        state = sites.layout.state_dir(site)
        assert not (state / "ad.psk").exists()  # a file sink's key goes with its link
        assert not (state / "links" / "ad.json").exists()
        assert 'link="ad"' not in sites.metrics(site)
        assert _reloaded(sites, site)["config"]["removed"] == ["ad"]
        r = subprocess.run([*qkdgw_command(), "audit", "verify", str(state / "audit.jsonl")],
                           capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stdout

    # the links nobody touched: same epoch, no rekey, no reconnect, same key
    assert sites.untouched("ab") == before
    assert before["a"][2] >= 1  # (the counter counts: the channel was opened once)
    metrics = sites.metrics("a")
    assert 'qkdgw_peer_channel_connects_total{peer="gw-b"} 1.0' in metrics
    assert sites.on_same_epoch("ac")


def test_policy_and_sink_changes_keep_the_current_key(sites: Reloading) -> None:
    ac = sites.untouched("ac")
    ab = sites.links("a")["ab"]
    key = sites.path("a", "state-a/ab.psk").read_bytes()
    for site in ("a", "b"):
        config = sites.config(site)
        link = next(x for x in config["links"] if x["name"] == "ab")
        link["policy"] = {"interval": 30.0, "jitter": 0.0}
        link["sinks"] = [{"type": "file", "path": f"state-{site}/ab-new.psk"}]
        sites.write(site, config)
        r = sites.reload(site)
        assert r.returncode == 0, r.stderr
        assert "ab (policy.interval, policy.jitter, sinks)" in r.stdout, r.stdout
        record = _reloaded(sites, site)
        assert record["config"]["changed"] == {"ab": ["policy.interval", "policy.jitter",
                                                      "sinks"]}
    # the current key is where it was: same epoch, same file, no new one yet
    now = sites.links("a")["ab"]
    assert (now["epoch"], now["fingerprint"]) == (ab["epoch"], ab["fingerprint"])
    assert now["next_rekey_in"] > 30  # the rekey already scheduled stays
    assert sites.path("a", "state-a/ab.psk").read_bytes() == key
    assert not sites.path("a", "state-a/ab-new.psk").exists()
    # the next epoch (asked for now) goes to the new sink, and the new interval holds
    r = sites.qkdgw("a", "rekey", "--link", "ab")
    assert r.returncode == 0, r.stderr
    sites.wait_until("the next epoch", lambda: sites.on_same_epoch("ab", above=ab["epoch"]))
    def moved(site: str) -> bool:
        return sites.path(site, f"state-{site}/ab-new.psk").exists() \
            and not sites.path(site, f"state-{site}/ab.psk").exists()

    sites.wait_until("the new sinks hold the key, the old ones are gone",
                     lambda: moved("a") and moved("b"))
    assert sites.path("a", "state-a/ab-new.psk").read_bytes() \
        == sites.path("b", "state-b/ab-new.psk").read_bytes() != key
    assert sites.links("a")["ab"]["next_rekey_in"] <= 30.0
    assert sites.untouched("ac") == ac


def test_refused_reloads_change_nothing(sites: Reloading) -> None:
    before = {x: sites.untouched(x) for x in ("ab", "ac")}
    good = sites.config("a")
    path = sites.layout.site_config("a")
    # a file that does not validate: the same message as check-config, exit status 2
    bad = dict(good, links=[*good["links"], _link("a", "ad")])
    bad["links"][-1]["role"] = "leader"
    sites.write("a", bad)
    check = subprocess.run([*qkdgw_command(), "check-config", str(path)],
                           capture_output=True, text=True, check=False)
    r = sites.reload("a")
    assert check.returncode == 2
    assert (r.returncode, r.stderr) == (2, check.stderr)
    assert "links.2.role" in r.stderr
    # changes a running daemon cannot take: each named, nothing applied (not even the
    # link added beside them)
    moved = dict(good, links=[*good["links"], _link("a", "ad")])
    moved["peer_channel"] = dict(good["peer_channel"], listen="127.0.0.1:1")
    moved["kms_status_interval"] = 5  # (live, but refused with the rest)
    moved["links"][0] = dict(moved["links"][0], kem="ML-KEM-1024")
    sites.write("a", moved)
    r = sites.reload("a")
    assert r.returncode == 2, r.stdout
    for named in ("peer_channel.listen", "links.ab.kem", "nothing changed"):
        assert named in r.stderr, r.stderr
    assert "kms_status_interval" not in r.stderr
    assert "Traceback" not in r.stderr
    # a new state directory: `qkdgw reload` looks for the daemon there, and says so; a
    # SIGHUP reaches it, and the refusal names the change
    sites.write("a", dict(moved, state_dir="elsewhere"))
    r = sites.reload("a")
    assert r.returncode == 1
    assert "state_dir" in r.stderr, r.stderr
    sites.procs["a"].send_signal(signal.SIGHUP)
    sites.wait_until("the refusal logged", lambda: "  state_dir: " in sites.log("a"))
    # this gateway's certificate replaced under the same name: refused as well
    sites.write("a", good)
    cert = sites.layout.pki / "gw-a.pem"
    original = cert.read_bytes()
    cert.write_bytes(original + b"\n")
    r = sites.reload("a")
    cert.write_bytes(original)
    assert r.returncode == 2
    assert "peer_channel.cert" in r.stderr, r.stderr
    assert set(sites.links("a")) == {"ab", "ac"}
    assert not [r for r in sites.audit("a") if r["event"] == "reloaded"]
    assert {x: sites.untouched(x) for x in ("ab", "ac")} == before
    assert sites.reload("a").returncode == 0  # the daemon goes on, and can reload


def test_sighup_reloads_and_a_one_sided_link_waits_for_its_peer(sites: Reloading) -> None:
    before = sites.untouched("ab")
    # A has the new link, B not yet: nothing breaks, and it keys once B has it
    sites.add_link("a", "ad")
    sites.procs["a"].send_signal(signal.SIGHUP)
    sites.wait_until("A reloaded", lambda: "ad" in sites.links("a"))
    assert sites.links("a")["ad"]["epoch"] == 0
    sites.add_link("b", "ad")
    sites.procs["b"].send_signal(signal.SIGHUP)
    sites.wait_until("the link keyed once B has it", lambda: sites.on_same_epoch("ad"))
    # a bad file on SIGHUP: the refusal (check-config's message) in the log; it goes on
    config = sites.config("b")
    config["kms_status_interval"] = -1
    sites.write("b", config)
    check = subprocess.run([*qkdgw_command(), "check-config",
                            str(sites.layout.site_config("b"))],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 2
    message = check.stderr.removeprefix("qkdgw: ").splitlines()[0]
    sites.procs["b"].send_signal(signal.SIGHUP)
    sites.wait_until("the refusal logged", lambda: f"reload refused: {message}"
                     in sites.log("b"))
    assert sites.procs["b"].poll() is None
    assert sites.on_same_epoch("ad")
    assert sites.untouched("ab") == before


def test_pacing_changes_apply_from_the_next_turn(sites: Reloading) -> None:
    before = {name: sites.untouched(name) for name in ("ab", "ac")}
    config = sites.config("a")
    config["pacing"] = {"exchanges": 3, "exchanges_per_peer": 2, "kms_requests": 5}
    sites.write("a", config)
    r = sites.reload("a")
    assert r.returncode == 0, r.stderr
    assert "pacing.exchanges" in r.stdout, r.stdout
    pacing = sites.status("a")["summary"]["pacing"]
    assert (pacing["exchange_limit"], pacing["exchange_limit_per_peer"],
            pacing["kms_request_limit"]) == (3, 2, 5)
    assert {name: sites.untouched(name) for name in ("ab", "ac")} == before
    # and the links still take their turns under the new limits
    r = sites.qkdgw("a", "rekey", "--link", "ab")
    assert r.returncode == 0, r.stderr
    sites.wait_until("the next epoch", lambda: sites.on_same_epoch(
        "ab", above=before["ab"]["a"][0]))

"""A hub with 50 links to 3 spoke gateways: `qkdgw kms-sim`, four `qkdgw run` daemons (the
hub initiates every link), file sinks, mutual TLS, audit trails on (tests/fleet.py).

The hub's turns are few on purpose (9 exchanges, 3 per peer, 4 KME requests), so that its
pacing shows in what the audit trail records: after a SIGKILL and a restart every link
comes back on a new epoch, never more exchanges in flight than the turns allow, the links
whose keys are oldest first, and no link blocked.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from tests.fleet import HUB, Fleet
from tests.helpers import qkdgw_command

pytestmark = pytest.mark.slow

LINKS, PEERS = 50, 3
PACING = {"exchanges": 9, "exchanges_per_peer": 3, "kms_requests": 4}
#: Keys last long and rekeys are far apart: every epoch here is one the test asked for.
POLICY = {"interval": 600.0, "hard_lifetime": 2400.0, "grace": 0.5}
#: These keep their first key while the others get a second: after the restart their keys
#: are the oldest, three per peer (as many as a peer's turns).
OLDEST = {f"l{i}" for i in range(LINKS - PEERS * PACING["exchanges_per_peer"], LINKS)}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("hub"), link_count=LINKS, peers=PEERS, policy=POLICY,
              pacing=PACING)
    try:
        f.start()
        f.wait_until("every link keyed on both sides", f.converged)
        yield f
    finally:
        f.stop()
    for site in f.sites:
        log = f.log(site)
        assert "Traceback" not in log, log[-3000:]
        assert "ERROR" not in log, [ln for ln in log.splitlines() if "ERROR" in ln][:5]


def _qkdgw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*qkdgw_command(), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_status_summarises_the_links_before_the_table(fleet: Fleet) -> None:
    config = str(fleet.config_path(HUB))
    r = _qkdgw("status", "-c", config)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    peers = {f"gw-s{k}": len([i for i in range(LINKS) if i % PEERS == k]) for k in range(PEERS)}
    assert lines[1] == f"{LINKS} links, 0 blocked; peers: " + \
        ", ".join(f"{p} {n}" for p, n in peers.items())
    assert lines[2].split() == ["state:", "idle", str(LINKS)]
    assert lines[3].split() == ["mode:", "qkd+pqc", str(LINKS)]
    assert lines[4].split() == ["alarms:", "none"]
    assert "exchanges 0 of 9 (3 per peer), 0 queued; KME requests 0 of 4" in lines[5]
    assert lines[6].split()[:3] == ["link", "role", "state"]
    rows = [line.split() for line in lines[7:-1]]
    assert sorted(row[0] for row in rows) == sorted(fleet.link_names())
    assert all(row[1:3] == ["initiator", "idle"] and row[3] == "1" for row in rows)

    r = _qkdgw("status", "-c", config, "--link", "l7")
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()[7:-1]] == ["l7"]
    assert r.stdout.splitlines()[1].startswith(f"{LINKS} links")  # the summary counts all

    r = _qkdgw("status", "-c", config, "--json")
    status = json.loads(r.stdout)
    assert len(status["links"]) == LINKS
    summary = status["summary"]
    assert summary["links"] == LINKS
    assert summary["by_state"] == {"idle": LINKS}
    assert summary["by_peer"] == peers
    assert summary["alarms"] == {}
    assert summary["pacing"]["exchange_limit"] == 9
    r = _qkdgw("status", "-c", config, "--link", "l7", "--json")
    assert [link["link"] for link in json.loads(r.stdout)["links"]] == ["l7"]

    r = _qkdgw("status", "-c", config, "--link", "nope")
    assert r.returncode == 2
    assert "no link 'nope' (links: l0, l1," in r.stderr
    assert "and 40 more" in r.stderr  # a hub's thousand names are not all listed


def _when(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["ts"]).timestamp()


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one instant (one that ends when another starts: not both)."""
    events = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_a_hub_restart_rekeys_every_link_paced_oldest_keys_first(fleet: Fleet) -> None:
    for name in sorted(set(fleet.link_names()) - OLDEST):
        fleet.admin(HUB, "/rekey", {"link": name})
    newer = {name: 0 if name in OLDEST else 1 for name in fleet.link_names()}
    fleet.wait_until("the second epochs", lambda: fleet.converged(newer))
    before = {name: link["epoch"] for name, link in fleet.links(HUB).items()}
    # The restart must find these epochs in the state files (written within a second).
    fleet.wait_until("the state saved", lambda: all(
        json.loads((fleet.state_dir(HUB) / "links" / f"{name}.json").read_text())
        ["outbound"]["epoch"] == epoch for name, epoch in before.items()))
    trail = fleet.state_dir(HUB) / "audit.jsonl"
    records, logged = len(trail.read_text().splitlines()), len(fleet.log(HUB))

    fleet.stop_site(HUB, signal.SIGKILL)
    fleet.start_site(HUB)
    fleet.wait_until("every link on a new epoch", lambda: fleet.converged(before))

    after = [json.loads(line) for line in trail.read_text().splitlines()[records:]]
    spans: dict[str, tuple[float, float]] = {}
    offered: list[str] = []
    for r in after:
        if r["event"] == "offered" and r["link"] not in spans:
            offered.append(r["link"])
            spans[r["link"]] = (_when(r), float("inf"))
        elif r["event"] == "rekeyed" and r["epoch"] > before[r["link"]]:
            spans[r["link"]] = (spans[r["link"]][0], _when(r))
    assert set(spans) == set(fleet.link_names())
    assert all(end < float("inf") for _, end in spans.values())
    # Never more exchanges at once than the turns, in all and towards one peer ...
    assert _most_at_once(list(spans.values())) <= PACING["exchanges"]
    for k in range(PEERS):
        towards = [s for name, s in spans.items() if int(name[1:]) % PEERS == k]
        assert _most_at_once(towards) <= PACING["exchanges_per_peer"]
    # ... and the oldest keys first: they take every turn there is.
    assert set(offered[:len(OLDEST)]) == OLDEST, offered
    # Nothing blocked: each link kept its key until the new one.
    restarted = fleet.log(HUB)[logged:]
    assert "traffic blocked" not in restarted
    assert "ALARM" not in restarted
    assert all(not link["blocked"] for link in fleet.links(HUB).values())
    for site in fleet.spokes:
        assert "ALARM" not in fleet.log(site)


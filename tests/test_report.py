"""`qkdgw report`: a period's report from a real site's history and audit trail.

    site A: qkdgw run ══ mTLS ══ site B: qkdgw run      (a rekey every second; an outage)
          └── KME-A ═══ qkdgw kms-sim ═══ KME-B ──┘
    qkdgw report -c site-a.yaml -o report.html        (asked of the running daemon, and
                                                      from the saved file once it stopped)
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest

from gateway.report import parse_time
from tests.gateway.sites import Sites
from tests.helpers import qkdgw_command

POLICY = {"interval": 1.0, "jitter": 0.0, "grace": 0.3, "hard_lifetime": 30.0,
          "mode": "pqc-fallback"}


def report(sites: Sites, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*qkdgw_command(), "report", "-c", str(sites.config_path("a")),
                           "-o", str(out), *args], capture_output=True, text=True, timeout=60,
                          check=False)


class _Cells(HTMLParser):
    """The data-* attributes of the report's link rows, and anything that would load."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.cells: dict[str, str] = {}
        self.loads: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "script":
            self.scripts += 1
        for name in ("src", "href", "action"):
            if a.get(name):
                self.loads.append(a[name])
        if tag == "tr" and "data-link" in a:
            self.cells = self.rows.setdefault(a["data-link"], {})
        self.cells.update({k: v for k, v in a.items() if k.startswith("data-")})

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self.cells = {}


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    with Sites(tmp_path_factory.mktemp("report"), POLICY).start() as s:
        s.wait_until("both sites on the same key", s.converged)
        time.sleep(3)
        assert s.sim is not None
        s.sim.admin("POST", "/admin/faults", {"kind": "unavailable", "seconds": 4})
        time.sleep(7)
        yield s


def _counts(sites: Sites) -> tuple[int, set[str]]:
    """Site A's trail so far: rekeys, and the QKD key IDs fetched."""
    trail = sites.audit("a")
    return (sum(1 for r in trail if r["event"] == "rekeyed"),
            {k for r in trail if r["event"] == "fetched" for k in r["key_ids"]})


def test_the_report_sums_up_the_period(sites: Sites, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    rekeyed_before, fetched_before = _counts(sites)  # (the link rekeys on meanwhile)
    r = report(sites, out, "--since", "10m")
    rekeyed_after, fetched_after = _counts(sites)
    assert r.returncode == 0, r.stderr
    assert "the running daemon" in r.stdout
    html = out.read_text()
    cells = _Cells()
    cells.feed(html)
    # Self-contained: nothing to load, no script.
    assert cells.loads == []
    assert cells.scripts == 0
    assert not re.search(r"url\(|@import", html)
    row = cells.rows["ab"]
    # Every rekey the trail holds (all within the period) is counted, by both sources:
    # what the trail held when the report began, up to what it held when it ended.
    assert rekeyed_before <= int(row["data-rekeys"]) <= rekeyed_after
    assert rekeyed_before <= int(row["data-rekeyed-audit"]) <= rekeyed_after
    assert 0 < len(fetched_before) <= int(row["data-qkd-keys"]) <= len(fetched_after)
    fetched = fetched_after
    # The outage: time PQC-only, QKD around it; the keyed time is exactly what the three
    # conditions add up to; available (a valid key) nearly throughout (blocked only before
    # the first key).
    qkd, pqc = float(row["data-qkd"]), float(row["data-pqc"])
    blocked, observed = float(row["data-blocked"]), float(row["data-observed"])
    assert pqc > 0
    assert qkd > 0
    assert abs(qkd + pqc + blocked - observed) < 0.01
    assert float(row["data-available"]) == pytest.approx((qkd + pqc) / observed, abs=1e-3)
    assert float(row["data-available"]) > 0.9
    assert 'data-audit="ok"' in html
    # Key IDs are counted, never listed; no key material at all.
    for key_id in fetched:
        assert key_id not in html
    assert sites.psk("a").decode().strip() not in html


def test_bad_times_get_a_clear_error(sites: Sites, tmp_path: Path) -> None:
    for args, says in ((["--since", "yesterday"], "not a time"),
                       (["--since", "now", "--until", "1h"], "must come before"),
                       (["--until", "2026-13-45"], "not a time")):
        r = report(sites, tmp_path / "x.html", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert says in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_times_read_as_documented() -> None:
    now = 1_800_000_000.0
    assert parse_time("now", now) == now
    assert parse_time("90m", now) == now - 5400
    assert parse_time("7d", now) == now - 7 * 86400
    assert parse_time("-24h", now) == now - 86400
    assert parse_time("1796600000", now) == 1796600000.0
    midnight = datetime(2027, 1, 15, tzinfo=UTC).timestamp()
    assert parse_time("2027-01-15", now) == midnight  # (no zone: UTC)
    assert parse_time("2027-01-15T00:00Z", now) == midnight
    assert parse_time("2027-01-15T01:00+01:00", now) == parse_time("2027-01-15T00:00Z", now)


def test_the_report_reads_the_saved_history_once_the_daemon_stopped(sites: Sites,
                                                                    tmp_path: Path) -> None:
    sites.stop_site("a")
    out = tmp_path / "report.html"
    r = report(sites, out)
    assert r.returncode == 0, r.stderr
    assert "history.json" in r.stdout
    cells = _Cells()
    cells.feed(out.read_text())
    assert int(cells.rows["ab"]["data-rekeys"]) > 0


def test_a_tampered_trail_is_reported_and_fails(sites: Sites, tmp_path: Path) -> None:
    """(Last: it breaks site A's trail.)"""
    if "a" in sites.procs:
        sites.stop_site("a")
    trail = sites.state_dir("a") / "audit.jsonl"
    lines = trail.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace('"epoch":', '"epoch":9', 1)
    trail.write_text("".join(lines))
    out = tmp_path / "r.html"
    r = report(sites, out)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "DOES NOT VERIFY" in r.stdout
    assert 'data-audit="broken"' in out.read_text()

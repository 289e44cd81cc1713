"""What the dashboard costs a hub: rendering its page and a link's history with many links.

    python bench/dashboard.py [--links 1000] [--rounds 20]

Builds a site status of LINKS links (a quarter PQC-only, a few blocked and alarmed) and full
history rings (a day of a rekey a minute per link, a day of KMS polls), then times, in this
process: the whole page (`GET /`: status table, six plots), its live section (what the page
fetches on each change), one link's `GET /api/history` for 24 h, and the history's save
(its snapshot, on the daemon's event loop; the encoding, in a thread).
The baseline in the same run: the same page for one link. Prints a table and one JSON line;
asserts nothing. The daemon's own `status()` (building the LinkStatus objects) is not timed:
bench/fleet.py measures the daemon.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.history import (
    HISTORY_SECONDS,
    SAMPLE_PERIOD,
    Condition,
    History,
    LinkHistoryView,
    alarm_bits,
    view,
)
from gateway.status import (
    AuditStatus,
    KmsStatus,
    LinkStatus,
    PacingStatus,
    SiteStatus,
    Summary,
)
from gateway.web.page import AuditView, View, live, page, plotted

NOW = 1_800_000_000.0


def site(links: int) -> SiteStatus:
    rows = []
    for i in range(links):
        condition = "blocked" if i % 97 == 0 else "pqc" if i % 4 == 0 else "qkd"
        alarms = {"qkd-fallback": "no QKD key"} if condition == "pqc" else {}
        rows.append(LinkStatus(
            link=f"link-{i:05d}", role="initiator", peer=f"spoke-{i % 4}", mode="pqc-fallback",
            state="idle", epoch=1000 + i, blocked=condition == "blocked",
            suite="qkd+ML-KEM-768+X25519/CatKDF-SHA-384", condition=condition, key_age=12.0,
            fingerprint=f"{i:016x}", interval=60.0, hard_lifetime=240.0, qber_threshold=0.11,
            data_planes=[f"xfrm:link-{i}"], rekeys=1000, last_rekey_latency=0.004,
            next_rekey_in=48.0, alarms=alarms,
            kms=KmsStatus(ok=True, reason="", stored_key_count=500, qber=0.02, key_rate=5e4,
                          link_up=True, kme=f"kme-{i % 4}")))
    pacing = PacingStatus(exchanges=3, exchanges_queued=0, exchange_limit=64,
                          exchange_limit_per_peer=16, throttled_peers=[], kms_requests=1,
                          kms_requests_queued=0, kms_request_limit=8, kms_keys_waiting=0)
    return SiteStatus(site="hub", pid=1, uptime=86400.0,
                      audit=AuditStatus(path="/var/lib/qkdgw/audit.jsonl", records=10**6,
                                        head="0" * 64),
                      summary=Summary.of(rows, pacing), links=rows)


def history(links: int) -> History:
    h = History()
    day = int(HISTORY_SECONDS)
    for i in range(links):
        name = f"link-{i:05d}"
        for t in range(0, day, 60):
            h.rekeyed(name, NOW - day + t, t // 60, 0.004, qkd=t % 3600 > 600)
        for t in range(0, day, 3600):
            h.link(name).observe(NOW - day + t, Condition.PQC, alarm_bits(["qkd-fallback"]))
            h.link(name).observe(NOW - day + t + 600, Condition.QKD, 0)
    for k in range(4):
        pair = h.pair(f"kme-hub → kme-{k}")
        for t in range(0, day, int(SAMPLE_PERIOD)):
            pair.sample(NOW - day + t, True, 500, 0.02, 5e4)
    return h


def timed(what: Callable[[], object], rounds: int) -> float:
    """Median milliseconds of ROUNDS calls."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        what()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def measure(links: int, rounds: int) -> dict[str, float]:
    status, h = site(links), history(links)
    audit = AuditView(records=[], verified=True, problems=[], checked_at=NOW,
                      verified_head="0" * 64, verified_seq=10**6)
    v = View(seconds=3600)

    def histories() -> list[LinkHistoryView]:
        return [view(h, name, "kme-hub → kme-0", NOW - v.seconds, NOW)
                for name in plotted(status, v)]

    return {
        "links": links,
        "page_ms": timed(lambda: page(status, histories(), audit, v), rounds),
        "live_ms": timed(lambda: live(status, histories(), audit, v), rounds),
        "history_24h_ms": timed(lambda: view(h, "link-00000", "kme-hub → kme-0",
                                             NOW - HISTORY_SECONDS, NOW).model_dump_json(),
                                rounds),
        "snapshot_ms": timed(h.snapshot, max(1, rounds // 5)),  # on the event loop
        "save_ms": timed(h.dumps, max(1, rounds // 5)),  # snapshot + encode (a thread)
        "saved_bytes": len(h.dumps()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--links", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    base = measure(1, args.rounds)
    many = measure(args.links, args.rounds)
    print(f"{'':18}{'1 link':>12}{f'{args.links} links':>14}{'ratio':>8}")
    for key in ("page_ms", "live_ms", "history_24h_ms", "snapshot_ms", "save_ms",
                "saved_bytes"):
        ratio = many[key] / base[key] if base[key] else float("nan")
        print(f"{key:18}{base[key]:12.1f}{many[key]:14.1f}{ratio:8.1f}")
    print(json.dumps({"baseline": base, "measured": many}))


if __name__ == "__main__":
    main()

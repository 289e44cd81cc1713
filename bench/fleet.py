"""Fleet benchmark: one hub daemon with many links to several spoke daemons.

    python bench/fleet.py [--links 1000] [--peers 4] [--steady 60] [--load 10] [--quick]

Real processes on this machine (tests/fleet.py builds them): `qkdgw kms-sim` (a KME per
site, a QKD link from each spoke's KME to the hub's), one hub daemon (initiator of every
link), PEERS spoke daemons (link i goes to spoke i mod PEERS), file sinks (no data plane),
mutual TLS everywhere, audit trails on, INFO logging. Phases:
1. cold start: every link's first epoch;
2. steady state at interval 60 s: the hub's CPU over STEADY seconds, its resident memory;
3. restart storm: the hub SIGKILLed and started again, until every link is on a new epoch;
   hard-lifetime alarms and blocked links in the logs; the KMS's request rate (its admin
   counters, sampled);
4. load: the hub restarted with interval 0.01 s (each link rekeys again as soon as it is
   done), rekeys per second over LOAD seconds and the exchange latency (start at the hub →
   the responder's Ack, i.e. both sides switched) from the hub's log;
5. memory per link: the hub once more with one link, RSS (N links - 1 link) / (N - 1).
Baseline in the same run, as bench/rekey.py measures it: the two rekey cores alone, wired
to each other in memory (no I/O), one core. Prints a table and, last, one JSON line.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rekey import core_baseline, pct
from tests.fleet import HUB, Fleet

#: The steady state's rekey interval (the issue's measurement), seconds. Hard lifetime: the
#: default four intervals; a short grace so old keys leave the (file) sinks soon.
INTERVAL = 60.0
POLICY = {"interval": INTERVAL, "hard_lifetime": 4 * INTERVAL, "grace": 0.5}
#: KMS status polls as configured by default (every poll is an event for every link).
KMS_STATUS = 10.0
#: Load phase: each link asks for its next exchange 10 ms after the last one ended.
LOAD_INTERVAL = 0.01
#: How often the bench looks at the audit trail and the KMS counters.
POLL = 0.25
#: A fleet that has not keyed every link by then is reported as such.
PHASE_TIMEOUT = 300.0
#: Open files the hub may need per link (a WebSocket each way, a state or key file being
#: written) and besides (KME connections, logs, listening sockets).
FILES_PER_LINK = 4
FILES_SPARE = 1024
#: Below this much available memory the bench stops its daemons (a large N on a small
#: machine must not bring the machine down with it).
MIN_AVAILABLE_MB = 1024

AIMS = {"steady_cpu_pct": 10.0, "rss_kb_per_link": 60.0, "max_rekeys_per_s": 500.0,
        "p99_ms": 50.0, "restart_all_rekeyed_s": 20.0, "baseline_ratio": 0.35}


class AuditTail:
    """The hub's audit trail, read as it grows: which links completed which epoch, when."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        #: link -> (epoch, when this bench saw it) of its last completed epoch.
        self.rekeyed: dict[str, tuple[int, float]] = {}
        self.count = 0

    def read(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        now = time.monotonic()
        for line in lines:
            record = json.loads(line)
            if record["event"] == "rekeyed":
                self.rekeyed[record["link"]] = (record["epoch"], now)
                self.count += 1


@dataclass
class KmsSampler:
    """The simulator's request counters (all KMEs, all calls), sampled in a thread; which also
    stops the daemons if the machine runs short of memory."""

    fleet: Fleet
    samples: list[tuple[float, int]] = field(default_factory=list)
    fleet_killed: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL):
            if available_mb() < MIN_AVAILABLE_MB and not self.fleet_killed:
                self.fleet_killed = True
                print(f"less than {MIN_AVAILABLE_MB} MB of memory available: stopping the"
                      " daemons", flush=True)
                for proc in self.fleet.procs.values():
                    proc.kill()
            sim = self.fleet.sim
            if sim is None:
                continue
            kmes = sim.state()["kmes"]
            total = sum(sum(k["requests"].values()) for k in kmes.values())
            self.samples.append((time.monotonic(), total))

    def peak(self, start: float, end: float) -> float:
        """The highest request rate over any second between START and END."""
        inside = [(t, n) for t, n in self.samples if start <= t <= end]
        best = 0.0
        for i, (t0, n0) in enumerate(inside):
            later = next(((t, n) for t, n in inside[i:] if t - t0 >= 1.0), None)
            if later is not None:
                best = max(best, (later[1] - n0) / (later[0] - t0))
        return best

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def available_mb() -> int:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    return int(next(line.split()[1] for line in meminfo
                    if line.startswith("MemAvailable:"))) // 1024


def wait_all(fleet: Fleet, tail: AuditTail, names: list[str], newer_than: dict[str, int],
             since: float, timeout: float) -> tuple[float | None, int]:
    """Seconds from SINCE until every link in NAMES completed an epoch above NEWER_THAN
    (None: not within TIMEOUT, or the hub is gone), and how many did."""
    while True:
        tail.read()
        done = [n for n in names if tail.rekeyed.get(n, (0, 0.0))[0] > newer_than.get(n, 0)]
        if len(done) == len(names):
            return max(tail.rekeyed[n][1] for n in names) - since, len(done)
        if time.monotonic() - since > timeout or fleet.procs[HUB].poll() is not None:
            return None, len(done)
        time.sleep(POLL)


def epochs(tail: AuditTail) -> dict[str, int]:
    tail.read()
    return {link: epoch for link, (epoch, _) in tail.rekeyed.items()}


def log_offset(fleet: Fleet, site: str) -> int:
    return fleet.log_path(site).stat().st_size


def log_since(fleet: Fleet, site: str, offset: int) -> str:
    with fleet.log_path(site).open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def raise_fd_limit(links: int) -> int:
    """Every link holds sockets at the hub (today: a WebSocket each way); the daemons inherit
    this process's limit: as many as the links need, where allowed (root), else the hard
    limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(hard, FILES_PER_LINK * links + FILES_SPARE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return want


def set_policy(fleet: Fleet, site: str, links: int | None = None, **policy: Any) -> None:
    config = fleet.config(site)
    config["policy"].update(policy)
    if links is not None:
        config["links"] = config["links"][:links]
    fleet.write_config(site, config)


def run(args: argparse.Namespace, root: Path, result: dict[str, Any],
        say: Callable[[str], None]) -> None:
    n, k = args.links, args.peers
    fleet = Fleet(root, link_count=n, peers=k, policy=POLICY, kms_status_interval=KMS_STATUS,
                  qkd={"key_rate": 1e9, "max_key_count": 10_000_000})
    names = fleet.link_names()
    tail = AuditTail(fleet.state_dir(HUB) / "audit.jsonl")
    with fleet:
        fleet.start(hub=False)
        kms = KmsSampler(fleet)
        try:
            # 1. cold start
            t = time.monotonic()
            fleet.start_site(HUB)
            took, done = wait_all(fleet, tail, names, {}, t, args.timeout)
            result["cold_start_s"] = took
            say(f"cold start: {done} of {n} links keyed"
                + (f" in {took:.1f} s" if took is not None else f" (gave up after"
                   f" {args.timeout:g} s)"))
            if took is None:
                return

            # 2. steady state
            count, cpu, t = tail.count, fleet.cpu_seconds(HUB), time.monotonic()
            time.sleep(args.steady)
            tail.read()
            cpu_pct = (fleet.cpu_seconds(HUB) - cpu) / (time.monotonic() - t) * 100
            rss = fleet.rss_kb(HUB)
            result.update(steady_cpu_pct=round(cpu_pct, 2), rss_total_kb=rss,
                          rss_kb_per_link_total=round(rss / n, 1))
            say(f"steady state, interval {INTERVAL:g} s, {args.steady:g} s window"
                f" ({tail.count - count} rekeys): hub CPU {cpu_pct:.2f} % of one core"
                f" (aim <= {AIMS['steady_cpu_pct']:g} %); RSS {rss / 1024:.0f} MiB ="
                f" {rss / n:.0f} KB per link, all counted")

            # 3. restart storm
            before = epochs(tail)
            offsets = {s: log_offset(fleet, s) for s in fleet.sites}
            fleet.stop_site(HUB, signal.SIGKILL)
            t = time.monotonic()
            fleet.start_site(HUB)
            storm_s, done = wait_all(fleet, tail, names, before, t, args.timeout)
            logs = {s: log_since(fleet, s, offsets[s]) for s in fleet.sites}
            misses = sum(len(re.findall(r"ALARM hard-lifetime", text)) for text in logs.values())
            blocked = len(re.findall(r"traffic blocked", logs[HUB]))
            peak = kms.peak(t, time.monotonic())
            result.update(restart_all_rekeyed_s=None if storm_s is None else round(storm_s, 2),
                          restart_hard_lifetime_misses=misses, restart_blocked_links=blocked,
                          kms_peak_rps=round(peak, 1))
            say(f"restart storm (hub SIGKILLed, started again): {done} of {n} links on a new"
                f" epoch" + (f" in {storm_s:.1f} s" if storm_s is not None else " (gave up)")
                + f" (aim <= {AIMS['restart_all_rekeyed_s']:g} s); hard-lifetime alarms"
                f" {misses}, links blocked {blocked}; KMS peak {peak:,.0f} requests/s")
            if storm_s is None:
                return

            # 4. load: back-to-back rekeys
            fleet.stop_site(HUB)
            set_policy(fleet, HUB, interval=LOAD_INTERVAL, jitter=0.0)
            before = epochs(tail)
            fleet.start_site(HUB)
            took, _ = wait_all(fleet, tail, names, before, time.monotonic(), args.timeout)
            if took is None:
                say("load: the restart did not complete")
                return
            offset, count, t = log_offset(fleet, HUB), tail.count, time.monotonic()
            time.sleep(args.load)
            tail.read()
            elapsed = time.monotonic() - t
            rps = (tail.count - count) / elapsed
            latencies = [float(ms) for ms in re.findall(r" rekeyed in ([\d.]+) ms",
                                                        log_since(fleet, HUB, offset))]
            p50, p99 = pct(latencies, 50), pct(latencies, 99)
            base = result["baseline_rekeys_per_s"]
            load_peak = kms.peak(t, t + elapsed)
            result.update(max_rekeys_per_s=round(rps, 1), p50_ms=round(p50, 2),
                          p99_ms=round(p99, 2), baseline_ratio=round(rps / base, 3),
                          kms_peak_rps_load=round(load_peak, 1))
            say(f"load, interval {LOAD_INTERVAL:g} s, {elapsed:.1f} s: {rps:,.0f} rekeys/s (aim"
                f" >= {AIMS['max_rekeys_per_s']:g}; {rps / base:.2f}x the in-memory baseline,"
                f" aim >= {AIMS['baseline_ratio']:g}x); exchange latency p50 {p50:.1f} ms,"
                f" p99 {p99:.1f} ms (aim <= {AIMS['p99_ms']:g}), mean"
                f" {statistics.mean(latencies):.1f} ms over {len(latencies)}; KMS peak"
                f" {load_peak:,.0f} requests/s")

            # 5. memory per link: the same hub with one link
            fleet.stop_site(HUB)
            set_policy(fleet, HUB, links=1)
            before = epochs(tail)
            fleet.start_site(HUB)
            wait_all(fleet, tail, names[:1], before, time.monotonic(), args.timeout)
            time.sleep(2.0)  # as settled as the full hub was
            one = fleet.rss_kb(HUB)
            per = (result["rss_total_kb"] - one) / (n - 1) if n > 1 else float(one)
            result["rss_kb_per_link"] = round(per, 1)
            say(f"memory: hub RSS {result['rss_total_kb'] / 1024:.0f} MiB with {n} links,"
                f" {one / 1024:.0f} MiB with 1: {per:.0f} KB per link (aim <="
                f" {AIMS['rss_kb_per_link']:g})")
        finally:
            kms.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--links", type=int, default=1000, help="links of the hub (N)")
    parser.add_argument("--peers", type=int, default=4, help="spoke daemons (K)")
    parser.add_argument("--steady", type=float, default=INTERVAL,
                        help="seconds of steady state measured (default: one interval)")
    parser.add_argument("--load", type=float, default=10.0,
                        help="seconds of back-to-back rekeys measured")
    parser.add_argument("--baseline", type=float, default=3.0,
                        help="seconds of the in-memory baseline")
    parser.add_argument("--timeout", type=float, default=PHASE_TIMEOUT,
                        help="give a phase up after this many seconds")
    parser.add_argument("--quick", action="store_true",
                        help="for CI: 40 links, 2 peers, a few seconds per phase")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="write configurations and logs to DIR and keep them")
    args = parser.parse_args()
    if args.quick:
        args.links, args.peers, args.steady, args.load, args.baseline = 40, 2, 3.0, 2.0, 0.3
    if not 1 <= args.peers <= args.links or args.links > 100_000:
        parser.error("need 1 <= --peers <= --links <= 100000")
    for name in ("steady", "load", "baseline", "timeout"):
        if not 0 < getattr(args, name) <= 3600:
            parser.error(f"--{name} must be above 0 and at most 3600 seconds")

    fds = raise_fd_limit(args.links)
    per = core_baseline(args.baseline)
    result: dict[str, Any] = {"links": args.links, "peers": args.peers}
    result["baseline_rekeys_per_s"] = round(1 / per, 1)
    print(f"fleet: {args.links} links from one hub to {args.peers} spokes; file sinks, mutual"
          f" TLS, audit on; open files up to {fds}")
    print(f"baseline: the two cores alone, in memory (no I/O): {per * 1e3:.2f} ms of CPU per"
          f" rekey = {1 / per:,.0f} rekeys/s on one core")

    def say(line: str) -> None:
        print(line, flush=True)

    if args.keep is not None:
        run(args, args.keep, result, say)
    else:
        with tempfile.TemporaryDirectory(prefix="qkdgw-fleet-") as tmp:
            run(args, Path(tmp) / "fleet", result, say)
    for key in ("steady_cpu_pct", "rss_kb_per_link", "max_rekeys_per_s", "p99_ms",
                "restart_all_rekeyed_s", "restart_hard_lifetime_misses", "kms_peak_rps"):
        result.setdefault(key, None)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

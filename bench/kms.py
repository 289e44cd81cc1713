"""KMS benchmark: QKD key delivery through the simulator over mutual TLS on loopback.

    python bench/kms.py [--seconds 3] [--pairs 2000] [--workers 4]

Starts `qkdgw kms-sim` (a separate process, as in production) with a link fast enough never
to run dry, then measures from this process, with the gateway's own client:
- keys/s delivered to both sites for batches of 1, 16 and 128 keys (enc_keys at KME-A then
  dec_keys at KME-B, WORKERS pairs in flight);
- the latency of one single-key enc_keys + dec_keys pair (p50, p99), sequential;
- the baseline: a bare mTLS round trip (GET status) in the same run, so the pair's latency
  reads as a multiple of the transport's floor.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.initdemo import init_demo
from gateway.site import SiteConfig
from kms.client import KmeClient
from kms.config import KmsClientConfig
from tests.helpers import free_base_port, start_sim

KEY_BITS = 256


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def throughput(a: KmeClient, b: KmeClient, batch: int, seconds: float,
                     workers: int) -> float:
    delivered = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal delivered
        while time.perf_counter() < deadline:
            sent = await a.enc_keys("sae-b", batch, KEY_BITS)
            got = await b.dec_keys("sae-a", sent.key_ids, size=KEY_BITS)
            delivered += len(got.keys)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return delivered / (time.perf_counter() - start)


async def pair_latency(a: KmeClient, b: KmeClient, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        sent = await a.enc_keys("sae-b", 1, KEY_BITS)
        await b.dec_keys("sae-a", sent.key_ids, size=KEY_BITS)
        out.append(time.perf_counter() - t0)
    return out


async def status_latency(a: KmeClient, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await a.status("sae-b")
        out.append(time.perf_counter() - t0)
    return out


async def run(root: Path, args: argparse.Namespace) -> None:
    a_cfg = SiteConfig.load(root / "site-a.yaml").kms
    b_cfg = SiteConfig.load(root / "site-b.yaml").kms
    if not isinstance(a_cfg, KmsClientConfig) or not isinstance(b_cfg, KmsClientConfig):
        raise SystemExit("the demo's sites speak ETSI GS QKD 014")
    async with a_cfg.client() as a, b_cfg.client() as b:
        await pair_latency(a, b, 50)  # warm up: connections, caches
        print(f"{'batch':>6} {'keys/s (both sites)':>22}   ({args.workers} pairs in flight,"
              f" {args.seconds} s each)")
        for batch in (1, 16, 128):
            rate = await throughput(a, b, batch, args.seconds, args.workers)
            print(f"{batch:>6} {rate:>22,.0f}")
        base = await status_latency(a, args.pairs)
        pair = await pair_latency(a, b, args.pairs)
    b50, b99 = percentile(base, 50) * 1e3, percentile(base, 99) * 1e3
    p50, p99 = percentile(pair, 50) * 1e3, percentile(pair, 99) * 1e3
    print(f"\nsequential, {args.pairs} samples each        p50 ms   p99 ms  mean ms")
    print(f"baseline: GET status (one mTLS round trip) {b50:7.2f}  {b99:7.2f}"
          f"  {statistics.mean(base) * 1e3:7.2f}")
    print(f"enc_keys + dec_keys, 1 key of {KEY_BITS} bits     {p50:7.2f}  {p99:7.2f}"
          f"  {statistics.mean(pair) * 1e3:7.2f}")
    print(f"pair / baseline p50: {p50 / b50:.2f}x (two round trips are 2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="per batch size")
    parser.add_argument("--pairs", type=int, default=2000, help="latency samples")
    parser.add_argument("--workers", type=int, default=4, help="pairs in flight")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qkdgw-bench-") as tmp:
        root = Path(tmp)
        base = free_base_port()
        layout = init_demo(root, base_port=base)
        config = yaml.safe_load(layout.kms_config.read_text())
        config["links"][0].update(key_rate=1e9, max_key_count=10_000_000)
        (root / "kms-bench.yaml").write_text(yaml.safe_dump(config))
        sim = start_sim(root / "kms-bench.yaml", base, [base + 1, base + 2], root / "sim.log")
        try:
            print(f"qkdgw kms-sim pid {sim.proc.pid}; client pid {os.getpid()}")
            asyncio.run(run(root, args))
        finally:
            sim.stop()


if __name__ == "__main__":
    main()

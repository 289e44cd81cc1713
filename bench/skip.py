"""Keys served to routers over SKIP through two real gateways (`init-demo --skip`, `qkdgw
kms-sim`, two `qkdgw run` rekeying every INTERVAL seconds).

    python bench/skip.py [--pairs 200] [--clients 4] [--interval 2]

One key pair: router A asks gateway A for a new 256-bit key (`GET /key`), router B asks
gateway B for it by ID (`GET /key/{keyId}`), each on a fresh TLS-PSK connection as IOS XE
makes them. For TLS 1.2 (DHE-PSK-AES256-CBC-SHA384, ffdhe3072) and TLS 1.3
(TLS_AES_256_GCM_SHA384, psk_dhe_ke over X25519): p50/p99 per pair with one client, and keys/s
with CLIENTS at once. The baseline, in the same run: one plain TLS-PSK round trip (the same
transport and HTTP, a fixed answer, no Key Provider) against a server in this process. A
pair is two round trips, so ~2x the baseline means the Key Provider adds little. Prints a
table and one JSON line; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.psktls import ClientContext, PskStream, PskTable, ServerContext, Version
from common.skip_client import SkipClient
from gateway.initdemo import skip_routers
from tests.gateway.sites import Sites

PSK = bytes(range(32))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def baseline(version: Version, rounds: int) -> list[float]:
    """Seconds per TLS-PSK round trip to a server answering a fixed body."""
    tls = ServerContext(PskTable({b"router-a": PSK}))
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = PskStream(tls.context, reader, writer, server=True)
        try:
            await stream.handshake()
            await stream.read()
            await stream.write(answer)
        finally:
            await stream.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = SkipClient("127.0.0.1", port, ClientContext("router-a", PSK, version))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        await client.capabilities()
        times.append(time.perf_counter() - t)
    server.close()
    await server.wait_closed()
    return times


def routers(sites: Sites, version: Version) -> tuple[SkipClient, SkipClient]:
    r = skip_routers(sites.layout.skip_dir)
    a, b = r["a"], r["b"]
    return (SkipClient(a.host, a.port, a.tls(version)),
            SkipClient(b.host, b.port, b.tls(version)))


async def pair(a: SkipClient, b: SkipClient) -> tuple[float, bool]:
    t = time.perf_counter()
    status, new = await a.new_key("kp-b")
    if status != 200:
        return time.perf_counter() - t, False
    status, same = await b.key_by_id("kp-a", new["keyId"])
    return time.perf_counter() - t, status == 200 and same["key"] == new["key"]


async def measure(a: SkipClient, b: SkipClient, pairs: int, clients: int
                  ) -> tuple[list[float], float, int]:
    """Per-pair seconds with one client; keys/s with CLIENTS at once; pairs that failed."""
    times, failed = [], 0
    for _ in range(pairs):
        seconds, ok = await pair(a, b)
        times.append(seconds)
        failed += not ok
    per_client = max(1, pairs // clients)

    async def worker() -> int:
        bad = 0
        for _ in range(per_client):
            bad += not (await pair(a, b))[1]
        return bad

    t = time.perf_counter()
    failed += sum(await asyncio.gather(*(worker() for _ in range(clients))))
    rate = per_client * clients / (time.perf_counter() - t)
    return times, rate, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--interval", type=float, default=2.0,
                        help="the gateways' rekey interval (s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-skip-") as tmp:
        sites = Sites(Path(tmp), {"interval": args.interval, "jitter": 0.1,
                                  "hard_lifetime": 60.0, "grace": 1.0}, skip=True).start()
        try:
            sites.wait_until("the first epoch", sites.converged)
            first = sites.link("a")["epoch"]
            rows, out = [], {}
            versions: tuple[Version, ...] = ("1.2", "1.3")
            for version in versions:
                base = asyncio.run(baseline(version, args.pairs))
                a, b = routers(sites, version)
                times, rate, failed = asyncio.run(measure(a, b, args.pairs, args.clients))
                p50, p99, b50 = (statistics.median(times), pct(times, 99),
                                 statistics.median(base))
                rows.append((f"TLS {version}", p50, p99, rate, b50, p50 / b50, failed))
                out[f"tls{version}"] = {"pair_p50_ms": p50 * 1e3, "pair_p99_ms": p99 * 1e3,
                                        "keys_per_s": rate, "baseline_rtt_p50_ms": b50 * 1e3,
                                        "ratio": p50 / b50, "failed": failed}
            rekeys = sites.link("a")["epoch"] - first
        finally:
            sites.stop()
    print(f"{args.pairs} key pairs per TLS version, {args.clients} clients for keys/s,"
          f" 256-bit keys; the gateways rekeyed {rekeys} times meanwhile")
    print(f"{'':8} {'pair p50':>9} {'pair p99':>9} {'keys/s':>8} {'TLS-PSK RTT':>12}"
          f" {'ratio':>6} {'failed':>7}")
    for name, p50, p99, rate, b50, ratio, failed in rows:
        print(f"{name:8} {p50 * 1e3:7.2f}ms {p99 * 1e3:7.2f}ms {rate:8.0f} {b50 * 1e3:10.2f}ms"
              f" {ratio:6.2f} {failed:7d}")
    print(json.dumps({"pairs": args.pairs, "clients": args.clients, "rekeys": rekeys, **out}))


if __name__ == "__main__":
    main()

"""TLS PSK benchmark: TLS 1.3 handshakes/s with a rotating PSK file against a static one.

    python bench/tls.py [--seconds 3] [--rounds 3] [--rotate-every 0.1]

Runs under a Python 3.13+ (found like the tests do; ssl PSK callbacks are new in 3.13): an
echo server with tls/pyssl.py's server context and one client doing full handshakes
back to back over loopback (connect, handshake, one byte echoed, close). Static: the PSK file
never changes. Rotating: another thread replaces it every ROTATE_EVERY seconds the way the
tls_psk sink does (atomic replace, new identity first, the previous one still accepted), so
both contexts re-read it. Rounds alternate static and rotating in the same process; prints
each round and the medians; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def worker(seconds: float, rounds: int, rotate_every: float) -> None:
    import tempfile

    from common.files import write_private
    from tls import pskfile
    from tls.pyssl import PskStore, client_context, server_context

    path = Path(tempfile.mkdtemp(prefix="qkdgw-bench-tls-")) / "psk"
    epoch = [1]
    keys = {1: os.urandom(32)}

    def write() -> None:
        e = epoch[0]
        entries = [(pskfile.identity("ab", e), keys[e])]
        if e - 1 in keys:
            entries.append((pskfile.identity("ab", e - 1), keys[e - 1]))
        write_private(path, pskfile.dumps(entries))

    write()
    server_ctx, client_ctx = server_context(PskStore(path)), client_context(PskStore(path))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(1))
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()

    def rotate(stop: threading.Event) -> None:
        while not stop.wait(rotate_every):
            epoch[0] += 1
            keys[epoch[0]] = os.urandom(32)
            keys.pop(epoch[0] - 2, None)
            write()

    def handshakes() -> tuple[float, int]:
        n, failures, end = 0, 0, time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", port)) as raw, \
                        client_ctx.wrap_socket(raw) as tls:
                    tls.sendall(b"x")
                    tls.recv(1)
                n += 1
            except OSError:
                failures += 1
        return n / seconds, failures

    results: dict[str, list[float]] = {"static": [], "rotating": []}
    print(f"TLS 1.3 external PSK handshakes over loopback, Python {sys.version.split()[0]},"
          f" {seconds:g} s per round")
    for r in range(rounds):
        for kind in ("static", "rotating"):
            stop = threading.Event()
            rotator = threading.Thread(target=rotate, args=(stop,))
            if kind == "rotating":
                rotator.start()
            before = epoch[0]
            rate, failures = handshakes()
            stop.set()
            if kind == "rotating":
                rotator.join()
            results[kind].append(rate)
            print(f"  round {r + 1} {kind:8s} {rate:7.0f} handshakes/s, {failures} failed,"
                  f" {epoch[0] - before} rotations")
    static, rotating = statistics.median(results["static"]), statistics.median(results["rotating"])
    print(f"median: static {static:.0f}/s, rotating every {rotate_every:g} s {rotating:.0f}/s"
          f" (ratio {rotating / static:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rotate-every", type=float, default=0.1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.seconds, args.rounds, args.rotate_every)
        return
    from tests.tls.tls_world import python313

    py = python313()
    if py is None:
        sys.exit("bench/tls.py: no Python 3.13 or later here (ssl PSK callbacks)")
    root = str(Path(__file__).resolve().parent.parent)
    # This script again under Python 3.13: an argv, no shell.
    argv = [py, __file__, "--worker", "--seconds", str(args.seconds), "--rounds",
            str(args.rounds), "--rotate-every", str(args.rotate_every)]
    sys.exit(subprocess.call(argv, env={**os.environ, "PYTHONPATH": root}))  # noqa: S603


if __name__ == "__main__":
    main()

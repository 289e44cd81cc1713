"""TLS PSK benchmark: TLS 1.3 handshakes/s with a rotating PSK file against a static one, and
with a hybrid ML-KEM key share against plain X25519.

    python bench/tls.py [--seconds 3] [--rounds 3] [--rotate-every 0.1]

Runs under a Python 3.13+ (found like the tests do; ssl PSK callbacks are new in 3.13): an
echo server with tls/pyssl.py's server context and one client doing full handshakes
back to back over loopback (connect, handshake, one byte echoed, close).
1. Static: the PSK file never changes. Rotating: another thread replaces it every
   ROTATE_EVERY seconds the way the tls_psk sink does (atomic replace, new identity first, the
   previous one still accepted), so both contexts re-read it.
2. Key share groups (Debian 13's Python 3.13 with OpenSSL 3.5, from the interop root of
   tests/interop/roots.py; left out, saying so, where it is not built): the PSK with X25519
   (`set_ecdh_curve("X25519")` on both contexts) against the PSK with X25519MLKEM768
   (tls/pyssl.py's contexts as they are: OpenSSL 3.5's default groups put it first; the
   handshake itself is checked on the wire by tests/tls/test_tls_hybrid.py).
Rounds alternate the two kinds in the same process; prints each round, the medians and their
ratio; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def serve(server_ctx: ssl.SSLContext) -> int:
    """An echo server on loopback in a thread: its port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def loop() -> None:
        while True:
            conn, _ = listener.accept()
            with contextlib.suppress(OSError), \
                    server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(tls.recv(1))

    threading.Thread(target=loop, daemon=True).start()
    return int(listener.getsockname()[1])


def handshakes(client_ctx: ssl.SSLContext, port: int, seconds: float) -> tuple[float, int]:
    """Full handshakes back to back for SECONDS: per second, and how many failed."""
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


def groups_worker(seconds: float, rounds: int) -> None:
    import tempfile

    from common.files import write_private
    from tls import pskfile
    from tls.pyssl import PskStore, client_context, server_context

    path = Path(tempfile.mkdtemp(prefix="qkdgw-bench-tls-")) / "psk"
    write_private(path, pskfile.dumps([(pskfile.identity("ab", 1), os.urandom(32))]))
    pairs: dict[str, tuple[ssl.SSLContext, int]] = {}
    for kind in ("X25519", "X25519MLKEM768"):
        server_ctx, client_ctx = server_context(PskStore(path)), client_context(PskStore(path))
        if kind == "X25519":
            server_ctx.set_ecdh_curve("X25519")
            client_ctx.set_ecdh_curve("X25519")
        pairs[kind] = (client_ctx, serve(server_ctx))
    results: dict[str, list[float]] = {kind: [] for kind in pairs}
    print(f"\nTLS 1.3 external PSK (psk_dhe_ke) by key share group, Python"
          f" {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, {seconds:g} s per round")
    for r in range(rounds):
        for kind, (client_ctx, port) in pairs.items():
            rate, failures = handshakes(client_ctx, port, seconds)
            results[kind].append(rate)
            print(f"  round {r + 1} PSK + {kind:15s} {rate:7.0f} handshakes/s, {failures} failed")
    plain = statistics.median(results["X25519"])
    hybrid = statistics.median(results["X25519MLKEM768"])
    print(f"median: PSK + X25519 {plain:.0f}/s, PSK + X25519MLKEM768 {hybrid:.0f}/s"
          f" (ratio {hybrid / plain:.2f})")


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
    client_ctx = client_context(PskStore(path))
    port = serve(server_context(PskStore(path)))

    def rotate(stop: threading.Event) -> None:
        while not stop.wait(rotate_every):
            epoch[0] += 1
            keys[epoch[0]] = os.urandom(32)
            keys.pop(epoch[0] - 2, None)
            write()

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
            rate, failures = handshakes(client_ctx, port, seconds)
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
    parser.add_argument("--worker", choices=["rotation", "groups"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "rotation":
        worker(args.seconds, args.rounds, args.rotate_every)
        return
    if args.worker == "groups":
        groups_worker(args.seconds, args.rounds)
        return
    from tests.interop import roots
    from tests.tls.tls_world import python313

    py = python313()
    if py is None:
        sys.exit("bench/tls.py: no Python 3.13 or later here (ssl PSK callbacks)")
    repo = Path(__file__).resolve().parent.parent
    options = ["--seconds", str(args.seconds), "--rounds", str(args.rounds)]
    # This script again under Python 3.13: an argv, no shell.
    argv = [py, __file__, "--worker", "rotation", *options,
            "--rotate-every", str(args.rotate_every)]
    if rc := subprocess.call(argv, env={**os.environ, "PYTHONPATH": str(repo)}):  # noqa: S603
        sys.exit(rc)
    if reason := roots.missing(roots.STRONGSWAN):
        print(f"\nkey share groups: left out, {reason}")
        return
    # And under Debian 13's Python 3.13 (OpenSSL 3.5), chrooted into its root.
    inside = Path("/mnt/repo")
    command = " ".join(["env", f"PYTHONPATH={inside}", "python3", f"{inside}/bench/tls.py",
                        "--worker", "groups", *options])
    sys.exit(subprocess.call(roots.chrooted(roots.STRONGSWAN.path(), command,  # noqa: S603
                                            binds=[(repo, inside)])))


if __name__ == "__main__":
    main()

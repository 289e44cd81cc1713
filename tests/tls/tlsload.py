"""TLS traffic for the TLS sink tests: an echo server, a PSK echo server (Python 3.13 helper)
and a load generator, each a process in a test namespace.

    python -m tests.tls.tlsload echo PORT
    python3.13 -m tests.tls.tlsload psk-echo HOST PORT --psk-file F
    python -m tests.tls.tlsload load HOST PORT --seconds S --out F [--psk-file F]

The load: one long-lived connection echoing a line every 50 ms, plus a new connection every
100 ms (connect, handshake, one line echoed, close). With --psk-file it speaks TLS itself
through tls/pyssl.py and records the PSK identity each new connection offered. Results:
JSON with every failure and its time. SIGTERM ends `load` early (results still written).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

LONG_PERIOD, NEW_PERIOD, TIMEOUT = 0.05, 0.1, 5.0


def echo(port: int) -> None:
    srv = socket.create_server(("0.0.0.0", port), reuse_port=True)  # noqa: S104 (a test namespace)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_echo_conn, args=(conn,), daemon=True).start()


def _echo_conn(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)


def psk_echo(host: str, port: int, psk_file: Path) -> None:
    from tls.pyssl import PskStore, server_context

    store = PskStore(psk_file)
    context = server_context(store)
    srv = socket.create_server((host, port))
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_psk_conn, args=(context, conn), daemon=True).start()


def _psk_conn(context: Any, conn: socket.socket) -> None:
    try:
        conn.settimeout(TIMEOUT)
        with context.wrap_socket(conn, server_side=True) as tls:
            while data := tls.recv(4096):
                tls.sendall(data)
    except OSError as e:
        print(f"refused: {e}", flush=True)


class Load:
    def __init__(self, host: str, port: int, psk_file: Path | None) -> None:
        self.host, self.port = host, port
        self.context = None
        self.offered: list[str | None] = []
        if psk_file is not None:
            from tls.pyssl import PskStore, client_context

            store = PskStore(psk_file)
            self.context = client_context(store)
            inner = self.context

            def record(hint: str | None) -> tuple[str | None, bytes]:
                current = store.current()
                self.offered.append(current[0] if current else None)
                return current if current else (None, b"")

            inner.set_psk_client_callback(record)  # type: ignore[attr-defined]  # 3.13+
        self.stop = threading.Event()
        self.long: dict[str, Any] = {"sent": 0, "echoed": 0, "error": None}
        self.new: dict[str, Any] = {"attempts": 0, "ok": 0, "failures": [], "identities": []}

    def connect(self) -> socket.socket:
        raw = socket.create_connection((self.host, self.port), timeout=TIMEOUT)
        if self.context is None:
            return raw
        return self.context.wrap_socket(raw)

    def long_lived(self) -> None:
        try:
            with self.connect() as s:
                f = s.makefile("rwb")
                n = 0
                while not self.stop.is_set():
                    line = f"long {n}\n".encode()
                    f.write(line)
                    f.flush()
                    self.long["sent"] += 1
                    if f.readline() != line:
                        raise OSError(f"echo {n} wrong or missing")
                    self.long["echoed"] += 1
                    n += 1
                    time.sleep(LONG_PERIOD)
        except OSError as e:
            self.long["error"] = f"{time.time():.3f} {e}"

    def new_connections(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            self.new["attempts"] += 1
            before = len(self.offered)
            try:
                with self.connect() as s:
                    line = f"new {n}\n".encode()
                    s.sendall(line)
                    got = b""
                    while not got.endswith(b"\n"):
                        chunk = s.recv(100)
                        if not chunk:
                            break
                        got += chunk
                    if got != line:
                        raise OSError(f"echo wrong: {got!r}")
                self.new["ok"] += 1
                if len(self.offered) > before:
                    self.new["identities"].append([time.time(), self.offered[-1]])
            except OSError as e:
                self.new["failures"].append([time.time(), str(e)])
            n += 1
            next_at += NEW_PERIOD
            time.sleep(max(0.0, next_at - time.monotonic()))


def load(host: str, port: int, seconds: float, out: Path, psk_file: Path | None) -> None:
    lg = Load(host, port, psk_file)
    signal.signal(signal.SIGTERM, lambda *_: lg.stop.set())
    long = threading.Thread(target=lg.long_lived)
    long.start()
    timer = threading.Timer(seconds, lg.stop.set)
    timer.start()
    lg.new_connections()
    timer.cancel()
    long.join()
    out.write_text(json.dumps({"long": lg.long, "new": lg.new}))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("echo")
    e.add_argument("port", type=int)
    p = sub.add_parser("psk-echo")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--psk-file", type=Path, required=True)
    ld = sub.add_parser("load")
    ld.add_argument("host")
    ld.add_argument("port", type=int)
    ld.add_argument("--seconds", type=float, required=True)
    ld.add_argument("--out", type=Path, required=True)
    ld.add_argument("--psk-file", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "echo":
        echo(args.port)
    elif args.cmd == "psk-echo":
        psk_echo(args.host, args.port, args.psk_file)
    else:
        load(args.host, args.port, args.seconds, args.out, args.psk_file)


if __name__ == "__main__":
    main(sys.argv[1:])

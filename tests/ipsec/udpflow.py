"""One-way UDP flows with sequence numbers: which packets of which direction were lost, and
when they were sent (to put each loss next to the rotation that caused it).

    python -m tests.ipsec.udpflow send HOST PORT --rate 500 --seconds 60 --out send.json
    python -m tests.ipsec.udpflow recv PORT --out recv.json      # until SIGTERM

The sender keeps an absolute schedule (a late wakeup sends the packets it owes), records the
send time of every sequence number and every send error (a blocked route: fail closed).
The receiver prints the send time of the newest packet it got, a few times a second.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from common.sockets import grow_receive_buffer

HEADER = struct.Struct("!Id")  # sequence number, send time


def send(host: str, port: int, rate: float, seconds: float, out: Path) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    count = int(rate * seconds)
    times: list[float] = []
    errors: list[tuple[int, str]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)  # stop early, still writing what was sent
    start = time.time()
    for seq in range(count):
        if stopping:
            break
        due = start + seq / rate
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        now = time.time()
        times.append(now)
        try:
            sock.sendto(HEADER.pack(seq, now) + bytes(36), (host, port))
        except OSError as e:
            errors.append((seq, e.strerror or str(e)))
    out.write_text(json.dumps({"rate": rate, "sent": len(times), "start": start, "times": times,
                               "errors": errors}))


def recv(port: int, out: Path) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Room for a burst (packets held during a rotation arrive together): a loss must be the
    # network's, never this socket's.
    grow_receive_buffer(sock, 8 << 20)
    sock.bind(("0.0.0.0", port))  # noqa: S104 (in a test namespace: a LAN host or gateway)
    sock.settimeout(0.2)
    received: list[tuple[int, float]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    newest, reported = 0.0, 0.0
    while not stopping:
        if newest > reported and time.time() - reported > 0.2:  # progress, for waiting tests
            print(f"newest {newest:.6f}", flush=True)
            reported = time.time()
        try:
            data = sock.recv(2048)
        except TimeoutError:
            continue
        if len(data) >= HEADER.size:
            seq, sent = HEADER.unpack_from(data)
            received.append((seq, time.time()))
            newest = max(newest, sent)
    out.write_text(json.dumps({"received": received}))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("--rate", type=float, required=True)
    s.add_argument("--seconds", type=float, required=True)
    s.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("recv")
    r.add_argument("port", type=int)
    r.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "send":
        send(args.host, args.port, args.rate, args.seconds, args.out)
    else:
        recv(args.port, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])

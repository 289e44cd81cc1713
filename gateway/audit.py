"""The audit trail: append-only JSON lines, each bound to the one before by a SHA-256 chain.

    {"seq": 12, "ts": "2026-11-26T14:00:01.123Z", "site": "a", "event": "activated",
     "link": "ab", "epoch": 7, "key_ids": [...], "fingerprint": "1f2e...", "sinks": [...],
     "detail": "", "prev": "<hash of record 11>", "hash": "<SHA-256 of this record>"}

`hash` is the SHA-256 of the record's canonical JSON (sorted keys, no spaces) without the
`hash` member; `prev` is the previous record's `hash` (64 zeros for the first). Editing,
removing or reordering any record breaks the chain at that point, and `verify` says where.
Records carry key IDs and keyed fingerprints, never key bytes. Cutting records off the end
leaves a valid shorter chain: compare the head (`qkdgw audit verify --head`) with one kept
elsewhere (the daemon logs the head with every record, and `qkdgw status` shows it).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def _digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})
                          ).hexdigest()


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str


class AuditLog:
    """Appends records to PATH (created 0600), continuing an existing chain."""

    def __init__(self, path: Path, site: str) -> None:
        self.path = path
        self.site = site
        path.parent.mkdir(parents=True, exist_ok=True)
        self.head = Head(0, GENESIS)
        if path.exists():
            result = verify(path)
            if not result.ok:
                raise AuditError(f"{path}: refusing to append to a broken audit trail:"
                                 f" {result.problems[0]}")
            self.head = result.head
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab", buffering=0)

    def append(self, event: str, *, link: str = "", epoch: int = 0,
               key_ids: Sequence[str] = (), fingerprint: str = "",
               sinks: Sequence[str] = (), detail: str = "") -> Head:
        now = time.time()
        record: dict[str, Any] = {
            "seq": self.head.seq + 1,
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now % 1 * 1000):03d}Z",
            "site": self.site, "event": event, "link": link, "epoch": epoch,
            "key_ids": list(key_ids), "fingerprint": fingerprint, "sinks": list(sinks),
            "detail": detail, "prev": self.head.hash,
        }
        body = _canonical(record)  # what the hash covers; the line adds the hash at the end
        digest = hashlib.sha256(body).hexdigest()
        self._file.write(body[:-1] + b',"hash":"' + digest.encode() + b'"}\n')
        self.head = Head(record["seq"], digest)
        return self.head

    def close(self) -> None:
        self._file.close()


class AuditError(Exception):
    pass


@dataclass(frozen=True)
class Verification:
    records: int
    head: Head
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                value = json.loads(raw)
            except ValueError:
                yield n, None, "not JSON"
                continue
            if not isinstance(value, dict):
                yield n, None, "not a JSON object"
                continue
            yield n, value, ""


def verify(path: Path, expected_head: str | None = None) -> Verification:
    """Check the chain from the first record; report every break, by line."""
    problems: list[str] = []
    prev, seq, count = GENESIS, 0, 0
    for line, record, error in _records(path):
        count += 1
        if record is None:
            problems.append(f"line {line}: {error}")
            continue
        if record.get("hash") != _digest(record):
            problems.append(f"line {line} (seq {record.get('seq')}): contents changed"
                            " (hash does not match)")
        if record.get("prev") != prev:
            problems.append(f"line {line} (seq {record.get('seq')}): does not follow the"
                            " previous record (removed, inserted or reordered records)")
        if record.get("seq") != seq + 1:
            problems.append(f"line {line}: sequence {record.get('seq')} after {seq}")
        prev = str(record.get("hash"))
        number = record.get("seq")
        seq = number if isinstance(number, int) else seq + 1
    head = Head(seq, prev)
    if expected_head is not None and expected_head != head.hash:
        problems.append(f"the last record's hash is {head.hash[:16]}…, not the expected"
                        f" {expected_head[:16]}… (records cut off the end, or another file)")
    return Verification(count, head, tuple(problems))

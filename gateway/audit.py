"""The audit trail: append-only JSON lines, each bound to the one before by a SHA-256 chain,
signed at checkpoints with the gateway's key and anchored in the peer's trail.

    {"seq": 12, "ts": "2026-11-26T14:00:01.123Z", "site": "a", "event": "activated",
     "link": "ab", "epoch": 7, "key_ids": [...], "fingerprint": "1f2e...", "sinks": [...],
     "detail": "", "prev": "<hash of record 11>", "hash": "<SHA-256 of this record>"}

`hash` is the SHA-256 of the record's canonical JSON (sorted keys, no spaces) without the
`hash` member; `prev` is the previous record's `hash` (64 zeros for the first). Editing,
removing or reordering any record breaks the chain at that point, and `verify` says where.
Records carry key IDs and keyed fingerprints, never key bytes.

A chain alone can be recomputed by whoever can write the file, and cutting records off its
end leaves a valid shorter chain. Two anchors make that visible:
- `checkpoint` records carry a signature, with the gateway's peer-channel key, over the
  site, their own sequence number and the hash of the record before them (`verify(...,
  cert=...)` checks them): rewriting signed history needs that key;
- `peer-head` records hold the head of the peer site's trail as the peer sent it in the
  protocol (Commit, Ack) when an epoch completed; `cross_verify` checks two sites' trails
  against each other, so truncating, rewriting or replacing one site's trail is detected from
  the other's, even by someone who holds one site's key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa


class TrailEvent(StrEnum):
    """Records the daemon and the trail write themselves (the rekey core's are its
    RecordKinds)."""

    STARTED = "started"
    STOPPED = "stopped"
    LINK_FAILED = "link-failed"  # a link's task failed: blocked and restarted
    STATE_DISCARDED = "state-discarded"  # a link's state file could not be read
    PEER_HEAD = "peer-head"  # the peer's audit head, from the Commit or Ack of an epoch
    CHECKPOINT = "checkpoint"  # signed with the gateway's key
    RELOADED = "reloaded"  # the configuration was read again and its changes applied
    HA_ACTIVE = "ha-active"  # keepalived made this node of a pair active: it took over
    HA_STANDBY = "ha-standby"  # ... standby: it let its links go, and holds no keys
    KEY_PROVIDED = "key-provided"  # a key derived from an epoch handed out (SKIP)


GENESIS = "0" * 64
#: A checkpoint is written after this many records (and at start and stop): what lies after
#: the last one is covered by the chain and the peer's anchors only.
CHECKPOINT_RECORDS = 64
#: Lines longer than this are not records (a record is well under 4 KiB): refused unread.
MAX_LINE = 1 << 20
#: `tail` reads this much per record asked for (a record takes a few hundred bytes).
TAIL_BYTES_PER_RECORD = 4096
#: Sequence numbers beyond this cannot come from this code (and stay exact in JSON).
MAX_SEQ = 2**53 - 1
#: What a checkpoint signs; the version keeps signatures of other formats apart.
SIGNED_CONTEXT = b"qkdgw audit checkpoint v1\0"


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def _digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})
                          ).hexdigest()


def _signed_bytes(site: str, seq: int, prev: str) -> bytes:
    return SIGNED_CONTEXT + f"{site}\0{seq}\0{prev}".encode()


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str


class AuditError(Exception):
    pass


class Signer:
    """Signs checkpoints with a private key; `cert_sha256` names the certificate to check
    them with. EC keys sign with ECDSA-SHA-256, Ed25519 as is, RSA with PSS-SHA-256."""

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
                          | rsa.RSAPrivateKey):
            raise AuditError(f"cannot sign audit checkpoints with a {type(key).__name__}")
        if key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo) \
                != cert.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo):
            raise AuditError("the audit signing key does not belong to its certificate")
        self._key = key
        self.cert_sha256 = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)
                                          ).hexdigest()

    @classmethod
    def from_files(cls, cert: Path, key: Path) -> Signer:
        return cls(cert.read_bytes(), key.read_bytes())

    def sign(self, data: bytes) -> str:
        k = self._key
        if isinstance(k, ec.EllipticCurvePrivateKey):
            sig = k.sign(data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(k, ed25519.Ed25519PrivateKey):
            sig = k.sign(data)
        else:
            sig = k.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()),
                                           padding.PSS.MAX_LENGTH), hashes.SHA256())
        return base64.b64encode(sig).decode("ascii")


def _check_signature(cert: x509.Certificate, data: bytes, sig_b64: str) -> bool:
    try:
        sig = base64.b64decode(sig_b64, validate=True)
    except (binascii.Error, ValueError):
        return False
    public = cert.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(sig, data)
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(sig, data, padding.PSS(padding.MGF1(hashes.SHA256()),
                                                 padding.PSS.MAX_LENGTH), hashes.SHA256())
        else:
            return False
    except InvalidSignature:
        return False
    return True


class AuditLog:
    """Appends records to PATH (created 0600), continuing an existing chain; with a SIGNER,
    writes a signed checkpoint every CHECKPOINT_RECORDS records and when asked."""

    def __init__(self, path: Path, site: str, signer: Signer | None = None) -> None:
        self.path = path
        self.site = site
        self.signer = signer
        path.parent.mkdir(parents=True, exist_ok=True)
        self.head = Head(0, GENESIS)
        self.checkpoints = 0  # written by this instance
        self._since_checkpoint = 0
        if path.exists():
            result = verify(path)
            if not result.ok:
                raise AuditError(f"{path}: refusing to append to a broken audit trail:"
                                 f" {result.problems[0]}")
            self.head = result.head
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file: BinaryIO = os.fdopen(fd, "ab", buffering=0)

    def append(self, event: str, *, link: str = "", epoch: int = 0,
               key_ids: Sequence[str] = (), fingerprint: str = "",
               sinks: Sequence[str] = (), detail: str = "",
               peer: Head | None = None, peer_site: str = "",
               config: dict[str, Any] | None = None,
               provided: dict[str, Any] | None = None) -> Head:
        """Append one record; PEER (with PEER_SITE) is the peer's head for `peer-head`,
        CONFIG what a `reloaded` record says about the configuration, PROVIDED to whom a
        `key-provided` key went (bits, client, peer, origin)."""
        extra: dict[str, Any] = {}
        if provided is not None:
            extra["provided"] = provided
        if peer is not None:
            extra["peer"] = {"site": peer_site, "seq": peer.seq, "hash": peer.hash}
        if config is not None:
            extra["config"] = config
        head = self._write(event, link=link, epoch=epoch, key_ids=list(key_ids),
                           fingerprint=fingerprint, sinks=list(sinks), detail=detail, **extra)
        self._since_checkpoint += 1
        if self.signer is not None and self._since_checkpoint >= CHECKPOINT_RECORDS:
            head = self.checkpoint()
        return head

    def checkpoint(self) -> Head:
        """A signed record over the chain so far (a no-op without a signer)."""
        if self.signer is None:
            return self.head
        seq = self.head.seq + 1
        sig = self.signer.sign(_signed_bytes(self.site, seq, self.head.hash))
        self._since_checkpoint = 0
        self.checkpoints += 1
        return self._write(TrailEvent.CHECKPOINT, link="", epoch=0, key_ids=[], fingerprint="",
                           sinks=[], detail="",
                           checkpoint={"cert_sha256": self.signer.cert_sha256, "sig": sig})

    def _write(self, event: str, **fields: Any) -> Head:
        now = time.time()
        record: dict[str, Any] = {
            "seq": self.head.seq + 1,
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now % 1 * 1000):03d}Z",
            "site": self.site, "event": event, **fields, "prev": self.head.hash,
        }
        body = _canonical(record)  # what the hash covers; the line adds the hash at the end
        digest = hashlib.sha256(body).hexdigest()
        line = body[:-1] + b',"hash":"' + digest.encode() + b'"}\n'
        end = os.fstat(self._file.fileno()).st_size
        try:
            written = self._file.write(line)
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
        except OSError:
            # A record half written (a full disk) would break the chain for good: cut it off,
            # so the trail stays verifiable and the next record continues from this head.
            with contextlib.suppress(OSError):
                os.ftruncate(self._file.fileno(), end)
            raise
        self.head = Head(record["seq"], digest)
        return self.head

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class Verification:
    records: int
    head: Head
    problems: tuple[str, ...]
    site: str = ""
    checkpoints: int = 0  # signed checkpoints found (checked when a certificate was given)
    unsigned_tail: int = 0  # records after the last checkpoint
    #: The peer heads the trail holds: (line, record, the peer's site, the peer's head).
    peer_heads: tuple[tuple[int, dict[str, Any], str, Head], ...] = ()
    #: seq -> hash of every record, for checking another site's anchors against this trail.
    hashes: dict[int, str] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _lines(f: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """The file's lines; None for one longer than MAX_LINE (skipped without keeping it)."""
    n = 0
    while True:
        raw = f.readline(MAX_LINE + 1)
        if not raw:
            return
        n += 1
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(MAX_LINE + 1)
            yield n, None
            continue
        yield n, raw


class _Unreadable(Exception):
    """A line that is not a record; the text says why."""


def _read(raw: bytes) -> tuple[dict[str, Any], str]:
    """One record and the hash it should have, or _Unreadable."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise _Unreadable("not JSON (nested too deep)") from None
    except ValueError:
        raise _Unreadable("not JSON") from None
    if not isinstance(value, dict):
        raise _Unreadable("not a JSON object")
    seq = value.get("seq")
    if type(seq) is not int or not 0 < seq <= MAX_SEQ:
        raise _Unreadable("no valid sequence number")
    try:
        return value, _digest(value)
    except (ValueError, RecursionError):  # e.g. a lone surrogate: no canonical form
        raise _Unreadable("not a canonical record (text that is not Unicode)") from None


def _peer_head(record: dict[str, Any]) -> tuple[str, Head] | None:
    peer = record.get("peer")
    if not isinstance(peer, dict):
        return None
    site, seq, digest = peer.get("site"), peer.get("seq"), peer.get("hash")
    if not isinstance(site, str) or type(seq) is not int or not isinstance(digest, str):
        return None
    return site, Head(seq, digest)


def verify(path: Path, expected_head: str | None = None, *,
           cert: x509.Certificate | None = None, keep_hashes: bool = False) -> Verification:
    """Check the chain from the first record and report every break, by line; with CERT,
    check every checkpoint's signature too; KEEP_HASHES for `cross_verify`. Never raises on
    a corrupt file: a record that cannot be read is a problem like any other."""
    problems: list[str] = []
    prev, seq, count, site = GENESIS, 0, 0, ""
    checkpoints = unsigned = 0
    heads: list[tuple[int, dict[str, Any], str, Head]] = []
    hashes: dict[int, str] = {}
    cert_sha256 = None if cert is None else hashlib.sha256(
        cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    with path.open("rb") as f:
        for line, raw in _lines(f):
            count += 1
            unsigned += 1
            if raw is None:
                problems.append(f"line {line}: longer than {MAX_LINE} bytes: not a record")
                continue
            try:
                record, digest = _read(raw)
            except _Unreadable as e:
                problems.append(f"line {line}: {e}")
                continue
            number = record["seq"]
            if record.get("hash") != digest:
                problems.append(f"line {line} (seq {number}): contents changed"
                                " (hash does not match)")
            if record.get("prev") != prev:
                problems.append(f"line {line} (seq {number}): does not follow the previous"
                                " record (removed, inserted or reordered records)")
            if number != seq + 1:
                problems.append(f"line {line}: sequence {number} after {seq}")
            site = site or str(record.get("site", ""))
            if record.get("event") == TrailEvent.CHECKPOINT:
                checkpoints += 1
                unsigned = 0
                if cert is not None:
                    problems += _check_checkpoint(record, line, cert, cert_sha256)
            anchor = _peer_head(record)
            if record.get("event") == TrailEvent.PEER_HEAD and anchor is not None:
                heads.append((line, record, *anchor))
            prev = str(record.get("hash"))
            seq = number
            if keep_hashes:
                hashes[number] = prev
    head = Head(seq, prev)
    if expected_head is not None and expected_head != head.hash:
        problems.append(f"the last record's hash is {head.hash[:16]}…, not the expected"
                        f" {expected_head[:16]}… (records cut off the end, or another file)")
    if cert is not None and count and not checkpoints:
        problems.append("no signed checkpoint in the trail")
    return Verification(count, head, tuple(problems), site, checkpoints,
                        unsigned if checkpoints else count, tuple(heads),
                        hashes if keep_hashes else None)


def _check_checkpoint(record: dict[str, Any], line: int, cert: x509.Certificate,
                      cert_sha256: str | None) -> list[str]:
    where = f"line {line} (seq {record['seq']})"
    signed = record.get("checkpoint")
    if not isinstance(signed, dict) or not isinstance(signed.get("sig"), str):
        return [f"{where}: checkpoint without a signature"]
    if signed.get("cert_sha256") != cert_sha256:
        return [f"{where}: checkpoint signed with another certificate"]
    data = _signed_bytes(str(record.get("site", "")), record["seq"], str(record.get("prev")))
    if not _check_signature(cert, data, signed["sig"]):
        return [f"{where}: checkpoint signature does not verify (history before it"
                " rewritten, or another key)"]
    return []


def cross_verify(mine: Verification, peer: Verification, *, mine_name: str = "this trail",
                 peer_name: str = "the peer's trail") -> list[str]:
    """Check each trail's record of the other's head against the other trail: a site whose
    trail was cut short, rewritten or replaced no longer holds what its peer saw."""
    problems = []
    for (a, a_name), (b, b_name) in (((mine, mine_name), (peer, peer_name)),
                                     ((peer, peer_name), (mine, mine_name))):
        if b.hashes is None:
            raise ValueError("cross_verify needs trails verified with keep_hashes=True")
        for line, record, site, head in a.peer_heads:
            if site != b.site:
                continue  # a link to a third site
            seen = f"{a_name} line {line} (link {record.get('link')}, epoch" \
                   f" {record.get('epoch')}) recorded {b_name}'s head at seq {head.seq}"
            if head.seq > b.head.seq:
                problems.append(f"{seen}, but {b_name} ends at seq {b.head.seq}: records"
                                " cut off its end, or another file")
            elif b.hashes.get(head.seq) != head.hash:
                problems.append(f"{seen}, and {b_name}'s record there differs: rewritten"
                                " or replaced")
    return problems


def tail(path: Path, n: int) -> list[dict[str, Any]]:
    """The last N records of the trail at PATH, oldest first (the dashboard's view; lines
    that do not read as records are left out: `verify` is what reports them)."""
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        start = max(0, end - n * TAIL_BYTES_PER_RECORD)
        f.seek(start)
        lines = f.read().splitlines()[1 if start else 0:][-n:]  # (the first may be cut)
    out = []
    for raw in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(raw)
            if isinstance(record, dict):
                out.append(record)
    return out

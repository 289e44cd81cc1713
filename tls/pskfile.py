"""The PSK secrets file shared by the TLS sinks: stunnel's `PSKsecrets` format.

    qkdgw-ab-e8:4f1c…(64 hex digits)
    qkdgw-ab-e7:9a0b…

One `IDENTITY:KEY` line per epoch, the key in hex (stunnel decodes hex keys; 32 bytes here).
The first line is the identity a client uses (stunnel's default PSKidentity); a server accepts
every line. Standard library only: the Python 3.13 helper (tls/pyssl.py) imports it in
applications that do not install the gateway's dependencies.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

#: PSK identities name the link and the epoch; they travel in clear in the ClientHello.
IDENTITY = re.compile(r"qkdgw-(?P<link>[A-Za-z0-9._-]+)-e(?P<epoch>[0-9]+)$")
#: The identity of a file with nothing valid in it (see placeholder).
PLACEHOLDER = re.compile(r"qkdgw-(?P<link>[A-Za-z0-9._-]+)-blocked$")
#: stunnel requires at least 16 key bytes; the key schedule's TLS PSK has 32.
MIN_KEY = 16


class PskFileError(ValueError):
    """The file is not a PSK secrets file; the message names the line (never the key)."""


def check_distinct(files: list[tuple[str, Path]], kind: str) -> None:
    """ValueError if two sinks of KIND, as (link, path) pairs, write the same file."""
    seen: dict[Path, str] = {}
    for link, path in files:
        if path in seen:
            raise ValueError(f"{kind} sinks of links {seen[path]} and {link} write the same"
                             f" file {path}: give each its own")
        seen[path] = link


def identity(link: str, epoch: int) -> str:
    return f"qkdgw-{link}-e{epoch}"


def placeholder(link: str) -> tuple[str, bytes]:
    """The only entry of a file with no valid key: a random key nobody has. stunnel refuses
    an empty file (and keeps its old secrets when a reload fails), so blocking must leave a
    valid file in which every new handshake fails."""
    return f"qkdgw-{link}-blocked", secrets.token_bytes(32)


def epoch_of(ident: str) -> int | None:
    m = IDENTITY.match(ident)
    return int(m.group("epoch")) if m else None


def dumps(entries: list[tuple[str, bytes]]) -> bytes:
    """The file's bytes for ENTRIES, in order (the client's identity first)."""
    lines = []
    for ident, key in entries:
        if ":" in ident or "\n" in ident or not ident:
            raise PskFileError(f"identity {ident!r} cannot be written to a PSK secrets file")
        if len(key) < MIN_KEY:
            raise PskFileError(f"key for {ident!r}: {len(key)} bytes, at least {MIN_KEY}")
        lines.append(f"{ident}:{key.hex()}\n")
    return "".join(lines).encode()


def loads(data: bytes) -> list[tuple[str, bytes]]:
    """ENTRIES from a file written by dumps (comments and blank lines allowed)."""
    entries = []
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        ident, sep, key = line.partition(":")
        if not sep or not ident:
            raise PskFileError(f"line {number}: not IDENTITY:KEY")
        try:
            secret = bytes.fromhex(key)
        except ValueError:
            raise PskFileError(f"line {number} ({ident}): the key is not hex") from None
        if len(secret) < MIN_KEY:
            raise PskFileError(f"line {number} ({ident}): key of {len(secret)} bytes,"
                               f" at least {MIN_KEY}")
        entries.append((ident, secret))
    return entries

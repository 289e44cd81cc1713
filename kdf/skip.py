"""SKIP keys (draft-cisco-skip-02) from an epoch's key schedule: both Key Providers of a link
derive the same key from a key ID, with no round trip between them.

    skip_root = key(SKIP_ROOT)  of the epoch                        (kdf/schedule.py)
    key_id    = epoch (8 bytes) || bits (2 bytes) || nonce (16 random bytes)   26 bytes
    skip_key  = HKDF-Expand-SHA-384(skip_root,
                    info = "qkd-gateway v1 skip key" || 0x00
                           || len(origin) || origin || len(peer) || peer || key_id,
                    length = bits / 8)

(integers big-endian). The ID carries the size: the router at the far end asks for the key
by ID alone (the draft's GET /key/{keyId} has no size), and must get as many bits.

ORIGIN is the localSystemID of the Key Provider that handed the key out first (the one its
router asked for a new key), PEER the other's. docs/key-schedule.md gives the argument.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from kdf.catkdf import hash_algorithm
from kdf.errors import KdfError

SKIP_KEY_LABEL = b"qkd-gateway v1 skip key"
#: A key ID: the epoch (8 bytes), the key's size in bits (2) and a fresh nonce (16 bytes:
#: unguessable, never repeated).
EPOCH_BYTES, BITS_BYTES, NONCE_BYTES = 8, 2, 16
KEY_ID_BYTES = EPOCH_BYTES + BITS_BYTES + NONCE_BYTES
#: Sizes a SKIP key may have (bits, multiples of 8): what common/skip.py accepts.
MIN_BITS, MAX_BITS = 128, 4096
MAX_SYSTEM_ID = 255


@dataclass(frozen=True)
class SkipKeyId:
    """A key ID: which epoch's schedule the key comes from, its size, and its nonce."""

    epoch: int
    bits: int
    nonce: bytes

    @classmethod
    def fresh(cls, epoch: int, bits: int) -> SkipKeyId:
        return cls(epoch, bits, secrets.token_bytes(NONCE_BYTES))

    @classmethod
    def parse(cls, text: str) -> SkipKeyId:
        """A key ID in hex (either case); KdfError if it is not one of ours."""
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise KdfError("a SKIP key ID is hexadecimal") from None
        if len(raw) != KEY_ID_BYTES:
            raise KdfError(f"a SKIP key ID has {KEY_ID_BYTES * 2} hexadecimal digits")
        bits = raw[EPOCH_BYTES:EPOCH_BYTES + BITS_BYTES]
        return cls(int.from_bytes(raw[:EPOCH_BYTES], "big"), int.from_bytes(bits, "big"),
                   raw[EPOCH_BYTES + BITS_BYTES:])

    def __post_init__(self) -> None:
        if not 0 <= self.epoch < 1 << (8 * EPOCH_BYTES):
            raise KdfError("epoch out of range for a SKIP key ID")
        if not MIN_BITS <= self.bits <= MAX_BITS or self.bits % 8:
            raise KdfError(f"a SKIP key has a multiple of 8 from {MIN_BITS} to {MAX_BITS}"
                           " bits")
        if len(self.nonce) != NONCE_BYTES:
            raise KdfError(f"a SKIP key ID's nonce has {NONCE_BYTES} bytes")

    @property
    def raw(self) -> bytes:
        return (self.epoch.to_bytes(EPOCH_BYTES, "big") + self.bits.to_bytes(BITS_BYTES, "big")
                + self.nonce)

    @property
    def hex(self) -> str:
        return self.raw.hex()


def _id(system_id: str, what: str) -> bytes:
    raw = system_id.encode()
    if not 1 <= len(raw) <= MAX_SYSTEM_ID:
        raise KdfError(f"{what} system ID must have 1 to {MAX_SYSTEM_ID} bytes")
    return bytes([len(raw)]) + raw


def skip_key(skip_root: bytes, *, origin: str, peer: str, key_id: SkipKeyId) -> bytes:
    """The key both Key Providers derive for KEY_ID (its size is in the ID), handed out
    first by ORIGIN to its router and then by PEER to the other."""
    if len(skip_root) != 48:
        raise KdfError("the SKIP root key has 48 bytes (SHA-384)")
    info = SKIP_KEY_LABEL + b"\x00" + _id(origin, "origin") + _id(peer, "peer") + key_id.raw
    return HKDFExpand(hash_algorithm("sha384"), key_id.bits // 8, info).derive(skip_root)

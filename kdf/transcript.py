"""The epoch transcript, encoded canonically for CatKDF's context, MA and MB inputs.

Everything both gateways agreed on for an epoch goes into the key: whoever changes any of it
(an epoch number, a QKD key ID, a certificate, a nonce, the suite) changes the key, and key
confirmation fails. The encoding is injective: fields in a fixed order, integers at fixed
width, every byte string and text preceded by its 32-bit big-endian length, lists by their
count, and a versioned domain tag first.

    context = tag(v) || str(suite) || str(link) || u64(epoch)
              || party(initiator) || party(responder)
              || u32(n) || str(key_ID_1) .. str(key_ID_n)
              || bytes(nonce_i) || bytes(nonce_r) || u32(spi_i) || u32(spi_r)
    party   = str(gateway) || bytes(certificate SHA-256) || str(SAE ID) || str(KME ID)
    MA      = bytes(ML-KEM encapsulation key) || bytes(X25519 public key of I)
    MB      = bytes(ML-KEM ciphertext) || bytes(X25519 public key of R)

The field layout is part of the protocol; docs/key-schedule.md documents it.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

#: Version of this encoding and of the protocol it belongs to.
TRANSCRIPT_VERSION = 1
_TAG = b"qkd-gateway transcript"


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def lp(data: bytes) -> bytes:
    """Length-prefixed bytes."""
    if len(data) > 0xFFFFFFFF:
        raise ValueError("transcript field longer than 2^32 - 1 bytes")
    return u32(len(data)) + data


def lp_str(text: str) -> bytes:
    return lp(text.encode("utf-8"))


@dataclass(frozen=True)
class Party:
    """One end of a link, as the other end knows it."""

    gateway: str  # peer-channel certificate commonName
    cert_sha256: bytes  # SHA-256 of that certificate's DER
    sae_id: str
    kme_id: str

    def __post_init__(self) -> None:
        if len(self.cert_sha256) != 32:
            raise ValueError("cert_sha256 must be a 32-byte SHA-256 digest")

    def encode(self) -> bytes:
        return lp_str(self.gateway) + lp(self.cert_sha256) + lp_str(self.sae_id) \
            + lp_str(self.kme_id)


@dataclass(frozen=True)
class Transcript:
    """What both sides agreed on for one epoch of one link."""

    suite: str
    link: str
    epoch: int
    initiator: Party
    responder: Party
    key_ids: tuple[str, ...]
    nonce_i: bytes
    nonce_r: bytes
    spi_i: int
    spi_r: int
    ek_mlkem: bytes
    pk_x25519_i: bytes
    ct_mlkem: bytes
    pk_x25519_r: bytes
    version: int = TRANSCRIPT_VERSION

    def __post_init__(self) -> None:
        if not 0 <= self.epoch < 2**64:
            raise ValueError("epoch must fit in 64 bits")
        for name in ("spi_i", "spi_r"):
            if not 0 <= getattr(self, name) < 2**32:
                raise ValueError(f"{name} must fit in 32 bits")
        if not 0 <= self.version < 2**16:
            raise ValueError("version must fit in 16 bits")

    @functools.cached_property
    def _context(self) -> bytes:
        return b"".join([
            lp(_TAG), self.version.to_bytes(2, "big"),
            lp_str(self.suite), lp_str(self.link), self.epoch.to_bytes(8, "big"),
            self.initiator.encode(), self.responder.encode(),
            u32(len(self.key_ids)), *(lp_str(k) for k in self.key_ids),
            lp(self.nonce_i), lp(self.nonce_r), u32(self.spi_i), u32(self.spi_r),
        ])

    def context(self) -> bytes:
        return self._context

    def ma(self) -> bytes:
        """The initiator's public values."""
        return lp(self.ek_mlkem) + lp(self.pk_x25519_i)

    def mb(self) -> bytes:
        """The responder's public values."""
        return lp(self.ct_mlkem) + lp(self.pk_x25519_r)

    def digest(self) -> bytes:
        """SHA-384 over context, MA and MB, each length-prefixed: what key confirmation MACs."""
        return self._digest

    @functools.cached_property
    def _digest(self) -> bytes:
        h = hashlib.sha384()
        for part in (self.context(), self.ma(), self.mb()):
            h.update(lp(part))
        return h.digest()

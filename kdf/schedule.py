"""The key schedule: from an epoch's three secrets to one key per purpose.

    epoch_secret = CatKDF-SHA-384(psk = QKD key(s), k1 = ML-KEM shared secret,
                                  k2 = X25519 shared secret, MA, MB, context,
                                  label = EPOCH_LABEL, length = 48)
    key(purpose) = HKDF-Expand-SHA-384(epoch_secret, info = purpose label, length)

The label tree (LABELS) is documented in docs/key-schedule.md; a test checks the two agree and
recomputes the whole schedule with hashlib and hmac alone.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from kdf.catkdf import catkdf, hash_algorithm
from kdf.errors import KdfError
from kdf.fingerprint import fingerprint
from kdf.transcript import Transcript

#: The hash of the whole schedule. SHA-384: a 192-bit post-quantum collision margin, and the
#: output (48 bytes) leaves room above every per-purpose key.
HASH = "sha384"
EPOCH_SECRET_SIZE = 48
EPOCH_LABEL = b"qkd-gateway v1 epoch secret"


class Purpose(Enum):
    """One key per purpose: (HKDF-Expand info label, length in bytes, what it keys)."""

    ESP_I2R = (b"qkd-gateway v1 esp i2r", 36, "ESP SA initiator to responder: AES-256-GCM"
               " key (32) + salt (4), rfc4106")
    ESP_R2I = (b"qkd-gateway v1 esp r2i", 36, "ESP SA responder to initiator, likewise")
    IKE_PPK = (b"qkd-gateway v1 ike ppk", 32, "IKEv2 post-quantum preshared key, RFC 8784")
    TLS_PSK = (b"qkd-gateway v1 tls psk", 32, "TLS 1.3 external PSK (SHA-256 suites)")
    CONFIRM_I = (b"qkd-gateway v1 confirm i", 48, "HMAC-SHA-384 key for the initiator's"
                 " key confirmation")
    CONFIRM_R = (b"qkd-gateway v1 confirm r", 48, "HMAC-SHA-384 key for the responder's"
                 " key confirmation")
    SKIP_ROOT = (b"qkd-gateway v1 skip root", 48, "HKDF-SHA-384 key of the SKIP keys the"
                 " two Key Providers hand their routers (kdf/skip.py)")

    @property
    def label(self) -> bytes:
        return self.value[0]

    @property
    def length(self) -> int:
        return int(self.value[1])

    @property
    def description(self) -> str:
        return str(self.value[2])


@dataclass(frozen=True)
class EpochKeys:
    """An epoch's keys. Only the fingerprint of the epoch secret is ever shown."""

    epoch: int
    epoch_secret: bytes = field(repr=False)
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", fingerprint(self.epoch_secret))

    def key(self, purpose: Purpose) -> bytes:
        expand = HKDFExpand(hash_algorithm(HASH), purpose.length, purpose.label)
        return expand.derive(self.epoch_secret)

    def confirm_tag(self, purpose: Purpose, transcript: Transcript) -> bytes:
        """Key confirmation: HMAC-SHA-384 under the CONFIRM_I or CONFIRM_R key over the
        transcript's hash. Proves the sender derived this epoch's keys from this transcript."""
        if purpose not in (Purpose.CONFIRM_I, Purpose.CONFIRM_R):
            raise KdfError("confirmation tags use the CONFIRM_I or CONFIRM_R key")
        return hmac.new(self.key(purpose), transcript.digest(), hashlib.sha384).digest()

    def confirm_ok(self, purpose: Purpose, transcript: Transcript, tag: bytes) -> bool:
        return hmac.compare_digest(self.confirm_tag(purpose, transcript), tag)


def derive_epoch(
    *,
    qkd_keys: Sequence[bytes],
    mlkem_secret: bytes,
    x25519_secret: bytes,
    transcript: Transcript,
) -> EpochKeys:
    """The epoch's keys from its secrets, bound to TRANSCRIPT.

    QKD_KEYS go into CatKDF's psk slot, in key-ID order; none in PQC-only operation (the
    suite in the transcript says which, so the two sides cannot disagree on it).
    """
    if len(qkd_keys) != len(transcript.key_ids):
        raise KdfError(f"{len(qkd_keys)} QKD key(s) for {len(transcript.key_ids)} key ID(s)")
    secret = catkdf(
        psk=b"".join(qkd_keys),
        secrets=[mlkem_secret, x25519_secret],
        context=transcript.context(),
        ma=transcript.ma(),
        mb=transcript.mb(),
        label=EPOCH_LABEL,
        length=EPOCH_SECRET_SIZE,
        hash=HASH,
    )
    return EpochKeys(transcript.epoch, secret)

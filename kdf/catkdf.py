"""The ETSI TS 103 744 V1.1.1 §8.2 CatKDF hybrid combiner.

    secret       = psk || k1 || k2 || ... || kn
    f_context    = H(len(context) || context || len(MA) || MA || len(MB) || MB)   (§7.2; each
                   len a 32-bit big-endian byte count)
    key_material = HKDF-H(IKM = secret, salt = label, info = f_context, L = length)

Checked against every CatKDF vector of V1.1.1's Annex C and against the V1.2 reference
implementation's CatKDF/HKDF vectors with ML-KEM-768 (tests/vectors/; V1.2 changed the vectors,
not this construction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kdf.errors import KdfError

#: The hash functions CatKDF takes here, by their hashlib names.
HASHES: Mapping[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
    "sha3_256": hashes.SHA3_256,
    "sha3_384": hashes.SHA3_384,
    "sha3_512": hashes.SHA3_512,
}

_MAX_FIELD = 2**32 - 1


def hash_algorithm(name: str) -> hashes.HashAlgorithm:
    try:
        return HASHES[name]()
    except KeyError:
        raise KdfError(f"unsupported hash {name!r}: use one of {', '.join(HASHES)}") from None


def _bytes(name: str, value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    return value


def format_context(algorithm: hashes.HashAlgorithm, *values: bytes) -> bytes:
    """TS 103 744 §7.2: hash the VALUES, each preceded by its 32-bit big-endian length."""
    h = hashes.Hash(algorithm)
    for value in values:
        if len(value) > _MAX_FIELD:
            raise KdfError("a CatKDF context field exceeds 2^32 - 1 bytes")
        h.update(len(value).to_bytes(4, "big"))
        h.update(value)
    return h.finalize()


def catkdf(
    *,
    psk: bytes,
    secrets: Sequence[bytes],
    context: bytes,
    ma: bytes,
    mb: bytes,
    label: bytes,
    length: int,
    hash: str = "sha384",
) -> bytes:
    """Combine PSK and SECRETS (in order) into LENGTH bytes bound to CONTEXT, MA and MB.

    PSK may be empty (TS 103 744 makes it optional); every shared secret must be non-empty.
    """
    algorithm = hash_algorithm(hash)
    _bytes("psk", psk)
    if not secrets:
        raise KdfError("CatKDF needs at least one shared secret")
    for i, s in enumerate(secrets):
        if not _bytes(f"secrets[{i}]", s):
            raise KdfError(f"secrets[{i}] is empty")
    for name, value in (("context", context), ("ma", ma), ("mb", mb), ("label", label)):
        _bytes(name, value)
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError("length must be an int")
    if not 1 <= length <= 255 * algorithm.digest_size:
        raise KdfError(f"length must be 1 to {255 * algorithm.digest_size} bytes for {hash}")
    f_context = format_context(algorithm, context, ma, mb)
    hkdf = HKDF(algorithm=algorithm, length=length, salt=label, info=f_context)
    return hkdf.derive(psk + b"".join(secrets))

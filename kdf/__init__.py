"""Hybrid key derivation: KEM backends, X25519, the ETSI TS 103 744 CatKDF combiner, the
transcript encoding and the key schedule. No I/O.
"""

from kdf.backends import kem_by_name
from kdf.catkdf import HASHES, catkdf
from kdf.errors import BackendUnavailable, InvalidKeyError, KdfError
from kdf.fingerprint import fingerprint
from kdf.kem import Encapsulation, Kem, KemPrivateKey, MlKem768, MlKem1024
from kdf.schedule import EpochKeys, Purpose, derive_epoch
from kdf.transcript import Party, Transcript
from kdf.x25519 import X25519PrivateKey

__all__ = [
    "HASHES",
    "BackendUnavailable",
    "Encapsulation",
    "EpochKeys",
    "InvalidKeyError",
    "KdfError",
    "Kem",
    "KemPrivateKey",
    "MlKem768",
    "MlKem1024",
    "Party",
    "Purpose",
    "Transcript",
    "X25519PrivateKey",
    "catkdf",
    "derive_epoch",
    "fingerprint",
    "kem_by_name",
]

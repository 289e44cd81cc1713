"""KEMs behind one small interface, one class per parameter set.

    kem = MlKem768()                          # pyca/cryptography (OpenSSL), the default
    private = kem.generate()
    sent = kem.encapsulate(private.encapsulation_key)     # the peer's side
    assert private.decapsulate(sent.ciphertext) == sent.shared_secret

`kem_by_name("ML-KEM-768", backend="oqs")` picks another backend (see `kdf.oqs`).
Inputs from a peer are checked before use: a wrong length or a malformed encapsulation key is
an `InvalidKeyError` naming the algorithm and the expected size. A well-formed but wrong
ciphertext is not an error: ML-KEM answers it with an unrelated shared secret (implicit
rejection, FIPS 203 §6.3), and the key confirmation that follows fails.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import mlkem

from kdf.errors import BackendUnavailable, InvalidKeyError, KdfError


@dataclass(frozen=True)
class Encapsulation:
    """What encapsulation yields: the ciphertext for the peer and the shared secret to keep."""

    ciphertext: bytes
    shared_secret: bytes = field(repr=False)


class KemPrivateKey(ABC):
    """A decapsulation key. Its bytes never leave it; `repr` names only the algorithm."""

    kem: Kem

    @property
    @abstractmethod
    def encapsulation_key(self) -> bytes:
        """The public encapsulation key to send to the peer."""

    @abstractmethod
    def _decapsulate(self, ciphertext: bytes) -> bytes: ...

    def decapsulate(self, ciphertext: bytes) -> bytes:
        self.kem.check_ciphertext(ciphertext)
        return self._decapsulate(ciphertext)

    def __repr__(self) -> str:
        return f"<{self.kem.name} private key ({self.kem.backend})>"


class Kem(ABC):
    name: ClassVar[str]
    backend: ClassVar[str]
    encapsulation_key_size: ClassVar[int]
    ciphertext_size: ClassVar[int]
    shared_secret_size: ClassVar[int] = 32

    @abstractmethod
    def generate(self) -> KemPrivateKey: ...

    @abstractmethod
    def _encapsulate(self, encapsulation_key: bytes) -> Encapsulation: ...

    def from_seed(self, seed: bytes) -> KemPrivateKey:
        """Deterministic key generation (for known-answer tests); not every backend has it."""
        raise KdfError(f"{self.name} ({self.backend}) cannot generate keys from a seed")

    def encapsulate(self, encapsulation_key: bytes) -> Encapsulation:
        _check_size(self.name, "encapsulation key", encapsulation_key,
                    self.encapsulation_key_size)
        return self._encapsulate(encapsulation_key)  # validates the key (once) as it parses

    def check_encapsulation_key(self, value: bytes) -> None:
        """Length, and where the backend can, the FIPS 203 §7.2 input check."""
        _check_size(self.name, "encapsulation key", value, self.encapsulation_key_size)

    def check_ciphertext(self, value: bytes) -> None:
        _check_size(self.name, "ciphertext", value, self.ciphertext_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_size(algorithm: str, what: str, value: bytes, size: int) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{algorithm} {what} must be bytes, not {type(value).__name__}")
    if len(value) != size:
        raise InvalidKeyError(f"{algorithm} {what} must be {size} bytes, got {len(value)}")


# -- pyca/cryptography -------------------------------------------------------------------------

_PycaPrivate = mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey


class _PycaPrivateKey(KemPrivateKey):
    def __init__(self, kem: _PycaMlKem, key: _PycaPrivate) -> None:
        self.kem = kem
        self._key = key

    @property
    def encapsulation_key(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def _decapsulate(self, ciphertext: bytes) -> bytes:
        return self._key.decapsulate(ciphertext)


class _PycaMlKem(Kem):
    backend = "cryptography"
    _private: ClassVar[type[mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey]]
    _public: ClassVar[type[mlkem.MLKEM768PublicKey | mlkem.MLKEM1024PublicKey]]

    def __init__(self) -> None:
        try:
            self._private.generate()
        except UnsupportedAlgorithm:
            raise BackendUnavailable(
                f"{self.name}: this cryptography build (its OpenSSL) has no ML-KEM;"
                " cryptography 47 or later with its bundled OpenSSL has it") from None

    def generate(self) -> KemPrivateKey:
        return _PycaPrivateKey(self, self._private.generate())

    def from_seed(self, seed: bytes) -> KemPrivateKey:
        _check_size(self.name, "seed (d || z)", seed, 64)
        return _PycaPrivateKey(self, self._private.from_seed_bytes(seed))

    def _parse(
        self, encapsulation_key: bytes
    ) -> mlkem.MLKEM768PublicKey | mlkem.MLKEM1024PublicKey:
        try:
            return self._public.from_public_bytes(encapsulation_key)
        except ValueError:
            raise InvalidKeyError(
                f"{self.name} encapsulation key is malformed (FIPS 203 §7.2 input check)"
            ) from None

    def check_encapsulation_key(self, value: bytes) -> None:
        super().check_encapsulation_key(value)
        self._parse(value)

    def _encapsulate(self, encapsulation_key: bytes) -> Encapsulation:
        shared, ciphertext = self._parse(encapsulation_key).encapsulate()
        return Encapsulation(ciphertext, shared)


class MlKem768(_PycaMlKem):
    """ML-KEM-768 (FIPS 203, NIST category 3) through pyca/cryptography."""

    name = "ML-KEM-768"
    encapsulation_key_size = 1184
    ciphertext_size = 1088
    _private = mlkem.MLKEM768PrivateKey
    _public = mlkem.MLKEM768PublicKey


class MlKem1024(_PycaMlKem):
    """ML-KEM-1024 (FIPS 203, NIST category 5) through pyca/cryptography."""

    name = "ML-KEM-1024"
    encapsulation_key_size = 1568
    ciphertext_size = 1568
    _private = mlkem.MLKEM1024PrivateKey
    _public = mlkem.MLKEM1024PublicKey

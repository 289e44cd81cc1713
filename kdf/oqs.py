"""The optional liboqs backend (PyPI `liboqs-python` over the liboqs C library).

It offers the ML-KEM parameter sets and whatever else the installed liboqs enables
(FrodoKEM, HQC, Classic McEliece, ...), by liboqs's algorithm names.

`liboqs-python` downloads and builds liboqs from GitHub the first time it is imported without
it, then exits the process if that fails. A gateway must never do that behind an operator's
back, so the library is looked for first, where liboqs-python would look, and its absence is
a `BackendUnavailable` saying what to install.
"""

from __future__ import annotations

import ctypes.util
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from kdf.errors import BackendUnavailable, InvalidKeyError, KdfError
from kdf.kem import Encapsulation, Kem, KemPrivateKey

_INSTALL_HINT = (
    "build liboqs (https://github.com/open-quantum-safe/liboqs, cmake -DBUILD_SHARED_LIBS=ON)"
    " and install it system-wide or under $OQS_INSTALL_PATH, then pip install liboqs-python"
)


def liboqs_location() -> Path | None:
    """Where liboqs-python would load liboqs from, or None: OQS_INSTALL_PATH (or ~/_oqs)
    lib/ and lib64/, then the system library path."""
    base = Path(os.environ.get("OQS_INSTALL_PATH", Path.home() / "_oqs"))
    for sub in ("lib", "lib64"):
        candidate = base / sub / "liboqs.so"
        if candidate.exists():
            return candidate
    found = ctypes.util.find_library("oqs")
    return Path(found) if found else None


def _oqs() -> ModuleType:
    if liboqs_location() is None:
        raise BackendUnavailable(f"the oqs KEM backend needs the liboqs C library, which is not"
                                 f" installed: {_INSTALL_HINT}")
    try:
        module: ModuleType = importlib.import_module("oqs")
    except ImportError:
        raise BackendUnavailable("the oqs KEM backend needs the liboqs-python package:"
                                 " pip install 'qkd-gateway[oqs]'") from None
    return module


#: Our names → liboqs's, where they differ (liboqs used "Kyber768" before FIPS 203).
_NAMES = {"ML-KEM-512": "ML-KEM-512", "ML-KEM-768": "ML-KEM-768", "ML-KEM-1024": "ML-KEM-1024"}


class _OqsPrivateKey(KemPrivateKey):
    def __init__(self, kem: OqsKem, handle: Any, public: bytes) -> None:
        self.kem = kem
        self._handle = handle
        self._public = public

    @property
    def encapsulation_key(self) -> bytes:
        return self._public

    def _decapsulate(self, ciphertext: bytes) -> bytes:
        return bytes(self._handle.decap_secret(ciphertext))


class OqsKem(Kem):
    """A KEM from liboqs, by name (e.g. "ML-KEM-768", "FrodoKEM-976-SHAKE", "HQC-192")."""

    backend = "oqs"

    def __init__(self, name: str) -> None:
        self._oqs = _oqs()
        self._alg = _NAMES.get(name, name)
        if self._alg not in self._oqs.get_enabled_kem_mechanisms():
            raise KdfError(f"liboqs has no enabled KEM {name!r}; enabled: "
                           + ", ".join(self._oqs.get_enabled_kem_mechanisms()))
        details = self._oqs.KeyEncapsulation(self._alg).details
        # Instance attributes: one class serves every liboqs algorithm.
        self.name = name  # type: ignore[misc]
        self.encapsulation_key_size = int(details["length_public_key"])  # type: ignore[misc]
        self.ciphertext_size = int(details["length_ciphertext"])  # type: ignore[misc]
        self.shared_secret_size = int(details["length_shared_secret"])  # type: ignore[misc]

    def generate(self) -> KemPrivateKey:
        handle = self._oqs.KeyEncapsulation(self._alg)
        return _OqsPrivateKey(self, handle, bytes(handle.generate_keypair()))

    def _encapsulate(self, encapsulation_key: bytes) -> Encapsulation:
        with self._oqs.KeyEncapsulation(self._alg) as handle:
            try:
                ciphertext, shared = handle.encap_secret(encapsulation_key)
            except RuntimeError:
                raise InvalidKeyError(f"{self.name} encapsulation key is malformed") from None
        return Encapsulation(bytes(ciphertext), bytes(shared))

    def __repr__(self) -> str:
        return f"OqsKem({self.name!r})"

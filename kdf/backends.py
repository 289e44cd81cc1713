"""Which KEM implementations exist: the one place that knows both backends (kdf/kem.py has the
interface and the default backend, kdf/oqs.py the optional one; neither imports the other)."""

from __future__ import annotations

from kdf.errors import KdfError
from kdf.kem import Kem, MlKem768, MlKem1024
from kdf.oqs import OqsKem

#: The default backend's classes by algorithm name.
CRYPTOGRAPHY_KEMS: dict[str, type[Kem]] = {k.name: k for k in (MlKem768, MlKem1024)}

BACKENDS = ("cryptography", "oqs")


def kem_by_name(name: str, backend: str = "cryptography") -> Kem:
    """The KEM NAME from BACKEND; a clear error if either is unknown or not installed."""
    if backend == "cryptography":
        if name not in CRYPTOGRAPHY_KEMS:
            raise KdfError(f"the cryptography backend has no KEM {name!r}: it has "
                           + ", ".join(CRYPTOGRAPHY_KEMS) + " (the oqs backend has more)")
        return CRYPTOGRAPHY_KEMS[name]()
    if backend == "oqs":
        return OqsKem(name)  # liboqs itself is loaded only now
    raise KdfError(f"unknown KEM backend {backend!r}: use one of {', '.join(BACKENDS)}")

"""ML-KEM interop with an independent implementation: kyber-py, pure-Python FIPS 203.

It also checks the published vectors where the cryptography API cannot: encapsulation with
the vector's randomness, and the expanded decapsulation key.
"""

from __future__ import annotations

from typing import Any

import pytest

from kdf import MlKem768, MlKem1024
from kdf.kem import Kem
from tests.kdf.test_kem import ACVP_768, KATS, _id

kyber = pytest.importorskip("kyber_py.ml_kem", reason="pip install kyber-py")
INDEPENDENT: dict[type[Kem], Any] = {MlKem768: kyber.ML_KEM_768, MlKem1024: kyber.ML_KEM_1024}


@pytest.mark.parametrize("t", ACVP_768[:5], ids=lambda t: f"tcId{t['tcId']}")
def test_independent_implementation_agrees_with_acvp(t: dict[str, Any]) -> None:
    d, z, ek, dk = (bytes.fromhex(t[k]) for k in ("d", "z", "ek", "dk"))
    assert kyber.ML_KEM_768._keygen_internal(d, z) == (ek, dk)


@pytest.mark.parametrize("case", KATS[:3], ids=_id)
def test_independent_implementation_agrees_with_the_kats(
    case: tuple[type[Kem], dict[str, str]]
) -> None:
    """The vectors are checked by a second implementation too, including encapsulation with
    the published randomness, which the cryptography API does not expose."""
    cls, v = case
    other = INDEPENDENT[cls]
    b = {k: bytes.fromhex(x) for k, x in v.items() if k != "count"}
    ek, dk = other._keygen_internal(b["d"], b["z"])
    assert (ek, dk) == (b["pk"], b["sk"])
    assert other._encaps_internal(ek, b["msg"]) == (b["ss"], b["ct"])


@pytest.mark.parametrize("cls", [MlKem768, MlKem1024])
def test_interop_with_an_independent_implementation(cls: type[Kem]) -> None:
    kem, other = cls(), INDEPENDENT[cls]
    ours = kem.generate()
    shared, ct = other.encaps(ours.encapsulation_key)
    assert ours.decapsulate(ct) == shared
    ek, dk = other.keygen()
    sent = kem.encapsulate(ek)
    assert other.decaps(dk, sent.ciphertext) == sent.shared_secret



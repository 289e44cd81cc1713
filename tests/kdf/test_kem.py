"""KEM backends: published known answers, malformed input, interop with independent code."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from kdf import BackendUnavailable, InvalidKeyError, KdfError, MlKem768, MlKem1024, kem_by_name
from kdf.kem import Kem
from kdf.oqs import liboqs_location
from tests.helpers import VECTORS, read_vectors

KATS = [(cls, v) for cls, name in ((MlKem768, "kat_MLKEM_768.rsp"),
                                   (MlKem1024, "kat_MLKEM_1024.rsp"))
        for _, v in read_vectors(name, "count")]


def _id(case: Any) -> str:
    cls, v = case
    return f"{cls.name}-count{v['count']}"


def test_kat_files_hold_what_the_provenance_says() -> None:
    assert [int(v["count"]) for c, v in KATS if c is MlKem768] == list(range(10))
    assert [int(v["count"]) for c, v in KATS if c is MlKem1024] == list(range(5))


@pytest.mark.parametrize("case", KATS, ids=_id)
def test_known_answers(case: tuple[type[Kem], dict[str, str]]) -> None:
    """FIPS 203 KeyGen from the seed d || z gives the published encapsulation key;
    Decaps gives the published shared secret, and for the pseudorandom ciphertext the
    published implicit-rejection secret."""
    cls, v = case
    kem = cls()
    b = {k: bytes.fromhex(x) for k, x in v.items() if k != "count"}
    private = kem.from_seed(b["d"] + b["z"])
    assert private.encapsulation_key == b["pk"]
    assert private.decapsulate(b["ct"]) == b["ss"]
    assert private.decapsulate(b["ct_n"]) == b["ss_n"]
    # Implicit rejection is J(z || c) = SHAKE-256(z || c, 32) (FIPS 203 Algorithm 18):
    # the published value, recomputed with hashlib alone.
    assert hashlib.shake_256(b["z"] + b["ct_n"]).digest(32) == b["ss_n"]
    # dk = dk_PKE || ek || H(ek) || z (FIPS 203 Algorithm 16): the vector is self-consistent.
    assert b["sk"].endswith(b["pk"] + hashlib.sha3_256(b["pk"]).digest() + b["z"])


ACVP = json.loads((VECTORS / "ML-KEM-keyGen-FIPS203-ML-KEM-768.json").read_text())
ACVP_768 = [t for g in ACVP["testGroups"] if g["parameterSet"] == "ML-KEM-768"
            for t in g["tests"]]


def test_acvp_file_holds_the_ml_kem_768_group() -> None:
    assert (ACVP["algorithm"], ACVP["mode"], ACVP["revision"]) == ("ML-KEM", "keyGen", "FIPS203")
    assert [t["tcId"] for t in ACVP_768] == list(range(26, 51))


@pytest.mark.parametrize("t", ACVP_768, ids=lambda t: f"tcId{t['tcId']}")
def test_nist_acvp_key_generation(t: dict[str, Any]) -> None:
    """ML-KEM.KeyGen_internal(d, z): the published encapsulation key, and a decapsulation
    key whose public part (ek || H(ek) || z, FIPS 203 Algorithm 16) is consistent with it."""
    d, z, ek, dk = (bytes.fromhex(t[k]) for k in ("d", "z", "ek", "dk"))
    private = MlKem768().from_seed(d + z)
    assert private.encapsulation_key == ek
    assert dk.endswith(ek + hashlib.sha3_256(ek).digest() + z)
    assert len(dk) == 2400
    sent = MlKem768().encapsulate(ek)
    assert private.decapsulate(sent.ciphertext) == sent.shared_secret


@pytest.mark.parametrize("cls", [MlKem768, MlKem1024])
def test_round_trip_and_sizes(cls: type[Kem]) -> None:
    kem = cls()
    private = kem.generate()
    assert len(private.encapsulation_key) == kem.encapsulation_key_size
    sent = kem.encapsulate(private.encapsulation_key)
    assert len(sent.ciphertext) == kem.ciphertext_size
    assert len(sent.shared_secret) == kem.shared_secret_size == 32
    assert private.decapsulate(sent.ciphertext) == sent.shared_secret
    assert kem.encapsulate(private.encapsulation_key).shared_secret != sent.shared_secret


@pytest.mark.parametrize("cls", [MlKem768, MlKem1024])
def test_wrong_lengths_are_clear_errors(cls: type[Kem]) -> None:
    kem = cls()
    private = kem.generate()
    ek = private.encapsulation_key
    with pytest.raises(InvalidKeyError,
                       match=f"{kem.name} encapsulation key must be {len(ek)} bytes, got 12"):
        kem.encapsulate(b"x" * 12)
    with pytest.raises(InvalidKeyError, match=f"{kem.name} encapsulation key must be"):
        kem.encapsulate(ek + b"\x00")
    with pytest.raises(InvalidKeyError,
                       match=f"{kem.name} ciphertext must be {kem.ciphertext_size} bytes, got"):
        private.decapsulate(b"\x00" * (kem.ciphertext_size - 1))
    with pytest.raises(TypeError, match="must be bytes, not str"):
        kem.encapsulate("00" * len(ek))  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError, match="seed"):
        kem.from_seed(b"\x00" * 32)


@pytest.mark.parametrize("cls", [MlKem768, MlKem1024])
def test_malformed_encapsulation_key_fails_the_modulus_check(cls: type[Kem]) -> None:
    """FIPS 203 §7.2: every 12-bit coefficient of ek must be below q = 3329."""
    ek = bytearray(cls().generate().encapsulation_key)
    ek[0], ek[1] = 0xFF, ek[1] | 0x0F  # first coefficient = 4095
    with pytest.raises(InvalidKeyError, match="malformed"):
        cls().encapsulate(bytes(ek))


def test_tampered_ciphertext_gives_an_unrelated_secret() -> None:
    kem = MlKem768()
    private = kem.generate()
    sent = kem.encapsulate(private.encapsulation_key)
    tampered = bytes([sent.ciphertext[0] ^ 1]) + sent.ciphertext[1:]
    assert private.decapsulate(tampered) != sent.shared_secret


def test_registry() -> None:
    assert isinstance(kem_by_name("ML-KEM-768"), MlKem768)
    assert isinstance(kem_by_name("ML-KEM-1024"), MlKem1024)
    with pytest.raises(KdfError, match="no KEM 'ML-KEM-512': it has ML-KEM-768, ML-KEM-1024"):
        kem_by_name("ML-KEM-512")
    with pytest.raises(KdfError, match="unknown KEM backend 'pqclean'"):
        kem_by_name("ML-KEM-768", backend="pqclean")


# -- the optional liboqs backend ----------------------------------------------------------------

LIBOQS = liboqs_location()


@pytest.mark.skipif(LIBOQS is not None, reason="liboqs is installed here")
def test_oqs_backend_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.delitem(sys.modules, "oqs", raising=False)
    with pytest.raises(BackendUnavailable, match="needs the liboqs C library, which is not"
                       " installed: build liboqs"):
        kem_by_name("ML-KEM-768", backend="oqs")
    assert "oqs" not in sys.modules  # never imported: no download-and-build attempt


@pytest.mark.skipif(LIBOQS is None,
                    reason="liboqs C library not installed (looked in $OQS_INSTALL_PATH,"
                           " ~/_oqs and the system library path)")
@pytest.mark.parametrize("cls", [MlKem768, MlKem1024])
def test_interop_with_liboqs(cls: type[Kem]) -> None:
    pytest.importorskip("oqs", reason="pip install liboqs-python")
    ours, theirs = cls(), kem_by_name(cls.name, backend="oqs")
    for a, b in ((ours, theirs), (theirs, ours)):
        private = a.generate()
        sent = b.encapsulate(private.encapsulation_key)
        assert private.decapsulate(sent.ciphertext) == sent.shared_secret

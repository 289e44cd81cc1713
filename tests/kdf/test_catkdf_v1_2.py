"""CatKDF against ETSI TS 103 744 V1.2's reference vectors (the HKDF variant, ML-KEM-768).

V1.2 changed the test vectors, not the HKDF construction: ML-KEM replaced SIKE and Kyber, the
context became an info string, the label became LA xor LB and MA, MB gained a CID and length
fields. Provenance and format: the header of tests/vectors/catkdf_ts103744_v1_2_hkdf.txt.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kdf import catkdf
from tests.helpers import VECTORS, read_vectors

FILE = "catkdf_ts103744_v1_2_hkdf.txt"
HASH_BY_CID_DIGIT = {"1": "sha256", "2": "sha384"}  # main.c: 1xxx HKDFwSHA256, 2xxx HKDFwSHA384
MA_FORM = "cid || len(LA)|| LA || len(PA1) || PA1 || len(PA2) || PA2"
MB_FORM = "cid || len(LB)|| LB || len(PB1) || PB1 || len(PB2) || PB2"


def read(name: str = FILE) -> list[dict[str, str]]:
    """The blocks of the file: a `CID n` line starts one, `key = value` lines fill it."""
    out: list[dict[str, str]] = []
    for raw in (VECTORS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("CID "):
            out.append({"CID": line[4:].strip()})
            continue
        key, sep, value = line.partition(" = ")
        if not sep or not out:
            raise ValueError(f"{name}: not 'key = value' in a CID block: {line[:40]}")
        out[-1][key] = value
    return out


def formatted(cid: str, *fields: str) -> bytes:
    """main.c's message_formatting_function(): the CID's bytes, then each field preceded by
    a 32-bit big-endian count of its hex digits (not of its bytes)."""
    out = bytes.fromhex(cid)
    for field in fields:
        out += len(field).to_bytes(4, "big") + bytes.fromhex(field)
    return out


VECTORS_V1_2 = read()


def test_the_file_holds_the_six_ml_kem_768_vectors() -> None:
    assert [v["CID"] for v in VECTORS_V1_2] == ["1121", "1721", "1421", "2221", "2821", "2521"]
    for v in VECTORS_V1_2:
        assert v["info"] == '"ETSI_QSHKE_TEST_VECTORS_V_1_2"'
        assert (v["MA"], v["MB"]) == (MA_FORM, MB_FORM)
        assert (len(v["PA2"]), len(v["PB2"]), len(v["k2"])) == (2 * 1184, 2 * 1088, 2 * 32)


@pytest.mark.parametrize("v", VECTORS_V1_2, ids=lambda v: f"CID{v['CID']}")
def test_v1_2_reference_vectors(v: dict[str, str]) -> None:
    la, lb = bytes.fromhex(v["LA"]), bytes.fromhex(v["LB"])
    label = bytes(a ^ b for a, b in zip(la, lb, strict=True))
    assert v["label"] == "LA ^ LB = " + label.hex().upper()
    expected = bytes.fromhex(v["key material"])
    out = catkdf(psk=b"", secrets=[bytes.fromhex(v["k1"]), bytes.fromhex(v["k2"])],
                 context=v["info"].strip('"').encode(),
                 ma=formatted(v["CID"], v["LA"], v["PA1"], v["PA2"]),
                 mb=formatted(v["CID"], v["LB"], v["PB1"], v["PB2"]),
                 label=label, length=len(expected), hash=HASH_BY_CID_DIGIT[v["CID"][0]])
    assert out == expected


def test_the_ml_kem_values_are_the_known_answers_main_c_names() -> None:
    """PA2, PB2, k2 are post-quantum-cryptography/KAT's ML-KEM-768 count 3, 4, 5."""
    kats = {k["pk"].upper(): k for _, k in read_vectors("kat_MLKEM_768.rsp", "count")}
    for v in VECTORS_V1_2:
        kat = kats[v["PA2"]]
        assert (kat["ct"].upper(), kat["ss"].upper()) == (v["PB2"], v["k2"])
        assert kat["count"] in {"3", "4", "5"}


def test_the_provenance_header_names_the_source() -> None:
    head = (VECTORS / FILE).read_text().split("\nCID ", 1)[0]
    assert "etsi-forge/cyber.103744_QHKEX" in head
    assert "075222ad7ee1aee1697b62f961524707512324ae" in head
    assert Path(__file__).relative_to(Path(__file__).parents[2]).as_posix() in head

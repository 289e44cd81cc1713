"""X25519: RFC 7748 vectors and refusal of low-order peer keys."""

from __future__ import annotations

import pytest

from kdf import InvalidKeyError, X25519PrivateKey
from tests.helpers import read_vectors

VECTORS = [v for _, v in read_vectors("x25519_rfc7748.txt", "COUNT")]
BASE_POINT = bytes.fromhex("09" + "00" * 31)


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: f"COUNT{v['COUNT']}")
def test_rfc7748_vectors(v: dict[str, str]) -> None:
    key = X25519PrivateKey.from_private_bytes(bytes.fromhex(v["INPUT_SCALAR"]))
    u = bytes.fromhex(v["INPUT_U"])
    expected = bytes.fromhex(v["OUTPUT_U"])
    if u == BASE_POINT:
        assert key.public_key == expected
    assert key.exchange(u) == expected


def test_both_sides_agree() -> None:
    a, b = X25519PrivateKey(), X25519PrivateKey()
    assert a.exchange(b.public_key) == b.exchange(a.public_key)


# Points of small order on Curve25519 and their non-canonical encodings (the list libsodium
# and Wycheproof test): each makes the shared secret all-zero.
LOW_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]


@pytest.mark.parametrize("point", LOW_ORDER)
def test_low_order_points_are_refused(point: str) -> None:
    with pytest.raises(InvalidKeyError, match="low order"):
        X25519PrivateKey().exchange(bytes.fromhex(point))


@pytest.mark.parametrize("bad", [b"", b"\x09" * 31, b"\x09" * 33])
def test_wrong_length_is_refused(bad: bytes) -> None:
    with pytest.raises(InvalidKeyError, match="must be 32 bytes"):
        X25519PrivateKey().exchange(bad)

"""CatKDF (ETSI TS 103 744 §8.2): the standard's Annex C vectors, input checks, properties."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kdf import HASHES, KdfError, catkdf
from tests.helpers import read_vectors

VECTORS = read_vectors("cat_kdf_combiner_func.vec", "hash_output_bits")


def cases() -> list[Any]:
    out = []
    for context, v in VECTORS:
        b = {k: bytes.fromhex(x) for k, x in v.items() if k != "hash_output_bits"}
        bits = v["hash_output_bits"]
        for family, key in (("sha", "key_material_sha2"), ("sha3_", "key_material_sha3")):
            out.append(pytest.param(context, f"{family}{bits}", b, b[key],
                                    id=f"{family}{bits}-{context or 'empty-context'}"
                                       f"-{len(b['PA2'])}"))
    return out


def test_every_published_vector_is_here() -> None:
    """Annex C.2.1 to C.2.14 (7 parameter sets x 2 hashes) plus Botan's empty-context case."""
    assert len(cases()) == 16
    assert sum(1 for c, _ in VECTORS if c == "CONCATENATION TEST VECTOR 1") == 7


@pytest.mark.parametrize(("context", "hash_name", "v", "expected"), cases())
def test_annex_c_vectors(context: str, hash_name: str, v: dict[str, bytes],
                         expected: bytes) -> None:
    out = catkdf(psk=b"", secrets=[v["k1"], v["k2"]], context=context.encode(),
                 ma=v["LA"] + v["PA1"] + v["PA2"], mb=v["LB"] + v["PB1"] + v["PB2"],
                 label=v["LA"] + v["LB"], length=len(expected), hash=hash_name)
    assert out == expected


BASE: dict[str, Any] = {"psk": b"q" * 32, "secrets": [b"k" * 32, b"x" * 32], "context": b"ctx",
                        "ma": b"ma", "mb": b"mb", "label": b"label", "length": 48}


def test_rejects_unknown_hash() -> None:
    with pytest.raises(KdfError, match="unsupported hash 'md5': use one of sha256, sha384"):
        catkdf(**BASE, hash="md5")


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"secrets": []}, KdfError, "at least one shared secret"),
    ({"secrets": [b"k", b""]}, KdfError, r"secrets\[1\] is empty"),
    ({"secrets": [b"k", "x"]}, TypeError, r"secrets\[1\] must be bytes, not str"),
    ({"psk": None}, TypeError, "psk must be bytes, not NoneType"),
    ({"label": "l"}, TypeError, "label must be bytes"),
    ({"length": 0}, KdfError, "length must be 1 to 12240 bytes for sha384"),
    ({"length": 12241}, KdfError, "length must be 1 to 12240"),
    ({"length": True}, TypeError, "length must be an int"),
])
def test_rejects_bad_input(change: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        catkdf(**{**BASE, **change})


def test_psk_is_optional_and_matters() -> None:
    without = catkdf(**{**BASE, "psk": b""})
    assert len(without) == 48
    assert without != catkdf(**BASE)


# -- properties -------------------------------------------------------------------------------

small = st.binary(max_size=48)
inputs = st.fixed_dictionaries({
    "psk": small, "secrets": st.lists(st.binary(min_size=1, max_size=48), min_size=1, max_size=3),
    "context": small, "ma": small, "mb": small, "label": small,
    # At least 16 bytes: shorter outputs collide by chance (one byte: 1 in 256).
    "length": st.integers(16, 200), "hash": st.sampled_from(sorted(HASHES)),
})


@given(inputs, st.integers(1, 400))
def test_length_and_determinism(kw: dict[str, Any], length: int) -> None:
    out = catkdf(**{**kw, "length": length})
    assert len(out) == length
    assert catkdf(**{**kw, "length": length}) == out


def _flip(data: bytes, i: int) -> bytes:
    if not data:
        return b"\x00"
    i %= len(data)
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


@given(inputs, st.sampled_from(["psk", "secret", "context", "ma", "mb", "label", "hash"]),
       st.integers(0, 1000))
def test_changing_any_single_input_changes_the_output(kw: dict[str, Any], which: str,
                                                      i: int) -> None:
    changed = dict(kw, secrets=list(kw["secrets"]))
    if which == "secret":
        j = i % len(changed["secrets"])
        changed["secrets"][j] = _flip(changed["secrets"][j], i)
    elif which == "hash":
        names = sorted(HASHES)
        changed["hash"] = names[(names.index(kw["hash"]) + 1 + i % 5) % 6]
    else:
        changed[which] = _flip(kw[which], i)
    if which == "label" and _hmac_key(changed["label"]) == _hmac_key(kw["label"]):
        return  # see test_labels_are_domain_separated
    assert catkdf(**changed) != catkdf(**kw)


def _hmac_key(label: bytes) -> bytes:
    """The label is HKDF's salt, an HMAC key; HMAC pads keys with zero bytes, so labels that
    differ only in trailing zeros are the same key. Ours are fixed ASCII strings."""
    return label.rstrip(b"\x00")


@given(inputs, small)
def test_labels_are_domain_separated(kw: dict[str, Any], other: bytes) -> None:
    same = catkdf(**kw) == catkdf(**{**kw, "label": other})
    assert same == (_hmac_key(other) == _hmac_key(kw["label"]))


@given(inputs)
def test_moving_bytes_between_secrets_changes_nothing_but_psk_boundary_is_fixed(
    kw: dict[str, Any]
) -> None:
    """TS 103 744 concatenates psk || k1 || k2 without lengths: the transcript, not the
    combiner, must bind each secret's origin. This pins that behaviour down."""
    joined = kw["psk"] + b"".join(kw["secrets"])
    assert catkdf(**{**kw, "psk": b"", "secrets": [joined]}) == catkdf(**kw)

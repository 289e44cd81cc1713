"""SKIP keys from the key schedule (kdf/skip.py, docs/key-schedule.md "SKIP keys"),
recomputed with hmac alone; what the derivation binds and what it refuses."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kdf.errors import KdfError
from kdf.schedule import EpochKeys, Purpose
from kdf.skip import KEY_ID_BYTES, SkipKeyId, skip_key


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 §2.3 with SHA-384, from hmac alone."""
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha384).digest()
        out += block
        i += 1
    return out[:length]


def reference(epoch_secret: bytes, origin: str, peer: str, key_id: bytes, bits: int) -> bytes:
    root = hkdf_expand(epoch_secret, b"qkd-gateway v1 skip root", 48)
    info = (b"qkd-gateway v1 skip key\x00" + bytes([len(origin)]) + origin.encode()
            + bytes([len(peer)]) + peer.encode() + key_id + bits.to_bytes(2, "big"))
    return hkdf_expand(root, info, bits // 8)


SECRET = bytes(range(48))


def test_the_derivation_is_the_documented_one() -> None:
    root = EpochKeys(7, SECRET).key(Purpose.SKIP_ROOT)
    key_id = SkipKeyId(7, bytes(range(16)))
    for bits in (128, 256, 512, 4096):
        got = skip_key(root, origin="kp-a", peer="kp-b", key_id=key_id, bits=bits)
        assert got == reference(SECRET, "kp-a", "kp-b", key_id.raw, bits)
        assert len(got) * 8 == bits


def test_each_input_changes_the_key() -> None:
    root = EpochKeys(7, SECRET).key(Purpose.SKIP_ROOT)
    kid = SkipKeyId(7, b"\x01" * 16)
    base = skip_key(root, origin="kp-a", peer="kp-b", key_id=kid, bits=256)
    others = [
        skip_key(root, origin="kp-b", peer="kp-a", key_id=kid, bits=256),  # the other way
        skip_key(root, origin="kp-a", peer="kp-c", key_id=kid, bits=256),
        skip_key(root, origin="kp-a", peer="kp-b", key_id=SkipKeyId(8, b"\x01" * 16),
                 bits=256),
        skip_key(root, origin="kp-a", peer="kp-b", key_id=SkipKeyId(7, b"\x02" * 16),
                 bits=256),
        skip_key(EpochKeys(8, SECRET[::-1]).key(Purpose.SKIP_ROOT), origin="kp-a",
                 peer="kp-b", key_id=kid, bits=256),
        # length-prefixed: ("kp-ab", "c") and ("kp-a", "bc") are different pairs
        skip_key(root, origin="kp-ab", peer="c", key_id=kid, bits=256),
        skip_key(root, origin="kp-a", peer="bc", key_id=kid, bits=256),
    ]
    assert base not in others
    assert len(set(others)) == len(others)
    # Another size is another key, not a truncation of this one.
    longer = skip_key(root, origin="kp-a", peer="kp-b", key_id=kid, bits=512)
    assert longer[:32] != base


def test_the_root_is_its_own_purpose() -> None:
    keys = EpochKeys(7, SECRET)
    root = keys.key(Purpose.SKIP_ROOT)
    assert root not in [keys.key(p) for p in Purpose if p is not Purpose.SKIP_ROOT]


@given(st.integers(0, 2**64 - 1), st.binary(min_size=16, max_size=16))
def test_key_ids_round_trip(epoch: int, nonce: bytes) -> None:
    kid = SkipKeyId(epoch, nonce)
    assert len(kid.hex) == 2 * KEY_ID_BYTES
    assert SkipKeyId.parse(kid.hex) == kid
    assert SkipKeyId.parse(kid.hex.upper()) == kid


def test_fresh_key_ids_differ() -> None:
    ids = {SkipKeyId.fresh(5).hex for _ in range(1000)}
    assert len(ids) == 1000
    assert all(SkipKeyId.parse(i).epoch == 5 for i in ids)


@pytest.mark.parametrize(("text", "says"), [
    ("zz" * 24, "hexadecimal"), ("ab" * 23, "48 hexadecimal"), ("ab" * 25, "48 hexadecimal"),
    ("", "48 hexadecimal"), ("a" * 47, "hexadecimal"),
])
def test_key_ids_not_ours_are_refused(text: str, says: str) -> None:
    with pytest.raises(KdfError, match=says):
        SkipKeyId.parse(text)


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"bits": 100}, "multiple of 8"), ({"bits": 64}, "multiple of 8"),
    ({"bits": 4104}, "multiple of 8"), ({"origin": ""}, "origin"),
    ({"peer": "x" * 256}, "peer"), ({"root": b"short"}, "48 bytes"),
])
def test_bad_inputs_are_refused(kwargs: dict[str, object], says: str) -> None:
    args: dict[str, object] = {"origin": "kp-a", "peer": "kp-b",
                               "key_id": SkipKeyId(1, bytes(16)), "bits": 256}
    root = kwargs.pop("root", EpochKeys(1, SECRET).key(Purpose.SKIP_ROOT))
    args.update(kwargs)
    with pytest.raises(KdfError, match=says):
        skip_key(root, **args)  # type: ignore[arg-type]

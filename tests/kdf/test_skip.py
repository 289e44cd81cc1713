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


def reference(epoch_secret: bytes, origin: str, peer: str, epoch: int, bits: int,
              nonce: bytes) -> bytes:
    root = hkdf_expand(epoch_secret, b"qkd-gateway v1 skip root", 48)
    key_id = epoch.to_bytes(8, "big") + bits.to_bytes(2, "big") + nonce
    info = (b"qkd-gateway v1 skip key\x00" + bytes([len(origin)]) + origin.encode()
            + bytes([len(peer)]) + peer.encode() + key_id)
    return hkdf_expand(root, info, bits // 8)


SECRET = bytes(range(48))


def test_the_derivation_is_the_documented_one() -> None:
    root = EpochKeys(7, SECRET).key(Purpose.SKIP_ROOT)
    for bits in (128, 256, 512, 4096):
        key_id = SkipKeyId(7, bits, bytes(range(16)))
        got = skip_key(root, origin="kp-a", peer="kp-b", key_id=key_id)
        assert got == reference(SECRET, "kp-a", "kp-b", 7, bits, bytes(range(16)))
        assert len(got) * 8 == bits


def test_each_input_changes_the_key() -> None:
    root = EpochKeys(7, SECRET).key(Purpose.SKIP_ROOT)
    kid = SkipKeyId(7, 256, b"\x01" * 16)

    def key(origin: str = "kp-a", peer: str = "kp-b", key_id: SkipKeyId = kid,
            root: bytes = root) -> bytes:
        return skip_key(root, origin=origin, peer=peer, key_id=key_id)

    base = key()
    others = [
        key(origin="kp-b", peer="kp-a"),  # the other way round
        key(peer="kp-c"),
        key(key_id=SkipKeyId(8, 256, b"\x01" * 16)),
        key(key_id=SkipKeyId(7, 256, b"\x02" * 16)),
        key(root=EpochKeys(8, SECRET[::-1]).key(Purpose.SKIP_ROOT)),
        # length-prefixed: ("kp-ab", "c") and ("kp-a", "bc") are different pairs
        key(origin="kp-ab", peer="c"),
        key(peer="bc"),
    ]
    assert base not in others
    assert len(set(others)) == len(others)
    # Another size is another key, not a longer or shorter cut of this one.
    longer = key(key_id=SkipKeyId(7, 512, b"\x01" * 16))
    assert longer[:32] != base


def test_the_root_is_its_own_purpose() -> None:
    keys = EpochKeys(7, SECRET)
    root = keys.key(Purpose.SKIP_ROOT)
    assert root not in [keys.key(p) for p in Purpose if p is not Purpose.SKIP_ROOT]


@given(st.integers(0, 2**64 - 1), st.integers(16, 512).map(lambda n: n * 8),
       st.binary(min_size=16, max_size=16))
def test_key_ids_round_trip(epoch: int, bits: int, nonce: bytes) -> None:
    kid = SkipKeyId(epoch, bits, nonce)
    assert len(kid.hex) == 2 * KEY_ID_BYTES
    assert SkipKeyId.parse(kid.hex) == kid
    assert SkipKeyId.parse(kid.hex.upper()) == kid


def test_fresh_key_ids_differ() -> None:
    ids = {SkipKeyId.fresh(5, 256).hex for _ in range(1000)}
    assert len(ids) == 1000
    assert all(SkipKeyId.parse(i).epoch == 5 for i in ids)
    assert all(SkipKeyId.parse(i).bits == 256 for i in ids)


@pytest.mark.parametrize(("text", "says"), [
    ("zz" * 26, "hexadecimal"), ("ab" * 25, "52 hexadecimal"), ("ab" * 27, "52 hexadecimal"),
    ("", "52 hexadecimal"), ("a" * 51, "hexadecimal"),
    ("00" * 8 + "0064" + "00" * 16, "multiple of 8"),  # 100 bits
    ("00" * 8 + "0000" + "00" * 16, "multiple of 8"),
])
def test_key_ids_not_ours_are_refused(text: str, says: str) -> None:
    with pytest.raises(KdfError, match=says):
        SkipKeyId.parse(text)


def test_bad_inputs_are_refused() -> None:
    kid = SkipKeyId(1, 256, bytes(16))
    root = EpochKeys(1, SECRET).key(Purpose.SKIP_ROOT)
    with pytest.raises(KdfError, match="origin"):
        skip_key(root, origin="", peer="kp-b", key_id=kid)
    with pytest.raises(KdfError, match="peer"):
        skip_key(root, origin="kp-a", peer="x" * 256, key_id=kid)
    with pytest.raises(KdfError, match="48 bytes"):
        skip_key(b"short", origin="kp-a", peer="kp-b", key_id=kid)
    for bits in (64, 100, 4104):
        with pytest.raises(KdfError, match="multiple of 8"):
            SkipKeyId(1, bits, bytes(16))

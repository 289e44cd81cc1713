"""The key schedule, recomputed independently with hashlib and hmac, and its documentation."""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kdf import (
    EpochKeys,
    KdfError,
    MlKem768,
    Party,
    Purpose,
    Transcript,
    X25519PrivateKey,
    derive_epoch,
)
from kdf.schedule import EPOCH_LABEL, EPOCH_SECRET_SIZE

DOC = Path(__file__).resolve().parents[2] / "docs" / "key-schedule.md"


# -- an independent implementation, hashlib and hmac only -----------------------------------

def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha384).digest()


def hkdf_expand(prk: bytes, info: bytes, n: int) -> bytes:
    out, block, i = b"", b"", 1
    while len(out) < n:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha384).digest()
        out, i = out + block, i + 1
    return out[:n]


def reference_schedule(psk: bytes, k1: bytes, k2: bytes, t: Transcript) -> dict[str, bytes]:
    h = hashlib.sha384()
    for v in (t.context(), t.ma(), t.mb()):
        h.update(struct.pack(">I", len(v)) + v)
    prk = hkdf_extract(b"qkd-gateway v1 epoch secret", psk + k1 + k2)
    epoch = hkdf_expand(prk, h.digest(), 48)
    out = {"epoch": epoch}
    for name, label, n in (("ESP_I2R", b"qkd-gateway v1 esp i2r", 36),
                           ("ESP_R2I", b"qkd-gateway v1 esp r2i", 36),
                           ("IKE_PPK", b"qkd-gateway v1 ike ppk", 32),
                           ("TLS_PSK", b"qkd-gateway v1 tls psk", 32),
                           ("CONFIRM_I", b"qkd-gateway v1 confirm i", 48),
                           ("CONFIRM_R", b"qkd-gateway v1 confirm r", 48),
                           ("SKIP_ROOT", b"qkd-gateway v1 skip root", 48)):
        out[name] = hkdf_expand(epoch, label, n)
    return out


def a_real_epoch(epoch: int = 1, key_ids: tuple[str, ...] = ("k",)) -> tuple[
        list[bytes], bytes, bytes, Transcript]:
    """One epoch's inputs, from a real ML-KEM-768 and X25519 exchange."""
    kem = MlKem768()
    dk = kem.generate()
    sent = kem.encapsulate(dk.encapsulation_key)
    xi, xr = X25519PrivateKey(), X25519PrivateKey()
    t = Transcript(
        suite="qkd+ML-KEM-768+X25519/CatKDF-SHA-384", link="ab", epoch=epoch,
        initiator=Party("gw-a", b"\x01" * 32, "sae-a", "kme-a"),
        responder=Party("gw-b", b"\x02" * 32, "sae-b", "kme-b"),
        key_ids=key_ids, nonce_i=b"\x03" * 32, nonce_r=b"\x04" * 32, spi_i=0x1001,
        spi_r=0x2002, ek_mlkem=dk.encapsulation_key, pk_x25519_i=xi.public_key,
        ct_mlkem=sent.ciphertext, pk_x25519_r=xr.public_key)
    assert dk.decapsulate(sent.ciphertext) == sent.shared_secret
    assert xi.exchange(xr.public_key) == xr.exchange(xi.public_key)
    qkd = [bytes([i]) * 32 for i in range(len(key_ids))]
    return qkd, sent.shared_secret, xi.exchange(xr.public_key), t


def test_whole_schedule_matches_an_independent_implementation() -> None:
    qkd, k1, k2, t = a_real_epoch()
    keys = derive_epoch(qkd_keys=qkd, mlkem_secret=k1, x25519_secret=k2, transcript=t)
    ref = reference_schedule(b"".join(qkd), k1, k2, t)
    assert keys.epoch_secret == ref["epoch"]
    assert len(keys.epoch_secret) == EPOCH_SECRET_SIZE
    for purpose in Purpose:
        assert keys.key(purpose) == ref[purpose.name], purpose


def test_both_sides_derive_the_same_keys_and_epochs_differ() -> None:
    qkd, k1, k2, t = a_real_epoch()
    a = derive_epoch(qkd_keys=qkd, mlkem_secret=k1, x25519_secret=k2, transcript=t)
    b = derive_epoch(qkd_keys=list(qkd), mlkem_secret=k1, x25519_secret=k2, transcript=t)
    assert a.epoch_secret == b.epoch_secret
    assert a.fingerprint == b.fingerprint
    import dataclasses

    later = dataclasses.replace(t, epoch=2)
    c = derive_epoch(qkd_keys=qkd, mlkem_secret=k1, x25519_secret=k2, transcript=later)
    assert c.epoch_secret != a.epoch_secret


@given(st.sampled_from(["qkd", "mlkem", "x25519"]), st.integers(0, 31))
def test_each_of_the_three_secrets_counts(which: str, byte: int) -> None:
    qkd, k1, k2, t = a_real_epoch()
    base = derive_epoch(qkd_keys=qkd, mlkem_secret=k1, x25519_secret=k2, transcript=t)

    def flip(s: bytes) -> bytes:
        return s[:byte] + bytes([s[byte] ^ 0x80]) + s[byte + 1:]

    if which == "qkd":
        qkd = [flip(qkd[0])]
    elif which == "mlkem":
        k1 = flip(k1)
    else:
        k2 = flip(k2)
    other = derive_epoch(qkd_keys=qkd, mlkem_secret=k1, x25519_secret=k2, transcript=t)
    assert other.epoch_secret != base.epoch_secret


def test_purposes_are_distinct_and_sized() -> None:
    labels = [p.label for p in Purpose]
    assert len(set(labels)) == len(labels)
    assert EPOCH_LABEL not in labels
    assert all(lbl.startswith(b"qkd-gateway v1 ") and b"\0" not in lbl for lbl in labels)
    keys = EpochKeys(1, b"\x07" * 48)
    values = [keys.key(p) for p in Purpose]
    assert len(set(values)) == len(values)
    assert [len(v) for v in values] == [p.length for p in Purpose]
    assert Purpose.ESP_I2R.length == 36  # rfc4106: 32-byte AES-256 key + 4-byte salt


def test_pqc_only_epoch_has_no_qkd_key() -> None:
    qkd, k1, k2, t = a_real_epoch(key_ids=())
    assert qkd == []
    keys = derive_epoch(qkd_keys=[], mlkem_secret=k1, x25519_secret=k2, transcript=t)
    assert keys.epoch_secret == reference_schedule(b"", k1, k2, t)["epoch"]
    with pytest.raises(KdfError, match="1 QKD key\\(s\\) for 0 key ID\\(s\\)"):
        derive_epoch(qkd_keys=[b"q" * 32], mlkem_secret=k1, x25519_secret=k2, transcript=t)


def test_the_documented_label_tree_is_the_code() -> None:
    """docs/key-schedule.md lists every label with its length; so does Purpose."""
    rows = re.findall(r"^\|\s*`([A-Z_0-9]+)`\s*\|\s*`([^`]+)`\s*\|\s*(\d+)\s*\|", DOC.read_text(),
                      re.M)
    assert rows, "no label table found in docs/key-schedule.md"
    assert {(n, lbl.encode(), int(ln)) for n, lbl, ln in rows} == \
        {(p.name, p.label, p.length) for p in Purpose}
    assert f"`{EPOCH_LABEL.decode()}`" in DOC.read_text()


def test_secrets_never_show() -> None:
    qkd, k1, k2, t = a_real_epoch()
    keys = derive_epoch(qkd_keys=qkd, mlkem_secret=k1, x25519_secret=k2, transcript=t)
    shown = repr(keys) + str(keys)
    assert keys.epoch_secret.hex() not in shown
    assert repr(keys.epoch_secret) not in shown
    assert keys.fingerprint in shown
    kem = MlKem768()
    dk = kem.generate()
    sent = kem.encapsulate(dk.encapsulation_key)
    for text in (repr(dk), repr(sent), repr(X25519PrivateKey()), repr(kem)):
        assert sent.shared_secret.hex()[:16] not in text
        assert repr(sent.shared_secret) not in text
    assert repr(dk) == "<ML-KEM-768 private key (cryptography)>"
    assert repr(X25519PrivateKey()) == "<X25519 private key>"

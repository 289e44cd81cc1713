"""Secret inputs never appear in exception messages, reprs or logs of kdf."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from kdf import X25519PrivateKey, catkdf, derive_epoch, kem_by_name
from kdf.schedule import EpochKeys

MARK = bytes.fromhex("5ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2")


def _shows_mark(text: str) -> bool:
    return any(form in text for form in (MARK.hex(), MARK.hex().upper(), repr(MARK)[2:-1],
                                         repr(MARK[:8])[2:-1], MARK[:8].hex()))


FAILING: list[tuple[str, Callable[[], Any]]] = [
    ("catkdf bad length", lambda: catkdf(psk=MARK, secrets=[MARK], context=MARK, ma=MARK,
                                         mb=MARK, label=MARK, length=0)),
    ("catkdf bad hash", lambda: catkdf(psk=MARK, secrets=[MARK], context=b"", ma=b"", mb=b"",
                                       label=b"", length=32, hash="md5")),
    ("catkdf empty secret", lambda: catkdf(psk=MARK, secrets=[MARK, b""], context=b"", ma=b"",
                                           mb=b"", label=b"", length=32)),
    ("kem short key", lambda: kem_by_name("ML-KEM-768").encapsulate(MARK)),
    ("kem malformed key", lambda: kem_by_name("ML-KEM-768").encapsulate(MARK * 37)),
    ("kem short ciphertext", lambda: kem_by_name("ML-KEM-768").generate().decapsulate(MARK)),
    ("kem bad seed", lambda: kem_by_name("ML-KEM-768").from_seed(MARK)),
    ("x25519 long key", lambda: X25519PrivateKey().exchange(MARK + MARK)),
    ("x25519 private bytes", lambda: X25519PrivateKey.from_private_bytes(MARK[:31])),
    ("schedule key count", lambda: derive_epoch(qkd_keys=[MARK], mlkem_secret=MARK,
                                                x25519_secret=MARK, transcript=_transcript())),
]


def _transcript() -> Any:
    from kdf import Party, Transcript

    p = Party("gw", b"\0" * 32, "sae", "kme")
    return Transcript("s", "l", 1, p, p, (), b"", b"", 0, 0, b"", b"", b"", b"")


@pytest.mark.parametrize(("name", "call"), FAILING, ids=[n for n, _ in FAILING])
def test_error_messages_carry_no_secret(name: str, call: Callable[[], Any],
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Exception) as e:  # noqa: PT011  any error: the test reads its message
        call()
    text = f"{e.value}\n{e.value!r}\n{caplog.text}"
    assert not _shows_mark(text), text


def test_reprs_carry_no_secret() -> None:
    keys = EpochKeys(3, MARK + MARK[:16])
    x = X25519PrivateKey.from_private_bytes(MARK)
    kem = kem_by_name("ML-KEM-768")
    dk = kem.from_seed(MARK + MARK)
    sent = kem.encapsulate(dk.encapsulation_key)
    for obj in (keys, x, dk, sent, kem):
        assert not _shows_mark(repr(obj))
        assert not _shows_mark(str(obj))
        assert sent.shared_secret.hex() not in repr(obj)

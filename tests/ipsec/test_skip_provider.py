"""The SKIP Key Provider's state (ipsec/skip/provider.py), two of them as the two gateways of
a link: what the draft's model asks (a key ID handed out once, at the origin and then at the
peer, naming the origin), and what happens around an epoch's end."""

from __future__ import annotations

import pytest

from common.skip import (
    DEFAULT_KEY_BITS,
    Capabilities,
    EntropyResponse,
    GetCapabilities,
    GetEntropy,
    KeyById,
    KeyResponse,
    NewKey,
    SkipError,
)
from ipsec.skip.provider import HELD_EPOCHS, MAX_KEYS_PER_EPOCH, KeyProvider, Provided
from kdf.schedule import EpochKeys, Purpose


def root(epoch: int) -> bytes:
    return EpochKeys(epoch, bytes([epoch]) * 48).key(Purpose.SKIP_ROOT)


def pair(*epochs: int) -> tuple[KeyProvider, KeyProvider]:
    """Site A's and site B's Key Providers, holding EPOCHS of link ab."""
    a, b = KeyProvider("kp-a"), KeyProvider("kp-b")
    a.add_link("kp-b", "ab")
    b.add_link("kp-a", "ab")
    for e in epochs:
        a.install("kp-b", e, root(e))
        b.install("kp-a", e, root(e))
    for kp, peer in ((a, "kp-b"), (b, "kp-a")):
        if epochs:
            kp.activate(peer, max(epochs))
    return a, b


def new_key(kp: KeyProvider, peer: str, bits: int = DEFAULT_KEY_BITS
            ) -> tuple[KeyResponse, Provided]:
    answer, provided = kp.handle(NewKey(peer, bits))
    assert isinstance(answer, KeyResponse)
    assert provided is not None
    return answer, provided


def by_id(kp: KeyProvider, peer: str, key_id: str) -> tuple[KeyResponse, Provided]:
    answer, provided = kp.handle(KeyById(peer, key_id))
    assert isinstance(answer, KeyResponse)
    assert provided is not None
    return answer, provided


def refused(kp: KeyProvider, request: object, status: int, says: str) -> None:
    with pytest.raises(SkipError) as caught:
        kp.handle(request)  # type: ignore[arg-type]
    assert caught.value.status == status
    assert says in caught.value.message


def test_both_sides_hand_out_the_same_key_once() -> None:
    a, b = pair(1)
    first, at_a = new_key(a, "kp-b")
    second, at_b = by_id(b, "kp-a", first.key_id)
    assert second.key == first.key
    assert len(first.key_bytes) * 8 == DEFAULT_KEY_BITS
    assert (at_a.origin, at_b.origin) == (True, False)
    assert at_a.fingerprint == at_b.fingerprint
    assert at_a.key_id == at_b.key_id == first.key_id
    assert first.key not in repr(at_a) + repr(at_b)  # what is logged has no key
    # Once per side: again at B, or at the origin, is the draft's 400.
    refused(b, KeyById("kp-a", first.key_id), 400, "handed out here already")
    refused(a, KeyById("kp-b", first.key_id), 400, "handed out here already")


def test_keys_go_both_ways_and_differ() -> None:
    a, b = pair(1)
    k1, _ = new_key(a, "kp-b")
    k2, _ = new_key(b, "kp-a")
    assert by_id(b, "kp-a", k1.key_id)[0].key == k1.key
    assert by_id(a, "kp-b", k2.key_id)[0].key == k2.key
    assert len({k1.key, k2.key, new_key(a, "kp-b")[0].key}) == 3
    assert len({k1.key_id, k2.key_id}) == 2


def test_the_size_asked_at_the_origin_is_the_size_at_the_peer() -> None:
    a, b = pair(1)
    first, _ = new_key(a, "kp-b", 512)
    second, provided = by_id(b, "kp-a", first.key_id)
    assert len(second.key_bytes) * 8 == 512 == provided.bits
    assert second.key == first.key


def test_a_key_id_naming_the_wrong_origin_gets_another_key() -> None:
    """IDs are bound to the pair: presented as if from another Key Provider, it derives an
    unrelated key (and that Key Provider is not one B shares keys with anyway)."""
    a, b = pair(1)
    b.add_link("kp-c", "cb")
    b.install("kp-c", 1, root(1))
    first, _ = new_key(a, "kp-b")
    other, _ = by_id(b, "kp-c", first.key_id)
    assert other.key != first.key


def test_keys_of_the_previous_epoch_until_it_retires() -> None:
    a, b = pair(1)
    old, _ = new_key(a, "kp-b")
    for kp, peer in ((a, "kp-b"), (b, "kp-a")):
        kp.install(peer, 2, root(2))
    again_1, _ = new_key(a, "kp-b")  # installed, not yet switched to: keys still of 1
    assert again_1.key_id[:16] == f"{1:016x}"
    a.activate("kp-b", 2)
    new, _ = new_key(a, "kp-b")
    assert (old.key_id[:16], new.key_id[:16]) == (f"{1:016x}", f"{2:016x}")  # by epoch
    # B still holds epoch 1: the far router gets the key made just before the rekey.
    assert by_id(b, "kp-a", old.key_id)[0].key == old.key
    again, _ = new_key(a, "kp-b")
    b.retire("kp-a", 1)
    refused(b, KeyById("kp-a", "00" * 7 + "01" + again.key_id[16:]), 400,
            "epoch 1 of link ab is not held here")
    assert by_id(b, "kp-a", new.key_id)[0].key == new.key


def test_a_provider_holds_two_epochs_at_most() -> None:
    a, _ = pair(1, 2, 3, 4)
    assert a.epochs("kp-b") == [4 - HELD_EPOCHS + 1 + i for i in range(HELD_EPOCHS)]


@pytest.mark.parametrize(("request_", "status", "says"), [
    (NewKey("kp-x", 256), 400, "no key is shared with kp-x"),
    (KeyById("kp-x", "00" * 26), 400, "no key is shared with kp-x"),
    (KeyById("kp-b", "00" * 24), 400, "malformed keyId"),
    (KeyById("kp-b", "00" * 8 + "0064" + "00" * 16), 400, "malformed keyId"),
    (KeyById("kp-b", "00" * 7 + "09" + "0100" + "00" * 16), 400, "epoch 9"),
])
def test_requests_it_cannot_answer(request_: object, status: int, says: str) -> None:
    a, _ = pair(1)
    refused(a, request_, status, says)


def test_no_key_before_the_first_epoch() -> None:
    a, _ = pair()
    refused(a, NewKey("kp-b", 256), 500, "no key now")


def test_a_blocked_link_serves_no_key() -> None:
    a, b = pair(1, 2)
    made, _ = new_key(a, "kp-b")
    b.clear("kp-a")
    a.clear("kp-b")
    refused(a, NewKey("kp-b", 256), 500, "no key now")
    refused(b, KeyById("kp-a", made.key_id), 400, "not held here")


def test_the_current_epoch_evicted_leaves_no_key() -> None:
    a, _ = pair(1)
    a.install("kp-b", 2, root(2))
    a.install("kp-b", 3, root(3))  # (never switched to 2: epoch 1 goes, and with it the key)
    refused(a, NewKey("kp-b", 256), 500, "no key now")


def test_keys_per_epoch_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ipsec.skip.provider.MAX_KEYS_PER_EPOCH", 3)
    a, _ = pair(1)
    for _ in range(3):
        new_key(a, "kp-b")
    refused(a, NewKey("kp-b", 256), 500, "keys handed out in epoch 1")
    a.install("kp-b", 2, root(2))
    a.activate("kp-b", 2)
    new_key(a, "kp-b")  # the next epoch starts afresh
    assert MAX_KEYS_PER_EPOCH > 3


def test_capabilities_and_entropy() -> None:
    a, _ = pair(1)
    caps, none = a.handle(GetCapabilities())
    assert none is None
    assert isinstance(caps, Capabilities)
    assert caps.local_system_id == "kp-a"
    assert caps.remote_system_id == ["kp-b"]
    assert caps.reaches("kp-b")
    assert not caps.reaches("kp-c")
    sample, _ = a.handle(GetEntropy(128))
    assert isinstance(sample, EntropyResponse)
    assert len(sample.random_str) * 4 == sample.minentropy == 128

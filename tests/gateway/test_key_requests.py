"""Many links' key requests merged into few (gateway/keyrequests.py), against the real KMS
simulator over mutual TLS: each link gets its own keys, one link's bad key ID fails only
that link, and the KME sees the fewer requests.

    links l0..ln --KeyRequests--> sae-a --mTLS--> KME-A ==(qkd-ab)== KME-B <-- sae-b
"""

from __future__ import annotations

import asyncio
import socket

from gateway.initdemo import DemoLayout
from gateway.keyrequests import MAX_KEYS_PER_REQUEST, KeyRequests
from gateway.pacing import Pacer
from kms import KmeClient, KmsBadRequest, KmsConnectionError, RetryPolicy
from kms.models import QkdKey
from tests.helpers import SimProcess

DEADLINE = 0.0  # (earliest first; all equal here)


def _requests(sim: SimProcess, kme: str, call: str) -> dict[str, int]:
    return {k: v for k, v in sim.requests(kme).items() if k.startswith(call)}


async def test_links_asking_together_share_one_request_and_get_their_own_keys(
        kme_a: KmeClient, kme_b: KmeClient, sim: SimProcess) -> None:
    enc, dec = KeyRequests(kme_a, Pacer(16)), KeyRequests(kme_b, Pacer(16))
    sent = await asyncio.gather(*(enc.enc_keys("sae-b", 1 + i % 2, 256, DEADLINE)
                                  for i in range(10)))
    assert [len(keys) for keys in sent] == [1 + i % 2 for i in range(10)]
    ids = [k.key_id for keys in sent for k in keys]
    assert len(set(ids)) == 15
    assert _requests(sim, "kme-a", "enc_keys") == {"enc_keys 200": 1}

    # The responders name their keys in their own order; each gets exactly those.
    got = await asyncio.gather(*(dec.dec_keys("sae-a", [k.key_id for k in reversed(keys)],
                                              256, DEADLINE) for keys in sent))
    for keys, back in zip(sent, got, strict=True):
        assert [k.key_id for k in back] == [k.key_id for k in reversed(keys)]
        assert [k.material for k in back] == [k.material for k in reversed(keys)]
    assert _requests(sim, "kme-b", "dec_keys") == {"dec_keys 200": 1}


async def test_a_request_carries_at_most_the_limit(kme_a: KmeClient, sim: SimProcess) -> None:
    enc = KeyRequests(kme_a, Pacer(16))
    links = MAX_KEYS_PER_REQUEST + 8
    sent = await asyncio.gather(*(enc.enc_keys("sae-b", 1, 256, DEADLINE)
                                  for _ in range(links)))
    assert len({keys[0].key_id for keys in sent}) == links
    assert _requests(sim, "kme-a", "enc_keys") == {"enc_keys 200": 2}

    # A KME that allows fewer keys per request (its status) gets fewer.
    small = KeyRequests(kme_a, Pacer(16), lambda peer: 4)
    await asyncio.gather(*(small.enc_keys("sae-b", 1, 256, DEADLINE) for _ in range(8)))
    assert _requests(sim, "kme-a", "enc_keys") == {"enc_keys 200": 4}


async def test_one_links_used_key_id_fails_that_link_only(
        kme_a: KmeClient, kme_b: KmeClient, sim: SimProcess) -> None:
    sent = (await kme_a.enc_keys("sae-b", 4, 256)).keys
    await kme_b.dec_keys("sae-a", [sent[0].key_id])  # used: the KME will refuse it again
    dec = KeyRequests(kme_b, Pacer(16))
    results = await asyncio.gather(*(dec.dec_keys("sae-a", [k.key_id], 256, DEADLINE)
                                     for k in sent), return_exceptions=True)
    assert isinstance(results[0], KmsBadRequest)
    for key, got in zip(sent[1:], results[1:], strict=True):
        assert isinstance(got, tuple)
        assert [k.material for k in got] == [key.material]
    # The first use, then the merged request refused, then each link alone.
    assert _requests(sim, "kme-b", "dec_keys") == {"dec_keys 200": 1 + 3, "dec_keys 400": 2}


async def test_two_links_naming_one_key_id_are_not_merged(
        kme_a: KmeClient, kme_b: KmeClient, sim: SimProcess) -> None:
    key = (await kme_a.enc_keys("sae-b", 1, 256)).keys[0]
    dec = KeyRequests(kme_b, Pacer(16))
    results = await asyncio.gather(dec.dec_keys("sae-a", [key.key_id], 256, DEADLINE),
                                   dec.dec_keys("sae-a", [key.key_id], 256, DEADLINE),
                                   return_exceptions=True)
    # Two requests, in flight together: whichever the KME serves first gets the key, the
    # other a 400 (delivered once, as the KME must).
    got = [r for r in results if isinstance(r, tuple)]
    refused = [r for r in results if isinstance(r, KmsBadRequest)]
    assert len(got) == 1, results
    assert len(refused) == 1, results
    assert [k.material for k in got[0]] == [key.material]
    assert _requests(sim, "kme-b", "dec_keys") == {"dec_keys 200": 1, "dec_keys 400": 1}


async def test_an_unreachable_kme_fails_every_link_of_the_request_at_once(
        demo: DemoLayout) -> None:
    client = KmeClient(f"https://127.0.0.1:{_closed_port()}", ca=demo.pki / "ca.pem",
                       cert=demo.pki / "sae-a.pem", key=demo.pki / "sae-a.key",
                       retry=RetryPolicy(attempts=1))
    enc = KeyRequests(client, Pacer(16))
    try:
        results = await asyncio.gather(*(enc.enc_keys("sae-b", 1, 256, DEADLINE)
                                         for _ in range(5)), return_exceptions=True)
    finally:
        await client.close()
    assert all(isinstance(r, KmsConnectionError) for r in results), results
    assert enc.waiting == 0


async def test_a_link_that_stops_waiting_leaves_the_others_their_keys(
        kme_a: KmeClient, sim: SimProcess) -> None:
    enc = KeyRequests(kme_a, Pacer(16))
    waiting = [asyncio.create_task(enc.enc_keys("sae-b", 1, 256, DEADLINE)) for _ in range(4)]
    waiting[1].cancel()
    done = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    keys: list[QkdKey] = [k for r in done if isinstance(r, tuple) for k in r]
    assert len({k.key_id for k in keys}) == 3
    assert enc.waiting == 0


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

"""The ETSI 014 client against the simulator, over real mutual TLS on loopback.

    site A                                  site B
    sae-a --mTLS--> KME-A ==(qkd-ab)== KME-B <--mTLS-- sae-b (and sae-b2, for §5.4)
                      `qkdgw kms-sim` subprocess, admin API on loopback
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.initdemo import DemoLayout
from kms import (
    KmeClient,
    KmsBadRequest,
    KmsConnectionError,
    KmsProtocolError,
    KmsTimeout,
    KmsTlsError,
    KmsUnauthorized,
    KmsUnavailable,
    RetryPolicy,
    Timeouts,
)
from kms.sim.faults import Variant
from tests.conftest import client_as
from tests.helpers import SimProcess

FAST_RETRY = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.02)


# -- the three calls, both forms -------------------------------------------------------------


async def test_status_reports_link_and_pool(kme_a: KmeClient, sim: SimProcess) -> None:
    st = await kme_a.status("sae-b")
    assert (st.source_KME_ID, st.target_KME_ID) == ("kme-a", "kme-b")
    assert (st.master_SAE_ID, st.slave_SAE_ID) == ("sae-a", "sae-b")
    assert st.key_size == 256
    assert st.max_key_per_request == 128
    assert st.stored_key_count == st.max_key_count == 10000
    assert st.max_SAE_ID_count == 0
    ext = st.status_extension
    assert ext == {"link": "qkd-ab", "qber": 0.02, "key_rate": 50000.0, "link_up": True}


@pytest.mark.parametrize("enc_method", ["GET", "POST"])
@pytest.mark.parametrize("dec_method", ["GET", "POST"])
async def test_keys_identical_on_both_sides_and_delivered_once(
    kme_a: KmeClient, kme_b: KmeClient, sim: SimProcess, enc_method: str, dec_method: str
) -> None:
    number = 1 if dec_method == "GET" else 4
    sim.admin("POST", "/admin/links/qkd-ab/outage", {"seconds": 60})  # freeze the pool
    sent = await kme_a.enc_keys("sae-b", number, 512, method=enc_method)  # type: ignore[arg-type]
    assert len(sent.keys) == number
    assert all(k.size_bits == 512 for k in sent.keys)
    got = await kme_b.dec_keys("sae-a", sent.key_ids, size=512,
                               method=dec_method)  # type: ignore[arg-type]
    assert got.key_ids == sent.key_ids
    assert [k.material for k in got.keys] == [k.material for k in sent.keys]
    with pytest.raises(KmsBadRequest, match="not found on KME"):
        await kme_b.dec_keys("sae-a", sent.key_ids[:1])
    assert sim.state()["links"]["qkd-ab"]["stored_key_count"] == 10000 - 2 * number


async def test_enc_keys_default_size_comes_from_status(kme_a: KmeClient, sim: SimProcess) -> None:
    batch = await kme_a.enc_keys("sae-b", method="GET")
    assert [k.size_bits for k in batch.keys] == [256]
    assert sim.requests("kme-a") == {"status 200": 1, "enc_keys 200": 1}


async def test_dec_keys_returns_request_order(kme_a: KmeClient, kme_b: KmeClient,
                                              sim: SimProcess) -> None:
    sent = await kme_a.enc_keys("sae-b", 5, 256)
    wanted = tuple(reversed(sent.key_ids))
    got = await kme_b.dec_keys("sae-a", wanted)
    assert got.key_ids == wanted


async def test_concurrent_requests_never_share_a_key(kme_a: KmeClient, sim: SimProcess) -> None:
    batches = await asyncio.gather(*(kme_a.enc_keys("sae-b", 8, 256) for _ in range(20)))
    ids = [i for b in batches for i in b.key_ids]
    material = [k.material for b in batches for k in b.keys]
    assert len(set(ids)) == len(ids) == 160
    assert len(set(material)) == 160


async def test_pool_empty_is_503_after_retries(kme_a: KmeClient, sim: SimProcess) -> None:
    # The outage first: between the two calls the link would refill (a key each 5 ms).
    sim.admin("POST", "/admin/links/qkd-ab/outage", {"seconds": 60})
    sim.admin("POST", "/admin/links/qkd-ab/pool", {"stored_keys": 0})
    with pytest.raises(KmsUnavailable, match="not enough key material") as e:
        await kme_a.enc_keys("sae-b", 1, 256)
    assert e.value.status == 503
    assert sim.requests("kme-a") == {"enc_keys 503": 3}


async def test_pool_refills_at_key_rate(kme_a: KmeClient, sim: SimProcess) -> None:
    rate = 50_000 / 256  # keys/s: the fixture's 50 kbit/s link, 256-bit keys
    t0 = time.monotonic()
    sim.admin("POST", "/admin/links/qkd-ab/pool", {"stored_keys": 0})
    first = (await kme_a.status("sae-b")).stored_key_count
    assert first <= rate * (time.monotonic() - t0) + 1  # emptied, refilling since t0
    await asyncio.sleep(0.3)
    count = (await kme_a.status("sae-b")).stored_key_count
    assert rate * 0.3 - 1 <= count <= rate * (time.monotonic() - t0) + 1


async def test_outage_and_qber_show_in_status_extension(kme_a: KmeClient,
                                                        sim: SimProcess) -> None:
    sim.admin("POST", "/admin/links/qkd-ab/outage", {"seconds": 30})
    ext = (await kme_a.status("sae-b")).status_extension
    assert ext is not None
    assert ext["link_up"] is False
    assert ext["key_rate"] == 0.0
    sim.admin("DELETE", "/admin/links/qkd-ab/outage")
    sim.admin("POST", "/admin/links/qkd-ab/qber", {"qber": 0.115})
    ext = (await kme_a.status("sae-b")).status_extension
    assert ext is not None
    assert ext["link_up"] is True
    assert ext["qber"] == 0.115
    assert ext["key_rate"] == 0.0  # past the BB84 limit


# -- identities and authorisation ----------------------------------------------------------


@pytest.mark.parametrize("cn", ["sae-b", "gw-a", "sae-c"])
async def test_certificate_of_another_identity_is_401(demo: DemoLayout, sim: SimProcess,
                                                      cn: str) -> None:
    async with client_as(demo, "a", cn) as c:
        with pytest.raises(KmsUnauthorized, match=f"SAE {cn} is not served by KME kme-a"):
            await c.enc_keys("sae-b", 1, 256)
    assert sim.requests("kme-a") == {"enc_keys 401": 1}


async def test_certificate_from_another_ca_fails_the_handshake(demo: DemoLayout,
                                                               sim: SimProcess) -> None:
    """TLS 1.3 lets the client finish its handshake before the KME checks the client
    certificate; the KME's alert is then usually lost to the connection reset."""
    async with client_as(demo, "a", "rogue-sae-a", retry=FAST_RETRY) as c:
        with pytest.raises((KmsTlsError, KmsConnectionError)) as e:
            await c.status("sae-b")
    if isinstance(e.value, KmsConnectionError):
        assert "refuses our client certificate" in str(e.value)
    assert sim.requests("kme-a") == {}


async def test_kme_not_trusted_by_client_fails(demo: DemoLayout, sim: SimProcess) -> None:
    c = KmeClient(f"https://127.0.0.1:{demo.kme_port('a')}", ca=demo.pki / "rogue-ca.pem",
                  cert=demo.pki / "sae-a.pem", key=demo.pki / "sae-a.key")
    async with c:
        with pytest.raises(KmsTlsError, match="not trusted"):
            await c.status("sae-b")


async def test_no_client_certificate_is_401(demo: DemoLayout, sim: SimProcess) -> None:
    import ssl

    import aiohttp

    ctx = ssl.create_default_context(cafile=str(demo.pki / "ca.pem"))
    url = f"https://127.0.0.1:{demo.kme_port('a')}/api/v1/keys/sae-b/status"
    async with aiohttp.ClientSession() as s, s.get(url, ssl=ctx) as r:
        assert r.status == 401
        assert r.content_type == "application/json"
        assert await r.json() == {"message": "a client certificate is required"}


async def test_path_sae_without_link_is_401(kme_a: KmeClient, sim: SimProcess) -> None:
    with pytest.raises(KmsUnauthorized, match="SAE sae-zz has no QKD link with SAE sae-a"):
        await kme_a.status("sae-zz")


async def test_only_the_named_slave_may_fetch_a_key(demo: DemoLayout, kme_a: KmeClient,
                                                    sim: SimProcess) -> None:
    """§5.4: sae-b2 shares KME-B with sae-b, but keys issued for sae-b are not its own."""
    sent = await kme_a.enc_keys("sae-b", 1, 256)
    async with client_as(demo, "b", "sae-b2") as other:
        with pytest.raises(KmsUnauthorized, match="not issued to SAE sae-b2"):
            await other.dec_keys("sae-a", sent.key_ids)
    async with client_as(demo, "b", "sae-b") as slave:  # still there for its owner
        assert (await slave.dec_keys("sae-a", sent.key_ids)).keys == sent.keys


async def test_master_must_match(kme_a: KmeClient, demo: DemoLayout, sim: SimProcess) -> None:
    sent = await kme_a.enc_keys("sae-b2", 1, 256)
    async with client_as(demo, "b", "sae-b2") as c:
        with pytest.raises(KmsUnauthorized, match="sae-zz has no QKD link"):
            await c.dec_keys("sae-zz", sent.key_ids)
        assert (await c.dec_keys("sae-a", sent.key_ids)).key_ids == sent.key_ids


async def test_unknown_key_id_is_400_with_spec_message(kme_b: KmeClient, sim: SimProcess) -> None:
    with pytest.raises(KmsBadRequest) as e:
        await kme_b.dec_keys("sae-a", ["550e8400-e29b-41d4-a716-446655440000"])
    assert e.value.message == "one or more keys specified are not found on KME"
    assert e.value.details == ({"key_ID": "550e8400-e29b-41d4-a716-446655440000"},)


# -- injected faults map to typed errors ---------------------------------------------------


async def test_503_once_is_retried(kme_a: KmeClient, sim: SimProcess) -> None:
    sim.fault(kind="error-503", kme="kme-a", ops=["enc_keys"], count=1)
    batch = await kme_a.enc_keys("sae-b", 2, 256)
    assert len(batch.keys) == 2
    assert sim.requests("kme-a") == {"enc_keys 503": 1, "enc_keys 200": 1}


async def test_503_persisting_raises_unavailable(kme_a: KmeClient, sim: SimProcess) -> None:
    sim.fault(kind="error-503", kme="kme-a")
    with pytest.raises(KmsUnavailable, match="fault injected"):
        await kme_a.status("sae-b")
    assert sim.requests("kme-a") == {"status 503": 3}


async def test_unavailable_kme_is_connection_error_then_recovers(
    demo: DemoLayout, sim: SimProcess
) -> None:
    sim.fault(kind="unavailable", kme="kme-a", seconds=60)
    async with client_as(demo, "a", "sae-a", retry=FAST_RETRY) as c:
        with pytest.raises(KmsConnectionError, match="cannot connect"):
            await c.enc_keys("sae-b", 1, 256)
        sim.admin("DELETE", "/admin/faults")
        assert len((await c.enc_keys("sae-b", 1, 256)).keys) == 1
    assert sim.requests("kme-a") == {"enc_keys 200": 1}


async def test_unavailable_drops_established_connections(
    demo: DemoLayout, sim: SimProcess
) -> None:
    async with client_as(demo, "a", "sae-a", retry=FAST_RETRY) as c:
        await c.status("sae-b")  # a kept-alive connection now exists
        sim.fault(kind="unavailable", kme="kme-a", seconds=60)
        with pytest.raises((KmsConnectionError, KmsTimeout)):
            await c.status("sae-b")


async def test_slow_enc_keys_times_out_and_is_not_retried(demo: DemoLayout,
                                                          sim: SimProcess) -> None:
    """A retry after the request went out could burn more keys: exactly one is sent."""
    sim.fault(kind="slow", kme="kme-a", ops=["enc_keys"], delay=1.0, count=1)
    async with client_as(demo, "a", "sae-a", timeouts=Timeouts(read=0.3),
                         retry=FAST_RETRY) as c:
        with pytest.raises(KmsTimeout) as e:
            await c.enc_keys("sae-b", 1, 256)
    assert e.value.request_sent is True
    await asyncio.sleep(1.0)  # the KME finishes serving the abandoned request
    state = sim.state()
    assert state["kmes"]["kme-a"]["requests"] == {"enc_keys 200": 1}
    assert state["links"]["qkd-ab"]["pending_keys"] == 1  # orphaned, ages out at the KME


async def test_dec_keys_503_once_is_retried(kme_a: KmeClient, kme_b: KmeClient,
                                            sim: SimProcess) -> None:
    sent = await kme_a.enc_keys("sae-b", 2, 256)
    sim.fault(kind="error-503", kme="kme-b", ops=["dec_keys"], count=1)
    got = await kme_b.dec_keys("sae-a", sent.key_ids)
    assert got.keys == sent.keys
    assert sim.requests("kme-b") == {"dec_keys 503": 1, "dec_keys 200": 1}


async def test_dec_keys_answer_lost_is_explained(demo: DemoLayout, kme_a: KmeClient,
                                                 sim: SimProcess) -> None:
    """The slow first attempt delivers the keys into a closed connection; the retry is told
    they are gone, and the error says why that may be."""
    sent = await kme_a.enc_keys("sae-b", 1, 256)
    sim.fault(kind="slow", kme="kme-b", ops=["dec_keys"], delay=0.3, count=1)
    async with client_as(demo, "b", "sae-b", timeouts=Timeouts(read=0.1),
                         retry=RetryPolicy(attempts=2, backoff=1.0, max_backoff=1.0)) as c:
        with pytest.raises(KmsBadRequest, match="may have delivered these keys"):
            await c.dec_keys("sae-a", sent.key_ids)


@pytest.mark.parametrize("variant", [v for v in Variant if v is not Variant.WRONG_IDS])
async def test_malformed_enc_keys_never_yields_a_key(kme_a: KmeClient, sim: SimProcess,
                                                     variant: Variant) -> None:
    sim.fault(kind="malformed", kme="kme-a", ops=["enc_keys"], variant=variant.value)
    for number in (1, 2):
        with pytest.raises(KmsProtocolError) as e:
            await kme_a.enc_keys("sae-b", number, 256)
        assert "KME https://127.0.0.1" in str(e.value)


@pytest.mark.parametrize("variant", list(Variant))
async def test_malformed_dec_keys_never_yields_a_key(kme_a: KmeClient, kme_b: KmeClient,
                                                     sim: SimProcess, variant: Variant) -> None:
    sent = await kme_a.enc_keys("sae-b", 2, 256)
    sim.fault(kind="malformed", kme="kme-b", ops=["dec_keys"], variant=variant.value)
    with pytest.raises(KmsProtocolError):
        await kme_b.dec_keys("sae-a", sent.key_ids, size=256)


@pytest.mark.parametrize("variant", [Variant.NOT_JSON, Variant.HTML, Variant.MISSING_FIELD,
                                     Variant.WRONG_TYPE, Variant.OVERSIZED])
async def test_malformed_status_is_protocol_error(kme_a: KmeClient, sim: SimProcess,
                                                  variant: Variant) -> None:
    sim.fault(kind="malformed", kme="kme-a", ops=["status"], variant=variant.value)
    with pytest.raises(KmsProtocolError):
        await kme_a.status("sae-b")


async def test_error_messages_never_carry_key_material(kme_a: KmeClient,
                                                       sim: SimProcess) -> None:
    """A container rejected for a short key is reported by key ID, never by its bytes."""
    sim.fault(kind="malformed", kme="kme-a", ops=["enc_keys"], variant="short-key")
    with pytest.raises(KmsProtocolError) as e:
        await kme_a.enc_keys("sae-b", 1, 256)
    text = str(e.value) + repr(e.value)
    assert "248 bits, 256 requested" in text
    assert "key=" not in text
    assert "input" not in text


async def test_connection_refused(demo: DemoLayout, sim: SimProcess) -> None:
    from tests.helpers import free_base_port

    c = KmeClient(f"https://127.0.0.1:{free_base_port(1)}", ca=demo.pki / "ca.pem",
                  cert=demo.pki / "sae-a.pem", key=demo.pki / "sae-a.key", retry=FAST_RETRY)
    async with c:
        with pytest.raises(KmsConnectionError, match="cannot connect"):
            await c.status("sae-b")


async def test_client_rejects_bad_arguments_before_sending(kme_a: KmeClient,
                                                           sim: SimProcess) -> None:
    for call, message in (
            (kme_a.enc_keys("sae-b", 0), "number must be at least 1"),
            (kme_a.enc_keys("sae-b", 1, 12), "size is in bits: a positive multiple of 8"),
            (kme_a.dec_keys("sae-a", ["not-a-uuid"]), "bad key IDs: .* must be a UUID"),
            (kme_a.dec_keys("sae-a", ["550e8400-e29b-41d4-a716-446655440000"] * 2),
             "bad key IDs: .* repeats a key_ID"),
            (kme_a.dec_keys("sae-a", ["550e8400-e29b-41d4-a716-446655440000",
                                      "0a782fb5-3434-48fe-aa4d-14f41d46cf92"], method="GET"),
             "the GET form of dec_keys carries one key_ID")):
        with pytest.raises(ValueError, match=message):
            await call
    assert sim.requests("kme-a") == {}

"""The ETSI 014 client against hostile KMEs: real HTTPS servers with mutual TLS on loopback
that redirect, trickle, lie about lengths, and send numbers and text meant to break the
gateway. Every call must end in time with a validated answer or a KmsError."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from common.tlsctx import server_context
from gateway.initdemo import DemoLayout
from kms import (
    KmeClient,
    KmsError,
    KmsHttpError,
    KmsProtocolError,
    KmsTimeout,
    RetryPolicy,
    Timeouts,
)
from tests.kms.hostile import Answer, HostileKme

#: Liveness bound for one call in these tests (attempts of at most 2 s, at most 2 of them):
#: generous, this is no timing test.
LIVENESS = 20.0
FAST = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.02)

STATUS = {
    "source_KME_ID": "kme-a", "target_KME_ID": "kme-b", "master_SAE_ID": "sae-a",
    "slave_SAE_ID": "sae-b", "key_size": 256, "stored_key_count": 25000,
    "max_key_count": 100000, "max_key_per_request": 128, "max_key_size": 1024,
    "min_key_size": 64, "max_SAE_ID_count": 0,
    "status_extension": {"link": "qkd-ab", "qber": 0.02, "key_rate": 50000.0, "link_up": True},
}


def keys_json(number: int = 1, size: int = 256) -> bytes:
    return json.dumps({"keys": [
        {"key_ID": str(uuid.uuid4()), "key": base64.b64encode(os.urandom(size // 8)).decode()}
        for _ in range(number)]}).encode()


def status_with(raw_value: str, *path: str) -> bytes:
    """STATUS as JSON with the member at PATH replaced by RAW_VALUE, written as is (NaN,
    1e999 and 400-digit integers are not what json.dumps writes)."""
    doc: dict[str, Any] = json.loads(json.dumps(STATUS))
    target = doc
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = "@@RAW@@"
    return json.dumps(doc).replace('"@@RAW@@"', raw_value).encode()


@pytest.fixture
async def kme(demo: DemoLayout) -> AsyncIterator[HostileKme]:
    k = HostileKme(server_context(demo.pki / "ca.pem", demo.pki / "kme-a.pem",
                                  demo.pki / "kme-a.key"))
    await k.start()
    yield k
    await k.stop()


@pytest.fixture
async def plain() -> AsyncIterator[HostileKme]:
    """An unauthenticated HTTP server that would hand out keys to anyone."""
    k = HostileKme(None, respond=lambda r: Answer(
        200, json.dumps(STATUS).encode() if r.target.endswith("/status") else keys_json()))
    await k.start()
    yield k
    await k.stop()


def client(demo: DemoLayout, kme: HostileKme, **kw: Any) -> KmeClient:
    kw.setdefault("retry", FAST)
    return KmeClient(kme.url, ca=demo.pki / "ca.pem", cert=demo.pki / "sae-a.pem",
                     key=demo.pki / "sae-a.key", **kw)


async def call(c: KmeClient, op: str) -> object:
    """OP against C; a call still running after LIVENESS fails the test."""
    if op == "status":
        return await asyncio.wait_for(c.status("sae-b"), LIVENESS)
    if op == "enc_keys":
        return await asyncio.wait_for(c.enc_keys("sae-b", 1, 256), LIVENESS)
    return await asyncio.wait_for(c.dec_keys("sae-a", [str(uuid.UUID(int=1))], size=256),
                                  LIVENESS)


def printable(e: BaseException) -> bool:
    return str(e).isprintable()


# -- redirects -------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("op", ["status", "enc_keys", "dec_keys"])
async def test_a_redirect_is_refused_never_followed(demo: DemoLayout, kme: HostileKme,
                                                    plain: HostileKme, code: int,
                                                    op: str) -> None:
    """Found: a 302/307/308 to plain HTTP made enc_keys take keys from an unauthenticated
    server (and re-POST the request there)."""
    kme.respond = lambda r: Answer(code, headers=(("Location", plain.url + r.target),))
    async with client(demo, kme) as c:
        with pytest.raises(KmsProtocolError) as e:
            await call(c, op)
    assert f"HTTP {code}: the KME redirected to {plain.url}/api/v1/keys/" in str(e.value)
    assert "refused" in str(e.value)
    assert plain.requests == []
    assert len(kme.requests) == 1  # a redirect is not retried either


async def test_the_redirect_target_is_quoted_escaped(demo: DemoLayout, kme: HostileKme) -> None:
    kme.respond = lambda r: Answer(302, headers=(("Location", "http://x/a\tb\u202ec"),))
    async with client(demo, kme) as c:
        with pytest.raises(KmsProtocolError) as e:
            await call(c, "status")
    assert "redirected to http://x/a\\tb\\u202ec" in str(e.value)
    assert printable(e.value)


# -- deadlines -------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["status", "enc_keys", "dec_keys"])
async def test_a_trickling_kme_cannot_hold_a_call(demo: DemoLayout, kme: HostileKme,
                                                  op: str) -> None:
    """Found: a KME sending one byte every 0.5 s held a call for 20 s with a 1 s timeout.
    Here each byte comes well within the read timeout; the whole answer would take ~50 s."""
    body = json.dumps(STATUS).encode() if op == "status" else keys_json()
    kme.respond = lambda r: Answer(200, body + b" " * 200, trickle=0.05)
    timeouts = Timeouts(connect=1.0, read=1.0, total=1.5)
    async with client(demo, kme, timeouts=timeouts) as c:
        with pytest.raises(KmsTimeout) as e:
            await call(c, op)
    assert "within 1.5 s" in str(e.value)
    assert c.max_call_seconds == 2 * 1.5 + 0.02
    assert e.value.request_sent is True
    # status and dec_keys are retried after a timeout, enc_keys is not (it may reserve keys)
    assert len(kme.requests) == (1 if op == "enc_keys" else 2)


async def test_a_kme_trickling_its_headers_cannot_hold_a_call(demo: DemoLayout,
                                                              kme: HostileKme) -> None:
    kme.respond = lambda r: Answer(200, json.dumps(STATUS).encode(),
                                   headers=(("X-Pad", "a" * 4000),), trickle=0.02)
    async with client(demo, kme, timeouts=Timeouts(1.0, 1.0, 1.0),
                      retry=RetryPolicy(attempts=1)) as c:
        with pytest.raises(KmsTimeout):
            await call(c, "status")


def test_timeouts_are_checked() -> None:
    assert Timeouts().total >= Timeouts().connect
    for bad, message in (
            ({"total": 0}, "total must be a positive finite number"),
            ({"read": float("nan")}, "read must be a positive finite number"),
            ({"connect": float("inf")}, "connect must be a positive finite number"),
            ({"connect": 5.0, "total": 4.0}, "total must be at least connect and read"),
            ({"read": 20.0, "total": 15.0}, "total must be at least connect and read")):
        with pytest.raises(ValueError, match=message):
            Timeouts(**bad)
    for bad_retry, message in (
            ({"attempts": 0}, "attempts must be from 1 to 10"),
            ({"attempts": 11}, "attempts must be from 1 to 10"),
            ({"backoff": -1.0}, "backoff must be a finite number of seconds, 0 or more"),
            ({"max_backoff": float("inf")}, "max_backoff must be a finite number of seconds")):
        with pytest.raises(ValueError, match=message):
            RetryPolicy(**bad_retry)


# -- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "raw"), [
    (("stored_key_count",), "1" + "0" * 400),
    (("max_key_count",), "1" + "0" * 400),
    (("stored_key_count",), str(2**32)),
    (("key_size",), str(2**40)),
    (("status_extension", "key_rate"), "1" + "0" * 400),
    (("status_extension", "key_rate"), "1e999"),
    (("status_extension", "key_rate"), "NaN"),
    (("status_extension", "key_rate"), "-1"),
    (("status_extension", "qber"), "NaN"),
    (("status_extension", "qber"), "Infinity"),
    (("status_extension", "qber"), "-Infinity"),
    (("status_extension", "qber"), "1.5"),
    (("status_extension", "qber"), '"0.02"'),
    (("status_extension", "qber"), "true"),
    (("status_extension", "qber"), "null"),
    (("status_extension", "link_up"), "1"),
    (("status_extension", "link_up"), '"yes"'),
])
async def test_status_numbers_out_of_bounds_are_protocol_errors(
    demo: DemoLayout, kme: HostileKme, path: tuple[str, ...], raw: str
) -> None:
    """Found: key_rate or stored_key_count of 10**400 raised OverflowError in the gateway's
    status poll; key_rate NaN spun the link loop; qber NaN passed the QBER gate."""
    kme.respond = lambda r: Answer(200, status_with(raw, *path))
    async with client(demo, kme) as c:
        with pytest.raises(KmsProtocolError) as e:
            await call(c, "status")
    assert path[-1] in str(e.value)
    assert printable(e.value)


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e999", "1" + "0" * 400,
                                 "9" * 5000, "[" * 5000 + "]" * 5000])
async def test_no_extension_or_unknown_member_may_hold_them(demo: DemoLayout, kme: HostileKme,
                                                            raw: str) -> None:
    for path in (("status_extension", "vendor"), ("vendor_member",)):
        kme.respond = lambda r, p=path: Answer(200, status_with(raw, *p))  # type: ignore[misc]
        async with client(demo, kme) as c:
            with pytest.raises(KmsProtocolError) as e:
                await call(c, "status")
        assert printable(e.value)


async def test_keys_answer_with_nan_in_an_extension_is_refused(demo: DemoLayout,
                                                               kme: HostileKme) -> None:
    body = keys_json()[:-1] + b', "key_container_extension": {"age": NaN}}'
    kme.respond = lambda r: Answer(200, body)
    async with client(demo, kme) as c:
        with pytest.raises(KmsProtocolError, match="key_container_extension"):
            await call(c, "enc_keys")


async def test_status_reading_of_the_link(demo: DemoLayout, kme: HostileKme) -> None:
    kme.respond = lambda r: Answer(200, json.dumps(STATUS).encode())
    async with client(demo, kme) as c:
        st = await c.status("sae-b")
    assert (st.qber, st.key_rate, st.link_up) == (0.02, 50000.0, True)


# -- text ------------------------------------------------------------------------------------


async def test_error_messages_are_escaped(demo: DemoLayout, kme: HostileKme) -> None:
    message = "keys gone\n2026-12-01 CRITICAL gateway: forged\x1b[2J"
    kme.respond = lambda r: Answer(400, json.dumps({"message": message}).encode())
    async with client(demo, kme) as c:
        with pytest.raises(KmsHttpError) as e:
            await call(c, "enc_keys")
    assert "keys gone\\n2026-12-01 CRITICAL gateway: forged\\x1b[2J" in str(e.value)
    assert printable(e.value)


async def test_unknown_member_names_are_logged_escaped_and_short(
    demo: DemoLayout, kme: HostileKme, caplog: pytest.LogCaptureFixture
) -> None:
    names = ["evil\nCRITICAL forged line", "x" * 10_000] + [f"m{i}" for i in range(500)]
    body = {**STATUS, **dict.fromkeys(names, 1)}
    kme.respond = lambda r: Answer(200, json.dumps(body).encode())
    with caplog.at_level(logging.WARNING, logger="kms.client"):
        async with client(demo, kme) as c:
            await c.status("sae-b")
            await c.status("sae-b")
    lines = [r.getMessage() for r in caplog.records]
    assert any("evil\\nCRITICAL forged line" in line for line in lines)
    assert all(line.isprintable() and len(line) < 500 for line in lines)
    assert len(lines) < 100  # a KME cannot flood the log with names


async def test_a_non_etsi_status_names_the_status(demo: DemoLayout, kme: HostileKme) -> None:
    for status, body in ((404, b'{"message": "no"}'), (500, b"<html>"), (204, b""),
                         (418, b'{"message": "teapot"}')):
        kme.respond = lambda r, s=status, b=body: Answer(s, b)  # type: ignore[misc]
        async with client(demo, kme) as c:
            with pytest.raises(KmsError, match=f"HTTP {status}"):
                await call(c, "enc_keys")


# -- framing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [
    Answer(200, keys_json(), content_length=10_000, close=True),  # body shorter than declared
    Answer(200, keys_json(), content_length=20),  # longer than declared: a truncated answer
    Answer(200, keys_json(), truncate=60),  # connection dropped inside the head
    Answer(200, keys_json(), truncate=150),  # ... inside the body
    Answer(200, keys_json(), headers=(("Content-Length", "12, 13"),)),
    Answer(200, keys_json(), headers=(("Transfer-Encoding", "chunked"),), content_length=None),
    Answer(200, b"\xff\xfe{}"),
    Answer(999, b"{}"),
])
@pytest.mark.parametrize("op", ["enc_keys", "dec_keys"])
async def test_lying_framing_is_a_kms_error(demo: DemoLayout, kme: HostileKme, answer: Answer,
                                            op: str) -> None:
    kme.respond = lambda r: answer
    async with client(demo, kme, timeouts=Timeouts(1.0, 1.0, 2.0)) as c:
        with pytest.raises(KmsError) as e:
            await call(c, op)
    assert printable(e.value)


async def test_an_unparsable_answer_is_never_quoted(demo: DemoLayout, kme: HostileKme) -> None:
    """Found by the hypothesis KME: with `Content-Length: 0` the keys were read as the next
    status line, and aiohttp's error, quoting them, reached our KmsError."""
    body = keys_json()
    kme.respond = lambda r: Answer(200, body, content_length=0)
    async with client(demo, kme) as c:
        with pytest.raises(KmsError) as e:
            await call(c, "enc_keys")
    key = json.loads(body)["keys"][0]["key"]
    assert key[:12] not in str(e.value)
    assert "Bad status line" in str(e.value)

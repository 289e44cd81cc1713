"""The simulator's answers to raw requests, as GS QKD 014 v1.1.1 specifies them.

Raw aiohttp with sae-a's certificate, so the requests are exactly what is written here
(our client refuses to send most of them).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.initdemo import DemoLayout
from tests.helpers import SimProcess

UNKNOWN_ID = "550e8400-e29b-41d4-a716-446655440000"


class Raw:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base

    async def call(self, method: str, path: str, *, params: Any = None, json: Any = None,
                   data: bytes | None = None) -> tuple[int, str, Any]:
        async with self.session.request(method, self.base + path, params=params, json=json,
                                        data=data) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, r.content_type, body


def _ctx(demo: DemoLayout, cn: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(demo.pki / "ca.pem"))
    ctx.load_cert_chain(str(demo.pki / f"{cn}.pem"), str(demo.pki / f"{cn}.key"))
    return ctx


@pytest.fixture
async def sae_a(demo: DemoLayout, sim: SimProcess) -> AsyncIterator[Raw]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_ctx(demo, "sae-a"))) as s:
        yield Raw(s, f"https://127.0.0.1:{demo.kme_port('a')}/api/v1/keys/")


@pytest.fixture
async def sae_b(demo: DemoLayout, sim: SimProcess) -> AsyncIterator[Raw]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_ctx(demo, "sae-b"))) as s:
        yield Raw(s, f"https://127.0.0.1:{demo.kme_port('b')}/api/v1/keys/")


@pytest.mark.parametrize(("body", "message"), [
    ({"size": 0}, "size: Input should be greater than 0"),
    ({"size": 12}, "multiple of 8"),
    ({"size": 8200}, "size 8200 is outside [64, 8192] bits"),
    ({"size": 32}, "size 32 is outside [64, 8192] bits"),
    ({"number": 0}, "number: Input should be greater than 0"),
    ({"number": 129}, "number 129 exceeds max_key_per_request (128)"),
    ({"number": "1"}, "number: Input should be a valid integer"),
    ({"key_length": 256}, "unknown member(s) in key request: key_length"),
    ({"additional_slave_SAE_IDs": ["sae-b2"]}, "key multicast is not supported"),
    ({"extension_mandatory": [{"abc_route_type": "direct"}]},
     "mandatory extension(s) not supported: abc_route_type"),
])
async def test_enc_keys_post_bad_parameters_are_400(sae_a: Raw, body: dict[str, Any],
                                                    message: str) -> None:
    status, ctype, err = await sae_a.call("POST", "sae-b/enc_keys", json=body)
    assert (status, ctype) == (400, "application/json")
    assert message in err["message"]


@pytest.mark.parametrize(("params", "message"), [
    ({"number": "0"}, "number must be a positive integer"),
    ({"size": "-8"}, "size must be a positive integer"),
    ({"size": "12"}, "multiple of 8"),
    ({"key_length": "256"}, "unknown query parameter(s): key_length"),
])
async def test_enc_keys_get_bad_parameters_are_400(sae_a: Raw, params: dict[str, str],
                                                   message: str) -> None:
    status, _, err = await sae_a.call("GET", "sae-b/enc_keys", params=params)
    assert status == 400
    assert message in err["message"]


async def test_enc_keys_empty_body_means_defaults(sae_a: Raw) -> None:
    status, _, body = await sae_a.call("POST", "sae-b/enc_keys", data=b"")
    assert status == 200
    assert len(body["keys"]) == 1
    status, _, body = await sae_a.call("GET", "sae-b/enc_keys")
    assert status == 200
    assert len(body["keys"]) == 1


async def test_optional_extensions_are_ignored(sae_a: Raw) -> None:
    status, _, body = await sae_a.call(
        "POST", "sae-b/enc_keys", json={"number": 2, "extension_optional": [{"abc_max_age": 1}]})
    assert status == 200
    assert len(body["keys"]) == 2


async def test_body_not_json_is_400(sae_a: Raw) -> None:
    status, _, err = await sae_a.call("POST", "sae-b/enc_keys", data=b"{number: 1")
    assert status == 400
    assert err == {"message": "request body is not JSON"}


@pytest.mark.parametrize(("method", "kwargs"), [
    ("POST", {"json": {"key_IDs": [{"key_ID": UNKNOWN_ID}]}}),
    ("GET", {"params": {"key_ID": UNKNOWN_ID}}),
])
async def test_unknown_key_id_is_400_in_both_forms(sae_b: Raw, method: str,
                                                   kwargs: dict[str, Any]) -> None:
    status, _, err = await sae_b.call(method, "sae-a/dec_keys", **kwargs)
    assert status == 400
    assert err == {"message": "one or more keys specified are not found on KME",
                   "details": [{"key_ID": UNKNOWN_ID}]}


async def test_dec_keys_is_atomic(sae_a: Raw, sae_b: Raw) -> None:
    """One unknown ID in a batch: nothing is handed over, the known key stays available."""
    _, _, body = await sae_a.call("POST", "sae-b/enc_keys", json={"number": 1})
    good = body["keys"][0]["key_ID"]
    ids = {"key_IDs": [{"key_ID": good}, {"key_ID": UNKNOWN_ID}]}
    status, _, _ = await sae_b.call("POST", "sae-a/dec_keys", json=ids)
    assert status == 400
    status, _, got = await sae_b.call("GET", "sae-a/dec_keys", params={"key_ID": good})
    assert status == 200
    assert got == body


@pytest.mark.parametrize(("body", "message"), [
    ({"key_IDs": []}, "key_IDs: List should have at least 1 item"),
    ({"key_IDs": [{"key_ID": "12"}]}, "UUID"),
    ({"key_IDs": [{"key_ID": UNKNOWN_ID}], "key_ID": UNKNOWN_ID}, "unknown member(s)"),
])
async def test_dec_keys_bad_bodies_are_400(sae_b: Raw, body: dict[str, Any], message: str) -> None:
    status, _, err = await sae_b.call("POST", "sae-a/dec_keys", json=body)
    assert status == 400
    assert message in err["message"]


async def test_dec_keys_get_needs_key_id(sae_b: Raw) -> None:
    status, _, err = await sae_b.call("GET", "sae-a/dec_keys")
    assert status == 400
    assert err["message"] == "key_ID query parameter is required"


async def test_unknown_endpoint_is_json_error(sae_a: Raw) -> None:
    status, ctype, err = await sae_a.call("GET", "sae-b/keys")
    assert (status, ctype) == (404, "application/json")
    assert "no ETSI GS QKD 014 endpoint" in err["message"]


async def test_wrong_sae_in_path_of_dec_keys_is_401(sae_a: Raw, sae_b: Raw) -> None:
    """The enc_keys path names the slave, dec_keys the master (Table 2, §5.4)."""
    _, _, body = await sae_a.call("POST", "sae-b/enc_keys", json={"number": 1})
    key_id = body["keys"][0]["key_ID"]
    status, _, err = await sae_b.call("GET", "sae-b/dec_keys", params={"key_ID": key_id})
    assert status == 401
    assert "SAE sae-b has no QKD link with SAE sae-b" in err["message"]

"""The simulator attacked: oversized, deeply nested, non-ASCII and endless input is a 400
with an ETSI 014 Error naming the problem (never 503, never a traceback in its log), and a
client that never finishes its request is disconnected.

Its own simulator process, with a 1 s request timeout so the slow clients end quickly.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.initdemo import DemoLayout
from tests.helpers import SimProcess, free_base_port, start_sim

REQUEST_TIMEOUT = 1.0
#: How long a slow client may stay connected before the test fails: the timeout plus a
#: generous margin (a liveness check, not a timing test).
LIVENESS = REQUEST_TIMEOUT + 10.0


@pytest.fixture(scope="module")
def guarded(demo: DemoLayout) -> Iterator[tuple[SimProcess, int]]:
    """A simulator with a 1 s request timeout; yields it and KME-A's port."""
    config = yaml.safe_load((demo.root / "kms-test.yaml").read_text())
    base = free_base_port(3)
    config["admin"]["listen"] = f"127.0.0.1:{base}"
    for i, kme in enumerate(config["kmes"]):
        kme["listen"] = f"127.0.0.1:{base + 1 + i}"
    config["request_timeout"] = REQUEST_TIMEOUT
    path = demo.root / "kms-guarded.yaml"
    path.write_text(yaml.safe_dump(config))
    sim = start_sim(path, base, [base + 1, base + 2], demo.root / "kms-guarded.log")
    yield sim, base + 1
    code = sim.stop()
    log = sim.log.read_text()
    assert code == 0, log
    assert "Traceback" not in log, log
    assert "internal error" not in log, log


def _ctx(demo: DemoLayout) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(demo.pki / "ca.pem"))
    ctx.load_cert_chain(str(demo.pki / "sae-a.pem"), str(demo.pki / "sae-a.key"))
    return ctx


@pytest.fixture
async def http(demo: DemoLayout, guarded: tuple[SimProcess, int]
               ) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    _, port = guarded
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_ctx(demo))) as s:
        yield s, f"https://127.0.0.1:{port}/api/v1/keys/sae-b/"


async def _answer(http: tuple[aiohttp.ClientSession, str], method: str, path: str,
                  **kw: Any) -> tuple[int, Any]:
    session, base = http
    async with session.request(method, base + path, **kw) as r:
        assert r.content_type == "application/json", await r.text()
        return r.status, await r.json()


def _nested(depth: int) -> bytes:
    return b'{"number": 1, "extension_optional": [' + b'{"a": ' * depth + b"1" + \
        b"}" * depth + b"]}"


@pytest.mark.parametrize(("body", "message"), [
    (b'{"number": 1, "pad": "' + b"x" * 70_000 + b'"}', "exceeds the 65536-byte limit"),
    (_nested(5000), "request body is nested too deeply"),
    (_nested(60), "deeper than 32"),
    (b'{"number": NaN}', "request body is not JSON"),
    (b'{"number": 1, "extension_optional": [{"x": Infinity}]}', "request body is not JSON"),
    (b'{"number": 1, "extension_optional": [{"x": 1e999}]}', "finite"),
    (b'{"number": ' + b"1" * 5000 + b"}", "request body holds a number out of range"),
    (b'{"number": 1' + b"0" * 400 + b"}", "number: Input should be less than or equal to"),
    (b'{"size": 1' + b"0" * 400 + b"}", "size: Input should be less than or equal to"),
    (b'{"number": 1}\xff', "request body is not JSON"),
    (b"\xef\xbb\xbf[]", "request body is not JSON"),
])
async def test_hostile_bodies_are_400_naming_the_problem(
    http: tuple[aiohttp.ClientSession, str], body: bytes, message: str
) -> None:
    """Found: over 64 KiB, deep nesting and thousands of digits were 503 'internal error'
    with a traceback in the simulator's log."""
    status, err = await _answer(http, "POST", "enc_keys", data=body,
                                headers={"Content-Type": "application/json"})
    assert status == 400, err
    assert message in err["message"], err


@pytest.mark.parametrize(("query", "message"), [
    ("size=١٢٨", "size must be a positive integer in ASCII digits"),
    ("number=٣", "number must be a positive integer in ASCII digits"),
    ("size=" + "1" * 5000, "size must be a positive integer"),
    ("number=" + "9" * 30, "number must be a positive integer"),
    ("size=+256", "size must be a positive integer"),
    ("size=2%00", "size must be a positive integer"),
    ("number=4294967296", "number must be a positive integer"),
])
async def test_hostile_query_numbers_are_400(http: tuple[aiohttp.ClientSession, str],
                                             query: str, message: str) -> None:
    """Found: `size=١٢٨` was read as 128; 5000 digits were a 503 with a traceback."""
    session, base = http
    async with session.get(base + "enc_keys?" + query) as r:
        assert r.status == 400
        assert message in (await r.json())["message"]


async def test_a_request_line_too_long_for_http_is_400_json(
    http: tuple[aiohttp.ClientSession, str], guarded: tuple[SimProcess, int]
) -> None:
    """Refused by the HTTP parser before any handler runs: still an Error body, still no
    traceback."""
    status, err = await _answer(http, "GET", "enc_keys?size=" + "1" * 20_000)
    assert status == 400
    assert "malformed HTTP request" in err["message"]
    assert "Traceback" not in guarded[0].log.read_text()


def _tls(demo: DemoLayout, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=LIVENESS)
    return _ctx(demo).wrap_socket(raw, server_hostname="127.0.0.1")


def _read_to_close(s: ssl.SSLSocket) -> bytes:
    """Everything the server sends until it closes; a socket timeout (LIVENESS) fails."""
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data


def test_a_half_sent_request_head_is_closed(demo: DemoLayout,
                                            guarded: tuple[SimProcess, int]) -> None:
    """Found: the simulator kept half-sent requests open for ever (no header timeout)."""
    with _tls(demo, guarded[1]) as s:
        s.sendall(b"GET /api/v1/keys/sae-b/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert _read_to_close(s) == b""


def test_a_client_that_never_starts_tls_is_closed(guarded: tuple[SimProcess, int]) -> None:
    """asyncio's own TLS handshake timeout is 60 s; the simulator's is request_timeout."""
    with socket.create_connection(("127.0.0.1", guarded[1]), timeout=LIVENESS) as s:
        s.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        assert s.recv(4096) == b""


def test_a_half_sent_body_is_answered_400_and_closed(demo: DemoLayout,
                                                     guarded: tuple[SimProcess, int]) -> None:
    with _tls(demo, guarded[1]) as s:
        s.sendall(b"POST /api/v1/keys/sae-b/enc_keys HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"num")
        answer = _read_to_close(s)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b'{"message": "request body not complete within 1.0 s"}' in answer


def test_a_slow_loris_is_closed(demo: DemoLayout, guarded: tuple[SimProcess, int]) -> None:
    """One byte of header every 0.1 s: each is well within any read timeout, the request
    never completes."""
    request = b"GET /api/v1/keys/sae-b/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + \
        b"a" * 1000
    start = time.monotonic()
    with _tls(demo, guarded[1]) as s:
        s.settimeout(0.1)
        for i in range(len(request)):
            try:
                s.sendall(request[i:i + 1])
                if s.recv(1) == b"":
                    break
            except TimeoutError:
                continue
            except (ssl.SSLError, OSError):
                break
        else:
            raise AssertionError("the whole slow request went through")
    assert time.monotonic() - start < LIVENESS


def test_the_simulator_still_serves_after_all_that(demo: DemoLayout,
                                                   guarded: tuple[SimProcess, int]) -> None:
    with _tls(demo, guarded[1]) as s:
        s.sendall(b"GET /api/v1/keys/sae-b/status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Connection: close\r\n\r\n")
        assert _read_to_close(s).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(("path", "body"), [
    ("/admin/links/qkd-ab/outage", b'{"seconds": Infinity}'),
    ("/admin/links/qkd-ab/outage", b'{"seconds": 1e999}'),
    ("/admin/links/qkd-ab/outage", b'{"seconds": NaN}'),
    ("/admin/links/qkd-ab/qber", b'{"qber": NaN}'),
    ("/admin/links/qkd-ab/pool", b'{"stored_keys": 1' + b"0" * 400 + b"}"),
    ("/admin/links/qkd-ab/pool", b'{"stored_keys": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
])
def test_admin_numbers_are_bounded(guarded: tuple[SimProcess, int], path: str,
                                   body: bytes) -> None:
    """The admin API is loopback-only, but a NaN QBER or an infinite outage must not reach
    the link model either."""
    sim, _ = guarded
    request = urllib.request.Request(f"http://127.0.0.1:{sim.admin_port}{path}", data=body,
                                     method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=LIVENESS)  # noqa: S310 (http://127.0.0.1)
    assert e.value.code == 400
    assert "message" in json.loads(e.value.read())

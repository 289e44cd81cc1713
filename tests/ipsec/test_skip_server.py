"""The SKIP server (common/skip_server.py) on its TLS-PSK transport (common/psktls.py),
answering for the gateway's Key Provider (ipsec/skip/provider.py), two of them as the two
gateways of a link:

    openssl s_client (TLS 1.2) ─┐                          ┌─ SkipClient (TLS 1.3)
    SkipClient (TLS 1.2, 1.3) ──┴─▶ SkipServer kp-a       SkipServer kp-b ◀─┘
                                    (link ab, epoch 1) ══ (link ab, epoch 1)

Clients: the project's own (common/skip_client.py), and OpenSSL's `s_client`, written by
others. Hostile input on every endpoint gets the draft's status code and leaves the server
answering; a client without the PSK gets no TLS session at all.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

from common.config import ConfigError
from common.psktls import ClientContext, PskStream, PskTable, ServerContext
from common.skip import Request
from common.skip_client import SkipClient, SkipClientError
from common.skip_server import MAX_REQUEST_HEAD, Answer, SkipServer
from ipsec.skip.provider import KeyProvider, Provided
from kdf.schedule import EpochKeys, Purpose

PSK = bytes(range(32))
T = TypeVar("T")


@dataclass
class Pair:
    servers: dict[str, SkipServer]
    provided: list[tuple[Provided, str]] = field(default_factory=list)

    def client(self, site: str, version: str | None = None, *, identity: str = "router-a",
               key: bytes = PSK) -> SkipClient:
        return SkipClient("127.0.0.1", self.servers[site].port,
                          ClientContext(identity, key, version))  # type: ignore[arg-type]


def answering(kp: KeyProvider, provided: list[tuple[Provided, str]]) -> Answer:
    def answer(request: Request, who: str) -> dict[str, Any]:
        body, key = kp.handle(request)
        if key is not None:
            provided.append((key, who))
        return body.body()
    return answer


def serve(body: Callable[[Pair], Awaitable[T]]) -> T:
    """Run BODY against kp-a and kp-b, both holding epoch 1 of link ab."""
    async def go() -> T:
        table = PskTable({b"router-a": PSK, b"router-b": PSK[::-1]})
        root = EpochKeys(1, bytes(48)).key(Purpose.SKIP_ROOT)
        pair = Pair({})
        for me, peer in (("a", "b"), ("b", "a")):
            kp = KeyProvider(f"kp-{me}")
            kp.add_link(f"kp-{peer}", "ab")
            kp.install(f"kp-{peer}", 1, root)
            kp.activate(f"kp-{peer}", 1)
            server = SkipServer(ServerContext(table), answering(kp, pair.provided))
            await server.start("127.0.0.1", 0)
            pair.servers[me] = server
        try:
            return await body(pair)
        finally:
            for server in pair.servers.values():
                await server.stop()
    return asyncio.run(go())


# -- the PSK file -----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "problem"), [
    ("router-a 00112233445566778899aabbccddeeff", "expected IDENTITY:HEXKEY"),
    ("router-a:xyz", "is not hex"),
    ("router-a:0011", "has 2 bytes"),
    (f"r:{PSK.hex()}\nr:{PSK.hex()}", "given twice"),
    ("# nobody\n", "no IDENTITY:HEXKEY line"),
])
def test_a_bad_psk_file_is_refused_naming_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        PskTable.parse(text, "psk")


def test_the_psk_file_must_be_0600(tmp_path: Path) -> None:
    path = tmp_path / "skip.psk"
    path.write_text(f"# encryptors\nrouter-a:{PSK.hex()}\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        PskTable.load(path)
    path.chmod(0o600)
    assert PskTable.load(path).keys == {b"router-a": PSK}


# -- TLS-PSK ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "cipher"), [("1.2", "DHE-PSK-AES256-CBC-SHA384"),
                                                 ("1.3", "TLS_AES_256_GCM_SHA384")])
def test_both_tls_versions_with_the_drafts_suites(version: str, cipher: str) -> None:
    async def body(pair: Pair) -> None:
        client = pair.client("a", version)
        reader, writer = await asyncio.open_connection("127.0.0.1", pair.servers["a"].port)
        stream = PskStream(client.tls.context, reader, writer, server=False)
        await stream.handshake()
        assert (stream.version, stream.cipher) == (f"TLSv{version}", cipher)
        await stream.close()
        status, caps = await client.capabilities()
        assert status == 200
        assert caps["localSystemID"] == "kp-a"
        assert caps["remoteSystemID"] == ["kp-b"]
    serve(body)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize(("identity", "key"), [("router-a", PSK[::-1]),
                                               ("router-x", PSK)])
def test_a_wrong_psk_or_unknown_identity_gets_no_session(version: str, identity: str,
                                                         key: bytes) -> None:
    async def body(pair: Pair) -> str:
        with pytest.raises(SkipClientError) as e:
            await pair.client("a", version, identity=identity, key=key).capabilities()
        return str(e.value)
    assert "capabilities" in serve(body)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_without_a_psk_does_not_fall_back_to_a_certificate(
        version: ssl.TLSVersion) -> None:
    """A client with no PSK (Python's ssl, accepting any certificate) is refused: the Key
    Provider has no certificate to authenticate with instead."""
    async def body(pair: Pair) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = version
        with pytest.raises(ssl.SSLError):
            await asyncio.open_connection("127.0.0.1", pair.servers["a"].port, ssl=ctx)
        assert (await pair.client("a").capabilities())[0] == 200  # still serving
    serve(body)


@pytest.fixture
def s_client() -> str:
    path = shutil.which("openssl")
    if path is None:
        pytest.skip("openssl (the CLI) is not installed")
    return path


def _s_client(openssl: str, port: int, cipher: str, key: bytes, request: bytes) -> str:
    run = subprocess.run(
        [openssl, "s_client", "-quiet", "-connect", f"127.0.0.1:{port}",
         "-tls1_2", "-cipher", cipher, "-psk_identity", "router-a", "-psk", key.hex()],
        input=request, capture_output=True, timeout=20, check=False)
    return run.stdout.decode(errors="replace")


@pytest.mark.parametrize("cipher", ["DHE-PSK-AES256-CBC-SHA384", "DHE-PSK-AES256-CBC-SHA"])
def test_openssl_s_client_gets_a_key_over_tls12(s_client: str, cipher: str) -> None:
    async def body(pair: Pair) -> tuple[str, str]:
        request = (b"GET /key?remoteSystemID=kp-b&size=256 HTTP/1.1\r\nHost: kp\r\n"
                   b"Connection: close\r\n\r\n")
        good = await asyncio.to_thread(_s_client, s_client, pair.servers["a"].port, cipher,
                                       PSK, request)
        bad = await asyncio.to_thread(_s_client, s_client, pair.servers["a"].port, cipher,
                                      PSK[::-1], request)
        return good, bad
    good, bad = serve(body)
    head, _, payload = good.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), good
    answer = json.loads(payload)
    assert len(answer["key"]) == 64
    assert set(answer) == {"keyId", "key"}
    assert "HTTP/1.1" not in bad


def _psk_session_pem(key: bytes) -> bytes:
    """KEY as OpenSSL's `s_client -psk_session` takes a TLS 1.3 external PSK with SHA-384:
    a PEM SSL session of TLS_AES_256_GCM_SHA384 holding KEY (s_client's own `-psk` binds
    SHA-256, which the draft's suite cannot use)."""
    ffi, lib = Binding.ffi, Binding.lib
    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    session = lib.Cryptography_SSL_SESSION_new()
    try:
        assert lib.SSL_SESSION_set1_master_key(session, key, len(key)) == 1
        assert lib.SSL_SESSION_set_cipher(session, lib.SSL_CIPHER_find(conn._ssl,
                                                                       b"\x13\x02")) == 1
        assert lib.SSL_SESSION_set_protocol_version(session, lib.TLS1_3_VERSION) == 1
        size = lib.i2d_SSL_SESSION(session, ffi.NULL)
        buf = ffi.new("unsigned char[]", size)
        lib.i2d_SSL_SESSION(session, ffi.new("unsigned char **", buf))
        der = bytes(ffi.buffer(buf, size))
    finally:
        lib.SSL_SESSION_free(session)
    return (b"-----BEGIN SSL SESSION PARAMETERS-----\n" + base64.encodebytes(der)
            + b"-----END SSL SESSION PARAMETERS-----\n")


def test_openssl_s_client_gets_capabilities_over_tls13_with_a_sha384_psk(
        s_client: str, tmp_path: Path) -> None:
    """OpenSSL's own client (the system's build, not the one in cryptography's wheel) with
    the draft's TLS 1.3 suite; and with a wrong key, nothing."""
    def ask(port: int, key: bytes) -> str:
        session = tmp_path / "psk.pem"
        session.write_bytes(_psk_session_pem(key))
        run = subprocess.run(
            [s_client, "s_client", "-quiet", "-connect", f"127.0.0.1:{port}", "-tls1_3",
             "-ciphersuites", "TLS_AES_256_GCM_SHA384", "-psk_identity", "router-a",
             "-psk_session", str(session)],
            input=b"GET /capabilities HTTP/1.1\r\nHost: kp\r\nConnection: close\r\n\r\n",
            capture_output=True, timeout=20, check=False)
        return run.stdout.decode(errors="replace")

    async def body(pair: Pair) -> tuple[str, str]:
        port = pair.servers["a"].port
        return (await asyncio.to_thread(ask, port, PSK),
                await asyncio.to_thread(ask, port, PSK[::-1]))
    good, bad = serve(body)
    assert good.startswith("HTTP/1.1 200 OK\r\n"), good
    assert json.loads(good.partition("\r\n\r\n")[2])["localSystemID"] == "kp-a"
    assert "HTTP/1.1" not in bad


# -- the draft's model, over the wire ----------------------------------------------------------


def test_a_key_fetched_at_the_origin_is_fetched_once_at_the_peer(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def body(pair: Pair) -> list[tuple[int, dict[str, Any]]]:
        a, b = pair.client("a", "1.2"), pair.client("b", "1.3", identity="router-b",
                                                     key=PSK[::-1])
        status, new = await a.new_key("kp-b", 512)
        assert status == 200
        return [(status, new), await b.key_by_id("kp-a", new["keyId"]),
                await b.key_by_id("kp-a", new["keyId"]), await a.key_by_id("kp-b",
                                                                          new["keyId"])]
    (_, new), (s1, same), (s2, again), (s3, origin) = serve(body)
    assert (s1, same) == (200, new)
    assert len(bytes.fromhex(new["key"])) == 64
    assert (s2, s3) == (400, 400)
    assert "handed out here already" in again["error"]
    assert "key not found" in origin["error"]
    assert new["key"] not in caplog.text


@pytest.mark.parametrize(("method", "target", "status"), [
    ("POST", "/key?remoteSystemID=kp-b", 405),
    ("DELETE", "/capabilities", 405),
    ("GET", "/keys", 404),
    ("GET", "/key", 400),
    ("GET", "/key?remoteSystemID=kp-z", 400),
    ("GET", "/key?remoteSystemID=kp-b&size=7", 400),
    ("GET", "/key?remoteSystemID=kp-b&size=99999999", 400),
    ("GET", "/key?remoteSystemID=kp-b&size=-8", 400),
    ("GET", "/key?remoteSystemID=kp-b&remoteSystemID=kp-a", 400),
    ("GET", "/key?remoteSystemID=kp-b&color=red", 400),
    ("GET", "/key/zz?remoteSystemID=kp-b", 400),
    ("GET", "/key/" + "ab" * 200 + "?remoteSystemID=kp-b", 400),
    ("GET", "/key/" + "00" * 26 + "?remoteSystemID=kp-b", 400),
    ("GET", "/key/%00?remoteSystemID=kp-b", 400),
    ("GET", "/entropy?minentropy=abc", 400),
    ("GET", "/key?" + "&".join(f"p{i}=1" for i in range(50)), 400),
])
def test_hostile_requests_get_the_drafts_status(method: str, target: str, status: int) -> None:
    async def body(pair: Pair) -> tuple[int, dict[str, Any], int]:
        client = pair.client("a")
        got, answer = await client.get(target.split("?")[0], None, method=method) \
            if "?" not in target else await _raw(client, method, target)
        return got, answer, (await client.capabilities())[0]
    got, answer, after = serve(body)
    assert (got, after) == (status, 200), answer
    assert answer.get("error"), answer
    assert "key" not in answer


async def _raw(client: SkipClient, method: str, target: str) -> tuple[int, dict[str, Any]]:
    return await client._exchange(method, target)


def test_an_oversized_head_or_garbage_leaves_the_server_answering() -> None:
    async def body(pair: Pair) -> None:
        port = pair.servers["a"].port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(os.urandom(4096))  # not TLS
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) is not None
        writer.close()
        client = pair.client("a")
        got, answer = await _raw(client, "GET", "/capabilities?x=" + "a" * MAX_REQUEST_HEAD)
        assert got in (400, 431), answer
        assert (await client.capabilities())[0] == 200
    serve(body)

"""The SKIP key source (kms/skip.py) against the simulator's Key Providers over TLS-PSK, and
against a Key Provider that answers what it should not: every call ends in keys checked as
asked for, or a KmsError that names the problem and holds no key."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from common.psktls import ClientContext, PskTable, ServerContext
from common.skip import GetCapabilities, Request
from common.skip_server import SkipServer
from gateway.initdemo import DemoLayout, init_demo
from gateway.site import SiteConfig
from kms.client import RetryPolicy, Timeouts
from kms.config import SkipSourceConfig
from kms.errors import (
    KmsBadRequest,
    KmsConnectionError,
    KmsError,
    KmsProtocolError,
    KmsUnauthorized,
    KmsUnavailable,
)
from kms.skip import SkipKeySource
from tests.helpers import SimProcess, free_base_port, start_sim

T = TypeVar("T")
PSK = bytes(range(32))


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[DemoLayout]:
    d = init_demo(tmp_path, base_port=free_base_port(), kms_protocol="skip")
    sim: SimProcess = start_sim(d.kms_config, d.admin_port,
                                [d.kme_port("a"), d.kme_port("b"), d.kp_port("a"),
                                 d.kp_port("b")], tmp_path / "sim.log")
    try:
        yield d
    finally:
        sim.stop()


def source(d: DemoLayout, site: str) -> SkipKeySource:
    kms = SiteConfig.load(d.site_config(site)).kms
    assert isinstance(kms, SkipSourceConfig)
    return kms.client()


def test_keys_from_the_simulators_key_providers(layout: DemoLayout) -> None:
    a, b = source(layout, "a"), source(layout, "b")

    async def go() -> None:
        st = await a.source_status("kme-b")
        assert (st.kme_id, st.peer_kme_id, st.stored_key_count) == ("kme-a", "kme-b", None)
        made = await a.enc_keys("kme-b", 3, 512)
        assert [len(k.material) for k in made.keys] == [64] * 3
        got = await b.dec_keys("kme-a", made.key_ids, size=512)
        assert [k.material for k in got.keys] == [k.material for k in made.keys]
        with pytest.raises(KmsBadRequest, match="key not found"):
            await b.dec_keys("kme-a", made.key_ids[:1])  # once only
        with pytest.raises(KmsBadRequest, match="key not found"):
            await a.dec_keys("kme-b", (await a.enc_keys("kme-b")).key_ids)  # not at origin
        with pytest.raises(KmsUnauthorized, match="shares no keys with kme-z"):
            await a.source_status("kme-z")
    asyncio.run(go())


def test_a_wrong_psk_or_identity_gets_no_keys(layout: DemoLayout) -> None:
    kms = SiteConfig.load(layout.site_config("a")).kms
    assert isinstance(kms, SkipSourceConfig)
    host, port = kms.address
    for tls in (ClientContext("sae-a", bytes(32)), ClientContext("sae-z", kms.psk())):
        s = SkipKeySource(host, port, tls, "kme-a", timeouts=Timeouts(1, 1, 2),
                          retry=RetryPolicy(attempts=1))
        with pytest.raises(KmsConnectionError):
            asyncio.run(s.source_status("kme-b"))


def hostile(answer: Callable[[Request, str], dict[str, Any]],
            body: Callable[[SkipKeySource], Awaitable[T]]) -> T:
    async def go() -> T:
        server = SkipServer(ServerContext(PskTable({b"gw": PSK})), answer)
        await server.start("127.0.0.1", 0)
        try:
            s = SkipKeySource("127.0.0.1", server.port, ClientContext("gw", PSK), "kp-a",
                              timeouts=Timeouts(1, 1, 2), retry=RetryPolicy(attempts=1))
            return await body(s)
        finally:
            await server.stop()
    return asyncio.run(go())


SECRET = "ab" * 32


@pytest.mark.parametrize(("answer", "error", "says"), [
    ({"keyId": "00" * 16, "key": "ab" * 16}, KmsProtocolError, "128 bits, not the 256"),
    ({"keyId": "zz", "key": SECRET}, KmsProtocolError, "malformed key answer"),
    ({"keyId": "00" * 16}, KmsProtocolError, "malformed key answer"),
    ({"keyId": "00" * 16, "key": base64.b64encode(bytes(32)).decode()}, KmsProtocolError,
     "malformed key answer"),
])
def test_a_key_provider_answering_wrongly_is_refused(answer: dict[str, Any],
                                                     error: type[KmsError], says: str) -> None:
    with pytest.raises(error, match=says) as e:
        hostile(lambda r, who: answer, lambda s: s.enc_keys("kp-b"))
    assert SECRET not in str(e.value)


def test_the_key_of_another_id_is_refused() -> None:
    with pytest.raises(KmsProtocolError, match="another ID"):
        hostile(lambda r, who: {"keyId": "11" * 16, "key": SECRET},
                lambda s: s.dec_keys("kp-b", ["22" * 16]))


@pytest.mark.parametrize(("capabilities", "error", "says"), [
    ({"entropy": True, "key": True, "algorithm": "x", "localSystemID": "kp-x",
      "remoteSystemID": ["kp-b"]}, KmsProtocolError, "is kp-x, not kp-a"),
    ({"entropy": True, "key": False, "algorithm": "x", "localSystemID": "kp-a",
      "remoteSystemID": ["kp-b"]}, KmsUnavailable, "serves no keys"),
    ({"key": True}, KmsProtocolError, "malformed capabilities"),
])
def test_capabilities_that_cannot_serve_the_link(capabilities: dict[str, Any],
                                                 error: type[KmsError], says: str) -> None:
    with pytest.raises(error, match=says):
        hostile(lambda r, who: capabilities, lambda s: s.source_status("kp-b"))


def test_the_doctor_finds_a_key_provider_that_answers_everything() -> None:
    """A Key Provider that hands a key to any request: every refusal probe fails, the doctor
    ends, and no key is shown."""
    from kms.skipdoctor import SkipDoctor, SkipSide

    def anything(request: Request, who: str) -> dict[str, Any]:
        if isinstance(request, GetCapabilities):
            return {"entropy": False, "key": True, "algorithm": "x", "localSystemID": "kp-a",
                    "remoteSystemID": ["kp-b"]}
        return {"keyId": "00" * 16, "key": SECRET}

    async def go() -> list[Any]:
        server = SkipServer(ServerContext(PskTable({b"gw": PSK})), anything)
        await server.start("127.0.0.1", 0)
        try:
            side = SkipSide("127.0.0.1", server.port, ClientContext("gw", PSK), "kp-a")
            return await SkipDoctor(side, "kp-b", side).run()
        finally:
            await server.stop()
    findings = asyncio.run(go())
    verdicts = {f.probe: f.verdict for f in findings}
    assert verdicts["unknown key ID refused"] == "FAIL"
    assert verdicts["key IDs single-use"] == "FAIL"
    assert verdicts["new key 512 bits"] == "FAIL"
    assert SECRET not in " ".join(f.line() for f in findings)

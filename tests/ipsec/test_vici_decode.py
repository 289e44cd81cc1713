"""VICI answers that do not decode (truncated, malformed, absurdly nested) are typed errors,
never struct.error or a RecursionError, and reach the strongSwan sink's caller as SinkError.

charon is trusted; these stand for a bug, a version skew or a wedged socket, which must end
in an alarm rather than a dead task."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vici.protocol import Message, Packet

from common.config import HostPort
from common.sink import EpochMaterial, ProvidedKey, RekeyCause, Role, SinkContext, SinkError
from ipsec.strongswan.sink import StrongswanSinkConfig
from ipsec.strongswan.vici import (
    MAX_MESSAGE,
    Vici,
    ViciConnectionError,
    ViciError,
    ViciProtocolError,
)
from kdf.schedule import EpochKeys
from tests.helpers import lifetimes
from tests.ipsec import strongswan_world as sw


class _Writer:
    """Where a Vici session writes its requests: nowhere."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass


def frame(packet: bytes) -> bytes:
    return struct.pack("!I", len(packet)) + packet


def response(message: bytes) -> bytes:
    return frame(bytes([Packet.CMD_RESPONSE]) + message)


def session(answer: bytes) -> Vici:
    """A session whose charon answers with ANSWER (raw bytes, framing included) and then
    hangs up."""
    reader = asyncio.StreamReader()
    reader.feed_data(answer)
    reader.feed_eof()
    return Vici(Path("/fake/charon.vici"), reader, _Writer())  # type: ignore[arg-type]


async def ask(answer: bytes, streamed: bool = False) -> Any:
    v = session(answer)
    if streamed:
        v._registered.add("list-sa")  # as if registered earlier in the session
        return await v.streamed("list-sas", "list-sa")
    return await v.request("version")


ITEMS = {"success": "yes", "version": "5.9.14",
         "sa": {"uniqueid": "1", "child-sas": {"c": {"state": "INSTALLED"}}}, "keys": ["a", "b"]}
ANSWER = Message.serialize(ITEMS)
#: Where a shorter answer ends: a cut there leaves a well-formed message with fewer items.
BOUNDARIES = {len(Message.serialize(dict(list(ITEMS.items())[:n]))) for n in range(len(ITEMS))}


def test_a_well_formed_answer_decodes() -> None:
    answer = asyncio.run(ask(response(ANSWER)))
    assert answer["sa"]["child-sas"]["c"]["state"] == "INSTALLED"
    assert answer["keys"] == ["a", "b"]


@pytest.mark.parametrize("cut", sorted(set(range(len(ANSWER))) - BOUNDARIES))
def test_every_truncation_within_an_item_is_a_protocol_error(cut: int) -> None:
    with pytest.raises(ViciProtocolError, match="malformed VICI message from charon"):
        asyncio.run(ask(response(ANSWER[:cut])))


@pytest.mark.parametrize(("answer", "problem"), [
    (frame(b""), "empty VICI packet"),
    (frame(bytes([Packet.EVENT])), "event packet from charon without its name"),
    (struct.pack("!I", 1 << 30), "announced a VICI message of 1073741824 bytes"),
    (response(b"\x01\x01s" * 50_000 + b"\x03\x01k\x00\x01v" + b"\x02" * 50_000),
     "nested deeper than 32 sections"),
    (response(b"\x02"), "Unexpected end of section"),
    (response(b"\x03\x02\xff\xfe\x00\x00"), "invalid start byte"),
])
def test_malformed_answers_are_protocol_errors(answer: bytes, problem: str) -> None:
    with pytest.raises(ViciProtocolError, match=problem):
        asyncio.run(ask(answer))


def test_after_an_oversized_frame_the_session_is_closed_for_good() -> None:
    """The rest of the stream cannot be read in step: the next request says the session is
    gone (the sink then reconnects) instead of reading the middle of a message."""
    async def go() -> None:
        v = session(struct.pack("!I", MAX_MESSAGE + 1) + response(ANSWER))
        with pytest.raises(ViciProtocolError, match="session closed"):
            await v.request("version")
        with pytest.raises(ViciConnectionError, match="closed after an error"):
            await v.request("version")

    asyncio.run(go())


@given(st.binary(max_size=300), st.booleans())
def test_random_answers_decode_or_are_vici_errors(payload: bytes, streamed: bool) -> None:
    """Anything charon could send: a response, an event stream, garbage; the session ends
    with a dict, a list of events or a ViciError, nothing else."""
    event = frame(bytes([Packet.EVENT, 7]) + b"list-sa" + payload)
    for answer in (frame(payload), response(payload), event + response(b""),
                   event[:len(event) // 2]):
        with contextlib.suppress(ViciError):
            asyncio.run(ask(answer, streamed))


# -- through the sink ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fake_charon(path: Path, answer: Callable[[str], bytes]) -> AsyncIterator[None]:
    """A VICI socket answering each command with ANSWER(command) (framing included)."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (length,) = struct.unpack("!I", await reader.readexactly(4))
                packet = await reader.readexactly(length)
                command = packet[2:2 + packet[1]].decode()
                if packet[0] == Packet.EVENT_REGISTER:
                    writer.write(frame(bytes([Packet.EVENT_CONFIRM])))
                else:
                    writer.write(answer(command))
                await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(serve, str(path))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


def material(epoch: int) -> EpochMaterial:
    return EpochMaterial("ab", epoch, Role.INITIATOR, "qkd+ML-KEM-768+X25519/CatKDF-SHA-384",
                         ("k",), epoch, epoch, EpochKeys(epoch, os.urandom(48)))


class Events:
    def rekey_needed(self, link: str, cause: RekeyCause, detail: str) -> None:
        pass

    def key_provided(self, link: str, key: ProvidedKey) -> None:
        raise AssertionError("this sink hands out no key")


def sink_for(path: Path) -> Any:
    config = StrongswanSinkConfig.model_validate(
        {"type": "strongswan", "vici": str(path), "connection": sw.connection("a"),
         "hold": None})
    return config.build(SinkContext("ab", lifetimes(), Events(), HostPort("192.0.2.1", 9443),
                                    HostPort("198.51.100.1", 9443)))


VERSION = response(Message.serialize({"version": "5.9.14"}))


@pytest.mark.parametrize("bad", [
    response(b"\x03\x07success\x00"),  # a value cut short
    frame(b""),
    response(Message.serialize({"version": {"major": "5"}})),  # version not text
])
async def test_a_malformed_answer_is_a_sink_error(tmp_path: Path, bad: bytes) -> None:
    path = tmp_path / "charon.vici"
    version = bad if b"major" in bad else VERSION
    ok = response(Message.serialize({"success": "yes"}))

    def answer(command: str) -> bytes:
        return version if command == "version" else bad if command == "load-shared" else ok

    async with fake_charon(path, answer):
        sink = sink_for(path)
        if version is bad:
            with pytest.raises(SinkError, match=r"strongSwan: .*VICI"):
                await sink.start()  # charon is asked its version here
        else:
            await sink.start()
            with pytest.raises(SinkError, match=r"strongSwan: .*VICI"):
                await sink.install_inbound(material(1))
        await sink.close()


@pytest.mark.parametrize("sa", [
    {"state": "ESTABLISHED"},  # no uniqueid
    {"uniqueid": "1", "state": "ESTABLISHED", "child-sas": "none"},
])
async def test_an_ike_sa_without_its_fields_is_a_sink_error(tmp_path: Path,
                                                           sa: dict[str, Any]) -> None:
    path = tmp_path / "charon.vici"
    ok = response(Message.serialize({"success": "yes"}))
    event = frame(bytes([Packet.EVENT, 7]) + b"list-sa" + Message.serialize({"qkdgw-ab": sa}))

    def answer(command: str) -> bytes:
        return VERSION if command == "version" else event + ok if command == "list-sas" else ok

    async with fake_charon(path, answer):
        sink = sink_for(path)
        with pytest.raises(SinkError, match="list-sas: an IKE SA of qkdgw-ab"):
            await sink.start()
        await sink.close()

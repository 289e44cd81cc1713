"""A VICI session over an asyncio Unix socket.

The codec is strongSwan's own (`vici.protocol` from PyPI `vici`: pure, no I/O); this module is
only the transport, so the sink never blocks the event loop on charon, and the strict edge of
the decoder: an answer cut short or nested past reason is a ViciProtocolError (the codec
would take a truncated value as it is). One request at a
time per session, as the protocol requires; streamed commands (list-sas) collect their
events until the response. The `list-sa` event stays registered for the session's life:
registering per call would cost two more round trips on every poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vici.exception import DeserializationException
from vici.protocol import FiniteStream, Message, Packet

#: A VICI request that takes longer is a dead or wedged charon. `initiate` passes its own.
REQUEST_TIMEOUT = 10.0
#: charon refuses bigger messages (vici's own limit, 512 KiB segments).
MAX_MESSAGE = 512 * 1024
#: Sections in one answer: list-sas, the deepest, nests four (IKE SA, child-sas, CHILD SA).
MAX_NESTING = 32

Section = dict[str, Any]


class ViciError(Exception):
    """charon answered, but said no (its errmsg), or the answer made no sense."""


class ViciConnectionError(ViciError):
    """No charon at the socket, or it went away: a restart is likely."""


class ViciProtocolError(ViciError):
    """An answer that does not decode as VICI: truncated, malformed, nested past reason."""


class _Strict(FiniteStream):  # type: ignore[misc]  # vici is untyped
    """A stream that refuses to read short: the codec reads a value's announced length."""

    def read(self, size: int | None = -1) -> bytes:
        data: bytes = super().read(size)
        if size is not None and 0 <= size != len(data):
            raise DeserializationException(f"cut short at byte {self.tell()}: {size} bytes"
                                           f" announced, {len(data)} there")
        return data


def _text(value: Any, depth: int = 0) -> Any:
    """charon's answers are bytes; everything the sink reads is text."""
    if depth > MAX_NESTING:
        raise ViciProtocolError(f"VICI message from charon nested deeper than {MAX_NESTING}"
                                " sections")
    if isinstance(value, Mapping):
        return {k: _text(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_text(v, depth + 1) for v in value]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _decode(payload: FiniteStream) -> Section:
    stream = _Strict(payload.getvalue())
    stream.seek(payload.tell())
    try:
        return _text(Message.deserialize(stream))  # type: ignore[no-any-return]
    except (DeserializationException, UnicodeDecodeError) as e:
        raise ViciProtocolError(f"malformed VICI message from charon: {e}") from None


class Vici:
    def __init__(self, path: Path, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.path = path
        self._reader, self._writer = reader, writer
        self._lock = asyncio.Lock()
        self._registered: set[str] = set()

    @classmethod
    async def connect(cls, path: Path) -> Vici:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(path)), REQUEST_TIMEOUT)
        except (OSError, TimeoutError) as e:
            raise ViciConnectionError(f"no charon at {path}: {e.strerror or e}") from None
        return cls(path, reader, writer)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    # -- framing ---------------------------------------------------------------------------

    async def _send(self, packet: bytes) -> None:
        if len(packet) > MAX_MESSAGE:
            raise ViciError(f"VICI message of {len(packet)} bytes exceeds {MAX_MESSAGE}")
        self._writer.write(struct.pack("!I", len(packet)) + packet)
        await self._writer.drain()

    async def _receive(self) -> Any:
        header = await self._reader.readexactly(4)
        (length,) = struct.unpack("!I", header)
        if length > MAX_MESSAGE:
            self._writer.close()  # the rest of the stream cannot be read in step
            raise ViciProtocolError(f"charon announced a VICI message of {length} bytes (at"
                                    f" most {MAX_MESSAGE}): session closed")
        if length == 0:
            raise ViciProtocolError("empty VICI packet from charon")
        try:
            return Packet.parse(await self._reader.readexactly(length))
        except struct.error:
            raise ViciProtocolError("VICI event packet from charon without its name") from None

    async def _exchange(self, packet: bytes, stream: str | None,
                        timeout: float) -> tuple[int, Section, list[Section]]:
        """Send PACKET; the answer's type, its message and the STREAM events before it."""
        events: list[Section] = []
        async with self._lock:
            if self._writer.is_closing():
                raise ViciConnectionError(f"session with charon at {self.path} closed after"
                                          " an error")
            try:
                async with asyncio.timeout(timeout):
                    await self._send(packet)
                    while True:
                        reply = await self._receive()
                        if reply.response_type == Packet.EVENT:
                            if stream is not None and reply.event_type == stream.encode():
                                events.append(_decode(reply.payload))
                            continue
                        return reply.response_type, _decode(reply.payload), events
            except (OSError, asyncio.IncompleteReadError) as e:
                raise ViciConnectionError(f"charon at {self.path} went away: {e}") from None
            except TimeoutError:
                # The answer may still come: this session cannot tell it from the next one.
                self._writer.close()
                raise ViciConnectionError(f"charon at {self.path} did not answer in"
                                          f" {timeout:g} s") from None

    # -- requests --------------------------------------------------------------------------

    async def request(self, command: str, message: Mapping[str, Any] | None = None, *,
                      timeout: float = REQUEST_TIMEOUT) -> Section:
        """Run COMMAND; charon's `success = no` becomes a ViciError with its errmsg."""
        body = None if message is None else Message.serialize(message)
        kind, answer, _ = await self._exchange(Packet.request(command, body), None, timeout)
        return self._check(command, kind, answer)

    async def streamed(self, command: str, event: str,
                       message: Mapping[str, Any] | None = None) -> list[Section]:
        """Run a command that answers with EVENT messages (e.g. list-sas → list-sa)."""
        if event not in self._registered:
            kind, _, _ = await self._exchange(Packet.register_event(event), None,
                                              REQUEST_TIMEOUT)
            if kind != Packet.EVENT_CONFIRM:
                raise ViciError(f"charon refused to stream {event!r} events")
            self._registered.add(event)
        body = None if message is None else Message.serialize(message)
        kind, answer, events = await self._exchange(Packet.request(command, body), event,
                                                    REQUEST_TIMEOUT)
        self._check(command, kind, answer)
        return events

    @staticmethod
    def _check(command: str, kind: int, answer: Section) -> Section:
        if kind == Packet.CMD_UNKNOWN:
            raise ViciError(f"this charon does not know the VICI command {command!r}")
        if kind != Packet.CMD_RESPONSE:
            raise ViciError(f"unexpected VICI packet type {kind} for {command}")
        if answer.get("success", "yes") == "no":
            raise ViciError(f"{command}: {answer.get('errmsg') or 'failed'}")
        return answer

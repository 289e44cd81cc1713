"""A VICI session over an asyncio Unix socket.

The codec is strongSwan's own (`vici.protocol` from PyPI `vici`: pure, no I/O); this module is
only the transport, so the sink never blocks the event loop on charon. One request at a
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

Section = dict[str, Any]


class ViciError(Exception):
    """charon answered, but said no (its errmsg), or the answer made no sense."""


class ViciConnectionError(ViciError):
    """No charon at the socket, or it went away: a restart is likely."""


def _text(value: Any) -> Any:
    """charon's answers are bytes; everything the sink reads is text."""
    if isinstance(value, Mapping):
        return {k: _text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_text(v) for v in value]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _decode(payload: FiniteStream) -> Section:
    try:
        return _text(Message.deserialize(payload))  # type: ignore[no-any-return]
    except (DeserializationException, struct.error, UnicodeDecodeError) as e:
        raise ViciError(f"malformed VICI message from charon: {e}") from None


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
            raise ViciError(f"VICI message of {length} bytes announced by charon")
        return Packet.parse(await self._reader.readexactly(length))

    async def _exchange(self, packet: bytes, stream: str | None,
                        timeout: float) -> tuple[Any, list[Section]]:
        events: list[Section] = []
        async with self._lock:
            try:
                async with asyncio.timeout(timeout):
                    await self._send(packet)
                    while True:
                        reply = await self._receive()
                        if reply.response_type == Packet.EVENT:
                            if stream is not None and reply.event_type == stream.encode():
                                events.append(_decode(reply.payload))
                            continue
                        return reply, events
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
        reply, _ = await self._exchange(Packet.request(command, body), None, timeout)
        return self._check(command, reply)

    async def streamed(self, command: str, event: str,
                       message: Mapping[str, Any] | None = None) -> list[Section]:
        """Run a command that answers with EVENT messages (e.g. list-sas → list-sa)."""
        if event not in self._registered:
            reply, _ = await self._exchange(Packet.register_event(event), None,
                                            REQUEST_TIMEOUT)
            if reply.response_type != Packet.EVENT_CONFIRM:
                raise ViciError(f"charon refused to stream {event!r} events")
            self._registered.add(event)
        body = None if message is None else Message.serialize(message)
        reply, events = await self._exchange(Packet.request(command, body), event,
                                             REQUEST_TIMEOUT)
        self._check(command, reply)
        return events

    @staticmethod
    def _check(command: str, reply: Any) -> Section:
        if reply.response_type == Packet.CMD_UNKNOWN:
            raise ViciError(f"this charon does not know the VICI command {command!r}")
        if reply.response_type != Packet.CMD_RESPONSE:
            raise ViciError(f"unexpected VICI packet type {reply.response_type} for {command}")
        answer = _decode(reply.payload)
        if answer.get("success", "yes") == "no":
            raise ViciError(f"{command}: {answer.get('errmsg') or 'failed'}")
        return answer

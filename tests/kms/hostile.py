"""A hostile KME: a real HTTPS server with mutual TLS that answers exactly the bytes a test
scripts (status, headers, body, lengths that lie, delays, a trickle, a dropped connection).

    kme = HostileKme(server_context(ca, cert, key))
    await kme.start()
    kme.respond = lambda request: Answer(302, headers=(("Location", "http://..."),))

It reads requests itself (no HTTP library in between), so what reaches the client is never
cleaned up by a server framework. Also a plain-HTTP server (`plain=True`, no TLS) to stand
for the unauthenticated place a hostile KME redirects to.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

#: `Answer.content_length` value: send the true length of the body.
TRUE_LENGTH = -1

#: Longest request head or body this server reads; the client's requests are far smaller.
MAX_REQUEST = 1 << 16


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Answer:
    """One scripted answer. `content_length` None leaves the header out (the body then ends
    when the connection closes, so `close` is implied); any other value is sent as is."""

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    content_length: int | None = TRUE_LENGTH
    reason: bytes = b"X"
    delay: float = 0.0  # seconds before the first byte
    trickle: float = 0.0  # seconds between single bytes of the answer (0: all at once)
    truncate: int | None = None  # send only this many bytes of the answer, then close
    close: bool = False  # close the connection after the answer

    def wire(self) -> bytes:
        head = [b"HTTP/1.1 %d %s" % (self.status, self.reason)]
        head += [f"{k}: {v}".encode("utf-8", "surrogateescape") for k, v in self.headers]
        if self.content_length is not None:
            length = len(self.body) if self.content_length == TRUE_LENGTH else \
                self.content_length
            head.append(b"Content-Length: %d" % length)
        if self.close or self.content_length is None:
            head.append(b"Connection: close")
        data = b"\r\n".join(head) + b"\r\n\r\n" + self.body
        return data if self.truncate is None else data[: self.truncate]


Responder = Callable[[Request], Answer]


def _no_answer(request: Request) -> Answer:
    raise AssertionError(f"unexpected request {request.method} {request.target}")


@dataclass
class HostileKme:
    """TLS (client certificates verified by SSL) unless `ssl` is None: then plain HTTP."""

    ssl: ssl.SSLContext | None
    respond: Responder = _no_answer
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0,
                                                  ssl=self.ssl, limit=MAX_REQUEST)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                self.requests.append(request)
                answer = self.respond(request)
                if not await _send(writer, answer):
                    return
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, ValueError):
            return  # the client went away or sent what this test server does not read
        except asyncio.CancelledError:
            return  # stopped: asyncio's stream callback would report a cancelled task
        finally:
            self._tasks.discard(task)
            writer.close()
            try:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)
            finally:
                writer.transport.abort()


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    line, *fields = head.decode("latin-1").split("\r\n")[:-2]
    method, target, _ = line.split(" ", 2)
    headers = {}
    for f in fields:
        name, _, value = f.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    if length > MAX_REQUEST:
        raise ValueError("request body too large for the hostile KME")
    body = await reader.readexactly(length)
    return Request(method, target, headers, body)


async def _send(writer: asyncio.StreamWriter, answer: Answer) -> bool:
    """Write ANSWER; False when the connection must close after it."""
    if answer.delay:
        await asyncio.sleep(answer.delay)
    data = answer.wire()
    if answer.trickle:
        for i in range(len(data)):
            writer.write(data[i:i + 1])
            await writer.drain()
            await asyncio.sleep(answer.trickle)
    else:
        writer.write(data)
        await writer.drain()
    return answer.truncate is None and not answer.close and answer.content_length is not None

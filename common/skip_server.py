"""A SKIP Key Provider's server: TLS-PSK (common/psktls.py), HTTP/1.1 by h11, each request
parsed by common/skip.py and answered by an `Answer` (the gateway's Key Provider,
ipsec/skip/; the simulator's, kms/sim/skip.py). GET only; every refusal is the draft's status
code with a JSON reason; keys are never logged, only handed out.

Bounded against hostile or broken clients: connections at once, a request head's size, the
handshake's and an idle connection's time. A request that cannot be parsed gets its 400 and
the connection closes; a failure nobody foresaw is a 500, logged, and the server goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11

from common.psktls import PskError, PskStream, ServerContext
from common.skip import Request, SkipError, error_body, parse_request
from common.text import quote_remote

log = logging.getLogger("skip")

#: Connections served at once; more are closed at once (a router holds one or two).
MAX_CONNECTIONS = 64
#: A request head (line and headers) larger than this is refused: SKIP's are under 200 bytes.
MAX_REQUEST_HEAD = 8192
#: Query parameters parsed at most (the draft's paths take two).
MAX_PARAMETERS = 8
#: An idle kept-alive connection is closed after this.
IDLE_TIMEOUT = 30.0

#: The body of the answer to a parsed request from the client of a PSK identity; SkipError
#: for a refusal.
Answer = Callable[[Request, str], dict[str, Any]]


class SkipServer:
    def __init__(self, tls: ServerContext, answer: Answer) -> None:
        self.tls, self.answer = tls, answer
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._connection, host, port,
                                                  limit=MAX_REQUEST_HEAD)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SKIP server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):  # (asyncio.Server leaves them open)
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        if len(self._writers) >= MAX_CONNECTIONS:
            log.warning("SKIP: %s refused: %d connections open already", where,
                        len(self._writers))
            writer.close()
            return
        self._writers.add(writer)
        stream = PskStream(self.tls.context, reader, writer, server=True)
        try:
            try:
                await stream.handshake()
            except (PskError, TimeoutError, OSError) as e:
                log.info("SKIP: %s refused in the TLS handshake: %s", where,
                         str(e) or "no handshake within its time")
                return
            identity = self.tls.identity(stream.conn)
            await self._requests(stream, identity, where)
        except (PskError, TimeoutError, OSError, ConnectionError) as e:
            log.info("SKIP: %s: connection ended: %s", where, str(e) or type(e).__name__)
        except Exception:  # nothing a client sends may end the server
            log.exception("SKIP: %s: unexpected failure", where)
        finally:
            self._writers.discard(writer)
            self.tls.forget(stream.conn)
            await stream.close()

    async def _requests(self, stream: PskStream, identity: str, where: str) -> None:
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        request: h11.Request | None = None
        while True:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as e:
                if http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _send(stream, http, e.error_status_hint,
                                {"error": f"malformed HTTP request: {e}"})
                return
            if event is h11.NEED_DATA:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    data = await stream.read()
                http.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                status, body = self._answer(request, identity, where)
                await _send(stream, http, status, body)
                request = None
                if http.our_state is h11.MUST_CLOSE or http.their_state is h11.MUST_CLOSE:
                    return
                http.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            # (h11.Data: a body, which no SKIP request has; ignored, and bounded by h11)

    def _answer(self, request: h11.Request, identity: str, where: str
                ) -> tuple[int, dict[str, Any]]:
        method = request.method.decode("ascii", "replace")
        try:
            target = request.target.decode("ascii")
            url = urlsplit(target)
            fields = parse_qsl(url.query, keep_blank_values=True, strict_parsing=False,
                               max_num_fields=MAX_PARAMETERS)
            query: dict[str, str] = {}
            for name, value in fields:
                if name in query:
                    raise SkipError(400, f"parameter {quote_remote(name, limit=40)} given"
                                         " twice")
                query[name] = value
            body = self.answer(parse_request(method, unquote(url.path), query), identity)
        except SkipError as e:
            log.info("SKIP: %s (%s): %s %s: %d %s", where, identity, method,
                     quote_remote(request.target.decode("ascii", "replace"), limit=120),
                     e.status, e.message)
            return e.status, error_body(e)
        except (UnicodeDecodeError, ValueError) as e:
            return 400, {"error": f"malformed request target: {e}"}
        except Exception:  # a failure nobody foresaw: no answer but a 500, and the log
            log.exception("SKIP: %s (%s): unexpected failure", where, identity)
            return 500, {"error": "internal error of the Key Provider"}
        return 200, body


async def _send(stream: PskStream, http: h11.Connection, status: int,
                body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    out = http.send(h11.Response(status_code=status, reason=HTTPStatus(status).phrase, headers=[
        ("Content-Type", "application/json"), ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store")]))
    out = (out or b"") + (http.send(h11.Data(data=data)) or b"") \
        + (http.send(h11.EndOfMessage()) or b"")
    await stream.write(out)

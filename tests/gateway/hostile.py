"""A hostile peer gateway for end-to-end tests: it holds a real peer certificate (so the
channel lets it in), listens where the honest peer would, reads what the gateway under test
sends it, and answers with whatever the test crafts.

    qkdgw run (A, under test) ──wss, mTLS──▶ HostilePeer server (as gw-b, on B's port)
              ◀──wss, mTLS── HostilePeer client (as gw-b): crafted frames

It runs its own event loop in a thread, so synchronous tests (and hypothesis) can drive it.
Also what the hostile-peer and hostile-KME tests check of the gateway under test afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from gateway.core.messages import Message, MessageError, Offer, decode
from gateway.peer import CHANNEL_PATH

T = TypeVar("T")

#: A frame that gets no answer within this is taken as accepted (the channel answers only
#: refusals, with a text frame).
ANSWER_WAIT = 0.3


class HostilePeer:
    def __init__(self, pki: Path, cert: str, listen: tuple[str, int], target: tuple[str, int],
                 target_name: str, link: str = "ab") -> None:
        self.link = link
        self.received: list[Message] = []
        self.raw_received = 0
        self._server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                                      cafile=str(pki / "ca.pem"))
        self._server_ssl.verify_mode = ssl.CERT_REQUIRED
        self._server_ssl.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
        self._client_ssl = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        self._client_ssl.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
        self._listen, self._target, self._target_name = listen, target, target_name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="hostile-peer")
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> HostilePeer:
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get(CHANNEL_PATH, self._channel)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, *self._listen, ssl_context=self._server_ssl).start()
        self._session = aiohttp.ClientSession()

    async def _close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- what the gateway under test sends -------------------------------------------------

    async def _channel(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for frame in ws:
            if frame.type is aiohttp.WSMsgType.BINARY:
                self.raw_received += 1
                _, _, body = frame.data.partition(b"\n")  # after the link tag
                with contextlib.suppress(MessageError):  # garbage: raw_received counts it
                    self.received.append(decode(body))
        return ws

    def last_offer(self, after: int = 0, timeout: float = 20.0) -> Offer:
        """The newest Offer with an epoch above AFTER, waiting for one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            offers = [m for m in list(self.received) if isinstance(m, Offer) and m.epoch > after]
            if offers:
                return offers[-1]
            time.sleep(0.05)
        raise AssertionError(f"no Offer above epoch {after} within {timeout} s")

    # -- what it sends ---------------------------------------------------------------------

    def send(self, raw: bytes, *, text: bool = False, tag: bytes | None = None) -> str | None:
        """Send one frame to the gateway under test, tagged with the link (or with TAG, as
        it is); its refusal text, or None."""
        return self._call(self._send((f"{self.link}\n".encode() if tag is None else tag) + raw,
                                     text))

    async def _send(self, raw: bytes, text: bool) -> str | None:
        for attempt in (1, 2):
            try:
                ws = await self._connected()
                if text:
                    await ws.send_str(raw.decode("utf-8", "replace"))
                else:
                    await ws.send_bytes(raw)
                try:
                    frame = await ws.receive(timeout=ANSWER_WAIT)
                except TimeoutError:
                    return None
                if frame.type is aiohttp.WSMsgType.TEXT:
                    error: str = json.loads(frame.data)["error"]
                    return error
                self._ws = None  # closed by the gateway (e.g. an oversized frame)
                return f"closed {ws.close_code}"
            except (aiohttp.ClientError, ConnectionError) as e:
                self._ws = None
                if attempt == 2:
                    return f"connection failed: {e}"
        return None

    async def _connected(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws is None or self._ws.closed:
            assert self._session is not None
            host, port = self._target
            self._ws = await self._session.ws_connect(
                f"https://{host}:{port}{CHANNEL_PATH}", ssl=self._client_ssl,
                server_hostname=self._target_name, max_msg_size=0)
        return self._ws


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process PID so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy(pid: int, seconds: float = 2.0) -> float:
    """The share of one core process PID used over SECONDS."""
    before, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - t0)


def check_log(log: str) -> None:
    """Nothing went wrong unseen, and nobody forged a line: no traceback, no link failed,
    every line one the gateway wrote (they start with the date)."""
    assert "Traceback" not in log, log[-3000:]
    assert "link-failed" not in log, [ln for ln in log.splitlines() if "link-failed" in ln]
    for line in log.splitlines():
        assert line[:4].isdigit(), f"a forged or broken log line: {line!r}"

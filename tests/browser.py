"""Headless Chromium (Debian's `chromium`), driven over the DevTools protocol (CDP) with the
aiohttp the project has anyway: a page to load, script to evaluate, screenshots, and every
request the page made (to check that none leaves loopback).

    Chromium --headless --remote-debugging-port=0 ──CDP over a WebSocket── this module
        └─ one page target: Page, Network, Runtime, Emulation domains

No driver package: CDP is JSON over a WebSocket, and the few methods used here are stable.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import aiohttp

#: Chromium writes its DevTools port within this after it starts.
START_TIMEOUT = 30.0
#: A CDP call that takes longer failed.
CALL_TIMEOUT = 30.0

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps",
         "--disable-extensions", "--mute-audio", "--hide-scrollbars",
         # Nothing resolves but loopback: a page that reached out would fail, and show.
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
         "--remote-debugging-port=0", "--remote-allow-origins=*")


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium with one page; `async with Browser() as b: await b.load(url)`."""

    def __init__(self, width: int = 1400, height: int = 1000) -> None:
        self.width, self.height = width, height
        self.requests: list[str] = []  # every URL the page asked for
        self.console: list[str] = []  # console messages and uncaught exceptions
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._profile = Path(tempfile.mkdtemp(prefix="qkdgw-chromium-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("chromium is not installed (Debian package chromium)")
        self._proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={self._profile}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while not port_file.exists() or len(port_file.read_text().split()) < 2:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                await self.__aexit__()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = await r.json()
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"],
                                                  max_msg_size=1 << 28)
        self._reader = asyncio.create_task(self._read())
        for domain in ("Page", "Network", "Runtime"):
            await self.call(f"{domain}.enable")
        await self.call("Emulation.setDeviceMetricsOverride", width=self.width,
                        height=self.height, deviceScaleFactor=1, mobile=False)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            method = data.get("method", "")
            params = data.get("params", {})
            if method == "Network.requestWillBeSent":
                self.requests.append(params["request"]["url"])
            elif method == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value", a.get("description", "")))
                                             for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                self.console.append("exception: " + json.dumps(params.get("exceptionDetails")))

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        i = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[i] = future
        await self._ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, CALL_TIMEOUT)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def load(self, url: str) -> None:
        """Navigate to URL and wait until its document is complete."""
        result = await self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise RuntimeError(f"{url}: {result['errorText']}")
        deadline = time.monotonic() + CALL_TIMEOUT
        while not await self.evaluate(f"location.href === {json.dumps(url)} &&"
                                      " document.readyState === 'complete'"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load in {CALL_TIMEOUT} s")
            await asyncio.sleep(0.05)

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def html(self) -> str:
        value: str = await self.evaluate("document.documentElement.outerHTML")
        return value

    async def screenshot(self, path: Path, full_page: bool = True) -> None:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            height = await self.evaluate("document.documentElement.scrollHeight")
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": self.width,
                                "height": min(int(height), 6000), "scale": 1})
        shot = await self.call("Page.captureScreenshot", **params)
        path.write_bytes(base64.b64decode(shot["data"]))

    def off_loopback(self) -> list[str]:
        """The requests the page made to anything but loopback (data:, about:, file: aside)."""
        out = []
        for url in self.requests:
            parts = urlsplit(url)
            if parts.scheme in ("data", "about", "blob", "file"):
                continue
            if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
                out.append(url)
        return out

"""The dashboard's routes, served on the metrics listener next to /metrics and /healthz:

    GET /                      the page (server-rendered; `?part=live`: its live section)
    GET /api/status            what `qkdgw status --json` says (`?link=NAME`: that link)
    GET /api/history           `?link=NAME&seconds=S`: the samples behind a link's plots
    GET /api/events            Server-Sent Events: `change` when something shown changed
    GET /static/...            the stylesheet and the script, from the package

Read-only, and no key material anywhere: the status and history carry fingerprints and key
IDs, never keys. Every response carries strict security headers; the page loads nothing but
its own two files (no inline script or style, no CDN).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from gateway.audit import tail, verify
from gateway.history import HISTORY_SECONDS, LinkHistoryView
from gateway.status import SiteStatus
from gateway.web.page import AuditView, View, live, page, plotted

#: Every response's security headers: nothing but the dashboard's own files, no framing, no
#: referrer, no sniffing, no caching (the figures change by the second).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
                               " img-src 'self'; connect-src 'self'; base-uri 'none';"
                               " form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    "Cache-Control": "no-store",
}

#: Audit records the page lists.
AUDIT_TAIL = 12
#: The trail is verified again (in a thread: a hub's trail is long) at most this often.
AUDIT_VERIFY_PERIOD = 60.0
#: Live-update streams open at once at most (each is a connection held open).
MAX_STREAMS = 32
#: A stream sends at most one `change` per this (a hub changes many times a second, and its
#: page takes ~50 ms to render for 1,000 links: bench/dashboard.py) ...
STREAM_COALESCE = 1.0
#: ... and a comment at least this often, so proxies and the browser keep it open.
STREAM_HEARTBEAT = 15.0
#: The browser reconnects after this if the stream drops (milliseconds, the SSE `retry`).
STREAM_RETRY_MS = 2000

STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


class StaticFiles:
    """The page's script and stylesheet, read once from the package: GET /static/{name}
    (the daemon's dashboard and the demo's web view serve the same two files)."""

    def __init__(self) -> None:
        self._files = {name: (resources.files("gateway.web") / "static" / name).read_bytes()
                       for name in STATIC}

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound(text=f"no static file {name!r}")
        return web.Response(body=self._files[name], content_type=STATIC[name],
                            charset="utf-8")


class Changes:
    """A counter bumped on each change the dashboard shows; live updates wait on it."""

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def bump(self) -> None:
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, version: int, timeout: float) -> int:
        """The version once it is past VERSION, or as it is after TIMEOUT."""
        if self.version == version:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout)
        return self.version


class Source(Protocol):
    """What the dashboard reads (the daemon)."""

    changes: Changes

    def status(self, link: str | None = None) -> SiteStatus: ...

    def history_view(self, link: str, seconds: float) -> LinkHistoryView: ...

    def has_link(self, link: str) -> bool: ...

    @property
    def audit_path(self) -> Path: ...


@dataclass
class _Verified:
    at: float = -math.inf  # time.monotonic() of the last check
    checked_at: float | None = None  # ... and time.time()
    ok: bool | None = None
    problems: tuple[str, ...] = ()
    head: str | None = None
    seq: int = 0
    running: bool = False


@web.middleware
async def security_headers(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as e:
        e.headers.update(SECURITY_HEADERS)
        raise
    if not response.prepared:
        response.headers.update(SECURITY_HEADERS)
    return response


class Dashboard:
    def __init__(self, source: Source) -> None:
        self.source = source
        self._verified = _Verified()
        self._verifying: asyncio.Task[None] | None = None
        self._streams = 0
        self._static = StaticFiles()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.index)
        app.router.add_get("/api/status", self.api_status)
        app.router.add_get("/api/history", self.api_history)
        app.router.add_get("/api/events", self.events)
        app.router.add_get("/static/{name}", self._static.handle)

    # -- the page ----------------------------------------------------------------------------

    def _audit(self) -> AuditView:
        v = self._verified
        if time.monotonic() - v.at > AUDIT_VERIFY_PERIOD and not v.running:
            v.running = True
            self._verifying = asyncio.create_task(self._verify(), name="dashboard-audit")
        try:
            records = tail(self.source.audit_path, AUDIT_TAIL)
        except OSError:
            records = []
        return AuditView(records=records, verified=v.ok, problems=list(v.problems),
                         checked_at=v.checked_at,
                         verified_head=v.head, verified_seq=v.seq)

    async def _verify(self) -> None:
        v = self._verified
        try:
            result = await asyncio.to_thread(verify, self.source.audit_path)
            v.ok, v.problems = result.ok, result.problems
            v.head, v.seq = result.head.hash, result.head.seq
        except Exception as e:  # an unreadable file is shown, never fatal
            v.ok, v.problems = False, (f"{type(e).__name__}: {e}",)
        finally:
            v.at, v.checked_at, v.running = time.monotonic(), time.time(), False
            self.source.changes.bump()

    def _render(self, request: web.Request) -> tuple[str, View]:
        v = View.of(request.query)
        status = self.source.status()
        histories = [self.source.history_view(name, v.seconds)
                     for name in plotted(status, v)]
        if request.query.get("part") == "live":
            return live(status, histories, self._audit(), v), v
        return page(status, histories, self._audit(), v), v

    async def index(self, request: web.Request) -> web.Response:
        body, _ = self._render(request)
        return web.Response(text=body, content_type="text/html", charset="utf-8")

    # -- the API ---------------------------------------------------------------------------

    def _link(self, request: web.Request, required: bool) -> str | None:
        link = request.query.get("link")
        if link is None:
            if required:
                raise _json_error(400, "give the link: ?link=NAME")
            return None
        if not self.source.has_link(link):
            raise _json_error(404, f"no link {link!r}")
        return link

    async def api_status(self, request: web.Request) -> web.Response:
        link = self._link(request, required=False)
        return web.json_response(self.source.status(link).model_dump(mode="json"))

    async def api_history(self, request: web.Request) -> web.Response:
        link = self._link(request, required=True) or ""
        raw = request.query.get("seconds", "3600")
        try:
            seconds = float(raw)
        except ValueError:
            raise _json_error(400, f"seconds: not a number: {raw[:40]!r}") from None
        if not 0 < seconds <= HISTORY_SECONDS:
            raise _json_error(400, f"seconds: from 0 to {HISTORY_SECONDS:g}, not {seconds:g}")
        return web.json_response(self.source.history_view(link, seconds).model_dump(
            mode="json"))

    async def events(self, request: web.Request) -> web.StreamResponse:
        if self._streams >= MAX_STREAMS:
            raise _json_error(503, f"{MAX_STREAMS} live streams are open already")
        self._streams += 1
        try:
            response = web.StreamResponse(headers={**SECURITY_HEADERS,
                                                   "Content-Type": "text/event-stream",
                                                   "X-Accel-Buffering": "no"})
            await response.prepare(request)
            changes = self.source.changes
            version = changes.version
            await response.write(f"retry: {STREAM_RETRY_MS}\nevent: change\n"
                                 f"data: {json.dumps({'version': version})}\n\n".encode())
            while True:
                now = await changes.wait(version, STREAM_HEARTBEAT)
                if now == version:
                    await response.write(b": still here\n\n")
                    continue
                version = now
                await response.write(f"event: change\ndata: "
                                     f"{json.dumps({'version': version})}\n\n".encode())
                await asyncio.sleep(STREAM_COALESCE)
        except ConnectionResetError:  # the browser went away
            return web.StreamResponse()
        finally:
            self._streams -= 1


def _json_error(status: int, message: str) -> web.HTTPException:
    kind = {400: web.HTTPBadRequest, 404: web.HTTPNotFound,
            503: web.HTTPServiceUnavailable}[status]
    return kind(text=json.dumps({"error": message}), content_type="application/json")

"""The simulator process: one HTTPS server per KME, and a loopback admin interface.

Each KME listens on its own port with its own certificate and identifies the calling SAE by
the commonName of its client certificate (verified against the configured CA). The link
logic lives in `service`; faults in `faults`; this module only does HTTP.

Whatever a client sends, a bad request is a 400 with an ETSI 014 Error naming the problem,
never a 503 or a traceback: bodies over 64 KiB, JSON nested past the parser's limit or
holding NaN, numbers with thousands of digits or in other scripts' digits, requests the HTTP
parser refuses. A client gets `request_timeout` seconds for its TLS handshake and for each
whole request, so half-sent requests cannot hold connections open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pydantic_core
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.config import MAX_SECONDS
from common.psktls import ServerContext
from common.skip_server import SkipServer
from common.text import quote_remote
from common.tlsctx import peer_common_name, server_context
from kms.models import MAX_COUNT, Etsi014Model, KeyIds, KeyRequest
from kms.sim.config import KmeConfig, SimConfig
from kms.sim.faults import Fault, FaultKind, FaultSpec, FaultTable, corrupt
from kms.sim.service import LinkService, Network, Refusal
from kms.sim.skip import SimKeyProvider, psk_table

log = logging.getLogger("kms.sim")

#: How often timed faults and outages are looked at when no request comes in.
TICK_SECONDS = 0.1

#: Largest request body: a key IDs object for 128 keys is ~6 KiB.
MAX_BODY = 64 * 1024

#: A query number: ASCII digits only (str.isdigit and int() also take '١٢٨'), and few
#: enough of them that int() never meets Python's 4300-digit limit.
_QUERY_NUMBER = re.compile(r"[0-9]{1,10}")

#: Where aiohttp's parser errors start quoting the bytes they refused.
_QUOTED_BYTES = re.compile(r"\n|b'|b\"|bytearray\(")

T = TypeVar("T", bound=Etsi014Model)
A = TypeVar("A", bound=BaseModel)


@dataclass
class Kme:
    """One simulated KME: its configuration, its listener and its request counters."""

    config: KmeConfig
    runner: web.AppRunner | None = None
    requests: Counter[str] = field(default_factory=Counter)
    skip: SkipServer | None = None  # its SKIP Key Provider, while listening

    @property
    def id(self) -> str:
        return self.config.id


class Simulator:
    def __init__(self, config: SimConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.network = Network(config.kmes, config.links, clock())
        self.links = self.network.links
        self.kmes = {k.id: Kme(k) for k in config.kmes}
        self.faults = FaultTable()
        self._ssl = {k.id: server_context(config.ca, k.config.cert, k.config.key)
                     for k in self.kmes.values()}
        self._psk = {k.id: ServerContext(psk_table(k.config)) for k in self.kmes.values()
                     if k.config.skip is not None}
        self._admin: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        for kme in self.kmes.values():
            await self._listen(kme)
        if self.config.admin is not None:
            self._admin = web.AppRunner(self._admin_app(), access_log=None)
            await self._admin.setup()
            a = self.config.admin.listen
            await _Site(self._admin, a.host, a.port, None, self.config.request_timeout).start()
            log.info("admin interface on http://%s", a)
        self._ticker = asyncio.create_task(self._tick())

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for kme in self.kmes.values():
            await self._unlisten(kme)
        if self._admin is not None:
            await self._admin.cleanup()

    async def _listen(self, kme: Kme) -> None:
        if kme.runner is not None:
            return
        runner = web.AppRunner(self._kme_app(kme), access_log=None, handle_signals=False)
        await runner.setup()
        where = kme.config.listen
        await _Site(runner, where.host, where.port, self._ssl[kme.id],
                    self.config.request_timeout).start()
        kme.runner = runner
        log.info("KME %s (SAE %s) on https://%s", kme.id, ", ".join(kme.config.saes), where)
        if kme.config.skip is not None:
            provider = SimKeyProvider(kme.config, self.network, self.faults, self.clock)
            kme.skip = SkipServer(self._psk[kme.id], provider.answer)
            at = kme.config.skip.listen
            await kme.skip.start(at.host, at.port)
            log.info("KME %s as SKIP Key Provider on %s (TLS-PSK)", kme.id, at)

    async def _unlisten(self, kme: Kme) -> None:
        if kme.runner is not None:
            runner, kme.runner = kme.runner, None
            await runner.cleanup()
        if kme.skip is not None:
            skip, kme.skip = kme.skip, None
            await skip.stop()

    async def _tick(self) -> None:
        while True:
            await self._apply_availability()
            await asyncio.sleep(TICK_SECONDS)

    async def _apply_availability(self) -> None:
        now = self.clock()
        self.faults.expire(now)
        down = self.faults.unavailable(now)
        for kme in self.kmes.values():
            if kme.id in down and kme.runner is not None:
                log.info("fault: KME %s unavailable", kme.id)
                await self._unlisten(kme)
            elif kme.id not in down and kme.runner is None:
                await self._listen(kme)
                log.info("fault cleared: KME %s available", kme.id)

    # -- the KME API ---------------------------------------------------------------------

    def _kme_app(self, kme: Kme) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        route = "/api/v1/keys/{sae}/"
        app.router.add_get(route + "status", self._endpoint(kme, "status", self._status))
        for method in ("GET", "POST"):
            app.router.add_route(method, route + "enc_keys",
                                 self._endpoint(kme, "enc_keys", self._enc_keys))
            app.router.add_route(method, route + "dec_keys",
                                 self._endpoint(kme, "dec_keys", self._dec_keys))
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    def _endpoint(
        self, kme: Kme, op: str, serve: Callable[[web.Request, Kme, float], Awaitable[Any]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            fault = self.faults.take(kme.id, op, self.clock())
            response = await self._serve(request, kme, op, serve, fault)
            kme.requests[f"{op} {response.status}"] += 1
            if fault is not None and fault.spec.kind is FaultKind.SLOW:
                # The KME has acted (keys reserved or handed over); only the answer is late,
                # and is lost if the client gives up first.
                await asyncio.sleep(fault.spec.delay)
            return response

        return handler

    async def _serve(
        self, request: web.Request, kme: Kme, op: str,
        serve: Callable[[web.Request, Kme, float], Awaitable[Any]], fault: Fault | None,
    ) -> web.StreamResponse:
        if fault is not None and fault.spec.kind is FaultKind.ERROR_503:
            return _error(503, "fault injected: KME temporarily unable to serve")
        try:
            result = await serve(request, kme, self.clock())
        except Refusal as r:
            log.info("%s %s from %s: %d %s", kme.id, op,
                     quote_remote(self._caller(request) or "(no certificate)"), r.status,
                     quote_remote(r.message))
            response = _error(r.status, r.message, r.details)
            if r.close:
                response.force_close()
            return response
        except Exception:
            # The spec's only server-side error is 503; the traceback goes to our log.
            log.exception("%s %s: internal error", kme.id, op)
            return _error(503, "internal error in the KME simulator")
        body = result.model_dump(mode="json", exclude_none=True)
        if fault is not None and fault.spec.kind is FaultKind.MALFORMED:
            status, ctype, raw = corrupt(body, fault.spec.variant)
            return web.Response(status=status, body=raw, content_type=ctype)
        return web.json_response(body)

    @staticmethod
    def _caller(request: web.Request) -> str | None:
        transport = request.transport
        return peer_common_name(transport.get_extra_info("peercert") if transport else None)

    async def _status(self, request: web.Request, kme: Kme, now: float) -> Etsi014Model:
        return self.network.status(kme.config, self._caller(request),
                                   request.match_info["sae"], now)

    async def _enc_keys(self, request: web.Request, kme: Kme, now: float) -> Etsi014Model:
        if request.method == "GET":
            req = _validated(KeyRequest, _query_ints(request, ("number", "size")))
            if "get-ignores-number-size" in self.network.quirks(kme.config,
                                                               request.match_info["sae"]):
                req = KeyRequest()
        else:
            req = await _body(request, KeyRequest, empty_ok=True,
                              timeout=self.config.request_timeout)
        return self.network.enc_keys(kme.config, self._caller(request), request.match_info["sae"],
                                 req, now)

    async def _dec_keys(self, request: web.Request, kme: Kme, now: float) -> Etsi014Model:
        if request.method == "GET":
            unknown = set(request.query) - {"key_ID"}
            if unknown:
                raise Refusal(400, "unknown query parameter(s): " + ", ".join(sorted(unknown)))
            ids = request.query.getall("key_ID", [])
            if not ids:
                raise Refusal(400, "key_ID query parameter is required")
            _validated(KeyIds, {"key_IDs": [{"key_ID": i} for i in ids]})
        else:
            req = await _body(request, KeyIds, empty_ok=False,
                              timeout=self.config.request_timeout)
            if req.unknown_fields():
                raise Refusal(400, "unknown member(s) in key IDs: "
                              + ", ".join(req.unknown_fields()))
            ids = [k.key_ID for k in req.key_IDs]
        return self.network.dec_keys(kme.config, self._caller(request), request.match_info["sae"],
                                 ids, now)

    @staticmethod
    async def _not_found(request: web.Request) -> web.StreamResponse:
        return _error(404, f"no ETSI GS QKD 014 endpoint at {request.method} {request.path}"
                      " (expected /api/v1/keys/{SAE_ID}/status|enc_keys|dec_keys)")

    # -- the admin API -------------------------------------------------------------------

    def _admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/admin/state", self._state)
        app.router.add_post("/admin/faults", self._add_fault)
        app.router.add_delete("/admin/faults", self._clear_faults)
        app.router.add_post("/admin/links/{link}/outage", self._outage)
        app.router.add_delete("/admin/links/{link}/outage", self._end_outage)
        app.router.add_post("/admin/links/{link}/qber", self._qber)
        app.router.add_delete("/admin/links/{link}/qber", self._end_qber)
        app.router.add_post("/admin/links/{link}/pool", self._pool)
        app.router.add_post("/admin/reset", self._reset)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def state(self) -> dict[str, Any]:
        now = self.clock()
        down = self.faults.unavailable(now)
        return {
            "links": {
                name: {
                    "stored_key_count": link.stored_key_count(now),
                    "stored_bits": int(link.model.stored_bits),
                    "pending_keys": link.pending(now),
                    **link.link_extension(now),
                    "profile": link.config.profile,
                    "time_scale": link.config.time_scale,
                    "kmes": list(link.config.kmes),
                }
                for name, link in self.links.items()
            },
            "kmes": {
                k.id: {"listen": str(k.config.listen), "saes": list(k.config.saes),
                       "available": k.id not in down, "requests": dict(k.requests)}
                for k in self.kmes.values()
            },
            "faults": self.faults.describe(now),
        }

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _add_fault(self, request: web.Request) -> web.Response:
        spec = await _admin_body(request, FaultSpec)
        if spec.kme is not None and spec.kme not in self.kmes:
            raise _admin_error(f"unknown KME {spec.kme!r}")
        if spec.link is not None and spec.link not in self.links:
            raise _admin_error(f"unknown link {spec.link!r}")
        targets = [k.id for k in self.kmes.values()
                   if (spec.kme is None or k.id == spec.kme)
                   and (spec.link is None or k.id in self.links[spec.link].config.kmes)]
        fault = self.faults.add(spec, targets, self.clock())
        log.info("fault %d injected: %s on %s", fault.id, spec.kind, ", ".join(targets))
        await self._apply_availability()
        return web.json_response({"id": fault.id, "kmes": targets})

    async def _clear_faults(self, request: web.Request) -> web.Response:
        self.faults.clear()
        await self._apply_availability()
        return web.json_response({"cleared": True})

    def _link(self, request: web.Request) -> LinkService:
        name = request.match_info["link"]
        if name not in self.links:
            raise _admin_error(f"unknown link {name!r}")
        return self.links[name]

    async def _outage(self, request: web.Request) -> web.Response:
        link = self._link(request)
        body = await _admin_body(request, _Seconds)
        link.model.start_outage(self.clock(), body.seconds)
        log.info("link %s: quantum channel outage for %s s", link.config.name, body.seconds)
        return web.json_response(link.link_extension(self.clock()))

    async def _end_outage(self, request: web.Request) -> web.Response:
        link = self._link(request)
        link.model.end_outages(self.clock())
        return web.json_response(link.link_extension(self.clock()))

    async def _qber(self, request: web.Request) -> web.Response:
        link = self._link(request)
        body = await _admin_body(request, _Qber)
        link.model.set_qber(body.qber, self.clock())
        log.info("link %s: QBER set to %s", link.config.name, body.qber)
        return web.json_response(link.link_extension(self.clock()))

    async def _end_qber(self, request: web.Request) -> web.Response:
        link = self._link(request)
        link.model.set_qber(None, self.clock())
        log.info("link %s: QBER back to its model", link.config.name)
        return web.json_response(link.link_extension(self.clock()))

    async def _pool(self, request: web.Request) -> web.Response:
        link = self._link(request)
        body = await _admin_body(request, _Pool)
        link.model.set_stored(body.stored_keys * link.config.key_size, self.clock())
        return web.json_response({"stored_key_count": link.stored_key_count(self.clock())})

    async def _reset(self, request: web.Request) -> web.Response:
        now = self.clock()
        self.faults.clear()
        self.network.reset(now)
        for kme in self.kmes.values():
            kme.requests.clear()
        await self._apply_availability()
        return web.json_response(self.state())


class _AdminBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Seconds(_AdminBody):
    seconds: float = Field(gt=0, le=MAX_SECONDS)


class _Qber(_AdminBody):
    qber: float = Field(ge=0, le=0.5)


class _Pool(_AdminBody):
    stored_keys: int = Field(ge=0, le=MAX_COUNT)


def _error(status: int, message: str, details: list[dict[str, object]] | None = None
           ) -> web.Response:
    body: dict[str, Any] = {"message": message}
    if details:
        body["details"] = details
    return web.json_response(body, status=status)


def _admin_error(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"message": message}),
                              content_type="application/json")


def _query_ints(request: web.Request, names: tuple[str, ...]) -> dict[str, int]:
    unknown = set(request.query) - set(names)
    if unknown:
        raise Refusal(400, "unknown query parameter(s): " + ", ".join(sorted(unknown)))
    values = {}
    for name in names:
        if name in request.query:
            text = request.query[name]
            if not _QUERY_NUMBER.fullmatch(text) or not 0 < int(text) <= MAX_COUNT:
                raise Refusal(400, f"{name} must be a positive integer in ASCII digits,"
                              f" at most {MAX_COUNT}")
            values[name] = int(text)
    return values


def _validated(model: type[T], data: object) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise Refusal(400, _first_problem(e)) from None


def _first_problem(e: ValidationError) -> str:
    first = e.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


def _parse_json(raw: bytes) -> object:
    """RAW as JSON, or ValueError naming the problem. pydantic's parser, not Python's json:
    it refuses NaN and Infinity here and stops at a nesting limit instead of hitting
    RecursionError; numbers past ±(2**53 − 1) or infinite are left to the models."""
    return pydantic_core.from_json(raw, allow_inf_nan=False)


async def _read_body(request: web.Request, timeout: float) -> bytes:
    """The whole body, at most MAX_BODY bytes, within TIMEOUT seconds; else a Refusal."""
    too_large = f"request body exceeds the {MAX_BODY}-byte limit"
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise Refusal(400, too_large, close=True)
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Refusal(400, too_large, close=True) from None
    except TimeoutError:
        raise Refusal(400, f"request body not complete within {timeout} s",
                      close=True) from None


async def _body(request: web.Request, model: type[T], *, empty_ok: bool, timeout: float) -> T:
    raw = await _read_body(request, timeout)
    if not raw.strip():
        if empty_ok:
            return model()
        raise Refusal(400, "request body is empty")
    try:
        data = _parse_json(raw)
    except ValueError as e:
        raise Refusal(400, _json_problem(e)) from None
    return _validated(model, data)


def _json_problem(e: ValueError) -> str:
    if "recursion limit" in str(e):
        return "request body is nested too deeply"
    if "number out of range" in str(e):
        return "request body holds a number out of range"
    return "request body is not JSON"


async def _admin_body(request: web.Request, model: type[A]) -> A:
    try:
        return model.model_validate(_parse_json(await request.read()))
    except web.HTTPRequestEntityTooLarge:
        raise _admin_error("request body too large") from None
    except (ValueError, ValidationError) as e:
        raise _admin_error(str(e)) from None


class _Protocol(web.RequestHandler):
    """aiohttp's connection handler, except that a request its HTTP parser refuses (request
    line or headers too long, not HTTP at all) is answered with an ETSI 014 Error and logged
    as one escaped line, not as a traceback."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:  # a fault of ours: aiohttp's answer, with its traceback
            return super().handle_error(request, status, exc, message)
        text = str(getattr(exc, "message", None) or message or exc or "")
        problem = quote_remote(_QUOTED_BYTES.split(text, maxsplit=1)[0].strip().rstrip(":"))
        log.info("malformed HTTP request from %s: %s", request.remote, problem)
        response = _error(status, f"malformed HTTP request: {problem}")
        response.force_close()
        return response


class _Site(web.BaseSite):
    """A listener whose connections are `_Protocol`s that close after TIMEOUT seconds
    without a whole request (aiohttp's keep-alive timer, which also runs while a request
    head is half sent), and whose TLS handshake is bounded by the same TIMEOUT."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 ssl_context: ssl.SSLContext | None, timeout: float) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host, self._port, self._timeout = host, port, timeout

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        if server is None:
            raise RuntimeError("the simulator's site started before its runner")
        loop = asyncio.get_running_loop()
        # access_log=None: no access log, as AppRunner(access_log=None) passes it to aiohttp
        # (whose annotation says Logger).
        self._server = await loop.create_server(
            lambda: _Protocol(server, loop=loop, keepalive_timeout=self._timeout,
                              access_log=None),  # type: ignore[arg-type]
            self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            ssl_handshake_timeout=self._timeout if self._ssl_context else None)


async def serve(config: SimConfig) -> None:
    """Run until SIGTERM or SIGINT."""
    sim = Simulator(config)
    await sim.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("simulator ready: %d link(s)", len(sim.links))
    try:
        await stop.wait()
    finally:
        await sim.stop()
        log.info("simulator stopped")

"""`qkdgw demo --web [PORT]`: the demo's live view in a browser, on loopback: both sites'
dashboards side by side (each fetched from its daemon's admin socket: the daemons run in
namespaces the host's browser cannot reach), the LAN traffic counters and the WAN capture
plotted. The terminal view stays; this runs next to it.

Same page script, stylesheet and security headers as the daemon's dashboard
(gateway/web/): slots fetched again every REFRESH_MS.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any, Protocol

from aiohttp import ClientError, ClientSession, ClientTimeout, UnixConnector, web

from gateway.demo.wire import Tally
from gateway.web.dashboard import StaticFiles, security_headers
from gateway.web.page import head
from gateway.web.svg import series_chart


class _Flow(Protocol):
    name: str

    def counts(self, final: bool = False) -> tuple[int, int, int]: ...


class _Wire(Protocol):
    tally: Tally


class _Sites(Protocol):
    def state(self, site: str) -> Path: ...


class Demo(Protocol):
    """What the web view reads of the demo (gateway/demo/live.py's Demo)."""

    events: list[str]

    @property
    def plane(self) -> str: ...

    @property
    def flows(self) -> Sequence[_Flow]: ...

    @property
    def wire(self) -> _Wire | None: ...

    @property
    def sites(self) -> _Sites: ...


#: The page fetches its slots this often: a demo rekeys every few seconds.
REFRESH_MS = 1000
#: Traffic samples kept (one a second): the plots show the last ten minutes.
SAMPLES = 600
#: A site's gateway that does not answer in this long is shown as not answering.
ADMIN_TIMEOUT = ClientTimeout(total=2)
#: The demo's web view listens here by default (loopback only).
DEFAULT_PORT = 8480


class TrafficSamples:
    """The LAN flows' counters and the WAN tally, once a second (`sample`)."""

    def __init__(self, demo: Demo) -> None:
        self.demo = demo
        self.rows: deque[tuple[float, dict[str, tuple[int, int, int]], int, int]] = \
            deque(maxlen=SAMPLES)

    def sample(self) -> None:
        flows = {f.name: f.counts() for f in self.demo.flows}
        wire = self.demo.wire.tally if self.demo.wire is not None else None
        esp = sum(wire.esp.values()) if wire is not None else 0
        self.rows.append((time.time(), flows, esp, wire.plaintext if wire is not None else 0))

    def render(self) -> str:
        if not self.rows:
            return '<section id="traffic"><p class="muted">no traffic yet</p></section>'
        since, until = self.rows[0][0], max(self.rows[-1][0], self.rows[0][0] + 60)
        charts = [series_chart(f"LAN {n.replace('->', ' → ')}", since, until,
                               _flow_series(self.rows, n), "packets")
                  for n in self.rows[-1][1]]
        _, flows, esp, plain = self.rows[-1]
        wan = series_chart("WAN between the sites", since, until,
                           [("ESP", [(t, float(e)) for t, _, e, _ in self.rows]),
                            ("plaintext", [(t, float(p)) for t, _, _, p in self.rows])],
                           "packets")
        table = "".join(
            f'<tr data-flow="{escape(n)}" data-sent="{s}" data-received="{r}" data-lost="{x}">'
            f'<td>{escape(n.replace("->", " → "))}</td><td>{s}</td><td>{r}</td>'
            f'<td class="{"alarm" if x else ""}">{x}</td></tr>'
            for n, (s, r, x) in flows.items())
        return ('<section id="traffic"><h2>Traffic</h2><table class="traffic-counts"><thead>'
                '<tr><th>LAN flow</th><th>sent</th><th>received</th><th>lost</th></tr></thead>'
                f'<tbody>{table}</tbody></table><p>WAN capture: <b data-esp="{esp}">{esp}</b>'
                f' ESP packets, <b class="{"alarm" if plain else "ok"}" data-plaintext="{plain}">'
                f'{plain}</b> in clear</p><div class="traffic">' + "".join(charts) + wan
                + "</div></section>")


def _flow_series(rows: deque[tuple[float, dict[str, tuple[int, int, int]], int, int]],
                 name: str) -> list[tuple[str, list[tuple[float, float]]]]:
    return [(what, [(t, float(f[name][i])) for t, f, _, _ in rows if name in f])
            for i, what in enumerate(("sent", "received", "lost"))]


class DemoWeb:
    """The demo's web view; `start()` serves it on 127.0.0.1:PORT."""

    def __init__(self, demo: Demo, port: int = DEFAULT_PORT) -> None:
        self.demo = demo
        self.port = port
        self.traffic = TrafficSamples(demo)
        self._runner: web.AppRunner | None = None
        self._static = StaticFiles()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self) -> None:
        app = web.Application(middlewares=[security_headers])
        app.router.add_get("/", self.index)
        app.router.add_get("/site/{site}", self.site)
        app.router.add_get("/traffic", self.traffic_part)
        app.router.add_get("/static/{name}", self._static.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _site_live(self, site: str, query: dict[str, Any]) -> str:
        """SITE's dashboard section, from its daemon's admin socket."""
        sock = self.demo.sites.state(site) / "admin.sock"
        q = "&".join(f"{k}={v}" for k, v in query.items() if k in ("seconds", "sort", "filter"))
        try:
            async with ClientSession(connector=UnixConnector(str(sock))) as c, \
                    c.get(f"http://qkdgw/?part=live&{q}", timeout=ADMIN_TIMEOUT) as r:
                text = await r.text()
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
        except (OSError, TimeoutError, ClientError) as e:
            return (f'<section id="live"><p class="alarm">site {escape(site)}: no answer from'
                    f' its gateway ({escape(str(e) or type(e).__name__)})</p></section>')
        return text

    async def site(self, request: web.Request) -> web.Response:
        site = request.match_info["site"]
        if site not in ("a", "b"):
            raise web.HTTPNotFound(text=f"no site {site!r}: a or b")
        text = await self._site_live(site, dict(request.query))
        return web.Response(text=text, content_type="text/html", charset="utf-8")

    async def traffic_part(self, _: web.Request) -> web.Response:
        return web.Response(text=self.traffic.render(), content_type="text/html",
                            charset="utf-8")

    async def index(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        query.setdefault("seconds", "300")
        a, b = await asyncio.gather(self._site_live("a", query), self._site_live("b", query))
        events = "".join(f"<li>{escape(e)}</li>" for e in self.demo.events[-5:])
        page = (head("qkd-gateway demo", events="", refresh_ms=REFRESH_MS)
                + '<header><h1>qkd-gateway demo</h1><span class="muted">'
                f'{escape(self.demo.plane)} data plane · two sites on this machine</span>'
                '<form id="controls" method="get" action="/"><label>window <select'
                ' name="seconds">' + "".join(
                    f'<option value="{w}"{" selected" if str(w) == query["seconds"] else ""}>'
                    f'{w // 60} min</option>' for w in (300, 900, 3600))
                + '</select></label> <span id="conn" class="muted">static</span></form>'
                '</header><main><div class="slot" data-src="/traffic">'
                + self.traffic.render() + '</div><div class="sites">'
                f'<div class="site"><h2>Site A</h2><div class="slot" data-src="/site/a">{a}'
                '</div></div><div class="site"><h2>Site B</h2><div class="slot"'
                f' data-src="/site/b">{b}</div></div></div>'
                f'<h2>Events</h2><ul>{events or "<li>none yet</li>"}</ul></main>'
                '<script src="/static/dashboard.js"></script></body></html>')
        return web.Response(text=page, content_type="text/html", charset="utf-8")

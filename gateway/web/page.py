"""The dashboard's HTML, rendered on the server from the typed status and history: the page
is complete without script (a `--dump-dom`, a text browser, a screenshot all see the data);
`static/dashboard.js` only swaps in a fresh `#live` section when the daemon says something
changed. Pure functions; escaping is done here, once, for everything that came from outside
(link, peer and KME names come from configuration and KMEs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any
from urllib.parse import urlencode

from gateway.history import LinkHistoryView
from gateway.status import LinkStatus, SiteStatus
from gateway.web.svg import condition_label, link_chart

#: Plots drawn at most on one page (each costs its history's rows): the links needing
#: attention first; `?link=NAME` picks one.
MAX_PLOTS = 6
#: Rows of the links table at most (a hub has thousands: the summary counts them all, the
#: filter finds the rest).
MAX_ROWS = 200
#: Windows the page offers, seconds.
WINDOWS = (300, 900, 3600, 6 * 3600, 24 * 3600)
DEFAULT_WINDOW = 3600
SORTS = ("attention", "name", "epoch", "key-age", "peer")


@dataclass(frozen=True)
class View:
    """What the operator asked the page for (its query string)."""

    filter: str = ""
    sort: str = "attention"
    seconds: int = DEFAULT_WINDOW
    link: str | None = None

    @classmethod
    def of(cls, query: Any) -> View:
        """From a query mapping; anything unexpected falls back to the default."""
        try:
            seconds = int(query.get("seconds", DEFAULT_WINDOW))
        except ValueError:
            seconds = DEFAULT_WINDOW
        sort = query.get("sort", "attention")
        return cls(filter=str(query.get("filter", ""))[:100],
                   sort=sort if sort in SORTS else "attention",
                   seconds=seconds if seconds in WINDOWS else DEFAULT_WINDOW,
                   link=query.get("link") or None)

    def query(self, **changes: Any) -> str:
        values = {"filter": self.filter, "sort": self.sort, "seconds": self.seconds,
                  "link": self.link or "", **changes}
        return urlencode({k: v for k, v in values.items() if v not in ("", None)})


def attention(link: LinkStatus) -> tuple[int, str]:
    """Sort key: blocked first, then alarms, PQC-only, no key, the rest; by name within."""
    rank = 0 if link.condition == "blocked" or (link.blocked and link.state != "standby") \
        else 1 if link.alarms else 2 if link.condition == "pqc" \
        else 3 if link.condition == "none" else 4
    return rank, link.link


def needs_attention(link: LinkStatus) -> bool:
    return attention(link)[0] < 4 and link.state != "standby"


def chosen(status: SiteStatus, v: View) -> list[LinkStatus]:
    needle = v.filter.lower()
    links = [x for x in status.links
             if not needle or needle in x.link.lower() or needle in x.peer.lower()
             or needle in x.state.lower() or needle in x.condition
             or any(needle in a for a in x.alarms)]
    key: Callable[[LinkStatus], Any] = {
        "attention": attention,
        "name": lambda x: x.link,
        "epoch": lambda x: (-x.epoch, x.link),
        "key-age": lambda x: (-(x.key_age or 0), x.link),
        "peer": lambda x: (x.peer, x.link),
    }[v.sort]
    return sorted(links, key=key)


def plotted(status: SiteStatus, v: View) -> list[str]:
    """The links whose plots the page shows."""
    if v.link is not None:
        return [x.link for x in status.links if x.link == v.link]
    return [x.link for x in chosen(status, v)[:MAX_PLOTS]]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _figure(v: float | None, fmt: str) -> str:
    return "unknown" if v is None else format(v, fmt)


def _age_meter(x: LinkStatus) -> str:
    """Key age against interval and hard lifetime: a bar with the interval marked."""
    if x.key_age is None or not x.hard_lifetime:
        return '<span class="muted">no key</span>'
    frac = min(x.key_age / x.hard_lifetime, 1.0)
    mark = (x.interval or 0) / x.hard_lifetime
    level = "late" if frac >= 0.8 else "due" if x.interval and x.key_age > x.interval else "ok"
    return (f'<svg class="meter" viewBox="0 0 100 8" width="100" height="8"'
            f' data-key-age="{x.key_age}" data-interval="{x.interval}"'
            f' data-hard-lifetime="{x.hard_lifetime}"><rect class="meter-bg" x="0" y="0"'
            f' width="100" height="8"/><rect class="meter-fill {level}" x="0" y="0"'
            f' width="{frac * 100:.1f}" height="8"/><line class="meter-mark" x1="{mark * 100:.1f}"'
            f' y1="0" x2="{mark * 100:.1f}" y2="8"/></svg> {_age(x.key_age)}'
            f' <span class="muted">/ {_age(x.interval)} · {_age(x.hard_lifetime)}</span>')


def _alarms(alarms: dict[str, str]) -> str:
    if not alarms:
        return '<span class="muted">none</span>'
    return " ".join(f'<span class="alarm" title="{escape(detail)}">{escape(name)}</span>'
                    for name, detail in sorted(alarms.items()))


def _badge(condition: str) -> str:
    return (f'<span class="badge {escape(condition)}" data-condition="{escape(condition)}">'
            f'{escape(condition_label(condition))}</span>')


def _summary(status: SiteStatus) -> str:
    s = status.summary
    links = status.links
    pqc = sum(1 for x in links if x.condition == "pqc")
    qkd = sum(1 for x in links if x.condition == "qkd")
    alarmed = sum(1 for x in links if x.alarms)
    cards = [("links", s.links, ""), ("QKD in the key", qkd, "qkd"),
             ("PQC-only", pqc, "pqc" if pqc else ""),
             ("blocked", s.blocked if status.ha is None or status.ha.role == "active" else 0,
              "blocked" if s.blocked and (status.ha is None or status.ha.role == "active")
              else ""),
             ("with alarms", alarmed, "alarmed" if alarmed else ""),
             ("exchanges in flight", s.pacing.exchanges, "")]
    return '<div class="cards">' + "".join(
        f'<div class="card {cls}" data-count="{escape(label)}"><div class="n">{n}</div>'
        f'<div class="what">{escape(label)}</div></div>' for label, n, cls in cards) + "</div>"


def _links_table(status: SiteStatus, v: View) -> str:
    rows = chosen(status, v)
    shown = rows[:MAX_ROWS]
    head = ("<tr><th>link</th><th>state</th><th>protected by</th><th>epoch</th>"
            "<th>key age / interval · hard lifetime</th><th>last rekey</th><th>alarms</th>"
            "<th>peer</th><th>data planes</th><th>fingerprint</th></tr>")
    body = []
    for x in shown:
        link = escape(x.link)
        body.append(
            f'<tr class="link{" attention" if needs_attention(x) else ""}" data-link="{link}"'
            f' data-epoch="{x.epoch}" data-fingerprint="{escape(x.fingerprint or "")}"'
            f' data-condition="{escape(x.condition)}">'
            f'<td><a href="?{escape(v.query(link=x.link))}">{link}</a>'
            f'<div class="muted">{escape(x.role)} · {escape(x.mode)}</div></td>'
            f'<td>{escape(x.state)}{" (queued)" if x.queued else ""}</td>'
            f'<td>{_badge(x.condition)}</td>'
            f'<td class="epoch">{x.epoch}</td>'
            f'<td>{_age_meter(x)}</td>'
            f'<td>{_ms(x.last_rekey_latency)}</td>'
            f'<td>{_alarms(x.alarms)}</td>'
            f'<td>{escape(x.peer)}</td>'
            f'<td class="planes">{"<br>".join(escape(p) for p in x.data_planes) or "-"}</td>'
            f'<td class="fingerprint"><code>{escape(x.fingerprint or "-")}</code></td></tr>')
    more = (f'<p class="muted">{len(rows) - len(shown)} more: narrow the filter.</p>'
            if len(rows) > len(shown) else "")
    return (f'<h2>Links <span class="muted">{len(rows)} of {len(status.links)}</span></h2>'
            f'<table class="links"><thead>{head}</thead><tbody>{"".join(body)}</tbody>'
            f'</table>{more}')


def _plots(status: SiteStatus, histories: Sequence[LinkHistoryView], v: View) -> str:
    if not histories:
        return ""
    by_name = {x.link: x for x in status.links}
    out = [f'<h2>History <span class="muted">the last {_age(v.seconds)}</span></h2>'
           '<div class="plots">']
    for h in histories:
        x = by_name.get(h.link)
        threshold = x.qber_threshold if x else None
        out.append(f'<section class="plot" data-link="{escape(h.link)}"><h3>'
                   f'{escape(h.link)} {_badge(x.condition) if x else ""}'
                   f' <span class="muted">KME pair {escape(h.kme_pair or "unknown")}</span>'
                   f'</h3>{link_chart(h, threshold)}</section>')
    out.append('</div><p class="legend"><span class="sw qkd"></span>QKD + ML-KEM + X25519'
               ' <span class="sw pqc"></span>PQC-only <span class="sw blocked"></span>blocked'
               ' <span class="sw none"></span>no key <span class="sw alarm-span"></span>alarm'
               ' · dots: rekeys (height: latency), ×: exchanges given up</p>')
    return "".join(out)


def _kms(status: SiteStatus) -> str:
    """KMS health per KME pair (the links' last polls, one row per pair)."""
    rows: dict[str, LinkStatus] = {}
    counts: dict[str, int] = {}
    for x in status.links:
        key = x.kms.kme or f"KME of {x.peer}"
        rows.setdefault(key, x)
        counts[key] = counts.get(key, 0) + 1
    body = []
    for key, x in sorted(rows.items()):
        k = x.kms
        # Nothing is known of a KME that did not answer, nor a QBER of a link that is down
        # (unknown is not perfect).
        gone = k.error is not None
        quantum = "unknown" if gone or k.link_up is None else "up" if k.link_up else "DOWN"
        qber = "unknown" if gone or k.link_up is False else _figure(k.qber, ".4f")
        rate = "unknown" if gone else _figure(k.key_rate, ",.0f")
        pool = "unknown" if gone or k.stored_key_count is None else str(k.stored_key_count)
        ok = "up" if k.ok else f'<span class="alarm">{escape(k.reason or "down")}</span>'
        body.append(
            f'<tr data-kme="{escape(key)}" data-ok="{int(k.ok)}"><td>{escape(key)}</td>'
            f'<td>{ok}</td><td>{quantum}</td><td class="qber">{qber}</td><td>{rate}</td>'
            f'<td>{pool}</td><td>{counts[key]}</td></tr>')
    return ('<h2>KMS</h2><table class="kms"><thead><tr><th>KME</th><th>QKD keys</th>'
            '<th>quantum link</th><th>QBER</th><th>key rate, bit/s</th><th>pool, keys</th>'
            '<th>links</th></tr></thead><tbody>' + "".join(body) + "</tbody></table>")


def _peers(status: SiteStatus) -> str:
    if not status.peers:
        return ""
    body = "".join(
        f'<tr data-peer="{escape(p.peer)}"><td>{escape(p.peer)}</td><td>{escape(p.address)}</td>'
        f'<td>{"connected" if p.connected else "<span class=alarm>not connected</span>"}</td>'
        f'<td>{p.connects}</td><td>{p.accepted}</td><td>{p.links}</td></tr>'
        for p in status.peers)
    return ('<h2>Peer gateways</h2><table class="peers"><thead><tr><th>peer</th><th>address'
            '</th><th>channel</th><th>connects</th><th>accepted</th><th>links</th></tr></thead>'
            f'<tbody>{body}</tbody></table>')


@dataclass(frozen=True)
class AuditView:
    records: list[dict[str, Any]]
    verified: bool | None  # None: not checked yet
    problems: list[str]
    checked_at: float | None
    verified_head: str | None
    verified_seq: int


def _audit(status: SiteStatus, audit: AuditView) -> str:
    a = status.audit
    if audit.verified is None:
        result = '<span class="muted">not verified yet</span>'
    elif audit.verified:
        result = (f'<span class="ok" data-verified="1">chain verified</span> up to record'
                  f' {audit.verified_seq} <code>{escape(audit.verified_head or "")}</code>'
                  f' at {time.strftime("%H:%M:%S", time.localtime(audit.checked_at or 0))}')
    else:
        result = ('<span class="alarm" data-verified="0">chain BROKEN</span>: '
                  + escape("; ".join(audit.problems[:3])))
    rows = []
    for r in reversed(audit.records):
        ids = r.get("key_ids") or []
        rows.append(
            f'<tr><td>{escape(str(r.get("seq", "")))}</td><td>{escape(str(r.get("ts", "")))}</td>'
            f'<td>{escape(str(r.get("event", "")))}</td><td>{escape(str(r.get("link", "")))}</td>'
            f'<td>{escape(str(r.get("epoch", "") or ""))}</td>'
            f'<td><code>{escape(str(r.get("fingerprint", "") or ""))}</code></td>'
            f'<td>{escape(", ".join(str(i) for i in ids[:2]))}'
            f'{" …" if len(ids) > 2 else ""}</td></tr>')
    head = escape(a.head or "")
    return (f'<h2>Audit trail</h2><p>{a.records} records, head <code data-head="{head}">'
            f'{head or "-"}</code>; {result}</p>'
            '<table class="audit"><thead><tr><th>seq</th><th>time (UTC)</th><th>event</th>'
            '<th>link</th><th>epoch</th><th>fingerprint</th><th>key IDs</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def live(status: SiteStatus, histories: Sequence[LinkHistoryView], audit: AuditView,
         v: View) -> str:
    """The `#live` section: everything that changes."""
    ha = ""
    if status.ha is not None:
        ha = (f' · node <b>{escape(status.ha.node)}</b> <span class="badge'
              f' {"qkd" if status.ha.role == "active" else "none"}">{escape(status.ha.role)}'
              '</span>')
    return (f'<section id="live" data-site="{escape(status.site)}" data-uptime="{status.uptime}">'
            f'<p class="site">site <b>{escape(status.site)}</b>{ha} · up {_age(status.uptime)}'
            f' · updated <time>{time.strftime("%H:%M:%S")}</time></p>'
            + _summary(status) + _links_table(status, v) + _plots(status, histories, v)
            + _kms(status) + _peers(status) + _audit(status, audit) + "</section>")


def page(status: SiteStatus, histories: Sequence[LinkHistoryView], audit: AuditView,
         v: View) -> str:
    """The whole page: controls (kept across updates) and the live section."""
    options = "".join(f'<option value="{w}"{" selected" if w == v.seconds else ""}>'
                      f'{_age(w)}</option>' for w in WINDOWS)
    sorts = "".join(f'<option value="{s}"{" selected" if s == v.sort else ""}>{s}</option>'
                    for s in SORTS)
    return (head(f"qkd-gateway · {status.site}", events="/api/events", refresh_ms=5000)
            + '<header><h1>qkd-gateway</h1><form id="controls" method="get" action="/">'
            f'<input name="filter" type="search" placeholder="filter: link, peer, state, alarm"'
            f' value="{escape(v.filter)}"> <label>sort <select name="sort">{sorts}</select>'
            f'</label> <label>window <select name="seconds">{options}</select></label>'
            + (f'<input type="hidden" name="link" value="{escape(v.link)}">'
               f' <a href="?{escape(v.query(link=""))}">all links</a>' if v.link else "")
            + ' <button type="submit">show</button> <span id="conn" class="muted">'
            'static</span></form></header><main><div class="slot" data-src="/?part=live">'
            + live(status, histories, audit, v)
            + '</div></main><footer class="muted">read-only; no key material: fingerprints and'
            ' key IDs only · <a href="/api/status">/api/status</a> · <a href="/metrics">'
            '/metrics</a></footer><script src="/static/dashboard.js"></script></body></html>')


def head(title: str, *, events: str, refresh_ms: int) -> str:
    """The document's start, up to and including `<body>`, which tells the script where
    the change events come from and how often to refresh anyway."""
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{escape(title)}</title><link rel="stylesheet" href="/static/dashboard.css">'
            f'</head><body data-events="{escape(events)}" data-refresh-ms="{refresh_ms}">')

"""`qkdgw report`: a site's period in one self-contained HTML file (inline SVG and style, no
script, nothing fetched), for the manager who asks at the end of the month how the QKD links
did: availability (time with a valid key against blocked), time with QKD in the key against
PQC-only, rekeys done and given up by cause, rekey latencies, QKD keys consumed, alarms, the
KMS's key rate and QBER, and whether the audit trail verifies.

Computed from the daemon's history (gateway/history.py: conditions, exchanges, KMS polls)
and the audit trail (rekeys and QKD key IDs, each record hash-chained). Pure apart from
`read_trail`: the CLI gathers the inputs.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any

from gateway.audit import MAX_LINE, Verification
from gateway.history import History, LinkHistory, Totals, samples, totals, view
from gateway.web.svg import condition_label, histogram, link_chart

#: Links whose plots the report draws at most (a hub's report lists every link's figures
#: in the table; the plots go to those that need a look first).
MAX_PLOTTED = 24


@dataclass
class TrailCounts:
    """What the audit trail says of a link over the period."""

    rekeyed: int = 0
    qkd_keys: set[str] = field(default_factory=set)  # key IDs fetched (IDs are not secret)
    discarded: int = 0
    link_failed: int = 0
    rejected: int = 0


@dataclass
class Trail:
    links: dict[str, TrailCounts]
    records: int  # in the period
    first: float | None
    last: float | None


def _ts(record: dict[str, Any]) -> float | None:
    raw = record.get("ts")
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw).timestamp()
    except ValueError:
        return None


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while raw := f.readline(MAX_LINE + 1):
            yield raw


def read_trail(path: Path, since: float, until: float) -> Trail:
    """Count the trail's records with a time in [SINCE, UNTIL), per link."""
    links: dict[str, TrailCounts] = {}
    n, first, last = 0, None, None
    for raw in _lines(path):
        try:
            r = json.loads(raw)
        except ValueError:
            continue  # `verify` reports it
        if not isinstance(r, dict):
            continue
        t = _ts(r)
        if t is None or not since <= t < until:
            continue
        n += 1
        first = t if first is None else first
        last = t
        link = r.get("link")
        if not isinstance(link, str) or not link:
            continue
        c = links.setdefault(link, TrailCounts())
        match r.get("event"):
            case "rekeyed":
                c.rekeyed += 1
            case "fetched":
                c.qkd_keys.update(str(k) for k in r.get("key_ids") or [])
            case "discarded":
                c.discarded += 1
            case "link-failed":
                c.link_failed += 1
            case "rejected":
                c.rejected += 1
    return Trail(links=links, records=n, first=first, last=last)


@dataclass(frozen=True)
class Period:
    site: str
    since: float
    until: float
    generated: float


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _pct(part: float, whole: float) -> str:
    return "-" if whole <= 0 else f"{100 * part / whole:.2f} %"


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def _latency_cells(t: Totals) -> str:
    if not t.latencies:
        return "<td>-</td><td>-</td><td>-</td>"
    ms = [v * 1e3 for v in t.latencies]
    return (f"<td>{_quantile(ms, 0.5):.1f}</td><td>{_quantile(ms, 0.99):.1f}</td>"
            f"<td>{max(ms):.1f}</td>")


def _link_row(name: str, t: Totals, c: TrailCounts) -> str:
    valid = t.valid
    available = "" if t.available is None else f"{t.available:.6f}"
    failures = ", ".join(f"{k} {v}" for k, v in sorted(t.failures.items())) or "none"
    alarms = ", ".join(f"{k} {_dur(v)}" for k, v in sorted(t.alarms.items())) or "none"
    return (f'<tr data-link="{escape(name)}"><td>{escape(name)}</td>'
            f'<td class="num" data-observed="{t.observed:.3f}">{_dur(t.observed)}</td>'
            f'<td class="num" data-available="{available}">'
            f'{_pct(valid, t.observed)}</td>'
            f'<td class="num" data-blocked="{t.by_condition["blocked"]:.3f}">'
            f'{_dur(t.by_condition["blocked"])}</td>'
            f'<td class="num" data-qkd="{t.by_condition["qkd"]:.3f}">'
            f'{_pct(t.by_condition["qkd"], valid)}</td>'
            f'<td class="num" data-pqc="{t.by_condition["pqc"]:.3f}">'
            f'{_dur(t.by_condition["pqc"])}</td>'
            f'<td class="num" data-rekeys="{t.rekeys}">{t.rekeys}</td>'
            f'<td class="num" data-rekeyed-audit="{c.rekeyed}">{c.rekeyed}</td>'
            f'<td data-failures="{sum(t.failures.values())}">{escape(failures)}</td>'
            f'{_latency_cells(t)}'
            f'<td class="num" data-qkd-keys="{len(c.qkd_keys)}">{len(c.qkd_keys)}</td>'
            f'<td>{escape(alarms)}</td></tr>')


def _kms_rows(history: History, since: float, until: float) -> str:
    rows = []
    for pair in sorted(history.kms):
        s = samples(history, pair, since, until)
        if not s:
            continue
        up = [x for x in s if x.up]
        rates = [x.key_rate for x in up if x.key_rate is not None]
        qbers = [x.qber for x in up if x.qber is not None]

        def stats(v: list[float], fmt: str) -> str:
            if not v:
                return "<td>unknown</td><td>unknown</td><td>unknown</td>"
            return (f"<td>{format(min(v), fmt)}</td><td>{format(statistics.fmean(v), fmt)}"
                    f"</td><td>{format(max(v), fmt)}</td>")

        rows.append(f'<tr data-kme-pair="{escape(pair)}"><td>{escape(pair)}</td>'
                    f'<td class="num">{len(s)}</td><td class="num">{_pct(len(up), len(s))}</td>'
                    f'{stats(rates, ",.0f")}{stats(qbers, ".4f")}</tr>')
    if not rows:
        return "<p>No KMS status polls in the period.</p>"
    return ('<table><thead><tr><th rowspan="2">KME pair</th><th rowspan="2">polls</th>'
            '<th rowspan="2">answered</th><th colspan="3">key rate, bit/s</th>'
            '<th colspan="3">QBER</th></tr><tr><th>min</th><th>mean</th><th>max</th>'
            '<th>min</th><th>mean</th><th>max</th></tr></thead><tbody>' + "".join(rows)
            + "</tbody></table>")


def _verification(v: Verification | None, error: str | None) -> str:
    if v is None:
        return (f'<p class="alarm" data-audit="unreadable">Audit trail not read:'
                f' {escape(error or "")}</p>')
    if v.ok:
        signed = (f"; {v.checkpoints} signed checkpoints verified against the site's"
                  f" certificate, {v.unsigned_tail} records after the last one"
                  if v.checkpoints else "")
        return (f'<p data-audit="ok"><span class="ok">The audit trail verifies</span>:'
                f' {v.records} records chained from the first to the head'
                f' <code>{escape(v.head.hash)}</code> (record {v.head.seq}){escape(signed)}.</p>')
    return (f'<p data-audit="broken"><span class="alarm">The audit trail does NOT verify'
            f'</span>: {len(v.problems)} problem(s); the first: '
            f'{escape("; ".join(v.problems[:5]))}</p>')


def render(period: Period, history: History, links: list[str], trail: Trail,
           verification: Verification | None, audit_error: str | None = None,
           pairs: dict[str, str | None] | None = None,
           thresholds: dict[str, float] | None = None) -> str:
    """The report as one HTML document. LINKS: the site's links (configured now, and any
    the history or trail still holds)."""
    since, until = period.since, period.until
    pairs = pairs or {}
    figures = {name: totals(history.links.get(name) or LinkHistory(), since, until)
               for name in links}
    rows = "".join(_link_row(n, figures[n], trail.links.get(n, TrailCounts())) for n in links)
    all_latencies = [v * 1e3 for t in figures.values() for v in t.latencies]
    observed = sum(t.observed for t in figures.values())
    valid = sum(t.valid for t in figures.values())
    qkd = sum(t.by_condition["qkd"] for t in figures.values())
    blocked = sum(t.by_condition["blocked"] for t in figures.values())
    rekeys = sum(t.rekeys for t in figures.values())
    failed = sum(sum(t.failures.values()) for t in figures.values())
    keys = sum(len(c.qkd_keys) for c in trail.links.values())
    causes: dict[str, int] = {}
    for t in figures.values():
        for k, v in t.failures.items():
            causes[k] = causes.get(k, 0) + v
    ranked = sorted(links, key=lambda n: (figures[n].available or 0.0, n))[:MAX_PLOTTED]
    plots = "".join(
        f'<section class="plot"><h3>{escape(n)}</h3>'
        + link_chart(view(history, n, pairs.get(n), since, until), (thresholds or {}).get(n))
        + "</section>" for n in ranked)
    css = (resources.files("gateway.web") / "static" / "dashboard.css").read_text()
    summary = [("availability (a valid key)", _pct(valid, observed)),
               ("QKD in the key", _pct(qkd, valid)),
               ("blocked", _dur(blocked)),
               ("rekeys", str(rekeys)), ("exchanges given up", str(failed)),
               ("QKD keys consumed", str(keys)),
               ("rekey latency p50 / p99",
                "-" if not all_latencies else
                f"{_quantile(all_latencies, 0.5):.1f} / {_quantile(all_latencies, 0.99):.1f} ms")]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<title>qkd-gateway report · {escape(period.site)}</title>'
        f'<style>{css}\n.report {{ max-width: 1200px; padding: 1em 2em; }}\n'
        'td.num { text-align: right; font-variant-numeric: tabular-nums; }</style></head>'
        f'<body class="report"><h1>qkd-gateway report: site {escape(period.site)}</h1>'
        f'<p>From <b>{_when(since)}</b> to <b>{_when(until)}</b> ({_dur(until - since)}),'
        f' {len(links)} link(s). Generated {_when(period.generated)}.</p>'
        + _verification(verification, audit_error)
        + '<div class="cards">' + "".join(
            f'<div class="card"><div class="n">{escape(v)}</div><div class="what">'
            f'{escape(k)}</div></div>' for k, v in summary) + "</div>"
        + '<h2>Links</h2><table class="links"><thead><tr><th>link</th><th>keyed for</th>'
          '<th>availability</th><th>blocked</th><th>QKD in the key (of valid)</th>'
          '<th>PQC-only</th><th>rekeys</th><th>rekeyed (audit)</th>'
          '<th>given up, by cause</th><th>p50 ms</th><th>p99 ms</th><th>max ms</th>'
          '<th>QKD keys</th><th>alarms (time raised)</th></tr></thead>'
        f'<tbody>{rows}</tbody></table>'
        + '<h2>Exchanges given up, by cause</h2><p>'
        + (escape(", ".join(f"{k}: {v}" for k, v in sorted(causes.items()))) or "none")
        + "</p><h2>Rekey latency</h2>"
        + histogram("rekey latency, all links", all_latencies, "ms")
        + "<h2>KMS</h2>" + _kms_rows(history, since, until)
        + f'<h2>Links over the period</h2><p class="legend"><span class="sw qkd"></span>'
          f'{condition_label("qkd")} <span class="sw pqc"></span>{condition_label("pqc")}'
          ' <span class="sw blocked"></span>blocked <span class="sw none"></span>no key'
          ' <span class="sw alarm-span"></span>alarm</p>'
        + f'<div class="plots">{plots}</div>'
        + f'<p class="muted">{trail.records} audit records in the period. Availability counts'
          ' the time a link had a valid key (QKD + ML-KEM + X25519, or ML-KEM + X25519 alone)'
          ' against the time it was keyed ("keyed for": a valid key or blocked); time the'
          ' gateway was not running, was a standby or had no key yet is not counted.'
          ' No key material is in this report: key IDs are counted, never listed.</p>'
          '</body></html>')


def parse_time(text: str, now: float) -> float:
    """A time for --since/--until: ISO 8601 (`2026-11-01`, `2026-11-01T08:00`, with `Z` or
    an offset; no zone: UTC), `now`, a duration ago (`90m`, `24h`, `-30d`), or Unix time in
    seconds (`1796600000`)."""
    t = text.strip()
    if t == "now":
        return now
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    ago = t[1:] if t.startswith("-") else t  # (-24h: the same as 24h)
    if ago[-1:] in units and ago[:-1].replace(".", "", 1).isdigit():
        return now - float(ago[:-1]) * units[ago[-1]]
    if t.replace(".", "", 1).isdigit() and len(t.split(".")[0]) >= 9:  # Unix time
        return float(t)
    try:
        when = datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: give ISO 8601 (2026-11-01,"
                         " 2026-11-01T08:00Z), 'now', or a duration ago (24h, 30d)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    value = when.timestamp()
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is out of range")
    return value

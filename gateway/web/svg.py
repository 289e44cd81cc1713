"""Charts as SVG text, drawn on the server: the dashboard and the report embed the same
markup, and the page needs no chart library, no network and no inline script.

Pure functions of the data. Colours come from CSS classes (the dashboard's stylesheet; the
report inlines the same rules) and presentation attributes, never `style=` (the dashboard's
Content-Security-Policy refuses inline styles). Every data point is an element with its
values in `data-*` attributes, so a test (or a curious operator) can read the plot back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from gateway.history import KmsSample, LinkHistoryView, Mark, Span

WIDTH = 720
LEFT = 64  # room for the y axis' labels
RIGHT = 8
BAND = 14  # the condition band's height
TRACK = 56  # each plotted track's height
GAP = 10


@dataclass(frozen=True)
class Axis:
    """Seconds [since, until] onto pixels [LEFT, WIDTH - RIGHT]."""

    since: float
    until: float

    def x(self, t: float) -> float:
        span = max(self.until - self.since, 1e-9)
        return round(LEFT + (min(max(t, self.since), self.until) - self.since) / span
                     * (WIDTH - LEFT - RIGHT), 1)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.3g}M"
    if abs(v) >= 1e3:
        return f"{v / 1e3:.3g}k"
    if abs(v) < 0.01:
        return f"{v:.1e}"
    return f"{v:.3g}"


def _clock(t: float, span: float) -> str:
    return time.strftime("%H:%M" if span > 600 else "%H:%M:%S", time.localtime(t))


def _time_axis(axis: Axis, y: float) -> list[str]:
    span = axis.until - axis.since
    out = [f'<line class="axis" x1="{LEFT}" y1="{y}" x2="{WIDTH - RIGHT}" y2="{y}"/>']
    for i in range(5):
        t = axis.since + span * i / 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        out.append(f'<text class="tick" x="{axis.x(t)}" y="{y + 11}"'
                   f' text-anchor="{anchor}">{_clock(t, span)}</text>')
    return out


def _band(spans: Sequence[Span], axis: Axis, y: float) -> list[str]:
    out = [f'<text class="label" x="{LEFT - 4}" y="{y + BAND - 3}"'
           f' text-anchor="end">key</text>']
    for s in spans:
        end = axis.until if s.end is None else s.end
        x0, x1 = axis.x(s.start), axis.x(end)
        out.append(f'<rect class="span {s.condition}" x="{x0}" y="{y}"'
                   f' width="{max(x1 - x0, 0.5):.1f}" height="{BAND}"'
                   f' data-condition="{s.condition}" data-start="{s.start}"'
                   f' data-end="{"" if s.end is None else s.end}"'
                   f' data-alarms="{escape(",".join(s.alarms))}">'
                   f'<title>{_span_title(s)}</title></rect>')
        if s.alarms:
            out.append(f'<rect class="alarm-span" x="{x0}" y="{y + BAND + 1}"'
                       f' width="{max(x1 - x0, 0.5):.1f}" height="3"'
                       f' data-alarms="{escape(",".join(s.alarms))}"/>')
    return out


_CONDITION = {"qkd": "QKD + ML-KEM + X25519", "pqc": "ML-KEM + X25519 only (PQC-only)",
              "blocked": "blocked", "none": "no key"}


def condition_label(condition: str) -> str:
    return _CONDITION.get(condition, condition)


def _span_title(s: Span) -> str:
    span = _CONDITION.get(s.condition, s.condition)
    when = time.strftime("%H:%M:%S", time.localtime(s.start))
    alarms = f"; alarms: {', '.join(s.alarms)}" if s.alarms else ""
    return escape(f"{span} from {when}{alarms}")


def _scale(values: Sequence[float], floor: float = 0.0) -> tuple[float, float]:
    if not values:
        return floor, 1.0
    lo, hi = min(*values, floor), max(values)
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    return lo, hi


def _track(title: str, y: float, lo: float, hi: float) -> tuple[list[str], float, float]:
    """The track's frame and labels; returns them and (lo, hi) for `_y`."""
    out = [f'<rect class="track" x="{LEFT}" y="{y}" width="{WIDTH - LEFT - RIGHT}"'
           f' height="{TRACK}"/>',
           f'<text class="label" x="{LEFT - 4}" y="{y + 10}" text-anchor="end">'
           f'{escape(_fmt(hi))}</text>',
           f'<text class="label" x="{LEFT - 4}" y="{y + TRACK}" text-anchor="end">'
           f'{escape(_fmt(lo))}</text>',
           f'<text class="title" x="{LEFT + 4}" y="{y + 10}">{escape(title)}</text>']
    return out, lo, hi


def _y(v: float, y: float, lo: float, hi: float) -> float:
    return round(y + TRACK - (v - lo) / (hi - lo) * (TRACK - 4) - 2, 1)


#: The latency track's top is this quantile of the window's latencies (times OUTLIER_ROOM):
#: one slow exchange (a restart's first, at hundreds of ms) must not flatten the rest.
TOP_QUANTILE = 0.95
OUTLIER_ROOM = 1.5


def _epochs(marks: Sequence[Mark], axis: Axis, y: float) -> list[str]:
    latencies = sorted(m.latency * 1e3 for m in marks if m.ok and m.latency is not None)
    lo, hi = _scale(latencies)
    if len(latencies) >= 10:
        hi = min(hi, latencies[int(TOP_QUANTILE * (len(latencies) - 1))] * OUTLIER_ROOM) \
            or hi
    out, lo, hi = _track("rekeys: latency, ms (× gave up)", y, lo, hi)
    for m in marks:
        x = axis.x(m.t)
        if m.ok:
            ms = m.latency * 1e3 if m.latency is not None else lo
            out.append(f'<circle class="mark epoch {"qkd" if m.qkd else "pqc"}'
                       f'{" clipped" if ms > hi else ""}" cx="{x}"'
                       f' cy="{_y(min(ms, hi), y, lo, hi)}" r="2.5" data-epoch="{m.epoch}"'
                       f' data-t="{m.t}" data-latency-ms="{ms:.3f}" data-qkd="{int(m.qkd)}">'
                       f'<title>epoch {m.epoch}: {ms:.1f} ms'
                       f'{"" if m.qkd else " (PQC-only)"}</title></circle>')
        else:
            out.append(f'<path class="mark failure" d="M{x - 3},{y + TRACK - 7}l6,6m0,-6l-6,6"'
                       f' data-epoch="{m.epoch}" data-t="{m.t}" data-cause="{m.cause}">'
                       f'<title>epoch {m.epoch} given up: {escape(m.cause or "?")}</title>'
                       '</path>')
    return out


def _line(samples: Sequence[KmsSample], field: str, title: str, axis: Axis, y: float,
          threshold: float | None = None) -> list[str]:
    points = [(s.t, getattr(s, field)) for s in samples]
    known = [v for _, v in points if v is not None]
    lo, hi = _scale(known + ([threshold] if threshold is not None else []))
    out, lo, hi = _track(title, y, lo, hi)
    if threshold is not None:
        ty = _y(threshold, y, lo, hi)
        out.append(f'<line class="threshold" x1="{LEFT}" y1="{ty}" x2="{WIDTH - RIGHT}"'
                   f' y2="{ty}" data-threshold="{threshold}"/>')
    run: list[str] = []
    runs: list[list[str]] = [run]
    for t, v in points:  # a gap (the KMS unreachable, nothing reported) breaks the line
        if v is None:
            if run:
                run = []
                runs.append(run)
            continue
        run.append(f"{axis.x(t)},{_y(v, y, lo, hi)}")
    for r in runs:
        if len(r) > 1:
            out.append(f'<polyline class="series {field}" points="{" ".join(r)}"/>')
    for t, v in points:
        if v is None:
            out.append(f'<circle class="point unknown {field}" cx="{axis.x(t)}"'
                       f' cy="{y + TRACK - 2}" r="1.5" data-t="{t}" data-value=""/>')
        else:
            out.append(f'<circle class="point {field}" cx="{axis.x(t)}"'
                       f' cy="{_y(v, y, lo, hi)}" r="1.5" data-t="{t}" data-value="{v}"/>')
    return out


def link_chart(h: LinkHistoryView, qber_threshold: float | None = None) -> str:
    """One link over its window: condition band with alarm spans, rekey marks with their
    latency, the KME pool, key rate and QBER (with the link's threshold)."""
    axis = Axis(h.since, h.until)
    y = 4.0
    parts = _band(h.spans, axis, y)
    y += BAND + 4 + GAP
    parts += _epochs(h.marks, axis, y)
    for field, title, threshold in (
            ("stored_key_count", "QKD pool: keys stored", None),
            ("key_rate", "key rate, bit/s", None),
            ("qber", "QBER", qber_threshold)):
        y += TRACK + GAP
        parts += _line(h.kms, field, title, axis, y, threshold)
    y += TRACK + 2
    parts += _time_axis(axis, y)
    height = y + 14
    return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH}'
            f' {height:.0f}" width="{WIDTH}" height="{height:.0f}" role="img"'
            f' data-link="{escape(h.link)}" data-marks="{len(h.marks)}"'
            f' data-samples="{len(h.kms)}" data-spans="{len(h.spans)}">'
            f'<title>{escape(h.link)}: the last {_duration(h.until - h.since)}</title>'
            + "".join(parts) + "</svg>")


def series_chart(title: str, since: float, until: float,
                 series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
                 unit: str = "") -> str:
    """Lines of (t, value) on one track: the demo's traffic counters, say."""
    axis = Axis(since, until)
    values = [v for _, points in series for _, v in points]
    lo, hi = _scale(values)
    out, lo, hi = _track(title + (f", {unit}" if unit else ""), 4.0, lo, hi)
    for i, (name, points) in enumerate(series):
        coords = " ".join(f"{axis.x(t)},{_y(v, 4.0, lo, hi)}" for t, v in points)
        if points:
            out.append(f'<polyline class="series s{i}" points="{coords}"'
                       f' data-name="{escape(name)}" data-points="{len(points)}"'
                       f' data-last="{points[-1][1]}"/>')
        out.append(f'<text class="legend s{i}" x="{WIDTH - RIGHT - 4}" y="{16 + 11 * i}"'
                   f' text-anchor="end">{escape(name)}'
                   f'{"" if not points else " " + _fmt(points[-1][1])}</text>')
    y = 4.0 + TRACK + 2
    out += _time_axis(axis, y)
    height = y + 14
    return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH}'
            f' {height:.0f}" width="{WIDTH}" height="{height:.0f}" role="img">'
            f'<title>{escape(title)}</title>' + "".join(out) + "</svg>")


#: A histogram spanning more than this ratio gets logarithmic bins.
LOG_RATIO = 20


def histogram(title: str, values: Sequence[float], unit: str, bins: int = 20) -> str:
    """A distribution (the report's rekey latencies), log-spaced when it spans decades."""
    height = TRACK + 30
    if not values:
        return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH}'
                f' {height}" width="{WIDTH}" height="{height}"><text class="title" x="{LEFT}"'
                f' y="20">{escape(title)}: none</text></svg>')
    lo, hi = min(values), max(values)
    logs = lo > 0 and hi / lo > LOG_RATIO
    def f(v: float) -> float:
        return math.log10(v) if logs else v

    a, b = f(lo), f(hi)
    if b <= a:
        b = a + 1
    counts = [0] * bins
    for v in values:
        counts[min(int((f(v) - a) / (b - a) * bins), bins - 1)] += 1
    top = max(counts)
    w = (WIDTH - LEFT - RIGHT) / bins
    out, _, _ = _track(f"{title} ({len(values)}; {'log ' if logs else ''}{unit})", 4.0, 0,
                       top)
    for i, c in enumerate(counts):
        bh = c / top * (TRACK - 14)
        edge = a + (b - a) * i / bins
        out.append(f'<rect class="bar" x="{LEFT + i * w + 1:.1f}" y="{4 + TRACK - bh:.1f}"'
                   f' width="{w - 2:.1f}" height="{bh:.1f}" data-count="{c}">'
                   f'<title>{c} from {_fmt(10 ** edge if logs else edge)} {unit}</title></rect>')
    for i in range(5):
        edge = a + (b - a) * i / 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        out.append(f'<text class="tick" x="{LEFT + (WIDTH - LEFT - RIGHT) * i / 4:.1f}"'
                   f' y="{TRACK + 18}" text-anchor="{anchor}">'
                   f'{_fmt(10 ** edge if logs else edge)}</text>')
    return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH}'
            f' {height}" width="{WIDTH}" height="{height}" role="img">'
            f'<title>{escape(title)}</title>' + "".join(out) + "</svg>")


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"

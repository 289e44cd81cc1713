"""What each link and KME pair went through lately: the dashboard's plots and the period
report read it (`GET /api/history`, `qkdgw report`).

Per link, two bounded rings: one mark per exchange (each rekey with its latency and whether
its key carries QKD; each exchange given up, with its cause), and one entry per change of the
link's condition (QKD in the key, PQC-only, blocked, no key) or of its alarms, so a span
shows the moment it begins. Per KME pair, the status polls (reachable, pool level, key
rate, QBER), coalesced to one per SAMPLE_PERIOD. Columns are `array`s, not objects: a full
link costs at most about MAX_MARKS * 25 + MAX_CHANGES * 15 bytes (~0.3 MB); a link rekeying
once a minute about 36 kB a day (docs/operations.md, Dashboard). Never a key, nor a key ID.

The rings are saved in the state directory (`history.json`, 0600) every SAVE_PERIOD and on
stop, and read back at the start; a missing or unreadable file starts an empty history.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common.files import write_private
from gateway.core.events import Alarm, Cause

#: KMS samples closer together than this are coalesced (the last one in a period is kept):
#: 24 h at this resolution is 8,640 samples per KME pair.
SAMPLE_PERIOD = 10.0
#: How far back the history reaches at most; older entries are dropped.
HISTORY_SECONDS = 24 * 3600.0
#: Marks (exchanges) kept per link: 24 h of a rekey every 10 s; faster links keep less time.
MAX_MARKS = 8640
#: Condition changes kept per link: a link that flaps more keeps less time.
MAX_CHANGES = 2048
#: KMS samples per KME pair (24 h at SAMPLE_PERIOD).
MAX_KMS = int(HISTORY_SECONDS / SAMPLE_PERIOD)
#: The history is saved this often (a crash loses at most this much of it) and on stop.
SAVE_PERIOD = 60.0
#: A history file larger than this is not read (a link's full rings take ~0.3 MB).
MAX_FILE = 1 << 30

FORMAT = "qkdgw-history/1"

ALARMS = list(Alarm)
CAUSES = list(Cause)


class Condition(IntEnum):
    """What protects a link's traffic; the dashboard shades spans by it."""

    NONE = 0  # no key yet and not blocked (starting, or a standby node)
    QKD = 1  # the key carries a QKD key: QKD + ML-KEM + X25519
    PQC = 2  # ML-KEM + X25519 alone, while QKD is unavailable
    BLOCKED = 3  # no valid key: the link's traffic is dropped


def alarm_bits(alarms: Iterable[str]) -> int:
    """ALARMS as a bit set (an alarm this version does not know is left out)."""
    bits = 0
    for a in alarms:
        with contextlib.suppress(ValueError):
            bits |= 1 << ALARMS.index(Alarm(a))
    return bits


def alarm_names(bits: int) -> list[str]:
    return [a.value for i, a in enumerate(ALARMS) if bits >> i & 1]


class Ring:
    """Columns of equal length, oldest first, bounded to CAPACITY rows: trimmed by a
    quarter at a time, so appending stays O(1) amortised."""

    def __init__(self, capacity: int, **columns: str) -> None:
        self.capacity = capacity
        self.columns: dict[str, array[Any]] = {name: array(code)
                                               for name, code in columns.items()}

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def append(self, *values: float) -> None:
        for col, v in zip(self.columns.values(), values, strict=True):
            col.append(v)
        if len(self) > self.capacity + self.capacity // 4:
            self.drop(len(self) - self.capacity)

    def drop(self, n: int) -> None:
        for col in self.columns.values():
            del col[:n]

    def last(self, column: str) -> float | None:
        col = self.columns[column]
        return col[-1] if col else None

    def set_last(self, *values: float) -> None:
        for col, v in zip(self.columns.values(), values, strict=True):
            col[-1] = v

    def rows(self, since: float = -math.inf, until: float = math.inf) -> Iterator[tuple[Any, ...]]:
        """Rows with `t` in [SINCE, UNTIL), oldest first."""
        t = self.columns["t"]
        lo = _bisect(t, since)
        for i in range(lo, len(t)):
            if t[i] >= until:
                return
            yield tuple(col[i] for col in self.columns.values())

    def before(self, when: float) -> tuple[Any, ...] | None:
        """The last row before WHEN (what held when a window opens)."""
        i = _bisect(self.columns["t"], when)
        return tuple(col[i - 1] for col in self.columns.values()) if i else None

    def forget_before(self, when: float) -> None:
        self.drop(_bisect(self.columns["t"], when))

    def snapshot(self) -> dict[str, bytes]:
        """The columns' bytes as they are now (a copy: cheap, a memcpy)."""
        return {name: col.tobytes() for name, col in self.columns.items()}

    def load(self, data: dict[str, str]) -> None:
        loaded: dict[str, array[Any]] = {}
        for name, col in self.columns.items():
            fresh = array(col.typecode)
            fresh.frombytes(base64.b64decode(data[name], validate=True))
            loaded[name] = fresh
        if len({len(c) for c in loaded.values()}) != 1:
            raise ValueError("columns of different lengths")
        self.columns = loaded
        if len(self) > self.capacity:
            self.drop(len(self) - self.capacity)


def _bisect(t: array[Any], when: float) -> int:
    lo, hi = 0, len(t)
    while lo < hi:
        mid = (lo + hi) // 2
        if t[mid] < when:
            lo = mid + 1
        else:
            hi = mid
    return lo


class LinkHistory:
    def __init__(self) -> None:
        # ok: 1 rekeyed, 0 given up (cause: index into CAUSES, -1 none); latency NaN: unknown
        self.marks = Ring(MAX_MARKS, t="d", epoch="q", latency="f", ok="b", qkd="b", cause="b")
        self.changes = Ring(MAX_CHANGES, t="d", condition="b", alarms="I")

    def observe(self, now: float, condition: Condition, alarms: int) -> bool:
        """Note the link's condition; a row only when it changed. True if it did."""
        if self.changes.last("condition") == condition \
                and self.changes.last("alarms") == alarms:
            return False
        self.changes.append(now, condition, alarms)
        return True


class KmsHistory:
    def __init__(self) -> None:
        # up: 1 reachable; stored -1 / qber, key_rate NaN: not reported
        self.samples = Ring(MAX_KMS, t="d", up="b", stored="q", qber="f", key_rate="d")

    def sample(self, now: float, up: bool, stored: int | None, qber: float | None,
               key_rate: float | None) -> None:
        row = (now, 1 if up else 0, -1 if stored is None else stored,
               math.nan if qber is None else qber, math.nan if key_rate is None else key_rate)
        t = self.samples.columns["t"]
        if len(t) > 1 and now - t[-2] < SAMPLE_PERIOD and self.samples.last("up") == row[1]:
            self.samples.set_last(*row)  # the period's latest stands for it
        else:
            self.samples.append(*row)


class History:
    """Every link's and KME pair's rings; pure: the daemon feeds it and saves it."""

    def __init__(self) -> None:
        self.links: dict[str, LinkHistory] = {}
        self.kms: dict[str, KmsHistory] = {}
        #: Each peer SAE's KME pair ("kme-a → kme-b"), as its KME named it.
        self.pairs: dict[str, str] = {}

    def link(self, name: str) -> LinkHistory:
        h = self.links.get(name)
        if h is None:
            h = self.links[name] = LinkHistory()
        return h

    def pair(self, name: str) -> KmsHistory:
        h = self.kms.get(name)
        if h is None:
            h = self.kms[name] = KmsHistory()
        return h

    def rekeyed(self, link: str, now: float, epoch: int, latency: float | None,
                qkd: bool) -> None:
        self.link(link).marks.append(now, epoch, math.nan if latency is None else latency,
                                     1, 1 if qkd else 0, -1)

    def gave_up(self, link: str, now: float, epoch: int, cause: Cause) -> None:
        self.link(link).marks.append(now, epoch, math.nan, 0, 0, CAUSES.index(cause))

    def forget(self, links: Iterable[str]) -> None:
        for name in links:
            self.links.pop(name, None)

    def trim(self, now: float) -> None:
        """Drop what is older than HISTORY_SECONDS (but the condition in force then)."""
        horizon = now - HISTORY_SECONDS
        for h in self.links.values():
            h.marks.forget_before(horizon)
            h.changes.drop(max(0, _bisect(h.changes.columns["t"], horizon) - 1))
        for k in self.kms.values():
            k.samples.forget_before(horizon)

    # -- saved in the state directory ---------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The rings as they are now, for `encode` to write elsewhere: taking it is a copy of
        the columns' bytes (a hub's thousand full links: ~10 ms on the event loop); encoding
        it (base64, JSON: the rest of the cost) can then run in a thread."""
        return Snapshot(links={n: (h.marks.snapshot(), h.changes.snapshot())
                               for n, h in self.links.items()},
                        kms={n: k.samples.snapshot() for n, k in self.kms.items()},
                        pairs=dict(self.pairs))

    def dumps(self) -> bytes:
        return self.snapshot().encode()

    @classmethod
    def loads(cls, raw: bytes) -> History:
        """A history saved by `dumps`; ValueError naming what is wrong otherwise."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            alarms, causes = data["alarms"], data["causes"]
            h = cls()
            for name, rings in data["links"].items():
                link = h.link(str(name))
                link.marks.load(rings["marks"])
                link.changes.load(rings["changes"])
                _renumber(link, alarms, causes)
            for name, samples in data["kms"].items():
                h.pair(str(name)).samples.load(samples)
            h.pairs = {str(k): str(v) for k, v in data.get("pairs", {}).items()}
            return h
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"unreadable history: {e}") from None

    def save(self, path: Path) -> None:
        write_private(path, self.dumps())

    @classmethod
    def load(cls, path: Path) -> History:
        """PATH's history; an empty one if there is none. ValueError if it is unreadable."""
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_FILE + 1)
        except FileNotFoundError:
            return cls()
        except OSError as e:
            raise ValueError(f"{path}: {e.strerror}") from None
        if len(raw) > MAX_FILE:
            raise ValueError(f"{path}: larger than {MAX_FILE} bytes")
        return cls.loads(raw)


@dataclass(frozen=True)
class Snapshot:
    """The history's bytes at one moment (`History.snapshot`)."""

    links: dict[str, tuple[dict[str, bytes], dict[str, bytes]]]
    kms: dict[str, dict[str, bytes]]
    pairs: dict[str, str]

    def encode(self) -> bytes:
        """The history file's content (what `History.loads` reads)."""
        def b64(columns: dict[str, bytes]) -> dict[str, str]:
            return {name: base64.b64encode(raw).decode() for name, raw in columns.items()}

        return json.dumps({
            "format": FORMAT,
            "alarms": [a.value for a in ALARMS], "causes": [c.value for c in CAUSES],
            "links": {n: {"marks": b64(marks), "changes": b64(changes)}
                      for n, (marks, changes) in self.links.items()},
            "kms": {n: b64(samples) for n, samples in self.kms.items()},
            "pairs": self.pairs,
        }, separators=(",", ":")).encode()


def _renumber(link: LinkHistory, alarms: list[str], causes: list[str]) -> None:
    """Alarm bits and cause codes as this version numbers them (a file from another one may
    list them in another order)."""
    if alarms != [a.value for a in ALARMS]:
        col = link.changes.columns["alarms"]
        for i, bits in enumerate(col):
            col[i] = alarm_bits(alarms[j] for j in range(len(alarms)) if bits >> j & 1)
    if causes != [c.value for c in CAUSES]:
        col = link.marks.columns["cause"]
        for i, code in enumerate(col):
            name = causes[code] if 0 <= code < len(causes) else ""
            col[i] = next((k for k, c in enumerate(CAUSES) if c.value == name), -1)


# -- what `GET /api/history` answers -------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Mark(_Model):
    t: float = Field(description="when (Unix time)")
    epoch: int = Field(description="the epoch")
    ok: bool = Field(description="rekeyed (true) or given up (false)")
    qkd: bool = Field(description="the key carries a QKD key")
    latency: float | None = Field(description="seconds the exchange took here")
    cause: str | None = Field(description="why it was given up")


class Span(_Model):
    start: float = Field(description="when it began (Unix time)")
    end: float | None = Field(description="when it ended; null: it still holds")
    condition: str = Field(description="qkd, pqc, blocked or none")
    alarms: list[str] = Field(description="alarms raised meanwhile")


class KmsSample(_Model):
    t: float
    up: bool = Field(description="the KME answered the status poll")
    stored_key_count: int | None
    qber: float | None
    key_rate: float | None


class LinkHistoryView(_Model):
    """One link's recent past: `GET /api/history?link=NAME&seconds=S`."""

    link: str
    since: float = Field(description="the window's start (Unix time)")
    until: float = Field(description="the window's end: now")
    kme_pair: str | None = Field(description="the KME pair whose samples follow")
    marks: list[Mark]
    spans: list[Span]
    kms: list[KmsSample]


def _num(v: float) -> float | None:
    return None if math.isnan(v) else round(v, 6)


def view(history: History, link: str, pair: str | None, since: float,
         until: float) -> LinkHistoryView:
    h = history.links.get(link) or LinkHistory()
    marks = [Mark(t=round(t, 3), epoch=e, ok=bool(ok), qkd=bool(q), latency=_num(lat),
                  cause=CAUSES[c].value if 0 <= c < len(CAUSES) else None)
             for t, e, lat, ok, q, c in h.marks.rows(since, until)]
    return LinkHistoryView(link=link, since=since, until=until, kme_pair=pair, marks=marks,
                           spans=spans(h, since, until), kms=samples(history, pair, since,
                                                                      until))


def spans(h: LinkHistory, since: float, until: float) -> list[Span]:
    """The link's conditions over [SINCE, UNTIL), clipped to it."""
    rows = list(h.changes.rows(since, until))
    first = h.changes.before(since)
    if first is not None:
        rows.insert(0, (since, *first[1:]))
    out = []
    for i, (t, cond, bits) in enumerate(rows):
        end = rows[i + 1][0] if i + 1 < len(rows) else None
        out.append(Span(start=max(t, since), end=end, condition=Condition(cond).name.lower(),
                        alarms=alarm_names(bits)))
    return out


def samples(history: History, pair: str | None, since: float,
            until: float) -> list[KmsSample]:
    k = history.kms.get(pair) if pair else None
    if k is None:
        return []
    return [KmsSample(t=round(t, 3), up=bool(up), stored_key_count=None if s < 0 else s,
                      qber=_num(q), key_rate=_num(r))
            for t, up, s, q, r in k.samples.rows(since, until)]


@dataclass(frozen=True)
class Totals:
    """A link's figures over a period (the report)."""

    seconds: float
    by_condition: dict[str, float]
    rekeys: int
    rekeys_qkd: int
    failures: dict[str, int]
    latencies: list[float]
    alarms: dict[str, float]  # seconds each alarm was raised

    @property
    def valid(self) -> float:
        """Seconds with a valid key (QKD + ML-KEM + X25519, or PQC-only)."""
        return self.by_condition["qkd"] + self.by_condition["pqc"]

    @property
    def observed(self) -> float:
        """Seconds the gateway was keying the link: with a valid key or blocked (not: not
        running, a standby, no key yet)."""
        return self.valid + self.by_condition["blocked"]

    @property
    def available(self) -> float | None:
        """Fraction of the observed time with a valid key; None: nothing observed."""
        return self.valid / self.observed if self.observed else None


def totals(h: LinkHistory, since: float, until: float) -> Totals:
    by_condition = {c.name.lower(): 0.0 for c in Condition}
    alarms: dict[str, float] = {}
    for s in spans(h, since, until):
        d = (until if s.end is None else s.end) - s.start
        by_condition[s.condition] += d
        for a in s.alarms:
            alarms[a] = alarms.get(a, 0.0) + d
    covered = sum(by_condition.values())
    if covered < until - since:  # before the history's first entry: nothing is known
        by_condition["none"] += until - since - covered
    rekeys = qkd = 0
    failures: dict[str, int] = {}
    latencies = []
    for _, _, lat, ok, q, c in h.marks.rows(since, until):
        if ok:
            rekeys += 1
            qkd += q
            if not math.isnan(lat):
                latencies.append(lat)
        else:
            cause = CAUSES[c].value if 0 <= c < len(CAUSES) else "unknown"
            failures[cause] = failures.get(cause, 0) + 1
    return Totals(seconds=until - since, by_condition=by_condition, rekeys=rekeys,
                  rekeys_qkd=qkd, failures=failures, latencies=latencies, alarms=alarms)

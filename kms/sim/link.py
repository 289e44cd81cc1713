"""The key supply of one QKD link over time, without I/O: every method takes `now`.

The pool holds secret bits. It fills at the secret key rate, scaled by the QBER (BB84
asymptotic secret fraction 1 − 2·h(Q), Shor–Preskill, stretched to the link's `qber_limit`
when it has one) relative to the nominal QBER, decaying with a half-life when the link ages,
and stopping during outages (scheduled, seeded random, or injected); it never holds more than
`capacity_bits`. The QBER may drift, piecewise constant per DRIFT_STEP. The supply between two
instants is integrated exactly, so the result does not depend on how often the simulator
looks.

The link keeps its own clock: `time_scale` times faster than the wall clock the methods are
given (from `start`). The rate it reports is per wall-clock second.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from kms.sim.config import QBER_LIMIT, Outage
from kms.sim.profiles import DRIFT_STEP, QberDrift, RandomOutages

#: Where 1 − 2·h(Q) reaches zero: the one-way BB84 limit a `qber_limit` stretches.
SHOR_PRESKILL_ZERO = 0.110028
#: The drift's components: periods as fractions of the slowest (incommensurate, so the sum
#: does not repeat soon), and their weights.
DRIFT_COMPONENTS = ((1.0, 0.6), (0.43, 0.3), (0.21, 0.1))


def binary_entropy(q: float) -> float:
    if q <= 0.0 or q >= 1.0:
        return 0.0
    return -q * math.log2(q) - (1 - q) * math.log2(1 - q)


def secret_fraction(qber: float, limit: float | None = None) -> float:
    """Shor–Preskill: the fraction of sifted bits left after error correction and privacy
    amplification; with LIMIT, the same curve stretched to reach zero at LIMIT (post-
    processing that tolerates more, e.g. two-way)."""
    q = qber if limit is None else qber * SHOR_PRESKILL_ZERO / limit
    return max(0.0, 1.0 - 2.0 * binary_entropy(q))


def _rng(seed: int, name: str, what: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}/{name}/{what}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))  # noqa: S311 (a model, not keys)


class Drift:
    """A bounded QBER wander: three sines of seeded phases, sampled per DRIFT_STEP."""

    def __init__(self, spec: QberDrift, seed: int, name: str) -> None:
        rng = _rng(seed, name, "drift")
        self.amplitude = spec.amplitude
        self.parts = [(spec.period * f, w, rng.uniform(0, 2 * math.pi))
                      for f, w in DRIFT_COMPONENTS]

    def offset(self, step: int) -> float:
        """The QBER's deviation during drift step STEP (link seconds / DRIFT_STEP)."""
        t = (step + 0.5) * DRIFT_STEP
        return self.amplitude * sum(w * math.sin(2 * math.pi * t / p + phase)
                                    for p, w, phase in self.parts)


class OutageTimes:
    """Seeded random outage windows, in link seconds from the start, made as needed."""

    def __init__(self, spec: RandomOutages, seed: int, name: str) -> None:
        self.spec = spec
        self._rng = _rng(seed, name, "outages")
        self.starts: list[float] = []
        self.ends: list[float] = []

    def windows(self, a: float, b: float) -> Iterator[tuple[float, float]]:
        """Windows [lo, hi) that meet [a, b] (link seconds from the start)."""
        s = self.spec
        while not self.ends or self.ends[-1] <= b:
            prev = self.ends[-1] if self.ends else 0.0
            lo = prev + self._rng.expovariate(1.0 / (s.every - s.duration))
            self.starts.append(lo)
            self.ends.append(lo + self._rng.uniform(0.5, 1.5) * s.duration)
        i = bisect.bisect_right(self.ends, a)
        while i < len(self.starts) and self.starts[i] <= b:
            yield self.starts[i], self.ends[i]
            i += 1


@dataclass
class LinkModel:
    key_rate: float  # bit/s at the nominal QBER, at start (link time)
    nominal_qber: float
    capacity_bits: int
    start: float  # wall-clock instant the link's clock starts from
    stored_bits: float
    half_life: float | None = None
    outages: tuple[Outage, ...] = ()
    qber_limit: float | None = None  # None: BB84 one-way, QBER_LIMIT
    drift: QberDrift | None = None
    random_outages: RandomOutages | None = None
    seed: int = 0
    name: str = ""
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        self.manual_qber: float | None = None  # set by the admin API: overrides the drift
        self._last = self.start  # link time of the last advance
        self._manual: list[tuple[float, float]] = []  # link-time windows
        self._drift = None if self.drift is None else Drift(self.drift, self.seed, self.name)
        self._random = None if self.random_outages is None else \
            OutageTimes(self.random_outages, self.seed, self.name)

    def link_time(self, now: float) -> float:
        """The link's clock at wall-clock instant NOW."""
        return self.start + (now - self.start) * self.time_scale

    # -- what the link looks like at an instant (wall clock) -----------------------------

    def rate_at(self, now: float) -> float:
        """Secret key rate in bit per wall-clock second at NOW (0 during an outage)."""
        t = self.link_time(now)
        if self._in_outage(t):
            return 0.0
        return self._scale(self.qber_at_link(t)) * self._decay(t) * self.time_scale

    def in_outage(self, now: float) -> bool:
        return self._in_outage(self.link_time(now))

    def qber_at(self, now: float) -> float:
        return self.qber_at_link(self.link_time(now))

    def qber_at_link(self, t: float) -> float:
        if self.manual_qber is not None:
            return self.manual_qber
        if self._drift is None:
            return self.nominal_qber
        step = math.floor((t - self.start) / DRIFT_STEP)
        return min(0.5, max(0.0, self.nominal_qber + self._drift.offset(step)))

    # -- changes -------------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """Add the key generated since the last call."""
        t = self.link_time(now)
        if t <= self._last:
            return
        gained = self._supply(self._last, t)
        self.stored_bits = min(float(self.capacity_bits), self.stored_bits + gained)
        self._last = t

    def take(self, bits: int, now: float) -> bool:
        """Remove BITS from the pool if it holds that many."""
        self.advance(now)
        if bits > self.stored_bits:
            return False
        self.stored_bits -= bits
        return True

    def set_qber(self, qber: float | None, now: float) -> None:
        """Hold the QBER at QBER (None: back to the nominal value and its drift)."""
        if qber is not None and not 0.0 <= qber <= 0.5:
            raise ValueError("QBER is a fraction between 0 and 0.5")
        self.advance(now)
        self.manual_qber = qber

    def start_outage(self, now: float, duration: float) -> None:
        """An outage from NOW for DURATION wall-clock seconds."""
        self.advance(now)
        t = self.link_time(now)
        self._manual = [(a, b) for a, b in self._manual if b > t]
        self._manual.append((t, t + duration * self.time_scale))

    def end_outages(self, now: float) -> None:
        self.advance(now)
        self._manual.clear()

    def set_stored(self, bits: float, now: float) -> None:
        self.advance(now)
        self.stored_bits = max(0.0, min(float(self.capacity_bits), bits))

    # -- integration (link time) ---------------------------------------------------------

    def _in_outage(self, t: float) -> bool:
        return any(a <= t < b for a, b in self._outage_windows(t, t))

    def _scale(self, qber: float) -> float:
        """Bit per link second at QBER, before ageing."""
        limit = self.qber_limit or QBER_LIMIT
        nominal = secret_fraction(self.nominal_qber, self.qber_limit)
        if qber >= limit or nominal == 0.0:
            return 0.0
        return self.key_rate * secret_fraction(qber, self.qber_limit) / nominal

    def _decay(self, t: float) -> float:
        if self.half_life is None:
            return 1.0
        return float(2.0 ** (-(t - self.start) / self.half_life))

    def _decay_integral(self, a: float, b: float) -> float:
        if self.half_life is None:
            return b - a
        k = math.log(2) / self.half_life
        return (math.exp(-k * (a - self.start)) - math.exp(-k * (b - self.start))) / k

    def _supply(self, a: float, b: float) -> float:
        """Bits made in link time [a, b]: piecewise, where the drift holds the QBER."""
        if self._drift is None or self.manual_qber is not None:
            return self._supply_at(a, b, self._scale(self.qber_at_link(a)))
        total, cursor = 0.0, a
        while cursor < b:
            step = math.floor((cursor - self.start) / DRIFT_STEP)
            end = min(b, self.start + (step + 1) * DRIFT_STEP)
            if end <= cursor:  # float rounding at a step's edge
                end = min(b, cursor + DRIFT_STEP)
            total += self._supply_at(cursor, end, self._scale(self.qber_at_link(cursor)))
            cursor = end
        return total

    def _supply_at(self, a: float, b: float, scale: float) -> float:
        """Bits made in [a, b] at a constant SCALE, without the outages' time."""
        if scale == 0.0:
            return 0.0
        total, cursor = 0.0, a
        for lo, hi in sorted(self._outage_windows(a, b)):
            if hi <= cursor:
                continue
            if lo > cursor:
                total += self._decay_integral(cursor, min(lo, b))
            cursor = max(cursor, hi)
            if cursor >= b:
                break
        if cursor < b:
            total += self._decay_integral(cursor, b)
        return scale * total

    def _outage_windows(self, a: float, b: float) -> Iterator[tuple[float, float]]:
        """Outage intervals [lo, hi) that meet [a, b]."""
        for lo, hi in self._manual:
            if lo <= b and hi > a:
                yield lo, hi
        if self._random is not None:
            for lo, hi in self._random.windows(a - self.start, b - self.start):
                yield self.start + lo, self.start + hi
        for o in self.outages:
            first = self.start + o.start
            if o.every is None:
                if first <= b and first + o.duration > a:
                    yield first, first + o.duration
                continue
            n = max(0, math.floor((a - first - o.duration) / o.every))
            while (lo := first + n * o.every) <= b:
                if lo + o.duration > a:
                    yield lo, lo + o.duration
                n += 1

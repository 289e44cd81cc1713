"""The key supply of one QKD link over time, without I/O: every method takes `now`.

The pool holds secret bits. It fills at the secret key rate, scaled by the QBER (BB84
asymptotic secret fraction 1 − 2·h(Q), Shor–Preskill) relative to the configured nominal
QBER, decaying with a half-life when the link ages, and stopping during outages; it never
holds more than `capacity_bits`. The supply between two instants is integrated exactly, so
the result does not depend on how often the simulator looks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from kms.sim.config import QBER_LIMIT, Outage


def binary_entropy(q: float) -> float:
    if q <= 0.0 or q >= 1.0:
        return 0.0
    return -q * math.log2(q) - (1 - q) * math.log2(1 - q)


def secret_fraction(qber: float) -> float:
    """Shor–Preskill: the fraction of sifted bits left after error correction and privacy
    amplification."""
    return max(0.0, 1.0 - 2.0 * binary_entropy(qber))


@dataclass
class LinkModel:
    key_rate: float  # bit/s at the nominal QBER, at start
    nominal_qber: float
    capacity_bits: int
    start: float
    stored_bits: float
    half_life: float | None = None
    outages: tuple[Outage, ...] = ()

    def __post_init__(self) -> None:
        self.qber = self.nominal_qber
        self._last = self.start
        self._manual: list[tuple[float, float]] = []

    # -- what the link looks like at an instant ------------------------------------------

    def rate_at(self, t: float) -> float:
        """Secret key rate in bit/s at instant T (0 during an outage)."""
        if self.in_outage(t):
            return 0.0
        return self._scale() * self._decay(t)

    def in_outage(self, t: float) -> bool:
        return any(a <= t < b for a, b in self._outage_windows(t, t))

    # -- changes -------------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """Add the key generated since the last call."""
        if now <= self._last:
            return
        gained = self._supply(self._last, now)
        self.stored_bits = min(float(self.capacity_bits), self.stored_bits + gained)
        self._last = now

    def take(self, bits: int, now: float) -> bool:
        """Remove BITS from the pool if it holds that many."""
        self.advance(now)
        if bits > self.stored_bits:
            return False
        self.stored_bits -= bits
        return True

    def set_qber(self, qber: float, now: float) -> None:
        if not 0.0 <= qber <= 0.5:
            raise ValueError("QBER is a fraction between 0 and 0.5")
        self.advance(now)
        self.qber = qber

    def start_outage(self, now: float, duration: float) -> None:
        self.advance(now)
        self._manual = [(a, b) for a, b in self._manual if b > now]
        self._manual.append((now, now + duration))

    def end_outages(self, now: float) -> None:
        self.advance(now)
        self._manual.clear()

    def set_stored(self, bits: float, now: float) -> None:
        self.advance(now)
        self.stored_bits = max(0.0, min(float(self.capacity_bits), bits))

    # -- integration ---------------------------------------------------------------------

    def _scale(self) -> float:
        nominal = secret_fraction(self.nominal_qber)
        if self.qber >= QBER_LIMIT or nominal == 0.0:
            return 0.0
        return self.key_rate * secret_fraction(self.qber) / nominal

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
        scale = self._scale()
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

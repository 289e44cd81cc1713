"""What one link knows of its KMS: healthy or not (and why), its key supply, the KME
identities that go into the transcript, and the back-offs after failures.

Fed by the driver's status polls and by the outcome of key requests; the machine asks
whether QKD keys can be had now (`usable`), how fast they come (`supply_keys_per_s`), and
whether this link may draw one (`may_draw`).

Several links may share one KME pair's supply. While the pool is above the reserve it pays
for every link's cadence; once it is down to the reserve the supply is rationed: each link
earns credit at its share of the supply (`share`, from the driver: its weight normalised
over the links drawing from the pair), from nothing, and draws a QKD key only with a whole
key of credit; a link that has had no key yet may take its first from the reserve at once.
Rationing ends when the pool has grown a key per sharing link above the reserve again.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from gateway.core.events import KmsStatusObserved
from gateway.core.table import IllegalEvent

#: How far back the QKD supply is estimated from the pool's trend, seconds.
SUPPLY_WINDOW = 300.0
#: The pool's consumption for the forecast is its trend over this many recent status polls
#: (100 s at the default 10 s): "the current consumption", counted in polls so that it
#: follows `kms_status_interval`, yet enough of them that one uneven poll does not swing it ...
FORECAST_POLLS = 10
#: ... and at least this many (two intervals) before any forecast.
FORECAST_MIN_POLLS = 3
#: Credit a rationed link may save up, in keys: enough to absorb the status polls' jitter,
#: too little for a link that left its share unused to take a burst from the others.
CREDIT_CAP = 2.0
#: The shortest wait for credit: a wait shorter than float rounding of the clock would not
#: move it (and the link would spin); a millisecond is far below any rekey interval.
CREDIT_WAIT_MIN = 0.001
#: No KMS number the core acts on may exceed this (the client's model bounds them far lower).
MAX_READING = 1e15


@dataclass(frozen=True)
class Supply:
    """A link's part of its KME pair's QKD supply (docs/operations.md, the status)."""

    share: float | None  # fraction of the supply it may draw once rationed (I)
    rationed: bool  # the pool is down to the reserve
    qkd_cadence: float | None  # seconds between its QKD keys as things stand (I)
    pool_dry_in: float | None  # forecast: seconds until the pool is down to the reserve
    qkd_keys: int  # QKD keys it fetched since it started


@dataclass
class KmsView:
    ok: bool = True  # from the status polls: reachable, link up, QBER below threshold
    reason: str = ""
    failed_until: float = 0.0  # a fetch failed: no QKD until then (then try again)
    stored: int | None = None
    key_rate: float | None = None
    kme_id: str = ""
    peer_kme_id: str = ""
    refused_until: float = 0.0  # the peer's KMS failed: PQC-only until then (fallback mode)
    samples: deque[tuple[float, int, int]] = field(default_factory=deque)
    share: float = 1.0  # this link's fraction of the KME pair's supply
    sharing: int = 1  # links drawing from the pair
    rationed: bool = False  # the pool is down to the reserve: draw only with credit
    credit: float = 0.0  # keys this link may draw while rationed
    credit_at: float | None = None  # when `credit` was last brought up to date
    key_bits: int = 256  # the link's QKD key size (the supply in keys)

    def observe(self, event: KmsStatusObserved, now: float, consumed: int,
                qber_threshold: float, reserve_keys: int) -> str | None:
        """Take a status poll's answer; what makes QKD unusable, or None. CONSUMED: the
        keys this link fetched so far (with the pool's trend: the supply)."""
        for name, value in (("qber", event.qber), ("key_rate", event.key_rate),
                            ("stored_key_count", event.stored_key_count)):
            if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_READING):
                # The driver bounds what a KME says; this is the core's own guard: a NaN
                # would pass the QBER gate and make every deadline NaN.
                raise IllegalEvent(f"KMS status with {name} {value!r}")
        if not (math.isfinite(event.share) and 0 <= event.share <= 1) or event.sharing < 1:
            raise IllegalEvent(f"KMS status with share {event.share!r} of {event.sharing!r}")
        if self.rationed:
            self._bring_credit_up_to(now)  # at the supply it had until now
        self.stored, self.key_rate = event.stored_key_count, event.key_rate
        self.share, self.sharing = event.share, event.sharing
        stored = event.stored_key_count
        if stored is None:  # no pool figures: nothing to ration on, nor to forecast
            self.rationed = False
            self.samples.clear()
        elif stored <= reserve_keys and not self.rationed:
            # Credit left from an earlier stretch would be drawn at once from an empty pool.
            self.rationed, self.credit, self.credit_at = True, 0.0, now
        elif stored >= reserve_keys + self.sharing:
            self.rationed = False
        self.kme_id, self.peer_kme_id = event.kme_id, event.peer_kme_id
        if stored is not None:
            self.samples.append((now, stored, consumed))
        while self.samples and self.samples[0][0] < now - SUPPLY_WINDOW:
            self.samples.popleft()
        problem = None
        if event.link_up is False:
            problem = "the QKD link is down"
        elif event.qber is not None and event.qber > qber_threshold:
            problem = f"QBER {event.qber:.3f} above the {qber_threshold} threshold"
        self.ok, self.reason = problem is None, problem or ""
        return problem

    def unreachable(self, reason: str) -> None:
        self.ok, self.reason = False, reason

    def usable(self, now: float) -> bool:
        """QKD keys can be asked for: the status is known (the KME identities go into the
        transcript) and good, and no recent failure says otherwise."""
        if not (self.kme_id and self.peer_kme_id):
            self.reason = self.reason or "no KMS status yet"
            return False
        return self.ok and now >= self.failed_until and now >= self.refused_until

    def supply_keys_per_s(self, key_bits: int) -> float | None:
        """The link's QKD key supply: the KME's reported key rate, or the pool's trend."""
        if self.key_rate is not None:
            return self.key_rate / key_bits
        if len(self.samples) >= 2 and self.samples[-1][0] - self.samples[0][0] >= 10.0:
            (t0, s0, c0), (t1, s1, c1) = self.samples[0], self.samples[-1]
            return max(0.0, ((s1 + c1) - (s0 + c0)) / (t1 - t0))
        return None

    # -- sharing the supply ------------------------------------------------------------------

    def allotment(self) -> float | None:
        """Keys per second this link earns: its share of the pair's supply."""
        supply = self.supply_keys_per_s(self.key_bits)
        return None if supply is None else supply * self.share

    def _credit_now(self, now: float) -> float:
        rate = self.allotment() or 0.0
        since = 0.0 if self.credit_at is None else max(0.0, now - self.credit_at)
        return min(CREDIT_CAP, self.credit + rate * since)

    def _bring_credit_up_to(self, now: float) -> None:
        self.credit, self.credit_at = self._credit_now(now), now

    def may_draw(self, now: float, *, keyless: bool = False) -> bool:
        """This link may take a QKD key from the pool now: it is not rationed, its share has
        earned one, or it is KEYLESS (has had no key yet: the reserve is kept for that)."""
        return not self.rationed or keyless or self._credit_now(now) >= 1.0

    def drew(self, now: float, *, keyless: bool = False) -> None:
        """The link asked the KME for a key: paid from its credit while rationed, unless it
        was KEYLESS."""
        if self.rationed and not keyless:
            self.credit, self.credit_at = max(0.0, self._credit_now(now) - 1.0), now

    def until_credit(self, now: float) -> float:
        """Seconds until the link's share has earned a key (inf without supply)."""
        missing = 1.0 - self._credit_now(now)
        if missing <= 0:
            return 0.0
        rate = self.allotment() or 0.0
        return max(CREDIT_WAIT_MIN, missing / rate) if rate > 0 else math.inf

    def cadence(self, interval: float) -> float | None:
        """Seconds between this link's QKD keys as things stand: its INTERVAL while the pool
        pays for it; rationed, the slower of that and its share; None without supply."""
        if not self.ok:
            return None
        if not self.rationed:
            return interval
        rate = self.allotment()
        return None if not rate else max(interval, 1.0 / rate)

    def dry_in(self, now: float, reserve_keys: int) -> float | None:
        """Forecast: seconds from NOW until the pool is down to RESERVE_KEYS at its current
        net consumption (the trend of the last FORECAST_POLLS polls); 0 when it is; None
        while it is not shrinking or too little is known."""
        if self.stored is None:
            return None
        if self.stored <= reserve_keys:
            return 0.0
        recent = [(t, s) for t, s, _ in list(self.samples)[-FORECAST_POLLS:]]
        if len(recent) < FORECAST_MIN_POLLS or recent[-1][0] <= recent[0][0]:
            return None
        n = len(recent)
        mt = sum(t for t, _ in recent) / n
        ms = sum(s for _, s in recent) / n
        var = sum((t - mt) ** 2 for t, _ in recent)
        slope = sum((t - mt) * (s - ms) for t, s in recent) / var  # keys per second
        if slope >= 0:
            return None
        last = recent[-1][0]  # the fitted line's value there, not the last poll's count alone
        level = ms + slope * (last - mt)
        return max(0.0, (level - reserve_keys) / -slope - (now - last))

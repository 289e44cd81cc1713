"""What one link knows of its KMS: healthy or not (and why), its key supply, the KME
identities that go into the transcript, and the back-offs after failures.

Fed by the driver's status polls and by the outcome of key requests; the machine asks
whether QKD keys can be had now (`usable`) and how fast they come (`supply_keys_per_s`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from gateway.core.events import KmsStatusObserved
from gateway.core.table import IllegalEvent

#: How far back the QKD supply is estimated from the pool's trend, seconds.
SUPPLY_WINDOW = 300.0
#: No KMS number the core acts on may exceed this (the client's model bounds them far lower).
MAX_READING = 1e15


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

    def observe(self, event: KmsStatusObserved, now: float, consumed: int,
                qber_threshold: float) -> str | None:
        """Take a status poll's answer; what makes QKD unusable, or None. CONSUMED: the
        keys this link fetched so far (with the pool's trend: the supply)."""
        for name, value in (("qber", event.qber), ("key_rate", event.key_rate),
                            ("stored_key_count", event.stored_key_count)):
            if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_READING):
                # The driver bounds what a KME says; this is the core's own guard: a NaN
                # would pass the QBER gate and make every deadline NaN.
                raise IllegalEvent(f"KMS status with {name} {value!r}")
        self.stored, self.key_rate = event.stored_key_count, event.key_rate
        self.kme_id, self.peer_kme_id = event.kme_id, event.peer_kme_id
        self.samples.append((now, event.stored_key_count, consumed))
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

"""When to rekey, how long to wait, and what to do without QKD: the policy of one link.

All durations are seconds. The defaults are for production; the demo and tests shorten them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Mode(StrEnum):
    #: Every epoch needs a QKD key and ML-KEM + X25519. Without QKD keys the current key is
    #: kept until its hard lifetime, then traffic is blocked.
    QKD_PQC = "qkd+pqc"
    #: While the KMS cannot deliver, keep rekeying with ML-KEM + X25519 alone, raise the
    #: qkd-fallback alarm, and return to QKD at the first chance.
    PQC_FALLBACK = "pqc-fallback"


@dataclass(frozen=True)
class Policy:
    mode: Mode = Mode.QKD_PQC
    #: Rekey interval. An hour keeps each key's exposure short at negligible cost.
    interval: float = 3600.0
    #: ± fraction of the interval, so links sharing a KME do not all rekey at once.
    jitter: float = 0.1
    #: Past this age with no fresh key, traffic is blocked. Four intervals: three failed
    #: rekeys in a row are tolerated before failing closed.
    hard_lifetime: float = 4 * 3600.0
    #: How long an old epoch's inbound key outlives the peer's switch: covers packets in
    #: flight and reordering on the WAN.
    grace: float = 2.0
    #: First retransmission of an unanswered message; doubles up to `retransmit_max`.
    #: Half a second is many round trips on any WAN and cheap if the peer is just slow.
    retransmit: float = 0.5
    retransmit_max: float = 4.0
    #: An exchange not finished in this time is abandoned and retried with fresh keys.
    attempt_timeout: float = 15.0
    #: Wait before retrying after a failed exchange; doubles up to `retry_backoff_max`.
    retry_backoff: float = 1.0
    retry_backoff_max: float = 60.0
    #: QKD key size fetched per epoch, bits.
    qkd_key_bits: int = 256
    #: A QBER above this (from the KMS status extension) counts as the KMS being
    #: unavailable. Not a security margin: a KMS delivers keys already error-corrected and
    #: privacy-amplified for the QBER it measured (field links deliver at 13.3 %). A QBER
    #: above 20 %, where not even two-way BB84 post-processing distils a key, means the
    #: link's reports do not describe a working link: a fault, or someone at the fibre.
    qber_threshold: float = 0.2
    #: Keys the pool may be spent down to at the configured cadence; below it, rekeys are
    #: paced to the link's supply.
    reserve_keys: int = 10
    #: This link's weight when several links draw from one KME pair's supply: the driver
    #: gives each w / max(1, sum of the weights) of it once the pool is down to the reserve
    #: (weights summing to at most 1 are fractions, the rest left to others).
    qkd_share: float = 1.0
    #: Fetch the next epoch's QKD key during the current exchange (one key ahead), so no
    #: rekey waits for a KME round trip. Same consumption: one key per epoch.
    prefetch: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.jitter < 0.5:
            raise ValueError("jitter must be at least 0 and below 0.5")
        if self.hard_lifetime <= self.interval:
            raise ValueError("hard_lifetime must be longer than interval")
        if self.grace <= 0 or self.retransmit <= 0 or self.attempt_timeout <= self.retransmit:
            raise ValueError("grace and retransmit must be positive, attempt_timeout longer"
                             " than retransmit")

    def next_interval(self, *, share_wait: float | None, unit: float) -> tuple[float, bool]:
        """Seconds to the next rekey, and whether the QKD supply limits it.

        UNIT in [0, 1) draws the jitter. While the pool is above the reserve it pays for the
        configured cadence (SHARE_WAIT None); once it is rationed, a qkd+pqc link's epochs
        (one QKD key each) wait until its share has earned a key, SHARE_WAIT seconds (inf
        without supply); pqc-fallback links keep their cadence (epochs without a QKD key go
        on with ML-KEM + X25519). Rekeys are not paced beyond half the hard lifetime: there
        the link asks again, and waits for its share (the qkd-supply-low alarm says so).
        """
        base = self.interval * (1 + self.jitter * (2 * unit - 1))
        if share_wait is None or self.mode is Mode.PQC_FALLBACK:
            return base, False
        paced = share_wait
        if paced <= base:
            return base, False
        return min(paced, self.hard_lifetime / 2), True

"""QKD link profiles from published field results, for the simulator (`profile:` in kms.yaml,
`qkdgw kms-sim --link-profile NAME`).

A profile fixes what a trial measured (the secret key rate, the QBER) and how the link
behaves over time (a slow QBER drift, intermittent outages). Where a paper gives no figure
the value is a modelling choice, and docs/kms-simulator.md says which; each profile names
its source there and in `source` here.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field, model_validator

from common.config import ConfigModel, Seconds

#: The drift's QBER holds for this long, in the link's time: piecewise constant, so the
#: supply between two instants is still integrated exactly. A minute is far below any
#: drift period the trials report (tens of minutes to days).
DRIFT_STEP = 60.0


class QberDrift(ConfigModel):
    """A slow, bounded wander of the QBER around its nominal value (temperature, fibre
    movement, detector ageing): the sum of three sines of seeded phases, the longest of
    PERIOD seconds, at most AMPLITUDE away from the nominal QBER."""

    amplitude: float = Field(gt=0, lt=0.5, description="largest deviation, absolute QBER")
    period: Seconds = Field(description="seconds, the slowest component's period")


class RandomOutages(ConfigModel):
    """Intermittent quantum-channel outages at seeded random times (re-alignment, phase
    re-locking, fibre disturbances): gaps drawn from an exponential law of mean EVERY,
    durations uniform between half and one and a half times DURATION."""

    every: Seconds = Field(description="mean seconds from one outage's start to the next")
    duration: Seconds = Field(description="mean seconds an outage lasts")

    @model_validator(mode="after")
    def _gaps(self) -> RandomOutages:
        if self.every <= 1.5 * self.duration:
            raise ValueError("every must be longer than 1.5 times duration (the longest"
                             " outage)")
        return self

#: The QBER up to which BB84 with two-way classical post-processing still distils a secret
#: key (Gottesman and Lo, IEEE Trans. Inf. Theory 49, 457 (2003): 18.9 %): the limit the
#: Thuringia profiles are modelled with, since their systems deliver keys at 13.3 % QBER,
#: above the one-way (Shor-Preskill) 11 %.
TWO_WAY_QBER_LIMIT = 0.189


@dataclass(frozen=True)
class LinkProfile:
    name: str
    key_rate: float  # secret key rate at the nominal QBER, bit/s
    qber: float  # nominal QBER
    qber_limit: float | None  # where the modelled post-processing distils nothing (None: 11 %)
    qber_drift: QberDrift
    random_outages: RandomOutages
    source: str  # the published result the figures come from

    def fields(self) -> dict[str, object]:
        """The kms.yaml link fields this profile sets."""
        return {"key_rate": self.key_rate, "qber": self.qber, "qber_limit": self.qber_limit,
                "qber_drift": self.qber_drift, "random_outages": self.random_outages}


PROFILES: dict[str, LinkProfile] = {p.name: p for p in (
    LinkProfile(
        "metro-45km", key_rate=300_000.0, qber=0.03, qber_limit=None,
        qber_drift=QberDrift(amplitude=0.005, period=86_400.0),
        random_outages=RandomOutages(every=7 * 86_400.0, duration=60.0),
        source="Dynes et al., Opt. Express 23, 7583 (2015): about 300 kbit/s sustained over"
               " 34 days on a 45 km installed fibre of the Tokyo QKD Network"),
    LinkProfile(
        "long-haul-254km", key_rate=110.0, qber=0.04, qber_limit=None,
        qber_drift=QberDrift(amplitude=0.01, period=3_600.0),
        random_outages=RandomOutages(every=6 * 3_600.0, duration=300.0),
        source="Pittaluga et al., Nature 640, 911 (2025): twin-field QKD over 254 km of"
               " commercial fibre between Frankfurt and Kehl, 110 bit/s"),
    LinkProfile(
        "aerial-70km", key_rate=12.7, qber=0.133, qber_limit=TWO_WAY_QBER_LIMIT,
        qber_drift=QberDrift(amplitude=0.015, period=1_800.0),
        random_outages=RandomOutages(every=2 * 3_600.0, duration=600.0),
        source="Thuringia field trial, arXiv 2608.18869: 70 km of aerial fibre,"
               " 12.7 bit/s at a QBER of 13.3 %"),
    LinkProfile(
        "buried-69km", key_rate=22.2, qber=0.061, qber_limit=TWO_WAY_QBER_LIMIT,
        qber_drift=QberDrift(amplitude=0.005, period=6 * 3_600.0),
        random_outages=RandomOutages(every=12 * 3_600.0, duration=300.0),
        source="Thuringia field trial, arXiv 2608.18869: 69 km of buried fibre,"
               " 22.2 bit/s at a QBER of 6.1 %"),
)}


def profile(name: str) -> LinkProfile:
    """The profile called NAME, or ValueError listing the valid names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown link profile {name!r} (profiles: {', '.join(PROFILES)})"
                         ) from None

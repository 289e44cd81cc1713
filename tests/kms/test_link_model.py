"""The simulator's QKD link model: supply, capacity, QBER, outages, ageing — on a given clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.sim.config import Outage
from kms.sim.link import LinkModel, secret_fraction


def link(**kw: object) -> LinkModel:
    args: dict[str, object] = {"key_rate": 1000.0, "nominal_qber": 0.02,
                               "capacity_bits": 10**9, "start": 100.0, "stored_bits": 0.0}
    args.update(kw)
    return LinkModel(**args)  # type: ignore[arg-type]


def test_fills_at_key_rate_up_to_capacity() -> None:
    m = link(capacity_bits=5000)
    m.advance(103.0)
    assert m.stored_bits == pytest.approx(3000)
    m.advance(200.0)
    assert m.stored_bits == 5000


def test_take_is_all_or_nothing() -> None:
    m = link(stored_bits=1000.0, key_rate=0.0)
    assert not m.take(1001, 100.0)
    assert m.stored_bits == 1000
    assert m.take(1000, 100.0)
    assert m.stored_bits == 0


def test_scheduled_outage_stops_supply() -> None:
    m = link(outages=(Outage(start=10, duration=5),))
    assert m.in_outage(112.0)
    assert not m.in_outage(115.0)
    assert not m.in_outage(109.9)
    m.advance(120.0)
    assert m.stored_bits == pytest.approx(15_000)  # 20 s minus 5 s of outage
    assert m.rate_at(112.0) == 0.0
    assert m.rate_at(116.0) == 1000.0


def test_periodic_outages() -> None:
    m = link(outages=(Outage(start=0, duration=1, every=10),))
    m.advance(200.0)  # 100 s: 10 outages of 1 s
    assert m.stored_bits == pytest.approx(90_000)


def test_manual_outage_overlapping_scheduled() -> None:
    m = link(outages=(Outage(start=5, duration=10),))  # [105, 115)
    m.start_outage(100.0, 10.0)  # [100, 110)
    m.advance(120.0)
    assert m.stored_bits == pytest.approx(5_000)  # only [115, 120) supplies
    m.end_outages(120.0)
    assert not m.in_outage(120.0)


def test_qber_scales_by_secret_fraction_and_stops_past_the_limit() -> None:
    m = link()
    m.set_qber(0.05, 100.0)
    assert m.rate_at(101.0) == pytest.approx(1000 * secret_fraction(0.05) / secret_fraction(0.02))
    m.set_qber(0.11, 101.0)
    assert m.rate_at(102.0) == 0.0
    with pytest.raises(ValueError, match=r"QBER is a fraction between 0 and 0\.5"):
        m.set_qber(0.7, 102.0)


def test_secret_fraction() -> None:
    assert secret_fraction(0.0) == 1.0
    assert secret_fraction(0.11) == pytest.approx(0.0, abs=0.002)
    assert 0 < secret_fraction(0.05) < secret_fraction(0.02) < 1


def test_ageing_halves_rate_per_half_life() -> None:
    m = link(half_life=60.0)
    assert m.rate_at(160.0) == pytest.approx(500.0)
    m.advance(160.0)  # ∫0^60 1000·2^(−t/60) dt = 1000·60/ln2·(1 − 1/2)
    assert m.stored_bits == pytest.approx(1000 * 60 / math.log(2) / 2)


@settings(max_examples=200)
@given(
    steps=st.lists(st.floats(min_value=0.0, max_value=30.0), min_size=1, max_size=25),
    half_life=st.none() | st.floats(min_value=1.0, max_value=500.0),
    outage_start=st.floats(min_value=0.0, max_value=50.0),
    every=st.none() | st.floats(min_value=6.0, max_value=60.0),
)
def test_supply_does_not_depend_on_how_often_it_is_read(
    steps: list[float], half_life: float | None, outage_start: float, every: float | None
) -> None:
    outages = (Outage(start=outage_start, duration=5.0, every=every),)
    stepwise = link(half_life=half_life, outages=outages)
    t = 100.0
    for dt in steps:
        t += dt
        stepwise.advance(t)
        assert 0.0 <= stepwise.stored_bits <= stepwise.capacity_bits
    once = link(half_life=half_life, outages=outages)
    once.advance(t)
    assert stepwise.stored_bits == pytest.approx(once.stored_bits, rel=1e-9, abs=1e-6)
    assert once.stored_bits <= 1000.0 * (t - 100.0) + 1e-6

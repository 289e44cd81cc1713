"""Link profiles from field results: configuration, QBER drift, random outages, time scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import ConfigError
from gateway.initdemo import DemoLayout
from kms.sim.config import LinkConfig, SimConfig
from kms.sim.link import LinkModel
from kms.sim.profiles import DRIFT_STEP, PROFILES, profile


def model(name: str, *, seed: int = 0, time_scale: float = 1.0, link: str = "l"
          ) -> LinkModel:
    p = PROFILES[name]
    return LinkModel(key_rate=p.key_rate, nominal_qber=p.qber, capacity_bits=10**15,
                     start=0.0, stored_bits=0.0, qber_limit=p.qber_limit, drift=p.qber_drift,
                     random_outages=p.random_outages, seed=seed, name=link,
                     time_scale=time_scale)


def write(tmp_path: Path, demo: DemoLayout, **link: Any) -> Path:
    config = yaml.safe_load(demo.kms_config.read_text())
    for field in ("key_rate", "qber"):
        config["links"][0].pop(field)
    config["links"][0].update(link)
    path = tmp_path / "kms.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_issues_field_results() -> None:
    figures = {name: (p.key_rate, p.qber) for name, p in PROFILES.items()}
    assert figures["long-haul-254km"][0] == 110.0
    assert figures["aerial-70km"] == (12.7, 0.133)
    assert figures["buried-69km"] == (22.2, 0.061)
    assert figures["metro-45km"][0] >= 10_000  # tens of kbit/s or more
    for p in PROFILES.values():
        assert p.source
        assert p.qber < (p.qber_limit or 0.11) - p.qber_drift.amplitude  # drift keeps keying


def test_a_profile_in_kms_yaml(tmp_path: Path, demo: DemoLayout) -> None:
    link = SimConfig.load(write(tmp_path, demo, profile="aerial-70km")).links[0]
    assert (link.key_rate, link.qber, link.qber_limit) == (12.7, 0.133, 0.189)
    assert link.qber_drift == PROFILES["aerial-70km"].qber_drift
    assert link.random_outages == PROFILES["aerial-70km"].random_outages


@pytest.mark.parametrize(("link", "message"), [
    ({"profile": "aerial-7km"}, "links.0: unknown link profile 'aerial-7km' (profiles:"
                                " metro-45km, long-haul-254km, aerial-70km, buried-69km)"),
    ({"profile": "aerial-70km", "key_rate": 10}, "links.0: profile aerial-70km sets key_rate:"
                                                 " leave it out, or the profile"),
    ({"qber": 0.133}, "links.0.qber: Input should be less than 0.11"),
    ({"qber": 0.2, "qber_limit": 0.189}, "links.0.qber: Input should be less than 0.189"),
    ({"time_scale": 0}, "links.0.time_scale"),
    ({"random_outages": {"every": 10, "duration": 10}}, "every must be longer than 1.5 times"),
    ({"qber_drift": {"amplitude": 0.6, "period": 60}}, "links.0.qber_drift.amplitude"),
])
def test_profile_errors(tmp_path: Path, demo: DemoLayout, link: dict[str, Any],
                        message: str) -> None:
    with pytest.raises(ConfigError) as e:
        SimConfig.load(write(tmp_path, demo, **link))
    assert message in str(e.value)


def test_with_profile_replaces_the_links_figures(demo: DemoLayout) -> None:
    config = SimConfig.load(demo.kms_config).with_profile("buried-69km")
    link = config.links[0]
    assert (link.profile, link.key_rate, link.qber) == ("buried-69km", 22.2, 0.061)
    assert link.max_key_count == 10_000  # the pool stays as configured
    with pytest.raises(ValueError, match="unknown link profile 'x'"):
        profile("x")


def test_qber_drift_is_slow_bounded_and_seeded() -> None:
    p = PROFILES["aerial-70km"]
    a, b, other = model("aerial-70km"), model("aerial-70km"), model("aerial-70km", seed=1)
    times = [i * 97.0 for i in range(2000)]  # 54 hours
    qa = [a.qber_at(t) for t in times]
    assert qa == [b.qber_at(t) for t in times]  # the same seed, the same drift
    assert qa != [other.qber_at(t) for t in times]
    assert max(abs(q - p.qber) for q in qa) <= p.qber_drift.amplitude
    assert max(qa) - min(qa) > p.qber_drift.amplitude  # it does wander
    assert a.qber_at(10.0) == a.qber_at(DRIFT_STEP - 1)  # constant within a step
    per_step = [a.qber_at(i * DRIFT_STEP) for i in range(2000)]
    jumps = [abs(per_step[i + 1] - per_step[i]) for i in range(len(per_step) - 1)]
    assert max(jumps) < p.qber_drift.amplitude / 2  # slow: no jumps from step to step


def test_random_outages_come_and_go_as_configured() -> None:
    p = PROFILES["aerial-70km"]
    m = model("aerial-70km", seed=3)
    hours = 400
    down = sum(m.in_outage(t * 30.0) for t in range(hours * 120)) / (hours * 120)
    expected = p.random_outages.duration / p.random_outages.every
    assert expected * 0.7 < down < expected * 1.3  # ~8 % of the time, as configured
    again = model("aerial-70km", seed=3)
    assert [again.in_outage(t * 30.0) for t in range(5000)] == \
        [m.in_outage(t * 30.0) for t in range(5000)]


def test_a_13_percent_link_still_delivers_its_rate() -> None:
    m = model("aerial-70km", seed=5)
    m.advance(30 * 86_400.0)  # a month: drift and outages average out
    rate = m.stored_bits / (30 * 86_400.0)
    p = PROFILES["aerial-70km"]
    up = 1 - p.random_outages.duration / p.random_outages.every
    assert rate == pytest.approx(12.7 * up, rel=0.15)


def test_time_scale_runs_the_link_faster() -> None:
    slow, fast = model("buried-69km", seed=2), model("buried-69km", seed=2, time_scale=100.0)
    slow.advance(100_000.0)
    fast.advance(1_000.0)
    assert fast.stored_bits == pytest.approx(slow.stored_bits, rel=1e-9)
    assert fast.qber_at(500.0) == slow.qber_at(50_000.0)
    assert fast.rate_at(500.0) == pytest.approx(100 * slow.rate_at(50_000.0))
    fast.start_outage(2_000.0, 1.0)  # admin API durations are wall-clock seconds
    assert fast.in_outage(2_000.9)
    assert not fast.in_outage(2_001.0)


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(st.floats(min_value=0.0, max_value=5_000.0), min_size=1, max_size=25),
       name=st.sampled_from(sorted(PROFILES)), seed=st.integers(0, 2**32))
def test_supply_does_not_depend_on_how_often_it_is_read(steps: list[float], name: str,
                                                         seed: int) -> None:
    stepwise, once = model(name, seed=seed), model(name, seed=seed)
    t = 0.0
    for dt in steps:
        t += dt
        stepwise.advance(t)
    once.advance(t)
    assert stepwise.stored_bits == pytest.approx(once.stored_bits, rel=1e-9, abs=1e-6)


def test_link_config_defaults_are_unchanged() -> None:
    link = LinkConfig(name="l", kmes=("a", "b"))
    assert (link.profile, link.qber_limit, link.qber_drift, link.random_outages,
            link.time_scale) == (None, None, None, None, 1.0)

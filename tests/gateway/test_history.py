"""The history rings (gateway/history.py): bounded, exact over a window, saved and read back,
and refusing a damaged file with a reason."""

from __future__ import annotations

import itertools
import json
import math
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.events import Alarm, Cause
from gateway.history import (
    HISTORY_SECONDS,
    MAX_CHANGES,
    MAX_MARKS,
    SAMPLE_PERIOD,
    Condition,
    History,
    alarm_bits,
    alarm_names,
    spans,
    totals,
    view,
)

T0 = 1_800_000_000.0


def test_a_condition_is_noted_only_when_it_changes() -> None:
    h = History().link("ab")
    assert h.observe(T0, Condition.QKD, 0)
    assert not h.observe(T0 + 1, Condition.QKD, 0)
    assert h.observe(T0 + 2, Condition.PQC, alarm_bits(["qkd-fallback"]))
    assert not h.observe(T0 + 3, Condition.PQC, alarm_bits(["qkd-fallback"]))
    assert h.observe(T0 + 4, Condition.PQC, alarm_bits(["qkd-fallback", "kms-unavailable"]))
    assert len(h.changes) == 3


def test_spans_cover_the_window_and_are_clipped_to_it() -> None:
    h = History().link("ab")
    h.observe(T0, Condition.BLOCKED, 0)
    h.observe(T0 + 10, Condition.QKD, 0)
    h.observe(T0 + 20, Condition.PQC, alarm_bits(["qkd-fallback"]))
    h.observe(T0 + 30, Condition.QKD, 0)
    got = spans(h, T0 + 15, T0 + 35)
    assert [(s.start, s.end, s.condition, s.alarms) for s in got] == [
        (T0 + 15, T0 + 20, "qkd", []), (T0 + 20, T0 + 30, "pqc", ["qkd-fallback"]),
        (T0 + 30, None, "qkd", [])]
    t = totals(h, T0 + 15, T0 + 35)
    assert t.by_condition == {"none": 0.0, "qkd": 10.0, "pqc": 10.0, "blocked": 0.0}
    assert t.available == 1.0
    assert t.alarms == {"qkd-fallback": 10.0}


def test_time_before_the_first_entry_is_not_counted_as_available() -> None:
    h = History().link("ab")
    h.observe(T0 + 50, Condition.QKD, 0)
    h.observe(T0 + 75, Condition.BLOCKED, alarm_bits(["hard-lifetime"]))
    t = totals(h, T0, T0 + 100)
    assert t.by_condition["none"] == 50.0
    assert t.observed == 50.0
    assert t.available == 0.5
    assert totals(History().link("x"), T0, T0 + 100).available is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1000), st.sampled_from(list(Condition)),
                          st.sets(st.sampled_from([a.value for a in Alarm]))), max_size=40),
       st.floats(0, 1000), st.floats(1, 1000))
def test_the_conditions_add_up_to_the_window(changes: list[tuple[float, Condition, set[str]]],
                                             start: float, length: float) -> None:
    h = History().link("ab")
    for at, condition, alarms in sorted(changes, key=lambda c: c[0]):
        h.observe(T0 + at, condition, alarm_bits(alarms))
    t = totals(h, T0 + start, T0 + start + length)
    assert math.isclose(sum(t.by_condition.values()), length, rel_tol=1e-9, abs_tol=1e-6)
    got = spans(h, T0 + start, T0 + start + length)
    for a, b in itertools.pairwise(got):
        assert a.end == b.start


def test_marks_count_rekeys_and_failures_by_cause() -> None:
    history = History()
    history.rekeyed("ab", T0 + 1, 1, 0.010, qkd=True)
    history.rekeyed("ab", T0 + 2, 2, 0.020, qkd=False)
    history.gave_up("ab", T0 + 3, 3, Cause.TIMEOUT)
    history.gave_up("ab", T0 + 4, 3, Cause.TIMEOUT)
    history.rekeyed("ab", T0 + 5, 3, None, qkd=True)
    t = totals(history.links["ab"], T0, T0 + 10)
    assert (t.rekeys, t.rekeys_qkd, t.failures) == (3, 2, {"timeout": 2})
    assert t.latencies == pytest.approx([0.010, 0.020])
    marks = view(history, "ab", None, T0, T0 + 10).marks
    assert [(m.epoch, m.ok, m.qkd, m.cause) for m in marks] == [
        (1, True, True, None), (2, True, False, None), (3, False, False, "timeout"),
        (3, False, False, "timeout"), (3, True, True, None)]
    assert marks[-1].latency is None


def test_the_rings_are_bounded() -> None:
    history = History()
    for i in range(3 * MAX_MARKS):
        history.rekeyed("ab", T0 + i, i, 0.01, qkd=True)
    for i in range(3 * MAX_CHANGES):
        history.link("ab").observe(T0 + i, Condition.QKD if i % 2 else Condition.PQC, 0)
    h = history.links["ab"]
    assert MAX_MARKS <= len(h.marks) <= MAX_MARKS * 5 // 4
    assert MAX_CHANGES <= len(h.changes) <= MAX_CHANGES * 5 // 4
    assert h.marks.columns["epoch"][-1] == 3 * MAX_MARKS - 1  # the newest kept


def test_old_entries_go_but_the_condition_in_force_stays() -> None:
    history = History()
    h = history.link("ab")
    h.observe(T0, Condition.QKD, 0)
    history.rekeyed("ab", T0, 1, 0.01, qkd=True)
    history.pair("p").sample(T0, True, 5, 0.02, 100.0)
    later = T0 + HISTORY_SECONDS + 100
    history.trim(later)
    assert len(h.marks) == 0
    assert len(history.kms["p"].samples) == 0
    assert [s.condition for s in spans(h, later - 10, later)] == ["qkd"]


def test_kms_samples_are_coalesced_to_the_sample_period_but_not_across_an_outage() -> None:
    k = History().pair("kme-a → kme-b")
    for i in range(100):  # a poll every half second for 50 s
        k.sample(T0 + i / 2, True, 1000 - i, 0.02, 5e4)
    assert 50 / SAMPLE_PERIOD <= len(k.samples) <= 50 / SAMPLE_PERIOD + 2
    assert k.samples.columns["stored"][-1] == 901  # the latest reading stands for its period
    n = len(k.samples)
    k.sample(T0 + 50.2, False, None, None, None)  # the KME stops answering: shown at once
    assert len(k.samples) == n + 1
    assert math.isnan(k.samples.columns["qber"][-1])


def test_saved_and_read_back(tmp_path: Path) -> None:
    history = History()
    history.rekeyed("ab", T0, 7, 0.004, qkd=True)
    history.gave_up("ab", T0 + 1, 8, Cause.KMS)
    history.link("ab").observe(T0, Condition.PQC, alarm_bits(["qkd-fallback"]))
    history.pair("kme-a → kme-b").sample(T0, True, 42, 0.031, 1234.5)
    history.pairs["sae-b"] = "kme-a → kme-b"
    path = tmp_path / "history.json"
    history.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    back = History.load(path)
    assert view(back, "ab", "kme-a → kme-b", T0 - 1, T0 + 2) == \
        view(history, "ab", "kme-a → kme-b", T0 - 1, T0 + 2)
    assert back.pairs == {"sae-b": "kme-a → kme-b"}
    assert History.load(tmp_path / "none.json").links == {}


def test_a_file_from_a_version_that_numbers_alarms_and_causes_otherwise(tmp_path: Path) -> None:
    history = History()
    history.gave_up("ab", T0, 1, Cause.SINK)
    history.link("ab").observe(T0, Condition.BLOCKED, alarm_bits(["sink-failed"]))
    data = json.loads(history.dumps())
    data["alarms"] = list(reversed(data["alarms"]))
    data["causes"] = list(reversed(data["causes"]))
    # (the same bits and codes, read with the reversed names, mean other things: renumbered)
    back = History.loads(json.dumps(data).encode())
    mark = view(back, "ab", None, T0 - 1, T0 + 1).marks[0]
    reversed_causes = list(reversed([c.value for c in Cause]))
    assert mark.cause == reversed_causes[list(Cause).index(Cause.SINK)]
    span = spans(back.links["ab"], T0 - 1, T0 + 1)[-1]
    reversed_alarms = list(reversed([a.value for a in Alarm]))
    assert span.alarms == [reversed_alarms[list(Alarm).index(Alarm.SINK_FAILED)]]


@pytest.mark.parametrize(("damage", "says"), [
    (b"", "unreadable history"),
    (b"[]", "not a qkdgw-history/1 file"),
    (b'{"format": "qkdgw-history/1"}', "unreadable history"),
    (b'{"format": "qkdgw-history/1", "alarms": [], "causes": [], "kms": {}, "links":'
     b' {"ab": {"marks": {"t": "!!"}, "changes": {}}}}', "unreadable history"),
])
def test_a_damaged_file_is_refused_with_a_reason(damage: bytes, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        History.loads(damage)


def test_columns_of_different_lengths_are_refused() -> None:
    history = History()
    history.rekeyed("ab", T0, 1, 0.01, qkd=True)
    data = json.loads(history.dumps())
    data["links"]["ab"]["marks"]["epoch"] = ""
    with pytest.raises(ValueError, match="different lengths"):
        History.loads(json.dumps(data).encode())


def test_alarm_bits_round_trip_and_ignore_unknown_names() -> None:
    names = ["kms-unavailable", "hard-lifetime", "link-failed"]
    assert alarm_names(alarm_bits([*names, "no-such-alarm"])) == sorted(
        names, key=[a.value for a in Alarm].index)


def test_memory_per_link() -> None:
    """What docs/operations.md states: a full link's rings take about 0.3 MB."""
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    history = History()
    for i in range(MAX_MARKS):
        history.rekeyed("ab", T0 + i, i, 0.01, qkd=True)
    for i in range(MAX_CHANGES):
        history.link("ab").observe(T0 + i, Condition.QKD if i % 2 else Condition.PQC, 0)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert used < 400_000, used

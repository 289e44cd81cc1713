"""The explorer (tests/gateway/explore.py): at its CI bound no state of the two real cores
breaks a rule and every one converges once faults stop; it does catch a broken core; its
output is what docs/protocol.md promises; the mutants still apply to the core."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from gateway.core.events import Action, Send
from gateway.core.machine import LinkMachine
from gateway.core.policy import Mode
from kms.models import QkdKey
from tests.gateway.explore import CI, Bounds, Explorer, chart, main
from tests.gateway.mutants import MUTANTS, mutated

#: The CI bound explores 253,544 states today; a change that loses a fifth of them is one
#: to look at.
MIN_STATES = 200_000


def test_the_ci_bound_keeps_every_rule_and_always_converges() -> None:
    res = Explorer(CI).run()
    assert res.violations == 0, chart(res.trace) + "\n" + "\n".join(res.broken)
    assert res.liveness_violations == 0, chart(res.stuck + res.continuation)
    assert res.states >= MIN_STATES


def test_it_catches_a_responder_that_accepts_before_its_key_is_in(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """So that the test above can fail: the initiator would switch on an Accept while the
    responder's inbound key is still being installed."""
    respond = LinkMachine._respond

    def accept_at_once(self: LinkMachine, now: float, keys: tuple[QkdKey, ...]
                       ) -> list[Action]:
        out = respond(self, now, keys)
        a = self.attempt
        return out + [Send(a.accept)] if a is not None and a.accept is not None else out

    monkeypatch.setattr(LinkMachine, "_respond", accept_at_once)
    res = Explorer(Bounds(epochs=1, faults=0, depth=12), stop_at_first=True).run()
    assert res.violations
    assert "I sends on epoch 1, which R has not installed" in res.broken
    assert len(res.trace) < 20  # the shortest: the first epoch, nothing else


def test_it_catches_an_initiator_that_stops_rekeying(monkeypatch: pytest.MonkeyPatch) -> None:
    """No rule breaks (the keys expire, the link blocks), but the link never gets a new
    epoch: the liveness check on the graph says so."""
    start = LinkMachine._start_exchange

    def first_only(self: LinkMachine, now: float, reason: str) -> list[Action]:
        if self.max_epoch >= 1:
            self.next_rekey_at = None
            return []
        return start(self, now, reason)

    monkeypatch.setattr(LinkMachine, "_start_exchange", first_only)
    res = Explorer(Bounds(epochs=1, faults=0, depth=8)).run()
    assert res.violations == 0
    assert res.liveness_violations > 0
    assert any("block" in line.i for line in res.continuation)


def test_the_last_line_is_the_figures_and_the_status_says_whether_all_held(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--epochs", "1", "--faults", "0", "--depth", "6", "--quiet",
                 "--mode", Mode.PQC_FALLBACK.value]) == 0
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert list(last) == ["states", "transitions", "depth", "violations",
                          "liveness_violations", "seconds"]
    assert last["states"] > 0
    assert last["violations"] == last["liveness_violations"] == 0


def test_every_mutant_still_applies_to_the_core() -> None:
    assert len(MUTANTS) >= 10
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
    for m in MUTANTS:
        with tempfile.TemporaryDirectory() as tmp:
            mutated(m, Path(tmp))  # each patched text occurs exactly once

"""The rekey core under faults: hypothesis stateful tests over two machines.

Faults: message loss, duplication, reordering and delay; a KMS that fails, slows and
recovers, and whose QBER spikes; gateway restarts; operator rekeys; slow sinks. After every
step the world checks the invariants against the data planes (tests/gateway/world.py):
1. whoever sends on an epoch's key finds it installed inbound at the peer;
2. both sides hold the same key for an epoch, and epochs never share a key;
3. epochs only move forward; a QKD key ID belongs to one epoch at most;
4. never a moment without protection: traffic is keyed or blocked.
When the faults stop, both sides converge on the same, fresh epoch.
Examples: 150 per mode, up to 40 steps each; HYPOTHESIS_PROFILE=soak runs 20,000 per mode.
"""

from __future__ import annotations

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gateway.core.events import RekeyRequested
from gateway.core.policy import Mode
from tests.gateway.world import FAST, World, policy


class RekeyWorld(RuleBasedStateMachine):
    mode = Mode.QKD_PQC

    @initialize(seed=st.integers(0, 2**32 - 1))
    def setup(self, seed: int) -> None:
        p = policy(mode=self.mode)
        self.world = World(seed=seed, policy_i=p, policy_r=p)
        self.world.kms_status()

    @rule(seconds=st.floats(0.05, 25.0))
    def time_passes(self, seconds: float) -> None:
        self.world.run_for(seconds)

    @rule(loss=st.sampled_from([0.0, 0.1, 0.3, 0.6]),
          duplicate=st.sampled_from([0.0, 0.2, 0.5]),
          max_delay=st.sampled_from([0.001, 0.1, 1.0, 3.0]))
    def network(self, loss: float, duplicate: float, max_delay: float) -> None:
        w = self.world
        w.loss, w.duplicate, w.max_delay = loss, duplicate, max_delay

    @rule(available=st.booleans(), delay=st.sampled_from([0.0, 0.5, 4.0]))
    def kms(self, available: bool, delay: float) -> None:
        self.world.kms.available = available
        self.world.kms_delay = delay
        self.world.kms_status(ok=available)

    @rule(qber=st.sampled_from([0.01, 0.05, 0.2]))
    def qber(self, qber: float) -> None:
        self.world.kms_status(ok=self.world.kms.available, qber=qber)

    @rule(delay=st.sampled_from([0.0, 0.2, 2.0]))
    def sinks(self, delay: float) -> None:
        self.world.sink_delay = delay

    @rule(initiator=st.booleans())
    def restart(self, initiator: bool) -> None:
        (self.world.i if initiator else self.world.r).restart()

    @rule(initiator=st.booleans())
    def operator_rekey(self, initiator: bool) -> None:
        side = self.world.i if initiator else self.world.r
        side.feed(RekeyRequested("operator"))

    @invariant()
    def no_violation(self) -> None:
        assert not self.world.violations, self.world.violations[:3]

    @precondition(lambda self: hasattr(self, "world"))
    @rule()
    def faults_stop_and_both_converge(self) -> None:
        w = self.world
        w.loss, w.duplicate, w.max_delay = 0.0, 0.0, 0.01
        w.kms.available, w.kms_delay, w.sink_delay = True, 0.0, 0.0
        w.kms_status()
        before = max(w.i.plane.sent_on + w.r.plane.sent_on, default=0)
        # Bound: the longest backoff, a failed attempt, then one full interval and exchange.
        w.run_for(FAST.retry_backoff_max + 2 * FAST.attempt_timeout
                  + FAST.interval * (1 + FAST.jitter) + 1.0)
        settled = w.settle(FAST.attempt_timeout)  # an exchange in flight lands
        assert not w.violations, w.violations[:3]
        assert settled, (w.i.plane.outbound, w.r.plane.outbound, w.i.machine.state,
                         w.r.machine.state)
        assert w.i.plane.outbound is not None and w.i.plane.outbound > before
        event(f"converged after {min(len(w.i.plane.sent_on) // 10 * 10, 50)}+ epochs")
        for side in (w.i, w.r):
            for kind in {r.kind for r in side.records} & {"discarded", "unconfirmed",
                                                           "rejected"}:
                event(f"{side.name} saw {kind}")
            if any("pqc+" in r.detail for r in side.records if r.kind == "offered"):
                event("a PQC-only epoch happened")
            if side.rejected:
                event(f"{side.name} rejected a peer message")


class QkdPqcWorld(RekeyWorld):
    mode = Mode.QKD_PQC


class FallbackWorld(RekeyWorld):
    mode = Mode.PQC_FALLBACK


#: At least 150 examples per mode (a few seconds); the soak profile (conftest) raises it.
EXAMPLES = max(150, settings().max_examples)

TestQkdPqc = QkdPqcWorld.TestCase
TestQkdPqc.settings = settings(max_examples=EXAMPLES, stateful_step_count=40, deadline=None)
TestFallback = FallbackWorld.TestCase
TestFallback.settings = settings(max_examples=EXAMPLES, stateful_step_count=40, deadline=None)

"""The rekey core under faults: hypothesis stateful tests over two machines.

Faults: message loss, duplication, reordering and delay; a KMS that fails, slows and
recovers, and whose QBER spikes; gateway restarts; operator rekeys; slow sinks; a gateway
whose configuration lacks the link for a while (the channel answers `unknown-link`); turns to
start an exchange granted late (the daemon's pacing). After every step the world checks the
rules of tests/gateway/invariants.py (shared with the explorer) against the data planes,
among them:
1. whoever sends on an epoch's key finds it installed inbound at the peer;
2. both sides hold the same key for an epoch, and epochs never share a key;
3. epochs only move forward; a QKD key ID belongs to one epoch at most;
4. never a moment without protection: traffic is keyed or blocked.
When the faults stop, both sides converge on the same, fresh epoch.
Examples: 150 per mode, up to 40 steps each; HYPOTHESIS_PROFILE=soak runs 20,000 per mode.
"""

from __future__ import annotations

import random

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gateway.core.events import RekeyRequested, received
from gateway.core.machine import TRANSITIONS, State
from gateway.core.messages import Abort, AbortReason, Accept, Message, Offer
from gateway.core.policy import Mode
from tests.gateway.world import CERT_I, FAST, Side, World, policy


class RekeyWorld(RuleBasedStateMachine):
    mode = Mode.QKD_PQC

    @initialize(seed=st.integers(0, 2**32 - 1),
                admission=st.none() | st.sampled_from([0.0, 0.5, 3.0]))
    def setup(self, seed: int, admission: float | None) -> None:
        p = policy(mode=self.mode)
        self.world = World(seed=seed, policy_i=p, policy_r=p, admission=admission)
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

    @rule(qber=st.sampled_from([0.01, 0.05, 0.3]))
    def qber(self, qber: float) -> None:
        self.world.kms_status(ok=self.world.kms.available, qber=qber)

    @rule(delay=st.sampled_from([0.0, 0.2, 2.0]),
          fails=st.frozensets(st.sampled_from(["install", "activate", "retire", "block"]))
          | st.just(frozenset()))
    def sinks(self, delay: float, fails: frozenset[str]) -> None:
        self.world.sink_delay, self.world.sink_fails = delay, fails

    @rule(initiator=st.booleans())
    def restart(self, initiator: bool) -> None:
        (self.world.i if initiator else self.world.r).restart()

    @rule(side=st.sampled_from(["I", "R", ""]))
    def link_configured(self, side: str) -> None:
        """SIDE's gateway does not have the link (for now); "": both have it again."""
        self.world.without_link = {side} if side else set()

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
        w.sink_fails = frozenset()
        w.without_link = set()
        w.kms_status()
        before = max(w.i.plane.sent_on + w.r.plane.sent_on, default=0)
        # Bound: the longest backoff, a failed attempt, then one full interval and exchange.
        w.run_for(FAST.retry_backoff_max + 2 * FAST.attempt_timeout
                  + FAST.interval * (1 + FAST.jitter) + 1.0)
        settled = w.settle(FAST.attempt_timeout)  # an exchange in flight lands
        assert not w.violations, w.violations[:3]
        assert settled, (w.i.plane.outbound, w.r.plane.outbound, w.i.machine.state,
                         w.r.machine.state)
        assert w.i.plane.outbound is not None
        assert w.i.plane.outbound > before
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


# -- the transition table, taken edge by edge ---------------------------------------------------


def _random_world(seed: int, steps: int = 60) -> World:
    """Faults as the stateful tests draw them, from a seed: the honest protocol's moves."""
    rng = random.Random(seed)  # noqa: S311 (a seeded simulation, replayable)
    p = policy(mode=rng.choice([Mode.QKD_PQC, Mode.PQC_FALLBACK]))
    # One world in four paces its exchanges (the daemon's admission), its turns late or not.
    w = World(seed=seed, policy_i=p, policy_r=p,
              admission=(0.0, 1.0, 5.0)[seed // 4 % 3] if seed % 4 == 0 else None)
    w.kms_status()
    for _ in range(steps):
        op = rng.randrange(8)
        if op == 0:
            w.run_for(rng.choice([0.05, 0.3, 1.0, 3.0, 10.0, 25.0]))
        elif op == 1:
            w.loss, w.duplicate = rng.choice([0.0, 0.1, 0.3, 0.6]), rng.choice([0.0, 0.2, 0.5])
            w.max_delay = rng.choice([0.001, 0.1, 1.0, 3.0])
        elif op == 2:
            w.kms.available = rng.random() < 0.6
            w.kms_delay = rng.choice([0.0, 0.5, 4.0])
            w.kms_status(ok=w.kms.available)
        elif op == 3:
            w.kms_status(ok=w.kms.available, qber=rng.choice([0.01, 0.05, 0.2]))
        elif op == 4:
            w.sink_delay = rng.choice([0.0, 0.2, 2.0])
            w.sink_fails = frozenset(c for c in ("install", "activate", "retire", "block")
                                     if rng.random() < 0.1)
        elif op == 5:
            (w.i if rng.random() < 0.5 else w.r).restart()
        elif op == 6:
            (w.i if rng.random() < 0.5 else w.r).feed(RekeyRequested("operator"))
        else:
            w.run_for(rng.uniform(0.0, 2.0))
        assert not w.violations, w.violations[:3]
    return w


def _offer_in_flight(w: World, **faults: float) -> Offer:
    """Run until the responder holds an Offer (with FAULTS set on the world)."""
    for name, value in faults.items():
        setattr(w, name, value)
    w.i.feed(RekeyRequested("operator"))
    end = w.now + FAST.attempt_timeout
    while w.r.machine.attempt is None or w.r.machine.attempt.offer is None:
        assert w.step(until=end), "no Offer reached the responder"
    return w.r.machine.attempt.offer


def _abort(offer: Offer) -> Abort:
    return Abort(link=offer.link, epoch=offer.epoch, nonce_i=offer.nonce,
                 reason=AbortReason.CONFIRM_FAILED, current=offer.epoch)


def _targeted() -> list[World]:
    """What honest peers over a faulty network never do, but the handlers must handle:
    a peer's Abort at each step, a wrong confirmation, a low-order X25519 key, a KMS slower
    than an exchange may take."""
    worlds = []
    for state, faults in ((State.FETCHING, {"kms_delay": 1.0}),
                          (State.INSTALLING, {"sink_delay": 1.0}),
                          (State.ACCEPTED, {"max_delay": 0.5}),
                          (State.ACTIVATING, {"sink_delay": 1.0})):
        p = policy(prefetch=False)  # R fetches when the Offer comes
        w = World(seed=30, policy_i=p, policy_r=p)
        w.kms_status()
        w.run_for(3)
        offer = _offer_in_flight(w, **faults)
        w.step_until(w.r, state, FAST.attempt_timeout)
        w.r.feed(received(_abort(offer), CERT_I))  # the initiator gave this exchange up
        worlds.append(w)
    worlds += _while_the_responder_switches()
    w = World(seed=31)  # the responder's Accept, tampered: I's confirmation check fails
    w.kms_status()
    w.run_for(3)
    send = w._send

    def tamper(side: Side, message: Message) -> None:
        if isinstance(message, Accept):
            message = message.model_copy(update={"confirm": bytes(48)})
        send(side, message)

    w._send = tamper  # type: ignore[method-assign]
    w.i.feed(RekeyRequested("operator"))
    w.run_for(2)
    worlds.append(w)
    w = World(seed=32)  # an Offer whose X25519 key is the all-zero (low-order) point
    w.kms_status()
    w.run_for(3)
    offer = _offer_in_flight(w)
    w.run_for(1)
    key = w.kms.enc_keys(1, FAST.qkd_key_bits)[0]
    w.r.feed(received(offer.model_copy(update={
        "epoch": offer.epoch + 1, "key_ids": (key.key_id,), "pk": bytes(32),
        "nonce": bytes(32)}), CERT_I))
    w.run_for(1)
    worlds.append(w)
    w = World(seed=33, policy_i=policy(prefetch=False))  # enc_keys slower than an exchange
    w.kms_status()
    w.run_for(3)
    w.kms_delay = FAST.attempt_timeout + 1
    w.i.feed(RekeyRequested("operator"))
    w.run_for(FAST.attempt_timeout + 2)
    worlds.append(w)
    return worlds


def _while_the_responder_switches() -> list[World]:
    """A data plane slow to switch (1 s) while the initiator restarts (its next Offer finds
    the responder switching) or the responder restarts (the initiator waits for its Ack,
    with its KMS down)."""
    worlds = []
    for mode, kms_up in ((Mode.QKD_PQC, True), (Mode.PQC_FALLBACK, False)):
        p = policy(mode=mode, prefetch=False)
        w = World(seed=34, policy_i=p, policy_r=p)
        w.kms_status()
        w.run_for(3)
        w.sink_delay = 1.0
        w.i.feed(RekeyRequested("operator"))
        w.step_until(w.r, State.ACTIVATING, FAST.attempt_timeout)
        w.kms.available = kms_up  # down: a PQC-only Offer, installed without a fetch
        w.kms_status(ok=kms_up)
        w.i.restart()
        w.run_for(FAST.attempt_timeout)
        worlds.append(w)
    w = World(seed=35)
    w.kms_status()
    w.run_for(3)
    w.sink_delay = 1.0
    w.i.feed(RekeyRequested("operator"))
    w.step_until(w.i, State.COMMITTED, FAST.attempt_timeout)
    w.kms.available = False
    w.kms_status(ok=False)  # qkd+pqc with no QKD keys: no new exchange for now
    w.r.restart()
    w.run_for(FAST.attempt_timeout)
    worlds.append(w)
    return worlds


def test_every_edge_of_the_table_is_taken_and_no_move_is_missing_from_it() -> None:
    """The machines check every move against its row as they run (a move with no row
    raises TransitionError); here every edge the table draws must be taken too, by honest
    peers over faulty networks or by what hostile peers and broken data planes send."""
    taken = set()
    for w in [*(_random_world(seed) for seed in range(200)), *_targeted()]:
        taken |= w.moves
    drawn = {(a, b, t.event, t.state) for t in TRANSITIONS for a, b in t.edges}
    assert {(a.value, b.value, e.__name__) for a, b, e, _ in drawn - taken} == set()
    assert taken <= drawn

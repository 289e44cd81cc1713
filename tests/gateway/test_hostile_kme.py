"""A hostile KME against a real gateway: whatever its KME answers (drawn by hypothesis: status
codes, headers, lying lengths, mutated members, extreme numbers, broken JSON, delays,
trickles, dropped connections), the gateway's link never dies, nothing spins or hangs, no
log line is forged, and its last key ends at its hard lifetime.

    qkdgw run (A) ──mTLS──▶ HostileKme (as KME-A)        qkdgw kms-sim (KME-B)
          ◀──────wss, mTLS──────▶ qkdgw run (B) ──mTLS──▶──┘

A and B first rekey with the simulator's KMEs; then A restarts with its KME pointing at the
hostile one, adopting its last key (a key file sink), and the barrage begins. The client-level
property (every call ends in time with a valid answer or a KmsError) is
tests/kms/test_client_fuzz.py; this is the same KME one layer up.

Default profile: EXAMPLES examples; HYPOTHESIS_PROFILE=soak runs a tenth of the profile's.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.tlsctx import server_context
from tests.gateway.hostile import busy, check_log
from tests.gateway.sites import Sites
from tests.kms.answers import Plan, plans
from tests.kms.hostile import Answer, HostileKme, Request

pytestmark = pytest.mark.slow

HARD_LIFETIME = 8.0
EXAMPLES = max(12, settings().max_examples // 10)
#: How long an example waits for the gateway to ask for its answers (a status poll every
#: half second, key requests at each rekey attempt).
CONSUME_WAIT = 3.0


@dataclass
class Script:
    """Answers the hostile KME gives, in order; when none is left, a 503."""

    plans: list[Plan] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def respond(self, request: Request) -> Answer:
        with self.lock:
            plan = self.plans.pop(0) if self.plans else None
        if plan is None:
            return Answer(503, b'{"message": "no key material"}')
        return plan.answer(request)

    def pending(self) -> int:
        with self.lock:
            return len(self.plans)


class World:
    def __init__(self, root: Path) -> None:
        self.sites = Sites(root, {"interval": 1.0, "hard_lifetime": HARD_LIFETIME,
                                  "grace": 0.5, "attempt_timeout": 3.0}).start()
        d = self.sites.layout
        self.sites.wait_until("the first epochs", lambda: self.sites.converged()
                              and self.sites.link("a")["epoch"] >= 2)
        assert self.sites.stop_site("a", signal.SIGTERM) == 0
        self.activated = time.time()  # A's last key is at most this fresh
        self.script = Script()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.kme = HostileKme(server_context(d.pki / "ca.pem", d.pki / "kme-a.pem",
                                             d.pki / "kme-a.key"), self.script.respond)
        asyncio.run_coroutine_threadsafe(self.kme.start(), self.loop).result(10)
        path = d.site_config("a")
        config: dict[str, Any] = yaml.safe_load(path.read_text())
        config["kms"].update(url=self.kme.url, connect_timeout=0.5, read_timeout=0.5,
                             total_timeout=1.0, attempts=2)
        path.write_text(yaml.safe_dump(config))
        self.sites.start_site("a")

    @property
    def pid(self) -> int:
        return self.sites.procs["a"].pid

    def alive(self) -> dict[str, Any]:
        assert self.sites.procs["a"].poll() is None, self.sites.log("a")[-3000:]
        return self.sites.link("a")  # the admin socket answers

    def close(self) -> None:
        self.sites.stop()
        asyncio.run_coroutine_threadsafe(self.kme.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        yield w
    finally:
        w.close()


def test_a_hostile_kme_finds_nothing_that_kills_spins_hangs_or_leaks(world: World) -> None:
    asked = 0

    @settings(max_examples=EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(script=st.lists(plans, min_size=1, max_size=3))
    def barrage(script: list[Plan]) -> None:
        nonlocal asked
        before = len(world.kme.requests)
        with world.script.lock:
            world.script.plans[:] = script
        deadline = time.monotonic() + CONSUME_WAIT
        while world.script.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        asked += len(world.kme.requests) - before
        world.alive()

    barrage()
    assert asked >= EXAMPLES  # the gateway did ask for the drawn answers
    share = busy(world.pid)
    assert share < 0.5, f"A uses {share:.0%} of a core"
    world.sites.wait_until("A blocked", lambda: world.alive()["blocked"],
                           timeout=max(0.0, world.activated + HARD_LIFETIME - time.time()) + 10)
    status = world.alive()
    assert "hard-lifetime" in status["alarms"], world.sites.log("a")[-3000:]
    assert "kms-unavailable" in status["alarms"]
    check_log(world.sites.log("a"))

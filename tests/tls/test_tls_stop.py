"""The TLS plane when its gateway is gone: stopped (the sink's `on_stop`) or killed (the
guard, `qkdgw tls-guard`), with real stunnel, openssl, gateways and KMS simulator.

World: tests/tls/tls_world.py with stunnel (client at site A, server at site B), rotating
every second, hard lifetime 9 s. Before gateway B goes, the test takes the current identity
and key from B's PSK file and when B activated that epoch (the admin socket's key age); an
independent client (openssl s_client in gw-a) then tries that identity and key. Each test
also checks that stunnel is up and serving the file: the placeholder left in it works.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.demo.topology import until
from tests.tls import tls_world as tw
from tls import expiry, pskfile

POLICY = {"interval": 1.0, "jitter": 0.0, "hard_lifetime": 9.0, "grace": 1.0}
#: After the hard lifetime, the guard's wake-up and stunnel's reload get this long.
MARGIN = 3.0
#: A stopped gateway's plane must be blocked within this (stunnel handles SIGHUP async).
AT_ONCE = 2.0
NO_GUARD = "no `qkdgw tls-guard`"


@dataclass(frozen=True)
class Last:
    identity: str
    key: bytes = field(repr=False)  # never in a failure report
    ends: float  # B's activation of the epoch + hard lifetime (admin socket), wall clock
    deadline: float  # what B's sink wrote to FILE.expiry for it


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., tw.World]]:
    reason = tw.missing_tools("stunnel")
    if reason:
        pytest.skip(f"no stunnel world here: {reason}")
    worlds: list[tw.World] = []

    def build(**sink_options: Any) -> tw.World:
        world = tw.World(tmp_path, POLICY, "stunnel", **sink_options)
        worlds.append(world)
        world.build()
        return world

    yield build
    for world in worlds:
        world.teardown()


async def up(w: tw.World, *, guard: bool) -> Last:
    """Both gateways rotating, B's stunnel (and guard, first: docs/tls.md); the last key B's
    gateway wrote."""
    if guard:
        w.start_guard("b")
    await w.start()
    w.start_echo()
    w.start_stunnel("b")
    first = (await w.link("b"))["epoch"]

    async def rotated() -> bool:  # a server's usual file: the current and the previous
        return bool((await w.link("b"))["epoch"] >= first + 2)

    await until("two rotations", rotated)
    path = w.psk_file("b")
    while True:
        status = await w.link("b")
        now = time.time()
        with expiry.locked(path):
            ident, key = pskfile.loads(path.read_bytes())[0]
            deadlines = expiry.read(path)
        if pskfile.epoch_of(ident) == status["epoch"]:  # else a rotation came between
            last = Last(ident, key, now - status["key_age"] + POLICY["hard_lifetime"],
                        deadlines[ident])
            break
        await asyncio.sleep(0.05)
    assert last.deadline <= last.ends  # never past the hard lifetime as the core counts it
    assert w.try_psk(last.identity, last.key)  # the probe works: the tests can fail
    return last


def refused_by(w: tw.World, last: Last, bound: float) -> tuple[float | None, float]:
    """Probe until LAST is refused: when it was last accepted (None: never) and when
    refused (the probes' start times). Fails if it is still accepted at BOUND."""
    accepted = None
    while True:
        started = time.time()
        if not w.try_psk(last.identity, last.key):
            return accepted, started
        accepted = started
        assert started < bound, f"{last.identity} still accepted {started - bound:.1f} s" \
                                f" past the bound"
        time.sleep(0.1)


def only_placeholder_and_stunnel_serves_it(w: tw.World) -> None:
    entries = pskfile.loads(w.psk_file("b").read_bytes())
    assert [i for i, _ in entries] == ["qkdgw-ab-blocked"]
    assert w.try_psk(*entries[0])  # stunnel is up and reloaded: the refusal is the key's


def test_a_stopped_gateway_blocks_the_plane_at_once(make: Callable[..., tw.World]) -> None:
    w = make()  # on_stop: block, the default; no guard
    last = asyncio.run(up(w, guard=False))
    w.kill("gw-b")  # SIGTERM; returns once it exited
    stopped = time.time()
    _, refused = refused_by(w, last, stopped + AT_ONCE)
    assert not w.try_psk(last.identity, last.key)
    only_placeholder_and_stunnel_serves_it(w)
    log = (w.root / "gw-b.log").read_text()
    assert log.count(NO_GUARD) == 1, "the sink did not warn (once) that no guard runs"
    print(f"\nSIGTERM, on_stop block: refused {refused - stopped:+.2f} s after the exit,"
          f" {last.deadline - refused:.1f} s before the deadline")


def test_keep_serves_past_a_stop_until_the_hard_lifetime(make: Callable[..., tw.World]
                                                         ) -> None:
    w = make(on_stop="keep")
    last = asyncio.run(up(w, guard=True))
    w.kill("gw-b")
    stopped = time.time()
    assert last.identity in dict(pskfile.loads(w.psk_file("b").read_bytes()))
    assert expiry.read(w.psk_file("b"))[last.identity] == last.deadline > stopped
    accepted, refused = refused_by(w, last, last.ends + MARGIN)
    assert accepted is not None, "on_stop: keep, yet refused right after the stop"
    assert not w.try_psk(last.identity, last.key)
    only_placeholder_and_stunnel_serves_it(w)
    assert NO_GUARD not in (w.root / "gw-b.log").read_text()
    print(f"\nSIGTERM, on_stop keep: accepted until {accepted - last.deadline:+.2f} s,"
          f" refused from {refused - last.deadline:+.2f} s of the deadline"
          f" ({last.ends - last.deadline:.3f} s before the hard lifetime's end)")


def test_a_killed_gateways_key_ends_at_its_hard_lifetime(make: Callable[..., tw.World]
                                                         ) -> None:
    w = make()
    last = asyncio.run(up(w, guard=True))
    w.kill("gw-b", signal.SIGKILL)
    killed = time.time()
    accepted, refused = refused_by(w, last, last.ends + MARGIN)
    assert accepted is not None  # nothing cleaned up: still the key, until the deadline
    assert not w.try_psk(last.identity, last.key)
    only_placeholder_and_stunnel_serves_it(w)
    assert NO_GUARD not in (w.root / "gw-b.log").read_text()
    print(f"\nSIGKILL: accepted until {accepted - last.deadline:+.2f} s, refused from"
          f" {refused - last.deadline:+.2f} s of the deadline ({refused - killed:.1f} s"
          f" after the kill; deadline {last.ends - last.deadline:.3f} s before the hard"
          f" lifetime's end)")

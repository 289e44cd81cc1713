"""A link never dies silently: the supervisor and the watchdog, with both daemons in this
process (to break them from inside) and the real KMS simulator and peer channel.

    Daemon A ──WebSocket/mTLS── Daemon B       (this test's event loop)
       │ ProbeSink                 │ ProbeSink  (a data plane that can fail on cue)
       KME-A ═══ qkdgw kms-sim ═══ KME-B       (subprocess)

Each fault is one nobody foresaw (a plain RuntimeError, a sink that never returns): the
link must block, raise `link-failed`, write an audit record, and come back by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.sink import EpochMaterial, EpochRef
from gateway.daemon import Daemon
from gateway.initdemo import DemoLayout
from gateway.site import SiteConfig
from tests.helpers import SimProcess

pytestmark = pytest.mark.slow

#: Upper bound for anything these tests wait for; they poll and return as soon as it holds.
WAIT = 20.0


class ProbeSink:
    """Counts what it is asked; `fault` (if set) runs before an operation and may raise or
    hang, once."""

    name = "probe"

    def __init__(self) -> None:
        self.active: int | None = None
        self.blocks: list[tuple[float, str]] = []
        self.fault: tuple[str, Callable[[], Awaitable[None]]] | None = None

    async def _maybe_fail(self, operation: str) -> None:
        if self.fault is not None and self.fault[0] == operation:
            _, fail = self.fault
            self.fault = None
            await fail()

    async def start(self) -> None:
        pass

    async def install_inbound(self, m: EpochMaterial) -> None:
        await self._maybe_fail("install")

    async def activate_outbound(self, m: EpochMaterial) -> None:
        await self._maybe_fail("activate")
        self.active = m.epoch

    async def retire_inbound(self, ref: EpochRef) -> None:
        pass

    async def retire_outbound(self, ref: EpochRef) -> None:
        pass

    async def block(self, link: str, reason: str) -> None:
        self.blocks.append((time.time(), reason))
        self.active = None

    async def close(self) -> None:
        pass

    async def remove(self) -> None:
        pass


async def _until(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


def _audit(layout: DemoLayout, site: str) -> list[dict[str, Any]]:
    path = layout.state_dir(site) / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(layout: DemoLayout, scenario: Callable[[dict[str, Daemon], dict[str, ProbeSink]],
                                                Awaitable[None]]) -> None:
    async def main() -> None:
        daemons = {s: Daemon(SiteConfig.load(layout.site_config(s))) for s in ("a", "b")}
        sinks = {s: ProbeSink() for s in daemons}
        try:
            for site, d in daemons.items():
                await d.start()
                d.runners["ab"].sinks.append(sinks[site])  # before the link task first runs
            await scenario(daemons, sinks)
        finally:
            for d in daemons.values():
                await d.stop()

    asyncio.run(main())


def _converged(daemons: dict[str, Daemon], beyond: int = 0) -> bool:
    a, b = (daemons[s].runners["ab"].machine for s in ("a", "b"))
    return a.current_epoch == b.current_epoch > beyond and not a.blocked and not b.blocked


def _alarms(d: Daemon) -> dict[str, str]:
    return d.status().links[0].alarms


async def _raise() -> None:
    raise RuntimeError("nobody foresaw this")


def test_an_unforeseen_exception_blocks_the_link_then_it_comes_back(
        setup: tuple[DemoLayout, SimProcess]) -> None:
    layout, _ = setup

    async def scenario(daemons: dict[str, Daemon], sinks: dict[str, ProbeSink]) -> None:
        a, b = daemons["a"], daemons["b"]
        await _until("the first epochs", lambda: _converged(daemons, 2))
        first = a.runners["ab"]
        sinks["b"].fault = ("install", _raise)  # B's link task meets it at the next epoch
        await _until("B's link failed", lambda: "link-failed" in _alarms(b))
        assert sinks["b"].blocks  # fail closed: blocked first
        assert "RuntimeError: nobody foresaw this" in sinks["b"].blocks[-1][1]
        await _until("B restarted and rekeyed", lambda: _converged(daemons, 3)
                     and "link-failed" not in _alarms(b), timeout=WAIT)
        assert a.runners["ab"] is first  # A never failed
        assert "link-failed" not in _alarms(a)

    _run(layout, scenario)
    failed = [r for r in _audit(layout, "b") if r["event"] == "link-failed"]
    assert len(failed) == 1
    assert "RuntimeError: nobody foresaw this" in failed[0]["detail"]
    assert "traffic blocked, restarting in 1 s" in failed[0]["detail"]


@pytest.mark.parametrize("setup", [{"interval": 1.0, "hard_lifetime": 3.0,
                                    "attempt_timeout": 2.0}], indirect=True)
def test_the_watchdog_blocks_a_stuck_link_at_its_hard_lifetime(
        setup: tuple[DemoLayout, SimProcess]) -> None:
    layout, _ = setup
    stuck_at: list[float] = []

    async def hang() -> None:
        stuck_at.append(time.time())
        await asyncio.Event().wait()  # never returns (the link's sink timeout is 30 s)

    async def scenario(daemons: dict[str, Daemon], sinks: dict[str, ProbeSink]) -> None:
        a = daemons["a"]
        await _until("the first epochs", lambda: _converged(daemons, 1))
        sinks["a"].fault = ("activate", hang)  # A's link task hangs in the next activation
        await _until("A's link stuck", lambda: bool(stuck_at))
        runner = a.runners["ab"]
        due = runner.active_until
        assert due is not None
        assert due >= stuck_at[0] + 2.9  # this epoch's hard lifetime
        blocks = len(sinks["a"].blocks)
        await _until("the watchdog blocked A", lambda: len(sinks["a"].blocks) > blocks,
                     timeout=10)
        blocked_at, reason = sinks["a"].blocks[blocks]
        assert reason == "hard lifetime (watchdog)"
        assert blocked_at >= due
        assert "link-failed" in _alarms(a)
        assert "watchdog" in _alarms(a)["link-failed"]
        await _until("A restarted and rekeyed", lambda: _converged(daemons, 2)
                     and "link-failed" not in _alarms(a))

    _run(layout, scenario)
    assert any(r["event"] == "link-failed" and "watchdog" in r["detail"]
               for r in _audit(layout, "a"))


def test_a_spawned_task_that_fails_fails_its_link(setup: tuple[DemoLayout, SimProcess]
                                                  ) -> None:
    layout, _ = setup

    async def scenario(daemons: dict[str, Daemon], sinks: dict[str, ProbeSink]) -> None:
        a = daemons["a"]
        await _until("the first epochs", lambda: _converged(daemons, 1))
        real = a.kme.enc_keys

        async def broken(*args: Any, **kw: Any) -> Any:
            a.kme.enc_keys = real  # type: ignore[method-assign]
            raise RuntimeError("a KMS client bug")

        a.kme.enc_keys = broken  # type: ignore[method-assign]
        await _until("A's link failed", lambda: "link-failed" in _alarms(a))
        assert "enc_keys failed (RuntimeError: a KMS client bug)" in _alarms(a)["link-failed"]
        assert sinks["a"].active is None  # blocked
        epoch = daemons["b"].runners["ab"].machine.current_epoch
        await _until("A came back", lambda: _converged(daemons, epoch)
                     and "link-failed" not in _alarms(a))

    _run(layout, scenario)


def test_a_stalled_event_loop_ends_the_process_with_the_stacks() -> None:
    """The loop-stall thread `qkdgw run` starts: a loop blocked in a handler (here: a
    synchronous sleep) makes the process exit 70 after the limit, printing where it was."""
    import subprocess
    import sys

    script = (
        "import asyncio, time\n"
        "from gateway.daemon import LoopWatchdog\n"
        "async def main():\n"
        "    beat = time.monotonic()\n"
        "    LoopWatchdog(lambda: beat, limit=0.5).start()\n"
        "    await asyncio.sleep(0.1)\n"
        "    time.sleep(30)  # a handler that blocks the loop\n"
        "asyncio.run(main())\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 70, r.stderr
    assert time.monotonic() - t0 < 20  # it did not wait for the blocking call to end
    assert "event loop stalled" in r.stderr
    assert 'File "<string>", line 7 in main' in r.stderr


def test_a_data_plane_that_refuses_the_switch_blocks_alarms_and_recovers(
        setup: tuple[DemoLayout, SimProcess], tmp_path: Path) -> None:
    """The sink-failure contract with a real sink and a real refusal: A's file sink writes
    its key on a 16 KiB tmpfs, which the test fills (the kernel answers ENOSPC). A's switch
    fails: A blocks (the key file goes), raises `sink-failed`, sends no Commit (B never
    switches to that epoch); with space again, the next epoch clears it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    layout, _ = setup
    disk = tmp_path / "small"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "qkdgw-test", str(disk)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        path = layout.site_config("a")
        config = yaml.safe_load(path.read_text())
        (sink,) = config["links"][0]["sinks"]
        sink["path"] = str(disk / "ab.psk")
        path.write_text(yaml.safe_dump(config))
        filler = disk / "filler"

        async def scenario(daemons: dict[str, Daemon], sinks: dict[str, ProbeSink]) -> None:
            a, b = daemons["a"], daemons["b"]
            await _until("the first epochs", lambda: _converged(daemons, 1))
            with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
                while True:  # until ENOSPC
                    f.write(bytes(4096))
            await _until("A's switch failed", lambda: "sink-failed" in _alarms(a))
            alarm = _alarms(a)["sink-failed"]
            assert "could not switch" in alarm, alarm
            assert "No space left on device" in alarm, alarm
            failed = int(alarm.split(":")[0].removeprefix("epoch "))
            assert a.runners["ab"].machine.blocked
            assert sinks["a"].active is None
            assert not (disk / "ab.psk").exists()  # blocked: the key file went
            assert "could not switch" in sinks["a"].blocks[-1][1]
            assert b.runners["ab"].machine.current_epoch < failed  # no Commit came
            filler.unlink()
            await _until("the next epoch on both sides", lambda: _converged(daemons, failed)
                         and "sink-failed" not in _alarms(a))

        _run(layout, scenario)
        records = _audit(layout, "a")
        assert any(r["event"] == "discarded" and "could not switch" in r.get("detail", "")
                   for r in records), [r["event"] for r in records][-20:]
        assert (disk / "ab.psk").read_bytes() == (layout.state_dir("b") / "ab.psk").read_bytes()
    finally:
        subprocess.run(["umount", str(disk)], check=False)

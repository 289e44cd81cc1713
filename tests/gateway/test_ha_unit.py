"""High availability without root or network namespaces (gateway/ha.py, gateway/hanotify.py):
keepalived's notify arguments and FIFO lines, the recorded state and the role a daemon starts
in, the keepalived process above a notify script, the handover track file, `qkdgw ha notify`
as keepalived runs it (with no daemon, and with a fake one on the admin socket), and the `ha:`
section of a site configuration (its validator and reload refusing a change of it)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from common.config import ConfigError
from gateway.ha import (
    HANDOVER_TIMEOUT,
    MAX_FIFO_LINE,
    MAX_NAME,
    MAX_STATE_BYTES,
    NodeRole,
    Notification,
    NotifyFifo,
    handover_file,
    keepalived_ancestor,
    process_started,
    role_at_start,
    state_file,
    write_handover,
)
from gateway.initdemo import DemoLayout
from gateway.reload import TLS_FILES, NotLive, plan
from gateway.site import SiteConfig
from tests.helpers import qkdgw_command

#: Generous: a subprocess or the event loop may stall on a busy machine; no test waits for
#: it unless something is broken.
DEADLINE = 30.0

XFRM = {"type": "xfrm", "local": "192.0.2.1", "remote": "198.51.100.1",
        "local_subnets": ["10.1.0.0/16"], "remote_subnets": ["10.2.0.0/16"]}


def notification(state: str = "MASTER", *, pid: int | None = None,
                 started: int | None = None) -> Notification:
    return Notification.parse(["INSTANCE", "site_a", state, "254"], at=time.time(), pid=pid,
                              started=started)


def this_process() -> tuple[int, int]:
    """This test process as a live "keepalived": its PID and real start time."""
    started = process_started(os.getpid())
    assert started is not None
    return os.getpid(), started


@pytest.fixture
def fake_keepalived(tmp_path: Path) -> Path:
    """/bin/sh under the name keepalived: the kernel names a process after the file it runs
    (/proc/PID/comm), so its children see a keepalived above them."""
    path = tmp_path / "bin" / "keepalived"
    path.parent.mkdir()
    shutil.copy2("/bin/sh", path)
    return path


@pytest.fixture
def dead_process(fake_keepalived: Path) -> tuple[int, int]:
    """A keepalived that ran and is gone: its PID and the start time it had."""
    proc = subprocess.Popen([fake_keepalived, "-c", "read _"], stdin=subprocess.PIPE)
    started = process_started(proc.pid)
    assert started is not None
    proc.kill()
    proc.wait(DEADLINE)
    assert process_started(proc.pid) is None
    return proc.pid, started


# -- keepalived's notify arguments ------------------------------------------------------------

def test_parse_takes_keepalived_arguments() -> None:
    n = Notification.parse(["INSTANCE", "site_a", "MASTER", "254"], at=12.5, pid=7,
                           started=99)
    assert n == Notification("INSTANCE", "site_a", "MASTER", 254, 7, 99, 12.5)
    n = Notification.parse(["GROUP", "site_a", "BACKUP"], at=1.0)
    assert (n.type, n.state, n.priority, n.keepalived_pid, n.keepalived_started) == \
        ("GROUP", "BACKUP", None, None, None)
    assert Notification.parse(["INSTANCE", "x", "FAULT", "0"], at=0).priority == 0
    assert Notification.parse(["INSTANCE", "x", "FAULT", "255"], at=0).priority == 255


@pytest.mark.parametrize(("state", "role"), [
    ("MASTER", NodeRole.ACTIVE), ("BACKUP", NodeRole.STANDBY), ("FAULT", NodeRole.STANDBY),
    ("STOP", NodeRole.STANDBY)])
def test_only_master_makes_the_node_active(state: str, role: NodeRole) -> None:
    assert notification(state).role is role


@pytest.mark.parametrize(("args", "message"), [
    ([], "got 0 argument(s)"),
    (["INSTANCE", "site_a"], "got 2 argument(s)"),
    (["INSTANCE", "site_a", "MASTER", "254", "extra"], "got 5 argument(s)"),
    (["VRRP", "site_a", "MASTER"], "TYPE 'VRRP' is not one of INSTANCE, GROUP"),
    (["instance", "site_a", "MASTER"], "TYPE 'instance'"),
    (["INSTANCE", "site_a", "MAYBE"], "STATE 'MAYBE' is not one of MASTER, BACKUP"),
    (["INSTANCE", "site_a", "master"], "STATE 'master'"),
    (["INSTANCE", "site_a", "MASTER", "256"], "PRIORITY '256' is not a VRRP priority"),
    (["INSTANCE", "site_a", "MASTER", "-1"], "PRIORITY '-1'"),
    (["INSTANCE", "site_a", "MASTER", "high"], "PRIORITY 'high'"),
    (["INSTANCE", "site_a", "MASTER", ""], "PRIORITY ''"),
    (["INSTANCE", "", "MASTER"], f"NAME must be 1 to {MAX_NAME} printable characters"),
    (["INSTANCE", "a" * (MAX_NAME + 1), "MASTER"], "NAME must be"),
    (["INSTANCE", "site\na", "MASTER"], "NAME must be"),
    (["INSTANCE", "site\x1b[2Ja", "MASTER"], "NAME must be"),
], ids=["none", "two", "five", "type", "type-case", "state", "state-case", "priority-256",
        "priority-negative", "priority-word", "priority-empty", "name-empty", "name-long",
        "name-newline", "name-escape"])
def test_parse_refuses_naming_the_problem(args: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Notification.parse(args, at=0)


@pytest.mark.parametrize("priority", ["\u00b2", "\u0661\u0662"], ids=["superscript", "arabic"])
def test_parse_refuses_a_priority_in_other_digits(priority: str) -> None:
    with pytest.raises(ValueError, match=f"PRIORITY {priority!r}"):
        Notification.parse(["INSTANCE", "site_a", "MASTER", priority], at=0)


def test_a_name_of_the_longest_length_is_taken() -> None:
    assert Notification.parse(["INSTANCE", "a" * MAX_NAME, "STOP"], at=0).name == "a" * MAX_NAME


# -- the recorded state -----------------------------------------------------------------------

def test_save_and_load_round_trip_in_a_private_file(tmp_path: Path) -> None:
    n = notification("BACKUP", pid=1234, started=5678)
    n.save(tmp_path)
    path = state_file(tmp_path)
    assert path == tmp_path / "ha" / "keepalived.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Notification.load(tmp_path) == n
    later = replace(n, state="MASTER")
    later.save(tmp_path)  # replaces the previous one
    assert Notification.load(tmp_path) == later
    assert [p.name for p in path.parent.iterdir()] == ["keepalived.json"]  # no temporary left


def test_load_without_a_file_is_none(tmp_path: Path) -> None:
    assert Notification.load(tmp_path) is None


def _record(**changes: object) -> bytes:
    data = {"type": "INSTANCE", "name": "site_a", "state": "MASTER", "priority": 254,
            "keepalived_pid": 1234, "keepalived_started": 5678, "at": 1.0, **changes}
    return json.dumps(data).encode()


@pytest.mark.parametrize(("content", "message"), [
    (b"{not json", "not a keepalived notification"),
    (b"", "not a keepalived notification"),
    (b"[1, 2]", "not a keepalived notification"),
    (b"\xff\xfe", "not a keepalived notification"),
    (_record(state="MAYBE"), "STATE 'MAYBE'"),
    (_record(type="VRRP"), "TYPE 'VRRP'"),
    (_record(priority=300), "PRIORITY '300'"),
    (_record(name="x" * (MAX_NAME + 1)), "NAME must be"),
    (_record(keepalived_pid=-1), "keepalived_pid and keepalived_started are counts"),
    (_record(keepalived_started="5678"), "are counts"),
    (_record(at="yesterday"), "at is not a time"),
    (_record(priority="254"), "PRIORITY"),
    (_record(extra=1), "unexpected keyword argument 'extra'"),
    (_record()[:-1] + b", " + b" " * MAX_STATE_BYTES + b"}",
     f"larger than {MAX_STATE_BYTES} bytes"),
], ids=["not-json", "empty", "a-list", "not-utf8", "state", "type", "priority", "name", "pid",
        "started", "at", "priority-string", "extra-field", "oversized"])
def test_load_refuses_a_corrupt_file_naming_it(tmp_path: Path, content: bytes,
                                               message: str) -> None:
    path = state_file(tmp_path)
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{path}: ") as e:
        Notification.load(tmp_path)
    assert message in str(e.value)


def test_current_only_while_the_keepalived_that_said_it_runs(
        dead_process: tuple[int, int]) -> None:
    pid, started = this_process()
    assert notification(pid=pid, started=started).current()
    assert not notification(pid=pid, started=started + 1).current()  # the PID reused
    assert not notification(pid=dead_process[0], started=dead_process[1]).current()
    assert not notification(pid=None, started=None).current()  # run by hand


def test_a_start_time_is_what_proc_says() -> None:
    pid, started = this_process()
    assert started > 0
    assert process_started(pid) == started  # it does not change
    assert process_started(os.getppid()) is not None


def test_a_record_without_a_start_time_is_not_current(dead_process: tuple[int, int],
                                                      tmp_path: Path) -> None:
    n = notification(pid=dead_process[0], started=None)
    n.save(tmp_path)  # load accepts it: None is allowed for either
    assert Notification.load(tmp_path) == n
    assert not n.current()
    assert role_at_start(tmp_path)[0] is NodeRole.STANDBY


# -- the role a daemon starts in --------------------------------------------------------------

def test_start_standby_when_keepalived_said_nothing(tmp_path: Path) -> None:
    role, reason = role_at_start(tmp_path)
    assert role is NodeRole.STANDBY
    assert "not said anything" in reason


def test_start_active_on_a_master_from_a_keepalived_that_runs(tmp_path: Path) -> None:
    pid, started = this_process()
    notification("MASTER", pid=pid, started=started).save(tmp_path)
    role, reason = role_at_start(tmp_path)
    assert role is NodeRole.ACTIVE
    assert f"pid {pid}" in reason
    assert "MASTER" in reason


def test_start_standby_on_a_backup_from_a_keepalived_that_runs(tmp_path: Path) -> None:
    pid, started = this_process()
    notification("BACKUP", pid=pid, started=started).save(tmp_path)
    role, reason = role_at_start(tmp_path)
    assert role is NodeRole.STANDBY
    assert "BACKUP" in reason


def test_start_standby_on_a_master_from_a_keepalived_gone(
        tmp_path: Path, dead_process: tuple[int, int]) -> None:
    notification("MASTER", pid=dead_process[0], started=dead_process[1]).save(tmp_path)
    role, reason = role_at_start(tmp_path)
    assert role is NodeRole.STANDBY
    assert "no longer runs" in reason


def test_start_standby_on_a_master_said_by_hand(tmp_path: Path) -> None:
    notification("MASTER").save(tmp_path)
    assert role_at_start(tmp_path)[0] is NodeRole.STANDBY


def test_start_standby_on_a_corrupt_file_saying_why(tmp_path: Path) -> None:
    path = state_file(tmp_path)
    path.parent.mkdir()
    path.write_bytes(_record(state="MAYBE", keepalived_pid=os.getpid(),
                             keepalived_started=this_process()[1]))
    role, reason = role_at_start(tmp_path)
    assert role is NodeRole.STANDBY
    assert str(path) in reason
    assert "STATE 'MAYBE'" in reason
    assert reason.endswith("starting standby")


def test_start_standby_on_a_deeply_nested_file(tmp_path: Path) -> None:
    path = state_file(tmp_path)
    path.parent.mkdir()
    path.write_bytes(b"[" * 2000 + b"]" * 2000)
    assert role_at_start(tmp_path)[0] is NodeRole.STANDBY


# -- the keepalived above a notify script -----------------------------------------------------

def test_no_keepalived_above_the_tests() -> None:
    assert keepalived_ancestor() is None
    assert keepalived_ancestor(os.getpid()) is None
    assert keepalived_ancestor(1) is None


def test_no_keepalived_above_a_process_gone(dead_process: tuple[int, int]) -> None:
    assert keepalived_ancestor(dead_process[0]) is None


def test_keepalived_found_above_its_grandchild(fake_keepalived: Path) -> None:
    # keepalived -> sh -> sleep: a notify script run through a shell
    with subprocess.Popen([fake_keepalived, "-c", "sh -c 'sleep 60; :' & wait"],
                          start_new_session=True) as proc:
        try:
            started = process_started(proc.pid)
            assert started is not None
            sleep = _descendant(proc.pid, "sleep")
            assert keepalived_ancestor(sleep) == (proc.pid, started)
            assert keepalived_ancestor(proc.pid) == (proc.pid, started)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_ = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        if int(stat_[stat_.rfind(")") + 2:].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def _descendant(pid: int, comm: str) -> int:
    """The first process named COMM below PID, waiting for it to start."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        below, found = _children(pid), []
        while below:
            child = below.pop()
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == comm:
                    found.append(child)
                below += _children(child)
            except OSError:
                continue  # gone meanwhile
        if found:
            return found[0]
        time.sleep(0.01)
    raise TimeoutError(f"no {comm} below {pid} after {DEADLINE} s")


# -- keepalived's notify FIFO -----------------------------------------------------------------

@dataclass
class Received:
    notifications: list[Notification] = field(default_factory=list)

    def __call__(self, n: Notification) -> None:
        self.notifications.append(n)

    @property
    def states(self) -> list[tuple[str, str, int | None]]:
        return [(n.name, n.state, n.priority) for n in self.notifications]


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {DEADLINE} s")
        await asyncio.sleep(0.005)


@pytest.fixture
def fifo_writer() -> Iterator[Callable[[Path], int]]:
    """Opens a FIFO for writing (read-write and non-blocking: no reader needed); closed
    after the test."""
    fds: list[int] = []

    def open_(path: Path) -> int:
        fds.append(os.open(path, os.O_RDWR | os.O_NONBLOCK))
        return fds[-1]

    yield open_
    for fd in fds:
        os.close(fd)


@pytest.fixture
async def fifo(tmp_path: Path) -> AsyncIterator[tuple[NotifyFifo, Received]]:
    received = Received()
    reader = NotifyFifo(tmp_path / "notify.fifo", received)
    reader.open()
    yield reader, received
    reader.close()


async def test_fifo_is_made_private(fifo: tuple[NotifyFifo, Received]) -> None:
    mode = fifo[0].path.stat().st_mode
    assert stat.S_ISFIFO(mode)
    assert stat.S_IMODE(mode) == 0o600


async def test_fifo_lines_arrive_in_order(fifo: tuple[NotifyFifo, Received],
                                          fifo_writer: Callable[[Path], int]) -> None:
    reader, received = fifo
    fd = fifo_writer(reader.path)
    os.write(fd, b'INSTANCE "site_a" BACKUP 100\nINSTANCE "site_a" MASTER 254\n')
    os.write(fd, b'GROUP "site group" FAU')  # a line in two writes
    await asyncio.sleep(0)
    os.write(fd, b"LT 0\n")
    await until(lambda: len(received.notifications) == 3, "three notifications")
    assert received.states == [("site_a", "BACKUP", 100), ("site_a", "MASTER", 254),
                               ("site group", "FAULT", 0)]
    assert [n.role for n in received.notifications] == [NodeRole.STANDBY, NodeRole.ACTIVE,
                                                        NodeRole.STANDBY]
    assert received.notifications[0].keepalived_pid is None


async def test_fifo_skips_what_is_not_a_notification(
        fifo: tuple[NotifyFifo, Received], fifo_writer: Callable[[Path], int],
        caplog: pytest.LogCaptureFixture) -> None:
    reader, received = fifo
    fd = fifo_writer(reader.path)
    bad = [b'INSTANCE "site_a" MAYBE 100', b"", b'INSTANCE "site_a MASTER 254',
           b"INSTANCE site_a MASTER \xff", b"x" * (2 * MAX_FIFO_LINE)]
    for line in bad:
        os.write(fd, line + b"\n")
        os.write(fd, b'INSTANCE "site_a" STOP\n')
    await until(lambda: len(received.notifications) == len(bad), "the good lines")
    assert received.states == [("site_a", "STOP", None)] * len(bad)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) >= len(bad)
    assert "STATE 'MAYBE'" in skipped[0]


async def test_fifo_delivers_what_was_written_before_it_opened(
        tmp_path: Path, fifo_writer: Callable[[Path], int]) -> None:
    path = tmp_path / "notify.fifo"
    os.mkfifo(path, 0o600)
    fd = fifo_writer(path)
    os.write(fd, b'INSTANCE "site_a" BACKUP 100\nINSTANCE "site_a" MASTER 254\n')
    received = Received()
    reader = NotifyFifo(path, received)
    reader.open()
    try:
        await until(lambda: len(received.notifications) == 2, "the lines written before")
        assert received.states == [("site_a", "BACKUP", 100), ("site_a", "MASTER", 254)]
    finally:
        reader.close()


async def test_fifo_closed_reads_no_more(tmp_path: Path,
                                         fifo_writer: Callable[[Path], int]) -> None:
    path = tmp_path / "notify.fifo"
    first, second = Received(), Received()
    reader = NotifyFifo(path, first)
    reader.open()
    fd = fifo_writer(path)
    os.write(fd, b'INSTANCE "site_a" MASTER 254\n')
    await until(lambda: len(first.notifications) == 1, "the first line")
    reader.close()
    reader.close()  # twice is harmless
    os.write(fd, b'INSTANCE "site_a" BACKUP 100\n')  # kept in the FIFO: FD holds it open
    again = NotifyFifo(path, second)
    again.open()  # the FIFO exists: taken as it is
    try:
        await until(lambda: len(second.notifications) == 1, "the line after close")
        assert second.states == [("site_a", "BACKUP", 100)]
        assert first.states == [("site_a", "MASTER", 254)]
    finally:
        again.close()


@pytest.mark.parametrize("kind", ["file", "directory"])
async def test_fifo_refuses_a_path_that_is_not_a_fifo(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "notify.fifo"
    if kind == "file":
        path.write_text('INSTANCE "site_a" MASTER 254\n')
    else:
        path.mkdir()
    with pytest.raises(ValueError, match=f"^{path} exists and is not a FIFO$"):
        NotifyFifo(path, Received()).open()


async def test_fifo_in_a_missing_directory_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        NotifyFifo(tmp_path / "missing" / "notify.fifo", Received()).open()


# -- the handover track file ------------------------------------------------------------------

def test_handover_file_is_written_whole(tmp_path: Path) -> None:
    path = handover_file(None, tmp_path / "state")
    assert path == tmp_path / "state" / "ha" / "handover"
    write_handover(path, 1)
    assert path.read_text() == "1\n"
    write_handover(path, 0)
    assert path.read_text() == "0\n"
    assert [p.name for p in path.parent.iterdir()] == ["handover"]  # no temporary left


def test_a_configured_handover_file_wins(tmp_path: Path) -> None:
    configured = tmp_path / "keepalived" / "track"
    assert handover_file(configured, tmp_path / "state") == configured
    write_handover(configured, 1)
    assert configured.read_text() == "1\n"
    assert not (tmp_path / "state").exists()


# -- `qkdgw ha notify`: no daemon --------------------------------------------------------------

def notify(*args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*qkdgw_command(), "ha", "notify", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_notify_records_the_state_with_no_daemon(tmp_path: Path) -> None:
    r = notify("--state-dir", str(tmp_path), "INSTANCE", "site_a", "BACKUP", "100")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert "BACKUP: recorded" in r.stderr
    assert f"no daemon answers on {tmp_path / 'admin.sock'}" in r.stderr
    n = Notification.load(tmp_path)
    assert n is not None
    assert (n.type, n.name, n.state, n.priority) == ("INSTANCE", "site_a", "BACKUP", 100)
    assert n.keepalived_pid is None  # run by hand, not by keepalived
    assert stat.S_IMODE(state_file(tmp_path).stat().st_mode) == 0o600


def test_notify_without_priority(tmp_path: Path) -> None:
    r = notify("--state-dir", str(tmp_path), "GROUP", "site_a", "FAULT")
    assert r.returncode == 0, r.stderr
    n = Notification.load(tmp_path)
    assert n is not None
    assert (n.type, n.state, n.priority) == ("GROUP", "FAULT", None)


@pytest.mark.parametrize(("args", "message"), [
    (["INSTANCE", "site_a", "MAYBE"], "qkdgw ha notify: STATE 'MAYBE' is not one of"),
    (["INSTANCE", "site_a", "MASTER", "999"], "qkdgw ha notify: PRIORITY '999'"),
    (["VRRP", "site_a", "MASTER"], "qkdgw ha notify: TYPE 'VRRP'"),
    (["INSTANCE", "site_a"], "the following arguments are required: STATE"),
], ids=["state", "priority", "type", "missing"])
def test_notify_refuses_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    r = notify("--state-dir", str(tmp_path), *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert not state_file(tmp_path).exists()


def test_notify_needs_where_the_daemon_is(tmp_path: Path) -> None:
    r = notify("INSTANCE", "site_a", "MASTER")
    assert r.returncode == 2
    assert "--state-dir" in r.stderr


def test_notify_help_tells_how_keepalived_runs_it() -> None:
    r = notify("--help")
    assert r.returncode == 0
    assert r.stdout.startswith("usage: qkdgw ha notify")
    assert "keepalived" in r.stdout
    assert "--state-dir" in r.stdout


def test_notify_that_cannot_record_fails(tmp_path: Path) -> None:
    (tmp_path / "ha").write_text("a file where the directory should be")
    r = notify("--state-dir", str(tmp_path), "INSTANCE", "site_a", "MASTER")
    assert r.returncode == 1
    assert f"cannot record the state in {tmp_path}" in r.stderr


def test_notify_reads_the_state_dir_from_the_site_configuration(tmp_path: Path,
                                                                demo: DemoLayout) -> None:
    config = yaml.safe_load(demo.site_config("a").read_text())
    config["state_dir"] = str(tmp_path / "state")
    path = demo.root / f"notify-{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    r = notify("-c", str(path), "INSTANCE", "site_a", "MASTER", "254")
    assert r.returncode == 0, r.stderr
    assert f"no daemon answers on {tmp_path / 'state' / 'admin.sock'}" in r.stderr
    n = Notification.load(tmp_path / "state")
    assert n is not None
    assert n.state == "MASTER"


async def test_notify_under_keepalived_records_which_one(tmp_path: Path,
                                                         fake_keepalived: Path) -> None:
    # As keepalived runs a notify script; the shell stays until told, so that its PID and
    # start time can be compared with what was recorded while it still runs.
    proc = await asyncio.create_subprocess_exec(
        fake_keepalived, "-c", '"$@"; echo "exit $?"; read _', "keepalived", *qkdgw_command(),
        "ha", "notify", "--state-dir", str(tmp_path), "INSTANCE", "site_a", "MASTER", "254",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), DEADLINE)
        assert line == b"exit 0\n"
        n = Notification.load(tmp_path)
        assert n is not None
        assert (n.keepalived_pid, n.keepalived_started) == (proc.pid,
                                                            process_started(proc.pid))
        assert n.current()
        role, reason = role_at_start(tmp_path)
        assert role is NodeRole.ACTIVE
        assert f"pid {proc.pid}" in reason
    finally:
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), DEADLINE)
    assert role_at_start(tmp_path)[0] is NodeRole.STANDBY  # that keepalived is gone


# -- `qkdgw ha notify`: a daemon on the admin socket -------------------------------------------

@dataclass
class FakeDaemon:
    """Answers POST /ha on STATE_DIR/admin.sock as the daemon does (or refuses it)."""

    status: int = 200
    answer: dict[str, Any] = field(
        default_factory=lambda: {"node": "a1", "role": "active"})
    bodies: list[Any] = field(default_factory=list)

    async def ha(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        return web.json_response(self.answer, status=self.status)


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[FakeDaemon]:
    fake = FakeDaemon()
    app = web.Application()
    app.router.add_post("/ha", fake.ha)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(tmp_path / "admin.sock")).start()
    yield fake
    await runner.cleanup()


async def notify_async(*args: str) -> tuple[int, str, str]:
    """`qkdgw ha notify ARGS`, leaving this event loop free to serve it."""
    proc = await asyncio.create_subprocess_exec(
        *qkdgw_command(), "ha", "notify", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_notify_tells_the_daemon(tmp_path: Path, daemon: FakeDaemon) -> None:
    code, out, err = await notify_async("--state-dir", str(tmp_path), "INSTANCE", "site_a",
                                        "MASTER", "254")
    assert (code, err) == (0, "")
    assert out == "node a1: active (keepalived site_a: MASTER)\n"
    assert daemon.bodies == [{"args": ["INSTANCE", "site_a", "MASTER", "254"],
                              "keepalived_pid": None, "keepalived_started": None}]
    n = Notification.load(tmp_path)  # recorded as well
    assert n is not None
    assert n.state == "MASTER"


async def test_notify_refused_by_the_daemon_fails(tmp_path: Path, daemon: FakeDaemon) -> None:
    daemon.status, daemon.answer = 400, {"error": "ha is not configured"}
    code, out, err = await notify_async("--state-dir", str(tmp_path), "INSTANCE", "site_a",
                                        "BACKUP")
    assert code == 1
    assert out == ""
    assert "the daemon refused it: ha is not configured" in err
    assert daemon.bodies[0]["args"] == ["INSTANCE", "site_a", "BACKUP"]


# -- the `ha:` section of a site configuration ------------------------------------------------

def site_with(demo: DemoLayout, tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    config = yaml.safe_load(demo.site_config("a").read_text())
    edit(config)
    path = demo.root / f"ha-{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_ha_section_loads_with_defaults(demo: DemoLayout, tmp_path: Path) -> None:
    site = SiteConfig.load(site_with(demo, tmp_path, lambda c: c.update(ha={"node": "a1"})))
    assert site.ha is not None
    assert (site.ha.node, site.ha.handover_file, site.ha.handover_timeout,
            site.ha.notify_fifo) == ("a1", None, HANDOVER_TIMEOUT, None)
    assert SiteConfig.load(demo.site_config("a")).ha is None


def test_ha_refuses_a_sink_removing_its_policies(demo: DemoLayout, tmp_path: Path) -> None:
    def edit(c: dict[str, Any]) -> None:
        c["ha"] = {"node": "a1"}
        c["links"][0]["sinks"] = [{**XFRM, "on_stop": "remove"}]

    with pytest.raises(ConfigError) as e:
        SiteConfig.load(site_with(demo, tmp_path, edit))
    assert "link ab: a sink with on_stop: remove cannot run under ha" in str(e.value)


def test_ha_takes_a_sink_leaving_its_policies_blocking(demo: DemoLayout,
                                                       tmp_path: Path) -> None:
    def edit(c: dict[str, Any]) -> None:
        c["ha"] = {"node": "a1"}
        c["links"][0]["sinks"] = [XFRM, {**XFRM, "on_stop": "block", "reqid": 2000}]

    assert SiteConfig.load(site_with(demo, tmp_path, edit)).ha is not None


def test_without_ha_a_sink_may_remove_its_policies(demo: DemoLayout, tmp_path: Path) -> None:
    site = SiteConfig.load(site_with(demo, tmp_path, lambda c: c["links"][0].update(
        sinks=[{**XFRM, "on_stop": "remove"}])))
    assert site.ha is None


@pytest.mark.parametrize(("ha", "message"), [
    ({"node": "a1", "nodes": ["a1", "a2"]}, "ha.nodes: Extra inputs are not permitted"),
    ({}, "ha.node: Field required"),
    ({"node": "a1", "handover_timeout": -1}, "ha.handover_timeout"),
], ids=["unknown-key", "no-node", "negative-timeout"])
def test_ha_section_refuses_naming_the_field(demo: DemoLayout, tmp_path: Path,
                                             ha: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SiteConfig.load(site_with(demo, tmp_path, lambda c: c.update(ha=ha)))


def test_reload_refuses_a_change_of_ha(demo: DemoLayout, tmp_path: Path) -> None:
    files = dict.fromkeys(TLS_FILES, "digest")
    base = yaml.safe_load(demo.site_config("a").read_text())

    def load(name: str, ha: dict[str, Any] | None) -> SiteConfig:
        config = copy.deepcopy(base)
        if ha is not None:
            config["ha"] = ha
        path = demo.root / f"ha-reload-{tmp_path.name}-{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return SiteConfig.load(path)

    without, a1, a2 = load("without", None), load("a1", {"node": "a1"}), load("a2",
                                                                             {"node": "a2"})
    assert plan(a1, a1, old_files=files, new_files=files).site == ()
    for old, new, changed in [(without, a1, "ha:"), (a1, without, "ha:"), (a1, a2, "ha.node:")]:
        with pytest.raises(NotLive) as e:
            plan(old, new, old_files=files, new_files=files)
        assert f"  {changed} the node's name and the files keepalived" in str(e.value)


# -- what a standby keeps of a link -----------------------------------------------------------


USED = ["0b6c5f44-2f1e-4c8e-9a0d-6a1f3c2b7e10", "5d2e8a91-7c3b-4f60-8e25-b4c1d9f0a3e7"]


def test_a_standby_keeps_epoch_numbers_and_used_key_ids_and_no_key_reference() -> None:
    from gateway.core.snapshot import OutboundRef, PendingRef, Snapshot

    ref = PendingRef(epoch=7, spi_in=0x1001, spi_out=0x2001, retire_at=None)
    full = Snapshot(link="ab", role="initiator", max_epoch=9, peer_out=8,
                    outbound=OutboundRef(epoch=8, spi_in=0x1002, spi_out=0x2002,
                                         suite="qkd+ML-KEM-768+X25519/CatKDF-SHA-384",
                                         activated_at=1.0),
                    inbound=[ref], old_outbound=[ref], used_key_ids=USED)
    kept = full.without_keys()
    assert (kept.max_epoch, kept.peer_out, kept.used_key_ids) == (9, 8, USED)
    assert kept.outbound is None
    assert kept.inbound == kept.old_outbound == []
    assert Snapshot.model_validate_json(kept.model_dump_json()) == kept  # a valid state file

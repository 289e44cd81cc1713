"""High availability: two gateways per site under keepalived (VRRP), docs/ha.md.

keepalived holds the election and the site's virtual addresses; a gateway only follows what
keepalived says. This module is that following, through keepalived's two channels (its
notify FIFO, read by the daemon: no program to start on the failover path; and its notify
script, `qkdgw ha notify`) and two small files:

- `STATE_DIR/ha/keepalived.json`: the last state keepalived notified (`qkdgw ha notify`, run
  by keepalived's `notify`), with the keepalived process that said it (PID and start time).
  A daemon that starts while that keepalived still runs takes the role it gave (the daemon
  alone restarted on a MASTER node); after a node restart the file is stale and the daemon
  starts standby, until keepalived says otherwise.
- `STATE_DIR/ha/handover`: keepalived's `track_file` (weight 0): "0" normally; "1" puts this
  node's VRRP instance in FAULT, so it gives the addresses up at once (a priority-0 advert:
  the other node takes over within its skew time, not three advert intervals). That is the
  planned switchover, `qkdgw ha handover`.

MASTER makes the node active; every other state standby. Starting standby is the safe
default: two actives only ever come from keepalived saying so (split brain, docs/ha.md).

Standard library only: `qkdgw ha notify` runs on the failover path and starts in tens of
milliseconds (gateway/hanotify.py), not the CLI's half second.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from common.files import write_private


class NodeRole(StrEnum):
    """What a gateway of a pair does: the active one keys the links; the standby keeps its
    configuration, KMS client and metrics up, holds no keys and installs nothing."""

    ACTIVE = "active"
    STANDBY = "standby"


#: keepalived's states (a notify script's third argument) and the role each gives.
KEEPALIVED_STATES = {"MASTER": NodeRole.ACTIVE, "BACKUP": NodeRole.STANDBY,
                     "FAULT": NodeRole.STANDBY, "STOP": NodeRole.STANDBY,
                     "DELETED": NodeRole.STANDBY}
#: keepalived's notify scripts get TYPE NAME STATE PRIORITY; these TYPEs.
NOTIFY_TYPES = ("INSTANCE", "GROUP")
#: keepalived's VRRP names are short; a longer one is not from keepalived.
MAX_NAME = 64
#: A state file larger than this is not ours (it holds one short JSON object).
MAX_STATE_BYTES = 4096
#: keepalived's FIFO lines are short (`INSTANCE "site_a" MASTER 254`); a longer one is
#: refused and skipped.
MAX_FIFO_LINE = 512

log = logging.getLogger(__name__)

#: After `qkdgw ha handover` put this node in FAULT and it went standby, the track file is
#: set back to "0" this much later, so keepalived returns it to BACKUP. The other node takes
#: the addresses within its skew time (under one advert interval) of the priority-0 advert;
#: a second leaves room for a slow one. Back in BACKUP with `nopreempt` this node does not
#: take the addresses back.
HANDOVER_SETTLE = 1.0
#: keepalived puts the instance in FAULT within milliseconds of the track file's change
#: (inotify); no standby within this means it does not watch the file (docs/ha.md).
HANDOVER_TIMEOUT = 5.0


def ha_dir(state_dir: Path) -> Path:
    return state_dir / "ha"


def state_file(state_dir: Path) -> Path:
    return ha_dir(state_dir) / "keepalived.json"


def handover_file(configured: Path | None, state_dir: Path) -> Path:
    """keepalived's track_file for the handover (`ha.handover_file`, by default in the
    state directory)."""
    return configured or ha_dir(state_dir) / "handover"


@dataclass(frozen=True)
class Notification:
    """One state keepalived notified, and which keepalived process said it."""

    type: str
    name: str
    state: str
    priority: int | None
    #: The keepalived process the notify script ran under (None: run by hand), and its
    #: start time in clock ticks since boot (a PID is reused; the pair is not).
    keepalived_pid: int | None
    keepalived_started: int | None
    at: float

    @property
    def role(self) -> NodeRole:
        return KEEPALIVED_STATES[self.state]

    @classmethod
    def parse(cls, args: list[str], *, at: float, pid: int | None = None,
              started: int | None = None) -> Notification:
        """keepalived's notify arguments TYPE NAME STATE [PRIORITY]; ValueError naming what
        is wrong."""
        if len(args) not in (3, 4):
            raise ValueError(f"expected TYPE NAME STATE [PRIORITY] (keepalived's notify"
                             f" arguments), got {len(args)} argument(s)")
        kind, name, state = args[:3]
        if kind not in NOTIFY_TYPES:
            raise ValueError(f"TYPE {kind!r} is not one of {', '.join(NOTIFY_TYPES)}")
        if not name or len(name) > MAX_NAME or not name.isprintable():
            raise ValueError(f"NAME must be 1 to {MAX_NAME} printable characters")
        if state not in KEEPALIVED_STATES:
            raise ValueError(f"STATE {state!r} is not one of {', '.join(KEEPALIVED_STATES)}")
        priority = None
        if len(args) == 4:
            if not (args[3].isascii() and args[3].isdigit()) or not 0 <= int(args[3]) <= 255:
                raise ValueError(f"PRIORITY {args[3]!r} is not a VRRP priority (0 to 255)")
            priority = int(args[3])
        return cls(kind, name, state, priority, pid, started, at)

    def save(self, state_dir: Path) -> None:
        write_private(state_file(state_dir), json.dumps(asdict(self)).encode())

    @classmethod
    def load(cls, state_dir: Path) -> Notification | None:
        """The last notification, or None when there is none or it cannot be read (the
        daemon then starts standby, and says why in the log)."""
        path = state_file(state_dir)
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return None
        if len(raw) > MAX_STATE_BYTES:
            raise ValueError(f"{path}: larger than {MAX_STATE_BYTES} bytes")
        try:
            data = json.loads(raw)
            n = cls(**data)
            if not all(isinstance(v, str) for v in (n.type, n.name, n.state)):
                raise ValueError("type, name and state are strings")
            if n.priority is not None and (type(n.priority) is not int):
                raise ValueError("PRIORITY must be a number (0 to 255)")
            args = [n.type, n.name, n.state] + ([] if n.priority is None else [str(n.priority)])
            cls.parse(args, at=n.at)  # the same checks as from keepalived
            if not all(v is None or (type(v) is int and v >= 0)
                       for v in (n.keepalived_pid, n.keepalived_started)):
                raise ValueError("keepalived_pid and keepalived_started are counts")
            if type(n.at) not in (int, float):
                raise ValueError("at is not a time")
        except (ValueError, TypeError, RecursionError) as e:
            raise ValueError(f"{path}: not a keepalived notification: {e}") from None
        return n

    def current(self) -> bool:
        """The keepalived that said it still runs (so what it said still holds)."""
        if self.keepalived_pid is None or self.keepalived_started is None:
            return False
        return process_started(self.keepalived_pid) == self.keepalived_started


def role_at_start(state_dir: Path) -> tuple[NodeRole, str]:
    """The role a daemon starts in, and why."""
    try:
        n = Notification.load(state_dir)
    except ValueError as e:
        return NodeRole.STANDBY, f"{e}: starting standby"
    if n is None:
        return NodeRole.STANDBY, "keepalived has not said anything yet"
    if not n.current():
        return NodeRole.STANDBY, f"keepalived's last word ({n.state}) is from a keepalived" \
                                 " that no longer runs"
    return n.role, f"keepalived (pid {n.keepalived_pid}) says {n.state}"


def process_started(pid: int) -> int | None:
    """PID's start time (clock ticks since boot, /proc/PID/stat field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def keepalived_ancestor(pid: int | None = None) -> tuple[int, int] | None:
    """The nearest keepalived process above PID (default: this process), with its start
    time: the one whose `notify` runs us (through a shell or not). None when there is none."""
    pid = os.getppid() if pid is None else pid
    for _ in range(16):  # a notify script is a child or grandchild; bounded anyway
        if pid <= 1:
            return None
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if comm == "keepalived":
            started = process_started(pid)
            return None if started is None else (pid, started)
        try:
            pid = int(stat[stat.rfind(")") + 2:].split()[1])  # field 4: the parent
        except (IndexError, ValueError):
            return None
    return None


def write_handover(path: Path, value: int) -> None:
    """keepalived's track_file: 0 normal, 1 FAULT (this node gives the addresses up)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)


class NotifyFifo:
    """keepalived's `vrrp_notify_fifo`, read by the daemon: a line per state change
    (`INSTANCE "site_a" MASTER 254`), each handed to ON_NOTIFY. Opened read-write, so it
    never reads end-of-file when keepalived restarts; what keepalived wrote while no daemon
    read is read at start, in order (the last line is its state now). Created 0600 if
    missing."""

    def __init__(self, path: Path, on_notify: Callable[[Notification], None]) -> None:
        self.path = path
        self._on_notify = on_notify
        self._fd: int | None = None
        self._buffer = b""

    def open(self) -> None:
        """Raises OSError (e.g. PATH exists and is not a FIFO: ValueError)."""
        try:
            os.mkfifo(self.path, 0o600)
        except FileExistsError:
            if not stat.S_ISFIFO(os.stat(self.path).st_mode):
                raise ValueError(f"{self.path} exists and is not a FIFO") from None
        import asyncio  # (here: `qkdgw ha notify` imports this module and starts fast)

        self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
        asyncio.get_running_loop().add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        if self._fd is None:
            return
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_FIFO_LINE:
            log.error("%s: a line longer than %d bytes: skipped", self.path, MAX_FIFO_LINE)
            self._buffer = b""
        for line in lines:
            self._line(line)

    def _line(self, raw: bytes) -> None:
        try:
            n = Notification.parse(shlex.split(raw.decode()), at=time.time())
        except (ValueError, UnicodeDecodeError) as e:
            log.error("%s: not a keepalived notification (%s): skipped", self.path, e)
            return
        self._on_notify(n)

    def close(self) -> None:
        import asyncio

        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

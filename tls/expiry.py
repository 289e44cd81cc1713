"""When each PSK identity ends, in files next to the PSK file, so that the end does not depend
on the gateway being alive (`qkdgw tls-guard`, tls/guard.py, enforces it).

For the PSK file FILE:
- `FILE.expiry`: JSON `{"IDENTITY": DEADLINE, ...}`, Unix time; no keys; 0600, replaced
  atomically. The sink writes it before FILE with every change. An identity in FILE without
  a deadline here has none left: it is treated as expired (fail closed).
- `FILE.lock`: the sink and the guard change FILE and FILE.expiry only while holding this
  lock (flock), so neither undoes the other's change.
- `FILE.guard`: a running guard holds this lock (flock) for its lifetime; the sink looks at
  it to warn when nothing would end its keys if the gateway died.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from common.files import write_private

EXPIRY, LOCK, GUARD = ".expiry", ".lock", ".guard"
#: Deadlines are Unix times before the year 5000; anything else is not what the sink wrote.
MAX_TIME = 95_617_584_000


class ExpiryError(ValueError):
    """FILE.expiry is not what the sink writes; the message says why (it holds no keys)."""


def beside(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold FILE.lock: changes to FILE and FILE.expiry by one writer at a time."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds keys
    fd = os.open(beside(path, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def guarded(path: Path) -> bool:
    """Whether a guard holds FILE.guard (it takes the lock exclusively; a free lock, or no
    file, means no guard runs)."""
    try:
        fd = os.open(beside(path, GUARD), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def hold_guard(path: Path) -> int | None:
    """Take FILE.guard for this process's lifetime: the file descriptor, or None if another
    guard holds it. A sink's brief look at the lock may collide: try for a second."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds keys
    fd = os.open(beside(path, GUARD), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + 1.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(0.05)


def read(path: Path) -> dict[str, float]:
    """FILE.expiry: identity -> deadline. No file: no deadlines."""
    try:
        data = json.loads(beside(path, EXPIRY).read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as e:
        raise ExpiryError(f"{beside(path, EXPIRY)}: unreadable ({type(e).__name__})") from None
    # Compared, not converted: a 400-digit integer must be refused, not overflow a float.
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and type(v) in (int, float) and 0 <= v <= MAX_TIME
            for k, v in data.items()):
        raise ExpiryError(f"{beside(path, EXPIRY)}: not a map of identities to times")
    return {k: float(v) for k, v in data.items()}


def write(path: Path, deadlines: dict[str, float]) -> None:
    write_private(beside(path, EXPIRY), json.dumps(deadlines, indent=1).encode())

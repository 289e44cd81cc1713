"""Telling a service that its key file changed: SIGHUP through a pid file, or an operator's
hook command with bounded time and a clear error. The hook learns what happened from its
environment, never the key."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from common.sink import SinkError

PID_MAX_LIMIT = 2**22


def sighup(pid_file: Path) -> str | None:
    """SIGHUP to the process in PID_FILE; or why there is none to signal (the service is not
    running: it reads the file when it starts)."""
    try:
        with pid_file.open("rb") as f:
            text = f.read(64)  # a pid file holds a number and a newline
        pid = int(text.strip())
    except FileNotFoundError:
        return "no such file"
    except (ValueError, OSError):
        pid = 0
    # kill(0 or -1) would signal a whole process group, or everything; Linux pids stay below
    # 2**22 (PID_MAX_LIMIT).
    if not 0 < pid <= PID_MAX_LIMIT:
        raise SinkError(f"{pid_file}: does not hold a process id")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return "no such process"
    except PermissionError:
        raise SinkError(f"{pid_file}: not allowed to signal process {pid}") from None
    return None


async def run_hook(argv: list[str], env: dict[str, str], timeout: float) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    except OSError as e:
        raise SinkError(f"hook {argv[0]!r} cannot run: {e.strerror}") from None
    try:
        async with asyncio.timeout(timeout):
            output, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise SinkError(f"hook {argv[0]!r} ran past {timeout} s") from None
    if proc.returncode != 0:
        tail = output.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise SinkError(f"hook {argv[0]!r} exited with {proc.returncode}: {tail[0][:200]}")

"""Running an operator's hook command after a sink changed something, with bounded time and a
clear error. The hook learns what happened from its environment, never the key."""

from __future__ import annotations

import asyncio
import os

from gateway.sink import SinkError


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

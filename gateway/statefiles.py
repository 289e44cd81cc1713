"""Each link's state file, written off the event loop and in order.

A write and its fsync take ~1 ms of waiting on this machine's disk, once per link and flush:
at hundreds of rekeys a second that stalled the event loop for a third of its time. One
worker thread does every write and deletion in the order they were asked for, so a write
never overtakes a later one or the deletion of a removed link's file, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.files import write_private

log = logging.getLogger("gateway")


class StateFiles:
    """The state files under DIRECTORY, one per link (`LINK.json`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-io")

    def path(self, link: str) -> Path:
        return self.directory / f"{link}.json"

    async def write(self, states: Mapping[str, bytes]) -> set[str]:
        """Write each link's state; the links whose file could not be written (they stay
        dirty: the caller asks again at its next flush)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, self._write, dict(states))

    def _write(self, states: dict[str, bytes]) -> set[str]:
        failed = set()
        for link, data in states.items():
            try:
                write_private(self.path(link), data)
            except OSError as e:  # a full disk: the old state stays, which is safe
                log.error("link %s: cannot save its state to %s: %s", link, self.path(link),
                          e.strerror)
                failed.add(link)
        return failed

    async def delete(self, link: str) -> None:
        """Delete the link's file, after every write asked for before."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._io, self._delete, link)

    def _delete(self, link: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(link).unlink()

    def close(self) -> None:
        """Wait for the writes in flight; no more after this."""
        self._io.shutdown(wait=True)

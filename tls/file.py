"""The `file` sink: each epoch's key written to a 0600 file, and an optional hook run.

Any PSK-capable service can consume hybrid keys this way (like Rosenpass's key output):
point it at the file and reload it from the hook. The file holds the key of the current
outbound epoch (both sides write the same key for an epoch); on block it is removed, so
nothing can pick up a stale key.

    sinks:
      - type: file
        path: /run/qkdgw/ab.psk
        purpose: tls_psk          # which key of the epoch (docs/key-schedule.md)
        format: hex               # hex | base64 | raw
        hook: [systemctl, reload, my-service]

The hook runs with QKDGW_EVENT (activate | block | remove: the link or the sink left the
configuration, and the file with it), QKDGW_LINK, QKDGW_EPOCH, QKDGW_FINGERPRINT and
QKDGW_KEY_FILE in its environment; never the key itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Sequence
from typing import Literal, Self

from pydantic import Field

from common.config import FilePath, Seconds
from common.files import write_private
from common.sink import EpochMaterial, EpochRef, SinkConfig, SinkContext, SinkError
from kdf import Purpose
from tls import pskfile
from tls.hook import run_hook

log = logging.getLogger(__name__)

PURPOSES = {p.name.lower(): p for p in Purpose}


class FileSinkConfig(SinkConfig):
    type: Literal["file"]
    path: FilePath
    purpose: Literal["tls_psk", "ike_ppk", "esp_i2r", "esp_r2i"] = "tls_psk"
    format: Literal["hex", "base64", "raw"] = "hex"
    hook: list[str] | None = Field(default=None, min_length=1,
                                   description="command and arguments, run after each change")
    hook_timeout: Seconds = 10.0

    def build(self, context: SinkContext) -> FileSink:
        return FileSink(self, context.link)  # a file has no limits to report

    @classmethod
    def check_together(cls, sinks: Sequence[tuple[str, Self]]) -> None:
        """Two sinks writing one file would undo each other."""
        pskfile.check_distinct([(link, sink.path) for link, sink in sinks], "file")


class FileSink:
    def __init__(self, config: FileSinkConfig, link: str) -> None:
        self.config, self.link = config, link
        self.name = f"file:{config.path}"

    async def start(self) -> None:
        """Nothing to do: no file until the first activation."""

    async def install_inbound(self, material: EpochMaterial) -> None:
        """Nothing to do: a PSK file holds one key, written on activation."""

    async def activate_outbound(self, material: EpochMaterial) -> None:
        key = material.key(PURPOSES[self.config.purpose])
        data = {"hex": key.hex().encode(), "base64": base64.b64encode(key),
                "raw": key}[self.config.format]
        try:  # (off the event loop: a write and its fsync wait on the disk)
            await asyncio.to_thread(write_private, self.config.path, data)
        except OSError as e:
            raise SinkError(f"cannot write {self.config.path}: {e.strerror}") from None
        await self._hook("activate", material.link, material.epoch, material.fingerprint)

    async def retire_inbound(self, ref: EpochRef) -> None:
        """Nothing to do: the file only ever holds the current key."""

    async def retire_outbound(self, ref: EpochRef) -> None:
        """Nothing to do: the next activation already replaced the key."""

    async def block(self, link: str, reason: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.config.path.unlink()
        await self._hook("block", link, 0, "")

    async def close(self) -> None:
        """The key file stays: the service keeps working across a gateway restart."""

    async def remove(self) -> None:
        """The key file goes, as on block: no epoch will ever replace it. The hook runs with
        QKDGW_EVENT=remove."""
        with contextlib.suppress(FileNotFoundError):
            self.config.path.unlink()
        await self._hook("remove", self.link, 0, "")

    async def _hook(self, event: str, link: str, epoch: int, fingerprint: str) -> None:
        if self.config.hook:
            await run_hook(self.config.hook, {
                "QKDGW_EVENT": event, "QKDGW_LINK": link, "QKDGW_EPOCH": str(epoch),
                "QKDGW_FINGERPRINT": fingerprint, "QKDGW_KEY_FILE": str(self.config.path)},
                self.config.hook_timeout)

"""The `tls_psk` sink: each epoch's key as a TLS 1.3 external PSK, in a PSK secrets file that
stunnel, OpenSSL-based servers and the Python helper (tls/pyssl.py) read.

    sinks:
      - type: tls_psk
        path: /etc/stunnel/qkdgw-ab.psk   # stunnel: PSKsecrets = this file
        role: server                       # server | client (the TLS side, not the link's)
        reload_pid_file: /run/stunnel4/stunnel.pid   # SIGHUP after each change
        hook: [systemctl, reload, my-service]        # or a command (optional)

The file is written atomically, 0600, after every change. Per epoch (identity
`qkdgw-LINK-eEPOCH`, key: the key schedule's TLS PSK, 32 bytes):
- `install_inbound`: a server adds the identity (it accepts every identity in the file).
- `activate_outbound`: the identity becomes the first line, the one clients use; a client's
  file holds only that one. A client switches only after the peer's server accepts it:
  the rekey protocol activates a side only after the other installed.
- `retire_inbound`: the previous identity removed, after the grace period: it is refused
  from then on. Established connections are not touched: TLS keys them at the handshake.
- `block`: the file left with a placeholder identity whose random key nobody has: new
  connections fail (no fallback), never on a stale key. Before the first epoch likewise.
A restarted gateway adopts the identities it finds in the file, so service continues.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
from typing import Literal

from pydantic import Field

from gateway.core.events import EpochMaterial, EpochRef
from gateway.files import write_private
from gateway.sink import SinkContext, SinkError
from kdf import Purpose
from kms.configfile import ConfigModel, FilePath, Seconds
from tls import pskfile
from tls.hook import run_hook

log = logging.getLogger(__name__)


class TlsPskSinkConfig(ConfigModel):
    type: Literal["tls_psk"]
    path: FilePath = Field(description="the PSK secrets file (stunnel: PSKsecrets)")
    role: Literal["server", "client"] = Field(
        description="server: accepts the live epochs' identities; client: uses the current")
    reload_pid_file: FilePath | None = Field(
        default=None, description="send SIGHUP to the process in this pid file after each"
                                  " change (stunnel re-reads PSKsecrets on SIGHUP)")
    hook: list[str] | None = Field(default=None, min_length=1,
                                   description="command and arguments, run after each change")
    hook_timeout: Seconds = 10.0

    def build(self, context: SinkContext) -> TlsPskSink:
        return TlsPskSink(self, context.link)


class TlsPskSink:
    def __init__(self, config: TlsPskSinkConfig, link: str) -> None:
        self.config, self.link = config, link
        self.name = f"tls_psk:{config.path}"
        self.keys: dict[int, bytes] = {}  # epoch -> TLS PSK of the live epochs
        self.current: int | None = None  # the epoch clients use
        self._not_running = False  # the reload target was missing last time (warned once)
        self._written: list[tuple[str, bytes]] = []  # what the file holds

    # -- the Sink protocol -----------------------------------------------------------------

    async def start(self) -> None:
        """Adopt what a previous run left in the file: the service keeps working across a
        restart of the gateway; the core retires those epochs as usual."""
        try:
            entries = pskfile.loads(self.config.path.read_bytes())
        except FileNotFoundError:
            await self._write("block", 0)  # the service can start; nothing works until a key
            return
        except (OSError, pskfile.PskFileError) as e:
            raise SinkError(f"{self.config.path}: {e}") from None
        for position, (ident, key) in enumerate(entries):
            m = pskfile.IDENTITY.match(ident)
            if m and m.group("link") == self.link:
                self.keys[int(m.group("epoch"))] = key
                if position == 0:
                    self.current = int(m.group("epoch"))
        if self.keys:
            log.info("link %s: adopted PSK identities %s from %s", self.link,
                     ", ".join(pskfile.identity(self.link, e) for e in sorted(self.keys)),
                     self.config.path)

    async def install_inbound(self, material: EpochMaterial) -> None:
        self.keys[material.epoch] = material.key(Purpose.TLS_PSK)
        if self.config.role == "server":
            await self._write("install", material.epoch)

    async def activate_outbound(self, material: EpochMaterial) -> None:
        self.keys.setdefault(material.epoch, material.key(Purpose.TLS_PSK))
        self.current = material.epoch
        await self._write("activate", material.epoch)

    async def retire_inbound(self, ref: EpochRef) -> None:
        if self.keys.pop(ref.epoch, None) is not None and ref.epoch != self.current:
            await self._write("retire", ref.epoch)

    async def retire_outbound(self, ref: EpochRef) -> None:
        """Nothing to do: the next activation already moved clients on."""

    async def block(self, link: str, reason: str) -> None:
        self.keys.clear()
        self.current = None
        await self._write("block", 0)

    async def close(self) -> None:
        """The file stays: the service keeps working across a restart of the gateway."""

    # -- the file ----------------------------------------------------------------------------

    def entries(self) -> list[tuple[str, bytes]]:
        """The current epoch first; a server also lists the other live ones, newest first.
        With none, a placeholder with a random key nobody has: stunnel refuses an empty file
        (and keeps its old secrets on a failed reload), so blocking must leave a valid one."""
        order = [] if self.current is None or self.current not in self.keys else [self.current]
        if self.config.role == "server":
            order += sorted((e for e in self.keys if e != self.current), reverse=True)
        if not order:
            return [(f"qkdgw-{self.link}-blocked", secrets.token_bytes(32))]
        return [(pskfile.identity(self.link, e), self.keys[e]) for e in order]

    async def _write(self, event: str, epoch: int) -> None:
        entries = self.entries()
        if entries == self._written and self.keys:
            return  # e.g. a client retiring an epoch it no longer uses: no reload needed
        try:
            write_private(self.config.path, pskfile.dumps(entries))
        except OSError as e:
            raise SinkError(f"cannot write {self.config.path}: {e.strerror}") from None
        self._written = entries
        self._reload()
        if self.config.hook:
            current = "" if self.current is None else pskfile.identity(self.link, self.current)
            await run_hook(self.config.hook, {
                "QKDGW_EVENT": event, "QKDGW_LINK": self.link, "QKDGW_EPOCH": str(epoch),
                "QKDGW_PSK_IDENTITY": current, "QKDGW_KEY_FILE": str(self.config.path)},
                self.config.hook_timeout)

    def _reload(self) -> None:
        """SIGHUP to the service. A service that is not running needs none: it reads the
        file when it starts (so the gateway may start first, and a restart is harmless)."""
        pid_file = self.config.reload_pid_file
        if pid_file is None:
            return
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (FileNotFoundError, ProcessLookupError) as e:
            if not self._not_running:
                log.warning("link %s: %s: %s: the service is not running; it reads %s when it"
                            " starts", self.link, pid_file,
                            "no such file" if isinstance(e, FileNotFoundError)
                            else "no such process", self.config.path)
            self._not_running = True
            return
        except ValueError:
            raise SinkError(f"{pid_file}: does not hold a process id") from None
        except PermissionError:
            raise SinkError(f"{pid_file}: not allowed to signal process {pid}") from None
        self._not_running = False
        log.debug("link %s: SIGHUP to %d (%s)", self.link, pid, pid_file)

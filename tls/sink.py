"""The `tls_psk` sink: each epoch's key as a TLS 1.3 external PSK, in a PSK secrets file that
stunnel, OpenSSL-based servers and the Python helper (tls/pyssl.py) read.

    sinks:
      - type: tls_psk
        path: /etc/stunnel/qkdgw-ab.psk   # stunnel: PSKsecrets = this file
        role: server                       # server | client (the TLS side, not the link's)
        reload_pid_file: /run/stunnel4/stunnel.pid   # SIGHUP after each change
        hook: [systemctl, reload, my-service]        # or a command (optional)
        on_stop: block                     # block | keep

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

Every identity ends at its epoch's hard lifetime, counted from when this gateway first
learnt the key (before either side uses it): the deadlines go to FILE.expiry
(tls/expiry.py) with every change, the sink never writes an identity past its deadline, and
`qkdgw tls-guard` (tls/guard.py), a process of its own, removes identities at their deadlines
also when the gateway is dead. On stop the file gets the placeholder (`on_stop: block`, the
default) or stays as it is (`keep`: the service goes on across a planned restart, until the
deadlines). A restarted gateway adopts the identities whose deadlines have not passed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Literal, Self

from pydantic import Field

from common.config import FilePath, Seconds
from common.files import write_private
from common.sink import EpochMaterial, EpochRef, SinkConfig, SinkContext, SinkError
from kdf import Purpose
from tls import expiry, pskfile
from tls.hook import run_hook, sighup

log = logging.getLogger(__name__)


class TlsPskSinkConfig(SinkConfig):
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
    on_stop: Literal["block", "keep"] = Field(
        default="block", description="block: leave the placeholder (no new handshake works);"
                                     " keep: leave the identities until their deadlines")

    def build(self, context: SinkContext) -> TlsPskSink:
        return TlsPskSink(self, context.link, context.lifetimes.hard_lifetime)

    @classmethod
    def check_together(cls, sinks: Sequence[tuple[str, Self]]) -> None:
        """Two sinks writing one file would undo each other (and confuse the guard)."""
        pskfile.check_distinct([(link, sink.path) for link, sink in sinks], "tls_psk")


class TlsPskSink:
    def __init__(self, config: TlsPskSinkConfig, link: str, hard_lifetime: float) -> None:
        self.config, self.link, self.hard_lifetime = config, link, hard_lifetime
        self.name = f"tls_psk:{config.path}"
        self.keys: dict[int, bytes] = {}  # epoch -> TLS PSK of the live epochs
        self.deadlines: dict[int, float] = {}  # epoch -> when its identity ends (Unix time)
        self.current: int | None = None  # the epoch clients use
        self._not_running = False  # the reload target was missing last time (warned once)
        self._unguarded = False  # no guard held the file last time a key was written (warned)
        self._written: list[tuple[str, bytes]] = []  # what the file holds

    # -- the Sink protocol -----------------------------------------------------------------

    async def start(self) -> None:
        """Adopt the identities a previous run left whose deadlines have not passed: the
        service keeps working across a restart (on_stop: keep, or a crash); the core retires
        those epochs as usual. Anything else in the file goes."""
        path, now = self.config.path, time.time()
        with expiry.locked(path):
            try:
                found = pskfile.loads(path.read_bytes())
            except FileNotFoundError:
                found = []
            except (OSError, pskfile.PskFileError) as e:
                raise SinkError(f"{path}: {e}") from None
            try:
                deadlines = expiry.read(path)
            except expiry.ExpiryError as e:
                log.warning("link %s: %s: adopting no identity", self.link, e)
                deadlines = {}
            for position, (ident, key) in enumerate(found):
                m = pskfile.IDENTITY.match(ident)
                if m and m.group("link") == self.link and deadlines.get(ident, 0) > now:
                    epoch = int(m.group("epoch"))
                    self.keys[epoch], self.deadlines[epoch] = key, deadlines[ident]
                    if position == 0:
                        self.current = epoch
        if self.keys:
            log.info("link %s: adopted PSK identities %s from %s", self.link,
                     ", ".join(pskfile.identity(self.link, e) for e in sorted(self.keys)),
                     path)
        if len(self.keys) == len(found) > 0:
            self._written = found  # all still valid: no change, no reload
        else:
            await self._write("start", 0)  # the service can start; nothing stale in it

    async def install_inbound(self, material: EpochMaterial) -> None:
        self._learn(material)
        if self.config.role == "server":
            await self._write("install", material.epoch)

    async def activate_outbound(self, material: EpochMaterial) -> None:
        self._learn(material)
        self.current = material.epoch
        await self._write("activate", material.epoch)

    async def retire_inbound(self, ref: EpochRef) -> None:
        self.deadlines.pop(ref.epoch, None)
        if self.keys.pop(ref.epoch, None) is not None and ref.epoch != self.current:
            await self._write("retire", ref.epoch)

    async def retire_outbound(self, ref: EpochRef) -> None:
        """Nothing to do: the next activation already moved clients on."""

    async def block(self, link: str, reason: str) -> None:
        self.keys.clear()
        self.deadlines.clear()
        self.current = None
        await self._write("block", 0)

    async def close(self) -> None:
        """on_stop: block: the placeholder, so no new handshake succeeds once the gateway is
        gone. keep: the file stays and the guard ends each identity at its deadline."""
        path = self.config.path
        if self.config.on_stop == "keep":
            if expiry.guarded(path):
                log.info("link %s: %s left as it is (on_stop: keep); qkdgw tls-guard ends its"
                         " identities at their deadlines", self.link, path)
            else:
                log.warning("link %s: %s left as it is (on_stop: keep), and no `qkdgw"
                            " tls-guard` holds %s: nothing ends its keys", self.link, path,
                            expiry.beside(path, expiry.GUARD))
            return
        self.keys.clear()
        self.deadlines.clear()
        self.current = None
        try:
            await self._write("stop", 0)
        except SinkError as e:  # the daemon is stopping: say it here, nobody else will
            log.error("link %s: on_stop: block: %s", self.link, e)
            return
        log.info("link %s: %s left blocked (on_stop: block)", self.link, path)

    async def remove(self) -> None:
        """As on stop: the file stays (the service reads it, and a missing file would make
        its reload fail and keep its old keys), blocked or left to the guard as on_stop says."""
        await self.close()

    # -- the file ----------------------------------------------------------------------------

    def _learn(self, material: EpochMaterial) -> None:
        """The key, and its deadline from the first time this gateway sees the epoch: that is
        before either side uses it, so the identity never outlives the hard lifetime as
        either gateway counts it."""
        self.keys.setdefault(material.epoch, material.key(Purpose.TLS_PSK))
        self.deadlines.setdefault(material.epoch, time.time() + self.hard_lifetime)

    def live(self, now: float) -> list[int]:
        """The epochs to list: the current first; a server also lists the other live ones,
        newest first. None past its deadline."""
        order = [] if self.current is None else [self.current]
        if self.config.role == "server":
            order += sorted((e for e in self.keys if e != self.current), reverse=True)
        return [e for e in order if e in self.keys and self.deadlines[e] > now]

    def entries(self, epochs: list[int]) -> list[tuple[str, bytes]]:
        """The file's lines for EPOCHS; with none, the placeholder (pskfile.placeholder)."""
        if not epochs:
            return [pskfile.placeholder(self.link)]
        return [(pskfile.identity(self.link, e), self.keys[e]) for e in epochs]

    async def _write(self, event: str, epoch: int) -> None:
        path = self.config.path
        epochs = self.live(time.time())
        entries = self.entries(epochs)
        if entries == self._written:
            return  # e.g. a client retiring an epoch it no longer uses: no reload needed
        try:
            with expiry.locked(path):
                # The deadlines first: a crash between the two writes leaves identities
                # without a deadline, which the guard removes (never one without an end).
                expiry.write(path, {pskfile.identity(self.link, e): self.deadlines[e]
                                    for e in epochs})
                write_private(path, pskfile.dumps(entries))
        except OSError as e:
            raise SinkError(f"cannot write {path}: {e.strerror}") from None
        self._written = entries
        if epochs:
            self._check_guard()
        self._reload()
        if self.config.hook:
            current = pskfile.identity(self.link, epochs[0]) \
                if epochs and epochs[0] == self.current else ""
            await run_hook(self.config.hook, {
                "QKDGW_EVENT": event, "QKDGW_LINK": self.link, "QKDGW_EPOCH": str(epoch),
                "QKDGW_PSK_IDENTITY": current, "QKDGW_KEY_FILE": str(path)},
                self.config.hook_timeout)

    def _check_guard(self) -> None:
        """Warn (once while it lasts) when no guard would end the file's keys if this gateway
        died: nothing else removes them then (docs/tls.md)."""
        if expiry.guarded(self.config.path):
            if self._unguarded:
                log.info("link %s: qkdgw tls-guard now guards %s", self.link, self.config.path)
            self._unguarded = False
        elif not self._unguarded:
            self._unguarded = True
            log.warning("link %s: no `qkdgw tls-guard` holds %s: if this gateway dies, the"
                        " keys in %s stay usable past their hard lifetime; run `qkdgw"
                        " tls-guard -c SITE.yaml` beside the service (docs/tls.md)", self.link,
                        expiry.beside(self.config.path, expiry.GUARD), self.config.path)

    def _reload(self) -> None:
        """SIGHUP to the service. A service that is not running needs none: it reads the
        file when it starts (so the gateway may start first, and a restart is harmless)."""
        pid_file = self.config.reload_pid_file
        if pid_file is None:
            return
        missing = sighup(pid_file)
        if missing is not None:
            if not self._not_running:
                log.warning("link %s: %s: %s: the service is not running; it reads %s when it"
                            " starts", self.link, pid_file, missing, self.config.path)
            self._not_running = True
            return
        self._not_running = False
        log.debug("link %s: SIGHUP to the process in %s", self.link, pid_file)

"""The `skip` sink: the gateway as a SKIP Key Provider (draft-cisco-skip-02) for its site's
routers. Each epoch of the link feeds the Key Provider; routers fetch keys derived from it
(kdf/skip.py) over TLS-PSK.

    type: skip
    listen: 0.0.0.0:8443          # where this site's routers reach the Key Provider
    local_system_id: kp-a         # this gateway's Key Provider ID
    remote_system_id: kp-b        # the peer gateway's: the link's other end
    psk_file: skip/clients.psk    # IDENTITY:HEXKEY per router, 0600

Every link's `skip` sink with the same `listen` shares one server and one Key Provider: one
`localSystemID`, one PSK file, each link one remote system. The mapping onto the protocol:
install (both sides hold the epoch: the peer's key IDs of it are answered), activate (new
keys come from it), retire (its keys are gone), block (no key at all). Keys are never stored:
after a restart the Key Provider serves from the next epoch on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from pydantic import Field

from common.config import Address, ConfigError, FilePath, HostPort
from common.psktls import PskTable, ServerContext
from common.sink import (
    EpochMaterial,
    EpochRef,
    ProvidedKey,
    SinkConfig,
    SinkContext,
    SinkError,
    SinkEvents,
)
from common.skip import Request, SkipError, SystemId
from common.skip_server import SkipServer
from ipsec.skip.provider import KeyProvider
from kdf import Purpose

log = logging.getLogger("ipsec.skip")


class SkipSinkConfig(SinkConfig):
    type: Literal["skip"]
    listen: Address = Field(description="HOST:PORT the Key Provider serves routers on")
    local_system_id: SystemId = Field(description="this gateway's Key Provider ID")
    remote_system_id: SystemId = Field(description="the peer gateway's Key Provider ID")
    psk_file: FilePath = Field(description="IDENTITY:HEXKEY per router (0600)")

    def build(self, context: SinkContext) -> SkipSink:
        return SkipSink(self, context.link, context.events)

    @classmethod
    def check_together(cls, sinks: Sequence[tuple[str, Self]]) -> None:
        """Sinks on one address are one Key Provider: one ID and PSK file, and a remote
        system names one link (a router's request names only the remote system)."""
        by_address: dict[HostPort, list[tuple[str, Self]]] = {}
        for link, sink in sinks:
            by_address.setdefault(sink.listen, []).append((link, sink))
        for address, group in by_address.items():
            first_link, first = group[0]
            remotes: dict[str, str] = {}
            for link, sink in group:
                for what in ("local_system_id", "psk_file"):
                    if getattr(sink, what) != getattr(first, what):
                        raise ValueError(f"skip sinks on {address}: links {first_link} and"
                                         f" {link} give different {what}s (one Key"
                                         " Provider serves there)")
                if sink.remote_system_id == sink.local_system_id:
                    raise ValueError(f"link {link}: skip remote_system_id is this Key"
                                     " Provider's own local_system_id")
                if (other := remotes.get(sink.remote_system_id)) is not None:
                    raise ValueError(f"skip sinks on {address}: links {other} and {link} both"
                                     f" name remote_system_id {sink.remote_system_id}")
                remotes[sink.remote_system_id] = link


@dataclass
class _Shared:
    """One listening Key Provider and the sinks it serves."""

    provider: KeyProvider
    tls: ServerContext
    sinks: dict[str, SkipSink] = field(default_factory=dict)  # by remote system ID
    server: SkipServer = field(init=False)

    def __post_init__(self) -> None:
        self.server = SkipServer(self.tls, self.answer)

    def answer(self, request: Request, client: str) -> dict[str, Any]:
        """The Key Provider's answer; a key is recorded (audited) before it is handed out,
        and is not handed out when it cannot be: a 500."""
        body, key = self.provider.handle(request)
        sink = self.sinks.get(key.peer) if key is not None else None
        if key is not None and sink is not None:
            try:
                sink.events.key_provided(key.link, ProvidedKey(
                    epoch=key.epoch, key_id=key.key_id, fingerprint=key.fingerprint,
                    bits=key.bits, client=client, peer=key.peer, origin=key.origin))
            except Exception as e:  # (whatever it is, the key stays here)
                log.error("SKIP: key %s for %s not handed out: %s", key.key_id, client, e)
                raise SkipError(500, f"the key could not be recorded: {e}") from None
        return body.body()


#: The Key Providers this process serves, by listen address.
_SERVING: dict[HostPort, _Shared] = {}


class SkipSink:
    def __init__(self, config: SkipSinkConfig, link: str, events: SinkEvents) -> None:
        self.config, self.link, self.events = config, link, events
        self.name = f"skip:{config.local_system_id}->{config.remote_system_id}"
        self._shared: _Shared | None = None

    async def start(self) -> None:
        c = self.config
        try:
            table = PskTable.load(c.psk_file)  # (read at each start: a reload takes a new one)
        except ConfigError as e:
            raise SinkError(str(e)) from None
        shared = _SERVING.get(c.listen)
        if shared is None:
            shared = _Shared(KeyProvider(c.local_system_id), ServerContext(table))
            try:
                await shared.server.start(c.listen.host, c.listen.port)
            except OSError as e:
                raise SinkError(f"cannot serve SKIP on {c.listen}: {e.strerror or e}") \
                    from None
            _SERVING[c.listen] = shared
            log.info("SKIP Key Provider %s serving on %s", c.local_system_id, c.listen)
        elif shared.provider.local_system_id != c.local_system_id:
            raise SinkError(f"SKIP on {c.listen} is Key Provider"
                            f" {shared.provider.local_system_id}, not {c.local_system_id}")
        shared.tls.table = table
        if (other := shared.sinks.get(c.remote_system_id)) not in (None, self):
            raise SinkError(f"SKIP on {c.listen}: link {other.link if other else '?'}"
                            f" already serves {c.remote_system_id}")
        shared.sinks[c.remote_system_id] = self
        shared.provider.add_link(c.remote_system_id, self.link)
        self._shared = shared

    def _provider(self) -> KeyProvider:
        if self._shared is None:
            raise SinkError(f"{self.name}: not started")
        return self._shared.provider

    async def install_inbound(self, material: EpochMaterial) -> None:
        self._provider().install(self.config.remote_system_id, material.epoch,
                                 material.key(Purpose.SKIP_ROOT))

    async def activate_outbound(self, material: EpochMaterial) -> None:
        provider = self._provider()
        provider.install(self.config.remote_system_id, material.epoch,
                         material.key(Purpose.SKIP_ROOT))
        provider.activate(self.config.remote_system_id, material.epoch)

    async def retire_inbound(self, ref: EpochRef) -> None:
        self._provider().retire(self.config.remote_system_id, ref.epoch)

    async def retire_outbound(self, ref: EpochRef) -> None:
        """Nothing more: new keys already come from the epoch that replaced it, and the peer's
        IDs of it are answered until its inbound side retires."""

    async def block(self, link: str, reason: str) -> None:
        if self._shared is not None:
            self._shared.provider.clear(self.config.remote_system_id)

    async def close(self) -> None:
        shared, self._shared = self._shared, None
        if shared is None:
            return
        if shared.sinks.get(self.config.remote_system_id) is self:
            del shared.sinks[self.config.remote_system_id]
            shared.provider.remove_link(self.config.remote_system_id)
        if not shared.sinks:
            _SERVING.pop(self.config.listen, None)
            await shared.server.stop()
            log.info("SKIP Key Provider %s on %s stopped", shared.provider.local_system_id,
                     self.config.listen)

    async def remove(self) -> None:
        """As close: the keys lived in memory only."""
        await self.close()

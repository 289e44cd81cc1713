"""The one interface between the gateway and a data plane (Rosenpass's WireGuardBroker in
spirit): the rekey core decides, a sink applies. The bottom layer: it imports nothing of the
gateway, so sinks (ipsec/, tls/) depend on this contract and the gateway composes them at its
top (gateway/site.py), never the other way round.

Every call names the link and epoch. A sink raises `SinkError` with a reason when it cannot
do what it is asked; the daemon reports that to the core (which keeps traffic on the old key
or blocked, never in clear). Sinks never decide when to rekey: they may say a new key is
needed (`SinkEvents.rekey_needed`), and the core decides.

A sink's configuration is a `SinkConfig` (a pydantic model tagged by `type`); `build` makes
the sink, and `check_together` sees every link's sink of its type at once (e.g. that two xfrm
sinks' reqid ranges do not overlap).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, Self

from common.config import ConfigModel, HostPort
from kdf import EpochKeys, Purpose


class Role(StrEnum):
    """A gateway's role on a link: the initiator fetches QKD keys as master SAE and starts
    each epoch; the responder answers."""

    INITIATOR = "initiator"
    RESPONDER = "responder"


@dataclass(frozen=True)
class EpochMaterial:
    """One epoch of one link, as the sinks need it. Only the fingerprint is ever shown."""

    link: str
    epoch: int
    role: Role
    suite: str
    key_ids: tuple[str, ...]
    spi_in: int  # SPI (or identifier) of the SA this side receives on
    spi_out: int  # ... and of the SA it sends on (the peer's spi_in)
    keys: EpochKeys = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return self.keys.fingerprint

    def key(self, purpose: Purpose) -> bytes:
        return self.keys.key(purpose)

    @property
    def inbound_esp(self) -> bytes:
        """AES-256-GCM key + salt of the SA this side receives on."""
        return self.key(Purpose.ESP_R2I if self.role is Role.INITIATOR else Purpose.ESP_I2R)

    @property
    def outbound_esp(self) -> bytes:
        return self.key(Purpose.ESP_I2R if self.role is Role.INITIATOR else Purpose.ESP_R2I)


@dataclass(frozen=True)
class EpochRef:
    """An epoch known by number and SPIs only (e.g. after a restart: keys are never stored)."""

    link: str
    epoch: int
    spi_in: int
    spi_out: int


class SinkError(Exception):
    pass


class RekeyCause(StrEnum):
    """Why a data plane needs a new key."""

    SOFT_LIMIT = "soft-limit"  # a byte, packet or time soft limit of a key was reached
    HARD_LIMIT = "hard-limit"  # the data plane dropped a key at a hard limit
    NO_SA = "no-sa"  # traffic found no key (the kernel's ACQUIRE)
    PLANE_RESTARTED = "plane-restarted"  # the data plane lost its keys (charon restarted)


@dataclass(frozen=True)
class ProvidedKey:
    """A key a sink derived from an epoch and handed to a consumer outside the gateway (a
    router asking over SKIP): what the audit trail records of it, never the key."""

    epoch: int
    key_id: str
    fingerprint: str
    bits: int
    client: str  # who got it (the PSK identity it authenticated with)
    peer: str  # the peer system the key is shared with
    origin: bool  # made here (a new key), else the peer's, fetched by its ID


class SinkEvents(Protocol):
    """What a sink may tell the gateway, e.g. from kernel SA expiry notifications."""

    def rekey_needed(self, link: str, cause: RekeyCause, detail: str) -> None:
        """The link needs a new key soon (the core starts an epoch, or asks its peer to)."""

    def key_provided(self, link: str, key: ProvidedKey) -> None:
        """The sink is handing out a key derived from the link's epoch: recorded first.
        SinkError when it cannot be recorded: the sink must then not hand the key out."""


@dataclass(frozen=True)
class KeyLifetimes:
    """The link's key lifetimes, which a sink mirrors into the data plane (e.g. as kernel SA
    hard lifetimes: the backstop when the daemon is gone)."""

    #: Past this age, with no fresh key, the link's traffic is blocked.
    hard_lifetime: float
    #: The longest an exchange may take: an epoch's inbound key may wait this long for use.
    attempt_timeout: float


@dataclass(frozen=True)
class SinkContext:
    """What a sink is built with, besides its own configuration."""

    link: str
    lifetimes: KeyLifetimes
    events: SinkEvents
    #: The peer channel: where this gateway listens and where the peer does. A sink whose
    #: policies could cover that traffic must let it through, or no rekey could happen.
    control_listen: HostPort
    control_peer: HostPort


class Sink(Protocol):
    #: A short name for logs, metrics and the audit trail, e.g. "file:/run/qkdgw/ab.psk".
    name: str

    async def start(self) -> None:
        """Take over the data plane before the first epoch: e.g. install policies that
        block until a key exists, adopt what a crashed predecessor left."""

    async def install_inbound(self, material: EpochMaterial) -> None:
        """Accept traffic protected by the epoch's key (the peer may switch to it any time)."""

    async def activate_outbound(self, material: EpochMaterial) -> None:
        """Protect outgoing traffic with the epoch's key from now on."""

    async def retire_inbound(self, ref: EpochRef) -> None:
        """Stop accepting the epoch's key: the peer has moved past it."""

    async def retire_outbound(self, ref: EpochRef) -> None:
        """Forget the epoch's outgoing key: a newer one replaced it, or it expired."""

    async def block(self, link: str, reason: str) -> None:
        """Drop the link's traffic until an epoch is activated: no valid key."""

    async def close(self) -> None:
        """The daemon stops: release resources, and leave the data plane as the sink's
        documented stop behaviour says (never sending in clear)."""

    async def remove(self) -> None:
        """The sink is gone from the configuration (its link removed, or the sink replaced by
        a reload): stop as `close` does, and delete what holds a key of this sink only and
        would otherwise outlive it (a key file nothing will ever replace)."""


class SinkConfig(ConfigModel):
    """Base of every sink's configuration (a subclass adds `type: Literal[...]`)."""

    @abstractmethod
    def build(self, context: SinkContext) -> Sink:
        """The sink this configuration describes, for the link CONTEXT names."""

    @classmethod
    def check_together(cls, sinks: Sequence[tuple[str, Self]]) -> None:
        """Check this type's sinks of every link at once, as (link, config) pairs; raise
        ValueError naming the problem. By default there is nothing to check."""

"""The one interface between the gateway and a data plane (Rosenpass's WireGuardBroker in
spirit): the rekey core decides, a sink applies.

Every call names the link and epoch. A sink raises `SinkError` with a reason when it cannot
do what it is asked; the daemon reports that to the core (which keeps traffic on the old key
or blocked, never in clear). Sinks never decide when to rekey.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.core.events import EpochMaterial, EpochRef
from gateway.core.policy import Policy
from kms.configfile import HostPort


class SinkError(Exception):
    pass


class SinkEvents(Protocol):
    """What a sink may tell the gateway, e.g. from kernel SA expiry notifications."""

    def soft_limit(self, link: str, detail: str) -> None:
        """A byte, packet or time soft limit of the current key was reached: rekey soon."""


@dataclass(frozen=True)
class SinkContext:
    """What a sink is built with, besides its own configuration."""

    link: str
    #: The link's rekey policy: a sink mirrors its lifetimes into the data plane (e.g. as
    #: kernel SA hard lifetimes, the backstop when the daemon is gone).
    policy: Policy
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

"""The one interface between the gateway and a data plane (Rosenpass's WireGuardBroker in
spirit): the rekey core decides, a sink applies.

Every call names the link and epoch. A sink raises `SinkError` with a reason when it cannot
do what it is asked; the daemon reports that to the core (which keeps traffic on the old key
or blocked, never in clear). Sinks never decide when to rekey.
"""

from __future__ import annotations

from typing import Protocol

from gateway.core.events import EpochMaterial, EpochRef


class SinkError(Exception):
    pass


class SinkEvents(Protocol):
    """What a sink may tell the gateway, e.g. from kernel SA expiry notifications."""

    def soft_limit(self, link: str, detail: str) -> None:
        """A byte, packet or time soft limit of the current key was reached: rekey soon."""


class Sink(Protocol):
    #: A short name for logs, metrics and the audit trail, e.g. "file:/run/qkdgw/ab.psk".
    name: str

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
        """The daemon stops: release resources, leave the data plane as it is."""

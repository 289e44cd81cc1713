"""The part of a link's state that survives a restart, as a file format (JSON, no keys).

A state file is read back after a crash, a power loss or an operator's edit, so everything in
it is checked as strictly as a peer message: every number bounded, every list bounded, no
member unknown. `Snapshot.model_validate(json)` refuses anything else with an error that names
the member; `LinkMachine` restores only from a validated snapshot.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.core.messages import Epoch, Spi
from kms.models import SourceKeyId

VERSION: Literal[1] = 1
#: Epochs a snapshot may list as still to retire; a few are normal (grace periods, an
#: abandoned exchange), hundreds mean a corrupt file.
MAX_PENDING = 64
#: Key IDs a snapshot keeps to refuse their reuse after a restart (the KME refuses older ones).
USED_KEY_IDS_PERSISTED = 64
#: Wall-clock seconds: finite, not before 1970 and not after the year 5000.
Timestamp = Annotated[float, Field(ge=0, le=95_617_584_000, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class PendingRef(_Model):
    """An epoch's key still in the data plane, to be retired at `retire_at` (None: once
    the peer has moved past it)."""

    epoch: Epoch
    spi_in: Spi
    spi_out: Spi
    retire_at: Timestamp | None = None


class OutboundRef(_Model):
    epoch: Epoch
    spi_in: Spi
    spi_out: Spi
    suite: str = Field(max_length=80)
    activated_at: Timestamp
    #: False while the data plane was still switching to it: after a restart what it sends
    #: on is unknown, so the link starts blocked.
    switched: bool = True


class Snapshot(_Model):
    version: Literal[1] = VERSION
    link: str = Field(max_length=64)
    role: Literal["initiator", "responder"]
    max_epoch: Epoch
    peer_out: Epoch
    outbound: OutboundRef | None
    inbound: list[PendingRef] = Field(max_length=MAX_PENDING)
    old_outbound: list[PendingRef] = Field(max_length=MAX_PENDING)
    used_key_ids: list[SourceKeyId] = Field(max_length=USED_KEY_IDS_PERSISTED)

    def without_keys(self) -> Snapshot:
        """What a standby keeps of a link (docs/ha.md): epoch numbers and the key IDs used,
        no reference to a key in the data plane (it holds none)."""
        return self.model_copy(update={"outbound": None, "inbound": [], "old_outbound": []})

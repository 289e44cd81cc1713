"""What the rekey core is told (events, past tense) and what it asks for (actions, imperative).

The driver turns I/O into events, feeds them to `LinkMachine.handle(event, now)`, and carries
out the actions it gets back, in order. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TypeAlias

from common.sink import EpochMaterial, EpochRef
from gateway.core.messages import Abort, Accept, Ack, Commit, Message, Offer, RekeyRequest
from kms.models import QkdKey


class Alarm(StrEnum):
    KMS_UNAVAILABLE = "kms-unavailable"  # no QKD keys: KME down, link down, QBER too high
    QKD_FALLBACK = "qkd-fallback"  # the current epoch has no QKD key (pqc-fallback mode)
    QKD_SUPPLY_LOW = "qkd-supply-low"  # the link cannot supply keys at the needed cadence
    HARD_LIFETIME = "hard-lifetime"  # no fresh key in time: traffic is blocked
    PEER_UNREACHABLE = "peer-unreachable"  # exchanges with the peer keep failing
    EXCHANGE_FAILED = "exchange-failed"  # the peer refused or failed an exchange
    SINK_FAILED = "sink-failed"  # a sink could not install, switch, retire or block
    PEER_LINK_UNKNOWN = "peer-link-unknown"  # the peer gateway has no such link with us
    #: The link's task failed unexpectedly (raised by the daemon, not the core): traffic
    #: blocked and the link restarted from its saved state.
    LINK_FAILED = "link-failed"


# -- events --------------------------------------------------------------------------------


class Event:
    """Base of everything the driver tells the core."""


@dataclass(frozen=True)
class Tick(Event):
    """Time passed (the driver calls at `next_deadline()`; extra calls are harmless)."""


@dataclass(frozen=True)
class RekeyRequested(Event):
    """A local reason to rekey now: `qkdgw rekey`, or a sink's soft byte/packet limit."""

    reason: str


@dataclass(frozen=True)
class KmsStatusObserved(Event):
    stored_key_count: int | None  # None: the source gives none (a SKIP Key Provider)
    key_size: int
    kme_id: str
    peer_kme_id: str
    qber: float | None = None
    key_rate: float | None = None  # secret key rate, bit/s
    link_up: bool | None = None
    #: This link's fraction of the KME pair's supply, and how many links draw from the pair
    #: (the driver knows them all: gateway/core/kmsview.py says how the supply is shared).
    share: float = 1.0
    sharing: int = 1


@dataclass(frozen=True)
class KmsUnreachable(Event):
    reason: str


@dataclass(frozen=True)
class QkdKeysFetched(Event):
    request: int
    keys: tuple[QkdKey, ...]


@dataclass(frozen=True)
class QkdFetchFailed(Event):
    request: int
    reason: str


@dataclass(frozen=True)
class PeerMessage(Event):
    """A decoded message from the peer gateway, over the pinned mutual-TLS channel."""

    message: Message
    peer_cert_sha256: bytes = b""


@dataclass(frozen=True)
class OfferReceived(PeerMessage):
    message: Offer


@dataclass(frozen=True)
class AcceptReceived(PeerMessage):
    message: Accept


@dataclass(frozen=True)
class CommitReceived(PeerMessage):
    message: Commit


@dataclass(frozen=True)
class AckReceived(PeerMessage):
    message: Ack


@dataclass(frozen=True)
class AbortReceived(PeerMessage):
    message: Abort


@dataclass(frozen=True)
class RekeyRequestReceived(PeerMessage):
    message: RekeyRequest


_RECEIVED: dict[type[Message], type[PeerMessage]] = {
    Offer: OfferReceived, Accept: AcceptReceived, Commit: CommitReceived, Ack: AckReceived,
    Abort: AbortReceived, RekeyRequest: RekeyRequestReceived,
}


@dataclass(frozen=True)
class LinkUnknownAtPeer(Event):
    """The peer gateway answered that it has no such link with this gateway (not configured
    yet, or with another peer): what was sent never reached a peer's core."""

    detail: str


def received(message: Message, peer_cert_sha256: bytes = b"") -> PeerMessage:
    """The event for a decoded peer message."""
    return _RECEIVED[type(message)](message, peer_cert_sha256)


# The driver answers every data-plane action (docs/protocol.md, "When a sink fails"):
# InstallInbound with SinkInstalled or InstallFailed, ActivateOutbound with SinkActivated or
# ActivateFailed, a retirement or a block only when it failed.


@dataclass(frozen=True)
class SinkInstalled(Event):
    """Every sink has installed the epoch's inbound key."""

    epoch: int


@dataclass(frozen=True)
class InstallFailed(Event):
    """A sink could not install the epoch's inbound key."""

    epoch: int
    reason: str


@dataclass(frozen=True)
class SinkActivated(Event):
    """Every sink sends on the epoch's key now."""

    epoch: int


@dataclass(frozen=True)
class ActivateFailed(Event):
    """A sink could not switch to the epoch's key: what the data plane sends on is unknown."""

    epoch: int
    reason: str


@dataclass(frozen=True)
class RetireFailed(Event):
    """A sink could not remove an epoch's key: it is still in the data plane."""

    ref: EpochRef
    outbound: bool
    reason: str


@dataclass(frozen=True)
class BlockFailed(Event):
    """A sink could not block the link's traffic."""

    reason: str


@dataclass(frozen=True)
class StartGranted(Event):
    """The driver's answer to RequestStart: the link may start its exchange now."""


# -- actions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchQkdKeys:
    """enc_keys as master SAE; answer with QkdKeysFetched or QkdFetchFailed."""

    request: int
    number: int
    size: int


@dataclass(frozen=True)
class FetchQkdKeysById:
    """dec_keys as slave SAE; answer with QkdKeysFetched or QkdFetchFailed."""

    request: int
    key_ids: tuple[str, ...]
    size: int


@dataclass(frozen=True)
class Send:
    message: Message


@dataclass(frozen=True)
class InstallInbound:
    """Install the epoch's inbound key in every sink; answer SinkInstalled or InstallFailed."""

    material: EpochMaterial


@dataclass(frozen=True)
class ActivateOutbound:
    """Send on the epoch's key from now on (its inbound counterpart exists at the peer)."""

    material: EpochMaterial


@dataclass(frozen=True)
class RetireInbound:
    """Remove the key this side receives on for the epoch: the peer no longer sends on it."""

    ref: EpochRef


@dataclass(frozen=True)
class RetireOutbound:
    """Remove the key this side sent on for the epoch: a newer one has replaced it, or it
    expired."""

    ref: EpochRef


@dataclass(frozen=True)
class RequestStart:
    """Ask for a turn to start an exchange (the driver paces how many run at once, e.g.
    after a restart, when every link wants one); answer StartGranted. DEADLINE: when the
    link's key reaches its hard lifetime (the time of asking when it has none): the driver
    serves the earliest first."""

    deadline: float


@dataclass(frozen=True)
class Block:
    """Drop the link's traffic: no valid key (fail closed, never clear text)."""

    reason: str


@dataclass(frozen=True)
class RaiseAlarm:
    alarm: Alarm
    detail: str


@dataclass(frozen=True)
class ClearAlarm:
    alarm: Alarm


class RecordKind(StrEnum):
    """What a `Record` tells (docs/operations.md lists them, tests hold the list to this)."""

    REKEY_STARTED = "rekey-started"  # I begins an exchange
    REKEY_DEFERRED = "rekey-deferred"  # a rekey was asked for during an exchange
    FETCHED = "fetched"  # QKD keys from the KME (also those fetched ahead)
    OFFERED = "offered"  # I sent an Offer
    DERIVED = "derived"  # the epoch's keys derived
    INSTALLED = "installed"  # the epoch's inbound key is in the data plane
    ACTIVATED = "activated"  # this side sends on the epoch's key
    REKEYED = "rekeyed"  # the epoch is done on this side
    RETIRED = "retired"  # an epoch's inbound or outbound key left the data plane
    DISCARDED = "discarded"  # keys of an abandoned exchange (or fetched ahead), never used
    REJECTED = "rejected"  # R refused an Offer
    UNCONFIRMED = "unconfirmed"  # I switched, but the Ack never came


class Cause(StrEnum):
    """Why keys or an exchange were given up: the `cause` label of qkdgw_rekey_failures."""

    TIMEOUT = "timeout"  # no answer within attempt_timeout
    PEER_ABORT = "peer-abort"  # the peer gave the exchange up
    PEER_RESTART = "peer-restart"  # the responder restarted (its copy of the keys is gone)
    CONFIRM = "confirm"  # a key confirmation did not verify
    INVALID_KEY = "invalid-key"  # a public value the exchange cannot use
    KMS = "kms"  # a KME could not deliver
    SINK = "sink"  # a data plane refused a key
    SUPERSEDED = "superseded"  # a newer Offer took over
    ABANDONED = "abandoned"  # keys that came for an exchange already given up
    DROPPED = "dropped"  # keys fetched ahead that can no longer be used
    LINK_FAILED = "link-failed"  # the daemon restarted a failed link (not from the core)


@dataclass(frozen=True)
class Record:
    """A key-handling event for the audit trail, logs and metrics. Carries key IDs and
    fingerprints, never key bytes."""

    kind: RecordKind
    epoch: int
    key_ids: tuple[str, ...] = ()
    fingerprint: str = ""
    detail: str = ""
    latency: float | None = None  # REKEYED: seconds since the exchange started here
    started: float | None = None  # REKEYED: when the exchange started here
    cause: Cause | None = None  # DISCARDED: why


@dataclass(frozen=True)
class Persist:
    """The link's persistent state changed: save `machine.snapshot()` (no secrets in it),
    now or a little later, so a restart resumes."""


#: Everything the core asks the driver to do; a driver handles each (mypy checks it does).
Action: TypeAlias = (FetchQkdKeys | FetchQkdKeysById | Send | InstallInbound | ActivateOutbound
                     | RetireInbound | RetireOutbound | Block | RaiseAlarm | ClearAlarm | Record
                     | Persist | RequestStart)

"""Peer protocol messages (versions 1 and 2) and their codec. Pure: bytes in, messages out.

One epoch, initiator I, responder R (docs/protocol.md):

    I → R  Offer    key IDs, ML-KEM encapsulation key, X25519 key, nonce, SPI
    R → I  Accept   ML-KEM ciphertext, X25519 key, nonce, SPI, key confirmation
    I → R  Commit   key confirmation, and the key IDs for the next epoch (fetched ahead)
    R → I  Ack
    either Abort    why an exchange cannot go on
    R → I  RekeyRequest   ask the initiator for a new epoch (restart, soft limit, operator)

Every message names its link and epoch, and carries `out`, the epoch the sender currently
sends on (0: none): that is how each side learns when the other has moved past an epoch.
Commit and Ack also carry the sender's audit head (`audit`: site, sequence number and hash of
the last record of its audit trail), which the receiver records in its own trail: rewriting
one site's history is then visible from the other site (docs/operations.md).

Versions: 2 lets `key_ids` (Offer) and `next_key_ids` (Commit) carry SKIP key IDs (hex)
besides ETSI GS QKD 014's UUIDs; nothing else differs. A message is sent as version 1
unless it carries a SKIP key ID, so gateways that speak only version 1 keep working with
ETSI 014 links, and refuse a version 2 message as of an unsupported version, by name.

Messages are JSON with base64 byte strings. Anything malformed, oversized, nested too deep,
with a member given twice, a number out of range or unknown members is a `MessageError`
naming the problem (peer-controlled text in it escaped); the receiver never acts on it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from common.text import quote_remote
from kms.models import EntityId, SourceKeyId, is_etsi_key_id

#: The versions this gateway reads; it writes the lowest that can carry the message.
PROTOCOL_VERSIONS = (1, 2)
#: Largest message accepted: an ML-KEM-1024 key in base64 is ~2.1 KB; 16 KiB leaves room and
#: bounds what a hostile peer can make us parse.
MAX_MESSAGE_BYTES = 16 * 1024
NONCE_SIZE = 32
CONFIRM_SIZE = 48
MAX_KEY_IDS = 4
#: Epoch numbers stay at or below this. At one rekey a second it lasts 8.9 million years, and
#: every epoch the core derives from one (the next, a peer's `current`) stays an exact JSON
#: number and far inside the 64-bit integers the data planes and state files hold.
MAX_EPOCH = 2**48
#: Audit sequence numbers (a site's whole trail) stay at or below this (exact in JSON).
MAX_AUDIT_SEQ = 2**53 - 1
#: Nesting deeper than this is refused before it is parsed further: messages are flat.
MAX_DEPTH = 8


class MessageError(ValueError):
    """A peer message that cannot be decoded; the text says why (never the message bytes)."""


def _b64(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not standard base64") from None


_B64 = (BeforeValidator(_b64),
        PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str))
Nonce = Annotated[bytes, *_B64, Field(min_length=NONCE_SIZE, max_length=NONCE_SIZE)]
Confirm = Annotated[bytes, *_B64, Field(min_length=CONFIRM_SIZE, max_length=CONFIRM_SIZE)]
PublicValue = Annotated[bytes, *_B64, Field(min_length=1, max_length=4096)]
Epoch = Annotated[int, Field(ge=0, le=MAX_EPOCH)]
Spi = Annotated[int, Field(ge=0x100, lt=2**32)]
Name = Annotated[EntityId, Field(max_length=64)]


@dataclass(frozen=True)
class Suite:
    """What an epoch's key is made of; its `name` travels in the Offer. Without QKD (`pqc+`)
    only in pqc-fallback mode, while the KMS cannot deliver."""

    qkd: bool
    kem: str

    @property
    def name(self) -> str:
        return f"{'qkd' if self.qkd else 'pqc'}+{self.kem}+X25519/CatKDF-SHA-384"

    @classmethod
    def parse(cls, name: str) -> Suite | None:
        """The suite NAME names, or None if it is not one this gateway can make."""
        head, _, rest = name.partition("+")
        kem = rest.partition("+")[0]
        suite = cls(head == "qkd", kem)
        return suite if head in ("qkd", "pqc") and suite.name == name else None


class AbortReason(StrEnum):
    STALE_EPOCH = "stale-epoch"  # the offer's epoch is not above what the responder has
    QKD_REQUIRED = "qkd-required"  # a PQC-only offer to a responder that requires QKD
    KMS_UNAVAILABLE = "kms-unavailable"  # the responder could not get the QKD keys by ID
    KEY_ID_REUSED = "key-id-reused"  # a QKD key ID the responder has already used
    IDENTITY_MISMATCH = "identity-mismatch"  # SAE or KME identities differ from ours
    SUITE_UNSUPPORTED = "suite-unsupported"
    SINK_FAILED = "sink-failed"  # the responder could not install the inbound key
    CONFIRM_FAILED = "confirm-failed"  # the key confirmation did not verify
    ROLE_CONFLICT = "role-conflict"  # both ends are configured as initiator


class RekeyReason(StrEnum):
    RESTART = "restart"
    SOFT_LIMIT = "soft-limit"
    OPERATOR = "operator"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True,
                              hide_input_in_errors=True)


class AuditHead(_Strict):
    """The last record of the sender's audit trail when it sent the message."""

    site: Name
    seq: int = Field(ge=0, le=MAX_AUDIT_SEQ)
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")


def version_for(key_ids: Iterable[str]) -> Literal[1, 2]:
    """The lowest version that can carry KEY_IDS (what a sender puts in `v`)."""
    return 1 if all(is_etsi_key_id(i) for i in key_ids) else 2


class _Message(_Strict):
    v: Literal[1, 2] = 1

    @model_validator(mode="after")
    def _ids_fit_the_version(self) -> Self:
        ids = [*getattr(self, "key_ids", ()), *getattr(self, "next_key_ids", ())]
        if self.v == 1 and version_for(ids) == 2:
            raise ValueError("a version 1 message carries only ETSI GS QKD 014 key IDs"
                             " (UUIDs); SKIP key IDs need version 2")
        return self
    link: Name
    epoch: Epoch
    out: Epoch = 0


class Offer(_Message):
    type: Literal["offer"] = "offer"
    suite: str = Field(max_length=80)
    key_ids: tuple[SourceKeyId, ...] = Field(max_length=MAX_KEY_IDS)
    kme_i: str = Field(max_length=64)
    kme_r: str = Field(max_length=64)
    ek: PublicValue
    pk: PublicValue
    nonce: Nonce
    spi: Spi


class Accept(_Message):
    type: Literal["accept"] = "accept"
    nonce_i: Nonce
    ct: PublicValue
    pk: PublicValue
    nonce: Nonce
    spi: Spi
    confirm: Confirm


class Commit(_Message):
    type: Literal["commit"] = "commit"
    nonce_i: Nonce
    nonce_r: Nonce
    confirm: Confirm
    #: QKD key IDs the initiator already holds for the next epoch: the responder fetches
    #: them now, so the next exchange does not wait for either KME.
    next_key_ids: tuple[SourceKeyId, ...] = Field(default=(), max_length=MAX_KEY_IDS)
    audit: AuditHead | None = None


class Ack(_Message):
    type: Literal["ack"] = "ack"
    nonce_i: Nonce
    nonce_r: Nonce
    audit: AuditHead | None = None


class Abort(_Message):
    type: Literal["abort"] = "abort"
    nonce_i: Nonce
    reason: AbortReason
    current: Epoch = Field(description="the highest epoch the sender has used or seen")


class RekeyRequest(_Message):
    type: Literal["rekey-request"] = "rekey-request"
    reason: RekeyReason


Message = Offer | Accept | Commit | Ack | Abort | RekeyRequest
_ADAPTER: TypeAdapter[Message] = TypeAdapter(
    Annotated[Message, Field(discriminator="type")])


def encode(message: Message) -> bytes:
    return message.model_dump_json(exclude_none=True).encode()


def _refuse_constant(name: str) -> Any:
    raise MessageError(f"{name} is not a number this protocol accepts")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    for name in names:
        if names.count(name) > 1:
            raise MessageError(f"member {quote_remote(name)!r} given more than once")
    return dict(pairs)


def _depth(value: Any, limit: int = MAX_DEPTH) -> None:
    if limit < 0:
        raise MessageError(f"message nested more than {MAX_DEPTH} levels deep")
    children = value.values() if isinstance(value, dict) else \
        value if isinstance(value, list) else ()
    for child in children:
        _depth(child, limit - 1)


def _prescan(raw: bytes) -> None:
    """What the schema cannot see: a member given twice (the schema would keep the last),
    NaN or infinities, nesting; RecursionError and huge numbers become a MessageError."""
    try:
        tree = json.loads(raw, object_pairs_hook=_no_duplicates,
                          parse_constant=_refuse_constant)
    except MessageError:
        raise
    except RecursionError:
        raise MessageError(f"message nested more than {MAX_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError):
        raise MessageError("message is not JSON") from None
    _depth(tree)


def decode(raw: bytes) -> Message:
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    _prescan(raw)
    try:
        return _ADAPTER.validate_json(raw, strict=True)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False, include_context=False)[0]
        if first["type"] == "json_invalid":
            raise MessageError("message is not JSON") from None
        if first["type"] in ("model_attributes_type", "dict_type", "model_type"):
            raise MessageError("message is not a JSON object") from None
        where = quote_remote(".".join(str(p) for p in first["loc"][1:])) or "message"
        if where == "v":
            raise MessageError("unsupported protocol version (this gateway speaks"
                               f" {' and '.join(map(str, PROTOCOL_VERSIONS))})") from None
        if first["type"].startswith("union_tag"):
            raise MessageError("message has no known type") from None
        raise MessageError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None

"""ETSI GS QKD 014 v1.1.1 data formats (§6) as strict pydantic models.

One model per object of the spec. Strict on what the spec fixes: JSON types are not coerced,
keys are canonical standard base64 (RFC 4648 §4), key IDs are UUID strings, sizes are in bits.
Unknown members are kept (`model_extra`) so the simulator can reject them by name and the
client can warn without breaking on a vendor's additions. Validation errors never echo the
input: a rejected key container must not leak its key into a log line.

A delivered container is checked against what was asked by passing a validation context:
``KeyContainer.model_validate_json(body, context=Expect(size_bits=256, count=2))``.

Every number is bounded where it is parsed, so nothing downstream meets a value it cannot
hold: counts below 2**32, sizes at most 2**20 bits, and anywhere in an object (extensions and
unknown members included) no NaN, no infinity (pydantic's JSON parser, like Python's, accepts
`NaN` and `Infinity`, and reads 1e400 as infinity) and no integer beyond ±(2**53 − 1), the
range RFC 7493 (I-JSON) calls interoperable.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from common.text import quote_remote

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

#: Largest count (keys stored, keys per request, SAEs): far above any QKD link, and every
#: consumer (metrics, rates, arithmetic on counts) holds it exactly.
MAX_COUNT = 2**32 - 1
#: Largest key size, in bits (128 KiB): ETSI's examples stop at 1024; a key container of
#: the client's 1 MiB answer limit holds only a handful of keys this large.
MAX_KEY_BITS = 2**20
#: Largest integer anywhere in an object: RFC 7493 (I-JSON) §2.2, exact in a double.
MAX_JSON_INT = 2**53 - 1
#: Deepest nesting of an extension: vendors' extensions are shallow; this bounds the work
#: any value can cost.
MAX_DEPTH = 32
#: Largest secret key rate a status may report, bit/s: three orders of magnitude above
#: today's fastest QKD links, finite for every rate computation.
MAX_KEY_RATE = 1e12

Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
PositiveCount = Annotated[int, Field(gt=0, le=MAX_COUNT)]
KeyBits = Annotated[int, Field(gt=0, le=MAX_KEY_BITS)]


def _check_json(value: Any, where: str = "", depth: int = 0) -> None:
    """Raise ValueError, naming WHERE in the object, unless VALUE is JSON the gateway can
    hold (see the module doc)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{where or 'value'}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if abs(value) > MAX_JSON_INT:
            raise ValueError(f"{where or 'value'}: integer beyond ±(2**53 − 1), the range of"
                             " RFC 7493 (I-JSON)")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where or 'value'}: number is not finite (NaN or infinity)")
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_json(item, f"{where}.{quote_remote(name, limit=40)}".lstrip("."), depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
    else:
        raise ValueError(f"{where or 'value'}: {type(value).__name__} is not a JSON value")


def _bounded_json(value: dict[str, Any]) -> dict[str, Any]:
    _check_json(value)
    return value


#: An ETSI 014 extension object: any JSON object whose numbers the gateway can hold.
Extension = Annotated[dict[str, Any], AfterValidator(_bounded_json)]


def _check_key_id(value: str) -> str:
    if not _UUID.fullmatch(value):
        raise ValueError("key_ID must be a UUID string (8-4-4-4-12 hexadecimal digits)")
    return value


#: A SKIP key ID (draft-cisco-skip-02 §4.2: hexadecimal, either case as its Figure 6 shows),
#: as common/skip.py bounds it. Passed on byte for byte.
_SKIP_KEY_ID = re.compile(r"(?:[0-9a-fA-F]{2}){8,128}")


def is_etsi_key_id(value: str) -> bool:
    return _UUID.fullmatch(value) is not None


def _check_source_key_id(value: str) -> str:
    if not (_UUID.fullmatch(value) or _SKIP_KEY_ID.fullmatch(value)):
        raise ValueError("a key ID is an ETSI GS QKD 014 UUID (8-4-4-4-12 hexadecimal digits)"
                         " or a SKIP key ID (16 to 256 hexadecimal digits, an even number)")
    return value


def _check_base64(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("key must be standard base64 (RFC 4648 §4, with padding)") from None
    if not raw:
        raise ValueError("key must not be empty")
    if base64.b64encode(raw).decode("ascii") != value:
        raise ValueError("key must be canonical base64 (no stray bits in the final quantum)")
    return value


def _check_sae_id(value: str) -> str:
    if not value or not value.isprintable() or "/" in value:
        raise ValueError("SAE and KME IDs must be non-empty printable text without '/'")
    return value


KeyId = Annotated[str, AfterValidator(_check_key_id)]
#: A key ID of either key source the gateway speaks: ETSI GS QKD 014 or SKIP.
SourceKeyId = Annotated[str, AfterValidator(_check_source_key_id)]
Base64Key = Annotated[str, AfterValidator(_check_base64)]
EntityId = Annotated[str, AfterValidator(_check_sae_id)]


class Etsi014Model(BaseModel):
    """Common configuration: strict types, unknown members kept, inputs never echoed."""

    model_config = ConfigDict(
        strict=True, extra="allow", frozen=True, hide_input_in_errors=True,
        allow_inf_nan=False,
    )

    @model_validator(mode="after")
    def _unknown_members_bounded(self) -> Etsi014Model:
        for name, value in (self.model_extra or {}).items():
            _check_json(value, quote_remote(name, limit=40))
        return self

    def unknown_fields(self) -> list[str]:
        """Members that ETSI GS QKD 014 does not define for this object."""
        return sorted(self.model_extra or {})


@dataclass(frozen=True)
class Expect:
    """What a key container must contain, given the request that produced it."""

    size_bits: int | None = None
    count: int | None = None
    key_ids: tuple[str, ...] | None = None


def _reading(ext: dict[str, Any], name: str, high: float) -> None:
    value = ext[name]
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not 0 <= value <= high:
        raise ValueError(f"{name} must be a number from 0 to {high:g}")


class Status(Etsi014Model):
    """§6.1 Status: a KME's key supply for one master/slave SAE pair.

    `qber`, `key_rate` and `link_up` read the link from `status_extension` members of those
    names (the simulator's; other KMEs may send them too). A member that is present but not
    readable makes the whole status invalid: a QBER nobody can read must never pass the
    gateway's QBER gate as "unknown".
    """

    source_KME_ID: EntityId
    target_KME_ID: EntityId
    master_SAE_ID: EntityId
    slave_SAE_ID: EntityId
    key_size: KeyBits
    stored_key_count: Count
    max_key_count: Count
    max_key_per_request: PositiveCount
    max_key_size: KeyBits
    min_key_size: KeyBits
    max_SAE_ID_count: Count
    status_extension: Extension | None = None

    @field_validator("status_extension")
    @classmethod
    def _readings(cls, ext: dict[str, Any] | None) -> dict[str, Any] | None:
        if ext is not None:
            if "qber" in ext:
                _reading(ext, "qber", 1.0)
            if "key_rate" in ext:
                _reading(ext, "key_rate", MAX_KEY_RATE)
            if "link_up" in ext and not isinstance(ext["link_up"], bool):
                raise ValueError("link_up must be true or false")
        return ext

    @model_validator(mode="after")
    def _sizes_consistent(self) -> Status:
        if not self.min_key_size <= self.key_size <= self.max_key_size:
            raise ValueError("key_size must lie between min_key_size and max_key_size")
        return self

    @property
    def qber(self) -> float | None:
        """Quantum bit error rate of the link, a fraction from 0 to 1; None: not reported."""
        value = (self.status_extension or {}).get("qber")
        return None if value is None else float(value)

    @property
    def key_rate(self) -> float | None:
        """Secret key rate now, bit/s, finite; None: not reported."""
        value = (self.status_extension or {}).get("key_rate")
        return None if value is None else float(value)

    @property
    def link_up(self) -> bool | None:
        """Whether the quantum channel works now; None: not reported."""
        value = (self.status_extension or {}).get("link_up")
        return None if value is None else bool(value)


class KeyRequest(Etsi014Model):
    """§6.2 Key request: the body of a POST enc_keys."""

    number: PositiveCount | None = None
    size: KeyBits | None = None
    additional_slave_SAE_IDs: list[EntityId] | None = None
    extension_mandatory: list[Extension] | None = None
    extension_optional: list[Extension] | None = None

    @model_validator(mode="after")
    def _size_in_bytes(self) -> KeyRequest:
        if self.size is not None and self.size % 8:
            raise ValueError("size is in bits and must be a multiple of 8")
        return self


class Key(Etsi014Model):
    """One key of a §6.3 Key container."""

    key_ID: KeyId
    key_ID_extension: Extension | None = None
    key: Base64Key = Field(repr=False)
    key_extension: Extension | None = None

    @property
    def material(self) -> bytes:
        return base64.b64decode(self.key)


class KeyContainer(Etsi014Model):
    """§6.3 Key container: the answer to enc_keys and dec_keys."""

    keys: list[Key] = Field(min_length=1)
    key_container_extension: Extension | None = None

    @model_validator(mode="after")
    def _matches_request(self, info: ValidationInfo) -> KeyContainer:
        ids = [k.key_ID for k in self.keys]
        if len(set(ids)) != len(ids):
            raise ValueError("key container repeats a key_ID")
        expect = info.context if isinstance(info.context, Expect) else Expect()
        if expect.count is not None and len(self.keys) != expect.count:
            raise ValueError(f"{len(self.keys)} keys delivered, {expect.count} requested")
        if expect.key_ids is not None and set(ids) != set(expect.key_ids):
            raise ValueError("delivered key_IDs differ from the requested ones")
        if expect.size_bits is not None:
            for k in self.keys:
                got = len(k.material) * 8
                if got != expect.size_bits:
                    raise ValueError(
                        f"key {k.key_ID} has {got} bits, {expect.size_bits} requested"
                    )
        return self


class KeyIdEntry(Etsi014Model):
    """One entry of a §6.4 Key IDs object."""

    key_ID: KeyId
    key_ID_extension: Extension | None = None


class KeyIds(Etsi014Model):
    """§6.4 Key IDs: the body of a POST dec_keys."""

    key_IDs: list[KeyIdEntry] = Field(min_length=1)
    key_IDs_extension: Extension | None = None

    @model_validator(mode="after")
    def _unique(self) -> KeyIds:
        ids = [k.key_ID for k in self.key_IDs]
        if len(set(ids)) != len(ids):
            raise ValueError("key_IDs repeats a key_ID")
        return self


class Error(Etsi014Model):
    """§6.5 Error: the body of every 400, 401 and 503 answer."""

    message: str
    details: list[Extension] | None = None


@dataclass(frozen=True)
class QkdKey:
    """A QKD key as handed to the rest of the gateway: its ID and its bytes (never printed)."""

    key_id: str
    material: bytes = field(repr=False)
    key_id_extension: Extension | None = field(default=None, repr=False)
    key_extension: Extension | None = field(default=None, repr=False)

    @property
    def size_bits(self) -> int:
        return len(self.material) * 8

    @classmethod
    def from_wire(cls, key: Key) -> QkdKey:
        return cls(key.key_ID, key.material, key.key_ID_extension, key.key_extension)


@dataclass(frozen=True)
class SourceStatus:
    kme_id: str  # this side's KME (SKIP: its Key Provider's localSystemID)
    peer_kme_id: str  # the peer's
    master: str  # the SAE IDs of the pair (SKIP: the two Key Providers' system IDs)
    slave: str
    key_size: int  # bits of a key when none is asked for
    stored_key_count: int | None  # keys available to the pair (None: the source says not)
    max_key_per_request: int
    qber: float | None = None
    key_rate: float | None = None
    link_up: bool | None = None

    @classmethod
    def of(cls, st: Status) -> SourceStatus:
        return cls(st.source_KME_ID, st.target_KME_ID, st.master_SAE_ID, st.slave_SAE_ID,
                   st.key_size, st.stored_key_count, st.max_key_per_request, st.qber,
                   st.key_rate, st.link_up)

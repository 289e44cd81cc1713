"""ETSI GS QKD 014 v1.1.1 data formats (§6) as strict pydantic models.

One model per object of the spec. Strict on what the spec fixes: JSON types are not coerced,
keys are canonical standard base64 (RFC 4648 §4), key IDs are UUID strings, sizes are in bits.
Unknown members are kept (`model_extra`) so the simulator can reject them by name and the
client can warn without breaking on a vendor's additions. Validation errors never echo the
input: a rejected key container must not leak its key into a log line.

A delivered container is checked against what was asked by passing a validation context:
``KeyContainer.model_validate_json(body, context=Expect(size_bits=256, count=2))``.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationInfo,
    model_validator,
)

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

Extension = dict[str, Any]


def _check_key_id(value: str) -> str:
    if not _UUID.fullmatch(value):
        raise ValueError("key_ID must be a UUID string (8-4-4-4-12 hexadecimal digits)")
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
Base64Key = Annotated[str, AfterValidator(_check_base64)]
EntityId = Annotated[str, AfterValidator(_check_sae_id)]


class Etsi014Model(BaseModel):
    """Common configuration: strict types, unknown members kept, inputs never echoed."""

    model_config = ConfigDict(
        strict=True, extra="allow", frozen=True, hide_input_in_errors=True
    )

    def unknown_fields(self) -> list[str]:
        """Members that ETSI GS QKD 014 does not define for this object."""
        return sorted(self.model_extra or {})


@dataclass(frozen=True)
class Expect:
    """What a key container must contain, given the request that produced it."""

    size_bits: int | None = None
    count: int | None = None
    key_ids: tuple[str, ...] | None = None


class Status(Etsi014Model):
    """§6.1 Status: a KME's key supply for one master/slave SAE pair."""

    source_KME_ID: EntityId
    target_KME_ID: EntityId
    master_SAE_ID: EntityId
    slave_SAE_ID: EntityId
    key_size: PositiveInt
    stored_key_count: NonNegativeInt
    max_key_count: NonNegativeInt
    max_key_per_request: PositiveInt
    max_key_size: PositiveInt
    min_key_size: PositiveInt
    max_SAE_ID_count: NonNegativeInt
    status_extension: Extension | None = None

    @model_validator(mode="after")
    def _sizes_consistent(self) -> Status:
        if not self.min_key_size <= self.key_size <= self.max_key_size:
            raise ValueError("key_size must lie between min_key_size and max_key_size")
        return self


class KeyRequest(Etsi014Model):
    """§6.2 Key request: the body of a POST enc_keys."""

    number: PositiveInt | None = None
    size: PositiveInt | None = None
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

"""Faults the admin interface injects into KMEs, and the malformed answers they produce.

Pure data and functions; the server applies them.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator


class FaultKind(StrEnum):
    UNAVAILABLE = "unavailable"  # the KME stops listening and drops its connections
    SLOW = "slow"  # answers after `delay` seconds
    ERROR_503 = "error-503"  # answers 503 with an Error body
    MALFORMED = "malformed"  # answers 200 with a body broken as `variant` says


class Variant(StrEnum):
    NOT_JSON = "not-json"
    HTML = "html"
    MISSING_FIELD = "missing-field"
    WRONG_TYPE = "wrong-type"
    BAD_BASE64 = "bad-base64"
    SHORT_KEY = "short-key"
    LONG_KEY = "long-key"
    EXTRA_KEY = "extra-key"
    MISSING_KEY = "missing-key"
    DUPLICATE_ID = "duplicate-id"
    BAD_UUID = "bad-uuid"
    WRONG_IDS = "wrong-ids"
    ERROR_NOT_JSON = "error-not-json"
    OVERSIZED = "oversized"


#: Size of the `oversized` answer: past the client's 1 MiB limit.
OVERSIZED_BYTES = 2 << 20


class FaultSpec(BaseModel):
    """A fault as the admin API takes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FaultKind
    kme: str | None = Field(default=None, description="KME id; default: every KME")
    link: str | None = Field(default=None, description="link name: both its KMEs")
    ops: tuple[str, ...] | None = Field(default=None, description="status, enc_keys, dec_keys")
    seconds: PositiveFloat | None = None
    count: PositiveInt | None = None
    delay: PositiveFloat = 5.0
    variant: Variant = Variant.NOT_JSON

    @model_validator(mode="after")
    def _consistent(self) -> FaultSpec:
        if self.kind is FaultKind.UNAVAILABLE and (self.count or self.ops):
            raise ValueError("an unavailable KME refuses every connection: use seconds,"
                             " not count or ops")
        for op in self.ops or ():
            if op not in ("status", "enc_keys", "dec_keys"):
                raise ValueError(f"unknown op {op!r}: status, enc_keys or dec_keys")
        return self


@dataclass
class Fault:
    id: int
    spec: FaultSpec
    kmes: frozenset[str]
    until: float | None
    remaining: int | None = field(default=None)

    def applies(self, kme: str, op: str, now: float) -> bool:
        if kme not in self.kmes or (self.until is not None and now >= self.until):
            return False
        return self.spec.ops is None or op in self.spec.ops


class FaultTable:
    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._next = 1

    def add(self, spec: FaultSpec, kmes: Iterable[str], now: float) -> Fault:
        until = now + spec.seconds if spec.seconds else None
        fault = Fault(self._next, spec, frozenset(kmes), until, spec.count)
        self._next += 1
        self._faults.append(fault)
        return fault

    def take(self, kme: str, op: str, now: float) -> Fault | None:
        """The first active request fault for this request; counts it down."""
        for f in self._faults:
            if f.spec.kind is not FaultKind.UNAVAILABLE and f.applies(kme, op, now):
                if f.remaining is not None:
                    f.remaining -= 1
                    if f.remaining == 0:
                        self._faults.remove(f)
                return f
        return None

    def unavailable(self, now: float) -> set[str]:
        return {k for f in self._faults if f.spec.kind is FaultKind.UNAVAILABLE
                and (f.until is None or now < f.until) for k in f.kmes}

    def expire(self, now: float) -> None:
        self._faults = [f for f in self._faults if f.until is None or now < f.until]

    def clear(self) -> None:
        self._faults.clear()

    def describe(self, now: float) -> list[dict[str, Any]]:
        return [{"id": f.id, **f.spec.model_dump(mode="json", exclude_none=True),
                 "kmes": sorted(f.kmes), "remaining": f.remaining,
                 "seconds_left": None if f.until is None else round(f.until - now, 3)}
                for f in self._faults]


def corrupt(body: dict[str, Any], variant: Variant) -> tuple[int, str, bytes]:
    """Break a 200 answer's BODY as VARIANT says: (status, content type, bytes)."""
    if variant is Variant.NOT_JSON:
        return 200, "application/json", json.dumps(body).encode()[:-7]
    if variant is Variant.HTML:
        return 200, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"
    if variant is Variant.ERROR_NOT_JSON:
        return 400, "text/plain", b"Bad Request"
    if variant is Variant.OVERSIZED:
        return 200, "application/json", json.dumps(body).encode() + b" " * OVERSIZED_BYTES
    broken = json.loads(json.dumps(body))
    keys: list[dict[str, Any]] | None = broken.get("keys")
    if variant is Variant.MISSING_FIELD:
        broken.pop("keys" if keys is not None else "key_size", None)
    elif variant is Variant.WRONG_TYPE:
        if keys:
            keys[0]["key_ID"] = 12345
        else:
            broken["stored_key_count"] = str(broken.get("stored_key_count"))
    elif keys:
        _break_keys(keys, variant)
    return 200, "application/json", json.dumps(broken).encode()


def _break_keys(keys: list[dict[str, Any]], variant: Variant) -> None:
    first = keys[0]
    material = base64.b64decode(first["key"])
    if variant is Variant.BAD_BASE64:
        first["key"] = first["key"][:-4] + "@@@="
    elif variant is Variant.SHORT_KEY:
        first["key"] = base64.b64encode(material[:-1]).decode()
    elif variant is Variant.LONG_KEY:
        first["key"] = base64.b64encode(material + b"\0").decode()
    elif variant is Variant.EXTRA_KEY:
        keys.append({"key_ID": str(uuid.uuid4()), "key": first["key"]})
    elif variant is Variant.MISSING_KEY:
        keys.pop()
    elif variant is Variant.DUPLICATE_ID:
        if len(keys) > 1:
            keys[1]["key_ID"] = first["key_ID"]
        else:
            keys.append(dict(first))
    elif variant is Variant.BAD_UUID:
        first["key_ID"] = "not-a-uuid"
    elif variant is Variant.WRONG_IDS:
        for k in keys:
            k["key_ID"] = str(uuid.uuid4())

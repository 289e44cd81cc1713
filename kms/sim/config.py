"""Configuration of the KME pair simulator (`qkdgw kms-sim -c kms.yaml`).

Reference with every field: docs/kms-simulator.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from common.config import (
    MAX_SECONDS,
    Address,
    ConfigModel,
    FilePath,
    Seconds,
    load_yaml_model,
)
from kms.models import MAX_COUNT, MAX_KEY_BITS, MAX_KEY_RATE, EntityId
from kms.sim.profiles import QberDrift, RandomOutages, profile

#: Above ~11 % QBER BB84 distils no secret key (Shor–Preskill bound: 1 − 2·h(Q) = 0): the
#: default `qber_limit`.
QBER_LIMIT = 0.11
#: A link's clock may run at most this much faster than the wall clock (`time_scale`).
MAX_TIME_SCALE = 1e6
#: Fields a profile sets: a link names a profile or sets them, not both.
PROFILE_FIELDS = ("key_rate", "qber", "qber_limit", "qber_drift", "random_outages")

KeyBits = Annotated[int, Field(gt=0, le=MAX_KEY_BITS)]
Count = Annotated[int, Field(gt=0, le=MAX_COUNT)]


class SkipListenConfig(ConfigModel):
    """The KME as a SKIP Key Provider (draft-cisco-skip-02) for its links of `protocol:
    skip`: its localSystemID is the KME's id, the other KMEs' ids its remote systems."""

    listen: Address
    psk_file: FilePath = Field(description="IDENTITY:HEXKEY per SAE (the identity its SAE"
                               " ID), 0600")


class KmeConfig(ConfigModel):
    """One KME: where it listens, how it proves itself, which SAEs it serves."""

    id: EntityId
    listen: Address
    cert: FilePath
    key: FilePath
    saes: tuple[EntityId, ...] = Field(
        min_length=1, description="SAE IDs (client certificate commonNames) this KME serves")
    skip: SkipListenConfig | None = None


class Outage(ConfigModel):
    """A scheduled outage of the quantum channel, in seconds after the simulator starts."""

    start: float = Field(ge=0, le=MAX_SECONDS)
    duration: Seconds
    every: Seconds | None = None

    @model_validator(mode="after")
    def _period_fits(self) -> Outage:
        if self.every is not None and self.every <= self.duration:
            raise ValueError("every must be longer than duration")
        return self


#: Traps of other KMEs the simulator can play (docs/etsi-014.md, "Traps of other KMEs"):
#: - latest-batch-only: only the keys of the latest enc_keys call can be fetched by ID;
#: - stored-counts-handed-out: `stored_key_count` counts keys handed out, not available;
#: - get-ignores-number-size: the GET form of enc_keys hands out one key of `key_size`.
Quirk = Literal["latest-batch-only", "stored-counts-handed-out", "get-ignores-number-size"]


class LinkConfig(ConfigModel):
    """A QKD link between two KMEs and the key supply it models."""

    name: EntityId
    profile: str | None = Field(default=None, description="a field result's figures"
                                " (kms/sim/profiles.py) for key_rate, qber, qber_limit,"
                                " qber_drift and random_outages")
    kmes: tuple[EntityId, EntityId]
    key_size: KeyBits = 256
    min_key_size: KeyBits = 64
    max_key_size: KeyBits = 8192
    max_key_count: Count = 10_000
    max_key_per_request: Count = 128
    initial_key_count: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    key_rate: float = Field(default=10_000.0, ge=0, le=MAX_KEY_RATE,
                            description="secret key rate, bit/s")
    qber_limit: float | None = Field(
        default=None, gt=0, lt=0.5, description="the QBER at which the modelled"
        " post-processing distils no key; null: BB84 one-way, 0.11")
    qber: float = Field(default=0.02, ge=0, lt=0.5)
    qber_drift: QberDrift | None = None
    ageing_half_life: Seconds | None = None
    reserved_key_ttl: Seconds = 300.0
    protocol: Literal["etsi014", "skip"] = Field(
        default="etsi014", description="how the link's keys are handed out: ETSI GS QKD 014,"
        " or SKIP by both KMEs' Key Providers (their `skip` sections)")
    quirks: tuple[Quirk, ...] = Field(
        default=(), description="behave like KMEs known to break clients (docs/etsi-014.md),"
        " to test a client against them: latest-batch-only, stored-counts-handed-out,"
        " get-ignores-number-size")
    outages: tuple[Outage, ...] = ()
    random_outages: RandomOutages | None = None
    seed: int = Field(default=0, ge=0, lt=2**63,
                      description="seeds the drift and random outages (with the link's name)")
    time_scale: float = Field(
        default=1.0, gt=0, le=MAX_TIME_SCALE, description="the link's clock runs this much"
        " faster than the wall clock: its supply, drift, ageing and outages")

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: object) -> object:
        if not isinstance(data, dict) or data.get("profile") is None:
            return data
        name = data["profile"]
        if not isinstance(name, str):
            raise ValueError("profile must be a name")
        preset = profile(name)
        clash = [f for f in PROFILE_FIELDS if f in data]
        if clash:
            raise ValueError(f"profile {name} sets {', '.join(clash)}: leave"
                             f" {'it' if len(clash) == 1 else 'them'} out, or the profile")
        return {**data, **preset.fields()}

    @field_validator("qber")
    @classmethod
    def _below_limit(cls, qber: float, info: ValidationInfo) -> float:
        limit = info.data.get("qber_limit") or QBER_LIMIT
        if qber >= limit:
            raise ValueError(f"Input should be less than {limit:g} (qber_limit)"
                             if info.data.get("qber_limit") else
                             f"Input should be less than {QBER_LIMIT}")
        return qber

    @model_validator(mode="after")
    def _consistent(self) -> LinkConfig:
        for name in ("key_size", "min_key_size", "max_key_size"):
            if getattr(self, name) % 8:
                raise ValueError(f"{name} is in bits and must be a multiple of 8")
        if not self.min_key_size <= self.key_size <= self.max_key_size:
            raise ValueError("key_size must lie between min_key_size and max_key_size")
        if self.kmes[0] == self.kmes[1]:
            raise ValueError("a link joins two different KMEs")
        if self.initial_key_count is not None and self.initial_key_count > self.max_key_count:
            raise ValueError("initial_key_count exceeds max_key_count")
        return self

    @property
    def initial_keys(self) -> int:
        return self.max_key_count if self.initial_key_count is None else self.initial_key_count

    def with_profile(self, name: str) -> LinkConfig:
        """This link with profile NAME's figures instead of its own (`--link-profile`)."""
        return self.model_copy(update={"profile": name, **profile(name).fields()})


class AdminConfig(ConfigModel):
    listen: Address

    @model_validator(mode="after")
    def _loopback_only(self) -> AdminConfig:
        if not self.listen.is_loopback:
            raise ValueError("the admin interface injects faults: it listens on loopback only")
        return self


class SimConfig(ConfigModel):
    ca: FilePath = Field(description="CA that issued the SAE client certificates")
    admin: AdminConfig | None = None
    request_timeout: float = Field(
        default=20.0, gt=0, le=3600,
        description="seconds a client has for its TLS handshake and for each whole request"
                    " (head and body); idle connections close after it too")
    kmes: list[KmeConfig] = Field(min_length=2)
    links: list[LinkConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> SimConfig:
        ids = [k.id for k in self.kmes]
        listens = [str(k.listen) for k in self.kmes]
        listens += [str(k.skip.listen) for k in self.kmes if k.skip is not None]
        if self.admin is not None:
            listens.append(str(self.admin.listen))
        for what, values in (
            ("link name", [link.name for link in self.links]),
            ("KME id", ids),
            ("SAE", [s for k in self.kmes for s in k.saes]),
            ("listen address", listens),
            ("KME pair of a link", ["+".join(sorted(link.kmes)) for link in self.links]),
        ):
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"{what} used more than once: {', '.join(dup)}")
        by_id = {k.id: k for k in self.kmes}
        for link in self.links:
            for kme in link.kmes:
                if kme not in ids:
                    raise ValueError(f"link {link.name}: no KME with id {kme!r}")
                if link.protocol == "skip" and by_id[kme].skip is None:
                    raise ValueError(f"link {link.name} speaks SKIP: KME {kme} needs a"
                                     " `skip` section (listen, psk_file)")
        return self

    @classmethod
    def load(cls, path: Path) -> SimConfig:
        return load_yaml_model(path, cls)

    def with_profile(self, name: str) -> SimConfig:
        """Every link with profile NAME's figures (`qkdgw kms-sim --link-profile NAME`)."""
        return self.model_copy(update={"links": [link.with_profile(name)
                                                 for link in self.links]})

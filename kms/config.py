"""How a gateway reaches its key source: the `kms:` section of a site configuration, ETSI
GS QKD 014 (`protocol: etsi014`, the default) or a SKIP Key Provider (`protocol: skip`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from common.config import UNTAGGED, ConfigError, ConfigModel, FilePath, check_secret_file
from common.psktls import MAX_PSK_BYTES, MIN_PSK_BYTES, ClientContext
from kms.client import KmeClient, RetryPolicy, Timeouts
from kms.models import EntityId
from kms.skip import SkipKeySource

#: Seconds, finite and positive; an hour is far past any useful wait on a KME.
Wait = Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)]


class _Timing(ConfigModel):
    connect_timeout: Wait = 3.0
    read_timeout: Wait = Field(default=10.0, description="longest wait for any chunk")
    total_timeout: Wait = Field(
        default=15.0, description="bounds one attempt whole: connect, send, read the answer")
    attempts: int = Field(default=3, ge=1, le=10, description="tries per call, see retries")

    @model_validator(mode="after")
    def _timeouts_consistent(self) -> Any:
        self.timeouts()
        return self

    def timeouts(self) -> Timeouts:
        return Timeouts(self.connect_timeout, self.read_timeout, self.total_timeout)


class KmsClientConfig(_Timing):
    protocol: Literal["etsi014"] = "etsi014"
    url: str = Field(description="KME base URL, https://HOST:PORT")
    sae_id: EntityId = Field(description="this gateway's SAE ID (its client certificate CN)")
    ca: FilePath = Field(description="CA that issued the KME's server certificate")
    cert: FilePath = Field(description="this SAE's client certificate")
    key: FilePath = Field(description="its private key (mode 0600)")

    @field_validator("url")
    @classmethod
    def _https(cls, value: str) -> str:
        if not value.startswith("https://") or len(value) <= len("https://"):
            raise ValueError("ETSI GS QKD 014 runs over HTTPS: the URL must start https://")
        return value

    def client(self) -> KmeClient:
        return KmeClient(
            self.url, ca=self.ca, cert=self.cert, key=self.key,
            timeouts=self.timeouts(), retry=RetryPolicy(attempts=self.attempts),
        )


_URL = re.compile(r"https://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})/?")


class SkipSourceConfig(_Timing):
    """A SKIP Key Provider as the key source (kms/skip.py; docs/skip.md)."""

    protocol: Literal["skip"]
    url: str = Field(description="the Key Provider, https://HOST:PORT (TLS-PSK)")
    sae_id: EntityId = Field(description="the Key Provider's localSystemID: what the peer's"
                             " links name as their peer sae_id")
    psk_identity: str = Field(min_length=1, max_length=128)
    psk_file: FilePath = Field(description="this gateway's PSK in hex (mode 0600)")

    @field_validator("url")
    @classmethod
    def _address(cls, value: str) -> str:
        m = _URL.fullmatch(value)
        if m is None or not 0 < int(m.group(2)) < 65536:
            raise ValueError("a SKIP Key Provider's URL is https://HOST:PORT")
        return value

    @property
    def address(self) -> tuple[str, int]:
        m = _URL.fullmatch(self.url)
        if m is None:  # (the validator made sure)
            raise ValueError(self.url)
        return m.group(1).strip("[]"), int(m.group(2))

    def psk(self) -> bytes:
        return read_psk(self.psk_file)

    def client(self) -> SkipKeySource:
        host, port = self.address
        return SkipKeySource(host, port, ClientContext(self.psk_identity, self.psk()),
                             self.sae_id, timeouts=self.timeouts(),
                             retry=RetryPolicy(attempts=self.attempts))


def read_psk(path: Path) -> bytes:
    """A PSK file: the key in hex (one line), 0600."""
    check_secret_file(path)
    try:
        key = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: not a PSK in hex: {e}") from None
    if not MIN_PSK_BYTES <= len(key) <= MAX_PSK_BYTES:
        raise ConfigError(f"{path}: a PSK of {len(key)} bytes; {MIN_PSK_BYTES} to"
                          f" {MAX_PSK_BYTES} are accepted")
    return key


def _protocol(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("protocol", "etsi014"))
    return str(getattr(value, "protocol", "etsi014"))


UNTAGGED.update({("kms", "etsi014"), ("kms", "skip")})

#: The `kms:` section: ETSI GS QKD 014 unless `protocol: skip`.
KeySourceConfig = Annotated[
    Annotated[KmsClientConfig, Tag("etsi014")] | Annotated[SkipSourceConfig, Tag("skip")],
    Discriminator(_protocol, custom_error_type="protocol",
                  custom_error_message="protocol must be etsi014 (ETSI GS QKD 014, the"
                  " default) or skip (a SKIP Key Provider)")]

"""How a gateway reaches its KME: the `kms:` section of a site configuration."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from common.config import ConfigModel, FilePath
from kms.client import KmeClient, RetryPolicy, Timeouts
from kms.models import EntityId

#: Seconds, finite and positive; an hour is far past any useful wait on a KME.
Wait = Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)]


class KmsClientConfig(ConfigModel):
    url: str = Field(description="KME base URL, https://HOST:PORT")
    sae_id: EntityId = Field(description="this gateway's SAE ID (its client certificate CN)")
    ca: FilePath = Field(description="CA that issued the KME's server certificate")
    cert: FilePath = Field(description="this SAE's client certificate")
    key: FilePath = Field(description="its private key (mode 0600)")
    connect_timeout: Wait = 3.0
    read_timeout: Wait = Field(default=10.0, description="longest wait for any chunk")
    total_timeout: Wait = Field(
        default=15.0, description="bounds one attempt whole: connect, send, read the answer")
    attempts: int = Field(default=3, ge=1, le=10, description="tries per call, see retries")

    @field_validator("url")
    @classmethod
    def _https(cls, value: str) -> str:
        if not value.startswith("https://") or len(value) <= len("https://"):
            raise ValueError("ETSI GS QKD 014 runs over HTTPS: the URL must start https://")
        return value

    @model_validator(mode="after")
    def _timeouts_consistent(self) -> KmsClientConfig:
        self.timeouts()
        return self

    def timeouts(self) -> Timeouts:
        return Timeouts(self.connect_timeout, self.read_timeout, self.total_timeout)

    def client(self) -> KmeClient:
        return KmeClient(
            self.url, ca=self.ca, cert=self.cert, key=self.key,
            timeouts=self.timeouts(), retry=RetryPolicy(attempts=self.attempts),
        )

"""How a gateway reaches its KME: the `kms:` section of a site configuration."""

from __future__ import annotations

from pydantic import Field, field_validator

from kms.client import KmeClient, RetryPolicy, Timeouts
from kms.configfile import ConfigModel, FilePath, Seconds
from kms.models import EntityId


class KmsClientConfig(ConfigModel):
    url: str = Field(description="KME base URL, https://HOST:PORT")
    sae_id: EntityId = Field(description="this gateway's SAE ID (its client certificate CN)")
    ca: FilePath = Field(description="CA that issued the KME's server certificate")
    cert: FilePath = Field(description="this SAE's client certificate")
    key: FilePath = Field(description="its private key (mode 0600)")
    connect_timeout: Seconds = 3.0
    read_timeout: Seconds = 10.0
    attempts: int = Field(default=3, ge=1, le=10, description="tries per call, see retries")

    @field_validator("url")
    @classmethod
    def _https(cls, value: str) -> str:
        if not value.startswith("https://") or len(value) <= len("https://"):
            raise ValueError("ETSI GS QKD 014 runs over HTTPS: the URL must start https://")
        return value

    def client(self) -> KmeClient:
        return KmeClient(
            self.url, ca=self.ca, cert=self.cert, key=self.key,
            timeouts=Timeouts(self.connect_timeout, self.read_timeout),
            retry=RetryPolicy(attempts=self.attempts),
        )

"""A site's configuration (`site.yaml`): its KME, its peer channel, its links.

Reference with every field: docs/configuration.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kms.config import KmsClientConfig
from kms.configfile import Address, FilePath, load_yaml_model
from kms.models import EntityId


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PeerChannelConfig(_Strict):
    """This gateway's end of the mutual-TLS channel to its peers."""

    listen: Address
    ca: FilePath = Field(description="CA that issued the peer gateways' certificates")
    cert: FilePath
    key: FilePath


class PeerConfig(_Strict):
    """The gateway at the other end of a link."""

    address: Address = Field(description="where its peer channel listens")
    name: str = Field(min_length=1, description="its certificate's commonName (pinned)")
    sae_id: EntityId = Field(description="its SAE ID at its KME")


class LinkConfig(_Strict):
    name: EntityId
    role: Literal["initiator", "responder"] = Field(
        description="the initiator fetches QKD keys as master SAE and starts each rekey")
    peer: PeerConfig


class SiteConfig(_Strict):
    site: EntityId
    kms: KmsClientConfig
    peer_channel: PeerChannelConfig
    links: list[LinkConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_links(self) -> SiteConfig:
        names = [link.name for link in self.links]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"link name used more than once: {', '.join(dup)}")
        return self

    def link(self, name: str | None) -> LinkConfig:
        """The link called NAME, or the only link when NAME is None."""
        if name is None:
            if len(self.links) > 1:
                raise KeyError("this site has several links: name one ("
                               + ", ".join(link.name for link in self.links) + ")")
            return self.links[0]
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(f"no link named {name!r} (links: "
                       + ", ".join(link.name for link in self.links) + ")")

    @classmethod
    def load(cls, path: Path) -> SiteConfig:
        return load_yaml_model(path, cls)

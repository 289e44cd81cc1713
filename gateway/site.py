"""The composition root: which sinks a site may configure. The one module of gateway/ that
imports the sinks (ipsec/, tls/); everything below it knows only the sink contract
(common.sink), so a new data plane is one line here and a module of its own.

    site = SiteConfig.load(path)     # the configuration with every sink type known
    site = check(path)               # ... and the certificates and keys it names loaded
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from pydantic import Field

from common.tlsctx import client_context
from gateway import config
from ipsec.skip.sink import SkipSinkConfig
from ipsec.strongswan.sink import StrongswanSinkConfig
from ipsec.xfrm.sink import XfrmSinkConfig
from kms.config import SkipSourceConfig
from tls import guard
from tls.file import FileSinkConfig
from tls.sink import TlsPskSinkConfig

#: Every sink a link can have, told apart by its `type`.
SinkConfigs = Annotated[FileSinkConfig | XfrmSinkConfig | StrongswanSinkConfig
                        | TlsPskSinkConfig | SkipSinkConfig, Field(discriminator="type")]

SiteConfig = config.SiteConfig[SinkConfigs]
LinkConfig = config.LinkConfig[SinkConfigs]


def check(path: Path, raw: bytes | None = None) -> SiteConfig:
    """PATH (RAW: its bytes, if already read) loaded, and the certificates and keys it names
    loaded too: what `qkdgw check-config` checks, and what a reload must pass. Raises
    ConfigError naming the file and the field, or the certificate file."""
    site = SiteConfig.load(path, raw)
    if isinstance(site.kms, SkipSourceConfig):
        site.kms.psk()
    else:
        client_context(site.kms.ca, site.kms.cert, site.kms.key)
    pc = site.peer_channel
    client_context(pc.ca, pc.cert, pc.key)
    return site


def guard_tls(site: SiteConfig, source: str, *, once: bool) -> None:
    """`qkdgw tls-guard`: end each TLS PSK identity of the site at its deadline."""
    sinks = [(link.name, sink) for link in site.links for sink in link.sinks
             if isinstance(sink, TlsPskSinkConfig)]
    asyncio.run(guard.run(guard.targets(sinks, source), once=once))

"""The composition root: which sinks a site may configure. The one module of gateway/ that
imports the sinks (ipsec/, tls/); everything below it knows only the sink contract
(common.sink), so a new data plane is one line here and a module of its own.

    site = SiteConfig.load(path)     # the configuration with every sink type known
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from pydantic import Field

from gateway import config
from ipsec.strongswan.sink import StrongswanSinkConfig
from ipsec.xfrm.sink import XfrmSinkConfig
from tls import guard
from tls.file import FileSinkConfig
from tls.sink import TlsPskSinkConfig

#: Every sink a link can have, told apart by its `type`.
SinkConfigs = Annotated[FileSinkConfig | XfrmSinkConfig | StrongswanSinkConfig
                        | TlsPskSinkConfig, Field(discriminator="type")]

SiteConfig = config.SiteConfig[SinkConfigs]
LinkConfig = config.LinkConfig[SinkConfigs]


def guard_tls(site: SiteConfig, source: str, *, once: bool) -> None:
    """`qkdgw tls-guard`: end each TLS PSK identity of the site at its deadline."""
    sinks = [(link.name, sink) for link in site.links for sink in link.sinks
             if isinstance(sink, TlsPskSinkConfig)]
    asyncio.run(guard.run(guard.targets(sinks, source), once=once))

"""The demo's routers (`qkdgw demo --skip`): two SKIP clients, one on each site's LAN, asking
their gateways for keys while the gateways rekey, as IOS XE routers would for their IKEv2 PPKs.

    router A (lan-a) ──GET /key?remoteSystemID=kp-b──▶ gw-a (kp-a)
    router B (lan-b) ──GET /key/{keyId}?remoteSystemID=kp-a──▶ gw-b (kp-b)

Each round: router A gets a new key, router B the same key by its ID. Counted: keys handed
out at A, obtained at B, and how many of those match byte for byte (never shown).
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections import Counter
from pathlib import Path

from common.skip_client import SkipClient, SkipClientError
from gateway.demo.sites import SKIP_ADDR, SKIP_PORT
from gateway.demo.topology import Net
from gateway.initdemo import skip_routers

#: A round every second: a router asks for a key per IKE SA, far less often; once a second
#: the demo shows keys across every rekey.
ROUND = 1.0


class Routers:
    def __init__(self, net: Net, skip_dir: Path) -> None:
        # (clients.json's identities and keys; the addresses are the namespaces')
        self.clients = {site: SkipClient(
            SKIP_ADDR[site], SKIP_PORT, router.tls(),
            socket_factory=functools.partial(net.socket, f"lan-{site}", socket.AF_INET,
                                             socket.SOCK_STREAM))
            for site, router in skip_routers(skip_dir).items()}
        self.handed_out = self.obtained = self.matching = 0
        self.refused: Counter[str] = Counter()

    async def run(self) -> None:
        """Rounds until cancelled."""
        while True:
            await asyncio.gather(self.round(), asyncio.sleep(ROUND))

    async def round(self) -> None:
        try:
            status, new = await self.clients["a"].new_key("kp-b")
            if status != 200:
                self.refused[f"A {status}"] += 1
                return
            self.handed_out += 1
            status, same = await self.clients["b"].key_by_id("kp-a", new["keyId"])
            if status != 200:
                self.refused[f"B {status}"] += 1
                return
            self.obtained += 1
            self.matching += same.get("key") == new.get("key")
        except SkipClientError:
            self.refused["no answer"] += 1

    @property
    def ok(self) -> bool:
        return self.handed_out > 0 and self.handed_out == self.obtained == self.matching

    def line(self) -> str:
        refused = ", ".join(f"{k} {n}" for k, n in sorted(self.refused.items())) or "none"
        return (f"SKIP: keys handed out at A: {self.handed_out}, obtained at B:"
                f" {self.obtained}, matching: {self.matching} (refused: {refused})")

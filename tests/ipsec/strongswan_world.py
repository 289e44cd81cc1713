"""The strongSwan two-site world of gateway/demo/strongswan.py, with the tests' measuring
(tests/netns_sites.py) and a sampler of both charons' SAs over VICI.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
from typing import Any

import yaml

# connection, run and until re-exported (X as X) for the tests
from gateway.demo.strongswan import StrongswanSites
from gateway.demo.strongswan import connection as connection
from gateway.demo.strongswan import missing_tools as charon_missing
from gateway.demo.topology import run as run
from gateway.demo.topology import until as until
from ipsec.strongswan.vici import Vici, ViciError
from tests.netns_sites import Sites


def missing_tools() -> str | None:
    """Why these tests cannot run here (two charons and a capture), or None."""
    if reason := charon_missing():
        return reason
    return None if shutil.which("tcpdump") else "tcpdump is not installed"


class World(Sites, StrongswanSites):
    async def sample(self, stop: asyncio.Event, period: float = 0.05) -> list[dict[str, Any]]:
        """Every PERIOD, each charon's IKE SAs (list-sas) and the PPK ids it holds."""
        sessions: dict[str, Vici | None] = {"a": None, "b": None}
        samples: list[dict[str, Any]] = []
        conn = "qkdgw-" + yaml.safe_load(
            (self.root / "site-a.yaml").read_text())["links"][0]["name"]
        try:
            while not stop.is_set():
                for site in ("a", "b"):
                    try:
                        if sessions[site] is None:
                            sessions[site] = await Vici.connect(self.vici_path(site))
                        v = sessions[site]
                        assert v is not None
                        events = await v.streamed("list-sas", "list-sa",
                                                  {"ike": conn, "noblock": "yes"})
                        shared = (await v.request("get-shared")).get("keys", [])
                    except ViciError:
                        sessions[site] = None
                        samples.append({"t": time.time(), "site": site, "down": True})
                        continue
                    sas = [{"uid": sa["uniqueid"], "state": sa.get("state"),
                            "ppk": sa.get("ppk", "no"),
                            "children": [{"state": c.get("state"), "spi_in": c.get("spi-in"),
                                          "spi_out": c.get("spi-out"),
                                          "packets_in": int(c.get("packets-in", 0)),
                                          "packets_out": int(c.get("packets-out", 0)),
                                          "encap": c.get("encap")}
                                         for c in (sa.get("child-sas") or {}).values()]}
                           for e in events for sa in e.values() if isinstance(sa, dict)]
                    samples.append({"t": time.time(), "site": site, "sas": sas,
                                    "ppks": [k for k in shared if k.startswith("qkdgw-")]})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), period)
        finally:
            for v in sessions.values():
                if v is not None:
                    await v.close()
        return samples

    def holds(self, site: str) -> list[tuple[int, int, str]]:
        """(packets held, milliseconds, what released it) of each hold in the gateway's log
        (ipsec/strongswan/hold.py)."""
        return [(int(m[1]), int(m[2]), m[3]) for m in re.finditer(
            r"held (\d+) packet\(s\) for (\d+) ms \([^,]*, released: ([^)]*)\)",
            (self.root / f"gw-{site}.log").read_text())]

"""The strongSwan two-site world of gateway/demo/strongswan.py, with the tests' measuring
(tests/netns_sites.py) and a sampler of both charons' SAs over VICI.

Each site's charon is Debian 12's strongSwan 5.9 on the host, or Debian 13's 6.0 with the
`ml` plugin, chrooted into its root (tests/interop/roots.py) inside the site's namespace:

    gw-a netns                                   gw-b netns
    charon 5.9 (host)  or  chroot ROOT charon 6.0  (each site chooses: `Charon`)
      VICI socket, log, strongswan.conf: the world's directory, bind-mounted at CHROOT_DIR

With ML-KEM (both sites on 6.0, `mlkem=True`) the IKE and ESP proposals carry an additional
key exchange `ke1_mlkem768` (RFC 9370): IKE_INTERMEDIATE carries ML-KEM-768 before IKE_AUTH,
where the epoch's PPK enters (RFC 8784).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# connection, run and until re-exported (X as X) for the tests
from gateway.demo.strongswan import PLUGINS, StrongswanSites
from gateway.demo.strongswan import connection as connection
from gateway.demo.strongswan import missing_tools as charon_missing
from gateway.demo.topology import run as run
from gateway.demo.topology import until as until
from ipsec.strongswan.vici import Vici, ViciError
from tests.interop import roots
from tests.netns_sites import Sites

#: Where a chrooted charon sees the world's directory.
CHROOT_DIR = Path("/mnt/qkdgw")
#: The proposals with ML-KEM-768 as the first additional key exchange (RFC 9370).
MLKEM_IKE = "aes256gcm16-prfsha384-x25519-ke1_mlkem768"
MLKEM_ESP = "aes256gcm16-x25519-ke1_mlkem768"


@dataclass(frozen=True)
class Charon:
    """Which charon a site runs."""

    version: str  # "5.9": Debian 12's, on the host; "6.0": Debian 13's in its root

    def root(self) -> Path | None:
        return None if self.version == "5.9" else roots.STRONGSWAN.path()

    def missing(self) -> str | None:
        return roots.missing(roots.STRONGSWAN) if self.version != "5.9" else None


DEBIAN12, DEBIAN13 = Charon("5.9"), Charon("6.0")


def missing_tools(*charons: Charon) -> str | None:
    """Why these tests cannot run here (two charons and a capture), or None."""
    if reason := charon_missing():
        return reason
    for charon in charons:
        if reason := charon.missing():
            return reason
    return None if shutil.which("tcpdump") else "tcpdump is not installed"


class World(Sites, StrongswanSites):
    def __init__(self, root: Path, policy: dict[str, Any], *,
                 charons: tuple[Charon, Charon] = (DEBIAN12, DEBIAN12), mlkem: bool = False,
                 ml_plugin: bool = True, **kwargs: Any) -> None:
        """MLKEM: the proposals ask for ML-KEM; ML_PLUGIN: 6.0's charons load the `ml` plugin
        (without it, Debian 13's strongSwan as packaged)."""
        self.charons = dict(zip(("a", "b"), charons, strict=True))
        if mlkem and DEBIAN12 in charons:
            raise ValueError("strongSwan 5.9 has no ML-KEM: mlkem needs 6.0 at both sites")
        self.mlkem, self.ml_plugin = mlkem, ml_plugin
        super().__init__(root, policy, **kwargs)

    def sink(self, site: str) -> dict[str, Any]:
        spec = super().sink(site)
        if self.mlkem:
            spec["connection"]["proposals"] = [MLKEM_IKE]
            spec["connection"]["children"]["lan"]["esp_proposals"] = [MLKEM_ESP]
        return spec

    def charon_dir(self, site: str) -> Path:
        return self.root if self.charons[site].root() is None else CHROOT_DIR

    def charon_plugins(self, site: str) -> str:
        return f"{PLUGINS} ml" if self.charons[site].root() and self.ml_plugin else PLUGINS

    def charon_command(self, site: str) -> list[str]:
        if self.charons[site].root() is None:
            return super().charon_command(site)
        return self._chrooted(site, "/usr/lib/ipsec/charon")

    def _chrooted(self, site: str, command: str) -> list[str]:
        """COMMAND in SITE's Debian 13 root, with the site's /run and this world's directory."""
        root = self.charons[site].root()
        assert root is not None
        return roots.chrooted(root, command, binds=[(self.root / f"run-{site}", Path("/run")),
                                                     (self.root, CHROOT_DIR)])

    def swanctl(self, site: str, *args: str) -> str:
        """SITE's own swanctl (5.9's or 6.0's) against SITE's charon: its output."""
        uri = f"unix://{self.charon_dir(site) / self.vici_path(site).name}"
        command = ["swanctl", *args, "--uri", uri]
        if self.charons[site].root() is not None:
            command = self._chrooted(site, " ".join(command))
        return run(*command)

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
                            "ppk": sa.get("ppk", "no"), "ke": sa.get("dh-group"),
                            "ake1": sa.get("ake1"),
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

"""A hub and its spokes on loopback, for the hub test and bench/fleet.py: `qkdgw kms-sim`, one
hub daemon and K spoke daemons, N links between them (link i to spoke i mod K), file sinks,
mutual TLS everywhere, audit trails on.

                    ┌── link l0, l3, ... ── spoke s0 (responder)
    hub (initiator) ┼── link l1, l4, ... ── spoke s1
                    └── link l2, l5, ... ── spoke s2
    KME-hub ═══ qkd-s0 ═══ KME-s0,  KME-hub ═══ qkd-s1 ═══ KME-s1, ...   (one kms-sim)

One CA issues every certificate; each site has its own KME and SAE, and a QKD link of its own
to the hub's KME. Ports from a free range: the simulator's admin port, then the KMEs, the
gateways and their metrics, hub first.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import yaml

from gateway import pki
from tests.daemons import Daemons
from tests.helpers import SimProcess, port_free, start_sim

HUB = "hub"
#: Lowest port the fleet listens on.
LOWEST_PORT = 10000


def _free_ports(span: int) -> int:
    """A base port P with P .. P+SPAN-1 free, below the kernel's ephemeral range: a hub's
    thousand links make thousands of outgoing connections (a spoke that starts first tries
    the hub for every link), and one of them would otherwise hold a port a daemon is about
    to listen on."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random(os.getpid() ^ time.monotonic_ns())  # noqa: S311 (picks ports)
    for _ in range(200):
        base = rng.randrange(LOWEST_PORT, max(LOWEST_PORT + 1, low - span))
        if all(port_free(base + i) for i in range(span)):
            return base
    raise RuntimeError("no free range of ports found")


@dataclass
class Fleet(Daemons):
    root: Path
    link_count: int
    peers: int
    #: Site-wide policy of every daemon (gateway.config.PolicyConfig fields).
    policy: dict[str, Any]
    #: The hub's `pacing:` section, if any.
    pacing: dict[str, int] | None = None
    #: Overrides of every QKD link in kms.yaml (key_rate, max_key_count, ...).
    qkd: dict[str, Any] = field(default_factory=dict)
    kms_status_interval: float = 2.0
    sim: SimProcess | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.base = _free_ports(1 + 3 * (self.peers + 1))
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self._pki()
        (self.root / "kms.yaml").write_text(yaml.safe_dump(self._kms()))
        for site in self.sites:
            self.write_config(site, self.config(site))

    # -- layout ------------------------------------------------------------------------------

    @property
    def spokes(self) -> list[str]:
        return [f"s{k}" for k in range(self.peers)]

    @property
    def sites(self) -> list[str]:
        return [HUB, *self.spokes]

    def _index(self, site: str) -> int:
        return self.sites.index(site)

    @property
    def admin_port(self) -> int:
        return self.base

    def kme_port(self, site: str) -> int:
        return self.base + 1 + self._index(site)

    def gateway_port(self, site: str) -> int:
        return self.base + 1 + (self.peers + 1) + self._index(site)

    def metrics_port(self, site: str) -> int:
        return self.base + 1 + 2 * (self.peers + 1) + self._index(site)

    def state_dir(self, site: str) -> Path:
        return self.root / f"state-{site}"

    def config_path(self, site: str) -> Path:
        return self.root / f"{site}.yaml"

    def log_path(self, site: str) -> Path:
        return self.root / f"{site}.log"

    def spoke_of(self, link: int) -> str:
        return f"s{link % self.peers}"

    def link_names(self, site: str = HUB) -> list[str]:
        return [f"l{i}" for i in range(self.link_count) if site in (HUB, self.spoke_of(i))]

    # -- files -------------------------------------------------------------------------------

    def _pki(self) -> None:
        d = self.root / "pki"
        d.mkdir(exist_ok=True)
        ca = pki.make_ca("qkd-gateway fleet CA")
        pki.save(ca, d / "ca.pem", d / "ca.key")
        for site in self.sites:
            for cn, server, client in ((f"kme-{site}", True, False),
                                       (f"sae-{site}", False, True),
                                       (f"gw-{site}", True, True)):
                dns = [cn, "localhost"] if server else []
                cert = pki.issue(ca, cn, dns=dns, ips=["127.0.0.1"] if server else [],
                                 server=server, client=client)
                pki.save(cert, d / f"{cn}.pem", d / f"{cn}.key")

    def _kms(self) -> dict[str, Any]:
        return {
            "ca": "pki/ca.pem",
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
            "kmes": [{"id": f"kme-{s}", "listen": f"127.0.0.1:{self.kme_port(s)}",
                      "cert": f"pki/kme-{s}.pem", "key": f"pki/kme-{s}.key",
                      "saes": [f"sae-{s}"]} for s in self.sites],
            "links": [{"name": f"qkd-{s}", "kmes": [f"kme-{HUB}", f"kme-{s}"],
                       "key_rate": 1e6, "max_key_count": 100_000, **self.qkd}
                      for s in self.spokes],
        }

    def config(self, site: str) -> dict[str, Any]:
        """SITE's configuration as written at the start."""
        hub = site == HUB
        links = []
        for i in range(self.link_count):
            spoke = self.spoke_of(i)
            if not hub and spoke != site:
                continue
            peer = spoke if hub else HUB
            links.append({
                "name": f"l{i}", "role": "initiator" if hub else "responder",
                "peer": {"address": f"127.0.0.1:{self.gateway_port(peer)}",
                         "name": f"gw-{peer}", "sae_id": f"sae-{peer}"},
                "sinks": [{"type": "file", "path": f"keys-{site}/l{i}.psk"}]})
        config: dict[str, Any] = {
            "site": site, "state_dir": f"state-{site}",
            "kms": {"url": f"https://127.0.0.1:{self.kme_port(site)}", "sae_id": f"sae-{site}",
                    "ca": "pki/ca.pem", "cert": f"pki/sae-{site}.pem",
                    "key": f"pki/sae-{site}.key"},
            "kms_status_interval": self.kms_status_interval,
            "peer_channel": {"listen": f"127.0.0.1:{self.gateway_port(site)}",
                             "ca": "pki/ca.pem", "cert": f"pki/gw-{site}.pem",
                             "key": f"pki/gw-{site}.key"},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port(site)}"},
            "policy": dict(self.policy),
            "links": links,
        }
        if hub and self.pacing is not None:
            config["pacing"] = dict(self.pacing)
        return config

    def write_config(self, site: str, config: dict[str, Any]) -> None:
        self.config_path(site).write_text(yaml.safe_dump(config, sort_keys=False))

    # -- processes ---------------------------------------------------------------------------

    def start(self, *, hub: bool = True) -> Self:
        """The simulator and every spoke, then (HUB) the hub."""
        self.sim = start_sim(self.root / "kms.yaml", self.admin_port,
                             [self.kme_port(s) for s in self.sites], self.root / "sim.log")
        for site in self.spokes:
            self.start_site(site)
        if hub:
            self.start_site(HUB)
        return self

    # -- observing ---------------------------------------------------------------------------

    def converged(self, newer_than: dict[str, int] | None = None) -> bool:
        """Every link keyed on both sides with the same epoch and key, none blocked, each
        newer than NEWER_THAN says."""
        hub = self.links(HUB)
        spokes: dict[str, dict[str, Any]] = {}
        for site in self.spokes:
            spokes.update(self.links(site))
        return len(hub) == len(spokes) == self.link_count and all(
            h["epoch"] == spokes[name]["epoch"] > (newer_than or {}).get(name, 0)
            and h["fingerprint"] == spokes[name]["fingerprint"]
            and not h["blocked"] and not spokes[name]["blocked"]
            for name, h in hub.items())


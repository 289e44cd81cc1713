"""Two real sites on loopback for end-to-end tests: `qkdgw kms-sim` and two `qkdgw run`.

    site A: qkdgw run (initiator) ──mTLS peer channel── site B: qkdgw run (responder)
          │ mTLS (ETSI 014)                                     │ mTLS (ETSI 014)
          └────────── KME-A ═══ qkdgw kms-sim ═══ KME-B ─────────┘
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from gateway.initdemo import MAX_PORT_OFFSET, DemoLayout, init_demo
from tests.daemons import Daemons
from tests.helpers import free_base_port, start_sim


class Sites(Daemons):
    def __init__(self, root: Path, policy: dict[str, Any], *, skip: bool = False,
                 kms_protocol: str = "etsi014") -> None:
        super().__init__()
        self.layout: DemoLayout = init_demo(root, base_port=free_base_port(MAX_PORT_OFFSET + 1),
                                            skip=skip, kms_protocol=kms_protocol)
        for site in self.sites:
            path = self.layout.site_config(site)
            config = yaml.safe_load(path.read_text())
            config["policy"].update(policy)
            config["kms_status_interval"] = 0.5
            path.write_text(yaml.safe_dump(config))

    @property
    def sites(self) -> Sequence[str]:
        return ("a", "b")

    def config_path(self, site: str) -> Path:
        return self.layout.site_config(site)

    def log_path(self, site: str) -> Path:
        return self.layout.root / f"site-{site}.log"

    def state_dir(self, site: str) -> Path:
        return self.layout.state_dir(site)

    def gateway_port(self, site: str) -> int:
        return self.layout.gateway_port(site)

    def start(self) -> Sites:
        d = self.layout
        self.sim = start_sim(d.kms_config, d.admin_port, [d.kme_port("a"), d.kme_port("b")],
                             d.root / "sim.log")
        for site in self.sites:
            self.start_site(site)
        return self

    # -- observing ---------------------------------------------------------------------------

    def link(self, site: str) -> dict[str, Any]:
        links: list[dict[str, Any]] = self.status(site)["links"]
        return links[0]

    def epochs(self, site: str, event: str = "rekeyed") -> dict[int, str]:
        """Epoch → fingerprint, from the audit trail."""
        return {r["epoch"]: r["fingerprint"] for r in self.audit(site) if r["event"] == event}

    def converged(self) -> bool:
        a, b = self.link("a"), self.link("b")
        return (a["epoch"] == b["epoch"] > 0 and a["fingerprint"] == b["fingerprint"]
                and not a["blocked"] and not b["blocked"])

    def psk(self, site: str) -> bytes:
        return (self.layout.state_dir(site) / "ab.psk").read_bytes()


def file_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777

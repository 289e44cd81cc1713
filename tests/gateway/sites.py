"""Two real sites on loopback for end-to-end tests: `qkdgw kms-sim` and two `qkdgw run`.

    site A: qkdgw run (initiator) ──mTLS peer channel── site B: qkdgw run (responder)
          │ mTLS (ETSI 014)                                     │ mTLS (ETSI 014)
          └────────── KME-A ═══ qkdgw kms-sim ═══ KME-B ─────────┘
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.demo.topology import WAIT, wait_until
from gateway.initdemo import DemoLayout, init_demo
from tests.helpers import SimProcess, free_base_port, qkdgw_command, start_sim, wait_for_port


class Sites:
    def __init__(self, root: Path, policy: dict[str, Any]) -> None:
        self.layout: DemoLayout = init_demo(root, base_port=free_base_port(24))
        for site in ("a", "b"):
            path = self.layout.site_config(site)
            config = yaml.safe_load(path.read_text())
            config["policy"].update(policy)
            config["kms_status_interval"] = 0.5
            path.write_text(yaml.safe_dump(config))
        self.sim: SimProcess | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> Sites:
        d = self.layout
        self.sim = start_sim(d.kms_config, d.admin_port, [d.kme_port("a"), d.kme_port("b")],
                             d.root / "sim.log")
        for site in ("a", "b"):
            self.start_site(site)
        return self

    def start_site(self, site: str) -> None:
        log = (self.layout.root / f"site-{site}.log").open("ab")
        self.procs[site] = subprocess.Popen(
            [*qkdgw_command(), "run", "-c", str(self.layout.site_config(site))],
            stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.layout.gateway_port(site), proc=self.procs[site])

    def stop_site(self, site: str, sig: int = signal.SIGTERM) -> int:
        proc = self.procs.pop(site)
        proc.send_signal(sig)
        return proc.wait(timeout=20)

    def stop(self) -> None:
        for site in list(self.procs):
            self.stop_site(site)
        if self.sim is not None:
            self.sim.stop()

    def log(self, site: str) -> str:
        return (self.layout.root / f"site-{site}.log").read_text()

    # -- observing ---------------------------------------------------------------------------

    def status(self, site: str) -> dict[str, Any]:
        sock = self.layout.state_dir(site) / "admin.sock"

        async def get() -> dict[str, Any]:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(sock))) as s, \
                    s.get("http://qkdgw/status") as r:
                data: dict[str, Any] = await r.json()
                return data

        return asyncio.run(get())

    def link(self, site: str) -> dict[str, Any]:
        links: list[dict[str, Any]] = self.status(site)["links"]
        return links[0]

    def audit(self, site: str) -> list[dict[str, Any]]:
        path = self.layout.state_dir(site) / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def epochs(self, site: str, event: str = "rekeyed") -> dict[int, str]:
        """Epoch → fingerprint, from the audit trail."""
        return {r["epoch"]: r["fingerprint"] for r in self.audit(site) if r["event"] == event}

    def wait_until(self, what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
        """Poll CHECK (a daemon starting or restarting counts as not yet); after TIMEOUT, fail
        with the tails of both logs."""
        wait_until(what, check, timeout, ignore=(OSError, aiohttp.ClientError, KeyError),
                   detail=lambda: f"A: {self.log('a')[-2000:]}\nB: {self.log('b')[-2000:]}")

    def converged(self) -> bool:
        a, b = self.link("a"), self.link("b")
        return (a["epoch"] == b["epoch"] > 0 and a["fingerprint"] == b["fingerprint"]
                and not a["blocked"] and not b["blocked"])

    def psk(self, site: str) -> bytes:
        return (self.layout.state_dir(site) / "ab.psk").read_bytes()


def file_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777

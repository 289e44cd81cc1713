"""`qkdgw run` processes of a test world, by site name: started, signalled, read, asked.

The worlds (tests/gateway/sites.py: two sites; tests/gateway/test_peer_channel.py: a hub
and two peers; tests/fleet.py: a hub and K spokes) differ in their layout and their
topology; each says where a site's configuration, log, state directory and peer-channel
port are, and this class runs and observes the daemons alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import aiohttp

from gateway.demo.topology import WAIT, wait_until
from tests.helpers import SimProcess, qkdgw_command, wait_for_port

#: A daemon stopping takes well under a second; past this it is killed (and the test fails
#: on what it left, not here).
STOP_TIMEOUT = 30.0
#: Characters of each site's log shown when a wait fails.
LOG_TAIL = 2000


class Daemons(ABC):
    """A world's daemons and simulator; subclasses give the layout."""

    sim: SimProcess | None
    procs: dict[str, subprocess.Popen[bytes]]

    def __init__(self) -> None:
        self.sim = None
        self.procs = {}

    # -- the layout, per world -----------------------------------------------------------

    @property
    @abstractmethod
    def sites(self) -> Sequence[str]:
        """The world's site names."""

    @abstractmethod
    def config_path(self, site: str) -> Path:
        """Where the world keeps it for SITE."""

    @abstractmethod
    def log_path(self, site: str) -> Path:
        """Where the world keeps it for SITE."""

    @abstractmethod
    def state_dir(self, site: str) -> Path:
        """Where the world keeps it for SITE."""

    @abstractmethod
    def gateway_port(self, site: str) -> int:
        """Where the world keeps it for SITE."""

    # -- running -------------------------------------------------------------------------

    def start_site(self, site: str, *flags: str) -> subprocess.Popen[bytes]:
        """`qkdgw FLAGS run -c CONFIG`, its output appended to the site's log; returned once
        its peer channel listens."""
        with self.log_path(site).open("ab") as log:
            proc = subprocess.Popen(
                [*qkdgw_command(), *flags, "run", "-c", str(self.config_path(site))],
                stdout=log, stderr=subprocess.STDOUT)
        self.procs[site] = proc
        wait_for_port(self.gateway_port(site), proc=proc, timeout=WAIT)
        return proc

    def stop_site(self, site: str, sig: int = signal.SIGTERM) -> int:
        proc = self.procs.pop(site)
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop(self) -> None:
        for site in list(self.procs):
            self.stop_site(site)
        if self.sim is not None:
            self.sim.stop()
            self.sim = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- observing -----------------------------------------------------------------------

    def log(self, site: str) -> str:
        return self.log_path(site).read_text(errors="replace")

    def admin(self, site: str, path: str, body: dict[str, str] | None = None
              ) -> dict[str, Any]:
        """SITE's admin socket: GET PATH, or POST BODY to it."""
        sock = self.state_dir(site) / "admin.sock"

        async def call() -> dict[str, Any]:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(sock))) as s, \
                    s.request("GET" if body is None else "POST", f"http://qkdgw{path}",
                              json=body) as r:
                data: dict[str, Any] = await r.json()
                return data

        return asyncio.run(call())

    def status(self, site: str) -> dict[str, Any]:
        return self.admin(site, "/status")

    def links(self, site: str) -> dict[str, dict[str, Any]]:
        """SITE's links in its status, by name."""
        return {link["link"]: link for link in self.status(site)["links"]}

    def audit(self, site: str) -> list[dict[str, Any]]:
        path = self.state_dir(site) / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def wait_until(self, what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
        """Poll CHECK (a daemon starting or restarting counts as not yet); after TIMEOUT,
        fail with the tail of each site's log."""
        def tails() -> str:
            return "\n".join(f"{site}: {self.log(site)[-LOG_TAIL:]}" for site in self.sites
                             if self.log_path(site).exists())

        wait_until(what, check, timeout, ignore=(OSError, aiohttp.ClientError, KeyError),
                   detail=tails)

    def pid(self, site: str) -> int:
        return self.procs[site].pid

    def rss_kb(self, site: str) -> int:
        """The daemon's resident memory, KiB (/proc)."""
        status = Path(f"/proc/{self.pid(site)}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("VmRSS:")))

    def cpu_seconds(self, site: str) -> float:
        """User + system CPU time the daemon has used (/proc)."""
        fields = Path(f"/proc/{self.pid(site)}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

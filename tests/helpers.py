"""Shared test helpers: free ports, the simulator as a subprocess, its admin API."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.sink import KeyLifetimes
from gateway.core.policy import Policy
from gateway.initdemo import DemoLayout, init_demo

#: How long a freshly started process may take to accept connections.
READY_TIMEOUT = 15.0


def lifetimes(policy: Policy | None = None) -> KeyLifetimes:
    """The key lifetimes a link with POLICY (default: the defaults) gives its sinks, as
    gateway.config.SiteConfig.lifetimes derives them."""
    p = policy or Policy()
    return KeyLifetimes(hard_lifetime=p.hard_lifetime, attempt_timeout=p.attempt_timeout)


def qkdgw_command() -> list[str]:
    """The installed `qkdgw` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("qkdgw")
    if script.exists():
        return [str(script)]
    found = shutil.which("qkdgw")
    if found is None:
        raise RuntimeError("qkdgw is not installed in this environment (pip install -e .)")
    return [found]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_base_port(span: int = 13) -> int:
    """A base port P such that P .. P+SPAN-1 are all free (init-demo's layout), below the
    kernel's range of ephemeral ports: a port in it that is free now may be some outgoing
    connection's source port by the time a daemon binds it ("address already in use")."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())  # noqa: S311 (picks ports)
    top = _ephemeral_low() - span
    for _ in range(200):
        base = rng.randrange(10000, top)
        if all(port_free(base + i) for i in range(span)):
            return base
    raise RuntimeError("no free range of ports found")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = READY_TIMEOUT,
                  proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


@dataclass
class SimProcess:
    """A running `qkdgw kms-sim` and its admin interface."""

    proc: subprocess.Popen[bytes]
    admin_port: int
    log: Path

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", data=data,
                                     method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (http://127.0.0.1)
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"admin {method} {path}: {e.code} {e.read()!r}") from None

    def reset(self) -> None:
        self.admin("POST", "/admin/reset", {})

    def fault(self, **spec: Any) -> Any:
        return self.admin("POST", "/admin/faults", spec)

    def state(self) -> Any:
        return self.admin("GET", "/admin/state")

    def requests(self, kme: str) -> dict[str, int]:
        return dict(self.state()["kmes"][kme]["requests"])

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_sim(config: Path, admin_port: int, kme_ports: list[int], log: Path) -> SimProcess:
    out = log.open("wb")
    proc = subprocess.Popen([*qkdgw_command(), "kms-sim", "-c", str(config)],
                            stdout=out, stderr=subprocess.STDOUT)
    sim = SimProcess(proc, admin_port, log)
    try:
        for port in [admin_port, *kme_ports]:
            wait_for_port(port, proc=proc)
    except (RuntimeError, TimeoutError) as e:
        sim.stop()
        raise RuntimeError(f"kms-sim did not start: {e}\n{log.read_text()}") from None
    return sim


VECTORS = Path(__file__).parent / "vectors"


def read_vectors(name: str, first_key: str) -> list[tuple[str, dict[str, str]]]:
    """Read a `key = value` vector file: '#' lines are comments, '[NAME]' lines set the
    section each following vector belongs to, and FIRST_KEY starts a new vector."""
    section = ""
    out: list[tuple[str, dict[str, str]]] = []
    for raw in (VECTORS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{name}: not 'key = value': {line[:40]}")
        if key.strip() == first_key or not out:
            out.append((section, {}))
        out[-1][1][key.strip()] = value.strip()
    return out


def many_links_demo(root: Path, links: int, *, policy: dict[str, Any],
                    kms_status_interval: float, file_sinks: bool) -> DemoLayout:
    """The demo's two sites (`qkdgw init-demo`) with LINKS copies of its link, l0, l1, ...:
    POLICY over the demo's, a QKD link with keys to spare, each link with a `file` sink
    (state-SITE/lN.psk) or none. For the benchmarks of many links."""
    layout = init_demo(root, base_port=free_base_port(24))
    kms = yaml.safe_load(layout.kms_config.read_text())
    kms["links"][0].update(key_rate=1e9, max_key_count=10_000_000)
    layout.kms_config.write_text(yaml.safe_dump(kms))
    for site in ("a", "b"):
        path = layout.site_config(site)
        c = yaml.safe_load(path.read_text())
        c["policy"].update(policy)
        c["kms_status_interval"] = kms_status_interval
        template = c["links"][0]
        c["links"] = [{**template, "name": f"l{i}", "sinks": [
            {"type": "file", "path": f"state-{site}/l{i}.psk"}] if file_sinks else []}
            for i in range(links)]
        path.write_text(yaml.safe_dump(c))
    return layout

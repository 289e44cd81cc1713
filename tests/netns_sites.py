"""The two-site namespaces of gateway/demo/sites.py, with what the tests measure: a tcpdump
capture of the wire between the sites (gateway/demo/wire.py), and one-way UDP flows with
sequence numbers (tests/ipsec/udpflow.py). Used by tests/ipsec/strongswan_world.py,
tests/tls/tls_world.py and tests/ipsec/xfrm_world.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.demo import sites as demo
from gateway.demo import wire
from gateway.demo.sites import HOST_A, HOST_B
from gateway.demo.topology import until, wait_until  # noqa: F401  (re-exported)

FLOW_PORT = 5001


class Sites(demo.Sites):
    # -- measuring ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(self, name: str) -> Iterator[dict[str, Any]]:
        """tcpdump on wan-a (every packet between the sites passes it once)."""
        with wire.capture(self.out / f"{name}.pcap", "wan-a", self.net) as stats:
            yield stats

    def start_flows(self, rate: float, seconds: float) -> None:
        """UDP both ways: lan-a → lan-b and lan-b → lan-a, RATE packets/s for SECONDS."""
        py = sys.executable
        env = {"PYTHONPATH": str(Path(__file__).parents[1])}
        for dst in ("a", "b"):
            self.spawn(f"recv-{dst}", f"lan-{dst}", [
                py, "-m", "tests.ipsec.udpflow", "recv", str(FLOW_PORT),
                "--out", str(self.root / f"recv-{dst}.json")], env=env)
        for dst in ("a", "b"):
            wait_until(f"receiver in lan-{dst}",
                       functools.partial(_says_ready, self.out / f"recv-{dst}.log"))
        for src, host in (("a", HOST_B), ("b", HOST_A)):
            self.spawn(f"send-{src}", f"lan-{src}", [
                py, "-m", "tests.ipsec.udpflow", "send", host, str(FLOW_PORT),
                "--rate", str(rate), "--seconds", str(seconds),
                "--out", str(self.root / f"send-{src}.json")], env=env)

    async def flows_done(self) -> dict[str, Any]:
        """Wait for the senders; then each direction's sent/received/lost and loss times."""
        while any(self.procs[f"send-{s}"].poll() is None for s in ("a", "b")):
            await asyncio.sleep(0.2)
        for s in ("a", "b"):
            self.procs.pop(f"send-{s}")
        await asyncio.sleep(1.0)  # the last packets arrive
        out: dict[str, Any] = {}
        for src, dst in (("a", "b"), ("b", "a")):
            self.kill(f"recv-{dst}")
            sent = json.loads((self.root / f"send-{src}.json").read_text())
            got = {seq for seq, _ in json.loads(
                (self.root / f"recv-{dst}.json").read_text())["received"]}
            lost = [seq for seq in range(sent["sent"]) if seq not in got]
            out[f"{src}->{dst}"] = {"sent": sent["sent"], "received": len(got),
                                    "lost": lost, "lost_at": [sent["times"][q] for q in lost],
                                    "send_errors": len(sent["errors"]), "rate": sent["rate"],
                                    "start": sent["start"]}
        return out


def _says_ready(log: Path) -> bool:
    return b"ready" in log.read_bytes()

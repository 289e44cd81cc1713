"""The IKE responder's hold (ipsec/strongswan/hold.py) on the real kernel: NFQUEUE and
iptables in network namespaces, a forwarded UDP flow through a device standing in for
kernel-libipsec's TUN.

    lan ──────────── gw ─────────────────── far
  10.1.0.2     10.1.0.1 │ "ipsec0" 192.0.2.1     192.0.2.2, 10.2.0.2 on lo
     udpflow send        hold_driver              udpflow recv

The namespaces lan-a, gw-a and gw-b of a two-site topology on one wire
(gateway/demo/topology.py). `gw` forwards; its link to `far` is a veth named like charon's
TUN device, so the hold's `-o ipsec0` rule sees exactly the traffic it would see in front
of charon. The flow is 1000 packets/s with sequence numbers; every packet must arrive,
none while held.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.demo.topology import Net, Site, Topology
from ipsec import netlink, nfqueue
from ipsec.strongswan.hold import chain_name

REPO = Path(__file__).resolve().parents[2]
RATE = 1000
PORT = 7777


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, NFQUEUE)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install iproute2 iptables)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


class World:
    """The namespaces and the processes run in them (lan: lan-a, gw: gw-a, far: gw-b)."""

    topology = Topology(sites=(Site("a", wan_device="ipsec0"), Site("b", hosts=0)),
                        wan="link")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.net = Net(self.topology, "qh")
        self.procs: list[subprocess.Popen[str]] = []

    def teardown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.net.down()

    def python(self, role: str, *args: str, as_nobody: bool = False,
               **kw: Any) -> subprocess.Popen[str]:
        user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] \
            if as_nobody else []
        p = subprocess.Popen(self.net.argv(role, *user, sys.executable, *args),
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                             **kw)
        self.procs.append(p)
        return p

    def driver(self, device: str = "ipsec0", max_time: float = 5.0,
               max_packets: int | None = None, as_nobody: bool = False) -> Driver:
        extra = [] if max_packets is None else [str(max_packets)]
        return Driver(self.python("gw-a", "-m", "tests.ipsec.hold_driver", "ab", device,
                                  str(max_time), *extra, as_nobody=as_nobody,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=open(self.root / "driver.log", "a")))

    def rule_packets(self) -> int:
        """Packets the hold's NFQUEUE rule has seen, held or passed straight through."""
        out = self.net.run("gw-a", "iptables", "-t", "mangle", "-L", chain_name("ab"), "-v",
                           "-x", "-n")
        return sum(int(line.split()[0]) for line in out.splitlines() if "NFQUEUE" in line)

    def iptables(self) -> str:
        return self.net.run("gw-a", "iptables", "-t", "mangle", "-S")

    def flow(self, seconds: float) -> Flow:
        recv = self.python("gw-b", "-m", "tests.ipsec.udpflow", "recv", str(PORT), "--out",
                           str(self.root / "recv.json"), stdout=subprocess.PIPE)
        assert recv.stdout is not None
        assert recv.stdout.readline().strip() == "ready"
        send = self.python("lan-a", "-m", "tests.ipsec.udpflow", "send", self.topology.host("b"),
                           str(PORT), "--rate", str(RATE), "--seconds", str(seconds), "--out",
                           str(self.root / "send.json"))
        return Flow(self.root, send, recv)


class Driver:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        assert json.loads(self._line())["ready"]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the hold driver died (see driver.log)"
        return line

    def do(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self._line())
        return answer


class Flow:
    def __init__(self, root: Path, send: subprocess.Popen[str], recv: subprocess.Popen[str]):
        self.root, self.send, self.recv = root, send, recv

    def done(self) -> tuple[list[float], list[tuple[int, float]]]:
        """Send times by sequence number; (sequence number, arrival time) in arrival order."""
        assert self.send.wait(timeout=30) == 0
        time.sleep(0.3)
        self.recv.send_signal(signal.SIGTERM)
        assert self.recv.wait(timeout=10) == 0
        sent = json.loads((self.root / "send.json").read_text())
        assert sent["errors"] == []
        received = [(seq, t) for seq, t in
                    json.loads((self.root / "recv.json").read_text())["received"]]
        return sent["times"], received


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[World]:
    t = World(tmp_path)
    try:
        t.net.up()
        yield t
        # Nothing left behind in the gateway's namespace by a hold that was closed.
    finally:
        t.teardown()


def _gap(received: list[tuple[int, float]], start: float, end: float) -> list[int]:
    """Sequence numbers that arrived between start and end."""
    return [seq for seq, t in received if start < t < end]


def test_held_packets_wait_then_all_leave_in_order(topo: World) -> None:
    driver = topo.driver()
    flow = topo.flow(seconds=2.0)
    time.sleep(0.6)
    held_at = driver.do("hold")
    assert held_at["holding"] is True
    time.sleep(0.4)
    released = driver.do("release")
    assert released["holding"] is False
    sent, received = flow.done()
    after = driver.do("status")
    through_rule = topo.rule_packets()
    driver.do("close")

    seqs = [seq for seq, _ in received]
    assert sorted(seqs) == list(range(len(sent))), "a packet was lost or duplicated"
    # Nothing crossed while held (a packet already past the rule may still arrive just
    # after the hold began)...
    during = _gap(received, held_at["t"] + 0.005, released["t"] - 0.05)
    assert during == [], f"{len(during)} packets crossed while held"
    # ... and what was held is what was sent meanwhile, let go in the order it came.
    in_hold = [i for i, t in enumerate(sent) if held_at["t"] + 0.005 < t < released["t"] - 0.05]
    assert len(in_hold) >= 0.3 * RATE
    assert released["seen"] >= len(in_hold)
    position = {seq: i for i, seq in enumerate(seqs)}
    assert [position[s] for s in in_hold] == sorted(position[s] for s in in_hold)
    assert "QKDGW-HOLD" not in topo.iptables(), "close left the chain behind"
    # Every packet since the hold began met the rule; after the release they passed
    # straight through in the kernel: the gateway heard of none of them.
    after_release = [t for t in sent if t > released["t"]]
    assert through_rule >= len(in_hold) + len(after_release)
    assert len(after_release) >= 0.5 * RATE
    assert after["seen"] == released["seen"]


def test_a_hold_that_overflows_lets_the_rest_through_at_once(topo: World) -> None:
    """Past MAX_PACKETS the queue fails open: later packets pass unheld, none is dropped."""
    driver = topo.driver(max_packets=50)
    flow = topo.flow(seconds=1.5)
    time.sleep(0.5)
    driver.do("hold")
    time.sleep(0.4)
    released = driver.do("release")
    sent, received = flow.done()
    driver.do("close")
    assert sorted(seq for seq, _ in received) == list(range(len(sent)))
    # The queue's length was held, plus what came during the release's few milliseconds
    # (the first accept makes room before the length goes to 0).
    assert 50 <= released["seen"] <= 55, released
    arrivals = sorted(t for _, t in received)
    longest = max(b - a for a, b in itertools.pairwise(arrivals))
    assert longest < 0.1, f"traffic stopped for {longest:.3f} s: the overflow was held too"


def test_without_the_right_to_hold_it_says_why_and_holds_nothing(topo: World) -> None:
    driver = topo.driver(as_nobody=True)
    assert driver.do("hold")["holding"] is False
    driver.do("close")
    log = (topo.root / "driver.log").read_text()
    assert "cannot hold traffic during rotations" in log, log
    assert "NFQUEUE" in log, log
    assert "Operation not permitted" in log, log
    assert "QKDGW-HOLD" not in topo.iptables()


def test_a_hold_nobody_releases_ends_after_max_time(topo: World) -> None:
    driver = topo.driver(max_time=0.3)
    flow = topo.flow(seconds=1.5)
    time.sleep(0.5)
    held_at = driver.do("hold")
    sent, received = flow.done()
    assert sorted(seq for seq, _ in received) == list(range(len(sent)))
    arrivals = sorted(t for _, t in received)
    longest = max(b - a for a, b in itertools.pairwise(arrivals))
    assert 0.25 < longest < 0.6, f"longest gap {longest:.3f} s"
    assert driver.do("release")["holding"] is False
    assert "no Commit after 0.3 s" in (topo.root / "driver.log").read_text()
    assert held_at["holding"] is True


def test_a_new_attempt_during_a_hold_gets_its_own_max_time(topo: World) -> None:
    """An Offer that never got its Commit, then a new one: the hold runs on, timed afresh,
    so the new attempt's window is still covered."""
    driver = topo.driver(max_time=0.4)
    flow = topo.flow(seconds=2.0)
    time.sleep(0.5)
    driver.do("hold")
    time.sleep(0.3)
    assert driver.do("hold")["holding"] is True
    sent, received = flow.done()
    assert sorted(seq for seq, _ in received) == list(range(len(sent)))
    arrivals = sorted(t for _, t in received)
    longest = max(b - a for a, b in itertools.pairwise(arrivals))
    assert 0.6 < longest < 0.95, f"longest gap {longest:.3f} s (0.3 + 0.4 expected)"
    driver.do("close")


def test_without_the_device_nothing_is_held_or_touched(topo: World) -> None:
    driver = topo.driver(device="ipsec9")
    assert driver.do("hold")["holding"] is False
    assert "QKDGW-HOLD" not in topo.iptables()
    driver.do("close")


def test_a_gateway_killed_while_holding_leaves_traffic_flowing(topo: World) -> None:
    """The queue is unbound with the process; `--queue-bypass` lets new packets through on
    their way (to charon's tunnel). What was held at that moment is lost with it."""
    driver = topo.driver()
    flow = topo.flow(seconds=2.0)
    time.sleep(0.5)
    driver.do("hold")
    time.sleep(0.2)
    driver.proc.kill()
    driver.proc.wait()
    killed = time.time()
    sent, received = flow.done()
    after = [seq for seq, t in received if t > killed + 0.05]
    expected = [i for i, t in enumerate(sent) if t > killed + 0.05]
    assert after == expected, "traffic did not resume, complete and in order, after the kill"
    assert "QKDGW-HOLD" in topo.iptables()  # the chain stays, empty or not, until ...
    again = topo.driver()  # ... the next start, which empties it before its first hold
    assert again.do("hold")["holding"] is True
    assert again.do("close")["holding"] is False
    assert "QKDGW-HOLD" not in topo.iptables()


def test_codec_round_trip() -> None:
    bind = nfqueue.bind_msg(7, maxlen=100)
    bind["header"]["type"] = nfqueue.msg_type(nfqueue.NFQNL_MSG_CONFIG)
    bind.encode()
    msg = nfqueue.nfqnl_config_msg(bytes(bind.data))
    msg.decode()
    assert msg["header"]["type"] == (3 << 8) | 2  # NFNL_SUBSYS_QUEUE, NFQNL_MSG_CONFIG
    assert msg["res_id"] == 7
    assert msg.get_attr("NFQA_CFG_CMD")["command"] == nfqueue.NFQNL_CFG_CMD_BIND
    assert msg.get_attr("NFQA_CFG_PARAMS")["copy_mode"] == nfqueue.NFQNL_COPY_META
    assert msg.get_attr("NFQA_CFG_QUEUE_MAXLEN") == 100
    assert msg.get_attr("NFQA_CFG_FLAGS") == nfqueue.NFQA_CFG_F_FAIL_OPEN
    verdict = nfqueue.accept_msg(7, 2**32 + 5)  # ids are 32-bit serial numbers
    verdict.encode()
    back = nfqueue.nfqnl_packet_msg(bytes(verdict.data))
    back.decode()
    assert back.get_attr("NFQA_VERDICT_HDR") == {"verdict": nfqueue.NF_ACCEPT, "id": 5}
    # Two packet notices in one read, as the socket decodes them: the newest id counts.
    data = b""
    for packet_id in (41, 42):
        pkt = nfqueue.nfqnl_packet_msg()
        pkt["header"]["type"] = nfqueue.msg_type(nfqueue.NFQNL_MSG_PACKET)
        pkt["attrs"] = [["NFQA_PACKET_HDR", {"packet_id": packet_id, "hw_protocol": 0x800,
                                             "hook": 4}]]
        pkt.encode()
        data += bytes(pkt.data)
    sock = nfqueue.NfQueueSocket(7)
    try:
        for offset, _, msg_type, _, _ in netlink.headers(data):
            notice = sock.message_classes[msg_type](data, offset=offset)
            notice.decode()
            sock.unsolicited(notice)
    finally:
        sock.close()
    assert (sock.seen, sock.last_id) == (2, 42)

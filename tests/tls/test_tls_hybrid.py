"""TLS 1.3 with the epoch's PSK plus a hybrid ML-KEM key share, on the wire.

With `psk_dhe_ke` a TLS 1.3 handshake over an external PSK also runs a key exchange; with
OpenSSL 3.5's `X25519MLKEM768` group (0x11EC) that exchange is X25519 and ML-KEM-768, so every
connection adds ML-KEM forward secrecy to the epoch key. Each case runs a real TLS pair on the
loopback of a namespace of its own and captures the handshake:

    netns qh-PID (lo)
      load ─► stunnel client :7000 ══ TLS 1.3 PSK ══► :7443 stunnel server ─► echo :7001
      load (tls/pyssl.py client)   ══ TLS 1.3 PSK ══► :7443 psk-echo (tls/pyssl.py server)
      tcpdump -i lo port 7443: ClientHello and ServerHello, parsed with scapy

- debian13-stunnel: stunnel 5.74 / OpenSSL 3.5 both ends, the sample configurations
  (docs/examples/stunnel) with their `curves` line switched on, as docs/tls.md says;
- debian13-python: Python 3.13 / OpenSSL 3.5, tls/pyssl.py's contexts as they are (OpenSSL
  3.5's default groups put X25519MLKEM768 first);
- debian12-stunnel: this machine's stunnel (5.68 / OpenSSL 3.0 on Debian 12), the samples as
  they are: no ML-KEM group (OpenSSL 3.0 has none, and stunnel's default `curves` leave it
  out even on OpenSSL 3.5), the PSK still comes with plain X25519 (psk_dhe_ke);
- debian12-to-debian13: a Debian 12 client against a Debian 13 server offering
  `X25519MLKEM768:X25519`: they agree on X25519 (a site can switch ML-KEM on before its peer);
  against a server requiring `X25519MLKEM768` alone, no connection at all.

The PSK file is the `tls_psk` sink's (tls/pskfile.py), the same at both ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.files import write_private
from gateway.demo.topology import namespace, run, wait_until
from tests.interop import roots
from tls import pskfile

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs/examples/stunnel"
X25519, X25519MLKEM768 = 0x001D, 0x11EC
PSK_KE, PSK_DHE_KE = 0, 1  # RFC 8446 4.2.9 PskKeyExchangeMode
LOAD_SECONDS = 1.0
#: Inside the Debian 13 root: this checkout, and the case's directory.
IN_ROOT_REPO, IN_ROOT_DIR = Path("/mnt/repo"), Path("/mnt/case")


@dataclass(frozen=True)
class Case:
    name: str
    client: str  # "stunnel-12" | "stunnel-13" | "python-13"
    server: str
    server_curves: str | None  # the server's `curves` (stunnel), None: the sample's
    group: int | None  # the key share group the ServerHello must select; None: refused


CASES = [
    Case("debian13-stunnel", "stunnel-13", "stunnel-13", "X25519MLKEM768:X25519", X25519MLKEM768),
    Case("debian13-python", "python-13", "python-13", None, X25519MLKEM768),
    Case("debian12-stunnel", "stunnel-12", "stunnel-12", None, X25519),
    Case("debian12-to-debian13", "stunnel-12", "stunnel-13", "X25519MLKEM768:X25519", X25519),
    Case("debian12-to-debian13-mlkem-only", "stunnel-12", "stunnel-13", "X25519MLKEM768", None),
]


def missing(case: Case) -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and chroot need root"
    for tool, package in (("tcpdump", "tcpdump"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    if "stunnel-12" in (case.client, case.server) and shutil.which("stunnel") is None:
        return "stunnel is not installed (apt-get install stunnel4)"
    if any(side.endswith("-13") for side in (case.client, case.server)):
        return roots.missing(roots.STRONGSWAN)
    return None


class Pair:
    """CASE's client and server in namespace NS; processes killed on exit."""

    def __init__(self, case: Case, ns: str, d: Path) -> None:
        self.case, self.ns, self.d = case, ns, d
        self.procs: list[subprocess.Popen[bytes]] = []

    def argv(self, debian13: bool, command: str) -> list[str]:
        """COMMAND (shell syntax; paths as the side sees them) in the namespace."""
        inner = (roots.chrooted(roots.STRONGSWAN.path(), command,
                                binds=[(REPO, IN_ROOT_REPO), (self.d, IN_ROOT_DIR)])
                 if debian13 else ["sh", "-c", command])
        return ["ip", "netns", "exec", self.ns, *inner]

    def seen(self, debian13: bool) -> Path:
        return IN_ROOT_DIR if debian13 else self.d

    def python(self, debian13: bool) -> str:
        """Debian 13's python3 (3.13, OpenSSL 3.5), or this test's interpreter."""
        return (f"env PYTHONPATH={IN_ROOT_REPO} python3" if debian13
                else f"env PYTHONPATH={REPO} {sys.executable}")

    def spawn(self, name: str, debian13: bool, command: str) -> None:
        with (self.d / f"{name}.log").open("wb") as log:
            self.procs.append(subprocess.Popen(self.argv(debian13, command), stdout=log,
                                               stderr=subprocess.STDOUT))

    def stunnel(self, role: str, debian13: bool, curves: str | None) -> None:
        """The sample configuration of ROLE (server.conf or client.conf), on loopback, its
        PSK file this case's; with CURVES, its commented `curves` line switched on."""
        text = (EXAMPLES / f"{role}.conf").read_text()
        here = self.seen(debian13)
        text = re.sub(r"^pid = .*$", "pid =", text, flags=re.M)
        text = re.sub(r"^PSKsecrets = .*$", f"PSKsecrets = {here}/psk", text, flags=re.M)
        text = re.sub(r"^accept = .*$", "accept = 127.0.0.1:" + (
            "7443" if role == "server" else "7000"), text, flags=re.M)
        text = re.sub(r"^connect = .*$", "connect = 127.0.0.1:" + (
            "7001" if role == "server" else "7443"), text, flags=re.M)
        if curves is not None:
            text, n = re.subn(r"^;curves = .*$", f"curves = {curves}", text, flags=re.M)
            assert n == 1, f"docs/examples/stunnel/{role}.conf has no ';curves = ' line"
        (self.d / f"{role}.conf").write_text(text)
        self.spawn(f"stunnel-{role}", debian13, f"stunnel {here}/{role}.conf")

    def start(self) -> list[str]:
        """Both ends up; the load's argv."""
        c = self.case
        server13, client13 = c.server.endswith("-13"), c.client.endswith("-13")
        if c.server.startswith("stunnel"):
            self.spawn("echo", False, f"{self.python(False)} -m tests.tls.tlsload echo 7001")
            self.stunnel("server", server13, c.server_curves)
        else:
            self.spawn("psk-echo", server13, f"{self.python(server13)} -m tests.tls.tlsload"
                       f" psk-echo 127.0.0.1 7443 --psk-file {self.seen(server13)}/psk")
        wait_until("the TLS server listening", lambda: ":7443 " in run(
            "ip", "netns", "exec", self.ns, "ss", "-Htln"))
        if c.client.startswith("stunnel"):  # the load talks plain TCP to the stunnel client
            self.stunnel("client", client13, "X25519MLKEM768:X25519" if client13 else None)
            wait_until("the stunnel client listening", lambda: ":7000 " in run(
                "ip", "netns", "exec", self.ns, "ss", "-Htln"))
            in_root, target = False, "7000"
        else:  # the load speaks TLS itself (tls/pyssl.py), with the PSK file
            in_root = client13
            target = f"7443 --psk-file {self.seen(in_root)}/psk"
        return self.argv(in_root, f"{self.python(in_root)} -m tests.tls.tlsload load 127.0.0.1"
                                  f" {target} --seconds {LOAD_SECONDS}"
                                  f" --out {self.seen(in_root)}/load.json")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def capture(ns: str, pcap: Path) -> Iterator[None]:
    err = pcap.with_suffix(".tcpdump")
    with err.open("wb") as f:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-i", "lo", "-n", "-U",
                                 "-s", "0", "-w", str(pcap), "tcp port 7443"],
                                stdout=f, stderr=subprocess.STDOUT)
    wait_until("tcpdump listening", lambda: b"listening on" in err.read_bytes())
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def hellos(pcap: Path) -> list[tuple[str, dict[int, Any]]]:
    """("client" or "server", {extension type: scapy extension}) of each ClientHello and
    ServerHello in PCAP (each in one TCP segment on loopback)."""
    from scapy.layers.inet import TCP
    from scapy.layers.tls.all import TLS
    from scapy.layers.tls.handshake import TLSClientHello, TLSServerHello
    from scapy.utils import rdpcap

    out: list[tuple[str, dict[int, Any]]] = []
    for packet in rdpcap(str(pcap)):
        data = bytes(packet[TCP].payload) if TCP in packet else b""
        if not data or data[0] != 22:  # handshake records only
            continue
        for msg in TLS(data).msg:  # type: ignore[no-untyped-call]
            if isinstance(msg, TLSClientHello | TLSServerHello):
                side = "client" if isinstance(msg, TLSClientHello) else "server"
                out.append((side, {e.type: e for e in msg.ext or []}))
    return out


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def handshake(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    case: Case = request.param
    if reason := missing(case):
        pytest.skip(f"cannot run {case.name}: {reason}")
    d = tmp_path_factory.mktemp(f"hybrid-{case.name}")
    d.chmod(0o755)
    identity = pskfile.identity("ab", 7)
    write_private(d / "psk", pskfile.dumps([(identity, os.urandom(32))]))
    with namespace(f"qh-{os.getpid()}-{case.name[-6:]}") as ns:
        run("ip", "-n", ns, "link", "set", "lo", "up")
        pair = Pair(case, ns, d)
        try:
            load = pair.start()
            with capture(ns, d / "hello.pcap"):
                subprocess.run(load, check=True, capture_output=True, timeout=60)
        finally:
            pair.stop()
    return {"case": case, "identity": identity, "hellos": hellos(d / "hello.pcap"),
            "load": json.loads((d / "load.json").read_text()),
            "logs": {p.name: p.read_text(errors="replace") for p in d.glob("*.log")}}


def test_every_connection_carried_data_through_the_psk_handshake(
        handshake: dict[str, Any]) -> None:
    new, long = handshake["load"]["new"], handshake["load"]["long"]
    if handshake["case"].group is None:  # refused: nothing got through
        assert new["ok"] == 0
        assert new["attempts"] >= 5
        assert long["echoed"] == 0
        return
    assert new["failures"] == [], (new["failures"][:3], handshake["logs"])
    assert long["error"] is None, (long, handshake["logs"])
    assert new["ok"] >= 5
    assert long["echoed"] >= 5


def test_client_hello_offers_the_epoch_psk_with_psk_dhe_ke_and_the_key_share(
        handshake: dict[str, Any]) -> None:
    clients = [ext for side, ext in handshake["hellos"] if side == "client"]
    assert len(clients) >= 5, handshake["hellos"]
    case: Case = handshake["case"]
    for ext in clients:
        assert PSK_DHE_KE in ext[45].kxmodes  # psk_key_exchange_modes
        assert PSK_KE not in ext[45].kxmodes  # never the PSK alone
        identities = [bytes(i.identity) for i in ext[41].identities]  # pre_shared_key
        assert identities == [handshake["identity"].encode()]
        groups = {share.group for share in ext[51].client_shares}  # key_share
        assert case.group in groups or case.group is None or X25519MLKEM768 in groups, groups
        if case.client.endswith("-13"):
            assert X25519MLKEM768 in groups
        else:
            # OpenSSL 3.0 has no such group; stunnel's default curves leave it out anyway
            assert X25519MLKEM768 not in set(ext[10].groups)


def test_server_hello_selects_the_psk_and_the_group(handshake: dict[str, Any]) -> None:
    servers = [ext for side, ext in handshake["hellos"] if side == "server"]
    if handshake["case"].group is None:
        assert servers == [], "a server requiring ML-KEM answered a client without it"
        return
    assert len(servers) >= 5
    for ext in servers:
        assert ext[41].selected_identity == 0  # the PSK: psk_dhe_ke with a key_share
        assert ext[51].server_share.group == handshake["case"].group

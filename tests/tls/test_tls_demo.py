"""docs/tls.md's recipe for init-demo: the `file` sinks swapped for the commented `tls_psk`
lines, then on one host without systemd (no network namespaces, no root needed): the
guards, the KMS simulator, the two gateways, the sample stunnel configurations on loopback
under systemd-socket-activate, and a line echoed through both stunnels."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.demo.topology import listening, wait_until
from gateway.initdemo import init_demo
from gateway.site import SiteConfig
from tests.tls.tls_world import REPO, sample_conf
from tls import pskfile
from tls.sink import TlsPskSinkConfig

BASE = 18640  # the demo's ports from here (not the default: a running demo keeps its own)
BACKEND, SERVER, CLIENT = 7000, 7443, 7001  # as in docs/tls.md


def switch_to_tls_psk(text: str) -> str:
    """What docs/tls.md says to do: the file sink's two lines out, the tls_psk ones in."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("- type: file"))
    del lines[at:at + 2]
    return "\n".join(lines[:at + 1] + [line.replace("# ", "", 1) if line.startswith("      # ")
                                       else line for line in lines[at + 1:]]) + "\n"


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    missing = [t for t in ("stunnel", "systemd-socket-activate") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian: stunnel4, systemd)")
    busy = [p for p in (BACKEND, SERVER, CLIENT, BASE + 1) if listening(p)]
    if busy:
        pytest.skip(f"port(s) {busy} in use on this host")
    running: dict[str, subprocess.Popen[bytes]] = {}
    yield running
    for proc in reversed(running.values()):
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_init_demo_with_tls_psk_sinks_and_stunnel_without_systemd(
        tmp_path: Path, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    init_demo(tmp_path, base_port=BASE)
    for site, role in (("a", "client"), ("b", "server")):
        config = tmp_path / f"site-{site}.yaml"
        config.write_text(switch_to_tls_psk(config.read_text()))
        [sink] = SiteConfig.load(config).links[0].sinks
        assert isinstance(sink, TlsPskSinkConfig)
        assert sink.role == role
        assert sink.path == tmp_path / f"state-{site}" / f"ab-{role}.psk"

    def spawn(name: str, *argv: str) -> None:
        with (tmp_path / f"{name}.log").open("wb") as log:
            procs[name] = subprocess.Popen(argv, cwd=tmp_path, stdout=log,
                                           stderr=subprocess.STDOUT,
                                           env={**os.environ, "PYTHONPATH": str(REPO)})

    qkdgw = str(Path(sys.executable).with_name("qkdgw"))
    for site in ("a", "b"):  # the start order of docs/tls.md: guard, gateway, stunnel
        spawn(f"guard-{site}", qkdgw, "tls-guard", "-c", f"site-{site}.yaml")
    spawn("kms-sim", qkdgw, "kms-sim", "-c", "kms.yaml")
    wait("KME-A listening", lambda: listening(BASE + 1))
    for site in ("a", "b"):
        spawn(f"gw-{site}", qkdgw, "run", "-c", f"site-{site}.yaml")
    psk = {"a": tmp_path / "state-a/ab-client.psk", "b": tmp_path / "state-b/ab-server.psk"}
    wait("the first epoch in both files", lambda: all(
        pskfile.epoch_of(pskfile.loads(psk[s].read_bytes())[0][0]) is not None
        for s in ("a", "b")))
    spawn("echo", sys.executable, "-m", "tests.tls.tlsload", "echo", str(BACKEND))
    for site, name, accept, connect in (("b", "server", SERVER, BACKEND),
                                        ("a", "client", CLIENT, SERVER)):
        conf = tmp_path / f"stunnel-{site}.conf"
        conf.write_text(sample_conf(name, {
            "pid": str(tmp_path / f"stunnel-{site}.pid"), "PSKsecrets": str(psk[site]),
            "accept": f"127.0.0.1:{accept}", "connect": f"127.0.0.1:{connect}"}))
        spawn(f"stunnel-{site}", "systemd-socket-activate", "-l", f"127.0.0.1:{accept}",
              "stunnel", str(conf))
    wait("both stunnel sockets and the backend", lambda: all(
        listening(p) for p in (BACKEND, SERVER, CLIENT)))
    with socket.create_connection(("127.0.0.1", CLIENT), timeout=10) as s:
        s.sendall(b"through both stunnels\n")
        assert s.makefile("rb").readline() == b"through both stunnels\n"
    log = (tmp_path / "gw-b.log").read_text()
    assert "no `qkdgw tls-guard`" not in log  # the guards came first: no warning
    assert "Key configured for PSK identity \"qkdgw-ab-e" in \
        (tmp_path / "stunnel-b.log").read_text()


def wait(what: str, check: Callable[[], bool]) -> None:
    """Poll CHECK; a file not (fully) there yet counts as not yet."""
    wait_until(what, check, ignore=(FileNotFoundError, IndexError, pskfile.PskFileError))

"""Two sites with the `tls_psk` sink, in the namespaces of tests/netns_sites.py.

stunnel (kind="stunnel"):

    lan-a ──── gw-a ═════════════ wan ═════════════ gw-b ──── lan-b
    load       stunnel client                       stunnel server   echo :7000
    → 10.1.0.1:7000 → TLS 1.3 PSK → 198.51.100.1:7443 → 10.2.0.2:7000
               qkdgw run (tls_psk client)           qkdgw run (tls_psk server)
                                                    [qkdgw tls-guard]

Both stunnels run the sample configurations and sockets of docs/examples/stunnel.
Python 3.13 helper (kind="python"): the load runs in gw-a and speaks TLS itself through
tls/pyssl.py to a PSK echo server in gw-b (198.51.100.1:7443), both reading their site's
PSK file. Gateway A is the link's initiator, B the responder.
"""

from __future__ import annotations

import functools
import glob
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from gateway.demo.sites import GW_A, GW_B, HOST_B
from gateway.demo.topology import wait_until
from tests.netns_sites import Sites

APP_PORT, TLS_PORT = 7000, 7443
SUITE = "TLS_CHACHA20_POLY1305_SHA256"  # SHA-256: what external PSKs work with here
REPO = Path(__file__).parents[2]
EXAMPLES = REPO / "docs/examples/stunnel"


@functools.cache
def python313() -> str | None:
    """A Python with ssl PSK callbacks (3.13+), or None: on PATH, or installed by pyenv (whose
    shims exist for versions that are not selected, so each candidate is tried)."""
    candidates = [shutil.which(n) for n in ("python3.14", "python3.13")]
    candidates += sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.1[3-9]*/bin/python3")))
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import ssl; ssl.SSLContext."
                                "set_psk_client_callback"], capture_output=True, check=False)
        if probe.returncode == 0:
            return candidate
    return None


def missing_tools(kind: Literal["stunnel", "python"]) -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    tools = ["ip", "openssl", *(["stunnel", "systemd-socket-activate"] if kind == "stunnel"
                                else [])]
    debian = {"stunnel": "stunnel4", "systemd-socket-activate": "systemd"}
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: {debian.get(tool, tool)})"
    if kind == "python" and python313() is None:
        return "no Python 3.13 or later here (ssl PSK callbacks are new in 3.13)"
    return None


class World(Sites):
    tag = "qt"

    def __init__(self, root: Path, policy: dict[str, Any],
                 kind: Literal["stunnel", "python"], **sink_options: Any) -> None:
        self.kind = kind
        self.sink_options = sink_options  # more fields for both sites' tls_psk sinks
        super().__init__(root, policy)

    def psk_file(self, site: str) -> Path:
        return self.root / f"psk-{site}.txt"

    def sink(self, site: str) -> dict[str, Any]:
        sink: dict[str, Any] = {"type": "tls_psk", "path": str(self.psk_file(site)),
                                "role": "client" if site == "a" else "server",
                                **self.sink_options}
        if self.kind == "stunnel":
            sink["reload_pid_file"] = str(self.root / f"stunnel-{site}.pid")
        return sink

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(REPO)}

    def start_stunnel(self, site: str) -> None:
        """stunnel as the sample units run it (docs/examples/stunnel: the socket's
        ListenStream, the sample configuration with this world's file paths and the server's
        backend in lan-b), socket-activated by systemd-socket-activate: the listening socket
        is not stunnel's, so a reload (SIGHUP) cannot reset connections waiting on it."""
        name = "client" if site == "a" else "server"
        conf = self.root / f"stunnel-{site}.conf"
        conf.write_text(sample_conf(name, {
            "pid": str(self.root / f"stunnel-{site}.pid"),
            "PSKsecrets": str(self.psk_file(site)),
            **({} if site == "a" else {"connect": f"{HOST_B}:{APP_PORT}"})}))
        listen = listen_stream(name)
        self.spawn(f"stunnel-{site}", f"gw-{site}",
                   ["systemd-socket-activate", "-l", listen, "stunnel", str(conf)])
        port = int(listen.rsplit(":", 1)[1])
        wait_until(f"stunnel-{site} socket",
                   functools.partial(self.net.listening, f"gw-{site}", port))
        self.note(f"stunnel-{site} socket up (stunnel starts at the first connection)")

    def start_guard(self, site: str) -> None:
        """`qkdgw tls-guard` beside SITE's stunnel, as its own process: it outlives the
        gateway and ends each identity at its deadline."""
        qkdgw = str(Path(sys.executable).with_name("qkdgw"))
        self.spawn(f"guard-{site}", f"gw-{site}", [qkdgw, "tls-guard", "-c", f"site-{site}.yaml"])
        wait_until(f"guard-{site} up", functools.partial(
            _says, self.root / f"guard-{site}.log", "guarding"))

    def start_echo(self) -> None:
        self.spawn("echo", "lan-b", [sys.executable, "-m", "tests.tls.tlsload", "echo",
                                     str(APP_PORT)], env=self.env())
        wait_until("echo server", functools.partial(_says, self.root / "echo.log", "ready"))

    def start_psk_echo(self) -> None:
        py = python313()
        assert py is not None
        self.spawn("psk-echo", "gw-b", [py, "-m", "tests.tls.tlsload", "psk-echo", GW_B,
                                        str(TLS_PORT), "--psk-file", str(self.psk_file("b"))],
                   env=self.env())
        wait_until("PSK echo server", functools.partial(_says, self.root / "psk-echo.log",
                                                        "ready"))

    def start_load(self, seconds: float) -> None:
        out = str(self.root / "load.json")
        if self.kind == "stunnel":
            argv = [sys.executable, "-m", "tests.tls.tlsload", "load", "10.1.0.1",
                    str(APP_PORT), "--seconds", str(seconds), "--out", out]
            self.spawn("load", "lan-a", argv, env=self.env())
        else:
            py = python313()
            assert py is not None
            argv = [py, "-m", "tests.tls.tlsload", "load", GW_B, str(TLS_PORT), "--seconds",
                    str(seconds), "--out", out, "--psk-file", str(self.psk_file("a"))]
            self.spawn("load", "gw-a", argv, env=self.env())

    def try_psk(self, identity: str, key: bytes, timeout: float = 10.0) -> bool:
        """An independent client (openssl s_client in gw-a) with IDENTITY and KEY: does the
        server at gw-b echo a line through it? stdin stays open until the echo or the end of
        the handshake (with -no_ign_eof an EOF would end the connection before the echo):
        an answer takes milliseconds, neither within TIMEOUT is an error, not a refusal."""
        proc = subprocess.Popen(
            self.net.argv("gw-a", "openssl", "s_client", "-quiet", "-no_ign_eof", "-connect",
                          f"{GW_B}:{TLS_PORT}", "-tls1_3", "-ciphersuites", SUITE, "-psk",
                          key.hex(), "-psk_identity", identity),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            proc.stdin.write(b"qkdgw-probe\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], timeout)
            if not ready:
                raise TimeoutError(f"s_client with {identity}: no echo and no refusal within"
                                   f" {timeout} s")
            return proc.stdout.readline() == b"qkdgw-probe\n"  # b"": it exited, refused
        finally:
            proc.kill()
            proc.wait()


def sample_conf(name: str, values: dict[str, str]) -> str:
    """docs/examples/stunnel/NAME.conf with VALUES for some of its options (each must be
    there: the test runs the documented configuration, not one of its own)."""
    left, lines = dict(values), []
    for line in (EXAMPLES / f"{name}.conf").read_text().splitlines():
        option = line.partition("=")[0].strip()
        lines.append(f"{option} = {left.pop(option)}" if "=" in line and option in left
                     else line)
    assert not left, f"{name}.conf has no {', '.join(left)}"
    return "\n".join(lines) + "\n"


def listen_stream(name: str) -> str:
    """Where docs/examples/stunnel/stunnel-psk-NAME.socket listens."""
    text = (EXAMPLES / f"stunnel-psk-{name}.socket").read_text()
    return next(line.partition("=")[2] for line in text.splitlines()
                if line.startswith("ListenStream="))


def _says(log: Path, word: str) -> bool:
    return log.exists() and word in log.read_text()


__all__ = ["GW_A", "World", "missing_tools", "python313"]

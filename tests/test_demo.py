"""`qkdgw demo` as a newcomer runs it: the real command, its summary line, its cleanup.

Each run builds two sites in network namespaces (gateway/demo/sites.py), so these need root
and the data plane's tools; they skip saying what is missing otherwise.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import qkdgw_command

SUMMARY = re.compile(r"rekeys: (\d+), packets sent: (\d+), lost: (\d+) \(A→B (\d+), B→A (\d+)\),"
                     r" plaintext on the link: (\d+)")


@pytest.fixture(autouse=True)
def _need_the_demo() -> None:
    from gateway.demo.live import DemoError, preflight

    try:
        preflight("auto")
    except DemoError as e:
        pytest.skip(f"the demo cannot run here: {e}")


def demo_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith("qd")]


def demo_processes() -> list[str]:
    """Processes of any demo run: the demo starts each in its files' directory (and charon's
    command line names it until it execs)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if "/qkdgw-demo-" in cwd or "/qkdgw-demo-" in args:
            found.append(f"{proc.name} {args} (in {cwd})")
    return found


def run_demo(*args: str) -> dict[str, Any]:
    proc = subprocess.run([*qkdgw_command(), "demo", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=180, check=False)
    return _result(proc.returncode, proc.stdout)


def _result(rc: int, out: str) -> dict[str, Any]:
    m = SUMMARY.search(out)
    return {"rc": rc, "out": out, "summary": tuple(map(int, m.groups())) if m else None}


def ctrl_c(*args: str, when: Callable[[str], bool]) -> dict[str, Any]:
    """Run `qkdgw demo ARGS` on a terminal (a pseudo-terminal it controls) and press Ctrl-C
    there once its output so far satisfies WHEN: the terminal sends SIGINT to its whole
    foreground process group, as a user's terminal does."""
    master, slave = os.openpty()
    # setsid --ctty: a new session whose controlling terminal is that pseudo-terminal.
    proc = subprocess.Popen(["setsid", "--ctty", "--wait", *qkdgw_command(), "demo", *args],
                            stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out, pressed = b"", False
    deadline = time.monotonic() + 300  # a guard against hanging, not a measurement
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the demo has exited and closed the terminal
                break
            if not chunk:
                break
            out += chunk
            if not pressed and when(out.decode(errors="replace")):
                os.write(master, b"\x03")  # Ctrl-C
                pressed = True
        proc.wait(timeout=60)
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert pressed, out.decode(errors="replace")
    return _result(proc.returncode, out.decode(errors="replace"))


def test_demo_rekeys_with_traffic_counts_loss_and_sends_nothing_in_clear() -> None:
    from gateway.demo.live import kernel_has_esp

    r = run_demo("--duration", "20", "--rekey-interval", "1", "--rate", "500")
    assert r["summary"] is not None, r["out"]
    rekeys, sent, lost, a_to_b, b_to_a, plaintext = r["summary"]
    print("\n" + "\n".join(r["out"].strip().splitlines()[-3:]))
    assert rekeys >= 15
    assert sent >= 2 * 500 * 20 * 0.95
    assert lost == a_to_b + b_to_a
    assert plaintext == 0
    # The xfrm sink rotates make-before-break in the kernel; with strongSwan (no ESP in
    # this kernel) site B's gateway holds its traffic while each new IKE SA comes up
    # (docs/strongswan.md): either way nothing is lost.
    assert r["rc"] == 0, r["out"]
    assert lost == 0, r["out"]
    assert ("(xfrm data plane)" if kernel_has_esp() else "(strongswan data plane)") in r["out"]
    assert "cleaned up" in r["out"]
    assert demo_namespaces() == []
    assert demo_processes() == []


SKIP_SUMMARY = re.compile(r"SKIP: keys handed out at A: (\d+), obtained at B: (\d+),"
                          r" matching: (\d+) \(refused: (.+)\)")


def test_skip_routers_get_the_same_keys_through_both_gateways() -> None:
    """`--skip`: a router on each LAN fetches a key through its gateway every second (A a new
    one, B the same by ID) while the gateways rekey; the summary counts them."""
    r = run_demo("--skip", "--duration", "12", "--rekey-interval", "1", "--rate", "200")
    assert r["summary"] is not None, r["out"]
    assert r["summary"][0] >= 8  # rekeys
    m = SKIP_SUMMARY.search(r["out"].split("rekeys: ")[-1])
    assert m is not None, r["out"]
    handed_out, obtained, matching = map(int, m.groups()[:3])
    assert handed_out >= 10
    assert handed_out == obtained == matching, r["out"]
    assert m.group(4) == "none"
    assert r["rc"] == 0, r["out"]
    assert demo_namespaces() == []

def test_kms_outage_shows_the_fallback_and_the_alarm() -> None:
    r = run_demo("--duration", "22", "--rekey-interval", "1", "--rate", "200",
                 "--kms-outage", "6:8")
    lines = r["out"].splitlines()
    during = [line for line in lines if "kms-outage" in line or "qkd-fallback" in line]
    assert any("alarms qkd-fallback" in line or "qkd-fallback" in line for line in during), \
        r["out"]
    assert r["summary"] is not None, r["out"]
    assert r["summary"][2] == 0, r["out"]  # none lost
    assert r["summary"][5] == 0  # nothing in clear, also while the KMEs were away
    # The view names the suite in use, not the policy, and knows no QBER while the KMS is
    # down (unknown is not 0).
    view = [line for line in lines if " epoch " in line and " KMS " in line]
    assert any(" key ML-KEM-768+X25519 (PQC-only) " in line for line in view), r["out"]
    assert any(" key QKD+ML-KEM-768+X25519 " in line for line in view), r["out"]
    assert not [line for line in view if " mode " in line]
    down = [line for line in view if " KMS down " in line]
    assert down, r["out"]
    assert all(" QBER unknown " in line for line in down), down


def test_the_web_view_shows_both_sites_and_the_traffic(tmp_path: Path) -> None:
    """`qkdgw demo --web PORT` in a real browser while it runs: both sites' dashboards, the
    LAN counters and the WAN capture; nothing fetched off this host."""
    import asyncio

    from tests.browser import Browser, chromium_path
    from tests.helpers import free_base_port

    if chromium_path() is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    port = free_base_port(1)
    log = tmp_path / "demo.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*qkdgw_command(), "demo", "--duration", "25",
                                 "--rekey-interval", "1", "--rate", "200", "--web", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)

    async def look() -> dict[str, Any]:
        async with Browser() as b:
            deadline = time.monotonic() + 120
            while True:  # until the sites are up and the traffic flows
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                try:
                    await b.load(f"http://127.0.0.1:{port}/")
                except RuntimeError:
                    await asyncio.sleep(0.5)
                    continue
                seen = await b.evaluate("""(() => ({
                  sites: [...document.querySelectorAll('section#live')].map(s => s.dataset.site),
                  epochs: [...document.querySelectorAll('tr.link')].map(r => +r.dataset.epoch),
                  sent: [...document.querySelectorAll('tr[data-flow]')].map(r => +r.dataset.sent),
                  esp: +(document.querySelector('[data-esp]') || {dataset: {esp: -1}}).dataset.esp,
                  plaintext: +(document.querySelector('[data-plaintext]')
                               || {dataset: {plaintext: -1}}).dataset.plaintext,
                  charts: document.querySelectorAll('#traffic svg polyline').length}))()""")
                if seen["sites"] == ["a", "b"] and len(seen["sent"]) == 2 \
                        and min(seen["sent"]) > 0 and min(seen["epochs"], default=0) > 0:
                    break
                await asyncio.sleep(0.5)
            first = seen
            await asyncio.sleep(4)  # the page refreshes itself: the counters move on
            later = await b.evaluate("""[...document.querySelectorAll('tr[data-flow]')]
                                        .map(r => +r.dataset.sent)""")
            assert min(b - a for a, b in zip(first["sent"], later, strict=True)) > 0
            assert b.off_loopback() == []
            return dict(first)

    seen = asyncio.run(look())
    assert seen["esp"] > 0
    assert seen["plaintext"] == 0
    assert seen["charts"] >= 3
    assert proc.wait(timeout=120) == 0, log.read_text()
    assert f"live view in a browser: http://127.0.0.1:{port}/" in log.read_text()
    assert demo_namespaces() == []


def test_ctrl_c_prints_the_counted_summary_and_cleans_up_everything() -> None:
    """Ctrl-C is how the demo ends without --duration: the same summary, its exit status."""
    rekeys_seen = re.compile(r" rekeys ([3-9]|\d\d+) ")  # in the live view
    r = ctrl_c("--rekey-interval", "1", "--rate", "300",
               when=lambda out: rekeys_seen.search(out) is not None)
    print("\n" + "\n".join(r["out"].strip().splitlines()[-3:]))
    assert "Ctrl-C: stopping" in r["out"], r["out"]
    assert r["summary"] is not None, r["out"]
    rekeys, sent, lost, a_to_b, b_to_a, plaintext = r["summary"]
    assert rekeys >= 3
    assert sent > 0
    assert lost == a_to_b + b_to_a == 0, r["out"]
    assert plaintext == 0, r["out"]
    assert r["rc"] == 0, r["out"]  # the summary's status: nothing lost, nothing in clear
    assert "cleaned up" in r["out"]
    assert demo_namespaces() == []
    assert demo_processes() == []


def test_ctrl_c_while_building_says_nothing_was_counted_and_cleans_up() -> None:
    r = ctrl_c("--rekey-interval", "1", when=lambda out: "building two sites" in out)
    assert "interrupted before the traffic started: nothing counted" in r["out"], r["out"]
    assert r["summary"] is None
    assert r["rc"] == 128 + signal.SIGINT
    assert "cleaned up" in r["out"]
    assert demo_namespaces() == []
    assert demo_processes() == []


def test_without_root_it_says_what_to_do() -> None:
    if os.geteuid() != 0:
        pytest.skip("already not root: covered by the fixture's message")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        *qkdgw_command(), "demo", "--duration", "5"],
                       capture_output=True, text=True, check=False, timeout=60)
    if "Permission denied" in r.stderr and "qkdgw" not in r.stderr.split(":")[-1]:
        pytest.skip(f"the venv is not readable by nobody here: {r.stderr.strip()[:200]}")
    assert r.returncode == 2, r.stderr
    assert "needs root: run `sudo ./bootstrap demo`" in r.stderr


def test_demo_on_a_kernel_with_esp_uses_the_xfrm_sink_and_loses_nothing(
        tmp_path: Path) -> None:
    """The other data plane: inside User-Mode Linux (a kernel with ESP, tests/uml/boot.py),
    `qkdgw demo` picks the xfrm sink by itself."""
    from tests.uml import boot

    if reason := boot.missing():
        pytest.skip(f"no User-Mode Linux: {reason}")
    run = boot.boot([*qkdgw_command(), "demo", "--duration", "20", "--rekey-interval", "1",
                     "--rate", "300"], tmp_path / "guest", timeout=300)
    m = SUMMARY.search(run.stdout)
    assert m is not None, run.explain()
    rekeys, sent, lost, _, _, plaintext = map(int, m.groups())
    print("\n" + "\n".join(run.stdout.strip().splitlines()[-2:]))
    assert "(xfrm data plane)" in run.stdout
    assert rekeys >= 15
    assert sent >= 2 * 300 * 20 * 0.9
    assert lost == 0, run.stdout[-2000:]
    assert plaintext == 0, run.stdout[-2000:]
    assert run.returncode == 0

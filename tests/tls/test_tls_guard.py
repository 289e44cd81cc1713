"""`qkdgw tls-guard`: identities leave the PSK file at their deadlines, with no gateway; no
network (with stunnel and a killed gateway: test_tls_stop.py)."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.initdemo import init_demo
from tls import expiry, guard, pskfile
from tls.sink import TlsPskSinkConfig

K = [os.urandom(32) for _ in range(3)]


def target(path: Path, **kw: object) -> guard.Target:
    return guard.Target("ab", TlsPskSinkConfig.model_validate(
        {"type": "tls_psk", "path": str(path), "role": "server", **kw}))


def identities(path: Path) -> list[str]:
    return [i for i, _ in pskfile.loads(path.read_bytes())]


def test_sweep_removes_what_is_past_its_deadline_or_has_none(tmp_path: Path) -> None:
    path, now = tmp_path / "p", time.time()
    path.write_bytes(pskfile.dumps([("qkdgw-ab-e3", K[0]), ("qkdgw-ab-e2", K[1]),
                                    ("qkdgw-ab-e1", K[2])]))
    expiry.write(path, {"qkdgw-ab-e3": now + 5, "qkdgw-ab-e2": now})  # e1: none
    t = target(path)
    assert guard.sweep(t, now) == (["qkdgw-ab-e2", "qkdgw-ab-e1"], now + 5)
    assert pskfile.loads(path.read_bytes()) == [("qkdgw-ab-e3", K[0])]  # order and key kept
    assert guard.sweep(t, now + 1) == ([], now + 5)  # nothing more to do
    assert guard.sweep(t, now + 5) == (["qkdgw-ab-e3"], None)
    assert identities(path) == ["qkdgw-ab-blocked"]
    placeholder = path.read_bytes()
    assert guard.sweep(t, now + 10) == ([], None)
    assert path.read_bytes() == placeholder  # the placeholder stays as it is
    path.unlink()
    assert guard.sweep(t, now) == ([], None)  # no file yet: the service can start anyway
    assert identities(path) == ["qkdgw-ab-blocked"]
    assert not t.reload_due


def test_sweep_fails_closed_on_files_it_cannot_read(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    path, now = tmp_path / "p", time.time()
    path.write_bytes(pskfile.dumps([("qkdgw-ab-e3", K[0])]))
    expiry.beside(path, expiry.EXPIRY).write_text('{"qkdgw-ab-e3": "tomorrow"}')
    t = target(path)
    assert guard.sweep(t, now) == (["qkdgw-ab-e3"], None)
    assert "counts as expired" in caplog.text
    path.write_text("not a PSK file\n")
    assert guard.sweep(t, now) == ([], None)
    assert identities(path) == ["qkdgw-ab-blocked"]
    assert t.reload_due
    assert K[0].hex() not in caplog.text


def test_reload_signals_and_runs_the_hook_without_the_key(tmp_path: Path) -> None:
    path, out = tmp_path / "p", tmp_path / "env"
    path.write_bytes(pskfile.dumps([("qkdgw-ab-e3", K[0])]))
    t = target(path, reload_pid_file=str(tmp_path / "none.pid"),
               hook=["sh", "-c", f"env | grep QKDGW_ > {out}"])
    assert asyncio.run(guard.reload(t))  # no pid file: not running, nothing to signal
    env = out.read_text()
    assert "QKDGW_EVENT=expire" in env
    assert "QKDGW_PSK_IDENTITY=qkdgw-ab-e3" in env
    assert K[0].hex() not in env
    (tmp_path / "none.pid").write_text("-1")
    assert not asyncio.run(guard.reload(t))  # a problem: told again on the next pass


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    """A site configuration whose tls_psk sink reloads a process that counts SIGHUPs."""
    init_demo(tmp_path)
    config = tmp_path / "site-b.yaml"
    service = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\n"
         "signal.signal(signal.SIGHUP, lambda *a: print('hup', flush=True))\n"
         "print('up', flush=True)\nwhile True: time.sleep(1)"], stdout=subprocess.PIPE)
    assert service.stdout is not None
    assert service.stdout.readline() == b"up\n"
    (tmp_path / "svc.pid").write_text(f"{service.pid}\n")
    data = yaml.safe_load(config.read_text())
    data["links"][0]["sinks"] = [{"type": "tls_psk", "path": "b.psk", "role": "server",
                                  "reload_pid_file": "svc.pid"}]
    config.write_text(yaml.safe_dump(data))
    yield config, tmp_path / "b.psk", service
    service.kill()
    service.wait()


def hups(service: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGHUPs the service reports within TIMEOUT (stops at the first)."""
    assert service.stdout is not None
    if not select.select([service.stdout], [], [], timeout)[0]:
        return 0
    assert service.stdout.readline() == b"hup\n"
    return 1


def qkdgw(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("qkdgw")), *args]


def test_the_guard_ends_identities_at_their_deadlines_with_no_gateway(
        site: tuple[Path, Path, subprocess.Popen[bytes]]) -> None:
    config, path, service = site
    proc = subprocess.Popen(qkdgw("tls-guard", "-c", str(config)), stderr=subprocess.PIPE)
    try:
        while not expiry.guarded(path):  # up (the file not there yet: the placeholder)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        with expiry.locked(path):  # as the sink writes
            now = time.time()
            expiry.write(path, {"qkdgw-ab-e2": now + 4, "qkdgw-ab-e1": now + 1})
            path.write_bytes(pskfile.dumps([("qkdgw-ab-e2", K[0]), ("qkdgw-ab-e1", K[1])]))
        assert hups(service, 30) == 1  # e1 removed, service told
        assert time.time() >= now + 1
        assert identities(path) == ["qkdgw-ab-e2"]
        assert hups(service, 30) == 1  # e2 removed
        assert time.time() >= now + 4
        assert identities(path) == ["qkdgw-ab-blocked"]
        second = subprocess.run(qkdgw("tls-guard", "-c", str(config)), capture_output=True,
                                text=True, timeout=30, check=False)
        assert second.returncode == 1
        assert "another qkdgw tls-guard guards" in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    log = err.decode()
    assert "removed qkdgw-ab-e1" in log
    assert "removed qkdgw-ab-e2" in log
    assert K[0].hex() not in log
    assert K[1].hex() not in log


def test_once_cleans_before_the_service_starts_and_signals_nothing(
        site: tuple[Path, Path, subprocess.Popen[bytes]]) -> None:
    config, path, service = site
    path.write_bytes(pskfile.dumps([("qkdgw-ab-e2", K[0]), ("qkdgw-ab-e1", K[1])]))
    expiry.write(path, {"qkdgw-ab-e2": time.time() + 60})
    done = subprocess.run(qkdgw("tls-guard", "--once", "-c", str(config)),
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert identities(path) == ["qkdgw-ab-e2"]
    assert hups(service, 0.5) == 0
    data = yaml.safe_load(config.read_text())
    data["links"][0]["sinks"] = [{"type": "file", "path": "b.psk"}]
    config.write_text(yaml.safe_dump(data))
    done = subprocess.run(qkdgw("tls-guard", "--once", "-c", str(config)),
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert "no tls_psk sink: nothing to guard" in done.stderr

"""The tls_psk sink and its file, and the Python helper's refusal on old Pythons; no network.

What stunnel and Python 3.13 do with the files is tested in test_tls_rotation.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from common.config import HostPort
from common.sink import (
    EpochMaterial,
    EpochRef,
    ProvidedKey,
    RekeyCause,
    Role,
    SinkContext,
    SinkError,
)
from gateway.core.policy import Policy
from kdf.schedule import EpochKeys, Purpose
from tests.helpers import lifetimes
from tls import expiry, pskfile
from tls.sink import TlsPskSink, TlsPskSinkConfig


class Events:
    def rekey_needed(self, link: str, cause: RekeyCause, detail: str) -> None:
        raise AssertionError("a TLS PSK file has no limits")

    def key_provided(self, link: str, key: ProvidedKey) -> None:
        raise AssertionError("this sink hands out no key")


def build(tmp_path: Path, **kw: Any) -> TlsPskSink:
    config = TlsPskSinkConfig.model_validate({"type": "tls_psk", "path": str(tmp_path / "p"),
                                              "role": "server", **kw})
    return config.build(SinkContext("ab", lifetimes(), Events(), HostPort(host="h", port=1),
                                    HostPort(host="h", port=2)))


def material(epoch: int) -> EpochMaterial:
    return EpochMaterial("ab", epoch, Role.INITIATOR, "s", ("k",), epoch, epoch,
                         EpochKeys(epoch, os.urandom(48)))


def ref(epoch: int) -> EpochRef:
    return EpochRef("ab", epoch, epoch, epoch)


def read(sink: TlsPskSink) -> list[tuple[str, bytes]]:
    return pskfile.loads(sink.config.path.read_bytes())


def test_file_round_trip_and_errors_name_the_line() -> None:
    entries = [("qkdgw-ab-e2", b"\x01" * 32), ("qkdgw-ab-e1", b"\x02" * 32)]
    assert pskfile.loads(pskfile.dumps(entries)) == entries
    assert pskfile.loads(b"# comment\n\n" + pskfile.dumps(entries)) == entries
    with pytest.raises(pskfile.PskFileError, match="line 2: not IDENTITY:KEY"):
        pskfile.loads(b"a:" + b"00" * 16 + b"\nnonsense\n")
    with pytest.raises(pskfile.PskFileError, match=r"line 1 \(a\): the key is not hex"):
        pskfile.loads(b"a:zz\n")
    with pytest.raises(pskfile.PskFileError, match="key of 4 bytes, at least 16"):
        pskfile.loads(b"a:00000000\n")
    with pytest.raises(pskfile.PskFileError, match="cannot be written"):
        pskfile.dumps([("a:b", b"\0" * 32)])
    assert pskfile.epoch_of("qkdgw-ab-e17") == 17
    assert pskfile.epoch_of("other") is None


def test_server_accepts_live_epochs_client_uses_only_the_current(tmp_path: Path) -> None:
    async def go() -> None:
        server, client = build(tmp_path / "s"), build(tmp_path / "c", role="client")
        for sink in (server, client):
            await sink.start()
        m1, m2 = material(1), material(2)
        for sink in (server, client):
            await sink.install_inbound(m1)
            await sink.activate_outbound(m1)
            await sink.install_inbound(m2)
        assert [i for i, _ in read(server)] == ["qkdgw-ab-e1", "qkdgw-ab-e2"]
        assert read(client) == [("qkdgw-ab-e1", m1.key(Purpose.TLS_PSK))]  # not e2 yet
        for sink in (server, client):
            await sink.activate_outbound(m2)
        assert [i for i, _ in read(server)] == ["qkdgw-ab-e2", "qkdgw-ab-e1"]
        assert read(client) == [("qkdgw-ab-e2", m2.key(Purpose.TLS_PSK))]
        await server.retire_inbound(ref(1))
        assert read(server) == [("qkdgw-ab-e2", m2.key(Purpose.TLS_PSK))]
        assert stat.S_IMODE(server.config.path.stat().st_mode) == 0o600

    asyncio.run(go())


def test_block_and_first_start_leave_a_placeholder_nobody_can_use(tmp_path: Path) -> None:
    async def go() -> None:
        sink = build(tmp_path)
        await sink.start()
        first = read(sink)
        assert [i for i, _ in first] == ["qkdgw-ab-blocked"]
        m = material(3)
        await sink.install_inbound(m)
        await sink.activate_outbound(m)
        await sink.block("ab", "test")
        blocked = read(sink)
        assert [i for i, _ in blocked] == ["qkdgw-ab-blocked"]
        assert blocked[0][1] not in (first[0][1], m.key(Purpose.TLS_PSK))  # random each time

    asyncio.run(go())


def test_a_restarted_gateway_adopts_the_file(tmp_path: Path) -> None:
    async def go() -> None:
        sink = build(tmp_path)
        await sink.start()
        m4, m5 = material(4), material(5)
        for m in (m4, m5):
            await sink.install_inbound(m)
        await sink.activate_outbound(m5)
        again = build(tmp_path)
        await again.start()
        assert again.current == 5
        assert set(again.keys) == {4, 5}
        await again.retire_inbound(ref(4))
        assert [i for i, _ in read(again)] == ["qkdgw-ab-e5"]

    asyncio.run(go())


def test_each_identity_has_a_deadline_beside_the_file_and_never_outlives_it(
        tmp_path: Path) -> None:
    async def go() -> None:
        sink = build(tmp_path)
        await sink.start()
        assert expiry.read(sink.config.path) == {}  # the placeholder has none
        before = time.time()
        m1, m2 = material(1), material(2)
        await sink.install_inbound(m1)
        await sink.activate_outbound(m1)
        await sink.install_inbound(m2)
        deadlines = expiry.read(sink.config.path)
        assert set(deadlines) == {"qkdgw-ab-e1", "qkdgw-ab-e2"}
        # From when the gateway first saw the epoch: activating does not move it.
        assert before + Policy().hard_lifetime <= deadlines["qkdgw-ab-e1"] \
            <= time.time() + Policy().hard_lifetime
        sidecar = expiry.beside(sink.config.path, expiry.EXPIRY)
        assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600
        assert m1.key(Purpose.TLS_PSK).hex() not in sidecar.read_text()
        sink.deadlines[1] = time.time() - 1  # e1's hard lifetime is over
        await sink.activate_outbound(m2)
        assert [i for i, _ in read(sink)] == ["qkdgw-ab-e2"]
        assert list(expiry.read(sink.config.path)) == ["qkdgw-ab-e2"]
        sink.deadlines[2] = time.time() - 1
        await sink.install_inbound(material(3))  # e3 not yet active: the server lists it
        assert [i for i, _ in read(sink)] == ["qkdgw-ab-e3"]

    asyncio.run(go())


def test_a_restart_adopts_only_identities_before_their_deadline(tmp_path: Path) -> None:
    path = tmp_path / "p"
    k = [os.urandom(32) for _ in range(4)]
    path.write_bytes(pskfile.dumps([("qkdgw-ab-e4", k[0]), ("qkdgw-ab-e3", k[1]),
                                    ("qkdgw-ab-e2", k[2]), ("qkdgw-ab-e1", k[3])]))
    now = time.time()
    expiry.write(path, {"qkdgw-ab-e4": now + 60, "qkdgw-ab-e3": now - 1,
                        "qkdgw-ab-e1": now + 60})  # e2: none, so none left

    async def go() -> TlsPskSink:
        sink = build(tmp_path)
        await sink.start()
        return sink

    sink = asyncio.run(go())
    assert sink.current == 4
    assert set(sink.keys) == {1, 4}
    assert sink.deadlines == {4: now + 60, 1: now + 60}  # the old deadlines, not new ones
    assert read(sink) == [("qkdgw-ab-e4", k[0]), ("qkdgw-ab-e1", k[3])]
    expiry.write(path, {"qkdgw-ab-e4": now - 1, "qkdgw-ab-e1": now - 1})
    sink = asyncio.run(go())
    assert sink.keys == {}
    assert [i for i, _ in read(sink)] == ["qkdgw-ab-blocked"]
    (tmp_path / "p.expiry").write_text("[1, 2]")  # not ours: adopt nothing
    path.write_bytes(pskfile.dumps([("qkdgw-ab-e4", k[0])]))
    sink = asyncio.run(go())
    assert sink.keys == {}
    assert [i for i, _ in read(sink)] == ["qkdgw-ab-blocked"]


def test_on_stop_block_leaves_the_placeholder_keep_leaves_the_file(tmp_path: Path) -> None:
    async def go(on_stop: str) -> list[tuple[str, bytes]]:
        sink = build(tmp_path / on_stop, on_stop=on_stop)
        await sink.start()
        m = material(1)
        await sink.install_inbound(m)
        await sink.activate_outbound(m)
        await sink.close()
        return read(sink)

    assert [i for i, _ in asyncio.run(go("block"))] == ["qkdgw-ab-blocked"]
    assert expiry.read(tmp_path / "block" / "p") == {}
    assert [i for i, _ in asyncio.run(go("keep"))] == ["qkdgw-ab-e1"]
    assert list(expiry.read(tmp_path / "keep" / "p")) == ["qkdgw-ab-e1"]
    with pytest.raises(ValidationError, match="on_stop"):
        TlsPskSinkConfig.model_validate({"type": "tls_psk", "path": "/x", "role": "server",
                                         "on_stop": "remove"})


def test_warns_once_while_no_guard_holds_the_file(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        sink = build(tmp_path)
        await sink.start()  # the placeholder needs no guard
        assert "tls-guard" not in caplog.text
        for epoch in (1, 2):
            await sink.install_inbound(material(epoch))
        assert caplog.text.count("no `qkdgw tls-guard` holds") == 1
        fd = expiry.hold_guard(sink.config.path)  # as a running guard does
        assert fd is not None
        try:
            assert expiry.hold_guard(sink.config.path) is None  # one guard per file
            await sink.install_inbound(material(3))
            assert "tls-guard now guards" in caplog.text
        finally:
            os.close(fd)
        await sink.install_inbound(material(4))
        assert caplog.text.count("no `qkdgw tls-guard` holds") == 2  # gone again: said again

    with caplog.at_level(logging.INFO, logger="tls.sink"):
        asyncio.run(go())


def test_reload_signals_the_pid_file_and_tolerates_a_stopped_service(tmp_path: Path) -> None:
    async def go() -> None:
        proc = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                                 "signal.signal(signal.SIGHUP, lambda *a: sys.exit(42))\n"
                                 "print('up', flush=True); time.sleep(30)"],
                                stdout=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        pid_file = tmp_path / "svc.pid"
        pid_file.write_text(f"{proc.pid}\n")
        sink = build(tmp_path, reload_pid_file=str(pid_file))
        await sink.start()
        assert proc.wait(timeout=10) == 42  # it got SIGHUP
        pid_file.write_text(f"{proc.pid}\n")
        await sink.install_inbound(material(1))  # not running: it reads the file at start
        pid_file.unlink()
        await sink.install_inbound(material(2))
        assert [i for i, _ in read(sink)] == ["qkdgw-ab-e2", "qkdgw-ab-e1"]
        # kill(0) or kill(-1) would signal a process group, or everything; no pid is that big
        for epoch, garbage in enumerate(("garbage", "0", "-1", "9" * 40, "1" * 5000), 3):
            pid_file.write_text(garbage)
            with pytest.raises(SinkError, match="does not hold a process id"):
                await sink.install_inbound(material(epoch))

    asyncio.run(go())


def test_hook_gets_the_identity_never_the_key(tmp_path: Path) -> None:
    async def go() -> None:
        out = tmp_path / "env"
        sink = build(tmp_path, role="client", hook=["sh", "-c", f"env | grep QKDGW_ > {out}"])
        await sink.start()
        m = material(6)
        await sink.install_inbound(m)
        await sink.activate_outbound(m)
        env = out.read_text()
        assert "QKDGW_PSK_IDENTITY=qkdgw-ab-e6" in env
        assert "QKDGW_EVENT=activate" in env
        assert m.key(Purpose.TLS_PSK).hex() not in env

    asyncio.run(go())


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="role"):
        TlsPskSinkConfig.model_validate({"type": "tls_psk", "path": "/x"})
    with pytest.raises(ValidationError, match="hook"):
        TlsPskSinkConfig.model_validate({"type": "tls_psk", "path": "/x", "role": "server",
                                         "hook": []})


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="this Python has PSK callbacks")
def test_python_helper_says_what_is_missing_before_3_13(tmp_path: Path) -> None:
    from tls.pyssl import PskStore, client_context, server_context

    for make in (client_context, server_context):
        with pytest.raises(RuntimeError, match=r"need Python 3\.13 or later .* this is Python"):
            make(PskStore(tmp_path / "p"))


def test_the_documented_sample_sinks_are_valid() -> None:
    import yaml

    sample = Path(__file__).parents[2] / "docs/examples/stunnel/site-sinks.yaml"
    docs = list(yaml.safe_load_all(sample.read_text()))
    roles = [TlsPskSinkConfig.model_validate(d["sinks"][0]).role for d in docs]
    assert roles == ["server", "client"]


@pytest.mark.parametrize("content", ['{"qkdgw-ab-e1": 1e999}', '{"qkdgw-ab-e1": 1%s}' % ("0" * 400),
                                     "[" * 100_000, '{"qkdgw-ab-e1": NaN}',
                                     '{"qkdgw-ab-e1": true}', '{"qkdgw-ab-e1": -5}'])
def test_a_corrupt_expiry_file_is_refused_not_a_crash(tmp_path: Path, content: str) -> None:
    """Every number from a file is bounded where it is parsed; the sink and the guard then
    take every identity as expired (fail closed)."""
    from tls import expiry

    path = tmp_path / "ab.psk"
    expiry.beside(path, expiry.EXPIRY).write_text(content)
    with pytest.raises(expiry.ExpiryError, match=r"ab\.psk\.expiry"):
        expiry.read(path)

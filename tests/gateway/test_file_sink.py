"""The `file` sink: atomic 0600 writes, the hook's environment, fail-closed blocking."""

from __future__ import annotations

import ast
import asyncio
import base64
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from common.config import HostPort
from common.sink import EpochMaterial, ProvidedKey, RekeyCause, Role, SinkContext, SinkError
from kdf import Purpose
from kdf.schedule import EpochKeys
from tests.helpers import lifetimes
from tls.file import FileSinkConfig

SECRET = bytes(range(48))


class NoEvents:
    def rekey_needed(self, link: str, cause: RekeyCause, detail: str) -> None:
        raise AssertionError("a file sink has no limits to report")

    def key_provided(self, link: str, key: ProvidedKey) -> None:
        raise AssertionError("this sink hands out no key")


def context() -> SinkContext:
    return SinkContext("ab", lifetimes(), NoEvents(), HostPort("127.0.0.1", 1),
                       HostPort("127.0.0.1", 2))


def material(epoch: int = 3) -> EpochMaterial:
    return EpochMaterial("ab", epoch, Role.INITIATOR, "qkd+ML-KEM-768+X25519/CatKDF-SHA-384",
                         ("k",), 0x1000, 0x2000, EpochKeys(epoch, SECRET))


def sink(tmp_path: Path, **kw: object) -> FileSinkConfig:
    return FileSinkConfig.model_validate({"type": "file", "path": str(tmp_path / "k.psk"), **kw})


DECODE: dict[str, Callable[[bytes], bytes]] = {
    "hex": lambda b: bytes.fromhex(b.decode()), "raw": lambda b: b, "base64": base64.b64decode}


@pytest.mark.parametrize("fmt", sorted(DECODE))
def test_activate_writes_the_key_0600(tmp_path: Path, fmt: str) -> None:
    config = sink(tmp_path, format=fmt, purpose="ike_ppk")
    asyncio.run(config.build(context()).activate_outbound(material()))
    assert DECODE[fmt](config.path.read_bytes()) == material().key(Purpose.IKE_PPK)
    assert os.stat(config.path).st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.psk"]  # no temporary files left


def test_hook_gets_ids_and_fingerprint_never_the_key(tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    script = f"import os; open({str(out)!r},'w').write(repr(dict(os.environ)))"
    config = sink(tmp_path, hook=[sys.executable, "-c", script])
    m = material()
    asyncio.run(config.build(context()).activate_outbound(m))
    env = ast.literal_eval(out.read_text())
    assert env["QKDGW_EVENT"] == "activate"
    assert env["QKDGW_EPOCH"] == "3"
    assert env["QKDGW_FINGERPRINT"] == m.fingerprint
    assert env["QKDGW_KEY_FILE"] == str(config.path)
    key = m.key(Purpose.TLS_PSK)
    assert key.hex() not in out.read_text()
    assert SECRET.hex() not in out.read_text()


def test_block_removes_the_key_and_tells_the_hook(tmp_path: Path) -> None:
    out = tmp_path / "events"
    config = sink(tmp_path, hook=["sh", "-c", f'echo "$QKDGW_EVENT" >> {out}'])
    s = config.build(context())
    asyncio.run(s.activate_outbound(material()))
    asyncio.run(s.block("ab", "hard lifetime"))
    assert not config.path.exists()
    assert out.read_text().split() == ["activate", "block"]


def test_failing_or_hanging_hook_is_a_sink_error(tmp_path: Path) -> None:
    with pytest.raises(SinkError, match="exited with 3: nope"):
        asyncio.run(sink(tmp_path, hook=["sh", "-c", "echo nope; exit 3"]).build(context())
                    .activate_outbound(material()))
    with pytest.raises(SinkError, match=r"ran past 0\.2 s"):
        asyncio.run(sink(tmp_path, hook=["sleep", "5"], hook_timeout=0.2).build(context())
                    .activate_outbound(material()))
    with pytest.raises(SinkError, match="cannot run"):
        asyncio.run(sink(tmp_path, hook=["/nonexistent/hook"]).build(context())
                    .activate_outbound(material()))


def test_unwritable_path_is_a_sink_error(tmp_path: Path) -> None:
    blocker = tmp_path / "dir"
    blocker.write_text("a file where a directory should be")
    config = FileSinkConfig.model_validate({"type": "file", "path": str(blocker / "k.psk")})
    with pytest.raises(SinkError, match="cannot write"):
        asyncio.run(config.build(context()).activate_outbound(material()))

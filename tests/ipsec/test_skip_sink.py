"""The `skip` sink (ipsec/skip/sink.py): its configuration checks, and what each sink call
does to the Key Provider routers see, over the real TLS-PSK server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from common.config import ConfigError, HostPort
from common.psktls import ClientContext
from common.sink import (
    EpochMaterial,
    EpochRef,
    KeyLifetimes,
    ProvidedKey,
    RekeyCause,
    Role,
    SinkContext,
    SinkError,
)
from common.skip_client import SkipClient, SkipClientError
from gateway.initdemo import init_demo
from gateway.site import SiteConfig
from ipsec.skip.sink import SkipSink, SkipSinkConfig
from kdf.schedule import EpochKeys
from tests.helpers import free_base_port

PSK = bytes(range(32))


class Events:
    def __init__(self, *, recordable: bool = True) -> None:
        self.provided: list[tuple[str, ProvidedKey]] = []
        self.recordable = recordable

    def rekey_needed(self, link: str, cause: RekeyCause, detail: str) -> None:
        raise AssertionError("a skip sink never asks for a rekey")

    def key_provided(self, link: str, key: ProvidedKey) -> None:
        if not self.recordable:
            raise SinkError("the audit trail cannot record it")
        self.provided.append((link, key))


def config(tmp_path: Path, port: int, **fields: Any) -> SkipSinkConfig:
    psk = tmp_path / "skip.psk"
    if not psk.exists():
        psk.write_text(f"router-a:{PSK.hex()}\n")
        psk.chmod(0o600)
    return SkipSinkConfig.model_validate({
        "type": "skip", "listen": f"127.0.0.1:{port}", "local_system_id": "kp-a",
        "remote_system_id": "kp-b", "psk_file": str(psk), **fields})


def sink(cfg: SkipSinkConfig, link: str, events: Events) -> SkipSink:
    return cfg.build(SinkContext(link, KeyLifetimes(60, 5), events,
                                 HostPort("127.0.0.1", 1), HostPort("127.0.0.1", 2)))


def material(link: str, epoch: int) -> EpochMaterial:
    return EpochMaterial(link, epoch, Role.INITIATOR, "suite", (), 1, 2,
                         EpochKeys(epoch, bytes([epoch]) * 48))


def test_sinks_of_one_address_must_agree(tmp_path: Path) -> None:
    a = config(tmp_path, 9000)
    SkipSinkConfig.check_together([("ab", a), ("ac", a.model_copy(
        update={"remote_system_id": "kp-c"}))])
    with pytest.raises(ValueError, match="different local_system_ids"):
        SkipSinkConfig.check_together([("ab", a), ("ac", a.model_copy(
            update={"remote_system_id": "kp-c", "local_system_id": "kp-x"}))])
    with pytest.raises(ValueError, match="links ab and ac both name remote_system_id kp-b"):
        SkipSinkConfig.check_together([("ab", a), ("ac", a)])
    with pytest.raises(ValueError, match="own local_system_id"):
        SkipSinkConfig.check_together([("ab", a.model_copy(
            update={"remote_system_id": "kp-a"}))])
    SkipSinkConfig.check_together([("ab", a), ("ac", a.model_copy(
        update={"listen": HostPort("127.0.0.1", 9001), "local_system_id": "kp-x"}))])


@pytest.mark.parametrize(("field", "value"), [("local_system_id", "kp a"),
                                              ("remote_system_id", ""),
                                              ("listen", "nowhere")])
def test_a_bad_field_is_named(tmp_path: Path, field: str, value: str) -> None:
    with pytest.raises(ValidationError, match=field):
        config(tmp_path, 9000, **{field: value})


def test_the_sink_calls_drive_what_routers_get(tmp_path: Path) -> None:
    port = free_base_port(1)
    events = Events()

    async def go() -> None:
        ab = sink(config(tmp_path, port), "ab", events)
        ac = sink(config(tmp_path, port, remote_system_id="kp-c"), "ac", events)
        await ab.start()
        await ac.start()  # (the same server)
        router = SkipClient("127.0.0.1", port, ClientContext("router-a", PSK))
        assert (await router.new_key("kp-b"))[0] == 500  # no epoch yet
        await ab.install_inbound(material("ab", 1))
        assert (await router.new_key("kp-b"))[0] == 500  # held, not switched to
        await ab.activate_outbound(material("ab", 1))
        status, first = await router.new_key("kp-b")
        assert status == 200
        assert first["keyId"].startswith(f"{1:016x}")
        assert (await router.new_key("kp-c"))[0] == 500  # link ac has no key
        await ab.install_inbound(material("ab", 2))
        await ab.activate_outbound(material("ab", 2))
        await ab.retire_outbound(EpochRef("ab", 1, 1, 2))
        assert (await router.new_key("kp-b"))[1]["keyId"].startswith(f"{2:016x}")
        await ab.retire_inbound(EpochRef("ab", 1, 1, 2))
        await ab.block("ab", "hard lifetime")
        assert (await router.new_key("kp-b"))[0] == 500
        await ab.close()
        assert (await router.capabilities())[1]["remoteSystemID"] == ["kp-c"]
        await ac.remove()
        with pytest.raises(SkipClientError):  # the last sink gone, the server with it
            await router.capabilities()
        with pytest.raises(SinkError, match="not started"):
            await ab.activate_outbound(material("ab", 3))
    asyncio.run(go())
    assert [(link, k.epoch, k.origin, k.client) for link, k in events.provided] == [
        ("ab", 1, True, "router-a"), ("ab", 2, True, "router-a")]


def test_a_sink_that_cannot_start_says_why(tmp_path: Path) -> None:
    port = free_base_port(1)
    cfg = config(tmp_path, port)
    cfg.psk_file.chmod(0o644)

    async def go() -> None:
        with pytest.raises(SinkError, match="chmod 600"):
            await sink(cfg, "ab", Events()).start()
        cfg.psk_file.chmod(0o600)
        first = sink(cfg, "ab", Events())
        await first.start()
        try:
            with pytest.raises(SinkError, match="is Key Provider kp-a, not kp-x"):
                await sink(config(tmp_path, port, local_system_id="kp-x",
                                  remote_system_id="kp-c"), "ac", Events()).start()
        finally:
            await first.close()
    asyncio.run(go())


def test_check_config_names_the_clash(tmp_path: Path) -> None:
    """Through the site configuration: two links on one Key Provider naming one remote."""
    layout = init_demo(tmp_path / "demo", skip=True)
    text = layout.site_config("a").read_text()
    text += text[text.index("  - name: ab"):].replace("name: ab", "name: ac", 1).replace(
        "state-a/ab.psk", "state-a/ac.psk")
    with pytest.raises(ConfigError, match="links ab and ac both name remote_system_id kp-b"):
        SiteConfig.load(layout.site_config("a"), text.encode())


def test_a_key_that_cannot_be_recorded_is_not_handed_out(tmp_path: Path) -> None:
    """The gateway records each key before it goes (its audit trail); when it cannot, the
    router gets a 500 and no key."""
    port = free_base_port(1)

    async def go() -> tuple[int, dict[str, Any]]:
        ab = sink(config(tmp_path, port), "ab", Events(recordable=False))
        await ab.start()
        try:
            await ab.activate_outbound(material("ab", 1))
            router = SkipClient("127.0.0.1", port, ClientContext("router-a", PSK))
            return await router.new_key("kp-b")
        finally:
            await ab.close()
    status, answer = asyncio.run(go())
    assert status == 500
    assert "could not be recorded: the audit trail cannot record it" in answer["error"]
    assert "key" not in answer

"""Both daemons in this process (the KMS simulator as a subprocess), to look inside:
every key any part of the system handled is searched for in every output.

    Daemon A ──WebSocket/mTLS── Daemon B       (this test's event loop)
       │ mTLS                      │ mTLS
       KME-A ═══ qkdgw kms-sim ═══ KME-B       (subprocess)
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from typing import Any

import aiohttp

from common.sink import EpochMaterial, EpochRef, RekeyCause
from gateway.daemon import Daemon
from gateway.initdemo import DemoLayout
from gateway.logs import JsonFormatter
from gateway.site import SiteConfig
from kdf import Purpose
from tests.helpers import SimProcess


class RecordingSink:
    """A data plane that keeps every key it is given, so the test can look for them."""

    name = "recording"

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.active: int | None = None

    async def start(self) -> None:
        """Nothing to take over: the keys are only recorded."""

    async def install_inbound(self, m: EpochMaterial) -> None:
        self.keys += [m.keys.epoch_secret, *(m.key(p) for p in Purpose)]

    async def activate_outbound(self, m: EpochMaterial) -> None:
        self.active = m.epoch

    async def retire_inbound(self, ref: EpochRef) -> None:
        pass

    async def retire_outbound(self, ref: EpochRef) -> None:
        pass

    async def block(self, link: str, reason: str) -> None:
        self.active = None

    async def close(self) -> None:
        pass

    async def remove(self) -> None:
        pass


def _spy_on_kme(daemon: Daemon, seen: list[bytes]) -> None:
    """Record the QKD keys the (real) KME client returns."""
    client = daemon.kme
    real_enc, real_dec = client.enc_keys, client.dec_keys

    async def enc(*a: Any, **kw: Any) -> Any:
        batch = await real_enc(*a, **kw)
        seen.extend(k.material for k in batch.keys)
        return batch

    async def dec(*a: Any, **kw: Any) -> Any:
        batch = await real_dec(*a, **kw)
        seen.extend(k.material for k in batch.keys)
        return batch

    client.enc_keys, client.dec_keys = enc, dec  # type: ignore[method-assign]


def _forms(key: bytes) -> list[str]:
    return [key.hex(), key.hex().upper(), base64.b64encode(key).decode(), repr(key)[2:-1],
            key[:12].hex()]


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.text()


def test_no_key_material_in_any_output_and_soft_limits(
        setup: tuple[DemoLayout, SimProcess]) -> None:
    layout, _ = setup
    text_log, json_log = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(text_log), logging.StreamHandler(json_log)]
    handlers[0].setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    handlers[1].setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    for h in handlers:
        root.addHandler(h)
    qkd_keys: list[bytes] = []
    sinks = {"a": RecordingSink(), "b": RecordingSink()}
    outputs: list[str] = []

    async def scenario() -> None:
        daemons = {s: Daemon(SiteConfig.load(layout.site_config(s))) for s in ("a", "b")}
        for site, d in daemons.items():
            _spy_on_kme(d, qkd_keys)
            await d.start()
            d.runners["ab"].sinks.append(sinks[site])  # before the link task first runs
        a, b = daemons["a"], daemons["b"]
        try:
            await asyncio.sleep(3)
            # soft limits, reported by a sink on either side, rekey at once
            ma, mb = a.runners["ab"].machine, b.runners["ab"].machine
            for d in (a, b):
                while not (ma.state.value == mb.state.value == "idle"
                           and ma.current_epoch == mb.current_epoch):
                    await asyncio.sleep(0.001)  # no exchange in flight (it would satisfy
                epoch = ma.current_epoch  # the soft limit by itself)
                d.rekey_needed("ab", RekeyCause.SOFT_LIMIT, "byte limit of the inbound SA")
                t0 = time.monotonic()
                while ma.current_epoch == epoch:
                    assert time.monotonic() - t0 < 0.3, "no rekey after the soft limit"
                    await asyncio.sleep(0.005)
            await asyncio.sleep(0.5)
            for site, d in daemons.items():
                outputs.append(d.status().model_dump_json())
                outputs.append(await _get(f"http://127.0.0.1:{layout.metrics_port(site)}"
                                          "/metrics"))
        finally:
            for d in daemons.values():
                await d.stop()

    try:
        asyncio.run(scenario())
    finally:
        for h in handlers:
            root.removeHandler(h)
        root.setLevel(old_level)

    for site in ("a", "b"):
        state = layout.state_dir(site)
        outputs += [p.read_text() for p in state.rglob("*") if p.is_file()
                    and p.suffix in (".jsonl", ".json")]
    outputs += [text_log.getvalue(), json_log.getvalue()]
    keys = qkd_keys + sinks["a"].keys + sinks["b"].keys
    assert len(qkd_keys) >= 10
    assert len(sinks["a"].keys) >= 50  # many epochs happened
    assert sinks["a"].active == sinks["b"].active
    everything = "\n".join(outputs)
    assert "rekeyed" in everything
    assert "soft-limit" in everything  # the outputs are real
    for key in keys:
        for form in _forms(key):
            assert form not in everything, "key material in an output"

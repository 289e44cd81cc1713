"""An independent ETSI GS QKD 014 client (PyPI `etsi-qkd-014-client`, requests-based)
against the simulator, over mutual TLS."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from gateway.initdemo import DemoLayout
from tests.helpers import SimProcess

etsi = pytest.importorskip("etsi_qkd_014_client", reason="pip install etsi-qkd-014-client")


def client(demo: DemoLayout, site: str, cn: str) -> Any:  # the library is untyped
    return etsi.QKD014Client(f"127.0.0.1:{demo.kme_port(site)}", str(demo.pki / f"{cn}.pem"),
                             str(demo.pki / f"{cn}.key"), str(demo.pki / "ca.pem"))


def test_status(demo: DemoLayout, sim: SimProcess) -> None:
    code, status = client(demo, "a", "sae-a").get_status("sae-b")
    assert code == 200
    assert (status.source_kme_id, status.target_kme_id) == ("kme-a", "kme-b")
    assert (status.master_sae_id, status.slave_sae_id) == ("sae-a", "sae-b")
    assert (status.key_size, status.max_key_per_request, status.max_sae_id_count) == (256, 128, 0)


@pytest.mark.parametrize(("number", "size"), [(None, None), (3, 512)])  # GET form, POST form
def test_keys_round_trip(demo: DemoLayout, sim: SimProcess, number: int | None,
                         size: int | None) -> None:
    code, container = client(demo, "a", "sae-a").get_key("sae-b", number=number, size=size)
    assert code == 200
    assert len(container.keys) == (number or 1)
    for k in container.keys:
        assert len(base64.b64decode(k.key)) * 8 == (size or 256)
    code, fetched = client(demo, "b", "sae-b").get_key_with_key_IDs(
        "sae-a", [k.key_id for k in container.keys])
    assert code == 200
    assert [(k.key_id, k.key) for k in fetched.keys] == \
        [(k.key_id, k.key) for k in container.keys]
    code, _ = client(demo, "b", "sae-b").get_key_with_key_IDs(
        "sae-a", [container.keys[0].key_id])
    assert code == 400


def test_unauthorised_sae(demo: DemoLayout, sim: SimProcess) -> None:
    code, _ = client(demo, "a", "sae-b").get_key("sae-b", number=1)
    assert code == 401


def test_our_keys_match_theirs(demo: DemoLayout, sim: SimProcess) -> None:
    """Keys fetched by the independent client as master, by ours as slave."""
    import asyncio

    from gateway.site import SiteConfig

    code, container = client(demo, "a", "sae-a").get_key("sae-b", number=2, size=256)
    assert code == 200

    async def fetch() -> list[tuple[str, bytes]]:
        async with SiteConfig.load(demo.site_config("b")).kms.client() as kme_b:
            batch = await kme_b.dec_keys("sae-a", [k.key_id for k in container.keys], size=256)
        return [(k.key_id, k.material) for k in batch.keys]

    assert asyncio.run(fetch()) == [(k.key_id, base64.b64decode(k.key)) for k in container.keys]

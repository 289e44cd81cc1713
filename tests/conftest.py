"""Fixtures: a two-site demo setup written by init-demo, and the KMS simulator serving it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import yaml
from hypothesis import HealthCheck, settings

from gateway import pki
from gateway.initdemo import DemoLayout, init_demo
from gateway.site import SiteConfig
from kms.client import KmeClient
from kms.config import KmsClientConfig
from tests.helpers import SimProcess, free_base_port, start_sim

# Property tests: "default" for every run (no deadline: CI machines stall), "soak" for long
# runs: HYPOTHESIS_PROFILE=soak ./bootstrap test tests/kms
settings.register_profile("default", deadline=None)
settings.register_profile("soak", deadline=None, max_examples=20_000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoLayout:
    """init-demo output, plus: a second SAE at KME-B (sae-b2) and a few extra certificates
    for negative tests (rogue CA, an SAE no KME serves)."""
    root = tmp_path_factory.mktemp("demo")
    layout = init_demo(root, base_port=free_base_port())
    ca = pki.load(layout.pki / "ca.pem", layout.pki / "ca.key")
    for cn in ("sae-b2", "sae-c"):
        pki.save(pki.issue(ca, cn, client=True), layout.pki / f"{cn}.pem", layout.pki / f"{cn}.key")
    rogue = pki.make_ca("rogue CA")
    pki.save(pki.issue(rogue, "sae-a", client=True), layout.pki / "rogue-sae-a.pem",
             layout.pki / "rogue-sae-a.key")
    pki.save(rogue, layout.pki / "rogue-ca.pem", layout.pki / "rogue-ca.key")
    config = yaml.safe_load(layout.kms_config.read_text())
    config["kmes"][1]["saes"].append("sae-b2")
    (root / "kms-test.yaml").write_text(yaml.safe_dump(config))
    return layout


@pytest.fixture(scope="session")
def sim_process(demo: DemoLayout) -> Iterator[SimProcess]:
    sim = start_sim(demo.root / "kms-test.yaml", demo.admin_port,
                    [demo.kme_port("a"), demo.kme_port("b")], demo.root / "kms-sim.log")
    yield sim
    code = sim.stop()
    log = sim.log.read_text()
    assert code == 0, f"kms-sim exited with {code}:\n{log}"
    assert "Traceback" not in log, log


@pytest.fixture
def sim(sim_process: SimProcess) -> SimProcess:
    """The simulator, reset to its configured state (full pools, no faults, zero counters)."""
    sim_process.reset()
    return sim_process


def client_as(demo: DemoLayout, site: str, cn: str, **kw: object) -> KmeClient:
    return KmeClient(f"https://127.0.0.1:{demo.kme_port(site)}", ca=demo.pki / "ca.pem",
                     cert=demo.pki / f"{cn}.pem", key=demo.pki / f"{cn}.key", **kw)  # type: ignore[arg-type]


@pytest.fixture
async def kme_a(demo: DemoLayout, sim: SimProcess) -> AsyncIterator[KmeClient]:
    """Site A's client, built from site-a.yaml as the gateway builds it."""
    kms = SiteConfig.load(demo.site_config("a")).kms
    assert isinstance(kms, KmsClientConfig)
    async with kms.client() as c:
        yield c


@pytest.fixture
async def kme_b(demo: DemoLayout, sim: SimProcess) -> AsyncIterator[KmeClient]:
    kms = SiteConfig.load(demo.site_config("b")).kms
    assert isinstance(kms, KmsClientConfig)
    async with kms.client() as c:
        yield c

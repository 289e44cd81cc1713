"""Fixtures for the gateway tests that run daemons in this process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.initdemo import DemoLayout, init_demo
from tests.helpers import SimProcess, free_base_port, start_sim

#: Short timers for in-process daemons: a rekey every half second, keys for ten.
INPROCESS_POLICY = {"interval": 0.5, "hard_lifetime": 10.0, "grace": 0.2}


@pytest.fixture
def setup(request: pytest.FixtureRequest, tmp_path: Path
          ) -> Iterator[tuple[DemoLayout, SimProcess]]:
    """init-demo's two sites with INPROCESS_POLICY (updated by the test's param, if any),
    and the KMS simulator serving them."""
    layout = init_demo(tmp_path, base_port=free_base_port(24))
    for site in ("a", "b"):
        path = layout.site_config(site)
        config = yaml.safe_load(path.read_text())
        config["policy"].update({**INPROCESS_POLICY, **getattr(request, "param", {})})
        config["kms_status_interval"] = 0.5
        path.write_text(yaml.safe_dump(config))
    sim = start_sim(layout.kms_config, layout.admin_port,
                    [layout.kme_port("a"), layout.kme_port("b")], tmp_path / "sim.log")
    yield layout, sim
    sim.stop()

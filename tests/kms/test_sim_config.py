"""Simulator configuration: errors name the file and the field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import ConfigError
from gateway.initdemo import DemoLayout
from kms.sim.config import SimConfig

#: Changes a loaded configuration in place (what it returns is ignored).
Edit = Callable[[dict[str, Any]], object]


def write(tmp_path: Path, demo: DemoLayout, edit: Edit) -> Path:
    config = yaml.safe_load(demo.kms_config.read_text())
    edit(config)
    path = tmp_path / "kms.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_demo_config_loads_with_paths_resolved(demo: DemoLayout) -> None:
    config = SimConfig.load(demo.kms_config)
    assert config.ca == demo.pki / "ca.pem"
    assert [k.id for k in config.kmes] == ["kme-a", "kme-b"]
    assert config.links[0].kmes == ("kme-a", "kme-b")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["links"][0].update(key_size=260), "links.0: key_size is in bits"),
    (lambda c: c["links"][0].update(qber=0.2), "links.0.qber: Input should be less than 0.11"),
    (lambda c: c["links"][0].update(kmes=["kme-a", "kme-x"]), "no KME with id 'kme-x'"),
    (lambda c: c["links"][0].update(kmes=["kme-a", "kme-a"]), "a link joins two different"),
    (lambda c: c["links"][0].update(key_rate=-1), "links.0.key_rate"),
    (lambda c: c["links"][0].update(outages=[{"start": 0, "duration": 10, "every": 5}]),
     "every must be longer than duration"),
    (lambda c: c["links"][0].update(speed=3), "links.0.speed: Extra inputs are not permitted"),
    (lambda c: c["kmes"][1].update(listen=c["kmes"][0]["listen"]), "listen address used more"),
    (lambda c: c["kmes"][1].update(saes=["sae-a"]), "SAE used more than once: sae-a"),
    (lambda c: c["kmes"][0].update(listen="127.0.0.1"), "kmes.0.listen: '127.0.0.1' is not"),
    (lambda c: c["admin"].update(listen="0.0.0.0:9000"), "loopback only"),
    (lambda c: c.pop("ca"), "ca: Field required"),
    # numbers from the file are bounded where they are parsed (YAML has .inf and .nan)
    (lambda c: c["links"][0].update(key_rate=float("inf")), "links.0.key_rate"),
    (lambda c: c["links"][0].update(key_rate=1e13), "links.0.key_rate"),
    (lambda c: c["links"][0].update(qber=float("nan")), "links.0.qber"),
    (lambda c: c["links"][0].update(max_key_count=2**32), "links.0.max_key_count"),
    (lambda c: c["links"][0].update(max_key_size=2**21), "links.0.max_key_size"),
    (lambda c: c["links"][0].update(reserved_key_ttl=float("inf")), "links.0.reserved_key_ttl"),
    (lambda c: c["links"][0].update(outages=[{"start": float("nan"), "duration": 1}]),
     "links.0.outages.0.start"),
    (lambda c: c.update(request_timeout=0), "request_timeout"),
    (lambda c: c.update(request_timeout=float("inf")), "request_timeout"),
])
def test_errors_name_the_field(tmp_path: Path, demo: DemoLayout, edit: Edit,
                               message: str) -> None:
    path = write(tmp_path, demo, edit)
    with pytest.raises(ConfigError) as e:
        SimConfig.load(path)
    assert str(path) in str(e.value)
    assert message in str(e.value)


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("links: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        SimConfig.load(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        SimConfig.load(tmp_path / "missing.yaml")
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        SimConfig.load(bad)

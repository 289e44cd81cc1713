"""Site configuration: policy layering and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.config import SiteConfig
from gateway.core.policy import Mode
from gateway.initdemo import DemoLayout
from kms.configfile import ConfigError

XFRM = {"type": "xfrm", "local": "192.0.2.1", "remote": "198.51.100.1",
        "local_subnets": ["10.1.0.0/16"], "remote_subnets": ["10.2.0.0/16"]}


def edited(tmp_path: Path, demo: DemoLayout, edit: object) -> Path:
    config = yaml.safe_load(demo.site_config("a").read_text())
    edit(config)  # type: ignore[operator]
    path = demo.root / f"edited-{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_policy_layers_defaults_site_and_link(tmp_path: Path, demo: DemoLayout) -> None:
    def edit(c: dict) -> None:  # type: ignore[type-arg]
        c["policy"] = {"interval": 60, "mode": "pqc-fallback"}
        c["links"][0]["policy"] = {"interval": 5}

    site = SiteConfig.load(edited(tmp_path, demo, edit))
    p = site.link_policy(site.links[0])
    assert (p.interval, p.mode, p.grace) == (5, Mode.PQC_FALLBACK, 2.0)
    assert site.state_dir == demo.root / "state-a"
    assert site.audit_path == demo.root / "state-a" / "audit.jsonl"
    assert site.links[0].sinks[0].path == demo.root / "state-a" / "ab.psk"


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["policy"].update(mode="qkd-only"), "policy.mode: Input should be"),
    (lambda c: c["policy"].update(interval=-1), "policy.interval: Input should be greater"),
    (lambda c: c["policy"].update(hard_lifetime=10, interval=30),
     "link ab: policy: hard_lifetime must be longer than interval"),
    (lambda c: c["links"][0]["sinks"].append({"type": "xfrm"}),
     "links.0.sinks.1.xfrm.local: Field required"),
    (lambda c: c["links"][0]["sinks"].append({"type": "ipsec"}), "links.0.sinks.1"),
    (lambda c: c.update(links=[
        {**c["links"][0], "sinks": [{**XFRM, "reqid": 1000}]},
        {**c["links"][0], "name": "ac", "sinks": [{**XFRM, "reqid": 1100}]}]),
     "xfrm sinks of links ab and ac: reqid ranges overlap"),
    (lambda c: c["links"][0]["sinks"][0].update(format="pem"), "links.0.sinks.0.file.format"),
    (lambda c: c["links"][0].update(kem="Kyber512"), "links.0.kem"),
    (lambda c: c.update(links=[c["links"][0], c["links"][0]]), "link name used more than once"),
    (lambda c: c.pop("state_dir"), "state_dir: Field required"),
])
def test_errors_name_the_field(tmp_path: Path, demo: DemoLayout, edit: object,
                               message: str) -> None:
    with pytest.raises(ConfigError) as e:
        SiteConfig.load(edited(tmp_path, demo, edit))
    assert message in str(e.value), str(e.value)

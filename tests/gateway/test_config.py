"""Site configuration: policy layering and errors that name the field."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import annotated_types
import pytest
import yaml
from pydantic import BaseModel

from common.config import ConfigError
from gateway.core.policy import Mode
from gateway.initdemo import DemoLayout
from gateway.site import SiteConfig
from kms.sim.config import SimConfig
from tls.file import FileSinkConfig

#: Changes a loaded configuration in place (what it returns is ignored).
Edit = Callable[[dict[str, Any]], object]

XFRM = {"type": "xfrm", "local": "192.0.2.1", "remote": "198.51.100.1",
        "local_subnets": ["10.1.0.0/16"], "remote_subnets": ["10.2.0.0/16"]}


def strongswan(extra: dict[str, object]) -> dict[str, object]:
    return {"type": "strongswan", "connection": {
        "remote_addrs": ["198.51.100.1"], "local": {"auth": "pubkey", "id": "a"},
        "remote": {"auth": "pubkey", "id": "b"},
        "children": {"lan": {"local_ts": ["10.1.0.0/16"]}}, **extra}}


def edited(tmp_path: Path, demo: DemoLayout, edit: Edit) -> Path:
    config = yaml.safe_load(demo.site_config("a").read_text())
    edit(config)
    path = demo.root / f"edited-{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_pacing_defaults_and_settings(tmp_path: Path, demo: DemoLayout) -> None:
    site = SiteConfig.load(demo.site_config("a"))
    assert (site.pacing.exchanges, site.pacing.exchanges_per_peer,
            site.pacing.kms_requests) == (32, 16, 16)
    site = SiteConfig.load(edited(tmp_path, demo, lambda c: c.update(
        pacing={"exchanges": 4, "kms_requests": 2})))
    assert (site.pacing.exchanges, site.pacing.exchanges_per_peer,
            site.pacing.kms_requests) == (4, 16, 2)


def test_policy_layers_defaults_site_and_link(tmp_path: Path, demo: DemoLayout) -> None:
    def edit(c: dict[str, Any]) -> None:
        c["policy"] = {"interval": 60, "mode": "pqc-fallback"}
        c["links"][0]["policy"] = {"interval": 5}

    site = SiteConfig.load(edited(tmp_path, demo, edit))
    p = site.link_policy(site.links[0])
    assert (p.interval, p.mode, p.grace) == (5, Mode.PQC_FALLBACK, 2.0)
    assert site.state_dir == demo.root / "state-a"
    assert site.audit_path == demo.root / "state-a" / "audit.jsonl"
    sink = site.links[0].sinks[0]
    assert isinstance(sink, FileSinkConfig)
    assert sink.path == demo.root / "state-a" / "ab.psk"


@pytest.mark.parametrize(("site", "link", "expected"), [
    (None, None, True), (False, None, False), (None, False, False), (False, True, True)])
def test_prefetch_is_set_per_site_and_link(tmp_path: Path, demo: DemoLayout, site: bool | None,
                                           link: bool | None, expected: bool) -> None:
    def edit(c: dict[str, Any]) -> None:
        if site is not None:
            c["policy"]["prefetch"] = site
        if link is not None:
            c["links"][0]["policy"] = {"prefetch": link}

    config = SiteConfig.load(edited(tmp_path, demo, edit))
    assert config.link_policy(config.links[0]).prefetch is expected


@pytest.mark.parametrize(("edit", "message"), [
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
    (lambda c: c["policy"].update(hard_lifetime=float("inf")),
     "policy.hard_lifetime: Input should be a finite number"),
    (lambda c: c["policy"].update(reserve_keys=10**30), "policy.reserve_keys: Input should be"
     " less than or equal to"),
    (lambda c: c["kms"].update(read_timeout=float("nan")), "kms.read_timeout: Input should be"
     " a finite number"),
    (lambda c: c["kms"].update(protocol="kmip"), "kms: protocol must be etsi014"),
    (lambda c: c["kms"].update(protocol="skip"), "kms.psk_identity: Field required"),
    (lambda c: c["kms"].update(url="http://kme"), "kms.url: ETSI GS QKD 014 runs over HTTPS"),
    (lambda c: c["links"][0]["sinks"][0].update(hook=["true"], hook_timeout=float("inf")),
     "links.0.sinks.0.file.hook_timeout: Input should be a finite number"),
    (lambda c: c["links"][0]["sinks"].append({**XFRM, "soft_limits": {"bytes": 2**64}}),
     "links.0.sinks.1.xfrm.soft_limits.bytes: Input should be less than 1844674407370955161"),
    (lambda c: c["links"][0]["sinks"].append(strongswan(extra={"x" * 256: "1"})),
     "connection: a key longer than 255 bytes"),
    (lambda c: c["links"][0]["sinks"].append(strongswan(extra={"x": "1" * 65536})),
     "connection.x: a value longer than 65535 bytes"),
    (lambda c: c["links"][0]["sinks"].append(strongswan(extra={"x": ["1" * 65536]})),
     "connection.x: a value longer than 65535 bytes"),
    (lambda c: c["links"][0]["sinks"].append(strongswan(extra={"x": ["1" * 60_000] * 5})),
     "connection: 300"),
    (lambda c: c["links"][0]["sinks"].append(strongswan(
        extra={"x": {"y": {"z": {"a": {"b": {"c": {"d": "1"}}}}}}})),
     "connection.x.y.z.a: nested deeper than 4 sections"),
    (lambda c: c.update(pacing={"exchanges": 0}), "pacing.exchanges: Input should be greater"
     " than or equal to 1"),
    (lambda c: c.update(pacing={"kms_requests": 10**9}), "pacing.kms_requests: Input should be"
     " less than or equal to 100000"),
    (lambda c: c.update(pacing={"exchanges_per_peer": 2.5}), "pacing.exchanges_per_peer:"),
    (lambda c: c.update(pacing={"storm": 1}), "pacing.storm: Extra inputs are not permitted"),
])
def test_errors_name_the_field(tmp_path: Path, demo: DemoLayout, edit: Edit,
                               message: str) -> None:
    with pytest.raises(ConfigError) as e:
        SiteConfig.load(edited(tmp_path, demo, edit))
    assert message in str(e.value), str(e.value)


def _config_models(root: type[BaseModel]) -> set[type[BaseModel]]:
    """ROOT and every model its fields can hold, however nested (lists, unions, optionals)."""
    found: set[type[BaseModel]] = set()
    todo: list[object] = [root]
    while todo:
        t = todo.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            if t not in found:
                found.add(t)
                todo += [f.annotation for f in t.model_fields.values()]
        else:
            todo += typing.get_args(t)
    return found


CONFIG_MODELS = sorted(_config_models(SiteConfig) | _config_models(SimConfig),
                       key=lambda m: f"{m.__module__}.{m.__name__}")


def _unbounded_numbers(annotation: object, metadata: list[object]) -> bool:
    """Whether ANNOTATION (with its constraints METADATA) admits an int or float without an
    upper bound: directly, as a union member, or Annotated."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        inner = [m for f in extra for m in getattr(f, "metadata", [f])]
        return _unbounded_numbers(base, [*metadata, *inner])
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_unbounded_numbers(a, metadata) for a in typing.get_args(annotation))
    return annotation in (int, float) and not any(
        isinstance(m, annotated_types.Le | annotated_types.Lt) for m in metadata)


@pytest.mark.parametrize("model", CONFIG_MODELS, ids=lambda m: m.__name__)
def test_no_config_number_is_nan_infinite_or_unbounded(model: type[BaseModel]) -> None:
    """Every section refuses NaN and infinities (YAML's .nan, .inf), and every number has an
    upper bound: nothing the code, the kernel or a KME cannot hold."""
    assert model.model_config.get("allow_inf_nan") is False
    for name, field in model.model_fields.items():
        assert not _unbounded_numbers(field.annotation, field.metadata), \
            f"{model.__name__}.{name} has no upper bound"

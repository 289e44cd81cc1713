"""What a reload changes, decided without a daemon: gateway.reload.plan on two parsed site
configurations, and the rekey core taking a new policy (LinkMachine.reconfigure) between two
peers in the simulated world. The daemons applying it: tests/gateway/test_reload.py."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import yaml

from gateway.core.events import Record
from gateway.core.machine import State
from gateway.initdemo import DemoLayout
from gateway.reload import TLS_FILES, NotLive, Plan, plan
from gateway.site import SiteConfig
from tests.gateway.world import FAST, World

FILES = dict.fromkeys(TLS_FILES, "digest")


@pytest.fixture
def base(demo: DemoLayout) -> dict[str, Any]:
    """Site A of the demo with a second link `ac`."""
    data: dict[str, Any] = yaml.safe_load(demo.site_config("a").read_text())
    second = copy.deepcopy(data["links"][0])
    second["name"] = "ac"
    second["sinks"] = [{"type": "file", "path": "state-a/ac.psk"}]
    data["links"].append(second)
    return data


def _load(demo: DemoLayout, data: dict[str, Any], name: str) -> SiteConfig:
    path = demo.root / f"reload-{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return SiteConfig.load(path)


def _plan(demo: DemoLayout, old: dict[str, Any], new: dict[str, Any],
          new_files: dict[str, str] = FILES) -> Plan:
    return plan(_load(demo, old, "old"), _load(demo, new, "new"), old_files=FILES,
                new_files=new_files)


def test_the_same_file_changes_nothing(demo: DemoLayout, base: dict[str, Any]) -> None:
    assert _plan(demo, base, base) == Plan((), (), (), (), unchanged=2)


def test_links_added_removed_and_changed_are_told_apart(demo: DemoLayout,
                                                        base: dict[str, Any]) -> None:
    new = copy.deepcopy(base)
    added = copy.deepcopy(new["links"][1])
    added["name"] = "ad"
    added["sinks"] = []
    new["links"] = [new["links"][0], added]  # ac removed, ad added
    new["links"][0]["policy"] = {"interval": 10}
    p = _plan(demo, base, new)
    assert (p.added, p.removed, p.unchanged) == (("ad",), ("ac",), 0)
    (change,) = p.changed
    assert change.name == "ab"
    assert change.what == ("policy.interval",)
    assert change.policy
    assert not change.sinks
    assert not change.address


def test_site_defaults_reach_the_links_that_inherit_them(demo: DemoLayout,
                                                         base: dict[str, Any]) -> None:
    new = copy.deepcopy(base)
    new["policy"]["interval"] = 20  # ab keeps its own below: only ac changes
    new["links"][0]["policy"] = {"interval": base["policy"]["interval"]}
    new["kms_status_interval"] = 1
    p = _plan(demo, base, new)
    assert [c.name for c in p.changed] == ["ac"]
    assert p.site == ("kms_status_interval", "policy.interval")
    assert p.unchanged == 1


def test_sinks_are_rebuilt_when_what_they_are_built_from_changes(
        demo: DemoLayout, base: dict[str, Any]) -> None:
    new = copy.deepcopy(base)
    new["links"][0]["sinks"][0]["format"] = "base64"
    new["links"][1]["policy"] = {"hard_lifetime": 600}  # the sinks mirror the lifetime
    p = _plan(demo, base, new)
    by_name = {c.name: c for c in p.changed}
    assert by_name["ab"].what == ("sinks",)
    assert by_name["ab"].sinks
    assert by_name["ac"].what == ("policy.hard_lifetime",)
    assert by_name["ac"].sinks
    assert by_name["ac"].policy
    new = copy.deepcopy(base)
    new["links"][0]["peer"]["address"] = "127.0.0.1:1"
    (change,) = _plan(demo, base, new).changed
    assert change.address
    assert change.sinks
    assert not change.policy


def test_what_cannot_change_live_is_refused_and_each_change_named(
        demo: DemoLayout, base: dict[str, Any]) -> None:
    new = copy.deepcopy(base)
    new["state_dir"] = "elsewhere"
    new["peer_channel"]["listen"] = "127.0.0.1:1"
    new["kms"]["read_timeout"] = 3
    new["links"][0]["role"] = "responder"
    new["links"][1]["kem"] = "ML-KEM-1024"
    new["links"][1]["policy"] = {"interval": 10}  # live, but refused with the rest
    with pytest.raises(NotLive) as e:
        _plan(demo, base, new)
    text = str(e.value)
    for named in ("state_dir:", "peer_channel.listen:", "kms.read_timeout:",
                  "links.ab.role:", "links.ac.kem:", "nothing changed"):
        assert named in text, text
    assert "policy.interval" not in text


def test_a_certificate_replaced_under_the_same_name_is_refused(
        demo: DemoLayout, base: dict[str, Any]) -> None:
    with pytest.raises(NotLive, match=r"peer_channel\.cert: the file .* changed"):
        _plan(demo, base, base, new_files={**FILES, "peer_channel.cert": "another"})


# -- the core takes a new policy --------------------------------------------------------------


def _both(w: World, **changes: Any) -> list[Record]:
    """Give both sides POLICY changed by CHANGES, as a reload on both gateways does; the
    records it produced."""
    records: list[Record] = []
    for side in (w.i, w.r):
        side.policy = dataclasses.replace(side.policy, **changes)
        actions = side.machine.reconfigure(side.policy, w.now)
        records += [a for a in actions if isinstance(a, Record)]
        w.execute(side, actions)
    return records


def test_a_new_interval_keeps_the_key_and_applies_from_the_next_scheduling() -> None:
    w = World(seed=3)
    w.kms_status()
    w.run_for(15)
    assert w.converged()
    epoch, due = w.i.machine.current_epoch, w.i.machine.next_rekey_at
    assert due is not None
    assert _both(w, interval=30.0, jitter=0.0) == []
    assert (w.i.machine.current_epoch, w.i.machine.next_rekey_at) == (epoch, due)
    assert w.i.plane.outbound == epoch
    w.run_for(due - w.now + 1)  # the rekey set before the reload happens when it was due
    assert w.i.machine.current_epoch == epoch + 1
    assert w.i.machine.next_rekey_at == pytest.approx(
        w.i.machine.outbound.activated_at + 30.0, abs=0.1)  # type: ignore[union-attr]
    assert not w.violations


def test_a_new_qkd_key_size_discards_the_keys_fetched_ahead() -> None:
    w = World(seed=5)
    w.kms_status()
    w.run_for(15)
    assert w.converged()
    assert w.i.machine.ahead  # one key ahead at the old size
    ahead = {k.key_id for k in w.i.machine.ahead}
    records = _both(w, qkd_key_bits=512)
    assert ahead <= {k for r in records if r.kind == "discarded" for k in r.key_ids}
    assert not w.i.machine.ahead
    epoch = w.i.machine.current_epoch
    w.run_for(25)
    assert w.converged()
    assert w.i.machine.current_epoch > epoch
    assert w.i.machine.state in (State.IDLE, State.OFFERED, State.FETCHING)
    assert {k.size_bits for k in w.i.machine.ahead} <= {512}
    assert not w.violations
    assert FAST.qkd_key_bits != 512

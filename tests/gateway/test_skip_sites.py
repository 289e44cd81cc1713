"""Two real gateways as SKIP Key Providers (`init-demo --skip`), each site's router a SKIP
client reading skip/clients.json, fetching keys while the gateways rekey every second:

    router-a ──TLS-PSK──▶ qkdgw run (A, kp-a) ══ epochs ══ qkdgw run (B, kp-b) ◀──TLS-PSK── router-b
      GET /key?remoteSystemID=kp-b                 GET /key/{keyId}?remoteSystemID=kp-a

Every key router-a gets, router-b gets by its ID, the same bytes; each ID once; both sides
audit it by ID and fingerprint, and neither logs a key.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.psktls import ClientContext
from common.skip_client import SkipClient
from tests.gateway.sites import Sites, file_mode

pytestmark = pytest.mark.slow

ROUNDS = 40


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    s = Sites(tmp_path, {"interval": 1.0, "jitter": 0.1, "hard_lifetime": 30.0, "grace": 0.5},
              skip=True)
    try:
        yield s.start()
    finally:
        s.stop()


def routers(sites: Sites) -> dict[str, tuple[SkipClient, dict[str, Any]]]:
    """Each site's router, as skip/clients.json describes it."""
    out = {}
    for entry in json.loads((sites.layout.skip_dir / "clients.json").read_text()):
        host, port = re.fullmatch(r"https://(.+):(\d+)", entry["url"]).groups()  # type: ignore[union-attr]
        key = bytes.fromhex(Path(entry["psk_file"]).read_text().strip())
        out[entry["site"]] = (SkipClient(host, int(port),
                                         ClientContext(entry["psk_identity"], key)), entry)
    return out


def test_routers_get_the_same_keys_through_both_gateways_across_rekeys(sites: Sites) -> None:
    assert {file_mode(p) for p in sites.layout.skip_dir.glob("*.psk")} == {0o600}
    sites.wait_until("the first epoch", sites.converged)
    r = routers(sites)
    (a, ea), (b, eb) = r["a"], r["b"]
    assert (ea["local_system_id"], ea["remote_system_id"]) == ("kp-a", "kp-b")
    assert (eb["local_system_id"], eb["remote_system_id"]) == ("kp-b", "kp-a")
    first_epoch = sites.link("a")["epoch"]

    async def fetch() -> tuple[list[tuple[str, str]], list[str]]:
        pairs, refused = [], []
        for _ in range(ROUNDS):
            status, new = await a.new_key("kp-b")
            if status != 200:  # (only between a link's start and its first key)
                refused.append(f"A {status} {new}")
                continue
            status, same = await b.key_by_id("kp-a", new["keyId"])
            if status != 200:
                refused.append(f"B {status} {same}")
                continue
            pairs.append((new["key"], same["key"]))
            again, _ = await b.key_by_id("kp-a", new["keyId"])
            assert again == 400  # once only
            await asyncio.sleep(0.1)
        return pairs, refused

    pairs, refused = asyncio.run(fetch())
    assert sites.link("a")["epoch"] >= first_epoch + 2, "the gateways rekeyed meanwhile"
    assert refused == []
    assert len(pairs) == ROUNDS
    assert all(x == y for x, y in pairs)
    assert len({x for x, _ in pairs}) == ROUNDS

    made = {r["key_ids"][0]: r for r in sites.audit("a") if r["event"] == "key-provided"}
    got = {r["key_ids"][0]: r for r in sites.audit("b") if r["event"] == "key-provided"}
    assert len(made) == len(got) == ROUNDS
    assert made.keys() == got.keys()
    for key_id, rec in made.items():
        ours, theirs = rec["provided"], got[key_id]["provided"]
        assert (ours["origin"], theirs["origin"]) == (True, False)
        assert (ours["peer"], theirs["peer"]) == ("kp-b", "kp-a")
        assert (ours["client"], theirs["client"]) == ("router-a", "router-b")
        assert ours["bits"] == theirs["bits"] == 256
        assert rec["fingerprint"] == got[key_id]["fingerprint"]
        assert rec["epoch"] >= first_epoch
    epochs = {rec["epoch"] for rec in made.values()}
    assert len(epochs) >= 2  # keys from more than one epoch

    for site in ("a", "b"):
        text = sites.log(site) + (sites.layout.state_dir(site) / "audit.jsonl").read_text()
        assert not any(x in text for x, _ in pairs), f"a key in site {site}'s log or trail"
    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{sites.layout.metrics_port('a')}/metrics", timeout=10).read().decode()
    assert f'qkdgw_keys_provided_total{{link="ab",side="origin"}} {ROUNDS}.0' in metrics


def test_a_router_with_a_wrong_psk_or_naming_a_stranger_gets_nothing(sites: Sites) -> None:
    sites.wait_until("the first epoch", sites.converged)
    (a, ea) = routers(sites)["a"]

    async def go() -> tuple[int, int]:
        wrong = SkipClient(a.host, a.port, ClientContext(ea["psk_identity"], bytes(32)))
        with pytest.raises(Exception, match="SKIP GET /capabilities"):
            await wrong.capabilities()
        stranger, _ = await a.new_key("kp-z")
        own, _ = await a.new_key("kp-a")
        return stranger, own

    assert asyncio.run(go()) == (400, 400)
    assert [r for r in sites.audit("a") if r["event"] == "key-provided"] == []

"""TLS 1.3 external PSKs rotated under load: stunnel, and the Python 3.13 helper.

Topology: tests/tls/tls_world.py. Per kind, one world: a long-lived echo connection and a
new connection every 100 ms for 25 s while the gateways rotate every second; the server's
PSK file is sampled every 100 ms (to know each epoch's identity and key); afterwards an
independent client (openssl s_client) tries a retired identity and the current one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import stat
from collections.abc import Iterator
from typing import Any

import pytest

from tests.tls import tls_world as tw
from tls import pskfile

SECONDS = 25
POLICY = {"interval": 1.0, "jitter": 0.0, "hard_lifetime": 10.0, "grace": 1.0}


@pytest.fixture(scope="module", params=["stunnel", "python"])
def run(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    kind = request.param
    reason = tw.missing_tools(kind)
    if reason:
        pytest.skip(f"no {kind} world here: {reason}")
    with tw.World(tmp_path_factory.mktemp(f"tls-{kind}"), POLICY, kind) as world:
        yield asyncio.run(_phase(world))


def _epoch(ident: str) -> int:
    epoch = pskfile.epoch_of(ident)
    assert epoch is not None, f"not a gateway identity: {ident}"
    return epoch


async def _phase(w: tw.World) -> dict[str, Any]:
    await w.start()
    if w.kind == "stunnel":
        w.start_echo()
        w.start_stunnel("b")
        w.start_stunnel("a")
    else:
        w.start_psk_echo()
    before = (await w.link("a"))["epoch"]
    seen: dict[str, bytes] = {}
    w.start_load(SECONDS)
    while w.procs["load"].poll() is None:
        for ident, key in pskfile.loads(w.psk_file("b").read_bytes()):
            seen.setdefault(ident, key)
        await asyncio.sleep(0.1)
    w.procs.pop("load")
    after = (await w.link("a"))["epoch"]
    current = pskfile.loads(w.psk_file("b").read_bytes())
    retired = sorted((i for i in seen if i not in dict(current)), key=_epoch)
    probe_retired = w.try_psk(retired[0], seen[retired[0]]) if retired else None
    probe_current = w.try_psk(*current[0])

    return {"kind": w.kind, "root": w.root, "before": before, "after": after,
            "load": json.loads((w.root / "load.json").read_text()),
            "retired": retired, "probe_retired": probe_retired,
            "probe_current": probe_current,
            "modes": {s: stat.S_IMODE(w.psk_file(s).stat().st_mode) for s in ("a", "b")},
            "stunnel_b": (w.root / "stunnel-b.log").read_text() if w.kind == "stunnel"
            else "", "gw": {s: (w.root / f"gw-{s}.log").read_text() for s in ("a", "b")}}


def identities_used(run: dict[str, Any]) -> list[int]:
    """The epoch of each new connection's PSK identity, in order."""
    if run["kind"] == "stunnel":
        names = re.findall(r'Key configured for PSK identity "([^"]+)"', run["stunnel_b"])
    else:
        names = [ident for _, ident in run["load"]["new"]["identities"]]
    return [e for e in map(pskfile.epoch_of, names) if e is not None]


def test_at_least_20_rotations_and_no_connection_fails(run: dict[str, Any]) -> None:
    assert run["after"] - run["before"] >= 20
    long, new = run["load"]["long"], run["load"]["new"]
    assert long["error"] is None, f"the long-lived connection broke: {long['error']}"
    assert long["sent"] == long["echoed"] >= SECONDS * 10  # a line per 50 ms + round trip
    assert new["failures"] == [], new["failures"][:5]
    assert new["ok"] == new["attempts"] >= SECONDS / 0.1 * 0.8
    print(f"\n{run['kind']}: {run['after'] - run['before']} rotations, {new['ok']} new"
          f" connections, {long['echoed']} lines on the long-lived one, no failure")


def test_each_new_connection_uses_the_current_epochs_identity(run: dict[str, Any]) -> None:
    epochs = identities_used(run)
    assert len(epochs) >= run["load"]["new"]["ok"]
    # Never back to an older identity once a newer one was used, and every epoch in turn.
    assert all(a <= b for a, b in itertools.pairwise(epochs)), epochs
    used = set(epochs)
    assert set(range(run["before"] + 1, run["after"])) <= used


def test_a_retired_identity_is_rejected_the_current_one_accepted(run: dict[str, Any]) -> None:
    assert run["retired"], "no identity was retired during the run"
    assert run["probe_current"] is True  # the probe itself works: the test can fail
    assert run["probe_retired"] is False


def test_psk_files_are_0600_and_no_key_in_the_logs(run: dict[str, Any]) -> None:
    assert run["modes"] == {"a": 0o600, "b": 0o600}
    for site, log in run["gw"].items():  # identities may be logged, keys never (the audit
        # trail's head is a SHA-256 of a public record: the one 64-digit hex string allowed)
        assert not re.search(r"(?<!head )[0-9a-f]{64}", log), \
            f"a 32-byte hex string in gw-{site}.log"



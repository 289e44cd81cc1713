"""Two real gateways keyed from SKIP Key Providers (`init-demo --kms-protocol skip`): the
simulator's KMEs serve the QKD link over SKIP, the initiator takes each epoch's key with
`GET /key`, the responder by its ID with `GET /key/{keyId}`, and the peer protocol carries
the SKIP key IDs (version 2).

    qkdgw run (A) ─TLS-PSK─▶ kme-a (SKIP) ═══ qkd-ab ═══ kme-b (SKIP) ◀─TLS-PSK─ qkdgw run (B)
          ◀───────────────────────── peer channel (mTLS) ─────────────────────────▶
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.sites import Sites

pytestmark = pytest.mark.slow


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    s = Sites(tmp_path, {"interval": 1.0, "jitter": 0.1, "hard_lifetime": 30.0, "grace": 0.5},
              kms_protocol="skip")
    try:
        yield s.start()
    finally:
        s.stop()
    for site in ("a", "b"):
        assert "Traceback" not in s.log(site), s.log(site)[-3000:]


def test_epochs_keyed_from_skip_key_providers(sites: Sites) -> None:
    sites.wait_until("three epochs keyed with QKD from SKIP", lambda: sites.converged()
                     and sites.link("a")["epoch"] >= 3)
    a, b = sites.link("a"), sites.link("b")
    assert a["suite"].startswith("qkd+"), a
    assert a["kms"]["ok"] is True
    assert a["kms"]["kme"] == "kme-a"
    assert a["kms"]["stored_key_count"] is None  # SKIP gives no pool figures: unknown
    fetched_a = {i for r in sites.audit("a") if r["event"] == "fetched" for i in r["key_ids"]}
    fetched_b = {i for r in sites.audit("b") if r["event"] == "fetched" for i in r["key_ids"]}
    rekeyed = {r["epoch"]: r["key_ids"] for r in sites.audit("a") if r["event"] == "rekeyed"}
    assert len(rekeyed) >= 3
    used = [i for ids in rekeyed.values() for i in ids]
    assert used, rekeyed
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in used), used  # SKIP IDs, not UUIDs
    assert set(used) <= fetched_a
    assert set(used) <= fetched_b  # B fetched each by its ID
    assert b["fingerprint"] == a["fingerprint"]


def test_kms_status_and_doctor_speak_skip(sites: Sites) -> None:
    import subprocess

    from tests.helpers import qkdgw_command

    out = subprocess.run([*qkdgw_command(), "kms", "status", "-c",
                          str(sites.layout.site_config("a")), "--json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert '"kme_id": "kme-a"' in out
    assert '"peer_kme_id": "kme-b"' in out
    doctor = subprocess.run([*qkdgw_command(), "kms", "doctor", "-c",
                             str(sites.layout.site_config("a")), "--peer-config",
                             str(sites.layout.site_config("b")), "--json"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    result = json.loads(doctor.stdout)
    assert {f["verdict"] for f in result["findings"]} == {"PASS"}, result
    assert {"key by ID at the peer", "key IDs single-use", "key by ID at the origin",
            "other methods refused"} <= {f["probe"] for f in result["findings"]}

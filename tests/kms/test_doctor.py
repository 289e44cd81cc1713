"""`qkdgw kms doctor` against the real simulator over HTTPS: every probe passes; each known trap
of other KMEs (the simulator's `quirks`) is the finding it should be; a KME answering nonsense
gives FAIL lines, never a crash, and never a piece of a key."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.tlsctx import server_context
from gateway.initdemo import DemoLayout, init_demo
from tests.helpers import SimProcess, free_base_port, qkdgw_command, start_sim
from tests.kms.hostile import Answer, HostileKme, Request

pytestmark = pytest.mark.slow


@dataclass
class Demo:
    layout: DemoLayout
    sim: SimProcess

    def doctor(self, *extra: str, peer: bool = True) -> tuple[int, dict[str, Any]]:
        d = self.layout
        args = ["kms", "doctor", "-c", str(d.site_config("a")), "--json", *extra]
        if peer:
            args += ["--peer-config", str(d.site_config("b"))]
        run = subprocess.run([*qkdgw_command(), *args], capture_output=True, text=True,
                             timeout=120, check=False)
        assert run.stderr == "", run.stderr
        return run.returncode, json.loads(run.stdout)


def demo(root: Path, quirks: list[str] | None = None) -> Demo:
    layout = init_demo(root, base_port=free_base_port())
    if quirks:
        kms = yaml.safe_load(layout.kms_config.read_text())
        kms["links"][0]["quirks"] = quirks
        layout.kms_config.write_text(yaml.safe_dump(kms))
    sim = start_sim(layout.kms_config, layout.admin_port,
                    [layout.kme_port("a"), layout.kme_port("b")], root / "sim.log")
    return Demo(layout, sim)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Demo]:
    d = demo(tmp_path)
    try:
        yield d
    finally:
        d.sim.stop()


def verdicts(result: dict[str, Any]) -> dict[str, str]:
    return {f["probe"]: f["verdict"] for f in result["findings"]}


def test_the_simulator_passes_every_probe(sim: Demo) -> None:
    rc, result = sim.doctor()
    assert rc == 0
    assert set(verdicts(result).values()) == {"PASS"}, result
    assert len(result["findings"]) >= 17
    assert result["counts"]["PASS"] == len(result["findings"])
    for probe in ("status", "enc_keys POST", "enc_keys GET number and size",
                  "max_key_per_request enforced", "extension_mandatory refused",
                  "dec_keys by the slave", "key IDs single-use", "only the slave may fetch",
                  "master in the dec_keys URL", "earlier batches kept",
                  "stored_key_count meaning"):
        assert verdicts(result)[probe] == "PASS", probe


def test_without_the_peers_credentials_the_slaves_probes_are_skipped(sim: Demo) -> None:
    rc, result = sim.doctor(peer=False)
    assert rc == 0
    skipped = [f for f in result["findings"] if f["verdict"] == "SKIP"]
    assert len(skipped) == 6
    assert all("--peer-config" in f["detail"] for f in skipped)


def test_the_text_report_names_each_probe_and_its_clause(sim: Demo) -> None:
    d = sim.layout
    run = subprocess.run([*qkdgw_command(), "kms", "doctor", "-c", str(d.site_config("a")),
                          "--peer-config", str(d.site_config("b"))],
                         capture_output=True, text=True, timeout=120, check=False)
    lines = run.stdout.splitlines()
    assert run.returncode == 0
    assert lines[0].startswith(f"KME https://127.0.0.1:{d.kme_port('a')} as SAE sae-a")
    assert any(line.startswith("PASS  max_key_per_request enforced") and "[§6.2" in line
               for line in lines), run.stdout
    assert lines[-1].endswith("0 failed, 0 skipped")


@pytest.mark.parametrize(("quirk", "probe", "verdict", "says"), [
    ("latest-batch-only", "earlier batches kept", "WARN", "prefetch: false"),
    ("stored-counts-handed-out", "stored_key_count meaning", "WARN", "keys handed out"),
    ("get-ignores-number-size", "enc_keys GET number and size", "FAIL", "GET form"),
])
def test_each_trap_of_other_kmes_is_found(tmp_path: Path, quirk: str, probe: str,
                                         verdict: str, says: str) -> None:
    d = demo(tmp_path, [quirk])
    try:
        rc, result = d.doctor()
    finally:
        d.sim.stop()
    finding = next(f for f in result["findings"] if f["probe"] == probe)
    assert finding["verdict"] == verdict, finding
    assert says in finding["detail"] + finding["advice"], finding
    others = {p: v for p, v in verdicts(result).items() if p != probe}
    assert set(others.values()) == {"PASS"}, others
    assert rc == (1 if verdict == "FAIL" else 0)


STATUS = json.dumps({
    "source_KME_ID": "kme-a", "target_KME_ID": "kme-b", "master_SAE_ID": "sae-a",
    "slave_SAE_ID": "sae-b", "key_size": 256, "stored_key_count": 100, "max_key_count": 1000,
    "max_key_per_request": 4, "max_key_size": 512, "min_key_size": 128,
    "max_SAE_ID_count": 0}).encode()


@pytest.mark.parametrize("status", [b"<html>not json</html>", STATUS])
def test_a_kme_answering_nonsense_fails_without_crashing_or_showing_keys(
        tmp_path: Path, status: bytes) -> None:
    """Status answers carry no Status (or a valid one); every other request gets keys in
    a 400's body."""
    layout = init_demo(tmp_path, base_port=free_base_port())
    secret = base64.b64encode(b"K" * 32).decode()
    garbage = json.dumps({"keys": [{"key_ID": "x", "key": secret}]}).encode()

    def respond(request: Request) -> Answer:
        if request.target.endswith("/status"):
            return Answer(200, status)
        return Answer(400, garbage)

    async def go() -> subprocess.CompletedProcess[str]:
        kme = HostileKme(server_context(layout.pki / "ca.pem", layout.pki / "kme-a.pem",
                                        layout.pki / "kme-a.key"), respond)
        await kme.start()
        try:
            config = yaml.safe_load(layout.site_config("a").read_text())
            config["kms"]["url"] = kme.url
            layout.site_config("a").write_text(yaml.safe_dump(config))
            return await asyncio.to_thread(
                subprocess.run, [*qkdgw_command(), "kms", "doctor", "-c",
                                 str(layout.site_config("a"))],
                capture_output=True, text=True, timeout=120, check=False)
        finally:
            await kme.stop()

    run = asyncio.run(go())
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stdout.splitlines()
    assert secret not in run.stdout + run.stderr
    if status != STATUS:
        assert lines[1].startswith("FAIL  status"), run.stdout
        return
    assert lines[1].startswith("PASS  status"), run.stdout
    assert any(line.startswith("FAIL  enc_keys POST") for line in lines), run.stdout
    assert any(line.startswith("FAIL  max_key_per_request enforced") and "§6.5" in line
               and "without an Error object" in line for line in lines), run.stdout

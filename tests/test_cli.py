"""`qkdgw` as an operator runs it: help, init-demo, check-config, kms calls, the demo."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from gateway.initdemo import CERTS, DemoLayout
from gateway.site import SiteConfig
from tests.helpers import SimProcess, free_base_port, qkdgw_command


def qkdgw(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*qkdgw_command(), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


# -- help and usage ---------------------------------------------------------------------------

COMMANDS = [["demo"], ["init-demo"], ["kms-sim"], ["check-config"], ["kms"], ["kms", "status"],
            ["kms", "enc-keys"], ["kms", "dec-keys"], ["run"], ["status"], ["rekey"],
            ["audit"], ["audit", "verify"], ["tls-guard"]]


def test_top_level_help_lists_every_command() -> None:
    r = qkdgw("--help")
    assert r.returncode == 0
    for cmd in ("demo", "init-demo", "kms-sim", "check-config", "kms", "run", "status",
                "rekey", "audit", "tls-guard"):
        assert f"\n    {cmd} " in r.stdout
    assert qkdgw("--version").stdout.startswith("qkd-gateway ")


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_has_help(cmd: list[str]) -> None:
    r = qkdgw(*cmd, "--help")
    assert r.returncode == 0
    assert r.stdout.startswith("usage: qkdgw " + " ".join(cmd))
    assert len(r.stdout.splitlines()) > 4


@pytest.mark.parametrize(("args", "message"), [
    ([], "usage: qkdgw"),
    (["kms"], "usage: qkdgw kms"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["kms", "enc-keys"], "the following arguments are required: -c/--config"),
    (["init-demo", "/tmp/x", "--base-port", "80"],  # noqa: S108 (refused before writing)
     "base port 80 must lie between"),
    (["demo", "--kms-only", "--keys", "0"], "--keys must be between 1 and 128"),
    (["demo", "--rate", "0"], "--rate must be between 1 and 10000"),
    (["demo", "--kms-outage", "ten"], "--kms-outage 'ten': expected AT:SECONDS"),
    (["demo", "--qber-spike", "5:-1"], "--qber-spike '5:-1': expected AT:SECONDS"),
    (["demo", "--rekey-interval", "0.1"], "--rekey-interval must be between 0.5 and 3600"),
    (["check-config", "/nonexistent.yaml"], "/nonexistent.yaml: cannot read: No such file"),
    (["demo", "--duration", "nan"], "argument --duration: 'nan' is not a finite number"),
    (["demo", "--rate", "inf"], "argument --rate: 'inf' is not a finite number"),
    (["demo", "--kms-outage", "nan:5"], "--kms-outage 'nan:5': expected AT:SECONDS"),
    (["demo", "--qber-spike", "1:inf"], "--qber-spike '1:inf': expected AT:SECONDS"),
    (["stop", "-c", "x.yaml", "--timeout", "NaN"], "--timeout: 'NaN' is not a finite number"),
    (["kms-sim", "-c", "kms.yaml", "--link-profile", "aerial"],
     "argument --link-profile: unknown link profile 'aerial' (profiles: metro-45km,"
     " long-haul-254km, aerial-70km, buried-69km)"),
    (["demo", "--kms-only", "--link-profile", "x"], "unknown link profile 'x' (profiles:"),
])
def test_usage_errors_exit_2_with_a_clear_message(args: list[str], message: str) -> None:
    r = qkdgw(*args)
    assert r.returncode == 2, r
    assert message in r.stderr
    assert "Traceback" not in r.stderr


# -- init-demo ------------------------------------------------------------------------------


def test_init_demo_writes_a_working_pki(tmp_path: Path) -> None:
    root = tmp_path / "d"
    r = qkdgw("init-demo", str(root), "--base-port", "9440")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    ca = x509.load_pem_x509_certificate((root / "pki/ca.pem").read_bytes())
    for name in ("ca", *CERTS):
        assert stat.S_IMODE((root / f"pki/{name}.key").stat().st_mode) == 0o600
    for name in CERTS:
        cert = x509.load_pem_x509_certificate((root / f"pki/{name}.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == name
    a = SiteConfig.load(root / "site-a.yaml")
    b = SiteConfig.load(root / "site-b.yaml")
    assert (a.kms.url, b.kms.url) == ("https://127.0.0.1:9441", "https://127.0.0.1:9442")
    assert (a.links[0].role, b.links[0].role) == ("initiator", "responder")
    assert a.links[0].peer.address.port == b.peer_channel.listen.port == 9452
    # the certificates chain and name-check as TLS will use them
    ctx = ssl.create_default_context(cafile=str(root / "pki/ca.pem"))
    ctx.load_cert_chain(str(root / "pki/sae-a.pem"), str(root / "pki/sae-a.key"))
    assert qkdgw("check-config", str(root / "site-a.yaml")).returncode == 0
    assert qkdgw("kms-sim", "--check", "-c", str(root / "kms.yaml")).returncode == 0
    r = qkdgw("kms-sim", "--check", "-c", str(root / "kms.yaml"), "--link-profile",
              "buried-69km")
    assert r.returncode == 0, r.stderr


def test_init_demo_ha_writes_a_pair_that_site_b_needs_no_change_for(tmp_path: Path) -> None:
    root = tmp_path / "d"
    r = qkdgw("init-demo", str(root), "--ha", "--vip", "198.18.0.1/24")
    assert r.returncode == 0, r.stderr
    assert not (root / "site-a.yaml").exists()
    nodes = [SiteConfig.load(root / f"site-{n}.yaml") for n in ("a1", "a2")]
    b = SiteConfig.load(root / "site-b.yaml")
    assert [n.ha.node for n in nodes if n.ha] == ["a1", "a2"]
    assert len({n.state_dir for n in nodes}) == 2  # each node its own state
    assert {str(n.peer_channel.listen) for n in nodes} == {"198.18.0.1:8451"}
    assert str(b.links[0].peer.address) == "198.18.0.1:8451"
    # Each node its own key; both certificates carry the name B pins.
    ca = x509.load_pem_x509_certificate((root / "pki/ca.pem").read_bytes())
    keys = set()
    for n in nodes:
        cert = x509.load_pem_x509_certificate(n.peer_channel.cert.read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value \
            == b.links[0].peer.name
        keys.add(n.peer_channel.key.read_bytes())
        assert stat.S_IMODE(n.peer_channel.key.stat().st_mode) == 0o600
    assert len(keys) == 2
    for node, prio in (("a1", "254"), ("a2", "253")):
        conf = (root / f"keepalived-{node}.conf").read_text()
        for line in (f"priority {prio}", "nopreempt", "198.18.0.1/24 dev wan",
                     "10.1.0.1/16 dev lan", "advert_int 0.1", "ha notify --state-dir",
                     f"state-{node}/ha/notify.fifo", f"state-{node}/ha/handover"):
            assert line in conf, (node, line)
    bad = qkdgw("init-demo", str(tmp_path / "e"), "--ha", "--vip", "not-an-address")
    assert bad.returncode == 2
    assert "--vip 'not-an-address' is not an IPv4 ADDRESS/PREFIX" in bad.stderr


def test_the_link_profiles_are_listed_in_help() -> None:
    for cmd in ("kms-sim", "demo"):
        text = " ".join(qkdgw(cmd, "--help").stdout.split())
        for name in ("metro-45km", "long-haul-254km", "aerial-70km (12.7 bit/s, QBER 13.3 %)",
                     "buried-69km (22.2 bit/s, QBER 6.1 %)"):
            assert name in text, (cmd, name)


def test_init_demo_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    r = qkdgw("init-demo", str(tmp_path))
    assert r.returncode == 2
    assert "is not empty; pass --force" in r.stderr
    assert qkdgw("init-demo", str(tmp_path), "--force").returncode == 0
    assert (tmp_path / "keep.txt").read_text() == "mine"


# -- check-config ---------------------------------------------------------------------------


def test_check_config_names_the_field(tmp_path: Path, demo: DemoLayout) -> None:
    text = demo.site_config("a").read_text().replace("role: initiator", "role: leader")
    bad = tmp_path / "site.yaml"
    bad.write_text(text)
    r = qkdgw("check-config", str(bad))
    assert r.returncode == 2
    assert "links.0.role: Input should be 'initiator' or 'responder'" in r.stderr


def test_check_config_refuses_a_readable_private_key(tmp_path: Path, demo: DemoLayout) -> None:
    key = tmp_path / "sae-a.key"
    key.write_bytes((demo.pki / "sae-a.key").read_bytes())
    key.chmod(0o644)
    text = demo.site_config("a").read_text().replace("key: pki/sae-a.key", f"key: {key}")
    text = text.replace("pki/", f"{demo.pki}/")
    site = tmp_path / "site.yaml"
    site.write_text(text)
    r = qkdgw("check-config", str(site))
    assert r.returncode == 2
    assert f"run: chmod 600 {key}" in r.stderr


def test_check_config_refuses_plain_http(tmp_path: Path, demo: DemoLayout) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(demo.site_config("a").read_text().replace("url: https://", "url: http://"))
    r = qkdgw("check-config", str(site))
    assert r.returncode == 2
    assert "kms.url: ETSI GS QKD 014 runs over HTTPS" in r.stderr


# -- kms calls --------------------------------------------------------------------------------


def test_kms_calls_print_ids_and_fingerprints_never_keys(demo: DemoLayout,
                                                         sim: SimProcess) -> None:
    r = qkdgw("kms", "enc-keys", "-c", str(demo.site_config("a")), "-n", "2", "--json")
    assert r.returncode == 0, r.stderr
    sent = json.loads(r.stdout)
    ids = [k["key_ID"] for k in sent]
    r = qkdgw("kms", "dec-keys", "-c", str(demo.site_config("b")), *ids, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == sent
    # the same keys, fetched again by the gateway's own client, do not appear in any output
    r2 = qkdgw("kms", "enc-keys", "-c", str(demo.site_config("a")), "--size", "512")
    key_id = r2.stdout.splitlines()[1].split()[0]

    async def material() -> bytes:
        async with SiteConfig.load(demo.site_config("b")).kms.client() as c:
            return (await c.dec_keys("sae-a", [key_id])).keys[0].material

    key = asyncio.run(material())
    for text in (r2.stdout, r2.stderr):
        assert key.hex() not in text
        assert base64.b64encode(key).decode() not in text


def test_kms_status_table_and_json(demo: DemoLayout, sim: SimProcess) -> None:
    r = qkdgw("kms", "status", "-c", str(demo.site_config("a")))
    assert r.returncode == 0
    assert "stored_key_count         10000" in r.stdout
    assert "status_extension.qber" in r.stdout
    r = qkdgw("kms", "status", "-c", str(demo.site_config("b")), "--json")
    assert json.loads(r.stdout)["master_SAE_ID"] == "sae-b"


def test_kms_failure_exits_1_naming_the_kme(demo: DemoLayout, sim: SimProcess) -> None:
    sim.fault(kind="error-503", kme="kme-a")
    r = qkdgw("kms", "enc-keys", "-c", str(demo.site_config("a")), "--size", "256")
    assert r.returncode == 1
    assert f"KME https://127.0.0.1:{demo.kme_port('a')} enc_keys: HTTP 503" in r.stderr
    assert "Traceback" not in r.stderr


def test_status_without_a_daemon_says_so(demo: DemoLayout) -> None:
    r = qkdgw("status", "-c", str(demo.site_config("a")))
    assert r.returncode == 1
    assert "no daemon answers on" in r.stderr
    assert "qkdgw run" in r.stderr
    assert "Traceback" not in r.stderr


def test_check_config_shows_each_links_policy(demo: DemoLayout) -> None:
    r = qkdgw("check-config", str(demo.site_config("a")))
    assert r.returncode == 0
    assert "link ab: initiator to gw-b at 127.0.0.1:" in r.stdout
    assert "qkd+pqc, rekey every 30 s, hard lifetime 120 s, 1 sink(s)" in r.stdout


def test_kms_unknown_link(demo: DemoLayout) -> None:
    r = qkdgw("kms", "status", "-c", str(demo.site_config("a")), "--link", "zz")
    assert r.returncode == 2
    assert "no link named 'zz' (links: ab)" in r.stderr


# -- the demo ---------------------------------------------------------------------------------


def test_kms_demo_runs_end_to_end() -> None:
    r = qkdgw("demo", "--kms-only", "--keys", "4", "--base-port", str(free_base_port()))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" same\n") == 4
    assert "result: 4 of 4 keys identical on both sites, delivered once: OK" in r.stdout


def test_demo_reports_a_busy_port() -> None:
    import socket

    base = free_base_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 1))
        s.listen()
        r = qkdgw("demo", "--kms-only", "--base-port", str(base))
    assert r.returncode == 2
    assert "pick others with --base-port" in r.stderr


def test_sim_stops_cleanly_on_sigterm(demo: DemoLayout, tmp_path: Path) -> None:
    from tests.helpers import start_sim

    root = tmp_path / "d"
    base = free_base_port()
    qkdgw("init-demo", str(root), "--base-port", str(base))
    sim = start_sim(root / "kms.yaml", base, [base + 1, base + 2], tmp_path / "log")
    assert sim.stop() == 0
    log = sim.log.read_text()
    assert "simulator stopped" in log
    assert "Traceback" not in log
    assert os.path.exists(root / "kms.yaml")

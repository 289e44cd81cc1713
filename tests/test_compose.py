"""The docker-compose demo (compose/), built and run as a user would: `compose/up`.

    client-a ─ lan-a ─ gw-a ═ wan ═ gw-b ─ lan-b ─ client-b        kms on wan

No registry here: `debian:bookworm-slim` is made locally with debootstrap when missing
(../shared/ENVIRONMENT.md). dockerd is started if it is not running, and stopped again. The
wan bridge is captured on the host and judged by gateway/demo/wire.py: between the sites
only IKE, ESP-in-UDP and the mutual TLS of the peer channel and the KMEs may cross it
(Prometheus scrapes each gateway from its LAN). The stack's configuration (the `prometheus`
service against the gateways' metrics listeners) is checked without Docker too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.demo.compose import init_compose
from gateway.demo.topology import wait_until
from gateway.demo.wire import Kind, Tally, capture
from gateway.initdemo import init_demo

COMPOSE = Path(__file__).parents[1] / "compose"
BASE_IMAGE = "debian:bookworm-slim"
LANS = [ip_network("10.1.0.0/24"), ip_network("10.2.0.0/24")]
GATEWAYS = {"192.0.2.1": "a", "192.0.2.2": "b"}
ALERTS = Path(__file__).parents[1] / "docs" / "prometheus" / "alerts.yml"


# -- the configuration, without Docker --------------------------------------------------------


def _compose_file() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    return data


def test_prometheus_scrapes_both_gateways_metrics_listeners(tmp_path: Path) -> None:
    """compose/prometheus.yml's targets are the gateways' `metrics.listen` as
    `init-demo --compose` writes it, on every address of their containers (not loopback:
    Prometheus is another container), by their service names on the one network each shares
    with Prometheus: its site's LAN (plaintext metrics stay off the wan)."""
    init_compose(tmp_path / "conf")
    listens = {site: yaml.safe_load((tmp_path / "conf" / f"site-{site}.yaml").read_text())
               ["metrics"]["listen"] for site in ("a", "b")}
    hosts = {listen.rsplit(":", 1)[0] for listen in listens.values()}
    assert hosts == {"0.0.0.0"}  # noqa: S104 (every address of the container: checked here)
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["job_name"] == "qkd-gateway"  # what alerts.yml's QkdGatewayDown watches
    targets = {t for static in job["static_configs"] for t in static["targets"]}
    assert targets == {f"gw-{site}:{listen.rsplit(':', 1)[1]}"
                       for site, listen in listens.items()}
    assert config["rule_files"] == [ALERTS.name]
    services = _compose_file()["services"]
    networks = set(services["prometheus"]["networks"])
    for site in ("a", "b"):
        assert networks & set(services[f"gw-{site}"]["networks"]) == {f"lan-{site}"}
    assert services["prometheus"]["sysctls"] == {"net.ipv4.ip_forward": "0"}  # no LAN to LAN


def test_the_prometheus_service_runs_in_the_image_with_the_alert_rules() -> None:
    """Debian's prometheus in the project's image, its configuration and the rules beside it
    in /etc/qkdgw (the build context keeps docs/prometheus/alerts.yml), published on the
    host's loopback: 9090 unless QKDGW_PROMETHEUS_PORT says otherwise."""
    compose = _compose_file()
    prometheus = compose["services"]["prometheus"]
    assert prometheus["image"] == compose["services"]["gw-a"]["image"]
    assert prometheus["command"][0] == "prometheus"
    assert "--config.file=/etc/qkdgw/prometheus.yml" in prometheus["command"]
    assert prometheus["ports"] == ["127.0.0.1:${QKDGW_PROMETHEUS_PORT:-9090}:9090"]
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    install = dockerfile.split("apt-get install", 1)[1].split("&& rm", 1)[0]
    assert " prometheus " in install
    copy = " ".join(dockerfile.split("COPY compose/gateway.sh", 1)[1].split("\\\n"))
    assert "compose/prometheus.yml" in copy
    assert "docs/prometheus/alerts.yml /etc/qkdgw/" in copy
    ignored = (COMPOSE.parent / ".dockerignore").read_text().splitlines()
    assert ignored.index("!docs/prometheus/alerts.yml") > ignored.index("docs")


def test_metrics_stay_on_loopback_outside_compose(tmp_path: Path) -> None:
    init_demo(tmp_path)
    for site in ("a", "b"):
        config = yaml.safe_load((tmp_path / f"site-{site}.yaml").read_text())
        assert config["metrics"]["listen"].startswith("127.0.0.1:")


# -- the stack, in Docker ---------------------------------------------------------------------


def sh(*argv: str, check: bool = True, timeout: float = 600, **kw: Any) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")
    out: str = proc.stdout  # text=True; **kw leaves run()'s overload unresolved
    return out


@pytest.fixture(scope="module")
def docker() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("dockerd and debootstrap need root")
    for tool, package in (("dockerd", "docker.io"), ("docker", "docker.io; on Debian 13"
                                                               " also docker-cli"),
                          ("docker-compose", "docker-compose"),
                          ("debootstrap", "debootstrap"), ("tcpdump", "tcpdump")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {package})")
    started = None
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (lives with dockerd)
            prefix="qkdgw-test-dockerd-", suffix=".log", delete=False)
        started = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT)
        wait_until("dockerd", lambda: subprocess.run(["docker", "info"], capture_output=True,
                                                     check=False).returncode == 0, 60)
    try:
        if not sh("docker", "images", "-q", BASE_IMAGE).strip():
            scratch = Path(tempfile.mkdtemp(prefix="qkdgw-rootfs-"))
            rootfs = scratch / "rootfs"  # debootstrap makes it, with the usual modes
            try:
                sh("debootstrap", "--variant=minbase", "bookworm", str(rootfs),
                   "http://deb.debian.org/debian")
                sh("sh", "-c", f"tar -C {rootfs} -c . | docker import - {BASE_IMAGE}")
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        yield
    finally:
        if started is not None:
            started.send_signal(signal.SIGTERM)
            started.wait(timeout=60)


@pytest.fixture(scope="module")
def stack(docker: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    project = f"qkdgwtest{uuid.uuid4().hex[:6]}"
    # Prometheus on a free port of the host's loopback (9090 may be the host's own).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        prometheus_port = s.getsockname()[1]
    env = {**os.environ, "COMPOSE_PROJECT_NAME": project,
           "QKDGW_PROMETHEUS_PORT": str(prometheus_port)}

    def compose(*args: str, check: bool = True, timeout: float = 120) -> str:
        return sh("docker-compose", *args, check=check, timeout=timeout, cwd=COMPOSE, env=env)

    out = tmp_path_factory.mktemp("compose")
    try:
        started = time.monotonic()
        sh(str(COMPOSE / "up"), env=env, timeout=900)
        built = time.monotonic() - started
        try:
            wait_until("both gateways on a first epoch", lambda: _converged(compose), 90)
        except TimeoutError as e:
            pytest.fail(f"{e}\n{compose('ps', check=False)}"
                        f"\n{compose('logs', '--no-color', '--tail', '60', check=False)}")
        bridge = "br-" + sh("docker", "network", "inspect", "-f", "{{.Id}}",
                            f"{project}_wan").strip()[:12]
        with capture(out / "wan.pcap", bridge) as wan:
            before = _status(compose, "a")["epoch"]
            pings = {}
            procs = {site: subprocess.Popen(
                ["docker-compose", "exec", "-T", f"client-{site}", "ping", "-n", "-c", "500",
                 "-i", "0.05", "10.2.0.10" if site == "a" else "10.1.0.10"],
                cwd=COMPOSE, env=env, stdout=subprocess.PIPE, text=True) for site in ("a", "b")}
            for site, proc in procs.items():
                pings[site] = proc.communicate(timeout=120)[0]
            pair: list[dict[str, Any]] = []
            # Both read on one epoch: a rekey may land between two status calls.
            wait_until("both gateways' status on one epoch",
                       lambda: _on_one_epoch(compose, pair), 30)
            after, status_b = pair
        yield {"built": built, "before": before, "after": after, "pings": pings,
               "pcap": Path(wan["pcap"]), "status_b": status_b, "compose": compose,
               "prometheus_port": prometheus_port,
               "logs": compose("logs", "--no-color", check=False)}
    finally:
        compose("down", "-v", "--remove-orphans", check=False)


def _status(compose: Any, site: str) -> dict[str, Any]:
    data = json.loads(compose("exec", "-T", f"gw-{site}", "qkdgw", "status", "-c",
                              f"/conf/site-{site}.yaml", "--json"))
    link: dict[str, Any] = data["links"][0]
    return link


def _on_one_epoch(compose: Any, pair: list[dict[str, Any]]) -> bool:
    """Both sites' status into PAIR, if they show the same epoch."""
    a, b = _status(compose, "a"), _status(compose, "b")
    pair[:] = [a, b]
    return bool(a["epoch"] == b["epoch"])


def _converged(compose: Any) -> bool:
    try:
        a, b = _status(compose, "a"), _status(compose, "b")
    except (RuntimeError, json.JSONDecodeError, KeyError):
        return False
    return a["epoch"] == b["epoch"] >= 1 and not a["blocked"]


def _received(ping: str) -> tuple[int, int]:
    import re

    m = re.search(r"(\d+) packets transmitted, (\d+) received", ping)
    assert m, ping
    return int(m.group(1)), int(m.group(2))


def test_lan_a_reaches_lan_b_through_the_tunnel_across_rekeys(stack: dict[str, Any]) -> None:
    rekeys = stack["after"]["epoch"] - stack["before"]
    print(f"\ncompose: images built and stack up in {stack['built']:.0f} s; {rekeys} rekeys"
          f" during the pings")
    assert rekeys >= 2
    assert stack["after"]["fingerprint"] == stack["status_b"]["fingerprint"]
    for site, ping in stack["pings"].items():
        sent, received = _received(ping)
        print(f"client-{site}: {received}/{sent} echoes")
        assert sent == 500
        # strongSwan's responder-side window may cost a reply per rotation (docs/strongswan.md)
        assert received >= sent - rekeys, ping[-500:]


def test_the_wan_carries_only_ike_esp_in_udp_and_mutual_tls(stack: dict[str, Any]) -> None:
    wire = Tally(LANS, GATEWAYS, {Kind.ESP_IN_UDP, Kind.IKE, Kind.TCP}, ipv6=False).read(
        stack["pcap"])
    assert wire.plaintext == 0
    assert sum(wire.esp.values()) >= 2 * 500  # every echo request and reply crossed as ESP-in-UDP
    assert wire.leaked == 0, wire.leaks


def test_no_key_material_in_the_containers_logs(stack: dict[str, Any]) -> None:
    import re

    assert "rekeyed" in stack["logs"]
    # (the audit trail's head, a SHA-256 of a public record, is the one allowed)
    assert not re.search(r"(?<!head )\b[0-9a-f]{64}\b", stack["logs"])


def test_the_responder_gateway_holds_its_traffic_during_rotations(
        stack: dict[str, Any]) -> None:
    """Site B answers the IKE exchanges: its gateway holds its tunnel traffic while each
    new IKE SA comes up (ipsec/strongswan/hold.py), in its container as on a host."""
    import re

    assert "cannot hold traffic" not in stack["logs"]
    holds = re.findall(r"gw-b\S*\s*\|.*held (\d+) packet\(s\) for \d+ ms \(epoch \d+,"
                       r" released: Commit\)", stack["logs"])
    assert holds, "no hold in gw-b's log"
    assert not re.search(r"gw-a\S*\s*\|.*held \d+ packet", stack["logs"])


def _prometheus(port: int, path: str) -> Any:
    """Prometheus's HTTP API, from the host: its port published on the host's loopback."""
    import urllib.request

    url = f"http://127.0.0.1:{port}{path}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)["data"]


def test_prometheus_scrapes_both_gateways_with_the_alert_rules(stack: dict[str, Any]) -> None:
    """The `prometheus` service, as the docs have the user reach it (the host's loopback):
    both gateways' targets up, the rules of docs/prometheus/alerts.yml loaded and evaluated,
    both gateways' epochs queryable."""
    compose, port = stack["compose"], stack["prometheus_port"]
    assert compose("port", "prometheus", "9090").strip() == f"127.0.0.1:{port}"
    targets: dict[str, str] = {}

    def both_up() -> bool:
        targets.clear()
        for t in _prometheus(port, "/api/v1/targets")["activeTargets"]:
            targets[t["labels"]["instance"]] = f"{t['health']} {t['lastError']}".strip()
        return targets == {"gw-a:9100": "up", "gw-b:9100": "up"}

    wait_until("both gateways scraped", both_up, 30, ignore=(OSError,),
               detail=lambda: f"targets: {targets}\n{compose('ps', check=False)}")
    [group] = _prometheus(port, "/api/v1/rules")["groups"]
    assert group["name"] == "qkd-gateway"
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    assert {r["name"] for r in group["rules"]} == {r["alert"] for r in rules}
    assert {r["health"] for r in group["rules"]} == {"ok"}, group["rules"]
    epochs = _prometheus(port, "/api/v1/query?query=qkdgw_epoch")["result"]
    assert {(e["metric"]["instance"], e["metric"]["link"]) for e in epochs} == {
        ("gw-a:9100", "ab"), ("gw-b:9100", "ab")}
    assert all(int(e["value"][1]) >= 1 for e in epochs)

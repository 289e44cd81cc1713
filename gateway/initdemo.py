"""`qkdgw init-demo DIR`: everything two sites need to run on one machine.

    DIR/pki/ca.pem, ca.key            the demo CA (ca.key only to issue more certificates)
    DIR/pki/kme-a.pem, kme-a.key      KME-A's server certificate (SAN: kme-a, localhost, HOST)
    DIR/pki/kme-b.pem, kme-b.key      KME-B's server certificate
    DIR/pki/sae-a.pem, sae-a.key      SAE sae-a's client certificate for KME-A (CN = SAE ID)
    DIR/pki/sae-b.pem, sae-b.key      SAE sae-b's client certificate for KME-B
    DIR/pki/gw-a.pem, gw-a.key        gateway A's peer-channel certificate (server and client)
    DIR/pki/gw-b.pem, gw-b.key        gateway B's peer-channel certificate
    DIR/kms.yaml                      the simulator: KME-A, KME-B and the QKD link between them
    DIR/site-a.yaml, site-b.yaml      the two gateways
    DIR/skip/ (--kms-protocol skip)   the KMEs as SKIP Key Providers, the gateways' key source:
      kme-a.psk, kme-b.psk            each Key Provider's PSK file (sae-a:HEX), 0600
      sae-a.psk, sae-b.psk            each gateway's PSK in hex, 0600
    DIR/skip/ (--skip)                each gateway as a SKIP Key Provider for its routers:
      kp-a.psk, kp-b.psk              each Key Provider's PSK file (IDENTITY:HEXKEY), 0600
      router-a.psk, router-b.psk      each router's PSK in hex, 0600
      clients.json                    per site: where its router asks, as whom (docs/skip.md)

Ports from BASE: simulator admin BASE, KME-A BASE+1, KME-B BASE+2, gateway A BASE+11,
gateway B BASE+12, metrics A BASE+21, metrics B BASE+22, SKIP A BASE+31, SKIP B BASE+32;
with --kms-protocol skip the KMEs' Key Providers BASE+3, BASE+4.
Every *.key file is 0600; each gateway keeps its state in DIR/state-a or DIR/state-b (0700).
docs/demo-setup.md explains each file.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from common.files import write_private
from common.psktls import ClientContext, Version
from gateway import pki
from kms.config import read_psk

CERTS = ("kme-a", "kme-b", "sae-a", "sae-b", "gw-a", "gw-b")

#: The demo's default base port (admin 8440, KMEs 8441/8442, gateways 8451/8452, metrics
#: 8461/8462).
DEFAULT_BASE_PORT = 8440
#: The highest port a layout uses, above its base.
MAX_PORT_OFFSET = 32
#: Size of the demo routers' SKIP PSKs.
SKIP_PSK_BYTES = 32
#: The demo rekeys every 30 s so that epochs visibly roll over; production uses hours.
DEMO_INTERVAL = 30


class InitDemoError(Exception):
    pass


@dataclass(frozen=True)
class DemoLayout:
    root: Path
    host: str
    base_port: int

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def kms_config(self) -> Path:
        return self.root / "kms.yaml"

    def site_config(self, site: str) -> Path:
        return self.root / f"site-{site}.yaml"

    @property
    def admin_port(self) -> int:
        return self.base_port

    def kme_port(self, site: str) -> int:
        return self.base_port + {"a": 1, "b": 2}[site]

    def gateway_port(self, site: str) -> int:
        return self.base_port + {"a": 11, "b": 12}[site]

    def metrics_port(self, site: str) -> int:
        return self.base_port + {"a": 21, "b": 22}[site]

    def kp_port(self, site: str) -> int:
        """The simulated KME's SKIP Key Provider (`--kms-protocol skip`)."""
        return self.base_port + {"a": 3, "b": 4}[site]

    def skip_port(self, site: str) -> int:
        return self.base_port + {"a": 31, "b": 32}[site]

    @property
    def skip_dir(self) -> Path:
        return self.root / "skip"

    def state_dir(self, site: str) -> Path:
        return self.root / f"state-{site}"


def _kme_skip(d: DemoLayout, site: str, on: bool) -> str:
    """KME-SITE's SKIP Key Provider section (--kms-protocol skip), or nothing."""
    return f"""\
    skip:                      # a SKIP Key Provider too
      listen: {d.host}:{d.kp_port(site)}
      psk_file: skip/kme-{site}.psk
""" if on else ""


def _kms_yaml(d: DemoLayout, *, skip_source: bool = False) -> str:
    protocol = "    protocol: skip             # keys handed out over SKIP\n" \
        if skip_source else ""
    return f"""\
# KMS simulator for the qkd-gateway demo: `qkdgw kms-sim -c kms.yaml`.
# Two KMEs, one per site, and the QKD link between them. Reference: docs/kms-simulator.md.
ca: pki/ca.pem                 # trust anchor for SAE client certificates
admin:
  listen: 127.0.0.1:{d.admin_port}       # fault injection for tests; loopback only
kmes:
  - id: kme-a
    listen: {d.host}:{d.kme_port("a")}
    cert: pki/kme-a.pem
    key: pki/kme-a.key
    saes: [sae-a]              # SAEs are identified by their certificate's commonName
{_kme_skip(d, "a", skip_source)}  - id: kme-b
    listen: {d.host}:{d.kme_port("b")}
    cert: pki/kme-b.pem
    key: pki/kme-b.key
    saes: [sae-b]
{_kme_skip(d, "b", skip_source)}links:
  - name: qkd-ab
    kmes: [kme-a, kme-b]
{protocol}    key_size: 256              # default key size, bits
    max_key_count: 10000       # pool capacity, keys of key_size
    max_key_per_request: 128
    key_rate: 50000            # secret key rate at the nominal QBER, bit/s
    qber: 0.02                 # nominal quantum bit error rate
    reserved_key_ttl: 300      # seconds a key waits for the slave SAE before it is dropped
"""


def _kms_section(d: DemoLayout, site: str, skip_source: bool) -> str:
    if skip_source:
        return f"""\
kms:                           # this site's KME as a SKIP Key Provider (docs/skip.md)
  protocol: skip
  url: https://{d.host}:{d.kp_port(site)}
  sae_id: kme-{site}                # the Key Provider's localSystemID
  psk_identity: sae-{site}
  psk_file: skip/sae-{site}.psk
"""
    return f"""\
kms:                           # this site's KME (ETSI GS QKD 014 over mutual TLS)
  url: https://{d.host}:{d.kme_port(site)}
  sae_id: sae-{site}
  ca: pki/ca.pem
  cert: pki/sae-{site}.pem
  key: pki/sae-{site}.key
"""


def _site_yaml(d: DemoLayout, site: str, *, node: str | None = None,
               vip: str | None = None, skip: bool = False,
               skip_source: bool = False) -> str:
    """SITE's configuration; NODE (a1, a2): that node of site A's pair, listening on the
    pair's virtual address VIP (site B: its peer's address is VIP)."""
    peer = "b" if site == "a" else "a"
    role = "initiator" if site == "a" else "responder"
    me = node or site
    listen = f"{vip}:{d.gateway_port(site)}" if vip and site == "a" else \
        f"{d.host}:{d.gateway_port(site)}"
    peer_address = f"{vip}:{d.gateway_port(peer)}" if vip and peer == "a" else \
        f"{d.host}:{d.gateway_port(peer)}"
    cert = "gw-a2" if node == "a2" else f"gw-{site}"
    metrics = d.metrics_port(site) + (2 if node == "a2" else 0)
    ha = "" if node is None else f"""\
ha:                            # one node of a pair under keepalived (docs/ha.md)
  node: {node}
  notify_fifo: state-{node}/ha/notify.fifo   # keepalived's vrrp_notify_fifo
"""
    role_note = ("the initiator fetches QKD keys as master SAE" if site == "a"
                 else "the responder gets the same QKD keys by ID as slave SAE")
    tls_role = "client" if site == "a" else "server"
    kms = _kms_section(d, site, skip_source)
    peer_sae = (f"sae_id: kme-{peer}                # the peer's Key Provider (SKIP)"
                if skip_source else f"sae_id: sae-{peer}")
    return f"""\
# Gateway of site {site.upper()} for the qkd-gateway demo: `qkdgw run -c site-{me}.yaml`.
# Reference: docs/configuration.md.
site: {site}
state_dir: state-{me}            # link state, audit trail, admin socket
{kms}kms_status_interval: 2         # seconds between KMS status polls
peer_channel:                  # mutual-TLS channel between the two gateways
  listen: {listen}
  ca: pki/ca.pem
  cert: pki/{cert}.pem
  key: pki/{cert}.key
metrics:
  listen: 127.0.0.1:{metrics}    # Prometheus /metrics, /healthz, the dashboard at /
{ha}policy:
  mode: qkd+pqc                # QKD and ML-KEM+X25519 both required
  interval: {DEMO_INTERVAL}                 # seconds between rekeys (demo; hours in production)
  hard_lifetime: {DEMO_INTERVAL * 4}           # no fresh key by then: traffic blocked
links:
  - name: ab
    role: {role}            # {role_note}
    peer:
      address: {peer_address}
      name: gw-{peer}                 # pinned: the peer's certificate commonName
      {peer_sae}
    sinks:
      - type: file             # the epoch's TLS PSK, for any PSK-capable service
        path: state-{me}/ab.psk
      # For stunnel (docs/tls.md), uncomment these instead of the two lines above:
      # - type: tls_psk
      #   path: state-{me}/ab-{tls_role}.psk
      #   role: {tls_role}           # this site's TLS side: it runs the stunnel {tls_role}
      #   reload_pid_file: stunnel-{me}.pid
{_skip_sink(d, site) if skip else ""}"""


def _skip_sink(d: DemoLayout, site: str) -> str:
    peer = "b" if site == "a" else "a"
    return f"""\
      - type: skip             # SKIP Key Provider for this site's routers (docs/skip.md)
        listen: {d.host}:{d.skip_port(site)}
        local_system_id: kp-{site}
        remote_system_id: kp-{peer}   # the peer gateway's Key Provider
        psk_file: skip/kp-{site}.psk    # IDENTITY:HEXKEY per router
"""


def _skip_source_files(d: DemoLayout) -> None:
    """Each gateway's PSK for its KME's SKIP Key Provider, and the Key Provider's table."""
    d.skip_dir.mkdir(mode=0o700, exist_ok=True)
    for site in ("a", "b"):
        key = secrets.token_bytes(SKIP_PSK_BYTES).hex()
        write_private(d.skip_dir / f"sae-{site}.psk", f"{key}\n".encode())
        write_private(d.skip_dir / f"kme-{site}.psk", f"sae-{site}:{key}\n".encode())


@dataclass(frozen=True)
class SkipRouter:
    """One entry of skip/clients.json: where a site's router asks for keys, and as whom."""

    site: str
    host: str
    port: int
    local_system_id: str
    remote_system_id: str
    psk_identity: str
    psk_file: Path

    def tls(self, version: Version | None = None) -> ClientContext:
        return ClientContext(self.psk_identity, read_psk(self.psk_file), version)


def skip_routers(skip_dir: Path) -> dict[str, SkipRouter]:
    """SKIP_DIR/clients.json (as `_skip_files` wrote it), by site."""
    out = {}
    for e in json.loads((skip_dir / "clients.json").read_text()):
        url = urlsplit(e["url"])
        if url.hostname is None or url.port is None:
            raise InitDemoError(f"{skip_dir}/clients.json: {e['url']} is not https://HOST:PORT")
        out[e["site"]] = SkipRouter(e["site"], url.hostname, url.port, e["local_system_id"],
                                    e["remote_system_id"], e["psk_identity"],
                                    Path(e["psk_file"]))
    return out


def _skip_files(d: DemoLayout) -> None:
    """Each site's router: its PSK (hex) and the Key Provider's table; clients.json."""
    d.skip_dir.mkdir(mode=0o700, exist_ok=True)
    clients = []
    for site in ("a", "b"):
        key = secrets.token_bytes(SKIP_PSK_BYTES).hex()
        router = d.skip_dir / f"router-{site}.psk"
        write_private(router, f"{key}\n".encode())
        write_private(d.skip_dir / f"kp-{site}.psk", f"router-{site}:{key}\n".encode())
        host = f"[{d.host}]" if ":" in d.host else d.host
        clients.append({"site": site, "url": f"https://{host}:{d.skip_port(site)}",
                        "local_system_id": f"kp-{site}",
                        "remote_system_id": f"kp-{'b' if site == 'a' else 'a'}",
                        "psk_identity": f"router-{site}", "psk_file": str(router.resolve())})
    (d.skip_dir / "clients.json").write_text(json.dumps(clients, indent=2) + "\n")


@dataclass(frozen=True)
class Pair:
    """Site A as a gateway pair under keepalived (`init-demo --ha`, docs/ha.md): the virtual
    addresses keepalived moves (WAN: what site B and the ESP/IKE traffic use; LAN: what the
    hosts route through) and the devices they go on."""

    vip: str = "192.0.2.1/24"
    vip_lan: str = "10.1.0.1/16"
    wan_device: str = "wan"
    lan_device: str = "lan"
    #: keepalived's VRRP instance and virtual router ID (unique per segment).
    instance: str = "site_a"
    vrid: int = 51
    #: VRRP advertisement interval. A dead node is noticed after three missed ones plus the
    #: skew ((256 - priority) / 256 of one): 0.3 s at 0.1 s, a third of the one-second aim,
    #: leaving the rest to the new active's first epoch.
    advert_int: float = 0.1

    @property
    def address(self) -> str:
        return self.vip.split("/")[0]


#: The pair's nodes and their VRRP priorities, near the top of the range: a node taking
#: over from one that gave up (a priority-0 advertisement: a handover, a clean stop) waits
#: only its skew time, under a millisecond at 0.1 s. The first is preferred at a cold start.
HA_NODES = {"a1": 254, "a2": 253}


def keepalived_conf(pair: Pair, node: str, *, state_dir: Path, qkdgw: str) -> str:
    """NODE's keepalived.conf (docs/ha.md explains each line)."""
    return f"""\
# keepalived for node {node} of site A's gateway pair (docs/ha.md).
global_defs {{
    router_id {node}
    script_user root
    enable_script_security
    vrrp_version 3                  # sub-second advert_int
    vrrp_garp_master_delay 0        # the router learns the VIP's new MAC at once ...
    vrrp_garp_master_repeat 2       # ... and again, should one ARP be lost
    vrrp_notify_fifo {state_dir}/ha/notify.fifo   # read by the daemon: the fast path
}}
vrrp_track_file qkdgw_handover {{    # `qkdgw ha handover`: "1" puts this node in FAULT
    file {state_dir}/ha/handover
    weight 0
}}
vrrp_instance {pair.instance} {{
    state BACKUP                    # both start BACKUP: the election decides
    nopreempt                       # a node that comes back does not take the VIP back
    interface {pair.wan_device}
    virtual_router_id {pair.vrid}
    priority {HA_NODES[node]}
    advert_int {pair.advert_int:g}
    track_file {{
        qkdgw_handover
    }}
    virtual_ipaddress {{
        {pair.vip} dev {pair.wan_device}
        {pair.vip_lan} dev {pair.lan_device}
    }}
    notify "{qkdgw} ha notify --state-dir {state_dir}"
}}
"""


def init_demo(
    root: Path, *, host: str = "127.0.0.1", base_port: int = DEFAULT_BASE_PORT,
    force: bool = False, pair: Pair | None = None, qkdgw: str = "qkdgw", skip: bool = False,
    kms_protocol: str = "etsi014",
) -> DemoLayout:
    """Write the demo PKI and configurations into ROOT (created if needed). PAIR: site A as
    a gateway pair: site-a1.yaml and site-a2.yaml (no site-a.yaml), each node's
    keepalived-aN.conf (running QKDGW), node a2's own key with the name site B pins. SKIP:
    each gateway also a SKIP Key Provider (DIR/skip/). KMS_PROTOCOL skip: the gateways get
    their QKD keys from the KMEs' SKIP Key Providers instead of over ETSI 014."""
    if not 1024 <= base_port <= 65535 - MAX_PORT_OFFSET:
        raise InitDemoError(f"base port {base_port} must lie between 1024 and"
                            f" {65535 - MAX_PORT_OFFSET}")
    layout = DemoLayout(root, host, base_port)
    if root.exists() and any(root.iterdir()) and not force:
        raise InitDemoError(f"{root} is not empty; pass --force to overwrite the demo files")
    layout.pki.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    ca = pki.make_ca("qkd-gateway demo CA")
    pki.save(ca, layout.pki / "ca.pem", layout.pki / "ca.key")
    for cn in CERTS:
        is_server = not cn.startswith("sae")
        dns = [cn]
        if is_server:
            dns += ["localhost"] + ([] if _is_ip(host) or host == "localhost" else [host])
        cert = pki.issue(
            ca, cn, dns=dns,
            ips=[host] if is_server and _is_ip(host) else [],
            server=is_server, client=not cn.startswith("kme"),
        )
        pki.save(cert, layout.pki / f"{cn}.pem", layout.pki / f"{cn}.key")
    if pair is not None and (skip or kms_protocol != "etsi014"):
        raise InitDemoError("--skip and --kms-protocol skip do not go with --ha (yet)")
    skip_source = kms_protocol == "skip"
    layout.kms_config.write_text(_kms_yaml(layout, skip_source=skip_source))
    if skip:
        _skip_files(layout)
    if skip_source:
        _skip_source_files(layout)
    if pair is None:
        for site in ("a", "b"):
            layout.site_config(site).write_text(
                _site_yaml(layout, site, skip=skip, skip_source=skip_source))
        return layout
    # Node a2: its own key, the name site B pins (docs/ha.md, the certificate choice).
    cert = pki.issue(ca, "gw-a", dns=["gw-a", "localhost"], ips=[pair.address],
                     server=True, client=True)
    pki.save(cert, layout.pki / "gw-a2.pem", layout.pki / "gw-a2.key")
    for node in HA_NODES:
        layout.site_config(node).write_text(
            _site_yaml(layout, "a", node=node, vip=pair.address))
        (root / f"keepalived-{node}.conf").write_text(keepalived_conf(
            pair, node, state_dir=(root / f"state-{node}").resolve(), qkdgw=qkdgw))
    layout.site_config("b").write_text(_site_yaml(layout, "b", vip=pair.address))
    return layout


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True

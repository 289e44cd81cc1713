"""`qkdgw`: the command line of qkd-gateway.

Exit status: 0 success, 1 the operation failed (KME error, I/O), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cryptography import x509

from common.config import ConfigError
from common.psktls import ClientContext
from common.sink import SinkError
from gateway import __version__, logs
from gateway.audit import AuditError
from gateway.demo import QBER_SPIKE
from gateway.initdemo import DEFAULT_BASE_PORT, InitDemoError, Pair, init_demo
from gateway.site import SiteConfig, guard_tls
from gateway.site import check as check_site
from gateway.status import (
    Handover,
    HaStatus,
    Rekeying,
    Reloaded,
    SiteStatus,
    Stopping,
    SupplyStatus,
)
from kdf import fingerprint
from kms.config import KmsClientConfig, SkipSourceConfig
from kms.errors import KmsError
from kms.models import SourceStatus

if TYPE_CHECKING:
    from gateway.demo.live import Fault

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

Handler = Callable[[argparse.Namespace], int]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def _add(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, handler: Handler,
         summary: str, description: str = "") -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=summary, description=description or summary,
                       formatter_class=_Formatter)
    p.set_defaults(handler=handler)
    return p


def _site_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, required=True, metavar="SITE.yaml",
                   help="site configuration (see `qkdgw init-demo`)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkdgw",
        formatter_class=_Formatter,
        description="qkd-gateway: site-to-site VPN keys from QKD + ML-KEM-768 + X25519.",
        epilog="Start here:\n"
               "  qkdgw demo                          two sites, a tunnel, hybrid rekeys (root)\n"
               "  qkdgw init-demo /tmp/qkd            write certificates and configs\n"
               "  qkdgw kms-sim -c /tmp/qkd/kms.yaml  run the KMS simulator\n"
               "  qkdgw kms status -c /tmp/qkd/site-a.yaml\n"
               "Run `qkdgw COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"qkd-gateway {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging; `run` also checks every move of the rekey core"
                             " against its transition table")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log line format on stderr (default: text)")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = _add(sub, "demo", _cmd_demo, "run the two-site demo: tunnel, hybrid rekeys, traffic,"
             " live view", "Build two sites in network namespaces on this machine (root,"
             " Linux): the KMS simulator\nfor a QKD link, two gateways, the tunnel (the xfrm"
             " sink where the kernel has ESP,\nstrongSwan with kernel-libipsec where it has"
             " not), UDP both ways between the LANs;\nshow a live view; remove everything at"
             " the end. The summary line is counted:\nsent/received per packet, plaintext from a"
             " socket on the link.\n\nWithout --duration it runs until Ctrl-C, which ends it"
             " the same way: the summary,\nthe cleanup and its exit status. Exit status 0 when"
             " nothing was lost and nothing\ncrossed in clear, 1 otherwise; 130 when Ctrl-C"
             " came before the traffic started\n(nothing counted). SIGTERM and SIGHUP act as"
             " Ctrl-C (143, 129).\n\n--kms-only runs the smaller demo that needs no"
             " root: QKD keys fetched on two sites.")
    p.add_argument("--duration", type=_finite, default=None, metavar="SECONDS",
                   help="stop after this long with a summary (default: until Ctrl-C)")
    p.add_argument("--rekey-interval", type=_finite, default=2.0, metavar="SECONDS",
                   help="seconds between rekeys (default: 2)")
    p.add_argument("--rate", type=_finite, default=1000.0, metavar="PPS",
                   help="UDP packets per second each way (default: 1000)")
    p.add_argument("--plane", choices=("auto", "xfrm", "strongswan"), default="auto",
                   help="data plane (default: auto, by whether the kernel has ESP)")
    p.add_argument("--kms-outage", metavar="AT:SECONDS", action="append", default=[],
                   help="KMEs unreachable from AT for SECONDS (the gateways go PQC-only and"
                        " raise the qkd-fallback alarm); repeatable")
    p.add_argument("--qber-spike", metavar="AT:SECONDS", action="append", default=[],
                   help=f"QBER {QBER_SPIKE} on the QKD link from AT for SECONDS (above the"
                        " threshold: the link's keys are not used); repeatable")
    _link_profile_arg(p)
    p.add_argument("--keep", type=Path, default=None, metavar="DIR",
                   help="write configurations and logs to DIR and keep them")
    p.add_argument("--ha", action="store_true",
                   help="site A is a gateway pair under keepalived (docs/ha.md)")
    p.add_argument("--failover-at", type=_finite, default=None, metavar="SECONDS",
                   help="--ha: fail the active node over this long into the traffic")
    p.add_argument("--failover", choices=("kill", "link-down", "handover"), default="kill",
                   help="--ha: how: SIGKILL its gateway, data plane and keepalived (kill, the"
                        " default), take its links down, or a planned `qkdgw ha handover`")
    p.add_argument("--max-outage", type=_finite, default=1000.0, metavar="MS",
                   help="--ha: exit status 0 only if the failover's outage is within this"
                        " (default: 1000 ms)")
    p.add_argument("--web", type=_port, nargs="?", const=8480, default=None, metavar="PORT",
                   help="also show the live view in a browser at http://127.0.0.1:PORT/"
                        " (default port: 8480): both sites' dashboards, the LAN traffic and"
                        " the WAN capture plotted")
    p.add_argument("--skip", action="store_true",
                   help="each gateway also a SKIP Key Provider, and a router on each LAN"
                        " fetching keys through them every second (docs/skip.md); the summary"
                        " counts keys handed out at A, obtained at B, matching")
    p.add_argument("--kms-only", action="store_true",
                   help="only fetch QKD keys on two sites (no root needed)")
    p.add_argument("--dir", type=Path, default=None,
                   help="--kms-only: demo directory (default: a fresh temporary one)")
    p.add_argument("--keys", type=int, default=3, help="--kms-only: keys to fetch (default: 3)")
    p.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT,
                   help=f"--kms-only: first of the demo's ports (default: {DEFAULT_BASE_PORT})")

    p = _add(sub, "init-demo", _cmd_init_demo,
             "write a CA, certificates and configs for two sites",
             "Write a complete two-site setup into DIR: a CA and certificates (pki/),\n"
             "the KMS simulator configuration (kms.yaml) and one configuration per gateway\n"
             "(site-a.yaml, site-b.yaml). Private keys are 0600. See docs/demo-setup.md.")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the KMEs and gateways listen on (default: 127.0.0.1)")
    p.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT,
                   help=f"admin port; KMEs use +1/+2, gateways +11/+12"
                        f" (default: {DEFAULT_BASE_PORT})")
    p.add_argument("--force", action="store_true", help="overwrite files in a non-empty DIR")
    p.add_argument("--compose", action="store_true",
                   help="address everything for compose/docker-compose.yml (names kme-a,"
                        " kme-b, gw-a, gw-b; strongswan sinks)")
    p.add_argument("--kms-protocol", choices=("etsi014", "skip"), default="etsi014",
                   help="how the gateways get their QKD keys: ETSI GS QKD 014 (default), or"
                        " from the KMEs as SKIP Key Providers (ports +3/+4, docs/skip.md)")
    p.add_argument("--skip", action="store_true",
                   help="each gateway also a SKIP Key Provider for its site's routers (ports"
                        " +31/+32): skip/clients.json says where each router asks, with which"
                        " PSK (docs/skip.md)")
    p.add_argument("--ha", action="store_true",
                   help="site A as a gateway pair under keepalived: site-a1.yaml,"
                        " site-a2.yaml and keepalived-a1.conf, keepalived-a2.conf (docs/ha.md)")
    p.add_argument("--vip", default=Pair.vip, metavar="ADDRESS/PREFIX",
                   help=f"--ha: the pair's WAN address, which site B uses (default: {Pair.vip})")
    p.add_argument("--vip-lan", default=Pair.vip_lan, metavar="ADDRESS/PREFIX",
                   help=f"--ha: the pair's LAN address, the hosts' gateway (default:"
                        f" {Pair.vip_lan})")
    p.add_argument("--wan-device", default=Pair.wan_device, metavar="IF",
                   help=f"--ha: the nodes' WAN device (default: {Pair.wan_device})")
    p.add_argument("--lan-device", default=Pair.lan_device, metavar="IF",
                   help=f"--ha: the nodes' LAN device (default: {Pair.lan_device})")

    p = _add(sub, "kms-sim", _cmd_kms_sim, "run the KMS simulator (ETSI GS QKD 014 KMEs)",
             "Serve the KMEs and QKD links of FILE until SIGTERM or Ctrl-C: each KME on its\n"
             "own HTTPS port with mutual TLS, plus a loopback admin interface for fault\n"
             "injection. See docs/kms-simulator.md.")
    p.add_argument("-c", "--config", type=Path, required=True, metavar="FILE",
                   help="simulator configuration (kms.yaml)")
    p.add_argument("--check", action="store_true",
                   help="validate FILE (and its certificates) and exit")
    _link_profile_arg(p)

    p = _add(sub, "check-config", _cmd_check_config,
             "validate a site configuration and the files it names")
    p.add_argument("file", type=Path, metavar="SITE.yaml")

    p = _add(sub, "run", _cmd_run, "run the gateway daemon for a site",
             "Run the gateway of one site until `qkdgw stop`, SIGTERM or Ctrl-C: poll the\n"
             "KME, talk to the peer gateways over mutual TLS, rekey every link as its policy\n"
             "says and install the keys in the configured sinks. On stop each sink leaves its\n"
             "data plane as documented (kernel SAs deleted, policies left blocking; a TLS\n"
             "PSK file left with a placeholder; a `file` sink's key kept); the next start\n"
             "resumes. SIGHUP reloads the configuration as `qkdgw reload` does. See\n"
             "docs/operations.md.")
    _site_arg(p)

    p = _add(sub, "status", _cmd_status, "show the running daemon's links, epochs and alarms",
             "Ask the running daemon how its links are: first a summary over all links\n"
             "(how many in each state and mode, blocked, per peer gateway, the alarms with\n"
             "the first links raising each, the exchanges and KME requests in flight and\n"
             "queued), then one line per link. See docs/operations.md#status.")
    _site_arg(p)
    p.add_argument("--link", help="only this link's line (the summary still counts all)")
    p.add_argument("--json", action="store_true", help="print the full status as JSON")

    p = _add(sub, "report", _cmd_report, "write a period's report as one HTML file",
             "Write a self-contained HTML report (inline SVG, no script, nothing fetched) of\n"
             "the site over a period: per link the availability (time with a valid key\n"
             "against blocked), time with QKD in the key against PQC-only, rekeys done and\n"
             "given up by cause, the rekey latencies, QKD keys consumed, alarms; the KMS's\n"
             "key rate and QBER; and whether the audit trail verifies. From the daemon's\n"
             "history (asked of the running daemon, else read from STATE_DIR/history.json;\n"
             "it reaches back 24 h) and the audit trail. See docs/operations.md#report.\n\n"
             "Times: ISO 8601 (2026-11-01, 2026-11-01T08:00Z; no zone: UTC), 'now', a\n"
             "duration ago (90m, 24h, 7d), or Unix time in seconds.")
    _site_arg(p)
    p.add_argument("--since", default="24h", metavar="TIME",
                   help="the period's start (default: 24h, a day ago)")
    p.add_argument("--until", default="now", metavar="TIME",
                   help="the period's end (default: now)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="REPORT.html",
                   help="where to write the report ('-': standard output)")

    p = _add(sub, "rekey", _cmd_rekey, "start a rekey now (all links, or one)")
    _site_arg(p)
    p.add_argument("--link", help="only this link")

    p = _add(sub, "reload", _cmd_reload,
             "re-read the configuration and apply the changes to the running daemon",
             "Make the running daemon read SITE.yaml again (the file it runs; SIGHUP does the\n"
             "same) and apply the difference, without a restart:\n"
             "  links added      start, and key as soon as their peer has them too;\n"
             "  links removed    stop: each sink as its on_stop says, then a `file` sink's\n"
             "                   key file and the link's state file are deleted;\n"
             "  policy changed   applied, the current key kept (a new interval from the next\n"
             "                   scheduling of a rekey);\n"
             "  sinks changed    take over at the link's next epoch (`qkdgw rekey --link L`:\n"
             "                   at once);\n"
             "  other links      untouched: no rekey, no reconnect.\n"
             "A file that does not pass `qkdgw check-config` is refused with its message;\n"
             "changes that take a restart (state_dir, kms, peer_channel: its listen address\n"
             "and this gateway's certificate and key, admin, metrics, audit_log, site; a\n"
             "link's role, peer name, peer SAE ID or KEM) are refused, each named. A refused\n"
             "reload changes nothing (exit status 2). Each reload applied is an audit record\n"
             "(`reloaded`: the SHA-256 of the old and new file, the links added, removed and\n"
             "changed). See docs/operations.md.")
    _site_arg(p)

    p = _add(sub, "stop", _cmd_stop, "stop the daemon",
             "Ask the running daemon to stop, as SIGTERM does. Each sink leaves its data\n"
             "plane as configured: kernel SAs are deleted and the policies left blocking\n"
             "(xfrm `on_stop: block`, the default) or removed (`on_stop: remove`); a TLS\n"
             "PSK file gets its placeholder (tls_psk `on_stop: block`, the default) or is kept\n"
             "(`keep`); a `file` sink's key stays. Returns once the daemon has stopped (or\n"
             "--timeout passed).")
    _site_arg(p)
    p.add_argument("--timeout", type=_finite, default=30.0,
                   help="seconds to wait for the daemon to finish (default: 30)")

    p = _add(sub, "tls-guard", _cmd_tls_guard,
             "end TLS PSK identities at their hard lifetime, also when the gateway is gone",
             "For each tls_psk sink of the site: remove every identity from its PSK file at\n"
             "its deadline (FILE.expiry, written by the gateway), leave the placeholder when\n"
             "none is left, and reload the service as the sink does. Run it beside the TLS\n"
             "service as a process of its own, so it outlives a killed gateway. Runs until\n"
             "SIGTERM. See docs/tls.md.")
    _site_arg(p)
    p.add_argument("--once", action="store_true",
                   help="one pass, no reload, then exit (before the service starts:"
                        " ExecStartPre=)")

    audit = _add(sub, "audit", _usage(None), "check the audit trail")
    asub = audit.add_subparsers(title="audit commands", metavar="CMD")
    audit.set_defaults(handler=_usage(audit))
    p = _add(asub, "verify", _cmd_audit_verify, "verify an audit trail (and its peer's)",
             "Check every record of FILE: its hash, its link to the record before, its\n"
             "sequence number. Exit 0 if the trail is intact, 1 if not (each break is named).\n"
             "--cert checks the signed checkpoints with the site's gateway certificate (its\n"
             "peer_channel.cert): rewriting signed history needs the site's key.\n"
             "--peer checks FILE and the peer site's trail against each other: each holds the\n"
             "other's head as of every completed epoch, so a trail cut short, rewritten or\n"
             "replaced at one site is found from the other's. --head compares the last record\n"
             "with a hash kept elsewhere. See docs/operations.md.")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--head", metavar="HASH", help="the expected hash of the last record")
    p.add_argument("--cert", type=Path, metavar="CERT.pem",
                   help="check checkpoint signatures with this site's gateway certificate")
    p.add_argument("--peer", type=Path, metavar="PEER_FILE",
                   help="the peer site's audit trail, to check both against each other")
    p.add_argument("--peer-cert", type=Path, metavar="CERT.pem",
                   help="check the peer trail's checkpoints with the peer's certificate")

    ha = _add(sub, "ha", _usage(None), "a gateway pair per site under keepalived",
              "Two gateways per site, active and standby, sharing the site's addresses under\n"
              "keepalived (VRRP). keepalived decides; the daemon follows: `notify` is what\n"
              "keepalived runs, `status` shows this node's role, `handover` moves the site to\n"
              "the other node for maintenance. See docs/ha.md.")
    hsub = ha.add_subparsers(title="ha commands", metavar="CMD")
    ha.set_defaults(handler=_usage(ha))
    from gateway import hanotify

    p = _add(hsub, "notify", _cmd_ha_notify, "keepalived's notify: tell the daemon its role",
             hanotify.DESCRIPTION)
    hanotify.add_arguments(p)
    p = _add(hsub, "status", _cmd_ha_status, "this node's role in the pair",
             "This node's name, role (active or standby), since when and why, and what\n"
             "keepalived last said.")
    _site_arg(p)
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p = _add(hsub, "handover", _cmd_ha_handover,
             "planned switchover: hand the site to the other node",
             "On the active node: set keepalived's track file (ha.handover_file) so its VRRP\n"
             "instance goes FAULT and gives the site's addresses up at once; the other node\n"
             "takes them and starts a new epoch on every link. This node goes standby; a\n"
             "second later the file is set back and it returns to BACKUP, ready to take\n"
             "over again (nopreempt: it does not take the addresses back by itself).\n"
             "Exit 1 if keepalived did not move them within ha.handover_timeout.")
    _site_arg(p)

    kms = _add(sub, "kms", _usage(None), "talk to this site's KME (ETSI GS QKD 014 client)",
               "Query this site's KME as the gateway would, to check a KME before\n"
               "running the gateway. Keys are never printed: only their IDs and\n"
               "fingerprints (HMAC-SHA-256 keyed by the key, 8 bytes).")
    ksub = kms.add_subparsers(title="KME calls", metavar="CALL")
    kms.set_defaults(handler=_usage(kms))

    p = _add(ksub, "status", _cmd_kms_status, "GET status for a link's peer SAE")
    _site_arg(p)
    p.add_argument("--link", help="link name (default: the only link)")
    p.add_argument("--json", action="store_true", help="print the Status object as JSON")

    p = _add(ksub, "enc-keys", _cmd_kms_enc, "get new keys as master SAE (enc_keys)")
    _site_arg(p)
    p.add_argument("--link", help="link name (default: the only link)")
    p.add_argument("-n", "--number", type=int, default=1, help="keys to get (default: 1)")
    p.add_argument("--size", type=int, default=None,
                   help="key size in bits (default: the KME's key_size)")
    p.add_argument("--get", action="store_true", help="use the GET form instead of POST")
    p.add_argument("--json", action="store_true", help="print key IDs and fingerprints as JSON")

    p = _add(ksub, "doctor", _cmd_kms_doctor, "probe the KME against ETSI GS QKD 014 and the"
             " traps that break gateways",
             "Probe this site's key source, an ETSI GS QKD 014 KME or a SKIP Key Provider.\n"
             "ETSI 014: as the gateway's SAE (master) and, with --peer-config, as\n"
             "the peer's (slave): Status fields, enc_keys by POST and GET, sizes,\n"
             "max_key_per_request, extensions, dec_keys only for the slave with the master in\n"
             "the URL, keys identical on both sides, key IDs single-use, error bodies; and the\n"
             "traps of other KMEs (docs/etsi-014.md): earlier batches gone, GET ignoring\n"
             "number or size, stored_key_count counting keys handed out. SKIP: capabilities,\n"
             "key sizes, each key ID once at the peer (with --peer-config), the draft's\n"
             "refusals, entropy (docs/skip.md). One line per probe:\n"
             "PASS, WARN (with advice), FAIL (with the spec's clause), SKIP (why). Exit 0\n"
             "only when nothing failed. Takes about 20 keys from the KME.")
    _site_arg(p)
    p.add_argument("--link", help="link name (default: the only link)")
    p.add_argument("--peer-config", type=Path, metavar="FILE",
                   help="the peer gateway's configuration: its SAE credentials for the"
                        " slave's probes (without it they are skipped)")
    p.add_argument("--json", action="store_true", help="the findings as JSON")

    p = _add(ksub, "dec-keys", _cmd_kms_dec, "get keys by ID as slave SAE (dec_keys)")
    _site_arg(p)
    p.add_argument("--link", help="link name (default: the only link)")
    p.add_argument("key_ids", nargs="+", metavar="KEY_ID")
    p.add_argument("--size", type=int, default=None, help="expected key size in bits")
    p.add_argument("--get", action="store_true", help="use the GET form (one KEY_ID)")
    p.add_argument("--json", action="store_true", help="print key IDs and fingerprints as JSON")
    return parser


def _link_profile_arg(p: argparse.ArgumentParser) -> None:
    from kms.sim.profiles import PROFILES

    p.add_argument("--link-profile", metavar="NAME", type=_link_profile,
                   help="every QKD link follows a published field result (key rate, QBER,"
                        " drift, outages; docs/kms-simulator.md): "
                        + ", ".join(f"{name} ({_rate(p.key_rate)}, QBER {p.qber * 100:g} %%)"
                                    for name, p in PROFILES.items()))


def _rate(bits_per_s: float) -> str:
    return f"{bits_per_s / 1000:g} kbit/s" if bits_per_s >= 1000 else f"{bits_per_s:g} bit/s"


def _link_profile(name: str) -> str:
    from kms.sim.profiles import profile

    try:
        profile(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def _finite(text: str) -> float:
    """A number option: NaN and infinities would make every comparison with it false."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _usage(parser: argparse.ArgumentParser | None) -> Handler:
    def show(args: argparse.Namespace) -> int:
        (parser or build_parser()).print_help(sys.stderr)
        return EXIT_USAGE

    return show


# -- commands ------------------------------------------------------------------------------


def _cmd_init_demo(args: argparse.Namespace) -> int:
    if args.compose:
        if args.ha or args.skip or args.kms_protocol != "etsi014":
            raise ConfigError(f"--{'ha' if args.ha else 'skip' if args.skip else 'kms-protocol'}"
                              " and --compose do not go"
                              " together (yet): the compose demo has one gateway per site"
                              " and no routers")
        from gateway.demo.compose import init_compose

        layout = init_compose(args.dir, force=args.force)
        pair = None
    else:
        pair = _pair(args) if args.ha else None
        qkdgw = str(Path(sys.executable).with_name("qkdgw"))
        if pair is not None and (args.skip or args.kms_protocol != "etsi014"):
            raise ConfigError("--skip and --kms-protocol skip do not go with --ha (yet)")
        layout = init_demo(args.dir, host=args.host, base_port=args.base_port,
                           force=args.force, pair=pair, qkdgw=qkdgw, skip=args.skip,
                           kms_protocol=args.kms_protocol)
    print(f"wrote the two-site demo setup to {layout.root}:")
    print(f"  {layout.pki}/            CA and certificates (keys 0600)")
    print(f"  {layout.kms_config}       KMS simulator: qkdgw kms-sim -c {layout.kms_config}")
    for site in ("a1", "a2", "b") if pair else ("a", "b"):
        print(f"  {layout.site_config(site)}    gateway {site.upper()}")
    if pair:
        for node in ("a1", "a2"):
            print(f"  {layout.root / f'keepalived-{node}.conf'}    keepalived on node {node}")
    if args.skip:
        print(f"  {layout.skip_dir}/clients.json    SKIP: where each site's router asks"
              f" (ports {layout.skip_port('a')}, {layout.skip_port('b')})")
    return EXIT_OK


def _pair(args: argparse.Namespace) -> Pair:
    """--ha's addresses, checked."""
    import ipaddress

    for name in ("vip", "vip_lan"):
        value = getattr(args, name)
        try:
            interface = ipaddress.ip_interface(value)
        except ValueError:
            interface = None
        if interface is None or "/" not in value or interface.version != 4:
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not an IPv4"
                              " ADDRESS/PREFIX")
    for name in ("wan_device", "lan_device"):
        value = getattr(args, name)
        if not value or len(value) > 15 or not value.replace("-", "").replace(".", "").isalnum():
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not a device name")
    return Pair(vip=args.vip, vip_lan=args.vip_lan, wan_device=args.wan_device,
                lan_device=args.lan_device)


def _cmd_kms_sim(args: argparse.Namespace) -> int:
    from kms.sim.config import SimConfig
    from kms.sim.server import Simulator, serve

    config = SimConfig.load(args.config)
    if args.link_profile is not None:
        config = config.with_profile(args.link_profile)
    if args.check:
        Simulator(config)  # loads every certificate and key
        print(f"{args.config}: OK ({len(config.kmes)} KMEs, {len(config.links)} link(s))")
        return EXIT_OK
    asyncio.run(serve(config))
    return EXIT_OK


def _cmd_check_config(args: argparse.Namespace) -> int:
    site = check_site(args.file)
    print(f"{args.file}: OK (site {site.site}, {len(site.links)} link(s))")
    for link in site.links:
        p = site.link_policy(link)
        print(f"  link {link.name}: {link.role} to {link.peer.name} at {link.peer.address},"
              f" {p.mode.value}, rekey every {p.interval:g} s, hard lifetime"
              f" {p.hard_lifetime:g} s, {len(link.sinks)} sink(s),"
              f" prefetch {'on' if p.prefetch else 'off'}")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.daemon import ConfigFile, run

    source = ConfigFile(args.config, check_site)
    config, sha256 = source.read()
    asyncio.run(run(config, debug=args.verbose, source=source, config_sha256=sha256))
    return EXIT_OK


def _admin(config: Path, method: str, path: str, body: dict[str, object] | None = None
           ) -> dict[str, object]:
    import aiohttp

    site = SiteConfig.load(config)
    sock = site.admin_socket

    async def go() -> dict[str, object]:
        conn = aiohttp.UnixConnector(path=str(sock))
        async with aiohttp.ClientSession(connector=conn) as s, \
                s.request(method, f"http://qkdgw{path}", json=body) as r:
            data: dict[str, object] = await r.json()
            if r.status != 200:
                raise ConfigError(str(data.get("error", f"HTTP {r.status}")))
            return data

    try:
        return asyncio.run(go())
    except (aiohttp.ClientConnectorError, FileNotFoundError):
        raise DaemonUnreachable(f"no daemon answers on {sock}: is `qkdgw run -c {config}`"
                                " running (as this user or root)?") from None


class DaemonUnreachable(Exception):
    pass


def _cmd_status(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    query = "" if args.link is None else f"?link={quote(args.link, safe='')}"
    data = _admin(args.config, "GET", f"/status{query}")
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    status = SiteStatus.model_validate(data)
    print(f"site {status.site} (pid {status.pid}, up {status.uptime} s)")
    if status.ha is not None:
        print(f"node {status.ha.node} of a pair: {status.ha.role} ({status.ha.reason})")
    for line in _summary(status, named=args.link is None):
        print(line)
    header = ("link", "role", "state", "epoch", "key age", "fingerprint", "mode", "KMS",
              "QKD every", "pool dry in", "alarms")
    rows: list[tuple[str, ...]] = [header]
    for link in status.links:
        kms = link.kms
        if kms.stored_key_count is not None:
            kms_text = f"{'ok' if kms.ok else 'DOWN'} {kms.stored_key_count} keys"
            if kms.qber is not None:
                kms_text += f" QBER {kms.qber:.3f}"
        else:
            kms_text = "DOWN" if not kms.ok else "?"
        age = "-" if link.key_age is None else f"{link.key_age:.1f} s"
        epoch = f"{link.epoch}" + (" BLOCKED" if link.blocked else "")
        state = "queued" if link.queued else link.state
        rows.append((link.link, link.role, state, epoch, age, link.fingerprint or "-",
                     link.mode, kms_text, *_supply_columns(link.supply),
                     ", ".join(link.alarms) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    print(f"audit: {status.audit.records} records, head {status.audit.head}")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from gateway.audit import verify
    from gateway.history import History
    from gateway.report import Period, Trail, parse_time, read_trail, render

    now = time.time()
    try:
        since, until = parse_time(args.since, now), parse_time(args.until, now)
    except ValueError as e:
        raise ConfigError(f"--since/--until: {e}") from None
    if since >= until:
        raise ConfigError(f"--since ({args.since}) must come before --until ({args.until})")
    site = SiteConfig.load(args.config)
    try:  # the running daemon's, up to this second; else what it saved
        history = History.loads(json.dumps(_admin(args.config, "GET", "/history")).encode())
        source = "the running daemon"
    except DaemonUnreachable:
        path = site.state_dir / "history.json"
        try:
            history = History.load(path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        source = str(path) if path.exists() else "nothing (no history saved yet)"
    verification, error = None, None
    if site.audit_path.is_file():
        verification = verify(site.audit_path, cert=_certificate(site.peer_channel.cert))
        trail = read_trail(site.audit_path, since, until)
    else:
        error = f"{site.audit_path}: no such file"
        trail = Trail(links={}, records=0, first=None, last=None)
    names = [link.name for link in site.links]
    links = names + sorted((set(history.links) | set(trail.links)) - set(names))
    pairs = {link.name: history.pairs.get(link.peer.sae_id) for link in site.links}
    thresholds = {link.name: site.link_policy(link).qber_threshold for link in site.links}
    html = render(Period(site=site.site, since=since, until=until, generated=now), history,
                  links, trail, verification, error, pairs, thresholds)
    if str(args.output) == "-":
        sys.stdout.write(html)
    else:
        args.output.write_text(html)
        print(f"report of site {site.site} from {_utc(since)} to {_utc(until)}: {args.output}"
              f" ({len(links)} link(s); history from {source}; audit trail"
              f" {'verifies' if verification and verification.ok else 'DOES NOT VERIFY'})")
    return EXIT_OK if verification is not None and verification.ok else EXIT_FAILED


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


def _supply_columns(s: SupplyStatus) -> tuple[str, str]:
    """The QKD cadence (with the link's share while rationed) and the pool's forecast."""
    if s.share is None:
        every = "-"  # the peer draws this link's keys
    elif s.qkd_cadence is None:
        every = "none now"
    else:
        every = f"{_duration(s.qkd_cadence)}" + (f" ({s.share:.0%})" if s.rationed else "")
    dry = "-" if s.pool_dry_in is None else "now" if s.pool_dry_in == 0 \
        else _duration(s.pool_dry_in)
    return every, dry


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


#: The summary names this many links per alarm (a hub has thousands).
ALARM_LINKS_NAMED = 3


def _summary(status: SiteStatus, *, named: bool) -> list[str]:
    """The summary's lines: counts over all links; NAMED: the first links of each alarm."""
    s = status.summary

    def counts(by: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in by.items()) or "-"

    def alarm(name: str, n: int) -> str:
        links = [link.link for link in status.links if name in link.alarms]
        if not named or not links:
            return f"{name} {n}"
        more = f", +{n - ALARM_LINKS_NAMED} more" if n > ALARM_LINKS_NAMED else ""
        return f"{name} {n} ({', '.join(links[:ALARM_LINKS_NAMED])}{more})"

    p = s.pacing
    throttled = f"; throttled: {', '.join(p.throttled_peers)}" if p.throttled_peers else ""
    return [
        f"{s.links} links, {s.blocked} blocked; peers: {counts(s.by_peer)}",
        f"  state:  {counts(s.by_state)}",
        f"  mode:   {counts(s.by_mode)}",
        f"  alarms: {', '.join(alarm(a, n) for a, n in s.alarms.items()) or 'none'}",
        f"  turns:  exchanges {p.exchanges} of {p.exchange_limit} ({p.exchange_limit_per_peer}"
        f" per peer), {p.exchanges_queued} queued; KME requests {p.kms_requests} of"
        f" {p.kms_request_limit}, {p.kms_requests_queued} queued, {p.kms_keys_waiting} links"
        f" waiting for keys{throttled}",
    ]


def _cmd_rekey(args: argparse.Namespace) -> int:
    data = _admin(args.config, "POST", "/rekey", {"link": args.link} if args.link else {})
    print("rekeying: " + ", ".join(Rekeying.model_validate(data).rekeying))
    return EXIT_OK


def _cmd_reload(args: argparse.Namespace) -> int:
    check_site(args.config)  # refused here as by check-config; the daemon checks it again
    try:
        data = _admin(args.config, "POST", "/reload", {"config": str(args.config.resolve())})
    except DaemonUnreachable as e:
        raise DaemonUnreachable(f"{e} If this file moves state_dir or admin.socket, the"
                                " daemon is not where it says: a running daemon cannot take"
                                " that change (SIGHUP it to see the refusal), restart it"
                                " instead.") from None
    r = Reloaded.model_validate(data)
    print(f"reloaded {r.config} (sha256 {r.old_sha256[:16]} -> {r.new_sha256[:16]})")
    print(f"  added: {', '.join(r.added) or '-'}")
    print(f"  removed: {', '.join(r.removed) or '-'}")
    print("  changed: " + ("; ".join(f"{link} ({', '.join(what)})"
                                    for link, what in r.changed.items()) or "-"))
    if r.site:
        print(f"  site: {', '.join(r.site)}")
    print(f"  unchanged: {r.unchanged} link(s)")
    return EXIT_OK


def _cmd_ha_notify(args: argparse.Namespace) -> int:
    from gateway import hanotify

    return hanotify.run(args)


def _cmd_ha_status(args: argparse.Namespace) -> int:
    data = _admin(args.config, "GET", "/ha")
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    ha = HaStatus.model_validate(data)
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ha.since))
    print(f"node {ha.node}: {ha.role} since {since} ({ha.reason})")
    print(f"  keepalived: {ha.keepalived_state or '-'}"
          + (f" ({ha.keepalived_instance})" if ha.keepalived_instance else "")
          + f"; takeovers since start: {ha.takeovers}")
    return EXIT_OK


def _cmd_ha_handover(args: argparse.Namespace) -> int:
    try:
        data = _admin(args.config, "POST", "/ha/handover")
    except ConfigError as e:  # the daemon's refusal (409)
        print(f"qkdgw ha handover: {e}", file=sys.stderr)
        return EXIT_FAILED
    h = Handover.model_validate(data)
    print(f"node {h.node}: standby {h.standby_after_ms:.0f} ms after the handover began;"
          " the other node holds the site's addresses")
    return EXIT_OK


def _cmd_stop(args: argparse.Namespace) -> int:
    site = Stopping.model_validate(_admin(args.config, "POST", "/stop")).stopping
    sock = SiteConfig.load(args.config).admin_socket
    deadline = time.monotonic() + args.timeout
    while sock.exists():  # the daemon removes its admin socket last
        if time.monotonic() > deadline:
            print(f"site {site}: still stopping after {args.timeout:g} s",
                  file=sys.stderr)
            return EXIT_FAILED
        time.sleep(0.05)
    print(f"site {site} stopped")
    return EXIT_OK


def _cmd_tls_guard(args: argparse.Namespace) -> int:
    guard_tls(SiteConfig.load(args.config), str(args.config), once=args.once)
    return EXIT_OK


def _certificate(path: Path | None) -> x509.Certificate | None:
    if path is None:
        return None
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise ConfigError(f"{path}: not a PEM certificate") from None


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from gateway.audit import cross_verify, verify

    for path in (args.file, args.peer):
        if path is not None and not path.is_file():
            raise ConfigError(f"{path}: no such file")
    if args.peer_cert is not None and args.peer is None:
        raise ConfigError("--peer-cert needs --peer")
    cross = args.peer is not None
    results = [(args.file, verify(args.file, args.head, cert=_certificate(args.cert),
                                  keep_hashes=cross), args.cert)]
    if cross:
        results.append((args.peer, verify(args.peer, cert=_certificate(args.peer_cert),
                                          keep_hashes=True), args.peer_cert))
    ok = True
    for path, result, cert in results:
        for problem in result.problems:
            print(f"BROKEN: {f'{path}: ' if cross else ''}{problem}")
        signed = (f", {result.checkpoints} signed checkpoints"
                  + (" checked" if cert else " (not checked: no --cert)")
                  + (f", {result.unsigned_tail} records after the last"
                     if result.unsigned_tail else "")) if result.checkpoints else ""
        print(f"{path}: {result.records} records, head seq {result.head.seq}"
              f" {result.head.hash}{signed}: {'OK' if result.ok else 'NOT INTACT'}")
        ok = ok and result.ok
    if cross:
        (a_path, a, _), (b_path, b, _) = results
        problems = cross_verify(a, b, mine_name=str(a_path), peer_name=str(b_path))
        for problem in problems:
            print(f"BROKEN: {problem}")
        checked = sum(1 for *_, site, _h in a.peer_heads if site == b.site) + \
            sum(1 for *_, site, _h in b.peer_heads if site == a.site)
        print(f"anchors: {checked} peer heads checked between site {a.site or '?'} and site"
              f" {b.site or '?'}: {'OK' if not problems else 'MISMATCH'}")
        ok = ok and not problems
    return EXIT_OK if ok else EXIT_FAILED


def _peer_sae(args: argparse.Namespace) -> tuple[SiteConfig, str]:
    site = SiteConfig.load(args.config)
    try:
        return site, site.link(args.link).peer.sae_id
    except KeyError as e:
        raise ConfigError(f"{args.config}: {e.args[0]}") from None


def _etsi(site: SiteConfig, what: str) -> KmsClientConfig:
    """The site's ETSI 014 KME, for WHAT; a clear refusal when its key source is SKIP."""
    if not isinstance(site.kms, KmsClientConfig):
        raise ConfigError(f"{what} speaks ETSI GS QKD 014; this site's kms is a SKIP Key"
                          " Provider (protocol: skip)")
    return site.kms


def _cmd_kms_doctor(args: argparse.Namespace) -> int:
    from kms.doctor import Doctor, Finding, Sae, report

    site, peer = _peer_sae(args)
    other = SiteConfig.load(args.peer_config).kms if args.peer_config is not None else None
    if other is not None and (other.sae_id != peer or type(other) is not type(site.kms)):
        raise ConfigError(f"{args.peer_config}: its key source is {other.sae_id} over"
                          f" {other.protocol}, but link {site.link(args.link).name}'s peer is"
                          f" {peer} over {site.kms.protocol}")
    findings: list[Finding]
    if isinstance(site.kms, SkipSourceConfig):
        from kms.skipdoctor import SkipDoctor, SkipSide

        def side(k: SkipSourceConfig) -> SkipSide:
            host, port = k.address
            return SkipSide(host, port, ClientContext(k.psk_identity, k.psk()), k.sae_id)

        peer_side = side(other) if isinstance(other, SkipSourceConfig) else None
        findings = asyncio.run(SkipDoctor(side(site.kms), peer, peer_side).run())
        heading = f"SKIP Key Provider {site.kms.url} ({site.kms.sae_id}) for {peer}"
    else:
        k = site.kms
        master = Sae(k.sae_id, k.url, k.ca, k.cert, k.key)
        slave = Sae(other.sae_id, other.url, other.ca, other.cert, other.key) \
            if isinstance(other, KmsClientConfig) else None
        findings = asyncio.run(Doctor(master, peer, slave, timeouts=k.timeouts()).run())
        heading = f"KME {k.url} as SAE {k.sae_id} (master) for {peer}"
    if other is not None:
        heading += f", and as {peer} at {other.url}"
    result = report(findings)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(heading)
        for f in findings:
            print(f.line())
        c = result["counts"]
        print(f"{c['PASS']} passed, {c['WARN']} warnings, {c['FAIL']} failed,"
              f" {c['SKIP']} skipped")
    return EXIT_OK if result["ok"] else EXIT_FAILED


def _cmd_kms_status(args: argparse.Namespace) -> int:
    site, peer = _peer_sae(args)

    if isinstance(site.kms, SkipSourceConfig):
        return _skip_status(site.kms, peer, args.json)

    async def go() -> int:
        async with _etsi(site, "kms status").client() as kme:
            st = await kme.status(peer)
        if args.json:
            print(json.dumps(st.model_dump(mode="json", exclude_none=True), indent=2))
            return EXIT_OK
        for name, value in st.model_dump(exclude_none=True).items():
            if isinstance(value, dict):
                for k, v in value.items():
                    print(f"{name}.{k:<24} {v}")
            else:
                print(f"{name:<24} {value}")
        return EXIT_OK

    return asyncio.run(go())


def _skip_status(kms: SkipSourceConfig, peer: str, as_json: bool) -> int:
    async def go() -> SourceStatus:
        async with kms.client() as source:
            return await source.source_status(peer)

    fields = {k: v for k, v in asdict(asyncio.run(go())).items() if v is not None}
    if as_json:
        print(json.dumps(fields, indent=2))
    else:
        for name, value in fields.items():
            print(f"{name:<24} {value}")
    return EXIT_OK


def _print_keys(keys: Sequence[tuple[str, str]], as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"key_ID": k, "fingerprint": f} for k, f in keys], indent=2))
        return
    print(f"{'key_ID':<38} fingerprint")
    for key_id, fp in keys:
        print(f"{key_id:<38} {fp}")


def _cmd_kms_enc(args: argparse.Namespace) -> int:
    site, peer = _peer_sae(args)

    async def go() -> int:
        if isinstance(site.kms, SkipSourceConfig):
            if args.get:
                raise ConfigError("--get is ETSI GS QKD 014's; SKIP has only GET")
            async with site.kms.client() as source:
                batch = await source.enc_keys(peer, args.number, args.size)
        else:
            async with site.kms.client() as kme:
                batch = await kme.enc_keys(peer, args.number, args.size,
                                           method="GET" if args.get else "POST")
        _print_keys([(k.key_id, fingerprint(k.material)) for k in batch.keys], args.json)
        return EXIT_OK

    return asyncio.run(go())


def _cmd_kms_dec(args: argparse.Namespace) -> int:
    site, peer = _peer_sae(args)

    async def go() -> int:
        if isinstance(site.kms, SkipSourceConfig):
            if args.get:
                raise ConfigError("--get is ETSI GS QKD 014's; SKIP has only GET")
            async with site.kms.client() as source:
                batch = await source.dec_keys(peer, args.key_ids, size=args.size)
        else:
            async with site.kms.client() as kme:
                batch = await kme.dec_keys(peer, args.key_ids, size=args.size,
                                           method="GET" if args.get else "POST")
        _print_keys([(k.key_id, fingerprint(k.material)) for k in batch.keys], args.json)
        return EXIT_OK

    return asyncio.run(go())


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.kms_only and (args.web is not None or args.skip):
        raise ConfigError(f"--{'web' if args.web is not None else 'skip'} needs the full"
                          " demo: not with --kms-only")
    if args.skip and args.ha:
        raise ConfigError("--skip and --ha do not go together (yet)")
    if args.kms_only:
        from gateway.demo.kms import run_kms_demo

        if not 1 <= args.keys <= 128:
            raise ConfigError("--keys must be between 1 and 128")
        if not args.verbose:
            logging.getLogger("kms").setLevel(logging.WARNING)
        return asyncio.run(run_kms_demo(args.dir, keys=args.keys, base_port=args.base_port,
                                        link_profile=args.link_profile))
    from gateway.demo.live import DemoError, FailoverPlan, run_demo

    if args.duration is not None and args.duration <= 0:
        raise ConfigError("--duration must be positive")
    if not 0.5 <= args.rekey_interval <= 3600:
        raise ConfigError("--rekey-interval must be between 0.5 and 3600 seconds")
    if not 1 <= args.rate <= 10000:
        raise ConfigError("--rate must be between 1 and 10000 packets/s")
    faults = [_fault("kms-outage", v) for v in args.kms_outage]
    faults += [_fault("qber-spike", v) for v in args.qber_spike]
    failover = None
    if args.failover_at is not None:
        if not args.ha:
            raise ConfigError("--failover-at needs --ha (a pair to fail over)")
        if args.failover_at <= 0 or (args.duration is not None
                                     and args.failover_at >= args.duration):
            raise ConfigError("--failover-at must be positive and before --duration ends")
        if args.max_outage <= 0:
            raise ConfigError("--max-outage must be positive")
        failover = FailoverPlan(args.failover_at, args.failover, args.max_outage / 1e3)
    try:
        return asyncio.run(run_demo(args.plane, duration=args.duration,
                                    interval=args.rekey_interval, rate=args.rate,
                                    faults=faults, keep=args.keep,
                                    link_profile=args.link_profile, ha=args.ha,
                                    failover=failover, web_port=args.web,
                                    skip=args.skip))
    except DemoError as e:
        raise ConfigError(str(e)) from None
    except RuntimeError as e:  # a command building the sites failed (it says which, and why)
        print(f"qkdgw demo: {e}", file=sys.stderr)
        return EXIT_FAILED


def _port(text: str) -> int:
    """A TCP port for argparse: 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not from 1 to 65535")
    return port


def _fault(kind: Literal["kms-outage", "qber-spike"], value: str) -> Fault:
    from gateway.demo.live import Fault

    at, sep, seconds = value.partition(":")
    try:
        fault: Fault | None = Fault(kind, float(at), float(seconds))
    except ValueError:
        fault = None
    if not sep or fault is None or not 0 <= fault.at < math.inf \
            or not 0 < fault.seconds < math.inf:
        raise ConfigError(f"--{kind} {value!r}: expected AT:SECONDS, e.g. 10:5 (from 10 s"
                          " after the start, for 5 s)")
    return fault


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    logs.setup(logging.DEBUG if args.verbose else logging.INFO, args.log_format)
    try:
        return int(args.handler(args))
    except (ConfigError, InitDemoError, ValueError, AuditError) as e:
        print(f"qkdgw: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (KmsError, DaemonUnreachable, SinkError) as e:
        print(f"qkdgw: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"qkdgw: {e.strerror or e}{f': {e.filename}' if e.filename else ''}",
              file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

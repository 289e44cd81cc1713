"""The two sites of gateway/demo/sites.py with the strongSwan sink: one charon per site.

Where the kernel has no ESP (this project's CI hosts, containers on them), charon runs
kernel-libipsec: ESP in userspace over a TUN device, ESP-in-UDP on port 4500; its routes to
the remote LAN live in table 220 and win over the blackhole routes of the main table while
it runs. Each charon gets its own strongswan.conf, VICI socket and /run (its pid file path is
fixed), and its operator credentials (the IKE AUTH PSK, not the epoch key) from a
swanctl.conf loaded with `swanctl --load-creds`, as an operator would.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from gateway.demo.sites import ADDR, LAN, Sites
from gateway.demo.topology import run, wait_until

CHARON = Path("/usr/lib/ipsec/charon")
IDS = {"a": "site-a.example", "b": "site-b.example"}
PLUGINS = ("random nonce aes sha1 sha2 hmac gcm openssl pem pkcs1 x509 pubkey revocation"
           " curve25519 kdf kernel-libipsec kernel-netlink socket-default vici updown")


def missing_tools() -> str | None:
    """Why two charons cannot run here, or None (the message says how to get what is missing)."""
    if os.geteuid() != 0:
        return "network namespaces and charon need root"
    if not CHARON.exists():
        return f"strongSwan is not installed ({CHARON} missing: apt-get install" \
               " strongswan-charon strongswan-swanctl libcharon-extra-plugins" \
               " libstrongswan-extra-plugins)"
    plugins = Path("/usr/lib/ipsec/plugins")
    absent = [p for p in PLUGINS.split() if not (plugins / f"libstrongswan-{p}.so").exists()]
    if absent:
        return f"strongSwan plugins missing: {', '.join(absent)} (Debian:" \
               " libstrongswan-standard-plugins, libstrongswan-extra-plugins," \
               " libcharon-extra-plugins)"
    for tool, package in (("swanctl", "strongswan-swanctl"), ("ip", "iproute2"),
                          ("iptables", "iptables")):
        # iptables: the IKE responder's gateway holds its tunnel traffic while a new IKE SA
        # comes up (ipsec/strongswan/hold.py).
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing (kernel-libipsec needs TUN devices)"
    return None


def connection(site: str) -> dict[str, Any]:
    """The operator's IKEv2 connection (swanctl.conf syntax as YAML), auth by their own PSK."""
    me, peer = ("a", "b") if site == "a" else ("b", "a")
    addr, lan = ADDR, LAN
    return {
        "version": 2, "local_addrs": [addr[me]], "remote_addrs": [addr[peer]],
        "proposals": ["aes256gcm16-prfsha384-x25519"], "encap": True, "mobike": False,
        "dpd_delay": "2s",
        "local": {"auth": "psk", "id": IDS[me]},
        "remote": {"auth": "psk", "id": IDS[peer]},
        "children": {"lan": {"local_ts": [lan[me]], "remote_ts": [lan[peer]],
                             "esp_proposals": ["aes256gcm16"], "mode": "tunnel"}},
    }


class StrongswanSites(Sites):
    """The two sites with the strongswan sink and one charon per gateway namespace."""

    tag = "qs"
    #: Hold the IKE responder's traffic during rotations (ipsec/strongswan/hold.py); the
    #: benchmark's baseline subclass turns it off (read when the configurations are written,
    #: in __init__).
    hold = True

    def identity(self, site: str) -> str:
        """The site whose IKE identity and addresses SITE's charon uses (a pair's nodes:
        their site's)."""
        return site

    def sink(self, site: str) -> dict[str, Any]:
        spec: dict[str, Any] = {"type": "strongswan", "vici": str(self.vici_path(site)),
                "connection": connection(self.identity(site))}
        if not self.hold:
            spec["hold"] = None
        return spec

    def prepare(self) -> None:
        super().prepare()
        for site in ("a", "b"):
            self.write_charon_config(site)

    def vici_path(self, site: str) -> Path:
        return self.root / f"charon-{site}.vici"

    def charon_dir(self, site: str) -> Path:
        """This world's directory as SITE's charon sees it (the tests chroot some charons)."""
        return self.root

    def charon_plugins(self, site: str) -> str:
        return PLUGINS

    def charon_command(self, site: str) -> list[str]:
        """SITE's charon, in a mount namespace of its own where RUN is its /run."""
        run_dir = self.root / f"run-{site}"
        return ["unshare", "-m", "sh", "-c", f"mount --bind {run_dir} /run && exec {CHARON}"]

    def write_charon_config(self, site: str) -> None:
        d, seen = self.root, self.charon_dir(site)
        (d / f"run-{site}").mkdir(exist_ok=True)
        (d / f"strongswan-{site}.conf").write_text(f"""\
charon {{
    load = {self.charon_plugins(site)}
    # Failures show within seconds in tests (defaults: 4 s, 5 tries, ~165 s in all).
    retransmit_timeout = 1.0
    retransmit_tries = 3
    make_before_break = yes
    filelog {{
        charon {{
            path = {seen}/charon-{site}.log
            time_format = %H:%M:%S
            ike_name = yes
            flush_line = yes
            default = 1
            ike = 1
        }}
    }}
    plugins {{
        vici {{
            socket = unix://{seen / self.vici_path(site).name}
        }}
    }}
}}
""")
        me, peer = ("a", "b") if self.identity(site) == "a" else ("b", "a")
        (d / f"swanctl-{site}.conf").write_text(f"""\
# The operator's own IKE credentials. The epoch keys never appear in a file: the gateway loads
# them over VICI as PPKs.
secrets {{
    ike-sites {{
        id-{me} = {IDS[me]}
        id-{peer} = {IDS[peer]}
        secret = 0sQ2xhc3NpY2FsIElLRSBhdXRoZW50aWNhdGlvbiBvbmx5
    }}
}}
""")

    def start_data_plane(self, site: str) -> None:
        self.start_charon(site)

    def start_charon(self, site: str) -> None:
        run_dir = self.root / f"run-{site}"
        for stale in run_dir.iterdir():
            stale.unlink()
        self.vici_path(site).unlink(missing_ok=True)
        conf = self.charon_dir(site) / f"strongswan-{site}.conf"
        self.spawn(f"charon-{site}", self.namespace(site), self.charon_command(site),
                   env={"STRONGSWAN_CONF": str(conf)})
        wait_until(f"charon-{site} VICI", lambda: self.vici_path(site).exists())
        run("swanctl", "--load-creds", "--noprompt", "--uri", f"unix://{self.vici_path(site)}",
            "--file", str(self.root / f"swanctl-{site}.conf"))
        self.note(f"charon-{site} started")

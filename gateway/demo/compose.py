"""Configurations for the docker-compose demo (compose/): `qkdgw init-demo DIR --compose`.

The same PKI and files as `qkdgw init-demo`, addressed for compose's networks: the KMS
simulator is reachable as `kme-a` and `kme-b` (the names in its certificates), the gateways
as `gw-a` and `gw-b`, and each gateway keys its strongSwan (one charon per container,
kernel-libipsec, so no ESP in the host kernel is needed) through the strongswan sink.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gateway.initdemo import DemoLayout, init_demo

#: Addresses on compose's networks (compose/docker-compose.yml says the same).
WAN = {"a": "192.0.2.1", "b": "192.0.2.2"}
LAN = {"a": "10.1.0.0/24", "b": "10.2.0.0/24"}
VICI = "/run/charon.vici"
#: The operator's own IKE authentication secret for the demo (not the epoch key: that
#: enters as the PPK). Both gateways load it from /conf/swanctl.conf.
IKE_IDS = {"a": "gw-a.demo", "b": "gw-b.demo"}
#: The gateways' metrics listener in their containers: every address of the container, which
#: only the compose networks reach (no port is published), so that the `prometheus` service
#: scrapes gw-a:9100 and gw-b:9100 from their LANs (compose/prometheus.yml). Outside compose,
#: init-demo keeps metrics on loopback.
METRICS_LISTEN = "0.0.0.0:9100"


def init_compose(root: Path, *, force: bool = False) -> DemoLayout:
    layout = init_demo(root, force=force)
    kms = yaml.safe_load(layout.kms_config.read_text())
    # The admin interface (faults) stays on the container's loopback: `docker-compose exec kms`.
    for kme in kms["kmes"]:
        kme["listen"] = f"0.0.0.0:{layout.kme_port(kme['id'][-1])}"
    layout.kms_config.write_text(yaml.safe_dump(kms, sort_keys=False))
    for site in ("a", "b"):
        peer = "b" if site == "a" else "a"
        config: dict[str, Any] = yaml.safe_load(layout.site_config(site).read_text())
        config["state_dir"] = f"/var/lib/qkdgw/{site}"
        config["kms"]["url"] = f"https://kme-{site}:{layout.kme_port(site)}"
        config["peer_channel"]["listen"] = f"0.0.0.0:{layout.gateway_port(site)}"
        config["metrics"] = {"listen": METRICS_LISTEN}
        config["policy"].update({"mode": "pqc-fallback", "interval": 10.0,
                                 "hard_lifetime": 60.0})
        link = config["links"][0]
        link["peer"]["address"] = f"gw-{peer}:{layout.gateway_port(peer)}"
        link["sinks"] = [{"type": "strongswan", "vici": VICI, "connection": {
            "version": 2, "local_addrs": [WAN[site]], "remote_addrs": [WAN[peer]],
            "proposals": ["aes256gcm16-prfsha384-x25519"], "encap": True, "mobike": False,
            "dpd_delay": "5s",
            "local": {"auth": "psk", "id": IKE_IDS[site]},
            "remote": {"auth": "psk", "id": IKE_IDS[peer]},
            "children": {"lan": {"local_ts": [LAN[site]], "remote_ts": [LAN[peer]],
                                 "esp_proposals": ["aes256gcm16"]}}}}]
        layout.site_config(site).write_text(yaml.safe_dump(config, sort_keys=False))
    (root / "swanctl.conf").write_text(
        "# The demo's own IKE authentication (not the epoch key, which enters as the PPK).\n"
        "secrets {\n    ike-demo {\n"
        f"        id-a = {IKE_IDS['a']}\n        id-b = {IKE_IDS['b']}\n"
        "        secret = 0sZGVtbyBJS0UgYXV0aGVudGljYXRpb24sIG5vdCB0aGUgZXBvY2gga2V5\n"
        "    }\n}\n")
    return layout

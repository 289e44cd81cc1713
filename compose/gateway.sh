#!/bin/sh
# A site's gateway container: charon (kernel-libipsec) and `qkdgw run`. SITE is a or b.
set -eu
site=$SITE
peer_lan=$PEER_LAN
# Fail closed: without charon's routes (table 220) the peer's LAN goes nowhere, not out in clear.
ip route add blackhole "$peer_lan"
sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 || true
STRONGSWAN_CONF=/etc/qkdgw/strongswan.conf /usr/lib/ipsec/charon &
i=0
until [ -S /run/charon.vici ]; do
    i=$((i + 1)); [ $i -lt 100 ] || { echo "charon did not start" >&2; exit 1; }
    sleep 0.1
done
swanctl --load-creds --noprompt --file /conf/swanctl.conf
exec qkdgw run -c "/conf/site-$site.yaml"

"""Prometheus metrics of the daemon, on a registry of its own.

Names and labels are documented in docs/operations.md. Only epochs, counts, ages, rates and
alarm states: never keys, never key IDs (they would make unbounded label sets anyway).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Rekey latency buckets: a loopback rekey takes a few ms; a WAN one tens to hundreds; a
#: retransmitted one seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.epoch = Gauge("qkdgw_epoch", "Epoch the link currently sends on (0: none)",
                           ["link"], registry=r)
        self.key_age = Gauge("qkdgw_key_age_seconds", "Age of the current outbound key",
                             ["link"], registry=r)
        self.blocked = Gauge("qkdgw_blocked", "1 while the link's traffic is blocked",
                             ["link"], registry=r)
        self.hard_lifetime = Gauge("qkdgw_key_hard_lifetime_seconds", "The link's hard"
                                   " lifetime: a key this old blocks the link's traffic",
                                   ["link"], registry=r)
        self.key_has_qkd = Gauge("qkdgw_key_has_qkd", "1 while the current outbound key"
                                 " carries a QKD key, 0 while it is ML-KEM + X25519 alone"
                                 " (no series: no key)", ["link"], registry=r)
        self.rekeys = Counter("qkdgw_rekeys", "Completed rekeys", ["link", "suite"],
                              registry=r)
        self.failures = Counter("qkdgw_rekey_failures", "Failed or abandoned exchanges, by"
                                " cause", ["link", "cause"], registry=r)
        self.latency = Histogram("qkdgw_rekey_latency_seconds", "From the start of an"
                                 " exchange until this side switched", ["link"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.keys_provided = Counter("qkdgw_keys_provided", "Keys derived from the link's"
                                     " epochs and handed out (SKIP), by whether this side"
                                     " made the key ID (origin) or the peer did (peer)",
                                     ["link", "side"], registry=r)
        self.rejected = Counter("qkdgw_peer_messages_rejected", "Peer messages refused",
                                ["link", "reason"], registry=r)
        self.kms_stored = Gauge("qkdgw_kms_stored_key_count", "Keys the KME has for the link",
                                ["link"], registry=r)
        self.kms_qber = Gauge("qkdgw_kms_qber", "QBER the KME reports", ["link"],
                              registry=r)
        self.kms_qber_threshold = Gauge("qkdgw_kms_qber_threshold", "QBER above which the"
                                        " link takes no QKD keys (its policy)", ["link"],
                                        registry=r)
        self.kms_key_rate = Gauge("qkdgw_kms_key_rate_bits_per_second", "Secret key rate"
                                  " the KME reports", ["link"], registry=r)
        self.kms_up = Gauge("qkdgw_kms_up", "1 when the last KMS status poll succeeded",
                            ["link"], registry=r)
        self.mode = Gauge("qkdgw_mode", "1 for the link's configured mode", ["link", "mode"],
                          registry=r)
        self.alarm = Gauge("qkdgw_alarm", "1 while an alarm is raised", ["link", "alarm"],
                           registry=r)
        self.qkd_share = Gauge("qkdgw_qkd_share", "The link's fraction of its KME pair's QKD"
                               " supply once rationed (initiators: they draw the keys)",
                               ["link"], registry=r)
        self.qkd_cadence = Gauge("qkdgw_qkd_cadence_seconds", "Seconds between the link's"
                                 " QKD keys as things stand (+Inf: none now)", ["link"],
                                 registry=r)
        self.pool_dry_in = Gauge("qkdgw_kms_pool_dry_in_seconds", "Forecast: seconds until the"
                                 " KME pool is down to the reserve at the current consumption"
                                 " (+Inf: not shrinking)", ["link"], registry=r)
        self.channel_connects = Counter("qkdgw_peer_channel_connects", "Channel connections"
                                        " this gateway opened to the peer gateway",
                                        ["peer"], registry=r)
        self.channel_accepts = Counter("qkdgw_peer_channel_accepts", "Channel connections"
                                       " the peer gateway opened to this one", ["peer"],
                                       registry=r)
        self.channel_up = Gauge("qkdgw_peer_channel_up", "1 while this gateway's channel to"
                                " the peer gateway is connected", ["peer"], registry=r)
        self.audit_records = Gauge("qkdgw_audit_records", "Records in the audit trail",
                                   registry=r)
        self.audit_write_failures = Counter("qkdgw_audit_write_failures", "Audit records that"
                                            " could not be written (each blocks its link)",
                                            registry=r)
        self.ha_role = Gauge("qkdgw_ha_role", "1 for this node's role in a gateway pair"
                             " (active, standby)", ["role"], registry=r)
        self.ha_takeovers = Counter("qkdgw_ha_takeovers", "Times this node became active",
                                    registry=r)
        self.reloads = Counter("qkdgw_config_reloads", "Configuration reloads, by outcome",
                               ["outcome"], registry=r)

    def forget(self, links: set[str]) -> None:
        """Drop every series of LINKS (removed by a reload), in one pass over each metric's
        label sets (prometheus_client keeps them in `_metrics`, and has no public way to
        list them): the label sets stay bounded by the links configured, and a removed link
        shows nothing stale."""
        for metric in (self.epoch, self.key_age, self.blocked, self.hard_lifetime,
                       self.key_has_qkd, self.kms_qber_threshold, self.rekeys, self.failures,
                       self.latency, self.rejected, self.keys_provided, self.kms_stored,
                       self.kms_qber, self.kms_key_rate, self.kms_up, self.mode, self.alarm,
                       self.qkd_share, self.qkd_cadence, self.pool_dry_in):
            at = metric._labelnames.index("link")
            for values in [v for v in metric._metrics if v[at] in links]:
                metric.remove(*values)

"""A site's configuration (`site.yaml`): its KME, its peer channel, its links, their policy and
sinks, and where the daemon keeps its state.

Generic over the sink configurations: which sinks exist is decided at the top, in the
composition root (gateway/site.py, whose `SiteConfig` is the one to load); this module knows
only the sink contract (common.sink.SinkConfig). Reference with every field:
docs/configuration.md. Errors name the field.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Generic, Literal, Self, TypeVar

from pydantic import Field, model_validator

from common.config import Address, ConfigModel, FilePath, Seconds, load_yaml_model
from common.sink import KeyLifetimes, SinkConfig
from gateway.core.policy import Mode, Policy
from gateway.ha import HANDOVER_TIMEOUT
from gateway.pacing import EXCHANGES_IN_FLIGHT, EXCHANGES_PER_PEER, KMS_REQUESTS_IN_FLIGHT
from kms.config import KeySourceConfig
from kms.models import EntityId

S = TypeVar("S", bound=SinkConfig)

#: More keys than any KME stores (ETSI GS QKD 014 `max_key_count`s are thousands).
MAX_RESERVE_KEYS = 1_000_000
#: The largest `qkd_share` weight: a thousand to one between two links is more than any
#: operator needs, and it keeps every share a plain number.
MAX_QKD_SHARE = 1000.0

#: More turns than links a daemon can run: a bound, not a recommendation.
MAX_TURNS = 100_000


class PeerChannelConfig(ConfigModel):
    """This gateway's end of the mutual-TLS channel to its peers."""

    listen: Address
    ca: FilePath = Field(description="CA that issued the peer gateways' certificates")
    cert: FilePath
    key: FilePath


class PeerConfig(ConfigModel):
    """The gateway at the other end of a link."""

    address: Address = Field(description="where its peer channel listens")
    name: str = Field(min_length=1, description="its certificate's commonName (pinned)")
    sae_id: EntityId = Field(description="its SAE ID at its KME")


class PolicyConfig(ConfigModel):
    """Rekey policy; every field optional, see gateway.core.policy.Policy for defaults."""

    mode: Mode | None = None
    interval: Seconds | None = None
    jitter: float | None = Field(default=None, ge=0, lt=0.5)
    hard_lifetime: Seconds | None = None
    grace: Seconds | None = None
    retransmit: Seconds | None = None
    retransmit_max: Seconds | None = None
    attempt_timeout: Seconds | None = None
    retry_backoff: Seconds | None = None
    retry_backoff_max: Seconds | None = None
    qkd_key_bits: int | None = Field(default=None, ge=128, le=8192, multiple_of=8)
    qber_threshold: float | None = Field(default=None, gt=0, lt=0.5)
    reserve_keys: int | None = Field(default=None, ge=0, le=MAX_RESERVE_KEYS)
    qkd_share: float | None = Field(
        default=None, gt=0, le=MAX_QKD_SHARE, description="weight in sharing the KME pair's"
        " supply: w / max(1, sum of the weights of the links drawing from it)")
    prefetch: bool | None = Field(
        default=None, description="fetch the next epoch's QKD key ahead; off for KMEs that"
                                  " serve only the keys of their latest enc_keys call")

    def set_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class LinkConfig(ConfigModel, Generic[S]):
    name: EntityId
    role: Literal["initiator", "responder"] = Field(
        description="the initiator fetches QKD keys as master SAE and starts each rekey")
    peer: PeerConfig
    kem: Literal["ML-KEM-768", "ML-KEM-1024"] = "ML-KEM-768"
    policy: PolicyConfig = PolicyConfig()
    sinks: list[S] = Field(default_factory=list)


class PacingConfig(ConfigModel):
    """How many exchanges and KME requests run at once (gateway/pacing.py explains the
    defaults; docs/operations.md, "Restart storms")."""

    exchanges: int = Field(default=EXCHANGES_IN_FLIGHT, ge=1, le=MAX_TURNS,
                           description="exchanges this daemon starts, in flight at once")
    exchanges_per_peer: int = Field(default=EXCHANGES_PER_PEER, ge=1, le=MAX_TURNS,
                                    description="... towards one peer gateway")
    kms_requests: int = Field(default=KMS_REQUESTS_IN_FLIGHT, ge=1, le=MAX_TURNS,
                              description="KME key requests in flight at once")


class AdminConfig(ConfigModel):
    """The local control socket of `qkdgw status` and `qkdgw rekey` (mode 0600)."""

    socket: FilePath | None = None


class MetricsTlsConfig(ConfigModel):
    """HTTPS with client certificates on the metrics listener (docs/operations.md#dashboard):
    only clients with a certificate from CA get the metrics and the dashboard."""

    ca: FilePath = Field(description="CA the clients' certificates must chain to (the"
                                     " site CA, say)")
    cert: FilePath = Field(description="the listener's certificate")
    key: FilePath = Field(description="its private key (0600)")


class MetricsConfig(ConfigModel):
    """Prometheus metrics, /healthz and the dashboard over HTTP; keep it on loopback (the
    default in init-demo) or a management net, or give it `tls` (mutual TLS)."""

    listen: Address
    tls: MetricsTlsConfig | None = Field(default=None, description="mutual TLS: clients"
                                         " must present a certificate from `tls.ca`")


class HaConfig(ConfigModel):
    """This gateway is one of a pair under keepalived (docs/ha.md)."""

    node: EntityId = Field(description="this node's name (status, metrics, audit)")
    handover_file: FilePath | None = Field(
        default=None, description="keepalived's track_file for `qkdgw ha handover`"
                                  " (default: STATE_DIR/ha/handover)")
    handover_timeout: Seconds = Field(
        default=HANDOVER_TIMEOUT, description="seconds `qkdgw ha handover` waits for"
                                              " keepalived to move the addresses")
    notify_fifo: FilePath | None = Field(
        default=None, description="keepalived's vrrp_notify_fifo, read by the daemon (no"
                                  " program started on the failover path); made if missing")


class SiteConfig(ConfigModel, Generic[S]):
    site: EntityId
    state_dir: FilePath = Field(description="snapshots, audit log and admin socket (0700)")
    kms: KeySourceConfig
    kms_status_interval: Seconds = Field(
        default=10.0, description="seconds between KMS status polls")
    peer_channel: PeerChannelConfig
    policy: PolicyConfig = PolicyConfig()
    pacing: PacingConfig = PacingConfig()
    admin: AdminConfig = AdminConfig()
    metrics: MetricsConfig | None = None
    audit_log: FilePath | None = Field(default=None,
                                       description="default: STATE_DIR/audit.jsonl")
    ha: HaConfig | None = Field(default=None, description="this gateway is one of a pair"
                                " under keepalived (docs/ha.md); it starts standby")
    links: list[LinkConfig[S]] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [link.name for link in self.links]
        dup = sorted(n for n, count in Counter(names).items() if count > 1)
        if dup:
            raise ValueError(f"link name used more than once: {', '.join(dup)}")
        for link in self.links:
            try:
                self.link_policy(link)
            except ValueError as e:
                raise ValueError(f"link {link.name}: policy: {e}") from None
        by_type: dict[type[SinkConfig], list[tuple[str, SinkConfig]]] = {}
        for link in self.links:
            for sink in link.sinks:
                by_type.setdefault(type(sink), []).append((link.name, sink))
        for kind, sinks in by_type.items():
            kind.check_together(sinks)  # e.g. reqid ranges of xfrm sinks across links
        if self.ha is not None:
            for link in self.links:
                for sink in link.sinks:
                    # A standby's data plane must drop what reaches it: were its policies
                    # removed, the LAN address keepalived moves to it would route in clear.
                    if getattr(sink, "on_stop", None) == "remove":
                        raise ValueError(f"link {link.name}: a sink with on_stop: remove"
                                         " cannot run under ha: the standby must keep its"
                                         " blocking policies (use on_stop: block)")
        return self

    def link_policy(self, link: LinkConfig[S]) -> Policy:
        """Defaults, overridden by the site's `policy:`, overridden by the link's."""
        return Policy(**{**self.policy.set_fields(), **link.policy.set_fields()})

    def lifetimes(self, link: LinkConfig[S]) -> KeyLifetimes:
        """What the link's sinks mirror into their data planes."""
        p = self.link_policy(link)
        return KeyLifetimes(hard_lifetime=p.hard_lifetime, attempt_timeout=p.attempt_timeout)

    def link(self, name: str | None) -> LinkConfig[S]:
        """The link called NAME, or the only link when NAME is None."""
        if name is None:
            if len(self.links) > 1:
                raise KeyError("this site has several links: name one ("
                               + ", ".join(link.name for link in self.links) + ")")
            return self.links[0]
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(f"no link named {name!r} (links: "
                       + ", ".join(link.name for link in self.links) + ")")

    @property
    def admin_socket(self) -> Path:
        return self.admin.socket or self.state_dir / "admin.sock"

    @property
    def audit_path(self) -> Path:
        return self.audit_log or self.state_dir / "audit.jsonl"

    @classmethod
    def load(cls, path: Path, raw: bytes | None = None) -> Self:
        """PATH (or RAW, its bytes as already read) as a site configuration."""
        return load_yaml_model(path, cls, raw)

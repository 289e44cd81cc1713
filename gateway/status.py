"""What `qkdgw status --json` (the admin socket's GET /status) says about a running site: the
operator's contract, typed. The CLI, the dashboard and fleet tools read these models;
docs/operations.md embeds the field table `python -m gateway.status` prints.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Status(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KmsStatus(_Status):
    """The link's KMS as the last status poll saw it."""

    ok: bool = Field(description="QKD keys can be had: reachable, link up, QBER below the"
                                 " threshold")
    reason: str = Field(description="why not, when not ok")
    stored_key_count: int | None = Field(default=None, description="keys the KME holds")
    qber: float | None = Field(default=None, description="QBER the KME reports")
    key_rate: float | None = Field(default=None, description="secret key rate, bit/s")
    link_up: bool | None = Field(default=None, description="the quantum channel works")
    kme: str | None = Field(default=None, description="the KME's ID")
    error: str | None = Field(default=None, description="why the last poll failed")


class SupplyStatus(_Status):
    """The link's part of its KME pair's QKD supply (docs/operations.md, the QKD supply)."""

    share: float | None = Field(default=None, description="fraction of the KME pair's supply"
                                " this link may draw once the pool is down to the reserve"
                                " (initiator; null: the peer draws)")
    rationed: bool = Field(default=False, description="the pool is down to the reserve: QKD"
                           " keys only as the share earns them")
    qkd_cadence: float | None = Field(default=None, description="seconds between this link's"
                                      " QKD keys as things stand (initiator; null: none now)")
    pool_dry_in: float | None = Field(default=None, description="forecast: seconds until the"
                                      " pool is down to the reserve at the current"
                                      " consumption (0: it is; null: it is not shrinking)")
    qkd_keys: int = Field(default=0, description="QKD keys this link fetched since the daemon"
                          " started")


class LastRekey(_Status):
    epoch: int = Field(description="the last epoch this side completed")
    started_at: float | None = Field(description="when the exchange started here (Unix time)")
    activated_at: float | None = Field(description="when this side switched to it")


class LinkStatus(_Status):
    link: str = Field(description="the link's name")
    role: str = Field(description="initiator or responder")
    peer: str = Field(description="the peer gateway's name")
    mode: str = Field(description="qkd+pqc or pqc-fallback")
    state: str = Field(description="the rekey core's state (docs/protocol.md)")
    epoch: int = Field(description="the epoch this side sends on (0: none)")
    blocked: bool = Field(description="no valid key: the link's traffic is dropped")
    suite: str | None = Field(description="what the current key is made of")
    condition: str = Field(default="none", description="what protects the traffic now: `qkd`"
                           " (QKD + ML-KEM + X25519), `pqc` (ML-KEM + X25519 alone, while QKD"
                           " is unavailable), `blocked` (no valid key: traffic dropped) or"
                           " `none` (no key yet)")
    key_age: float | None = Field(description="seconds since the current key was activated")
    fingerprint: str | None = Field(description="the current key's keyed fingerprint (the"
                                                " same on both sites)")
    interval: float | None = Field(default=None, description="the policy's rekey interval,"
                                   " seconds")
    hard_lifetime: float | None = Field(default=None, description="the policy's hard"
                                        " lifetime: a key this old blocks the traffic")
    qber_threshold: float | None = Field(default=None, description="the policy's QBER"
                                         " threshold: above it, no QKD keys")
    data_planes: list[str] = Field(default_factory=list, description="the link's sinks: where"
                                   " its keys go")
    rekeys: int = Field(description="epochs completed since the daemon started")
    last_rekey_latency: float | None = Field(description="seconds the last exchange took here")
    last_rekey: LastRekey | None = Field(default=None, description="the last epoch this side"
                                                                   " completed, and when")
    next_rekey_in: float | None = Field(description="seconds to the next scheduled rekey (I)")
    queued: bool = Field(default=False, description="waiting for its turn to start an"
                                                    " exchange (I; restart-storm pacing)")
    alarms: dict[str, str] = Field(description="raised alarms and their details")
    kms: KmsStatus = Field(description="the link's KMS, as the last status poll saw it")
    peer_channel_connects: int = Field(default=0, description="connections of the peer"
                                       " channel the link uses (the one to its peer gateway,"
                                       " shared with that peer's other links) since the daemon"
                                       " started, opened by either side (a reconnect counts"
                                       " one more)")
    supply: SupplyStatus = Field(default_factory=SupplyStatus,
                                 description="the link's part of the QKD key supply")


class AuditStatus(_Status):
    path: str = Field(description="the audit trail's file")
    records: int = Field(description="records in the trail")
    head: str | None = Field(description="the hash of the last record")


class PeerChannelStatus(_Status):
    """One peer gateway's channel: one connection each way carries all its links."""

    peer: str = Field(description="the peer gateway's name (its certificate's commonName)")
    address: str = Field(description="where its peer channel listens")
    connected: bool = Field(description="this gateway's connection to it is open")
    connects: int = Field(description="connections this gateway opened to it since the"
                                      " start (one per reconnect, not per link)")
    accepted: int = Field(description="connections it opened to this gateway since the start")
    links: int = Field(description="links with it")


class PacingStatus(_Status):
    """The daemon's turns (docs/operations.md#restart-storms)."""

    exchanges: int = Field(description="exchanges started by this daemon, in flight")
    exchanges_queued: int = Field(description="links waiting for their turn to start one")
    exchange_limit: int = Field(description="at most this many at once")
    exchange_limit_per_peer: int = Field(description="... and this many towards one peer")
    throttled_peers: list[str] = Field(description="peers held to one exchange at a time"
                                                   " since one timed out")
    kms_requests: int = Field(description="KME key requests in flight")
    kms_requests_queued: int = Field(description="KME key requests waiting for their turn")
    kms_request_limit: int = Field(description="at most this many at once")
    kms_keys_waiting: int = Field(description="links waiting for QKD keys: in a request"
                                              " (merged with other links') or for the next")


class Summary(_Status):
    """Counts over every link of the site, for sites with many."""

    links: int = Field(description="links of the site")
    blocked: int = Field(description="links whose traffic is blocked")
    by_state: dict[str, int] = Field(description="links per rekey core state")
    by_mode: dict[str, int] = Field(description="links per mode")
    by_peer: dict[str, int] = Field(description="links per peer gateway")
    alarms: dict[str, int] = Field(description="links raising each alarm")
    pacing: PacingStatus = Field(description="exchanges and KME requests in flight")

    @classmethod
    def of(cls, links: list[LinkStatus], pacing: PacingStatus) -> Summary:
        def count(values: list[str]) -> dict[str, int]:
            return {v: values.count(v) for v in sorted(set(values))}

        return cls(links=len(links), blocked=sum(1 for link in links if link.blocked),
                   by_state=count([link.state for link in links]),
                   by_mode=count([link.mode for link in links]),
                   by_peer=count([link.peer for link in links]),
                   alarms=count([a for link in links for a in link.alarms]),
                   pacing=pacing)


class HaStatus(_Status):
    """This node of a gateway pair under keepalived (docs/ha.md)."""

    node: str = Field(description="this node's name")
    role: str = Field(description="active (keys the links) or standby (holds no keys)")
    since: float = Field(description="when it took this role (Unix time)")
    reason: str = Field(description="why: what keepalived said, or why it starts standby")
    keepalived_state: str | None = Field(description="keepalived's last state notified"
                                         " (MASTER, BACKUP, FAULT, STOP), null: none yet")
    keepalived_instance: str | None = Field(description="the VRRP instance that said it")
    takeovers: int = Field(description="times this node became active since it started")


class SiteStatus(_Status):
    site: str = Field(description="the site's name")
    pid: int = Field(description="the daemon's process ID")
    uptime: float = Field(description="seconds since the daemon started")
    audit: AuditStatus = Field(description="the audit trail (docs/operations.md#audit-trail)")
    summary: Summary = Field(description="counts over all links (also with `?link=`)")
    links: list[LinkStatus] = Field(description="one entry per link (`GET /status?link=NAME`:"
                                                " that one)")
    peers: list[PeerChannelStatus] = Field(default_factory=list,
                                           description="one entry per peer gateway")
    ha: HaStatus | None = Field(default=None, description="this node of a pair under"
                                " keepalived; null when the site runs one gateway")


class Rekeying(_Status):
    """POST /rekey: the links asked to rekey now."""

    rekeying: list[str]


class Reloaded(_Status):
    """POST /reload: the configuration file read again and its differences applied."""

    config: str = Field(description="the configuration file")
    old_sha256: str = Field(description="SHA-256 of the file as the daemon ran it before")
    new_sha256: str = Field(description="SHA-256 of the file as read now")
    added: list[str] = Field(description="links started")
    removed: list[str] = Field(description="links stopped and cleaned up")
    changed: dict[str, list[str]] = Field(description="links whose policy, sinks or peer"
                                                      " address changed, and what changed")
    site: list[str] = Field(description="site-wide settings that changed")
    unchanged: int = Field(description="links left as they were")


class Handover(_Status):
    """POST /ha/handover: this node handed the site's addresses to the other one."""

    node: str = Field(description="this node, standby now")
    standby_after_ms: float = Field(description="from the handover's start until keepalived"
                                                " had made this node standby")


class Stopping(_Status):
    """POST /stop: the site that stops."""

    stopping: str


NESTED = (LinkStatus, KmsStatus, SupplyStatus, LastRekey, AuditStatus, PeerChannelStatus,
          Summary, PacingStatus, HaStatus)


def _shown(kind: object) -> tuple[str, type[BaseModel] | None]:
    """How a field's type reads in the docs, and the model inside it, if any."""
    args: tuple[object, ...] = getattr(kind, "__args__", ())
    model: type[BaseModel] | None = next((m for m in NESTED if m is kind), None)
    if model is not None:
        return "object", model
    if getattr(kind, "__origin__", None) is list:
        if args[0] is str:
            return "list of strings", None
        return "list of objects", next(m for m in NESTED if m is args[0])
    if getattr(kind, "__origin__", None) is dict:
        return f"object of {'integers' if args[1] is int else 'strings'}", None
    if type(None) in args:
        inner, nested = _shown(next(a for a in args if a is not type(None)))
        return f"{inner} or null", nested
    return getattr(kind, "__name__", str(kind)), None


def fields_table() -> str:
    """The status fields as a Markdown table (docs/operations.md embeds it)."""
    rows = ["| field | type | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            shown, nested = _shown(info.annotation)
            rows.append(f"| `{prefix}{name}` | {shown} | {info.description or ''} |")
            if nested is not None:
                walk(nested, f"{prefix}{name}{'[]' if shown.startswith('list') else ''}.")

    walk(SiteStatus, "")
    return "\n".join(rows)


if __name__ == "__main__":
    print(fields_table())

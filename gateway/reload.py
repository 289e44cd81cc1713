"""What a reload changes (`qkdgw reload`, SIGHUP): the difference between the configuration a
daemon runs and the file read again, or why that difference cannot be applied live.

Pure: two parsed configurations (and the digests of the certificate and key files they name)
in, a `Plan` or a `NotLive` refusal out. The daemon applies a plan (gateway/daemon.py); a
refusal changes nothing. What applies live and what does not is documented in
docs/operations.md ("Reloading the configuration").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import LinkConfig, SiteConfig

#: Site settings a running daemon cannot take, and why: each is bound when it starts.
NOT_LIVE = {
    "site": "the site's name is in every audit record, metric and log line",
    "state_dir": "it holds the running links' state, the lock and the admin socket",
    "kms": "the KME client (its URL, SAE ID, timeouts and TLS identity) is built at start",
    "peer_channel": "the peer channel listens, and presents this gateway's certificate,"
                    " from the start",
    "admin": "the admin socket is bound at start (a reload comes through it)",
    "metrics": "the metrics listener is bound at start",
    "audit_log": "the audit trail is open, and its chain continues in the same file",
    "ha": "the node's name and the files keepalived and the daemon share are bound at start",
}
#: Site settings a reload applies: the policy defaults (through each link's effective
#: policy), the KMS poll interval (from the next poll), the pacing limits (from the next
#: turn) and the links.
LIVE = ("policy", "kms_status_interval", "pacing", "links")
#: What makes a link what it is: both gateways bind its keys to these (the key schedule's
#: context), and the peer pins them. A link cannot change them while it runs.
IDENTITY = ("role", "peer.name", "peer.sae_id", "kem")
#: The certificate and key files a running daemon has loaded (`NOT_LIVE` says why); the
#: key source's, as its protocol has them (ETSI 014: ca, cert, key; SKIP: psk_file).
TLS_FILES = ("kms.ca", "kms.cert", "kms.key", "kms.psk_file", "peer_channel.ca",
             "peer_channel.cert", "peer_channel.key")


class NotLive(Exception):
    """The new configuration has changes a running daemon cannot apply; the message names
    each of them and why. Nothing was changed."""


@dataclass(frozen=True)
class LinkChange:
    """A link that stays, with something of it changed."""

    name: str
    #: What changed, as dotted field names (`policy.interval`, `sinks`, `peer.address`).
    what: tuple[str, ...]
    #: The link's effective policy changed (site defaults included).
    policy: bool
    #: What its sinks are built from changed: their configuration, or the key lifetimes and
    #: peer address they are given.
    sinks: bool
    #: Where the peer's channel listens changed.
    address: bool


@dataclass(frozen=True)
class Plan:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[LinkChange, ...]
    #: Site settings that changed (all of them live: `NOT_LIVE` ones refuse the plan).
    site: tuple[str, ...]
    unchanged: int


def tls_files(config: SiteConfig[Any]) -> dict[str, Path]:
    """The certificate and key files CONFIG names, by field (to hash them: a file replaced
    under the same name is a change too)."""
    return {name: path for name in TLS_FILES if (path := _get(config, name)) is not None}


def plan(old: SiteConfig[Any], new: SiteConfig[Any], *,
         old_files: dict[str, str], new_files: dict[str, str]) -> Plan:
    """What turns OLD into NEW; OLD_FILES and NEW_FILES are the digests of the `TLS_FILES`
    as the daemon loaded them and as they are now. Raises NotLive naming every change that
    needs a restart (or a link removed and added again)."""
    refused: list[str] = []
    site: list[str] = []
    old_dump, new_dump = old.model_dump(mode="json"), new.model_dump(mode="json")
    for key in sorted(set(old_dump) | set(new_dump)):
        if key == "links":
            continue
        changes = _differences(old_dump.get(key), new_dump.get(key), key)
        if key in LIVE:
            site += changes
        else:
            refused += [f"{c}: {NOT_LIVE.get(key, 'bound at start')}" for c in changes]
    for name in TLS_FILES:
        # (a file named differently is a change of its field, refused above)
        if _get(old, name) == _get(new, name) and old_files.get(name) != new_files.get(name):
            refused.append(f"{name}: the file {_get(new, name)} changed since it was loaded;"
                           " a new certificate or key takes a restart")
    olds = {link.name: link for link in old.links}
    news = {link.name: link for link in new.links}
    changed = []
    for name in [n for n in news if n in olds]:
        identity = [f"links.{name}.{c}" for c in _link_identity(olds[name], news[name])]
        if identity:
            refused += [f"{c}: a link's role, peer name, peer SAE ID and KEM cannot change"
                        " while it runs: remove the link (reload), then add it back"
                        " (reload)" for c in identity]
            continue
        change = _link_change(old, olds[name], new, news[name])
        if change is not None:
            changed.append(change)
    if refused:
        raise NotLive("not reloaded, nothing changed: these changes cannot be applied to the"
                      " running daemon (restart it for them, or undo them):\n"
                      + "\n".join(f"  {r}" for r in refused))
    return Plan(added=tuple(n for n in news if n not in olds),
                removed=tuple(n for n in olds if n not in news),
                changed=tuple(changed), site=tuple(site),
                unchanged=sum(1 for n in news if n in olds) - len(changed))


def _link_identity(old: LinkConfig[Any], new: LinkConfig[Any]) -> list[str]:
    return [name for name in IDENTITY if _get(old, name) != _get(new, name)]


def _link_change(old_site: SiteConfig[Any], old: LinkConfig[Any], new_site: SiteConfig[Any],
                 new: LinkConfig[Any]) -> LinkChange | None:
    old_policy, new_policy = old_site.link_policy(old), new_site.link_policy(new)
    what = [f"policy.{k}" for k, v in dataclasses.asdict(new_policy).items()
            if dataclasses.asdict(old_policy)[k] != v]
    address = old.peer.address != new.peer.address
    if address:
        what.append("peer.address")
    if old.sinks != new.sinks:
        what.append("sinks")
    # The sinks are built with the key lifetimes and the peer's address: rebuilt if either
    # changed, even with the same sink configuration.
    sinks = old.sinks != new.sinks or address \
        or old_site.lifetimes(old) != new_site.lifetimes(new)
    if not what:
        return None
    return LinkChange(new.name, tuple(what), policy=old_policy != new_policy, sinks=sinks,
                      address=address)


def _differences(old: Any, new: Any, where: str) -> list[str]:
    """The dotted names under WHERE at which OLD and NEW (JSON values) differ."""
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new))
                for c in _differences(old.get(k), new.get(k), f"{where}.{k}")]
    return [where]


def _get(model: Any, dotted: str) -> Any:
    """The field DOTTED names; None where the model has no such field."""
    for part in dotted.split("."):
        model = getattr(model, part, None)
    return model

"""What the two KMEs of one link answer, without I/O.

Handlers of the HTTP server call these methods with the SAE identified by its client
certificate and the time; a refusal is a `Refusal` carrying the ETSI 014 status and message.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from common.skip import SkipError
from common.text import quote_remote
from kms.models import Key, KeyContainer, KeyRequest, Status
from kms.sim.config import KmeConfig, LinkConfig
from kms.sim.link import LinkModel

#: Spec wording (§5.4) for an unknown or already delivered key ID.
KEYS_NOT_FOUND = "one or more keys specified are not found on KME"


class Refusal(Exception):
    """An ETSI 014 error answer: 400, 401 or 503 with an Error body; CLOSE: and the
    connection closed after it (the request was not read to its end)."""

    def __init__(self, status: int, message: str, details: Sequence[dict[str, object]] = (),
                 *, close: bool = False):
        self.status = status
        self.message = message
        self.details = list(details)
        self.close = close
        super().__init__(f"{status} {message}")


@dataclass(frozen=True)
class Reserved:
    """A key handed to the master SAE, waiting for the slave SAE to collect it."""

    material: bytes
    master: str
    slave: str
    expires: float


class LinkService:
    """The key pool of one QKD link and the keys reserved on it for slave SAEs."""

    def __init__(self, config: LinkConfig, now: float) -> None:
        self.config = config
        self.reset(now)

    def reset(self, now: float) -> None:
        c = self.config
        self.model = LinkModel(
            key_rate=c.key_rate,
            nominal_qber=c.qber,
            capacity_bits=c.max_key_count * c.key_size,
            start=now,
            stored_bits=float(c.initial_keys * c.key_size),
            half_life=c.ageing_half_life,
            outages=c.outages,
            qber_limit=c.qber_limit,
            drift=c.qber_drift,
            random_outages=c.random_outages,
            seed=c.seed,
            name=c.name,
            time_scale=c.time_scale,
        )
        self.reserved: OrderedDict[str, Reserved] = OrderedDict()
        self.handed_out = 0  # (the stored-counts-handed-out quirk)

    def stored_key_count(self, now: float) -> int:
        self.model.advance(now)
        if "stored-counts-handed-out" in self.config.quirks:
            return min(self.config.max_key_count, self.handed_out)
        return min(self.config.max_key_count, int(self.model.stored_bits // self.config.key_size))

    def link_extension(self, now: float) -> dict[str, object]:
        return {
            "link": self.config.name,
            "qber": round(self.model.qber_at(now), 6),
            "key_rate": round(self.model.rate_at(now), 3),
            "link_up": not self.model.in_outage(now),
        }

    def pending(self, now: float) -> int:
        self.expire(now)
        return len(self.reserved)

    def expire(self, now: float) -> None:
        while self.reserved:
            key_id, r = next(iter(self.reserved.items()))
            if r.expires > now:
                break
            del self.reserved[key_id]


class Network:
    """The simulated KMEs and the QKD links between them: what each KME answers each SAE."""

    def __init__(self, kmes: Sequence[KmeConfig], links: Sequence[LinkConfig], now: float):
        self.kmes = {k.id: k for k in kmes}
        self.kme_of = {sae: k for k in kmes for sae in k.saes}
        self.links = {link.name: LinkService(link, now) for link in links}
        self._between = {frozenset(s.config.kmes): s for s in self.links.values()}

    def reset(self, now: float) -> None:
        for link in self.links.values():
            link.reset(now)

    def quirks(self, kme: KmeConfig, other: str) -> tuple[str, ...]:
        """The quirks of the link between KME and OTHER's KME (none if there is none)."""
        peer = self.kme_of.get(other)
        link = self._between.get(frozenset((kme.id, peer.id))) if peer is not None else None
        return link.config.quirks if link is not None else ()

    def status(self, kme: KmeConfig, caller: str | None, slave: str, now: float) -> Status:
        link, peer, master = self._route(kme, caller, slave)
        c = link.config
        return Status(
            source_KME_ID=kme.id,
            target_KME_ID=peer.id,
            master_SAE_ID=master,
            slave_SAE_ID=slave,
            key_size=c.key_size,
            stored_key_count=link.stored_key_count(now),
            max_key_count=c.max_key_count,
            max_key_per_request=c.max_key_per_request,
            max_key_size=c.max_key_size,
            min_key_size=c.min_key_size,
            max_SAE_ID_count=0,
            status_extension=link.link_extension(now),
        )

    def enc_keys(
        self, kme: KmeConfig, caller: str | None, slave: str, request: KeyRequest, now: float
    ) -> KeyContainer:
        link, _, master = self._route(kme, caller, slave)
        c = link.config
        if request.unknown_fields():
            raise Refusal(400, "unknown member(s) in key request: "
                          + ", ".join(request.unknown_fields())
                          + " (§6.2 defines number, size, additional_slave_SAE_IDs,"
                          " extension_mandatory, extension_optional)")
        if request.additional_slave_SAE_IDs:
            raise Refusal(400, "key multicast is not supported (max_SAE_ID_count is 0)")
        if request.extension_mandatory:
            names = sorted({n for ext in request.extension_mandatory for n in ext})
            raise Refusal(400, "mandatory extension(s) not supported: " + ", ".join(names))
        number = request.number or 1
        size = request.size or c.key_size
        if number > c.max_key_per_request:
            raise Refusal(400, f"number {number} exceeds max_key_per_request"
                          f" ({c.max_key_per_request})")
        if not c.min_key_size <= size <= c.max_key_size:
            raise Refusal(400, f"size {size} is outside [{c.min_key_size}, {c.max_key_size}]"
                          " bits")
        if not link.model.take(number * size, now):
            raise Refusal(503, f"not enough key material: {number} key(s) of {size} bits"
                          f" requested, {int(link.model.stored_bits)} bits stored")
        link.expire(now)
        if "latest-batch-only" in c.quirks:
            link.reserved.clear()
        link.handed_out += number
        keys = []
        for _ in range(number):
            key_id = str(uuid.uuid4())
            material = secrets.token_bytes(size // 8)
            link.reserved[key_id] = Reserved(material, master, slave,
                                             now + c.reserved_key_ttl)
            keys.append(Key.model_construct(key_ID=key_id, key=_b64(material)))
        return KeyContainer.model_construct(keys=keys)

    def dec_keys(
        self, kme: KmeConfig, caller: str | None, master: str, key_ids: Sequence[str],
        now: float,
    ) -> KeyContainer:
        link, _, slave = self._route(kme, caller, master)
        link.expire(now)
        missing = [i for i in key_ids if i not in link.reserved]
        if missing:
            raise Refusal(400, KEYS_NOT_FOUND, [{"key_ID": i} for i in missing])
        for i in key_ids:
            r = link.reserved[i]
            if r.slave != slave or r.master != master:
                raise Refusal(401, f"key {i} was not issued to SAE {slave} by SAE {master}")
        delivered = [link.reserved.pop(i) for i in key_ids]
        return KeyContainer.model_construct(
            keys=[Key.model_construct(key_ID=i, key=_b64(r.material))
                  for i, r in zip(key_ids, delivered, strict=True)])

    # -- SKIP (draft-cisco-skip-02): each KME a Key Provider for its links of protocol skip --

    def skip_remotes(self, kme: KmeConfig) -> list[str]:
        """The Key Providers KME shares SKIP links with."""
        return sorted(k for s in self.links.values() if s.config.protocol == "skip"
                      and kme.id in s.config.kmes for k in s.config.kmes if k != kme.id)

    def skip_new_key(self, kme: KmeConfig, remote: str, bits: int, now: float
                     ) -> tuple[str, bytes]:
        """A new key of BITS shared with the Key Provider REMOTE: its ID and bytes; kept
        for REMOTE to fetch once."""
        link = self._skip_link(kme, remote)
        c = link.config
        if not c.min_key_size <= bits <= c.max_key_size:
            raise SkipError(400, f"size {bits} is outside [{c.min_key_size},"
                                 f" {c.max_key_size}] bits")
        if not link.model.take(bits, now):
            raise SkipError(503, f"not enough key material: {bits} bits requested,"
                                 f" {int(link.model.stored_bits)} stored")
        link.expire(now)
        if "latest-batch-only" in c.quirks:
            link.reserved.clear()
        link.handed_out += 1
        key_id, material = secrets.token_hex(16), secrets.token_bytes(bits // 8)
        link.reserved[key_id] = Reserved(material, kme.id, remote, now + c.reserved_key_ttl)
        return key_id, material

    def skip_key_by_id(self, kme: KmeConfig, remote: str, key_id: str, now: float) -> bytes:
        """The key REMOTE made under KEY_ID for KME, once."""
        link = self._skip_link(kme, remote)
        link.expire(now)
        r = link.reserved.get(key_id)
        if r is None or r.master != remote or r.slave != kme.id:
            raise SkipError(400, "key not found: no key of this ID waits here for"
                                 f" {quote_remote(remote, limit=64)}")
        del link.reserved[key_id]
        return r.material

    def _skip_link(self, kme: KmeConfig, remote: str) -> LinkService:
        link = self._between.get(frozenset((kme.id, remote))) if remote in self.kmes else None
        if link is None or link.config.protocol != "skip" or remote == kme.id:
            raise SkipError(400, f"no key is shared with {quote_remote(remote, limit=64)}:"
                                 f" Key Provider {kme.id} serves"
                                 f" {', '.join(self.skip_remotes(kme)) or 'no SKIP link'}")
        return link

    def _route(self, kme: KmeConfig, caller: str | None, other: str
               ) -> tuple[LinkService, KmeConfig, str]:
        """Authorise CALLER at KME and find the QKD link to the KME serving OTHER."""
        if caller is None:
            raise Refusal(401, "a client certificate is required")
        if caller not in kme.saes:
            raise Refusal(401, f"SAE {caller} is not served by KME {kme.id}")
        peer = self.kme_of.get(other)
        link = self._between.get(frozenset((kme.id, peer.id))) if peer is not None else None
        if peer is None or link is None:
            raise Refusal(401, f"SAE {other} has no QKD link with SAE {caller} at KME {kme.id}")
        return link, peer, caller


def _b64(material: bytes) -> str:
    return base64.b64encode(material).decode("ascii")

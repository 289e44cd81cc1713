"""A SKIP Key Provider's state, sans I/O: which epochs of which links it holds, which key IDs
it has handed out, and the answer to each request (common/skip.py parses them). The server
(TLS-PSK transport) and the sink that feeds it epochs are built on this.

Each link has one peer Key Provider: the other gateway, named by its localSystemID. A router
asks for a new key naming that peer; the answer is derived from the link's newest epoch
(kdf/skip.py), under a fresh key ID that names the epoch. The router at the other end asks
its own gateway for that ID, naming this one; that gateway derives the same bytes while it
holds the epoch. Each side hands each ID out once: a second request for it, or a request at
the side that made it, is the draft's 400. An epoch retired takes its keys with it: a request
for one of its IDs is 400 too, and the router asks for a new key.

The answers carry keys; `Provided`, what the caller logs and audits, carries the key ID and a
keyed fingerprint only.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from common.skip import (
    Capabilities,
    EntropyResponse,
    GetCapabilities,
    GetEntropy,
    KeyById,
    KeyResponse,
    NewKey,
    Request,
    SkipError,
)
from kdf.errors import KdfError
from kdf.fingerprint import fingerprint
from kdf.skip import SkipKeyId, skip_key

#: What the capabilities name as the algorithm (§4.1: at least 16 bytes must be supported).
ALGORITHM = "QKD+ML-KEM+X25519"
#: Key IDs one side hands out per epoch at most; more is refused (500) until the next epoch.
#: A router asks for one per IKE SA: a few per epoch. This bounds the record a hostile or
#: broken client could grow.
MAX_KEYS_PER_EPOCH = 10_000
#: Epochs a link holds at once: the current one and the one before it (make-before-break).
HELD_EPOCHS = 2


@dataclass(frozen=True)
class Provided:
    """A key handed out: for the audit trail and logs (never the key)."""

    link: str
    peer: str
    epoch: int
    key_id: str
    fingerprint: str
    bits: int
    origin: bool  # this side made the ID (a new key), else it answered the peer's


@dataclass
class _Epoch:
    root: bytes = field(repr=False)
    provided: set[bytes] = field(default_factory=set)


@dataclass
class _Link:
    name: str
    epochs: dict[int, _Epoch] = field(default_factory=dict)
    current: int | None = None  # the epoch new keys come from


class KeyProvider:
    """One gateway's Key Provider: LOCAL_SYSTEM_ID, and per peer Key Provider the link
    whose epochs key it."""

    def __init__(self, local_system_id: str, *,
                 entropy: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.local_system_id = local_system_id
        self._links: dict[str, _Link] = {}  # by the peer's localSystemID
        self._entropy = entropy

    # -- what the sink feeds it --------------------------------------------------------------

    def add_link(self, peer: str, link: str) -> None:
        self._links[peer] = _Link(link)

    def remove_link(self, peer: str) -> None:
        self._links.pop(peer, None)

    def install(self, peer: str, epoch: int, skip_root: bytes) -> None:
        """The link's epoch is held: the peer's key IDs of it are answered (the oldest
        beyond HELD_EPOCHS goes)."""
        link = self._links[peer]
        link.epochs.setdefault(epoch, _Epoch(skip_root))
        for old in sorted(link.epochs)[:-HELD_EPOCHS]:
            self.retire(peer, old)

    def activate(self, peer: str, epoch: int) -> None:
        """New keys come from EPOCH from now on. Called once this side switched to it: by
        then the peer holds it too (the responder installs before its Accept, the initiator
        before it switches), so a router at the other end finds every ID made here."""
        link = self._links[peer]
        if epoch in link.epochs:
            link.current = epoch

    def retire(self, peer: str, epoch: int) -> None:
        """The epoch's keys are gone: no key of it can be handed out any more."""
        link = self._links.get(peer)
        if link is not None:
            link.epochs.pop(epoch, None)
            if link.current == epoch:
                link.current = None

    def clear(self, peer: str) -> None:
        """The link is blocked (no valid key): none of its epochs serves any more."""
        link = self._links.get(peer)
        if link is not None:
            link.epochs.clear()
            link.current = None

    def epochs(self, peer: str) -> list[int]:
        link = self._links.get(peer)
        return sorted(link.epochs) if link else []

    # -- what routers ask ------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return Capabilities.model_validate({
            "entropy": True, "key": True, "algorithm": ALGORITHM,
            "localSystemID": self.local_system_id,
            "remoteSystemID": sorted(self._links) or [self.local_system_id]})

    def handle(self, request: Request) -> tuple[
            Capabilities | KeyResponse | EntropyResponse, Provided | None]:
        """The answer to REQUEST and, for a key, what was handed out; SkipError otherwise."""
        match request:
            case GetCapabilities():
                return self.capabilities(), None
            case GetEntropy(bits=bits):
                return EntropyResponse.model_validate(
                    {"randomStr": self._entropy(bits // 8).hex(), "minentropy": bits}), None
            case NewKey():
                return self._new_key(request, self._link(request.remote_system_id))
            case KeyById():
                return self._key_by_id(request, self._link(request.remote_system_id))

    def _link(self, peer: str) -> _Link:
        link = self._links.get(peer)
        if link is None:
            raise SkipError(400, f"no key is shared with {peer}: this Key Provider"
                                 f" ({self.local_system_id}) serves"
                                 f" {', '.join(sorted(self._links)) or 'no peer yet'}")
        return link

    def _new_key(self, request: NewKey, link: _Link) -> tuple[KeyResponse, Provided]:
        epoch = link.current
        if epoch is None:
            raise SkipError(500, f"link {link.name} has no key now: ask again once it has")
        held = link.epochs[epoch]
        if len(held.provided) >= MAX_KEYS_PER_EPOCH:
            raise SkipError(500, f"{MAX_KEYS_PER_EPOCH} keys handed out in epoch {epoch} of"
                                 f" link {link.name}: ask again after its next rekey")
        key_id = SkipKeyId.fresh(epoch, request.bits)
        key = skip_key(held.root, origin=self.local_system_id, peer=request.remote_system_id,
                       key_id=key_id)
        held.provided.add(key_id.raw)
        return self._answer(link, request.remote_system_id, key_id, key, origin=True)

    def _key_by_id(self, request: KeyById, link: _Link) -> tuple[KeyResponse, Provided]:
        try:
            key_id = SkipKeyId.parse(request.key_id)
        except KdfError as e:
            raise SkipError(400, f"malformed keyId: {e}") from None
        held = link.epochs.get(key_id.epoch)
        if held is None:
            raise SkipError(400, f"key not found: epoch {key_id.epoch} of link {link.name} is"
                                 " not held here (retired, or not yet keyed): ask for a new"
                                 " key")
        if key_id.raw in held.provided:
            raise SkipError(400, "key not found: this key ID was handed out here already")
        if len(held.provided) >= MAX_KEYS_PER_EPOCH:
            raise SkipError(500, f"{MAX_KEYS_PER_EPOCH} keys handed out in epoch"
                                 f" {key_id.epoch} of link {link.name}")
        key = skip_key(held.root, origin=request.remote_system_id, peer=self.local_system_id,
                       key_id=key_id)
        held.provided.add(key_id.raw)
        return self._answer(link, request.remote_system_id, key_id, key, origin=False)

    def _answer(self, link: _Link, peer: str, key_id: SkipKeyId, key: bytes,
                origin: bool) -> tuple[KeyResponse, Provided]:
        response = KeyResponse.model_validate({"keyId": key_id.hex, "key": key.hex()})
        return response, Provided(link=link.name, peer=peer, epoch=key_id.epoch,
                                  key_id=key_id.hex, fingerprint=fingerprint(key),
                                  bits=len(key) * 8, origin=origin)


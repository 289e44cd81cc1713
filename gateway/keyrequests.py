"""Many links' KME key requests, merged into few.

ETSI GS QKD 014 lets one enc_keys call ask for `number` keys and one dec_keys call name many
key IDs (§5.2, §5.3). A hub whose links all draw from the KME pair shared with one peer site
would otherwise make a request per link and epoch: each costs the KME, this daemon and the
peer daemon a TLS record round and an HTTP parse (bench/fleet.py). Here, per KME request
kind, peer SAE and key size, up to IN_FLIGHT requests are in flight at a time; links that
ask while they are wait and go together in the next one, up to MAX_KEYS_PER_REQUEST keys
(fewer if the KME's status says so). Below that load a request goes out at once: nothing
waits for company, and a link's exchange is not held up by another's.

A merged request that the KME answers with an error (it refused, or its answer is malformed)
is asked again for each link alone, so one link's bad key ID or a short supply fails only
the links it concerns. A transport failure (no connection, timeout) fails every link of the
request: asking again per link would only multiply the wait on a KME that is not there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from gateway.pacing import Pacer
from kms.errors import KmsError, KmsHttpError, KmsProtocolError
from kms.models import QkdKey
from kms.source import KeySource

log = logging.getLogger("gateway")

#: Keys in one merged request, at most: ETSI 014 KMEs advertise their own maximum
#: (`max_key_per_request`, often 128 or more); 32 keeps one answer a few KB and one failure
#: from touching more than 32 links.
MAX_KEYS_PER_REQUEST = 32
#: Requests in flight per kind, peer SAE and size: a few, so that a link at light load does
#: not wait for another's round trip (an exchange at a 0.25 s interval would miss its
#: schedule), while under load the rest merge. Every request also takes a pacer turn.
IN_FLIGHT = 4

Kind = Literal["enc_keys", "dec_keys"]


@dataclass(eq=False)
class _Wanted:
    """One link's request: NUMBER new keys (enc_keys) or the keys KEY_IDS (dec_keys)."""

    number: int
    key_ids: tuple[str, ...]
    deadline: float
    future: asyncio.Future[tuple[QkdKey, ...]]


@dataclass(eq=False)
class _Queue:
    wanted: list[_Wanted] = field(default_factory=list)  # not yet in a request
    senders: set[asyncio.Task[None]] = field(default_factory=set)


class KeyRequests:
    """The daemon's key requests to its KME (CLIENT), merged per kind, peer SAE and size,
    each merged request taking a turn of PACER."""

    def __init__(self, client: KeySource, pacer: Pacer,
                 max_keys: Callable[[str], int | None] = lambda peer: None) -> None:
        self.client, self.pacer = client, pacer
        self._max_keys = max_keys  # the KME's max_key_per_request for a peer, if known
        self._queues: dict[tuple[Kind, str, int | None], _Queue] = {}
        self.waiting = 0  # links waiting for their keys (in a request or for the next)

    async def enc_keys(self, peer: str, number: int, size: int | None,
                       deadline: float) -> tuple[QkdKey, ...]:
        """NUMBER new keys shared with PEER (enc_keys, as the master SAE)."""
        return await self._ask("enc_keys", peer, size, _Wanted(number, (), deadline,
                                                                self._future()))

    async def dec_keys(self, peer: str, key_ids: Sequence[str], size: int | None,
                       deadline: float) -> tuple[QkdKey, ...]:
        """The keys KEY_IDS that PEER obtained (dec_keys, as the slave SAE), in that order."""
        ids = tuple(key_ids)
        return await self._ask("dec_keys", peer, size, _Wanted(len(ids), ids, deadline,
                                                                self._future()))

    def close(self) -> None:
        """Cancel the requests in flight (the daemon stops)."""
        for q in self._queues.values():
            for task in q.senders:
                task.cancel()
            for w in q.wanted:
                w.future.cancel()
        self._queues.clear()

    @staticmethod
    def _future() -> asyncio.Future[tuple[QkdKey, ...]]:
        return asyncio.get_running_loop().create_future()

    async def _ask(self, kind: Kind, peer: str, size: int | None,
                   wanted: _Wanted) -> tuple[QkdKey, ...]:
        key = (kind, peer, size)
        q = self._queues.setdefault(key, _Queue())
        q.wanted.append(wanted)
        if len(q.senders) < IN_FLIGHT:
            task = asyncio.create_task(self._serve(key, q), name=f"{kind}-{peer}")
            q.senders.add(task)
        self.waiting += 1
        try:
            return await wanted.future
        finally:
            self.waiting -= 1
            if not wanted.future.done():  # (cancelled: it no longer waits)
                wanted.future.cancel()
            if wanted in q.wanted:
                q.wanted.remove(wanted)

    async def _serve(self, key: tuple[Kind, str, int | None], q: _Queue) -> None:
        """Send Q's requests, merged, until none is left; every failure goes to the links
        it concerns (this task never ends with an exception of its own)."""
        kind, peer, size = key
        try:
            while batch := self._take(q, peer):
                try:
                    async with self.pacer.turn("", min(w.deadline for w in batch)):
                        alone = await self._merged(kind, peer, size, batch)
                    if alone:
                        # The KME refused the merged request or answered it wrongly, or a
                        # key ID is not one (ValueError, before sending): each link alone,
                        # at once, so that the failure stays with the links it concerns.
                        log.info("KME %s %s for %d links failed; asking for each link alone",
                                 kind, peer, len(batch))
                        await asyncio.gather(*(self._alone(kind, peer, size, w)
                                               for w in batch))
                except Exception as e:  # each link of the request is told
                    for w in batch:
                        if not w.future.done():
                            w.future.set_exception(e)
                except BaseException:  # cancelled: the daemon stops
                    for w in batch:
                        w.future.cancel()
                    raise
        finally:
            q.senders.discard(asyncio.current_task())
            if not q.senders and not q.wanted and self._queues.get(key) is q:
                del self._queues[key]

    def _take(self, q: _Queue, peer: str) -> list[_Wanted]:
        """The next request's links, taken from Q: earliest deadline first, up to the key
        limit, no key ID twice (a second link naming the same ID waits for the next)."""
        q.wanted[:] = [w for w in q.wanted if not w.future.done()]
        limit = min(MAX_KEYS_PER_REQUEST, self._max_keys(peer) or MAX_KEYS_PER_REQUEST)
        batch: list[_Wanted] = []
        keys, ids = 0, set[str]()
        for w in sorted(q.wanted, key=lambda w: w.deadline):
            if batch and (keys + w.number > limit or ids.intersection(w.key_ids)):
                continue
            batch.append(w)
            keys += w.number
            ids.update(w.key_ids)
        for w in batch:
            q.wanted.remove(w)
        return batch

    async def _merged(self, kind: Kind, peer: str, size: int | None,
                      batch: list[_Wanted]) -> bool:
        """One request for BATCH; True if each link must now ask alone."""
        try:
            keys = await self._call(kind, peer, size, batch)
        except (KmsHttpError, KmsProtocolError, ValueError):
            if len(batch) == 1:
                raise
            return True
        at = 0
        for w in batch:
            mine, at = keys[at:at + w.number], at + w.number
            if not w.future.done():
                w.future.set_result(mine)
        return False

    async def _alone(self, kind: Kind, peer: str, size: int | None, w: _Wanted) -> None:
        """W's request by itself, with a turn of its own; its failure is its own."""
        if w.future.done():
            return
        try:
            async with self.pacer.turn("", w.deadline):
                keys = await self._call(kind, peer, size, [w])
        except (KmsError, ValueError) as e:
            if not w.future.done():
                w.future.set_exception(e)
        else:
            if not w.future.done():
                w.future.set_result(keys)

    async def _call(self, kind: Kind, peer: str, size: int | None,
                    batch: list[_Wanted]) -> tuple[QkdKey, ...]:
        if kind == "enc_keys":
            got = await self.client.enc_keys(peer, sum(w.number for w in batch), size)
        else:
            got = await self.client.dec_keys(peer, [i for w in batch for i in w.key_ids],
                                             size=size)
        return got.keys

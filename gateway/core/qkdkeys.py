"""The QKD keys of one link: those fetched ahead for the next epoch, and the IDs already used.

One key ahead: the initiator fetches the next epoch's key (enc_keys) during the current
exchange and names it in the Commit; the responder fetches its copy (dec_keys) right after.
The next exchange then waits for neither KME. A key ID is used once: every ID this link used
or discarded is remembered (bounded) and refused ever after.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from gateway.core.events import Action, Cause, Record, RecordKind
from gateway.core.snapshot import USED_KEY_IDS_PERSISTED
from kms.models import QkdKey

#: Key IDs remembered to refuse their reuse. A QKD key is used once; this many covers days of
#: rekeys at a one-minute cadence, and the KME refuses reuse as well.
USED_KEY_IDS_REMEMBERED = 4096


class UsedKeyIds:
    def __init__(self) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, ids: Iterable[str]) -> None:
        for key_id in ids:
            self._ids[key_id] = None
        while len(self._ids) > USED_KEY_IDS_REMEMBERED:
            self._ids.popitem(last=False)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._ids

    def last(self) -> str | None:
        return next(reversed(self._ids), None)

    def recent(self) -> list[str]:
        """What a snapshot keeps (the KME refuses older ones anyway)."""
        return list(self._ids)[-USED_KEY_IDS_PERSISTED:]


class KeysAhead:
    """The next epoch's QKD keys: held, or being fetched by one request."""

    def __init__(self) -> None:
        self.keys: tuple[QkdKey, ...] = ()
        self.request: int | None = None  # the fetch in flight
        self.ids: tuple[str, ...] = ()  # R: the IDs that fetch asks for
        self.announced_in = 0  # I: the epoch whose Commit announces them

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(k.key_id for k in self.keys)

    def busy(self) -> bool:
        """Held or being fetched: no second fetch."""
        return bool(self.keys) or self.request is not None

    def fetching(self, request: int, ids: tuple[str, ...] = (), announced_in: int = 0) -> None:
        self.request, self.ids, self.announced_in = request, ids, announced_in

    def arrived(self, keys: tuple[QkdKey, ...]) -> None:
        self.request, self.ids, self.keys = None, (), keys

    def given_up(self) -> None:
        """The fetch failed, or an exchange took it over: nothing in flight any more."""
        self.request, self.ids = None, ()

    def take(self) -> tuple[QkdKey, ...]:
        keys, self.keys = self.keys, ()
        return keys

    def drop(self, used: UsedKeyIds, why: str) -> list[Action]:
        """Discard the keys held (never to be used: their IDs are remembered)."""
        keys = self.take()
        if not keys:
            return []
        ids = tuple(k.key_id for k in keys)
        used.add(ids)
        return [Record(RecordKind.DISCARDED, 0, key_ids=ids, cause=Cause.DROPPED,
                       detail=f"key fetched ahead: {why}")]

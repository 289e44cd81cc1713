"""The machine's QKD side: the key fetched ahead for the next epoch (started, arrived,
failed, dropped) and what the KMS's status polls say (a link down or a high QBER drops the
key held ahead; the return of QKD ends a PQC-only stretch at once in pqc-fallback mode).
"""

from __future__ import annotations

from common.sink import Role
from gateway.core.events import (
    Action,
    Alarm,
    Cause,
    FetchQkdKeys,
    FetchQkdKeysById,
    KmsStatusObserved,
    KmsUnreachable,
    QkdFetchFailed,
    QkdKeysFetched,
    Record,
    RecordKind,
    Send,
)
from gateway.core.link import LinkCore
from gateway.core.policy import Mode
from gateway.core.table import State


class QkdHandlers(LinkCore):
    def _fetch_ahead(self, now: float, key_ids: tuple[str, ...] = ()) -> list[Action]:
        """Start fetching the next epoch's QKD key: the initiator new ones (enc_keys), the
        responder those the initiator announced (dec_keys)."""
        if not self.policy.prefetch or self.next_keys.busy() or not self.kms.usable(now):
            return []
        if self.role is Role.INITIATOR and not self.kms.may_draw(now):
            return []  # its share has no key to spare: the next exchange asks again
        self._request += 1
        if self.role is Role.INITIATOR:
            self.kms.drew(now)
            self.next_keys.fetching(self._request, announced_in=self.max_epoch)
            return [FetchQkdKeys(self._request, 1, self.policy.qkd_key_bits)]
        self.next_keys.fetching(self._request, key_ids)
        return [FetchQkdKeysById(self._request, key_ids, self.policy.qkd_key_bits)]

    def _drop_ahead(self, why: str) -> list[Action]:
        return self.next_keys.drop(self.used, why)

    def _keys_arrived(self, event: QkdKeysFetched, now: float) -> list[Action]:
        ids = tuple(k.key_id for k in event.keys)
        if event.request != self.next_keys.request:
            return self._stale_keys(event, now)
        self.next_keys.arrived(event.keys)
        self.consumed += len(event.keys)
        out: list[Action] = [Record(RecordKind.FETCHED, self.max_epoch + 1, key_ids=ids,
                                    detail="ahead, for the next epoch")]
        a = self.attempt
        if self.state is State.COMMITTED and a is not None and a.commit is not None \
                and not a.commit.next_key_ids:
            # The Commit left before these keys came: send it again with their IDs
            # (a duplicate Commit is answered like any other; the hint rides along).
            a.commit = a.commit.model_copy(update={"next_key_ids": ids})
            out.append(Send(a.commit))
        return out

    def _stale_keys(self, event: QkdKeysFetched, now: float) -> list[Action]:
        ids = tuple(k.key_id for k in event.keys)
        self.used.add(ids)
        return [Record(RecordKind.DISCARDED, 0, key_ids=ids, cause=Cause.ABANDONED,
                       detail="fetched for an abandoned exchange")]

    def _prefetch_failed(self, event: QkdFetchFailed, now: float) -> list[Action]:
        if event.request != self.next_keys.request:
            return []
        self.next_keys.given_up()
        return [Record(RecordKind.DISCARDED, self.max_epoch + 1, cause=Cause.KMS,
                       detail="fetching ahead failed:"
                       f" {event.reason}")]

    def _kms_status(self, event: KmsStatusObserved, now: float) -> list[Action]:
        was_ok = self.kms.ok
        problem = self.kms.observe(event, now, self.consumed, self.policy.qber_threshold,
                                   self.policy.reserve_keys)
        if problem is not None:
            return self._drop_ahead(problem) + self._alarm(Alarm.KMS_UNAVAILABLE, problem)
        out = self._clear(Alarm.KMS_UNAVAILABLE)
        o = self.keys.outbound
        if not was_ok and self.role is Role.INITIATOR and self.state is State.IDLE \
                and o is not None and not o.suite.qkd and self.policy.mode is Mode.PQC_FALLBACK:
            self.next_rekey_at = now  # back to QKD at the first chance
        return out

    def _kms_unreachable(self, event: KmsUnreachable, now: float) -> list[Action]:
        self.kms.unreachable(event.reason)
        return self._alarm(Alarm.KMS_UNAVAILABLE, event.reason)

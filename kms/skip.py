"""A SKIP Key Provider (draft-cisco-skip-02) as the gateway's key source, the gateway its
encryptor: `enc_keys` is `GET /key?remoteSystemID=PEER` once per key, `dec_keys` is
`GET /key/{keyId}?remoteSystemID=PEER` once per ID, and the status is the Key Provider's
`GET /capabilities`, which names it and the systems it shares keys with, but gives no pool
figures (they are None: unknown).

PEER is the other Key Provider's localSystemID: a link's `peer.sae_id` when the site's `kms`
speaks SKIP. Over TLS-PSK (common/psktls.py), one connection per request as routers make
them. Answers are checked as the ETSI client checks its own: a key of the size asked for, the
ID asked for, never a key in an error or a log.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Self, TypeVar
from urllib.parse import quote

from pydantic import ValidationError

from common.psktls import ClientContext
from common.skip import Capabilities, KeyResponse
from common.skip_client import SkipClient, SkipClientError
from common.text import quote_remote
from kms.client import KeyBatch, RetryPolicy, Timeouts, describe_invalid
from kms.errors import (
    KmsBadRequest,
    KmsConnectionError,
    KmsError,
    KmsHttpError,
    KmsProtocolError,
    KmsUnauthorized,
    KmsUnavailable,
)
from kms.models import QkdKey, SourceStatus

#: Keys one enc_keys call takes at most (one request each): what the status reports as
#: `max_key_per_request`, so the gateway batches no more.
MAX_KEYS_PER_CALL = 16
#: §4.2.2: the size of a key when none is asked for.
DEFAULT_KEY_BITS = 256

T = TypeVar("T")


class SkipKeySource:
    def __init__(self, host: str, port: int, tls: ClientContext, local_system_id: str, *,
                 timeouts: Timeouts, retry: RetryPolicy) -> None:
        self.name = f"SKIP Key Provider {host}:{port}"
        self.client = SkipClient(host, port, tls)
        self.local_system_id = local_system_id
        self.timeouts, self.retry = timeouts, retry

    @property
    def max_call_seconds(self) -> float:
        """Every request ends within the total timeout; enc_keys and dec_keys make one per
        key, at most MAX_KEYS_PER_CALL; status and dec_keys retry with backoff."""
        attempts = self.retry.attempts
        per = attempts * self.timeouts.total + (attempts - 1) * self.retry.max_backoff
        return MAX_KEYS_PER_CALL * per

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Nothing held: a connection per request."""

    async def source_status(self, peer: str) -> SourceStatus:
        status, body = await self._retried(functools.partial(self._get, "status",
                                                             "/capabilities"))
        if status != 200:
            raise self._refusal("status", status, body)
        try:
            caps = Capabilities.model_validate(body)
        except ValidationError as e:
            raise KmsProtocolError(self.name, "status", f"malformed capabilities:"
                                   f" {describe_invalid(e)}") from None
        if caps.local_system_id != self.local_system_id:
            raise KmsProtocolError(self.name, "status", "the Key Provider is"
                                   f" {quote_remote(caps.local_system_id, limit=64)}, not"
                                   f" {self.local_system_id} as configured")
        if not caps.key:
            raise KmsUnavailable(self.name, "status", 503, "the Key Provider serves no keys"
                                 " (capabilities: key false)")
        if not caps.reaches(peer):
            raise KmsUnauthorized(self.name, "status", 401, f"the Key Provider shares no keys"
                                  f" with {peer} (remoteSystemID:"
                                  f" {', '.join(caps.remote_system_id)})")
        return SourceStatus(kme_id=self.local_system_id, peer_kme_id=peer,
                            master=self.local_system_id, slave=peer,
                            key_size=DEFAULT_KEY_BITS, stored_key_count=None,
                            max_key_per_request=MAX_KEYS_PER_CALL)

    async def enc_keys(self, peer: str, number: int = 1, size: int | None = None
                       ) -> KeyBatch:
        """NUMBER new keys shared with PEER; not retried (each request makes a key)."""
        if not 1 <= number <= MAX_KEYS_PER_CALL:
            raise ValueError(f"number must be from 1 to {MAX_KEYS_PER_CALL}")
        bits = size or DEFAULT_KEY_BITS
        keys = []
        for _ in range(number):
            status, body = await self._get("enc_keys", "/key", {
                "remoteSystemID": peer, **({"size": str(size)} if size else {})})
            keys.append(self._key("enc_keys", status, body, bits, None))
        return KeyBatch(tuple(keys))

    async def dec_keys(self, peer: str, key_ids: Sequence[str], *,
                       size: int | None = None) -> KeyBatch:
        """The keys PEER made under KEY_IDS (each once: a second time is 400)."""
        if not 1 <= len(key_ids) <= MAX_KEYS_PER_CALL:
            raise ValueError(f"from 1 to {MAX_KEYS_PER_CALL} key IDs")
        keys = []
        for key_id in key_ids:
            status, body = await self._retried(functools.partial(
                self._get, "dec_keys", f"/key/{quote(key_id, safe='')}", {"remoteSystemID": peer}))
            keys.append(self._key("dec_keys", status, body, size, key_id))
        return KeyBatch(tuple(keys))

    # -- helpers ----------------------------------------------------------------------------

    async def _get(self, operation: str, path: str, query: dict[str, str] | None = None
                   ) -> tuple[int, dict[str, Any]]:
        try:
            async with asyncio.timeout(self.timeouts.total):
                return await self.client.get(path, query)
        except (SkipClientError, TimeoutError) as e:
            raise KmsConnectionError(self.name, operation, str(e) or "no answer within"
                                     f" {self.timeouts.total:g} s") from None

    async def _retried(self, call: Callable[[], Awaitable[T]]) -> T:
        """CALL, again after a connection failure (RetryPolicy's attempts and backoff)."""
        attempt = 1
        while True:
            try:
                return await call()
            except KmsConnectionError:
                if attempt >= self.retry.attempts:
                    raise
            await asyncio.sleep(self.retry.delay(attempt))
            attempt += 1

    def _key(self, operation: str, status: int, body: dict[str, Any], bits: int | None,
             key_id: str | None) -> QkdKey:
        if status != 200:
            raise self._refusal(operation, status, body)
        try:
            answer = KeyResponse.model_validate(body)
        except ValidationError as e:
            raise KmsProtocolError(self.name, operation, f"malformed key answer:"
                                   f" {describe_invalid(e)}") from None
        key = answer.key_bytes
        if bits is not None and len(key) * 8 != bits:
            raise KmsProtocolError(self.name, operation, f"a key of {len(key) * 8} bits, not"
                                   f" the {bits} asked for")
        if key_id is not None and answer.key_id.lower() != key_id.lower():
            raise KmsProtocolError(self.name, operation, "the key of another ID than the one"
                                   " asked for")
        return QkdKey(answer.key_id, key)

    def _refusal(self, operation: str, status: int, body: dict[str, Any]) -> KmsError:
        reason = body.get("error") or body.get("message") or "no reason given"
        message = reason if isinstance(reason, str) else "a reason that is not text"
        kind: type[KmsHttpError] = {400: KmsBadRequest, 401: KmsUnauthorized,
                                    500: KmsUnavailable, 503: KmsUnavailable
                                    }.get(status, KmsHttpError)
        return kind(self.name, operation, status, message)


"""Async ETSI GS QKD 014 v1.1.1 client over mutual TLS.

    async with KmeClient("https://kme-a:8441", ca=..., cert=..., key=...) as kme:
        batch = await kme.enc_keys("sae-b", number=1, size=256)   # as master SAE
        same = await peer_kme.dec_keys("sae-a", batch.key_ids)    # as slave SAE

Every answer is validated before a key leaves this module: a container must hold exactly the
keys asked for, of exactly the size asked for, with unique UUID key IDs, in canonical base64.
Anything else is a `KmsProtocolError`, never a key.

Retries (`RetryPolicy`), by what a repeat can cost:
- `status` is read-only: retried after any transport failure and after 503.
- `enc_keys` reserves fresh keys at the KME each time it is served. It is retried only when
  the KME provably served nothing: the connection could not be made, or it answered 503.
  A timeout or disconnect after the request went out is not retried: the KME may have
  reserved keys whose IDs we never saw. Those keys are orphaned (the slave never asks for
  them; the KME ages them out) and the caller's next attempt takes fresh ones. Retrying would
  orphan more keys per failure and hide the fault; the error says `request_sent=True`.
- `dec_keys` hands over keys that already exist and removes them from the KME. A repeat cannot
  consume anything new, so it is retried after transport failures too; if the repeat is told
  the keys are gone (400), the error says an earlier answer may have been lost in transit.

A hostile or broken KME cannot hold a call or steer it elsewhere: every attempt ends within
`Timeouts.total` however the answer trickles in, so a whole call ends within
`KmeClient.max_call_seconds`; redirects are never followed (a 3xx is a `KmsProtocolError`,
since ETSI 014 specifies only 200, 400, 401 and 503, and following one could send the request
to, and take keys from, a server nobody authenticated). Whatever the KME controls that ends
up in an error or a log line is escaped (`kms.errors.quote_remote`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self, TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ValidationError

from common.text import quote_remote
from common.tlsctx import client_context
from kms.errors import (
    HTTP_ERRORS,
    KmsConnectionError,
    KmsError,
    KmsHttpError,
    KmsProtocolError,
    KmsTimeout,
    KmsTlsError,
)
from kms.models import (
    Error,
    Expect,
    Extension,
    KeyContainer,
    KeyIds,
    KeyRequest,
    QkdKey,
    SourceStatus,
    Status,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Method = Literal["GET", "POST"]

#: Largest answer we read. 128 keys of 8192 bits in base64 are ~180 KiB; anything near a MiB
#: is a broken or hostile KME, and reading it whole would let it exhaust our memory.
MAX_RESPONSE_BYTES = 1 << 20

#: The statuses ETSI GS QKD 014 v1.1.1 specifies; any other is the KME's own invention.
ETSI_STATUSES = frozenset({200, 400, 401, 503})

#: Unknown member names warned about per client; past it a KME inventing names cannot
#: flood the log or grow our memory.
MAX_WARNED = 32


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number of seconds")


@dataclass(frozen=True)
class Timeouts:
    """Seconds, for each attempt of a call.

    `connect` covers TCP + TLS; `read` is the longest wait for any chunk of the answer;
    `total` bounds the whole attempt: connecting, sending, and reading the answer to its last
    byte. Without it a KME that sends a byte just inside `read` each time holds a call for as
    long as it likes. 15 s: a KME answers in milliseconds and even a 1 MiB answer over a slow
    WAN takes a few seconds, while the gateway's rekey and status intervals are tens of
    seconds, so a stuck attempt is cut well before the next one is due.
    """

    connect: float = 3.0
    read: float = 10.0
    total: float = 15.0

    def __post_init__(self) -> None:
        for name in ("connect", "read", "total"):
            _positive(name, getattr(self, name))
        if self.connect > self.total or self.read > self.total:
            raise ValueError("total must be at least connect and read: it bounds both")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; `attempts` counts the first try (1 to 10)."""

    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= 10:
            raise ValueError("attempts must be from 1 to 10")
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number of seconds, 0 or more")

    def delay(self, attempt: int) -> float:
        jitter = random.uniform(0.5, 1.0)  # noqa: S311 (spreads retries; not a secret)
        return min(self.max_backoff, self.backoff * 2.0**attempt) * jitter


@dataclass(frozen=True)
class KeyBatch:
    """Keys delivered by one enc_keys or dec_keys call, in request order for dec_keys."""

    keys: tuple[QkdKey, ...]
    extension: Extension | None = None

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(k.key_id for k in self.keys)


class _Ambiguous(Exception):
    """A transport failure after the request may have reached the KME."""

    def __init__(self, error: KmsError) -> None:
        self.error = error


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


_UNSPECIFIED = " (a status ETSI GS QKD 014 does not specify)"

#: Where aiohttp starts quoting the bytes it could not parse.
_QUOTED_BYTES = re.compile(r"\n|b'|b\"|bytearray\(|<RawResponseMessage")


def _wire_problem(e: BaseException) -> str:
    """What went wrong on the wire, without the bytes aiohttp quotes in its errors: an
    answer that fails to parse may be a key container, and its keys must not reach a log."""
    text = e.message if isinstance(e, aiohttp.ClientResponseError) else str(e)
    text = _QUOTED_BYTES.split(str(text), maxsplit=1)[0].strip().rstrip(":(").strip()
    return quote_remote(text or type(e).__name__, limit=120)


def describe_invalid(error: ValidationError) -> str:
    """The first problems of a rejected answer, escaped: locations and messages can carry
    member names the KME chose."""
    parts = []
    for e in error.errors(include_url=False, include_input=False, include_context=False)[:3]:
        where = quote_remote(".".join(str(p) for p in e["loc"]) or "body", limit=80)
        parts.append(f"{where}: {quote_remote(e['msg'].removeprefix('Value error, '))}")
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


class KmeClient:
    """Client of one KME, as one SAE (the identity in the client certificate)."""

    def __init__(
        self,
        url: str,
        *,
        ca: Path,
        cert: Path,
        key: Path,
        timeouts: Timeouts = Timeouts(),
        retry: RetryPolicy = RetryPolicy(),
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.url = url.rstrip("/")
        self._ssl = client_context(ca, cert, key)
        self._timeouts = timeouts
        self._retry = retry
        self._max_bytes = max_response_bytes
        self._session: aiohttp.ClientSession | None = None
        self._default_size: dict[str, int] = {}
        self._warned: set[tuple[str, str]] = set()

    @property
    def max_call_seconds(self) -> float:
        """The longest one call can take: every attempt ends within `Timeouts.total`, and
        at most `max_backoff` passes between two. (enc_keys without a size first asks the
        KME's status, once per peer: that is a second call.)"""
        attempts = self._retry.attempts
        return attempts * self._timeouts.total + (attempts - 1) * self._retry.max_backoff

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=16),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=self._timeouts.connect,
                    sock_read=self._timeouts.read,
                ),
                raise_for_status=False,
            )
        return self._session

    # -- the three ETSI 014 calls -------------------------------------------------------

    async def status(self, peer_sae_id: str) -> Status:
        """§5.1 Get status, as master of PEER_SAE_ID."""
        raw = await self._call("status", "GET", peer_sae_id, "status", retry_sent=True)
        result = self._parse(raw, Status, "status")
        self._default_size[peer_sae_id] = result.key_size
        return result

    async def source_status(self, peer_sae_id: str) -> SourceStatus:
        """The status as the gateway reads any key source's (kms/source.py)."""
        return SourceStatus.of(await self.status(peer_sae_id))

    async def enc_keys(
        self,
        slave_sae_id: str,
        number: int = 1,
        size: int | None = None,
        *,
        method: Method = "POST",
        extension_mandatory: Sequence[Extension] = (),
        extension_optional: Sequence[Extension] = (),
    ) -> KeyBatch:
        """§5.2 Get key: NUMBER new keys of SIZE bits (the KME's default if None) shared with
        SLAVE_SAE_ID. The GET form carries only number and size."""
        if number < 1:
            raise ValueError("number must be at least 1")
        if size is not None and (size < 8 or size % 8):
            raise ValueError("size is in bits: a positive multiple of 8")
        expected_size = size if size is not None else await self._kme_default_size(slave_sae_id)
        params: dict[str, str] | None = None
        body: dict[str, Any] | None = None
        if method == "GET":
            if extension_mandatory or extension_optional:
                raise ValueError("extensions need the POST form of enc_keys")
            params = {"number": str(number)}
            if size is not None:
                params["size"] = str(size)
        else:
            request = KeyRequest(
                number=number,
                size=size,
                extension_mandatory=list(extension_mandatory) or None,
                extension_optional=list(extension_optional) or None,
            )
            body = request.model_dump(exclude_none=True)
        raw = await self._call(
            "enc_keys", method, slave_sae_id, "enc_keys", params=params, body=body,
            retry_sent=False,
        )
        container = self._parse(
            raw, KeyContainer, "enc_keys", Expect(size_bits=expected_size, count=number)
        )
        batch = KeyBatch(tuple(QkdKey.from_wire(k) for k in container.keys),
                         container.key_container_extension)
        log.debug("enc_keys %s: %d key(s) %s", slave_sae_id, number, ", ".join(batch.key_ids))
        return batch

    async def dec_keys(
        self,
        master_sae_id: str,
        key_ids: Sequence[str],
        *,
        size: int | None = None,
        method: Method = "POST",
    ) -> KeyBatch:
        """§5.3 Get key with key IDs: the keys MASTER_SAE_ID obtained with enc_keys.

        SIZE, when known (it is, from the peer's offer), is checked on every key. The GET form
        carries a single key_ID."""
        ids = tuple(key_ids)
        if not ids:
            raise ValueError("at least one key ID is needed")
        try:
            KeyIds.model_validate({"key_IDs": [{"key_ID": i} for i in ids]})
        except ValidationError as e:
            raise ValueError(f"bad key IDs: {describe_invalid(e)}") from None
        params: list[tuple[str, str]] | None = None
        body: dict[str, Any] | None = None
        if method == "GET":
            if len(ids) != 1:
                raise ValueError("the GET form of dec_keys carries one key_ID; use POST")
            params = [("key_ID", ids[0])]
        else:
            body = {"key_IDs": [{"key_ID": i} for i in ids]}
        raw = await self._call(
            "dec_keys", method, master_sae_id, "dec_keys", params=params, body=body,
            retry_sent=True,
        )
        container = self._parse(
            raw, KeyContainer, "dec_keys", Expect(size_bits=size, count=len(ids), key_ids=ids)
        )
        by_id = {k.key_ID: QkdKey.from_wire(k) for k in container.keys}
        log.debug("dec_keys %s: %s", master_sae_id, ", ".join(ids))
        return KeyBatch(tuple(by_id[i] for i in ids), container.key_container_extension)

    # -- transport ----------------------------------------------------------------------

    async def _kme_default_size(self, peer: str) -> int:
        if peer not in self._default_size:
            await self.status(peer)
        return self._default_size[peer]

    async def _call(
        self,
        operation: str,
        method: Method,
        sae_id: str,
        endpoint: str,
        *,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        body: Mapping[str, Any] | None = None,
        retry_sent: bool,
    ) -> bytes:
        """The body of a 200 answer, after the retries RETRY_SENT allows; else a KmsError."""
        url = f"{self.url}/api/v1/keys/{quote(sae_id, safe='')}/{endpoint}"
        ambiguous: KmsError | None = None
        for attempt in range(self._retry.attempts):
            last = attempt == self._retry.attempts - 1
            try:
                status, raw, location = await self._once(operation, method, url, params, body)
            except _Ambiguous as e:
                if not retry_sent or last:
                    raise e.error from None
                ambiguous = e.error
                log.info("%s (attempt %d of %d)", e.error, attempt + 1, self._retry.attempts)
            except (KmsConnectionError, KmsTimeout) as e:
                if last:
                    raise
                log.info("%s (attempt %d of %d)", e, attempt + 1, self._retry.attempts)
            else:
                if status == 503 and not last:
                    log.info("KME %s %s: HTTP 503, retrying (attempt %d of %d)",
                             self.url, operation, attempt + 1, self._retry.attempts)
                elif status == 200:
                    return raw
                elif 300 <= status < 400:
                    raise KmsProtocolError(
                        self.url, operation,
                        f"HTTP {status}: the KME redirected to"
                        f" {quote_remote(location or '(no Location)')}, which is refused"
                        " (ETSI GS QKD 014 specifies no redirects)")
                else:
                    raise self._http_error(operation, status, raw, ambiguous)
            await asyncio.sleep(self._retry.delay(attempt))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _once(
        self,
        operation: str,
        method: Method,
        url: str,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None,
        body: Mapping[str, Any] | None,
    ) -> tuple[int, bytes, str | None]:
        """One attempt: (status, body, Location header), all within `Timeouts.total`."""
        sent = False
        deadline = asyncio.timeout(self._timeouts.total)
        try:
            async with deadline, self._http().request(
                method, url, params=params, json=body, allow_redirects=False
            ) as resp:
                sent = True
                declared = resp.content_length
                if declared is not None and declared > self._max_bytes:
                    raise KmsProtocolError(self.url, operation,
                                           f"answer of {declared} bytes exceeds the"
                                           f" {self._max_bytes}-byte limit")
                raw = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    raw += chunk
                    if len(raw) > self._max_bytes:
                        raise KmsProtocolError(self.url, operation,
                                               f"answer exceeds the {self._max_bytes}-byte limit")
                return resp.status, bytes(raw), resp.headers.get("Location")
        except KmsError:
            raise
        except aiohttp.ClientConnectorCertificateError as e:
            raise KmsTlsError(self.url, operation,
                              f"server certificate not trusted: {e.certificate_error}") from None
        except aiohttp.ClientSSLError as e:
            raise KmsTlsError(self.url, operation,
                              f"TLS handshake failed: {quote_remote(str(e))}") from None
        except aiohttp.ConnectionTimeoutError:
            raise KmsTimeout(self.url, operation,
                             f"no connection within {self._timeouts.connect} s",
                             request_sent=False) from None
        except aiohttp.ClientConnectorError as e:
            raise KmsConnectionError(
                self.url, operation,
                f"cannot connect: {quote_remote(e.os_error.strerror or str(e))}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            tls = _ssl_cause(e)
            if tls is not None:
                # TLS 1.3 reports a refused client certificate after the handshake, when
                # the request is already on its way; the KME refused it, so nothing was done.
                raise KmsTlsError(
                    self.url, operation,
                    f"the KME refused the TLS session: {quote_remote(tls.reason or str(tls))}"
                ) from None
            # The deadline may expire before the request is out; counting it as sent is the
            # safe side (enc_keys is then not repeated).
            if deadline.expired():
                error: KmsError = KmsTimeout(
                    self.url, operation,
                    f"answer not complete within {self._timeouts.total} s", request_sent=True)
            elif isinstance(e, (aiohttp.SocketTimeoutError, TimeoutError)):
                error = KmsTimeout(
                    self.url, operation,
                    f"no answer within {self._timeouts.read} s", request_sent=True)
            elif sent:
                error = KmsConnectionError(
                    self.url, operation,
                    f"connection lost while reading the answer: {_wire_problem(e)}")
            else:
                error = KmsConnectionError(
                    self.url, operation,
                    f"the KME closed the connection without answering ({_wire_problem(e)});"
                    " under TLS 1.3 this is also how a KME refuses our client certificate")
            raise _Ambiguous(error) from None

    def _http_error(
        self, operation: str, status: int, raw: bytes, ambiguous: KmsError | None
    ) -> KmsError:
        try:
            err = Error.model_validate_json(raw)
        except ValidationError:
            return KmsProtocolError(
                self.url, operation,
                f"HTTP {status} with a body that is not an ETSI 014 Error object"
                + ("" if status in ETSI_STATUSES else _UNSPECIFIED))
        note = ""
        if ambiguous is not None and status == 400:
            note = f" (an earlier attempt failed with '{ambiguous.reason}': its answer may" \
                   " have delivered these keys and been lost)"
        cls = HTTP_ERRORS.get(status, KmsHttpError)
        return cls(self.url, operation, status, err.message, err.details or (), note=note)

    def _parse(
        self, raw: bytes, model: type[M], operation: str, expect: Expect | None = None
    ) -> M:
        try:
            result = model.model_validate_json(raw, context=expect)
        except ValidationError as e:
            raise KmsProtocolError(
                self.url, operation,
                f"malformed {model.__name__}: {describe_invalid(e)}") from None
        for name in _unknown_members(result):
            if (operation, name) in self._warned or len(self._warned) > MAX_WARNED:
                continue
            self._warned.add((operation, name))
            if len(self._warned) > MAX_WARNED:
                log.warning("KME %s %s: more members that ETSI GS QKD 014 does not define;"
                            " no longer reported", self.url, operation)
            else:
                log.warning("KME %s %s: ignoring member '%s' that ETSI GS QKD 014 does not"
                            " define", self.url, operation, quote_remote(name, limit=60))
        return result


def _unknown_members(model: BaseModel) -> list[str]:
    names = list(model.model_extra or {})
    for value in model.__dict__.values():
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, BaseModel):
                names += _unknown_members(item)
    return names


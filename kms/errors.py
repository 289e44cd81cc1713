"""Typed errors of the ETSI 014 client.

Every error names the KME and the operation. Messages quote what the KME said (trimmed and
made printable) but never key material: responses that carry keys are not echoed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from common.text import quote_remote


class KmsError(Exception):
    """Any failure to get keys or status from a KME."""

    def __init__(self, kme: str, operation: str, reason: str) -> None:
        self.kme = kme
        self.operation = operation
        self.reason = reason
        super().__init__(f"KME {kme} {operation}: {reason}")


class KmsHttpError(KmsError):
    """The KME answered with an ETSI 014 Error object and a non-200 status.

    `message` is the KME's, escaped; `note` is ours (never cut by the escaping limit)."""

    status: int = 0

    def __init__(
        self,
        kme: str,
        operation: str,
        status: int,
        message: str,
        details: Sequence[Mapping[str, Any]] = (),
        *,
        note: str = "",
    ) -> None:
        self.status = status
        self.message = quote_remote(message)
        self.details = tuple(details)
        super().__init__(kme, operation, f"HTTP {status}: {self.message}{note}")


class KmsBadRequest(KmsHttpError):
    """400: the KME rejected the request (bad parameters, unknown or already used key ID)."""


class KmsUnauthorized(KmsHttpError):
    """401: the KME does not accept this SAE for this request (certificate or key ownership)."""


class KmsUnavailable(KmsHttpError):
    """503: the KME cannot serve now (no key material, link down, overload)."""


class KmsProtocolError(KmsError):
    """The KME's answer does not follow ETSI GS QKD 014 (malformed, wrong keys, oversized)."""


class KmsConnectionError(KmsError):
    """No connection could be made; the request was not sent."""


class KmsTlsError(KmsError):
    """The TLS handshake failed: untrusted certificate, wrong name, or our certificate refused."""


class KmsTimeout(KmsError):
    """No answer in time.

    `request_sent` tells whether the KME may have acted on the request (and, for enc_keys,
    reserved keys that nobody will collect).
    """

    def __init__(self, kme: str, operation: str, reason: str, *, request_sent: bool) -> None:
        self.request_sent = request_sent
        super().__init__(kme, operation, reason)


HTTP_ERRORS: Mapping[int, type[KmsHttpError]] = {
    400: KmsBadRequest,
    401: KmsUnauthorized,
    503: KmsUnavailable,
}

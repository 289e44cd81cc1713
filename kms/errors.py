"""Typed errors of the ETSI 014 client.

Every error names the KME and the operation. Messages quote what the KME said (trimmed and
made printable) but never key material: responses that carry keys are not echoed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Longest quote, in characters of the escaped text: enough to read an error message, too
#: short for a KME to flood a log line.
MAX_QUOTED = 200

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    if ch.isprintable():
        return ch
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def quote_remote(text: str, *, limit: int = MAX_QUOTED) -> str:
    """Untrusted text (from a KME or a peer) made safe for one log line or exception.

    Every character that is not printable is shown as an escape, as Python writes it: a
    newline as ``\\n``, other C0/C1 controls and DEL as ``\\xNN``, line separators and
    direction overrides as ``\\uNNNN``; a backslash is doubled, so an escape in the output
    always means the KME sent that character. The result is cut to LIMIT characters (never
    inside an escape) and then ends with "…". One printable line, whatever came in: nobody can
    forge a log line or hide text from whoever reads it.
    """
    out: list[str] = []
    used = 0
    for ch in text:
        piece = _escape(ch)
        if used + len(piece) > limit:
            out.append("…")
            break
        out.append(piece)
        used += len(piece)
    return "".join(out)


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

"""Text that someone outside controls (a KME, a peer, a file), made safe to show.

Shared by every layer: errors and log lines quote what came in, on one printable line.
"""

from __future__ import annotations

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


def quote_remote(text: str, *, limit: int | None = MAX_QUOTED) -> str:
    """Untrusted text (from a KME or a peer) made safe for one log line or exception.

    Every character that is not printable is shown as an escape, as Python writes it: a
    newline as ``\\n``, other C0/C1 controls and DEL as ``\\xNN``, line separators and
    direction overrides as ``\\uNNNN``; a backslash is doubled, so an escape in the output
    always means the KME sent that character. The result is cut to LIMIT characters (never
    inside an escape) and then ends with "…" (None: not cut). One printable line, whatever
    came in: nobody can forge a log line or hide text from whoever reads it.
    """
    if text.isprintable() and "\\" not in text and (limit is None or len(text) <= limit):
        return text
    out: list[str] = []
    used = 0
    for ch in text:
        piece = _escape(ch)
        if limit is not None and used + len(piece) > limit:
            out.append("…")
            break
        out.append(piece)
        used += len(piece)
    return "".join(out)

"""quote_remote: what a KME or a peer sends reaches a log line or an exception as one
printable line, with every hidden character shown."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.text import MAX_QUOTED, quote_remote
from kms.errors import KmsBadRequest


@pytest.mark.parametrize(("text", "shown"), [
    ("keys not found", "keys not found"),
    ("line 1\nINFO forged line 2", "line 1\\nINFO forged line 2"),
    ("a\r\tb", "a\\r\\tb"),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("nul\x00 del\x7f c1\x85", "nul\\x00 del\\x7f c1\\x85"),
    ("rlo\u202eevil sep\u2028", "rlo\\u202eevil sep\\u2028"),
    ("back\\nslash", "back\\\\nslash"),  # a literal backslash-n stays distinguishable
    ("clé ✓", "clé ✓"),
])
def test_control_characters_are_escaped_visibly(text: str, shown: str) -> None:
    assert quote_remote(text) == shown


def test_length_is_capped_without_cutting_an_escape() -> None:
    assert quote_remote("x" * 1000) == "x" * MAX_QUOTED + "…"
    cut = quote_remote("a" * (MAX_QUOTED - 2) + "\n" * 10)
    assert cut == "a" * (MAX_QUOTED - 2) + "\\n…"
    assert quote_remote("\x01" * 100, limit=10) == "\\x01\\x01…"


@given(st.text())
def test_always_one_printable_line(text: str) -> None:
    quoted = quote_remote(text)
    assert quoted.isprintable()
    assert len(quoted) <= MAX_QUOTED + 1


def test_kme_messages_in_errors_are_escaped() -> None:
    e = KmsBadRequest("https://kme", "dec_keys", 400, "gone\n2026-01-01 CRITICAL forged")
    assert str(e) == "KME https://kme dec_keys: HTTP 400: gone\\n2026-01-01 CRITICAL forged"


def test_our_note_survives_a_long_kme_message() -> None:
    e = KmsBadRequest("https://kme", "dec_keys", 400, "x" * 10_000,
                      note=" (an earlier attempt failed)")
    assert str(e).endswith("x…" + " (an earlier attempt failed)")
    assert e.message == "x" * MAX_QUOTED + "…"

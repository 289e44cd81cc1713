"""The operator's documentation says what the code does: docs/operations.md against the typed
contract (the status model, the audit trail's events, the alarms, the failure causes). The
transition table in docs/protocol.md: tests/gateway/test_core.py."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.audit import TrailEvent
from gateway.core.events import Alarm, Cause
from gateway.daemon import AUDITED
from gateway.status import fields_table

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _between(text: str, marker: str) -> str:
    return text.split(f"<!-- generated: {marker} begin -->\n")[1].split(
        f"<!-- generated: {marker} end -->")[0]


def test_the_status_fields_are_the_model() -> None:
    doc = (DOCS / "operations.md").read_text()
    assert _between(doc, "status") == fields_table() + "\n", \
        "regenerate: python -m gateway.status"


def test_every_audit_event_is_documented() -> None:
    audit = _section((DOCS / "operations.md").read_text(), "Audit trail")
    named = set(re.findall(r"`([a-z-]+)`", audit))
    written = {k.value for k in AUDITED} | {e.value for e in TrailEvent}
    assert written - named == set()


def test_every_alarm_is_documented() -> None:
    alarms = _section((DOCS / "operations.md").read_text(), "Alarms")
    rows = set(re.findall(r"^\| `([a-z-]+)` \|", alarms, flags=re.M))
    assert rows == {a.value for a in Alarm}


def test_the_failure_causes_are_the_enum() -> None:
    doc = (DOCS / "operations.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `qkdgw_rekey_failures"))
    assert set(re.findall(r"`([a-z-]+)`", row.split("|")[4])) == {c.value for c in Cause}

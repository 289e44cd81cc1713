"""The operator's documentation says what the code does: docs/operations.md against the typed
contract (the status model, the audit trail's events, the alarms, the failure causes), and
docs/compliance.md's references to code and tests. The transition table in docs/protocol.md:
tests/gateway/test_core.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from gateway.audit import TrailEvent
from gateway.core.events import Alarm, Cause
from gateway.daemon import AUDITED
from gateway.status import fields_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


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


def _defines(path: Path, dotted: str) -> bool:
    """Whether the module at PATH defines DOTTED: a function, class or assigned name at the top
    level, or `Class.member` (nested as deep as the dots go)."""
    body: list[ast.stmt] = ast.parse(path.read_text()).body
    for part in dotted.split("."):
        found = None
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names = {node.name}
            elif isinstance(node, ast.Assign):
                names = {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = {node.target.id}
            else:
                continue
            if part in names:
                found = node
        if found is None:
            return False
        body = found.body if isinstance(found, ast.ClassDef) else []
    return True


def test_every_reference_in_the_compliance_map_exists() -> None:
    """Each `path::name` on docs/compliance.md names a file of this repository that defines
    that name (for tests: a test function), and each `path` it quotes exists."""
    doc = (DOCS / "compliance.md").read_text()
    refs = re.findall(r"`([\w./-]+\.py)::([\w.]+)`", doc)
    assert len(refs) > 40, "the compliance map lost its references"
    missing = [f"{f}::{n}" for f, n in refs if not (ROOT / f).is_file()
               or not _defines(ROOT / f, n)]
    assert missing == []
    assert all(n.startswith("test_") for f, n in refs if f.startswith("tests/"))
    paths = re.findall(r"`((?:kdf|gateway|tests|docs)/[\w./-]+)`", doc)
    assert [p for p in paths if not (ROOT / p).exists()] == []

"""The audit trail's hash chain: every edit, removal and reordering is found, and named."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from gateway.audit import GENESIS, AuditError, AuditLog, verify
from tests.helpers import qkdgw_command


def trail(tmp_path: Path, n: int = 6) -> Path:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "a")
    for i in range(1, n + 1):
        log.append("activated", link="ab", epoch=i, key_ids=[f"id-{i}"], fingerprint=f"{i:016x}",
                   sinks=["file:/x"])
    log.close()
    return path


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_intact_trail_and_its_head(tmp_path: Path) -> None:
    path = trail(tmp_path)
    result = verify(path)
    assert result.ok and result.records == 6 and result.head.seq == 6
    assert json.loads(lines(path)[0])["prev"] == GENESIS
    assert verify(path, expected_head=result.head.hash).ok
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_appending_continues_the_chain(tmp_path: Path) -> None:
    path = trail(tmp_path, 3)
    log = AuditLog(path, "a")
    log.append("retired", link="ab", epoch=1)
    log.close()
    assert verify(path).ok and verify(path).head.seq == 4


@pytest.mark.parametrize("tamper,problem", [
    (lambda ls: [ls[0], ls[1].replace('"epoch":2', '"epoch":9'), *ls[2:]],
     "line 2 (seq 2): contents changed"),
    (lambda ls: [ls[0], *ls[2:]], "line 2 (seq 3): does not follow"),
    (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], "line 2 (seq 3): does not follow"),
    (lambda ls: [*ls[:3], "{not json", *ls[3:]], "line 4: not JSON"),
    (lambda ls: [ls[1], *ls[2:]], "line 1 (seq 2): does not follow"),
])
def test_tampering_is_found(tmp_path: Path, tamper: object, problem: str) -> None:
    path = trail(tmp_path)
    path.write_text("\n".join(tamper(lines(path))) + "\n")  # type: ignore[operator]
    result = verify(path)
    assert not result.ok and any(problem in p for p in result.problems), result.problems


def test_an_edited_record_with_a_recomputed_hash_still_breaks_the_next_link(
        tmp_path: Path) -> None:
    from gateway.audit import _digest

    path = trail(tmp_path)
    ls = lines(path)
    record = json.loads(ls[2])
    record["fingerprint"] = "0" * 16
    record["hash"] = _digest(record)
    ls[2] = json.dumps(record)
    path.write_text("\n".join(ls) + "\n")
    result = verify(path)
    assert any("line 4 (seq 4): does not follow" in p for p in result.problems)


def test_cut_off_tail_needs_the_head(tmp_path: Path) -> None:
    path = trail(tmp_path)
    head = verify(path).head.hash
    path.write_text("\n".join(lines(path)[:-2]) + "\n")
    assert verify(path).ok  # a shorter chain is still a chain ...
    result = verify(path, expected_head=head)  # ... the head kept elsewhere tells
    assert not result.ok and "cut off the end" in result.problems[0]


def test_refuses_to_append_to_a_broken_trail(tmp_path: Path) -> None:
    path = trail(tmp_path)
    path.write_text(path.read_text().replace('"epoch":3', '"epoch":4'))
    with pytest.raises(AuditError, match="refusing to append"):
        AuditLog(path, "a")


def test_cli_verify(tmp_path: Path) -> None:
    path = trail(tmp_path)
    ok = subprocess.run([*qkdgw_command(), "audit", "verify", str(path)], capture_output=True,
                        text=True, check=False)
    assert ok.returncode == 0 and ": 6 records" in ok.stdout and "OK" in ok.stdout
    path.write_text(path.read_text().replace('"epoch":5', '"epoch":6'))
    bad = subprocess.run([*qkdgw_command(), "audit", "verify", str(path)], capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 1 and "BROKEN: line 5 (seq 5): contents changed" in bad.stdout
    missing = subprocess.run([*qkdgw_command(), "audit", "verify", str(tmp_path / "nope")],
                             capture_output=True, text=True, check=False)
    assert missing.returncode == 2 and "no such file" in missing.stderr

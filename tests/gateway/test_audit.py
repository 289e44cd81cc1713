"""The audit trail's hash chain: every edit, removal and reordering is found, and named."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from gateway import pki
from gateway.audit import (
    CHECKPOINT_RECORDS,
    GENESIS,
    MAX_LINE,
    AuditError,
    AuditLog,
    Signer,
    _digest,
    cross_verify,
    verify,
)
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
    assert result.ok
    assert result.records == 6
    assert result.head.seq == 6
    assert json.loads(lines(path)[0])["prev"] == GENESIS
    assert verify(path, expected_head=result.head.hash).ok
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_appending_continues_the_chain(tmp_path: Path) -> None:
    path = trail(tmp_path, 3)
    log = AuditLog(path, "a")
    log.append("retired", link="ab", epoch=1)
    log.close()
    assert verify(path).ok
    assert verify(path).head.seq == 4


@pytest.mark.parametrize(("tamper", "problem"), [
    (lambda ls: [ls[0], ls[1].replace('"epoch":2', '"epoch":9'), *ls[2:]],
     "line 2 (seq 2): contents changed"),
    (lambda ls: [ls[0], *ls[2:]], "line 2 (seq 3): does not follow"),
    (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], "line 2 (seq 3): does not follow"),
    (lambda ls: [*ls[:3], "{not json", *ls[3:]], "line 4: not JSON"),
    (lambda ls: [ls[1], *ls[2:]], "line 1 (seq 2): does not follow"),
])
def test_tampering_is_found(tmp_path: Path, tamper: Callable[[list[str]], list[str]],
                            problem: str) -> None:
    path = trail(tmp_path)
    path.write_text("\n".join(tamper(lines(path))) + "\n")
    result = verify(path)
    assert not result.ok, result.problems
    assert any(problem in p for p in result.problems), result.problems


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
    assert not result.ok
    assert "cut off the end" in result.problems[0]


def test_refuses_to_append_to_a_broken_trail(tmp_path: Path) -> None:
    path = trail(tmp_path)
    path.write_text(path.read_text().replace('"epoch":3', '"epoch":4'))
    with pytest.raises(AuditError, match="refusing to append"):
        AuditLog(path, "a")


def test_cli_verify(tmp_path: Path) -> None:
    path = trail(tmp_path)
    ok = subprocess.run([*qkdgw_command(), "audit", "verify", str(path)], capture_output=True,
                        text=True, check=False)
    assert ok.returncode == 0
    assert ": 6 records" in ok.stdout
    assert "OK" in ok.stdout
    path.write_text(path.read_text().replace('"epoch":5', '"epoch":6'))
    bad = subprocess.run([*qkdgw_command(), "audit", "verify", str(path)], capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 1
    assert "BROKEN: line 5 (seq 5): contents changed" in bad.stdout
    missing = subprocess.run([*qkdgw_command(), "audit", "verify", str(tmp_path / "nope")],
                             capture_output=True, text=True, check=False)
    assert missing.returncode == 2
    assert "no such file" in missing.stderr


# -- corrupt input: a problem reported, never a traceback ------------------------------------


@pytest.mark.parametrize(("line", "problem"), [
    ("[" * 100_000 + "]" * 100_000, "line 3: not JSON (nested too deep)"),
    ('{"seq": 3, "detail": "\\ud800", "prev": "x", "hash": "y"}', "line 3: not a canonical"),
    ('{"seq": 1e400}', "line 3: no valid sequence number"),
    ('{"seq": true}', "line 3: no valid sequence number"),
    ("x" * (MAX_LINE + 5), f"line 3: longer than {MAX_LINE} bytes"),
])
def test_a_corrupt_line_is_a_broken_record_not_a_crash(tmp_path: Path, line: str,
                                                       problem: str) -> None:
    path = trail(tmp_path, 4)
    ls = lines(path)
    path.write_text("\n".join([*ls[:2], line, *ls[2:]]) + "\n")
    result = verify(path)
    assert not result.ok, result.problems
    assert result.problems[0].startswith(problem), result.problems
    assert result.records == 5
    r = subprocess.run([*qkdgw_command(), "audit", "verify", str(path)], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert problem in r.stdout


# -- signed checkpoints ----------------------------------------------------------------------


def _signer(tmp_path: Path, cn: str = "gw-a") -> tuple[Signer, Path]:
    ca = pki.make_ca("test CA")
    issued = pki.issue(ca, cn, client=True)
    tmp_path.mkdir(parents=True, exist_ok=True)
    cert, key = tmp_path / f"{cn}.pem", tmp_path / f"{cn}.key"
    pki.save(issued, cert, key)
    return Signer.from_files(cert, key), cert


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def signed_trail(tmp_path: Path, n: int, cn: str = "gw-a", site: str = "a"
                 ) -> tuple[Path, Path]:
    signer, cert = _signer(tmp_path, cn)
    path = tmp_path / f"audit-{site}.jsonl"
    log = AuditLog(path, site, signer)
    log.append("started")
    log.checkpoint()
    for i in range(1, n + 1):
        log.append("rekeyed", link="ab", epoch=i, fingerprint=f"{i:016x}")
    log.close()
    return path, cert


def test_checkpoints_are_signed_every_so_many_records(tmp_path: Path) -> None:
    path, cert = signed_trail(tmp_path, 2 * CHECKPOINT_RECORDS + 3)
    result = verify(path, cert=_cert(cert))
    assert result.ok, result.problems
    assert result.checkpoints == 3
    assert result.unsigned_tail == 3
    events = [json.loads(line)["event"] for line in lines(path)]
    assert [i for i, e in enumerate(events) if e == "checkpoint"] == [
        1, 2 + CHECKPOINT_RECORDS, 3 + 2 * CHECKPOINT_RECORDS]


def test_rewritten_signed_history_is_found_with_the_certificate(tmp_path: Path) -> None:
    """Whoever can write the file can recompute the whole chain; not the signatures."""
    path, cert = signed_trail(tmp_path, CHECKPOINT_RECORDS + 5)
    records = [json.loads(line) for line in lines(path)]
    records[4]["fingerprint"] = "f" * 16  # a record before the second checkpoint
    prev = records[3]["hash"]
    for r in records[4:]:  # recompute the chain from there on: it verifies as a chain
        r["prev"] = prev
        r["hash"] = prev = _digest(r)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert verify(path).ok  # the chain alone cannot tell
    result = verify(path, cert=_cert(cert))
    assert not result.ok
    assert any("checkpoint signature does not verify" in p for p in result.problems)
    _, other = _signer(tmp_path / "x", "gw-a")
    assert any("signed with another certificate" in p
               for p in verify(path, cert=_cert(other)).problems)


def test_a_trail_without_checkpoints_fails_a_signature_check(tmp_path: Path) -> None:
    path = trail(tmp_path)
    _, cert = _signer(tmp_path)
    assert verify(path).ok
    assert verify(path, cert=_cert(cert)).problems == ("no signed checkpoint in the trail",)


# -- anchored in the peer ----------------------------------------------------------------------


def two_sites(tmp_path: Path, epochs: int = 10) -> tuple[Path, Path]:
    """Two sites' trails as the daemons write them: each completed epoch records the other
    site's head as of its Commit or Ack."""
    a = AuditLog(tmp_path / "a.jsonl", "a")
    b = AuditLog(tmp_path / "b.jsonl", "b")
    for epoch in range(1, epochs + 1):
        a.append("rekeyed", link="ab", epoch=epoch)
        commit_head = a.head  # in the Commit
        b.append("rekeyed", link="ab", epoch=epoch)
        b.append("peer-head", link="ab", epoch=epoch, peer=commit_head, peer_site="a")
        ack_head = b.head  # in the Ack
        a.append("peer-head", link="ab", epoch=epoch, peer=ack_head, peer_site="b")
    a.close()
    b.close()
    return tmp_path / "a.jsonl", tmp_path / "b.jsonl"


def _cross(a: Path, b: Path) -> list[str]:
    return cross_verify(verify(a, keep_hashes=True), verify(b, keep_hashes=True))


def test_two_sites_vouch_for_each_other(tmp_path: Path) -> None:
    a, b = two_sites(tmp_path)
    assert _cross(a, b) == []


def test_one_site_cut_short_is_found_from_the_other(tmp_path: Path) -> None:
    a, b = two_sites(tmp_path)
    b.write_text("\n".join(lines(b)[:-6]) + "\n")  # still a valid, shorter chain
    assert verify(b).ok
    problems = _cross(a, b)
    assert problems
    assert all("records cut off its end" in p for p in problems)


def test_one_site_rewritten_or_replaced_is_found_from_the_other(tmp_path: Path) -> None:
    a, b = two_sites(tmp_path)
    records = [json.loads(line) for line in lines(b)]
    records[3]["epoch"] = 99  # edited, and the whole chain recomputed after it
    prev = records[2]["hash"]
    for r in records[3:]:
        r["prev"] = prev
        r["hash"] = prev = _digest(r)
    b.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert verify(b).ok
    assert any("differs: rewritten or replaced" in p for p in _cross(a, b))
    fresh = AuditLog(tmp_path / "fresh" / "b.jsonl", "b")  # a trail made up from scratch
    for epoch in range(1, 25):
        fresh.append("rekeyed", link="ab", epoch=epoch)
    fresh.close()
    assert any("differs: rewritten or replaced" in p
               for p in _cross(a, tmp_path / "fresh" / "b.jsonl"))


def test_cli_verify_with_the_peer_and_both_certificates(tmp_path: Path) -> None:
    sa, ca = _signer(tmp_path / "a", "gw-a")
    sb, cb = _signer(tmp_path / "b", "gw-b")
    a, b = AuditLog(tmp_path / "a.jsonl", "a", sa), AuditLog(tmp_path / "b.jsonl", "b", sb)
    for epoch in range(1, 4):
        a.append("rekeyed", link="ab", epoch=epoch)
        b.append("peer-head", link="ab", epoch=epoch, peer=a.head, peer_site="a")
        a.append("peer-head", link="ab", epoch=epoch, peer=b.head, peer_site="b")
    for log in (a, b):
        log.checkpoint()
        log.close()
    args = [*qkdgw_command(), "audit", "verify", str(tmp_path / "a.jsonl"), "--cert", str(ca),
            "--peer", str(tmp_path / "b.jsonl"), "--peer-cert", str(cb)]
    ok = subprocess.run(args, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "anchors: 6 peer heads checked between site a and site b: OK" in ok.stdout
    assert "1 signed checkpoints checked" in ok.stdout
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(lines(path)[:1]) + "\n")
    bad = subprocess.run(args, capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert "MISMATCH" in bad.stdout
    assert "cut off its end" in bad.stdout
    swapped = subprocess.run([*args[:5], str(cb)], capture_output=True, text=True, check=False)
    assert swapped.returncode == 1
    assert "signed with another certificate" in swapped.stdout


@pytest.mark.parametrize(("what", "content", "message"), [
    ("audit.jsonl", "[" * 100_000 + "]" * 100_000 + "\n",
     "refusing to append to a broken audit trail: line 1: not JSON (nested too deep)"),
    ("audit.jsonl", '{"seq": 1, "detail": "\\ud800"}\n',
     "refusing to append to a broken audit trail: line 1: not a canonical record"),
    ("links/ab.json", json.dumps({"version": 1, "link": "ab", "role": "initiator",
                                  "max_epoch": 2**63 - 1, "peer_out": 0, "outbound": None,
                                  "inbound": [], "old_outbound": [], "used_key_ids": []}),
     "unreadable link state (max_epoch: Input should be less than or equal to"),
])
def test_the_daemon_refuses_to_start_on_corrupt_state_and_says_why(
        tmp_path: Path, what: str, content: str, message: str) -> None:
    from gateway.initdemo import init_demo
    from tests.helpers import free_base_port

    layout = init_demo(tmp_path, base_port=free_base_port(24))
    path = layout.state_dir("a") / what
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    r = subprocess.run([*qkdgw_command(), "run", "-c", str(layout.site_config("a"))],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr

"""`qkdgw check-config` on hostile or mistaken files: a clear error naming the problem, exit
status 2, never a traceback, never a hang."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from gateway.initdemo import DemoLayout
from tests.helpers import qkdgw_command


def check(path: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*qkdgw_command(), "check-config", str(path)], capture_output=True,
                          text=True, timeout=timeout, check=False)


def refused(path: Path, *messages: str) -> None:
    r = check(path)
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr, r.stderr
    for message in messages:
        assert message in r.stderr, r.stderr


def site(demo: DemoLayout, name: str, text: str) -> Path:
    """TEXT as a site file next to the demo's (its relative paths resolve)."""
    path = demo.root / f"check-{name}.yaml"
    path.write_text(text)
    return path


def demo_text(demo: DemoLayout) -> str:
    return demo.site_config("a").read_text()


def test_deep_nesting_is_refused_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("site: " + "[" * 5000 + "]" * 5000 + "\n")
    refused(path, str(path), "nested deeper than 64 levels", "line 1")


def test_an_alias_bomb_in_the_strongswan_connection_is_refused_at_once(
        demo: DemoLayout) -> None:
    bomb = ["l0: &l0 {" + ", ".join(f"k{j}: lol" for j in range(12)) + "}"]
    bomb += [f"l{i}: &l{i} {{" + ", ".join(f"k{j}: *l{i - 1}" for j in range(12)) + "}"
             for i in range(1, 12)]
    sink = ("      - type: strongswan\n"
            "        connection:\n"
            "          remote_addrs: [198.51.100.1]\n"
            "          local: {auth: pubkey, id: a}\n"
            "          remote: {auth: pubkey, id: b}\n"
            "          children: {lan: {local_ts: [10.1.0.0/16]}}\n"
            "          extra:\n" + "".join(f"            {line}\n" for line in bomb))
    path = site(demo, "bomb", demo_text(demo) + sink)
    assert 1500 < len(sink) < 2500
    start = time.monotonic()
    r = check(path, timeout=10)
    assert time.monotonic() - start < 5
    assert r.returncode == 2, r
    assert "alias" in r.stderr, r
    assert "Traceback" not in r.stderr, r


def test_duplicate_keys_are_refused_naming_the_key(demo: DemoLayout) -> None:
    text = demo_text(demo).replace("  interval: 30", "  interval: 30\n  interval: 3600")
    refused(site(demo, "dup", text), "duplicate key 'interval'", "line ")


def test_invalid_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("site: caf\u00e9\n".encode("latin-1"))
    refused(path, str(path), "not UTF-8", "byte offset 9")


@pytest.mark.parametrize(("old", "new", "message"), [
    ("hard_lifetime: 120", "hard_lifetime: .inf", "policy.hard_lifetime"),
    ("interval: 30", "interval: .nan", "policy.interval"),
    ("kms_status_interval: 2", "kms_status_interval: -.inf", "kms_status_interval"),
    ("    role: initiator", "    role: initiator\n    policy: {retransmit: .inf}",
     "links.0.policy.retransmit"),
])
def test_infinity_and_nan_are_refused_naming_the_field(demo: DemoLayout, old: str, new: str,
                                                       message: str) -> None:
    text = demo_text(demo)
    assert old in text
    refused(site(demo, "inf", text.replace(old, new)),
            f": {message}: Input should be a finite number", "  line ")


def test_a_duration_beyond_a_year_is_refused(demo: DemoLayout) -> None:
    text = demo_text(demo).replace("hard_lifetime: 120", "hard_lifetime: 1e12")
    refused(site(demo, "long", text), "  line 22: policy.hard_lifetime: Input should be less"
            " than or equal to 31536000")


def test_prefetch_is_accepted_and_shown(demo: DemoLayout) -> None:
    text = demo_text(demo).replace("  interval: 30", "  interval: 30\n  prefetch: false")
    r = check(site(demo, "prefetch", text))
    assert r.returncode == 0, r.stderr
    assert "1 sink(s), prefetch off" in r.stdout
    assert "prefetch on" in check(demo.site_config("a")).stdout

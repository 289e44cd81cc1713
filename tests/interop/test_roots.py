"""The Debian 13 roots' recipes and what a test sees when one is missing (the builds
themselves run in ./bootstrap test and .ci/fresh; the interop tests use their results)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interop import roots


def test_a_missing_root_says_how_to_build_it(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setattr(roots, "CACHE", tmp_path)
    reason = roots.missing(roots.STRONGSWAN)
    assert reason is not None
    assert "python -m tests.interop.roots strongswan" in reason
    assert str(tmp_path) in reason
    roots.STRONGSWAN.path().mkdir()
    assert roots.missing(roots.STRONGSWAN) is None


def test_a_changed_recipe_is_a_new_root() -> None:
    """A root is never reused for a recipe it was not built from (the digest names it)."""
    other = dataclasses.replace(roots.STRONGSWAN, packages=(*roots.STRONGSWAN.packages, "curl"))
    assert other.path() != roots.STRONGSWAN.path()
    assert roots.STRONGSWAN.path().name.startswith("trixie-strongswan-")


def test_the_strongswan_source_is_pinned_by_its_sha256() -> None:
    (url, sha256, _), = roots.STRONGSWAN.downloads
    assert url.endswith("strongswan_6.0.1.orig.tar.bz2")
    assert len(sha256) == 64


def test_a_download_with_another_digest_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.write_bytes(b"not strongSwan")
    with pytest.raises(RuntimeError, match="SHA-256"):
        roots._download(source.as_uri(), "0" * 64, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unknown_root_name_is_an_error_naming_the_known_ones() -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.interop.roots", "nosuch"],
                          capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2
    assert "no root named nosuch (there are: strongswan)" in proc.stderr


def test_print_only_prints_the_paths(capsys: pytest.CaptureFixture[str]) -> None:
    assert roots.main(["--print"]) == 0
    assert capsys.readouterr().out == f"{roots.STRONGSWAN.path()}\n"

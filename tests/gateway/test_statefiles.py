"""Link state files written off the event loop: in the order asked, 0600, failures named."""

from __future__ import annotations

import asyncio
import logging
import stat
from pathlib import Path

import pytest

from gateway.statefiles import StateFiles


def test_writes_land_in_the_order_asked_and_a_deletion_comes_after_them(
        tmp_path: Path) -> None:
    files = StateFiles(tmp_path / "links")

    async def main() -> None:
        # Asked without waiting in between: each must land after the one before.
        writes = [files.write({"a": f"a{i}".encode(), "b": f"b{i}".encode()})
                  for i in range(50)]
        gone = files.delete("b")
        assert await asyncio.gather(*writes) == [set()] * 50
        await gone

    try:
        asyncio.run(main())
    finally:
        files.close()
    assert files.path("a").read_bytes() == b"a49"
    assert stat.S_IMODE(files.path("a").stat().st_mode) == 0o600
    assert not files.path("b").exists()
    assert sorted(p.name for p in (tmp_path / "links").iterdir()) == ["a.json"]  # no temp files


def test_a_file_that_cannot_be_written_is_named_and_returned(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "bad.json").mkdir()  # os.replace onto a directory fails
    files = StateFiles(tmp_path / "links")
    try:
        with caplog.at_level(logging.ERROR, logger="gateway"):
            failed = asyncio.run(files.write({"bad": b"secret-state", "good": b"ok"}))
    finally:
        files.close()
    assert failed == {"bad"}
    assert files.path("good").read_bytes() == b"ok"
    assert "link bad: cannot save its state to" in caplog.text
    assert "secret-state" not in caplog.text

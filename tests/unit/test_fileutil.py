"""atomic_write's durability contract: the data is fsync'd BEFORE the rename (after a power loss the file
is the old or the new one, never empty or torn); the directory only with durable_rename."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ims.common import fileutil


def traced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    events: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else Path(os.readlink(
            f"/proc/self/fd/{fd}")).read_text()))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(fileutil.os, "fsync", fsync)
    monkeypatch.setattr(fileutil.os, "replace", replace)
    return events


def test_data_is_synced_before_the_rename_and_the_directory_is_not(tmp_path: Path, monkeypatch) -> None:
    events = traced(monkeypatch)
    fileutil.atomic_write(str(tmp_path / "f"), "new text\n", 0o640)
    assert events == [("fsync", "new text\n"), ("replace", "f")]
    assert (tmp_path / "f").read_text() == "new text\n" and stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no temp file left


def test_durable_rename_also_syncs_the_directory(tmp_path: Path, monkeypatch) -> None:
    events = traced(monkeypatch)
    fileutil.atomic_write(str(tmp_path / "f"), "x\n", durable_rename=True)
    assert events == [("fsync", "x\n"), ("replace", "f"), ("fsync", "dir")]


def test_leftovers_of_a_killed_write_are_removed_and_nothing_else(tmp_path: Path) -> None:
    for name in (".f.abc123.tmp", ".f.zz.tmp", ".g.abc.tmp", "f", ".f.keep", "x.f.1.tmp"):
        (tmp_path / name).write_text("x")
    removed = fileutil.remove_temp_leftovers(str(tmp_path / "f"))
    assert sorted(os.path.basename(p) for p in removed) == [".f.abc123.tmp", ".f.zz.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".f.keep", ".g.abc.tmp", "f", "x.f.1.tmp"]
    assert fileutil.remove_temp_leftovers(str(tmp_path / "missing-dir" / "f")) == []

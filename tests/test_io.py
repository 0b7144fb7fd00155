"""radalign.io: atomic writes of files and folders."""

from __future__ import annotations

import pytest

from radalign.io import atomic_path, atomic_write_text


def test_atomic_file_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a" / "x.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_atomic_folder_replaces_an_existing_folder(tmp_path):
    target = tmp_path / "export"
    for version in ("old", "new"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(version)
            (tmp / version).write_text("")
    assert sorted(p.name for p in target.iterdir()) == ["new", "weights"]  # nothing of the old folder left
    assert (target / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no .tmp or .old folders behind


def test_failed_folder_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "weights").write_text("good")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "weights").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]

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


def test_read_format_json_names_the_file_and_the_fix(tmp_path):
    from radalign import RadalignError
    from radalign.io import read_format_json

    f = tmp_path / "manifest.json"
    kw = dict(what="the --out folder of `x build`", fix="re-run `x build`")
    with pytest.raises(RadalignError, match=r"no manifest.json; point at the --out folder of `x build`"):
        read_format_json(f, "x/1", **kw)
    f.write_text("{not json")
    with pytest.raises(RadalignError, match=r"manifest.json: not readable JSON .*re-run `x build`"):
        read_format_json(f, "x/1", **kw)
    atomic_write_text(f, '{"format": "x/0"}')
    with pytest.raises(RadalignError, match=r"format 'x/0', expected 'x/1'; re-run `x build` with this version"):
        read_format_json(f, "x/1", **kw)
    atomic_write_text(f, '{"format": "x/1", "n": 3}')
    assert read_format_json(f, "x/1", **kw) == {"format": "x/1", "n": 3}

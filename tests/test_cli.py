"""The `radalign` command: dispatch, help on every verb, helpful errors, and the right packages imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from radalign.cli import STAGES, main, reference_markdown

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(args, cwd=None):
    env = {**os.environ, "COLUMNS": "100"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


def test_console_script_help_lists_every_stage():
    r = _run([str(BIN / "radalign"), "--help"])
    assert r.returncode == 0, r.stderr
    for stage in STAGES:
        assert stage in r.stdout


@pytest.mark.parametrize("stage", STAGES)
def test_python_dash_m_stage_help(stage):
    r = _run([sys.executable, "-m", stage, "--help"], cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "usage: radalign " + stage in r.stdout


def test_every_verb_has_help():
    import argparse

    from radalign.cli import build_parser

    def verbs(p, path):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    yield from verbs(sub, [*path, name])
        yield path

    for path in verbs(build_parser(), []):
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0, path


def test_unknown_stage_suggests(capsys):
    assert main(["pretrian"]) == 2
    assert "did you mean 'pretrain'" in capsys.readouterr().err.lower()


def test_misspelt_option_suggests(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--confg", "x"])
    assert e.value.code == 2
    assert "--config" in capsys.readouterr().err


def test_config_errors_print_without_traceback(capsys):
    assert main(["pretrain", "--config", "pretrain/tiny", "stpes=3"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'steps'" in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_our_packages_are_imported_under_radalign_and_take_no_generic_name(where, tmp_path):
    """The stages install as radalign.<stage>: a user's own `data.py` is the `data` Python finds, and ours is not
    a top-level module anywhere."""
    cwd = REPO if where == "repo" else tmp_path
    (tmp_path / "data.py").write_text("MINE = True\n")
    mods = ("radalign.data", "radalign.pretrain", "radalign.zeroshot", "radalign.retrieval", "radalign.finetune",
            "radalign")
    code = (f"import importlib, sys; sys.path.insert(0, {str(tmp_path)!r}); import data; assert data.MINE; "
            f"print('\\n'.join(importlib.import_module(m).__file__ for m in {mods!r}))")
    r = _run([sys.executable, "-c", code], cwd=cwd)
    assert r.returncode == 0, r.stderr
    files = r.stdout.split()
    assert len(files) == len(mods)
    for line in files:
        assert Path(line).resolve().is_relative_to(REPO), line
    for top in ("pretrain", "zeroshot", "retrieval", "finetune", "configs"):
        r = _run([sys.executable, "-c", f"import {top}"], cwd=tmp_path)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, (top, r.stdout, r.stderr)


def test_the_wheel_installs_radalign_and_nothing_else(tmp_path):
    """`pip install .` puts one top-level package into site-packages, with the configs as package data."""
    import zipfile

    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
              str(REPO)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("radalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"radalign"}, tops
    for want in ("radalign/pretrain/recipe.py", "radalign/data/loader.py", "radalign/pretrain/formats/card.py",
                 "radalign/configs/pretrain/demo.yaml", "radalign/configs/models/tiny.json"):
        assert want in names, want


def test_python_m_radalign_pretrain_help(tmp_path):
    r = _run([sys.executable, "-m", "radalign.pretrain", "--help"], cwd=tmp_path)
    assert r.returncode == 0 and "--config" in r.stdout, r.stderr


def test_cli_reference_is_in_sync(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    expected = reference_markdown()
    actual = (REPO / "docs" / "cli.md").read_text()
    assert actual == expected, "docs/cli.md is stale: run `python -m radalign.cli --write-reference docs/cli.md`"

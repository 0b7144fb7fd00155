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
def test_our_packages_are_imported(where, tmp_path):
    """`data` and `retrieval` are generic names: make sure ours are the ones Python finds."""
    cwd = REPO if where == "repo" else tmp_path
    code = "import data, pretrain, zeroshot, retrieval, finetune, radalign; " \
           "print('\\n'.join(m.__file__ for m in (data, pretrain, zeroshot, retrieval, finetune, radalign)))"
    r = _run([sys.executable, "-c", code], cwd=cwd)
    assert r.returncode == 0, r.stderr
    for line in r.stdout.split():
        assert Path(line).resolve().is_relative_to(REPO), line


def test_cli_reference_is_in_sync(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    expected = reference_markdown()
    actual = (REPO / "docs" / "cli.md").read_text()
    assert actual == expected, "docs/cli.md is stale: run `python -m radalign.cli --write-reference docs/cli.md`"

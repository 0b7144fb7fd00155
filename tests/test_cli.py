"""The `radalign` command: dispatch, help on every verb, helpful errors, and the right packages imported."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from radalign.retrieval import build, classify, index
from radalign.retrieval.config import MODALITIES, BuildConfig, ClassifyConfig

from radalign.cli import STAGES, build_parser, config_from_args, main, old_spellings, reference_markdown
from radalign.config import load_config

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

    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(tmp_path),
              str(REPO)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    # A data folder missing from setup.cfg's `packages` ships today but setuptools warns it will not for long.
    assert "absent from the `packages` configuration" not in r.stdout + r.stderr, "list the folder in setup.cfg"
    (wheel,) = tmp_path.glob("radalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"radalign"}, tops
    for want in ("radalign/pretrain/recipe.py", "radalign/data/loader.py", "radalign/pretrain/formats/card.py"):
        assert want in names, want
    tracked = _run(["git", "ls-files", "configs", "retrieval/static"], cwd=REPO).stdout.split()
    data = [f for f in tracked if not f.endswith(".py")]
    assert len(data) > 20, data
    for f in data:  # every config and page file, under its installed name
        assert "radalign/" + f in names, f


def test_python_m_radalign_pretrain_help(tmp_path):
    r = _run([sys.executable, "-m", "radalign.pretrain", "--help"], cwd=tmp_path)
    assert r.returncode == 0 and "--config" in r.stdout, r.stderr


def test_cli_reference_is_in_sync(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    expected = reference_markdown()
    actual = (REPO / "docs" / "cli.md").read_text()
    assert actual == expected, "docs/cli.md is stale: run `python -m radalign.cli --write-reference docs/cli.md`"


# ----------------------------------------------------------------------------------------------------------
# `radalign summary`: the demo's closing lines, as the Makefile's python one-liners printed them.

# The one-liners of the Makefile before `radalign summary` replaced them, verbatim but for $(DEMO) / $(IHM).
OLD_ONE_LINERS = [
    "import json; m=json.load(open('{D}/zeroshot/metrics.json')); a=m['macro']; print('zero-shot macro AUROC %.3f "
    "[%.3f, %.3f] over %s; shuffled-label control %.3f' % (a['auroc'], a['ci_low'], a['ci_high'], ', '.join("
    "a['classes']), m['controls']['shuffled_labels_macro_auroc']))",
    "import json; m=json.load(open('{D}/retrieval/metrics.json')); print('retrieval:', json.dumps(m.get('summary', "
    "m))[:400])",
    "import json; c=json.load(open('{D}/retrieval/classify/metrics.json'))['comparison']['macro']; print('retrieval "
    "classify (k-NN vote of the index): macro AUROC %.3f vs prompt zero-shot %.3f, paired difference %+.3f [%+.3f, "
    "%+.3f] over %d patients' % (c['value_a'], c['value_b'], c['delta'], c['ci_low'], c['ci_high'], "
    "c['n_patients']))",
    "import json; m=json.load(open('{I}/metrics.json')); print('in-hospital mortality, test AUROC [95% CI over "
    "patients]:', '; '.join('%s %.3f [%.3f, %.3f]' % (k, v['auroc'], v['ci_low'], v['ci_high']) for k, v in "
    "m['models'].items())); print('fusion minus each:', '; '.join('%s %+.3f [%+.3f, %+.3f]' % (k[len("
    "'fusion_vs_'):], v['delta'], v['ci_low'], v['ci_high']) for k, v in m['paired_differences'].items()))",
    "import json; d=json.load(open('{I}/metrics.json'))['degradation']; print('graceful degradation, mean AUROC drop "
    "over %d training seeds, with / without modality dropout:' % d['n_seeds'], '; '.join('%s removed %+.3f / %+.3f' "
    "% (r['removed'], r['with_dropout']['over_seeds']['drop_mean'], r['without_dropout']['over_seeds']['drop_mean']) "
    "for r in d['rows'] if r['removed']))",
]


def _drop(x):
    return {"over_seeds": {"drop_mean": x}}


def _tiny_run(root: Path, summary_len: int = 30) -> None:
    """metrics.json files with the keys the summary reads; awkward values: signs, rounding edges, a long summary."""
    files = {
        "zeroshot/metrics.json": {"macro": {"auroc": 0.61249, "ci_low": 0.5, "ci_high": 0.7004999,
                                            "classes": ["Edema", "Pleural Effusion"]},
                                  "controls": {"shuffled_labels_macro_auroc": 0.4996}},
        "retrieval/metrics.json": {"summary": {f"recall@{k}": 0.1 * k for k in range(summary_len)}, "x": 1},
        "retrieval/classify/metrics.json": {"comparison": {"macro": {
            "value_a": 0.7, "value_b": 0.65, "delta": 0.0213, "ci_low": -0.0004, "ci_high": 0.0, "n_patients": 57}}},
        "finetune/in_hospital_mortality/metrics.json": {
            "models": {"fusion": {"auroc": 0.8125, "ci_low": 0.75, "ci_high": 0.875},
                       "ehr_only": {"auroc": 0.5, "ci_low": 0.31, "ci_high": 0.69}},
            "paired_differences": {"fusion_vs_ehr_only": {"delta": 0.3125, "ci_low": -0.01, "ci_high": 0.5}},
            "degradation": {"n_seeds": 3, "rows": [
                {"removed": None, "with_dropout": _drop(0.0), "without_dropout": _drop(0.0)},
                {"removed": "image", "with_dropout": _drop(0.0123), "without_dropout": _drop(-0.2)},
                {"removed": "labs", "with_dropout": _drop(0.1), "without_dropout": _drop(0.25)}]}},
    }
    for rel, doc in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(doc))


@pytest.mark.parametrize("summary_len", [3, 60])  # the retrieval line under and over its 400 characters
def test_summary_prints_what_the_makefile_one_liners_printed(tmp_path, summary_len):
    _tiny_run(tmp_path, summary_len)
    ihm = tmp_path / "finetune" / "in_hospital_mortality"
    expected = "".join(_run([sys.executable, "-c", code.format(D=tmp_path, I=ihm)]).stdout for code in OLD_ONE_LINERS)
    r = _run([str(BIN / "radalign"), "summary", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected and expected.count("\n") == 6
    assert "zero-shot macro AUROC 0.612 [0.500, 0.700] over Edema, Pleural Effusion" in r.stdout  # by hand
    assert "image removed +0.012 / -0.200; labs removed +0.100 / +0.250" in r.stdout
    assert "paired difference +0.021 [-0.000, +0.000] over 57 patients" in r.stdout


def test_summary_of_a_one_seed_degradation_table_gives_its_drops_with_intervals(tmp_path, capsys):
    """baselines.degradation_seeds=1 (the demo): no over_seeds, no n_seeds; the drop of the one pair instead."""
    _tiny_run(tmp_path)
    f = tmp_path / "finetune" / "in_hospital_mortality" / "metrics.json"
    m = json.loads(f.read_text())
    drop = lambda v, lo, hi: {"drop": {"delta": v, "ci_low": lo, "ci_high": hi}}  # noqa: E731
    m["degradation"] = {"rows": [{"removed": None, "with_dropout": {}, "without_dropout": {}},
                                 {"removed": "image", "with_dropout": drop(0.0566, 0.0225, 0.1099),
                                  "without_dropout": drop(-0.0004, -0.03, 0.02)}]}
    f.write_text(json.dumps(m))
    assert main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ("graceful degradation, AUROC drop [95% CI over patients] of one training seed, with / without modality "
            "dropout: image removed +0.057 [+0.022, +0.110] / -0.000 [-0.030, +0.020]") in out


def test_summary_names_what_is_missing_and_fails_on_an_empty_folder(tmp_path, capsys):
    _tiny_run(tmp_path)
    (tmp_path / "retrieval" / "classify" / "metrics.json").unlink()
    assert main(["summary", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "retrieval classify" not in out and out.count("\n") == 5
    assert "classify/metrics.json not found" in err
    assert main(["summary", str(tmp_path / "nothing")]) == 2


# ----------------------------------------------------------------------------------------------------------
# One convention: old spellings warn and still work, every run verb takes --config, YAML < flags < key=value.

PARSER = build_parser()  # built once: parse_args leaves it unchanged
ALIASES = old_spellings(PARSER)
NOT_RUN_VERBS = {("data", "info"), ("zeroshot", "list-prompts"), ("summary",)}


def _verb_parser(words):
    p = PARSER
    for w in words:
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        p = sub.choices[w]
    return p


def _value_for(action) -> list[str]:
    """A value the option accepts that differs from its default (so the test sees it arrive)."""
    if action.nargs == 0:
        return []
    if action.choices:
        return [next(c for c in action.choices if c != action.default)]
    return ["7"] if action.type in (int, float) else ["somewhere"]


def _parse(words, argv, capsys):
    parser, verb = PARSER, _verb_parser(words)
    required = [x for a in verb._actions if a.required and a.option_strings for x in (a.option_strings[0], "r")]
    capsys.readouterr()
    ns = vars(parser.parse_args([*words, *required, *argv]))
    return ns, capsys.readouterr().err


def test_the_old_spellings_are_the_ones_the_issue_names():
    pairs = {(old, new) for _, old, new in ALIASES}
    assert pairs == {("--checkpoint", "--export"), ("--checkpoint", "--run"), ("--data", "--shards"),
                     ("--data", "--table"), ("--queries", "--shards"), ("--index", "--index-dir"),
                     ("--index", "--index-type"), ("--workers", "--num-workers"), ("--force", "--overwrite"),
                     ("--blank-not-negative", "--no-blank-as-negative")}
    commands = {prog.split(" ", 1)[1] for prog, _, _ in ALIASES}
    assert {"zeroshot eval", "retrieval build", "retrieval search", "retrieval eval", "retrieval classify",
            "finetune predict", "finetune eval", "finetune explain", "data synth", "data prepare",
            "data prepare-csv", "data prepare-dicom"} <= commands


@pytest.mark.parametrize("prog,old,new", ALIASES, ids=[f"{p.split(' ', 1)[1]} {o}" for p, o, _ in ALIASES])
def test_old_spelling_works_and_warns_naming_the_new_one(prog, old, new, capsys):
    words = prog.split()[1:]
    target = next(a for a in _verb_parser(words)._actions if new in a.option_strings)
    value = _value_for(target)
    with_new, warned_new = _parse(words, [new, *value], capsys)
    with_old, warned_old = _parse(words, [old, *value], capsys)
    without, _ = _parse(words, [], capsys)
    assert with_old == with_new                      # the old spelling does exactly what the new one does
    assert with_new[target.dest] != without[target.dest]   # ... and that is something
    assert warned_new == ""
    assert f"{old} is the old spelling of {new}" in warned_old and f"write {new}" in warned_old


def _leaf_verbs(p=None, path=()):
    p = p or PARSER
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, p
    for a in subs:
        for name, sub in a.choices.items():
            yield from _leaf_verbs(sub, (*path, name))


def test_every_run_verb_takes_config_print_config_and_overrides():
    verbs = dict(_leaf_verbs())
    assert len(verbs) >= 20 and NOT_RUN_VERBS <= set(verbs)
    for path, p in verbs.items():
        if path in NOT_RUN_VERBS:
            continue
        text = p.format_help()
        assert "--config" in text and "key=value" in text and "--print-config" in text, path
        for old in ("--checkpoint", "--queries", "--force", "--workers"):   # old spellings stay out of --help
            assert old not in text.replace("--checkpoint-", ""), (path, old)


def test_yaml_then_flags_then_key_value(tmp_path, capsys):
    path = tmp_path / "eval.yaml"
    path.write_text("index_dir: from-yaml\nshards: from-yaml\nbootstrap: 5\nseed: 3\n")
    assert main(["retrieval", "eval", "--config", str(path), "--shards", "from-flag", "--seed", "4",
                 "seed=9", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["index_dir"], cfg["shards"], cfg["bootstrap"], cfg["seed"]) == ("from-yaml", "from-flag", 5, 9)


def test_config_errors_name_the_flag_as_typed(capsys):
    assert main(["retrieval", "classify", "--index-dir", "i", "--shards", "s", "k=many"]) == 2
    assert "k=many" in capsys.readouterr().err
    assert main(["retrieval", "build", "--shards", "s"]) == 2
    err = capsys.readouterr().err
    assert "export: none given; pass --export" in err and "out: none given; pass --out" in err


def test_zeroshot_without_a_verb_is_eval_and_takes_the_old_flags(capsys):
    """`radalign zeroshot --checkpoint X --data Y` (the old command, no verb) still runs `zeroshot eval`."""
    assert main(["zeroshot", "--checkpoint", "run", "--data", "shards", "--no-control", "--export", "run2", "--out", "o",
                 "--print-config", "bootstrap=7"]) == 0
    out, err = capsys.readouterr()
    cfg = yaml.safe_load(out)
    assert (cfg["checkpoints"], cfg["data"], cfg["shuffled_control"], cfg["bootstrap"]) == (["run", "run2"],
                                                                                            "shards", False, 7)
    assert cfg["cache"] is True and cfg["prompts"] == ["chexpert14"]   # unset flags keep the defaults
    assert "write --export" in err and "write --shards" in err


def _makefile_commands() -> list[str]:
    """The Makefile's radalign commands, continuation lines joined, make variables left in."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    return [line.split("$(BIN)/radalign", 1)[1].split() for line in text.splitlines() if "$(BIN)/radalign " in line]


def test_the_makefile_uses_no_old_spelling():
    olds = {old for _, old, _ in ALIASES}
    commands = _makefile_commands()
    assert len(commands) >= 14 and ["summary", "$(DEMO)"] in commands
    for words in commands:
        assert not olds & set(words), words


def test_demo_classify_yaml_is_the_makefiles_classify_command():
    (words,) = [w for w in _makefile_commands() if w[:2] == ["retrieval", "classify"]]
    from_flags = config_from_args(ClassifyConfig, PARSER.parse_args(words), stage="retrieval")
    from_yaml = load_config(ClassifyConfig, "retrieval/demo-classify", [f"{k}={getattr(from_flags, k)}" for k in
                                                                        ("index_dir", "shards", "export", "out")],
                            stage="retrieval")
    assert from_yaml == from_flags


def test_retrieval_config_defaults_are_the_librarys():
    """retrieval/config.py writes out the library's defaults (so `--help` imports no faiss): they must agree."""
    assert (BuildConfig().flat_max, MODALITIES) == (index.DEFAULT_FLAT_MAX, build.MODALITY_CHOICES)
    assert (ClassifyConfig().k, ClassifyConfig().temperature) == (classify.DEFAULT_K, None)

"""What a hostile new user does to `radalign finetune` (issue 18, section 3), each case planted:

- a rerun of a finished run with another label, lr, epochs, seed, table or export refuses before any work,
  naming the changed keys; `--overwrite` trains afresh (the same model as a fresh run_dir); an unchanged
  rerun reuses every model;
- labels that cannot train, select or score a model (all null, one class in train, validation or test) are
  refused before anything trains, naming the split, the label and the counts;
- the only checkpoint damaged: the printed advice, followed literally, completes the run; resume=<step-*
  folder> works where the advice names one;
- `finetune predict` / `eval` on a table missing a column: a sentence naming the table, the column and the fix;
- few-shot ks that cannot be drawn are refused before any draw is fitted.

Expected counts come from pandas on the table itself, never from the code under test.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from radalign.finetune.config import FinetuneConfig
from safetensors.torch import load_file

from radalign import RadalignError
from radalign.config import load_config

TASK = "in_hospital_mortality"


@pytest.fixture(scope="module")
def cohort(ft_cohort):
    return ft_cohort


def _over(cohort, run_dir, table=None, cache=None) -> list[str]:
    """A small, fast run: the fusion model alone, 2 epochs."""
    return [f"run_dir={run_dir}", f"data.table={table or cohort['table']}", f"data.shards={cohort['shards']}",
            f"data.checkpoint={cohort['export']}", f"data.cache={cache or cohort['root'] / 'cache'}",
            "bootstrap=20", "optim.epochs=2", "optim.batch_size=64", "model.d_model=16", "model.ehr_d=8",
            "model.n_layers=1", "model.ehr_blocks=1", "model.n_heads=2", "model.ehr_heads=2", "progress=false",
            "precision=fp32", "baselines.models=[]", "baselines.fusion_without_dropout=false",
            "baselines.degradation_seeds=1"]


def _cfg(cohort, run_dir, *extra, config=f"finetune/{TASK}", **kw) -> FinetuneConfig:
    return load_config(FinetuneConfig, config, _over(cohort, run_dir, **kw) + list(extra), stage="finetune")


def _cli(*argv) -> int:
    from radalign.cli import main

    return main([str(a) for a in argv])


def _train_argv(cohort, run_dir, *extra, **kw) -> list[str]:
    return ["finetune", "--config", f"finetune/{TASK}", *_over(cohort, run_dir, **kw), *extra]


def _split(cohort, name: str) -> pd.DataFrame:
    """A split of the cohort's table, read with `datasets` directly."""
    import datasets

    return datasets.load_from_disk(str(cohort["table"]))[name].to_pandas()


def _weights(run_dir: Path, name: str = "fusion") -> dict:
    return load_file(str(run_dir / "models" / f"{name}.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _snapshot(run_dir: Path) -> dict:
    """Bytes of every file of RUN (a refusal must change none)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _write_table(cohort, out: Path, edit=None) -> Path:
    """A copy of the cohort's table (DatasetDict + manifest) with `edit(splits)` applied to its frames."""
    import datasets
    from radalign.data.ehr_table import load_table

    t = load_table(cohort["table"])
    splits = {k: v.copy() for k, v in t.splits.items()}
    if edit is not None:
        edit(splits)
    tmp = out.with_name(out.name + ".new")
    datasets.DatasetDict({k: datasets.Dataset.from_pandas(v, preserve_index=False)
                          for k, v in splits.items()}).save_to_disk(str(tmp / "finetune"))
    shutil.copy(t.path.parent / "manifest.json", tmp / "manifest.json")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out / "finetune"


@pytest.fixture(scope="module")
def base(cohort, tmp_path_factory) -> Path:
    """A finished small run (fusion only) of in-hospital mortality."""
    from radalign.finetune.recipe import run_finetune

    return run_finetune(_cfg(cohort, tmp_path_factory.mktemp("hostile") / "base"))


# ----------------------------------------------------------------------------------------------------------
# 1. Reuse only what the current config trained


CHANGES = [
    ("task.labels=[mortality_30d]", r"task\.labels: \['in_hospital_mortality'\] -> \['mortality_30d'\]"),
    ("optim.lr=0.01", r"optim\.lr: 0\.001 -> 0\.01"),
    ("optim.epochs=3", r"optim\.epochs: 2 -> 3"),
    ("seed=3", r"seed: 0 -> 3"),
    ("model.dropout=0.2", r"model\.dropout: 0\.1 -> 0\.2"),
    ("model.modality_dropout={image: 0.1, text: 0.25, ehr: 0.3}", r"model\.modality_dropout\.image: 0\.3 -> 0\.1"),
    ("data.modalities=[image,ehr]", r"data\.modalities: \['image', 'text', 'ehr'\] -> \['image', 'ehr'\]"),
    ("data.features=[creatinine,sodium]", r"data\.features: \['creatinine', .*\] -> \['creatinine', 'sodium'\]"),
    ("baselines.models=[ehr_only]", r"baselines\.models: \[\] -> \['ehr_only'\]"),
    ("precision=bf16", r"precision: 'fp32' -> 'bf16'"),
    ("data.checkpoint={other_export}", r"data\.export_checksum: [0-9a-f]{12}\.\.\. -> [0-9a-f]{12}\.\.\.\)"),
]


@pytest.mark.parametrize("override,named", CHANGES, ids=[c[0].split("=")[0] for c in CHANGES])
def test_a_rerun_with_another_setting_refuses_before_any_work_naming_the_key(cohort, base, tmp_path, override,
                                                                              named):
    from radalign.finetune.recipe import run_finetune

    before = _snapshot(base)
    fresh_cache = tmp_path / "cache"
    cfg = _cfg(cohort, base, override.replace("{other_export}", str(cohort["other_export"])), cache=fresh_cache)
    with pytest.raises(RadalignError, match=r"trained with another configuration") as e:
        run_finetune(cfg)
    msg = str(e.value)
    assert re.search(named, msg), msg
    assert msg.count(" -> ") == 1, msg  # only the changed key is named
    assert "another run_dir" in msg and "--overwrite" in msg
    assert _snapshot(base) == before  # config.yaml, models, reports: untouched
    assert not fresh_cache.exists()  # refused before the towers embedded anything


def test_a_refused_run_leaves_the_process_free_to_choose_another_precision(cohort, base):
    """A refusal in setup ends the Accelerate state (it is a process-wide singleton): the next run in the same
    process (a notebook, these tests) may ask for another precision and gets its own refusal, not a ValueError."""
    from radalign.finetune.recipe import run_finetune

    with pytest.raises(RadalignError, match=r"seed: 0 -> 5"):
        run_finetune(_cfg(cohort, base, "seed=5"))
    with pytest.raises(RadalignError, match=r"precision: 'fp32' -> 'bf16'"):
        run_finetune(_cfg(cohort, base, "precision=bf16"))


def test_an_unchanged_rerun_reuses_every_model_and_run_control_keys_do_not_count(cohort, base, capsys):
    from radalign.finetune.recipe import run_finetune

    weights = (base / "models" / "fusion.safetensors").read_bytes()
    capsys.readouterr()
    run_finetune(_cfg(cohort, base, "bootstrap=30", "log_every=5", "data.allow_overlap=true"))
    assert "fusion: finished earlier" in capsys.readouterr().out
    assert (base / "models" / "fusion.safetensors").read_bytes() == weights
    assert "bootstrap: 30" in (base / "config.yaml").read_text()  # rewritten: it shaped no model


def test_a_changed_table_is_named_by_path_and_by_sha256(cohort, tmp_path):
    from radalign.finetune.recipe import run_finetune

    table = tmp_path / "table"
    table.mkdir()
    shutil.copytree(cohort["table"], table / "finetune")
    shutil.copy(cohort["table"].parent / "manifest.json", table / "manifest.json")
    run = tmp_path / "run"
    run_finetune(_cfg(cohort, run, table=table / "finetune"))
    with pytest.raises(RadalignError) as e:  # same bytes elsewhere: only the path differs
        run_finetune(_cfg(cohort, run))
    assert re.search(r"data\.table: '.*/table/finetune' -> '.*'", str(e.value)) and "table_sha256" not in str(e.value)

    def flip(splits):  # one training label flipped, in place: same path, other bytes
        tr = splits["train"]
        row = int(np.flatnonzero(tr[TASK].notna().to_numpy())[0])
        tr.loc[row, TASK] = 1.0 - tr.loc[row, TASK]
    _write_table(cohort, table, flip)
    with pytest.raises(RadalignError) as e:
        run_finetune(_cfg(cohort, run, table=table / "finetune"))
    assert re.search(r"data\.table_sha256: [0-9a-f]{12}\.\.\. -> [0-9a-f]{12}\.\.\.", str(e.value))
    assert "data.table: " not in str(e.value)


def test_overwrite_trains_afresh_the_model_a_fresh_run_dir_trains(cohort, base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    (run / "notes.txt").write_text("mine")
    assert _cli(*_train_argv(cohort, run, "task.labels=[mortality_30d]")) == 2
    assert _cli(*_train_argv(cohort, run, "task.labels=[mortality_30d]", "--overwrite")) == 0
    assert _cli(*_train_argv(cohort, tmp_path / "fresh", "task.labels=[mortality_30d]")) == 0
    _assert_same_weights(run, tmp_path / "fresh")
    for f in ("predictions.csv", "predictions_validate.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(run / f), pd.read_csv(tmp_path / "fresh" / f))
    labels = pd.read_csv(run / "predictions.csv")["label"]
    truth = _split(cohort, "test").set_index("study_id")["mortality_30d"]
    np.testing.assert_array_equal(labels.to_numpy(), truth.loc[pd.read_csv(run / "predictions.csv")["study_id"]])
    assert "mortality_30d" in (run / "config.yaml").read_text() and (run / "notes.txt").read_text() == "mine"


def test_models_trained_by_an_unknown_config_are_not_reused(cohort, base, tmp_path):
    from radalign.finetune.recipe import run_finetune

    run = tmp_path / "run"
    shutil.copytree(base, run)
    (run / "run_spec.json").unlink()  # as written by an older radalign
    with pytest.raises(RadalignError, match=r"no readable run_spec\.json.*--overwrite"):
        run_finetune(_cfg(cohort, run))
    with pytest.raises(RadalignError, match=r"resume=never: .* already holds .*models/fusion\.json.*--overwrite"):
        run_finetune(_cfg(cohort, base, "resume=never"))


# ----------------------------------------------------------------------------------------------------------
# 2. Training that cannot learn is refused before it starts


def _only(split, value):
    def edit(splits):
        col = splits[split][TASK]
        splits[split][TASK] = col.where(col.isna(), value)
    return edit


def _all_null(splits):
    for frame in splits.values():
        frame[TASK] = np.nan


PLANTS = {"all labels null": (_all_null, ["train", "validate", "test"]),
          "one class in train": (_only("train", 0.0), ["train"]),
          "one class in validation": (_only("validate", 0.0), ["validate"]),
          "one class in test": (_only("test", 1.0), ["test"])}


def _expected(frame: pd.DataFrame, column: str) -> str:
    """The counts as the error must state them, from pandas."""
    col = frame[column]
    n0, n1 = int((col == 0).sum()), int((col == 1).sum())
    if n0 + n1 == 0:
        return f"no labelled row (all {len(frame)} rows are null)"
    return f"one class only (0: {n0}, 1: {n1} of {n0 + n1} labelled rows)"


@pytest.mark.parametrize("plant", list(PLANTS))
def test_labels_that_cannot_train_select_or_score_are_refused_before_training(cohort, tmp_path, plant):
    from radalign.data.ehr_table import load_table
    from radalign.finetune.recipe import run_finetune

    edit, bad = PLANTS[plant]
    table = _write_table(cohort, tmp_path / "table", edit)
    frames = load_table(table).splits
    with pytest.raises(RadalignError) as e:
        run_finetune(_cfg(cohort, tmp_path / "run", table=table, cache=tmp_path / "cache"))
    msg = str(e.value)
    assert msg.startswith(str(table))
    for split in ("train", "validate", "test"):
        named = f"split {split!r}, label {TASK!r}: {_expected(frames[split], TASK)}"
        assert (named in msg) == (split in bad), (split, msg)
    assert "Fix: choose a label" in msg
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "models").exists()


def test_a_one_class_derived_label_is_refused_naming_its_rule(cohort, tmp_path):
    from radalign.finetune.recipe import run_finetune

    def short_stays(splits):
        splits["validate"]["los_days"] = splits["validate"]["los_days"].clip(upper=3.0)
    table = _write_table(cohort, tmp_path / "table", short_stays)
    n = int(_split(cohort, "validate")["los_days"].notna().sum())
    with pytest.raises(RadalignError, match=re.escape(f"split 'validate', label 'long_stay (los_days > 7)': one class "
                                                      f"only (0: {n}, 1: 0 of {n} labelled rows)")):
        run_finetune(_cfg(cohort, tmp_path / "run", config="finetune/long_stay", table=table))


# ----------------------------------------------------------------------------------------------------------
# 3. The only training checkpoint damaged: the advice, followed literally, completes the run


def _truncate_model(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])


def _drop_checksums(ckpt: Path) -> None:
    (ckpt / "checksums.json").unlink()


@pytest.mark.parametrize("damage", [_truncate_model, _drop_checksums], ids=["truncated", "incomplete"])
def test_the_only_checkpoint_damaged_the_printed_advice_completes_the_run(cohort, base, tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert _cli(*_train_argv(cohort, run, "stop_after=3")) == 0  # inside the first epoch: one checkpoint
    ckpts = sorted((run / "train" / "fusion" / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-0000003"]
    damage(ckpts[0])
    capsys.readouterr()
    assert _cli(*_train_argv(cohort, run)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "step-0000003" in err
    advice = re.search(r"run the same command again with (--\S+)", err)
    assert advice, err
    assert "step-* folder" not in err  # the plumbing's advice does not apply here
    assert _cli(*_train_argv(cohort, run), advice.group(1)) == 0
    _assert_same_weights(run, base)  # what an uninterrupted run trains


def test_resume_from_a_step_folder_follows_the_printed_fallback(cohort, base, tmp_path, capsys):
    run = tmp_path / "run"
    labelled = int(_split(cohort, "train")[TASK].notna().sum())
    per_epoch = -(-labelled // 64)
    assert _cli(*_train_argv(cohort, run, f"stop_after={per_epoch + 1}")) == 0
    ckpts = sorted((run / "train" / "fusion" / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == [f"step-{per_epoch:07d}", f"step-{per_epoch + 1:07d}"]
    _truncate_model(ckpts[1])
    capsys.readouterr()
    assert _cli(*_train_argv(cohort, run, f"resume={ckpts[1]}")) == 2
    err = capsys.readouterr().err.strip()
    advice = re.search(r"pass (resume=\S+)\.$", err)
    assert advice and advice.group(1) == f"resume={ckpts[0]}", err
    assert _cli(*_train_argv(cohort, run, advice.group(1))) == 0
    _assert_same_weights(run, base)
    assert _cli(*_train_argv(cohort, run, advice.group(1))) == 2  # finished: a step folder would not be used
    assert "finished already" in capsys.readouterr().err
    assert _cli(*_train_argv(cohort, run)) == 0  # auto reuses it


def test_resume_takes_auto_never_or_a_step_folder_of_this_run(cohort, base, tmp_path):
    from radalign.finetune.recipe import run_finetune

    with pytest.raises(RadalignError, match=r"resume: 'latest'; use auto, never or a checkpoint folder"):
        _cfg(cohort, base, "resume=latest")
    with pytest.raises(RadalignError, match=r"resume=.*step-0000001: not a checkpoint folder of run_dir"):
        run_finetune(_cfg(cohort, tmp_path / "run", f"resume={tmp_path / 'elsewhere' / 'step-0000001'}"))
    folder = tmp_path / "run" / "train" / "fusion" / "checkpoints" / "step-0000004"
    with pytest.raises(RadalignError, match=r"step-0000004: no such folder; fusion has no checkpoint"):
        run_finetune(_cfg(cohort, tmp_path / "run", f"resume={folder}"))


# ----------------------------------------------------------------------------------------------------------
# 4. Sentences instead of tracebacks: predict / eval on a table missing a column


@pytest.mark.parametrize("verb", ["predict", "eval"])
@pytest.mark.parametrize("column", ["indication", "gender", "creatinine", "creatinine_hours", "dicom_ids"])
def test_a_table_missing_a_column_is_named_with_the_fix(cohort, base, tmp_path, capsys, verb, column):
    def drop(splits):
        for frame in splits.values():
            frame.drop(columns=[column], inplace=True)
    table = _write_table(cohort, tmp_path / "table", drop)
    capsys.readouterr()
    rc = _cli("finetune", verb, "--run", base, "--table", table, "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"{table} (split 'test') lacks column(s) {column!r} (" in err, err
    assert "Fix: use a table written by `radalign data link-ehr`" in err and "add each column" in err
    assert not (tmp_path / "out").exists()


def test_following_the_fix_a_null_indication_scores_the_text_as_absent(cohort, base, tmp_path):
    """The fix says: add the column, null where unknown. Then the text is absent: the same logits as the full
    table with the text masked at test time."""
    from radalign.finetune.predict import load_run

    def no_text(splits):
        for frame in splits.values():
            frame["indication"] = None
    table = _write_table(cohort, tmp_path / "table", no_text)
    assert _cli("finetune", "predict", "--run", base, "--table", table, "--out", tmp_path / "p.csv") == 0
    got = pd.read_csv(tmp_path / "p.csv")
    trained = load_run(base)
    masked = trained.logits(trained.inputs("test"), "fusion", present_override={"text": False})
    np.testing.assert_allclose(got["logit:fusion"].to_numpy(), masked, atol=1e-5)


def test_eval_names_a_subgroup_column_the_table_lacks_and_how_to_leave_it_out(cohort, base, tmp_path, capsys):
    capsys.readouterr()
    rc = _cli("finetune", "eval", "--run", base, "--out", tmp_path / "out", "--subgroups", "ethnicity,race")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "lacks column(s) 'ethnicity' (subgroup 'ethnicity')" in err and "out of --subgroups" in err
    assert "available columns: subject_id, study_id" in err


# ----------------------------------------------------------------------------------------------------------
# 5. Few-shot ks checked before any draw is fitted


def _fewshot_cfg(cohort, run_dir, ks: str, cache: Path) -> FinetuneConfig:
    return load_config(FinetuneConfig, "finetune/fewshot_chexpert", [
        f"run_dir={run_dir}", f"data.table={cohort['table']}", f"data.shards={cohort['shards']}",
        f"data.checkpoint={cohort['export']}", f"data.cache={cache}", "progress=false", "precision=fp32",
        f"fewshot.ks={ks}"], stage="finetune")


@pytest.mark.parametrize("ks,bad", [("[1,2,2000]", ["2000"]), ("[2000,1,all,3000]", ["2000", "3000"])])
def test_fewshot_ks_that_cannot_be_drawn_are_refused_before_any_draw(cohort, tmp_path, ks, bad):
    from radalign.finetune.fewshot_recipe import run_fewshot_recipe

    label = "Pleural Effusion"
    train = _split(cohort, "train")
    held = set(pd.concat([_split(cohort, s) for s in ("validate", "test")])["subject_id"])
    pool = train[~train["subject_id"].isin(held)]
    n = {c: pool.loc[pool[label] == c, "subject_id"].nunique() for c in (0, 1)}  # uncertain (-1) excluded
    with pytest.raises(RadalignError) as e:
        run_fewshot_recipe(_fewshot_cfg(cohort, tmp_path / "run", ks, tmp_path / "cache"))
    msg = str(e.value)
    assert re.findall(r"k=(\d+) \(seed", msg) == bad, msg
    assert f"class 0: {n[0]}, class 1: {n[1]}" in msg and "k=all" in msg
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "draws").exists()


def test_fewshot_label_and_task_label_must_agree():
    with pytest.raises(RadalignError, match=r"fewshot\.label: 'Edema' but task\.labels is \['Pleural Effusion'\]"):
        load_config(FinetuneConfig, "finetune/fewshot_chexpert", ["fewshot.label=Edema"], stage="finetune")
    cfg = load_config(FinetuneConfig, "finetune/fewshot_chexpert", ["fewshot.label=Edema", "task.labels=[Edema]"],
                      stage="finetune")
    assert cfg.fewshot.label == "Edema"


# ----------------------------------------------------------------------------------------------------------
# The pieces, on their own


def test_changed_keys_names_nested_and_absent_keys():
    from radalign.finetune.runspec import changed_keys

    old = {"seed": 0, "model": {"modality_dropout": {"image": 0.3, "text": 0.25}}, "data": {"sha": "ab" * 32}}
    new = {"seed": 0, "model": {"modality_dropout": {"image": 0.1}}, "data": {"sha": "cd" * 32}, "processes": 2}
    assert changed_keys(old, new) == [f"data.sha: {'ab' * 6}... -> {'cd' * 6}...",
                                      "model.modality_dropout.image: 0.3 -> 0.1",
                                      "model.modality_dropout.text: 0.25 -> (absent)", "processes: (absent) -> 2"]
    assert changed_keys(old, json.loads(json.dumps(old))) == []


def test_overwrite_removes_only_what_finetune_wrote(tmp_path):
    from radalign.finetune.runspec import clear_run_dir

    run = tmp_path / "run"
    for d in ("models/degradation_seeds", "train/fusion/checkpoints/step-0000001", "draws", "cache", "eval"):
        (run / d).mkdir(parents=True)
    for f in ("run_spec.json", "config.yaml", "metrics.json", "report.md", "roc.png", "predictions.csv",
              "fewshot-linear_probe.json", "learning_curve-prompt_init.png", "notes.txt", "cache/image-x.json",
              "eval/metrics.json"):
        (run / f).write_text("x")
    clear_run_dir(run)
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert left == ["cache", "cache/image-x.json", "eval", "eval/metrics.json", "notes.txt"]


def test_a_model_folder_of_another_spec_is_refused(tmp_path):
    from radalign.finetune.trainer import _check_train_spec

    work = tmp_path / "train" / "fusion"
    work.mkdir(parents=True)
    _check_train_spec(work, {"d_model": 32, "modality_dropout": {"image": 0.3}}, main=True)
    _check_train_spec(work, {"d_model": 32, "modality_dropout": {"image": 0.3}}, main=True)  # same: fine
    with pytest.raises(RadalignError, match=r"changed: modality_dropout\.image: 0\.3 -> 0\.1\).*--overwrite"):
        _check_train_spec(work, {"d_model": 32, "modality_dropout": {"image": 0.1}}, main=True)

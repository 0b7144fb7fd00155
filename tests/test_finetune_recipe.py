"""`radalign finetune` end to end on a small synthetic set: outputs and their numbers, exact resume, 2 processes
equal 1, the pretraining-overlap refusal, bad input, `finetune predict`, the few-shot sweep."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from radalign.finetune.config import FinetuneConfig
from safetensors.torch import load_file

from radalign import RadalignError
from radalign.config import load_config

REPO = Path(__file__).resolve().parents[1]
NANO = REPO / "tests" / "assets" / "nano.json"
BASELINES = ["image_only", "ehr_only", "text_only", "late_fusion", "early_fusion", "gbdt"]


@pytest.fixture(scope="module")
def cohort(ft_cohort):
    return ft_cohort


def _cfg(cohort, run_dir, *overrides) -> FinetuneConfig:
    base = [f"run_dir={run_dir}", f"data.table={cohort['table']}", f"data.shards={cohort['shards']}",
            f"data.checkpoint={cohort['export']}", f"data.cache={cohort['root'] / 'cache'}", "bootstrap=100",
            "optim.epochs=2", "optim.batch_size=64", "model.d_model=32", "model.ehr_d=16", "model.n_layers=1",
            "model.ehr_blocks=1", "progress=false", "precision=fp32", "baselines.gbdt_max_iter=20"]
    return load_config(FinetuneConfig, "finetune/long_stay", base + list(overrides), stage="finetune")


@pytest.fixture(scope="module")
def full_run(cohort, tmp_path_factory):
    from radalign.finetune.recipe import run_finetune

    run_dir = tmp_path_factory.mktemp("ftrun") / "long_stay"
    run_finetune(_cfg(cohort, run_dir))
    return run_dir


def test_run_writes_every_model_and_metrics_that_match_a_reference(full_run):
    from sklearn.metrics import average_precision_score, roc_auc_score

    pred = pd.read_csv(full_run / "predictions.csv")
    assert list(pred.columns[:3]) == ["subject_id", "study_id", "label"]
    for name in ["fusion", *BASELINES]:
        assert f"score:{name}" in pred.columns, name
    m = json.loads((full_run / "metrics.json").read_text())
    lab = pred[pred["label"].notna()]
    assert lab["label"].nunique() == 2, "the cohort must have both classes on test for this test to mean anything"
    for name in ["fusion", *BASELINES]:
        r = m["models"][name]
        assert r["auroc"] == pytest.approx(roc_auc_score(lab["label"], lab[f"score:{name}"]), abs=1e-9)
        assert r["auprc"] == pytest.approx(average_precision_score(lab["label"], lab[f"score:{name}"]), abs=1e-9)
        assert r["ci_low"] <= r["auroc"] <= r["ci_high"]
    for name in BASELINES:
        d = m["paired_differences"][f"fusion_vs_{name}"]
        assert d["delta"] == pytest.approx(m["models"]["fusion"]["auroc"] - m["models"][name]["auroc"], abs=1e-9)
        assert d["ci_low"] <= d["delta"] <= d["ci_high"]
    assert m["unit"] == "patient"
    assert m["data"]["test"]["positives"] == int(lab["label"].sum())
    deg = m["degradation"]
    assert deg["models"] == ["with_dropout", "without_dropout"]
    assert [r["removed"] for r in deg["rows"]] == [None, "image", "text", "ehr"]
    # Extra training seeds of the pair (default 3): their own folder, never a predictions.csv column; the first
    # seed is the reported model, the others are trained anew (their scores differ).
    assert deg["n_seeds"] == 3
    extra = sorted(p.stem for p in (full_run / "models" / "degradation_seeds").glob("*.json"))
    assert extra == ["fusion_no_dropout_seed1", "fusion_no_dropout_seed2", "fusion_seed1", "fusion_seed2"]
    assert not [c for c in pred.columns if "seed" in c]
    for r in deg["rows"]:
        for mod in deg["models"]:
            s = r[mod]["over_seeds"]
            assert s["auroc"][0] == pytest.approx(r[mod]["value"], abs=1e-12) and len(set(s["auroc"])) == 3
    assert (full_run / "roc.png").read_bytes()[:4] == b"\x89PNG"
    report = (full_run / "report.md").read_text()
    assert "Paired differences" in report and "Graceful degradation" in report
    val = pd.read_csv(full_run / "predictions_validate.csv")
    assert set(val["subject_id"]).isdisjoint(set(pred["subject_id"]))  # splits by patient


def test_models_are_selected_on_validation(full_run):
    from radalign.metrics import auroc

    meta = json.loads((full_run / "models" / "fusion.json").read_text())
    hist = [h["val_auroc"] for h in meta["history"]]
    assert meta["best_val_auroc"] == pytest.approx(max(hist))
    assert meta["best_epoch"] == int(np.argmax(hist))
    val = pd.read_csv(full_run / "predictions_validate.csv").dropna(subset=["label"])
    # the saved (best) weights reproduce the best validation AUROC
    assert auroc(val["label"].to_numpy(), val["logit:fusion"].to_numpy()) == pytest.approx(meta["best_val_auroc"],
                                                                                          abs=1e-6)


def test_late_fusion_is_stacked_on_validation_not_test(full_run):
    m = json.loads((full_run / "metrics.json").read_text())
    assert m["training"]["late_fusion"]["fitted_on"] == "validate"


def _weights(run_dir: Path, name: str = "fusion") -> dict:
    return load_file(str(run_dir / "models" / f"{name}.safetensors"))


@pytest.mark.parametrize("patches", [False, True])  # True: the fusion head reads the patch tokens
def test_resume_after_stop_is_exact(cohort, tmp_path, patches):
    from radalign.finetune.recipe import run_finetune

    only = ["baselines.models=[]", "baselines.fusion_without_dropout=false", "optim.epochs=3",
            "optim.batch_size=32", f"data.image_patch_tokens={str(patches).lower()}"]
    run_finetune(_cfg(cohort, tmp_path / "a", *only))
    run_finetune(_cfg(cohort, tmp_path / "b", *only, "stop_after=5"))  # inside the first epoch
    assert not (tmp_path / "b" / "models" / "fusion.json").exists()
    run_finetune(_cfg(cohort, tmp_path / "b", *only))
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and ("encoders.image.pos" in a) == patches
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if patches:  # the key shaped the model: flipping it is refused naming it
        with pytest.raises(RadalignError, match=r"data.image_patch_tokens: True -> False"):
            run_finetune(_cfg(cohort, tmp_path / "b", *only[:-1], "data.image_patch_tokens=false"))
    # a finished model is reused, not retrained, on a third call
    before = (tmp_path / "b" / "models" / "fusion.safetensors").stat().st_mtime_ns
    run_finetune(_cfg(cohort, tmp_path / "b", *only))
    assert (tmp_path / "b" / "models" / "fusion.safetensors").stat().st_mtime_ns == before


def test_changed_model_spec_never_resumes_the_old_checkpoints(cohort, tmp_path):
    """Checkpoints of RUN/train/fusion belong to one spec: rerunning the same run_dir with other modality
    dropout rates must not continue (or overwrite) the old model, stopped or finished; it refuses naming what
    changed (RUN/run_spec.json; more cases in tests/test_finetune_hostile.py)."""
    from radalign.finetune.recipe import run_finetune

    only = ["baselines.models=[]", "baselines.fusion_without_dropout=false", "optim.epochs=2",
            "optim.batch_size=32"]
    run_finetune(_cfg(cohort, tmp_path / "r", *only, "stop_after=3"))
    with pytest.raises(RadalignError, match=r"changed: model\.modality_dropout\.ehr: 0\.3 -> 0\.6; "
                                            r"model\.modality_dropout\.image: 0\.3 -> 0\.1\).*another run_dir"):
        run_finetune(_cfg(cohort, tmp_path / "r", *only, "model.modality_dropout={image: 0.1, text: 0.25, ehr: 0.6}"))
    run_finetune(_cfg(cohort, tmp_path / "r", *only))
    before = sorted(p.name for p in (tmp_path / "r" / "train" / "fusion" / "checkpoints").glob("step-*"))
    with pytest.raises(RadalignError, match=r"changed: model\.modality_dropout\.ehr: 0\.3 -> 0\.6; "
                                            r"model\.modality_dropout\.image: 0\.3 -> 0\.1\).*another run_dir"):
        run_finetune(_cfg(cohort, tmp_path / "r", *only, "model.modality_dropout={image: 0.1, text: 0.25, ehr: 0.6}"))
    assert sorted(p.name for p in (tmp_path / "r" / "train" / "fusion" / "checkpoints").glob("step-*")) == before


def test_resume_falls_back_when_the_checkpoint_is_damaged(cohort, tmp_path):
    from radalign.finetune.recipe import run_finetune

    only = ["baselines.models=[]", "baselines.fusion_without_dropout=false", "optim.epochs=3",
            "optim.batch_size=32"]
    run_finetune(_cfg(cohort, tmp_path / "a", *only))
    doc = json.loads((tmp_path / "a" / "metrics.json").read_text())
    per_epoch = math.ceil(doc["data"]["train"]["labelled"] / 32)  # an epoch passes over the labelled rows only
    assert doc["training"]["fusion"]["steps"] == 3 * per_epoch and 20 % per_epoch and 20 < 3 * per_epoch
    epoch_end = 20 // per_epoch * per_epoch  # the last epoch-end checkpoint before the stop
    run_finetune(_cfg(cohort, tmp_path / "b", *only, "stop_after=20"))
    ckpts = sorted((tmp_path / "b" / "train" / "fusion" / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == [f"step-{epoch_end:07d}", "step-0000020"]
    newest = ckpts[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    run_finetune(_cfg(cohort, tmp_path / "b", *only))  # falls back to the epoch-end checkpoint
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _torchrun(cohort, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "radalign.finetune", "--config", "finetune/long_stay", *[
                f"run_dir={run_dir}", f"data.table={cohort['table']}", f"data.shards={cohort['shards']}",
                f"data.checkpoint={cohort['export']}", f"data.cache={cohort['root'] / 'cache'}", "bootstrap=50",
                "optim.epochs=2", "model.d_model=32", "model.ehr_d=16", "model.n_layers=1", "model.ehr_blocks=1",
                "progress=false", "precision=fp32", "baselines.models=[]", "baselines.fusion_without_dropout=false",
                "model.dropout=0.0"], *extra]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_train_the_same_model_as_one(cohort, tmp_path):
    """Global batch 64 either way: 1 process x 64 rows, or 2 x 32 (modality dropout on, nn dropout off)."""
    from radalign.finetune.recipe import run_finetune

    run_finetune(_cfg(cohort, tmp_path / "one", "baselines.models=[]", "baselines.fusion_without_dropout=false",
                      "model.dropout=0.0", "optim.batch_size=64", "bootstrap=50"))
    two = _torchrun(cohort, tmp_path / "two", "optim.batch_size=32")
    assert two.returncode == 0, two.stderr[-3000:]
    for split in ("predictions.csv", "predictions_validate.csv"):
        p, q = pd.read_csv(tmp_path / "one" / split), pd.read_csv(tmp_path / "two" / split)
        np.testing.assert_allclose(p["logit:fusion"], q["logit:fusion"], atol=1e-5)
    # Weights too, except attention KEY biases: softmax ignores them, so their gradient is pure rounding
    # noise (~1e-9) that Adam scales up to lr-sized steps; they differ without changing any output.
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    d = 32  # model.d_model
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("W_k.bias"):
            continue
        if k.endswith("in_proj_bias"):
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4, msg=k)
    meta = json.loads((tmp_path / "two" / "models" / "fusion.json").read_text())
    assert meta["processes"] == 2


def test_evaluation_patients_seen_in_pretraining_are_refused(cohort, tmp_path):
    """Plant one training patient's study in the test split of a copy of the table."""
    import datasets
    from radalign.finetune.session import setup

    dd = datasets.load_from_disk(str(cohort["table"]))
    train, test = dd["train"].to_pandas(), dd["test"].to_pandas()
    moved = train.iloc[:1].assign(split="test")
    planted = tmp_path / "ehr" / "finetune"
    out = datasets.DatasetDict({"train": dd["train"], "validate": dd["validate"],
                                "test": datasets.Dataset.from_pandas(pd.concat([test, moved]), preserve_index=False,
                                                                     features=dd["test"].features)})
    out.save_to_disk(str(planted))
    (tmp_path / "ehr" / "manifest.json").write_text((cohort["table"].parent / "manifest.json").read_text())
    with pytest.raises(RadalignError, match=r"test: 1 patients.*allow_overlap"):
        setup(_cfg(cohort, tmp_path / "run", f"data.table={planted}"))
    run = setup(_cfg(cohort, tmp_path / "run2", f"data.table={planted}", "data.allow_overlap=true"))
    assert run.overlap["test"] == 1 and run.overlap["allowed"]
    run.acc.end_training()


def test_an_export_that_does_not_record_its_shards_is_refused(cohort, tiny_export, tmp_path):
    from radalign.finetune.session import setup

    with pytest.raises(RadalignError, match="does not record its training shards"):
        setup(_cfg(cohort, tmp_path / "run", f"data.checkpoint={tiny_export}"))


def test_bad_task_column_is_named_with_a_suggestion(cohort, tmp_path):
    from radalign.finetune.session import setup

    with pytest.raises(RadalignError, match=r"'los_dayz'.*los_days"):
        setup(_cfg(cohort, tmp_path / "run", "task.threshold_column=los_dayz"))


@pytest.mark.parametrize("split,saved_file", [("test", "predictions.csv"), ("validate", "predictions_validate.csv")])
def test_predict_scores_every_model_as_the_run_did(full_run, split, saved_file):
    """Every model of the run, the non-torch ones (gbdt, late_fusion) included, is loaded back from RUN/models and
    scores the split as the training run did."""
    from radalign.finetune.predict import predict_split

    frame = predict_split(full_run, split=split)
    saved = pd.read_csv(full_run / saved_file)
    assert frame["study_id"].astype(str).tolist() == saved["study_id"].astype(str).tolist()
    scored = [c for c in saved.columns if c.startswith(("score:", "logit:"))]
    assert sorted(scored) == sorted(c for c in frame.columns if c.startswith(("score:", "logit:")))
    for name in ("fusion", "fusion_no_dropout", *BASELINES):
        assert f"score:{name}" in scored, name
    for c in scored:
        np.testing.assert_allclose(frame[c].to_numpy(), saved[c].to_numpy(), rtol=1e-6, atol=1e-6, err_msg=c)


def test_predict_refuses_another_feature_list(full_run, cohort, tmp_path):
    from radalign.finetune.predict import load_run

    trained = load_run(full_run)
    trained.featurizer.features = trained.featurizer.features[:-1]  # as if trained on another list
    with pytest.raises(RadalignError, match="feature list differs"):
        trained.table(str(cohort["table"]) + "/")


def test_damaged_model_file_is_named(full_run, tmp_path):
    import shutil

    from radalign.finetune.predict import load_run

    copy = tmp_path / "run"
    shutil.copytree(full_run, copy)
    f = copy / "models" / "fusion.safetensors"
    f.write_bytes(f.read_bytes()[:64])
    with pytest.raises(RadalignError, match=r"fusion.safetensors: damaged"):
        load_run(copy)


def test_cli_train_is_the_default_verb(cohort, tmp_path):
    from radalign.cli import main

    rc = main(["finetune", "--config", "finetune/in_hospital_mortality", "--print-config",
               f"run_dir={tmp_path}", "optim.epochs=7"])
    assert rc == 0
    rc = main(["finetune", "--config", "finetune/in_hospital_mortality", "optim.epochs=zero"])
    assert rc == 2


def test_fewshot_sweep_writes_draws_by_patient_and_is_deterministic(cohort, tmp_path):
    from radalign.finetune.fewshot import read_draw
    from radalign.finetune.fewshot_recipe import run_fewshot_recipe

    def sweep(out):
        cfg = load_config(FinetuneConfig, "finetune/fewshot_chexpert", [
            f"run_dir={out}", f"data.table={cohort['table']}", f"data.shards={cohort['shards']}",
            f"data.checkpoint={cohort['export']}", f"data.cache={cohort['root'] / 'cache'}", "progress=false",
            "precision=fp32", "fewshot.ks=[1,2]"], stage="finetune")
        run_fewshot_recipe(cfg)
        return json.loads((out / "fewshot.json").read_text())

    a, b = sweep(tmp_path / "a"), sweep(tmp_path / "b")
    assert a["methods"] == b["methods"]
    draws = sorted((tmp_path / "a" / "draws").glob("anchored-k1-seed*.json"))
    assert len(draws) == 5
    test_patients = set(pd.read_parquet(cohort["table"].parent / "ehr.parquet").query("split != 'train'")
                        ["subject_id"].astype(str))
    for f in draws:
        d = read_draw(f)
        assert len(set(d.patients)) == len(d.patients) == 2  # one per class, distinct patients
        assert test_patients.isdisjoint(d.patients)
    assert (tmp_path / "a" / "learning_curve.png").is_file()
    assert a["zero_shot_auroc"] is not None


def test_config_lists_every_problem_in_one_error():
    over = ["baselines.degradation_seeds=0", "model.modality_dropout={image: 1.0}", "baselines.late_fusion=vote"]
    with pytest.raises(RadalignError) as e:
        load_config(FinetuneConfig, "finetune/in_hospital_mortality", over, stage="finetune")
    msg = str(e.value)
    for key in ("baselines.degradation_seeds: 0", "model.modality_dropout.image: 1.0", "baselines.late_fusion"):
        assert key in msg, (key, msg)
    cfg = load_config(FinetuneConfig, "finetune/in_hospital_mortality", [], stage="finetune")
    assert cfg.model.modality_dropout == {"image": 0.3, "text": 0.25, "ehr": 0.3} and cfg.optim.patience == 5


@pytest.mark.parametrize("tower", ["last_blocks", "lora"])
def test_tuned_towers_pass_the_config_check_unless_their_options_are_bad(tower):
    """The tuned tower modes pass the check (finetune.tower; tests/test_finetune_tower_run.py trains them) unless
    their options are bad (with patch tokens: tests/test_patch_tokens.py)."""
    cfg = load_config(FinetuneConfig, "finetune/in_hospital_mortality", [f"model.image_tower={tower}"],
                      stage="finetune")
    assert cfg.model.image_tower == tower and cfg.model.tune_blocks == 2 and cfg.model.lora_rank == 8
    with pytest.raises(RadalignError) as e:
        load_config(FinetuneConfig, "finetune/in_hospital_mortality",
                    [f"model.image_tower={tower}", "data.modalities=[ehr]", "model.lora_targets=[attn]",
                     "model.tune_blocks=0", "model.lora_rank=0"], stage="finetune")
    for key in ("model.image_tower: " + tower, "has no image", "model.lora_targets: ['attn']",
                "model.tune_blocks: 0", "model.lora_rank / model.lora_alpha: 0"):
        assert key in str(e.value), (key, str(e.value))


def test_rerun_reuses_the_degradation_seed_models(cohort, full_run, tmp_path, capsys):
    """A finished run run again trains nothing: the extra-seed models come back from their folder, same table."""
    import shutil

    from radalign.finetune.recipe import run_finetune

    copy = tmp_path / "again"
    shutil.copytree(full_run, copy)
    capsys.readouterr()
    run_finetune(_cfg(cohort, copy))
    out = capsys.readouterr().out
    for name in ("fusion_seed1", "fusion_seed2", "fusion_no_dropout_seed1", "fusion_no_dropout_seed2"):
        assert f"{name}: finished earlier" in out, name
    old = json.loads((full_run / "metrics.json").read_text())["degradation"]
    new = json.loads((copy / "metrics.json").read_text())["degradation"]
    for a, b in zip(old["rows"], new["rows"]):
        for m in old["models"]:
            assert a[m]["over_seeds"]["auroc"] == pytest.approx(b[m]["over_seeds"]["auroc"], abs=1e-9)


def test_a_run_saved_by_the_previous_release_still_loads(full_run, tmp_path):
    """Its config.yaml records every field, so also the retired fewshot.l2 (default 1.0) and the old default
    methods [prompt_init, linear_probe] of a sweep it never ran: load_run leaves them out and predicts as before;
    the same file as a config someone writes is refused, naming the key."""
    import shutil

    import yaml
    from radalign.finetune.predict import load_run, predict_split

    old = tmp_path / "old_run"
    shutil.copytree(full_run, old, ignore=shutil.ignore_patterns("*.lock", "lock"))
    doc = yaml.safe_load((old / "config.yaml").read_text())
    doc["fewshot"].update(l2=1.0, methods=["prompt_init", "linear_probe"])
    (old / "config.yaml").write_text(yaml.safe_dump(doc))
    got, want = load_run(old).cfg, load_run(full_run).cfg
    assert got.fewshot.methods == ["prompt_init", "linear_probe"]  # kept as recorded: a training run ignores it
    got.fewshot.methods = want.fewshot.methods
    assert got == want
    pd.testing.assert_frame_equal(predict_split(old, split="test"), predict_split(full_run, split="test"))
    with pytest.raises(RadalignError, match="fewshot.l2: removed"):
        load_config(FinetuneConfig, str(old / "config.yaml"), [], stage="finetune")

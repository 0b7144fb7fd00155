"""`radalign finetune` with a tuned image tower (model.image_tower=lora|last_blocks) end to end on the small
synthetic cohort: what is saved (the trained weights only, the export's checksum), the export untouched,
`finetune predict` equal to the run's own predictions, exact resume, 2 processes equal 1, refusals."""

from __future__ import annotations

import json
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
WIDTH, LAYERS = 64, 2  # tests/assets/nano.json (the cohort's export)
BASE = ["bootstrap=50", "optim.epochs=2", "optim.batch_size=64", "model.d_model=16", "model.n_heads=2",
        "model.n_layers=1", "model.ehr_d=16", "model.ehr_blocks=1", "progress=false", "precision=fp32",
        "baselines.models=[]", "baselines.fusion_without_dropout=false", "model.dropout=0.0",
        "data.modalities=[image]", "model.lora_rank=2", "optim.lr=3e-3"]


def _overrides(cohort, run_dir) -> list[str]:
    return [f"run_dir={run_dir}", f"data.table={cohort['table']}", f"data.shards={cohort['shards']}",
            f"data.checkpoint={cohort['export']}", f"data.cache={cohort['root'] / 'cache'}", *BASE]


def _cfg(cohort, run_dir, *extra) -> FinetuneConfig:
    return load_config(FinetuneConfig, "finetune/long_stay", _overrides(cohort, run_dir) + list(extra),
                       stage="finetune")


def _run(cohort, run_dir, *extra) -> Path:
    from radalign.finetune.recipe import run_finetune

    return run_finetune(_cfg(cohort, run_dir, *extra))


@pytest.fixture(scope="module")
def lora_run(ft_cohort, tmp_path_factory):
    return _run(ft_cohort, tmp_path_factory.mktemp("tower") / "lora", "model.image_tower=lora")


def _weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "models" / "fusion.safetensors"))


def test_lora_run_saves_only_the_adapters_and_the_head_with_the_export_checksum(ft_cohort, lora_run):
    from radalign.pretrain.export import load_encoders

    w = _weights(lora_run)
    tower = sorted(k for k in w if k.startswith("tower."))
    assert tower and all(".lora_A." in k or ".lora_B." in k for k in tower)
    # r * (in + out) per targeted Linear, 4 Linears per block: in_proj (64 -> 192), out_proj, c_fc (64 -> 256),
    # c_proj (256 -> 64)
    assert sum(w[k].numel() for k in tower) == LAYERS * 2 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert {k.split(".")[0] for k in w} == {"tower", "head"}
    meta = json.loads((lora_run / "models" / "fusion.json").read_text())
    assert meta["spec"]["kind"] == "tuned_fusion"
    assert meta["spec"]["tower"]["export_checksum"] == load_encoders(ft_cohort["export"]).checksum
    assert not (lora_run / "cache").exists() or not list((lora_run / "cache").glob("image*"))
    pred = pd.read_csv(lora_run / "predictions.csv")
    assert pred["score:fusion"].notna().all() and pred["label"].notna().sum() > 10


def test_the_export_is_untouched_by_training(ft_cohort, lora_run):
    from radalign.pretrain.export import load_encoders

    assert load_encoders(ft_cohort["export"]).checksum == json.loads(
        (Path(ft_cohort["export"]) / "config.json").read_text())["checksum"]


@pytest.mark.parametrize("split,saved", [("test", "predictions.csv"), ("validate", "predictions_validate.csv")])
def test_predict_with_the_adapters_equals_the_run_predictions(lora_run, split, saved):
    from radalign.finetune.predict import predict_split

    frame, ref = predict_split(lora_run, split=split), pd.read_csv(lora_run / saved)
    assert frame["study_id"].astype(str).tolist() == ref["study_id"].astype(str).tolist()
    np.testing.assert_allclose(frame["logit:fusion"].to_numpy(), ref["logit:fusion"].to_numpy(), atol=1e-5)


def test_predict_round_trip_equals_the_in_memory_model(ft_cohort, lora_run):
    """The model as trained in memory (the recipe's own) against the one loaded from its files."""
    from radalign.finetune.predict import load_run
    from radalign.finetune.registry import load_model, logits_on
    from radalign.finetune.session import setup

    run = setup(_cfg(ft_cohort, lora_run, "model.image_tower=lora"))
    try:
        model, meta = load_model(lora_run / "models", "fusion")
        trained = load_run(lora_run)
        a = logits_on(model, run.test, ["image"])[:, 0]
        b = trained.logits(trained.inputs("test"), "fusion")
        np.testing.assert_allclose(a, b, atol=1e-6)
    finally:
        run.acc.end_training()


@pytest.mark.parametrize("damage", ["truncate", "flip_a_weight_byte", "flip_a_header_byte"])
def test_damaged_adapter_file_is_refused(lora_run, tmp_path, damage):
    import shutil

    from radalign.finetune.predict import load_run

    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy)
    f = copy / "models" / "fusion.safetensors"
    raw = bytearray(f.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        i = len(raw) - 7 if damage == "flip_a_weight_byte" else 20
        raw[i] ^= 0x10
    f.write_bytes(bytes(raw))
    with pytest.raises(RadalignError, match=r"fusion.safetensors: damaged model weights"):
        load_run(copy)


def test_another_export_is_refused_naming_both_checksums(ft_cohort, lora_run, tmp_path):
    import shutil

    from radalign.finetune.predict import load_run

    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy)
    meta_f = copy / "models" / "fusion.json"
    meta = json.loads(meta_f.read_text())
    meta["spec"]["tower"]["export"] = str(ft_cohort["other_export"])
    meta_f.write_text(json.dumps(meta))
    with pytest.raises(RadalignError, match=r"trained on export .*Restore that export at the path the run recorded \(spec.tower.export"):
        load_run(copy)


@pytest.mark.parametrize("mode", ["lora", "last_blocks"])
def test_resume_after_a_stop_is_exact(ft_cohort, tmp_path, mode):
    extra = [f"model.image_tower={mode}", "model.tune_blocks=1", "optim.batch_size=32"]
    _run(ft_cohort, tmp_path / "a", *extra)
    _run(ft_cohort, tmp_path / "b", *extra, "stop_after=3")  # inside the first epoch
    assert not (tmp_path / "b" / "models" / "fusion.json").exists()
    _run(ft_cohort, tmp_path / "b", *extra)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = json.loads((tmp_path / "a" / "models" / "fusion.json").read_text())["history"]
    hb = json.loads((tmp_path / "b" / "models" / "fusion.json").read_text())["history"]
    assert ha == hb


def test_last_blocks_saves_the_last_blocks_and_the_projection_only(ft_cohort, tmp_path):
    run = _run(ft_cohort, tmp_path / "lb", "model.image_tower=last_blocks", "model.tune_blocks=1",
               "optim.epochs=1")
    tower = {k for k in _weights(run) if k.startswith("tower.")}
    assert tower and all(k.startswith(("tower.transformer.resblocks.1.", "tower.ln_post.")) or k == "tower.proj"
                         for k in tower)
    assert "tower.proj" in tower and "tower.ln_post.weight" in tower


def test_with_ehr_fusion(ft_cohort, tmp_path):
    run = _run(ft_cohort, tmp_path / "ehr", "model.image_tower=lora", "data.modalities=[image, ehr]",
               "baselines.models=[ehr_only, image_only, early_fusion]", "baselines.fusion_without_dropout=true",
               "optim.epochs=1")
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["models"]) == {"fusion", "ehr_only"}
    # the three asked-for models that read the frozen embedding are counted with their reason, never silent
    assert set(m["not_trained"]) == {"fusion_no_dropout", "image_only", "early_fusion"}
    assert all("model.image_tower=lora" in why for why in m["not_trained"].values())
    report = (run / "report.md").read_text()
    assert all(f"Not trained: {n.replace('_', chr(92) + '_')}" in report for n in m["not_trained"])
    assert json.loads((run / "models" / "fusion.json").read_text())["spec"]["modalities"] == ["image", "ehr"]


def _torchrun(cohort, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "radalign.finetune", "--config", "finetune/long_stay", *_overrides(cohort, run_dir), *extra]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_train_the_same_lora_model_as_one(ft_cohort, tmp_path):
    """Global batch 64 either way: 1 process x 64 rows, or 2 x 32."""
    _run(ft_cohort, tmp_path / "one", "model.image_tower=lora", "optim.epochs=1")
    two = _torchrun(ft_cohort, tmp_path / "two", "model.image_tower=lora", "optim.epochs=1", "optim.batch_size=32")
    assert two.returncode == 0, two.stderr[-3000:]
    for split in ("predictions.csv", "predictions_validate.csv"):
        p, q = pd.read_csv(tmp_path / "one" / split), pd.read_csv(tmp_path / "two" / split)
        np.testing.assert_allclose(p["logit:fusion"], q["logit:fusion"], atol=1e-5)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    d = 16  # model.d_model: attention key biases of the head get rounding-noise gradients (see test_finetune_recipe)
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("in_proj_bias"):
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4, msg=k)
    assert json.loads((tmp_path / "two" / "models" / "fusion.json").read_text())["processes"] == 2


def test_a_multilabel_task_with_a_lora_tower(ft_cohort, tmp_path):
    """The two new axes together: one logit per class from a tuned tower, predict repeating the run's scores."""
    from radalign.finetune.predict import predict_split

    labels = ["Cardiomegaly", "Edema", "Pleural Effusion"]
    run_dir = tmp_path / "ml"
    cfg = load_config(FinetuneConfig, "finetune/chexpert14", _overrides(ft_cohort, run_dir) + [
        "model.image_tower=lora", "optim.epochs=1", "model.ehr_d=16", f"task.labels=[{','.join(labels)}]"],
        stage="finetune")
    from radalign.finetune.recipe import run_finetune

    run_finetune(cfg)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["classes"] == labels and set(m["models"]) == {"fusion"}
    assert set(m["models"]["fusion"]["classes"]) == set(labels)
    saved = pd.read_csv(run_dir / "predictions.csv")
    assert [c for c in saved.columns if c.startswith("score:")] == [f"score:fusion:{c}" for c in labels]
    again = predict_split(run_dir, split="test")
    np.testing.assert_allclose(again.filter(like="score:").to_numpy(), saved.filter(like="score:").to_numpy(),
                               rtol=1e-5, atol=1e-6)


def test_eval_and_explain_of_a_tuned_run(ft_cohort, lora_run, tmp_path):
    """`finetune eval` scores the tuned model as the run did (same AUROC on the same test split); `finetune
    explain` explains one of its studies with the probability its predictions.csv holds."""
    from radalign.cli import main

    out = tmp_path / "eval"
    assert main(["finetune", "eval", "--run", str(lora_run), "--split", "test", "--out", str(out),
                 "--bootstrap", "20"]) == 0
    ev = json.loads((out / "metrics.json").read_text())
    run_m = json.loads((lora_run / "metrics.json").read_text())
    assert ev["discrimination"]["metrics"]["auroc"]["value"] == pytest.approx(run_m["models"]["fusion"]["auroc"])
    pred = pd.read_csv(lora_run / "predictions.csv", dtype={"study_id": str})
    row = pred.iloc[0]
    ex = tmp_path / "x.json"
    assert main(["finetune", "explain", "--run", str(lora_run), "--study-id", row["study_id"], "--out", str(ex)]) == 0
    out = json.loads(ex.read_text())["output"]
    assert out["full"] == pytest.approx(row["logit:fusion"], abs=1e-4)  # what predictions.csv holds for it
    assert out["probability"] == pytest.approx(row["score:fusion"], abs=1e-5)

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


def _no_frozen_image_pass(monkeypatch) -> None:
    """A tuned run reads films through its own tower: any pass of the frozen tower's pooled or patch embeddings
    (finetune.inputs.EmbeddingCache) fails the test."""
    from radalign.finetune.inputs import EmbeddingCache

    def refuse(self, split):
        raise AssertionError(f"the frozen tower's image pass ran on split {split}")

    monkeypatch.setattr(EmbeddingCache, "images", refuse)
    monkeypatch.setattr(EmbeddingCache, "patches", refuse)


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
    pred = pd.read_csv(lora_run / "predictions.csv")
    assert pred["score:fusion"].notna().all() and pred["label"].notna().sum() > 10


def test_the_export_is_untouched_by_training(ft_cohort, lora_run):
    from radalign.pretrain.export import load_encoders

    assert load_encoders(ft_cohort["export"]).checksum == json.loads(
        (Path(ft_cohort["export"]) / "config.json").read_text())["checksum"]


@pytest.mark.parametrize("split,saved", [("test", "predictions.csv"), ("validate", "predictions_validate.csv")])
def test_predict_with_the_adapters_equals_the_run_predictions(lora_run, split, saved, monkeypatch):
    from radalign.finetune.predict import predict_split

    _no_frozen_image_pass(monkeypatch)

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


@pytest.mark.parametrize("mode", ["lora", "last_blocks", "lora+patches", "lora+tower_lr"])
def test_resume_after_a_stop_is_exact(ft_cohort, tmp_path, mode):
    """Also with the tower's own learning rate: the optimizer's four groups (and their rates) come back."""
    extra = [f"model.image_tower={mode.split('+')[0]}", "model.tune_blocks=1", "optim.batch_size=32",
             f"data.image_patch_tokens={'+patches' in mode}"] + (["optim.tower_lr=3e-4"] if "tower_lr" in mode else [])
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


@pytest.fixture(scope="module")
def lora_patch_run(ft_cohort, tmp_path_factory):
    return _run(ft_cohort, tmp_path_factory.mktemp("tower") / "patch", "model.image_tower=lora",
                "data.image_patch_tokens=true", "optim.epochs=1")


def test_a_lora_run_with_patch_tokens_trains_the_adapters_through_them(ft_cohort, lora_patch_run, monkeypatch):
    from radalign.finetune.predict import predict_split

    spec = json.loads((lora_patch_run / "models" / "fusion.json").read_text())["spec"]
    assert spec["kind"] == "tuned_fusion" and spec["tower"]["patch_tokens"] is True
    assert spec["image_patches"] == [(64 // 16) ** 2, WIDTH]  # the nano ViT's patch grid and width
    w = _weights(lora_patch_run)
    assert w["head.encoders.image.pos"].shape == (16, 16) and w["head.encoders.image.norm.weight"].shape == (WIDTH,)
    tower = [k for k in w if k.startswith("tower.")]
    assert tower and all(".lora_A." in k or ".lora_B." in k for k in tower)
    trained_b = [k for k in tower if ".lora_B." in k and w[k].abs().sum() > 0]  # B starts at zero
    assert len(trained_b) == 4 * LAYERS  # every adapter of every block moved
    _no_frozen_image_pass(monkeypatch)  # the patch tokens come from the tuned tower, not the frozen cache
    frame, ref = predict_split(lora_patch_run), pd.read_csv(lora_patch_run / "predictions.csv")
    assert frame["study_id"].astype(str).tolist() == ref["study_id"].astype(str).tolist()
    np.testing.assert_allclose(frame["logit:fusion"].to_numpy(), ref["logit:fusion"].to_numpy(), atol=1e-5)


def test_last_blocks_with_patch_tokens_saves_no_projection(ft_cohort, tmp_path, monkeypatch):
    _no_frozen_image_pass(monkeypatch)  # training too reads the films through the tuned tower only
    run = _run(ft_cohort, tmp_path / "lbp", "model.image_tower=last_blocks", "model.tune_blocks=1",
               "data.image_patch_tokens=true", "optim.epochs=1")
    tower = {k for k in _weights(run) if k.startswith("tower.")}
    assert tower and all(k.startswith(("tower.transformer.resblocks.1.", "tower.ln_post.")) for k in tower)


def test_tower_lr_steps_the_adapters_at_their_own_rate(ft_cohort, lora_run, tmp_path):
    """optim.tower_lr: the adapters move about tower_lr per step (AdamW), the head at optim.lr: at 1e-9 the
    adapters stay at zero to 1e-6 while the head trains as in a run without it."""
    from radalign.finetune.runspec import read_run_spec

    slow = _run(ft_cohort, tmp_path / "slow", "model.image_tower=lora", "optim.tower_lr=1e-9")
    w, ref = _weights(slow), _weights(lora_run)  # lora_run: the same config without tower_lr (lr 3e-3)
    b = [k for k in w if ".lora_B." in k]
    assert b and max(float(w[k].abs().max()) for k in b) < 1e-6
    assert max(float(ref[k].abs().max()) for k in b) > 1e-3
    from radalign.finetune.registry import build_model

    spec = json.loads((slow / "models" / "fusion.json").read_text())["spec"]
    torch.manual_seed(0)  # the run's seed: the model as it was before its first step
    init = {k: v for k, v in build_model(spec, checkpoint=ft_cohort["export"]).state_dict().items()
            if k.startswith("head.")}
    moved = max(float((w[k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-3  # ... while the head trained at optim.lr
    assert read_run_spec(slow)["optim"]["tower_lr"] == 1e-9
    assert "tower_lr" not in read_run_spec(lora_run)["optim"]  # unset: recorded as runs before the key were
    with pytest.raises(RadalignError, match="changed: optim.tower_lr: 1e-09 -> 1e-05"):
        _run(ft_cohort, tmp_path / "slow", "model.image_tower=lora", "optim.tower_lr=1e-5")


@pytest.mark.parametrize("extra,msg", [(["optim.tower_lr=0"], r"optim.tower_lr: 0.0; it must be a number > 0"),
                                       (["optim.tower_lr=nan"], r"optim.tower_lr: nan; it must be a number > 0"),
                                       (["model.image_tower=frozen", "optim.tower_lr=1e-4"],
                                        "model.image_tower=frozen trains no tower weights")])
def test_a_bad_tower_lr_is_refused_with_the_fix(ft_cohort, tmp_path, extra, msg):
    with pytest.raises(RadalignError, match=msg):
        _cfg(ft_cohort, tmp_path / "x", "model.image_tower=lora", *extra)


@pytest.fixture(scope="module")
def lora_ehr_run(ft_cohort, tmp_path_factory):
    """A tuned run with image and EHR (so the degradation table masks each in turn) and the frozen-embedding
    baselines asked for (a tuned run leaves them out, with the reason)."""
    return _run(ft_cohort, tmp_path_factory.mktemp("tower") / "ehr", "model.image_tower=lora",
                "data.modalities=[image, ehr]", "baselines.models=[ehr_only, image_only, early_fusion]",
                "baselines.fusion_without_dropout=true", "optim.epochs=1")


def test_with_ehr_fusion(lora_ehr_run):
    run = lora_ehr_run
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


@pytest.mark.parametrize("tower", [["model.image_tower=lora"],
                                   ["model.image_tower=last_blocks", "model.tune_blocks=1", "data.image_patch_tokens=true"]],
                         ids=["lora", "last_blocks+patches"])
def test_two_processes_train_the_same_tuned_model_as_one(ft_cohort, tmp_path, tower):
    """Global batch 64 either way: 1 process x 64 rows, or 2 x 32; pooled and patch-token heads."""
    _run(ft_cohort, tmp_path / "one", *tower, "optim.epochs=1")
    two = _torchrun(ft_cohort, tmp_path / "two", *tower, "optim.epochs=1", "optim.batch_size=32")
    assert two.returncode == 0, two.stderr[-3000:]
    for split in ("predictions.csv", "predictions_validate.csv"):
        p, q = pd.read_csv(tmp_path / "one" / split), pd.read_csv(tmp_path / "two" / split)
        np.testing.assert_allclose(p["logit:fusion"], q["logit:fusion"], atol=1e-5)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("in_proj_bias"):  # [q, k, v] biases: the key bias gets rounding-noise gradients only (softmax
            d = len(x) // 3  # ignores it; see test_finetune_recipe), so it is left out, in the head and the tower
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


@pytest.mark.parametrize("which", ["lora_run", "lora_patch_run"])
def test_eval_and_explain_of_a_tuned_run(ft_cohort, which, tmp_path, request):
    """`finetune eval` scores the tuned model as the run did (same AUROC on the same test split); `finetune
    explain` explains one of its studies with the probability its predictions.csv holds (pooled and patch
    tokens alike)."""
    from radalign.cli import main

    lora_run = request.getfixturevalue(which)

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


def test_the_serve_explainer_explains_a_tuned_runs_study_without_the_index(lora_run, tmp_path):
    """`retrieval serve --finetune-run` of a tuned run: the explanation (the run's probability), no neighbour vote
    from the frozen index and the reason, rather than the index search's refusal."""
    from radalign.finetune.serve_explain import StudyExplainer

    pred = pd.read_csv(lora_run / "predictions.csv", dtype={"study_id": str})
    out = StudyExplainer(lora_run, tmp_path / "an-index").explain(pred["study_id"][0], k=3)
    assert "error" not in out and out["similar_cases"] == []
    assert out["output"]["probability"] == pytest.approx(pred["score:fusion"][0], abs=1e-5)
    assert "image tower was tuned" in out["similar_note"]


# ----------------------------------------------------------------------------------------------------------
# A run and its export moved together (issue 20 §2): found by the run's data.checkpoint, checksum first


def _set_checkpoint(run_dir: Path, old, new) -> None:
    """RUN/config.yaml's data.checkpoint from `old` to `new` (what a user edits after moving the export)."""
    f = run_dir / "config.yaml"
    text = f.read_text()
    assert f"checkpoint: {old}\n" in text
    f.write_text(text.replace(f"checkpoint: {old}\n", f"checkpoint: {new}\n"))


def test_a_moved_run_and_export_predict_exactly_as_before(ft_cohort, tmp_path, monkeypatch):
    """Trained in a/ with data.checkpoint relative to it; a/ moved to b/ (the recorded export path is gone):
    predict equals the original's predictions exactly, from b/ as the working folder or with config.yaml naming
    the export's new place; `radalign finetune` again in b/ reuses the finished model (its spec unchanged)."""
    import shutil

    from radalign.finetune.predict import predict_split

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(ft_cohort["export"], a / "export")
    monkeypatch.chdir(a)
    extra = ["model.image_tower=lora", "optim.epochs=1", "data.checkpoint=export"]
    _run(ft_cohort, "run", *extra)
    before = {s: predict_split(a / "run", split=s) for s in ("test", "validate")}
    recorded = json.loads((a / "run" / "models" / "fusion.json").read_text())["spec"]
    assert recorded["tower"]["export"] == str((a / "export").resolve())
    shutil.copytree(a, b)
    shutil.rmtree(a)
    monkeypatch.chdir(b)
    for s in before:
        pd.testing.assert_frame_equal(predict_split("run", split=s), before[s])
    weights = (b / "run" / "models" / "fusion.safetensors").read_bytes()
    _run(ft_cohort, "run", *extra)  # reused: no "changed" refusal, nothing retrained
    assert (b / "run" / "models" / "fusion.safetensors").read_bytes() == weights
    assert json.loads((b / "run" / "models" / "fusion.json").read_text())["spec"] == recorded
    monkeypatch.chdir(tmp_path)
    _set_checkpoint(b / "run", "export", b / "export")
    pd.testing.assert_frame_equal(predict_split(b / "run", split="test"), before["test"])


def test_a_stale_data_checkpoint_falls_back_to_the_recorded_export(ft_cohort, lora_run, tmp_path):
    import shutil

    from radalign.finetune.predict import load_run, predict_split

    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy)
    _set_checkpoint(copy, ft_cohort["export"], tmp_path / "nowhere")
    assert Path(load_run(copy).export) == Path(ft_cohort["export"])
    pd.testing.assert_frame_equal(predict_split(copy, split="test"), predict_split(lora_run, split="test"))


@pytest.mark.parametrize("recorded", ["deleted", "another_export"])
def test_a_wrong_export_is_refused_naming_both_paths_and_checksums(ft_cohort, lora_run, tmp_path, recorded):
    import shutil

    from radalign.finetune.predict import load_run
    from radalign.pretrain.export import load_encoders

    want, other = load_encoders(ft_cohort["export"]).checksum, load_encoders(ft_cohort["other_export"]).checksum
    copy, gone = tmp_path / "run", tmp_path / "old" / "export"
    shutil.copytree(lora_run, copy)
    if recorded == "another_export":
        shutil.copytree(ft_cohort["other_export"], gone)
    meta_f = copy / "models" / "fusion.json"
    meta = json.loads(meta_f.read_text())
    meta["spec"]["tower"]["export"] = str(gone)
    meta_f.write_text(json.dumps(meta))
    _set_checkpoint(copy, ft_cohort["export"], ft_cohort["other_export"])
    with pytest.raises(RadalignError) as e:
        load_run(copy)
    msg = str(e.value)
    at_recorded = f"{gone} holds " + (f"export {other[:12]}" if recorded == "another_export" else "no export")
    assert f"trained on export {want[:12]}" in msg and f"{ft_cohort['other_export']} holds export {other[:12]}" in msg
    assert at_recorded in msg and "Fix: copy that export beside the run and point data.checkpoint" in msg


# ----------------------------------------------------------------------------------------------------------
# Decode only the films asked for; the tower once per film (issue 20 §2)


def _decodes(monkeypatch) -> list:
    """Counts the JPEG decodes of the shard loader (the work a film costs before the tower)."""
    import radalign.data.loader as loader

    calls, real = [], loader._decode_gray
    monkeypatch.setattr(loader, "_decode_gray", lambda *a: calls.append(1) or real(*a))
    return calls


def _films_of(cohort, split: str, rows=None) -> set[str]:
    """The dicom_ids of the table split's studies (`rows` of it) that the shards hold: from the table and a
    metadata scan of the shards, not from finetune.films."""
    from radalign.data.shards import scan_split, split_names
    from radalign.finetune.inputs import load_table

    frame = load_table(cohort["table"]).split(split)
    frame = frame if rows is None else frame.iloc[rows]
    listed = {str(d) for ids in frame["dicom_ids"] if ids is not None for d in ids}
    held = {s.key for sp in split_names(cohort["shards"]) for s in scan_split(cohort["shards"], sp)}
    return listed & held


def test_film_store_decodes_only_the_wanted_films(ft_cohort, monkeypatch):
    from radalign.data.loader import make_eval_loader, shard_paths
    from radalign.finetune.films import FilmStore, split_transform

    cfg = json.loads((Path(ft_cohort["export"]) / "config.json").read_text())
    everything = FilmStore.load(ft_cohort["shards"], cfg, _films_of(ft_cohort, "test") | _films_of(ft_cohort, "train"))
    wanted = set(sorted(_films_of(ft_cohort, "test"))[::5])
    calls = _decodes(monkeypatch)
    store = FilmStore.load(ft_cohort["shards"], cfg, wanted)
    assert set(store.films) == wanted and len(calls) == len(wanted)
    assert all(torch.equal(store.films[k], everything.films[k]) for k in wanted)
    assert all(lost == {} for lost in store.lost.values())  # read past, not lost (no "unaccounted")
    loader = make_eval_loader(shard_paths(ft_cohort["shards"], "test"), batch_size=16,
                              transform=split_transform(cfg)[0], rank=0, world_size=1, keys=wanted)
    got = [k for b in loader for k in b["key"]]
    assert sorted(got) == sorted(k for k in wanted if k in set(got)) and loader.lost == {}
    assert loader.delivered == len(got) and loader.delivered + loader.not_selected == loader.expected


def test_predicting_three_studies_decodes_their_films_only(ft_cohort, lora_run, monkeypatch):
    from radalign.finetune.predict import load_run

    trained = load_run(lora_run)
    full = trained.predictions(trained.inputs("test"))
    calls = _decodes(monkeypatch)
    rows = [0, 5, 9]
    data = trained.inputs("test", rows=rows)
    films = _films_of(ft_cohort, "test", rows)
    assert films and set(data.store.films) == films and len(calls) == len(films)
    three = trained.predictions(data)
    assert three["study_id"].tolist() == full["study_id"].iloc[rows].tolist()
    np.testing.assert_allclose(three["logit:fusion"], full["logit:fusion"].iloc[rows], atol=1e-5)
    calls.clear()
    trained.inputs("test")  # a whole split: its own studies' films, not the other splits'
    assert len(calls) == len(_films_of(ft_cohort, "test")) < len(_films_of(ft_cohort, "train"))


def test_explain_decodes_the_studys_films_only(ft_cohort, lora_run, monkeypatch):
    from radalign.finetune.evaluate import explain_study
    from radalign.finetune.inputs import load_table

    frame = load_table(ft_cohort["table"]).split("test")
    row = next(i for i, ids in enumerate(frame["dicom_ids"]) if ids is not None and len(ids) > 1)
    calls = _decodes(monkeypatch)
    explain_study(lora_run, frame["study_id"].iloc[row], split="test")
    assert len(calls) == len(_films_of(ft_cohort, "test", [row])) > 1


def test_degradation_runs_the_tower_once_per_film_and_scores_as_the_full_forward(ft_cohort, lora_ehr_run,
                                                                                 tmp_path, monkeypatch):
    """`finetune eval` of a tuned run: the tower sees each test and validation film once (predictions and
    every degradation condition from those tokens); the degradation logits equal the full model's forward per
    condition (films through the tower each time, as before), bit for bit."""
    import dataclasses

    from radalign.finetune import clinical as C
    from radalign.finetune.evaluate import degradation_scores, evaluate_run
    from radalign.finetune.predict import load_run
    from radalign.finetune.registry import logits_on
    from radalign.finetune.tower import TunedModel

    films, real = [], TunedModel.image_tokens
    monkeypatch.setattr(TunedModel, "image_tokens", lambda self, b, rows: films.append(len(b["pixels"])) or
                        real(self, b, rows))
    res = evaluate_run(lora_ehr_run, out=tmp_path / "eval", n_boot=20)
    assert sum(films) == len(_films_of(ft_cohort, "test")) + len(_films_of(ft_cohort, "validate"))
    assert [r["removed"] for r in res["degradation"]["rows"]] == [None, "image", "ehr"]
    trained = load_run(lora_ehr_run)
    model, meta = trained.models["fusion"]
    test = trained.inputs("test")
    films.clear()
    got = degradation_scores(trained, test)["fusion"]
    assert films == []  # the split's tokens are there already
    as_films = dataclasses.replace(test, image=None, tokens_of=None)  # the forward from films, every condition
    mods = meta["spec"]["modalities"]
    want = {"all": logits_on(model, as_films, mods)[:, 0],
            **{m: logits_on(model, as_films, mods, present_override={m: False})[:, 0] for m in mods}}
    assert got.keys() == want.keys() == {"all", "image", "ehr"}
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert sum(films) == 3 * len(_films_of(ft_cohort, "test"))  # what the old path cost: once per condition
    table = C.degradation_table(test.y[:, 0].astype(np.float64), test.subjects, {"fusion": want}, n_boot=20,
                                seed=trained.cfg.seed)
    assert json.dumps(res["degradation"], sort_keys=True) == json.dumps(table, sort_keys=True)


def test_study_tokens_are_computed_by_the_tower_asked_for(lora_run):
    """A split holding one tower's tokens is reused by that tower only: another tower (an extra degradation
    seed's) runs over the films again and gets what it gets from the films alone."""
    import dataclasses

    from radalign.finetune.predict import load_run
    from radalign.finetune.registry import load_model
    from radalign.finetune.tower import study_tokens

    trained = load_run(lora_run)
    data = trained.inputs("test")
    own = trained.models["fusion"][0]
    assert data.tokens_of is own.tower and study_tokens(own, data) is data
    other, _ = load_model(lora_run / "models", "fusion")
    with torch.no_grad():
        for n, p in other.tower.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    theirs = study_tokens(other, data)
    assert theirs.tokens_of is other.tower and not np.allclose(theirs.image, data.image, atol=1e-3)
    films_only = dataclasses.replace(data, image=None, tokens_of=None)
    np.testing.assert_array_equal(theirs.image, study_tokens(other, films_only).image)
    np.testing.assert_array_equal(data.image, study_tokens(own, films_only).image)


def test_training_scores_and_degradation_run_the_tower_once_per_film(ft_cohort, lora_ehr_run, tmp_path,
                                                                     monkeypatch):
    """The recipe's own scoring of a tuned run (validation, test, then every degradation condition on test) runs
    the tower once per validation and test film: a rerun of the finished run (models reused) counts them, and
    writes the same metrics and degradation table as the first run."""
    import shutil

    from radalign.finetune.tower import TunedModel

    run_dir = tmp_path / "copy"
    shutil.copytree(lora_ehr_run, run_dir)
    films, real = [], TunedModel.image_tokens
    monkeypatch.setattr(TunedModel, "image_tokens", lambda self, b, rows: films.append(len(b["pixels"])) or
                        real(self, b, rows))
    _run(ft_cohort, run_dir, "model.image_tower=lora", "data.modalities=[image, ehr]",
         "baselines.models=[ehr_only, image_only, early_fusion]", "baselines.fusion_without_dropout=true",
         "optim.epochs=1")
    assert sum(films) == len(_films_of(ft_cohort, "test")) + len(_films_of(ft_cohort, "validate"))
    first, again = (json.loads((d / "metrics.json").read_text()) for d in (lora_ehr_run, run_dir))
    for key in ("models", "degradation"):
        assert json.dumps(again[key], sort_keys=True) == json.dumps(first[key], sort_keys=True), key

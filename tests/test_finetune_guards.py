"""Guards of the finetune recipe that its end-to-end runs cannot see: the EHR scaling fitted on the training split
only, early stopping after exactly `optim.patience` epochs without a better validation AUROC (and the weights of
the best epoch kept), the late-fusion stacker fitted on the validation rows, and the run folder locked for the
whole run.

Everything runs on a tiny hand-built EHR-only table (no towers, no embedding), in seconds. Expectations come from
numpy percentiles, sklearn's LogisticRegression on the documented stacking design, a planted validation curve
walked by hand, and a second process that tries to take the run folder's lock.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from radalign.finetune.config import FinetuneConfig
from safetensors.numpy import load_file

from radalign import RadalignError
from radalign.config import load_config

REPO = Path(__file__).resolve().parents[1]
FEATURES = ["creatinine", "lactate"]
N = {"train": 60, "validate": 40, "test": 40}
UNLABELLED_TRAIN = 7  # training rows without a label: they are not part of an epoch


def _split_frame(split: str, rng: np.random.Generator) -> pd.DataFrame:
    n = N[split]
    # Validation and test labs sit on another scale: statistics fitted on them too would move far.
    scale = {"train": 1.0, "validate": 40.0, "test": 90.0}[split]
    offset = {"train": 0, "validate": 1000, "test": 2000}[split]
    creat = rng.lognormal(size=n) * scale
    lact = rng.normal(2.0, 1.0, size=n) * scale
    hours = rng.uniform(0, 24, size=(n, 2))
    if split == "train":
        hours[:5, 0] = -1.0  # drawn after the film: out of the features and out of the statistics
        creat[:5] = 500.0
    y = (creat / scale + rng.normal(scale=0.8, size=n) > 1.3).astype(float)
    y[:2], y[2:4] = 0.0, 1.0  # both classes in every split
    if split == "train":
        y[-UNLABELLED_TRAIN:] = np.nan
    return pd.DataFrame({
        "subject_id": offset + np.arange(n), "study_id": 50_000 + offset + np.arange(n),
        "creatinine": creat, "creatinine_hours": hours[:, 0], "lactate": lact, "lactate_hours": hours[:, 1],
        "age": rng.uniform(20, 90, size=n), "gender": rng.choice(["F", "M"], size=n),
        "race": rng.choice(["WHITE", "BLACK"], size=n), "insurance": "Medicare", "marital_status": "MARRIED",
        "language": "ENGLISH", "in_hospital_mortality": y})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A link-ehr-like table (train/validate/test, one study per patient) and an export folder without
    recorded shards (so data.allow_overlap=true)."""
    import json

    import datasets

    root = tmp_path_factory.mktemp("guards")
    rng = np.random.default_rng(0)
    frames = {s: _split_frame(s, rng) for s in N}
    datasets.DatasetDict({s: datasets.Dataset.from_pandas(f, preserve_index=False) for s, f in frames.items()}
                         ).save_to_disk(str(root / "ehr" / "finetune"))
    (root / "ehr" / "manifest.json").write_text(json.dumps({"format": "radalign-ehr/1", "features": FEATURES}))
    (root / "export").mkdir()
    (root / "export" / "config.json").write_text(json.dumps({"format": "radalign-export/1"}))
    return {"root": root, "frames": frames, "table": root / "ehr" / "finetune", "export": root / "export"}


def _cfg(tiny, run_dir, *overrides) -> FinetuneConfig:
    base = [f"run_dir={run_dir}", f"data.table={tiny['table']}", f"data.checkpoint={tiny['export']}",
            "data.modalities=[ehr]", "data.allow_overlap=true", "progress=false", "precision=fp32",
            "model.d_model=16", "model.ehr_d=8", "model.n_layers=1", "model.ehr_blocks=1", "model.n_heads=2",
            "model.ehr_heads=2", "baselines.models=[]", "baselines.fusion_without_dropout=false",
            "optim.batch_size=16", "optim.epochs=8", "bootstrap=20", "log_every=1000"]
    return load_config(FinetuneConfig, "finetune/in_hospital_mortality", base + list(overrides), stage="finetune")


def _close(run) -> None:
    from radalign.training import reset_accelerate_state

    run.acc.end_training()
    reset_accelerate_state()


# ----------------------------------------------------------------------------------------------------------
# EHR scaling: training split only


def test_setup_fits_the_ehr_scaling_on_the_training_split_only(tiny, tmp_path):
    from radalign.finetune.session import setup

    run = setup(_cfg(tiny, tmp_path / "run"))
    try:
        fz, train = run.featurizer, tiny["frames"]["train"]
        assert fz.n_fit_rows == N["train"]
        for f in FEATURES:  # numpy percentiles over the training rows drawn before the film
            x = train[f].where(train[f"{f}_hours"] >= 0).dropna().to_numpy()
            q1, med, q3 = np.percentile(x, [25, 50, 75])
            assert fz.median[f] == pytest.approx(med) and fz.iqr[f] == pytest.approx(q3 - q1), f
        assert fz.median["age"] == pytest.approx(np.median(train["age"]))
        for split, data in (("validate", run.val), ("test", run.test)):  # scaled with the training statistics
            raw = tiny["frames"][split]["creatinine"].to_numpy()
            want = (raw - fz.median["creatinine"]) / fz.iqr["creatinine"]
            assert data.ehr.values[:, 0] == pytest.approx(want.astype(np.float32), rel=1e-5), split
    finally:
        _close(run)


# ----------------------------------------------------------------------------------------------------------
# Early stopping: a planted validation curve, walked by hand


def _planted_fit(tiny, run_dir, monkeypatch, curve, *overrides):
    """fit_torch on the tiny table with the validation AUROC of epoch e replaced by curve[e]; returns the info,
    the model, the split each score was asked on and the weights at each validation."""
    from radalign.finetune import trainer
    from radalign.finetune.registry import model_specs
    from radalign.finetune.session import setup

    run = setup(_cfg(tiny, run_dir, *overrides))
    seen, states = [], []

    def planted(model, data, modalities):
        seen.append(data)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return curve[len(seen) - 1]

    monkeypatch.setattr(trainer, "val_score", planted)
    try:
        model, info = trainer.fit_torch(run, "fusion", model_specs(run)["fusion"])
    finally:
        _close(run)
    return run, model, info, seen, states


@pytest.mark.parametrize("patience,curve,epochs_run,best_epoch", [
    # best 0.70 at epoch 1; epochs 2, 3 (a tie is no improvement), 4 without a better one: 3 -> stop after 4
    (3, [0.60, 0.70, 0.65, 0.70, 0.69, 0.90, 0.95, 0.99], 5, 1),
    (1, [0.60, 0.50, 0.90, 0.95, 0.99, 0.99, 0.99, 0.99], 2, 0),
    # one class on validation (NaN) never improves; patience 2 stops after epochs 2 and 3
    (2, [0.55, float("nan"), 0.80, float("nan"), 0.79, 0.95, 0.99, 0.99], 5, 2),
    (0, [0.60, 0.50, 0.50, 0.50, 0.50, 0.50, 0.50, 0.70], 8, 7),  # 0: every epoch
])
def test_early_stopping_after_exactly_patience_epochs(tiny, tmp_path, monkeypatch, patience, curve, epochs_run,
                                                       best_epoch):
    run, model, info, seen, states = _planted_fit(tiny, tmp_path / "run", monkeypatch, curve,
                                                  f"optim.patience={patience}")
    labelled = N["train"] - UNLABELLED_TRAIN
    per_epoch = math.ceil(labelled / 16)  # an epoch passes over the labelled training rows, 16 per step
    assert info["epochs_run"] == epochs_run and len(seen) == epochs_run
    assert info["steps"] == epochs_run * per_epoch
    assert info["best_epoch"] == best_epoch and info["best_val_auroc"] == pytest.approx(curve[best_epoch])
    assert [h["epoch"] for h in info["history"]] == list(range(epochs_run))
    assert all(d is run.val for d in seen)  # model selection on validation, never test
    final = model.state_dict()
    for k, v in states[best_epoch].items():  # the weights the best epoch was scored with
        assert torch.equal(final[k], v), k
    if best_epoch != epochs_run - 1:
        assert any(not torch.equal(final[k], v) for k, v in states[-1].items())


# ----------------------------------------------------------------------------------------------------------
# Late fusion: stacked on the validation rows


def _stack_design(logits: dict, present: dict, modalities) -> np.ndarray:
    """The documented stacking inputs: per modality, logit x presence and presence."""
    cols = []
    for m in modalities:
        p = np.asarray(present[m], float)
        cols += [np.asarray(logits[m], float) * p, p]
    return np.stack(cols, axis=1)


def test_late_fusion_stacker_is_fitted_on_the_validation_rows(monkeypatch, tmp_path):
    from radalign.finetune import registry
    from radalign.finetune.recipe import Scores, fit_late_fusion
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    mods = ["image", "text", "ehr"]

    def split(n, signal):
        """Labels driven by one modality's logit (validation: image, test: text)."""
        logits = {m: rng.normal(size=n) for m in mods}
        present = {"image": np.ones(n, bool), "text": rng.random(n) < 0.7, "ehr": rng.random(n) < 0.6}
        y = (logits[signal] * 2 + rng.normal(size=n) > 0).astype(float)
        y[:3] = np.nan  # unlabelled rows are left out of the fit
        return logits, present, y

    (lv, pv, yv), (lt, pt, yt) = split(300, "image"), split(300, "text")
    cfg = load_config(FinetuneConfig, "finetune/in_hospital_mortality", ["baselines.late_fusion=stacked"],
                      stage="finetune")
    run = SimpleNamespace(cfg=cfg, modalities=mods, val=SimpleNamespace(present=pv, y=yv[:, None]),
                          test=SimpleNamespace(present=pt, y=yt[:, None]), run_dir=tmp_path,
                          acc=SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None))
    scores = Scores(val={f"{m}_only": lv[m] for m in mods}, test={f"{m}_only": lt[m] for m in mods},
                    models={f"{m}_only": (None, {}) for m in mods})
    made = []

    class Recording(registry.LateFusion):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(registry, "LateFusion", Recording)
    fit_late_fusion(run, scores)
    assert len(made) == 1 and len(made[0].stackers) == 1
    ok_v, ok_t = ~np.isnan(yv), ~np.isnan(yt)
    ref = LogisticRegression(C=1.0, max_iter=1000).fit(_stack_design(lv, pv, mods)[ok_v], yv[ok_v].astype(int))
    on_test = LogisticRegression(C=1.0, max_iter=1000).fit(_stack_design(lt, pt, mods)[ok_t], yt[ok_t].astype(int))
    got = made[0].stackers[0]
    assert got.coef_ == pytest.approx(ref.coef_, abs=1e-4) and got.intercept_ == pytest.approx(ref.intercept_,
                                                                                               abs=1e-4)
    assert np.abs(on_test.coef_ - ref.coef_).max() > 0.5  # a test-fitted stacker would look different
    assert scores.test["late_fusion"] == pytest.approx(ref.decision_function(_stack_design(lt, pt, mods)), abs=1e-4)
    assert scores.val["late_fusion"] == pytest.approx(ref.decision_function(_stack_design(lv, pv, mods)), abs=1e-4)
    assert scores.info["late_fusion"]["fitted_on"] == "validate"
    saved = load_file(str(tmp_path / "models" / "late_fusion.safetensors"))  # the weights predict will use
    assert saved["output0.coef"] == pytest.approx(ref.coef_, abs=1e-4)
    assert saved["output0.intercept"] == pytest.approx(ref.intercept_, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------
# The run folder's lock


TRY_LOCK = ("import sys\nfrom radalign.lock import output_lock\nwith output_lock(sys.argv[1]):\n"
            "    print('took it', flush=True)\n")
HOLD_LOCK = ("import sys, time\nfrom radalign.lock import output_lock\nwith output_lock(sys.argv[1]):\n"
             "    print('held', flush=True)\n    time.sleep(120)\n")


def test_a_second_writer_of_a_finetune_run_dir_is_refused(tiny, tmp_path):
    from radalign.finetune.recipe import run_finetune

    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RadalignError, match=rf"in use by another process \(pid {holder.pid}"):
            run_finetune(_cfg(tiny, run_dir))
        assert not (run_dir / "config.yaml").exists() and not (run_dir / "models").exists()
    finally:
        holder.kill()
        holder.wait()


class _Probed(Exception):
    pass


def test_a_finetune_run_holds_its_run_dir_while_it_works(tiny, tmp_path, monkeypatch):
    """While the recipe works (here: inside setup), another process cannot take the folder; after it, it can."""
    import os

    from radalign.finetune import recipe, session

    run_dir = tmp_path / "run"
    probe = {}

    def probing_setup(cfg, **options):
        p = subprocess.run([sys.executable, "-c", TRY_LOCK, str(run_dir)], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
        probe.update(rc=p.returncode, err=p.stderr, out=p.stdout)
        raise _Probed

    monkeypatch.setattr(session, "setup", probing_setup)
    with pytest.raises(_Probed):
        recipe.run_finetune(_cfg(tiny, run_dir))
    assert probe["rc"] != 0 and "took it" not in probe["out"]
    assert "in use by another process" in probe["err"] and f"pid {os.getpid()}" in probe["err"]
    after = subprocess.run([sys.executable, "-c", TRY_LOCK, str(run_dir)], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert after.returncode == 0 and "took it" in after.stdout  # released when the run ends, even by an error


# ----------------------------------------------------------------------------------------------------------
# The training loop's batches and the gradient-boosted trees' split


@pytest.mark.parametrize("n,batch,world", [(53, 16, 1), (53, 16, 2), (33, 8, 2), (7, 4, 4)])
def test_epoch_batches_cover_every_row_once_in_a_seeded_order(n, batch, world):
    from radalign.finetune.trainer import epoch_batches

    a = epoch_batches(n, batch, seed=3, epoch=0, world=world)
    rows = np.concatenate(a)
    last = n % batch
    dropped = last if 0 < last < world else 0  # a last batch that would leave a process without rows
    assert len(rows) == len(set(rows.tolist())) == n - dropped and set(rows.tolist()) <= set(range(n))
    assert all(len(b) == batch for b in a[:-1]) and len(a) == math.ceil((n - dropped) / batch)
    again = epoch_batches(n, batch, seed=3, epoch=0, world=world)
    assert all(np.array_equal(x, y) for x, y in zip(a, again))  # same seed and epoch: same batches
    other = np.concatenate(epoch_batches(n, batch, seed=3, epoch=1, world=world))
    assert not np.array_equal(np.concatenate(a), other[:len(rows)])  # another epoch: another order
    assert not np.array_equal(rows, np.concatenate(epoch_batches(n, batch, seed=4, epoch=0, world=world)))


def test_dropout_draws_depend_on_seed_epoch_and_step_only():
    from radalign.finetune.trainer import _dropout_u

    u = _dropout_u(0, 1, 2, 16, 3)
    assert u.shape == (16, 3) and torch.equal(u, _dropout_u(0, 1, 2, 16, 3))
    for other in (_dropout_u(1, 1, 2, 16, 3), _dropout_u(0, 2, 2, 16, 3), _dropout_u(0, 1, 3, 16, 3)):
        assert not torch.allclose(u, other)
    assert torch.equal(_dropout_u(0, 1, 2, 8, 3), u[:8])  # a row's draw does not depend on the batch after it


def test_gbdt_baseline_is_fitted_on_the_training_split(tiny, tmp_path):
    from radalign.finetune.baselines import gbdt_matrix
    from radalign.finetune.recipe import Scores, fit_gbdt
    from radalign.finetune.session import setup
    from sklearn.ensemble import HistGradientBoostingClassifier

    run = setup(_cfg(tiny, tmp_path / "run", "baselines.models=[gbdt]", "baselines.gbdt_max_iter=15"))
    try:
        scores = Scores()
        fit_gbdt(run, scores)

        def sklearn_fit(data):
            x, cat = gbdt_matrix(data.ehr)
            keep, ok = ~np.all(np.isnan(x), axis=0), ~np.isnan(data.y[:, 0])
            return keep, HistGradientBoostingClassifier(
                categorical_features=cat[keep], max_iter=15, learning_rate=run.cfg.baselines.gbdt_learning_rate,
                max_leaf_nodes=15, l2_regularization=1.0, early_stopping=False, random_state=run.cfg.seed).fit(
                x[ok][:, keep], data.y[ok, 0].astype(int))

        def logits(fitted, data):
            keep, model = fitted
            p = np.clip(model.predict_proba(gbdt_matrix(data.ehr)[0][:, keep])[:, 1], 1e-7, 1 - 1e-7)
            return np.log(p / (1 - p))

        on_train, on_val = sklearn_fit(run.train), sklearn_fit(run.val)
        assert scores.test["gbdt"] == pytest.approx(logits(on_train, run.test), abs=1e-6)
        assert scores.val["gbdt"] == pytest.approx(logits(on_train, run.val), abs=1e-6)
        assert np.abs(logits(on_val, run.test) - logits(on_train, run.test)).max() > 0.1
    finally:
        _close(run)


def test_gbdt_inputs_hide_absent_image_embeddings():
    """A study without a film has a zero vector in the image slot: the trees must see NaN (missing), not zeros."""
    from radalign.finetune.features import EHRFeatures
    from radalign.finetune.registry import gbdt_inputs

    z = np.zeros((3, 1), np.float32)
    ehr = EHRFeatures(z, z, np.ones((3, 1), bool), z, np.ones((3, 1), bool), np.ones((3, 5), np.int64))
    data = SimpleNamespace(ehr=ehr, image=np.array([[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]]),
                           present={"image": np.array([True, False, True])})
    x, cat = gbdt_inputs(data, with_image=True)
    img = x[:, -2:]
    assert img[0].tolist() == [1.0, 2.0] and np.isnan(img[1]).all() and img[2].tolist() == [3.0, 4.0]
    assert x.shape[1] == gbdt_inputs(data, with_image=False)[0].shape[1] + 2 and not cat[-2:].any()

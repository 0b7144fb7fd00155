"""Multi-label and multi-class finetune tasks (issue 20, section 3): masked losses, per-class and macro AUROC with
patient intervals, one column per class, the training-patient draw, the best-model sentence."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from radalign.data.labels import apply_label_policy
from radalign.finetune.models import masked_loss
from radalign.finetune.perclass import (
    class_metrics,
    macro_differences,
    selection,
    selection_sentence,
)
from radalign.finetune.report import predictions_frame, read_class_predictions
from radalign.finetune.tasks import (
    draw_patients,
    keep_patients,
    list_sha256,
    patient_list,
    probabilities,
    targets,
)
from sklearn.metrics import roc_auc_score

from radalign import RadalignError

NAN = float("nan")


def _bce(z: float, y: float) -> float:
    """-[y log s(z) + (1 - y) log(1 - s(z))], by hand."""
    s = 1 / (1 + math.exp(-z))
    return -(y * math.log(s) + (1 - y) * math.log(1 - s))


# ----------------------------------------------------------------------------------------------------------
# Losses

RAW = [[1, -1, NAN], [0, 1, -1], [NAN, NAN, 0]]  # CheXpert values: 1, 0, -1 uncertain, blank
LOGITS = [[2.0, -1.0, 0.5], [0.3, 1.5, -2.0], [-0.7, 0.2, 1.0]]
# The cells each policy keeps, as (row, column, target), worked out by hand from RAW.
KEPT = {
    ("exclude", "exclude"): [(0, 0, 1), (1, 0, 0), (1, 1, 1), (2, 2, 0)],
    ("positive", "exclude"): [(0, 0, 1), (0, 1, 1), (1, 0, 0), (1, 1, 1), (1, 2, 1), (2, 2, 0)],
    ("negative", "exclude"): [(0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 1, 1), (1, 2, 0), (2, 2, 0)],
    ("exclude", "negative"): [(0, 0, 1), (0, 2, 0), (1, 0, 0), (1, 1, 1), (2, 0, 0), (2, 1, 0), (2, 2, 0)],
    ("positive", "negative"): [(0, 0, 1), (0, 1, 1), (0, 2, 0), (1, 0, 0), (1, 1, 1), (1, 2, 1), (2, 0, 0),
                               (2, 1, 0), (2, 2, 0)],
}


@pytest.mark.parametrize("uncertain,blank", list(KEPT))
def test_multilabel_masked_loss_equals_the_hand_worked_cells(uncertain, blank):
    y = torch.as_tensor(apply_label_policy(np.array(RAW, float), uncertain, blank), dtype=torch.float32)
    z = torch.tensor(LOGITS)
    cells = [_bce(LOGITS[i][j], t) for i, j, t in KEPT[uncertain, blank]]
    assert masked_loss(z, y, "multilabel").item() == pytest.approx(sum(cells) / len(cells), rel=1e-6)
    assert masked_loss(z, y, "multilabel", reduction="sum").item() == pytest.approx(sum(cells), rel=1e-6)


def test_an_excluded_cell_gets_no_gradient_and_an_unlabelled_batch_gives_zero():
    y = torch.as_tensor(apply_label_policy(np.array(RAW, float), "exclude", "exclude"), dtype=torch.float32)
    z = torch.tensor(LOGITS, requires_grad=True)
    masked_loss(z, y, "multilabel").backward()
    excluded = torch.isnan(y)
    assert torch.all(z.grad[excluded] == 0) and torch.all(z.grad[~excluded] != 0)
    z2 = torch.tensor(LOGITS, requires_grad=True)
    loss = masked_loss(z2, torch.full((3, 3), NAN), "multilabel")
    loss.backward()
    assert loss.item() == 0.0 and torch.all(z2.grad == 0)


@pytest.mark.parametrize("shape", ["flat", "column"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_multiclass_loss_equals_torch_cross_entropy_on_the_labelled_rows(shape, reduction):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 4, generator=g)
    y = torch.tensor([0, 3, NAN, 1, 2, NAN, 3, 0, 1])
    ref = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction=reduction)(
        z, torch.nan_to_num(y, nan=-100).long())
    by_hand = -sum(torch.log_softmax(z[i], 0)[int(y[i])] for i in range(9) if not torch.isnan(y[i]))
    by_hand = by_hand / 7 if reduction == "mean" else by_hand
    labels = y if shape == "flat" else y[:, None]
    assert masked_loss(z, labels, "multiclass", reduction=reduction).item() == pytest.approx(ref.item(), rel=1e-6)
    assert ref.item() == pytest.approx(float(by_hand), rel=1e-5)


def test_multiclass_targets_are_one_hot_and_a_bad_class_index_is_named():
    t = targets(np.array([[2.0], [NAN], [0.0]]), "multiclass", 3)
    np.testing.assert_array_equal(t[[0, 2]], [[0, 0, 1], [1, 0, 0]])
    assert np.isnan(t[1]).all()
    with pytest.raises(RadalignError, match=r"holds 3 .*0\.\.2"):
        targets(np.array([0.0, 3.0]), "multiclass", 3)
    with pytest.raises(RadalignError, match="holds 1.5"):
        targets(np.array([1.5]), "multiclass", 3)


# ----------------------------------------------------------------------------------------------------------
# Metrics


def _multilabel_data(n_pat=60, seed=0):
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 4, n_pat)
    pid = np.repeat(np.arange(n_pat), per)
    n = len(pid)
    y = (rng.random((n, 4)) < [0.3, 0.5, 0.2, 0.4]).astype(float)
    y[rng.random((n, 4)) < 0.2] = np.nan  # uncertain / blank: excluded
    y[:, 3] = np.where(np.isnan(y[:, 3]), np.nan, 1.0)  # one label value only: no AUROC, not in the macro
    p = np.clip(0.5 * np.nan_to_num(y, nan=0.5) + 0.6 * rng.random((n, 4)), 0, 1)
    return y, p, pid


def test_macro_auroc_is_sklearns_per_class_mean_on_the_labelled_rows():
    y, p, pid = _multilabel_data()
    classes = ["a", "b", "c", "d"]
    m = class_metrics(y, {"m": p}, pid, classes, n_boot=50, seed=0)["m"]
    ref = {}
    for j, c in enumerate(classes[:3]):
        ok = ~np.isnan(y[:, j])
        ref[c] = roc_auc_score(y[ok, j], p[ok, j])
        assert m["classes"][c]["auroc"] == pytest.approx(ref[c], abs=1e-12)
        assert m["classes"][c]["n_excluded"] == int((~ok).sum())
    assert m["auroc"] == pytest.approx(np.mean(list(ref.values())), abs=1e-12)
    assert m["macro_classes"] == ["a", "b", "c"] and m["classes_without_auroc"] == ["d"]
    assert m["classes"]["d"]["auroc"] is None


def test_multiclass_macro_auroc_is_sklearns_one_vs_rest_macro():
    rng = np.random.default_rng(1)
    k = rng.integers(0, 3, 150)
    z = rng.normal(size=(150, 3)) + 1.5 * np.eye(3)[k]
    prob = probabilities(z, "multiclass")
    np.testing.assert_allclose(prob.sum(1), 1.0)
    m = class_metrics(targets(k.astype(float), "multiclass", 3), {"m": prob}, np.arange(150), ["x", "y", "z"],
                      n_boot=20, seed=0)["m"]
    assert m["auroc"] == pytest.approx(roc_auc_score(k, prob, multi_class="ovr", average="macro"), abs=1e-12)


def test_per_class_and_macro_intervals_resample_patients():
    """Every film of a patient copied 4 times: resampling patients gives the very same intervals; a resampler
    that draws rows would treat the copies as independent and narrow them."""
    y, p, pid = _multilabel_data(n_pat=40, seed=2)
    q = np.clip(p + np.random.default_rng(3).normal(0, 0.2, p.shape), 0, 1)
    classes = ["a", "b", "c", "d"]
    rep = np.repeat(np.arange(len(pid)), 4)
    kw = dict(n_boot=200, seed=5)
    one = class_metrics(y, {"p": p, "q": q}, pid, classes, **kw)
    four = class_metrics(y[rep], {"p": p[rep], "q": q[rep]}, pid[rep], classes, **kw)
    for c in classes[:3]:
        for key in ("ci_low", "ci_high"):
            assert four["p"]["classes"][c][key] == pytest.approx(one["p"]["classes"][c][key], abs=1e-12)
    for key in ("ci_low", "ci_high", "auprc_ci_low", "auprc_ci_high"):
        assert four["p"][key] == pytest.approx(one["p"][key], abs=1e-12)
    d1 = macro_differences(y, {"p": p, "q": q}, pid, one, classes, ref="p", **kw)["p_vs_q"]
    d4 = macro_differences(y[rep], {"p": p[rep], "q": q[rep]}, pid[rep], four, classes, ref="p", **kw)["p_vs_q"]
    assert (d4["ci_low"], d4["ci_high"]) == pytest.approx((d1["ci_low"], d1["ci_high"]), abs=1e-12)
    # and the interval is a real one: wider than a row-level resampler's on the copied data
    rows = class_metrics(y[rep], {"p": p[rep]}, np.arange(len(rep)), classes, **kw)["p"]
    assert (four["p"]["ci_high"] - four["p"]["ci_low"]) > 1.5 * (rows["ci_high"] - rows["ci_low"])


def test_paired_macro_difference_is_the_difference_of_the_macros():
    y, p, pid = _multilabel_data(seed=4)
    q = np.clip(p + np.random.default_rng(5).normal(0, 0.3, p.shape), 0, 1)
    classes = ["a", "b", "c", "d"]
    models = class_metrics(y, {"p": p, "q": q}, pid, classes, n_boot=50, seed=0)
    d = macro_differences(y, {"p": p, "q": q}, pid, models, classes, ref="p", n_boot=50, seed=0)["p_vs_q"]
    assert d["delta"] == pytest.approx(models["p"]["auroc"] - models["q"]["auroc"], abs=1e-12)
    assert d["ci_low"] < d["delta"] < d["ci_high"]


# ----------------------------------------------------------------------------------------------------------
# Predictions: one column per class


class _Split:
    def __init__(self, y, n):
        self.y = y
        self.subjects = np.arange(n) // 2 + 100
        self.studies = np.arange(n) + 5000


@pytest.mark.parametrize("kind", ["multilabel", "multiclass"])
def test_predictions_have_one_column_per_class_and_read_back(kind, tmp_path):
    from radalign.finetune.config import TaskConfig

    rng = np.random.default_rng(0)
    classes = ["Edema", "Pleural Effusion", "No Finding"]
    if kind == "multilabel":
        task = TaskConfig(name="t", kind=kind, labels=classes)
        y = np.where(rng.random((8, 3)) < 0.2, np.nan, (rng.random((8, 3)) < 0.5).astype(float))
    else:
        task = TaskConfig(name="t", kind=kind, labels=["grade"], classes=classes)
        y = np.array([[0], [2], [np.nan], [1], [1], [0], [2], [np.nan]], float)
    logits = {"fusion": rng.normal(size=(8, 3)), "early_fusion": rng.normal(size=(8, 3))}
    frame = predictions_frame(_Split(y, 8), logits, task)
    for m in logits:
        assert [c for c in frame.columns if c.startswith(f"score:{m}:")] == [f"score:{m}:{c}" for c in classes]
    frame.to_csv(tmp_path / "p.csv", index=False)
    back, probs, logit = read_class_predictions(pd.read_csv(tmp_path / "p.csv"), classes)
    np.testing.assert_array_equal(np.isnan(back), np.isnan(targets(y, kind, 3)))
    np.testing.assert_allclose(np.nan_to_num(back, nan=-1), np.nan_to_num(targets(y, kind, 3), nan=-1))
    for m, z in logits.items():
        np.testing.assert_allclose(logit[m], z, rtol=1e-12)
        ref = torch.softmax(torch.tensor(z), 1) if kind == "multiclass" else torch.sigmoid(torch.tensor(z))
        np.testing.assert_allclose(probs[m], ref.numpy(), rtol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# The training-patient draw


def _frame(n_pat=200, seed=0):
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(1000, 1000 + n_pat), rng.integers(1, 6, n_pat))
    return pd.DataFrame({"subject_id": pid, "study_id": np.arange(len(pid))}).sample(frac=1, random_state=1)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_the_draw_is_by_patient_seeded_and_its_sha256_is_the_lists(fraction):
    frame = _frame()
    ids = draw_patients(frame, fraction, seed=7)
    assert len(ids) == max(1, round(fraction * 200)) and len(set(ids)) == len(ids)
    assert ids == draw_patients(frame.sample(frac=1, random_state=9), fraction, seed=7)  # row order: no effect
    assert ids != draw_patients(frame, fraction, seed=8)
    kept = keep_patients(frame, ids)
    # every study of a drawn patient, no study of another one
    assert sorted(kept["study_id"]) == sorted(frame.loc[frame["subject_id"].astype(str).isin(ids), "study_id"])
    assert set(kept["subject_id"].astype(str)) == set(ids)
    doc = patient_list(ids, frame, fraction, 7, "train")
    text = "".join(f"{i}\n" for i in doc["subject_ids"])
    assert doc["sha256"] == hashlib.sha256(text.encode()).hexdigest() == list_sha256(ids)
    assert (doc["n_patients"], doc["of_patients"], doc["n_studies"]) == (len(ids), 200, len(kept))


def test_the_run_trains_on_the_drawn_patients_only(ft_cohort, tmp_path):
    """setup() with task.train_fraction: the training split holds exactly the listed patients (all their
    studies), validation and test stay whole, and RUN/train_patients.json's sha256 is its list's."""
    import json

    from radalign.finetune.config import FinetuneConfig
    from radalign.finetune.inputs import load_table
    from radalign.finetune.session import TRAIN_PATIENTS, open_run

    from radalign.config import load_config

    cfg = load_config(FinetuneConfig, "finetune/chexpert14", [
        f"run_dir={tmp_path / 'run'}", f"data.table={ft_cohort['table']}", f"data.shards={ft_cohort['shards']}",
        f"data.checkpoint={ft_cohort['export']}", f"data.cache={ft_cohort['root'] / 'cache'}", "progress=false",
        "precision=fp32", "task.train_fraction=0.3", "seed=4"], stage="finetune")
    table = load_table(ft_cohort["table"])
    with open_run(cfg) as run:
        doc = json.loads((tmp_path / "run" / TRAIN_PATIENTS).read_text())
        assert doc["sha256"] == hashlib.sha256("".join(f"{i}\n" for i in doc["subject_ids"]).encode()).hexdigest()
        full = table.split("train")
        assert doc["subject_ids"] == draw_patients(full, 0.3, 4)
        assert sorted(run.train.studies.tolist()) == sorted(
            full.loc[full["subject_id"].astype(str).isin(doc["subject_ids"]), "study_id"].tolist())
        assert len(run.val) == len(table.split("validate")) and len(run.test) == len(table.split("test"))


# ----------------------------------------------------------------------------------------------------------
# The best model on validation, and whether its lead is inside the interval


def _sel(delta, lo, hi, best="fusion", other="early_fusion"):
    return {"best": best, "validation": {best: 0.931, other: 0.925}, "level": 0.95, "not_run": [],
            "left_out": {}, "comparisons": {other: {"delta": delta, "ci_low": lo, "ci_high": hi,
                                                    "zero_inside_interval": lo <= 0 <= hi}}}


def test_the_sentence_says_inside_the_interval_for_the_issues_demo_numbers():
    s = selection_sentence(_sel(-0.008, -0.030, 0.009))
    assert s == ("Best on validation: fusion (validation AUROC 0.931). Its test lead over early_fusion is -0.008 "
                 "[-0.030, +0.009]: 0 is inside the 95% interval, so this run does not show fusion better than "
                 "early_fusion.")
    assert s.startswith("Best on validation: fusion (validation AUROC 0.931).")
    assert "lead over early_fusion is -0.008 [-0.030, +0.009]: 0 is inside the 95% interval" in s
    assert "does not show fusion better than early_fusion" in s


def test_the_sentence_says_outside_the_interval_above_and_below():
    above = selection_sentence(_sel(0.050, 0.020, 0.081, other="gbdt"))
    assert "lead over gbdt is +0.050 [+0.020, +0.081]: outside the interval (above 0)" in above
    assert "inside" not in above
    below = selection_sentence(_sel(-0.050, -0.081, -0.020))
    assert "outside the interval and below 0, so early_fusion is better on test" in below


def test_selection_chooses_on_validation_and_tests_the_lead_on_test():
    """b is best on validation but a is far better on test: b is named best, and its lead over the
    comparator is negative and outside the interval."""
    rng = np.random.default_rng(0)
    pid = np.repeat(np.arange(150), 2)
    y = (rng.random(300) < 0.4).astype(float)[:, None]
    good = y + rng.normal(0, 0.3, y.shape)
    bad = rng.normal(0, 1, y.shape)
    sel = selection({"early_fusion": 0.9, "fusion": 0.7}, y, {"early_fusion": bad, "fusion": good}, pid, [0],
                    n_boot=200, seed=0)
    assert sel["best"] == "early_fusion"
    d = sel["comparisons"]["fusion"]
    assert d["delta"] == pytest.approx(roc_auc_score(y[:, 0], bad[:, 0]) - roc_auc_score(y[:, 0], good[:, 0]))
    assert not d["zero_inside_interval"] and d["ci_high"] < 0
    assert "gbdt was not trained in this run" in sel["sentence"]


# ----------------------------------------------------------------------------------------------------------
# End to end: a multi-label run, its predictions, `finetune predict` and `finetune eval`

LABELS = ["No Finding", "Cardiomegaly", "Edema", "Pleural Effusion"]


@pytest.fixture(scope="module")
def ml_run(ft_cohort, tmp_path_factory):
    from radalign.finetune.config import FinetuneConfig
    from radalign.finetune.recipe import run_finetune

    from radalign.config import load_config

    run_dir = tmp_path_factory.mktemp("mlrun") / "chexpert4"
    cfg = load_config(FinetuneConfig, "finetune/chexpert14", [
        f"run_dir={run_dir}", f"data.table={ft_cohort['table']}", f"data.shards={ft_cohort['shards']}",
        f"data.checkpoint={ft_cohort['export']}", f"data.cache={ft_cohort['root'] / 'cache'}", "progress=false",
        "precision=fp32", "bootstrap=100", "optim.epochs=2", "optim.batch_size=64", "model.d_model=32",
        "model.ehr_d=16", "model.n_layers=1", "model.ehr_blocks=1", "baselines.gbdt_max_iter=10",
        "data.modalities=[image,ehr]", f"task.labels=[{','.join(LABELS)}]",
        "baselines.models=[image_only,ehr_only,late_fusion,early_fusion,gbdt]"], stage="finetune")
    run_finetune(cfg)
    return run_dir


def test_a_multilabel_run_scores_every_model_per_class(ml_run):
    import json

    m = json.loads((ml_run / "metrics.json").read_text())
    pred = pd.read_csv(ml_run / "predictions.csv")
    assert m["classes"] == LABELS and m["kind"] == "multilabel"
    assert set(m["models"]) == {"fusion", "fusion_no_dropout", "image_only", "ehr_only", "late_fusion",
                                "early_fusion", "gbdt"}
    y, probs, _ = read_class_predictions(pred, LABELS)
    for name, r in m["models"].items():
        ref = []
        for j, c in enumerate(LABELS):
            ok = ~np.isnan(y[:, j])
            if len(np.unique(y[ok, j])) == 2:
                ref.append(roc_auc_score(y[ok, j], probs[name][ok, j]))
                assert r["classes"][c]["auroc"] == pytest.approx(ref[-1], abs=1e-9)
        assert r["auroc"] == pytest.approx(np.mean(ref), abs=1e-9)
    report = (ml_run / "report.md").read_text()
    assert "## Best model" in report and m["selection"]["sentence"].split(" (")[0] in report
    assert "## Per class (test)" in report and all(c in report for c in LABELS)
    assert "## Calibration per class" in report and "graceful-degradation table is for binary tasks" in report
    assert set(m["calibration"]["per_class"]) == set(LABELS)


def test_predict_and_eval_of_a_multilabel_run_repeat_its_numbers(ml_run, tmp_path):
    import json

    from radalign.finetune.evaluate import evaluate_run
    from radalign.finetune.predict import predict_split

    saved = pd.read_csv(ml_run / "predictions.csv")
    again = predict_split(ml_run, split="test")
    assert list(again.columns) == list(saved.columns)
    np.testing.assert_allclose(again.filter(like="score:").to_numpy(), saved.filter(like="score:").to_numpy(),
                               rtol=1e-5, atol=1e-6)
    res = evaluate_run(ml_run, out=tmp_path / "eval")
    m = json.loads((ml_run / "metrics.json").read_text())
    for name, r in m["models"].items():
        assert res["models"][name]["auroc"] == pytest.approx(r["auroc"], abs=1e-6)
        assert res["models"][name]["ci_low"] == pytest.approx(r["ci_low"], abs=1e-6)
    assert res["selection"]["best"] == m["selection"]["best"]
    assert "## Best model" in (tmp_path / "eval" / "report.md").read_text()


@pytest.mark.parametrize("overrides,problem", [
    (["task.kind=multiclass", "task.labels=[grade]"], "task.classes"),
    (["task.kind=multilabel", "task.classes=[a,b]"], "task.classes: only for kind=multiclass"),
    (["task.train_fraction=0"], "task.train_fraction: 0"),
    (["task.train_fraction=1.5"], "task.train_fraction: 1.5"),
    (["task.blank=positive"], "task.blank: 'positive'"),
])
def test_the_config_names_each_bad_task_setting(overrides, problem):
    from radalign.finetune.config import FinetuneConfig

    from radalign.config import load_config

    with pytest.raises(RadalignError, match=problem.replace("[", r"\[").replace(".", r"\.")):
        load_config(FinetuneConfig, "finetune/chexpert14", overrides, stage="finetune")


def test_multilabel_and_multiclass_configs_are_accepted():
    from radalign.finetune.config import FinetuneConfig

    from radalign.config import load_config

    assert load_config(FinetuneConfig, "finetune/chexpert14", ["task.train_fraction=0.01"],
                       stage="finetune").task.kind == "multilabel"
    cfg = load_config(FinetuneConfig, "finetune/chexpert14", ["task.kind=multiclass", "task.labels=[grade]",
                                                              "task.classes=[none,mild,severe]",
                                                              "task.blank=exclude"], stage="finetune")
    assert cfg.validate() == []


def test_the_setup_log_counts_positives_per_class_of_every_task_kind():
    from types import SimpleNamespace as NS

    from radalign.finetune.session import positives_text

    nan = np.nan
    binary = NS(kind="binary", labels=["dead"], classes=[])
    assert positives_text(np.array([[1.0], [0.0], [nan], [1.0]]), binary) == "2 positive"
    multilabel = NS(kind="multilabel", labels=["A", "B", "C"], classes=[])
    y = np.array([[1, 0, nan], [1, 1, 0], [nan, nan, nan], [0, 1, 1]], float)
    assert positives_text(y, multilabel) == "positives per class: A 2, B 2, C 1"
    multiclass = NS(kind="multiclass", labels=["ward"], classes=["icu", "ward", "home"])
    # class indices, not a count of the first column (the old log summed the indices: 2 + 0 + 2 + 1 = 5)
    assert positives_text(np.array([[2.0], [0.0], [nan], [2.0], [1.0]]), multiclass) == \
        "positives per class: icu 1, ward 1, home 2"


def test_a_multiclass_run_on_a_class_index_column_end_to_end(ft_cohort, tmp_path):
    """A table column of class indices (length of stay: short / medium / long; NaN without an admission): the run's
    per-class AUROCs are sklearn's one-vs-rest on its predictions.csv, the macro is sklearn's ovr macro, and
    `finetune predict` repeats the scores."""
    import json
    import shutil

    import datasets
    from radalign.data.ehr_table import load_table
    from radalign.finetune.config import FinetuneConfig
    from radalign.finetune.predict import predict_split
    from radalign.finetune.recipe import run_finetune

    from radalign.config import load_config

    classes = ["short", "medium", "long"]
    table = tmp_path / "ehr" / "finetune"
    grades = {}
    for name, f in load_table(ft_cohort["table"]).splits.items():
        grades[name] = np.where(f["los_days"].isna(), np.nan, np.digitize(f["los_days"], [3.0, 7.0]))
    datasets.DatasetDict({n: datasets.Dataset.from_pandas(f.assign(stay=grades[n]), preserve_index=False)
                          for n, f in load_table(ft_cohort["table"]).splits.items()}).save_to_disk(str(table))
    shutil.copy(Path(ft_cohort["table"]).parent / "manifest.json", table.parent / "manifest.json")
    run_dir = tmp_path / "run"
    cfg = load_config(FinetuneConfig, "finetune/chexpert14", [
        f"run_dir={run_dir}", f"data.table={table}", f"data.shards={ft_cohort['shards']}",
        f"data.checkpoint={ft_cohort['export']}", f"data.cache={ft_cohort['root'] / 'cache'}", "progress=false",
        "precision=fp32", "bootstrap=50", "optim.epochs=2", "optim.batch_size=64", "model.d_model=32",
        "model.ehr_d=16", "model.n_layers=1", "model.ehr_blocks=1", "baselines.gbdt_max_iter=10",
        "data.modalities=[image,ehr]", "task.name=stay", "task.kind=multiclass", "task.labels=[stay]", "task.blank=exclude",
        f"task.classes=[{','.join(classes)}]", "baselines.models=[gbdt]", "baselines.fusion_without_dropout=false"],
        stage="finetune")
    run_finetune(cfg)
    m = json.loads((run_dir / "metrics.json").read_text())
    pred = pd.read_csv(run_dir / "predictions.csv")
    assert m["kind"] == "multiclass" and m["classes"] == classes
    y, probs, _ = read_class_predictions(pred, classes)
    idx = grades["test"]
    ok = ~np.isnan(idx)
    np.testing.assert_array_equal(y[ok].argmax(1), idx[ok])  # the class index became its one-hot row
    assert np.isnan(y[~ok]).all()
    for name, r in m["models"].items():
        p = probs[name][ok]
        np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)  # softmax over the classes
        for j, c in enumerate(classes):
            assert r["classes"][c]["auroc"] == pytest.approx(roc_auc_score(idx[ok] == j, p[:, j]), abs=1e-9)
        assert r["auroc"] == pytest.approx(roc_auc_score(idx[ok].astype(int), p, multi_class="ovr"), abs=1e-9)
    again = predict_split(run_dir, split="test")
    np.testing.assert_allclose(again.filter(like="score:").to_numpy(), pred.filter(like="score:").to_numpy(),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Per-class metrics, paired macro differences, calibration and the report lines against independent
# computations (mutation guards for finetune/perclass.py)


def _graded_data(n_pat=50, seed=11):
    """Continuous scores (no ties) for 3 classes, 1-3 films per patient, some excluded cells."""
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(n_pat), rng.integers(1, 4, n_pat))
    y = (rng.random((len(pid), 3)) < [0.3, 0.5, 0.4]).astype(float)
    y[rng.random(y.shape) < 0.15] = np.nan
    p = 1 / (1 + np.exp(-(1.2 * np.nan_to_num(y, nan=0.5) + rng.normal(size=y.shape))))
    return y, p, pid


def _hand_resamples(pid, n_boot, seed):
    """Row weights of each patient resample: patients (sorted ids) drawn with replacement, P draws per resample,
    from numpy's default_rng(seed) (radalign.metrics.patient_weights' documented draw, written out)."""
    ids, codes = np.unique([str(p) for p in pid], return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    return [np.bincount(d, minlength=len(ids))[codes].astype(float) for d in draws]


def _weighted(fn, y, s, w):
    ok = ~np.isnan(y) & (w > 0)
    return fn(y[ok], s[ok], sample_weight=w[ok]) if len(np.unique(y[ok])) == 2 else np.nan


def test_class_metrics_are_a_hand_patient_bootstrap_of_sklearns_auroc_and_ap():
    """Point values, per-class and macro intervals (AUROC and AUPRC) at level 0.8 from a hand loop over patient
    resamples with sklearn's weighted metrics and numpy's percentiles."""
    from sklearn.metrics import average_precision_score as ap

    y, p, pid = _graded_data()
    classes, n_boot, level = ["a", "b", "c"], 60, 0.8
    m = class_metrics(y, {"m": p}, pid, classes, n_boot=n_boot, seed=3, level=level)["m"]
    q = [10, 90]
    aucs = np.array([[_weighted(roc_auc_score, y[:, j], p[:, j], w) for j in range(3)]
                     for w in _hand_resamples(pid, n_boot, 3)])  # [B, 3]
    aps = np.array([[_weighted(ap, y[:, j], p[:, j], w) for j in range(3)] for w in _hand_resamples(pid, n_boot, 3)])
    assert not np.isnan(aucs).any()
    for j, c in enumerate(classes):
        ok = ~np.isnan(y[:, j])
        r = m["classes"][c]
        assert r["auroc"] == pytest.approx(roc_auc_score(y[ok, j], p[ok, j]), abs=1e-12)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(tuple(np.percentile(aucs[:, j], q)), abs=1e-12)
        assert (r["n_pos"], r["n_neg"]) == (int((y[ok, j] == 1).sum()), int((y[ok, j] == 0).sum()))
    assert (m["ci_low"], m["ci_high"]) == pytest.approx(tuple(np.percentile(aucs.mean(1), q)), abs=1e-12)
    point_ap = np.mean([ap(y[~np.isnan(y[:, j]), j], p[~np.isnan(y[:, j]), j]) for j in range(3)])
    assert m["auprc"] == pytest.approx(point_ap, abs=1e-12)
    assert (m["auprc_ci_low"], m["auprc_ci_high"]) == pytest.approx(tuple(np.percentile(aps.mean(1), q)),
                                                                    abs=1e-12)
    assert m["macro_skipped_resamples"] == 0 and m["macro_note"] == ""


def test_a_model_without_any_scorable_class_has_no_macro_auprc():
    y = np.array([[1.0], [1.0], [np.nan], [1.0]])  # one label value: no AUROC, no macro
    m = class_metrics(y, {"m": np.array([[0.2], [0.7], [0.5], [0.9]])}, [1, 2, 3, 4], ["only"], n_boot=10,
                      seed=0)["m"]
    assert (m["auroc"], m["auprc"], m["auprc_ci_low"], m["auprc_ci_high"]) == (None, None, None, None)
    assert m["classes_without_auroc"] == ["only"]


def test_macro_differences_pair_the_reference_with_every_other_model():
    y, p, pid = _graded_data(seed=12)
    rng = np.random.default_rng(13)
    probs = {"x": np.clip(p + rng.normal(0, 0.3, p.shape), 0, 1), "ref": p,
             "z": np.clip(p + rng.normal(0, 0.5, p.shape), 0, 1)}
    classes = ["a", "b", "c"]
    models = class_metrics(y, probs, pid, classes, n_boot=20, seed=0)
    out = macro_differences(y, probs, pid, models, classes, ref="ref", n_boot=40, seed=1, level=0.8)
    assert set(out) == {"ref_vs_x", "ref_vs_z"}  # the reference sits between them: both after it still come

    def macro(s, w=None):
        w = np.ones(len(pid)) if w is None else w
        return np.mean([_weighted(roc_auc_score, y[:, j], s[:, j], w) for j in range(3)])
    for name in ("x", "z"):
        d = out[f"ref_vs_{name}"]
        assert d["metric"] == "macro auroc"
        assert d["delta"] == pytest.approx(macro(p) - macro(probs[name]), abs=1e-12)
        boot = [macro(p, w) - macro(probs[name], w) for w in _hand_resamples(pid, 40, 1)]
        assert (d["ci_low"], d["ci_high"]) == pytest.approx(tuple(np.percentile(boot, [10, 90])), abs=1e-12)
    assert macro_differences(y, probs, pid, models, classes, ref="fusion", n_boot=10, seed=0) == {}


_TS = np.exp(np.linspace(np.log(0.05), np.log(20.0), 4001))  # a fine log-spaced grid over the bounds


def _grid_temperature(nll):
    """Brute force: the T of _TS with the lowest NLL; nll(ts [G, 1, 1]) -> [G]."""
    return _TS[int(np.argmin(nll(_TS[:, None, None])))]


def _softmax_nll(z, k):
    """[G] torch's mean cross-entropy of z / T for each T of the grid (z [n, C] / ts [G, 1, 1])."""
    def nll(ts):
        u = torch.as_tensor(z[None] / ts)  # [G, n, C]
        ce = torch.nn.functional.cross_entropy(u.reshape(-1, u.shape[-1]), torch.as_tensor(k).repeat(len(ts)),
                                               reduction="none")
        return ce.reshape(len(ts), -1).mean(1).numpy()
    return nll


def test_softmax_temperature_is_the_brute_force_minimum_on_the_labelled_rows():
    from radalign.finetune.perclass import softmax_temperature

    rng = np.random.default_rng(14)
    k = rng.integers(0, 3, 200)
    z = 4.0 * (rng.normal(size=(200, 3)) + 0.8 * np.eye(3)[k])  # over-confident: T well above 1
    idx = k.astype(float)
    idx[:20] = np.nan
    z[:20] = 50.0 * rng.normal(size=(20, 3))  # unlabelled rows with wild logits: must not count
    want = _grid_temperature(_softmax_nll(z[20:], k[20:]))
    assert 1.5 < want < 19 and softmax_temperature(idx, z) == pytest.approx(want, rel=3e-3)
    faint = 0.01 * (np.eye(3)[k] + 0.1 * rng.random((200, 3)))  # separated but faint: the NLL falls as T -> 0
    assert _grid_temperature(_softmax_nll(faint, k)) == pytest.approx(0.05)
    assert softmax_temperature(k.astype(float), faint) == pytest.approx(0.05, rel=1e-3)  # the lower bound
    assert softmax_temperature(np.full(5, np.nan), rng.normal(size=(5, 3))) == 1.0


def _ece_by_hand(y, p, bins=10):
    ok = ~np.isnan(y)
    y, p = y[ok], p[ok]
    order = np.argsort(p, kind="mergesort")
    return sum(len(i) / len(y) * abs(y[i].mean() - p[i].mean()) for i in np.array_split(order, bins) if len(i))


def test_multilabel_calibration_fits_one_temperature_per_class_on_validation():
    from radalign.finetune.perclass import class_calibration

    rng = np.random.default_rng(15)
    yv = (rng.random((300, 3)) < 0.4).astype(float)
    zv = 3.0 * (2 * yv - 1) + 2.5 * rng.normal(size=yv.shape) * [1.0, 2.0, 0.5]  # a different T per class
    yv[:30, 1] = np.nan
    yv[:, 2] = np.nan  # no validation label for the last class: T stays 1
    yt = (rng.random((200, 3)) < 0.4).astype(float)
    zt = 3.0 * (2 * yt - 1) + 2.5 * rng.normal(size=yt.shape)
    cal = class_calibration(yt, zt, yv, zv, "multilabel", ["a", "b", "c"])
    assert (cal["bins"], cal["binning"], cal["fitted_on"], cal["temperature"]) == (
        10, "equal-mass", "validation", "one per class")
    for j, c in enumerate(["a", "b"]):
        ok = ~np.isnan(yv[:, j])
        yj, zj = yv[ok, j], zv[ok, j]
        t = _grid_temperature(lambda ts, yj=yj, zj=zj: np.mean(np.logaddexp(0, zj / ts) - yj * zj / ts, (1, 2)))
        r = cal["per_class"][c]
        assert r["temperature"] == pytest.approx(t, rel=3e-3)
        p, pt = 1 / (1 + np.exp(-zt[:, j])), 1 / (1 + np.exp(-zt[:, j] / r["temperature"]))
        assert r["ece_before"] == pytest.approx(_ece_by_hand(yt[:, j], p), abs=1e-12)
        assert r["ece_after"] == pytest.approx(_ece_by_hand(yt[:, j], pt), abs=1e-12)
        assert r["brier_before"] == pytest.approx(np.mean((p - yt[:, j]) ** 2), abs=1e-12)
        assert r["brier_after"] == pytest.approx(np.mean((pt - yt[:, j]) ** 2), abs=1e-12)
    assert cal["per_class"]["a"]["temperature"] != pytest.approx(cal["per_class"]["b"]["temperature"], rel=0.05)
    assert cal["per_class"]["c"]["temperature"] == 1.0


def test_multiclass_calibration_fits_one_softmax_temperature_and_scores_one_vs_rest():
    from radalign.finetune.perclass import class_calibration

    rng = np.random.default_rng(16)
    kv, kt = rng.integers(0, 3, 300), rng.integers(0, 3, 150)
    zv = 5.0 * (rng.normal(size=(300, 3)) + np.eye(3)[kv])
    zt = 5.0 * (rng.normal(size=(150, 3)) + np.eye(3)[kt])
    yv, yt = targets(kv.astype(float), "multiclass", 3), targets(kt.astype(float), "multiclass", 3)
    yv[:25] = np.nan  # unlabelled validation rows
    cal = class_calibration(yt, zt, yv, zv, "multiclass", ["x", "y", "z"], n_bins=5)
    t = _grid_temperature(_softmax_nll(zv[25:], kv[25:]))
    assert cal["temperature"] == "one softmax temperature" and cal["bins"] == 5
    pt = torch.softmax(torch.as_tensor(zt / cal["per_class"]["x"]["temperature"]), 1).numpy()
    p0 = torch.softmax(torch.as_tensor(zt), 1).numpy()  # before scaling: the softmax too, not a sigmoid
    for j, c in enumerate(["x", "y", "z"]):
        r = cal["per_class"][c]
        assert r["temperature"] == pytest.approx(t, rel=3e-3)
        assert r["ece_before"] == pytest.approx(_ece_by_hand(yt[:, j], p0[:, j], 5), abs=1e-12)
        assert r["brier_before"] == pytest.approx(np.mean((p0[:, j] - yt[:, j]) ** 2), abs=1e-12)
        assert r["ece_after"] == pytest.approx(_ece_by_hand(yt[:, j], pt[:, j], 5), abs=1e-12)
        assert r["brier_after"] == pytest.approx(np.mean((pt[:, j] - yt[:, j]) ** 2), abs=1e-12)


def test_selection_skips_models_without_a_validation_score_and_says_why_others_were_left_out():
    rng = np.random.default_rng(17)
    pid = np.arange(120)
    y = (rng.random((120, 1)) < 0.5).astype(float)
    probs = {"fusion": y + rng.normal(0, 0.5, y.shape), "gbdt": rng.normal(size=y.shape)}
    sel = selection({"fusion": 0.8, "gbdt": None, "ehr_only": float("nan")}, y, probs, pid, [0], n_boot=50,
                    seed=0, level=0.9, left_out={"late_fusion": "it saw the test rows"}, metric="AUPRC")
    assert sel["best"] == "fusion" and sel["criterion"] == "validation AUPRC" and sel["level"] == 0.9
    assert set(sel["comparisons"]) == {"gbdt"} and sel["not_run"] == ["early_fusion"]
    assert sel["left_out"] == {"late_fusion": "it saw the test rows"}
    assert sel["comparisons"]["gbdt"]["delta"] == pytest.approx(
        roc_auc_score(y[:, 0], probs["fusion"][:, 0]) - roc_auc_score(y[:, 0], probs["gbdt"][:, 0]), abs=1e-12)
    s = sel["sentence"]
    assert s.startswith("Best on validation: fusion (validation AUPRC 0.800).")
    assert "Its test lead over gbdt is +0." in s and "outside the interval (above 0)" in s
    assert "0 is inside the 90% interval" in selection_sentence({**_sel(0.01, -0.02, 0.04), "level": 0.9})
    assert "early_fusion was not trained in this run" in s and "late_fusion was not a candidate: it saw the " \
        "test rows." in s
    twin = {"fusion": probs["fusion"], "early_fusion": probs["fusion"] + rng.normal(0, 0.05, y.shape)}
    close = selection({"fusion": 0.8, "early_fusion": 0.79}, y, twin, pid, [0], n_boot=100, seed=0)
    d = close["comparisons"]["early_fusion"]
    assert d["ci_low"] < 0 < d["ci_high"] and d["zero_inside_interval"] is True  # a near twin: inside
    none = selection({"fusion": None}, y, probs, pid, [0], n_boot=10, seed=0)
    assert none["best"] is None and none["comparisons"] == {}
    assert none["sentence"].startswith("No model has a validation AUROC: no best model.")
    no_cols = selection({"fusion": 0.8, "gbdt": 0.7}, y, probs, pid, [], n_boot=10, seed=0)
    assert no_cols["best"] == "fusion" and no_cols["comparisons"] == {}


def test_a_zero_width_interval_at_zero_counts_as_inside_and_the_level_defaults_to_95():
    s = selection_sentence(_sel(0.0, 0.0, 0.0))
    assert "0 is inside the 95% interval" in s
    old = {k: v for k, v in _sel(0.01, -0.02, 0.04).items() if k != "level"}  # a record written before `level`
    assert "0 is inside the 95% interval" in selection_sentence(old)


def test_validation_scores_are_sklearns_macro_over_classes_with_both_values():
    from radalign.finetune.perclass import validation_scores

    y, p, _ = _multilabel_data(seed=18)  # class d has one label value: left out
    got = validation_scores(y, {"m": p})
    ok = [~np.isnan(y[:, j]) for j in range(3)]
    each = [roc_auc_score(y[o, j], p[o, j]) for j, o in enumerate(ok)]
    assert got["m"] == pytest.approx(np.mean(each), abs=1e-12)
    assert validation_scores(y[:, :1], {"flat": p[:, 0]})["flat"] == pytest.approx(each[0], abs=1e-12)  # binary
    assert validation_scores(y[:, 3:], {"m": p[:, 3:]}) == {"m": None}


def test_report_lines_of_the_per_class_table_and_the_selection():
    from radalign.finetune.perclass import md_calibration, md_classes, md_selection

    row = {"auroc": 0.8123, "ci_low": 0.7001, "ci_high": 0.9004, "n_pos": 12, "n_neg": 30, "n_excluded": 2}
    none = {"auroc": None, "ci_low": None, "ci_high": None, "n_pos": 5, "n_neg": 0, "n_excluded": 0}
    models = {"fusion": {"classes": {"Edema": row, "Mass": none}, "classes_without_auroc": ["Mass"],
                         "macro_note": "3 of 100 resamples dropped"},
              "gbdt": {"classes": {"Edema": {**row, "auroc": 0.75}, "Mass": none}, "classes_without_auroc": ["Mass"]}}
    lines = md_classes(models, ["Edema", "Mass"])
    assert "| class | fusion | gbdt | positives | negatives |" in lines
    assert "| Edema | 0.812 [0.700, 0.900] | 0.750 [0.700, 0.900] | 12 | 30 |" in lines
    assert "| Mass | – | – | 5 | 0 |" in lines
    assert lines[-4:] == ["Not scored (one label value on test): Mass.", "", "3 of 100 resamples dropped", ""]
    assert md_selection({"sentence": "Best on validation: fusion."}) == [
        "## Best model", "", "Best on validation: fusion.", ""]
    assert md_selection(None) == [] and md_calibration(None, "fusion") == []
    cal = {"bins": 10, "temperature": "one per class", "per_class": {"Edema": {
        "temperature": 1.5, "ece_before": 0.1, "ece_after": 0.05, "brier_before": 0.2, "brier_after": 0.18}}}
    assert md_calibration(cal, "fusion") == [
        "## Calibration per class (fusion, test)", "",
        "ECE over 10 equal-mass bins and Brier score, before and after temperature scaling fitted on validation "
        "(one per class).", "",
        "| class | T | ECE | ECE after T | Brier | Brier after T |", "|---|---|---|---|---|---|",
        "| Edema | 1.500 | 0.100 | 0.050 | 0.200 | 0.180 |", ""]
    one = {"fusion": {"classes": {"Edema": row}, "classes_without_auroc": [], "macro_note": ""}}
    assert md_classes(one, ["Edema"]) == [  # one model, nothing unscored, no note: the table alone
        "## Per class (test)", "", "AUROC [95% CI over patients] per class; the macro is the mean over the classes "
        "with both label values.", "", "| class | fusion | positives | negatives |", "|---|---|---|---|",
        "| Edema | 0.812 [0.700, 0.900] | 12 | 30 |", ""]

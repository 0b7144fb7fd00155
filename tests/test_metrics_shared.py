"""radalign.metrics: every value against an independent reference (sklearn, numpy brute force, hand-worked)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from radalign import metrics


def _data(n=80, seed=0, ties=True):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    s = y * 0.8 + rng.normal(size=n)
    if ties:
        s = np.round(s, 1)  # many tied scores
    return y, s


def test_auroc_auprc_match_sklearn_with_weights_and_ties():
    y, s = _data()
    w = np.random.default_rng(1).integers(0, 4, len(y)).astype(float)
    assert metrics.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert metrics.auprc(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert metrics.auroc(y, s, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)
    assert metrics.auprc(y, s, w) == pytest.approx(average_precision_score(y, s, sample_weight=w), abs=1e-12)


def test_batched_weights_match_sklearn_row_by_row():
    y, s = _data(60, seed=2)
    w = np.random.default_rng(3).integers(0, 3, (7, 60)).astype(float)  # [7, 60]
    got_roc, got_pr = metrics.weighted_auroc(y, s, w), metrics.weighted_auprc(y, s, w)
    for b in range(7):
        assert got_roc[b] == pytest.approx(roc_auc_score(y, s, sample_weight=w[b]), abs=1e-12)
        assert got_pr[b] == pytest.approx(average_precision_score(y, s, sample_weight=w[b]), abs=1e-12)


def test_nan_labels_are_excluded_not_scored_as_negatives():
    y, s = _data(50, seed=4)
    y_nan = y.copy()
    y_nan[::3] = np.nan
    keep = ~np.isnan(y_nan)
    assert metrics.auroc(y_nan, s) == pytest.approx(roc_auc_score(y[keep], s[keep]), abs=1e-12)
    assert metrics.auprc(y_nan, s) == pytest.approx(average_precision_score(y[keep], s[keep]), abs=1e-12)


def test_one_class_gives_nan():
    assert np.isnan(metrics.auroc(np.zeros(5), np.arange(5.0)))
    assert np.isnan(metrics.auprc(np.zeros(5), np.arange(5.0)))


def test_patient_weights_move_all_films_of_a_patient_together():
    pids = ["p1", "p1", "p2", "p3", "p3", "p3", "p4"]
    w = np.concatenate(list(metrics.patient_weights(pids, 200, seed=5)))  # [200, 7]
    assert w.shape == (200, 7)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 4]).all() and (w[:, 4] == w[:, 5]).all()
    # each resample draws as many patients as there are: 4 (sum of per-patient counts)
    per_patient = w[:, [0, 2, 3, 6]]
    assert (per_patient.sum(1) == 4).all()
    again = np.concatenate(list(metrics.patient_weights(pids, 200, seed=5)))
    assert (again == w).all()
    other = np.concatenate(list(metrics.patient_weights(pids, 200, seed=6)))
    assert not (other == w).all()


def _clustered(n_pat=40, films=(1, 6), seed=0):
    rng = np.random.default_rng(seed)
    y, s, pids = [], [], []
    for p in range(n_pat):
        k = int(rng.integers(*films))
        lab = float(rng.integers(0, 2))
        base = lab * 0.7 + rng.normal()
        y += [lab] * k
        s += list(base + 0.05 * rng.normal(size=k))
        pids += [f"pat{p:03d}"] * k
    return np.array(y), np.array(s), pids


def test_bootstrap_ci_equals_brute_force_patient_resampling():
    """Independent: draw patients with the documented generator, rebuild each resample by repeating the
    patients' rows, score with sklearn, take np.percentile at 2.5/97.5."""
    y, s, pids = _clustered()
    n_boot, seed = 300, 11
    got = metrics.bootstrap_ci("auroc", y, s, pids, n_boot=n_boot, seed=seed)
    patients = sorted(set(pids))
    rows_of = {p: [i for i, q in enumerate(pids) if q == p] for p in patients}
    draws = np.random.default_rng(seed).integers(0, len(patients), size=(n_boot, len(patients)))
    vals = []
    for d in draws:
        rows = [i for j in d for i in rows_of[patients[j]]]
        yy = y[rows]
        vals.append(roc_auc_score(yy, s[rows]) if 0 < yy.sum() < len(yy) else np.nan)
    vals = np.array(vals)
    lo, hi = np.percentile(vals[~np.isnan(vals)], [2.5, 97.5])
    assert got["value"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert got["ci_low"] == pytest.approx(lo, abs=1e-12) and got["ci_high"] == pytest.approx(hi, abs=1e-12)
    assert got["unit"] == "patient" and got["n_patients"] == 40 and got["n_rows"] == len(y)
    assert got["level"] == 0.95 and got["n_boot"] == n_boot


def test_duplicated_films_give_the_same_interval():
    y, s, pids = _clustered(seed=3)
    one = metrics.bootstrap_ci("auroc", y, s, pids, n_boot=400, seed=1)
    two = metrics.bootstrap_ci("auroc", np.r_[y, y], np.r_[s, s], pids + pids, n_boot=400, seed=1)
    for key in ("value", "ci_low", "ci_high"):
        assert two[key] == pytest.approx(one[key], abs=1e-12)
    assert two["n_patients"] == one["n_patients"] and two["n_rows"] == 2 * one["n_rows"]
    pr1 = metrics.bootstrap_ci("auprc", y, s, pids, n_boot=200, seed=1)
    pr2 = metrics.bootstrap_ci("auprc", np.r_[y, y], np.r_[s, s], pids + pids, n_boot=200, seed=1)
    assert (pr2["ci_low"], pr2["ci_high"]) == pytest.approx((pr1["ci_low"], pr1["ci_high"]), abs=1e-12)


def test_patient_interval_is_wider_than_a_film_interval_on_clustered_data():
    y, s, pids = _clustered(n_pat=60, films=(8, 12), seed=7)
    by_patient = metrics.bootstrap_ci("auroc", y, s, pids, n_boot=500, seed=0)
    by_film = metrics.bootstrap_ci("auroc", y, s, list(range(len(y))), n_boot=500, seed=0)
    assert (by_patient["ci_high"] - by_patient["ci_low"]) > 1.8 * (by_film["ci_high"] - by_film["ci_low"])


def test_percentile_ci_is_the_central_interval():
    v = np.random.default_rng(0).normal(size=1001)
    assert metrics.percentile_ci(v, 0.95) == pytest.approx(tuple(np.percentile(v, [2.5, 97.5])), abs=1e-15)
    assert metrics.percentile_ci(v, 0.9) == pytest.approx(tuple(np.percentile(v, [5, 95])), abs=1e-15)
    assert metrics.percentile_ci(np.array([np.nan]), 0.95) == (None, None)


def test_bootstrap_with_callable_metric_and_undefined_value():
    y, s, pids = _clustered(seed=2)

    def mean_score(y_, s_, w):  # [B, n] -> [B]
        return (w * s_).sum(1) / w.sum(1)

    got = metrics.bootstrap_ci(mean_score, y, s, pids, n_boot=50, seed=0)
    assert got["value"] == pytest.approx(s.mean())
    assert got["ci_low"] < s.mean() < got["ci_high"]
    none = metrics.bootstrap_ci("auroc", np.zeros(10), np.arange(10.0), list(range(10)), n_boot=20)
    assert none["value"] is None and none["ci_low"] is None and none["skipped_resamples"] == 20


def test_paired_difference_uses_the_same_resamples():
    y, s, pids = _clustered(seed=4)
    noise = np.random.default_rng(9).normal(size=len(y))
    b = s + 1.5 * noise  # a worse model
    got = metrics.paired_difference("auroc", y, s, b, pids, n_boot=300, seed=2)
    assert got["delta"] == pytest.approx(roc_auc_score(y, s) - roc_auc_score(y, b), abs=1e-12)
    assert got["unit"] == "patient"
    # brute force over the same documented draws
    patients = sorted(set(pids))
    rows_of = {p: [i for i, q in enumerate(pids) if q == p] for p in patients}
    draws = np.random.default_rng(2).integers(0, len(patients), size=(300, len(patients)))
    d = []
    for dr in draws:
        rows = [i for j in dr for i in rows_of[patients[j]]]
        if 0 < y[rows].sum() < len(rows):
            d.append(roc_auc_score(y[rows], s[rows]) - roc_auc_score(y[rows], b[rows]))
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(tuple(np.percentile(d, [2.5, 97.5])), abs=1e-12)
    same = metrics.paired_difference("auroc", y, s, s.copy(), pids, n_boot=100, seed=0)
    assert same["delta"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0


def test_recall_at_k_hand_worked():
    sim = np.array([[0.9, 0.8, 0.1, 0.0],
                    [0.1, 0.2, 0.3, 0.9],
                    [0.5, 0.4, 0.3, 0.2]])
    pos = np.array([[True, False, False, False],   # first positive at rank 0
                    [False, False, True, False],   # rank 1
                    [False, False, False, False]])  # no positive: a miss
    assert metrics.recall_at_k(sim, pos, ks=(1, 2, 4, 10)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3),
                                                                 4: pytest.approx(2 / 3), 10: pytest.approx(2 / 3)}
    import torch

    assert metrics.recall_at_k(torch.tensor(sim), torch.tensor(pos), ks=(1,)) == {1: pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="shapes"):
        metrics.recall_at_k(sim, pos[:, :2])


def test_threshold_metrics_hand_worked_confusion():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, np.nan])
    s = np.array([0.9, 0.6, 0.4, 0.2, 0.7, 0.3, 0.1, 0.0, 0.99])  # at 0.5: tp 2, fn 2, fp 1, tn 3
    m = metrics.threshold_metrics(y, s, 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n"]) == (2, 2, 1, 3, 8)
    assert m["sensitivity"] == pytest.approx(2 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["npv"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert metrics.threshold_metrics(y, s, 0.95)["precision"] is None  # nothing predicted positive


def test_choose_threshold_rules_against_brute_force():
    y, s = _data(120, seed=8, ties=False)
    t = metrics.choose_threshold(y, s)
    best = max(np.unique(s), key=lambda c: ((s >= c) & (y == 1)).sum() / (y == 1).sum()
               - ((s >= c) & (y == 0)).sum() / (y == 0).sum())
    j = lambda c: ((s >= c) & (y == 1)).mean() / (y == 1).mean() - ((s >= c) & (y == 0)).mean() / (y == 0).mean()  # noqa: E731
    assert j(t) == pytest.approx(j(best), abs=1e-12)
    t90 = metrics.choose_threshold(y, s, rule="sensitivity", target=0.9)
    sens = lambda c: ((s >= c) & (y == 1)).sum() / (y == 1).sum()  # noqa: E731
    assert sens(t90) >= 0.9
    assert t90 == max(c for c in s if sens(c) >= 0.9)  # the highest threshold that keeps the target
    ts = metrics.choose_threshold(y, s, rule="specificity", target=0.9)
    spec = lambda c: ((s < c) & (y == 0)).sum() / (y == 0).sum()  # noqa: E731
    assert spec(ts) >= 0.9 and ts == min(c for c in np.r_[s, np.inf] if spec(c) >= 0.9)
    assert metrics.choose_threshold(np.ones(4), np.arange(4.0)) is None
    with pytest.raises(ValueError, match="target"):
        metrics.choose_threshold(y, s, rule="sensitivity")

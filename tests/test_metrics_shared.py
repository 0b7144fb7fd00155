"""radalign.metrics: every value against an independent reference (sklearn, numpy brute force, hand-worked)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from radalign import RadalignError, metrics


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


# ----------------------------------------------------------------------------------------------------------
# Bug classes of issue 18 §4, each against an independent computation.


def _draws(pids, n_boot, seed):
    """The documented draws, rebuilt by hand: patients in sorted str-id order, one default_rng(seed).integers
    call of shape [n_boot, P]; each draw -> the row indices of its patients, repeated."""
    patients = sorted({str(p) for p in pids})
    rows_of = {p: [i for i, q in enumerate(pids) if str(q) == p] for p in patients}
    draws = np.random.default_rng(seed).integers(0, len(patients), size=(n_boot, len(patients)))
    return [np.array([i for j in d for i in rows_of[patients[j]]]) for d in draws]


def _brute_paired(y, a, b, pids, n_boot, seed):
    """Bootstrap differences with sklearn on rebuilt rows; the two-sided p written out: twice the smaller tail."""
    d = []
    for rows in _draws(pids, n_boot, seed):
        if 0 < y[rows].sum() < len(rows):
            d.append(roc_auc_score(y[rows], a[rows]) - roc_auc_score(y[rows], b[rows]))
    d = np.array(d)
    below, above = np.count_nonzero(d <= 0), np.count_nonzero(d >= 0)
    return min(1.0, 2.0 * min(below, above) / len(d)), d


def test_paired_p_value_is_two_sided_against_brute_force():
    """Two models of equal skill (the same noise level; seed 2 gives a delta near 0): the bootstrap differences
    straddle 0, so a two-sided p is large (> 0.5); a one-tailed share ("not doubled") can never exceed 0.5.
    Swapping a and b keeps p."""
    y, s, pids = _clustered(n_pat=50, seed=5)
    rng = np.random.default_rng(2)
    a, b = s + 0.8 * rng.normal(size=len(y)), s + 0.8 * rng.normal(size=len(y))
    got = metrics.paired_difference("auroc", y, a, b, pids, n_boot=400, seed=3)
    p, d = _brute_paired(y, a, b, pids, 400, 3)
    assert got["p_value"] == pytest.approx(p, abs=1e-12)
    assert 0.5 < got["p_value"] <= 1.0
    swapped = metrics.paired_difference("auroc", y, b, a, pids, n_boot=400, seed=3)
    assert swapped["p_value"] == pytest.approx(got["p_value"], abs=1e-12)
    assert (swapped["ci_low"], swapped["ci_high"]) == pytest.approx((-got["ci_high"], -got["ci_low"]), abs=1e-12)
    # a clearly better model: small p in both directions, and p agrees with the interval leaving 0 out
    better = s + 1.5 * y  # a model that separates the classes much better
    for first, second in ((better, s), (s, better)):
        r = metrics.paired_difference("auroc", y, first, second, pids, n_boot=400, seed=3)
        assert r["p_value"] == pytest.approx(_brute_paired(y, first, second, pids, 400, 3)[0], abs=1e-12)
        assert r["p_value"] < 0.05 and (r["ci_low"] > 0 or r["ci_high"] < 0)
    # p between the cap and 0: a middling case where doubling matters and the cap does not
    mid = s + 1.6 * rng.normal(size=len(y))
    r = metrics.paired_difference("auroc", y, s, mid, pids, n_boot=400, seed=3)
    p_mid, _ = _brute_paired(y, s, mid, pids, 400, 3)
    assert r["p_value"] == pytest.approx(p_mid, abs=1e-12)
    # identical models: every difference is exactly 0, which lies on both sides: p = 1, never 0
    assert metrics.paired_difference("auroc", y, s, s.copy(), pids, n_boot=50, seed=0)["p_value"] == 1.0
    # models that differ on one patient's films only: many resamples give exactly 0 and count on both sides
    c = s.copy()
    c[np.array(pids) == pids[0]] += 5.0
    r = metrics.paired_difference("auroc", y, c, s, pids, n_boot=300, seed=1)
    p_c, d_c = _brute_paired(y, c, s, pids, 300, 1)
    assert np.count_nonzero(d_c == 0) > 50 and r["p_value"] == pytest.approx(p_c, abs=1e-12)


def test_paired_difference_undefined_gives_none_not_a_number():
    got = metrics.paired_difference("auroc", np.zeros(8), np.arange(8.0), np.arange(8.0)[::-1], list(range(8)),
                                    n_boot=30)
    assert got["p_value"] is None and got["delta"] is None and got["ci_low"] is None
    assert got["skipped_resamples"] == 30


def test_threshold_is_inclusive_at_scores_exactly_at_it():
    """Positive when score >= threshold: rows scored exactly at the threshold are predicted positive."""
    y = np.array([1, 0, 1, 0, 1, 0, np.nan])
    s = np.array([0.5, 0.5, 0.5, 0.2, 0.7, 0.9, 0.5])  # three rows (one excluded) exactly at 0.5
    m = metrics.threshold_metrics(y, s, 0.5)
    # by hand at >= 0.5: predicted positive rows 0,1,2,4,5 -> tp 3 (0,2,4), fp 2 (1,5); fn 0; tn 1 (3)
    assert (m["tp"], m["fp"], m["fn"], m["tn"], m["n"]) == (3, 2, 0, 1, 6)
    assert m["sensitivity"] == 1.0 and m["specificity"] == pytest.approx(1 / 3)
    above = metrics.threshold_metrics(y, s, np.nextafter(0.5, 1))  # just above: the tied rows flip
    assert (above["tp"], above["fp"], above["fn"], above["tn"]) == (1, 1, 2, 2)


def test_chosen_threshold_reproduces_sklearn_roc_points_on_tied_scores():
    """Heavily tied scores (5 values): every threshold choose_threshold returns, applied with >=, lands on the
    roc_curve point sklearn reports for that threshold; the Youden pick is the brute-force best."""
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(12)
    y = rng.integers(0, 2, 200).astype(float)
    s = np.clip(np.round(y + rng.normal(scale=1.2, size=200)), -1, 3)  # values -1..3
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    for rule, target in (("youden", None), ("sensitivity", 0.8), ("specificity", 0.8)):
        t = metrics.choose_threshold(y, s, rule, target)
        m = metrics.threshold_metrics(y, s, t)
        k = int(np.flatnonzero(thr == t)[0])
        assert m["sensitivity"] == pytest.approx(tpr[k], abs=1e-12), rule
        assert 1 - m["specificity"] == pytest.approx(fpr[k], abs=1e-12), rule
    youden = lambda c: (((s >= c) & (y == 1)).sum() / (y == 1).sum()  # noqa: E731
                        - ((s >= c) & (y == 0)).sum() / (y == 0).sum())
    best = max(youden(c) for c in np.unique(s))
    assert youden(metrics.choose_threshold(y, s)) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("values", [2, 3, 7])
def test_auroc_auprc_with_heavy_ties_and_zero_weights_match_sklearn(values):
    rng = np.random.default_rng(values)
    n = 150
    y = rng.integers(0, 2, n).astype(float)
    s = rng.integers(0, values, n) + 0.5 * y * rng.integers(0, 2, n)  # few distinct scores, tied across classes
    w = rng.integers(0, 3, n).astype(float)  # zero weights: rows that were not drawn
    y_nan = y.copy()
    y_nan[::7] = np.nan
    keep = ~np.isnan(y_nan)
    assert metrics.auroc(y_nan, s, w) == pytest.approx(roc_auc_score(y[keep], s[keep], sample_weight=w[keep]),
                                                       abs=1e-12)
    assert metrics.auprc(y_nan, s, w) == pytest.approx(
        average_precision_score(y[keep], s[keep], sample_weight=w[keep]), abs=1e-12)
    fw = rng.random(n)  # non-integer weights too
    assert metrics.auroc(y, s, fw) == pytest.approx(roc_auc_score(y, s, sample_weight=fw), abs=1e-12)
    assert metrics.auprc(y, s, fw) == pytest.approx(average_precision_score(y, s, sample_weight=fw), abs=1e-12)


def test_all_tied_scores_by_hand():
    y = np.array([1, 0, 0, 1, 0.0])
    s = np.full(5, 0.3)
    assert metrics.auroc(y, s) == 0.5  # every pair tied: half credit
    assert metrics.auprc(y, s) == pytest.approx(2 / 5)  # one threshold: precision = prevalence
    # one positive above all negatives but tied with one of them: (3 + 0.5) / 4 pairs
    assert metrics.auroc([1, 0, 0, 0, 0.0], [0.9, 0.9, 0.1, 0.2, 0.3]) == pytest.approx(3.5 / 4)


def test_one_class_is_nan_without_numpy_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(metrics.auroc(np.ones(4), np.arange(4.0)))
        assert np.isnan(metrics.auprc(np.zeros(4), np.arange(4.0)))
        assert np.isnan(metrics.auroc(np.full(3, np.nan), np.arange(3.0)))  # every row excluded


def test_patient_bootstrap_with_interleaved_rows_equals_brute_force_and_ignores_row_order():
    """Films of a patient scattered over the table (ids of mixed type): the interval equals the brute force
    over rebuilt patient draws, and shuffling the rows changes nothing (patients, not positions, are drawn)."""
    y, s, pids = _clustered(n_pat=30, seed=8)
    order = np.random.default_rng(2).permutation(len(y))
    y2, s2 = y[order], s[order]
    pids2 = [int(pids[i][3:]) if i % 2 else pids[i] for i in order]  # "pat007" and 7 are different patients
    pids2 = [f"pat{p:03d}" if isinstance(p, int) else p for p in pids2]
    got = metrics.bootstrap_ci("auroc", y2, s2, pids2, n_boot=300, seed=4, level=0.9)
    vals = np.array([roc_auc_score(y2[r], s2[r]) if 0 < y2[r].sum() < len(r) else np.nan
                     for r in _draws(pids2, 300, 4)])
    lo, hi = np.percentile(vals[~np.isnan(vals)], [5, 95])  # level 0.9
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)
    same = metrics.bootstrap_ci("auroc", y, s, pids, n_boot=300, seed=4, level=0.9)
    assert (same["ci_low"], same["ci_high"]) == pytest.approx((got["ci_low"], got["ci_high"]), abs=1e-12)
    assert got["n_patients"] == 30 and got["level"] == 0.9
    w = np.concatenate(list(metrics.patient_weights(pids2, 50, seed=1)))  # [50, n]
    for p in set(pids2):
        cols = [i for i, q in enumerate(pids2) if q == p]
        assert (w[:, cols] == w[:, cols[:1]]).all()  # a patient's rows always share one draw count


def test_patient_draw_counts_are_a_multinomial_over_patients():
    """Over many resamples each patient is drawn on average once, whatever its number of films; a film-level
    bootstrap would draw the 9-film patient's films ~9x as often as a patient."""
    pids = ["big"] * 9 + ["a", "b", "c"]
    w = np.concatenate(list(metrics.patient_weights(pids, 4000, seed=0)))  # [4000, 12]
    per_patient = w[:, [0, 9, 10, 11]]  # one column per patient
    assert (per_patient.sum(1) == 4).all()
    assert per_patient.mean(0) == pytest.approx([1, 1, 1, 1], abs=0.06)
    assert per_patient.var(0) == pytest.approx([0.75] * 4, abs=0.08)  # binomial(4, 1/4): 4 * 1/4 * 3/4


def test_no_resample_and_bad_level():
    y, s, pids = _clustered(seed=1)
    got = metrics.bootstrap_ci("auroc", y, s, pids, n_boot=0)
    assert got["value"] == pytest.approx(roc_auc_score(y, s)) and (got["ci_low"], got["ci_high"]) == (None, None)
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="between 0 and 1"):
            metrics.percentile_ci([0.1, 0.2], bad)


def test_rows_scored_counts_rows_with_any_label_in_a_multi_label_metric():
    y = np.array([[1, np.nan], [np.nan, np.nan], [0, 1], [np.nan, 0]])
    s = np.arange(8.0).reshape(4, 2)

    def first_col_mean(y_, s_, w):  # [B, n] -> [B]
        return (w * s_[:, 0]).sum(1) / w.sum(1)

    got = metrics.bootstrap_ci(first_col_mean, y, s, ["a", "b", "c", "d"], n_boot=10)
    assert got["n_rows"] == 4 and got["n_rows_scored"] == 3  # row 1 has no label at all
    one = metrics.bootstrap_ci("auroc", np.array([1, np.nan, 0, 0]), np.arange(4.0), list("abcd"), n_boot=10)
    assert one["n_rows_scored"] == 3


def test_mean_ci_against_brute_force():
    rng = np.random.default_rng(3)
    pids = [f"q{i // 3}" for i in range(60)] + [f"r{i}" for i in range(20)]
    hits = (rng.random(80) < 0.6).astype(float)
    got = metrics.mean_ci(hits, pids, n_boot=250, seed=9)
    means = [hits[r].mean() for r in _draws(pids, 250, 9)]
    assert got["value"] == pytest.approx(hits.mean(), abs=1e-12)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), abs=1e-12)
    assert got["unit"] == "patient" and got["n_patients"] == 40


# ----------------------------------------------------------------------------------------------------------
# ROC points, operating points and calibration (moved here from finetune/clinical.py)


def _tied_case(seed: int, n: int = 80):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(float)
    s = np.round(y * 0.4 + rng.random(n), 1)  # heavy ties
    y[rng.random(n) < 0.1] = np.nan  # excluded rows
    return y, s, rng.integers(0, 4, size=(5, n)).astype(float)  # [B, n] integer weights (a resample's counts)


@pytest.mark.parametrize("seed", range(4))
def test_roc_points_match_sklearn_roc_curve_per_resample(seed):
    from sklearn.metrics import roc_curve

    y, s, w = _tied_case(seed)
    tpr, fpr = metrics.roc_points(y, s, w)  # [B, G+1]
    keep = ~np.isnan(y)
    for b in range(w.shape[0]):
        ref_fpr, ref_tpr, _ = roc_curve(y[keep], s[keep], sample_weight=w[b, keep], drop_intermediate=False)
        # sklearn drops thresholds whose rows all have weight 0; the same points otherwise
        pts = {(round(a, 12), round(c, 12)) for a, c in zip(fpr[b], tpr[b])}
        assert pts == {(round(a, 12), round(c, 12)) for a, c in zip(ref_fpr, ref_tpr)}
    one_tpr, one_fpr = metrics.roc_points(y, s)
    ref_fpr, ref_tpr, _ = roc_curve(y[keep], s[keep], drop_intermediate=False)
    assert np.allclose(one_tpr[0], ref_tpr) and np.allclose(one_fpr[0], ref_fpr)


def test_roc_points_one_class_is_nan():
    tpr, fpr = metrics.roc_points(np.ones(4), np.arange(4.0))
    assert np.isnan(fpr).all() and not np.isnan(tpr).any()


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 1.0])
def test_sensitivity_and_specificity_at_target_against_brute_force(target):
    y, s, w = _tied_case(7, 120)
    keep = ~np.isnan(y)
    got_sens = metrics.sensitivity_at_specificity(y, s, w, target)
    got_spec = metrics.specificity_at_sensitivity(y, s, w, target)
    for b in range(w.shape[0]):
        yy, ss, ww = y[keep], s[keep], w[b, keep]
        best_sens, best_spec = 0.0, 0.0
        for t in np.r_[np.inf, np.unique(ss)]:  # every threshold: positive when score >= t
            pred = ss >= t
            sens = (ww * pred * (yy == 1)).sum() / (ww * (yy == 1)).sum()
            spec = (ww * ~pred * (yy == 0)).sum() / (ww * (yy == 0)).sum()
            if spec >= target - 1e-12:
                best_sens = max(best_sens, sens)
            if sens >= target - 1e-12:
                best_spec = max(best_spec, spec)
        assert got_sens[b] == pytest.approx(best_sens) and got_spec[b] == pytest.approx(best_spec)


def test_operating_point_is_chosen_on_validation_and_applied_to_test():
    y_val, s_val = np.array([0, 0, 1, 1, 0, 1.0]), np.array([0.1, 0.3, 0.35, 0.8, 0.2, 0.9])
    p = metrics.choose_operating_point(y_val, s_val)
    # Youden by hand: J = 1/3 at 0.9, 2/3 at 0.8, 1 at 0.35 (every positive above every negative), then lower
    assert p == {"rule": "youden", "target": None, "threshold": 0.35, "chosen_on": "validation",
                 "n_validation": 6, "n_validation_positive": 3}
    t = metrics.apply_operating_point(p, [1, 0, 1, 0], [0.5, 0.3, 0.2, 0.36])["test"]
    assert (t["tp"], t["fp"], t["fn"], t["tn"]) == (1, 1, 1, 1)
    assert metrics.apply_operating_point(metrics.choose_operating_point([1, 1], [0.1, 0.2]), [1], [0.5])["test"] is None
    with pytest.raises(RadalignError, match="threshold rule 'best'"):
        metrics.choose_operating_point(y_val, s_val, "best")


def test_mean_interval_is_mean_ci_or_nothing():
    v, pid = [1, 0, 1, 1, 0, 1.0], ["a", "a", "b", "c", "c", "d"]
    r = metrics.mean_ci(v, pid, n_boot=50, seed=3)
    assert metrics.mean_interval(v, pid, n_boot=50, seed=3) == {"ci_low": r["ci_low"], "ci_high": r["ci_high"]}
    assert metrics.mean_interval(v, None) == {} and metrics.mean_interval(v, pid, n_boot=0) == {}

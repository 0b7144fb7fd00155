"""Shared statistics: one definition of each metric, and intervals that resample PATIENTS.

    auroc(y, score) / auprc(y, score)                          point estimates (optionally row-weighted)
    bootstrap_ci("auroc", y, score, patient_ids)               value + percentile interval, unit "patient"
    paired_difference("auroc", y, a, b, patient_ids)           model a - model b on the same resamples
    recall_at_k(sim, positives)                                share of queries with a positive in the top k
    choose_threshold(y_val, s_val) / threshold_metrics(y, s, t)
    auroc_table(scores, labels, names, patient_ids=...)       per-label AUROC + interval, macro means (one bootstrap)
    roc_points(y, score) / sensitivity_at_specificity / specificity_at_sensitivity   ROC summaries, per resample
    choose_threshold(y_val, s_val) / threshold_metrics(y, s, t)   an operating point (validation) and its counts
    choose_operating_point(y_val, s_val) / apply_operating_point(point, y, s)   the same, as a report section
    calibration_bins / expected_calibration_error / brier_score / fit_temperature   calibration

Labels `y` are 1/0; NaN marks a row excluded from this metric (an uncertain or blank label): it is never
scored, not even as a negative, but its patient still counts as one of the data's patients.

The bootstrap unit is the patient: one resample draws patients with replacement, and every film of a drawn
patient enters with that patient's draw count as its weight (all films of a patient move together). A
dataset with every film duplicated therefore gives exactly the same interval as the original; resampling
films instead would treat a patient's 15 films as 15 independent observations and give intervals that are
too narrow.

A resample is the original rows with integer weights, so the metrics take weights [B, n] and score all B
resamples with a few vectorised sums over rows sorted once (the Mann-Whitney form of AUROC; average precision
over tie groups). Tests check both against sklearn with `sample_weight`. This module imports no stage package.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

from radalign import RadalignError

# Rows x resamples per chunk of the weight matrix: bounds memory (~160 MB of float64) for large sets.
_CHUNK_CELLS = 20_000_000
UNIT = "patient"

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (y [n], score [n], w [B, n]) -> [B]


# ----------------------------------------------------------------------------------------------------------
# Weighted metrics over many resamples at once


def _tie_groups(y: np.ndarray, score: np.ndarray, weights: np.ndarray, descending: bool):
    """Sort rows by score once; per resample, the positive and negative weight of each tie group. [B, G] x2."""
    keep = ~np.isnan(y)
    y, score, weights = y[keep], score[keep], weights[:, keep]
    order = np.argsort(-score if descending else score, kind="mergesort")
    s = score[order]
    if s.size == 0:
        z = np.zeros((weights.shape[0], 0))
        return z, z
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first row of each tie group
    w = weights[:, order]  # [B, n]
    pos = y[order] == 1
    gp = np.add.reduceat(w * pos, starts, axis=1)  # [B, G] positive weight per tie group
    gn = np.add.reduceat(w * ~pos, starts, axis=1)  # [B, G] negative weight per tie group
    return gp, gn


def _as_weights(weights, n: int) -> tuple[np.ndarray, bool]:
    if weights is None:
        return np.ones((1, n)), True
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 1:
        return w[None, :], True
    return w, False


def weighted_auroc(y, score, weights) -> np.ndarray:
    """AUROC of `score` [n] for `y` [n] (1/0, NaN excluded) under row weights [B, n] -> [B] (NaN: one class).

    Mann-Whitney: P(score_pos > score_neg) + 0.5 P(tie), each pair weighted by w_pos * w_neg.
    """
    y, score = np.asarray(y, dtype=np.float64), np.asarray(score, dtype=np.float64)
    gp, gn = _tie_groups(y, score, np.asarray(weights, dtype=np.float64), descending=False)
    below = np.cumsum(gn, axis=1) - gn  # [B, G] negative weight strictly below each group
    num = (gp * (below + 0.5 * gn)).sum(axis=1)
    den = gp.sum(axis=1) * gn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_auprc(y, score, weights) -> np.ndarray:
    """Average precision (sklearn's step-wise definition, ties as one threshold) under weights [B, n] -> [B].

    AP = sum over thresholds of (recall gain) x precision; NaN when a resample has no positive weight.
    """
    y, score = np.asarray(y, dtype=np.float64), np.asarray(score, dtype=np.float64)
    gp, gn = _tie_groups(y, score, np.asarray(weights, dtype=np.float64), descending=True)
    tp, fp = np.cumsum(gp, axis=1), np.cumsum(gn, axis=1)  # [B, G] at each threshold, high to low
    total = tp[:, -1] if tp.shape[1] else np.zeros(gp.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = (gp * precision).sum(axis=1) / total
    return np.where(total > 0, ap, np.nan)


def roc_points(y, score, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted ROC points, thresholds high to low, from (0, 0) to (1, 1): tpr, fpr [B, G+1] for weights [B, n]
    (default one resample of ones); G = distinct scores, ties one point. NaN rows when a resample has one class."""
    w, _ = _as_weights(weights, len(score))
    y, score = np.asarray(y, dtype=np.float64), np.asarray(score, dtype=np.float64)
    gp, gn = _tie_groups(y, score, w, descending=True)  # [B, G]
    zero = np.zeros((gp.shape[0], 1))
    tp, fp = np.hstack([zero, np.cumsum(gp, axis=1)]), np.hstack([zero, np.cumsum(gn, axis=1)])  # [B, G+1]
    with np.errstate(invalid="ignore", divide="ignore"):
        p, n = tp[:, -1:], fp[:, -1:]
        return np.where(p > 0, tp / p, np.nan), np.where(n > 0, fp / n, np.nan)


def sensitivity_at_specificity(y, score, weights, target: float = 0.9) -> np.ndarray:
    """Best sensitivity among ROC points with specificity >= target (no interpolation): weights [B, n] -> [B]."""
    tpr, fpr = roc_points(y, score, weights)
    out = np.where((1 - fpr) >= target - 1e-12, tpr, -np.inf).max(axis=1)
    return np.where(np.isnan(tpr).any(1) | np.isnan(fpr).any(1), np.nan, out)


def specificity_at_sensitivity(y, score, weights, target: float = 0.9) -> np.ndarray:
    """Best specificity among ROC points with sensitivity >= target (no interpolation): weights [B, n] -> [B]."""
    tpr, fpr = roc_points(y, score, weights)
    out = np.where(tpr >= target - 1e-12, 1 - fpr, -np.inf).max(axis=1)
    return np.where(np.isnan(tpr).any(1) | np.isnan(fpr).any(1), np.nan, out)


def auroc(y, score, weights=None) -> float:
    """Area under the ROC curve; `weights` [n] are row weights (default 1). NaN when only one class."""
    w, _ = _as_weights(weights, len(score))
    return float(weighted_auroc(y, score, w)[0])


def auprc(y, score, weights=None) -> float:
    """Average precision (area under the precision-recall curve, step-wise). NaN when there is no positive."""
    w, _ = _as_weights(weights, len(score))
    return float(weighted_auprc(y, score, w)[0])


_METRICS: dict[str, Metric] = {"auroc": weighted_auroc, "auprc": weighted_auprc}


def _metric_fn(metric) -> Metric:
    if callable(metric):
        return metric
    if metric not in _METRICS:
        raise ValueError(f"metric {metric!r}: unknown; use one of {sorted(_METRICS)} or a callable "
                         "(y, score, weights[B, n]) -> [B]")
    return _METRICS[metric]


# ----------------------------------------------------------------------------------------------------------
# Patient-level bootstrap


def patient_codes(patient_ids) -> tuple[np.ndarray, int]:
    """Row -> patient index (0..P-1, in sorted id order) and P. Ids may be str or int; None is an error."""
    if any(p is None for p in patient_ids):
        raise ValueError("patient_ids: a row has no patient id (None); every row needs its patient")
    ids = np.asarray([str(p) for p in patient_ids])
    _, codes = np.unique(ids, return_inverse=True)
    return codes.reshape(-1), int(codes.max()) + 1 if codes.size else 0


def patient_weights(patient_ids, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield [b, n_rows] float weights: how often each row's PATIENT was drawn in each resample.

    Patients are drawn with replacement (as many draws as there are patients); all films of a patient get the
    patient's count. Seeded and chunked; the chunking depends only on the data's size, so the same
    (patients, n_boot, seed) always gives the same resamples, in the same order.
    """
    codes, n_pat = patient_codes(patient_ids)
    n = codes.size
    if n == 0:
        return
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CHUNK_CELLS // max(n, n_pat)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        idx = rng.integers(0, n_pat, size=(b, n_pat))  # [b, P] drawn patients
        flat = (idx + np.arange(b)[:, None] * n_pat).ravel()
        counts = np.bincount(flat, minlength=b * n_pat).reshape(b, n_pat).astype(np.float64)  # [b, P]
        yield counts[:, codes]  # [b, n_rows]
        done += b


def percentile_ci(values, level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile interval of bootstrap values (NaN resamples dropped): the (1-level)/2 and (1+level)/2
    quantiles, e.g. 2.5% and 97.5% for level 0.95. (None, None) when no resample is usable."""
    if not 0 < level < 1:
        raise ValueError(f"level {level}: must be between 0 and 1 (e.g. 0.95)")
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None, None
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def _boot_values(fn: Metric, ys: list, scores: list, patient_ids, n_boot: int, seed: int) -> list[np.ndarray]:
    """Each (y, score) pair scored on the SAME patient resamples -> one [n_boot] array per pair."""
    out = [[] for _ in ys]
    for w in patient_weights(patient_ids, n_boot, seed):  # [b, n]
        for i, (y, s) in enumerate(zip(ys, scores)):
            out[i].append(np.asarray(fn(y, s, w), dtype=np.float64).reshape(-1))
    return [np.concatenate(v) if v else np.full(0, np.nan) for v in out]


def _check_rows(patient_ids, *arrays) -> int:
    n = len(patient_ids)
    for a in arrays:
        if len(a) != n:
            raise ValueError(f"{len(a)} scores/labels for {n} patient ids; pass one patient id per row")
    return n


def _header(patient_ids, n_boot: int, seed: int, level: float, y) -> dict:
    _, n_pat = patient_codes(patient_ids)
    try:  # rows with at least one label that is not NaN (excluded rows are drawn but never scored)
        yv = np.asarray(y, dtype=np.float64).reshape(len(patient_ids), -1)
        scored = int((~np.isnan(yv)).any(axis=1).sum())
    except (TypeError, ValueError):  # a callable metric's own label structure
        scored = len(patient_ids)
    return {"level": level, "n_boot": n_boot, "seed": seed, "unit": UNIT, "method": "percentile",
            "n_patients": n_pat, "n_rows": len(patient_ids), "n_rows_scored": scored}


def _finite(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def bootstrap_ci(metric, y, score, patient_ids, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """A metric with its patient-level percentile bootstrap interval.

    metric: "auroc" | "auprc" | callable(y, score, weights[B, n]) -> [B] (y and score may then be any arrays
    whose first axis is the row). Returns {"value", "ci_low", "ci_high", "level", "n_boot", "seed", "unit":
    "patient", "method", "n_patients", "n_rows", "n_rows_scored", "skipped_resamples"} (value None when the
    metric is undefined, e.g. one class; skipped_resamples: resamples where it was undefined).
    """
    fn = _metric_fn(metric)
    _check_rows(patient_ids, y, score)
    value = float(np.asarray(fn(y, score, np.ones((1, len(patient_ids)))), dtype=np.float64).reshape(-1)[0])
    (boot,) = _boot_values(fn, [y], [score], patient_ids, n_boot, seed)
    lo, hi = percentile_ci(boot, level) if not np.isnan(value) else (None, None)
    return {"value": _finite(value), "ci_low": lo, "ci_high": hi, **_header(patient_ids, n_boot, seed, level, y),
            "skipped_resamples": int(np.isnan(boot).sum())}


def paired_difference(metric, y, score_a, score_b, patient_ids, *, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """metric(a) - metric(b) on the same rows and the same patient resamples (a paired comparison).

    Returns {"delta", "value_a", "value_b", "ci_low", "ci_high", "p_value", "level", "n_boot", "unit":
    "patient", ...}. p_value: two-sided bootstrap p (twice the share of resamples on the far side of 0,
    capped at 1) - a rough guide; the interval is the result.
    """
    fn = _metric_fn(metric)
    _check_rows(patient_ids, y, score_a, score_b)
    ones = np.ones((1, len(patient_ids)))
    va = float(np.asarray(fn(y, score_a, ones), dtype=np.float64).reshape(-1)[0])
    vb = float(np.asarray(fn(y, score_b, ones), dtype=np.float64).reshape(-1)[0])
    ba, bb = _boot_values(fn, [y, y], [score_a, score_b], patient_ids, n_boot, seed)
    d = ba - bb
    ok = d[~np.isnan(d)]
    delta = va - vb
    lo, hi = percentile_ci(d, level) if not np.isnan(delta) else (None, None)
    p = None
    if ok.size and not np.isnan(delta):
        p = float(min(1.0, 2 * min((ok <= 0).mean(), (ok >= 0).mean())))
    return {"delta": _finite(delta), "value_a": _finite(va), "value_b": _finite(vb), "ci_low": lo, "ci_high": hi,
            "p_value": p, **_header(patient_ids, n_boot, seed, level, y),
            "skipped_resamples": int(np.isnan(d).sum())}


# ----------------------------------------------------------------------------------------------------------
# Retrieval


def first_positive_rank(sim, positives) -> np.ndarray:
    """[Q] 0-based rank of each query's best-ranked positive column (sim [Q, N], positives bool [Q, N]), as
    float; inf when the query has no positive. Ties in similarity are broken by column order (stable sort)."""
    sim = np.asarray(sim, dtype=np.float64)
    pos = np.asarray(positives, dtype=bool)
    if sim.shape != pos.shape:
        raise ValueError(f"sim {sim.shape} and positives {pos.shape}: shapes must match [queries, candidates]")
    order = np.argsort(-sim, axis=1, kind="stable")  # [Q, N]
    ranked = np.take_along_axis(pos, order, axis=1)  # [Q, N] positive flags in rank order
    return np.where(ranked.any(1), ranked.argmax(1).astype(np.float64), np.inf)


def recall_at_k(sim, positives, ks=(1, 5, 10)) -> dict[int, float]:
    """Share of queries (rows of sim [Q, N]) with at least one positive among their top-k columns.

    positives: bool [Q, N]. Ties in similarity are broken by column order (stable sort). A query without any
    positive counts as a miss (callers that want it left out drop those rows first). k > N means k = N.
    Accepts numpy arrays or CPU torch tensors. Per-query hits (for a patient bootstrap):
    `first_positive_rank(sim, positives) < k`.
    """
    first = first_positive_rank(sim, positives)  # [Q]
    if first.size == 0:
        return {int(k): float("nan") for k in ks}
    return {int(k): float(np.mean(first < k)) for k in ks}


def mean_ci(values, patient_ids, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """A per-row value's mean (e.g. a query's hit 0/1, its precision@K) with the patient bootstrap interval."""
    v = np.asarray(values, dtype=np.float64)

    def weighted_mean(_y, s, w):  # [B, n] -> [B]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (w * s).sum(1) / w.sum(1)

    return bootstrap_ci(weighted_mean, v, v, patient_ids, n_boot=n_boot, seed=seed, level=level)


def mean_interval(values, patient_ids, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """{"ci_low", "ci_high"} of mean_ci, or {} when there are no patient ids or no resamples (no interval)."""
    if patient_ids is None or n_boot < 1:
        return {}
    r = mean_ci(values, patient_ids, n_boot=n_boot, seed=seed, level=level)
    return {"ci_low": r["ci_low"], "ci_high": r["ci_high"]}


# ----------------------------------------------------------------------------------------------------------
# Thresholds (chosen on validation, applied to test)


RULES = {"youden": "Youden's J (max sensitivity + specificity - 1)", "sensitivity": "target sensitivity",
         "specificity": "target specificity"}


def _clean(y, score) -> tuple[np.ndarray, np.ndarray]:
    y, score = np.asarray(y, dtype=np.float64), np.asarray(score, dtype=np.float64)
    keep = ~np.isnan(y)
    return y[keep].astype(int), score[keep]


def choose_threshold(y, score, rule: str = "youden", target: float | None = None) -> float | None:
    """A decision threshold (predict positive when score >= threshold), from VALIDATION data only.

    rule "youden": maximise sensitivity + specificity - 1. rule "sensitivity": the highest threshold whose
    sensitivity >= target. rule "specificity": the lowest threshold whose specificity >= target.
    None when y has one class only. NaN labels are left out.
    """
    if rule not in RULES:
        raise ValueError(f"rule {rule!r}: use 'youden', 'sensitivity' or 'specificity'")
    if rule != "youden" and (target is None or not 0 < target <= 1):
        raise ValueError(f"rule {rule!r} needs a target in (0, 1] (got {target})")
    y, score = _clean(y, score)
    if not 0 < y.sum() < y.size:
        return None
    tpr, fpr = (a[0] for a in roc_points(y, score))  # [G+1], point k predicts positive for the top k groups
    if rule == "youden":
        k = int(np.argmax(tpr - fpr))
    elif rule == "sensitivity":
        k = int(np.flatnonzero(tpr >= target - 1e-12)[0])
    else:
        k = int(np.flatnonzero(1 - fpr >= target - 1e-12)[-1])
    if k == 0:  # "predict nothing": keep JSON finite with the next float above the highest score
        return float(np.nextafter(score.max(), np.inf))
    return float(np.unique(score)[::-1][k - 1])  # the k-th distinct score, high to low


def threshold_metrics(y, score, threshold: float) -> dict:
    """Confusion counts and rates at a fixed threshold (positive when score >= threshold); NaN labels left out.

    -> {"threshold", "n", "tp", "fp", "fn", "tn", "sensitivity" tp/(tp+fn), "specificity" tn/(tn+fp),
        "precision" tp/(tp+fp), "npv" tn/(tn+fn), "f1", "accuracy"}; a rate with a zero denominator is None.
    """
    y, score = _clean(y, score)
    p = score >= threshold
    t = y == 1
    tp, fp = int((p & t).sum()), int((p & ~t).sum())
    fn, tn = int((~p & t).sum()), int((~p & ~t).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {"threshold": float(threshold), "n": int(y.size), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp), "precision": ratio(tp, tp + fp),
            "npv": ratio(tn, tn + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn), "accuracy": ratio(tp + tn, y.size)}


# ----------------------------------------------------------------------------------------------------------
# Per-label AUROC tables (zero-shot, retrieval's k-NN vote): labels [N, C] 1/0 with NaN for excluded rows


def bootstrap_units(patient_ids, n: int) -> tuple[list, str]:
    """The bootstrap units: the patients, or every image its own unit when ids are unknown."""
    if patient_ids is None:
        return list(range(n)), "image"
    if len(patient_ids) != n:
        raise ValueError(f"{len(patient_ids)} patient ids for {n} rows")
    return list(patient_ids), UNIT


def auroc_point(scores: np.ndarray, y: np.ndarray) -> float | None:
    """AUROC of scores [n] for labels y [n] (1/0, none excluded); None when y has one value."""
    return auroc(y, scores) if 0 < y.sum() < y.size else None


def auroc_table(scores: np.ndarray, labels: np.ndarray, names: list[str], *, n_boot: int = 1000,
                seed: int = 0, level: float = 0.95, macro_classes: list[str] | None = None,
                min_per_label: int = 1, patient_ids=None) -> dict:
    """Per-class AUROC with patient-level bootstrap CIs and the macro mean (with its joint CI).

    scores [N, C]; labels [N, C] with 1/0 and NaN for excluded; patient_ids [N] (None: each image its own
    bootstrap unit). Returns
    {"classes": {name: {auroc, ci_low, ci_high, n_pos, n_neg, n_excluded, skipped_resamples}},
     "macro": {auroc, ci_low, ci_high, classes, skipped_resamples, skipped_by_class, note, n_boot, seed, level},
     "macro_all": the same over every class}.
    A class with only one label value gets auroc None (and is left out of the macro, which says so). A class
    with fewer than `min_per_label` positives or negatives keeps its own AUROC and CI but is left out of the
    macro means (listed under `classes_too_few`): an AUROC from 86 positives and 1 negative is one number,
    not an estimate worth averaging. A bootstrap resample in which a macro class has only one label value is
    dropped from the macro interval and counted (`_macro`); `note` says so when more than 5% were dropped.
    """
    n, c = scores.shape
    included = ~np.isnan(labels)  # [N, C]
    per_class, boot = {}, np.full((n_boot, c), np.nan)
    for j, name in enumerate(names):
        m = included[:, j]
        y = labels[m, j].astype(int)
        per_class[name] = {"auroc": auroc_point(scores[m, j], y), "n_pos": int(y.sum()),
                           "n_neg": int((y == 0).sum()), "n_excluded": int((~m).sum())}
    units, unit = bootstrap_units(patient_ids, n)
    row = 0
    for counts in patient_weights(units, n_boot, seed):  # [b, N]
        for j, name in enumerate(names):
            if per_class[name]["auroc"] is None:
                continue
            # NaN (excluded) labels are dropped inside: never scored, whatever their patient's weight
            boot[row:row + len(counts), j] = weighted_auroc(labels[:, j], scores[:, j], counts)
        row += len(counts)
    for j, name in enumerate(names):
        lo, hi = percentile_ci(boot[:, j], level)
        skipped = int(np.isnan(boot[:, j]).sum()) if per_class[name]["auroc"] is not None else n_boot
        per_class[name].update(ci_low=lo, ci_high=hi, skipped_resamples=skipped)
    out = {"classes": per_class}
    for key, wanted in (("macro", macro_classes or names), ("macro_all", names)):
        out[key] = _macro(per_class, boot, names, list(wanted), level, min_per_label)
        out[key].update(n_boot=n_boot, seed=seed, level=level, min_per_label=min_per_label, unit=unit,
                        n_units=len(set(units)))
    return out


# Share of dropped resamples above which the macro says its interval is conditional on the thin classes.
CONDITIONAL_SHARE = 0.05


def _macro(per_class: dict, boot: np.ndarray, names: list[str], wanted: list[str], level: float,
           min_per_label: int = 1) -> dict:
    """The macro mean over the usable classes of `wanted`, with its interval over the same resamples.

    boot [B, C]: every class's AUROC per resample (NaN: the class had one label value in that resample). A
    resample enters the macro interval only when EVERY macro class is scorable in it; the others are dropped
    and counted (`skipped_resamples`, and per class in `skipped_by_class`), never averaged over the classes
    that remain (that would mix means over different class sets and narrow or shift the interval).
    """
    missing = [w for w in wanted if per_class[w]["auroc"] is None]
    too_few = [w for w in wanted if per_class[w]["auroc"] is not None
               and min(per_class[w]["n_pos"], per_class[w]["n_neg"]) < min_per_label]
    usable = [w for w in wanted if w not in missing and w not in too_few]
    if not usable:
        return {"auroc": None, "ci_low": None, "ci_high": None, "classes": [], "classes_without_auroc": missing,
                "classes_too_few": too_few, "skipped_resamples": int(boot.shape[0]), "skipped_by_class": {},
                "note": ""}
    cols = [names.index(w) for w in usable]
    sub = boot[:, cols]  # [B, K]
    unscorable = np.isnan(sub)  # [B, K]
    ok = ~unscorable.any(axis=1)  # [B] a resample counts only if every class in the macro has both labels
    lo, hi = percentile_ci(sub[ok].mean(axis=1), level) if ok.any() else (None, None)
    by_class = {w: int(unscorable[:, k].sum()) for k, w in enumerate(usable) if unscorable[:, k].any()}
    return {"auroc": float(np.mean([per_class[w]["auroc"] for w in usable])), "ci_low": lo, "ci_high": hi,
            "classes": usable, "classes_without_auroc": missing, "classes_too_few": too_few,
            "skipped_resamples": int((~ok).sum()), "skipped_by_class": by_class,
            "note": _conditional_note(int((~ok).sum()), len(ok), by_class)}


def _conditional_note(skipped: int, n_boot: int, by_class: dict[str, int]) -> str:
    """A sentence when many resamples were dropped: the interval then holds only given the thin classes."""
    if n_boot == 0 or skipped <= CONDITIONAL_SHARE * n_boot:
        return ""
    worst = ", ".join(f"{c} ({n})" for c, n in sorted(by_class.items(), key=lambda kv: -kv[1]))
    return (f"{skipped} of {n_boot} resamples dropped ({100 * skipped / n_boot:.0f}%): a macro class had one "
            f"label value in them ({worst}); the interval is conditional on those classes being present. Raise "
            "min_per_label or leave those classes out of macro_classes.")


def shuffled_label_control(scores: np.ndarray, labels: np.ndarray, names: list[str],
                           macro_classes: list[str], seed: int = 0) -> float | None:
    """Macro AUROC after permuting each class's included labels across rows (should be ~0.5)."""
    rng = np.random.default_rng(seed)
    aucs = []
    for name in macro_classes:
        j = names.index(name)
        m = ~np.isnan(labels[:, j])
        y = rng.permutation(labels[m, j].astype(int))
        if (auc := auroc_point(scores[m, j], y)) is not None:
            aucs.append(auc)
    return float(np.mean(aucs)) if aucs else None


__all__ = ["auroc", "auprc", "weighted_auroc", "weighted_auprc", "patient_codes", "patient_weights",
           "percentile_ci", "bootstrap_ci", "paired_difference", "recall_at_k", "first_positive_rank", "mean_ci",
           "choose_threshold",
           "threshold_metrics", "UNIT", "bootstrap_units", "auroc_point", "auroc_table",
           "shuffled_label_control", "CONDITIONAL_SHARE"]
def choose_operating_point(y_val, score_val, rule: str = "youden", target: float | None = None) -> dict:
    """A decision threshold from VALIDATION labels and scores (the only labels this function ever sees), as a
    report section: {rule, target, threshold, chosen_on, n_validation, n_validation_positive}.

    rule: "youden" | "sensitivity" | "specificity" (the last two need `target`, e.g. 0.9).
    """
    if rule not in RULES:
        raise RadalignError(f"threshold rule {rule!r}: use one of {', '.join(RULES)}")
    if rule != "youden" and (target is None or not 0 < target <= 1):
        raise RadalignError(f"threshold rule {rule!r} needs a target in (0, 1], e.g. 0.9 (got {target})")
    y_val = np.asarray(y_val, dtype=np.float64)
    thr = choose_threshold(y_val, score_val, rule=rule, target=target)
    return {"rule": rule, "target": target, "threshold": thr, "chosen_on": "validation",
            "n_validation": int((~np.isnan(y_val)).sum()), "n_validation_positive": int(np.nansum(y_val))}


def apply_operating_point(point: dict, y, score) -> dict:
    """The validation-chosen threshold applied to (test) data: the point plus "test" (threshold_metrics)."""
    out = dict(point)
    if point["threshold"] is None:
        out["test"] = None
        out["note"] = "validation has one class only: no threshold"
        return out
    out["test"] = threshold_metrics(y, score, point["threshold"])
    return out


# ----------------------------------------------------------------------------------------------------------
# Calibration (probabilities; NaN labels left out)


def _labelled(y, prob) -> tuple[np.ndarray, np.ndarray]:
    y, prob = np.asarray(y, dtype=np.float64), np.asarray(prob, dtype=np.float64)
    keep = ~np.isnan(y)
    return y[keep], prob[keep]


def calibration_bins(y, prob, n_bins: int = 10) -> list[dict]:
    """Equal-mass bins (rows sorted by probability, split into n_bins groups of n/n_bins rows, fewer bins when
    there are fewer rows): per bin n, mean predicted probability, observed rate, probability range."""
    y, prob = _labelled(y, prob)
    if n_bins < 1:
        raise RadalignError(f"bins {n_bins}: need at least 1")
    order = np.argsort(prob, kind="mergesort")
    out = []
    for idx in np.array_split(order, min(n_bins, max(y.size, 1))):
        if idx.size:
            out.append({"n": int(idx.size), "mean_prob": float(prob[idx].mean()),
                        "observed": float(y[idx].mean()), "prob_low": float(prob[idx].min()),
                        "prob_high": float(prob[idx].max())})
    return out


def expected_calibration_error(y, prob, n_bins: int = 10) -> float | None:
    """ECE = sum over equal-mass bins of (bin share of rows) x |observed rate - mean probability|."""
    bins = calibration_bins(y, prob, n_bins)
    n = sum(b["n"] for b in bins)
    return sum(b["n"] / n * abs(b["observed"] - b["mean_prob"]) for b in bins) if n else None


def brier_score(y, prob) -> float | None:
    """Mean squared difference between probability and outcome (rows with a known label)."""
    y, prob = _labelled(y, prob)
    return float(np.mean((prob - y) ** 2)) if y.size else None


def to_logit(prob, eps: float = 1e-7) -> np.ndarray:
    """Probabilities -> logits (clipped to [eps, 1 - eps] so 0 and 1 stay finite)."""
    p = np.clip(np.asarray(prob, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def _nll_and_grad(u: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean binary NLL of logits z / T with T = exp(u), and its derivative in u."""
    a = z / math.exp(float(u[0]))
    nll = np.mean(np.logaddexp(0.0, a) - y * a)
    grad = np.mean((sigmoid(a) - y) * -a)
    return float(nll), np.array([grad])


def fit_temperature(y_val, logit_val, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature T minimising the validation NLL of sigmoid(logit / T): L-BFGS-B on log T, one parameter."""
    from scipy.optimize import minimize  # scipy.optimize costs ~0.3 s to import; only calibration needs it

    y, z = _labelled(y_val, logit_val)
    if not 0 < y.sum() < y.size:
        raise RadalignError(f"temperature scaling needs both classes in validation (got {int(y.sum())} "
                            f"positive of {y.size}); evaluate with a larger validation split")
    res = minimize(_nll_and_grad, x0=np.zeros(1), args=(y, z), jac=True, method="L-BFGS-B",
                   bounds=[(math.log(bounds[0]), math.log(bounds[1]))])
    return float(math.exp(res.x[0]))


__all__ = ["auroc", "auprc", "weighted_auroc", "weighted_auprc", "roc_points", "sensitivity_at_specificity",
           "specificity_at_sensitivity", "patient_codes", "patient_weights", "percentile_ci", "bootstrap_ci",
           "paired_difference", "recall_at_k", "first_positive_rank", "mean_ci", "mean_interval", "RULES",
           "choose_threshold", "threshold_metrics", "choose_operating_point", "apply_operating_point",
           "calibration_bins", "expected_calibration_error", "brier_score", "to_logit", "sigmoid",
           "fit_temperature", "UNIT"]

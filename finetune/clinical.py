"""Clinical evaluation of a binary risk model: discrimination with patient-level intervals, calibration,
validation-chosen thresholds, subgroups and missingness patterns, graceful degradation, and a Markdown report.

    res = evaluate_binary(y, score, patient_ids, val=(y_val, score_val), baselines={"image_only": s_img})
    cal = calibration_report(y, logit, y_val, logit_val, n_bins=10)         # temperature fitted on validation
    sub = subgroup_table(frame, y, prob, patient_ids, ["gender", "age_band", "modalities", "labs"])
    deg = degradation_table(y, patient_ids, {"with_dropout": {...}, "without_dropout": {...}})
    write_report(path, binary=res, calibration=cal, subgroups=sub, degradation=deg)

    res = evaluate_predictions(test_df, val_df, groups=ehr_with_group_columns)   # predictions.csv layout
    write_evaluation(out_dir, res)         # metrics.json, report.md, reliability.png, subgroups.png (locked)

Every model-agnostic piece takes arrays (one row per study; `y` 1/0 with NaN for an unknown label, which is
left out of every metric and counted), so the CLI and the tests feed it the same way.

Statistics (radalign/metrics.py is the one definition of AUROC, AUPRC, the patient bootstrap and thresholds):
- Intervals are percentile intervals over resamples of PATIENTS (`metrics.patient_weights`: all films of a
  patient move together); a dataset with every film duplicated gives the same interval. Comparisons between
  models are paired (the same resamples). Subgroup AUROCs and the largest gap between subgroups are scored on
  the same resamples, so the gap's interval accounts for both groups at once.
- Sensitivity at 90% specificity (and specificity at 90% sensitivity) are ROC-curve summaries, like AUROC: the
  best sensitivity among the curve's points with specificity >= 0.9 (no interpolation). A decision threshold
  to deploy is a different thing: it is chosen on VALIDATION (Youden, or a target sensitivity/specificity) and
  its test sensitivity/specificity reported; the chooser never receives test labels (`choose_operating_point`
  takes the validation arrays only).
- Calibration: expected calibration error over equal-mass bins (each bin holds n/bins rows, the count is
  reported), Brier score, and temperature scaling (one parameter, L-BFGS on the validation negative
  log-likelihood) reported before/after on test.
- Subgroups: plain pandas groupby (fairlearn's MetricFrame adds a dependency for no gain here, since the
  intervals are ours). Missing values of a subgroup column are their own group "unknown", never dropped.
  A group without positives (or negatives), or under `min_count` rows, is reported with its count, not scored.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from radalign.finetune.explain import md_text

from radalign import RadalignError
from radalign import metrics as M
from radalign.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from radalign.lock import output_lock

TARGET = 0.9  # the 90% of "sensitivity at 90% specificity"
UNKNOWN = "unknown"
AGE_EDGES = (40, 65, 80)  # age bands <40, 40-64, 65-79, 80+
SUBGROUPS = ("gender", "age_band", "race", "insurance")  # sex is `gender` in the EHR table
MISSINGNESS = ("modalities", "labs")  # columns made by add_group_columns


# ----------------------------------------------------------------------------------------------------------
# Operating-point metrics over many resamples at once (not in radalign/metrics.py yet)


def _roc_points(y, score, weights) -> tuple[np.ndarray, np.ndarray]:
    """Weighted ROC points, thresholds high to low, starting at (0, 0): tpr, fpr [B, G+1] (NaN: one class)."""
    y, score = np.asarray(y, dtype=np.float64), np.asarray(score, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    keep = ~np.isnan(y)
    y, score, w = y[keep], score[keep], w[:, keep]
    order = np.argsort(-score, kind="mergesort")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if s.size else np.zeros(0, dtype=int)
    w, pos = w[:, order], y[order] == 1
    tp = np.cumsum(np.add.reduceat(w * pos, starts, axis=1), axis=1) if s.size else w[:, :0]  # [B, G]
    fp = np.cumsum(np.add.reduceat(w * ~pos, starts, axis=1), axis=1) if s.size else w[:, :0]  # [B, G]
    zero = np.zeros((w.shape[0], 1))
    tp, fp = np.hstack([zero, tp]), np.hstack([zero, fp])  # [B, G+1]
    with np.errstate(invalid="ignore", divide="ignore"):
        p, n = tp[:, -1:], fp[:, -1:]
        return np.where(p > 0, tp / p, np.nan), np.where(n > 0, fp / n, np.nan)


def sensitivity_at_specificity(y, score, weights, target: float = TARGET) -> np.ndarray:
    """Best sensitivity among ROC points with specificity >= target, per resample: weights [B, n] -> [B]."""
    tpr, fpr = _roc_points(y, score, weights)
    ok = (1 - fpr) >= target - 1e-12
    out = np.where(ok, tpr, -np.inf).max(axis=1)
    return np.where(np.isnan(tpr).any(1) | np.isnan(fpr).any(1), np.nan, out)


def specificity_at_sensitivity(y, score, weights, target: float = TARGET) -> np.ndarray:
    """Best specificity among ROC points with sensitivity >= target, per resample: weights [B, n] -> [B]."""
    tpr, fpr = _roc_points(y, score, weights)
    ok = tpr >= target - 1e-12
    out = np.where(ok, 1 - fpr, -np.inf).max(axis=1)
    return np.where(np.isnan(tpr).any(1) | np.isnan(fpr).any(1), np.nan, out)


METRICS = {
    "auroc": "auroc",
    "auprc": "auprc",
    "sensitivity_at_90_specificity": sensitivity_at_specificity,
    "specificity_at_90_sensitivity": specificity_at_sensitivity,
}
PAIRED = ("auroc", "auprc")
RULES = {"youden": "Youden's J (max sensitivity + specificity - 1)", "sensitivity": "target sensitivity",
         "specificity": "target specificity"}


# ----------------------------------------------------------------------------------------------------------
# Thresholds: chosen on validation only


def choose_operating_point(y_val, score_val, rule: str = "youden", target: float | None = None) -> dict:
    """A decision threshold from VALIDATION labels and scores (the only labels this function ever sees).

    rule: "youden" | "sensitivity" | "specificity" (the last two need `target`, e.g. 0.9).
    """
    if rule not in RULES:
        raise RadalignError(f"threshold rule {rule!r}: use one of {', '.join(RULES)}")
    if rule != "youden" and (target is None or not 0 < target <= 1):
        raise RadalignError(f"threshold rule {rule!r} needs a target in (0, 1], e.g. 0.9 (got {target})")
    y_val = np.asarray(y_val, dtype=np.float64)
    thr = M.choose_threshold(y_val, score_val, rule=rule, target=target)
    n = int((~np.isnan(y_val)).sum())
    return {"rule": rule, "target": target, "threshold": thr, "chosen_on": "validation", "n_validation": n,
            "n_validation_positive": int(np.nansum(y_val))}


def apply_operating_point(point: Mapping, y, score) -> dict:
    """The validation-chosen threshold applied to (test) data: counts, sensitivity, specificity, ..."""
    out = dict(point)
    if point["threshold"] is None:
        out["test"] = None
        out["note"] = "validation has one class only: no threshold"
        return out
    out["test"] = M.threshold_metrics(y, score, point["threshold"])
    return out


# ----------------------------------------------------------------------------------------------------------
# Discrimination with intervals and paired comparisons


def _check_binary(y, *scores) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    bad = ~np.isnan(y) & (y != 0) & (y != 1)
    if bad.any():
        raise RadalignError(f"labels: {int(bad.sum())} value(s) other than 0/1/NaN (e.g. {y[bad][0]}); "
                            "a binary task needs 1, 0 or NaN for unknown")
    for s in scores:
        s = np.asarray(s, dtype=np.float64)
        if s.shape != y.shape:
            raise RadalignError(f"scores of shape {s.shape} for labels of shape {y.shape}: one score per row")
        if not np.isfinite(s).all():
            raise RadalignError(f"scores: {int((~np.isfinite(s)).sum())} NaN or infinite value(s); "
                                "every scored row needs a finite score")
    return y


def _check_ids(patient_ids, y: np.ndarray) -> None:
    if len(patient_ids) != y.size:
        raise RadalignError(f"{len(patient_ids)} patient ids for {y.size} rows; pass the patient "
                            "(subject_id) of every row, so that intervals resample patients")


def evaluate_binary(y, score, patient_ids, *, val: tuple | None = None, baselines: Mapping | None = None,
                    n_boot: int = 1000, seed: int = 0, level: float = 0.95, threshold_rule: str = "youden",
                    threshold_target: float | None = None) -> dict:
    """AUROC, AUPRC, sensitivity at 90% specificity and specificity at 90% sensitivity with patient-level
    bootstrap intervals; paired differences (model - baseline, AUROC and AUPRC) against each baseline's
    scores; and the operating point chosen on `val` = (y_val, score_val) and applied here.
    """
    y = _check_binary(y, score, *(baselines or {}).values())
    _check_ids(patient_ids, y)
    out = {"unit": M.UNIT, "n_rows": int(y.size), "n_rows_unlabelled": int(np.isnan(y).sum()),
           "n_patients": M.patient_codes(patient_ids)[1], "n_positive": int(np.nansum(y)),
           "prevalence": float(np.nanmean(y)) if (~np.isnan(y)).any() else None,
           "n_boot": n_boot, "seed": seed, "level": level, "metrics": {}, "paired_differences": {}}
    for name, metric in METRICS.items():
        out["metrics"][name] = M.bootstrap_ci(metric, y, score, patient_ids, n_boot=n_boot, seed=seed,
                                              level=level)
    for base, s in (baselines or {}).items():
        out["paired_differences"][base] = {
            m: M.paired_difference(m, y, score, s, patient_ids, n_boot=n_boot, seed=seed, level=level)
            for m in PAIRED}
    if val is not None:
        y_val, s_val = val
        point = choose_operating_point(y_val, s_val, threshold_rule, threshold_target)
        out["operating_point"] = apply_operating_point(point, y, score)
    return out


# ----------------------------------------------------------------------------------------------------------
# Calibration


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
    from scipy.optimize import minimize

    y, z = _labelled(y_val, logit_val)
    if not 0 < y.sum() < y.size:
        raise RadalignError(f"temperature scaling needs both classes in validation (got {int(y.sum())} "
                            f"positive of {y.size}); evaluate with a larger validation split")
    res = minimize(_nll_and_grad, x0=np.zeros(1), args=(y, z), jac=True, method="L-BFGS-B",
                   bounds=[(math.log(bounds[0]), math.log(bounds[1]))])
    return float(math.exp(res.x[0]))


def calibration_report(y, logit, y_val, logit_val, n_bins: int = 10) -> dict:
    """ECE and Brier on test before/after temperature scaling fitted on validation (and validation ECE both
    ways, the fit's own check).

    -> {ece_before, ece_after, brier_before, brier_after, temperature, bins, binning, fitted_on, ...}
    """
    y, y_val = _check_binary(y, logit), _check_binary(y_val, logit_val)
    t = fit_temperature(y_val, logit_val)
    p, pt = sigmoid(logit), sigmoid(np.asarray(logit, dtype=np.float64) / t)
    pv, pvt = sigmoid(logit_val), sigmoid(np.asarray(logit_val, dtype=np.float64) / t)
    return {"ece_before": expected_calibration_error(y, p, n_bins),
            "ece_after": expected_calibration_error(y, pt, n_bins),
            "brier_before": brier_score(y, p), "brier_after": brier_score(y, pt), "temperature": t,
            "bins": n_bins, "binning": "equal-mass", "fitted_on": "validation",
            "validation_ece_before": expected_calibration_error(y_val, pv, n_bins),
            "validation_ece_after": expected_calibration_error(y_val, pvt, n_bins),
            "reliability_before": calibration_bins(y, p, n_bins),
            "reliability_after": calibration_bins(y, pt, n_bins)}


def reliability_diagram(path: str | os.PathLike, curves: Mapping[str, Sequence[Mapping]],
                        title: str = "") -> None:
    """PNG: observed rate against mean probability per equal-mass bin, one line per curve (before/after)."""
    fig, ax = _pyplot().subplots(figsize=(4.5, 4.5), dpi=120)
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="perfect")
    for name, bins in curves.items():
        ax.plot([b["mean_prob"] for b in bins], [b["observed"] for b in bins], marker="o", label=name)
    ax.set(xlabel="mean predicted probability (equal-mass bins)", ylabel="observed rate", xlim=(0, 1),
           ylim=(0, 1), title=title)
    ax.legend(loc="upper left", fontsize=8)
    _save_png(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def subgroup_plot(path: str | os.PathLike, subgroups: Mapping) -> None:
    """PNG: AUROC with its interval per scored group (one block per column); unscored groups are left out
    of the plot (the report lists them with their reason)."""
    rows = [(f"{col}: {g}", r) for col, block in subgroups["columns"].items()
            for g, r in block["groups"].items() if r["scored"]]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.3 * max(len(rows), 1) + 1.2), dpi=120)
    for i, (_, r) in enumerate(rows):
        ax.errorbar(r["auroc"], i, xerr=[[r["auroc"] - r["ci_low"]], [r["ci_high"] - r["auroc"]]], fmt="o",
                    color="#357", capsize=2)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0.5, color="#999", lw=1, ls="--")
    ax.set(xlabel=f"AUROC ({round(100 * subgroups['level'])}% CI over patients)", xlim=(0, 1))
    _save_png(fig, path)


# ----------------------------------------------------------------------------------------------------------
# Group columns: age bands and missingness patterns


def age_bands(age, edges: Sequence[float] = AGE_EDGES) -> np.ndarray:
    """Ages -> band labels "<40", "40-64", "65-79", "80+" (edges: band starts); missing age -> "unknown"."""
    age = pd.to_numeric(pd.Series(age), errors="coerce").to_numpy(dtype=np.float64)
    names = [f"<{edges[0]:g}"] + [f"{a:g}-{b - 1:g}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]:g}+"]
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), age, side="right")
    return np.array([UNKNOWN if np.isnan(a) else names[i] for a, i in zip(age, idx)], dtype=object)


def modality_pattern(present: Mapping[str, Sequence[bool]]) -> np.ndarray:
    """Per row, which modalities were present: "image+ehr+text", "image", ... ("none" when none was)."""
    names = list(present)
    cols = [np.asarray(present[m], dtype=bool) for m in names]
    sizes = {c.size for c in cols}
    if len(sizes) > 1:
        raise RadalignError(f"modality presence columns differ in length ({sorted(sizes)}); one per row")
    n = sizes.pop() if sizes else 0
    rows = ["+".join(m for m, c in zip(names, cols) if c[i]) or "none" for i in range(n)]
    return np.array(rows, dtype=object)


def labs_pattern(frame: pd.DataFrame, features: Sequence[str]) -> np.ndarray:
    """Per row "labs present" (at least one of `features` measured) or "labs absent"."""
    _require_columns(frame, features, what="lab feature")
    any_lab = frame[list(features)].notna().any(axis=1).to_numpy() if features else np.zeros(len(frame), bool)
    return np.where(any_lab, "labs present", "labs absent").astype(object)


def add_group_columns(frame: pd.DataFrame, present: Mapping[str, Sequence[bool]],
                      lab_features: Sequence[str]) -> pd.DataFrame:
    """A copy of `frame` with the derived group columns `age_band` (from `age`), `modalities` (which were
    present) and `labs` (present/absent over `lab_features`)."""
    _require_columns(frame, ["age"])
    out = frame.copy()
    out["age_band"] = age_bands(out["age"])
    pattern = modality_pattern(present)
    if pattern.size != len(out):
        raise RadalignError(f"modality presence has {pattern.size} rows for a table of {len(out)}; "
                            "one per study")
    out["modalities"] = pattern
    out["labs"] = labs_pattern(out, lab_features)
    return out


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str = "subgroup column") -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise RadalignError(f"{what}(s) {', '.join(map(repr, missing))} not in the data; available columns: "
                            f"{', '.join(map(str, frame.columns))}")


# ----------------------------------------------------------------------------------------------------------
# Subgroups


def _check_probabilities(prob) -> np.ndarray:
    prob = np.asarray(prob, dtype=np.float64)
    bad = (prob < 0) | (prob > 1)
    if bad.any():
        raise RadalignError(f"probabilities: {int(bad.sum())} value(s) outside [0, 1] "
                            f"(e.g. {prob[bad][0]:.4g}); pass probabilities (sigmoid of the logit), "
                            "not raw scores")
    return prob


def _group_order(g: str) -> tuple:
    """Groups in reading order: age bands by their lower bound ("<40" before "40-64"), "unknown" last."""
    num = re.search(r"\d+(\.\d+)?", g)
    return (g == UNKNOWN, float(num.group()) if num else math.inf, not g.startswith("<"), g)


def _group_labels(frame: pd.DataFrame, column: str) -> np.ndarray:
    col = frame[column]
    return np.array([UNKNOWN if pd.isna(v) else str(v) for v in col], dtype=object)


def _score_group(y: np.ndarray, prob: np.ndarray, boot: np.ndarray, min_count: int, n_bins: int,
                 level: float) -> dict:
    """One group's row: count, prevalence, and when scorable AUROC (with CI from `boot`, [n_boot]) and ECE."""
    lab = ~np.isnan(y)
    n_pos, n_lab = int(np.nansum(y)), int(lab.sum())
    row = {"n": int(y.size), "n_labelled": n_lab, "n_positive": n_pos,
           "prevalence": n_pos / n_lab if n_lab else None, "scored": False, "reason": None,
           "auroc": None, "ci_low": None, "ci_high": None, "ece": None}
    if n_lab < min_count:
        row["reason"] = f"fewer than {min_count} labelled rows"
    elif n_pos == 0 or n_pos == n_lab:
        row["reason"] = "no positives" if n_pos == 0 else "no negatives"
    else:
        lo, hi = M.percentile_ci(boot, level)
        row.update(scored=True, auroc=M.auroc(y, prob), ci_low=lo, ci_high=hi,
                   ece=expected_calibration_error(y, prob, n_bins))
    return row


def _group_boot(y: np.ndarray, prob: np.ndarray, labels: np.ndarray, groups: list[str], patient_ids,
                n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Each group's AUROC on the SAME patient resamples of the whole set: {group: [n_boot]}."""
    parts: dict[str, list] = {g: [] for g in groups}
    masks = {g: labels == g for g in groups}
    for w in M.patient_weights(patient_ids, n_boot, seed):  # [b, n]
        for g, m in masks.items():
            parts[g].append(M.weighted_auroc(y[m], prob[m], w[:, m]))
    return {g: np.concatenate(v) if v else np.full(0, np.nan) for g, v in parts.items()}


def _largest_gap(rows: dict[str, dict], boot: dict[str, np.ndarray], level: float) -> dict | None:
    scored = {g: r for g, r in rows.items() if r["scored"]}
    if len(scored) < 2:
        return None
    hi = max(scored, key=lambda g: scored[g]["auroc"])
    lo = min(scored, key=lambda g: scored[g]["auroc"])
    ci = M.percentile_ci(boot[hi] - boot[lo], level)
    return {"highest": hi, "lowest": lo, "gap": scored[hi]["auroc"] - scored[lo]["auroc"],
            "ci_low": ci[0], "ci_high": ci[1], "metric": "auroc"}


def subgroup_table(frame: pd.DataFrame, y, prob, patient_ids, columns: Sequence[str], *, n_boot: int = 1000,
                   seed: int = 0, level: float = 0.95, min_count: int = 20, n_bins: int = 10) -> dict:
    """Per column and group: count, prevalence, AUROC with patient-bootstrap CI, ECE; and per column the
    largest AUROC gap between scored groups with its CI (both groups on the same resamples).

    frame: one row per study (row-aligned with y/prob), holding the group columns (use `age_bands`,
    `modality_pattern`, `labs_pattern` to add derived ones). A column not in `frame` is an error naming it.
    """
    _require_columns(frame, columns)
    y = _check_binary(y, prob)
    prob = _check_probabilities(prob)
    _check_ids(patient_ids, y)
    if len(frame) != y.size:
        raise RadalignError(f"subgroup frame has {len(frame)} rows for {y.size} predictions; "
                            "align them by study")
    out = {"unit": M.UNIT, "metric": "auroc", "n_boot": n_boot, "seed": seed, "level": level,
           "min_count": min_count, "bins": n_bins, "grouping": "pandas groupby", "columns": {}}
    for col in columns:
        labels = _group_labels(frame, col)
        groups = sorted(pd.unique(labels), key=_group_order)
        boot = _group_boot(y, prob, labels, groups, patient_ids, n_boot, seed)
        rows = {g: _score_group(y[labels == g], prob[labels == g], boot[g], min_count, n_bins, level)
                for g in groups}
        out["columns"][col] = {"groups": rows, "largest_gap": _largest_gap(rows, boot, level)}
    return out


def cross_table(frame: pd.DataFrame, y, prob, row: str, col: str, *, min_count: int = 20) -> dict:
    """Subgroup x missingness pattern: per cell n, positives and AUROC, or the reason it is not scored."""
    _require_columns(frame, [row, col])
    y = _check_binary(y, prob)
    prob = _check_probabilities(prob)
    rl, cl = _group_labels(frame, row), _group_labels(frame, col)
    rows, cols = sorted(set(rl), key=_group_order), sorted(set(cl), key=_group_order)
    cells: dict[str, dict[str, dict]] = {}
    for r in rows:
        cells[r] = {}
        for c in cols:
            m = (rl == r) & (cl == c)
            cell = _score_group(y[m], prob[m], np.full(0, np.nan), min_count, 10, 0.95)
            cells[r][c] = {k: cell[k] for k in ("n", "n_positive", "prevalence", "scored", "reason", "auroc")}
    return {"rows": row, "columns": col, "row_values": rows, "column_values": cols, "min_count": min_count,
            "cells": cells}


# ----------------------------------------------------------------------------------------------------------
# Graceful degradation


def degradation_table(y, patient_ids, models: Mapping[str, Mapping[str, Sequence[float]]], *,
                      seeds: Mapping[str, Sequence[Mapping[str, Sequence[float]]]] | None = None,
                      full: str = "all", n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """AUROC with each modality removed at test time, per model (e.g. trained with/without modality dropout).

    models: {model: {condition: scores}}, condition `full` (every modality present) or the removed modality.
    Per condition and model: AUROC with CI and the paired drop from `full`; and when there are two models, the
    paired difference first - second per condition (same resamples).
    seeds: {model: [{condition: scores}, ...]}, the same models trained with other seeds (the first entry
    normally `models[model]` itself). Then each row also holds, per model, `over_seeds`: the AUROC and drop of
    every seed with their mean and standard deviation, and `mean_drop_difference` (first - second model):
    training noise moves one run's drop about as much as dropout does, so compare these means.
    """
    names = list(models)
    conds = list(models[names[0]]) if names else []
    for m in names:
        if list(models[m]) != conds or full not in conds:
            raise RadalignError(f"degradation: model {m!r} has conditions {list(models[m])}; every model "
                                f"needs the same ones, including {full!r} (every modality present)")
    seeds = dict(seeds or {})
    if seeds and (sorted(seeds) != sorted(names) or any(list(r) != conds for m in names for r in seeds[m])):
        raise RadalignError(f"degradation seeds: need every model ({', '.join(names)}) with the conditions "
                            f"{conds} for each seed")
    y = _check_binary(y, *(s for m in names for s in models[m].values()),
                      *(s for m in seeds for r in seeds[m] for s in r.values()))
    _check_ids(patient_ids, y)
    kw = dict(n_boot=n_boot, seed=seed, level=level)
    rows = []
    for c in conds:
        row = {"removed": None if c == full else c}
        for m in names:
            row[m] = M.bootstrap_ci("auroc", y, models[m][c], patient_ids, **kw)
            if c != full:
                row[m]["drop"] = M.paired_difference("auroc", y, models[m][full], models[m][c], patient_ids,
                                                     **kw)
            if seeds:
                row[m]["over_seeds"] = _over_seeds(y, seeds[m], c, full)
        if len(names) == 2:
            row["difference"] = M.paired_difference("auroc", y, models[names[0]][c], models[names[1]][c],
                                                    patient_ids, **kw)
            if seeds and c != full:
                a, b = (row[m]["over_seeds"]["drop_mean"] for m in names)
                row["mean_drop_difference"] = a - b
        rows.append(row)
    out = {"unit": M.UNIT, "metric": "auroc", "models": names, "full": full, "rows": rows, **kw}
    if seeds:
        out["n_seeds"] = len(seeds[names[0]])
    return out


def _over_seeds(y, runs: Sequence[Mapping[str, Sequence[float]]], c: str, full: str) -> dict:
    """AUROC (and drop from `full`) of each training seed's scores on condition c, with mean and sd."""
    au = [M.auroc(y, np.asarray(r[c], float)) for r in runs]
    out = {"auroc": au, "mean": float(np.mean(au)), "sd": float(np.std(au, ddof=1)) if len(au) > 1 else 0.0}
    if c != full:
        drops = [M.auroc(y, np.asarray(r[full], float)) - a for r, a in zip(runs, au)]
        out.update(drop=drops, drop_mean=float(np.mean(drops)),
                   drop_sd=float(np.std(drops, ddof=1)) if len(drops) > 1 else 0.0)
    return out


# ----------------------------------------------------------------------------------------------------------
# Markdown report


def _f(v, spec: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _ci(d: Mapping, key: str = "value") -> str:
    return f"{_f(d.get(key))} ({_f(d.get('ci_low'))} to {_f(d.get('ci_high'))})"


def _md_binary(res: Mapping) -> list[str]:
    pct = round(100 * res["level"])
    lines = ["## Discrimination", "", f"{res['n_rows']} studies of {res['n_patients']} patients, "
             f"{res['n_positive']} positive (prevalence {_f(res['prevalence'])}); {res['n_rows_unlabelled']} "
             f"unlabelled left out. {pct}% intervals: percentile bootstrap over patients ({res['n_boot']} "
             f"resamples, seed {res['seed']}).", "", f"| metric | value ({pct}% CI) |", "|---|---|"]
    lines += [f"| {md_text(k)} | {_ci(v)} |" for k, v in res["metrics"].items()]
    if res["paired_differences"]:
        lines += ["", "### Paired differences (this model - baseline, same patient resamples)", "",
                  "| baseline | metric | delta (CI) | p |", "|---|---|---|---|"]
        for base, per in res["paired_differences"].items():
            lines += [f"| {md_text(base)} | {md_text(m)} | {_ci(d, 'delta')} | {_f(d.get('p_value'))} |"
                      for m, d in per.items()]
    return lines + [""] + _md_operating(res.get("operating_point"))


def _md_operating(op: Mapping | None) -> list[str]:
    if op is None:
        return ["No validation data given: no decision threshold reported.", ""]
    rule = RULES.get(op["rule"], op["rule"]) + (f" >= {op['target']}" if op.get("target") is not None else "")
    lines = ["### Decision threshold", "", f"Chosen on validation ({op['n_validation']} studies, "
             f"{op['n_validation_positive']} positive) by {md_text(rule)}, never on test."]
    t = op.get("test")
    if t is None:
        return lines + [md_text(op.get("note", "no threshold")), ""]
    return lines + ["", f"Threshold {_f(op['threshold'], '.4f')}: test sensitivity {_f(t['sensitivity'])}, "
                    f"specificity {_f(t['specificity'])}, precision {_f(t['precision'])}, NPV {_f(t['npv'])} "
                    f"(TP {t['tp']}, FP {t['fp']}, FN {t['fn']}, TN {t['tn']}).", ""]


def _md_calibration(cal: Mapping) -> list[str]:
    return ["## Calibration", "", f"Expected calibration error over {cal['bins']} equal-mass bins, Brier "
            f"score; temperature scaling fitted on validation (T = {_f(cal['temperature'])}).", "",
            "| | before | after temperature |", "|---|---|---|",
            f"| ECE (test) | {_f(cal['ece_before'])} | {_f(cal['ece_after'])} |",
            f"| Brier (test) | {_f(cal['brier_before'])} | {_f(cal['brier_after'])} |",
            f"| ECE (validation) | {_f(cal.get('validation_ece_before'))} | "
            f"{_f(cal.get('validation_ece_after'))} |", ""]


def _md_subgroups(sub: Mapping) -> list[str]:
    pct = round(100 * sub["level"])
    lines = ["## Subgroups and missingness patterns", "", f"AUROC with {pct}% patient-bootstrap intervals "
             f"({sub['n_boot']} resamples, seed {sub['seed']}); ECE over {sub['bins']} equal-mass bins; "
             f"groups with fewer than {sub['min_count']} labelled studies or one class only are counted, "
             "not scored.", ""]
    for col, block in sub["columns"].items():
        lines += [f"### {md_text(col)}", "", "| group | n | positive | prevalence | AUROC (CI) | ECE |",
                  "|---|---|---|---|---|---|"]
        for g, r in block["groups"].items():
            score = (f"{_ci(r, 'auroc')} | {_f(r['ece'])}" if r["scored"]
                     else f"not scored: {md_text(r['reason'])} |")
            lines.append(f"| {md_text(g)} | {r['n']} | {r['n_positive']} | {_f(r['prevalence'])} | {score} |")
        gap = block["largest_gap"]
        lines += ["", (f"Largest gap: {md_text(gap['highest'])} - {md_text(gap['lowest'])} = "
                       f"{_ci(gap, 'gap')}." if gap else "Largest gap: fewer than two scored groups."), ""]
    return lines


def _md_cross(cross: Mapping) -> list[str]:
    cols = cross["column_values"]
    lines = [f"### {md_text(cross['rows'])} x {md_text(cross['columns'])}", "",
             f"AUROC per cell (n, positives); cells with fewer than {cross['min_count']} studies or one "
             "class are not scored.", "",
             "| " + " | ".join([md_text(cross["rows"])] + [md_text(c) for c in cols]) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for r in cross["row_values"]:
        cells = [cross["cells"][r][c] for c in cols]
        text = [f"{_f(x['auroc'])} ({x['n']}, {x['n_positive']})" if x["scored"]
                else f"({x['n']}, {x['n_positive']}) not scored" for x in cells]
        lines.append("| " + " | ".join([md_text(r)] + text) + " |")
    return lines + [""]


def _md_degradation(deg: Mapping) -> list[str]:
    names = deg["models"]
    two = len(names) == 2
    lines = ["## Graceful degradation", "", "AUROC (patient-bootstrap CI) with each modality removed at test "
             "time; drop = paired difference from all modalities present.", "",
             "| removed | " + " | ".join(f"{md_text(m)} | drop" for m in names)
             + (" | difference |" if two else " |"),
             "|---" * (1 + 2 * len(names) + two) + "|"]
    for row in deg["rows"]:
        cells = [md_text(row["removed"] or "nothing")]
        for m in names:
            cells += [_ci(row[m]), _ci(row[m]["drop"], "delta") if "drop" in row[m] else "-"]
        if "difference" in row:
            cells.append(_ci(row["difference"], "delta"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""] + _md_degradation_seeds(deg)


def _md_degradation_seeds(deg: Mapping) -> list[str]:
    names, n = deg["models"], deg.get("n_seeds")
    if not n:
        return []
    two = len(names) == 2
    lines = [f"Over {n} training seeds (the table above is the first): mean AUROC (sd) and mean drop (sd); "
             "the same test studies, so the spread is training noise only.", "",
             "| removed | " + " | ".join(f"{md_text(m)} | drop" for m in names)
             + (" | drop difference |" if two else " |"), "|---" * (1 + 2 * len(names) + two) + "|"]
    for row in deg["rows"]:
        cells = [md_text(row["removed"] or "nothing")]
        for m in names:
            s = row[m]["over_seeds"]
            cells += [f"{_f(s['mean'])} ({_f(s['sd'])})",
                      f"{_f(s['drop_mean'], '+.3f')} ({_f(s['drop_sd'])})" if "drop_mean" in s else "-"]
        if two:
            cells.append(_f(row["mean_drop_difference"], "+.3f") if "mean_drop_difference" in row else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def format_report(*, title: str = "Clinical evaluation", binary: Mapping | None = None,
                  calibration: Mapping | None = None, subgroups: Mapping | None = None,
                  cross: Sequence[Mapping] = (), degradation: Mapping | None = None,
                  plots: Sequence[str] = ()) -> str:
    """The Markdown report of whichever sections are given (every text escaped)."""
    lines = [f"# {md_text(title)}", "", "Unit of every interval: the patient (all studies of a patient "
             "resampled together). Thresholds and the temperature are fitted on validation only.", ""]
    if binary:
        lines += _md_binary(binary)
    if calibration:
        lines += _md_calibration(calibration)
    if subgroups:
        lines += _md_subgroups(subgroups)
    for c in cross:
        lines += _md_cross(c)
    if degradation:
        lines += _md_degradation(degradation)
    lines += [f"![{md_text(p)}]({md_text(p)})" for p in plots]
    return "\n".join(lines).rstrip() + "\n"


def write_report(path: str | os.PathLike, **sections) -> str:
    """format_report(**sections) written atomically to `path`; returns the text."""
    text = format_report(**sections)
    atomic_write_text(path, text)
    return text


# ----------------------------------------------------------------------------------------------------------
# From predictions tables to an evaluation folder (what `radalign finetune eval` writes)


SCORE_PREFIX = "score:"  # predictions.csv: one probability column per model, `score:<model>`
LOGIT_PREFIX = "logit:"  # optional: the model's logits (used for temperature scaling when present)


def _column(frame: pd.DataFrame, name: str, split: str) -> np.ndarray:
    if name not in frame.columns:
        raise RadalignError(f"{split} predictions have no column {name!r}; available: "
                            f"{', '.join(map(str, frame.columns))}")
    return frame[name].to_numpy()


def _logits(frame: pd.DataFrame, model: str, split: str) -> np.ndarray:
    if f"{LOGIT_PREFIX}{model}" in frame.columns:
        return frame[f"{LOGIT_PREFIX}{model}"].to_numpy(dtype=np.float64)
    return to_logit(_column(frame, f"{SCORE_PREFIX}{model}", split).astype(np.float64))


def _aligned_groups(groups: pd.DataFrame, study_ids) -> pd.DataFrame:
    """The group table's rows in the order of `study_ids` (every study must be there, once)."""
    _require_columns(groups, ["study_id"], what="group table column")
    keyed = groups.assign(_key=groups["study_id"].astype(str))
    dup = int(keyed["_key"].duplicated().sum())
    if dup:
        raise RadalignError(f"group table: {dup} duplicated study_id(s); one row per study")
    keys = pd.Series(study_ids).astype(str)
    missing = int((~keys.isin(keyed["_key"])).sum())
    if missing:
        raise RadalignError(f"group table lacks {missing} of the {len(keys)} evaluated studies (e.g. study "
                            f"{keys[~keys.isin(keyed['_key'])].iloc[0]}); pass the table of the same split")
    return keyed.set_index("_key").loc[keys].reset_index(drop=True)


def evaluate_predictions(test: pd.DataFrame, val: pd.DataFrame, *, model: str = "fusion",
                         groups: pd.DataFrame | None = None,
                         subgroup_columns: Sequence[str] = SUBGROUPS + MISSINGNESS,
                         cross: Sequence[tuple[str, str]] | None = None, degradation: Mapping | None = None,
                         degradation_seeds: Mapping | None = None, threshold_rule: str = "youden",
                         threshold_target: float | None = None,
                         n_boot: int = 1000, seed: int = 0, level: float = 0.95, min_count: int = 20,
                         n_bins: int = 10) -> dict:
    """Everything of the evaluation from predictions tables (the predictions.csv layout: subject_id, study_id,
    label, `score:<model>` probabilities, optional `logit:<model>`), test and validation.

    Baselines: every other `score:` column (paired differences). Thresholds and temperature: from `val`.
    groups: one row per test study (`study_id` plus the group columns, e.g. the EHR table with
    `add_group_columns`); cross: (subgroup, missingness) column pairs, default every subgroup x `modalities`.
    degradation: {model: {condition: scores}} and degradation_seeds: {model: [{condition: scores}] per seed},
    as for `degradation_table`, passed through.
    """
    y, pid = _column(test, "label", "test").astype(np.float64), _column(test, "subject_id", "test")
    score = _column(test, f"{SCORE_PREFIX}{model}", "test").astype(np.float64)
    y_val = _column(val, "label", "validation").astype(np.float64)
    s_val = _column(val, f"{SCORE_PREFIX}{model}", "validation").astype(np.float64)
    baselines = {c[len(SCORE_PREFIX):]: test[c].to_numpy(dtype=np.float64) for c in test.columns
                 if c.startswith(SCORE_PREFIX) and c != f"{SCORE_PREFIX}{model}"}
    kw = dict(n_boot=n_boot, seed=seed, level=level)
    out = {"model": model, "unit": M.UNIT, "thresholds_and_temperature_fitted_on": "validation",
           "discrimination": evaluate_binary(y, score, pid, val=(y_val, s_val), baselines=baselines,
                                             threshold_rule=threshold_rule, threshold_target=threshold_target,
                                             **kw),
           "calibration": calibration_report(y, _logits(test, model, "test"), y_val,
                                             _logits(val, model, "validation"), n_bins)}
    if groups is not None:
        frame = _aligned_groups(groups, _column(test, "study_id", "test"))
        out["subgroups"] = subgroup_table(frame, y, score, pid, subgroup_columns, min_count=min_count,
                                          n_bins=n_bins, **kw)
        if cross is None:
            cross = [(c, "modalities") for c in subgroup_columns if c in SUBGROUPS and "modalities" in frame]
        out["subgroup_x_missingness"] = [cross_table(frame, y, score, r, c, min_count=min_count)
                                         for r, c in cross]
    if degradation is not None:
        out["degradation"] = degradation_table(y, pid, degradation, seeds=degradation_seeds, **kw)
    return out


def write_evaluation(out_dir: str | os.PathLike, result: Mapping, *,
                     title: str = "Clinical evaluation") -> dict[str, str]:
    """metrics.json, report.md, reliability.png (and subgroups.png) in `out_dir`, under its exclusive lock."""
    out = Path(out_dir)
    with output_lock(out):
        cal = result["calibration"]
        files = {"metrics": out / "metrics.json", "report": out / "report.md",
                 "reliability": out / "reliability.png"}
        curves = {"before": cal["reliability_before"],
                  f"after (T = {cal['temperature']:.2f})": cal["reliability_after"]}
        reliability_diagram(files["reliability"], curves, title=f"{result.get('model', '')} (test split)")
        plots = ["reliability.png"]
        if "subgroups" in result:
            files["subgroups"] = out / "subgroups.png"
            subgroup_plot(files["subgroups"], result["subgroups"])
            plots.append("subgroups.png")
        atomic_write_json(files["metrics"], result)
        write_report(files["report"], title=title, binary=result["discrimination"], calibration=cal,
                     subgroups=result.get("subgroups"), cross=result.get("subgroup_x_missingness", ()),
                     degradation=result.get("degradation"), plots=plots)
    return {k: str(v) for k, v in files.items()}


__all__ = ["TARGET", "SUBGROUPS", "MISSINGNESS", "sensitivity_at_specificity", "specificity_at_sensitivity",
           "choose_operating_point", "apply_operating_point", "evaluate_binary", "calibration_bins",
           "expected_calibration_error", "brier_score", "to_logit", "sigmoid", "fit_temperature",
           "calibration_report", "reliability_diagram", "subgroup_plot", "age_bands", "modality_pattern",
           "labs_pattern", "add_group_columns", "subgroup_table", "cross_table", "degradation_table",
           "md_text", "format_report", "write_report", "SCORE_PREFIX", "LOGIT_PREFIX", "evaluate_predictions",
           "write_evaluation"]

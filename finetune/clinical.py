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

Statistics (radalign/metrics.py is the one definition of AUROC, AUPRC, ROC points, the patient bootstrap,
thresholds and calibration; this module assembles them into the clinical report's sections):
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

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from radalign import RadalignError
from radalign import metrics as M
from radalign import report as R
from radalign.io import atomic_write_text
from radalign.lock import output_lock
from radalign.metrics import (  # the computations live in radalign.metrics; these names stay importable here
    apply_operating_point,
    brier_score,
    calibration_bins,
    choose_operating_point,
    expected_calibration_error,
    fit_temperature,
    sensitivity_at_specificity,
    sigmoid,
    specificity_at_sensitivity,
    to_logit,
)

TARGET = 0.9  # the 90% of "sensitivity at 90% specificity"
UNKNOWN = "unknown"
AGE_EDGES = (40, 65, 80)  # age bands <40, 40-64, 65-79, 80+
SUBGROUPS = ("gender", "age_band", "race", "insurance")  # sex is `gender` in the EHR table
MISSINGNESS = ("modalities", "labs")  # columns made by add_group_columns


METRICS = {
    "auroc": "auroc",
    "auprc": "auprc",
    "sensitivity_at_90_specificity": sensitivity_at_specificity,  # target 0.9 = TARGET
    "specificity_at_90_sensitivity": specificity_at_sensitivity,
}
PAIRED = ("auroc", "auprc")
RULES = M.RULES


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


def subgroup_plot(path: str | os.PathLike, subgroups: Mapping) -> None:
    """PNG: AUROC with its interval per scored group (one block per column); unscored groups are left out
    of the plot (the report lists them with their reason)."""
    rows = [(f"{col}: {g}", r) for col, block in subgroups["columns"].items()
            for g, r in block["groups"].items() if r["scored"]]
    R.interval_plot(path, rows, f"AUROC ({round(100 * subgroups['level'])}% CI over patients)")


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
# Every model of a run, and the reference model minus each (training's report and `finetune eval`)


MODEL_ORDER = ("fusion", "fusion_no_dropout", "image_only", "ehr_only", "text_only", "late_fusion",
               "early_fusion", "gbdt")


def ordered(names) -> list[str]:
    """Model names in report order: MODEL_ORDER first, then any other name alphabetically."""
    return sorted(names, key=lambda n: (MODEL_ORDER.index(n) if n in MODEL_ORDER else len(MODEL_ORDER), n))


def model_metrics(y, scores: Mapping[str, np.ndarray], patients, *, n_boot: int, seed: int,
                  level: float = 0.95) -> dict:
    """{model: {auroc, ci_low, ci_high, auprc, auprc_ci_low, auprc_ci_high}}, every model on the same resamples."""
    out = {}
    for name in ordered(scores):
        a = M.bootstrap_ci("auroc", y, scores[name], patients, n_boot=n_boot, seed=seed, level=level)
        p = M.bootstrap_ci("auprc", y, scores[name], patients, n_boot=n_boot, seed=seed, level=level)
        out[name] = {"auroc": a["value"], "ci_low": a["ci_low"], "ci_high": a["ci_high"], "auprc": p["value"],
                     "auprc_ci_low": p["ci_low"], "auprc_ci_high": p["ci_high"]}
    return out


def paired_differences(y, scores: Mapping[str, np.ndarray], patients, *, ref: str = "fusion", n_boot: int,
                       seed: int, level: float = 0.95) -> dict:
    """{"<ref>_vs_<model>": {metric, delta, ci_low, ci_high, p_value}}: AUROC of `ref` minus each other model."""
    out = {}
    for name in ordered(scores):
        if name == ref:
            continue
        d = M.paired_difference("auroc", y, scores[ref], scores[name], patients, n_boot=n_boot, seed=seed,
                                level=level)
        out[f"{ref}_vs_{name}"] = {"metric": "auroc", "delta": d["delta"], "ci_low": d["ci_low"],
                                   "ci_high": d["ci_high"], "p_value": d["p_value"]}
    return out


# ----------------------------------------------------------------------------------------------------------
# metrics.json: one schema for the training run and `finetune eval` (docs/architecture.md, contracts)


METRICS_STAGE, METRICS_VERSION = "finetune", 2
_NUM, _OPT_DICT = (int, float), (dict, type(None))
METRICS_SCHEMA = {
    "required": {"format": str, "unit": str, "created": str, "task": str, "split": str, "n_boot": int,
                 "seed": int, "models": dict, "paired_differences": dict, "degradation": _OPT_DICT},
    "optional": {
        "level": _NUM,
        # the training run's sections
        "metric_note": str, "data": dict, "training": dict, "overlap": dict, "precision": str,
        "processes": int, "seconds": dict, "not_trained": dict,  # {model: why} (finetune.report.not_trained)
        # `finetune eval`'s sections
        "model": str, "thresholds_and_temperature_fitted_on": str, "discrimination": dict, "calibration": dict,
        "subgroups": dict, "subgroup_x_missingness": list, "run": dict,
        # every run: the best model on validation and its test lead (finetune.perclass.selection)
        "selection": dict, "train_patients": dict,
        # multilabel / multiclass runs: kind, the classes in logit order, sections not produced and why
        "kind": str, "classes": list, "skipped": dict},
}


def check_metrics(doc: Mapping, what: str = "finetune metrics.json") -> None:
    """RadalignError listing every way `doc` departs from METRICS_SCHEMA (a missing section, a wrong type, an
    unknown key)."""
    R.check_schema(doc, METRICS_SCHEMA, what=what)


def write_metrics(path: str | os.PathLike, doc: Mapping) -> dict:
    """RUN/metrics.json or EVAL/metrics.json: the format tag, unit and time added, checked against the schema,
    written atomically. Returns what was written."""
    head = {"format": R.metrics_format(METRICS_STAGE, METRICS_VERSION), "unit": M.UNIT, "created": ""}
    check_metrics({**head, **doc}, what=f"{path} (not written)")
    return R.write_metrics(path, doc, stage=METRICS_STAGE, unit=M.UNIT, version=METRICS_VERSION)


# ----------------------------------------------------------------------------------------------------------
# Markdown report: one section writer per result section, over the kit's tables and formats


def md_models(m: Mapping) -> list[str]:
    """The models table (and the paired differences) of a metrics.json; "best validation AUROC" when the
    document has its training section."""
    training = m.get("training")
    head = ["model", "AUROC [95% CI]", "AUPRC [95% CI]", *(["best validation AUROC"] if training else [])]
    rows = [[name, R.ci_of(r, "auroc"), R.ci(r["auprc"], r["auprc_ci_low"], r["auprc_ci_high"]),
             *([(training.get(name) or {}).get("best_val_auroc")] if training else [])]
            for name, r in m["models"].items()]
    lines = ["## Models", "", *R.md_table(head, rows)]
    ref = m.get("model", "fusion")
    if m["paired_differences"]:
        lines += ["", f"## Paired differences ({R.md(ref)} minus each model, AUROC)", ""]
        lines += R.md_table(["comparison", "delta [95% CI]", "CI above 0"],
                            [[name, R.ci_of(r, "delta", signed=True), r["ci_low"] is not None and r["ci_low"] > 0]
                             for name, r in m["paired_differences"].items()])
    return lines + [""]


def _md_binary(res: Mapping) -> list[str]:
    pct = round(100 * res["level"])
    lines = ["## Discrimination", "", f"{res['n_rows']} studies of {res['n_patients']} patients, "
             f"{res['n_positive']} positive (prevalence {R.num(res['prevalence'])}); {res['n_rows_unlabelled']} "
             f"unlabelled left out. {pct}% intervals: percentile bootstrap over patients ({res['n_boot']} "
             f"resamples, seed {res['seed']}).", ""]
    lines += R.md_table(["metric", f"value [{pct}% CI]"], [[k, R.ci_of(v)] for k, v in res["metrics"].items()])
    if res["paired_differences"]:
        lines += ["", "### Paired differences (this model - baseline, same patient resamples)", ""]
        lines += R.md_table(["baseline", "metric", "delta [CI], p"],
                            [[base, m, R.delta_of(d)] for base, per in res["paired_differences"].items()
                             for m, d in per.items()])
    return lines + [""] + _md_operating(res.get("operating_point"))


def _md_operating(op: Mapping | None) -> list[str]:
    if op is None:
        return ["No validation data given: no decision threshold reported.", ""]
    rule = RULES.get(op["rule"], op["rule"]) + (f" >= {op['target']}" if op.get("target") is not None else "")
    lines = ["### Decision threshold", "", f"Chosen on validation ({op['n_validation']} studies, "
             f"{op['n_validation_positive']} positive) by {R.md(rule)}, never on test."]
    t = op.get("test")
    if t is None:
        return lines + [R.md(op.get("note", "no threshold")), ""]
    return lines + ["", f"Threshold {R.num(op['threshold'], 4)}: test sensitivity {R.num(t['sensitivity'])}, "
                    f"specificity {R.num(t['specificity'])}, precision {R.num(t['precision'])}, NPV "
                    f"{R.num(t['npv'])} (TP {t['tp']}, FP {t['fp']}, FN {t['fn']}, TN {t['tn']}).", ""]


def _md_calibration(cal: Mapping) -> list[str]:
    return ["## Calibration", "", f"Expected calibration error over {cal['bins']} equal-mass bins, Brier "
            f"score; temperature scaling fitted on validation (T = {R.num(cal['temperature'])}).", "",
            *R.md_table(["", "before", "after temperature"],
                        [["ECE (test)", cal["ece_before"], cal["ece_after"]],
                         ["Brier (test)", cal["brier_before"], cal["brier_after"]],
                         ["ECE (validation)", cal.get("validation_ece_before"), cal.get("validation_ece_after")]]),
            ""]


def _md_subgroups(sub: Mapping) -> list[str]:
    pct = round(100 * sub["level"])
    lines = ["## Subgroups and missingness patterns", "", f"AUROC with {pct}% patient-bootstrap intervals "
             f"({sub['n_boot']} resamples, seed {sub['seed']}); ECE over {sub['bins']} equal-mass bins; "
             f"groups with fewer than {sub['min_count']} labelled studies or one class only are counted, "
             "not scored.", ""]
    for col, block in sub["columns"].items():
        rows = [[g, r["n"], r["n_positive"], r["prevalence"],
                 *([R.ci_of(r, "auroc"), r["ece"]] if r["scored"] else [f"not scored: {r['reason']}", None])]
                for g, r in block["groups"].items()]
        lines += [f"### {R.md(col)}", "", *R.md_table(["group", "n", "positive", "prevalence", "AUROC [CI]", "ECE"],
                                                      rows)]
        gap = block["largest_gap"]
        lines += ["", (f"Largest gap: {R.md(gap['highest'])} - {R.md(gap['lowest'])} = "
                       f"{R.ci_of(gap, 'gap')}." if gap else "Largest gap: fewer than two scored groups."), ""]
    return lines


def _md_cross(cross: Mapping) -> list[str]:
    cols = cross["column_values"]

    def cell(x: Mapping) -> R.Md:
        counts = f"({x['n']}, {x['n_positive']})"
        return R.Md(f"{R.num(x['auroc'])} {counts}" if x["scored"] else f"{counts} not scored")

    rows = [[r, *(cell(cross["cells"][r][c]) for c in cols)] for r in cross["row_values"]]
    return [f"### {R.md(cross['rows'])} x {R.md(cross['columns'])}", "",
            f"AUROC per cell (n, positives); cells with fewer than {cross['min_count']} studies or one "
            "class are not scored.", "", *R.md_table([cross["rows"], *cols], rows), ""]


def _degradation_header(names: Sequence[str], last: str) -> list:
    return ["removed", *(h for m in names for h in (m, "drop")), *([last] if len(names) == 2 else [])]


def md_degradation(deg: Mapping) -> list[str]:
    names = deg["models"]
    rows = []
    for row in deg["rows"]:
        cells = [row["removed"] or "nothing"]
        for m in names:
            cells += [R.ci_of(row[m]), R.ci_of(row[m]["drop"], "delta", signed=True) if "drop" in row[m] else None]
        if len(names) == 2:
            cells.append(R.ci_of(row.get("difference"), "delta", signed=True))
        rows.append(cells)
    return ["## Graceful degradation", "", "AUROC [patient-bootstrap CI] with each modality removed at test "
            "time; drop = paired difference from all modalities present.", "",
            *R.md_table(_degradation_header(names, "difference"), rows), "", *md_degradation_seeds(deg)]


def md_degradation_seeds(deg: Mapping) -> list[str]:
    names, n = deg["models"], deg.get("n_seeds")
    if not n:  # said, because one training run's drops also vary with the training seed
        return ["One training seed (baselines.degradation_seeds=1): a single run's drops also vary with the "
                "training seed; raise it, or run bench/degradation.py (5 seeds)."]
    rows = []
    for row in deg["rows"]:
        cells = [row["removed"] or "nothing"]
        for m in names:
            s = row[m]["over_seeds"]
            cells += [R.Md(f"{R.num(s['mean'])} ({R.num(s['sd'])})"),
                      R.Md(f"{R.num(s['drop_mean'], signed=True)} ({R.num(s['drop_sd'])})") if "drop_mean" in s
                      else None]
        if len(names) == 2:
            cells.append(R.num(row.get("mean_drop_difference"), signed=True))
        rows.append(cells)
    return [f"Over {n} training seeds (the table above is the first): mean AUROC (sd) and mean drop (sd); "
            "the same test studies, so the spread is training noise only.", "",
            *R.md_table(_degradation_header(names, "drop difference"), rows), ""]


def format_report(*, title: str = "Clinical evaluation", models: Mapping | None = None,
                  binary: Mapping | None = None, calibration: Mapping | None = None,
                  subgroups: Mapping | None = None, cross: Sequence[Mapping] = (),
                  degradation: Mapping | None = None, plots: Sequence[str] = ()) -> str:
    """The Markdown report of whichever sections are given (every text escaped). models: a document with
    "models" and "paired_differences" (a metrics.json)."""
    lines = [f"# {R.md(title)}", "", "Unit of every interval: the patient (all studies of a patient "
             "resampled together). Thresholds and the temperature are fitted on validation only.", ""]
    if models:
        lines += md_models(models)
    if binary:
        lines += _md_binary(binary)
    if calibration:
        lines += _md_calibration(calibration)
    if subgroups:
        lines += _md_subgroups(subgroups)
    for c in cross:
        lines += _md_cross(c)
    if degradation:
        lines += md_degradation(degradation)
    lines += [f"![{R.md(p)}]({R.md(p)})" for p in plots]
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
                         n_bins: int = 10, task: str = "unnamed task", split: str = "test") -> dict:
    """Everything of the evaluation from predictions tables (the predictions.csv layout: subject_id, study_id,
    label, `score:<model>` probabilities, optional `logit:<model>`), test and validation, as a document of the
    run's metrics.json schema (METRICS_SCHEMA; task and split may also come from a "run" section added later).

    `models` and `paired_differences` are the training report's sections (labelled rows, `model` minus each
    other model), so `finetune eval` on the test split repeats training's numbers.
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
    lab, everyone = ~np.isnan(y), {model: score, **baselines}
    labelled = {k: v[lab] for k, v in everyone.items()}
    out = {"task": task, "split": split, **kw,
           "models": model_metrics(y[lab], labelled, pid[lab], **kw),
           "paired_differences": paired_differences(y[lab], labelled, pid[lab], ref=model, **kw),
           "degradation": None, "model": model, "thresholds_and_temperature_fitted_on": "validation",
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
        R.reliability_plot(files["reliability"], curves, title=f"{result.get('model', '')} (test split)")
        plots = ["reliability.png"]
        if "subgroups" in result:
            files["subgroups"] = out / "subgroups.png"
            subgroup_plot(files["subgroups"], result["subgroups"])
            plots.append("subgroups.png")
        run = result.get("run") or {}
        doc = {**result, "task": run.get("task", result["task"]), "split": run.get("split", result["split"])}
        write_metrics(files["metrics"], {k: v for k, v in doc.items() if k != "files"})
        write_report(files["report"], title=title, models=result, binary=result["discrimination"],
                     calibration=cal, subgroups=result.get("subgroups"),
                     cross=result.get("subgroup_x_missingness", ()), degradation=result.get("degradation"),
                     plots=plots)
    return {k: str(v) for k, v in files.items()}


__all__ = ["TARGET", "SUBGROUPS", "MISSINGNESS", "sensitivity_at_specificity", "specificity_at_sensitivity",
           "choose_operating_point", "apply_operating_point", "evaluate_binary", "calibration_bins",
           "expected_calibration_error", "brier_score", "to_logit", "sigmoid", "fit_temperature",
           "calibration_report", "subgroup_plot", "age_bands", "modality_pattern", "labs_pattern",
           "add_group_columns", "subgroup_table", "cross_table", "degradation_table", "MODEL_ORDER", "ordered",
           "model_metrics", "paired_differences", "md_models", "md_degradation", "METRICS_SCHEMA", "check_metrics", "write_metrics",
           "format_report", "write_report", "SCORE_PREFIX", "LOGIT_PREFIX", "evaluate_predictions",
           "write_evaluation"]

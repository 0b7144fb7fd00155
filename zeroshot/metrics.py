"""Zero-shot tables on top of the shared statistics (`radalign.metrics`, which owns the per-class AUROC table
with patient-level bootstrap CIs and macro means, `auroc_table`): multi-class accuracy, thresholds chosen on
validation, prompt sensitivity.

Labels are float arrays with NaN for "excluded from this class's metric" (uncertain/blank under the default
policy): excluded rows are never scored, not even as negatives. One bootstrap draws PATIENTS (all images of a
patient move together, `radalign.metrics.patient_weights`); every class (and the macro mean) is scored on the
same resamples, so the macro interval reflects the correlation between classes. Without patient ids each image
is its own unit, and the tables say so (`unit`).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from radalign import metrics as rm


def multiclass_table(probs: np.ndarray, y: np.ndarray, names: list[str], *, n_boot: int = 1000,
                     seed: int = 0, level: float = 0.95, patient_ids=None) -> dict:
    """Accuracy and balanced accuracy (with patient-level bootstrap CIs) for a single-label set.

    probs [N, C] (rows sum to 1); y [N] class indices; patient_ids [N] (None: each image its own unit).
    """
    units, unit = rm.bootstrap_units(patient_ids, len(y))
    pred = probs.argmax(axis=1)
    correct = (pred == y).astype(float)
    onehot = (y[:, None] == np.arange(len(names))[None, :]).astype(float)  # [N, C]
    accs, baccs = [], []
    for counts in rm.patient_weights(units, n_boot, seed):  # [b, N]
        accs.append((counts * correct).sum(1) / counts.sum(1))
        per_cls_w = counts @ onehot  # [b, C] weight of each true class
        hits = counts @ (onehot * correct[:, None])  # [b, C] correctly classified weight per class
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(per_cls_w > 0, hits / per_cls_w, np.nan)
        baccs.append(np.nanmean(recall, axis=1))
    acc_ci = rm.percentile_ci(np.concatenate(accs), level)
    bacc_ci = rm.percentile_ci(np.concatenate(baccs), level)
    return {
        "accuracy": {"value": float(correct.mean()), "ci_low": acc_ci[0], "ci_high": acc_ci[1]},
        "balanced_accuracy": {"value": float(balanced_accuracy_score(y, pred)),
                              "ci_low": bacc_ci[0], "ci_high": bacc_ci[1]},
        "n": int(len(y)), "unit": unit, "n_units": len(set(units)), "n_boot": n_boot, "seed": seed, "level": level,
        "n_per_class": {n: int((y == i).sum()) for i, n in enumerate(names)},
        "confusion": _confusion(y, pred, names),
    }


def _confusion(y: np.ndarray, pred: np.ndarray, names: list[str]) -> dict:
    return {t: {p: int(((y == i) & (pred == j)).sum()) for j, p in enumerate(names)} for i, t in enumerate(names)}


def choose_thresholds(scores: np.ndarray, labels: np.ndarray, names: list[str], rule: str = "youden",
                      target: float | None = None) -> dict[str, float | None]:
    """Per-class threshold (`radalign.metrics.choose_threshold`, default max Youden J), on VALIDATION data only."""
    return {name: rm.choose_threshold(labels[:, j], scores[:, j], rule, target) for j, name in enumerate(names)}


def threshold_metrics(scores: np.ndarray, labels: np.ndarray, names: list[str],
                      thresholds: dict[str, float | None]) -> dict:
    """Per class: sensitivity, specificity, precision, F1, accuracy and the confusion counts at fixed
    (validation-chosen) thresholds (`radalign.metrics.threshold_metrics`); None for a class without one."""
    out = {}
    for j, name in enumerate(names):
        t = thresholds.get(name)
        scored = ~np.isnan(labels[:, j])
        out[name] = None if t is None or not scored.any() else rm.threshold_metrics(labels[:, j], scores[:, j], t)
    return out


def prompt_sensitivity(template_scores: list[list[np.ndarray]], labels: np.ndarray, names: list[str],
                       prompts: list[list[str]], ensemble_auroc: dict[str, float | None]) -> list[dict]:
    """One row per class: AUROC of each single template and their spread, beside the ensemble's AUROC."""
    rows = []
    for j, name in enumerate(names):
        m = ~np.isnan(labels[:, j])
        y = labels[m, j].astype(int)
        per = [rm.auroc_point(s[m], y) for s in template_scores[j]]
        vals = np.array([v for v in per if v is not None])
        rows.append({
            "class": name, "ensemble_auroc": ensemble_auroc.get(name),
            "templates": [{"prompt": p, "auroc": v} for p, v in zip(prompts[j], per)],
            "min": float(vals.min()) if vals.size else None, "max": float(vals.max()) if vals.size else None,
            "std": float(vals.std()) if vals.size else None,
        })
    return rows

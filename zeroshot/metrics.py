"""Zero-shot tables on top of the shared statistics (`radalign.metrics`): per-class AUROC with patient-level
bootstrap CIs, macro means, multi-class accuracy, thresholds chosen on validation.

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


def _units(patient_ids, n: int) -> tuple[list, str]:
    """The bootstrap units: the patients, or every image its own unit when ids are unknown."""
    if patient_ids is None:
        return list(range(n)), "image"
    if len(patient_ids) != n:
        raise ValueError(f"{len(patient_ids)} patient ids for {n} rows")
    return list(patient_ids), rm.UNIT


def _auroc_point(scores: np.ndarray, y: np.ndarray) -> float | None:
    return rm.auroc(y, scores) if 0 < y.sum() < y.size else None


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
        per_class[name] = {"auroc": _auroc_point(scores[m, j], y), "n_pos": int(y.sum()),
                           "n_neg": int((y == 0).sum()), "n_excluded": int((~m).sum())}
    units, unit = _units(patient_ids, n)
    row = 0
    for counts in rm.patient_weights(units, n_boot, seed):  # [b, N]
        for j, name in enumerate(names):
            if per_class[name]["auroc"] is None:
                continue
            # NaN (excluded) labels are dropped inside: never scored, whatever their patient's weight
            boot[row:row + len(counts), j] = rm.weighted_auroc(labels[:, j], scores[:, j], counts)
        row += len(counts)
    for j, name in enumerate(names):
        lo, hi = rm.percentile_ci(boot[:, j], level)
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
    lo, hi = rm.percentile_ci(sub[ok].mean(axis=1), level) if ok.any() else (None, None)
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


def multiclass_table(probs: np.ndarray, y: np.ndarray, names: list[str], *, n_boot: int = 1000,
                     seed: int = 0, level: float = 0.95, patient_ids=None) -> dict:
    """Accuracy and balanced accuracy (with patient-level bootstrap CIs) for a single-label set.

    probs [N, C] (rows sum to 1); y [N] class indices; patient_ids [N] (None: each image its own unit).
    """
    units, unit = _units(patient_ids, len(y))
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


def shuffled_label_control(scores: np.ndarray, labels: np.ndarray, names: list[str],
                           macro_classes: list[str], seed: int = 0) -> float | None:
    """Macro AUROC after permuting each class's included labels across rows (should be ~0.5)."""
    rng = np.random.default_rng(seed)
    aucs = []
    for name in macro_classes:
        j = names.index(name)
        m = ~np.isnan(labels[:, j])
        y = rng.permutation(labels[m, j].astype(int))
        if 0 < y.sum() < y.size:
            aucs.append(rm.auroc(y, scores[m, j]))
    return float(np.mean(aucs)) if aucs else None


def prompt_sensitivity(template_scores: list[list[np.ndarray]], labels: np.ndarray, names: list[str],
                       prompts: list[list[str]], ensemble_auroc: dict[str, float | None]) -> list[dict]:
    """One row per class: AUROC of each single template and their spread, beside the ensemble's AUROC."""
    rows = []
    for j, name in enumerate(names):
        m = ~np.isnan(labels[:, j])
        y = labels[m, j].astype(int)
        per = [_auroc_point(s[m], y) for s in template_scores[j]]
        vals = np.array([v for v in per if v is not None])
        rows.append({
            "class": name, "ensemble_auroc": ensemble_auroc.get(name),
            "templates": [{"prompt": p, "auroc": v} for p, v in zip(prompts[j], per)],
            "min": float(vals.min()) if vals.size else None, "max": float(vals.max()) if vals.size else None,
            "std": float(vals.std()) if vals.size else None,
        })
    return rows

"""Metrics with honest uncertainty: AUROC with seeded bootstrap CIs, macro means, multi-class accuracy.

Labels are float arrays with NaN for "excluded from this class's metric" (uncertain/blank under the default
policy). One bootstrap draws row indices over the whole evaluation set; every class (and the macro mean)
is scored on the same resamples, so the macro interval reflects the correlation between classes.

Why a hand-written AUROC for the bootstrap: sklearn's `roc_auc_score` per resample and class costs
B x C calls (14,000 for 1,000 resamples of CheXpert-14). A resample is the original data with integer
weights (how often each row was drawn), and the Mann-Whitney form of AUROC with weights is a few vectorised
sums over rows sorted once per class. Tests check it equals `roc_auc_score` on the resampled rows.
Point estimates use `roc_auc_score` itself.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score, roc_curve

# Rows x resamples per chunk of the count matrix: bounds memory (~160 MB of float64) for large sets.
_CHUNK_CELLS = 20_000_000


def resample_counts(n: int, n_boot: int, seed: int):
    """Yield [b, n] matrices: how often each row is drawn in each bootstrap resample (seeded, chunked).

    The chunk size depends only on `n`, so the same (n, n_boot, seed) always gives the same resamples.
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CHUNK_CELLS // max(n, 1)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        idx = rng.integers(0, n, size=(b, n))  # [b, n] drawn row indices
        flat = (idx + np.arange(b)[:, None] * n).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
        done += b


def weighted_auroc(scores: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of `scores` [n] for binary `y` [n] under row weights [B, n] -> [B] (NaN: one class only).

    Mann-Whitney: P(score_pos > score_neg) + 0.5 P(tie), each pair weighted by w_pos * w_neg.
    """
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first row of each tie group
    w = weights[:, order]  # [B, n]
    pos = y[order] == 1
    gp = np.add.reduceat(w * pos, starts, axis=1)  # [B, G] positive weight per tie group
    gn = np.add.reduceat(w * ~pos, starts, axis=1)  # [B, G] negative weight per tie group
    below = np.cumsum(gn, axis=1) - gn  # [B, G] negative weight strictly below each group
    num = (gp * (below + 0.5 * gn)).sum(axis=1)
    den = gp.sum(axis=1) * gn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _percentile_ci(values: np.ndarray, level: float) -> tuple[float | None, float | None]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None, None
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def _auroc_point(scores: np.ndarray, y: np.ndarray) -> float | None:
    return float(roc_auc_score(y, scores)) if 0 < y.sum() < y.size else None


def auroc_table(scores: np.ndarray, labels: np.ndarray, names: list[str], *, n_boot: int = 1000,
                seed: int = 0, level: float = 0.95, macro_classes: list[str] | None = None,
                min_per_label: int = 1) -> dict:
    """Per-class AUROC with bootstrap CIs and the macro mean (with its joint CI).

    scores [N, C]; labels [N, C] with 1/0 and NaN for excluded. Returns
    {"classes": {name: {auroc, ci_low, ci_high, n_pos, n_neg, n_excluded, skipped_resamples}},
     "macro": {auroc, ci_low, ci_high, classes, skipped_resamples, n_boot, seed, level},
     "macro_all": the same over every class}.
    A class with only one label value gets auroc None (and is left out of the macro, which says so). A class
    with fewer than `min_per_label` positives or negatives keeps its own AUROC and CI but is left out of the
    macro means (listed under `classes_too_few`): an AUROC from 86 positives and 1 negative is one number,
    not an estimate worth averaging.
    """
    n, c = scores.shape
    included = ~np.isnan(labels)  # [N, C]
    per_class, boot = {}, np.full((n_boot, c), np.nan)
    for j, name in enumerate(names):
        m = included[:, j]
        y = labels[m, j].astype(int)
        per_class[name] = {"auroc": _auroc_point(scores[m, j], y), "n_pos": int(y.sum()),
                           "n_neg": int((y == 0).sum()), "n_excluded": int((~m).sum())}
    row = 0
    for counts in resample_counts(n, n_boot, seed):  # [b, N]
        for j, name in enumerate(names):
            if per_class[name]["auroc"] is None:
                continue
            m = included[:, j]
            boot[row:row + len(counts), j] = weighted_auroc(scores[m, j], labels[m, j], counts[:, m])
        row += len(counts)
    for j, name in enumerate(names):
        lo, hi = _percentile_ci(boot[:, j], level)
        skipped = int(np.isnan(boot[:, j]).sum()) if per_class[name]["auroc"] is not None else n_boot
        per_class[name].update(ci_low=lo, ci_high=hi, skipped_resamples=skipped)
    out = {"classes": per_class}
    for key, wanted in (("macro", macro_classes or names), ("macro_all", names)):
        out[key] = _macro(per_class, boot, names, list(wanted), level, min_per_label)
        out[key].update(n_boot=n_boot, seed=seed, level=level, min_per_label=min_per_label)
    return out


def _macro(per_class: dict, boot: np.ndarray, names: list[str], wanted: list[str], level: float,
           min_per_label: int = 1) -> dict:
    missing = [w for w in wanted if per_class[w]["auroc"] is None]
    too_few = [w for w in wanted if per_class[w]["auroc"] is not None
               and min(per_class[w]["n_pos"], per_class[w]["n_neg"]) < min_per_label]
    usable = [w for w in wanted if w not in missing and w not in too_few]
    if not usable:
        return {"auroc": None, "ci_low": None, "ci_high": None, "classes": [], "classes_without_auroc": missing,
                "classes_too_few": too_few, "skipped_resamples": int(boot.shape[0])}
    cols = [names.index(w) for w in usable]
    sub = boot[:, cols]  # [B, K]
    ok = ~np.isnan(sub).any(axis=1)  # a resample counts only if every class in the macro has both labels
    lo, hi = _percentile_ci(sub[ok].mean(axis=1), level) if ok.any() else (None, None)
    return {"auroc": float(np.mean([per_class[w]["auroc"] for w in usable])), "ci_low": lo, "ci_high": hi,
            "classes": usable, "classes_without_auroc": missing, "classes_too_few": too_few,
            "skipped_resamples": int((~ok).sum())}


def multiclass_table(probs: np.ndarray, y: np.ndarray, names: list[str], *, n_boot: int = 1000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """Accuracy and balanced accuracy (with bootstrap CIs) and one-vs-rest AUROC for a single-label set.

    probs [N, C] (rows sum to 1); y [N] class indices.
    """
    pred = probs.argmax(axis=1)
    correct = (pred == y).astype(float)
    onehot = (y[:, None] == np.arange(len(names))[None, :]).astype(float)  # [N, C]
    accs, baccs = [], []
    for counts in resample_counts(len(y), n_boot, seed):  # [b, N]
        accs.append((counts * correct).sum(1) / counts.sum(1))
        per_cls_w = counts @ onehot  # [b, C] weight of each true class
        hits = counts @ (onehot * correct[:, None])  # [b, C] correctly classified weight per class
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(per_cls_w > 0, hits / per_cls_w, np.nan)
        baccs.append(np.nanmean(recall, axis=1))
    acc_ci = _percentile_ci(np.concatenate(accs), level)
    bacc_ci = _percentile_ci(np.concatenate(baccs), level)
    return {
        "accuracy": {"value": float(correct.mean()), "ci_low": acc_ci[0], "ci_high": acc_ci[1]},
        "balanced_accuracy": {"value": float(balanced_accuracy_score(y, pred)),
                              "ci_low": bacc_ci[0], "ci_high": bacc_ci[1]},
        "n": int(len(y)),
        "n_per_class": {n: int((y == i).sum()) for i, n in enumerate(names)},
        "confusion": _confusion(y, pred, names),
    }


def _confusion(y: np.ndarray, pred: np.ndarray, names: list[str]) -> dict:
    return {t: {p: int(((y == i) & (pred == j)).sum()) for j, p in enumerate(names)} for i, t in enumerate(names)}


def choose_thresholds(scores: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, float | None]:
    """Per-class threshold maximising Youden's J (sensitivity + specificity - 1), on VALIDATION data only."""
    out: dict[str, float | None] = {}
    for j, name in enumerate(names):
        m = ~np.isnan(labels[:, j])
        y = labels[m, j].astype(int)
        if not 0 < y.sum() < y.size:
            out[name] = None
            continue
        fpr, tpr, thr = roc_curve(y, scores[m, j])
        k = int(np.argmax(tpr - fpr))
        # roc_curve's first threshold is +inf ("predict nothing"); keep JSON finite with the next float up
        out[name] = float(thr[k]) if np.isfinite(thr[k]) else float(np.nextafter(scores[m, j].max(), np.inf))
    return out


def threshold_metrics(scores: np.ndarray, labels: np.ndarray, names: list[str],
                      thresholds: dict[str, float | None]) -> dict:
    """Sensitivity, specificity, precision, F1 and accuracy at fixed (validation-chosen) thresholds."""
    out = {}
    for j, name in enumerate(names):
        t = thresholds.get(name)
        m = ~np.isnan(labels[:, j])
        y = labels[m, j].astype(int)
        if t is None or y.size == 0:
            out[name] = None
            continue
        p = (scores[m, j] >= t).astype(int)
        tp, fp = int(((p == 1) & (y == 1)).sum()), int(((p == 1) & (y == 0)).sum())
        fn, tn = int(((p == 0) & (y == 1)).sum()), int(((p == 0) & (y == 0)).sum())
        sens = tp / (tp + fn) if tp + fn else None
        prec = tp / (tp + fp) if tp + fp else None
        out[name] = {"threshold": t, "sensitivity": sens, "specificity": tn / (tn + fp) if tn + fp else None,
                     "precision": prec, "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
                     "accuracy": (tp + tn) / y.size}
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
            aucs.append(roc_auc_score(y, scores[m, j]))
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

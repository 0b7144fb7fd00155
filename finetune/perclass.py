"""Metrics of a task with several outputs (multilabel, multiclass), and the best-model statement of every run.

    y = targets(labels, kind, k)                                   # [N, K] 1/0/NaN (finetune.tasks)
    models = class_metrics(y, {"fusion": prob, ...}, pid, classes, n_boot=1000, seed=0)   # per class + macro
    diffs = macro_differences(y, probs, pid, models, ref="fusion", n_boot=1000, seed=0)   # paired, macro AUROC
    cal = class_calibration(y, logit, y_val, logit_val, kind, classes)                     # per class, T on val
    sel = selection(val_auroc, test_y, test_probs, pid, macro_classes, n_boot=1000, seed=0)   # + its sentence

Per-class AUROC and the macro mean come from radalign.metrics.auroc_table (one bootstrap over PATIENTS, every
class and the macro on the same resamples; a class with one label value has no AUROC and is left out of the
macro, which names it). Paired differences of the macro AUROC use radalign.metrics.paired_difference with the
macro as a weighted metric (`macro_metric`): a resample where a macro class has one label value is dropped,
as auroc_table's macro does. Multiclass scores are the softmax probabilities, scored one-vs-rest per class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from radalign import metrics as M
from radalign import report as R

# The models the best one is set against (issue 20: "its lead over early fusion and GBDT").
COMPARATORS = ("fusion", "early_fusion", "gbdt")


def macro_metric(columns: Sequence[int], metric=M.weighted_auroc):
    """(y [n, K], score [n, K], weights [B, n]) -> [B]: the mean of `metric` over `columns` (NaN when one of
    them is undefined in a resample), for bootstrap_ci / paired_difference."""
    cols = list(columns)

    def fn(y, s, w):
        y, s = np.asarray(y, np.float64), np.asarray(s, np.float64)
        vals = np.stack([metric(y[:, j], s[:, j], w) for j in cols])  # [K, B]
        return vals.mean(axis=0)

    return fn


def class_metrics(y: np.ndarray, probs: Mapping[str, np.ndarray], patients, classes: Sequence[str], *,
                  n_boot: int, seed: int, level: float = 0.95) -> dict:
    """{model: {auroc (macro), ci_low, ci_high, auprc (macro), auprc_ci_low, auprc_ci_high, macro_classes,
    classes_without_auroc, macro_note, classes: {name: {auroc, ci_low, ci_high, n_pos, n_neg, n_excluded}}}}."""
    out = {}
    for name, p in probs.items():
        tab = M.auroc_table(np.asarray(p, np.float64), y, list(classes), n_boot=n_boot, seed=seed, level=level,
                            patient_ids=list(patients))
        mac = tab["macro"]
        cols = [list(classes).index(c) for c in mac["classes"]]
        ap = M.bootstrap_ci(macro_metric(cols, M.weighted_auprc), y, p, list(patients), n_boot=n_boot, seed=seed,
                            level=level) if cols else {"value": None, "ci_low": None, "ci_high": None}
        out[name] = {"auroc": mac["auroc"], "ci_low": mac["ci_low"], "ci_high": mac["ci_high"],
                     "auprc": ap["value"], "auprc_ci_low": ap["ci_low"], "auprc_ci_high": ap["ci_high"],
                     "macro_classes": mac["classes"], "classes_without_auroc": mac["classes_without_auroc"],
                     "macro_skipped_resamples": mac["skipped_resamples"], "macro_note": mac["note"],
                     "classes": {c: {k: r[k] for k in ("auroc", "ci_low", "ci_high", "n_pos", "n_neg",
                                                       "n_excluded")} for c, r in tab["classes"].items()}}
    return out


def macro_columns(models: Mapping, classes: Sequence[str]) -> list[int]:
    """The classes every model's macro uses (they share the labels, so the same set)."""
    names = set.intersection(*(set(r["macro_classes"]) for r in models.values())) if models else set()
    return [j for j, c in enumerate(classes) if c in names]


def macro_differences(y: np.ndarray, probs: Mapping[str, np.ndarray], patients, models: Mapping,
                      classes: Sequence[str], *, ref: str, n_boot: int, seed: int, level: float = 0.95) -> dict:
    """{"<ref>_vs_<model>": {metric, delta, ci_low, ci_high, p_value}}: macro AUROC of `ref` minus each other
    model, paired (the same patient resamples)."""
    if ref not in probs:
        return {}
    fn = macro_metric(macro_columns(models, classes))
    out = {}
    for name in probs:
        if name == ref:
            continue
        d = M.paired_difference(fn, y, probs[ref], probs[name], list(patients), n_boot=n_boot, seed=seed,
                                level=level)
        out[f"{ref}_vs_{name}"] = {"metric": "macro auroc", "delta": d["delta"], "ci_low": d["ci_low"],
                                   "ci_high": d["ci_high"], "p_value": d["p_value"]}
    return out


# ----------------------------------------------------------------------------------------------------------
# Calibration per class


def softmax_temperature(y_idx: np.ndarray, logits: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the softmax negative log-likelihood of the class indices (labelled rows)."""
    from scipy.optimize import minimize_scalar

    lab = ~np.isnan(y_idx)
    z, k = np.asarray(logits, np.float64)[lab], y_idx[lab].astype(int)
    if not len(k):
        return 1.0

    def nll(log_t: float) -> float:
        u = z / np.exp(log_t)
        u = u - u.max(axis=1, keepdims=True)
        return float((np.log(np.exp(u).sum(axis=1)) - u[np.arange(len(k)), k]).mean())

    res = minimize_scalar(nll, bounds=tuple(np.log(bounds)), method="bounded")
    return float(np.exp(res.x))


def class_calibration(y: np.ndarray, logit: np.ndarray, y_val: np.ndarray, logit_val: np.ndarray, kind: str,
                      classes: Sequence[str], n_bins: int = 10) -> dict:
    """Per class on test: ECE (equal-mass bins) and Brier before/after temperature scaling fitted on
    VALIDATION (multilabel: one temperature per class; multiclass: one softmax temperature, classes scored
    one-vs-rest). y / y_val: [N, K] one-vs-rest targets."""
    from radalign.finetune.tasks import probabilities

    if kind == "multiclass":
        idx_val = np.where(np.isnan(y_val).any(1), np.nan, np.nanargmax(np.nan_to_num(y_val, nan=-1), axis=1))
        temps = [softmax_temperature(idx_val, logit_val)] * len(classes)
        p, pt = probabilities(logit, kind), probabilities(np.asarray(logit) / temps[0], kind)
    else:
        temps = [M.fit_temperature(y_val[:, j], logit_val[:, j]) if (~np.isnan(y_val[:, j])).any() else 1.0
                 for j in range(len(classes))]
        p, pt = probabilities(logit, kind), probabilities(np.asarray(logit) / np.asarray(temps), kind)
    rows = {c: {"temperature": temps[j], "ece_before": M.expected_calibration_error(y[:, j], p[:, j], n_bins),
                "ece_after": M.expected_calibration_error(y[:, j], pt[:, j], n_bins),
                "brier_before": M.brier_score(y[:, j], p[:, j]), "brier_after": M.brier_score(y[:, j], pt[:, j])}
            for j, c in enumerate(classes)}
    return {"per_class": rows, "bins": n_bins, "binning": "equal-mass", "fitted_on": "validation",
            "temperature": "one softmax temperature" if kind == "multiclass" else "one per class"}


# ----------------------------------------------------------------------------------------------------------
# Which model is best on validation, and is its lead real?


def selection(val_auroc: Mapping[str, float], y: np.ndarray, probs: Mapping[str, np.ndarray], patients,
              columns: Sequence[int], *, n_boot: int, seed: int, level: float = 0.95,
              left_out: Mapping[str, str] | None = None, metric: str = "AUROC") -> dict:
    """The model with the best validation score (`val_auroc`, never test), and on TEST its paired lead
    (macro AUROC over `columns`, same patient resamples) over each of COMPARATORS that ran, with whether 0
    is inside the interval; `sentence` says it in words. left_out: {model: why it was not a candidate}."""
    cands = {k: v for k, v in val_auroc.items() if v is not None and not np.isnan(v)}
    out = {"criterion": f"validation {metric}", "validation": dict(val_auroc), "left_out": dict(left_out or {}),
           "best": max(cands, key=cands.get) if cands else None, "level": level, "comparisons": {},
           "not_run": [c for c in COMPARATORS if c not in probs]}
    if out["best"] is not None and columns:
        fn = macro_metric(columns)
        for c in COMPARATORS:
            if c in probs and c != out["best"]:
                d = M.paired_difference(fn, y, probs[out["best"]], probs[c], list(patients), n_boot=n_boot,
                                        seed=seed, level=level)
                inside = d["ci_low"] is None or d["ci_low"] <= 0 <= d["ci_high"]
                out["comparisons"][c] = {"delta": d["delta"], "ci_low": d["ci_low"], "ci_high": d["ci_high"],
                                         "zero_inside_interval": bool(inside)}
    out["sentence"] = selection_sentence(out, metric)
    return out


def selection_sentence(sel: Mapping, metric: str = "AUROC") -> str:
    """Plain words: the best model on validation, and for each comparator whether its test lead is inside
    the interval (0 inside: not shown better) or outside it (better, or worse, beyond resampling noise)."""
    best = sel.get("best")
    if best is None:
        return f"No model has a validation {metric}: no best model."
    val = sel["validation"][best]
    s = [f"Best on validation: {best} (validation {metric} {R.num(val)})."]
    pct = round(100 * sel.get("level", 0.95))
    for c, d in sel["comparisons"].items():
        lead = R.ci(d["delta"], d["ci_low"], d["ci_high"], signed=True)
        if d["zero_inside_interval"]:
            s.append(f"Its test lead over {c} is {lead}: 0 is inside the {pct}% interval, so this run does "
                     f"not show {best} better than {c}.")
        elif d["delta"] > 0:
            s.append(f"Its test lead over {c} is {lead}: outside the interval (above 0), a lead the patient "
                     "resamples support.")
        else:
            s.append(f"Its test lead over {c} is {lead}: outside the interval and below 0, so {c} is better on "
                     "test despite the validation ranking.")
    for c in sel.get("not_run", ()):
        s.append(f"{c} was not trained in this run, so there is no comparison with it.")
    for c, why in (sel.get("left_out") or {}).items():
        s.append(f"{c} was not a candidate: {why}.")
    return " ".join(s)


def validation_scores(y_val: np.ndarray, probs: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    """Each model's validation macro AUROC (point) over the classes with both values."""
    from radalign.finetune.tasks import macro_point_auroc

    out = {}
    for name, p in probs.items():
        v = macro_point_auroc(y_val, np.asarray(p, np.float64).reshape(len(y_val), -1))
        out[name] = None if np.isnan(v) else v
    return out


def md_selection(sel: Mapping | None) -> list[str]:
    if not sel:
        return []
    return ["## Best model", "", R.md(sel["sentence"]), ""]


def md_classes(models: Mapping, classes: Sequence[str]) -> list[str]:
    """Per-class AUROC [CI] of every model (a class with one label value: "–", named below the table)."""
    names = list(models)
    rows = [[c, *(R.ci_of(models[m]["classes"][c], "auroc") for m in names),
             models[names[0]]["classes"][c]["n_pos"], models[names[0]]["classes"][c]["n_neg"]] for c in classes]
    lines = ["## Per class (test)", "", "AUROC [95% CI over patients] per class; the macro is the mean over the "
             "classes with both label values.", "",
             *R.md_table(["class", *names, "positives", "negatives"], rows), ""]
    first = models[names[0]]
    if first["classes_without_auroc"]:
        lines += [f"Not scored (one label value on test): {R.md(', '.join(first['classes_without_auroc']))}.", ""]
    if first.get("macro_note"):
        lines += [R.md(first["macro_note"]), ""]
    return lines


def md_calibration(cal: Mapping | None, model: str) -> list[str]:
    if not cal:
        return []
    rows = [[c, r["temperature"], r["ece_before"], r["ece_after"], r["brier_before"], r["brier_after"]]
            for c, r in cal["per_class"].items()]
    return [f"## Calibration per class ({R.md(model)}, test)", "",
            f"ECE over {cal['bins']} equal-mass bins and Brier score, before and after temperature scaling "
            f"fitted on validation ({R.md(cal['temperature'])}).", "",
            *R.md_table(["class", "T", "ECE", "ECE after T", "Brier", "Brier after T"], rows), ""]

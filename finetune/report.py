"""What a finetune run writes on the test split (stable names: users script against them).

    RUN/predictions.csv            subject_id, study_id, label, score:<model> (probability), logit:<model>
    RUN/predictions_validate.csv   the same on the validation split (thresholds, temperature, `finetune eval`)
    RUN/metrics.json               the run's metrics.json schema (`finetune.clinical.METRICS_SCHEMA`, shared with
                                   `finetune eval`): models.<name>.{auroc, ci_low, ci_high, auprc, auprc_ci_low,
                                   auprc_ci_high}, paired_differences.fusion_vs_<name>.{delta, ci_low, ci_high},
                                   degradation, and the training sections: data (rows, events, presence per
                                   split), overlap, training info
    RUN/report.md, RUN/roc.png

Every interval: percentile bootstrap over PATIENTS (radalign.metrics), the same resamples for every model, so
the differences are paired.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import pandas as pd
from radalign.finetune.clinical import (
    LOGIT_PREFIX,
    MODEL_ORDER,
    SCORE_PREFIX,
    degradation_table,
    md_degradation,
    md_models,
    model_metrics,
    ordered,
    paired_differences,
    sigmoid,
    write_metrics,
)
from radalign.finetune.perclass import (
    class_calibration,
    class_metrics,
    macro_columns,
    macro_differences,
    md_calibration,
    md_classes,
    md_selection,
    selection,
    validation_scores,
)
from radalign.finetune.registry import not_trained
from radalign.finetune.session import TRAIN_PATIENTS
from radalign.finetune.tasks import as_matrix, class_names, n_outputs, probabilities, targets

from radalign import report as R
from radalign.io import atomic_write_text

__all__ = ["MODEL_ORDER", "predictions_frame", "model_metrics", "paired_differences", "build_metrics", "roc_png",
           "format_report", "save_outputs", "summary_line"]


def predictions_frame(data, logits: Mapping[str, np.ndarray], task=None) -> pd.DataFrame:
    """One row per study. Binary: label, score:<model>, logit:<model>. multilabel / multiclass (`task` given):
    label:<class> (1/0, empty = excluded; multiclass one-hot), score:<model>:<class> (sigmoid per class, or
    the softmax), logit:<model>:<class>: one column per class, in task.classes / task.labels order."""
    if task is None or task.kind == "binary":
        return _binary_frame(data, logits)
    classes, kind = class_names(task), task.kind
    out = pd.DataFrame({"subject_id": data.subjects, "study_id": data.studies})
    y = targets(data.y, kind, len(classes))
    for j, c in enumerate(classes):
        out[f"label:{c}"] = pd.array(y[:, j], dtype="Float64")
    for prefix, fn in ((SCORE_PREFIX, lambda z: probabilities(z, kind)), (LOGIT_PREFIX, np.asarray)):
        for name in ordered(logits):
            vals = fn(as_matrix(logits[name]))
            for j, c in enumerate(classes):
                out[f"{prefix}{name}:{c}"] = vals[:, j]
    return out


def _binary_frame(data, logits: Mapping[str, np.ndarray]) -> pd.DataFrame:
    y = data.y[:, 0]
    out = pd.DataFrame({"subject_id": data.subjects, "study_id": data.studies,
                        "label": pd.array(np.where(np.isnan(y), np.nan, y), dtype="Float64")})
    for name in ordered(logits):
        out[f"{SCORE_PREFIX}{name}"] = sigmoid(logits[name])
    for name in ordered(logits):
        out[f"{LOGIT_PREFIX}{name}"] = logits[name]
    return out


def read_class_predictions(frame: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, dict, dict]:
    """A multilabel / multiclass predictions frame back to ([N, K] targets, {model: [N, K] probabilities},
    {model: [N, K] logits}) (the inverse of predictions_frame)."""
    y = np.stack([frame[f"label:{c}"].astype("float64").to_numpy() for c in classes], axis=1)
    models = [c[len(SCORE_PREFIX):-len(classes[0]) - 1] for c in frame.columns
              if c.startswith(SCORE_PREFIX) and c.endswith(f":{classes[0]}")]
    probs = {m: np.stack([frame[f"{SCORE_PREFIX}{m}:{c}"].to_numpy(np.float64) for c in classes], 1) for m in models}
    logit = {m: np.stack([frame[f"{LOGIT_PREFIX}{m}:{c}"].to_numpy(np.float64) for c in classes], 1) for m in models}
    return y, probs, logit


def _labelled(data) -> np.ndarray:
    return (~np.isnan(data.y)).any(axis=1)


def _train_patients(run) -> dict:
    """{"train_patients": the draw's summary (RUN/train_patients.json without the list)} or {}."""
    path = run.run_dir / TRAIN_PATIENTS
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    return {"train_patients": {k: v for k, v in doc.items() if k != "subject_ids"}}


def build_metrics(run, scores) -> dict:
    """The run's metrics document (without the header write_metrics adds: format, unit, created)."""
    if run.cfg.task.kind != "binary":
        return build_class_metrics(run, scores)
    cfg = run.cfg
    test, keep = run.test, _labelled(run.test)
    y, pid = test.y[keep, 0], test.subjects[keep]
    s = {k: v[keep] for k, v in scores.test.items()}
    kw = dict(n_boot=cfg.bootstrap, seed=cfg.seed)
    deg = None
    if scores.degradation:
        label = {"fusion": "with_dropout", "fusion_no_dropout": "without_dropout"}
        named = {label[k]: {c: v[keep] for c, v in d.items()} for k, d in scores.degradation.items()}
        seeds = {label[k]: [{c: v[keep] for c, v in r.items()} for r in runs]
                 for k, runs in scores.degradation_seeds.items()}
        deg = degradation_table(y, pid, named, seeds=seeds or None, **kw)
    return {
        "task": cfg.task.name, "split": cfg.data.test_split,
        "metric_note": "AUROC/AUPRC with 95% percentile intervals over patient resamples; model selection "
                       f"on {cfg.data.val_split}, never on test",
        "n_boot": cfg.bootstrap, "seed": cfg.seed,
        "data": {s_: {"rows": len(d), "labelled": int(_labelled(d).sum()),
                      "positives": int(np.nansum(d.y[:, 0])), "patients": int(len(set(d.subjects[_labelled(d)]))),
                      "present": d.counts["present"], "counts": d.counts}
                 for s_, d in run.data.items()},
        "models": model_metrics(y, s, pid, **kw),
        "paired_differences": paired_differences(y, s, pid, **kw) if "fusion" in s else {},
        "degradation": deg,
        "selection": selection(_val_aurocs(run, scores), y[:, None], {k: v[:, None] for k, v in s.items()}, pid,
                               [0], left_out=_left_out(run), **kw),
        "training": scores.info, "not_trained": not_trained(run), "overlap": run.overlap, "precision": run.precision,
        "processes": run.acc.num_processes, "seconds": run.seconds, **_train_patients(run),
    }


def _left_out(run) -> dict[str, str]:
    """Models that may not be chosen on validation: the stacked late fusion is fitted there."""
    if run.cfg.baselines.late_fusion == "stacked" and "late_fusion" in run.cfg.baselines.models:
        return {"late_fusion": f"its stacker is fitted on {run.cfg.data.val_split}, so its validation score is "
                               "in-sample"}
    return {}


def _val_aurocs(run, scores) -> dict[str, float | None]:
    kind, k = run.cfg.task.kind, n_outputs(run.cfg.task)
    probs = {n: probabilities(as_matrix(v), kind) for n, v in scores.val.items() if n not in _left_out(run)}
    return validation_scores(targets(run.val.y, kind, k), probs)


def _data_section(run) -> dict:
    classes, kind = class_names(run.cfg.task), run.cfg.task.kind
    out = {}
    for s_, d in run.data.items():
        y, lab = targets(d.y, kind, len(classes)), _labelled(d)
        out[s_] = {"rows": len(d), "labelled": int(lab.sum()), "positives": int(np.nansum(y)),
                   "patients": int(len(set(d.subjects[lab]))), "present": d.counts["present"],
                   "counts": d.counts, "positives_per_class": dict(zip(classes, np.nansum(y, 0).astype(int).tolist())),
                   "labelled_per_class": dict(zip(classes, (~np.isnan(y)).sum(0).astype(int).tolist()))}
    return out


def build_class_metrics(run, scores) -> dict:
    """metrics.json of a multilabel / multiclass run: per class and macro AUROC with patient intervals for
    every model, paired macro differences, calibration per class of the best model, the best-model statement."""
    cfg, kind = run.cfg, run.cfg.task.kind
    classes = class_names(cfg.task)
    kw = dict(n_boot=cfg.bootstrap, seed=cfg.seed)
    y, pid = targets(run.test.y, kind, len(classes)), run.test.subjects
    probs = {n: probabilities(as_matrix(v), kind) for n, v in scores.test.items()}
    models = class_metrics(y, {n: probs[n] for n in ordered(probs)}, pid, classes, **kw)
    sel = selection(_val_aurocs(run, scores), y, probs, pid, macro_columns(models, classes),
                    left_out=_left_out(run), metric="macro AUROC", **kw)
    ref = sel["best"] or "fusion"
    cal = class_calibration(y, as_matrix(scores.test[ref]), targets(run.val.y, kind, len(classes)),
                            as_matrix(scores.val[ref]), kind, classes) if ref in scores.test else None
    return {
        "task": cfg.task.name, "split": cfg.data.test_split, "kind": kind, "classes": classes,
        "metric_note": "macro AUROC (mean over the classes with both label values) and per-class AUROC with 95% "
                       "percentile intervals over patient resamples; model selection on "
                       f"{cfg.data.val_split}, never on test",
        "n_boot": cfg.bootstrap, "seed": cfg.seed, "data": _data_section(run), "models": models,
        "paired_differences": macro_differences(y, probs, pid, models, classes, ref="fusion", **kw),
        "degradation": None, "skipped": {"degradation": "the graceful-degradation table is for binary tasks"},
        "selection": sel, "calibration": cal, "model": "fusion",
        "training": scores.info, "not_trained": not_trained(run), "overlap": run.overlap, "precision": run.precision,
        "processes": run.acc.num_processes, "seconds": run.seconds,
        **_train_patients(run),
    }


def roc_png(path, y, scores: Mapping[str, np.ndarray], title: str) -> None:
    R.roc_plot(path, {name: (y, scores[name]) for name in ordered(scores)}, title, bold="fusion")


def format_report(m: Mapping) -> str:
    """The run's report.md: its data, then the shared models / paired differences / degradation sections."""
    lines = [f"# Finetune: {R.md(m['task'])}", "",
             f"Test split {R.md(m['split'])}. Unit of every interval: the patient (all studies of a patient "
             f"resampled together, {m['n_boot']} resamples, seed {m['seed']}). {R.md(m['metric_note'])}.", "",
             "## Data", ""]
    lines += R.md_table(["split", "studies", "labelled", "positives", "patients (labelled)", "present"],
                        [[s, r["rows"], r["labelled"], r["positives"], r["patients"],
                          ", ".join(f"{k} {v}" for k, v in r["present"].items())] for s, r in m["data"].items()])
    lines += ["", f"Overlap with the pretraining run's training patients: {R.md(_overlap_text(m.get('overlap') or {}))}.",
              ""]
    lines += _md_task(m)
    lines += md_selection(m.get("selection"))
    lines += md_models(m)
    lines += [f"Not trained: {R.md(k)} ({R.md(v)})." for k, v in (m.get("not_trained") or {}).items()]
    lines += [""] if m.get("not_trained") else []
    if m.get("classes"):
        lines += md_classes(m["models"], m["classes"])
        lines += md_calibration(m.get("calibration"), (m.get("selection") or {}).get("best") or "fusion")
        lines += [f"Not in this report: {R.md(k)} ({R.md(v)})." for k, v in (m.get("skipped") or {}).items()]
        lines += ["", "![Per-class AUROC of the best model on validation](classes.png)", ""]
        return "\n".join(lines)
    if m.get("degradation"):
        lines += md_degradation(m["degradation"])
    lines += ["![ROC curves on the test split](roc.png)", ""]
    return "\n".join(lines)


def _md_task(m: Mapping) -> list[str]:
    """Kind and classes (multi-output tasks) and the training-patient draw, when there was one."""
    lines = []
    if m.get("classes"):
        lines += [f"Task kind {R.md(m['kind'])}, {len(m['classes'])} classes: {R.md(', '.join(m['classes']))}.", ""]
    tp = m.get("train_patients")
    if tp:
        lines += [f"Trained on {tp['n_patients']} of {tp['of_patients']} training patients "
                  f"({R.num(100 * tp['fraction'], 1)} %, {tp['n_studies']} studies; drawn by patient with seed "
                  f"{tp['seed']}; list sha256 {R.md(tp['sha256'])}, in train_patients.json).", ""]
    return lines


def _overlap_text(ov: Mapping) -> str:
    if not ov.get("checked"):
        return f"not checked ({ov.get('source', '')}); allowed by data.allow_overlap"
    counts = ", ".join(f"{k}: {v} patients" for k, v in ov.items() if isinstance(v, int) and not isinstance(v, bool))
    return f"{counts} (from {ov.get('source', '')})" + ("; allowed by data.allow_overlap" if ov.get("allowed") else "")


def save_outputs(run, scores) -> dict:
    out = run.run_dir
    predictions_frame(run.test, scores.test, run.cfg.task).to_csv(tmp := out / "predictions.csv.tmp", index=False)
    tmp.replace(out / "predictions.csv")
    predictions_frame(run.val, scores.val, run.cfg.task).to_csv(tmp := out / "predictions_validate.csv.tmp",
                                                                index=False)
    tmp.replace(out / "predictions_validate.csv")
    m = write_metrics(out / "metrics.json", build_metrics(run, scores))
    if m.get("classes"):
        best = m["selection"]["best"] or next(iter(m["models"]))
        R.interval_plot(out / "classes.png", [(c, r) for c, r in m["models"][best]["classes"].items()
                                              if r["auroc"] is not None], f"{best}: AUROC per class (95% CI)")
    else:
        keep = _labelled(run.test)
        roc_png(out / "roc.png", run.test.y[keep, 0], {k: v[keep] for k, v in scores.test.items()},
                f"{run.cfg.task.name} (test split)")
    atomic_write_text(out / "report.md", format_report(m))
    run.say(summary_line(m))
    run.say(m["selection"]["sentence"])
    run.say(f"written: {out}/predictions.csv, metrics.json, report.md, {'classes' if m.get('classes') else 'roc'}.png")
    return m


def summary_line(m: Mapping) -> str:
    parts = [f"{k} {R.ci_of(v, 'auroc')}" for k, v in m["models"].items()]
    what = "macro AUROC" if m.get("classes") else "AUROC"
    return f"{m['task']} test {what} (95% CI over patients): " + "; ".join(parts)

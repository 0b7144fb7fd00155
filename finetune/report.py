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

from radalign import report as R
from radalign.io import atomic_write_text

__all__ = ["MODEL_ORDER", "predictions_frame", "model_metrics", "paired_differences", "build_metrics", "roc_png",
           "format_report", "save_outputs", "summary_line"]


def predictions_frame(data, logits: Mapping[str, np.ndarray]) -> pd.DataFrame:
    y = data.y[:, 0]
    out = pd.DataFrame({"subject_id": data.subjects, "study_id": data.studies,
                        "label": pd.array(np.where(np.isnan(y), np.nan, y), dtype="Float64")})
    for name in ordered(logits):
        out[f"{SCORE_PREFIX}{name}"] = sigmoid(logits[name])
    for name in ordered(logits):
        out[f"{LOGIT_PREFIX}{name}"] = logits[name]
    return out


def _labelled(data) -> np.ndarray:
    return ~np.isnan(data.y[:, 0])


def build_metrics(run, scores) -> dict:
    """The run's metrics document (without the header write_metrics adds: format, unit, created)."""
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
        "training": scores.info, "overlap": run.overlap, "precision": run.precision,
        "processes": run.acc.num_processes, "seconds": run.seconds,
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
    lines += md_models(m)
    if m.get("degradation"):
        lines += md_degradation(m["degradation"])
    lines += ["![ROC curves on the test split](roc.png)", ""]
    return "\n".join(lines)


def _overlap_text(ov: Mapping) -> str:
    if not ov.get("checked"):
        return f"not checked ({ov.get('source', '')}); allowed by data.allow_overlap"
    counts = ", ".join(f"{k}: {v} patients" for k, v in ov.items() if isinstance(v, int) and not isinstance(v, bool))
    return f"{counts} (from {ov.get('source', '')})" + ("; allowed by data.allow_overlap" if ov.get("allowed") else "")


def save_outputs(run, scores) -> dict:
    out = run.run_dir
    predictions_frame(run.test, scores.test).to_csv(tmp := out / "predictions.csv.tmp", index=False)
    tmp.replace(out / "predictions.csv")
    predictions_frame(run.val, scores.val).to_csv(tmp := out / "predictions_validate.csv.tmp", index=False)
    tmp.replace(out / "predictions_validate.csv")
    keep = _labelled(run.test)
    roc_png(out / "roc.png", run.test.y[keep, 0], {k: v[keep] for k, v in scores.test.items()},
            f"{run.cfg.task.name} (test split)")
    m = write_metrics(out / "metrics.json", build_metrics(run, scores))
    atomic_write_text(out / "report.md", format_report(m))
    run.say(summary_line(m))
    run.say(f"written: {out}/predictions.csv, metrics.json, report.md, roc.png")
    return m


def summary_line(m: Mapping) -> str:
    parts = [f"{k} {R.ci_of(v, 'auroc')}" for k, v in m["models"].items()]
    return f"{m['task']} test AUROC (95% CI over patients): " + "; ".join(parts)

"""What a finetune run writes on the test split (stable names: users script against them).

    RUN/predictions.csv            subject_id, study_id, label, score:<model> (probability), logit:<model>
    RUN/predictions_validate.csv   the same on the validation split (thresholds, temperature, `finetune eval`)
    RUN/metrics.json               models.<name>.{auroc, ci_low, ci_high, auprc, auprc_ci_low, auprc_ci_high},
                                   paired_differences.fusion_vs_<name>.{delta, ci_low, ci_high}, degradation,
                                   data (rows, events, presence per split), overlap, training info
    RUN/report.md, RUN/roc.png

Every interval: percentile bootstrap over PATIENTS (radalign.metrics), the same resamples for every model, so
the differences are paired.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from radalign.finetune.clinical import LOGIT_PREFIX, SCORE_PREFIX, degradation_table, sigmoid
from radalign.finetune.explain import md_text

from radalign import metrics as M
from radalign.io import atomic_write_json, atomic_write_text

MODEL_ORDER = ("fusion", "fusion_no_dropout", "image_only", "ehr_only", "text_only", "late_fusion",
               "early_fusion", "gbdt")
METRICS_FORMAT = "radalign-finetune-metrics/1"


def predictions_frame(data, logits: Mapping[str, np.ndarray]) -> pd.DataFrame:
    y = data.y[:, 0]
    out = pd.DataFrame({"subject_id": data.subjects, "study_id": data.studies,
                        "label": pd.array(np.where(np.isnan(y), np.nan, y), dtype="Float64")})
    for name in _ordered(logits):
        out[f"{SCORE_PREFIX}{name}"] = sigmoid(logits[name])
    for name in _ordered(logits):
        out[f"{LOGIT_PREFIX}{name}"] = logits[name]
    return out


def _ordered(names) -> list[str]:
    return sorted(names, key=lambda n: (MODEL_ORDER.index(n) if n in MODEL_ORDER else len(MODEL_ORDER), n))


def _labelled(data) -> np.ndarray:
    return ~np.isnan(data.y[:, 0])


def model_metrics(y, scores: Mapping[str, np.ndarray], patients, *, n_boot: int, seed: int) -> dict:
    out = {}
    for name in _ordered(scores):
        a = M.bootstrap_ci("auroc", y, scores[name], patients, n_boot=n_boot, seed=seed)
        p = M.bootstrap_ci("auprc", y, scores[name], patients, n_boot=n_boot, seed=seed)
        out[name] = {"auroc": a["value"], "ci_low": a["ci_low"], "ci_high": a["ci_high"], "auprc": p["value"],
                     "auprc_ci_low": p["ci_low"], "auprc_ci_high": p["ci_high"]}
    return out


def paired_differences(y, scores: Mapping[str, np.ndarray], patients, *, ref: str = "fusion", n_boot: int,
                       seed: int) -> dict:
    out = {}
    for name in _ordered(scores):
        if name == ref:
            continue
        d = M.paired_difference("auroc", y, scores[ref], scores[name], patients, n_boot=n_boot, seed=seed)
        out[f"{ref}_vs_{name}"] = {"metric": "auroc", "delta": d["delta"], "ci_low": d["ci_low"],
                                   "ci_high": d["ci_high"], "p_value": d["p_value"]}
    return out


def build_metrics(run, scores) -> dict:
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
        "format": METRICS_FORMAT, "task": cfg.task.name, "split": cfg.data.test_split, "unit": M.UNIT,
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
    from radalign.finetune.clinical import _pyplot, _roc_points, _save_png

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--")
    for name in _ordered(scores):
        tpr, fpr = _roc_points(y, scores[name], np.ones((1, len(y))))
        ax.plot(fpr[0], tpr[0], lw=1.6 if name == "fusion" else 1.0,
                label=f"{name} ({M.auroc(y, scores[name]):.3f})")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(loc="lower right", fontsize=7)
    _save_png(fig, path)


def _ci(v, lo, hi) -> str:
    if v is None:
        return "undefined"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{v:.3f}"


def format_report(m: Mapping) -> str:
    from radalign.finetune.clinical import _md_degradation

    d = m["data"]
    lines = [f"# Finetune: {md_text(m['task'])}", "",
             f"Test split `{md_text(m['split'])}`. Unit of every interval: the patient (all studies of a patient "
             f"resampled together, {m['n_boot']} resamples, seed {m['seed']}). {md_text(m['metric_note'])}.", "",
             "## Data", "", "| split | studies | labelled | positives | patients (labelled) | present |",
             "|---|---|---|---|---|---|"]
    for s, r in d.items():
        pres = ", ".join(f"{md_text(k)} {v}" for k, v in r["present"].items())
        lines.append(f"| {md_text(s)} | {r['rows']} | {r['labelled']} | {r['positives']} | {r['patients']} | "
                     f"{pres} |")
    ov = m.get("overlap") or {}
    lines += ["", f"Overlap with the pretraining run's training patients: {md_text(_overlap_text(ov))}.", "",
              "## Models (test)", "", "| model | AUROC [95% CI] | AUPRC [95% CI] | best validation AUROC |",
              "|---|---|---|---|"]
    for name, r in m["models"].items():
        best = (m["training"].get(name) or {}).get("best_val_auroc")
        lines.append(f"| {md_text(name)} | {_ci(r['auroc'], r['ci_low'], r['ci_high'])} | "
                     f"{_ci(r['auprc'], r['auprc_ci_low'], r['auprc_ci_high'])} | "
                     f"{'-' if best is None else f'{best:.3f}'} |")
    if m["paired_differences"]:
        lines += ["", "## Paired differences (fusion minus each model, AUROC)", "",
                  "| comparison | delta [95% CI] | CI above 0 |", "|---|---|---|"]
        for name, r in m["paired_differences"].items():
            above = "yes" if r["ci_low"] is not None and r["ci_low"] > 0 else "no"
            lines.append(f"| {md_text(name)} | {_ci(r['delta'], r['ci_low'], r['ci_high'])} | {above} |")
    lines.append("")
    if m.get("degradation"):
        lines += _md_degradation(m["degradation"])
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
    m = build_metrics(run, scores)
    keep = _labelled(run.test)
    roc_png(out / "roc.png", run.test.y[keep, 0], {k: v[keep] for k, v in scores.test.items()},
            f"{run.cfg.task.name} (test split)")
    atomic_write_json(out / "metrics.json", m)
    atomic_write_text(out / "report.md", format_report(m))
    run.say(summary_line(m))
    run.say(f"written: {out}/predictions.csv, metrics.json, report.md, roc.png")
    return m


def summary_line(m: Mapping) -> str:
    parts = [f"{k} {_ci(v['auroc'], v['ci_low'], v['ci_high'])}" for k, v in m["models"].items()]
    return f"{m['task']} test AUROC (95% CI over patients): " + "; ".join(parts)

"""Writing a zero-shot result: metrics.json, predictions.csv, roc.png and metrics.md (all atomic, through the
reporting kit `radalign.report`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from radalign import report as R
from radalign.io import atomic_write_text

METRICS_STAGE = "zeroshot"  # metrics.json format: radalign-zeroshot-metrics/1


def unit_sentence(metrics: dict) -> str:
    """'95% percentile bootstrap over patients (375 patients, 955 images), 1000 resamples, seed 0'."""
    mac = metrics["macro"]
    unit, n_units = mac.get("unit", "image"), mac.get("n_units")
    what = (f"over patients ({n_units} patients, {metrics['data']['n_scored']} images; all images of a "
            "patient resampled together)" if unit == "patient"
            else f"over images ({n_units} images; no patient ids, so the interval is too narrow when "
                 "patients have several images)")
    return f"{int(round(mac['level'] * 100))}% percentile bootstrap {what}, {mac['n_boot']} resamples, seed {mac['seed']}"


def _class_rows(metrics: dict) -> list[list]:
    rows = [[name, c["auroc"], c["ci_low"], c["ci_high"], c["n_pos"], c["n_neg"], c["n_excluded"]]
            for name, c in metrics["classes"].items()]
    for key, label in (("macro", "macro (" + ", ".join(metrics["macro"]["classes"]) + ")"),
                       ("macro_all", "macro (all classes with both labels)")):
        m = metrics[key]
        rows.append([R.Md(f"**{R.md(label)}**"), R.Md(f"**{R.num(m['auroc'])}**"), m["ci_low"], m["ci_high"],
                     R.Md(""), R.Md(""), R.Md("")])
    return rows


def _notes(metrics: dict) -> list[str]:
    lines = []
    if metrics.get("multiclass"):
        mc = metrics["multiclass"]
        lines += ["", f"Accuracy {R.ci_of(mc['accuracy'])}, balanced accuracy {R.ci_of(mc['balanced_accuracy'])} "
                      f"over {mc['n']} images."]
    mac = metrics["macro"]
    if mac.get("classes_without_auroc"):
        lines += ["", f"Left out of the macro, one label value only: {R.md(', '.join(mac['classes_without_auroc']))}."]
    if mac.get("classes_too_few"):
        lines += ["", f"Left out of the macro, fewer than {mac.get('min_per_label')} positives or negatives: "
                      f"{R.md(', '.join(mac['classes_too_few']))} (their own AUROC is in the table)."]
    ctrl = metrics.get("controls", {}).get("shuffled_labels_macro_auroc")
    if ctrl is not None:
        lines += ["", f"Shuffled-label control (macro AUROC, should be ~0.5): {R.num(ctrl)}."]
    thr = metrics.get("threshold_metrics", {})
    if not thr.get("available"):
        lines += ["", f"Threshold metrics: not reported ({R.md(thr.get('reason'))})."]
    return lines


def markdown(metrics: dict) -> str:
    """metrics.md: the per-class table with the macro rows, the notes, and the prompt sensitivity table."""
    lines = [f"# Zero-shot: {R.md(metrics['prompt_set'])} ({R.md(metrics['mode'])})", "",
             f"Data: {R.md(metrics['data']['source'])}, {metrics['data']['n_images']} images; "
             f"skipped: {R.md(metrics['data']['skipped'] or 'none')}.",
             f"Checkpoints: {R.md(', '.join(c['checksum'][:12] for c in metrics['checkpoints']))}. "
             f"Label policy: uncertain={R.md(metrics['label_policy']['uncertain'])}, "
             f"blank={R.md(metrics['label_policy']['blank'])}. ",
             f"CI: {R.md(unit_sentence(metrics))}.", ""]
    lines += R.md_table(["class", "AUROC", "CI low", "CI high", "n_pos", "n_neg", "n_excluded"],
                        _class_rows(metrics), align="lrrrrrr")
    lines += _notes(metrics)
    lines += ["", "## Prompt sensitivity (AUROC of each single positive template)", ""]
    lines += R.md_table(["class", "ensemble", "min", "max", "std", "templates"],
                        [[r["class"], r["ensemble_auroc"], r["min"], r["max"], r["std"], len(r["templates"])]
                         for r in metrics["prompt_sensitivity"]], align="lrrrrr")
    return "\n".join(lines) + "\n"


def write_outputs(out: str | os.PathLike, metrics: dict, predictions: pd.DataFrame, scores: np.ndarray,
                  labels: np.ndarray, names: list[str]) -> Path:
    """OUT/metrics.json (radalign-zeroshot-metrics/1; `metrics` gains its format, unit and created), predictions.csv,
    roc.png (one curve per class with an AUROC) and metrics.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = R.write_metrics(out / "metrics.json", metrics, stage=METRICS_STAGE, unit=metrics["bootstrap"]["unit"])
    metrics.update({k: written[k] for k in ("format", "unit", "created")})
    atomic_write_text(out / "predictions.csv", predictions.to_csv(index=False, float_format="%.6g"))
    R.roc_plot(out / "roc.png", {n: (labels[:, j], scores[:, j]) for j, n in enumerate(names)
                                 if metrics["classes"][n]["auroc"] is not None},
               f"zero-shot ROC: {metrics['prompt_set']}")
    atomic_write_text(out / "metrics.md", markdown(metrics))
    return out

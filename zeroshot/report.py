"""Writing a zero-shot result: metrics.json, predictions.csv, roc.png and metrics.md (all atomic)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from radalign.io import atomic_path, atomic_write_json, atomic_write_text
from radalign.report import md


def _fmt(x, nd: int = 3) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def unit_sentence(metrics: dict) -> str:
    """'95% percentile bootstrap over patients (375 patients, 955 images), 1000 resamples, seed 0'."""
    mac = metrics["macro"]
    unit, n_units = mac.get("unit", "image"), mac.get("n_units")
    what = (f"over patients ({n_units} patients, {metrics['data']['n_scored']} images; all images of a "
            "patient resampled together)" if unit == "patient"
            else f"over images ({n_units} images; no patient ids, so the interval is too narrow when "
                 "patients have several images)")
    return f"{int(round(mac['level'] * 100))}% percentile bootstrap {what}, {mac['n_boot']} resamples, seed {mac['seed']}"


def roc_plot(path: str | os.PathLike, scores: np.ndarray, labels: np.ndarray, names: list[str],
             aurocs: dict, title: str) -> None:
    """One panel, one ROC curve per class (AUROC in the legend)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(6.5, 6))
    for j, name in enumerate(names):
        if aurocs.get(name) is None:
            continue
        m = ~np.isnan(labels[:, j])
        fpr, tpr, _ = roc_curve(labels[m, j].astype(int), scores[m, j])
        ax.plot(fpr, tpr, lw=1.2, label=f"{name} ({aurocs[name]:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def markdown(metrics: dict) -> str:
    lines = [f"# Zero-shot: {md(metrics['prompt_set'])} ({metrics['mode']})", "",
             f"Data: `{md(metrics['data']['source'])}`, {metrics['data']['n_images']} images; "
             f"skipped: {md(metrics['data']['skipped'] or 'none')}.",
             f"Checkpoints: {', '.join(md(c['checksum'][:12]) for c in metrics['checkpoints'])}. "
             f"Label policy: uncertain={metrics['label_policy']['uncertain']}, "
             f"blank={metrics['label_policy']['blank']}. ",
             f"CI: {unit_sentence(metrics)}.", "",
             "| class | AUROC | CI low | CI high | n_pos | n_neg | n_excluded |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in metrics["classes"].items():
        lines.append(f"| {md(name)} | {_fmt(c['auroc'])} | {_fmt(c['ci_low'])} | {_fmt(c['ci_high'])} | "
                     f"{c['n_pos']} | {c['n_neg']} | {c['n_excluded']} |")
    for key, label in (("macro", "macro (" + ", ".join(md(c) for c in metrics["macro"]["classes"]) + ")"),
                       ("macro_all", "macro (all classes with both labels)")):
        m = metrics[key]
        lines.append(f"| **{label}** | **{_fmt(m['auroc'])}** | {_fmt(m['ci_low'])} | {_fmt(m['ci_high'])} | | | |")
    if metrics.get("multiclass"):
        mc = metrics["multiclass"]
        lines += ["", f"Accuracy {_fmt(mc['accuracy']['value'])} "
                      f"[{_fmt(mc['accuracy']['ci_low'])}, {_fmt(mc['accuracy']['ci_high'])}], balanced accuracy "
                      f"{_fmt(mc['balanced_accuracy']['value'])} [{_fmt(mc['balanced_accuracy']['ci_low'])}, "
                      f"{_fmt(mc['balanced_accuracy']['ci_high'])}] over {mc['n']} images."]
    mac = metrics["macro"]
    if mac.get("classes_without_auroc"):
        lines += ["", "Left out of the macro, one label value only: "
                      f"{', '.join(md(c) for c in mac['classes_without_auroc'])}."]
    if mac.get("classes_too_few"):
        lines += ["", f"Left out of the macro, fewer than {mac.get('min_per_label')} positives or negatives: "
                      f"{', '.join(md(c) for c in mac['classes_too_few'])} (their own AUROC is in the table)."]
    ctrl = metrics.get("controls", {}).get("shuffled_labels_macro_auroc")
    if ctrl is not None:
        lines += ["", f"Shuffled-label control (macro AUROC, should be ~0.5): {_fmt(ctrl)}."]
    thr = metrics.get("threshold_metrics", {})
    if not thr.get("available"):
        lines += ["", f"Threshold metrics: not reported ({md(thr.get('reason'))})."]
    lines += ["", "## Prompt sensitivity (AUROC of each single positive template)", "",
              "| class | ensemble | min | max | std | templates |", "|---|---:|---:|---:|---:|---:|"]
    for r in metrics["prompt_sensitivity"]:
        lines.append(f"| {md(r['class'])} | {_fmt(r['ensemble_auroc'])} | {_fmt(r['min'])} | {_fmt(r['max'])} | "
                     f"{_fmt(r['std'])} | {len(r['templates'])} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: str | os.PathLike, metrics: dict, predictions: pd.DataFrame, scores: np.ndarray,
                  labels: np.ndarray, names: list[str]) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "predictions.csv", predictions.to_csv(index=False, float_format="%.6g"))
    roc_plot(out / "roc.png", scores, labels, names, {n: c["auroc"] for n, c in metrics["classes"].items()},
             f"zero-shot ROC: {metrics['prompt_set']}")
    atomic_write_text(out / "metrics.md", markdown(metrics))
    return out

"""`radalign finetune fewshot`: the few-shot sweep as its own recipe (setup, sweep, save): k labelled studies per
class, drawn by patient from the training split, seeded (fewshot.seeds >= 5 draws per k), each draw's list
written with its sha256.

    with open_run(cfg, checks=[check_ks]) as run:   # finetune.session: lock, table, export, cached embeddings
        run_fewshot(run)                             # every method over every (k, draw); fewshot.json, report.md

Methods (finetune.fewshot): `prompt_init`, a logistic head on the frozen image embedding initialised at the
zero-shot prompt classifier and pulled toward it (so k=0 is the zero-shot result), `linear_probe` (L2 logistic
regression on the same embedding) and `fusion` (the fusion head on every modality, fixed steps). The recipes
are fixed (no early stopping), so no validation set is used: the curve is scored on the test split.

Writes RUN/fewshot.json (every method's summary and per-draw AUROCs, the zero-shot point), RUN/draws/,
RUN/learning_curve.png and RUN/report.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from radalign.finetune.config import FinetuneConfig, fewshot_ks
from radalign.finetune.fewshot import (
    draw_k_per_class,
    linear_probe_method,
    model_method,
    plot_learning_curve,
    prompt_init,
    prompt_init_method,
    run_sweep,
    write_sweep,
)
from radalign.finetune.inputs import task_labels
from radalign.finetune.registry import build_model, model_specs
from radalign.finetune.session import open_run
from radalign.pretrain.classifier import logit_scale_of, text_weights
from radalign.pretrain.prompts import load_prompt_set

from radalign import RadalignError
from radalign import report as R
from radalign.io import atomic_write_text
from radalign.metrics import auroc

METRICS_STAGE = "fewshot"  # RUN/fewshot.json format: radalign-fewshot-metrics/1
UNIT = "study (AUROC); draws by patient"


def zero_shot_head(run) -> tuple[np.ndarray, float]:
    """(w0, b0) of the zero-shot binary classifier of fewshot.label under the export's prompts."""
    f = run.cfg.fewshot
    ps = load_prompt_set(f.prompts)
    if f.label not in ps.class_names:
        raise RadalignError(f"fewshot.label {f.label!r} has no prompts in prompt set {f.prompts!r} (classes: "
                            f"{', '.join(ps.class_names)}); drop prompt_init from fewshot.methods or add prompts")
    if ps.mode != "binary":
        raise RadalignError(f"prompt set {f.prompts!r} is {ps.mode}; prompt_init needs positive and negative "
                            "prompts (a binary prompt set)")
    tw = text_weights(run.encoders, ps.subset([f.label]))
    return prompt_init(tw.positive[0].numpy(), tw.negative[0].numpy(), logit_scale_of(run.encoders))


def check_ks(cfg, table) -> None:
    """Every k of fewshot.ks against the training split, before any draw is fitted: each (k, seed) is drawn
    once here exactly as the sweep will draw it (draws are cheap, fits are not); one error lists every k that
    cannot be drawn, with the labelled patients per class available."""
    f, d = cfg.fewshot, cfg.data
    pool = table.split(d.train_split).reset_index(drop=True)
    y = task_labels(pool, cfg.task)[:, 0]  # [N]
    exclude = {str(p) for s in (d.val_split, d.test_split) for p in table.split(s)["subject_id"]}
    patients = pool["subject_id"].astype(str).to_numpy()
    bad = []
    for k in fewshot_ks(f):
        if k == "all":
            continue
        for seed in range(f.seeds):
            try:
                draw_k_per_class(y, patients, pool["study_id"], k, seed, exclude_patients=exclude)
            except RadalignError as e:
                bad.append(f"k={k} (seed {seed}: {e})")
                break
    if bad:
        ok = ~np.isnan(y) & ~np.isin(patients, list(exclude))
        avail = ", ".join(f"class {int(c)}: {len(set(patients[ok & (y == c)]))}" for c in np.unique(y[ok]))
        raise RadalignError(f"fewshot.ks={list(f.ks)}: {'; '.join(bad)}. Patients with a labelled "
                            f"{cfg.task.labels[0]!r} example in split {d.train_split!r} (outside "
                            f"validation/test): {avail or 'none'}. Fix: keep every k at most the smallest of these "
                            "(fewer when patients have examples of both classes), or use k=all")


def _methods(run, pool, test) -> dict:
    f = run.cfg.fewshot
    out, zs = {}, None
    needs_image = {"prompt_init", "linear_probe"} & set(f.methods)
    if needs_image and run.train.image is None:
        raise RadalignError("fewshot: prompt_init and linear_probe use the image embedding; add image to "
                            "data.modalities")
    x_pool, x_test = (pool.image, test.image) if needs_image else (None, None)
    if "prompt_init" in f.methods:
        w0, b0 = zero_shot_head(run)
        out["prompt_init"] = prompt_init_method(x_pool, x_test, w0, b0, l2=f.l2)
        zs = np.asarray(x_test, np.float64) @ w0 + b0
    if "linear_probe" in f.methods:
        out["linear_probe"] = linear_probe_method(x_pool, x_test, C=f.probe_C)
    if "fusion" in f.methods:
        spec = model_specs(run)["fusion"]

        def make(seed):
            torch.manual_seed(seed)
            return build_model(spec)
        out["fusion"] = model_method(make, pool.batch(), test.batch(), task="binary", steps=f.steps,
                                     lr=run.cfg.optim.lr, weight_decay=run.cfg.optim.weight_decay)
    return out, zs


def run_fewshot(run) -> dict:
    """The sweep on a set-up run (finetune.session); writes RUN/fewshot.json, draws/, learning_curve.png and
    report.md, and returns fewshot.json's document."""
    cfg, f = run.cfg, run.cfg.fewshot
    pool, test = run.train, run.test
    y_pool, y_test = pool.y[:, 0], test.y[:, 0]
    methods, zs_scores = _methods(run, pool, test)
    zs = None
    if zs_scores is not None:
        keep = ~np.isnan(y_test)
        zs = auroc(y_test[keep].astype(int), zs_scores[keep])
    results = []
    exclude = set(map(str, run.val.subjects)) | set(map(str, test.subjects))
    for name, method in methods.items():
        res = run_sweep(method, y_pool, pool.subjects, pool.studies, eval_y=y_test, ks=fewshot_ks(f),
                        seeds=range(f.seeds), exclude_patients=exclude, zero_shot_auroc=zs, method_name=name,
                        progress=cfg.progress)
        write_sweep(run.run_dir, res)
        results.append(res)
    plot_learning_curve(results, run.run_dir / "learning_curve.png")
    doc = {"task": cfg.task.name, "label": f.label, "eval_split": cfg.data.test_split, "zero_shot_auroc": zs,
           "prompts": f.prompts,
           "eval_rows": int((~np.isnan(y_test)).sum()), "eval_positives": int(np.nansum(y_test)),
           "validation": "none: fixed recipes, no early stopping",
           "methods": {r.method: {"summary": r.summary, "per_draw": r.per_draw} for r in results}}
    doc = R.write_metrics(run.run_dir / "fewshot.json", doc, stage=METRICS_STAGE, unit=UNIT)
    atomic_write_text(run.run_dir / "report.md", format_report(doc))
    line = "; ".join(f"{r.method} " + ", ".join(f"k={k}: {R.num(r.summary[str(k)]['mean'])}" for k in r.ks)
                     for r in results)
    run.say(f"few-shot {f.label} (test AUROC, mean of {f.seeds} draws): zero-shot {R.num(zs)}; {line}")
    return doc


def run_fewshot_recipe(cfg: FinetuneConfig, overwrite: bool = False) -> Path:
    """`radalign finetune fewshot`: the sweep under the run folder's lock (finetune.session.open_run); the ks
    are checked against the training split before the towers load. The config's fewshot section is the
    recipe's (fewshot.enabled=true, which the `fewshot` verb sets, so the config's checks cover it)."""
    if not cfg.fewshot.enabled:
        raise RadalignError("fewshot.enabled=false: the few-shot recipe runs a config whose fewshot section is "
                            "enabled; load it with the override fewshot.enabled=true (the `radalign finetune "
                            "fewshot` verb does)")
    with open_run(cfg, overwrite, checks=[check_ks]) as run:
        run_fewshot(run)
    return Path(cfg.run_dir)


def format_report(doc: dict) -> str:
    """RUN/report.md of a few-shot sweep: one section per method, k against the mean AUROC and its interval."""
    lines = [f"# Few-shot: {R.md(doc['label'])}", "",
             f"AUROC on the {R.md(doc['eval_split'])} split ({doc['eval_rows']} labelled studies, "
             f"{doc['eval_positives']} positive), mean over seeded draws with a 95% t-interval over draws. "
             "Draws are k studies per class from distinct training patients; every draw's study list and "
             f"sha256 is in draws/. Zero-shot (k=0, prompts {R.md(doc['prompts'])}): "
             f"{R.num(doc['zero_shot_auroc'])}. {R.md(doc['validation'])}.", ""]
    for method, m in doc["methods"].items():
        lines += [f"## {R.md(method)}", ""]
        lines += R.md_table(["k", "mean AUROC [95% interval over draws]", "draws"],
                            [[str(k), R.ci_of(s, "mean"), s["n_draws"]] for k, s in m["summary"].items()])
        lines.append("")
    lines.append("![learning curve](learning_curve.png)")
    return "\n".join(lines) + "\n"

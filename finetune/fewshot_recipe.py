"""`radalign finetune fewshot`: the few-shot sweep as its own recipe (setup, sweep, save): k labelled studies per
class, drawn by patient from the training split, seeded (fewshot.seeds >= 5 draws per k), each draw's list
written with its sha256.

    with open_run(cfg, checks=[check_ks]) as run:   # finetune.session: lock, table, export, cached embeddings
        run_fewshot(run)                             # every method over every (k, draw); fewshot.json, report.md

Methods: `anchored` (finetune.fewshot_heads.AnchoredLogistic, CLAP's zero-shot-initialised linear probe as a MAP
fit: its prior sits at the zero-shot prompt classifier with weight fewshot.lam0 examples, so k=0 IS zero-shot and
the pull lam / (lam + n) shrinks with k; the cross-validation inside the shots may weaken it), `linear_probe`
(L2 logistic regression on the same frozen image embedding) and `fusion` (the fusion head on every modality,
fixed steps). The zero-shot row is the prompt classifier on the test split. No validation set is used: the curve
is scored on the test split. bench/fewshot_heads.py runs the same methods (head_method, linear_probe_method)
over the same draws.

Writes RUN/fewshot.json (every method's summary and per-draw AUROCs with the anchored head's pull, the zero-shot
point), RUN/draws/, RUN/learning_curve.png and RUN/report.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from radalign.finetune.config import FinetuneConfig, fewshot_ks
from radalign.finetune.fewshot import (
    VALIDATION,
    draw_k_per_class,
    head_method,
    linear_probe_method,
    model_method,
    plot_learning_curve,
    run_sweep,
    write_sweep,
)
from radalign.finetune.fewshot_heads import ZeroShotInit, anchored_head
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


def zero_shot_init(encoders, label: str, prompts: str) -> ZeroShotInit:
    """The zero-shot binary classifier of `label` under the export's prompts (set `prompts`): the positive and
    negative text prototypes [2, D] and the export's logit scale."""
    ps = load_prompt_set(prompts)
    if label not in ps.class_names:
        raise RadalignError(f"fewshot.label {label!r} has no prompts in prompt set {prompts!r} (classes: "
                            f"{', '.join(ps.class_names)}); drop anchored from fewshot.methods or add prompts")
    if ps.mode != "binary":
        raise RadalignError(f"prompt set {prompts!r} is {ps.mode}; the anchored head needs positive and negative "
                            "prompts (a binary prompt set)")
    tw = text_weights(encoders, ps.subset([label]))
    return ZeroShotInit(np.stack([tw.positive[0].numpy(), tw.negative[0].numpy()]), logit_scale_of(encoders))


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


def _methods(run, pool, test) -> tuple[dict, np.ndarray | None]:
    """({name: (Method, ks)}, the zero-shot logits on the test split or None without the anchored head)."""
    f = run.cfg.fewshot
    ks = fewshot_ks(f)
    out, zs = {}, None
    needs_image = {"anchored", "linear_probe"} & set(f.methods)
    if needs_image and run.train.image is None:
        raise RadalignError("fewshot: anchored and linear_probe use the image embedding; add image to "
                            "data.modalities")
    if "anchored" in f.methods:
        init = zero_shot_init(run.encoders, f.label, f.prompts)
        zs = init.logit(test.image)  # [m]
        out["anchored"] = (head_method(lambda: anchored_head(f.lam0), pool.image, test.image, pool.subjects, init),
                           [0, *ks])  # k = 0: no shots, the zero-shot head itself
    if "linear_probe" in f.methods:
        out["linear_probe"] = (linear_probe_method(pool.image, test.image, C=f.probe_C), ks)
    if "fusion" in f.methods:
        spec = model_specs(run)["fusion"]

        def make(seed):
            torch.manual_seed(seed)
            return build_model(spec)
        out["fusion"] = (model_method(make, pool.batch(), test.batch(), task="binary", steps=f.steps,
                                      lr=run.cfg.optim.lr, weight_decay=run.cfg.optim.weight_decay), ks)
    return out, zs


def run_fewshot(run) -> dict:
    """The sweep on a set-up run (finetune.session); writes RUN/fewshot.json, draws/, learning_curve.png and
    report.md, prints the curve's summary line, and returns fewshot.json's document."""
    cfg, f = run.cfg, run.cfg.fewshot
    pool, test = run.train, run.test
    y_pool, y_test = pool.y[:, 0], test.y[:, 0]
    methods, zs_scores = _methods(run, pool, test)
    keep = ~np.isnan(y_test)
    zs = None if zs_scores is None else auroc(y_test[keep].astype(int), zs_scores[keep])
    results = []
    exclude = set(map(str, run.val.subjects)) | set(map(str, test.subjects))
    for name, (method, ks) in methods.items():
        res = run_sweep(method, y_pool, pool.subjects, pool.studies, eval_y=y_test, ks=ks,
                        seeds=range(f.seeds), exclude_patients=exclude, zero_shot_auroc=zs, method_name=name,
                        progress=cfg.progress)
        write_sweep(run.run_dir, res)
        results.append(res)
    plot_learning_curve(results, run.run_dir / "learning_curve.png")
    doc = {"task": cfg.task.name, "label": f.label, "eval_split": cfg.data.test_split, "zero_shot_auroc": zs,
           "prompts": f.prompts, "label_policy": {"uncertain": cfg.task.uncertain, "blank": cfg.task.blank},
           "eval_rows": int(keep.sum()), "eval_positives": int(np.nansum(y_test)), "validation": VALIDATION,
           "methods": {r.method: {"ks": [str(k) for k in r.ks], "summary": r.summary, "per_draw": r.per_draw}
                       for r in results}}
    doc = R.write_metrics(run.run_dir / "fewshot.json", doc, stage=METRICS_STAGE, unit=UNIT)
    atomic_write_text(run.run_dir / "report.md", format_report(doc))
    run.say(summary_line(doc, f.seeds))
    return doc


def summary_line(doc: dict, seeds: int) -> str:
    """The curve in one line: per k, zero-shot / each method's mean test AUROC over the draws."""
    methods = doc["methods"]
    ks = list(dict.fromkeys(k for m in methods.values() for k in m["ks"] if k != "0"))
    cols = ["zero-shot", *methods]
    cells = [f"{k}: " + "/".join([R.num(doc["zero_shot_auroc"])] +
                                 [R.num(m["summary"][k]["mean"]) if k in m["summary"] else "-"
                                  for m in methods.values()]) for k in ks]
    return (f"few-shot {doc['label']} ({doc['eval_split']} AUROC, mean of {seeds} draws; k: {' / '.join(cols)}): "
            + ", ".join(cells))


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
    """RUN/report.md of a few-shot sweep: one section per method, k against the mean AUROC and its interval (and
    the anchored head's mean pull toward zero-shot)."""
    pol = doc["label_policy"]
    lines = [f"# Few-shot: {R.md(doc['label'])}", "",
             f"AUROC on the {R.md(doc['eval_split'])} split ({doc['eval_rows']} labelled studies, "
             f"{doc['eval_positives']} positive; labels: uncertain {R.md(pol['uncertain'])}, blank "
             f"{R.md(pol['blank'])}), mean over seeded draws with a 95% t-interval over draws. "
             "Draws are k studies per class from distinct training patients; every draw's study list and "
             f"sha256 is in draws/. Zero-shot (k=0, prompts {R.md(doc['prompts'])}): "
             f"{R.num(doc['zero_shot_auroc'])}. Validation: {R.md(doc['validation'])}.", ""]
    for method, m in doc["methods"].items():
        pull = any("pull" in s for s in m["summary"].values())
        lines += [f"## {R.md(method)}", ""]
        if pull:
            lines += ["pull: the zero-shot prior's share of the fit, lam / (lam + n), mean over draws (1 = zero-shot).",
                      ""]
        rows = [[str(k), R.ci_of(s, "mean"), s["n_draws"]] + ([R.num(s.get("pull"))] if pull else [])
                for k, s in m["summary"].items()]
        lines += R.md_table(["k", "mean AUROC [95% interval over draws]", "draws"] + (["pull"] if pull else []),
                            rows)
        lines.append("")
    lines.append("![learning curve](learning_curve.png)")
    return "\n".join(lines) + "\n"

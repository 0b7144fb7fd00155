"""`radalign finetune fewshot`: the few-shot sweep as its own recipe (setup, sweep, save): k labelled studies per
class, drawn by patient from the training split, seeded (fewshot.seeds >= 5 draws per k), each draw's list
written with its sha256.

    with open_run(cfg, checks=[check_ks]) as run:   # finetune.session: lock, table, export, cached embeddings
        run_fewshot(run)                             # every method over every (k, draw); fewshot.json, report.md

Methods: `anchored` (finetune.fewshot_heads.AnchoredLogistic, CLAP's zero-shot-initialised linear probe as a MAP
fit with its prior at the zero-shot prompt classifier: below fewshot.min_patients_adapt (64) patients per class it
IS the zero-shot head; from there patient-grouped cross-validation inside the shots picks the prior's weight from a grid scaled by
fewshot.lam0, the strongest pull within one corrected standard error of the best, kept only if a nested
cross-validation of that choice beats zero-shot by one standard error; seeded by the shots, so the
rows every seed draws at k=all are fitted once and reused, counted as n_reused), `linear_probe`
(L2 logistic regression on the same frozen image embedding) and any registry model fitted on the shots alone
(finetune.registry.fewshot_method: `fusion`, `early_fusion`, `image_only`, `text_only`, `ehr_only` with fixed
steps, `gbdt` with its fixed iterations). The zero-shot row is the prompt classifier on the test split; a label
without prompts (fewshot.prompts empty, or a label the prompt set lacks: in-hospital mortality) has none, which
the JSON, the report, the summary line and the curve say with the reason (the config check refuses `anchored`
there). No validation set is used: the curve is scored on the test split. bench/fewshot_heads.py runs the same
methods (head_method, linear_probe_method) over the same draws.

Writes RUN/fewshot.json (every method's summary and per-draw AUROCs with the anchored head's pull, the zero-shot
point or why there is none, every skipped (method, k, seed) with its reason and the counts by reason),
RUN/draws/, RUN/learning_curve.png and RUN/report.md.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from radalign.finetune.config import (
    BASELINES,
    FEWSHOT_REGISTRY_METHODS,
    FinetuneConfig,
    fewshot_ks,
    prompt_free_reason,
)
from radalign.finetune.fewshot import (
    VALIDATION,
    draw_k_per_class,
    head_method,
    linear_probe_method,
    plot_learning_curve,
    run_sweep,
    skipped_by_reason,
    write_sweep,
)
from radalign.finetune.fewshot_heads import ZeroShotInit, anchored_head, patients_per_class
from radalign.finetune.inputs import task_labels
from radalign.finetune.registry import fewshot_method, gbdt_spec, model_specs
from radalign.finetune.session import open_run
from radalign.pretrain.classifier import logit_scale_of, text_weights
from radalign.pretrain.prompts import load_prompt_set

from radalign import RadalignError
from radalign import report as R
from radalign.io import atomic_write_text
from radalign.metrics import auroc

METRICS_STAGE = "fewshot"  # RUN/fewshot.json format: radalign-fewshot-metrics/1
UNIT = "study (AUROC); draws by patient"
FITTED_ON = ("the drawn rows only (labels and features); the EHR scaling (median/IQR, no labels) and the cached "
             "frozen-tower embeddings come from the whole training split, as in `finetune train`")


def zero_shot_init(encoders, label: str, prompts: str) -> ZeroShotInit:
    """The zero-shot binary classifier of `label` under the export's prompts (set `prompts`): the positive and
    negative text prototypes [2, D] and the export's logit scale."""
    why = prompt_free_reason(label, prompts)  # the config check's own reason
    if why is not None:
        raise RadalignError(f"{why}: drop anchored from fewshot.methods or add prompts")
    tw = text_weights(encoders, load_prompt_set(prompts).subset([label]))
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


def _methods(run, pool, test, no_zero_shot: str | None) -> tuple[dict, np.ndarray | None]:
    """({name: (Method, ks)} in fewshot.methods' order, the zero-shot logits on the test split or None when there
    is no zero-shot point (`no_zero_shot`: why; the config check refuses image methods without the image)."""
    f = run.cfg.fewshot
    ks = fewshot_ks(f)
    out, zs, init = {}, None, None
    if no_zero_shot is None:
        init = zero_shot_init(run.encoders, f.label, f.prompts)
        zs = init.logit(test.image)  # [m]
    specs = registry_specs(run, [m for m in f.methods if m in FEWSHOT_REGISTRY_METHODS])
    for name in f.methods:
        if name == "anchored":  # the config check refuses it for a label without prompts (init is None)
            head = head_method(lambda: anchored_head(f.lam0, f.probe_C, f.min_patients_adapt), pool.image, test.image, pool.subjects, init)
            out[name] = (head, [0, *ks])  # k = 0: no shots, the zero-shot head itself
        elif name == "linear_probe":
            out[name] = (linear_probe_method(pool.image, test.image, C=f.probe_C), ks)
        else:
            out[name] = (fewshot_method(specs[name], pool, test, steps=f.steps, lr=run.cfg.optim.lr,
                                        weight_decay=run.cfg.optim.weight_decay,
                                        batch_size=run.cfg.optim.batch_size), ks)
    return out, zs


def registry_specs(run, names) -> dict[str, dict]:
    """The registry's spec of each named few-shot method (finetune.registry.model_specs and gbdt_spec, as the
    training recipe builds them), whatever baselines.models says: the few-shot methods are fewshot.methods."""
    cfg = replace(run.cfg, baselines=replace(run.cfg.baselines, models=list(BASELINES),
                                             fusion_without_dropout=False))
    specs = {**model_specs(replace(run, cfg=cfg)), "gbdt": gbdt_spec(run)}
    return {n: specs[n] for n in names}


def no_zero_shot_reason(cfg) -> str | None:
    """Why the curve has no zero-shot point (None: it has one)."""
    why = prompt_free_reason(cfg.fewshot.label, cfg.fewshot.prompts)
    if why is None and "image" not in cfg.data.modalities:
        why = "the run has no image modality (the prompt classifier scores the image embedding)"
    return None if why is None else (f"no zero-shot point: {why}, and a zero-shot classifier is a label's text "
                                     "prompts against the image embedding")


def run_fewshot(run) -> dict:
    """The sweep on a set-up run (finetune.session); writes RUN/fewshot.json, draws/, learning_curve.png and
    report.md, prints the curve's summary line, and returns fewshot.json's document."""
    cfg, f = run.cfg, run.cfg.fewshot
    pool, test = run.train, run.test
    y_pool, y_test = pool.y[:, 0], test.y[:, 0]
    why = no_zero_shot_reason(cfg)
    methods, zs_scores = _methods(run, pool, test, why)
    keep = ~np.isnan(y_test)
    zs = None if zs_scores is None else auroc(y_test[keep].astype(int), zs_scores[keep])
    results = []
    exclude = set(map(str, run.val.subjects)) | set(map(str, test.subjects))
    for name, (method, ks) in methods.items():
        res = run_sweep(method, y_pool, pool.subjects, pool.studies, eval_y=y_test, ks=ks,
                        seeds=range(f.seeds), exclude_patients=exclude, zero_shot_auroc=zs, method_name=name,
                        progress=cfg.progress, no_zero_shot=why)
        write_sweep(run.run_dir, res)
        results.append(res)
    plot_learning_curve(results, run.run_dir / "learning_curve.png")
    doc = {"task": cfg.task.name, "label": f.label, "eval_split": cfg.data.test_split, "zero_shot_auroc": zs,
           "no_zero_shot": why, "prompts": f.prompts,
           "label_policy": {"uncertain": cfg.task.uncertain, "blank": cfg.task.blank},
           "eval_rows": int(keep.sum()), "eval_positives": int(np.nansum(y_test)), "validation": VALIDATION,
           "fitted_on": FITTED_ON, "skipped": _skipped(results),
           **_anchored_floor(f, y_pool, pool.subjects, exclude, methods),
           "methods": {r.method: {"ks": [str(k) for k in r.ks], "summary": r.summary, "per_draw": r.per_draw}
                       for r in results}}
    doc = R.write_metrics(run.run_dir / "fewshot.json", doc, stage=METRICS_STAGE, unit=UNIT)
    atomic_write_text(run.run_dir / "report.md", format_report(doc))
    run.say(summary_line(doc, f.seeds))
    note = floor_note(doc)
    if note:
        run.say(note)
    return doc


def _anchored_floor(f, y_pool, subjects, exclude, methods) -> dict:
    """{"anchored_floor": the head's min_patients_adapt and the patients of the drawable pool's rarer class
    (labelled, validation and test patients excluded, as the draws exclude them)} when the anchored head runs: a
    pool below the floor keeps the head zero-shot at every k, k = all included."""
    if "anchored" not in methods:
        return {}
    subjects = np.asarray(subjects).astype(str)
    keep = ~np.isnan(y_pool) & ~np.isin(subjects, sorted(exclude))
    return {"anchored_floor": {"min_patients_adapt": f.min_patients_adapt,
                               "pool_patients_per_class": patients_per_class(y_pool[keep], subjects[keep])}}


def floor_note(doc: dict) -> str | None:
    """One sentence when the pool's rarer class has fewer patients than the anchored head's floor, else None."""
    fl = doc.get("anchored_floor")
    if not fl or fl["pool_patients_per_class"] >= fl["min_patients_adapt"]:
        return None
    return (f"anchored: the training pool holds {fl['pool_patients_per_class']} patients of its rarer class, fewer "
            f"than fewshot.min_patients_adapt ({fl['min_patients_adapt']}), so the head is the zero-shot head at "
            "every k, all included; where zero-shot is weak, compare linear_probe, or lower the floor (8 was the "
            "rule until 2026-12-06; docs/fewshot-head.md)")


def _skipped(results) -> dict:
    """Every skipped (method, k, seed) with its reason, and the counts by reason (over all methods)."""
    draws = [{"method": r.method, "k": d["k"], "seed": d["seed"], "reason": d["skipped"]}
             for r in results for d in r.per_draw if "skipped" in d]
    return {"total": len(draws), "by_reason": skipped_by_reason([{"skipped": d["reason"]} for d in draws]),
            "draws": draws}


def summary_line(doc: dict, seeds: int) -> str:
    """The curve in one line: per k, zero-shot / each method's mean test AUROC over the draws."""
    methods = doc["methods"]
    ks = list(dict.fromkeys(k for m in methods.values() for k in m["ks"] if k != "0"))
    zs = [] if doc.get("no_zero_shot") else [R.num(doc["zero_shot_auroc"])]
    cols = ["zero-shot"][:len(zs)] + list(methods)
    cells = [f"{k}: " + "/".join(zs + [R.num(m["summary"][k]["mean"]) if k in m["summary"] else "-"
                                       for m in methods.values()]) for k in ks]
    tail = f" ({doc['no_zero_shot']})" if doc.get("no_zero_shot") else ""
    skipped = f"; {doc['skipped']['total']} draw(s) skipped" if doc.get("skipped", {}).get("total") else ""
    return (f"few-shot {doc['label']} ({doc['eval_split']} AUROC, mean of {seeds} draws; k: {' / '.join(cols)}): "
            + ", ".join(cells) + skipped + tail)


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


def _zero_shot_sentence(doc: dict) -> str:
    if doc.get("no_zero_shot"):
        return f"There is {R.md(doc['no_zero_shot'])}."
    return f"Zero-shot (k=0, prompts {R.md(doc['prompts'])}): {R.num(doc['zero_shot_auroc'])}."


def _skipped_lines(skipped: dict) -> list[str]:
    if not skipped["total"]:
        return ["Skipped draws: none.", ""]
    return [f"Skipped draws: {skipped['total']} (method, k, seed in fewshot.json), by reason:", "",
            *R.md_table(["reason", "draws"], [[R.md(r), n] for r, n in skipped["by_reason"].items()]), ""]


def format_report(doc: dict) -> str:
    """RUN/report.md of a few-shot sweep: one section per method, k against the mean AUROC and its interval (and
    the anchored head's mean pull toward zero-shot)."""
    pol = doc["label_policy"]
    lines = [f"# Few-shot: {R.md(doc['label'])}", "",
             f"AUROC on the {R.md(doc['eval_split'])} split ({doc['eval_rows']} labelled studies, "
             f"{doc['eval_positives']} positive; labels: uncertain {R.md(pol['uncertain'])}, blank "
             f"{R.md(pol['blank'])}), mean over seeded draws with a 95% t-interval over draws. "
             "Draws are k studies per class from distinct training patients; every draw's study list and "
             f"sha256 is in draws/. {_zero_shot_sentence(doc)} Validation: {R.md(doc['validation'])}. Fitted on: "
             f"{R.md(doc['fitted_on'])}.", "", *_skipped_lines(doc["skipped"])]
    note = floor_note(doc)
    if note:
        lines += [R.md(note) + ".", ""]
    for method, m in doc["methods"].items():
        pull = any("pull" in s for s in m["summary"].values())
        lines += [f"## {R.md(method)}", ""]
        if pull:
            lines += ["pull: the zero-shot prior's share of the fit, lam / (lam + n), mean over draws (1 = zero-shot).",
                      ""]
        rows = [[str(k), R.ci_of(s, "mean"), s["n_draws"]] + ([R.num(s.get("pull"))] if pull else [])
                + [s["n_skipped"]] for k, s in m["summary"].items()]
        lines += R.md_table(["k", "mean AUROC [95% interval over draws]", "draws"] + (["pull"] if pull else [])
                            + ["skipped"], rows)
        lines.append("")
    lines.append("![learning curve](learning_curve.png)")
    return "\n".join(lines) + "\n"

"""`radalign finetune train`: the fusion model and its baselines on one clinical task, as one recipe.

    with open_run(cfg) as run:            # setup (finetune.session): lock, table, export, overlap, EHR scaling,
                                          # cached tower embeddings
        scores = train(run)               # fusion (+ without modality dropout), image/text/EHR only, early fusion:
                                          # each by finetune.trainer.fit_torch; late fusion, gradient-boosted trees
        save_outputs(run, scores)         # predictions.csv, metrics.json, report.md, roc.png (finetune.report)

Every model comes from the registry (finetune.registry: spec, builder, logits, save/load) and is saved to
RUN/models, so `finetune predict` and `finetune eval` score each of them. The towers are frozen: their
embeddings are computed once and cached (finetune.inputs), so the trained models are small and every process
holds the whole data set in memory. Few-shot is its own recipe (finetune.fewshot_recipe).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from radalign.finetune.config import FinetuneConfig
from radalign.finetune.registry import (
    DEGRADATION_MODELS,
    SEEDS_DIR,
    build_model,
    degradation_logits,
    gbdt_inputs,
    gbdt_spec,
    late_fusion_spec,
    model_logits,
    model_specs,
    save_model,
    seed_model_name,
)
from radalign.finetune.report import save_outputs
from radalign.finetune.session import Run, open_run
from radalign.finetune.tasks import as_matrix, n_outputs, targets, task_scores
from radalign.finetune.trainer import fit_torch

from radalign import RadalignError


@dataclass
class Scores:
    """Logits per model on validation and test ([N] each: the task's one output)."""

    val: dict[str, np.ndarray] = field(default_factory=dict)
    test: dict[str, np.ndarray] = field(default_factory=dict)
    degradation: dict = field(default_factory=dict)  # {model: {condition: test logits}}
    degradation_seeds: dict = field(default_factory=dict)  # {model: [{condition: test logits}] per training seed}
    info: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)  # {name: (model, spec)} of the trained models
    test_inputs: dict = field(default_factory=dict)  # {name: the test split it was scored on (see _own_inputs)}


def train(run: Run) -> Scores:
    """Every model of the task, trained (or reused from RUN/models) and scored on validation and test."""
    t0 = time.perf_counter()
    scores = Scores()
    for name, spec in model_specs(run).items():
        run.say(f"== {name}")
        model, info = fit_torch(run, name, spec)
        _score(run, scores, name, model, spec, {k: v for k, v in info.items() if k != "spec"})
    fit_late_fusion(run, scores)
    if "gbdt" in run.cfg.baselines.models and "ehr" in run.modalities:
        fit_gbdt(run, scores)
    for name in DEGRADATION_MODELS if run.cfg.task.kind == "binary" else ():  # binary only: said in report.md
        if name in scores.models:
            test = scores.test_inputs.get(name, run.test)
            scores.degradation[name] = degradation_logits(scores.models[name][0], test, run.modalities)
    _degradation_seeds(run, scores)
    run.seconds["train"] = round(time.perf_counter() - t0, 2)
    return scores


def _score(run: Run, scores: Scores, name: str, model, spec: dict, info: dict) -> None:
    val, test = _own_inputs(model, run.val), _own_inputs(model, run.test)
    scores.models[name], scores.info[name], scores.test_inputs[name] = (model, spec), info, test
    scores.val[name] = task_scores(model_logits(model, spec, val), run.cfg.task.kind)
    scores.test[name] = task_scores(model_logits(model, spec, test), run.cfg.task.kind)


def _own_inputs(model, data):
    """A tuned model's split with its study tokens (finetune.tower.study_tokens): its tower runs once per film for
    the scores and every degradation condition after them; any other model's split as it is."""
    from radalign.finetune.tower import TunedModel, study_tokens

    return study_tokens(model, data) if isinstance(model, TunedModel) else data


def _save(run: Run, name: str, model, spec: dict, info: dict) -> None:
    if run.acc.is_main_process:
        save_model(run.run_dir / "models", name, model, spec, info)
    run.acc.wait_for_everyone()


def _degradation_seeds(run: Run, scores: Scores) -> None:
    """Train the with/without-dropout pair again with seeds seed+1 .. seed+n-1: one training run's drops
    differ by a few AUROC points from seed to seed, as much as dropout's effect, so the table also reports
    them over seeds. These models go to RUN/models/degradation_seeds/ (resumable like the others)."""
    n = run.cfg.baselines.degradation_seeds
    if n <= 1 or not all(m in scores.degradation for m in DEGRADATION_MODELS):
        return
    specs = model_specs(run)
    for name in DEGRADATION_MODELS:
        scores.degradation_seeds[name] = [scores.degradation[name]]
        for seed in range(run.cfg.seed + 1, run.cfg.seed + n):
            extra = seed_model_name(name, seed)
            run.say(f"== {extra} (graceful-degradation table)")
            model, info = fit_torch(run, extra, {**specs[name], "seed": seed}, run.run_dir / "models" / SEEDS_DIR)
            scores.info[extra] = {k: v for k, v in info.items() if k != "spec"}
            scores.degradation_seeds[name].append(degradation_logits(model, run.test, run.modalities))


def fit_late_fusion(run: Run, scores: Scores) -> None:
    """The unimodal models' logits combined; the stacker is fitted on the VALIDATION split (never test)."""
    unimodal = [m for m in run.modalities if f"{m}_only" in scores.val]
    if "late_fusion" not in run.cfg.baselines.models or len(unimodal) < 2:
        return
    spec = late_fusion_spec(run, {m: f"{m}_only" for m in unimodal})
    lf = build_model(spec)
    k = n_outputs(run.cfg.task)
    lf.fit({m: as_matrix(scores.val[f"{m}_only"]) for m in unimodal}, {m: run.val.present[m] for m in unimodal},
           targets(run.val.y, run.cfg.task.kind, k))
    lf.members = {m: scores.models[f"{m}_only"] for m in unimodal}
    for split, data, target in (("val", run.val, scores.val), ("test", run.test, scores.test)):
        # = model_logits(lf, spec, data), from the members' logits already computed
        target["late_fusion"] = task_scores(lf.combine({m: as_matrix(getattr(scores, split)[f"{m}_only"])
                                                        for m in unimodal}, {m: data.present[m] for m in unimodal}),
                                            run.cfg.task.kind)
    info = {"mode": run.cfg.baselines.late_fusion, "of": [f"{m}_only" for m in unimodal],
            "fitted_on": run.cfg.data.val_split}
    scores.models["late_fusion"], scores.info["late_fusion"] = (lf, spec), info
    _save(run, "late_fusion", lf, spec, info)


def fit_gbdt(run: Run, scores: Scores) -> None:
    """Gradient-boosted trees fitted on the training split (a fixed number of iterations: no row hold-out)."""
    spec = gbdt_spec(run)
    g = build_model(spec).fit(gbdt_inputs(run.train, spec["with_image"]), run.train.y)
    info = {"inputs": "EHR features" + (" + frozen image embedding" if spec["with_image"] else ""),
            "max_iter": spec["max_iter"], "dropped_never_measured_columns": g.dropped_columns}
    _save(run, "gbdt", g, spec, info)
    _score(run, scores, "gbdt", g, spec, info)


def run_finetune(cfg: FinetuneConfig, overwrite: bool = False) -> Path:
    """The recipe under the run folder's lock (finetune.session.open_run): setup, train, save."""
    if cfg.fewshot.enabled:
        raise RadalignError("fewshot.enabled=true: this config is a few-shot sweep; run it with "
                            "`radalign finetune fewshot --config ...` (finetune.fewshot_recipe.run_fewshot_recipe)")
    with open_run(cfg, overwrite) as run:
        scores = train(run)
        if run.acc.is_main_process:
            save_outputs(run, scores)
    return Path(cfg.run_dir)

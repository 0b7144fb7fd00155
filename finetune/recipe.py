"""`radalign finetune`: the fusion model and its baselines on one clinical task, as one recipe (setup, train, save).

    run = setup(cfg)          # table, export, overlap check, EHR scaling (train split), cached embeddings
    models = train_all(run)   # fusion (+ without modality dropout), image/text/EHR only, early fusion: each
                              # trained with checkpoints and exact resume; late fusion, gradient-boosted trees
    save_outputs(run, models) # predictions.csv, metrics.json, report.md, roc.png (finetune.report)

Distribution, precision, checkpoints and logging come from radalign.training (shared with pretrain; nothing is
copied from pretrain/recipe.py). The towers are frozen: their embeddings are computed once and cached
(finetune.inputs), so the trained models are small and every process holds the whole data set in memory.

Training, per torch model: epochs over the training split in a seeded order (seed, epoch); a global batch of
`optim.batch_size x processes` rows is cut the same way whatever the number of processes, each process takes
rows rank::world, and the loss is the sum over its labelled cells divided by the global batch's count (times
world, as DDP averages), so the gradient is the one-process gradient. Modality dropout draws come from a
generator seeded by (seed, epoch, step) for the global batch, so they do not depend on the process count
either. Model selection: the epoch with the best validation AUROC (never test). A checkpoint is written at every
epoch end and at `stop_after`; resume restores the step inside the epoch, the optimizer, the schedule, the RNG
and the best weights so far, so an interrupted run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from radalign.finetune.config import FinetuneConfig
from radalign.finetune.features import EHRFeaturizer
from radalign.finetune.inputs import (
    EmbeddingCache,
    FinetuneTable,
    SplitInputs,
    check_overlap,
    class_counts,
    load_table,
    missing_columns,
    model_columns,
    split_inputs,
    task_labels,
)
from radalign.finetune.models import (
    EHREncoder,
    FusionModel,
    build_encoders,
    dropout_rates_from_presence,
    masked_loss,
)
from radalign.finetune.runspec import (
    OVERWRITE_HINT,
    changed_keys,
    check_resume_folder,
    claim_run_dir,
    resume_point,
    run_spec,
    write_run_spec,
)
from torch import nn

from radalign import RadalignError
from radalign.io import atomic_path, atomic_write_json
from radalign.log import get_logger
from radalign.training import (
    CheckpointManager,
    Meter,
    MetricLogger,
    adamw,
    cosine_schedule,
    make_accelerator,
    reset_accelerate_state,
    run_lock,
)

log = get_logger("radalign.finetune.recipe")

MODEL_FORMAT = "radalign-finetune-model/1"
NAN_HINT = "lower optim.lr or check the EHR features for extreme values"


@dataclass
class Run:
    cfg: FinetuneConfig
    run_dir: Path
    acc: Any
    precision: str
    table: FinetuneTable
    export_config: dict
    featurizer: EHRFeaturizer | None
    data: dict[str, SplitInputs]  # "train", "validate", "test" -> inputs (keys are the config's split names)
    modalities: list[str]
    spec: dict  # what shaped the models (finetune.runspec), RUN/run_spec.json
    overlap: dict = field(default_factory=dict)
    encoders: Any = None
    seconds: dict = field(default_factory=dict)

    @property
    def train(self) -> SplitInputs:
        return self.data[self.cfg.data.train_split]

    @property
    def val(self) -> SplitInputs:
        return self.data[self.cfg.data.val_split]

    @property
    def test(self) -> SplitInputs:
        return self.data[self.cfg.data.test_split]

    def say(self, msg: str) -> None:
        if self.acc.is_main_process:
            print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Setup


def check_table(cfg: FinetuneConfig, table: FinetuneTable) -> None:
    """Every problem of the task against the table, in one error: columns, splits, then whether each split's
    labels can train (train), select (validation) and score (test) a model."""
    import difflib

    cols = set(table.columns)
    problems = []
    for c in _label_columns(cfg.task):
        if c not in cols:
            close = difflib.get_close_matches(c, sorted(cols), n=3)
            problems.append(f"task label column {c!r} is not in the table"
                            + (f" (did you mean {', '.join(close)}?)" if close else ""))
    features = cfg.data.features if cfg.data.features is not None else table.features
    lacking = missing_columns(table.columns, model_columns(cfg.data.modalities, features))
    if lacking:
        problems.append(f"missing column(s) {', '.join(lacking)}: relink the table with `radalign data link-ehr`, "
                        "or drop the modality from data.modalities")
    for s in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split):
        if s not in table.splits:
            problems.append(f"split {s!r} is not in the table (it has {', '.join(table.splits)})")
    if not problems:
        problems = label_problems(cfg, table)
    if problems:
        raise RadalignError(f"{table.path}: " + "; ".join(problems))


def _label_columns(task) -> list[str]:
    return [task.threshold_column] if task.threshold_column else list(task.labels)


def _task_splits(cfg: FinetuneConfig) -> list[str]:
    """The splits whose labels the run uses: train (fit), validation (model selection; not in the few-shot
    sweep, whose recipes are fixed) and test (scores)."""
    d = cfg.data
    return [d.train_split, d.test_split] if cfg.fewshot.enabled else [d.train_split, d.val_split, d.test_split]


def label_problems(cfg: FinetuneConfig, table: FinetuneTable) -> list[str]:
    """A problem per split and label with fewer than two labelled classes, with the counts and the fix."""
    t, d = cfg.task, cfg.data
    use = {d.train_split: "nothing to learn from", d.val_split: "no model selection (validation AUROC undefined)",
           d.test_split: "no test AUROC"}
    names = [f"{t.labels[0]} ({t.threshold_column} > {t.threshold:g})"] if t.threshold_column else list(t.labels)
    problems = []
    for s in _task_splits(cfg):
        y = task_labels(table.split(s), t)  # [N, C]
        for name, counts in zip(names, class_counts(y)):
            if sum(v > 0 for v in counts.values()) >= 2:
                continue
            n = sum(counts.values())
            what = (f"no labelled row (all {len(y)} rows are null)" if n == 0 else
                    f"one class only ({', '.join(f'{c}: {v}' for c, v in counts.items())} of {n} labelled rows)")
            problems.append(f"split {s!r}, label {name!r}: {what}: {use[s]}")
    if problems:
        problems[-1] += (". Fix: choose a label (task.labels, task.threshold) with both classes in every split, "
                         "or a table whose splits each hold both (more patients, another split), or point "
                         "data.train_split / data.val_split / data.test_split at splits that do")
    return problems


def setup(cfg: FinetuneConfig, overwrite: bool = False) -> Run:
    """Everything before training. What can refuse refuses first, before the towers load or embed: the table
    (columns, splits, labelled classes per split), the few-shot ks, the pretraining overlap, and the run folder
    (RUN/run_spec.json against this config; `overwrite` clears RUN instead). A refusal also ends the
    Accelerate state, so a later run in the same process may choose another precision."""
    t0 = time.perf_counter()
    if cfg.model.image_tower != "frozen" or cfg.data.image_patch_tokens:
        raise RadalignError(f"model.image_tower={cfg.model.image_tower}, data.image_patch_tokens="
                            f"{cfg.data.image_patch_tokens}: this release trains on cached frozen tower "
                            "embeddings (pooled) only; use model.image_tower=frozen data.image_patch_tokens=false")
    acc, precision, _ = make_accelerator(cfg.precision, find_unused_parameters=True)
    try:
        run = _setup(cfg, acc, precision, overwrite)
    except BaseException:
        acc.end_training()
        reset_accelerate_state()
        raise
    run.seconds["setup"] = round(time.perf_counter() - t0, 2)
    return run


def _setup(cfg: FinetuneConfig, acc, precision: str, overwrite: bool) -> Run:
    from radalign.pretrain.export import load_encoders

    run_dir = Path(cfg.run_dir)
    table = load_table(cfg.data.table)
    check_table(cfg, table)
    if cfg.fewshot.enabled:
        from radalign.finetune.fewshot_recipe import check_ks

        check_ks(cfg, table)
    export_config = _export_config(cfg.data.checkpoint)
    overlap = check_overlap(export_config, table, [cfg.data.val_split, cfg.data.test_split],
                            allow=cfg.data.allow_overlap)
    spec = run_spec(cfg, table, export_config, precision=precision, processes=acc.num_processes)
    claim_run_dir(run_dir, spec, resume=cfg.resume, overwrite=overwrite, main=acc.is_main_process)
    acc.wait_for_everyone()
    check_resume_folder(cfg.resume, run_dir)
    mods = list(cfg.data.modalities)
    encoders = load_encoders(cfg.data.checkpoint, device=acc.device) if {"image", "text"} & set(mods) else None
    featurizer = None
    if "ehr" in mods:
        features = cfg.data.features or table.features
        featurizer = EHRFeaturizer.fit(table.split(cfg.data.train_split), features)
    cache = EmbeddingCache(encoders, cfg.data.shards, cfg.data.cache or run_dir / "cache",
                           num_workers=cfg.num_workers, progress=cfg.progress and acc.is_main_process) \
        if encoders is not None else None
    data = {}
    with acc.main_process_first():  # the main process embeds and caches; the others read the cache
        for s in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split):
            data[s] = split_inputs(s, table.split(s), cfg.task, mods, cache=cache, featurizer=featurizer)
    run = Run(cfg, run_dir, acc, precision, table, export_config, featurizer, data, mods, spec, overlap, encoders)
    for s, d in data.items():
        run.say(f"{s}: {len(d)} studies, {d.counts['labelled']} labelled, "
                f"{int(np.nansum(d.y[:, 0]))} positive; present {d.counts['present']}")
    if cache is not None and any(cache.lost.values()):
        run.say(f"films lost on read, by shard split and reason: {cache.lost}")
    return run


def _export_config(path) -> dict:
    from radalign.pretrain.export import find_export

    return json.loads((find_export(path) / "config.json").read_text())


# ----------------------------------------------------------------------------------------------------------
# Models: a JSON spec per model (saved beside its weights, so `finetune predict` rebuilds it)


def model_specs(run: Run) -> dict[str, dict]:
    cfg, m = run.cfg, run.cfg.model
    dims = {"image_dim": run.train.image.shape[1] if run.train.image is not None else 0,
            "text_dim": run.train.text.shape[1] if run.train.text is not None else 0,
            "n_features": len(run.featurizer.features) if run.featurizer else 0,
            "cardinalities": run.featurizer.cardinalities if run.featurizer else []}
    common = {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "dropout": m.dropout,
              "ehr_d": m.ehr_d, "ehr_blocks": m.ehr_blocks, "ehr_heads": m.ehr_heads,
              "n_outputs": run.train.y.shape[1], "task": cfg.task.kind, "cls_sees_absent": m.cls_sees_absent,
              **dims}
    rates = dict(m.modality_dropout)
    if m.modality_dropout_from_data:
        rates = dropout_rates_from_presence(run.train.present)
    rates = {k: v for k, v in rates.items() if k in run.modalities}
    specs = {"fusion": {"kind": "fusion", "modalities": run.modalities, "modality_dropout": rates, **common}}
    if cfg.baselines.fusion_without_dropout and len(run.modalities) > 1:
        specs["fusion_no_dropout"] = {**specs["fusion"], "modality_dropout": {}}
    for mod in run.modalities:
        if f"{mod}_only" in cfg.baselines.models:
            specs[f"{mod}_only"] = {"kind": "fusion", "modalities": [mod], "modality_dropout": {}, **common}
    if "early_fusion" in cfg.baselines.models:
        specs["early_fusion"] = {"kind": "early_fusion", "modalities": run.modalities, **common}
    return specs


def build_model(spec: dict) -> nn.Module:
    from radalign.finetune.baselines import EarlyFusionModel

    mods = spec["modalities"]
    if spec["kind"] == "early_fusion":
        return EarlyFusionModel(image_dim=spec["image_dim"] if "image" in mods else 0,
                                text_dim=spec["text_dim"] if "text" in mods else 0,
                                n_features=spec["n_features"] if "ehr" in mods else 0,
                                cardinalities=spec["cardinalities"] if "ehr" in mods else (),
                                n_outputs=spec["n_outputs"], task=spec["task"], dropout=spec["dropout"])
    ehr = EHREncoder(spec["n_features"], spec["cardinalities"], d=spec["ehr_d"], n_blocks=spec["ehr_blocks"],
                     n_heads=spec["ehr_heads"], dropout=spec["dropout"]) if "ehr" in mods else None
    enc = build_encoders(spec["d_model"], image_dim=spec["image_dim"] if "image" in mods else None,
                         text_dim=spec["text_dim"] if "text" in mods else None, ehr=ehr)
    return FusionModel(enc, n_outputs=spec["n_outputs"], task=spec["task"], d_model=spec["d_model"],
                       n_layers=spec["n_layers"], n_heads=spec["n_heads"], dropout=spec["dropout"],
                       modality_dropout=spec["modality_dropout"], cls_sees_absent=spec["cls_sees_absent"])


def save_model(folder: Path, name: str, model: nn.Module, spec: dict, info: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"{name}.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    atomic_write_json(folder / f"{name}.json", {"format": MODEL_FORMAT, "name": name, "spec": spec, **info})


def load_model(folder: Path, name: str) -> tuple[nn.Module, dict]:
    """A finished model (weights + spec) from RUN/models; never a pickle."""
    from safetensors.torch import load_file

    meta_f, w_f = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not meta_f.is_file() or not w_f.is_file():
        raise RadalignError(f"{folder}: model {name!r} is not there ({meta_f.name} and {w_f.name} expected); "
                            "train it with `radalign finetune` first")
    meta = json.loads(meta_f.read_text())
    if meta.get("format") != MODEL_FORMAT:
        raise RadalignError(f"{meta_f}: format {meta.get('format')!r}, expected {MODEL_FORMAT}")
    model = build_model(meta["spec"])
    try:
        model.load_state_dict(load_file(str(w_f)))
    except Exception as e:  # safetensors raises its own error type on a truncated file
        raise RadalignError(f"{w_f}: damaged model weights ({type(e).__name__}: {e}); retrain the model "
                            f"(delete {w_f} and run `radalign finetune` again)") from None
    return model.eval(), meta


# ----------------------------------------------------------------------------------------------------------
# Training one torch model


def epoch_batches(n: int, global_batch: int, seed: int, epoch: int, world: int) -> list[np.ndarray]:
    """The global batches of an epoch (row indices), in a seeded order; a last batch smaller than the process
    count is dropped (it could leave a process without rows)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).numpy()
    out = [perm[i:i + global_batch] for i in range(0, n, global_batch)]
    return [b for b in out if len(b) >= world]


def _dropout_u(seed: int, epoch: int, step: int, rows: int, m: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 100_003 + step)
    return torch.rand(rows, m, generator=g)  # [B_global, M]


@torch.no_grad()
def logits_on(model: nn.Module, data: SplitInputs, modalities, present_override=None,
              batch_size: int = 2048) -> np.ndarray:
    """[N, C] logits of a model (eval mode) on a whole split."""
    from radalign.finetune.fit import logits_of

    was = model.training
    model.eval()
    out = []
    for i in range(0, len(data), batch_size):
        rows = np.arange(i, min(i + batch_size, len(data)))
        b = data.batch(rows, modalities)
        o = model(b, present_override=present_override) if present_override is not None else model(b)
        out.append(logits_of(o).float().cpu().numpy())
    model.train(was)
    return np.concatenate(out) if out else np.zeros((0, data.y.shape[1]), np.float32)


def val_score(model: nn.Module, data: SplitInputs, modalities) -> float:
    """Validation AUROC (mean over outputs), the model-selection criterion."""
    from radalign.metrics import auroc

    logits = logits_on(model, data, modalities)
    vals = [auroc(data.y[:, j], logits[:, j]) for j in range(data.y.shape[1])]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@dataclass
class Progress:
    epoch: int = 0
    batch: int = 0  # global batches done in `epoch`
    step: int = 0
    best: float = float("-inf")
    best_epoch: int = -1
    stale: int = 0  # epochs without improvement
    history: list = field(default_factory=list)

    def to_state(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "best": None if self.best == float("-inf") else self.best,
                "best_epoch": self.best_epoch, "stale": self.stale, "history": self.history}

    @classmethod
    def from_state(cls, step: int, s: dict) -> Progress:
        best = s.get("best")
        return cls(int(s["epoch"]), int(s["batch"]), step, float("-inf") if best is None else float(best),
                   int(s["best_epoch"]), int(s["stale"]), list(s.get("history", [])))


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


class Stopped(Exception):
    """stop_after reached (the state is checkpointed)."""


def _check_train_spec(work: Path, spec: dict, main: bool) -> None:
    """RUN/train/<name> belongs to one model spec: resuming its checkpoints under another spec would silently
    continue the old model (its weights, its dropout rates), and training over them would overwrite another
    history. Record the spec on first use; refuse a different one, naming the keys that changed."""
    path = work / "spec.json"
    if path.is_file():
        diff = changed_keys(json.loads(path.read_text()), json.loads(json.dumps(spec)))  # JSON types on both sides
        if diff:
            raise RadalignError(f"{work} holds checkpoints of another {work.name} model (changed: "
                                f"{'; '.join(diff)}); use another run_dir, or {OVERWRITE_HINT} to train anew")
    elif main:
        atomic_write_json(path, spec)


def fit_torch(run: Run, name: str, spec: dict, models_dir: Path | None = None) -> tuple[nn.Module, dict]:
    """Train one model (or reuse it when `models_dir`, default RUN/models, holds it); returns the
    best-on-validation model. spec["seed"], when given, replaces the run's seed (initialisation, epoch order,
    modality-dropout draws): the degradation table's extra training seeds."""
    from safetensors.torch import load_file, save_file

    cfg, acc = run.cfg, run.acc
    seed = int(spec.get("seed", cfg.seed))
    models_dir = models_dir or run.run_dir / "models"
    if (models_dir / f"{name}.json").is_file():  # RUN/run_spec.json matched the config (finetune.runspec)
        model, meta = load_model(models_dir, name)
        diff = changed_keys(meta["spec"], json.loads(json.dumps(spec)))
        if diff:
            raise RadalignError(f"{models_dir / name}.json: a {name} model of another spec (changed: "
                                f"{'; '.join(diff)}); use another run_dir, or {OVERWRITE_HINT} to train anew")
        run.say(f"{name}: finished earlier (best validation AUROC {_fmt(meta['best_val_auroc'])}); reused")
        return model, meta
    torch.manual_seed(seed)
    model = build_model(spec)
    work = run.run_dir / "train" / name
    opt = adamw(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    world, rank = acc.num_processes, acc.process_index
    global_batch = cfg.optim.batch_size * world
    # Rows without any label add nothing to the loss, only compute: an epoch is a pass over the labelled rows.
    labelled = np.flatnonzero((~np.isnan(run.train.y)).any(1))  # [N_labelled] rows of run.train
    per_epoch = len(epoch_batches(len(labelled), global_batch, seed, 0, world))
    total = per_epoch * cfg.optim.epochs
    sched = cosine_schedule(opt, min(cfg.optim.warmup_steps, max(total // 10, 1)), total)
    model, opt = acc.prepare(model, opt)
    if acc.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    ckpt = CheckpointManager(work, keep=2, accelerator=acc)
    logger = MetricLogger(work, main=acc.is_main_process, tensorboard=False)
    prog, best_state = Progress(), None
    _check_train_spec(work, spec, acc.is_main_process)
    found = resume_point(ckpt, name, cfg.resume, run.run_dir)
    if found is not None:
        loaded = ckpt.load(found, model=model, optimizer=opt, scheduler=sched)
        prog = Progress.from_state(loaded.step, loaded.state)
        from radalign.training import set_rng_state

        set_rng_state(loaded.rng)
        if (work / "best.safetensors").is_file() and prog.best_epoch >= 0:
            best_state = load_file(str(work / "best.safetensors"))
        run.say(f"{name}: resumed at epoch {prog.epoch}, batch {prog.batch} (step {prog.step})")
    logger.start(prog.step)
    core = acc.unwrap_model(model)
    mods = spec["modalities"]
    n_mod = len(core.modalities) if hasattr(core, "modalities") else 0
    meter = Meter(acc)
    try:
        while prog.epoch < cfg.optim.epochs:
            batches = [labelled[b] for b in epoch_batches(len(labelled), global_batch, seed, prog.epoch, world)]
            model.train()
            while prog.batch < len(batches):
                rows_g = batches[prog.batch]
                rows = rows_g[rank::world]
                b = run.train.batch(rows, mods)
                if n_mod:
                    b["dropout_u"] = _dropout_u(seed, prog.epoch, prog.batch, len(rows_g), n_mod)[rank::world]
                y = run.train.labels(rows)
                n_lab = max(int((~np.isnan(run.train.y[rows_g])).sum()), 1)  # the global batch's labelled cells
                with acc.autocast():
                    out = model(b)
                logits = out.logits if hasattr(out, "logits") else out
                loss = masked_loss(logits.float(), y, spec["task"], reduction="sum") * (world / n_lab)
                acc.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                prog.batch += 1
                prog.step += 1
                meter.add(prog.step, loss.detach() / world, samples=len(rows_g))
                if prog.step % cfg.log_every == 0:
                    row = meter.summary(last_good=ckpt.latest_pointer(), hint=NAN_HINT)
                    logger.log(prog.step, {"step": prog.step, "epoch": prog.epoch, **row})
                if cfg.stop_after and prog.step >= cfg.stop_after:
                    meter.check(last_good=ckpt.latest_pointer(), hint=NAN_HINT)
                    ckpt.save(prog.step, model=model, optimizer=opt, scheduler=sched, state=prog.to_state())
                    raise Stopped
            score = val_score(core, run.val, mods)
            prog.history.append({"epoch": prog.epoch, "val_auroc": None if np.isnan(score) else score})
            if not np.isnan(score) and score > prog.best:
                prog.best, prog.best_epoch, prog.stale = score, prog.epoch, 0
                best_state = _state_copy(core)
                if acc.is_main_process:
                    work.mkdir(parents=True, exist_ok=True)
                    with atomic_path(work / "best.safetensors") as tmp:
                        save_file({k: v.contiguous() for k, v in best_state.items()}, str(tmp))
            else:
                prog.stale += 1
            logger.log(prog.step, {"step": prog.step, "epoch": prog.epoch, "val_auroc": score})
            prog.epoch, prog.batch = prog.epoch + 1, 0
            meter.check(last_good=ckpt.latest_pointer(), hint=NAN_HINT)
            ckpt.save(prog.step, model=model, optimizer=opt, scheduler=sched, state=prog.to_state())
            if cfg.optim.patience and prog.stale >= cfg.optim.patience:
                run.say(f"{name}: no better validation AUROC for {prog.stale} epochs; stopped at epoch "
                        f"{prog.epoch}")
                break
    finally:
        logger.close()
    if best_state is not None:
        core.load_state_dict(best_state)
    core.eval()
    info = {"best_val_auroc": None if prog.best == float("-inf") else prog.best, "best_epoch": prog.best_epoch,
            "epochs_run": prog.epoch, "steps": prog.step, "history": prog.history,
            "processes": world, "precision": run.precision}
    if acc.is_main_process:
        save_model(models_dir, name, core, spec, info)
    acc.wait_for_everyone()
    best = info["best_val_auroc"]
    run.say(f"{name}: best validation AUROC {best:.3f} at epoch {prog.best_epoch}" if best is not None
            else f"{name}: validation AUROC undefined on every epoch")
    return core, {**info, "spec": spec}


# ----------------------------------------------------------------------------------------------------------
# All models of the task, and their scores on validation and test


@dataclass
class Scores:
    """Logits per model on validation and test ([N] each: the task's one output)."""

    val: dict[str, np.ndarray] = field(default_factory=dict)
    test: dict[str, np.ndarray] = field(default_factory=dict)
    degradation: dict = field(default_factory=dict)  # {model: {condition: test logits}}
    degradation_seeds: dict = field(default_factory=dict)  # {model: [{condition: test logits}] per training seed}
    info: dict = field(default_factory=dict)


def train_all(run: Run) -> Scores:
    t0 = time.perf_counter()
    scores = Scores()
    models = {}
    for name, spec in model_specs(run).items():
        run.say(f"== {name}")
        model, info = fit_torch(run, name, spec)
        models[name] = model
        scores.info[name] = {k: v for k, v in info.items() if k != "spec"}
        scores.val[name] = logits_on(model, run.val, spec["modalities"])[:, 0]
        scores.test[name] = logits_on(model, run.test, spec["modalities"])[:, 0]
    _late_fusion(run, scores)
    if "gbdt" in run.cfg.baselines.models and "ehr" in run.modalities:
        _gbdt(run, scores)
    for name in DEGRADATION_MODELS:
        if name in models:
            scores.degradation[name] = degradation_logits(models[name], run.test, run.modalities)
    _degradation_seeds(run, scores)
    run.seconds["train"] = round(time.perf_counter() - t0, 2)
    return scores


DEGRADATION_MODELS = ("fusion", "fusion_no_dropout")  # trained with / without modality dropout
SEEDS_DIR = "degradation_seeds"  # RUN/models/<this>/: the extra training seeds (not scored in predictions.csv)


def seed_model_name(name: str, seed: int) -> str:
    return f"{name}_seed{seed}"


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


def degradation_logits(model: nn.Module, data: SplitInputs, modalities) -> dict[str, np.ndarray]:
    """Test logits with every modality, then with each one removed (masked) at test time."""
    out = {"all": logits_on(model, data, modalities)[:, 0]}
    for m in modalities:
        out[m] = logits_on(model, data, modalities, present_override={m: False})[:, 0]
    return out


def _late_fusion(run: Run, scores: Scores) -> None:
    from radalign.finetune.baselines import LateFusion

    unimodal = [m for m in run.modalities if f"{m}_only" in scores.val]
    if "late_fusion" not in run.cfg.baselines.models or len(unimodal) < 2:
        return
    lf = LateFusion(run.cfg.baselines.late_fusion)
    lf.fit({m: scores.val[f"{m}_only"][:, None] for m in unimodal}, {m: run.val.present[m] for m in unimodal},
           run.val.y[:, :1])
    for split, data, target in (("val", run.val, scores.val), ("test", run.test, scores.test)):
        target["late_fusion"] = lf.combine({m: getattr(scores, split)[f"{m}_only"][:, None] for m in unimodal},
                                           {m: data.present[m] for m in unimodal})[:, 0]
    scores.info["late_fusion"] = {"mode": run.cfg.baselines.late_fusion, "of": [f"{m}_only" for m in unimodal],
                                  "fitted_on": run.cfg.data.val_split}


def _gbdt_inputs(data: SplitInputs, with_image: bool):
    from radalign.finetune.baselines import gbdt_matrix

    return gbdt_matrix(data.ehr, data.image if with_image else None,
                       data.present.get("image") if with_image else None)


def _gbdt(run: Run, scores: Scores) -> None:
    from radalign.finetune.baselines import GBDTBaseline

    with_image = run.train.image is not None
    b = run.cfg.baselines
    g = GBDTBaseline(run.cfg.task.kind, max_iter=b.gbdt_max_iter, learning_rate=b.gbdt_learning_rate,
                     seed=run.cfg.seed).fit(_gbdt_inputs(run.train, with_image), run.train.y[:, :1])
    scores.val["gbdt"] = g.predict_logits(_gbdt_inputs(run.val, with_image))[:, 0]
    scores.test["gbdt"] = g.predict_logits(_gbdt_inputs(run.test, with_image))[:, 0]
    scores.info["gbdt"] = {"inputs": "EHR features" + (" + frozen image embedding" if with_image else ""),
                           "max_iter": b.gbdt_max_iter, "dropped_never_measured_columns": g.dropped_columns,
                           "note": "in-run baseline: not saved (no pickle in run folders), so `finetune predict` "
                                   "does not score it"}


# ----------------------------------------------------------------------------------------------------------
# The whole recipe


def run_finetune(cfg: FinetuneConfig, overwrite: bool = False) -> Path:
    """The recipe under the run folder's lock. `overwrite`: remove what RUN holds and train afresh (otherwise
    RUN's models are reused only when they were trained with this config: finetune.runspec)."""
    from radalign.config import save_resolved

    with run_lock(cfg.run_dir):
        run = setup(cfg, overwrite=overwrite)
        try:
            if run.acc.is_main_process:  # the config beside the models is the one that trains them
                write_run_spec(run.run_dir, run.spec)
                save_resolved(cfg, run.run_dir)
                atomic_write_json(run.run_dir / "featurizer.json",
                                  run.featurizer.to_dict() if run.featurizer else {"format": None})
            if cfg.fewshot.enabled:
                from radalign.finetune.fewshot_recipe import run_fewshot

                run_fewshot(run)
            else:
                scores = train_all(run)
                if run.acc.is_main_process:
                    from radalign.finetune.report import save_outputs

                    save_outputs(run, scores)
        except Stopped:
            run.say(f"stopped after {cfg.stop_after} steps (stop_after); run again to resume")
        finally:
            run.acc.end_training()
            reset_accelerate_state()
    return run.run_dir

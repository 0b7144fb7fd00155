"""The training loop of one torch model of `radalign finetune`: fit with checkpoints, exact resume and early
stopping on validation (`fit_torch`).

Epochs over the training split's labelled rows in a seeded order (seed, epoch); a global batch of
`optim.batch_size x processes` rows is cut the same way whatever the number of processes, each process takes
rows rank::world, and the loss is the sum over its labelled cells divided by the global batch's count (times
world, as DDP averages), so the gradient is the one-process gradient. Modality dropout draws come from a
generator seeded by (seed, epoch, step) for the global batch, so they do not depend on the process count
either. Model selection: the epoch with the best validation AUROC (never test). A checkpoint is written at every
epoch end and at `stop_after`; resume restores the step inside the epoch, the optimizer, the schedule, the RNG
and the best weights so far, so an interrupted run ends with the weights of an uninterrupted one.

Distribution, precision, checkpoints and logging come from radalign.training (shared with pretrain); the models,
their specs and their files from finetune.registry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from radalign.finetune.inputs import SplitInputs
from radalign.finetune.models import masked_loss
from radalign.finetune.registry import build_model, load_model, logits_on, save_model
from radalign.finetune.runspec import OVERWRITE_HINT, changed_keys, resume_point
from radalign.finetune.tasks import macro_point_auroc, probabilities, targets
from safetensors.torch import load_file, save_file
from torch import nn

from radalign import RadalignError
from radalign.io import atomic_path, atomic_write_json
from radalign.training import CheckpointManager, Meter, MetricLogger, adamw, cosine_schedule, set_rng_state

NAN_HINT = "lower optim.lr or check the EHR features for extreme values"

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



def val_score(model: nn.Module, data: SplitInputs, modalities) -> float:
    """Validation AUROC, the model-selection criterion: the mean over the classes (one-vs-rest on the
    probabilities: softmax for a multiclass model) that have both label values on validation."""
    logits = logits_on(model, data, modalities)
    task = getattr(model, "task", "binary")
    return macro_point_auroc(targets(data.y, task, logits.shape[1]), probabilities(logits, task))



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


def tower_lr(cfg, spec: dict) -> dict[str, float] | None:
    """{"tower.": optim.tower_lr} for a model whose image tower trains (finetune.tower.TunedModel names its
    tower's parameters tower.*), else None: every parameter at optim.lr."""
    return {"tower.": cfg.optim.tower_lr} if cfg.optim.tower_lr is not None and "tower" in spec else None


def fit_torch(run, name: str, spec: dict, models_dir: Path | None = None) -> tuple[nn.Module, dict]:
    """Train one model (or reuse it when `models_dir`, default RUN/models, holds it); returns the
    best-on-validation model. spec["seed"], when given, replaces the run's seed (initialisation, epoch order,
    modality-dropout draws): the degradation table's extra training seeds."""
    cfg, acc = run.cfg, run.acc
    seed = int(spec.get("seed", cfg.seed))
    models_dir = models_dir or run.run_dir / "models"
    if (models_dir / f"{name}.json").is_file():  # RUN/run_spec.json matched the config (finetune.runspec)
        model, meta = load_model(models_dir, name, checkpoint=cfg.data.checkpoint)  # a moved export: found there
        diff = changed_keys(meta["spec"], json.loads(json.dumps(spec)))
        if diff:
            raise RadalignError(f"{models_dir / name}.json: a {name} model of another spec (changed: "
                                f"{'; '.join(diff)}); use another run_dir, or {OVERWRITE_HINT} to train anew")
        run.say(f"{name}: finished earlier (best validation AUROC {_fmt(meta['best_val_auroc'])}); reused")
        return model, meta
    torch.manual_seed(seed)
    model = build_model(spec, checkpoint=cfg.data.checkpoint)
    work = run.run_dir / "train" / name
    opt = adamw(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, lr_of=tower_lr(cfg, spec))
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


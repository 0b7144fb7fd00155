"""The pretrain recipe: setup, train, save. One readable file; distribution lives here and only here.

    run = setup(cfg)      # Accelerator, model, loss, optimizer, schedule, data; resume if asked
    train(run)            # steps with feature-cache accumulation, logging, validation, checkpoints
    export(run)           # encoders as safetensors for zeroshot / retrieval / finetune

Launch: `radalign pretrain --config pretrain/tiny` (one process), `accelerate launch -m pretrain ...` or
`torchrun --nproc_per_node N -m pretrain ...` (many). See docs/pretrain.md for the traps this file guards.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.config import PretrainConfig
from radalign import RadalignError
from radalign.config import save_resolved
from radalign.io import atomic_write_json, atomic_write_text
from radalign.log import rprint

CKPT_DIR = "checkpoints"
LATEST = "latest"  # text file naming the newest complete checkpoint folder


@dataclass
class Run:
    """Everything `setup` builds; `train` and `export` read and update it."""

    cfg: PretrainConfig
    accelerator: Any
    model: nn.Module
    model_cfg: dict
    tokenizer: Any
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    run_dir: Path
    step: int = 0
    segment: int = 0  # data segment: the loader is re-seeded at every checkpoint, so resume is exact
    history: list[dict] = field(default_factory=list)
    writer: Any = None
    deepspeed: bool = False  # DeepSpeed clips inside its engine step
    skipped: dict = field(default_factory=dict)  # corrupt/incomplete samples by reason, summed over segments
    loader: Any = None


# ----------------------------------------------------------------------------------------------------------
# Setup


def _accelerator(cfg: PretrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    if cfg.precision == "fp16" and not cuda:
        raise RadalignError("precision=fp16 needs CUDA (loss scaling is a GPU feature); use precision=bf16 on CPU")
    kwargs: dict[str, Any] = {}
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if not cuda and world_env > 1:  # gloo is the CPU backend; without this DeepSpeed on CPU asks for ccl
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    ds_file = _deepspeed_file(cfg)
    if ds_file:
        if not cuda and world_env < 2:
            raise RadalignError("deepspeed needs CUDA or a multi-process CPU launch (torchrun/accelerate launch "
                                "--multi_gpu --num_processes 2 with gloo); set deepspeed=null for one process")
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=_deepspeed_config(cfg, ds_file))
    precision = {"fp32": "no"}.get(cfg.precision, cfg.precision)
    # cpu=True on CPU machines: with torchrun's env a plain Accelerator() would start world-size-1 jobs.
    acc = Accelerator(mixed_precision=precision, cpu=not cuda, **kwargs)
    if world_env != acc.num_processes:
        raise RadalignError(f"launcher started WORLD_SIZE={world_env} processes but Accelerate sees "
                            f"{acc.num_processes}: the processes would train independently. Launch with "
                            "torchrun or `accelerate launch --multi_gpu --num_processes N` (not --cpu).")
    return acc


def _deepspeed_file(cfg: PretrainConfig) -> str | None:
    """`deepspeed=` in our config, or the file an accelerate DeepSpeed launch config names."""
    env_file = None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        env_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    ds_file = cfg.deepspeed or env_file
    if ds_file and cfg.accum_freq != 1:
        raise RadalignError("accum_freq must be 1 with DeepSpeed (the feature-cache accumulation needs DDP's "
                            "no_sync); raise batch_size instead, or launch without DeepSpeed")
    return ds_file


def _deepspeed_config(cfg: PretrainConfig, ds_file: str) -> dict:
    """Load the DeepSpeed JSON and fill every batch/clip/precision field from our config (one source of truth)."""
    from radalign.config import resolve_config_path

    path = resolve_config_path(ds_file, stage="deepspeed")
    ds = json.loads(Path(path).read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds.pop("train_batch_size", None)
    # accelerate's plugin clips at 1.0 when the JSON says "auto"; say explicitly what we want (0 = off).
    ds["gradient_clipping"] = float(cfg.optim.grad_clip or 0.0)
    ds["bf16"] = {"enabled": cfg.precision == "bf16"}
    ds["fp16"] = {"enabled": cfg.precision == "fp16"}
    return ds


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No decay on norms, biases and the logit scale (all params with ndim < 2), as in CLIP."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name or "bias" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def setup(cfg: PretrainConfig) -> Run:
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from pretrain.loss import ContrastiveLoss
    from pretrain.models import build_model, build_tokenizer, get_model_config, model_summary

    acc = _accelerator(cfg)
    _check_batch(cfg, acc.num_processes)
    set_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir)

    model_cfg = get_model_config(cfg.model.name)
    if cfg.loss.kind == "siglip" and "init_logit_bias" not in model_cfg:
        # SigLIP needs a learnable bias; open_clip's SigLIP recipe starts it at -10 and the scale at 10.
        model_cfg = {**model_cfg, "init_logit_bias": -10.0, "init_logit_scale": float(torch.log(torch.tensor(10.0)))}
    model = build_model(model_cfg, cfg.model.pretrained, grad_checkpointing=cfg.model.grad_checkpointing)
    tokenizer = build_tokenizer(model_cfg)
    summary = model_summary(model)
    rprint(f"model {cfg.model.name}: {summary}")
    if cfg.model.compile:
        model = torch.compile(model)

    o = cfg.optim
    # fused AdamW: one kernel over all parameters (4-5x faster optimizer step on CPU, bench/pretrain.py)
    optimizer = torch.optim.AdamW(_param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps, fused=True)
    # Not passed to accelerator.prepare: a prepared scheduler steps once per process per call.
    scheduler = get_cosine_schedule_with_warmup(optimizer, o.warmup_steps, cfg.steps)
    model, optimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(scheduler)
    loss_fn = ContrastiveLoss(rank=acc.process_index, world_size=acc.num_processes,
                              false_negatives=cfg.loss.false_negatives, kind=cfg.loss.kind,
                              max_logit_scale=cfg.loss.max_logit_scale)
    run = Run(cfg, acc, model, model_cfg, tokenizer, loss_fn, optimizer, scheduler, run_dir,
              deepspeed=acc.state.deepspeed_plugin is not None)
    if cfg.resume:
        load_checkpoint(run, cfg.resume)
    if cfg.tensorboard and acc.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(run_dir / "tensorboard"))
    return run


def _check_batch(cfg: PretrainConfig, world: int) -> None:
    contrastive = cfg.batch_size * cfg.accum_freq * world
    if cfg.global_batch_size is not None and cfg.global_batch_size != contrastive:
        raise RadalignError(
            f"global_batch_size={cfg.global_batch_size} but batch_size x accum_freq x processes = "
            f"{cfg.batch_size} x {cfg.accum_freq} x {world} = {contrastive}. Did the launcher start the "
            "number of processes you expected? Adjust batch_size/accum_freq or the launch.")


# ----------------------------------------------------------------------------------------------------------
# Data


def _transforms(run: Run, train: bool):
    from data.transforms import eval_transform, train_transform
    from pretrain.export import OPENAI_MEAN, OPENAI_STD, image_size_of

    size = image_size_of(run.model_cfg)
    if train and run.cfg.data.augment:
        return train_transform(size, channels=3, mean=OPENAI_MEAN, std=OPENAI_STD)
    return eval_transform(size, channels=3, mean=OPENAI_MEAN, std=OPENAI_STD)


def _train_batches(run: Run):
    """Infinite stream of micro-batches; re-created (re-seeded) at every checkpoint so resume is exact."""
    from data.loader import make_train_loader, shard_paths

    d = run.cfg.data
    shards = shard_paths(d.shards, d.train_split)
    seed = run.cfg.seed * 1_000_003 + run.segment
    torch.manual_seed(seed + run.accelerator.process_index)
    loader = make_train_loader(
        shards, batch_size=run.cfg.batch_size, transform=_transforms(run, train=True), tokenize=run.tokenizer,
        num_workers=d.num_workers, seed=seed, resampled=d.resampled, shuffle_buffer=d.shuffle_buffer,
        rank=run.accelerator.process_index, world_size=run.accelerator.num_processes)
    if run.loader is not None:  # keep the counts of the previous segment's loader
        _merge_skipped(run)
    run.loader = loader
    epoch = 0
    while True:  # epochs of the loader (both modes); the segment's seed makes their order reproducible
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _merge_skipped(run: Run) -> None:
    for reason, n in run.loader.skipped.items():
        run.skipped[reason] = run.skipped.get(reason, 0) + n
    run.loader.skipped.clear()


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------
# One optimizer step


def _features(model, batch):
    out = model(batch["image"], batch["text"])
    return out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")


def backward_accumulated(acc, model, loss_fn, micro: list[dict]) -> torch.Tensor:
    """Backward over `micro` micro-batches with open_clip's feature-cache accumulation; returns the loss.

    With several micro-batches, features of all of them are first computed without grad; then each micro-batch
    is re-run with grad and its features spliced into the cached set, so the loss always sees the whole
    contrastive batch. The summed gradients equal the full-batch gradient; the logit scale takes its gradient
    in one micro-step only (otherwise it would be counted once per micro-step). DDP syncs on the last one only.
    """
    ids = {k: torch.cat([b[k] for b in micro]) for k in ("study_id", "text_id")}  # [B_acc]
    if len(micro) == 1:
        img, txt, scale, bias = _features(model, micro[0])
        loss = loss_fn(img, txt, scale, logit_bias=bias, **ids)
        acc.backward(loss)
        return loss.detach()
    with torch.no_grad():
        cache = [_features(model, b)[:2] for b in micro]
    for j, b in enumerate(micro):
        last = j == len(micro) - 1
        with contextlib.nullcontext() if last else acc.no_sync(model):
            img_j, txt_j, scale, bias = _features(model, b)
            img = torch.cat([c[0] for c in cache[:j]] + [img_j] + [c[0] for c in cache[j + 1:]])  # [B_acc, D]
            txt = torch.cat([c[1] for c in cache[:j]] + [txt_j] + [c[1] for c in cache[j + 1:]])  # [B_acc, D]
            if not last:  # scale and bias take their gradient once per step
                scale, bias = scale.detach(), (bias.detach() if bias is not None else None)
            loss = loss_fn(img, txt, scale, logit_bias=bias, **ids)
            acc.backward(loss)
    return loss.detach()  # every micro-step computes the same full-batch loss value


def train_step(run: Run, micro: list[dict]) -> float:
    """One optimizer step: accumulated backward, optional clipping, AdamW, schedule."""
    loss = backward_accumulated(run.accelerator, run.model, run.loss_fn, micro)
    if run.cfg.optim.grad_clip and not run.deepspeed:
        run.accelerator.clip_grad_norm_(run.model.parameters(), run.cfg.optim.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return _finite_or_stop(run, loss)


def _finite_or_stop(run: Run, loss: torch.Tensor) -> float:
    """All ranks agree on stopping (one rank raising alone would hang the others in the next collective)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=run.accelerator.device)
    if run.accelerator.num_processes > 1:
        bad = run.accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        latest = _latest_checkpoint(run.run_dir)
        raise RadalignError(f"loss became {loss.item()} at step {run.step + 1}; stopped. Last good checkpoint: "
                            f"{latest or 'none yet'}. Lower optim.lr, enable optim.grad_clip, or check the data.")
    return float(loss.item())


# ----------------------------------------------------------------------------------------------------------
# Train loop


class _Meter:
    """Throughput and data-wait bookkeeping between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0, self.wait, self.samples, self.losses = time.perf_counter(), 0.0, 0, []

    def summary(self) -> dict:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return {"samples_per_s": self.samples / elapsed, "data_wait": self.wait / elapsed,
                "loss": sum(self.losses) / max(len(self.losses), 1)}


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def train(run: Run) -> dict:
    from tqdm.auto import tqdm

    cfg, acc = run.cfg, run.accelerator
    end = cfg.stop_after or cfg.steps
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not acc.is_main_process, desc="pretrain",
               dynamic_ncols=True)
    meter, batches = _Meter(), _train_batches(run)
    run.model.train()
    while run.step < end:
        t = time.perf_counter()
        micro = [_to_device(_prepare_batch(run, next(batches)), acc.device) for _ in range(cfg.accum_freq)]
        meter.wait += time.perf_counter() - t
        loss = train_step(run, micro)
        run.step += 1
        meter.samples += sum(len(b["image"]) for b in micro) * acc.num_processes
        meter.losses.append(loss)
        bar.update(1)
        if run.step % cfg.log_every == 0 or run.step == end:
            _log(run, meter, bar)
        if cfg.val_every and run.step % cfg.val_every == 0 and run.step < cfg.steps:
            _log_metrics(run, validate(run))
        if (cfg.ckpt_every and run.step % cfg.ckpt_every == 0) or run.step == end:
            save_checkpoint(run)
            run.segment = run.step
            batches = _train_batches(run)  # re-seeded from the step, exactly as a resumed run would
    bar.close()
    final = validate(run) if run.step == cfg.steps and cfg.data.val_split else {}
    _log_metrics(run, final)
    return final


def _prepare_batch(run: Run, batch: dict) -> dict:
    if run.cfg.data.shuffle_pairs:  # negative control: break image-report alignment
        g = torch.Generator().manual_seed(run.cfg.seed + run.step)
        perm = torch.randperm(len(batch["text"]), generator=g)
        batch = {**batch, "text": batch["text"][perm], "text_id": batch["text_id"][perm]}
    return batch


def _log(run: Run, meter: _Meter, bar) -> None:
    row = {"step": run.step, **meter.summary(), "lr": run.optimizer.param_groups[0]["lr"],
           "logit_scale": float(run.accelerator.unwrap_model(run.model).logit_scale.detach().exp().reshape(-1)[0]),
           "peak_mem_gb": peak_memory_gb()}
    bar.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_s']:.0f}", wait=f"{row['data_wait']:.0%}")
    _log_metrics(run, row)
    meter.reset()


def _log_metrics(run: Run, row: dict) -> None:
    if not row or not run.accelerator.is_main_process:
        return
    row = {"step": run.step, **row}
    run.history.append(row)
    with open(run.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if run.writer is not None:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                run.writer.add_scalar(k, v, run.step)
        run.writer.flush()


# ----------------------------------------------------------------------------------------------------------
# Validation: retrieval recall (same study / identical text count as positives) and zero-shot AUROC


@torch.no_grad()
def validate(run: Run) -> dict:
    from pretrain.validation import embed_split, retrieval_recall, zero_shot_auroc

    d = run.cfg.data
    if not d.val_split:
        return {}
    run.model.eval()
    emb = embed_split(run.accelerator, run.model, run.tokenizer, d.shards, d.val_split,
                      _transforms(run, train=False), batch_size=run.cfg.batch_size, max_samples=d.val_max_samples)
    metrics: dict = {}
    if emb is not None and run.accelerator.is_main_process:
        metrics.update(retrieval_recall(emb))
        metrics.update(zero_shot_auroc(emb, run.accelerator.unwrap_model(run.model), run.tokenizer))
        rprint("validation: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
    run.model.train()
    return {f"val/{k}": v for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: atomic folders, a `latest` pointer, exact resume


def _latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / CKPT_DIR / LATEST
    if pointer.is_file():
        path = run_dir / CKPT_DIR / pointer.read_text().strip()
        if path.is_dir():
            return path
    return None


def save_checkpoint(run: Run) -> Path:
    acc = run.accelerator
    root = run.run_dir / CKPT_DIR
    name = f"step-{run.step:07d}"
    tmp = root / f".{name}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))  # model, optimizer, scheduler, scaler, RNG of every process
    acc.wait_for_everyone()
    if acc.is_main_process:
        atomic_write_json(tmp / "trainer_state.json", {"step": run.step, "segment": run.step,
                                                        "model_cfg": run.model_cfg})
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, name + "\n")
        _prune(root, run.cfg.keep_checkpoints)
    acc.wait_for_everyone()
    return root / name


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run: Run, which: str) -> None:
    """`which`: 'latest', 'auto' (latest if there is one, else start fresh) or a step-* folder."""
    if which == "auto" and _latest_checkpoint(run.run_dir) is None:
        return
    path = _latest_checkpoint(run.run_dir) if which in ("latest", "auto") else Path(which)
    if path is None or not (path / "trainer_state.json").is_file():
        raise RadalignError(f"resume={which}: no complete checkpoint found "
                            f"(looked in {run.run_dir / CKPT_DIR}); start without resume or pass a step-* folder")
    run.accelerator.load_state(str(path))
    state = json.loads((path / "trainer_state.json").read_text())
    run.step, run.segment = int(state["step"]), int(state["segment"])
    rprint(f"resumed from {path} at step {run.step}")


# ----------------------------------------------------------------------------------------------------------
# Export and the whole recipe


def export(run: Run) -> Path:
    from pretrain.export import export_encoders

    acc = run.accelerator
    state = acc.get_state_dict(run.model)  # gathers ZeRO-3 shards; call on every rank
    out = run.run_dir / "export"
    if acc.is_main_process:
        export_encoders(acc.unwrap_model(run.model), run.model_cfg, out, state_dict=state,
                        extra={"trained_steps": run.step, "model_name": run.cfg.model.name})
        rprint(f"export written to {out}")
    acc.wait_for_everyone()
    return out


def run_pretrain(cfg: PretrainConfig) -> Path:
    run = setup(cfg)
    try:
        if run.step >= (cfg.stop_after or cfg.steps):
            rprint(f"nothing to do: checkpoint is at step {run.step}")
        else:
            train(run)
        if run.step == cfg.steps:
            export(run)
        if run.loader is not None:
            _merge_skipped(run)
        if run.accelerator.is_main_process:
            atomic_write_json(run.run_dir / "summary.json", {
                "step": run.step, "history_tail": run.history[-5:], "peak_mem_gb": peak_memory_gb(),
                "skipped_samples_rank0": run.skipped})
            if run.skipped:
                rprint(f"skipped samples on rank 0 (by reason): {run.skipped}")
    finally:
        if run.writer is not None:
            run.writer.close()
        run.accelerator.end_training()  # clean process-group teardown (DeepSpeed + gloo hangs without it)
        _reset_accelerate_state()
    return run.run_dir


def _reset_accelerate_state() -> None:
    """Let a later run in the same process (tests, notebooks) choose other precision/plugins."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

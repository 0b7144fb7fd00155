"""The pretrain recipe: setup, train, save. One readable file; distribution lives here and only here.

    run = setup(cfg)      # Accelerator, model, loss, optimizer, schedule, data; resume if asked
    train(run)            # steps with feature-cache accumulation, logging, validation, checkpoints
    export(run)           # encoders as safetensors for zeroshot / retrieval / finetune

Launch: `radalign pretrain --config pretrain/tiny` (one process), `accelerate launch -m radalign.pretrain ...` or
`torchrun --nproc_per_node N -m radalign.pretrain ...` (many). See docs/pretrain.md for the traps this file guards.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from radalign.pretrain.config import PretrainConfig
from torch import nn

from radalign import RadalignError
from radalign.config import save_resolved
from radalign.io import atomic_write_json
from radalign.log import rprint
from radalign.training import (
    CheckpointManager,
    Meter,
    MetricLogger,
    adamw,
    cosine_schedule,
    deepspeed_file,
    eval_module,
    gather_to_main,
    is_deepspeed,
    load_deepspeed_config,
    make_accelerator,
    peak_memory_gb,
    reset_accelerate_state,
    run_lock,
    set_rng_state,
)

NAN_HINT = "Lower optim.lr, enable optim.grad_clip, or check the data."


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
    ckpt: CheckpointManager
    logger: MetricLogger
    precision: str = "fp32"  # resolved from cfg.precision (radalign.precision)
    step: int = 0
    segment: int = 0  # data segment start: the loader is seeded at every ckpt_every boundary, see _train_batches
    deepspeed: bool = False  # DeepSpeed clips inside its engine step
    skipped: dict = field(default_factory=dict)  # corrupt/incomplete samples by reason, summed over segments
    loader: Any = None
    resume_rng: dict | None = None  # RNG of the checkpoint, restored after the data fast-forward
    final_pass: Any = None  # the final validation's image pass (data.embed.EmbeddedSplit), cached at export

    @property
    def history(self) -> list[dict]:
        return self.logger.history


# ----------------------------------------------------------------------------------------------------------
# Setup


def _accelerator(cfg: PretrainConfig):
    ds_file = deepspeed_file(cfg.deepspeed)
    if ds_file and cfg.accum_freq != 1:
        raise RadalignError("accum_freq must be 1 with DeepSpeed (the feature-cache accumulation needs DDP's "
                            "no_sync); raise batch_size instead, or launch without DeepSpeed")
    ds = load_deepspeed_config(ds_file, micro_batch=cfg.batch_size, grad_clip=cfg.optim.grad_clip) if ds_file else None
    return make_accelerator(cfg.precision, deepspeed=ds)


def setup(cfg: PretrainConfig) -> Run:
    from accelerate.utils import set_seed
    from radalign.pretrain.loss import ContrastiveLoss
    from radalign.pretrain.models import build_model, build_tokenizer, get_model_config, model_summary

    acc, precision, _ = _accelerator(cfg)
    _check_batch(cfg, acc.num_processes)
    set_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    ckpt = CheckpointManager(run_dir, keep=cfg.keep_checkpoints, accelerator=acc)
    found = ckpt.resolve(cfg.resume)  # before anything is written: a refused resume leaves the folder as it was
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir)

    model_cfg = get_model_config(cfg.model.name)
    if cfg.loss.kind == "siglip" and "init_logit_bias" not in model_cfg:
        # SigLIP needs a learnable bias; open_clip's SigLIP recipe starts it at -10 and the scale at 10.
        model_cfg = {**model_cfg, "init_logit_bias": -10.0, "init_logit_scale": float(torch.log(torch.tensor(10.0)))}
    model = build_model(model_cfg, cfg.model.pretrained, grad_checkpointing=cfg.model.grad_checkpointing)
    tokenizer = build_tokenizer(model_cfg)
    rprint(f"model {cfg.model.name}: {model_summary(model)}")
    if cfg.model.compile:
        model = torch.compile(model)

    o = cfg.optim
    optimizer = adamw(model, lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), eps=o.eps)
    # Not passed to accelerator.prepare: a prepared scheduler steps once per process per call.
    scheduler = cosine_schedule(optimizer, o.warmup_steps, cfg.steps)
    model, optimizer = acc.prepare(model, optimizer)
    loss_fn = ContrastiveLoss(rank=acc.process_index, world_size=acc.num_processes,
                              false_negatives=cfg.loss.false_negatives, kind=cfg.loss.kind,
                              max_logit_scale=cfg.loss.max_logit_scale)
    logger = MetricLogger(run_dir, main=acc.is_main_process, tensorboard=cfg.tensorboard)
    run = Run(cfg, acc, model, model_cfg, tokenizer, loss_fn, optimizer, scheduler, run_dir, ckpt, logger,
              precision=precision, deepspeed=is_deepspeed(acc))
    if found is not None:
        _resume(run, found)
    logger.start(run.step)
    return run


def _resume(run: Run, path: Path) -> None:
    loaded = run.ckpt.load(path, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler)
    state = loaded.state
    for key in ("steps", "batch_size", "accum_freq", "seed"):
        if key in state and state[key] != getattr(run.cfg, key):
            rprint(f"warning: {key}={getattr(run.cfg, key)} but the checkpoint was trained with {state[key]}; "
                   "the resumed run will not reproduce an uninterrupted one")
    run.step, run.segment = loaded.step, int(state.get("segment", loaded.step))
    run.skipped = dict(state.get("skipped", {}))
    run.resume_rng = loaded.rng


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
    from radalign.data.transforms import eval_transform, train_transform
    from radalign.pretrain.export import OPENAI_MEAN, OPENAI_STD, image_size_of

    size = image_size_of(run.model_cfg)
    if train and run.cfg.data.augment:
        return train_transform(size, channels=3, mean=OPENAI_MEAN, std=OPENAI_STD)
    return eval_transform(size, channels=3, mean=OPENAI_MEAN, std=OPENAI_STD)


def _segment_of(cfg: PretrainConfig, step: int) -> int:
    """The data segment a run is in after `step`: streams are seeded only at ckpt_every boundaries, so a
    checkpoint written elsewhere (stop_after, the last step) does not change the data of an uninterrupted run."""
    return (step // cfg.ckpt_every) * cfg.ckpt_every if cfg.ckpt_every else 0


def _train_batches(run: Run, skip: int = 0, rng: dict | None = None):
    """Infinite stream of micro-batches of the segment starting at `run.segment`, seeded from it.

    A resumed run inside a segment re-creates the segment's stream, fast-forwards `skip` micro-batches (read
    and decoded, so augmentation RNG is consumed exactly as before) and then restores the checkpoint's RNG.
    """
    from radalign.data.loader import make_train_loader, shard_paths

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
    stream = _epochs(loader)
    if skip:
        for _ in range(skip):
            next(stream)
        loader.skipped.clear()  # counted before the checkpoint (in run.skipped)
        set_rng_state(rng)
    yield from stream


def _epochs(loader):
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
    # fp32 for the loss: DeepSpeed's autocast returns bf16/fp16 features (Accelerate's AMP already casts them)
    return out["image_features"].float(), out["text_features"].float(), out["logit_scale"], out.get("logit_bias")


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


def train_step(run: Run, micro: list[dict]) -> torch.Tensor:
    """One optimizer step: accumulated backward, optional clipping, AdamW, schedule. Returns the loss on the
    device (no host sync; the NaN check runs at log_every and before each checkpoint, see Meter.check)."""
    loss = backward_accumulated(run.accelerator, run.model, run.loss_fn, micro)
    if run.cfg.optim.grad_clip and not run.deepspeed:
        run.accelerator.clip_grad_norm_(run.model.parameters(), run.cfg.optim.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss


# ----------------------------------------------------------------------------------------------------------
# Train loop


def train(run: Run) -> dict:
    from tqdm.auto import tqdm

    cfg, acc = run.cfg, run.accelerator
    end = cfg.stop_after or cfg.steps
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not acc.is_main_process, desc="pretrain",
               dynamic_ncols=True)
    meter = Meter(acc)
    batches = _train_batches(run, skip=(run.step - run.segment) * cfg.accum_freq, rng=run.resume_rng)
    run.model.train()
    while run.step < end:
        t = time.perf_counter()
        micro = [_to_device(_prepare_batch(run, next(batches)), acc.device) for _ in range(cfg.accum_freq)]
        wait = time.perf_counter() - t
        loss = train_step(run, micro)
        run.step += 1
        meter.add(run.step, loss, samples=sum(len(b["image"]) for b in micro) * acc.num_processes, wait=wait)
        bar.update(1)
        if run.step % cfg.log_every == 0 or run.step == end:
            _log(run, meter, bar)
        if cfg.val_every and run.step % cfg.val_every == 0 and run.step < cfg.steps:
            run.logger.log(run.step, validate(run))
        if (cfg.ckpt_every and run.step % cfg.ckpt_every == 0) or run.step == end:
            meter.check(last_good=run.ckpt.latest_pointer(), hint=NAN_HINT)  # never checkpoint a NaN model
            save_checkpoint(run)
            if _segment_of(cfg, run.step) != run.segment:
                run.segment = run.step
                batches = _train_batches(run)  # seeded from the step, exactly as a resumed run would be
    bar.close()
    final = validate(run) if run.step == cfg.steps and cfg.data.val_split else {}
    run.logger.log(run.step, final)
    return final


def _prepare_batch(run: Run, batch: dict) -> dict:
    if run.cfg.data.shuffle_pairs:  # negative control: break image-report alignment
        g = torch.Generator().manual_seed(run.cfg.seed + run.step)
        perm = torch.randperm(len(batch["text"]), generator=g)
        batch = {**batch, "text": batch["text"][perm], "text_id": batch["text_id"][perm]}
    return batch


def _log(run: Run, meter: Meter, bar) -> None:
    row = {"step": run.step, **meter.summary(last_good=run.ckpt.latest_pointer(), hint=NAN_HINT),
           "lr": run.optimizer.param_groups[0]["lr"],
           "logit_scale": float(run.accelerator.unwrap_model(run.model).logit_scale.detach().exp().reshape(-1)[0]),
           "peak_mem_gb": peak_memory_gb()}
    bar.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_s']:.0f}", wait=f"{row['data_wait']:.0%}")
    run.logger.log(run.step, row)


# ----------------------------------------------------------------------------------------------------------
# Validation: retrieval recall (same study / identical text count as positives) and zero-shot AUROC


@torch.no_grad()
def validate(run: Run) -> dict:
    from radalign.pretrain.validation import embed_part, merge_parts, retrieval_recall, zero_shot_auroc

    d, acc = run.cfg.data, run.accelerator
    if not d.val_split:
        return {}
    run.model.eval()
    part = embed_part(eval_module(acc, run.model), run.tokenizer, d.shards, d.val_split,
                      _transforms(run, train=False), batch_size=run.cfg.batch_size, max_samples=d.val_max_samples,
                      device=acc.device, rank=acc.process_index, world_size=acc.num_processes)
    passed = part.pop("pass")
    parts = gather_to_main(acc, part)
    emb = merge_parts(parts) if parts is not None else None
    if acc.num_processes == 1 and run.step == run.cfg.steps:
        run.final_pass = passed  # the exported weights' pass: export() keeps it in the embedding cache
    metrics: dict = {}
    if emb is not None:
        core = acc.unwrap_model(run.model)
        scale = min(float(core.logit_scale.detach().exp().reshape(-1)[0]), run.cfg.loss.max_logit_scale)
        metrics.update(retrieval_recall(emb))
        metrics.update(zero_shot_auroc(emb, core, run.tokenizer, logit_scale=scale))
        rprint("validation: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
    run.model.train()
    return {f"val/{k}": v for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: radalign.training.CheckpointManager (safetensors + JSON, sha256, verified fallback, no pickle)


def save_checkpoint(run: Run) -> Path:
    if run.loader is not None:
        _merge_skipped(run)
    boundary = bool(run.cfg.ckpt_every) and run.step % run.cfg.ckpt_every == 0
    state = {"segment": run.step if boundary else run.segment,  # where the stream after this step starts
             "skipped": dict(run.skipped), "steps": run.cfg.steps, "batch_size": run.cfg.batch_size,
             "accum_freq": run.cfg.accum_freq, "seed": run.cfg.seed, "precision": run.precision,
             "model_cfg": run.model_cfg}
    return run.ckpt.save(run.step, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler, state=state)


# ----------------------------------------------------------------------------------------------------------
# Export and the whole recipe


def export(run: Run) -> Path:
    from radalign.pretrain.export import export_encoders

    acc = run.accelerator
    state = acc.get_state_dict(run.model)  # gathers ZeRO-3 shards; call on every rank
    out = run.run_dir / "export"
    if acc.is_main_process:
        export_encoders(acc.unwrap_model(run.model), run.model_cfg, out, state_dict=state,
                        extra={"trained_steps": run.step, "model_name": run.cfg.model.name,
                               "data": _training_data(run.cfg)})
        rprint(f"export written to {out}")
        _cache_final_pass(run, out)
    acc.wait_for_everyone()
    return out


def _cache_final_pass(run: Run, out: Path) -> None:
    from radalign.pretrain.validation import cache_final_pass

    if run.final_pass is not None and cache_final_pass(
            run.final_pass, out, run.cfg.data.shards, run.cfg.data.val_split, _transforms(run, train=False),
            f"{run.accelerator.device.type}-{run.precision}"):
        rprint(f"validation split embeddings kept in {out}/embeddings (zeroshot and finetune read them)")
    run.final_pass = None


def _training_data(cfg: PretrainConfig) -> dict:
    """What the towers were trained on, so later stages can refuse evaluating on those patients."""
    import hashlib

    manifest = Path(cfg.data.shards) / "manifest.json"
    sha = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return {"shards": str(Path(cfg.data.shards).resolve()), "manifest_sha256": sha,
            "train_split": cfg.data.train_split}


def run_pretrain(cfg: PretrainConfig) -> Path:
    with run_lock(cfg.run_dir):
        run = setup(cfg)
        try:
            _run(run)
        finally:
            run.logger.close()
            run.accelerator.end_training()  # clean process-group teardown (DeepSpeed + gloo hangs without it)
            reset_accelerate_state()
    return run.run_dir


def _run(run: Run) -> None:
    cfg = run.cfg
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
            "precision": run.precision, "skipped_samples_rank0": run.skipped})
        if run.skipped:
            rprint(f"skipped samples on rank 0 (by reason): {run.skipped}")

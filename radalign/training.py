"""Shared training plumbing: distribution, precision, optimizer groups, checkpoints, loss guard, metric logging.

Used by `pretrain/recipe.py` and (wave 2) `finetune/recipe.py`. This module may import accelerate/deepspeed;
it imports no stage package. Model and loss modules never import it (distribution lives in recipes + here).

API (all names importable from `radalign.training`):

    acc, precision, reason = make_accelerator("auto", deepspeed=ds_dict_or_None)
        # Accelerator on CUDA, or cpu=True on CPU (gloo for multi-process CPU launches); DeepSpeed on CPU runs
        # with cpu=False and gloo (see `_accelerator_kwargs`); `precision` resolved by
        # radalign.precision.resolve_precision (bf16/fp16/fp32) and agreed by all ranks; a DeepSpeed dict gets
        # its torch_autocast section from it. Refuses a launcher/Accelerate world-size mismatch, and a
        # DeepSpeed plugin Accelerate did not turn on.
    deepspeed_file(configured) -> str | None      # our `deepspeed=` value or the accelerate launch config's file
    load_deepspeed_config(file, *, micro_batch, grad_clip) -> dict   # batch/clip fields from our config
    deepspeed_with_precision(ds, precision) -> dict   # torch_autocast in the resolved precision (bf16/fp16 off)
    param_groups(model, weight_decay, lr_of=None) -> list[dict]   # no decay on norms, biases, logit scale/bias
    #   (`_decays`); lr_of: {name prefix: lr} for parameters trained at another rate
    adamw(model, *, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8, lr_of=None) -> torch.optim.AdamW  (fused)
    cosine_schedule(optimizer, warmup_steps, total_steps) -> LambdaLR   # do NOT pass it to accelerator.prepare
    eval_module(acc, model) -> nn.Module          # what to run forward on in eval (engine under ZeRO-3)
    gather_to_main(acc, obj) -> list | None       # every rank's `obj` on rank 0 (None elsewhere)
    run_lock(run_dir)                             # context: exclusive output_lock on rank 0 only
    reset_accelerate_state()                      # after a run, so a later run in-process can change plugins
    peak_memory_gb() -> float
    keep_freed_memory() -> str                     # glibc malloc keeps freed memory for the next step (called by
                                                   # make_accelerator; returns what it did, or why not)

    meter = Meter(acc)                             # throughput, data wait, losses kept on device
    meter.add(step, loss_tensor, samples=n, wait=s)   # no host sync
    meter.check(last_good=ckpt_or_None, hint="lower lr")  # ONE sync; NonFiniteLoss (RadalignError) naming
                                                   # the first bad step; call at log_every and before saving
    row = meter.summary(...)                       # check() + {"loss", "samples_per_s", "data_wait"}; resets

    log = MetricLogger(run_dir, main=acc.is_main_process, tensorboard=True)
    log.start(step)                                # rows with step > `step` leave metrics.jsonl for
                                                   # metrics.superseded.jsonl (no duplicate rows on resume);
                                                   # TensorBoard purges events after `step`
    log.log(step, {"loss": ..}); log.close()

    ckpt = CheckpointManager(run_dir, keep=2, accelerator=acc)     # folder run_dir/checkpoints/
    found = ckpt.resolve(resume)    # None | "auto" | "latest" | a step-* folder -> Path | None (start fresh)
    loaded = ckpt.load(found, model=model, optimizer=opt, scheduler=sched)   # -> Loaded(path, step, state, rng)
    set_rng_state(loaded.rng)       # when the recipe wants it (pretrain: after the data fast-forward)
    ckpt.save(step, model=model, optimizer=opt, scheduler=sched, state={...JSON-able...}) -> Path

Checkpoint folder `checkpoints/step-NNNNNNN/` (written as `.step-NNNNNNN.tmp`, renamed when complete):

    model.safetensors            full model state (gathered)
    optimizer.safetensors/.json  optimizer tensors / param groups and scalars (not under DeepSpeed)
    scheduler.json               LR scheduler state_dict (JSON)
    rng-RRR.safetensors          torch CPU/CUDA, numpy and Python RNG state of rank RRR
    trainer_state.json           {"format", "step", "run_id", "state": the recipe's extra JSON state}
    deepspeed/                   DeepSpeed only: the engine's own files (partitioned optimizer states)
    checksums.json               sha256 of every file above, written last: a folder without it is incomplete

Nothing is loaded through pickle, except under DeepSpeed, whose engine files (`deepspeed/*.pt`) DeepSpeed
loads itself with torch.load(weights_only=False); their sha256 is verified first, so a planted or altered file is
refused before DeepSpeed reads it. Files not listed in checksums.json (e.g. a planted `custom_checkpoint_0.pkl`)
are ignored with a warning and never opened.

Resume rules: `auto` = the newest verified checkpoint, or a fresh start only when the run has none at all;
`latest` = the same but an error when there is none. The `latest` pointer is a hint: if it names a missing or
damaged folder, the newest verified one is used with a warning naming the damaged file. Damaged checkpoints newer
than the one resumed are moved to `checkpoints/damaged/`; a verified newer one (another run history) makes the
resume an error, so nothing is overwritten. A fresh start (`resume` unset) in a run_dir with checkpoints is an
error. A resumed run moves metrics.jsonl rows after the resumed step to metrics.superseded.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from radalign import RadalignError
from radalign.io import atomic_write_json, atomic_write_text, sha256_file
from radalign.log import get_logger, is_rank_zero, rprint

CKPT_DIR = "checkpoints"
LATEST = "latest"  # text file naming the newest complete checkpoint folder
CHECKSUMS = "checksums.json"
STATE = "trainer_state.json"
FORMAT = "radalign-checkpoint/1"
DS_TAG = "deepspeed"

log = get_logger("radalign.training")


class NonFiniteLoss(RadalignError):
    """The loss became NaN/inf; carries the first bad step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# ----------------------------------------------------------------------------------------------------------
# Accelerator, precision, DeepSpeed


def _world_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _agreed_precision(requested: str, device: str) -> tuple[str, str]:
    """Resolve on rank 0 and broadcast (a timing probe may differ between processes)."""
    from radalign.precision import resolve_precision

    if device == "cuda" or _world_env() < 2 or requested in ("fp32", "fp16"):
        return resolve_precision(requested, device)
    import torch.distributed as dist

    if not dist.is_initialized():  # Accelerate reuses an initialised group
        dist.init_process_group("gloo")
    choice = [resolve_precision(requested, device) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def make_accelerator(precision: str = "auto", *, deepspeed: dict | None = None,
                     find_unused_parameters: bool = False):
    """(Accelerator, resolved precision, reason). See the module docstring.

    find_unused_parameters: DDP option for models whose forward may skip a submodule (the fusion head skips a
    modality absent from the whole batch)."""
    from accelerate import Accelerator

    log.info("allocator: %s", keep_freed_memory())
    cuda = torch.cuda.is_available()
    world_env = _world_env()
    if deepspeed is not None and not cuda and world_env < 2:
        raise RadalignError("deepspeed needs CUDA or a multi-process CPU launch (torchrun/accelerate launch "
                            "--multi_gpu --num_processes 2 with gloo); set deepspeed=null for one process")
    resolved, reason = _agreed_precision(precision, "cuda" if cuda else "cpu")
    acc = Accelerator(mixed_precision={"fp32": "no"}.get(resolved, resolved),
                      **_accelerator_kwargs(cuda, world_env, deepspeed, resolved, find_unused_parameters))
    _check_started(acc, world_env, deepspeed=deepspeed is not None)
    return acc, resolved, reason  # radalign.precision logged the choice and why


def _check_started(acc, world_env: int, *, deepspeed: bool) -> None:
    """Refuse an Accelerator that would not train as launched: a process count other than the launcher's, or
    DeepSpeed asked for but not started (never train plain DDP under DeepSpeed's name)."""
    if world_env != acc.num_processes:
        raise RadalignError(f"launcher started WORLD_SIZE={world_env} processes but Accelerate sees "
                            f"{acc.num_processes}: the processes would train independently. Launch with "
                            "torchrun or `accelerate launch --multi_gpu --num_processes N` (not --cpu).")
    started = getattr(acc.distributed_type, "value", acc.distributed_type)  # DistributedType is a str enum
    if deepspeed and started != "DEEPSPEED":
        raise RadalignError(f"deepspeed: Accelerate started {started}, not DeepSpeed (it ignores the "
                            "plugin when told to use the CPU: ACCELERATE_USE_CPU or `accelerate launch --cpu`). "
                            "Unset it (CPU launches need no flag), or drop deepspeed= to train with DDP.")


def _accelerator_kwargs(cuda: bool, world_env: int, deepspeed: dict | None, precision: str,
                        find_unused_parameters: bool) -> dict[str, Any]:
    """Accelerator(...) arguments besides the precision.

    cpu=True on CPU machines: with torchrun's env a plain Accelerator() would start world-size-1 jobs. Except under
    DeepSpeed: Accelerate turns the plugin on only `and not cpu`, so a CPU DeepSpeed run passes cpu=False with
    backend gloo; Accelerate then starts DeepSpeed's comm on gloo (DeepSpeed's CPU accelerator needs oneCCL only
    when oneccl_bindings_for_pytorch is installed) and the engine runs on the CPU."""
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers: list = []
    if not cuda and world_env > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    if find_unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    kwargs: dict[str, Any] = {"kwargs_handlers": handlers, "cpu": not cuda and deepspeed is None}
    if deepspeed is not None:
        if not cuda:
            _skip_inference_shm_op()
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_with_precision(deepspeed, precision))
    return kwargs


def _skip_inference_shm_op() -> None:
    """DeepSpeed's CPU comm backend JIT-compiles a shared-memory all-reduce (C++, about a CPU-minute and a compiler)
    that only its inference path calls; training's collectives go through gloo. Mark it unbuildable so it is not
    compiled (deepspeed.ops keeps the probed dict in the module for edits like this one)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_with_precision(ds: dict, precision: str) -> dict:
    """The DeepSpeed dict with its precision set by the resolved precision (one source of truth).

    bf16/fp16 run as DeepSpeed's `torch_autocast` (fp32 parameters, the engine's forward under torch.autocast,
    a GradScaler for fp16), as the DDP path runs them under Accelerate. Its `bf16`/`fp16` sections stay off:
    they cast the module's weights to 16 bits, and the float32 images then fail in the first convolution
    ("Input type (float) and weight type (BFloat16) should be the same"). Other keys of the sections are kept."""
    half = precision in ("bf16", "fp16")
    autocast = {**ds.get("torch_autocast", {}), "enabled": half}
    if half:
        autocast["dtype"] = {"bf16": "bfloat16", "fp16": "float16"}[precision]
    return {**ds, "bf16": {**ds.get("bf16", {}), "enabled": False}, "fp16": {**ds.get("fp16", {}), "enabled": False},
            "torch_autocast": autocast}


def deepspeed_file(configured: str | None) -> str | None:
    """`configured` (our `deepspeed=` key), or the file an `accelerate launch` DeepSpeed config names."""
    env_file = None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        env_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    return configured or env_file


def load_deepspeed_config(file: str, *, micro_batch: int, grad_clip: float | None) -> dict:
    """The DeepSpeed JSON with batch/clip fields from our config (one source of truth; no accumulation)."""
    from radalign.config import resolve_config_path

    ds = json.loads(Path(resolve_config_path(file, stage="deepspeed")).read_text())
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = 1
    ds.pop("train_batch_size", None)
    # accelerate's plugin clips at 1.0 when the JSON says "auto"; say explicitly what we want (0 = off).
    ds["gradient_clipping"] = float(grad_clip or 0.0)
    return ds


def is_deepspeed(acc) -> bool:
    return getattr(acc.state, "deepspeed_plugin", None) is not None


def reset_accelerate_state() -> None:
    """Let a later run in the same process (tests, notebooks) choose other precision/plugins."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def eval_module(acc, model: nn.Module) -> nn.Module:
    """The module to run forward on in evaluation: the engine under ZeRO-3 (partitioned params), else the plain
    module (DDP forward would broadcast buffers, a collective that hangs when ranks have unequal batch counts)."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        return model
    return acc.unwrap_model(model)


def gather_to_main(acc, obj: Any) -> list | None:
    """Every rank's `obj` (picklable, in memory only) as a list on the main process; None on the others."""
    if acc.num_processes > 1:
        parts: list = [None] * acc.num_processes
        torch.distributed.all_gather_object(parts, obj)
    else:
        parts = [obj]
    return parts if acc.is_main_process else None


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock on `run_dir` held by global rank 0 (the other ranks of the same launch share it)."""
    if is_rank_zero():
        from radalign.lock import output_lock

        with output_lock(run_dir, what="run_dir"):
            yield
    else:
        yield


# glibc mallopt parameters (malloc.h) and the values set by keep_freed_memory.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 256 << 20  # allocations below this come from the heap and are reused, not mapped afresh
TRIM_THRESHOLD = 1 << 30    # free memory kept at the heap's top before it is handed back to the OS
# A user's own allocator choice wins: glibc's environment settings, or another malloc preloaded.
_USER_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


def keep_freed_memory() -> str:
    """Stop glibc's malloc from handing freed memory back to the OS between training steps; returns what it did
    or why it did nothing.

    Why: every step frees and re-allocates the same activation buffers (hundreds of KiB to hundreds of MiB). With
    glibc's defaults, blocks above the mmap threshold (128 KiB, raised only as large blocks are freed) are
    mapped per allocation and unmapped on free, and freed heap tops are trimmed, so each step touches fresh
    pages: on a 2-core CPU the pretraining process took several times the minor page faults of open_clip_train's
    and a few percent of its time in the kernel (bench/RESULTS.md, "pretrain"). Fixed, higher thresholds make
    the second step reuse the first step's memory. Both are needed: setting the mmap threshold alone also fixes the
    trim threshold at its 128 KiB default, and the freed heap top is handed back each step (2.4 of the 3.2 million
    faults remained). Peak RSS of the training process: +9 % on the demo's model.

    Only on glibc (Linux); never when the user chose: a `MALLOC_*_` / `GLIBC_TUNABLES=glibc.malloc...` setting,
    or jemalloc/tcmalloc/mimalloc in LD_PRELOAD.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return "left as is (not glibc)"
    chosen = [k for k in _USER_MALLOC_ENV if k in os.environ]
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # libjemalloc, libtcmalloc, libmimalloc
        chosen.append("LD_PRELOAD")
    if chosen:
        return f"left as is ({', '.join(chosen)} set by the user)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "left as is (mallopt not found)"
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return (f"glibc malloc keeps freed memory (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold "
            f"{TRIM_THRESHOLD >> 20} MiB)" if ok else "left as is (mallopt refused the thresholds)")


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


# ----------------------------------------------------------------------------------------------------------
# Optimizer


# Parameters of these modules are scales and shifts of a normalisation, whatever their shape.
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
NO_DECAY_NAMES = ("logit_scale", "logit_bias")  # the contrastive temperature and SigLIP's bias


def _decays(name: str, p: nn.Parameter, norm_params: set[int]) -> bool:
    """The weight-decay rule, as in CLIP/open_clip: decay weight matrices and kernels (ndim >= 2, embedding
    tables included); never norms (any parameter of a normalisation module, whatever its shape), biases (the
    name's last part contains `bias`: `bias`, `in_proj_bias`, `relative_position_bias_table`), the logit
    scale/bias, or any other parameter with ndim < 2 (gains, the 1-D class embedding)."""
    leaf = name.rsplit(".", 1)[-1]
    return not (p.ndim < 2 or id(p) in norm_params or "bias" in leaf or leaf in NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float, lr_of: Mapping[str, float] | None = None) -> list[dict]:
    """[{decayed params, weight_decay}, {the rest, weight_decay 0}] by `_decays`; frozen parameters left out.
    lr_of: {parameter name prefix: learning rate}: the parameters under a prefix form their own two groups with
    that `lr` (the others take the optimizer's); the longest matching prefix wins."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    lr_of = dict(lr_of or {})
    groups: dict[tuple, list] = {(pre, decays): [] for pre in (None, *lr_of) for decays in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            pre = max((q for q in lr_of if name.startswith(q)), key=len, default=None)
            groups[(pre, _decays(name, p, norm_params))].append(p)
    out = []
    for (pre, decays), params in groups.items():
        if pre is None or params:  # the default pair always (an optimizer's usual shape), the others when used
            group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
            out.append(group if pre is None else {**group, "lr": float(lr_of[pre])})
    return out


def adamw(model: nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
          lr_of: Mapping[str, float] | None = None):
    """Fused AdamW over `param_groups` (one kernel for all parameters: 4-5x faster step on CPU); `lr_of`: other
    learning rates by parameter name prefix (param_groups)."""
    return torch.optim.AdamW(param_groups(model, weight_decay, lr_of), lr=lr, betas=tuple(betas), eps=eps,
                             fused=True)


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up then cosine decay; step it once per optimizer step (not through accelerator.prepare)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)


# ----------------------------------------------------------------------------------------------------------
# Meter + NaN guard: losses stay on the device; one host sync per check


class Meter:
    """Throughput, data wait and loss between two log lines; the loss is synced only in `check`."""

    def __init__(self, acc):
        self.acc = acc
        self.reset()

    def reset(self) -> None:
        self.t0, self.wait, self.samples = time.perf_counter(), 0.0, 0
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.values: list[float] = []

    def add(self, step: int, loss: torch.Tensor, *, samples: int, wait: float = 0.0) -> None:
        self.pending.append((step, loss.detach().float().reshape(())))
        self.samples += samples
        self.wait += wait

    def check(self, *, last_good: str | os.PathLike | None = None, hint: str = "") -> None:
        """Raise NonFiniteLoss (on every rank alike) if any pending loss of any rank is NaN/inf."""
        if not self.pending:
            return
        steps = [s for s, _ in self.pending]
        values = torch.stack([v for _, v in self.pending])  # [n]
        bad = (~torch.isfinite(values)).float()  # [n]
        if self.acc.num_processes > 1:  # all ranks agree (one raising alone would hang the next collective)
            bad = self.acc.reduce(bad, reduction="sum")
        host = torch.cat([values, bad]).tolist()  # the one host sync
        n = len(steps)
        self.pending = []
        for i in range(n):
            if host[n + i] > 0:
                raise NonFiniteLoss(
                    f"loss became {host[i]} at step {steps[i]}; stopped. Last good "
                    f"checkpoint: {last_good or 'none yet'}. {hint}".rstrip(), steps[i])
        self.values += host[:n]

    def summary(self, **check_kwargs) -> dict:
        self.check(**check_kwargs)
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        row = {"samples_per_s": self.samples / elapsed, "data_wait": self.wait / elapsed,
               "loss": sum(self.values) / max(len(self.values), 1)}
        self.reset()
        return row


# ----------------------------------------------------------------------------------------------------------
# Metric logging: metrics.jsonl + TensorBoard, on the main process


class MetricLogger:
    """Rows `{"step", ...}` appended to run_dir/metrics.jsonl and, optionally, TensorBoard scalars."""

    def __init__(self, run_dir: str | os.PathLike, *, main: bool = True, tensorboard: bool = True):
        self.run_dir, self.main, self.tensorboard = Path(run_dir), main, tensorboard
        self.file = self.run_dir / "metrics.jsonl"
        self.history: list[dict] = []
        self.writer = None

    def start(self, step: int) -> int:
        """Continue at `step`: rows after it move to metrics.superseded.jsonl. Returns how many moved."""
        if not self.main:
            return 0
        moved = 0
        if self.file.is_file():
            keep, drop = [], []
            for line in self.file.read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    row_step = int(json.loads(line).get("step", 0))
                except (ValueError, AttributeError):
                    row_step = step + 1  # unreadable (half-written) line: never silently kept as history
                (keep if row_step <= step else drop).append(line)
            if drop:
                with open(self.run_dir / "metrics.superseded.jsonl", "a") as f:
                    f.write("".join(x + "\n" for x in drop))
                atomic_write_text(self.file, "".join(x + "\n" for x in keep))
                log.warning(f"{self.file}: {len(drop)} row(s) after step {step} belong to a history that was not "
                            "resumed; moved to metrics.superseded.jsonl")
            moved = len(drop)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step + 1 if step else None)
        return moved

    def log(self, step: int, row: dict) -> None:
        if not row or not self.main:
            return
        row = {"step": step, **row}
        self.history.append(row)
        with open(self.file, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ----------------------------------------------------------------------------------------------------------
# RNG state (safetensors + JSON metadata; no pickle)


def get_rng_state() -> dict:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_py = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_py]}
    return {"tensors": state, "meta": meta}


def set_rng_state(rng: dict | None) -> None:
    """Restore what `get_rng_state` returned (a no-op for None)."""
    if not rng:
        return
    t, meta = rng["tensors"], rng["meta"]
    torch.set_rng_state(t["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [t[k] for k in sorted((k for k in t if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, t["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_py = meta["python"]
    random.setstate((version, tuple(internal), gauss_py))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def _json_safe(obj: Any, what: str) -> Any:
    """`obj` if it is JSON data (dict/list/str/number/bool/None), else a RadalignError naming `what`."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v, f"{what}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v, what) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if torch.is_tensor(obj) and obj.numel() == 1:
        return obj.item()
    raise RadalignError(f"checkpoint: {what} is a {type(obj).__name__}, not JSON data; it cannot be saved "
                        "without pickle")


def _state_tensors(state: dict) -> dict[str, torch.Tensor]:
    """Tensors for safetensors: contiguous CPU copies, shared storage cloned (safetensors refuses aliasing)."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if ptr in seen:
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    return out


def _optimizer_files(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}/{key}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}/{key}"] = v
    return tensors, {"param_groups": _json_safe(sd["param_groups"], "optimizer.param_groups"),
                     "scalars": _json_safe(scalars, "optimizer.state")}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for name, v in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = v
    return {"state": state, "param_groups": meta["param_groups"]}


@dataclass
class Loaded:
    """What `CheckpointManager.load` read."""

    path: Path
    step: int
    state: dict = field(default_factory=dict)  # the recipe's extra JSON state
    rng: dict | None = None  # this rank's RNG state, for `set_rng_state`
    run_id: str = ""


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


class CheckpointManager:
    """Atomic, checksummed, pickle-free checkpoints in `run_dir/checkpoints/`; see the module docstring."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 2, accelerator=None):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CKPT_DIR
        self.keep = max(int(keep), 1)
        self.acc = accelerator
        self.run_id = uuid.uuid4().hex  # a fresh history; a resumed run takes the checkpoint's

    # -- helpers
    @property
    def _main(self) -> bool:
        return self.acc is None or self.acc.is_main_process

    @property
    def _rank(self) -> int:
        return 0 if self.acc is None else self.acc.process_index

    def _barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()

    def checkpoints(self) -> list[Path]:
        """step-* folders, oldest first (complete or not)."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.glob("step-*") if p.is_dir() and _step_of(p) >= 0), key=_step_of)

    def latest_pointer(self) -> Path | None:
        pointer = self.root / LATEST
        if pointer.is_file():
            return self.root / pointer.read_text().strip()
        return None

    # -- verification
    def verify(self, path: str | os.PathLike) -> str | None:
        """None when `path` is a complete checkpoint whose files match checksums.json, else what is wrong."""
        path = Path(path)
        if not path.is_dir():
            return f"{path}: no such folder"
        sums_file = path / CHECKSUMS
        if not sums_file.is_file():
            return (f"{sums_file}: missing, so the checkpoint is incomplete (or written by a radalign without "
                    "checksums, which cannot be loaded without pickle)")
        try:
            sums = json.loads(sums_file.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{sums_file}: damaged ({e})"
        for name in (STATE, "model.safetensors"):
            if name not in sums:
                return f"{path / name}: not listed in {CHECKSUMS}; the checkpoint is incomplete"
        for name, digest in sums.items():
            file = path / name
            if not file.is_file():
                return f"{file}: missing (listed in {CHECKSUMS})"
            if sha256_file(file) != digest:
                return f"{file}: damaged (sha256 differs from {CHECKSUMS}; truncated or altered)"
        extra = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                       if p.is_file() and p.name != CHECKSUMS and str(p.relative_to(path)) not in sums)
        if extra:
            log.warning(f"{path}: file(s) not written by radalign, ignored and never opened: {', '.join(extra)}")
        return None

    # -- resume
    def resolve(self, which: str | None) -> Path | None:
        """The checkpoint to resume from for `which` (see module docstring), None for a fresh start."""
        if self.acc is not None and self.acc.num_processes > 1:
            choice = [self._resolve(which) if self._main else None]
            torch.distributed.broadcast_object_list(choice, src=0)
            return None if choice[0] is None else Path(choice[0])
        return self._resolve(which)

    def _resolve(self, which: str | None) -> Path | None:
        existing = self.checkpoints()
        if not which:
            if existing:
                raise RadalignError(
                    f"{self.root} already holds checkpoints ({existing[-1].name} is the newest); a fresh start "
                    "would overwrite them. Continue with resume=auto (or resume=latest), or choose another run_dir.")
            return None
        if which in ("auto", "latest"):
            chosen = self._newest_verified(existing)
            if chosen is None:
                if which == "auto" and not existing:
                    return None
                listed = ", ".join(p.name for p in existing) or "none"
                raise RadalignError(f"resume={which}: no complete checkpoint found (looked in {self.root}; "
                                    f"folders: {listed}). Start without resume in a new run_dir, or pass a step-* "
                                    "folder")
        else:
            chosen = Path(which)
            problem = self.verify(chosen)
            if problem:
                fallback = self._newest_verified([p for p in existing if _step_of(p) < _step_of(chosen)], quiet=True)
                raise RadalignError(f"resume={which}: {problem}. "
                                    + (f"The previous complete checkpoint is {fallback}; pass resume={fallback}."
                                       if fallback else "No earlier complete checkpoint exists."))
        self._guard_newer(chosen, existing)
        return chosen

    def _newest_verified(self, folders: list[Path], quiet: bool = False) -> Path | None:
        pointer = self.latest_pointer()
        if not quiet and pointer is not None and not pointer.is_dir():
            log.warning(f"{self.root / LATEST} names {pointer.name}, which does not exist; looking for the newest "
                        "complete checkpoint")
        for path in reversed(folders):
            problem = self.verify(path)
            if problem is None:
                return path
            if not quiet:
                log.warning(f"checkpoint {path.name} is damaged and skipped: {problem}; falling back to the "
                            "previous complete checkpoint")
        return None

    def _guard_newer(self, chosen: Path, existing: list[Path]) -> None:
        """Never overwrite: damaged newer folders move to damaged/, verified newer ones are an error."""
        newer = [p for p in existing if _step_of(p) > _step_of(chosen)]
        for path in newer:
            if self.verify(path) is None:
                raise RadalignError(
                    f"resume from {chosen.name}: {path} is a complete checkpoint of a later step; continuing would "
                    "overwrite a checkpoint of another run history. Resume with resume=latest, or copy "
                    f"{chosen} into a new run_dir's checkpoints/ to branch from it.")
        if newer and self._main:
            dest = self.root / "damaged"
            dest.mkdir(exist_ok=True)
            for path in newer:
                target = dest / f"{path.name}-{time.strftime('%Y%m%dT%H%M%S')}"
                os.replace(path, target)
                log.warning(f"moved damaged checkpoint {path.name} to {target} (kept, never overwritten)")

    def load(self, path: str | os.PathLike, *, model: nn.Module, optimizer=None, scheduler=None) -> Loaded:
        """Load model/optimizer/scheduler from a verified folder; returns step, extra state and this rank's RNG."""
        from safetensors.torch import load_file

        path = Path(path)
        state = json.loads((path / STATE).read_text())
        if state.get("format") != FORMAT:
            raise RadalignError(f"{path / STATE}: format {state.get('format')!r}, expected {FORMAT!r}")
        if self.acc is not None and is_deepspeed(self.acc):
            # DeepSpeed's own (pickled) engine files, verified by sha256 above; see the module docstring.
            model.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            core = self.acc.unwrap_model(model) if self.acc is not None else model
            core.load_state_dict(load_file(str(path / "model.safetensors")))
            if optimizer is not None:
                meta = json.loads((path / "optimizer.json").read_text())
                optimizer.load_state_dict(_optimizer_state(load_file(str(path / "optimizer.safetensors")), meta))
        if scheduler is not None:
            scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        rng = None
        rng_file = path / f"rng-{self._rank:03d}.safetensors"
        if rng_file.is_file():
            from safetensors import safe_open

            with safe_open(str(rng_file), "pt") as f:
                rng = {"tensors": {k: f.get_tensor(k) for k in f.keys()},
                       "meta": json.loads(f.metadata()["rng"])}
        self.run_id = state.get("run_id") or self.run_id
        rprint(f"resumed from {path} at step {state['step']}")
        return Loaded(path, int(state["step"]), state.get("state", {}), rng, self.run_id)

    # -- save
    def save(self, step: int, *, model: nn.Module, optimizer=None, scheduler=None, state: dict | None = None) -> Path:
        """Write checkpoint `step` atomically on all ranks together; prune to `keep`; update `latest`."""
        from safetensors.torch import save_file

        name = f"step-{step:07d}"
        final, tmp = self.root / name, self.root / f".{name}.tmp"
        extra = _json_safe(state or {}, "state")
        if self._main:
            self._refuse_foreign(final)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        ds = self.acc is not None and is_deepspeed(self.acc)
        if ds:
            model.save_checkpoint(str(tmp), tag=DS_TAG)  # every rank writes its partition
        full = self.acc.get_state_dict(model) if self.acc is not None else model.state_dict()  # all ranks (ZeRO-3)
        rng = get_rng_state()
        save_file(rng["tensors"], str(tmp / f"rng-{self._rank:03d}.safetensors"), metadata={"rng": json.dumps(rng["meta"])})
        if self._main:
            save_file(_state_tensors(full), str(tmp / "model.safetensors"))
            if optimizer is not None and not ds:
                tensors, meta = _optimizer_files(optimizer)
                save_file(tensors, str(tmp / "optimizer.safetensors"))
                atomic_write_json(tmp / "optimizer.json", meta)
            if scheduler is not None:
                atomic_write_json(tmp / "scheduler.json", _json_safe(scheduler.state_dict(), "scheduler"))
            atomic_write_json(tmp / STATE, {"format": FORMAT, "step": step, "run_id": self.run_id, "state": extra})
        self._barrier()
        if self._main:
            self._commit(tmp, final)
        self._barrier()
        return final

    def _refuse_foreign(self, final: Path) -> None:
        if not final.exists():
            return
        try:
            other = json.loads((final / STATE).read_text()).get("run_id")
        except (OSError, ValueError):
            other = None
        if other != self.run_id:
            raise RadalignError(f"{final} exists and belongs to another run history (run_id {other}); not "
                                "overwriting it. Use another run_dir or resume=latest.")

    def _commit(self, tmp: Path, final: Path) -> None:
        sums = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_json(tmp / CHECKSUMS, {"format": "radalign-checksums/1", "files": sums})  # written last
        old = None
        if final.exists():  # same history re-saving a step: keep the old one until the new one is in place
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        atomic_write_text(self.root / LATEST, final.name + "\n")
        self.prune()

    def prune(self) -> None:
        """Keep the newest `keep` complete checkpoints (those with checksums.json); delete older complete ones.

        Never deleted, and never counted toward `keep`: an incomplete step-* folder (a crashed write, kept for
        forensics), a `.step-*.tmp` folder still being written, and anything under `damaged/`."""
        complete = [p for p in self.checkpoints() if (p / CHECKSUMS).is_file()]
        for old in complete[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "CKPT_DIR", "LATEST", "CheckpointManager", "Loaded", "Meter", "MetricLogger", "NonFiniteLoss", "adamw",
    "cosine_schedule", "deepspeed_file", "deepspeed_with_precision", "eval_module", "gather_to_main",
    "get_rng_state", "is_deepspeed", "keep_freed_memory",
    "load_deepspeed_config", "make_accelerator", "param_groups", "peak_memory_gb", "reset_accelerate_state",
    "run_lock", "set_rng_state",
]

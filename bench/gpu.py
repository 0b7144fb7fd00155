"""The GPU check of issue 23 in one command (run it through `bench/gpu.sh`, which sets the environment up).

    bench/gpu.sh                        # on a GPU machine: every part at full size (docs/pretrain.md "On GPUs")
    bench/gpu.sh --dry-run              # anywhere: every part shrunk to seconds on the CPU
    .venv/bin/python bench/gpu.py --dry-run --parts faiss,embed --out /tmp/gpu   # some parts only

Parts, in order of value; each runs in its own process with its own time limit (and all within --budget):

1. throughput   ViT-B/16 (configs/pretrain/vit-b16.yaml: 224 px, text context 77) in bf16 on synthetic shards:
                the largest batch that fits (doubling until out of memory), then 100 steps of `radalign pretrain`
                and of open_clip_train (bench/pretrain.py's pairing): samples/s, peak memory, and model FLOPs
                utilisation against the GPU's dense bf16 peak (FLOPs counted by torch.utils.flop_counter on one
                step, the analytic ViT + text-transformer count beside it).
2. deepspeed    ZeRO-2 and ZeRO-3 through Accelerate on one GPU: 20 steps uninterrupted; the same run killed
                (SIGKILL) after its step-10 checkpoint, the checkpoint's files checked against checksums.json here
                (hashlib, independent of radalign) and resumed; the two loss curves compared step by step.
3. precision    `precision=auto` on CUDA picks bf16 and logs why; `precision=fp16` trains with a loss scaler.
4. faiss        10^6 x 512 vectors, flat and IVF-Flat, built and searched on the GPU and on the CPU: recall@10
                against exact search and queries/s (skipped with the reason when faiss has no GPU support).
5. embed        `data.embed.embed_split` on the GPU with 4 loader workers: images/s.

Each part writes `$OUT/<n>-<part>.json`: {"part", "status": "ok" | "failed" | "skipped", "reason",
"traceback_tail", "seconds", "checks": {name: {"status", "reason", ...figures}}, "commands"}; a part is failed
when one of its checks failed and skipped when all of them were (a dry run reports every GPU-only figure as a
skipped check with the reason). The JSON is rewritten after every check, so a part stopped at its time limit
keeps what it measured. `$OUT/0-machine.json` describes the machine (GPU, driver, CUDA, torch), the environment
and the shards. The command exits 0 whatever happens: the statuses say what went wrong.

Stages are run through the `radalign` console command (stable across the move of the stage packages under
`radalign.`); the few library calls (batch search, FLOP count, embedding pass) import a stage module from
`radalign.<stage>` when it exists there, else from `<stage>`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench/data.py would shadow the `data` package: keep bench/ off sys.path, the repository root first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from radalign.io import atomic_write_json  # noqa: E402

REPO = HERE.parent
TAIL = 3000  # characters of a log or traceback kept in a part's JSON
# Dense bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by the name torch reports.
BF16_PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H200": 989.0}
GOALS = {"ours_over_open_clip_samples_per_s": 1.0, "mfu_vit_b16_bf16_h100": 0.40}  # issue 23's goal figures
RESUME_TOLERANCE = 1e-6  # |loss difference| per step: tests/test_pretrain.py::test_resume_reproduces_uninterrupted_run


class Skip(Exception):
    """A check that cannot run here (a GPU-only figure in a dry run, faiss without GPU support); says why."""


class Failed(Exception):
    """A check that ran and failed; carries the figures measured before the failure."""

    def __init__(self, reason: str, figures: dict | None = None):
        super().__init__(reason)
        self.figures = figures or {}


# ----------------------------------------------------------------------------------------------------------
# The plan: sizes and limits of one run


@dataclass
class Plan:
    """What every part does in this run; `make_plan` fills it for the GPU or for the dry run."""

    dry_run: bool
    """Every part shrunk to seconds on the CPU; GPU-only figures reported as skipped checks."""
    device: str
    """'cuda' when torch sees a GPU, else 'cpu'."""
    out: str
    """Folder of the JSON results (the device tool's $OUT)."""
    work: str
    """Scratch folder: shards, run folders, logs (kept between runs, so a rerun reuses the shards)."""
    config: str = "pretrain/vit-b16"
    """Pretrain config every run starts from."""
    model: str = "ViT-B-16"
    """Model config (name or JSON path); ViT-B-16: 224 px, patch 16, text context 77."""
    precision: str = "bf16"
    """Precision of the throughput runs (auto and fp16 are part 3's)."""
    patients: int = 400
    """Synthetic patients for the shards (`radalign data synth`)."""
    image_px: int = 256
    """Pixels of the synthetic images and of the prepared shards (the transform crops 224 from them)."""
    shard_size: int = 64
    """Samples per shard."""
    workers: int = 8
    """DataLoader workers of each trainer (the same for ours and open_clip_train)."""
    steps: int = 100
    """Throughput steps per trainer."""
    log_every: int = 10
    """Steps per log window."""
    skip: int = 20
    """Warm-up steps left out of the throughput median."""
    warmup: int = 10
    """LR warm-up steps of the throughput runs (both trainers)."""
    batch: int | None = None
    """Throughput batch; None: search (GPU only)."""
    cpu_batch: int = 8
    """Throughput batch where the search cannot run (a dry run on a CPU)."""
    batch_start: int = 64
    """First batch of the doubling search."""
    batch_max: int = 4096
    """Largest batch tried."""
    memory_cap: float = 0.9
    """The search keeps batches whose peak memory is at most this share of the GPU's memory (headroom for
    the allocator's fragmentation in the real run)."""
    flops_batch: int = 32
    """Batch of the FLOP-counted step (FLOPs per sample do not depend on the batch beyond the B x B logits)."""
    peak_tflops: float | None = None
    """The GPU's dense bf16 peak; None: looked up by name (BF16_PEAK_TFLOPS)."""
    ds_steps: int = 20
    """Steps of each DeepSpeed run."""
    ds_ckpt_every: int = 10
    """Checkpoint interval of the DeepSpeed runs; the kill comes right after the first one."""
    ds_batch: int = 32
    """Micro-batch of the DeepSpeed runs."""
    ds_processes: int = 1
    """Processes of the DeepSpeed launches (1 GPU; 2 gloo processes on the CPU, DeepSpeed's minimum there)."""
    ds_workers: int = 4
    """DataLoader workers of the DeepSpeed and precision runs."""
    precision_steps: int = 10
    """Steps of the precision runs."""
    faiss_n: int = 1_000_000
    """Vectors in the faiss database."""
    faiss_dim: int = 512
    """Their dimension."""
    faiss_queries: int = 2000
    """Queries searched on each index (and on the exact reference)."""
    faiss_nlist: int = 1024
    """IVF-Flat lists."""
    faiss_nprobe: int = 16
    """IVF-Flat lists searched per query."""
    embed_workers: int = 4
    """Loader workers of the embedding pass."""
    embed_batch: int = 256
    """Images per forward of the embedding pass."""
    embed_passes: int = 3
    """Timed passes over the split (the median is reported)."""
    budget: float = 480.0
    """Seconds for the whole run (the device tool allows 600 per command, 900 per session with the start)."""
    limits: dict = field(default_factory=lambda: {
        "shards": 60, "throughput": 180, "deepspeed": 170, "precision": 60, "faiss": 60, "embed": 45})
    """Seconds each step may take at most (less when the budget has less left)."""


def dry_plan(plan: Plan) -> Plan:
    """The same run shrunk to seconds: a 2-layer model at 64 px, a few steps, small faiss; on the CPU where CUDA
    is absent (DeepSpeed then needs 2 gloo processes), else on the GPU (a smoke test before the full run)."""
    return replace(
        plan, model=str(REPO / "tests" / "assets" / "nano.json"), precision="fp32", patients=40, image_px=64,
        shard_size=16, workers=1, steps=6, log_every=2, skip=2, warmup=1, batch_start=8, batch_max=64,
        flops_batch=4, ds_steps=6, ds_ckpt_every=3, ds_batch=4, ds_processes=1 if plan.device == "cuda" else 2,
        ds_workers=0, precision_steps=2,
        faiss_n=20_000, faiss_dim=64, faiss_queries=200, faiss_nlist=64, faiss_nprobe=8, embed_workers=2,
        embed_batch=16, embed_passes=2, budget=1200.0,
        limits={"shards": 120, "throughput": 300, "deepspeed": 500, "precision": 200, "faiss": 120, "embed": 150})


PARTS = ("throughput", "deepspeed", "precision", "faiss", "embed")  # in order of value
NEEDS_SHARDS = {"throughput", "deepspeed", "precision", "embed"}


def part_file(plan: Plan, name: str) -> Path:
    return Path(plan.out) / f"{PARTS.index(name) + 1}-{name}.json"


# ----------------------------------------------------------------------------------------------------------
# Pure helpers (tested in tests/test_gpu_script.py against hand-worked numbers)


def bf16_peak_tflops(gpu_name: str) -> float | None:
    """Dense bf16 peak of a GPU by the name torch reports ("NVIDIA H100 80GB HBM3" is the SXM part); None when
    unknown (then MFU is skipped unless --peak-tflops gives it)."""
    name = gpu_name.upper()
    if "H200" in name:
        return BF16_PEAK_TFLOPS["H200"]
    if "H100" in name and "PCIE" in name:
        return BF16_PEAK_TFLOPS["H100 PCIe"]
    if "H100" in name and ("SXM" in name or "HBM3" in name):
        return BF16_PEAK_TFLOPS["H100 SXM"]
    return None


def doubling(start: int, stop: int) -> list[int]:
    """start, 2 start, 4 start, ... up to stop inclusive."""
    out, b = [], start
    while b <= stop:
        out.append(b)
        b *= 2
    return out


def choose_batch(trials: list[dict], cap_bytes: float) -> int | None:
    """Largest batch that ran (no out-of-memory) with its peak memory at most `cap_bytes`; None if none did."""
    ok = [t["batch"] for t in trials if t["fits"] and t["peak_bytes"] <= cap_bytes]
    return max(ok) if ok else None


def tower_forward_flops(tokens: int, width: int, layers: int, mlp_ratio: float = 4.0, attention: bool = True) -> float:
    """Matmul FLOPs of a transformer's blocks on one sequence: per layer q/k/v/out projections 8 n d^2, the MLP
    4 r n d^2, and (with `attention`) the attention scores and their weighted sum 4 n^2 d (2 FLOPs per
    multiply-add)."""
    return layers * (8 * tokens * width**2 + 4 * mlp_ratio * tokens * width**2 + 4 * tokens**2 * width * attention)


def analytic_train_flops(model_cfg: dict, attention: bool = True) -> float:
    """Training FLOPs per image-report pair: 3 x the forward matmul FLOPs (backward = 2 x forward) of the ViT's
    blocks over patches + class token and projection and of the text transformer's blocks over the context and
    projection, plus 2 x the patch embedding's (the images need no gradient, only the weights do). Norms,
    activations and the B x B logits are left out (under 0.1% here). `attention=False` leaves out the 4 n^2 d
    terms too: torch's FlopCounterMode does not count the CPU attention kernel (it does count CUDA's)."""
    v, t, embed = model_cfg["vision_cfg"], model_cfg["text_cfg"], model_cfg["embed_dim"]
    grid = (v["image_size"] // v["patch_size"]) ** 2
    patch = 2 * grid * 3 * v["patch_size"] ** 2 * v["width"]
    vision = tower_forward_flops(grid + 1, v["width"], v["layers"], v.get("mlp_ratio", 4.0), attention)
    text = tower_forward_flops(t["context_length"], t["width"], t["layers"], t.get("mlp_ratio", 4.0), attention)
    return 2.0 * patch + 3.0 * (vision + 2 * v["width"] * embed + text + 2 * t["width"] * embed)


def mfu(samples_per_s: float, flops_per_sample: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
    return samples_per_s * flops_per_sample / (peak_tflops * 1e12)


def compare_curves(reference: dict[int, float], other: dict[int, float], after: int) -> dict:
    """Step-by-step |loss difference| of two runs: steps up to `after` (both runs trained them from the same
    start: run-to-run determinism) and after it (the resumed steps). Missing steps are listed."""
    missing = sorted(set(reference) ^ set(other))
    common = sorted(set(reference) & set(other))
    diffs = {s: abs(reference[s] - other[s]) for s in common}
    before = [d for s, d in diffs.items() if s <= after]
    resumed = [d for s, d in diffs.items() if s > after]
    return {"compared_steps": common, "missing_steps": missing,
            "max_abs_diff_before_kill": max(before) if before else None,
            "max_abs_diff_resumed": max(resumed) if resumed else None}


def verify_checksums(folder: Path) -> dict:
    """Check a checkpoint folder against its checksums.json with hashlib (independently of radalign): every
    listed file present with its sha256, every file listed. Raises Failed naming the first bad file."""
    import hashlib

    sums_file = folder / "checksums.json"
    if not sums_file.is_file():
        raise Failed(f"{sums_file}: missing")
    listed = json.loads(sums_file.read_text())["files"]
    for name, digest in sorted(listed.items()):
        h = hashlib.sha256()
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != digest:
            raise Failed(f"{folder / name}: sha256 {h.hexdigest()[:12]} differs from checksums.json")
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "checksums.json"}
    if present - set(listed):
        raise Failed(f"{folder}: files not in checksums.json: {sorted(present - set(listed))}")
    return {"files": len(listed), "deepspeed_files": sorted(n for n in listed if n.startswith("deepspeed/")),
            "bytes": sum((folder / n).stat().st_size for n in listed)}


def overall(checks: dict) -> tuple[str, str | None]:
    """A part's status and reason from its checks: failed if one failed (or never finished), skipped if all
    were skipped, else ok."""
    bad = {k: c for k, c in checks.items() if c.get("status") not in ("ok", "skipped")}
    if bad:
        return "failed", "; ".join(f"{k}: {c.get('reason') or c.get('status')}" for k, c in bad.items())
    if not checks or all(c["status"] == "skipped" for c in checks.values()):
        return "skipped", "; ".join(f"{k}: {c.get('reason')}" for k, c in checks.items()) or "nothing to run"
    return "ok", None


def shown(cmd: list) -> list[str]:
    """A command for the log: inline Python code (`python -c ...`) as <code>."""
    return ["<code>" if "\n" in str(c) else str(c) for c in cmd]


def tail(text: str, n: int = TAIL) -> str:
    return text[-n:]


# ----------------------------------------------------------------------------------------------------------
# A part's JSON


class Report:
    """A part's JSON file, rewritten after every check so a part stopped at its limit keeps its figures."""

    def __init__(self, plan: Plan, name: str):
        self.path = part_file(plan, name)
        self.t0 = time.perf_counter()
        self.data = {"part": name, "n": PARTS.index(name) + 1, "status": "running", "reason": None,
                     "traceback_tail": None, "dry_run": plan.dry_run, "device": plan.device,
                     "started": now_iso(), "seconds": 0.0, "checks": {}, "commands": []}
        self.save()

    def save(self) -> None:
        self.data["seconds"] = round(time.perf_counter() - self.t0, 1)
        atomic_write_json(self.path, self.data)

    def check(self, name: str, fn: Callable[[], dict | None]) -> dict:
        """Run one check: its figures under checks[name] with status ok, skipped (Skip), or failed (Failed or
        any exception, with the traceback's tail)."""
        print(f"[{self.data['part']}] {name} ...", flush=True)
        self.data["checks"][name] = {"status": "running"}
        self.save()
        try:
            out = {"status": "ok", **(fn() or {})}
        except Skip as e:
            out = {"status": "skipped", "reason": str(e)}
        except Failed as e:
            out = {**e.figures, "status": "failed", "reason": str(e)}
        except Exception as e:  # a check's failure is a result; the next checks still run
            out = {"status": "failed", "reason": tail(f"{type(e).__name__}: {e}", 1000),
                   "traceback_tail": tail(traceback.format_exc())}
        self.data["checks"][name] = out
        self.save()
        print(f"[{self.data['part']}] {name}: {out['status']}" + (f" ({out['reason']})" if out.get("reason") else ""),
              flush=True)
        return out

    def command(self, cmd: list[str], rc: int | None, seconds: float, log: Path) -> None:
        self.data["commands"].append({"cmd": " ".join(shown(cmd)), "rc": rc, "seconds": round(seconds, 1),
                                      "log": str(log)})
        self.save()

    def finish(self) -> None:
        self.data["status"], self.data["reason"] = overall(self.data["checks"])
        self.save()


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------------
# Child processes: each in its own process group, killed with its children at its time limit

_CHILDREN: set[subprocess.Popen] = set()


def child_env(**extra: str) -> dict:
    """This environment (PYTHONPATH from gpu.sh included) with offline hubs; `extra` on top."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start(cmd: list[str], log: Path, *, cwd: Path = REPO, env: dict | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env or child_env(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _CHILDREN.add(proc)
    return proc


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child and every process under it: its process group, and the descendants that left it
    (torchrun starts its workers in sessions of their own, where a group kill does not reach)."""
    kill_tree(proc.pid)
    proc.wait()
    _CHILDREN.discard(proc)


def kill_tree(pid: int) -> None:
    import psutil

    try:
        tree = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit code, or None when the child ran past `timeout` (then it is killed)."""
    try:
        rc = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        kill(proc)
        return None
    _CHILDREN.discard(proc)
    return rc


@dataclass
class Ran:
    """One finished command."""

    rc: int | None  # None: killed at its time limit
    seconds: float
    log: Path

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def require(self, what: str) -> None:
        if self.rc != 0:
            why = "ran past its time limit" if self.rc is None else f"exit {self.rc}"
            raise Failed(f"{what} {why}", {"output_tail": tail(self.output)})


class Clock:
    """The part's deadline: every command gets what is left of it."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()


def run(report: Report, clock: Clock, cmd: list, log: Path, **kw) -> Ran:
    t = time.perf_counter()
    rc = wait(start(cmd, log, **kw), clock.left())
    ran = Ran(rc, time.perf_counter() - t, log)
    report.command([str(c) for c in cmd], rc, ran.seconds, log)
    print(f"  {' '.join(shown(cmd)[:4])} ... -> {'killed at the limit' if rc is None else f'exit {rc}'} in "
          f"{ran.seconds:.0f} s (log {log})", flush=True)
    return ran


def radalign_bin() -> str:
    """The `radalign` console command (gpu.sh exports RADALIGN_BIN; else the one beside this python)."""
    found = os.environ.get("RADALIGN_BIN") or shutil.which("radalign", path=str(Path(sys.executable).parent))
    found = found or shutil.which("radalign")
    if not found:
        raise Failed("no `radalign` command: install the package (pip install -e .) or run through bench/gpu.sh")
    return found


def _on_sigterm(signum, frame) -> None:  # the orchestrator's time limit: take the children down too
    for proc in list(_CHILDREN):
        kill(proc)
    sys.exit(143)


# ----------------------------------------------------------------------------------------------------------
# Shards and run folders


def shards_dir(plan: Plan) -> Path:
    return Path(plan.work) / f"shards-p{plan.patients}-{plan.image_px}px"


def make_shards(plan: Plan, report: Report, clock: Clock) -> dict:
    """`radalign data synth` + `radalign data prepare` (reused when a complete folder is there)."""
    out = shards_dir(plan)
    if (out / "manifest.json").is_file():
        return {"shards": str(out), "reused": True, **shard_counts(out)}
    synth, cores = Path(plan.work) / "synth", str(max(1, min(16, os.cpu_count() or 1)))
    shutil.rmtree(synth, ignore_errors=True)
    rad = radalign_bin()
    run(report, clock, [rad, "data", "synth", "--out", synth, "--patients", plan.patients, "--image-size",
                        plan.image_px, "--num-workers", cores, "--no-icu", "--no-progress"],
        logs(plan) / "synth.log").require("radalign data synth")
    run(report, clock, [rad, "data", "prepare", "--mimic-cxr", synth / "mimic-cxr-jpg", "--reports",
                        synth / "mimic-cxr-reports", "--out", out, "--image-size", plan.image_px, "--shard-size",
                        plan.shard_size, "--num-workers", cores, "--no-progress"],
        logs(plan) / "prepare.log").require("radalign data prepare")
    shutil.rmtree(synth, ignore_errors=True)
    return {"shards": str(out), "reused": False, **shard_counts(out)}


def shard_counts(out: Path) -> dict:
    from radalign.data.loader import shard_paths, split_samples

    return {split: {"samples": split_samples(out, split), "shards": len(shard_paths(out, split))}
            for split in ("train", "validate", "test")}


def logs(plan: Plan) -> Path:
    return Path(plan.work) / "logs"


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def pretrain_args(plan: Plan, run_dir: Path, *extra: str) -> list[str]:
    """`radalign pretrain --config <vit-b16> ...` overrides shared by every run here."""
    return ["pretrain", "--config", plan.config, f"model.name={plan.model}", f"data.shards={shards_dir(plan)}",
            f"run_dir={run_dir}", "data.val_split=", "tensorboard=false", "seed=0", *extra]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {int(r["step"]): float(r["loss"]) for r in rows if "loss" in r}


# ----------------------------------------------------------------------------------------------------------
# Part 1: throughput


def part_throughput(plan: Plan, report: Report, clock: Clock) -> None:
    found = report.check("batch_search", lambda: batch_search(plan))
    batch = plan.batch or found.get("batch") or (plan.cpu_batch if plan.device == "cpu" else None)
    flops = report.check("flops", lambda: count_flops(plan))
    free_gpu_memory()  # the trainers run in child processes and need the whole GPU
    if not batch:
        report.check("ours", lambda: _no_batch(found))
        return
    ours = report.check("ours", lambda: throughput_ours(plan, report, clock, batch))
    theirs = report.check("open_clip", lambda: throughput_open_clip(plan, report, clock, batch))
    report.check("ratio", lambda: ratio_check(ours, theirs))
    report.check("mfu", lambda: mfu_check(plan, ours, theirs, flops))


def free_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _no_batch(found: dict) -> dict:
    raise Failed(f"no batch to run: the search found none ({found.get('reason')})")


def _model_parts(plan: Plan, device: str):
    """Model (fp32 weights), AdamW, loss and config as the recipe builds them."""
    import torch
    from radalign.pretrain import loss, models

    from radalign.training import adamw

    cfg = models.get_model_config(plan.model)
    torch.manual_seed(0)
    model = models.build_model(cfg).to(device)
    return model, adamw(model, lr=1e-4, weight_decay=0.2), loss.ContrastiveLoss(), cfg


def _train_step(model, opt, loss_fn, cfg: dict, batch: int, device: str, dtype) -> None:
    """One optimizer step on random images and token ids (the memory a real step takes)."""
    import torch

    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    images = torch.randn(batch, 3, size, size, device=device)  # [B, 3, S, S]
    tokens = torch.randint(1, cfg["text_cfg"]["vocab_size"], (batch, ctx), device=device)  # [B, L]
    ids = torch.arange(batch, device=device)
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        out = model(images, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], study_id=ids, text_id=ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def batch_search(plan: Plan) -> dict:
    """Double the batch until a step runs out of GPU memory; keep the largest under the memory cap."""
    if plan.batch:
        raise Skip(f"batch {plan.batch} given (--batch); no search")
    if plan.device != "cuda":
        raise Skip("GPU only: the search doubles the batch until CUDA runs out of memory")
    import torch

    model, opt, loss_fn, cfg = _model_parts(plan, "cuda")
    total = torch.cuda.get_device_properties(0).total_memory
    trials = []
    for b in doubling(plan.batch_start, plan.batch_max):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            for _ in range(2):  # the second step has the optimizer state too
                _train_step(model, opt, loss_fn, cfg, b, "cuda", torch.bfloat16)
            torch.cuda.synchronize()
            trials.append({"batch": b, "fits": True, "peak_bytes": torch.cuda.max_memory_allocated()})
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            trials.append({"batch": b, "fits": False, "peak_bytes": None})
            break
        print(f"  batch {b}: peak {trials[-1]['peak_bytes'] / 2**30:.1f} GiB", flush=True)
    cap = plan.memory_cap * total
    chosen = choose_batch(trials, cap)
    figures = {"trials": trials, "gpu_memory_bytes": total, "cap_bytes": cap, "batch": chosen}
    if chosen is None:
        raise Failed(f"no batch from {plan.batch_start} fits under {cap / 2**30:.1f} GiB", figures)
    return figures


def count_flops(plan: Plan) -> dict:
    """Training FLOPs per sample: torch.utils.flop_counter over one step, and the analytic count beside it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model, opt, loss_fn, cfg = _model_parts(plan, plan.device)
    dtype = torch.bfloat16 if plan.device == "cuda" else torch.float32
    counter = FlopCounterMode(display=False)
    with counter:
        _train_step(model, opt, loss_fn, cfg, plan.flops_batch, plan.device, dtype)
    counted = counter.get_total_flops() / plan.flops_batch
    # FlopCounterMode counts CUDA's attention kernels but not the CPU's: compare like with like.
    analytic = analytic_train_flops(cfg, attention=plan.device == "cuda")
    return {"counted_per_sample": counted, "analytic_per_sample": analytic_train_flops(cfg),
            "counted_over_analytic": counted / analytic, "analytic_counts_attention": plan.device == "cuda",
            "batch": plan.flops_batch, "context_length": cfg["text_cfg"]["context_length"],
            "image_size": cfg["vision_cfg"]["image_size"]}


def throughput_ours(plan: Plan, report: Report, clock: Clock, batch: int) -> dict:
    from bench.pretrain import median_or_nan, parse_ours, steady

    run_dir = fresh(Path(plan.work) / "throughput-ours")
    ran = run(report, clock, [radalign_bin(), *pretrain_args(
        plan, run_dir, f"batch_size={batch}", f"steps={plan.steps}", f"precision={plan.precision}",
        f"log_every={plan.log_every}", "ckpt_every=0", f"data.num_workers={plan.workers}", "optim.lr=5e-4",
        f"optim.warmup_steps={plan.warmup}")], logs(plan) / "throughput-ours.log")
    ran.require("radalign pretrain")
    windows = steady(parse_ours(run_dir / "metrics.jsonl"), plan.skip)
    summary = json.loads((run_dir / "summary.json").read_text())
    figures = {"batch": batch, "steps": plan.steps, "workers": plan.workers, "precision": summary["precision"],
               "windows": len(windows), "samples_per_s": median_or_nan([w.samples_per_s for w in windows]),
               "data_wait": median_or_nan([w.data_wait for w in windows if w.data_wait is not None]),
               "peak_memory_gib": summary["peak_mem_gb"], "seconds": round(ran.seconds, 1),
               "export": str(run_dir / "export")}
    if not windows:
        raise Failed(f"no steady-state log window after {plan.skip} steps", figures)
    return figures


# open_clip_train's child (bench/pretrain.py) printing its peak GPU memory at exit.
OPEN_CLIP_PEAK = """
import atexit, torch
atexit.register(lambda: torch.cuda.is_available() and print("GPU_PEAK_BYTES", torch.cuda.max_memory_allocated(),
                                                            flush=True))
"""


def throughput_open_clip(plan: Plan, report: Report, clock: Clock, batch: int) -> dict:
    from radalign.data.loader import shard_paths

    from bench.pretrain import (
        OPEN_CLIP_CHILD,
        OPEN_CLIP_PRECISION,
        median_or_nan,
        open_clip_model_json,
        parse_open_clip,
        same_parameters,
        steady,
    )

    root = fresh(Path(plan.work) / "throughput-open-clip")
    name, model_json = open_clip_model_json(plan.model, root / "model_configs")
    params = same_parameters(plan.model, name, model_json)
    flags = ["--model", name, "--dataset-type", "webdataset",
             "--train-data", "::".join(shard_paths(shards_dir(plan), "train")),
             "--train-num-samples", str(plan.steps * batch), "--dataset-resampled", "--batch-size", str(batch),
             "--workers", str(plan.workers), "--precision", OPEN_CLIP_PRECISION[plan.precision], "--device",
             plan.device, "--epochs", "1", "--log-every-n-steps", str(plan.log_every), "--local-loss",
             "--gather-with-grad", "--lr", "5e-4", "--warmup", str(plan.warmup), "--seed", "0",
             "--logs", str(root / "logs"), "--name", "bench", "--save-frequency", "0", "--report-to", ""]
    log = logs(plan) / "throughput-open-clip.log"
    ran = run(report, clock, [sys.executable, "-c", OPEN_CLIP_PEAK + OPEN_CLIP_CHILD, model_json, *flags], log,
              cwd=root)
    ran.require("open_clip_train")
    train_log = root / "logs" / "bench" / "out.log"
    windows = steady(parse_open_clip(train_log.read_text() if train_log.is_file() else "", batch), plan.skip)
    peak = re.findall(r"GPU_PEAK_BYTES (\d+)", ran.output)
    figures = {"batch": batch, "steps": plan.steps, "workers": plan.workers, "windows": len(windows),
               "precision": OPEN_CLIP_PRECISION[plan.precision], "parameters_ours_open_clip": list(params),
               "samples_per_s": median_or_nan([w.samples_per_s for w in windows]),
               "data_wait": median_or_nan([w.data_wait for w in windows if w.data_wait is not None]),
               "peak_memory_gib": int(peak[-1]) / 2**30 if peak else None, "seconds": round(ran.seconds, 1)}
    if params[0] != params[1]:
        raise Failed(f"parameter counts differ (ours {params[0]:,}, open_clip {params[1]:,})", figures)
    if not windows:
        raise Failed(f"no steady-state log window after {plan.skip} steps", figures)
    return figures


def ratio_check(ours: dict, theirs: dict) -> dict:
    if ours["status"] != "ok" or theirs["status"] != "ok":
        raise Skip("needs both trainers' figures")
    r = ours["samples_per_s"] / theirs["samples_per_s"]
    goal = GOALS["ours_over_open_clip_samples_per_s"]
    figures = {"ours_over_open_clip_samples_per_s": r, "goal": goal, "goal_met": r >= goal}
    return figures


def mfu_check(plan: Plan, ours: dict, theirs: dict, flops: dict) -> dict:
    if plan.device != "cuda":
        raise Skip("GPU only: MFU is measured against a GPU's bf16 peak")
    import torch

    name = torch.cuda.get_device_name(0)
    peak = plan.peak_tflops or bf16_peak_tflops(name)
    if peak is None:
        raise Skip(f"no bf16 peak known for {name!r}; pass --peak-tflops")
    counts = {"counted": flops.get("counted_per_sample"), "analytic": flops.get("analytic_per_sample")}
    if not any(counts.values()):
        raise Skip("no FLOP count")
    out = {"gpu": name, "peak_tflops": peak, "flops_per_sample": counts, "goal": GOALS["mfu_vit_b16_bf16_h100"]}
    for side, fig in (("ours", ours), ("open_clip", theirs)):
        for how, per_sample in counts.items():
            if fig.get("status") == "ok" and per_sample:
                out[f"mfu_{side}_{how}"] = mfu(fig["samples_per_s"], per_sample, peak)
    out["goal_met"] = out.get("mfu_ours_counted", out.get("mfu_ours_analytic", 0.0)) >= out["goal"]
    return out


# ----------------------------------------------------------------------------------------------------------
# Part 2: DeepSpeed ZeRO-2 / ZeRO-3 through Accelerate, killed and resumed


def part_deepspeed(plan: Plan, report: Report, clock: Clock) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        for stage_name in ("zero2", "zero3"):
            report.check(stage_name, lambda: _raise(Skip("deepspeed is not installed (pip install deepspeed "
                                                         "--no-build-isolation, or carry its wheel)")))
        return
    for stage_name in ("zero2", "zero3"):
        report.check(stage_name, lambda s=stage_name: deepspeed_stage(plan, report, clock, s))


def _raise(e: Exception):
    raise e


def ds_launch(plan: Plan, stage_name: str, run_dir: Path, *extra: str) -> list[str]:
    """`accelerate launch --config_file configs/accelerate/<stage>.yaml --num_processes N radalign pretrain ...`"""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs" / "accelerate" / f"{stage_name}.yaml"), "--num_processes", str(plan.ds_processes),
            "--main_process_port", str(29500 + (os.getpid() % 1000)), radalign_bin(),
            *pretrain_args(plan, run_dir, f"batch_size={plan.ds_batch}", f"steps={plan.ds_steps}",
                           f"ckpt_every={plan.ds_ckpt_every}", "log_every=1", "optim.warmup_steps=2",
                           f"data.num_workers={plan.ds_workers}", "keep_checkpoints=5", *extra)]


def ds_env() -> dict:
    # cuBLAS is deterministic with a fixed workspace (PyTorch's reproducibility notes); recorded in the JSON.
    return child_env(CUBLAS_WORKSPACE_CONFIG=":4096:8", OMP_NUM_THREADS="1")


def deepspeed_stage(plan: Plan, report: Report, clock: Clock, stage_name: str) -> dict:
    base = fresh(Path(plan.work) / f"ds-{stage_name}")
    log = logs(plan) / f"ds-{stage_name}"
    run(report, clock, ds_launch(plan, stage_name, base / "straight"), Path(f"{log}-straight.log"),
        env=ds_env()).require("uninterrupted run")
    killed = kill_after_checkpoint(plan, clock, ds_launch(plan, stage_name, base / "killed"),
                                   base / "killed", Path(f"{log}-killed.log"))
    latest = (base / "killed" / "checkpoints" / "latest").read_text().strip()
    verified = verify_checksums(base / "killed" / "checkpoints" / latest)
    resumed = run(report, clock, ds_launch(plan, stage_name, base / "killed", "resume=latest"),
                  Path(f"{log}-resumed.log"), env=ds_env())
    resumed.require("resumed run")
    at = int(latest.split("-")[1])
    curve = compare_curves(losses(base / "straight"), losses(base / "killed"), after=at)
    figures = {"processes": plan.ds_processes, "batch": plan.ds_batch, "steps": plan.ds_steps, **killed,
               "resumed_from": latest, "checkpoint": verified, "loaded_after_check": f"resumed from {base / 'killed'}" in
               resumed.output and latest in resumed.output, **curve, "tolerance": RESUME_TOLERANCE,
               "env": {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
               "losses_uninterrupted": losses(base / "straight"), "losses_resumed": losses(base / "killed")}
    if not plan.dry_run:
        shutil.rmtree(base, ignore_errors=True)  # checkpoints of ViT-B/16 are GBs
    _judge_resume(figures, plan.ds_steps)
    return figures


def _judge_resume(f: dict, steps: int) -> None:
    if f["missing_steps"] or len(f["compared_steps"]) != steps:
        raise Failed(f"loss curves cover different steps (missing {f['missing_steps']})", f)
    if not f["checkpoint"]["deepspeed_files"]:
        raise Failed("DeepSpeed was not active: the checkpoint has no deepspeed/ engine files (and the loss "
                     "curves compare two plain data-parallel runs)", f)
    if not f["killed_before_end"]:
        raise Failed("the run ended before the kill; raise ds_steps", f)
    if not f["loaded_after_check"]:
        raise Failed(f"the resumed run does not say it resumed from {f['resumed_from']}", f)
    if f["max_abs_diff_resumed"] > RESUME_TOLERANCE:
        raise Failed(f"resumed losses differ from the uninterrupted run by up to {f['max_abs_diff_resumed']:.2e} "
                     f"(> {RESUME_TOLERANCE:g}; before the kill: {f['max_abs_diff_before_kill']:.2e})", f)


def kill_after_checkpoint(plan: Plan, clock: Clock, cmd: list[str], run_dir: Path, log: Path) -> dict:
    """Start a run and SIGKILL its process group as soon as `checkpoints/latest` names the first checkpoint."""
    want = f"step-{plan.ds_ckpt_every:07d}"
    pointer = run_dir / "checkpoints" / "latest"
    proc = start(cmd, log, env=ds_env())
    while proc.poll() is None and clock.left() > 0:
        if pointer.is_file() and pointer.read_text().strip() == want:
            break
        time.sleep(0.02)
    ended = proc.poll() is not None
    kill(proc)
    if not pointer.is_file():
        raise Failed(f"no checkpoint before the kill (exit {proc.returncode})",
                     {"output_tail": tail(log.read_text(errors='replace'))})
    seen = losses(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}
    return {"killed_before_end": not ended, "last_step_logged_before_kill": max(seen) if seen else None}


# ----------------------------------------------------------------------------------------------------------
# Part 3: precision auto / fp16 on CUDA

_PRECISION_LINE = re.compile(r"precision (\w+) \(requested auto\): (.+)")


def part_precision(plan: Plan, report: Report, clock: Clock) -> None:
    report.check("auto", lambda: precision_auto(plan, report, clock))
    report.check("fp16_training", lambda: precision_fp16(plan, report, clock))
    report.check("fp16_loss_scaler", lambda: fp16_scaler(plan))


def _short_run(plan: Plan, report: Report, clock: Clock, name: str, precision: str) -> tuple[Ran, Path]:
    run_dir = fresh(Path(plan.work) / f"precision-{name}")
    ran = run(report, clock, [radalign_bin(), *pretrain_args(
        plan, run_dir, f"precision={precision}", f"steps={plan.precision_steps}", "log_every=1", "ckpt_every=0",
        f"batch_size={plan.ds_batch}", "optim.warmup_steps=1", f"data.num_workers={plan.ds_workers}")],
        logs(plan) / f"precision-{name}.log")
    return ran, run_dir


def precision_auto(plan: Plan, report: Report, clock: Clock) -> dict:
    ran, run_dir = _short_run(plan, report, clock, "auto", "auto")
    ran.require("radalign pretrain precision=auto")
    line = _PRECISION_LINE.search(ran.output)
    used = json.loads((run_dir / "summary.json").read_text())["precision"]
    figures = {"logged": line.group(0) if line else None, "chosen": line.group(1) if line else None,
               "why": line.group(2) if line else None, "used": used}
    if not line or line.group(1) != used:
        raise Failed("the log does not give the choice and its reason, or it differs from the run's "
                     f"precision ({used})", figures)
    if plan.device == "cuda" and used != "bf16":
        raise Failed(f"auto chose {used} on CUDA (expected bf16)", figures)
    figures["expected"] = "bf16" if plan.device == "cuda" else "the CPU rule (no GPU here: bf16 on CUDA unchecked)"
    return figures


def precision_fp16(plan: Plan, report: Report, clock: Clock) -> dict:
    ran, run_dir = _short_run(plan, report, clock, "fp16", "fp16")
    if plan.device != "cuda":
        refused = ran.rc == 2 and "fp16 needs CUDA" in ran.output
        if not refused:
            raise Failed(f"fp16 on CPU was not refused with the fix (exit {ran.rc})",
                         {"output_tail": tail(ran.output)})
        raise Skip("GPU only (on this CPU `precision=fp16` is refused with the fix, as documented)")
    ran.require("radalign pretrain precision=fp16")
    curve = losses(run_dir)
    used = json.loads((run_dir / "summary.json").read_text())["precision"]
    figures = {"used": used, "losses": curve}
    if used != "fp16" or not all(math.isfinite(v) for v in curve.values()) or len(curve) != plan.precision_steps:
        raise Failed(f"fp16 run: precision {used}, {len(curve)} finite-checked steps of {plan.precision_steps}",
                     figures)
    return figures


def fp16_scaler(plan: Plan) -> dict:
    """radalign.training.make_accelerator('fp16') gives Accelerate's loss scaler, and it scales."""
    if plan.device != "cuda":
        raise Skip("GPU only: Accelerate makes a loss scaler for fp16 on CUDA")
    import torch

    from radalign.training import make_accelerator

    acc, resolved, reason = make_accelerator("fp16")
    model = acc.prepare(torch.nn.Linear(64, 64).cuda())
    opt = acc.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    scales = []
    for _ in range(3):
        with acc.autocast():
            loss = model(torch.randn(8, 64, device="cuda")).pow(2).mean()
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        scales.append(float(acc.scaler.get_scale()) if acc.scaler is not None else None)
    figures = {"resolved": resolved, "reason": reason, "scaler": type(acc.scaler).__name__, "scales": scales}
    if acc.scaler is None or not acc.scaler.is_enabled():
        raise Failed("no enabled loss scaler under precision=fp16", figures)
    return figures


# ----------------------------------------------------------------------------------------------------------
# Part 4: faiss on the GPU vs the CPU


def part_faiss(plan: Plan, report: Report, clock: Clock) -> None:
    from radalign.retrieval import index as ix
    gpu, why = faiss_gpu(plan, ix)
    # Without GPU support the CPU figures matter only in a dry run: spend no GPU time on them.
    if not gpu and not (plan.dry_run and faiss_installed(ix)):
        for name in ("flat", "ivf_flat"):
            report.check(name, lambda: _raise(Skip(why)))
        return
    from bench.retrieval import queries_near

    x = ix.clustered_vectors(plan.faiss_n, plan.faiss_dim, clusters=max(1000, plan.faiss_n // 500), spread=1.0)
    q = queries_near(x, plan.faiss_queries)
    t = time.perf_counter()
    _, truth = ix.exact_topk(x, q, 10)  # [Q, 10] exact neighbours (CPU flat)
    exact_s = time.perf_counter() - t
    report.data["data"] = {"vectors": list(x.shape), "queries": len(q), "clustered": True,
                           "exact_search_s": round(exact_s, 2), "gpu_faiss": gpu, "gpu_faiss_note": why}
    for name, factory in (("flat", "Flat"), ("ivf_flat", f"IVF{plan.faiss_nlist},Flat")):
        report.check(name, lambda f=factory: faiss_pair(plan, ix, f, x, q, truth, gpu, why))


def faiss_installed(ix) -> bool:
    try:
        ix.faiss_module()
    except Exception:  # RadalignError naming the install; any import failure means the same here
        return False
    return True


def faiss_gpu(plan: Plan, ix) -> tuple[bool, str]:
    """(faiss has GPU support and sees a GPU, why not). Outside a dry run a missing faiss-gpu is tried once from
    carried wheels (.whl/faiss_gpu*) or the index, with a short time limit; both fail fast without a network."""
    installed = faiss_installed(ix)
    if plan.device != "cuda":
        return False, "GPU only: no CUDA device here" + ("" if installed else "; faiss is not installed either")
    if installed and ix.gpu_available():
        return True, ""
    first = ("faiss is installed without GPU support (faiss.get_num_gpus() is 0 or absent)" if installed
             else "faiss is not installed")
    if plan.dry_run:
        return False, f"{first}; a dry run installs nothing"
    return faiss_gpu_install(plan, ix, first)


def faiss_gpu_install(plan: Plan, ix, first: str) -> tuple[bool, str]:
    target = Path(plan.work) / "faiss-gpu"
    wheels = sorted((REPO / ".whl").glob("faiss_gpu*.whl"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), "--timeout", "5",
           "--retries", "0", *(map(str, wheels) if wheels else ["faiss-gpu-cu12"])]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        return False, f"{first}; `pip install faiss-gpu-cu12` took over 90 s, skipped"
    if done.returncode != 0:
        return False, f"{first}; `pip install faiss-gpu-cu12` failed: {tail(done.stderr.strip(), 300)}"
    sys.path.insert(0, str(target))
    for name in [m for m in sys.modules if m == "faiss" or m.startswith("faiss.")]:
        del sys.modules[name]
    ok = faiss_installed(ix) and ix.gpu_available()
    return ok, "" if ok else f"{first}; faiss-gpu-cu12 installed but sees no GPU (its CUDA 12 runtime missing?)"


def faiss_pair(plan: Plan, ix, factory: str, x, q, truth, gpu: bool, why: str) -> dict:
    out = {"factory": factory, "cpu": faiss_one(plan, ix, factory, x, q, truth, gpu=False)}
    if gpu:
        out["gpu"] = faiss_one(plan, ix, factory, x, q, truth, gpu=True)
        out["gpu_over_cpu_queries_per_s"] = out["gpu"]["queries_per_s"] / out["cpu"]["queries_per_s"]
    else:
        out["gpu"] = {"status": "skipped", "reason": why}
    return out


def faiss_one(plan: Plan, ix, factory: str, x, q, truth, *, gpu: bool) -> dict:
    """Build (train + add) and search one index on the CPU or the GPU; recall@10 against exact search."""
    faiss = ix.faiss_module()
    index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    t = time.perf_counter()
    if not index.is_trained:
        index.train(x[:: max(1, len(x) // (64 * plan.faiss_nlist))])  # 64 training points per list
    index.add(x)
    build = time.perf_counter() - t
    if "IVF" in factory:
        (faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()).set_index_parameter(
            index, "nprobe", plan.faiss_nprobe)
    index.search(q[:10], 10)  # warm-up
    t = time.perf_counter()
    _, found = index.search(q, 10)
    search = time.perf_counter() - t
    return {"build_s": round(build, 3), "search_s": round(search, 6), "queries_per_s": len(q) / search,
            "recall_at_10": ix.neighbour_recall(found, truth), "nprobe": plan.faiss_nprobe if "IVF" in factory
            else None}


# ----------------------------------------------------------------------------------------------------------
# Part 5: the embedding pass on the GPU


def part_embed(plan: Plan, report: Report, clock: Clock) -> None:
    report.check("embed", lambda: embed_pass(plan))


def embed_pass(plan: Plan) -> dict:
    """Random-init export of the model, then `embed_split` over the train split with the loader workers."""
    import torch
    from radalign.data import embed
    from radalign.pretrain import export, models
    torch.manual_seed(0)
    cfg = models.get_model_config(plan.model)
    folder = export.export_encoders(models.build_model(cfg), cfg, fresh(Path(plan.work) / "embed-export"))
    enc = export.load_encoders(folder, device=plan.device)

    def one_pass(limit: int | None = None):
        t = time.perf_counter()
        emb = embed.embed_split(enc.encode_images, shards_dir(plan), "train", enc.image_transform(),
                                batch_size=plan.embed_batch, num_workers=plan.embed_workers, max_samples=limit)
        if plan.device == "cuda":
            torch.cuda.synchronize()
        return emb, time.perf_counter() - t

    one_pass(plan.embed_batch)  # warm-up: CUDA kernels, cuDNN choices
    passes = [one_pass() for _ in range(plan.embed_passes)]
    rates = [len(e) / s for e, s in passes]
    emb = passes[-1][0]
    return {"device": plan.device, "workers": plan.embed_workers, "batch": plan.embed_batch,
            "images": len(emb), "expected": emb.expected, "lost": emb.lost, "seconds": [round(s, 3) for _, s in passes],
            "images_per_s": statistics.median(rates), "model_only_images_per_s": model_rate(enc, plan)}


def model_rate(enc, plan: Plan) -> float:
    """Images/s of the encoder alone on random input (the ceiling the loader could reach)."""
    import torch

    x = torch.randn(plan.embed_batch, 3, enc.image_size, enc.image_size)
    enc.encode_images(x)
    if plan.device == "cuda":
        torch.cuda.synchronize()
    t, reps = time.perf_counter(), 3
    for _ in range(reps):
        enc.encode_images(x)
    if plan.device == "cuda":
        torch.cuda.synchronize()
    return reps * plan.embed_batch / (time.perf_counter() - t)


RUNNERS: dict[str, Callable[[Plan, Report, Clock], None]] = {
    "throughput": part_throughput, "deepspeed": part_deepspeed, "precision": part_precision,
    "faiss": part_faiss, "embed": part_embed}


# ----------------------------------------------------------------------------------------------------------
# The machine


def describe_machine(plan: Plan) -> dict:
    import torch

    out = {"date": now_iso(), "dry_run": plan.dry_run, "device": plan.device, "python": platform.python_version(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cpu": cpu_model(),
           "cpu_count": os.cpu_count(), "setup": os.environ.get("RADALIGN_GPU_SETUP", "not through bench/gpu.sh"),
           "radalign_bin": _safe_bin(), "git": git_commit(),
           "packages": versions(), "command": " ".join(sys.argv), "plan": asdict(plan), "gpu": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                      "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                      "driver": nvidia_smi("driver_version"), "cudnn": torch.backends.cudnn.version(),
                      "bf16_peak_tflops": plan.peak_tflops or bf16_peak_tflops(p.name)}
    return out


def _safe_bin() -> str | None:
    try:
        return radalign_bin()
    except Failed:
        return None


def cpu_model() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return None


def nvidia_smi(query: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
        return done.stdout.strip() or None
    return None


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        return done.stdout.strip() or None
    return None


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("radalign", "torch", "torchvision", "open_clip_torch", "accelerate", "deepspeed", "transformers",
                 "webdataset", "timm", "numpy", "faiss-cpu", "faiss-gpu-cu12", "faiss-gpu"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ----------------------------------------------------------------------------------------------------------
# Orchestration: shards, then each part in its own process group, within the budget


def orchestrate(plan: Plan, parts: list[str], argv: list[str]) -> None:
    Path(plan.out).mkdir(parents=True, exist_ok=True)
    machine_file = Path(plan.out) / "0-machine.json"
    machine = _safe(lambda: describe_machine(plan), {"date": now_iso(), "dry_run": plan.dry_run})
    atomic_write_json(machine_file, machine)
    end = time.time() + plan.budget
    runnable = plan.device == "cuda" or plan.dry_run
    machine["shards"] = prepare_shards(plan, end) if runnable and NEEDS_SHARDS & set(parts) else None
    atomic_write_json(machine_file, machine)
    shards = machine["shards"] or {}
    for name in parts:
        if not runnable:
            write_part(plan, name, "skipped", "no CUDA device: the full run needs a GPU (on a CPU use --dry-run)")
        elif name in NEEDS_SHARDS and shards.get("status") != "ok":
            write_part(plan, name, "failed", f"no shards: {shards.get('reason')}")
        elif end - time.time() < 10:
            write_part(plan, name, "skipped", f"the run's budget of {plan.budget:.0f} s was spent before this part "
                                              f"(rerun it alone: --parts {name})")
        else:
            run_part(plan, name, min(plan.limits[name], end - time.time()), argv)
    machine["parts"] = {n: json.loads(part_file(plan, n).read_text())["status"] for n in parts}
    machine["seconds"] = round(plan.budget - (end - time.time()), 1)
    atomic_write_json(machine_file, machine)
    print("\n" + summary_lines(plan, parts), flush=True)


def _safe(fn: Callable[[], dict], fallback: dict) -> dict:
    try:
        return fn()
    except Exception as e:  # the description must not stop the run
        return {**fallback, "error": tail(traceback.format_exc()), "reason": str(e)}


def prepare_shards(plan: Plan, end: float) -> dict:
    t = time.perf_counter()
    report = _ShardsReport()
    try:
        figures = make_shards(plan, report, Clock(min(end, time.time() + plan.limits["shards"])))
        return {"status": "ok", **figures, "seconds": round(time.perf_counter() - t, 1), "commands": report.commands}
    except Failed as e:
        return {"status": "failed", "reason": str(e), **e.figures, "commands": report.commands}
    except Exception as e:
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}", "traceback_tail": tail(traceback.format_exc())}


class _ShardsReport:
    """The command log of the shards step (it has no part file of its own; 0-machine.json holds it)."""

    def __init__(self):
        self.commands: list[dict] = []

    def command(self, cmd, rc, seconds, log) -> None:
        self.commands.append({"cmd": " ".join(map(str, cmd)), "rc": rc, "seconds": round(seconds, 1)})


def write_part(plan: Plan, name: str, status: str, reason: str, **extra) -> None:
    atomic_write_json(part_file(plan, name), {"part": name, "n": PARTS.index(name) + 1, "status": status,
                                              "reason": reason, "traceback_tail": None, "dry_run": plan.dry_run,
                                              "device": plan.device, "checks": {}, **extra})


def run_part(plan: Plan, name: str, limit: float, argv: list[str]) -> None:
    """The part in a child process (own process group): SIGTERM at `limit` (it kills its own children), SIGKILL
    10 s later; a part file left 'running' or missing becomes failed with the reason and the log's tail."""
    print(f"\n== part {PARTS.index(name) + 1}: {name} (limit {limit:.0f} s) ==", flush=True)
    log = logs(plan) / f"part-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    part_file(plan, name).unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--one-part", name, "--deadline",
           str(time.time() + limit - 5)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True, env=child_env())
    echo = _echo_in_thread(proc, log)
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        rc = None
        stop_part(proc)
    echo.join(timeout=10)
    finalize_part(plan, name, rc, limit, time.perf_counter() - t, log.read_text(errors="replace"))


def _echo_in_thread(proc: subprocess.Popen, log: Path):
    """Copy the part's output, line by line as it comes, to its log and to this process's stdout."""
    import threading

    def copy():
        assert proc.stdout is not None  # Popen(stdout=PIPE)
        with open(log, "w") as f:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                print(line, end="", flush=True)

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def stop_part(proc: subprocess.Popen) -> None:
    """SIGTERM (the part kills its commands' process trees), then SIGKILL whatever is left 10 s later."""
    import psutil

    tree = []
    with contextlib.suppress(psutil.NoSuchProcess):
        tree = psutil.Process(proc.pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    kill_tree(proc.pid)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()


def finalize_part(plan: Plan, name: str, rc: int | None, limit: float, seconds: float, output: str) -> None:
    path = part_file(plan, name)
    data = json.loads(path.read_text()) if path.is_file() else None
    if data is not None and data.get("status") in ("ok", "failed", "skipped"):
        return
    why = f"ran past its limit of {limit:.0f} s" if rc is None else f"its process ended with exit {rc}"
    if data is None:
        write_part(plan, name, "failed", f"{why} before writing its JSON", traceback_tail=tail(output),
                   seconds=round(seconds, 1))
        return
    for check in data["checks"].values():
        if check.get("status") == "running":
            check.update(status="failed", reason=why)
    data["status"], data["reason"] = "failed", f"{why}; " + (overall(data["checks"])[1] or "")
    data["traceback_tail"], data["seconds"] = tail(output), round(seconds, 1)
    atomic_write_json(path, data)


def one_part(plan: Plan, name: str, deadline: float) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    report = Report(plan, name)
    try:
        RUNNERS[name](plan, report, Clock(deadline))
        report.finish()
    except Exception as e:  # a crash outside the checks (an import, the shards): the part failed, with why
        report.finish()
        report.data.update(status="failed", reason=f"{type(e).__name__}: {e}", traceback_tail=tail(traceback.format_exc()))
        report.save()
    return 0


def summary_lines(plan: Plan, parts: list[str]) -> str:
    out = [f"GPU check ({'dry run on ' + plan.device if plan.dry_run else plan.device}); results in {plan.out}:"]
    for name in parts:
        d = json.loads(part_file(plan, name).read_text())
        out.append(f"  {d['n']}. {name:<11} {d['status']:<8} {d.get('reason') or ''}"[:300])
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every part shrunk to seconds on the CPU")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default: all)")
    p.add_argument("--out", help="results folder (default: $OUT, else bench/out/gpu or bench/out/gpu-dry)")
    p.add_argument("--work", help="scratch folder (default: bench/out/gpu-work or bench/out/gpu-dry-work)")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default 480; dry run 1200)")
    p.add_argument("--model", help="model config for every part (default ViT-B-16; dry run tests/assets/nano.json)")
    p.add_argument("--batch", type=int, help="throughput batch (default: search on the GPU, 8 in the dry run)")
    p.add_argument("--steps", type=int, help="throughput steps per trainer (default 100)")
    p.add_argument("--workers", type=int, help="DataLoader workers of the throughput runs (default: cores - 2)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: looked up by name)")
    p.add_argument("--one-part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part in this process
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [x for x in args.parts.split(",") if x not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return args


def make_plan(args) -> Plan:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = "gpu-dry" if args.dry_run else "gpu"
    out = args.out or os.environ.get("OUT") or str(REPO / "bench" / "out" / kind)
    plan = Plan(dry_run=args.dry_run, device=device, out=str(Path(out).resolve()),
                work=str(Path(args.work or REPO / "bench" / "out" / f"{kind}-work").resolve()),
                workers=max(1, min(14, (os.cpu_count() or 4) - 2)))
    if args.dry_run:
        plan = dry_plan(plan)
    overrides = {"budget": args.budget, "model": args.model, "batch": args.batch, "steps": args.steps,
                 "workers": args.workers, "peak_tflops": args.peak_tflops}
    return replace(plan, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    plan = make_plan(args)
    if args.one_part:
        return one_part(plan, args.one_part, args.deadline or time.time() + plan.limits[args.one_part])
    try:
        orchestrate(plan, [x for x in PARTS if x in args.parts.split(",")], argv)
    except Exception:  # never a non-zero exit: the JSON files say what failed
        traceback.print_exc()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pretrain benchmark (never part of CI): our recipe vs open_clip's own trainer, side by side.

    .venv/bin/python bench/pretrain.py [--shards DIR] [--model tiny] [--batch 64] [--steps 60] [--workers 2]
                                       [--precision auto] [--repeats 1] [--threads N] [--write-results]

Both trainers run the same model config, shards, batch size, precision, worker count, LR schedule and seed,
each in its own child process with the same environment, one after the other (with --repeats, in alternating
order):

- ours:      `python -m radalign.pretrain --config pretrain/tiny model.name=M data.shards=S batch_size=B steps=N ...`
             (throughput from RUN/metrics.jsonl: samples_per_s and data_wait per log window);
- open_clip: `open_clip_train.main.main([...])` after `open_clip.add_model_config(<our JSON without our extra
             keys>)` (throughput from its "Train Epoch" log lines: Batch (t) and Data (t) window averages).

Reported per side: samples/s (median over steady-state log windows: windows that start after `--skip` steps),
samples per CPU-second of the trainer's process tree over the same steps (robust on a shared machine), the
share of the cores it got, data-wait fraction, peak RSS of the trainer process (exact) and of its process tree
(DataLoader workers included; sampled), and the ratios ours / open_clip. Without `--shards`, a small synthetic
MIMIC-like shard set is built once (`radalign data synth` + `data prepare`) and cached in bench/out/pretrain/.
`--write-results` replaces the "## pretrain" section of bench/RESULTS.md with the report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Scripts in bench/ are named like packages (bench/data.py vs `data`); keep bench/ off sys.path and put the
# repository root first, for `data`, `pretrain`, `radalign` and `bench.common`.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from bench.common import REPO, ChildRun, run_measured, table  # noqa: E402
from radalign import RadalignError  # noqa: E402

CACHE = REPO / "bench" / "out" / "pretrain"
RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## pretrain"
# Our precision names -> open_clip_train's --precision (autocast in both: weights fp32, matmuls bf16).
OPEN_CLIP_PRECISION = {"bf16": "amp_bf16", "fp32": "fp32", "fp16": "amp"}
PRECISION_CHOICES = ("auto", *sorted(OPEN_CLIP_PRECISION))

# The open_clip child: register our model config under its own name, then run open_clip's own entry point.
# It runs outside the repository (cwd = its work folder) so that nothing of ours is importable there.
# One compatibility shim, cost-neutral: webdataset >= 0.2.96 ends every shard with an EOF marker `{}` that
# open_clip_train's own `group_by_keys_nothrow` cannot read (KeyError: 'fname'; webdataset/webdataset#384,
# mlfoundations/open_clip#935). The fix given there, `eof_value=None`, restores the stream open_clip expects.
OPEN_CLIP_CHILD = """
import functools, sys
import open_clip
import open_clip_train.data
from open_clip_train.main import main
open_clip_train.data.tar_file_expander = functools.partial(open_clip_train.data.tar_file_expander,
                                                           eof_value=None)
open_clip.add_model_config(sys.argv[1])
sys.exit(main(sys.argv[2:]) or 0)
"""

# open_clip_train/train.py logs, per window of --log-every-n-steps steps:
# "Train Epoch: 0 [ 640/3840 (17%)] Data (t): 0.012 Batch (t): 0.456, 140.351/s, 140.351/s/gpu LR: ..."
# Data (t) and Batch (t) are averages over the window; the "/s" figure is the *last* step alone, so the window
# rate is taken from Batch (t) (the same definition as ours: samples / wall time of the window).
_NUM = r"([0-9.]+(?:e[+-]?\d+)?)"
OPEN_CLIP_LINE = re.compile(
    rf"Train Epoch: \d+ \[\s*(\d+)/\d+ \(\d+%\)\] Data \(t\): {_NUM} Batch \(t\): {_NUM}, {_NUM}/s")


# ----------------------------------------------------------------------------------------------------------
# Log windows -> steady-state numbers


@dataclass
class Window:
    """One log window: steps first..last (1-based, inclusive), its throughput and data-wait fraction."""

    first: int
    last: int
    samples_per_s: float
    data_wait: float | None


def parse_ours(metrics_jsonl: Path) -> list[Window]:
    """Windows from our RUN/metrics.jsonl (rows with samples_per_s; validation rows are skipped)."""
    windows, prev = [], 0
    for line in metrics_jsonl.read_text().splitlines():
        row = json.loads(line)
        if "samples_per_s" not in row:
            continue
        step = int(row["step"])
        windows.append(Window(prev + 1, step, float(row["samples_per_s"]), float(row["data_wait"])))
        prev = step
    return windows


def parse_open_clip(log_text: str, batch_size: int) -> list[Window]:
    """Windows from open_clip_train's log (its first line covers step 1 alone, later ones log_every steps)."""
    windows, prev = [], 0
    for m in OPEN_CLIP_LINE.finditer(log_text):
        done, data_t, batch_t = int(m.group(1)), float(m.group(2)), float(m.group(3))
        step = done // batch_size  # "[N/..." counts samples seen so far (one process)
        if step <= prev:
            continue
        rate = batch_size / batch_t if batch_t > 0 else 0.0
        windows.append(Window(prev + 1, step, rate, data_t / batch_t if batch_t > 0 else None))
        prev = step
    return windows


def steady(windows: list[Window], skip: int) -> list[Window]:
    """Windows that start after the first `skip` steps (model warm-up, worker start, shuffle-buffer fill)."""
    return [w for w in windows if w.first > skip]


def median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class TreeSampler:
    """Samples, every `interval` s while a trainer runs: (time, CPU seconds of its whole process tree, CPU seconds
    of the trainer process alone, number of log windows written so far).

    CPU time is what makes the comparison hold on a shared machine: wall-clock throughput drops when other jobs
    take the cores, CPU seconds per sample much less. The tree's CPU = the trainer's own + that of its reaped
    children (DataLoader workers that already exited, e.g. when a loader is re-created at a checkpoint) + the live
    descendants'. The trainer is read before its children, so a worker reaped in between is missed (a dip), never
    counted twice; `cpu_at` uses the running maximum, which removes the dips.
    """

    def __init__(self, count_windows: Callable[[], int], interval: float = 0.1):
        self.count_windows, self.interval = count_windows, interval
        self.samples: list[tuple[float, float, float, int]] = []  # (perf_counter, tree CPU s, own CPU s, windows)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _tree_cpu() -> tuple[float, float]:
        """(tree CPU s, the trainer's own CPU s)."""
        import psutil

        total = own = 0.0
        for trainer in psutil.Process().children():  # run_measured's child: the trainer
            try:
                t = trainer.cpu_times()
                own += t.user + t.system
                total += t.user + t.system + t.children_user + t.children_system
                for proc in trainer.children(recursive=True):
                    t = proc.cpu_times()
                    total += t.user + t.system
            except psutil.Error:  # exited between listing and reading: a dip, see the class docstring
                pass
        return total, own

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                windows = self.count_windows()
            except (OSError, ValueError):  # log not there yet, or a line half-written
                windows = self.samples[-1][3] if self.samples else 0
            self.samples.append((time.perf_counter(), *self._tree_cpu(), windows))
            self._stop.wait(self.interval)


def at_window(samples: list[tuple[float, float, float, int]], n: int) -> tuple[float, float, float] | None:
    """(time, tree CPU s, trainer's own CPU s) when the n-th log window (1-based) first appeared in
    `TreeSampler.samples`; None if it never did. CPU is the running maximum (see TreeSampler)."""
    peak = peak_own = 0.0
    for t, cpu, own, windows in samples:
        peak, peak_own = max(peak, cpu), max(peak_own, own)
        if windows >= n:
            return t, peak, peak_own
    return None
@dataclass
class Side:
    """One trainer's measurement."""

    name: str
    run: ChildRun
    windows: list[Window] = field(default_factory=list)
    skip: int = 0
    batch: int = 0
    samples: list[tuple[float, float, float, int]] = field(default_factory=list, repr=False)
    load: float = 0.0  # 1-minute load average of the machine when the run started

    @property
    def ok(self) -> bool:
        return self.run.returncode == 0 and bool(steady(self.windows, self.skip))

    @property
    def samples_per_s(self) -> float:
        return median_or_nan([w.samples_per_s for w in steady(self.windows, self.skip)])

    @property
    def data_wait(self) -> float:
        return median_or_nan([w.data_wait for w in steady(self.windows, self.skip) if w.data_wait is not None])

    def span(self) -> tuple[int, float, float, float] | None:
        """(steps, wall s, tree CPU s, trainer's own CPU s) from the end of the first window ending at or after
        `skip` to the end of the last window; None without a steady-state window or sampler data."""
        first = next((i for i, w in enumerate(self.windows) if w.last >= self.skip), None)
        if first is None or first == len(self.windows) - 1:
            return None
        a, b = at_window(self.samples, first + 1), at_window(self.samples, len(self.windows))
        if a is None or b is None or b[0] <= a[0]:
            return None
        return self.windows[-1].last - self.windows[first].last, b[0] - a[0], b[1] - a[1], b[2] - a[2]

    @property
    def samples_per_cpu_s(self) -> float:
        sp = self.span()
        return sp[0] * self.batch / sp[2] if sp and sp[2] > 0 else float("nan")

    def cpu_ms_per_sample(self) -> tuple[float, float]:
        """(trainer process, DataLoader workers) CPU milliseconds per sample over the steady span: where the CPU
        goes, the model's step or the input pipeline."""
        sp = self.span()
        if not sp or not sp[0]:
            return float("nan"), float("nan")
        n = sp[0] * self.batch
        return 1000 * sp[3] / n, 1000 * (sp[2] - sp[3]) / n

    @property
    def cores_used(self) -> float:
        """Average cores the trainer's tree got during the steady span (< cores: others took the rest)."""
        sp = self.span()
        return sp[2] / sp[1] if sp else float("nan")


# ----------------------------------------------------------------------------------------------------------
# Inputs: shards and the model config for open_clip


def child_env(threads: int | None = None) -> dict:
    """The same environment for both children; OMP_NUM_THREADS inherited unless `threads` sets it for both."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def ensure_shards(patients: int, workers: int) -> Path:
    """A cached synthetic shard set (`data synth` + `data prepare --image-size 128 --shard-size 256`)."""
    out = CACHE / f"shards-p{patients}"
    if (out / "manifest.json").is_file():
        print(f"using cached shards {out}", flush=True)
        return out
    synth = CACHE / f"synth-p{patients}"
    steps = [
        ["data", "synth", "--out", str(synth), "--patients", str(patients), "--num-workers", str(workers),
         "--no-progress"],
        ["data", "prepare", "--mimic-cxr", str(synth / "mimic-cxr-jpg"), "--reports",
         str(synth / "mimic-cxr-reports"), "--out", str(out), "--image-size", "128", "--shard-size", "256",
         "--num-workers", str(workers), "--no-progress"],
    ]
    for argv in steps:
        print(f"radalign {' '.join(argv[:2])} ({patients} patients) ...", flush=True)
        run = run_measured([sys.executable, "-m", argv[0], *argv[1:]], cwd=REPO, env=child_env())
        if run.returncode != 0:
            raise RadalignError(f"`radalign {' '.join(argv)}` failed (exit {run.returncode}):\n"
                                f"{run.output[-2000:]}")
    shutil.rmtree(synth, ignore_errors=True)  # only the shards are needed from here on
    return out


def open_clip_model_json(model: str, dest: Path) -> tuple[str, Path]:
    """Our model config as a JSON open_clip can register: our extra keys dropped, a name of its own.

    Returns (open_clip model name, path). HF text towers are refused: our `pkg:` names and local-only loading
    are ours, open_clip would try the hub.
    """
    from radalign.pretrain.models import EXTRA_KEYS, EXTRA_TEXT_KEYS, get_model_config

    cfg = get_model_config(model)
    if cfg["text_cfg"].get("hf_model_name"):
        raise RadalignError(f"--model {model}: has an HF text tower ({cfg['text_cfg']['hf_model_name']}), which "
                            "open_clip_train would fetch from the hub; use a model with an open_clip text "
                            "transformer (e.g. --model tiny)")
    cfg = {k: v for k, v in cfg.items() if k not in EXTRA_KEYS}
    cfg["text_cfg"] = {k: v for k, v in cfg["text_cfg"].items() if k not in EXTRA_TEXT_KEYS}
    name = "radalign-" + re.sub(r"[^A-Za-z0-9_.-]", "-", Path(model).stem)
    path = dest / f"{name}.json"
    dest.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2))
    return name, path


def same_parameters(model: str, oc_name: str, oc_json: Path) -> tuple[int, int]:
    """Parameter counts of our model and open_clip's (a check that both trainers train the same network)."""
    import open_clip
    from radalign.pretrain.models import build_model, get_model_config

    open_clip.add_model_config(oc_json)
    ours = sum(p.numel() for p in build_model(get_model_config(model)).parameters())
    theirs = sum(p.numel() for p in open_clip.create_model(oc_name).parameters())
    return ours, theirs


# ----------------------------------------------------------------------------------------------------------
# The two trainers


def run_ours(args, shards: Path, work: Path) -> Side:
    run_dir = work / "ours"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        f"model.name={args.model}", f"data.shards={shards}", f"batch_size={args.batch}", f"steps={args.steps}",
        f"data.num_workers={args.workers}", f"precision={args.precision}", f"log_every={args.log_every}",
        f"optim.lr={args.lr}", f"optim.warmup_steps={args.warmup}", "ckpt_every=0", "data.val_split=",
        "tensorboard=false", f"run_dir={run_dir}", f"seed={args.seed}",
    ]
    cmd = [sys.executable, "-m", "radalign.pretrain", "--config", "pretrain/tiny", *overrides]
    metrics = run_dir / "metrics.jsonl"
    return measure("ours", cmd, REPO, lambda: parse_ours(metrics), args)


def run_open_clip(args, shards: Path, work: Path) -> Side:
    from radalign.data.loader import shard_paths

    root = work / "open_clip"
    shutil.rmtree(root, ignore_errors=True)
    name, model_json = open_clip_model_json(args.model, root / "model_configs")
    flags = [
        "--model", name, "--dataset-type", "webdataset",
        "--train-data", "::".join(shard_paths(shards, "train")),  # exactly the shards ours reads
        "--train-num-samples", str(args.steps * args.batch), "--dataset-resampled",
        "--batch-size", str(args.batch), "--workers", str(args.workers),
        "--precision", OPEN_CLIP_PRECISION[args.precision], "--device", "cpu", "--epochs", "1",
        "--log-every-n-steps", str(args.log_every), "--local-loss", "--gather-with-grad",
        "--lr", str(args.lr), "--warmup", str(args.warmup), "--seed", str(args.seed),
        "--logs", str(root / "logs"), "--name", "bench", "--save-frequency", "0", "--report-to", "",
    ]
    cmd = [sys.executable, "-c", OPEN_CLIP_CHILD, str(model_json), *flags]
    log = root / "logs" / "bench" / "out.log"
    return measure("open_clip", cmd, root, lambda: parse_open_clip(log.read_text(), args.batch), args)


def measure(name: str, cmd: list[str], cwd: Path, windows: Callable[[], list[Window]], args) -> Side:
    """Run one trainer with `run_measured` (peak RSS) while a TreeSampler records CPU time and log windows."""
    load = os.getloadavg()[0]
    print(f"[{name}] {args.steps} steps x {args.batch} (load average {load:.1f}) ...", flush=True)
    with TreeSampler(lambda: len(windows())) as sampler:
        run = run_measured(cmd, cwd=cwd, env=child_env(args.threads))
    try:
        found = windows()
    except (OSError, ValueError):
        found = []
    return Side(name, run, found, args.skip, args.batch, sampler.samples, load)


# ----------------------------------------------------------------------------------------------------------
# Report


def _fmt(x: float, spec: str) -> str:
    return "n/a" if x != x else format(x, spec)  # x != x: NaN


def report_rows(sides: list[Side]) -> list[list[object]]:
    rows = []
    for s in sides:
        rows.append([s.name, "ok" if s.ok else f"FAILED (exit {s.run.returncode})", f"{s.load:.1f}",
                     len(steady(s.windows, s.skip)), _fmt(s.samples_per_s, ".1f"), _fmt(s.samples_per_cpu_s, ".1f"),
                     *(_fmt(ms, ".1f") for ms in s.cpu_ms_per_sample()),
                     _fmt(s.cores_used, ".2f"), _fmt(s.data_wait, ".0%"), f"{s.run.peak_rss_mb:,.0f}",
                     f"{s.run.peak_tree_rss_mb:,.0f}", f"{s.run.seconds:.0f}"])
    return rows


HEADERS = ["trainer", "status", "load", "windows", "samples/s", "samples/CPU-s", "trainer CPU-ms/sample",
           "workers CPU-ms/sample", "cores", "data wait",
           "peak RSS trainer MiB", "peak RSS tree MiB", "wall s"]
LEGEND = """\
load: 1-min load average when the run started (2 = both cores busy before it began)
windows: steady-state log windows (starting after the warm-up steps)
samples/s: median over those windows of wall-clock throughput
samples/CPU-s: samples per CPU second of the whole process tree (trainer + DataLoader workers) over the same
  steps: the figure that holds when other jobs share the machine
trainer / workers CPU-ms/sample: that CPU time split between the training process (model step, logging) and
  its DataLoader workers (decode, augmentation, tokenization)
cores: CPU seconds / wall seconds of the tree over those steps (the share of the machine the run got)
data wait: median fraction of the window the training loop waited for a batch
peak RSS trainer: exact kernel peak of the training process; tree: trainer + workers summed, sampled every
  50 ms (shared pages counted once per process)"""


def summarize(pairs: list[tuple[Side, Side]]) -> dict[str, list[float]]:
    """{metric: ours / open_clip of each round}. Rounds run back to back, so each ratio compares two runs under
    similar load; pooling all windows instead would compare whichever side happened to get a quiet machine."""
    out: dict[str, list[float]] = {"samples/s": [], "samples/CPU-s": []}
    for ours, theirs in pairs:
        out["samples/s"].append(ours.samples_per_s / theirs.samples_per_s if theirs.samples_per_s else float("nan"))
        out["samples/CPU-s"].append(ours.samples_per_cpu_s / theirs.samples_per_cpu_s
                                    if theirs.samples_per_cpu_s else float("nan"))
    return out


def geomean(values: list[float]) -> float:
    """Geometric mean of positive ratios (NaN ones, from failed runs, left out); NaN when none is left."""
    import math

    good = [v for v in values if v == v and v > 0]
    return math.exp(sum(math.log(v) for v in good) / len(good)) if good else float("nan")


def verdict_lines(summary: dict[str, list[float]]) -> list[str]:
    out = []
    for metric, ratios in summary.items():
        g = geomean(ratios)
        faster = "n/a" if g != g else ("yes" if g >= 1 else "NO")
        rounds = ", ".join(_fmt(r, ".2f") for r in ratios)
        out.append(f"ours / open_clip {metric}: {_fmt(g, '.2f')}x (geometric mean of rounds: {rounds}); "
                   f"ours at least as fast: {faster}")
    return out


def device_line() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{os.cpu_count()}-core CPU ({platform.machine()}, capability {cap}), {gpu}, torch {torch.__version__}"


def write_results(text: str) -> None:
    """Replace (or append) the "## pretrain" section of bench/RESULTS.md; other sections stay as they are."""
    from radalign.io import atomic_write_text

    old = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
    lines = old.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + text.rstrip("\n").splitlines() + ([""] + lines[end:] if end < len(lines)
                                                                            else [])) + "\n"
    atomic_write_text(RESULTS, new)
    print(f"wrote section {SECTION!r} of {RESULTS}")


def results_section(args, shards: Path, report: str, params: tuple[int, int], notes: list[str]) -> str:
    today = datetime.date.today().isoformat()
    cmd = (f".venv/bin/python bench/pretrain.py --model {args.model} --batch {args.batch} --steps {args.steps} "
           f"--workers {args.workers} --precision {args.requested_precision} --repeats {args.repeats}")
    out = [SECTION, "",
           f"{today}, {device_line()}. The machine was shared with other engineers running tests at the same "
           "time: wall-clock numbers are noisy, samples per CPU-second much less so.",
           f"Command: `{cmd}`; shards: {shards.name} ({args.train_samples} train samples), model "
           f"`{args.model}` ({params[0]:,} parameters ours, {params[1]:,} open_clip).", "",
           "```", report, "```", ""]
    out += [f"- {n}" for n in notes]
    return "\n".join(out).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, help="a prepared folder (manifest.json); default: cached synthetic")
    p.add_argument("--patients", type=int, default=600, help="synthetic patients without --shards (default 600)")
    p.add_argument("--model", default="tiny", help="model config name or JSON path (default tiny)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="auto (default): resolved once by radalign.precision and passed to both trainers")
    p.add_argument("--log-every", type=int, default=10, help="steps per log window (default 10)")
    p.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the median (default 10)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=10, help="LR warm-up steps, both trainers (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both trainers (default: inherited)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds; the order alternates (ours first, then open_clip first, ...) (default 1)")
    p.add_argument("--write-results", action="store_true", help=f"update the {SECTION!r} section of {RESULTS}")
    p.add_argument("--note", action="append", default=[], help="a line added to the results section (repeatable)")
    args = p.parse_args(argv)
    problems = []
    if args.steps <= args.skip + args.log_every:
        problems.append(f"--steps {args.steps}: need more than --skip + --log-every = "
                        f"{args.skip + args.log_every} for at least one steady-state window")
    for key in ("batch", "log_every", "repeats"):
        if getattr(args, key) < 1:
            problems.append(f"--{key.replace('_', '-')} {getattr(args, key)}: must be >= 1")
    if args.workers < 0:
        problems.append(f"--workers {args.workers}: must be >= 0")
    if args.precision == "fp16":
        problems.append("--precision fp16: our recipe needs CUDA for fp16 (loss scaling); use bf16 or fp32")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except RadalignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def resolve_bench_precision(args) -> None:
    """Resolve `auto` once here, so both trainers get the same concrete precision; record why."""
    import torch

    from radalign.precision import cpu_capability, resolve_precision

    args.requested_precision = args.precision
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.precision, args.precision_reason = resolve_precision(args.precision, device)
    args.cpu_capability = cpu_capability()
    print(f"precision {args.precision} (asked {args.requested_precision}; CPU capability {args.cpu_capability}): "
          f"{args.precision_reason}", flush=True)


def _main(args) -> int:
    from radalign.data.loader import split_samples

    resolve_bench_precision(args)

    shards = args.shards.resolve() if args.shards else ensure_shards(args.patients, args.workers)
    args.train_samples = split_samples(shards, "train")
    work = CACHE / "runs"
    name, model_json = open_clip_model_json(args.model, work / "check")
    params = same_parameters(args.model, name, model_json)
    print(f"parameters: ours {params[0]:,}, open_clip {params[1]:,}", flush=True)
    notes = []
    if params[0] != params[1]:
        notes.append(f"parameter counts differ ({params[0]:,} vs {params[1]:,}): not the same network")

    pairs: list[tuple[Side, Side]] = []
    for r in range(args.repeats):
        # Alternate the order: on a shared machine the load drifts, and alternating spreads it over both.
        if r % 2 == 0:
            ours = run_ours(args, shards, work)
            theirs = run_open_clip(args, shards, work)
        else:
            theirs = run_open_clip(args, shards, work)
            ours = run_ours(args, shards, work)
        pairs.append((ours, theirs))
        for side in (ours, theirs):
            if not side.ok:
                print(f"\n{side.name} failed or logged no steady-state window (exit {side.run.returncode}); "
                      f"last output:\n{side.run.output[-3000:]}", flush=True)

    summary = summarize(pairs)
    report = "\n".join([
        f"model {args.model}, batch {args.batch}, {args.steps} steps, {args.workers} workers, {args.precision} "
        f"(asked {args.requested_precision}; torch CPU capability {args.cpu_capability}; {args.precision_reason}); "
        f"log windows of {args.log_every} steps, first {args.skip} steps left out",
        table(HEADERS, [row for o, t in pairs for row in report_rows([o, t])]),
        *verdict_lines(summary), "", LEGEND])
    print("\n" + report)
    if args.write_results:
        write_results(results_section(args, shards, report, params, notes + args.note))
    all_ok = all(o.ok and t.ok for o, t in pairs)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

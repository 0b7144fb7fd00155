"""Pretrain benchmark (never part of CI): our recipe vs open_clip's own trainer, side by side.

    .venv/bin/python bench/pretrain.py [--shards DIR] [--model tiny] [--batch 64] [--steps 60] [--workers 2]
                                       [--precision bf16] [--repeats 1] [--write-results]

Both trainers run the same model config, shards, batch size, precision and worker count, each in its own
child process with the same environment, one after the other:

- ours:      `python -m pretrain --config pretrain/tiny model.name=M data.shards=S batch_size=B steps=N ...`
             (throughput from RUN/metrics.jsonl: samples_per_s and data_wait per log window);
- open_clip: `open_clip_train.main.main([...])` after `open_clip.add_model_config(<our JSON without our extra
             keys>)` (throughput from its "Train Epoch" log lines: Batch (t) and Data (t) window averages).

Reported per side: samples/s (median over steady-state log windows: windows that start after `--skip` steps),
data-wait fraction, peak RSS of the trainer process (exact) and of its whole process tree (DataLoader workers
included; sampled), and the ratio ours / open_clip. Without `--shards`, a small synthetic MIMIC-like shard set
is built once (`radalign data synth` + `data prepare`) and cached in bench/out/pretrain/.
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
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Scripts in bench/ are named like packages (bench/data.py vs `data`); keep bench/ off sys.path and put the
# repository root first, for `data`, `pretrain`, `radalign` and `bench.common`.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from bench.common import REPO, ChildRun, ratio, run_measured, table  # noqa: E402
from radalign import RadalignError  # noqa: E402

CACHE = REPO / "bench" / "out" / "pretrain"
RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## pretrain"
# Our precision names -> open_clip_train's --precision (autocast in both: weights fp32, matmuls bf16).
OPEN_CLIP_PRECISION = {"bf16": "amp_bf16", "fp32": "fp32", "fp16": "amp"}

# The open_clip child: register our model config under its own name, then run open_clip's own entry point.
# It runs outside the repository (cwd = its work folder) so that nothing of ours is importable there.
OPEN_CLIP_CHILD = """
import sys
import open_clip
from open_clip_train.main import main
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


@dataclass
class Side:
    """One trainer's measurement."""

    name: str
    run: ChildRun
    windows: list[Window] = field(default_factory=list)
    skip: int = 0

    @property
    def ok(self) -> bool:
        return self.run.returncode == 0 and bool(steady(self.windows, self.skip))

    @property
    def samples_per_s(self) -> float:
        return median_or_nan([w.samples_per_s for w in steady(self.windows, self.skip)])

    @property
    def data_wait(self) -> float:
        return median_or_nan([w.data_wait for w in steady(self.windows, self.skip) if w.data_wait is not None])


# ----------------------------------------------------------------------------------------------------------
# Inputs: shards and the model config for open_clip


def child_env() -> dict:
    """The same environment for both children (thread counts are inherited unchanged: fair either way)."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    return env


def ensure_shards(patients: int, workers: int) -> Path:
    """A cached synthetic shard set (`data synth` + `data prepare --image-size 128 --shard-size 256`)."""
    out = CACHE / f"shards-p{patients}"
    if (out / "manifest.json").is_file():
        print(f"using cached shards {out}", flush=True)
        return out
    synth = CACHE / f"synth-p{patients}"
    steps = [
        ["data", "synth", "--out", str(synth), "--patients", str(patients), "--workers", str(workers),
         "--no-progress"],
        ["data", "prepare", "--mimic-cxr", str(synth / "mimic-cxr-jpg"), "--reports",
         str(synth / "mimic-cxr-reports"), "--out", str(out), "--image-size", "128", "--shard-size", "256",
         "--workers", str(workers), "--no-progress"],
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
    from pretrain.models import EXTRA_KEYS, EXTRA_TEXT_KEYS, get_model_config

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

    from pretrain.models import build_model, get_model_config

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
    cmd = [sys.executable, "-m", "pretrain", "--config", "pretrain/tiny", *overrides]
    print(f"[ours] {args.steps} steps x {args.batch} ...", flush=True)
    run = run_measured(cmd, cwd=REPO, env=child_env())
    metrics = run_dir / "metrics.jsonl"
    windows = parse_ours(metrics) if metrics.is_file() else []
    return Side("ours (radalign pretrain)", run, windows, args.skip)


def run_open_clip(args, shards: Path, work: Path, train_samples: int) -> Side:
    from data.loader import shard_paths

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
    print(f"[open_clip] {args.steps} steps x {args.batch} (manifest: {train_samples} train samples) ...",
          flush=True)
    run = run_measured(cmd, cwd=root, env=child_env())
    log = root / "logs" / "bench" / "out.log"
    windows = parse_open_clip(log.read_text() if log.is_file() else run.output, args.batch)
    return Side("open_clip_train.main", run, windows, args.skip)


# ----------------------------------------------------------------------------------------------------------
# Report


def _fmt(x: float, spec: str) -> str:
    return "n/a" if x != x else format(x, spec)  # x != x: NaN


def report_rows(sides: list[Side]) -> list[list[object]]:
    rows = []
    for s in sides:
        rows.append([s.name, "ok" if s.ok else f"FAILED (exit {s.run.returncode})", len(steady(s.windows, s.skip)),
                     _fmt(s.samples_per_s, ".1f"), _fmt(s.data_wait, ".0%"), f"{s.run.peak_rss_mb:,.0f}",
                     f"{s.run.peak_tree_rss_mb:,.0f}", f"{s.run.seconds:.0f}"])
    return rows


HEADERS = ["trainer", "status", "windows", "samples/s (median)", "data wait", "peak RSS trainer MiB",
           "peak RSS tree MiB", "wall s"]


def summarize(pairs: list[tuple[Side, Side]]) -> tuple[float, float]:
    """(ours, open_clip) samples/s over all repeats: median of every steady window of each side."""
    ours = [w.samples_per_s for o, _ in pairs for w in steady(o.windows, o.skip)]
    theirs = [w.samples_per_s for _, t in pairs for w in steady(t.windows, t.skip)]
    return median_or_nan(ours), median_or_nan(theirs)


def device_line() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), {gpu}, torch {torch.__version__}"


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


def results_section(args, shards: Path, table_text: str, ours: float, theirs: float, params: tuple[int, int],
                    notes: list[str]) -> str:
    today = datetime.date.today().isoformat()
    cmd = (f".venv/bin/python bench/pretrain.py --model {args.model} --batch {args.batch} --steps {args.steps} "
           f"--workers {args.workers} --precision {args.precision} --repeats {args.repeats}")
    out = [SECTION, "",
           f"{today}, {device_line()}; machine shared with other engineers running tests (numbers are noisy).",
           f"Command: `{cmd}`; shards: {shards.name} ({args.train_samples} train samples), model "
           f"`{args.model}` ({params[0]:,} parameters ours, {params[1]:,} open_clip).", "",
           "```", table_text, "```", "",
           f"**ours / open_clip samples/s: {ratio(ours, theirs)}** ({ours:.1f} vs {theirs:.1f}; median of "
           f"steady-state windows, first {args.skip} steps skipped).", ""]
    out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, help="a prepared folder (manifest.json); default: cached synthetic")
    p.add_argument("--patients", type=int, default=600, help="synthetic patients without --shards (default 600)")
    p.add_argument("--model", default="tiny", help="model config name or JSON path (default tiny)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", choices=sorted(OPEN_CLIP_PRECISION), default="bf16")
    p.add_argument("--log-every", type=int, default=10, help="steps per log window (default 10)")
    p.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the median (default 10)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=10, help="LR warm-up steps, both trainers (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds; the order alternates (ours first, then open_clip first, ...) (default 1)")
    p.add_argument("--write-results", action="store_true", help=f"update the {SECTION!r} section of {RESULTS}")
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


def _main(args) -> int:
    from data.loader import split_samples

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
            theirs = run_open_clip(args, shards, work, args.train_samples)
        else:
            theirs = run_open_clip(args, shards, work, args.train_samples)
            ours = run_ours(args, shards, work)
        pairs.append((ours, theirs))
        for side in (ours, theirs):
            if not side.ok:
                print(f"\n{side.name} failed or logged no steady-state window (exit {side.run.returncode}); "
                      f"last output:\n{side.run.output[-3000:]}", flush=True)

    rows = [row for o, t in pairs for row in report_rows([o, t])]
    text = table(HEADERS, rows)
    ours_sps, theirs_sps = summarize(pairs)
    print(f"\nPretrain throughput: model {args.model}, batch {args.batch}, {args.steps} steps, {args.workers} "
          f"workers, {args.precision}; median over log windows of {args.log_every} steps after step {args.skip}")
    print(text)
    print(f"ours / open_clip samples/s: {ratio(ours_sps, theirs_sps)} ({_fmt(ours_sps, '.1f')} vs "
          f"{_fmt(theirs_sps, '.1f')})")
    print("(peak RSS trainer: exact kernel peak of the training process; tree: trainer + DataLoader workers,\n"
          " summed and sampled every 50 ms, shared pages counted once per process)")
    if args.write_results:
        write_results(results_section(args, shards, text, ours_sps, theirs_sps, params, notes))
    all_ok = all(o.ok and t.ok for o, t in pairs)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

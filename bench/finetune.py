"""Benchmark of the finetune stage: fusion training on cached (frozen) tower embeddings vs end-to-end through the
image tower, and the wall time of a 5-seed x 6-k few-shot sweep on cached embeddings (target: under a minute
on 2 CPU cores). Both measured in this run, on this CPU.

    .venv/bin/python bench/finetune.py [--table runs/demo/ehr/finetune --shards runs/demo/shards \
        --checkpoint runs/demo/pretrain] [--steps 20] [--batch 256]

Needs a demo (`make demo`) or any link-ehr table with its shards and a pretrained export.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import Timer, rate, ratio  # noqa: E402


def _cfg(args, run_dir: Path, *extra: str):
    from radalign.finetune.config import FinetuneConfig

    from radalign.config import load_config

    return load_config(FinetuneConfig, args.config, [
        f"run_dir={run_dir}", f"data.table={args.table}", f"data.shards={args.shards}",
        f"data.checkpoint={args.checkpoint}", f"precision={args.precision}", "progress=false", *extra],
        stage="finetune")


def cached_steps(run, batch: int, steps: int) -> float:
    """Samples/s of fusion training steps on cached embeddings (the recipe's model and loss)."""
    from radalign.finetune.models import masked_loss
    from radalign.finetune.registry import build_model, model_specs

    model = build_model(model_specs(run)["fusion"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    n = len(run.train)

    def step():
        rows = rng.choice(n, size=batch, replace=False)
        loss = masked_loss(model(run.train.batch(rows, run.modalities)).logits, run.train.labels(rows), "binary")
        opt.zero_grad()
        loss.backward()
        opt.step()
    step()  # warm-up
    with Timer() as t:
        for _ in range(steps):
            step()
    return rate(batch * steps, t.seconds)


def end_to_end_steps(run, batch: int, steps: int) -> float:
    """Samples/s when the image tower trains too: images decoded, through the tower, into the fusion head."""
    from radalign.data.loader import make_eval_loader, shard_paths
    from radalign.finetune.models import masked_loss
    from radalign.finetune.registry import build_model, model_specs

    enc = run.encoders
    tower = enc.model.visual.train()
    model = build_model(model_specs(run)["fusion"]).train()
    opt = torch.optim.AdamW(list(model.parameters()) + list(tower.parameters()), lr=1e-4)
    loader = make_eval_loader(shard_paths(run.cfg.data.shards, run.cfg.data.train_split), batch_size=batch,
                              transform=enc.image_transform(), num_workers=2)
    rows = np.arange(batch) % len(run.train)
    done, seconds = 0, 0.0
    for i, b in enumerate(loader):
        t0 = time.perf_counter()
        img = torch.nn.functional.normalize(tower(b["image"]).float(), dim=-1)  # [B, D]
        inputs = run.train.batch(rows[:len(img)], run.modalities)
        inputs["image"] = img
        loss = masked_loss(model(inputs).logits, run.train.labels(rows[:len(img)]), "binary")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first batch is warm-up
            seconds += time.perf_counter() - t0
            done += len(img)
        if i >= steps:
            break
    return rate(done, seconds)


def fewshot_sweep(args, out: Path) -> tuple[float, dict]:
    from radalign.finetune.fewshot_recipe import check_ks, run_fewshot
    from radalign.finetune.session import setup

    run = setup(_cfg(args, out, "fewshot.enabled=true", "fewshot.label=Pleural Effusion", "task.labels=[Pleural Effusion]",
                     "data.modalities=[image]", "fewshot.ks=[1,2,4,8,16,32]", "fewshot.seeds=5",
                     "fewshot.methods=[anchored,linear_probe]"), checks=[check_ks])
    with Timer() as t:
        doc = run_fewshot(run)
    run.acc.end_training()
    return t.seconds, doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default="runs/demo/ehr/finetune")
    ap.add_argument("--shards", default="runs/demo/shards")
    ap.add_argument("--checkpoint", default="runs/demo/pretrain")
    ap.add_argument("--config", default="finetune/in_hospital_mortality")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    from radalign.finetune.session import setup

    from radalign.training import reset_accelerate_state

    cap = torch.backends.cpu.get_cpu_capability()
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {torch.__version__}, CPU capability {cap}, "
          f"threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        run = setup(_cfg(args, Path(tmp) / "run", f"data.cache={Path(args.table).parent / 'bench-cache'}"))
        cached = cached_steps(run, args.batch, args.steps)
        e2e = end_to_end_steps(run, min(args.batch, 64), max(args.steps // 2, 3))
        run.acc.end_training()
        reset_accelerate_state()
        seconds, doc = fewshot_sweep(args, Path(tmp) / "fewshot")
    print(f"fusion training, cached frozen towers: {cached:,.0f} samples/s (batch {args.batch})")
    print(f"fusion training, end to end through the image tower: {e2e:,.0f} samples/s (batch {min(args.batch, 64)})")
    print(f"cached / end-to-end: {ratio(cached, e2e)}")
    n = sum(len(m["per_draw"]) for m in doc["methods"].values())
    print(f"few-shot sweep, 5 seeds x 6 k x {len(doc['methods'])} methods = {n} fits: {seconds:.1f} s "
          f"(target < 60 s): {'met' if seconds < 60 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

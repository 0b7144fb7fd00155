"""Benchmark of the finetune stage: fusion training on cached (frozen) tower embeddings vs end-to-end through the
image tower, and the wall time of a 5-seed x 6-k few-shot sweep on cached embeddings (target: under a minute
on 2 CPU cores). Both measured in this run, on this CPU.

    .venv/bin/python bench/finetune.py [--table runs/demo/ehr/finetune --shards runs/demo/shards \
        --checkpoint runs/demo/pretrain] [--steps 20] [--batch 256]

`--towers`: instead, the tower adaptation comparison (issue 20): the frozen towers' head vs the last 2 blocks
vs LoRA r=8 (model.image_tower=frozen|last_blocks|lora) vs LoRA with the head on the tower's patch tokens
(lora_patches: data.image_patch_tokens=true), image only, on one CheXpert label (--label) with every
labelled training study (k=all), the same epochs and batch for every mode, each recipe run in its own process:
test AUROC with its patient-bootstrap interval and the paired difference to frozen, training samples per CPU
second (user+sys; setup, i.e. embedding or film decoding, reported apart), trainable parameters, peak RSS.

    .venv/bin/python bench/finetune.py --towers --label Pneumothorax --epochs 3 --out bench-towers \
        [--modes frozen lora lora_patches]

`--patch-tokens`: instead, the fusion head on the pooled image embedding vs on the tower's patch tokens
(data.image_patch_tokens=false|true, issue 20 §2) on the config's task (in-hospital mortality by default), every
modality, the same seed and schedule, each run in its own process: test AUROC with its interval, the paired
difference (patients resampled), training CPU seconds per epoch, setup CPU seconds (embedding), peak RSS.

    .venv/bin/python bench/finetune.py --patch-tokens --out bench-patch

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


TOWERS = ("frozen", "last_blocks", "lora", "lora_patches")  # lora_patches: LoRA, the head on its patch tokens


def _cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def tower_cfg(args, mode: str):
    return _cfg(args, Path(args.out) / mode, "fewshot.enabled=false", f"task.name=towers_{mode}",
                f"task.labels=[{args.label}]", "data.modalities=[image]", "baselines.models=[]",
                "baselines.fusion_without_dropout=false", f"model.image_tower={mode.split('_patches')[0]}",
                f"data.image_patch_tokens={str(mode.endswith('_patches')).lower()}", "model.tune_blocks=2",
                "model.lora_rank=8", f"optim.epochs={args.epochs}", f"optim.batch_size={args.batch}",
                "optim.patience=0", f"data.cache={Path(args.out) / 'cache'}",
                f"data.allow_overlap={str(args.allow_overlap).lower()}")


def one_tower(args) -> dict:
    """One mode's recipe run in this process: setup, train (timed in CPU seconds), save; the numbers as JSON."""
    return {"mode": args.one_tower, **_one_run(tower_cfg(args, args.one_tower))}


def _one_run(cfg) -> dict:
    """The recipe of `cfg` in this process (setup, train timed in CPU seconds, save): the fusion model's numbers."""
    import json

    from radalign.finetune.recipe import train
    from radalign.finetune.report import save_outputs
    from radalign.finetune.session import open_run
    from radalign.finetune.tower import trainable_count

    c0 = _cpu()
    with open_run(cfg, overwrite=True) as run:
        c1 = _cpu()
        scores = train(run)
        c2 = _cpu()
        save_outputs(run, scores)
        info = scores.info["fusion"]
        labelled = int((~np.isnan(run.train.y)).any(1).sum())
        model = scores.models["fusion"][0]
    m = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())["models"]["fusion"]
    return {"auroc": m["auroc"], "ci": [m["ci_low"], m["ci_high"]],
            "trainable": trainable_count(model), "epochs": info["epochs_run"], "steps": info["steps"],
            "samples": labelled * info["epochs_run"], "train_cpu_s": c2 - c1, "setup_cpu_s": c1 - c0,
            "best_val_auroc": info["best_val_auroc"]}


PATCH_MODES = ("pooled", "patches")


def patch_cfg(args, mode: str):
    return _cfg(args, Path(args.out) / mode, "fewshot.enabled=false", "baselines.models=[]",
                "baselines.fusion_without_dropout=false", "baselines.degradation_seeds=1",
                f"data.image_patch_tokens={str(mode == 'patches').lower()}", f"data.cache={Path(args.out) / 'cache'}",
                f"data.allow_overlap={str(args.allow_overlap).lower()}", *args.set)


def _children(args, flag: str, modes) -> dict | int:
    """Each mode's run in a child process (its own peak RSS): {mode: its JSON + rss}, or the failed returncode."""
    import json

    from bench.common import run_measured

    res = {}
    for mode in modes:
        child = run_measured([sys.executable, __file__, flag, mode, *sys.argv[1:]])
        if child.returncode:
            print(child.output[-3000:])
            return child.returncode
        res[mode] = {**json.loads((Path(args.out) / f"bench-{mode}.json").read_text()), "rss": child.peak_rss_mb}
    return res


def _paired(args, modes, base: str) -> dict:
    """{mode: "+d [lo, hi]"} test AUROC of each mode's fusion minus `base`'s, patients resampled."""
    import pandas as pd

    from radalign.metrics import paired_difference

    pred = {m: pd.read_csv(Path(args.out) / m / "predictions.csv").dropna(subset=["label"]) for m in modes}
    out = {}
    for mode in modes:
        p, b = pred[mode], pred[base]
        assert p["study_id"].tolist() == b["study_id"].tolist()
        d = paired_difference("auroc", p["label"].to_numpy(), p["score:fusion"].to_numpy(),
                              b["score:fusion"].to_numpy(), p["subject_id"].to_numpy(), n_boot=1000)
        out[mode] = "-" if mode == base else f"{d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
    return out


def _compare(args, flag: str, modes, base: str) -> dict | int:
    """Each mode's run in a child process: {mode: (its numbers, "AUROC [CI]", paired difference to `base`)}, or
    the failed child's returncode."""
    res = _children(args, flag, modes)
    if isinstance(res, int):
        return res
    diff = _paired(args, modes, base)
    return {m: (r, f"{r['auroc']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]", diff[m]) for m, r in res.items()}


def patch_tokens(args) -> int:
    """Pooled vs patch tokens, each in a child process, then the table and the paired difference."""
    from bench.common import table

    res = _compare(args, "--one-patch", PATCH_MODES, "pooled")
    if isinstance(res, int):
        return res
    rows = [[mode, auroc, diff, r["trainable"], r["epochs"], f"{r['train_cpu_s'] / r['epochs']:.1f}",
             f"{r['setup_cpu_s']:.0f}", f"{r['rss']:.0f}", f"{r['best_val_auroc']:.3f}"]
            for mode, (r, auroc, diff) in res.items()]
    print(f"{args.config}, fusion head, every modality, test AUROC [95% CI, patients resampled]:")
    print(table(["image input", "test AUROC", "minus pooled (paired)", "trainable params", "epochs",
                 "train CPU-s/epoch", "setup CPU-s", "peak RSS MiB", "best val AUROC"], rows))
    return 0


def towers(args) -> int:
    """Each mode in a child process (its own peak RSS), then the table and the paired differences."""
    from bench.common import table

    modes = list(dict.fromkeys(["frozen", *args.modes])) if args.modes else TOWERS  # once each, frozen first
    res = _compare(args, "--one-tower", modes, "frozen")
    if isinstance(res, int):
        return res
    rows = [[mode, auroc, diff, r["trainable"], f"{r['samples'] / r['train_cpu_s']:.1f}", f"{r['setup_cpu_s']:.0f}",
             f"{r['rss']:.0f}", f"{r['best_val_auroc']:.3f}"] for mode, (r, auroc, diff) in res.items()]
    frozen = res["frozen"][0]
    print(f"{args.label}, image only, k=all ({frozen['samples'] // frozen['epochs']} labelled training "
          f"studies), {args.epochs} epochs, batch {args.batch}, test AUROC [95% CI, patients resampled]:")
    print(table(["image tower", "test AUROC", "minus frozen (paired)", "trainable params",
                 "train samples/CPU-s", "setup CPU-s", "peak RSS MiB", "best val AUROC"], rows))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default="runs/demo/ehr/finetune")
    ap.add_argument("--shards", default="runs/demo/shards")
    ap.add_argument("--checkpoint", default="runs/demo/pretrain")
    ap.add_argument("--config", default="finetune/in_hospital_mortality")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--towers", action="store_true", help="the tower adaptation comparison (see above)")
    ap.add_argument("--one-tower", choices=TOWERS, help=argparse.SUPPRESS)
    ap.add_argument("--modes", nargs="*", choices=TOWERS, help="--towers: only these (frozen always: the base)")
    ap.add_argument("--label", default="Pneumothorax", help="--towers: the CheXpert label column")
    ap.add_argument("--epochs", type=int, default=3, help="--towers: training epochs of every mode")
    ap.add_argument("--out", default="bench-towers", help="--towers: folder for the runs (one per mode)")
    ap.add_argument("--patch-tokens", action="store_true", help="pooled vs patch-token fusion head (see above)")
    ap.add_argument("--one-patch", choices=PATCH_MODES, help=argparse.SUPPRESS)
    ap.add_argument("--set", nargs="*", default=[], help="--patch-tokens: extra key=value config overrides")
    ap.add_argument("--allow-overlap", action="store_true",
                    help="--towers: data.allow_overlap=true (a copied demo whose export names the shards elsewhere)")
    args = ap.parse_args()
    if args.one_tower or args.one_patch:
        import json

        mode = args.one_tower or args.one_patch
        doc = one_tower(args) if args.one_tower else {"mode": mode, **_one_run(patch_cfg(args, mode))}
        (Path(args.out) / f"bench-{mode}.json").write_text(json.dumps(doc))
        return 0
    if args.towers:
        return towers(args)
    if args.patch_tokens:
        return patch_tokens(args)
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

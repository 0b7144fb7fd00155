"""Graceful degradation over training seeds: which modality-dropout rates make a fusion model lose less when a
modality is removed at test time, and how close the losses already are to the best any model can do.

    python bench/degradation.py                              # the demo run (make demo first), 5 seeds
    python bench/degradation.py --seeds 3 --rates "none=;default=image:0.3,text:0.25,ehr:0.3"

For each named set of rates and each seed (seed 0..n-1) it trains the fusion model of the run's config (same
data, cached tower embeddings, model selection on validation) and prints, on validation and on test, the mean
over seeds of the AUROC with every modality and with each one removed, and the mean drop. Choose rates on the
validation rows; the test rows are there to report. It also trains, per removed modality, a model on the
remaining modalities only (no dropout): the level a model trained for that input reaches, which no dropout
rate can beat by much. Unit: AUROC over studies of the split; seeds are training seeds (the data are fixed).
Never part of CI.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_RATES = ("none=;old default=image:0.1,text:0.25,ehr:0.3;default=image:0.3,text:0.25,ehr:0.3;"
                 "image 0.5=image:0.5,text:0.25,ehr:0.3;high=image:0.3,text:0.3,ehr:0.5")


def parse_rates(text: str) -> dict[str, dict[str, float]]:
    """"name=mod:rate,mod:rate;name2=" -> {name: {mod: rate}} (an empty list: no dropout)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, body = part.partition("=")
        out[name.strip()] = {k.strip(): float(v) for k, v in (kv.split(":") for kv in filter(None, body.split(",")))}
    return out


def table(model, data, mods) -> dict[str, float]:
    from radalign.finetune.registry import degradation_logits

    from radalign.metrics import auroc

    return {k: float(auroc(data.y[:, 0], v)) for k, v in degradation_logits(model, data, mods).items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="finetune/in_hospital_mortality")
    ap.add_argument("--run-dir", default="runs/demo/finetune/in_hospital_mortality",
                    help="a finished finetune run whose data and cached embeddings are reused")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rates", default=DEFAULT_RATES, help="name=mod:rate,...;name=... (default: %(default)s)")
    ap.add_argument("--out", default="runs/bench/degradation", help="scratch run folder and results.json")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args(argv)

    from radalign.finetune.config import FinetuneConfig
    from radalign.finetune.registry import model_specs
    from radalign.finetune.session import setup
    from radalign.finetune.trainer import fit_torch

    from radalign.config import load_config

    run_dir, out = Path(args.run_dir), Path(args.out)
    if not (run_dir / "config.yaml").is_file():
        print(f"--run-dir {run_dir}: no finished finetune run there; run `make demo` first", file=sys.stderr)
        return 2
    resolved = load_config(FinetuneConfig, run_dir / "config.yaml", [], stage="finetune")
    cfg = load_config(FinetuneConfig, args.config, [
        f"run_dir={out / 'run'}", f"data.cache={resolved.data.cache or run_dir / 'cache'}",
        f"data.table={resolved.data.table}", f"data.shards={resolved.data.shards}",
        f"data.checkpoint={resolved.data.checkpoint}", f"precision={args.precision}", "progress=false"],
        stage="finetune")
    run = setup(cfg, overwrite=True)  # out/run is this bench's scratch folder: train afresh every time
    mods = run.modalities
    base = model_specs(run)["fusion"]
    variants = {name: {**base, "modality_dropout": {k: v for k, v in r.items() if k in mods}}
                for name, r in parse_rates(args.rates).items()}
    for m in mods:  # the level of a model trained without m (no dropout)
        rest = [x for x in mods if x != m]
        variants[f"trained without {m}"] = {**base, "modalities": rest, "modality_dropout": {}}
    results = []
    t0 = time.perf_counter()
    for name, spec in variants.items():
        for seed in range(args.seeds):
            tag = f"{name.replace(' ', '_')}_seed{seed}"
            shutil.rmtree(out / "run" / "train" / tag, ignore_errors=True)
            shutil.rmtree(out / "run" / "models", ignore_errors=True)
            model, info = fit_torch(run, tag, {**spec, "seed": seed})
            results.append({"variant": name, "seed": seed, "best_epoch": info["best_epoch"],
                            "rates": spec["modality_dropout"], "modalities": spec["modalities"],
                            "validate": table(model, run.val, spec["modalities"]),
                            "test": table(model, run.test, spec["modalities"])})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{args.seeds} training seeds per row; {time.perf_counter() - t0:.0f} s; AUROC over studies "
          f"(validate {int((~np.isnan(run.val.y[:, 0])).sum())} labelled, test "
          f"{int((~np.isnan(run.test.y[:, 0])).sum())} labelled); mean (sd) over seeds\n")
    for split in ("validate", "test"):
        print(f"{split}:")
        print(f"  {'rates':26s} {'all':>15s} " + " ".join(f"{'-' + m:>15s} {'drop':>7s}" for m in mods))
        for name in variants:
            rows = [r for r in results if r["variant"] == name]
            if len(rows[0]["modalities"]) < len(mods):
                au = np.array([r[split]["all"] for r in rows])
                missing = next(m for m in mods if m not in rows[0]["modalities"])
                print(f"  {name:26s} {'':>15s} " + " ".join(
                    f"{au.mean():8.4f} ({au.std(ddof=1) if len(au) > 1 else 0:.3f}) {'':>7s}" if m == missing
                    else f"{'':>15s} {'':>7s}" for m in mods))
                continue
            full = np.array([r[split]["all"] for r in rows])
            cells = [f"{full.mean():8.4f} ({full.std(ddof=1) if len(full) > 1 else 0:.3f})"]
            for m in mods:
                v = np.array([r[split][m] for r in rows])
                cells.append(f"{v.mean():8.4f} ({v.std(ddof=1) if len(v) > 1 else 0:.3f}) {np.mean(full - v):+7.4f}")
            print(f"  {name:26s} " + " ".join(cells))
        print()
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Few-shot heads (finetune/fewshot_heads.py) against zero-shot and the linear probe: learning curves on a demo
run's cached image embeddings, read-only.

    .venv/bin/python bench/fewshot_heads.py --run runs/demo --out bench/out/fewshot_heads
    .venv/bin/python bench/fewshot_heads.py --run runs/demo --eval validate --heads anchored --lam0 1 4 16
    .venv/bin/python bench/fewshot_heads.py --run runs/demo --heads anchored --blank negative

For each finding: labels per the few-shot recipe's CheXpert policy (binary, uncertain excluded, blank per
`--blank`: exclude = unlabelled, negative = as zero-shot evaluation counts it), k positives and k negatives drawn
by patient from the training split with finetune.fewshot's draw (validation and test patients excluded),
`--seeds` draws per k, every method fitted on the same draws and scored on `--eval` (AUROC per study; mean and
95% t-interval over draws, finetune.fewshot.summarise). The methods are the recipe's own (head_method,
linear_probe_method, the recipe's zero_shot_init): on the same draws `radalign finetune fewshot` gives the same
numbers (tests/test_fewshot_recipe.py). Every seed draws the same rows at k = all: run_sweep fits a seed-free
method once and reuses the fit (counted per k as n_reused, summed in the JSON's "fits"). Writes OUT/fewshot_heads[-EVAL].json,
OUT/fewshot_heads[-EVAL].png (one panel per finding) and prints the table and the target check: the chosen head's
mean at every k >= max(zero-shot, probe) - 0.005. Never gates CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
from radalign.data.embed import CACHE_ENV

FINDINGS = ("Pneumothorax", "Lung Lesion", "Support Devices", "Pleural Effusion")
KS = ("1", "2", "4", "8", "16", "32", "64", "128", "all")
BASELINES = ("zero_shot", "linear_probe")
TOLERANCE = 0.005


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def load_inputs(run: Path, cache_dir: Path, eval_split: str, findings=FINDINGS, blank: str = "exclude"):
    """(encoders, {finding: (pool SplitInputs, eval SplitInputs, excluded patients)}) from the demo run."""
    from radalign.finetune.config import TaskConfig
    from radalign.finetune.inputs import EmbeddingCache, load_table, split_inputs
    from radalign.pretrain.export import load_encoders

    enc = load_encoders(run / "pretrain" / "export")
    table = load_table(run / "ehr" / "finetune")
    cache = EmbeddingCache(enc, run / "shards", cache_dir, progress=False)
    exclude = {str(p) for s in ("validate", "test") for p in table.split(s)["subject_id"]}
    out = {}
    for f in findings:
        task = TaskConfig(name=f, kind="binary", labels=[f], uncertain="exclude", blank=blank)
        pool = split_inputs("train", table.split("train"), task, ["image"], cache=cache, featurizer=None)
        ev = split_inputs(eval_split, table.split(eval_split), task, ["image"], cache=cache, featurizer=None)
        out[f] = (pool, ev, exclude)
    return enc, out


def methods(pool, ev, init, heads: list[str], options: dict) -> dict:
    """{name: Method(rows, y, seed) -> eval scores} over the same draws (the few-shot recipe's own methods)."""
    from radalign.finetune.fewshot import head_method, linear_probe_method
    from radalign.finetune.fewshot_heads import anchored_head, make_head

    def head(make):
        return head_method(make, pool.image, ev.image, pool.subjects, init)
    out = {"zero_shot": head(lambda: make_head("zero_shot")), "linear_probe": linear_probe_method(pool.image, ev.image)}
    least = {} if options.get("min_patients_adapt") is None else {"min_patients_adapt": options["min_patients_adapt"]}
    for name in heads:
        if name == "anchored":
            for lam0 in options.get("lam0") or [None]:
                out[name if lam0 is None else f"anchored_lam0={lam0:g}"] = head(
                    lambda lam0=lam0: anchored_head(**least) if lam0 is None else anchored_head(lam0, **least))
        else:
            out[name] = head(lambda name=name: make_head(name))
    return out


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def drawable(ks, y, patients, ids, seeds, exclude) -> tuple[list, dict]:
    """(the ks every seed can draw, {k: why not} for the others): a finding may have too few patients of a class."""
    from radalign.finetune.fewshot import draw_k_per_class

    from radalign import RadalignError

    ok, skipped = [], {}
    for k in ks:
        try:
            for seed in seeds:
                draw_k_per_class(y, patients, ids, k, seed, exclude_patients=exclude)
            ok.append(k)
        except RadalignError as e:
            skipped[str(k)] = str(e)
    return ok, skipped


def sweep_finding(enc, pool, ev, exclude, finding, heads, options, ks, seeds) -> dict:
    from radalign.finetune.fewshot import run_sweep
    from radalign.finetune.fewshot_recipe import zero_shot_init

    init = zero_shot_init(enc, finding, "chexpert14")
    y_pool, y_ev = pool.y[:, 0], ev.y[:, 0]
    ks, skipped = drawable(ks, y_pool, pool.subjects, pool.studies, seeds, exclude)
    classes = {s: sorted(int(c) for c in np.unique(v[~np.isnan(v)])) for s, v in (("pool", y_pool), ("eval", y_ev))}
    if any(len(c) < 2 for c in classes.values()):  # e.g. no explicit negative under the label policy
        ks, skipped = [], {"every k": f"labelled classes {classes}: a binary few-shot curve needs both in both"}
    doc = {"eval_rows": int((~np.isnan(y_ev)).sum()), "eval_positives": int(np.nansum(y_ev)),
           "pool_labelled": int((~np.isnan(y_pool)).sum()), "pool_positives": int(np.nansum(y_pool)),
           "ks": [str(k) for k in ks], "ks_not_drawable": skipped, "methods": {}, "cpu_seconds": {}, "fits": {}}
    if not ks:
        print(f"  {finding}: skipped ({skipped})", flush=True)
        return doc
    for name, method in methods(pool, ev, init, heads, options).items():
        t0 = time.process_time()
        res = run_sweep(method, y_pool, pool.subjects, pool.studies, eval_y=y_ev, ks=ks, seeds=seeds,
                        exclude_patients=exclude, method_name=name)
        doc["cpu_seconds"][name] = round(time.process_time() - t0, 2)
        doc["methods"][name] = {"summary": res.summary, "per_draw": res.per_draw}
        fits = doc["fits"][name] = {"reused": sum(bool(r.get("reused")) for r in res.per_draw),
                                    "fitted": sum(not r.get("reused") and "skipped" not in r for r in res.per_draw)}
        print(f"  {finding} {name} ({doc['cpu_seconds'][name]} CPU s, {fits.get('reused', 0)} fits reused): " + " ".join(f"{k}:{_fmt(res.summary[str(k)]['mean'])}" for k in ks), flush=True)
    return doc


def target_check(doc: dict, head: str, ks) -> dict:
    """Per finding: the k's where head's mean < max(zero-shot, probe) - TOLERANCE, with the shortfall."""
    out = {}
    for f, d in doc["findings"].items():
        m = d["methods"]
        if head not in m:
            continue
        misses = {}
        for k in d["ks"]:
            means = [m[n]["summary"][k]["mean"] for n in ("zero_shot", "linear_probe", head)]
            if None in means:  # the eval split holds one class: no AUROC, nothing to check
                misses[k] = "no AUROC"
                continue
            gap = means[2] - max(means[:2])
            if gap < -TOLERANCE:
                misses[k] = round(gap, 4)
        out[f] = {"met": not misses, "misses": misses}
    return out


def table_markdown(doc: dict) -> str:
    lines = []
    for f, d in doc["findings"].items():
        ks = d["ks"]
        lines += [f"\n{f} ({doc['eval_split']} rows {d['eval_rows']}, positives {d['eval_positives']}): mean AUROC over draws "
                  f"[95% interval]; not drawable: {', '.join(d['ks_not_drawable']) or 'none'}", "", "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---" * (len(ks) + 1) + "|"]
        for name, m in d["methods"].items():
            cells = [f"{_fmt(m['summary'][str(k)]['mean'])} [{_fmt(m['summary'][str(k)]['ci_low'])}, "
                     f"{_fmt(m['summary'][str(k)]['ci_high'])}]" for k in ks]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    findings = list(doc["findings"])
    fig, axes = plt.subplots(1, len(findings), figsize=(4.2 * len(findings), 3.8), squeeze=False)
    for ax, f in zip(axes[0], findings):
        ks = doc["findings"][f]["ks"]
        if not ks:  # e.g. no explicit negative under this label policy: say so rather than draw an empty frame
            ax.text(0.5, 0.5, "no binary task\nunder this label policy", ha="center", va="center",
                    transform=ax.transAxes)
        xs = np.arange(len(ks))
        for name, m in doc["findings"][f]["methods"].items():
            s = [m["summary"][str(k)] for k in ks]
            if any(v["mean"] is None for v in s):
                continue
            mean = np.array([v["mean"] for v in s])
            lo, hi = np.array([v["ci_low"] for v in s]), np.array([v["ci_high"] for v in s])
            style = "--" if name in BASELINES else "-"
            ax.plot(xs, mean, style, marker="o", ms=3, label=name, lw=2.2 if name == doc["chosen"] else 1.1)
            ax.fill_between(xs, lo, hi, alpha=0.12)
        ax.set_xticks(xs, list(ks))
        ax.set_title(f)
        ax.set_xlabel("k per class (log2; all = every labelled training study)")
        ax.set_ylabel(f"{doc['eval_split']} AUROC (mean, 95% CI over draws)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    from radalign.io import atomic_write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="the demo folder (read-only)")
    p.add_argument("--out", type=Path, default=Path("bench/out/fewshot_heads"))
    p.add_argument("--eval", default="test", choices=("test", "validate"), help="the split scored")
    p.add_argument("--findings", nargs="+", default=list(FINDINGS))
    p.add_argument("--ks", nargs="+", default=list(KS))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--heads", nargs="+", default=["anchored", "anchored_cv", "wise", "clap", "lppp", "tip_f"])
    p.add_argument("--lam0", nargs="+", type=float, default=None, help="anchored head: sweep its lam0")
    p.add_argument("--min-patients-adapt", type=int, default=None,
                   help="anchored head: patients per class from which it may leave zero-shot (default: the head's)")
    p.add_argument("--chosen", default="anchored", help="the head checked against the target")
    p.add_argument("--blank", default="exclude", choices=("exclude", "negative"),
                   help="a blank CheXpert label: unlabelled (exclude) or negative (as zero-shot evaluation)")
    a = p.parse_args(argv)
    ks = [k if k == "all" else int(k) for k in a.ks]
    a.out.mkdir(parents=True, exist_ok=True)
    # the run is read-only: image embeddings are cached under OUT, not in the export's embeddings/ folder
    os.environ.setdefault(CACHE_ENV, str(a.out.parent / "embed-cache"))
    enc, data = load_inputs(a.run, a.out / "cache", a.eval, a.findings, a.blank)
    doc = {"eval_split": a.eval, "blank": a.blank, "unit": "study (AUROC); draws by patient", "ks": a.ks, "seeds": a.seeds,
           "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d", time.gmtime()), "chosen": a.chosen,
           "min_patients_adapt": a.min_patients_adapt,  # None: the head's default (AnchoredLogistic)
           "tolerance": TOLERANCE, "findings": {}}
    tag = ("" if a.eval == "test" else f"-{a.eval}") + ("" if a.blank == "exclude" else f"-blank_{a.blank}")
    for f in a.findings:
        pool, ev, exclude = data[f]
        options = {"lam0": a.lam0, "min_patients_adapt": a.min_patients_adapt}
        doc["findings"][f] = sweep_finding(enc, pool, ev, exclude, f, a.heads, options, ks, range(a.seeds))
        doc["target"] = {h: target_check(doc, h, a.ks) for h in
                         sorted({n for d in doc["findings"].values() for n in d["methods"]} - set(BASELINES))}
        atomic_write_json(a.out / f"fewshot_heads{tag}.json", doc)  # after each finding: a partial run is kept
    plot(doc, a.out / f"fewshot_heads{tag}.png")
    print(table_markdown(doc))
    print("\ntarget (mean >= max(zero-shot, probe) - 0.005 at every k):")
    for h, t in doc["target"].items():
        print(f"  {h}: " + "; ".join(f"{f}: {'met' if v['met'] else json.dumps(v['misses'])}" for f, v in t.items()))
    print(f"cpu: {doc['cpu']}; date {doc['date']}")
    return doc


if __name__ == "__main__":
    main()

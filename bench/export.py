"""Acceptance of `radalign export`: zero-shot through open_clip (and transformers) without radalign equals
`radalign zeroshot`.

    .venv/bin/python bench/export.py [--run runs/demo/pretrain] [--shards runs/demo/shards] [--out bench/out/export]

1. `radalign zeroshot` on the test split (chexpert14 prompts, blank = negative, uncertain excluded: the demo's
   settings) through radalign's own loader;
2. `radalign export --format open_clip` and `--format transformers` of the same run;
3. for each folder, a fresh Python process that never imports radalign (checked) reads the test shards' JPEGs
   and labels with `tarfile`, preprocesses with the target library's own transform (open_clip's
   `create_model_and_transforms` / transformers' AutoImageProcessor), tokenizes the prompts with its own
   tokenizer, scores each class as softmax over [positive, negative] prompt ensembles at the model's logit
   scale, and computes AUROC per class with scikit-learn; the macro is the mean over the set's macro classes.
Prints the macro AUROC of each path, their differences, and CPU seconds (user+sys) of each step. The acceptance
(issue 22) is open_clip's macro equal to radalign's to 3 decimals.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs with `python -I`: imports numpy, PIL, yaml, sklearn, torch and the target library only.
SCORER = r"""
import io, json, sys, tarfile
from pathlib import Path
import numpy as np, torch, yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

fmt, folder, shards, split, prompts_yaml, out = sys.argv[1:7]
ps = yaml.safe_load(open(prompts_yaml))
names = list(ps["classes"])
macro = ps.get("macro_classes") or names

samples = []  # (jpg bytes, labels)
for tar_path in sorted((Path(shards) / split).glob("*.tar")):
    with tarfile.open(tar_path) as tar:
        items = {}
        for m in tar.getmembers():
            if m.isfile():
                key, ext = m.name.split(".", 1)
                items.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key in sorted(items):
            it = items[key]
            jpg = next((v for e, v in it.items() if e in ("jpg", "jpeg", "png")), None)
            meta = json.loads(it.get("json", b"{}"))
            samples.append((jpg, meta.get("labels") or {}))

def norm(x):
    return torch.nn.functional.normalize(x, dim=-1)

with torch.no_grad():
    if fmt == "open_clip":
        import open_clip
        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
        tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
        model.eval()
        def embed_images(pils):
            return norm(model.encode_image(torch.stack([preprocess(p) for p in pils])))
        def embed_texts(texts):
            return norm(model.encode_text(tokenizer(texts)))
        scale = float(model.logit_scale.exp())
    else:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        ctx = json.load(open(Path(folder) / "export.json"))["details"]["context_length"]
        def feats(o):
            return o if torch.is_tensor(o) else o.pooler_output
        def embed_images(pils):
            px = processor(images=[p.convert("RGB") for p in pils], return_tensors="pt")["pixel_values"]
            return norm(feats(model.get_image_features(pixel_values=px)))
        def embed_texts(texts):
            b = tok(texts, padding="max_length", max_length=ctx, truncation=True, return_tensors="pt")
            return norm(feats(model.get_text_features(**{k: v for k, v in b.items() if k != "special_tokens_mask"})))
        scale = float(model.logit_scale.exp())

    images = []
    for i in range(0, len(samples), 64):
        images.append(embed_images([Image.open(io.BytesIO(s[0])) for s in samples[i:i + 64]]))
    images = torch.cat(images)  # [N, D]

    def ensemble(texts):
        return norm(embed_texts(list(texts)).mean(dim=0))  # mean of normalised prompt embeddings, renormalised

    probs = {}
    for c in names:
        pos, neg = ensemble(ps["classes"][c]["positive"]), ensemble(ps["classes"][c]["negative"])
        logits = scale * torch.stack([images @ pos, images @ neg], dim=-1)  # [N, 2]
        probs[c] = logits.softmax(dim=-1)[:, 0].numpy()

aurocs = {}
for c in names:
    raw = [s[1].get(c) for s in samples]
    keep = [i for i, v in enumerate(raw) if v is None or float(v) != -1.0]  # uncertain excluded
    y = np.array([0.0 if raw[i] is None else float(raw[i]) for i in keep])  # blank = negative
    if 0 < y.sum() < len(y):
        aurocs[c] = float(roc_auc_score(y, probs[c][keep]))
ours = ("radalign", "pretrain", "data", "zeroshot", "retrieval", "finetune")
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ours)
json.dump({"macro": float(np.mean([aurocs[c] for c in macro])), "classes": aurocs, "n_images": len(samples),
           "leaked": leaked, "class": type(model).__name__}, open(out, "w"), indent=2)
"""


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd: list[str], **kw) -> float:
    """Run a child; returns its CPU seconds (user+sys, children included)."""
    before = _cpu_children()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd[:4])} ...\n{proc.stderr[-4000:]}")
    return _cpu_children() - before


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo/pretrain", help="pretrain run (default: %(default)s)")
    ap.add_argument("--shards", default="runs/demo/shards", help="shards folder (default: %(default)s)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--prompts", default=str(REPO / "configs" / "zeroshot" / "chexpert14.yaml"))
    ap.add_argument("--out", default="bench/out/export")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    radalign = [sys.executable, "-m", "radalign.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_MODULES_CACHE": str(out / "hf_modules")}
    cpu = {"radalign zeroshot": _run(radalign + [
        "zeroshot", "eval", "--export", args.run, "--shards", args.shards, "--split", args.split, "--prompts",
        args.prompts, "--blank", "negative", "--bootstrap", "200", "--no-cache", "--no-control",
        "--out", str(out / "zeroshot")], env=env)}
    reference = json.loads((out / "zeroshot" / "metrics.json").read_text())["macro"]["auroc"]
    results = {}
    for fmt in ("open_clip", "transformers"):
        folder = out / fmt
        cpu[f"export {fmt}"] = _run(radalign + ["export", "--format", fmt, args.run, "--out", str(folder),
                                                "--overwrite", "--no-overlap-check"], env=env)
        scores = out / f"{fmt}-scores.json"
        plain = {k: v for k, v in env.items() if not k.startswith("PYTHON")}
        cpu[f"{fmt} zero-shot (no radalign)"] = _run(
            [sys.executable, "-I", "-c", SCORER, fmt, str(folder.resolve()), str(Path(args.shards).resolve()),
             args.split, args.prompts, str(scores.resolve())], env=plain, cwd=out)
        results[fmt] = json.loads(scores.read_text())
        assert results[fmt]["leaked"] == [], results[fmt]["leaked"]
    print(f"CPU: {_cpu_model()}; {time.strftime('%Y-%m-%d')}; {args.run} on {args.shards}:{args.split}")
    print(f"{'path':38s} {'macro AUROC':>11s} {'- radalign':>11s} {'equal to 3 dp':>14s}")
    print(f"{'radalign zeroshot (radalign loader)':38s} {reference:11.5f} {'':>11s} {'':>14s}")
    for fmt, r in results.items():
        label = f"{fmt} fresh process ({r['class']})"
        same = f"{r['macro']:.3f}" == f"{reference:.3f}"
        print(f"{label:38s} {r['macro']:11.5f} {r['macro'] - reference:+11.5f} {str(same):>14s}")
    print("CPU seconds (user+sys): " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
    return 0 if f"{results['open_clip']['macro']:.3f}" == f"{reference:.3f}" else 1


if __name__ == "__main__":
    sys.exit(main())

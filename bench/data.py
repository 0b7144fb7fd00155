"""Data benchmarks (never part of CI): loader throughput and `data prepare` throughput + memory.

    .venv/bin/python bench/data.py [--shards DIR] [--n N] [--workers W] [--patients 40,160] [--image-size 224]

1. Training loader from shards vs the same images as loose JPEG files read by a plain torch Dataset, with
   the same transform, batch size and worker count: images/s side by side and their ratio.
   `--shards DIR` uses a prepared folder (split train); otherwise N synthetic images are written as shards.
2. Training transform alone, per decoded image in one thread: ours (`train_transform`, the fused
   `RandomCropRotateJitter`) vs the same augmentation as a torchvision v2 chain vs open_clip's training
   transform (crop-only, RGB), interleaved, best of several passes, with ratios.
3. `data prepare` on synthetic MIMIC (`data.synth.synthesize`) at two sizes, each in its own child process:
   images/s and peak RSS, to show memory stays flat as the dataset grows.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This script is named like the `data` package; drop its folder from sys.path so `import data` finds the
# package, and put the repository root first (for `data`, `radalign` and `bench.common`).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import REPO, Timer, rate, ratio, run_measured, table  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# Inputs


def _cxr_like(rng: np.random.Generator, size: int) -> bytes:
    """A smooth gray image with some structure and noise (compresses like a radiograph, unlike pure noise)."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.5 + 0.3 * np.sin(6 * x + rng.uniform(0, 6)) * np.cos(4 * y) - 0.4 * ((x - 0.5) ** 2 + (y - 0.5) ** 2)
    img += rng.normal(0, 0.04, img.shape)
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), mode="L").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_synthetic_shards(out: Path, n: int, size: int, shard_size: int = 250) -> Path:
    """n samples following docs/architecture.md §1 (train split) + manifest; returns `out`."""
    import webdataset as wds
    from radalign.data.labels import CHEXPERT_LABELS

    rng = np.random.default_rng(0)
    (out / "train").mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, n, shard_size):
        rel = f"train/shard-{start // shard_size:06d}.tar"
        count = min(shard_size, n - start)
        with wds.TarWriter(str(out / rel)) as sink:
            for i in range(start, start + count):
                meta = {"subject_id": i // 4, "study_id": i // 2, "dicom_id": f"b{i:07d}", "split": "train",
                        "view": "PA", "study_datetime": None, "labels": dict.fromkeys(CHEXPERT_LABELS),
                        "sections": {"findings": "", "impression": "", "last_paragraph": "", "indication": ""}}
                sink.write({"__key__": meta["dicom_id"], "jpg": _cxr_like(rng, size),
                            "txt": f"Finding number {i % 50}.".encode(), "json": json.dumps(meta).encode()})
        shards.append({"path": rel, "samples": count, "sha256": "-"})
    empty = {"samples": 0, "shards": []}
    manifest = {"format": "radalign-shards/1", "source": "bench", "created": "", "options": {},
                "labels": list(CHEXPERT_LABELS), "skipped": {},
                "splits": {"train": {"samples": n, "shards": shards}, "validate": empty, "test": empty}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def extract_loose(paths: list[str], out: Path, n: int) -> list[Path]:
    """The first n samples of the shards as loose files KEY.jpg / KEY.txt / KEY.json; returns the jpg paths."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    jpgs = []
    for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
        if len(jpgs) >= n:
            break
        stem = out / sample["__key__"]
        for ext in ("jpg", "txt", "json"):
            stem.with_suffix(f".{ext}").write_bytes(sample[ext])
        jpgs.append(stem.with_suffix(".jpg"))
    return jpgs


class LooseFiles(torch.utils.data.Dataset):
    """The baseline: one JPEG + text + JSON file per sample, decoded and transformed like the loader does."""

    def __init__(self, jpgs: list[Path], transform):
        self.jpgs, self.transform = jpgs, transform

    def __len__(self) -> int:
        return len(self.jpgs)

    def __getitem__(self, i: int) -> dict:
        from radalign.data.loader import study_int64
        from radalign.data.text import text_id

        path = self.jpgs[i]
        with Image.open(path) as img:
            image = self.transform(img.convert("L"))  # [C, H, W]
        text = path.with_suffix(".txt").read_text(encoding="utf-8")
        meta = json.loads(path.with_suffix(".json").read_bytes())
        return {"image": image, "study_id": study_int64(meta["study_id"]), "text_id": text_id(text)}


# ----------------------------------------------------------------------------------------------------------
# Benchmarks


def _images_per_second(make_iter) -> tuple[float, int]:
    """One full pass: (images/s, images)."""
    count = 0
    with Timer() as t:
        for batch in make_iter():
            count += batch["image"].shape[0]
    return rate(count, t.seconds), count


def bench_loader(args, work: Path) -> None:
    from radalign.data.loader import make_train_loader, manifest_counts, shard_paths
    from radalign.data.transforms import train_transform

    if args.shards:
        paths = shard_paths(args.shards, "train")
    else:
        print(f"writing {args.n} synthetic {args.source_size}px images as shards ...", flush=True)
        paths = shard_paths(write_synthetic_shards(work / "shards", args.n, args.source_size), "train")
    counts = manifest_counts(paths) or {}
    # Shards covering at least n samples; the loose copy holds exactly the same images.
    chosen, total = [], 0
    for p in paths:
        if total >= args.n:
            break
        chosen.append(p)
        total += counts.get(p, 0)
    n = min(args.n, total) if counts else args.n
    jpgs = extract_loose(chosen, work / "loose", n)
    n = len(jpgs)
    transform = train_transform(args.image_size)
    torch.set_num_threads(1)

    def shards_iter():
        return make_train_loader(chosen, batch_size=args.batch_size, transform=transform,
                                 num_workers=args.workers, seed=0, resampled=True, samples_per_epoch=n,
                                 shuffle_buffer=min(1000, n))

    def loose_iter():
        return torch.utils.data.DataLoader(LooseFiles(jpgs, transform), batch_size=args.batch_size, shuffle=True,
                                           num_workers=args.workers, drop_last=True)

    print(f"timing {n} images, batch {args.batch_size}, {args.workers} workers, {args.image_size}px, "
          f"best of {args.passes} passes ...", flush=True)
    # Passes alternate between the two sources and the best of each is kept: on a shared machine the load
    # drifts, and alternating spreads that drift over both instead of biasing the ratio.
    wds_rate = loose_rate = 0.0
    for _ in range(args.passes):
        r, wds_n = _images_per_second(shards_iter)
        wds_rate = max(wds_rate, r)
        r, loose_n = _images_per_second(loose_iter)
        loose_rate = max(loose_rate, r)
    print("\nTraining loader throughput (same images, transform, batch size and workers)")
    print(table(["source", "images/pass", "images/s"],
                [["webdataset shards (make_train_loader)", wds_n, wds_rate],
                 ["loose JPEG files (torch Dataset)", loose_n, loose_rate]]))
    print(f"shards / loose files: {ratio(wds_rate, loose_rate)}\n", flush=True)


def v2_chain(image_size: int):
    """The same augmentation as `train_transform`, as separate torchvision v2 transforms (what it replaced)."""
    from radalign.data.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, ToGray
    from torchvision.transforms import v2

    return v2.Compose([
        ToGray(), v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
        v2.RandomRotation(7.0, interpolation=v2.InterpolationMode.BILINEAR, fill=0),
        v2.ColorJitter(brightness=0.2, contrast=0.2), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
        v2.Lambda(lambda x: x.expand(3, -1, -1)), v2.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])


def bench_transform(args) -> None:
    import time

    import open_clip
    from radalign.data.transforms import train_transform

    rng = np.random.default_rng(0)
    gray = [Image.open(io.BytesIO(_cxr_like(rng, args.source_size))).convert("L") for _ in range(args.transform_n)]
    rgb = [im.convert("RGB") for im in gray]  # open_clip's loader decodes to RGB; not timed here
    size = args.image_size
    sides = {"ours: train_transform (fused)": (train_transform(size), gray),
             "same augmentation as a v2 chain": (v2_chain(size), gray),
             "open_clip image_transform (train)": (open_clip.image_transform(size, is_train=True), rgb)}
    torch.set_num_threads(1)
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(args.passes + 2):  # interleaved passes; the best of each side is kept
        for name, (tf, imgs) in sides.items():
            t0 = time.perf_counter()
            for im in imgs:
                tf(im)
            best[name] = min(best[name], (time.perf_counter() - t0) / len(imgs) * 1e3)
    ours = best["ours: train_transform (fused)"]
    print(f"\nTraining transform per decoded image ({args.transform_n} images {args.source_size}px -> {size}px, "
          "1 thread)")
    print(table(["transform", "ms/image", "ours is faster by"],
                [[name, f"{ms:.3f}", f"{ms / ours:.2f}x"] for name, ms in best.items()]), flush=True)


# The child measured for `data prepare`: only the import and the prepare call, so its peak RSS is prepare's.
PREPARE_CHILD = """
import json, resource, sys
from radalign.data.prepare import PrepareConfig, prepare
from radalign.config import load_config
prepare(load_config(PrepareConfig, json.loads(sys.argv[1])), progress=False)
# The largest peak among prepare's own worker processes (exact: the kernel keeps it for waited-for children).
print("WORKER_PEAK_KIB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def bench_prepare(args, work: Path) -> None:
    try:  # other engineers' modules; the loader benchmark must not depend on them
        from radalign.data.synth import synthesize
    except ImportError as e:
        print(f"prepare benchmark skipped: {e} (data.synth / data prepare not available)")
        return
    rows = []
    for patients in args.patients:
        src = work / f"synth-{patients}"
        print(f"synthesizing {patients} patients ...", flush=True)
        synthesize(src, patients=patients, seed=0, image_size=args.source_size, workers=args.workers,
                   progress=False)
        out = work / f"prepared-{patients}"
        flags = {"mimic_cxr": str(src / "mimic-cxr-jpg"), "reports": str(src / "mimic-cxr-reports"),
                 "out": str(out), "image_size": args.prepare_size, "shard_size": 200, "workers": args.workers}
        cmd = [sys.executable, "-c", PREPARE_CHILD, json.dumps(flags)]
        print(f"preparing {patients} patients ...", flush=True)
        run = run_measured(cmd, cwd=REPO)
        if run.returncode != 0:
            print(f"data prepare failed (exit {run.returncode}):\n{run.output[-3000:]}")
            return
        manifest = json.loads((out / "manifest.json").read_text())
        images = sum(int(s["samples"]) for s in manifest["splits"].values())
        worker_kib = [line.split()[1] for line in run.output.splitlines() if line.startswith("WORKER_PEAK_KIB")]
        worker_mb = float(worker_kib[-1]) / 1024 if worker_kib else float("nan")
        rows.append([patients, images, run.seconds, rate(images, run.seconds), run.peak_rss_mb, worker_mb,
                     run.peak_tree_rss_mb])
    print(f"\n`data prepare` ({args.workers} workers, --image-size {args.prepare_size}), one child process per size")
    print(table(["patients", "images", "seconds", "images/s", "peak RSS main MiB", "peak RSS worker MiB",
                 "peak RSS all procs MiB"], rows))
    print("(main and worker: exact kernel peaks; all procs: summed over the process tree, sampled every 50 ms,\n"
          " shared library pages counted once per process)")
    if len(rows) >= 2 and rows[0][1] and rows[-1][1] > rows[0][1]:
        first, last = rows[0], rows[-1]
        print(f"images x{last[1] / first[1]:.1f} -> peak RSS main x{last[4] / first[4]:.2f}, "
              f"worker x{last[5] / first[5]:.2f}")
        if last[2] > first[2]:  # the difference cancels startup (imports, worker pool); noisy on a busy machine
            print(f"marginal throughput: {rate(last[1] - first[1], last[2] - first[2]):.1f} images/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, help="a prepared folder (manifest.json); default: synthetic shards")
    p.add_argument("--n", type=int, default=1000, help="images for the loader comparison (default 1000)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader / prepare workers (default 2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224, help="transform output size (default 224)")
    p.add_argument("--source-size", type=int, default=320, help="synthetic image size (default 320)")
    p.add_argument("--prepare-size", type=int, default=256, help="prepare --image-size (default 256)")
    p.add_argument("--passes", type=int, default=2,
                   help="timed passes per source, alternating, best kept (default 2)")
    p.add_argument("--patients", type=lambda s: [int(v) for v in s.split(",")], default=[40, 160],
                   help="synthetic dataset sizes (patients) for the prepare benchmark (default 40,160)")
    p.add_argument("--transform-n", type=int, default=300, help="images for the transform timing (default 300)")
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--skip-transform", action="store_true")
    p.add_argument("--skip-prepare", action="store_true")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = p.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="radalign-bench-data-"))
    try:
        if not args.skip_loader:
            bench_loader(args, work)
        if not args.skip_transform:
            bench_transform(args)
        if not args.skip_prepare:
            bench_prepare(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

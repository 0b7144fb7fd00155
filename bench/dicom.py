"""DICOM benchmarks (never part of CI): where `prepare-dicom` and `prepare` on the generator's JPGs part, and
what MIMIC-CXR-JPG's JPEG step (data/dicom.py, step 6) costs on a MIMIC-sized film.

    .venv/bin/python bench/dicom.py [--sizes 160:128,1024:128] [--patients 40] [--quality 90]

1. For each FILM:SHARDS pair, a `synth --dicom` set with FILM px films, and per film the mean absolute
   difference (grey levels) between the JPG route (`prepare`'s `load_image`: the generator's JPG, decoded at
   a reduced DCT scale where that still covers SHARDS, then LANCZOS) and two DICOM routes, at each stage:
   the converted film, after the shrink to SHARDS px, after the shard JPEG at `--quality`.
   "steps 1-5": the conversion without dcm2img's JPEG write (the route before this benchmark existed);
   "steps 1-6": the route `prepare-dicom` takes (data.dicom.DicomFile.image with short_side).
2. CPU seconds per film (process time, best of `--repeat`) of the DICOM route with and without step 6 on a
   2544 x 3056 12-bit film, uncompressed and JPEG 2000, side by side, with their ratio: to a 128 px image as
   `prepare-dicom` makes it, and the full-size image `read_dicom` gives the service.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import ratio, table  # noqa: E402


def _mad(a, b) -> float:
    return float(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean())


def _jpeg_round_trip(img, quality: int):
    from radalign.data.prepare import encode_jpeg

    return Image.open(io.BytesIO(encode_jpeg(img, quality)))


def route_gaps(root: Path, shards: int, quality: int) -> dict[str, list[float]]:
    """Per film: MAD between the JPG route and each DICOM route at each stage (module docstring, 1)."""
    from radalign.data.dicom import open_dicom, to_image
    from radalign.data.prepare import load_image, shrink

    gaps: dict[str, list[float]] = {}
    for path in sorted((root / "mimic-cxr" / "files").rglob("*.dcm")):
        jpg_path = root / "mimic-cxr-jpg" / path.relative_to(root / "mimic-cxr").with_suffix(".jpg")
        with open_dicom(path, max_pixels=None) as d:
            pixels = d.pixels()
        jpg_film = Image.open(jpg_path)
        jpg_small = load_image(jpg_path, shards)
        routes = {"steps 1-5": (Image.fromarray(pixels, mode="L"), shrink(Image.fromarray(pixels, mode="L"), shards)),
                  "steps 1-6": (to_image(pixels, "mimic"), shrink(to_image(pixels, "mimic", shards), shards))}
        for name, (film, small) in routes.items():
            for stage, value in (("film", _mad(film, jpg_film)), ("shrunk", _mad(small, jpg_small)),
                                 (f"shard q{quality}", _mad(_jpeg_round_trip(small, quality),
                                                            _jpeg_round_trip(jpg_small, quality)))):
                gaps.setdefault(f"{name}|{stage}", []).append(value)
    return gaps


def gap_rows(sizes: list[tuple[int, int]], patients: int, quality: int, tmp: Path) -> list[list[str]]:
    from radalign.data.synth import synthesize

    rows = []
    for film, shards in sizes:
        root = tmp / f"synth{film}"
        synthesize(root, patients=patients, seed=0, image_size=film, workers=1, progress=False, with_dicom=True)
        gaps = route_gaps(root, shards, quality)
        bpp = np.mean([p.stat().st_size * 8 / film**2 for p in (root / "mimic-cxr-jpg" / "files").rglob("*.jpg")])
        for key, values in gaps.items():
            route, stage = key.split("|")
            rows.append([f"{film} -> {shards}", route, stage, f"{np.mean(values):.3f}", f"{np.max(values):.3f}",
                         str(len(values)), f"{bpp:.2f}"])
    return rows


def _cpu(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def cost_rows(repeat: int, shards: int) -> list[list[str]]:
    """CPU seconds per MIMIC-sized film, DICOM route without and with step 6 (module docstring, 2)."""
    from radalign.data.dicom import dicom_bytes, open_dicom, to_image
    from radalign.data.prepare import shrink
    from radalign.data.synth.images import ImageSpec, quantize, render_float

    spec = ImageSpec(view="PA", findings={})
    drawn = render_float(spec, 1024, 0.3, np.random.default_rng(0))  # [1024, 1024], upsampled to MIMIC's size
    film = np.asarray(Image.fromarray(drawn, mode="F").resize((2544, 3056), Image.BICUBIC)).clip(0, 1)
    stored = quantize(film, 12)  # [3056, 2544]
    rows = []
    for compression in ("none", "j2k"):
        data = dicom_bytes(stored, compression=compression)

        def run(route: str, data=data):
            with open_dicom(data) as d:
                pixels = d.pixels()
            if route == "1-5":
                return shrink(Image.fromarray(pixels, mode="L"), shards)
            if route == "1-6 full":  # read_dicom as the service calls it: the whole JPEG decoded
                return to_image(pixels, "mimic")
            return shrink(to_image(pixels, "mimic", shards), shards)

        times = []
        for route in ("1-5", "1-6", "1-6 full"):
            run(route)  # warm-up: lazy imports and decoder set-up are not a film's cost
            times.append(_cpu(lambda route=route: run(route), repeat))
        rows.append([compression, *(f"{t:.3f}" for t in times), ratio(times[1], times[0])])
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="160:128,1024:128", help="FILM:SHARDS pairs (px), comma-separated")
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--quality", type=int, default=90, help="shard JPEG quality (prepare's default 90)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    sizes = [tuple(int(v) for v in pair.split(":")) for pair in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        rows = gap_rows(sizes, args.patients, args.quality, Path(tmp))
    print("JPG route vs DICOM route, mean absolute difference (grey levels) per film")
    print(table(["film -> shards", "DICOM route", "stage", "mean", "max", "films", "JPG bits/px"], rows))
    print("\nCPU seconds per 2544 x 3056 film, DICOM route to a 128 px image (best of "
          f"{args.repeat})")
    print(table(["compression", "steps 1-5 + shrink", "steps 1-6 + shrink (prepare)", "steps 1-6, full size (serve)",
                 "prepare: 1-6 / 1-5"], cost_rows(args.repeat, 128)))


if __name__ == "__main__":
    main()

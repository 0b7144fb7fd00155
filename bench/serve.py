"""Latency of `radalign retrieval serve` under a bounded loopback load: p50/p95/p99 per query kind and size.

    .venv/bin/python bench/serve.py [--export runs/demo/pretrain] [--sizes 10000,100000] [--requests 200]
                                    [--clients 1,4] [--results bench/RESULTS.md]

The service is started the way users start it (`radalign retrieval serve --index-dir ... --checkpoint ...`, a
child process on 127.0.0.1) over index folders of synthetic clustered embeddings (the dimension and encoder
checksum of the export, so the demo's towers embed the queries) with synthetic metadata. For each value of
`--clients` (1 and 4), that many threads each send their share of `--requests` one after another (a bounded
load: at most that many in flight; the service answers one query at a time, so 4 in flight wait in turn);
each latency is one request's wall time at the client, JSON parsed. Query kinds: text (the text tower + search),
image (a 160 px PNG: decode, the image tower, search) and DICOM (a 2048 x 2048 12-bit film: read, the MIMIC
conversion, the tower, search). The server's CPU seconds per query (user + system of its process) are printed
beside the latencies: on a shared machine they are the steadier figure. Targets (issue 21): p95 < 50 ms for
text at 10^5 cases, < 300 ms for an image with the demo's tower.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radalign.data.dicom import dicom_bytes  # noqa: E402
from radalign.retrieval import index as ix  # noqa: E402
from radalign.retrieval.build import build_tuned  # noqa: E402
from radalign.retrieval.store import metadata_table, write_index_dir  # noqa: E402

from bench.common import REPO, table  # noqa: E402

TEXTS = ["large left pleural effusion", "no acute cardiopulmonary process", "moderate pulmonary edema",
         "right lower lobe consolidation", "cardiomegaly without edema", "small right apical pneumothorax",
         "support devices in place, lungs clear", "bibasilar atelectasis"]


def target_ms(kind: str, n: int) -> float | None:
    """Issue 21's p95 targets: a text query at 10^5 cases, an image query (any size) with the demo's tower."""
    return 50.0 if (kind, n) == ("text", 100_000) else 300.0 if kind in ("image", "dicom") else None


def synthetic_index(out: Path, export: str, n: int, seed: int = 0) -> Path:
    """An index folder of n clustered embeddings (exact Flat) with the export's checksum and plausible metadata."""
    from radalign.pretrain.export import load_encoders

    enc = load_encoders(export)
    x = ix.clustered_vectors(n, int(enc.embed_dim), clusters=max(10, n // 100), seed=seed)
    index, entry = build_tuned(x, kind="flat")
    rng = np.random.default_rng(seed)
    thumb = _jpeg(np.full((32, 32), 128, np.uint8))
    cols = {"key": [f"k{i}" for i in range(n)], "dicom_id": [f"d{i:07d}" for i in range(n)],
            "study_id": [str(50_000_000 + i // 2) for i in range(n)],
            "subject_id": [str(10_000_000 + i // 6) for i in range(n)],
            "split": ["train"] * n, "view": list(rng.choice(["PA", "AP", "LATERAL"], n)),
            "study_datetime": [f"21{50 + i % 30}-0{1 + i % 9}-1{i % 10}T08:00:00" for i in range(n)],
            "text": [TEXTS[i % len(TEXTS)] for i in range(n)], "section_impression": [TEXTS[i % 8] for i in range(n)],
            "label:Edema": list(rng.choice([1.0, 0.0, np.nan], n)),
            "label:Pleural Effusion": list(rng.choice([1.0, 0.0, np.nan], n)), "thumbnail": [thumb] * n}
    manifest = {"encoder": {"checksum": enc.checksum, "embed_dim": enc.embed_dim, "checkpoint": str(export),
                            "config": enc.config}, "dim": int(enc.embed_dim), "normalisation": "l2",
                "metric": "inner_product", "modalities": ["image"], "indexes": {"image": entry},
                "data": {"split": "train", "skipped": {}, "source": "bench/serve.py synthetic"}}
    return write_index_dir(out, indexes={"image": index}, vectors={"image": x},
                           metadata=metadata_table(cols, ("Edema", "Pleural Effusion")), manifest=manifest)


def _jpeg(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG")
    return buf.getvalue()


def query_images(seed: int = 0) -> dict[str, bytes]:
    """A 160 px PNG film and the same film as a 2048 x 2048 12-bit DICOM (the size of a real radiograph)."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.integers(0, 255, (160, 160), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(3))
    png = io.BytesIO()
    noise.save(png, "PNG")
    big = np.asarray(noise.resize((2048, 2048), Image.BILINEAR), dtype=np.uint16) * 16  # [2048, 2048] 12-bit
    return {"image": png.getvalue(), "dicom": dicom_bytes(big, header={"ViewPosition": "PA"})}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index_dir: Path, export: str, audit: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "radalign"), "retrieval", "serve", "--index-dir", str(index_dir),
           "--checkpoint", export, "--port", str(port), "--audit-log", str(audit)]
    log = audit.with_name("serve.log")
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/api/info", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the service did not answer within 600 s: {log.read_text()[-2000:]}")


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def run_load(url: str, kind: str, requests: int, clients: int, images: dict[str, bytes]) -> list[float]:
    """Latencies (ms) of `requests` queries of one kind, `clients` at a time."""
    import httpx

    def worker(w: int) -> list[float]:
        out = []
        with httpx.Client(base_url=url, timeout=120) as c:
            for i in range(w, requests, clients):
                t0 = time.perf_counter()
                if kind == "text":
                    r = c.post("/api/search/text", json={"text": TEXTS[i % len(TEXTS)] + f" {i}", "k": 10})
                else:
                    r = c.post("/api/search/image?k=10", content=images[kind])
                r.raise_for_status()
                r.json()
                out.append((time.perf_counter() - t0) * 1000)
        return out

    with ThreadPoolExecutor(clients) as pool:
        return [ms for part in pool.map(worker, range(clients)) for ms in part]


def measure(index_dir: Path, export: str, n: int, args, images) -> list[list]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(index_dir, export, Path(tmp) / "audit.jsonl")
        try:
            for clients in args.clients:
                for kind in ("text", "image", "dicom"):
                    rows.append(measure_one(proc, url, n, kind, clients, args.requests, images))
                    print("  ".join(map(str, rows[-1])), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    return rows


def measure_one(proc, url: str, n: int, kind: str, clients: int, requests: int, images) -> list:
    """One row: latency percentiles, throughput and the server's CPU-ms per query of one kind and load."""
    count = requests if kind != "dicom" else max(clients, requests // 4)
    run_load(url, kind, clients * 2, clients, images)  # warm-up
    cpu0 = cpu_seconds(proc.pid)
    t0 = time.perf_counter()
    ms = np.asarray(run_load(url, kind, count, clients, images))
    wall = time.perf_counter() - t0
    cpu = (cpu_seconds(proc.pid) - cpu0) / len(ms) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    target = target_ms(kind, n)
    verdict = "" if target is None else (f"< {target:.0f}: " + ("met" if p95 < target else "MISSED"))
    return [f"{n:,}", kind, clients, len(ms), f"{p50:.1f}", f"{p95:.1f}", f"{p99:.1f}", f"{len(ms) / wall:.1f}",
            f"{cpu:.1f}", verdict]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", default=str(REPO / "runs" / "demo" / "pretrain"), help="the towers (demo's)")
    p.add_argument("--sizes", default="10000,100000", help="index sizes (synthetic vectors)")
    p.add_argument("--requests", type=int, default=200, help="queries per kind and size")
    p.add_argument("--clients", default="1,4", help="queries in flight at most, one run per value")
    p.add_argument("--results", help="append the table to this Markdown file (e.g. bench/RESULTS.md)")
    args = p.parse_args()
    args.clients = [int(c) for c in str(args.clients).split(",")]
    if not Path(args.export).exists():
        raise SystemExit(f"--export {args.export}: not there; run `make demo` or pass an export folder")
    images = query_images()
    headers = ["cases", "query", "in flight", "n", "p50 ms", "p95 ms", "p99 ms", "queries/s", "server CPU-ms/query", "p95 target"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(float(s)) for s in args.sizes.split(",")):
            print(f"== {n:,} cases: building the index", flush=True)
            index_dir = synthetic_index(Path(tmp) / f"index{n}", args.export, n)
            rows += measure(index_dir, args.export, n, args, images)
    text = table(headers, rows)
    print(text)
    if args.results:
        append_results(Path(args.results), text, args)


def append_results(path: Path, text: str, args) -> None:
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True,
                  text=True).stdout.splitlines() if line.startswith("Model name")), "unknown CPU")
    load = os.getloadavg()[0]
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"\n\n## serve (`bench/serve.py`, issue 21)\n\n{dt.date.today().isoformat()}, lscpu model name "
                f"\"{model}\", {os.cpu_count()} cores, the demo's towers ({args.export}); "
                f"{'/'.join(map(str, args.clients))} clients on loopback, {args.requests} queries per kind and "
                f"load (image: a 160 px PNG; DICOM: a 2048 x 2048 12-bit film, a quarter as many). The machine was shared with "
                f"other engineers' jobs (1-min load average {load:.1f} on {os.cpu_count()} cores at the end): "
                f"wall latencies are inflated; the server's CPU-ms per query are the steadier figure.\n\n"
                f"```\n{text}\n```\n")


if __name__ == "__main__":
    main()

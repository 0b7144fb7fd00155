"""Evaluation inputs: shards (through `data.loader`) or a CSV with an image column; image embeddings once.

Every image is embedded once per checkpoint, in batches; the result (`Embedded`) carries the raw labels
(1/0/-1/NaN) and is reused by every prompt set and mode. Images that fail to load are skipped and counted
by reason. Embeddings can be cached on disk, keyed by the checkpoint's checksum and a data fingerprint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from radalign import RadalignError
from radalign.io import atomic_path, sha256_file
from radalign.log import get_logger

log = get_logger("zeroshot")
IMAGE_COLUMNS = ("Path", "path", "image", "image_path")
LABEL_VALUES = {1.0, 0.0, -1.0}


@dataclass
class Embedded:
    """Image embeddings of one input under one checkpoint, with the labels that came with the images."""

    keys: list[str]
    images: np.ndarray  # [N, D] float32, L2-normalised
    labels: pd.DataFrame  # index: key; raw label columns (1/0/-1/NaN) and optional class column
    skipped: dict[str, int] = field(default_factory=dict)
    source: str = ""


# ------------------------------------------------------------------------------------------------------
# Label policy.


def encode_labels(raw: pd.DataFrame, uncertain: str = "exclude", blank: str = "exclude") -> np.ndarray:
    """Raw 1/0/-1/blank -> float 1/0/NaN (NaN = excluded from that class's metric). [N, C]."""
    x = raw.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    out = x.copy()
    out[x == -1] = {"exclude": np.nan, "positive": 1.0, "negative": 0.0}[uncertain]
    out[np.isnan(x)] = {"exclude": np.nan, "negative": 0.0}[blank]
    return out


def label_counts(raw: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per class: how many 1, 0, -1 and blank values the data holds (reported beside the metrics)."""
    x = raw.apply(pd.to_numeric, errors="coerce")
    return {c: {"positive": int((x[c] == 1).sum()), "negative": int((x[c] == 0).sum()),
                "uncertain": int((x[c] == -1).sum()), "blank": int(x[c].isna().sum())} for c in raw.columns}


# ------------------------------------------------------------------------------------------------------
# Sources.


def is_shards(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / "manifest.json").is_file()


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def shard_fingerprint(root: str | os.PathLike, split: str) -> str:
    manifest = json.loads((Path(root) / "manifest.json").read_text())
    return _fingerprint("shards", manifest.get("splits", {}).get(split), split)


def _embed_batches(encoders, batches, total: int | None, desc: str):
    """Yield (keys, [B, D] embeddings, metas) for loader batches (dicts with image/key/meta)."""
    for batch in tqdm(batches, total=total, desc=desc, unit="batch", leave=False):
        if not batch["key"]:
            continue
        emb = encoders.encode_images(batch["image"]).float().cpu().numpy()  # [B, D]
        yield list(batch["key"]), emb, batch.get("meta")


def embed_shards(encoders, root: str | os.PathLike, split: str, *, batch_size: int = 64,
                 num_workers: int = 0) -> Embedded:
    """Embed every image of a shard split; labels come from each sample's json metadata.

    Corrupt samples are skipped by the loader and counted by reason (`loader.skipped`); they are reported.
    """
    from data.loader import make_eval_loader, shard_paths

    paths = shard_paths(root, split)
    loader = make_eval_loader(paths, batch_size=batch_size, transform=encoders.image_transform(),
                              num_workers=num_workers)
    keys, embs, rows = [], [], []
    total = getattr(loader, "num_batches", None)
    for k, e, metas in _embed_batches(encoders, loader, total, f"embed {split}"):
        keys += k
        embs.append(e)
        rows += [dict((m or {}).get("labels") or {}) for m in metas]
    skipped = {k: int(v) for k, v in dict(getattr(loader, "skipped", {})).items() if v}
    if not keys:
        raise RadalignError(f"--data {root} --split {split}: no image of the split could be read "
                            f"(skipped: {skipped or 'none'}); choose another split (see `radalign data info`)")
    labels = pd.DataFrame(rows, index=pd.Index(keys, name="key"))
    return Embedded(keys, np.concatenate(embs), labels, skipped, source=f"{root}:{split}")


class _CsvImages(torch.utils.data.Dataset):
    """Rows of a CSV -> (row index, image tensor or None, failure reason or None)."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        path = self.paths[i]
        if not path.is_file():
            return i, None, "missing_image"
        try:
            with Image.open(path) as im:
                return i, self.transform(im.convert("L")), None
        except (UnidentifiedImageError, OSError, ValueError):
            return i, None, "unreadable_image"


def _collate(items):
    ok = [(i, x) for i, x, r in items if x is not None]
    bad = [(i, r) for i, x, r in items if x is None]
    image = torch.stack([x for _, x in ok]) if ok else torch.zeros(0)
    return {"index": [i for i, _ in ok], "image": image, "failed": bad}


def find_image_column(df: pd.DataFrame, wanted: str | None, csv: str | os.PathLike) -> str:
    if wanted:
        if wanted not in df.columns:
            raise RadalignError(f"--image-column {wanted!r}: not a column of {csv}; columns: {list(df.columns)}")
        return wanted
    for c in IMAGE_COLUMNS:
        if c in df.columns:
            return c
    raise RadalignError(f"{csv}: no image column (looked for {', '.join(IMAGE_COLUMNS)}); "
                        f"name it with --image-column (columns: {list(df.columns)})")


def read_csv(csv: str | os.PathLike) -> pd.DataFrame:
    try:
        return pd.read_csv(csv)
    except FileNotFoundError:
        raise RadalignError(f"--data {csv}: no such file") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise RadalignError(f"--data {csv}: not a readable CSV ({e})") from None


def csv_fingerprint(csv: str | os.PathLike, image_root: str | None, image_column: str | None) -> str:
    return _fingerprint("csv", sha256_file(csv), str(Path(image_root).resolve()) if image_root else None,
                        image_column)


def embed_csv(encoders, csv: str | os.PathLike, *, image_root: str | None = None,
              image_column: str | None = None, batch_size: int = 64, num_workers: int = 0) -> Embedded:
    """Embed the images a CSV lists; every non-image column is kept as a (potential) label column."""
    df = read_csv(csv)
    col = find_image_column(df, image_column, csv)
    root = Path(image_root) if image_root else Path(csv).parent
    keys = df[col].astype(str).tolist()
    dups = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) < len(keys) else []
    if dups:
        raise RadalignError(f"{csv}: column {col!r} lists {len(dups)} image(s) more than once (e.g. {dups[0]}); "
                            "each image once, please")
    ds = _CsvImages([root / k for k in keys], encoders.image_transform())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_collate, shuffle=False)
    kept, embs, skipped = [], [], {"missing_image": 0, "unreadable_image": 0}
    for batch in tqdm(loader, desc=f"embed {Path(csv).name}", unit="batch", leave=False):
        for i, reason in batch["failed"]:
            skipped[reason] += 1
            log.warning("skipping %s (%s)", keys[i], reason.replace("_", " "))
        if batch["index"]:
            embs.append(encoders.encode_images(batch["image"]).float().cpu().numpy())  # [B, D]
            kept += batch["index"]
    if not kept:
        raise RadalignError(f"--data {csv}: none of its {len(keys)} images could be loaded "
                            f"({skipped}); check --image-root (now {root})")
    labels = df.drop(columns=[col]).iloc[kept].set_index(pd.Index([keys[i] for i in kept], name="key"))
    return Embedded([keys[i] for i in kept], np.concatenate(embs), labels, skipped, source=str(csv))


# ------------------------------------------------------------------------------------------------------
# Disk cache.


def cached_embed(encoders, fingerprint: str, cache_dir: str | os.PathLike | None, compute) -> Embedded:
    """`compute()` unless OUT/cache holds embeddings for this checkpoint checksum and data fingerprint."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"emb-{encoders.checksum[:16]}-{fingerprint[:16]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            labels = pd.read_json(io.StringIO(str(z["labels"])), orient="split", dtype=False,
                                  convert_dates=False)
            labels.index = pd.Index([str(k) for k in labels.index], name="key")
            return Embedded([str(k) for k in z["keys"]], z["images"], labels, meta["skipped"], meta["source"])
    emb = compute()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.array(emb.keys), images=emb.images,
                     labels=np.array(emb.labels.to_json(orient="split")),
                     meta=np.array(json.dumps({"skipped": emb.skipped, "source": emb.source})))
    return emb

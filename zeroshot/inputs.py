"""Evaluation inputs: shards (through `data.loader`) or a CSV with an image column; image embeddings once.

Every image is embedded once per checkpoint, in batches; the result (`Embedded`) carries the raw labels
(1/0/-1/NaN) and each image's patient (the bootstrap unit), and is reused by every prompt set and mode.
Shards go through the shared pass `data.embed.embed_split`; CSV images through `data.images` (one grayscale
conversion: a 12-bit PNG is rescaled, not clipped white). Images that fail to load are skipped and counted
by reason. Shard embeddings go through the export's embedding cache (`data.embed.EmbedCache`, shared with
retrieval and finetune); CSV embeddings can be cached in OUT/cache, keyed by the checkpoint's checksum and a
data fingerprint.
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
from radalign.data.prepare_csv import PATIENT_COLUMNS, read_image_rows
from radalign.data.prepare_csv import csv_patients as rows_patients
from tqdm import tqdm

from radalign import RadalignError
from radalign.io import atomic_path, sha256_file
from radalign.log import get_logger

log = get_logger("zeroshot")
LABEL_VALUES = {1.0, 0.0, -1.0}


@dataclass
class Embedded:
    """Image embeddings of one input under one checkpoint, with the labels that came with the images."""

    keys: list[str]
    images: np.ndarray  # [N, D] float32, L2-normalised
    labels: pd.DataFrame  # index: key; raw label columns (1/0/-1/NaN) and optional class column
    skipped: dict[str, int] = field(default_factory=dict)
    source: str = ""
    patients: list[str] | None = None  # [N] patient of each image (the bootstrap unit); None: unknown
    patient_source: str = ""  # where the patient ids came from (reported)


# ------------------------------------------------------------------------------------------------------
# Sources.


def is_shards(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / "manifest.json").is_file()


CACHE_VERSION = 2  # 2: patients stored beside the embeddings; lost samples counted against the manifest


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()


def embed_shards(encoders, root: str | os.PathLike, split: str, *, batch_size: int = 64,
                 num_workers: int = 0, cache: bool = True) -> Embedded:
    """Embed every image of a shard split (`data.embed.embed_split`); labels and the patient (`subject_id`)
    come from each sample's json metadata. Lost samples are counted by reason and reported. `cache`: through
    the export's embedding cache (`data.embed.EmbedCache`), shared with the other stages."""
    from radalign.data.embed import EmbedCache, embed_split

    try:
        emb = embed_split(encoders.encode_images, root, split, encoders.image_transform(), batch_size=batch_size,
                          num_workers=num_workers, progress=True,
                          cache=EmbedCache.for_encoders(encoders, enabled=cache))
    except RadalignError as e:
        raise RadalignError(f"--shards {root} --split {split}: {e}; choose another split "
                            "(see `radalign data info`)") from None
    rows = [dict((m or {}).get("labels") or {}) for m in emb.meta]
    labels = pd.DataFrame(rows, index=pd.Index(emb.keys, name="key"))
    subjects = [m.get("subject_id") for m in emb.meta]
    patients = None if any(s is None for s in subjects) else [str(s) for s in subjects]
    return Embedded(list(emb.keys), emb.image, labels, dict(emb.lost), source=f"{root}:{split}",
                    patients=patients, patient_source="shard subject_id" if patients else "")


class _CsvImages(torch.utils.data.Dataset):
    """Rows of a CSV -> (row index, image tensor or None, failure reason or None)."""

    def __init__(self, paths: list[Path], transform, max_pixels: int | None = None):
        from radalign.data.images import DEFAULT_MAX_PIXELS

        self.paths, self.transform = paths, transform
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from radalign.data.images import OversizedImageError, open_image, to_gray8

        path = self.paths[i]
        if not path.is_file():
            return i, None, "missing_image"
        try:  # the one grayscale conversion (16-bit rescaled, not clipped), then the model's transform
            return i, self.transform(to_gray8(open_image(path, max_pixels=self.max_pixels))), None
        except OversizedImageError:
            return i, None, "oversized_image"
        except Exception:  # untrusted file bytes: any decoder error means unreadable (counted, logged)
            return i, None, "unreadable_image"


def _collate(items):
    ok = [(i, x) for i, x, r in items if x is not None]
    bad = [(i, r) for i, x, r in items if x is None]
    image = torch.stack([x for _, x in ok]) if ok else torch.zeros(0)
    return {"index": [i for i, _ in ok], "image": image, "failed": bad}


def csv_fingerprint(csv: str | os.PathLike, image_root: str | None, image_column: str | None) -> str:
    return _fingerprint("csv", sha256_file(csv), str(Path(image_root).resolve()) if image_root else None,
                        image_column)


def embed_csv(encoders, csv: str | os.PathLike, *, image_root: str | None = None,
              image_column: str | None = None, batch_size: int = 64, num_workers: int = 0) -> Embedded:
    """Embed the images a CSV lists; every non-image column is kept as a (potential) label column.

    The CSV is read by prepare-csv's reader (`data.prepare_csv.read_image_rows`: the image column named or
    guessed, paths resolved against `image_root`); paths outside the root are read where they are, as given."""
    if not Path(csv).is_file():
        raise RadalignError(f"--data {csv}: no such file")
    rows = read_image_rows(csv, image_col=image_column, image_root=image_root, allow_outside_root=True,
                           what="CSV given to --data")
    df, col, keys = rows.frame, rows.image_col, rows.images
    dups = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) < len(keys) else []
    if dups:
        raise RadalignError(f"{csv}: column {col!r} lists {len(dups)} image(s) more than once (e.g. {dups[0]}); "
                            "each image once, please")
    ds = _CsvImages([Path(f) for f in rows.files], encoders.image_transform())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_collate, shuffle=False)
    kept, embs, skipped = [], [], {"missing_image": 0, "unreadable_image": 0, "oversized_image": 0}
    for batch in tqdm(loader, desc=f"embed {Path(csv).name}", unit="batch", leave=False):
        for i, reason in batch["failed"]:
            skipped[reason] += 1
            log.warning("skipping %s (%s)", keys[i], reason.replace("_", " "))
        if batch["index"]:
            embs.append(encoders.encode_images(batch["image"]).float().cpu().numpy())  # [B, D]
            kept += batch["index"]
    if not kept:
        raise RadalignError(f"--csv {csv}: none of its {len(keys)} images could be loaded "
                            f"({skipped}); check --image-root (now {rows.root})")
    labels = df.drop(columns=[col]).iloc[kept].set_index(pd.Index([keys[i] for i in kept], name="key"))
    labels = labels.replace(r"^\s*$", np.nan, regex=True)  # text cells: a blank is a missing value
    patients, how = csv_patients(df.iloc[kept], col)
    return Embedded([keys[i] for i in kept], np.concatenate(embs), labels, skipped, source=str(csv),
                    patients=patients, patient_source=how)


def csv_patients(df: pd.DataFrame, image_column: str) -> tuple[list[str] | None, str]:
    """Each row's patient (`data.prepare_csv.csv_patients`: a patient column, else `patientNNN` in the image
    path); None when neither is there (each image is then its own bootstrap unit, and reports say so)."""
    patients, how = rows_patients(df, image_column)
    if patients is not None:
        return patients, how
    log.warning("no patient column (%s) and no patientNNN in the image paths: intervals resample images, "
                "which is too narrow when patients have several images", ", ".join(PATIENT_COLUMNS))
    return None, ""


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
            return Embedded([str(k) for k in z["keys"]], z["images"], labels, meta["skipped"], meta["source"],
                            meta.get("patients"), meta.get("patient_source", ""))
    emb = compute()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.array(emb.keys), images=emb.images,
                     labels=np.array(emb.labels.to_json(orient="split")),
                     meta=np.array(json.dumps({"skipped": emb.skipped, "source": emb.source,
                                               "patients": emb.patients, "patient_source": emb.patient_source})))
    return emb

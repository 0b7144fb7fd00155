"""`radalign retrieval build`: stream a shard split through the encoders and write an index folder.

    shards (data.embed.embed_split: decode, transform and thumbnails in the loader workers; read from the
            export's embedding cache when another stage embedded the split already)
      -> image embeddings [N, D] (+ report embeddings with modality "both")
      -> L2-normalise -> plan (index.plan_index) -> build + tune -> store.write_index_dir

Every sample the manifest lists is either indexed or counted lost, by reason (a bad shard counts its lost
samples, not 1); the counts go into the manifest (`data.lost`, `data.expected`) and the printout. The output
folder is locked for the whole build (`radalign.lock.output_lock`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from radalign.data.embed import EmbedCache, EmbeddedSplit, context_report, embed_split
from radalign.data.labels import CHEXPERT_LABELS
from radalign.data.sections import SECTION_KEYS
from radalign.retrieval import index as ix
from radalign.retrieval.store import check_out_dir, metadata_table, now_iso, write_index_dir
from tqdm import tqdm

from radalign import RadalignError
from radalign.lock import output_lock
from radalign.log import get_logger

log = get_logger("radalign.retrieval.build")
MODALITY_CHOICES = ("image", "both")


@dataclass
class EmbeddedCases(EmbeddedSplit):
    """One pass over a shard split (`data.embed.EmbeddedSplit`) plus what retrieval adds to it."""

    text: np.ndarray | None = None  # [N, D] report embeddings (modality "both")
    texts_cut: dict | None = None  # reports longer than the text context (data.embed.context_report)


def embed_shards(encoders, data: str | os.PathLike, split: str, *, batch_size: int = 64, num_workers: int = 0,
                 thumbnail_size: int = 96, with_text: bool = False, progress: bool = True,
                 desc: str = "embed", cache: bool = True) -> EmbeddedCases:
    """One pass over `data/<split>` shards (`data.embed.embed_split`): image embeddings, raw texts, metadata,
    thumbnails (made in the loader workers) and, with `with_text`, report embeddings. `cache`: through the
    export's embedding cache (`data.embed.EmbedCache`: a split another stage embedded is read, not embedded)."""
    emb = embed_split(encoders.encode_images, data, split, encoders.image_transform(), batch_size=batch_size,
                      num_workers=num_workers, thumbnail_size=thumbnail_size or None, progress=progress,
                      cache=EmbedCache.for_encoders(encoders, enabled=cache))
    cases = EmbeddedCases(**{f.name: getattr(emb, f.name) for f in fields(EmbeddedSplit)})
    if with_text:
        cases.text = embed_texts(encoders, emb.texts, progress=progress)
        cases.texts_cut = context_report(encoders.tokenize, list(dict.fromkeys(emb.texts)), what="reports")
    return cases


def embed_texts(encoders, texts: list[str], *, batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """Report embeddings [N, D]; each distinct text is encoded once (studies repeat one report per image)."""
    unique = list(dict.fromkeys(texts))
    where = {t: i for i, t in enumerate(unique)}
    out = []
    for i in tqdm(range(0, len(unique), batch_size), desc="embed reports", unit="batch", disable=not progress):
        out.append(encoders.encode_texts(unique[i:i + batch_size], batch_size=batch_size).cpu().numpy())
    emb = ix.normalize(np.concatenate(out))  # [U, D]
    return emb[[where[t] for t in texts]]  # [N, D]


def _str(v) -> str | None:
    return None if v is None else str(v)


def metadata_columns(cases: EmbeddedCases) -> dict[str, list]:
    """Metadata columns from the shards' JSON members (docs/architecture.md §1)."""
    cols: dict[str, list] = {c: [] for c in ("key", "dicom_id", "study_id", "subject_id", "split", "view",
                                             "study_datetime", "text", "outcomes")}
    for s in SECTION_KEYS:
        cols[f"section_{s}"] = []
    for name in CHEXPERT_LABELS:
        cols[f"label:{name}"] = []
    for key, text, meta in zip(cases.keys, cases.texts, cases.meta):
        cols["key"].append(key)
        for c in ("dicom_id", "study_id", "subject_id", "split", "view", "study_datetime"):
            cols[c].append(_str(meta.get(c)))
        cols["text"].append(text)
        sections = meta.get("sections") or {}
        for s in SECTION_KEYS:
            cols[f"section_{s}"].append(_str(sections.get(s)))
        labels = meta.get("labels") or {}
        for name in CHEXPERT_LABELS:
            v = labels.get(name)
            cols[f"label:{name}"].append(float("nan") if v is None else float(v))
        # Outcomes are optional in the shard contract: kept when the data carries them, else null.
        outcomes = meta.get("outcomes", meta.get("outcome"))
        cols["outcomes"].append(None if outcomes is None else json.dumps(outcomes, default=str))
    if cases.thumbnails is not None:
        cols["thumbnail"] = cases.thumbnails
    return cols


def encoder_info(encoders, checkpoint: str | os.PathLike | None) -> dict:
    folder = getattr(encoders, "folder", None)
    return {"checksum": encoders.checksum, "embed_dim": int(encoders.embed_dim),
            "checkpoint": str(Path(folder or checkpoint).resolve()) if (folder or checkpoint) else None,
            "config": {k: v for k, v in dict(encoders.config).items() if k != "checksum"}}


def build_index_dir(out: str | os.PathLike, *, encoders, data: str | os.PathLike, split: str = "train",
                    checkpoint: str | os.PathLike | None = None, modality: str = "image", index: str = "auto",
                    memory_budget: str | int | None = None, flat_max: int = ix.DEFAULT_FLAT_MAX,
                    recall_target: float = 0.95, batch_size: int = 64, num_workers: int = 0,
                    thumbnail_size: int = 96, seed: int = 0, progress: bool = True) -> dict:
    """Embed `data/<split>`, build + tune FAISS indexes, write `out` atomically; returns the manifest."""
    if modality not in MODALITY_CHOICES:
        raise RadalignError(f"--modality {modality!r}: choose one of {', '.join(MODALITY_CHOICES)}")
    if not 0 < recall_target <= 1:
        raise RadalignError(f"--recall-target {recall_target}: must be in (0, 1]")
    check_out_dir(out)  # before the (long) embedding pass
    with output_lock(out, what="--out"):
        return _build_locked(out, encoders=encoders, data=data, split=split, checkpoint=checkpoint,
                             modality=modality, index=index, memory_budget=memory_budget, flat_max=flat_max,
                             recall_target=recall_target, batch_size=batch_size, num_workers=num_workers,
                             thumbnail_size=thumbnail_size, seed=seed, progress=progress)


def _build_locked(out, *, encoders, data, split, checkpoint, modality, index, memory_budget, flat_max,
                  recall_target, batch_size, num_workers, thumbnail_size, seed, progress) -> dict:
    t0 = time.perf_counter()
    budget = ix.parse_memory(memory_budget)
    cases = embed_shards(encoders, data, split, batch_size=batch_size, num_workers=num_workers,
                         thumbnail_size=thumbnail_size, with_text=modality == "both", progress=progress)
    vectors = {"image": cases.image}
    if cases.text is not None:
        vectors["text"] = cases.text
    indexes, info = {}, {}
    for name, x in vectors.items():
        indexes[name], info[name] = build_tuned(x, kind=index, memory_budget=budget, flat_max=flat_max,
                                                recall_target=recall_target, seed=seed)
    manifest = {
        "created": now_iso(),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "encoder": encoder_info(encoders, checkpoint),
        "dim": int(cases.image.shape[1]),
        "normalisation": "l2",
        "metric": "inner_product",
        "modalities": list(vectors),
        "indexes": info,
        "data": {"root": str(Path(data).resolve()), "split": split, "expected": cases.expected,
                 "lost": cases.lost, "skipped": cases.lost,  # "skipped": the old name of "lost"
                 "texts_cut": cases.texts_cut,
                 "studies": len({m.get("study_id") for m in cases.meta}),
                 "subjects": len({m.get("subject_id") for m in cases.meta})},
        "thumbnail_size": thumbnail_size if cases.thumbnails is not None else 0,
        "faiss_version": ix.faiss_module().__version__,
    }
    write_index_dir(out, indexes=indexes, vectors=vectors, metadata=metadata_table(metadata_columns(cases)),
                    manifest=manifest)
    return {**manifest, "count": len(cases.keys)}


def build_tuned(x: np.ndarray, *, kind: str = "auto", memory_budget: int | None = None,
                flat_max: int = ix.DEFAULT_FLAT_MAX, recall_target: float = 0.95, seed: int = 0):
    """(FAISS index, manifest entry) for L2-normalised `x` [N, D]: plan, build, tune."""
    t0 = time.perf_counter()
    plan = ix.plan_index(len(x), x.shape[1], kind, memory_budget, flat_max)
    log.info("building %s for %d vectors (%s)", plan.factory, len(x), plan.reason)
    index = ix.build_index(x, plan, seed=seed)
    built = time.perf_counter() - t0
    tuned = ix.tune(index, x, plan, target=recall_target, seed=seed)
    return index, {"kind": plan.kind, "index_string": plan.factory, "reason": plan.reason,
                   "params": tuned.params, "estimated_ram_bytes": plan.ram_bytes, "train_size": plan.train_size,
                   "build_seconds": round(built, 2), "tuning": tuned.to_dict()}


__all__ = ["EmbeddedCases", "embed_shards", "embed_texts", "build_index_dir", "build_tuned", "metadata_columns",
           "encoder_info", "MODALITY_CHOICES"]

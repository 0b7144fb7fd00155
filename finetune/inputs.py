"""What the finetune recipe reads: the linked table, cached tower embeddings, labels and presence per split.

    table = load_table("runs/demo/ehr/finetune")          # FinetuneTable: {split: DataFrame}, the link manifest
    cache = EmbeddingCache(encoders, shards, folder)       # image embedding per dicom_id, text per indication
    data = task_inputs(cfg, table, cache, featurizer)      # {split: SplitInputs} (tensors, labels, presence)

Image token of a study: the mean of its frontal films' image embeddings (L2-normalised again); a study whose
films were all lost on read has no image (absent, counted). With data.image_patch_tokens also its patch tokens
(`SplitInputs.patches`, [N, P, W]): the frozen ViT's last-layer tokens (after ln_post, class token left out),
each L2-normalised, averaged position by position over the study's films and normalised again; cached in the
export's embedding cache as its own entry (output "patch_tokens"; float32, P x W x 4 bytes per film). Text token: the text tower on the order's
indication (written before the film: no leak); no indication = text absent. EHR: finetune.features.

Embeddings are cached on disk as safetensors + JSON keyed by the export's checksum, so a second run (another
task, the few-shot sweep, `finetune eval`) never re-embeds. Nothing here imports accelerate.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from radalign.data.ehr_table import (
    CATEGORICAL_DEMOGRAPHICS,
    NUMERIC_DEMOGRAPHICS,
    FinetuneTable,
    load_table,  # noqa: F401  (re-exported: the recipe reads the table here)
)
from radalign.data.shards import manifest_sha256, split_names, split_subjects
from radalign.finetune.features import EHRFeatures, EHRFeaturizer, label_matrix, text_present, threshold_label
from radalign.finetune.tasks import check_class_index

from radalign import RadalignError
from radalign.io import atomic_path
from radalign.log import get_logger

log = get_logger("radalign.finetune.inputs")


# ----------------------------------------------------------------------------------------------------------
# Embedding cache


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


class EmbeddingCache:
    """Image embeddings per dicom_id (one pass per shard split, through the export's embedding cache
    `data.embed.EmbedCache`, shared with zeroshot and retrieval), with `patch_tokens` also the image tower's
    last-layer patch tokens per dicom_id (a second entry of that cache, output "patch_tokens"), and text
    embeddings per distinct text (cached in `folder`, the run's cache/ by default)."""

    def __init__(self, encoders, shards: str | os.PathLike, folder: str | os.PathLike, *, batch_size: int = 64,
                 num_workers: int = 0, progress: bool = True, patch_tokens: bool = False):
        self.enc, self.shards, self.folder = encoders, Path(shards), Path(folder)
        self.batch_size, self.num_workers, self.progress = batch_size, num_workers, progress
        self.patch_tokens = patch_tokens
        self.lost: dict[str, dict[str, int]] = {}  # shard split -> {reason: samples}
        self._images: dict[str, dict[str, np.ndarray]] = {}
        self._patches: dict[str, dict[str, np.ndarray]] = {}

    def _file(self, kind: str, name: str) -> Path:
        return self.folder / f"{kind}-{self.enc.checksum[:12]}-{name}"

    def _pass(self, split: str, encode, output: str):
        from radalign.data.embed import EmbedCache, embed_split

        emb = embed_split(encode, self.shards, split, self.enc.image_transform(), batch_size=self.batch_size,
                          num_workers=self.num_workers, progress=self.progress,
                          cache=EmbedCache.for_encoders(self.enc, output=output))
        log.info("image %s, %s split: %s", output, split, emb.summary())
        self.lost[split] = dict(emb.lost)
        return dict(zip(emb.keys, emb.image))

    def images(self, split: str) -> dict[str, np.ndarray]:
        """{dicom_id: [D] float32} for every sample of shards/<split> (embedded once per export and split)."""
        if split not in self._images:
            self._images[split] = self._pass(split, self.enc.encode_images, "pooled")
        return self._images[split]

    def patches(self, split: str) -> dict[str, np.ndarray]:
        """{dicom_id: [P, W] float32}: the tower's last-layer patch tokens, each L2-normalised (cached)."""
        if split not in self._patches:
            self._patches[split] = self._pass(split, lambda x: encode_patch_tokens(self.enc, x), "patch_tokens")
        return self._patches[split]

    def texts(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """([N, D] float32 embeddings, zeros where absent; [N] bool present) for the given texts."""
        present = text_present(texts)
        unique = sorted({t for t, p in zip(texts, present) if p})
        f = self._file("text", _key(*unique) + ".safetensors")
        from safetensors.numpy import load_file, save_file

        table = None
        if f.is_file():
            try:
                table = load_file(str(f))["text"]
                if table.shape != (len(unique), self.enc.embed_dim):
                    raise ValueError(f"shape {table.shape}, expected {(len(unique), self.enc.embed_dim)}")
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file: embed again
                log.warning("%s: damaged text embedding cache (%s: %s); embedding again", f, type(e).__name__, e)
                table = None
        if table is None:
            table = self.enc.encode_texts(unique).numpy().astype(np.float32) if unique else \
                np.zeros((0, self.enc.embed_dim), np.float32)
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(f) as tmp:
                save_file({"text": np.ascontiguousarray(table)}, str(tmp))
        index = {t: i for i, t in enumerate(unique)}
        out = np.zeros((len(texts), self.enc.embed_dim), np.float32)
        for i, (t, p) in enumerate(zip(texts, present)):
            if p:
                out[i] = table[index[t]]
        return out, present


def check_patch_tower(visual) -> None:
    """Refuse an image tower without patch tokens to give (data.image_patch_tokens): not an open_clip ViT, or one
    whose attention pooling replaces them. Frozen (encode_patch_tokens) and tuned (finetune.tower) alike."""
    if not hasattr(visual, "forward_intermediates") or getattr(visual, "attn_pool", None) is not None:
        raise RadalignError(f"data.image_patch_tokens: the export's image tower ({type(visual).__name__}) is not an "
                            "open_clip VisionTransformer without attention pooling, so it has no patch tokens to "
                            "give; use data.image_patch_tokens=false")


def pooled_and_patches(visual, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, H, W] -> (pooled [B, D], patch tokens [B, P, W]): one forward of an open_clip ViT, the pair its
    `forward` returns with `output_tokens` set (the last layer's tokens after `ln_post`, unless the tower norms after
    pooling, before the projection, which only the pooled token goes through; the class token left out). Through
    the public `forward_intermediates`, so the shared module's `output_tokens` flag is never toggled: a threaded
    server may run the same tower for another request meanwhile."""
    out = visual.forward_intermediates(pixels, indices=1, output_fmt="NLC",
                                       normalize_intermediates=not getattr(visual, "final_ln_after_pool", False))
    return out["image_features"], out["image_intermediates"][-1]


@torch.no_grad()
def encode_patch_tokens(encoders, images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, P, W]: the frozen image tower's last-layer patch tokens (pooled_and_patches)."""
    visual = encoders.model.visual
    check_patch_tower(visual)
    return pooled_and_patches(visual, images.to(encoders.device))[1].float()


def _unit(v: np.ndarray) -> np.ndarray:
    """L2-normalise the last axis (zero vectors stay zero)."""
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def study_images(dicom_ids: Sequence, lookup: Mapping[str, np.ndarray],
                 shape: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """([N, *shape] mean frontal embedding per study, normalised again along its last axis; [N] bool present;
    films missing from the shards). shape: D (pooled embeddings) or (P, W) (patch tokens: averaged position by
    position over the study's films, each token normalised again)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    out = np.zeros((len(dicom_ids), *shape), np.float32)
    present = np.zeros(len(dicom_ids), bool)
    missing = 0
    for i, ids in enumerate(dicom_ids):
        vecs = [lookup[str(d)] for d in (list(ids) if ids is not None else []) if str(d) in lookup]
        missing += len(list(ids) if ids is not None else []) - len(vecs)
        if vecs:
            out[i] = _unit(np.mean(vecs, axis=0))
            present[i] = True
    return out, present, missing


# ----------------------------------------------------------------------------------------------------------
# Per-split model inputs


@dataclass
class SplitInputs:
    """One split's rows, ready for the models (numpy; `batch()` gives the tensors)."""

    name: str
    frame: pd.DataFrame  # the table rows (subject_id, study_id, demographics, labs ...)
    y: np.ndarray  # [N, C] float, NaN = unlabelled
    image: np.ndarray | None  # [N, D]
    text: np.ndarray | None  # [N, D]
    ehr: EHRFeatures | None
    present: dict[str, np.ndarray]  # modality -> [N] bool
    counts: dict = field(default_factory=dict)
    patches: np.ndarray | None = None  # [N, P, W] the image tower's patch tokens (data.image_patch_tokens)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def subjects(self) -> np.ndarray:
        return self.frame["subject_id"].to_numpy()

    @property
    def studies(self) -> np.ndarray:
        return self.frame["study_id"].to_numpy()

    def batch(self, rows=None, modalities: Sequence[str] | None = None) -> dict:
        """The model input dict for `rows` (all when None), restricted to `modalities`."""
        from radalign.finetune.models import PATCH_KEY, ehr_tensors

        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        mods = list(modalities or self.present)
        out: dict = {"present": {m: torch.as_tensor(self.present[m][rows]) for m in mods if m in self.present}}
        if "image" in mods and self.image is not None:
            out["image"] = torch.as_tensor(self.image[rows])
        if "image" in mods and self.patches is not None:
            out[PATCH_KEY] = torch.as_tensor(self.patches[rows])  # [B, P, W]
        if "text" in mods and self.text is not None:
            out["text"] = torch.as_tensor(self.text[rows])
        if "ehr" in mods and self.ehr is not None:
            out["ehr"] = ehr_tensors(self.ehr.take(rows))
        return out

    def labels(self, rows=None) -> torch.Tensor:
        return torch.as_tensor(self.y if rows is None else self.y[np.asarray(rows)], dtype=torch.float32)


def task_labels(frame: pd.DataFrame, task) -> np.ndarray:
    """[N, C] labels of the task (TaskConfig): the label columns, or `threshold_column > threshold`."""
    if task.threshold_column:
        return threshold_label(frame, task.threshold_column, task.threshold)[:, None]
    y = label_matrix(frame, task.labels, task.kind, task.uncertain, task.blank)
    if task.kind == "multiclass":
        check_class_index(y, len(task.classes), task.labels[0], task.classes)
    return y


def model_columns(modalities: Sequence[str], features: Sequence[str] | None) -> dict[str, str]:
    """{column: what needs it} for a model over `modalities` with EHR lab `features`."""
    need = {"subject_id": "the patient id", "study_id": "the study id"}
    if "image" in modalities:
        need["dicom_ids"] = "the image modality: the study's films"
    if "text" in modalities:
        need["indication"] = "the text modality: the order's indication"
    if "ehr" in modalities:
        for f in features or ():
            need[f] = need[f"{f}_hours"] = f"the EHR lab/vital {f!r}"
        for c in (*NUMERIC_DEMOGRAPHICS, *CATEGORICAL_DEMOGRAPHICS):
            need[c] = "the EHR demographics"
    return need


def missing_columns(columns: Sequence[str], need: Mapping[str, str]) -> list[str]:
    """"'col' (what needs it)" for every needed column not in `columns`."""
    have = set(columns)
    return [f"{c!r} ({why})" for c, why in need.items() if c not in have]


def class_counts(y: np.ndarray) -> list[dict[int, int]]:
    """Per label column of `y` [N, C] (NaN = unlabelled): {class: labelled rows}, classes 0 and 1 always
    listed (a binary label), any other class value as found."""
    out = []
    for col in np.asarray(y, np.float64).T:
        lab = col[~np.isnan(col)]
        counts = {0: 0, 1: 0} | {int(c): 0 for c in np.unique(lab)}
        for c in counts:
            counts[c] = int((lab == c).sum())
        out.append(counts)
    return out


def split_inputs(name: str, frame: pd.DataFrame, task, modalities: Sequence[str], *, cache: EmbeddingCache | None,
                 featurizer: EHRFeaturizer | None) -> SplitInputs:
    frame = frame.reset_index(drop=True)
    y = task_labels(frame, task)
    counts: dict = {"rows": len(frame), "labelled": int((~np.isnan(y)).any(axis=1).sum())}
    image = text = ehr = patches = None
    present: dict[str, np.ndarray] = {}
    if "image" in modalities:
        image, present["image"], counts["films_not_embedded"] = study_images(
            frame["dicom_ids"].tolist(), _lookup(cache, cache.images), cache.enc.embed_dim)
        if cache.patch_tokens:
            patches = _study_patches(frame, cache, present["image"])
    if "text" in modalities:
        text, present["text"] = cache.texts(frame["indication"].tolist())
    if "ehr" in modalities:
        ehr = featurizer.transform(frame)
        present["ehr"] = ehr.present
        counts["ehr_cells_missing"] = {k: v for k, v in ehr.counts.items() if v}
    counts["present"] = {m: int(p.sum()) for m, p in present.items()}
    return SplitInputs(name, frame, y, image, text, ehr, present, counts, patches)


def _lookup(cache: EmbeddingCache, per_split) -> dict[str, np.ndarray]:
    """{dicom_id: what `per_split(shard split)` gives} over every shard split."""
    lookup: dict[str, np.ndarray] = {}
    for shard_split in _shard_splits(cache):
        lookup.update(per_split(shard_split))
    return lookup


def _study_patches(frame: pd.DataFrame, cache: EmbeddingCache, present: np.ndarray) -> np.ndarray:
    """[N, P, W] patch tokens per study (the pooled pass and this one read the same films)."""
    lookup = _lookup(cache, cache.patches)
    shape = next(iter(lookup.values())).shape if lookup else (0, 0)
    patches, has, _ = study_images(frame["dicom_ids"].tolist(), lookup, shape)
    if not np.array_equal(has, present):  # a film read in one pass and lost in the other (a shard changed)
        raise RadalignError(f"{cache.shards}: {int((has != present).sum())} studies have an image embedding but "
                            "no patch tokens or the reverse; the shards changed between the two passes. Run again "
                            "(both passes are redone from the current shards)")
    return patches


def _shard_splits(cache: EmbeddingCache) -> list[str]:
    """Splits of the shards folder (its manifest), so a study's films are found whatever split holds them."""
    names = split_names(cache.shards) if (cache.shards / "manifest.json").is_file() else []
    return names or [p.name for p in sorted(cache.shards.iterdir()) if p.is_dir()]


# ----------------------------------------------------------------------------------------------------------
# Overlap with the pretraining run's training patients


def pretraining_subjects(export_config: Mapping, table: FinetuneTable) -> tuple[set[str] | None, str]:
    """The subjects the export was trained on, and how that was found (None: unknown)."""
    data = export_config.get("data") or {}
    sha, shards, split = data.get("manifest_sha256"), data.get("shards"), data.get("train_split", "train")
    if not sha:
        return None, "the export does not record its training shards (exported by an older radalign)"
    linked = (table.manifest.get("options") or {}).get("shards")
    if linked and manifest_sha256(linked) == sha:
        train = table.splits.get(split)
        subjects = set(train["subject_id"].astype(str)) if train is not None else set()
        return subjects, f"the table was linked from the pretraining shards ({linked}); its {split!r} split"
    if shards and manifest_sha256(shards) == sha:
        try:
            return split_subjects(shards, split), f"the pretraining shards {shards}/{split}"
        except RadalignError as e:  # a damaged shard: the overlap is unknown, not "none"
            log.warning("listing the pretraining subjects: %s", e)
            return None, f"the pretraining shards {shards}/{split} are not readable ({e})"
    return None, (f"the pretraining shards ({shards}, manifest sha256 {sha[:12]}) are neither the table's "
                  "shards nor readable")


def check_overlap(export_config: Mapping, table: FinetuneTable, splits: Sequence[str], *, allow: bool) -> dict:
    """Refuse evaluation patients that were in the pretraining run's training split, unless `allow`."""
    subjects, how = pretraining_subjects(export_config, table)
    report: dict = {"checked": subjects is not None, "source": how}
    if subjects is None:
        if not allow:
            raise RadalignError(f"cannot check that the evaluation patients were unseen in pretraining: {how}. "
                                "Re-export the pretraining run with this radalign, or pass "
                                "data.allow_overlap=true (the report will say so)")
        report["allowed"] = True
        return report
    for s in splits:
        ids = set(table.split(s)["subject_id"].astype(str))
        report[s] = len(ids & subjects)
    bad = {s: report[s] for s in splits if report[s]}
    if bad and not allow:
        raise RadalignError("evaluation patients were in the pretraining run's training split ("
                            + ", ".join(f"{s}: {n} patients" for s, n in bad.items())
                            + f"; from {how}). Their films trained the towers, so these scores would be "
                            "optimistic. Use a table split like the pretraining shards, or pass "
                            "data.allow_overlap=true")
    report["allowed"] = bool(bad)
    return report

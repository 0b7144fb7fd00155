"""Films for a run whose image tower trains (`model.image_tower=last_blocks|lora`): decoded once, kept in memory.

    store = FilmStore.load(shards, export_config, wanted=dicom_ids)    # {dicom_id: [1, S, S] uint8}
    data = film_inputs("train", frame, cfg.task, ["image", "ehr"], cache=cache, featurizer=fz, store=store)
    data.batch(rows, mods)  # + "pixels" [F, C, S, S] float, "film_owner" [F] (the row of each film)

A tuned tower has no embedding cache (the cache is keyed by the frozen export, and the tower changes every
step): each batch's films go through it. The shards are read once per run with the export's eval transform cut
in two: resize and crop to 8-bit grayscale at load (S x S bytes per film in memory), scaling and per-channel
normalisation per batch, so a batch's pixels are exactly what `Encoders.image_transform()` gives. Text and EHR
inputs come from finetune.inputs as in a frozen run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from radalign.finetune.inputs import SplitInputs, split_inputs

from radalign import RadalignError
from radalign.log import get_logger

log = get_logger("radalign.finetune.films")


def split_transform(export_config: Mapping):
    """(load, per_batch): the export's eval transform as PIL -> [1, S, S] uint8, and that -> [C, S, S] float."""
    from radalign.data.transforms import NormalizeChannels, eval_transform
    from torchvision.transforms import v2

    tf = eval_transform(int(export_config["image_size"]), channels=3, mean=export_config["mean"],
                        std=export_config["std"])
    *load, scale, norm = tf.transforms
    if not (isinstance(scale, v2.ToDtype) and isinstance(norm, NormalizeChannels)):
        raise RadalignError("data.transforms.eval_transform changed its last steps; finetune.films cuts it after "
                            "PILToTensor (update split_transform)")
    return v2.Compose(load), v2.Compose([scale, norm])


@dataclass
class FilmStore:
    films: dict[str, torch.Tensor]  # dicom_id -> [1, S, S] uint8
    per_batch: Any  # [F, 1, S, S] uint8 -> [F, C, S, S] float
    lost: dict = field(default_factory=dict)  # shard split -> {reason: samples}

    @classmethod
    def load(cls, shards: str | Path, export_config: Mapping, wanted: set[str], *, num_workers: int = 0,
             progress: bool = False) -> FilmStore:
        """Every wanted film of every shard split, decoded once; the films of other studies are read past in the
        tars, never decoded (make_eval_loader's `keys`)."""
        from radalign.data.loader import make_eval_loader, shard_paths
        from radalign.data.shards import split_names

        load, per_batch = split_transform(export_config)
        films: dict[str, torch.Tensor] = {}
        lost = {}
        for split in split_names(shards):
            loader = make_eval_loader(shard_paths(shards, split), batch_size=256, transform=load,
                                      num_workers=num_workers, rank=0, world_size=1, keys=wanted)
            for b in _progress(loader, f"films {split}", progress):
                for key, img in zip(b["key"], b["image"]):
                    films[key] = img.clone()  # [1, S, S] uint8
            lost[split] = {k: v for k, v in dict(loader.lost).items() if v}
        log.info("films decoded: %d of %d wanted", len(films), len(wanted))
        return cls(films, per_batch, lost)

    def __contains__(self, key: str) -> bool:
        return key in self.films

    def pixels(self, keys: Sequence[str]) -> torch.Tensor:
        """[F, C, S, S] float: the films as the export's eval transform gives them."""
        if not keys:
            return torch.zeros(0)
        return self.per_batch(torch.stack([self.films[k] for k in keys]))


def _progress(it, desc: str, on: bool):
    if not on:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="batch")


@dataclass
class FilmInputs(SplitInputs):
    """A split's inputs whose image modality is films (through the trained tower), not cached embeddings; once a
    tuned model's tower has run over them (`with_tokens`, finetune.tower.study_tokens), `image` holds its study
    tokens [N, D] (and `patches` its patch tokens [N, P, W] with data.image_patch_tokens) and `batch()` gives
    those, as a frozen run's cached inputs (the films stay for another tower)."""

    films: list = field(default_factory=list)  # [N] lists of the dicom_ids found in the store
    store: FilmStore | None = None
    tokens_of: Any = None  # the tower whose study tokens `image` holds (None: `image` is not computed)

    def batch(self, rows=None, modalities: Sequence[str] | None = None) -> dict:
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        mods = list(modalities or self.present)
        if self.tokens_of is not None:
            return super().batch(rows, mods)
        out = super().batch(rows, [m for m in mods if m != "image"])
        if "image" in mods:
            out.update(self.film_batch(rows))
            out["present"]["image"] = torch.as_tensor(self.present["image"][rows])
        return out

    def film_batch(self, rows) -> dict:
        """{"pixels": [F, C, S, S], "film_owner": [F]} of the films of `rows` (the position in `rows` of each)."""
        keys, owner = [], []
        for i, r in enumerate(rows):
            keys += self.films[r]
            owner += [i] * len(self.films[r])
        return {"pixels": self.store.pixels(keys), "film_owner": torch.as_tensor(owner, dtype=torch.long)}

    def with_tokens(self, tokens: np.ndarray, tower, patches: np.ndarray | None = None) -> FilmInputs:
        """This split with `image` = `tokens` [N, D], the study tokens of `tower` (and `patches` [N, P, W], its
        patch tokens per study, for a head that reads them)."""
        return replace(self, image=tokens, patches=patches, tokens_of=tower)


def wanted_films(frames: Sequence) -> set[str]:
    """Every dicom_id the frames' studies list."""
    return {str(d) for f in frames for ids in f["dicom_ids"] if ids is not None for d in ids}


def film_inputs(name: str, frame, task, modalities: Sequence[str], *, cache, featurizer,
                store: FilmStore) -> FilmInputs:
    """split_inputs for a tuned tower: text and EHR as usual, the image modality as each study's films."""
    base = split_inputs(name, frame, task, [m for m in modalities if m != "image"], cache=cache,
                        featurizer=featurizer)
    films, present = [], base.present
    if "image" in modalities:
        listed = [[str(d) for d in ids] if ids is not None else [] for ids in base.frame["dicom_ids"]]
        films = [[d for d in ids if d in store] for ids in listed]
        present = {"image": np.array([bool(f) for f in films]), **base.present}
        base.counts["films_not_decoded"] = sum(len(a) - len(b) for a, b in zip(listed, films))
        base.counts["present"] = {m: int(p.sum()) for m, p in present.items()}
    return FilmInputs(base.name, base.frame, base.y, None, base.text, base.ehr, present, base.counts,
                      films=films, store=store)


def load_films(shards, export_config: Mapping, frames: Sequence, **kw) -> FilmStore:
    return FilmStore.load(shards, export_config, wanted_films(frames), **kw)

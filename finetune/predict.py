"""A finished finetune run, loaded for inference (`finetune predict`, `finetune eval`, `finetune explain`).

    trained = load_run("runs/demo/finetune/in_hospital_mortality")
    data = trained.inputs("test")                         # SplitInputs of a table split (cached embeddings)
    frame = trained.predictions(data)                    # subject_id, study_id, label, score:<m>, logit:<m>
                                                         # (multilabel / multiclass: label:<c>, score:<m>:<c>, ...)

Every saved model of RUN/models is loaded through finetune.registry (torch models, the gradient-boosted trees and
the late-fusion stacker alike) and scored. Only safetensors and JSON are read from the run folder. The EHR feature list of the data must be the one the
run was trained with (refused otherwise, naming the difference); the towers must be the export the run used
(its checksum is in every cached embedding's name and checked here). A tuned image tower's export is found by
the run's current data.checkpoint first, then by the path recorded at training (finetune.tower.find_tuned_export),
so a run moved with its export still predicts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from radalign.finetune.config import FinetuneConfig
from radalign.finetune.features import EHRFeaturizer
from radalign.finetune.inputs import (
    EmbeddingCache,
    SplitInputs,
    load_table,
    missing_columns,
    model_columns,
    split_inputs,
)
from radalign.finetune.registry import load_models, model_logits
from radalign.finetune.report import predictions_frame
from radalign.finetune.tasks import task_scores
from radalign.finetune.tower import TUNED_KIND, find_tuned_export, study_tokens
from radalign.pretrain.export import load_encoders

from radalign import RadalignError
from radalign.config import load_config


@dataclass
class TrainedRun:
    path: Path
    cfg: FinetuneConfig
    featurizer: EHRFeaturizer | None
    models: dict[str, tuple[object, dict]]  # name -> (model, meta) (finetune.registry.load_model)
    table_path: str
    shards: str
    encoders: object = None
    export: str | None = None  # the export folder the towers come from (data.checkpoint, or a tuned tower's own)
    _tables: dict = field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        return list(self.cfg.data.modalities)

    def table(self, path: str | None = None):
        path = str(path or self.table_path)
        if path not in self._tables:
            t = load_table(path)
            if self.featurizer is not None and self.cfg.data.features is None:
                self.featurizer.check_features(t.features)  # a table linked with another feature list
            self._tables[path] = t
        return self._tables[path]

    def needed_columns(self) -> dict[str, str]:
        """{column: what needs it} of the table rows this run's models read."""
        features = self.featurizer.features if self.featurizer is not None else None
        return model_columns(self.modalities, features)

    def check_columns(self, split: str, table: str | None = None, extra: Mapping[str, str] | None = None,
                      fix: str = "") -> None:
        """One error naming the table, the split, every column the run (and `extra`, whose own `fix` is added
        when one of them is lacking) needs but the table lacks, and the fix: a sentence instead of a KeyError
        deep inside the featurizer or the text tower."""
        t = self.table(table)
        columns = t.split(split).columns
        need = self.needed_columns()
        only_extra = {c: why for c, why in (extra or {}).items() if c not in need}
        lacking = missing_columns(columns, {**need, **only_extra})
        if missing_columns(columns, only_extra):  # e.g. a --subgroups column: say which ones there are
            fix += f" (available columns: {', '.join(map(str, columns))})"
        else:
            fix = ""  # the extra columns' own fix does not apply
        if lacking:
            ids = {"subject_id", "study_id"} - set(columns)
            fill = "" if ids else (", or add each column (null where unknown: the model then treats that "
                                   "indication, film, lab or demographic as absent)")
            raise RadalignError(f"{t.path} (split {split!r}) lacks column(s) {', '.join(lacking)}. Fix: use a "
                                "table written by `radalign data link-ehr` with the run's feature list" + fill + fix)

    def inputs(self, split: str, table: str | None = None, shards: str | None = None,
               rows=None) -> SplitInputs:
        """The split's inputs (only its `rows`, positions in the table split, when given). A tuned tower's run:
        only those studies' films are decoded, and the tower runs once per film here (finetune.tower.study_tokens);
        every model and condition then scores the split from its study tokens."""
        self.check_columns(split, table)
        t = self.table(table)
        frame = t.split(split)
        if rows is not None:
            frame = frame.iloc[np.asarray(rows, dtype=int)].reset_index(drop=True)
        task = self.cfg.task
        wanted = [task.threshold_column] if task.threshold_column else list(task.labels)
        if any(c not in frame.columns for c in wanted):  # new studies without outcomes: scored, unlabelled
            frame = frame.assign(**{c: np.nan for c in wanted if c not in frame.columns})
        cache = None
        if self.encoders is not None:
            folder = self.cfg.data.cache or self.path / "cache"
            cache = EmbeddingCache(self.encoders, shards or self.shards, folder, progress=self.cfg.progress,
                                   patch_tokens=self.cfg.data.image_patch_tokens)
        if self.cfg.model.image_tower != "frozen":  # the tuned tower scores films (finetune.films)
            from radalign.finetune.films import film_inputs, load_films

            store = load_films(shards or self.shards, self.export_config(), [frame], progress=self.cfg.progress)
            data = film_inputs(split, frame, task, self.modalities, cache=cache, featurizer=self.featurizer,
                               store=store)
            tuned = self.tuned_model()
            return data if tuned is None or "image" not in self.modalities else study_tokens(tuned, data)
        return split_inputs(split, frame, task, self.modalities, cache=cache, featurizer=self.featurizer)

    def export_config(self) -> dict:
        from radalign.pretrain.export import find_export

        return json.loads((find_export(self.export or self.cfg.data.checkpoint) / "config.json").read_text())

    def tuned_model(self):
        """The run's model whose image tower trained (finetune.tower.TunedModel), or None."""
        return next((m for m, meta in self.models.values() if meta["spec"]["kind"] == TUNED_KIND), None)

    def logits(self, data: SplitInputs, name: str, present_override=None) -> np.ndarray:
        """[N] logits of a binary task's model; [N, K] (one column per class) for multilabel / multiclass."""
        model, meta = self.models[name]
        return task_scores(model_logits(model, meta["spec"], data, present_override), self.cfg.task.kind)

    def predictions(self, data: SplitInputs) -> pd.DataFrame:
        return predictions_frame(data, {name: self.logits(data, name) for name in self.models}, self.cfg.task)


def load_run(path: str | os.PathLike) -> TrainedRun:
    path = Path(path)
    cfg_file, models_dir = path / "config.yaml", path / "models"
    if not cfg_file.is_file() or not models_dir.is_dir():
        raise RadalignError(f"--run {path}: not a finetune run (expected config.yaml and models/). Pass "
                            "the run_dir of `radalign finetune`")
    cfg = load_config(FinetuneConfig, cfg_file, [], stage="finetune", saved=True)
    fz_doc = json.loads((path / "featurizer.json").read_text()) if (path / "featurizer.json").is_file() else {}
    featurizer = EHRFeaturizer.from_dict(fz_doc) if fz_doc.get("format") else None
    models = load_models(models_dir, checkpoint=cfg.data.checkpoint)  # a moved tuned export: found there
    if not models:
        raise RadalignError(f"{models_dir}: no finished model; the run was interrupted before the first model "
                            "finished (run `radalign finetune` again with the same run_dir to resume)")
    export = run_export(cfg, models)
    encoders = None
    if {"image", "text"} & set(cfg.data.modalities):
        encoders = load_encoders(export)
    return TrainedRun(path, cfg, featurizer, models, cfg.data.table, cfg.data.shards, encoders, str(export))


def run_export(cfg: FinetuneConfig, models: Mapping) -> Path | str:
    """Where the run's towers come from: the export its tuned tower was trained on when it has one (the run's
    data.checkpoint first, else the recorded path: finetune.tower.find_tuned_export), else data.checkpoint."""
    for _, meta in models.values():
        if meta["spec"]["kind"] == TUNED_KIND:
            return find_tuned_export(meta["spec"]["tower"], cfg.data.checkpoint)
    return cfg.data.checkpoint


def predict_split(run: str | os.PathLike, *, table: str | None = None, split: str = "test",
                  shards: str | None = None) -> pd.DataFrame:
    trained = load_run(run)
    return trained.predictions(trained.inputs(split, table, shards))

"""A finetune run before training: its folder, data and accelerator (`setup`), shared by the training recipe
(finetune.recipe) and the few-shot recipe (finetune.fewshot_recipe).

    with open_run(cfg, overwrite) as run:    # lock RUN, setup, write run_spec.json / config.yaml / featurizer.json
        ...                                  # a recipe's train and save; a stop_after stop is reported, not raised

setup: what can refuse refuses first (the table's columns, splits and labelled classes, a recipe's own checks,
the pretraining overlap, the run folder against its run_spec.json), then the towers embed every split once into
the cache (finetune.inputs) and the EHR scaling is fitted on the training split. When the image tower trains
(model.image_tower=last_blocks|lora) the films are decoded into memory instead (finetune.films; no image cache).
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from radalign.finetune.config import FinetuneConfig
from radalign.finetune.features import EHRFeaturizer
from radalign.finetune.films import FilmStore, film_inputs, load_films
from radalign.finetune.inputs import (
    EmbeddingCache,
    FinetuneTable,
    SplitInputs,
    check_overlap,
    class_counts,
    load_table,
    missing_columns,
    model_columns,
    split_inputs,
    task_labels,
)
from radalign.finetune.registry import not_trained
from radalign.finetune.runspec import check_resume_folder, claim_run_dir, run_spec, write_run_spec
from radalign.finetune.tasks import (
    class_names,
    draw_patients,
    keep_patients,
    n_outputs,
    patient_list,
    targets,
)
from radalign.finetune.trainer import Stopped
from radalign.pretrain.export import find_export, load_encoders

from radalign import RadalignError
from radalign.config import save_resolved
from radalign.io import atomic_write_json
from radalign.training import make_accelerator, reset_accelerate_state, run_lock

TRAIN_PATIENTS = "train_patients.json"  # RUN/<this>: the patients of a task.train_fraction draw, with sha256
Check = Callable[[FinetuneConfig, FinetuneTable], None]  # a recipe's own refusal, run before the towers load

@dataclass
class Run:
    cfg: FinetuneConfig
    run_dir: Path
    acc: Any
    precision: str
    table: FinetuneTable
    export_config: dict
    featurizer: EHRFeaturizer | None
    data: dict[str, SplitInputs]  # "train", "validate", "test" -> inputs (keys are the config's split names)
    modalities: list[str]
    spec: dict  # what shaped the models (finetune.runspec), RUN/run_spec.json
    overlap: dict = field(default_factory=dict)
    encoders: Any = None
    seconds: dict = field(default_factory=dict)

    @property
    def train(self) -> SplitInputs:
        return self.data[self.cfg.data.train_split]

    @property
    def val(self) -> SplitInputs:
        return self.data[self.cfg.data.val_split]

    @property
    def test(self) -> SplitInputs:
        return self.data[self.cfg.data.test_split]

    def say(self, msg: str) -> None:
        if self.acc.is_main_process:
            print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Setup


def check_table(cfg: FinetuneConfig, table: FinetuneTable) -> None:
    """Every problem of the task against the table, in one error: columns, splits, then whether each split's
    labels can train (train), select (validation) and score (test) a model."""
    cols = set(table.columns)
    problems = []
    for c in _label_columns(cfg.task):
        if c not in cols:
            close = difflib.get_close_matches(c, sorted(cols), n=3)
            problems.append(f"task label column {c!r} is not in the table"
                            + (f" (did you mean {', '.join(close)}?)" if close else ""))
    features = cfg.data.features if cfg.data.features is not None else table.features
    lacking = missing_columns(table.columns, model_columns(cfg.data.modalities, features))
    if lacking:
        problems.append(f"missing column(s) {', '.join(lacking)}: relink the table with `radalign data link-ehr`, "
                        "or drop the modality from data.modalities")
    for s in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split):
        if s not in table.splits:
            problems.append(f"split {s!r} is not in the table (it has {', '.join(table.splits)})")
    if not problems:
        problems = label_problems(cfg, table)
    if problems:
        raise RadalignError(f"{table.path}: " + "; ".join(problems))


def _label_columns(task) -> list[str]:
    return [task.threshold_column] if task.threshold_column else list(task.labels)


def _task_splits(cfg: FinetuneConfig) -> list[str]:
    """The splits whose labels the run uses: train (fit), validation (model selection; not in the few-shot
    sweep, whose recipes are fixed) and test (scores)."""
    d = cfg.data
    return [d.train_split, d.test_split] if cfg.fewshot.enabled else [d.train_split, d.val_split, d.test_split]


def label_problems(cfg: FinetuneConfig, table: FinetuneTable) -> list[str]:
    """A problem per split and label with fewer than two labelled classes, with the counts and the fix."""
    t, d = cfg.task, cfg.data
    use = {d.train_split: "nothing to learn from", d.val_split: "no model selection (validation AUROC undefined)",
           d.test_split: "no test AUROC"}
    names = [f"{t.labels[0]} ({t.threshold_column} > {t.threshold:g})"] if t.threshold_column else list(t.labels)
    problems = []
    for s in _task_splits(cfg):
        y = task_labels(table.split(s), t)  # [N, C]
        counts_all = class_counts(y)
        if t.kind == "multilabel" and any(sum(v > 0 for v in c.values()) >= 2 for c in counts_all):
            continue  # a one-valued class trains as it is, is left out of the macro and named in the report
        for name, counts in zip(names, counts_all):
            if sum(v > 0 for v in counts.values()) >= 2:
                continue
            n = sum(counts.values())
            what = (f"no labelled row (all {len(y)} rows are null)" if n == 0 else
                    f"one class only ({', '.join(f'{c}: {v}' for c, v in counts.items())} of {n} labelled rows)")
            problems.append(f"split {s!r}, label {name!r}: {what}: {use[s]}")
    if problems:
        problems[-1] += (". Fix: choose a label (task.labels, task.threshold) with both classes in every split, "
                         "or a table whose splits each hold both (more patients, another split), or point "
                         "data.train_split / data.val_split / data.test_split at splits that do")
    return problems


def setup(cfg: FinetuneConfig, overwrite: bool = False, checks: Sequence[Check] = ()) -> Run:
    """Everything before training. What can refuse refuses first, before the towers load or embed: the table
    (columns, splits, labelled classes per split), `checks` (the few-shot ks), the pretraining overlap, the folder
    (RUN/run_spec.json against this config; `overwrite` clears RUN instead). A refusal also ends the
    Accelerate state, so a later run in the same process may choose another precision."""
    t0 = time.perf_counter()
    acc, precision, _ = make_accelerator(cfg.precision, find_unused_parameters=True)
    try:
        run = _setup(cfg, acc, precision, overwrite, checks)
    except BaseException:
        acc.end_training()
        reset_accelerate_state()
        raise
    run.seconds["setup"] = round(time.perf_counter() - t0, 2)
    return run


def _setup(cfg: FinetuneConfig, acc, precision: str, overwrite: bool, checks: Sequence[Check]) -> Run:
    run_dir = Path(cfg.run_dir)
    table = load_table(cfg.data.table)
    drawn = draw_train_patients(cfg, table)
    check_table(cfg, table)
    for check in checks:
        check(cfg, table)
    export_config = _export_config(cfg.data.checkpoint)
    overlap = check_overlap(export_config, table, [cfg.data.val_split, cfg.data.test_split],
                            allow=cfg.data.allow_overlap)
    spec = run_spec(cfg, table, export_config, precision=precision, processes=acc.num_processes)
    claim_run_dir(run_dir, spec, resume=cfg.resume, overwrite=overwrite, main=acc.is_main_process)
    if drawn is not None and acc.is_main_process:
        atomic_write_json(run_dir / TRAIN_PATIENTS, drawn)
    acc.wait_for_everyone()
    check_resume_folder(cfg.resume, run_dir)
    mods = list(cfg.data.modalities)
    tuned = cfg.model.image_tower != "frozen"  # the image tower trains: films, not cached embeddings
    cached = {"text"} if tuned else {"image", "text"}
    encoders = load_encoders(cfg.data.checkpoint, device=acc.device) if cached & set(mods) else None
    featurizer = None
    if "ehr" in mods:
        features = cfg.data.features or table.features
        featurizer = EHRFeaturizer.fit(table.split(cfg.data.train_split), features)
    cache = EmbeddingCache(encoders, cfg.data.shards, cfg.data.cache or run_dir / "cache",
                           num_workers=cfg.num_workers, progress=cfg.progress and acc.is_main_process,
                           patch_tokens=cfg.data.image_patch_tokens) \
        if encoders is not None else None
    data = {}
    splits = (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split)
    store = _films(cfg, export_config, table, splits, acc) if tuned else None
    with acc.main_process_first():  # the main process embeds and caches; the others read the cache
        for s in splits:
            data[s] = split_inputs(s, table.split(s), cfg.task, mods, cache=cache, featurizer=featurizer) \
                if store is None else film_inputs(s, table.split(s), cfg.task, mods, cache=cache,
                                                  featurizer=featurizer, store=store)
    run = Run(cfg, run_dir, acc, precision, table, export_config, featurizer, data, mods, spec, overlap, encoders)
    for s, d in data.items():
        run.say(f"{s}: {len(d)} studies, {d.counts['labelled']} labelled, {positives_text(d.y, cfg.task)}; "
                f"present {d.counts['present']}")
    for name, why in not_trained(run).items():  # the same reasons metrics.json records
        run.say(f"{name}: not trained in this run ({why})")
    if cache is not None and any(cache.lost.values()):
        run.say(f"films lost on read, by shard split and reason: {cache.lost}")
    if store is not None and any(store.lost.values()):
        run.say(f"films lost on read, by shard split and reason: {store.lost}")
    return run


def positives_text(y: np.ndarray, task) -> str:
    """"12 positive" (binary); "positives per class: A 3, B 0" (multilabel: label 1; multiclass: that class)."""
    per = np.nansum(targets(y, task.kind, n_outputs(task)), axis=0).astype(int)  # [K]
    if task.kind == "binary":
        return f"{per[0]} positive"
    return "positives per class: " + ", ".join(f"{c} {n}" for c, n in zip(class_names(task), per))


def draw_train_patients(cfg: FinetuneConfig, table: FinetuneTable) -> dict | None:
    """task.train_fraction < 1: keep the drawn patients' studies in the table's training split (in place, before
    any check, so the checks see what trains) and return RUN/train_patients.json's document (None at 1.0)."""
    f, split = cfg.task.train_fraction, cfg.data.train_split
    if f >= 1 or split not in table.splits:
        return None
    frame = table.splits[split]
    ids = draw_patients(frame, f, cfg.seed)
    table.splits[split] = keep_patients(frame, ids)
    return patient_list(ids, frame, f, cfg.seed, split)


def _films(cfg: FinetuneConfig, export_config: dict, table: FinetuneTable, splits, acc) -> FilmStore:
    """The films of every study of the run's splits, decoded once by each process (finetune.films)."""
    return load_films(cfg.data.shards, export_config, [table.split(s) for s in splits],
                      num_workers=cfg.num_workers, progress=cfg.progress and acc.is_main_process)


def _export_config(path) -> dict:
    return json.loads((find_export(path) / "config.json").read_text())


@contextmanager
def open_run(cfg: FinetuneConfig, overwrite: bool = False, checks: Sequence[Check] = ()) -> Iterator[Run]:
    """A recipe's run under the run folder's lock. `overwrite`: remove what RUN holds and train afresh
    (otherwise RUN's models are reused only when they were trained with this config: finetune.runspec). The
    config, run spec and EHR scaling are written beside the models before any training (they are what trains
    them); a `stop_after` stop is reported; the Accelerate state ends with the run, whatever happens."""
    with run_lock(cfg.run_dir):
        run = setup(cfg, overwrite=overwrite, checks=checks)
        try:
            if run.acc.is_main_process:
                write_run_spec(run.run_dir, run.spec)
                save_resolved(cfg, run.run_dir)
                atomic_write_json(run.run_dir / "featurizer.json",
                                  run.featurizer.to_dict() if run.featurizer else {"format": None})
            yield run
        except Stopped:
            run.say(f"stopped after {cfg.stop_after} steps (stop_after); run again to resume")
        finally:
            run.acc.end_training()
            reset_accelerate_state()

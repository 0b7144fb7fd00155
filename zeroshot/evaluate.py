"""The zero-shot evaluation: checkpoints x data x prompt sets -> metrics, predictions, plots.

Python API:
    from radalign.zeroshot.config import ZeroshotConfig
    from radalign.zeroshot.evaluate import run_zeroshot
    results = run_zeroshot(ZeroshotConfig(checkpoints=["runs/demo/pretrain"], data="runs/demo/shards",
                                          prompts=["chexpert14"], out="runs/demo/zeroshot"))

Lower level: `embed_inputs` (image embeddings once per checkpoint) and `evaluate` (one prompt set on
already-embedded images), so a caller can score many prompt sets without re-embedding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from radalign.data.labels import apply_label_policy, label_counts
from radalign.pretrain import classifier
from radalign.pretrain.prompts import PromptSet, load_prompt_set
from radalign.zeroshot import metrics
from radalign.zeroshot.config import ZeroshotConfig
from radalign.zeroshot.inputs import (
    LABEL_VALUES,
    Embedded,
    cached_embed,
    csv_fingerprint,
    embed_csv,
    embed_shards,
    is_shards,
)

from radalign import RadalignError
from radalign import metrics as rm
from radalign.lock import output_lock
from radalign.log import get_logger
from radalign.report import predictions_frame

log = get_logger("zeroshot")


@dataclass
class Checkpoint:
    path: str
    encoders: object  # pretrain.export.Encoders (or anything with the same protocol)

    @property
    def name(self) -> str:
        return f"--export {self.path}"


@dataclass
class EvalResult:
    metrics: dict
    predictions: pd.DataFrame
    scores: np.ndarray  # [N, C]
    labels: np.ndarray  # [N, C] 1/0/NaN (one-hot for multi-class)
    names: list[str]


# ------------------------------------------------------------------------------------------------------
# Inputs.


def load_checkpoints(paths: list[str], device: str = "cpu") -> list[Checkpoint]:
    from radalign.pretrain.export import load_encoders

    return [Checkpoint(p, load_encoders(p, device=device)) for p in paths]


def _embed_one(ckpt: Checkpoint, data: str, split: str | None, cfg: ZeroshotConfig, cache_dir) -> Embedded:
    if is_shards(data):  # the export's embedding cache (data.embed), shared with the other stages
        return embed_shards(ckpt.encoders, data, split, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                            cache=cache_dir is not None)
    if Path(data).is_dir():
        raise RadalignError(f"--shards {data}: a folder without manifest.json; pass a shards folder written by "
                            "`radalign data prepare`, or a CSV")
    if not Path(data).is_file():
        raise RadalignError(f"--shards/--csv {data}: no such file or folder")
    fp = csv_fingerprint(data, cfg.image_root, cfg.image_column)
    return cached_embed(ckpt.encoders, fp, cache_dir, lambda: embed_csv(
        ckpt.encoders, data, image_root=cfg.image_root, image_column=cfg.image_column,
        batch_size=cfg.batch_size, num_workers=cfg.num_workers))


def align(embedded: list[Embedded]) -> list[Embedded]:
    """Keep the images every checkpoint embedded, in the first one's order (ensembling needs equal rows)."""
    common = set(embedded[0].keys).intersection(*[set(e.keys) for e in embedded[1:]])
    out = []
    for e in embedded:
        pos = {k: i for i, k in enumerate(e.keys)}
        keys = [k for k in embedded[0].keys if k in common]
        idx = [pos[k] for k in keys]
        skipped = dict(e.skipped)
        if len(keys) < len(e.keys):
            skipped["not_embedded_by_every_checkpoint"] = len(e.keys) - len(keys)
        patients = [e.patients[i] for i in idx] if e.patients is not None else None
        out.append(Embedded(keys, e.images[idx], e.labels.loc[keys], skipped, e.source, patients, e.patient_source))
    return out


def apply_subset(emb: Embedded, subset_csv: str, class_column: str) -> Embedded:
    """Restrict to the images of a 5x200 list (by `key` or `Path`), taking its class column as labels."""
    try:
        sub = pd.read_csv(subset_csv)
    except FileNotFoundError:
        raise RadalignError(f"--subset {subset_csv}: no such file") from None
    col = next((c for c in ("key", "Path", "path") if c in sub.columns), None)
    if col is None:
        raise RadalignError(f"--subset {subset_csv}: needs a 'key' (or 'Path') column naming images; "
                            f"columns: {list(sub.columns)}")
    have = {k: i for i, k in enumerate(emb.keys)}
    wanted = sub[col].astype(str).tolist()
    keys = [k for k in wanted if k in have]
    if not keys:
        raise RadalignError(f"--subset {subset_csv}: none of its {len(wanted)} keys are in {emb.source}; "
                            "was the list built from this data and split?")
    labels = emb.labels.loc[keys].copy()
    if class_column in sub.columns:
        labels[class_column] = sub.set_index(sub[col].astype(str)).loc[keys, class_column].to_numpy()
    skipped = {**emb.skipped, "subset_not_in_data": len(wanted) - len(keys)}
    idx = [have[k] for k in keys]
    patients = [emb.patients[i] for i in idx] if emb.patients is not None else None
    return Embedded(keys, emb.images[idx], labels, skipped, f"{emb.source} [{subset_csv}]", patients,
                    emb.patient_source)


def embed_inputs(checkpoints: list[Checkpoint], cfg: ZeroshotConfig, data: str, split: str | None,
                 cache_dir=None) -> list[Embedded]:
    embedded = [_embed_one(c, data, split, cfg, cache_dir) for c in checkpoints]
    if cfg.subset and is_shards(data):
        embedded = [apply_subset(e, cfg.subset, cfg.class_column) for e in embedded]
    return align(embedded)


# ------------------------------------------------------------------------------------------------------
# Labels.


def label_like_columns(labels: pd.DataFrame, exclude: tuple[str, ...] = ()) -> list[str]:
    """Columns whose values are all 1/0/-1/blank (and not all blank): the data's label columns."""
    out = []
    for c in labels.columns:
        if c in exclude:
            continue
        x = pd.to_numeric(labels[c], errors="coerce")
        if x.notna().any() and x.notna().sum() == labels[c].notna().sum() and set(x.dropna()) <= LABEL_VALUES:
            out.append(c)
    return out


def _missing_classes_error(ps: PromptSet, missing: list[str], columns: list[str], source: str) -> RadalignError:
    return RadalignError(f"prompt set {ps.name!r} ({ps.source}) has class(es) {missing} that the data lacks "
                         f"({source}; label columns: {columns}). Use a prompt set whose classes are label "
                         "columns of the data, or add the columns")


def binary_labels(emb: Embedded, ps: PromptSet, cfg: ZeroshotConfig) -> tuple[np.ndarray, dict]:
    """[N, C] 1/0/NaN labels for the prompt set's classes, plus what was (not) evaluated."""
    names = ps.class_names
    columns = cfg.label_columns or label_like_columns(emb.labels, exclude=(cfg.class_column,))
    missing = [n for n in names if n not in emb.labels.columns]
    if missing:
        raise _missing_classes_error(ps, missing, columns, emb.source)
    without = [c for c in columns if c not in names]
    if cfg.label_columns and without:
        raise RadalignError(f"--label-columns {without}: no prompts for these in prompt set {ps.name!r} "
                            f"({ps.source}); add them to the YAML or drop them from --label-columns")
    if without:
        log.info("%s: label columns without prompts (not evaluated): %s", ps.name, ", ".join(without))
    raw = emb.labels[names]
    labels = apply_label_policy(raw, cfg.uncertain, cfg.blank)
    return labels, {"label_counts": label_counts(raw), "labels_without_prompts": without}


def multiclass_labels(emb: Embedded, ps: PromptSet, cfg: ZeroshotConfig) -> tuple[np.ndarray, dict]:
    """[N] class index (-1: excluded) from the class column, or from one-hot label columns."""
    names = ps.class_names
    if cfg.class_column in emb.labels.columns:
        values = emb.labels[cfg.class_column]
        unknown = sorted(set(values.dropna().astype(str)) - set(names))
        if unknown:
            raise RadalignError(f"column {cfg.class_column!r} of {emb.source} has class(es) {unknown} that prompt "
                                f"set {ps.name!r} ({ps.source}) lacks; add prompts for them or drop those rows")
        y = np.array([names.index(v) if isinstance(v, str) else -1 for v in values])
        return y, {"excluded": {"no_class": int((y < 0).sum())}, "class_source": cfg.class_column}
    missing = [n for n in names if n not in emb.labels.columns]
    if missing:
        raise _missing_classes_error(ps, missing, label_like_columns(emb.labels), emb.source)
    onehot = apply_label_policy(emb.labels[names], cfg.uncertain, "negative" if cfg.blank == "negative" else "exclude")
    single = (np.nansum(onehot == 1, axis=1) == 1) & (np.sum(onehot == 0, axis=1) == len(names) - 1)
    y = np.where(single, np.nanargmax(np.nan_to_num(onehot, nan=-1), axis=1), -1)
    return y, {"excluded": {"not_single_class": int((~single).sum())}, "class_source": "one-hot label columns"}


# ------------------------------------------------------------------------------------------------------
# Scoring.


def score(checkpoints: list[Checkpoint], embedded: list[Embedded], ps: PromptSet,
          rows: np.ndarray | None = None) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """Checkpoint-ensembled class probabilities [N, C] and per-template scores (for sensitivity)."""
    probs, templates = [], []
    for ckpt, emb in zip(checkpoints, embedded):
        images = torch.from_numpy(emb.images if rows is None else emb.images[rows]).float()  # [N, D]
        w = classifier.text_weights(ckpt.encoders, ps, ckpt.name)
        scale = classifier.logit_scale_of(ckpt.encoders)
        probs.append(classifier.class_probs(images, w, ps.mode, scale).numpy())
        templates.append(classifier.template_scores(images, w, ps.mode, scale))
    per_template = [[classifier.average([t[c][i] for t in templates]) for i in range(len(templates[0][c]))]
                    for c in range(len(ps.classes))]
    return classifier.average(probs), per_template


def evaluate(checkpoints: list[Checkpoint], embedded: list[Embedded], ps: PromptSet, cfg: ZeroshotConfig,
             val_embedded: list[Embedded] | None = None) -> EvalResult:
    """One prompt set on already-embedded images (aligned across checkpoints)."""
    t0 = time.perf_counter()
    emb, names = embedded[0], ps.class_names
    info: dict = {}
    true_class = None
    if ps.mode == "binary":
        labels, info = binary_labels(emb, ps, cfg)
        rows = np.arange(len(emb.keys))
    else:
        y, info = multiclass_labels(emb, ps, cfg)
        rows = np.flatnonzero(y >= 0)
        if rows.size == 0:
            raise RadalignError(f"{emb.source}: no image has exactly one of the classes {names}; "
                                "a multi-class prompt set needs single-class images (e.g. a 5x200 list)")
        y = y[rows]
        labels = (y[:, None] == np.arange(len(names))[None, :]).astype(float)  # [N, C] one-hot
        true_class = [names[i] for i in y]
    scores, per_template = score(checkpoints, embedded, ps, rows)
    patients = [emb.patients[i] for i in rows] if emb.patients is not None else None
    table = rm.auroc_table(scores, labels, names, n_boot=cfg.bootstrap, seed=cfg.seed, level=cfg.ci_level,
                                macro_classes=list(ps.macro_classes), min_per_label=cfg.min_per_label,
                                patient_ids=patients)
    out = {
        "prompt_set": ps.name, "prompt_file": ps.source, "mode": ps.mode,
        "checkpoints": [{"path": c.path, "checksum": c.encoders.checksum} for c in checkpoints],
        "data": {"source": emb.source, "n_images": len(emb.keys), "n_scored": int(len(rows)),
                 "n_patients": len(set(patients)) if patients is not None else None,
                 "patients_from": emb.patient_source or None,
                 "skipped": {k: v for k, v in emb.skipped.items() if v}},
        "bootstrap": {"unit": table["macro"]["unit"], "n_units": table["macro"]["n_units"], "n_boot": cfg.bootstrap,
                      "seed": cfg.seed, "level": cfg.ci_level, "method": "percentile"},
        "label_policy": {"uncertain": cfg.uncertain, "blank": cfg.blank},
        "classes": table["classes"], "macro": table["macro"], "macro_all": table["macro_all"], **info,
    }
    if ps.mode == "multiclass":
        out["multiclass"] = metrics.multiclass_table(scores, y, names, n_boot=cfg.bootstrap, seed=cfg.seed,
                                                     level=cfg.ci_level, patient_ids=patients)
    out["threshold_metrics"] = _thresholds(checkpoints, val_embedded, ps, cfg, scores, labels)
    out["prompt_sensitivity"] = metrics.prompt_sensitivity(
        per_template, labels, names, [list(c.positive) for c in ps.classes],
        {n: c["auroc"] for n, c in table["classes"].items()})
    if cfg.shuffled_control:
        out["controls"] = {"shuffled_labels_macro_auroc": rm.shuffled_label_control(
            scores, labels, names, table["macro"]["classes"] or names, seed=cfg.seed)}
    out["timing_s"] = {"score_and_metrics": round(time.perf_counter() - t0, 3)}
    preds = predictions_frame([emb.keys[i] for i in rows], scores, labels, names, true_class)
    return EvalResult(out, preds, scores, labels, names)


def _thresholds(checkpoints, val_embedded, ps: PromptSet, cfg, scores, labels) -> dict:
    """Threshold metrics with thresholds chosen on the validation data only (never on the test rows)."""
    if ps.mode != "binary":
        return {"available": False, "reason": "multi-class sets use argmax; no threshold involved"}
    if not val_embedded:
        return {"available": False, "reason": "no validation data given (--val-split / --val-data); "
                                              "only threshold-free metrics are reported"}
    val_labels, _ = binary_labels(val_embedded[0], ps, cfg)
    val_scores, _ = score(checkpoints, val_embedded, ps)
    thr = metrics.choose_thresholds(val_scores, val_labels, ps.class_names)
    return {"available": True, "chosen_on": val_embedded[0].source, "rule": "max Youden J on validation",
            "classes": metrics.threshold_metrics(scores, labels, ps.class_names, thr)}


# ------------------------------------------------------------------------------------------------------
# The whole stage.


def run_zeroshot(cfg: ZeroshotConfig, checkpoints: list[Checkpoint] | None = None) -> dict[str, dict]:
    """Evaluate every prompt set; write OUT (or OUT/<set> for several sets). Returns metrics per set name.

    OUT is locked for the whole run (`radalign.lock.output_lock`): a second run on the same OUT is refused."""
    problems = cfg.validate()
    if problems:
        from radalign.config import ConfigError

        raise ConfigError(problems, source="zeroshot options")
    for label, path in (("--shards/--csv", cfg.data), ("--val-data", cfg.val_data), ("--subset", cfg.subset)):
        if path and not Path(path).exists():
            raise RadalignError(f"{label} {path}: no such file or folder")
    sets = [load_prompt_set(p) for p in cfg.prompts]
    if cfg.macro_classes:
        sets = [s.with_macro(list(cfg.macro_classes)) for s in sets]
    checkpoints = checkpoints or load_checkpoints(cfg.checkpoints, cfg.device)
    out = Path(cfg.out)
    with output_lock(out, what="--out"):  # one writer per output folder
        return _run_locked(cfg, checkpoints, sets, out)


def _run_locked(cfg: ZeroshotConfig, checkpoints: list[Checkpoint], sets: list[PromptSet], out: Path) -> dict:
    from radalign.zeroshot.report import write_outputs

    cache = out / "cache" if cfg.cache else None
    t0 = time.perf_counter()
    embedded = embed_inputs(checkpoints, cfg, cfg.data, cfg.split, cache)
    val = None
    if cfg.val_split is not None or cfg.val_data is not None:
        vdata = cfg.val_data or cfg.data
        val = embed_inputs(checkpoints, cfg, vdata, cfg.val_split, cache)
    t_embed = time.perf_counter() - t0
    results = {}
    for ps in sets:
        res = evaluate(checkpoints, embedded, ps, cfg, val)
        res.metrics["timing_s"]["embed_images"] = round(t_embed, 3)
        folder = out if len(sets) == 1 else out / ps.name
        write_outputs(folder, res.metrics, res.predictions, res.scores, res.labels, res.names)
        m = res.metrics["macro"]
        log.info("%s: macro AUROC %.3f [%.3f, %.3f] (%d%% CI, resampling %ss: %d) over %s -> %s", ps.name,
                 m["auroc"] or float("nan"), m["ci_low"] or float("nan"), m["ci_high"] or float("nan"),
                 round(100 * m["level"]), m["unit"], m["n_units"], ", ".join(m["classes"]), folder)
        results[ps.name] = res.metrics
    return results

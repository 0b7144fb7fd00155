"""What a finetune run folder holds, and when it may be reused (`radalign finetune` run again in one run_dir).

    spec = run_spec(cfg, table, export_config, precision="fp32", processes=1)
    claim_run_dir(run_dir, spec, resume=cfg.resume, overwrite=False)   # refuses models trained otherwise
    write_run_spec(run_dir, spec)                                       # before the first model trains
    found = resume_point(ckpt, "fusion", cfg.resume, run_dir)           # the checkpoint a model continues from

A finished model is reused, and a stopped one continued, only when RUN/run_spec.json equals the spec of the
current config: everything that shaped a model (task, labels, the table's path and sha256, lab features, split
names, modalities, model, optimiser, baselines, few-shot options, seed, precision, processes, the export's
checksum, the shards' manifest sha256). What only steers the run (RUN_CONTROL: run_dir, bootstrap, log_every,
stop_after, resume, num_workers, progress, data.cache, data.allow_overlap) is left out: the reports are
rewritten from the models on every run. A difference refuses before any work, naming each changed key
(old -> new). `--overwrite` removes the run's models, checkpoints and reports first and trains afresh (the
embedding cache stays: it is keyed by the export's checksum and the shards).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from radalign import RadalignError
from radalign.io import atomic_write_json, sha256_file

RUN_SPEC = "run_spec.json"
RUN_FORMAT = "radalign-finetune-run/1"
# Config keys that steer a run without shaping any model (a change reuses the models).
RUN_CONTROL = ("run_dir", "bootstrap", "log_every", "stop_after", "resume", "num_workers", "progress",
               "data.cache", "data.allow_overlap")
# What `radalign finetune` writes into RUN (removed by --overwrite; RUN/cache and anything else stays).
OUTPUT_DIRS = ("models", "train", "draws")
OUTPUT_FILES = (RUN_SPEC, "config.yaml", "featurizer.json", "predictions.csv", "predictions_validate.csv",
                "metrics.json", "report.md", "roc.png", "fewshot.json", "learning_curve.png")
OUTPUT_GLOBS = ("fewshot-*.json", "learning_curve-*.png")
OVERWRITE_HINT = "run the same command again with --overwrite"
_MISSING = object()


def table_sha256(path: str | os.PathLike) -> str:
    """sha256 over the table's data files (every split's Arrow files and dataset_dict.json, by relative name)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix == ".arrow"
                                                                   or p.name == "dataset_dict.json")):
        h.update(f"{f.relative_to(path)}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def run_spec(cfg, table, export_config: Mapping, *, precision: str, processes: int) -> dict:
    """Everything of `cfg` (FinetuneConfig) and its inputs that shapes a model, as JSON types."""
    from radalign.finetune.inputs import manifest_sha256

    spec = dataclasses.asdict(cfg)
    for key in RUN_CONTROL:
        *parents, last = key.split(".")
        node = spec
        for p in parents:
            node = node[p]
        node.pop(last)
    if spec["optim"]["tower_lr"] is None:  # unset (optim.lr for the tower too): as runs recorded before the key
        spec["optim"].pop("tower_lr")
    if not cfg.fewshot.enabled:
        spec["fewshot"] = {"enabled": False}  # the sweep's options shape nothing in a full training run
    d = spec["data"]
    d["table"] = str(Path(table.path).resolve())
    d["table_sha256"] = table_sha256(table.path)
    d["features"] = list(cfg.data.features if cfg.data.features is not None else table.features)
    d.pop("checkpoint")
    d["export_checksum"] = export_config.get("checksum")
    d.pop("shards")
    d["shards_manifest_sha256"] = manifest_sha256(cfg.data.shards) if "image" in cfg.data.modalities else None
    spec.update(precision=precision, processes=int(processes))
    return json.loads(json.dumps(spec))


def _flat(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(v) -> str:
    if v is _MISSING:
        return "(absent)"
    if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{32,}", v):
        return v[:12] + "..."  # a sha256: its start names it
    return repr(v)


def changed_keys(old: Mapping, new: Mapping) -> list[str]:
    """'key: old -> new' for every (dotted) key whose value differs, sorted by key."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {_show(a.get(k, _MISSING))} -> {_show(b.get(k, _MISSING))}" for k in sorted(a.keys() | b.keys())
            if a.get(k, _MISSING) != b.get(k, _MISSING)]


def trained_state(run_dir: str | os.PathLike) -> list[str]:
    """What RUN holds of trained work (models, checkpoints, reports), relative names."""
    run_dir = Path(run_dir)
    found = [*run_dir.glob("models/**/*.json"), *run_dir.glob("train/*/checkpoints/step-*")]
    found += [run_dir / n for n in ("metrics.json", "fewshot.json") if (run_dir / n).is_file()]
    return sorted(str(p.relative_to(run_dir)) for p in found)


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def read_run_spec(run_dir: str | os.PathLike) -> dict | None:
    """The spec RUN was trained with (None: not recorded, or unreadable)."""
    try:
        doc = json.loads((Path(run_dir) / RUN_SPEC).read_text())
    except (OSError, ValueError):
        return None
    return doc.get("spec") if isinstance(doc, dict) and doc.get("format") == RUN_FORMAT else None


def claim_run_dir(run_dir: str | os.PathLike, spec: Mapping, *, resume: str, overwrite: bool,
                  main: bool = True) -> None:
    """Refuse a run_dir whose trained work came from another spec (or an unknown one); with `overwrite`,
    remove that work instead (main process only; the caller waits for it)."""
    run_dir = Path(run_dir)
    if overwrite:
        if main:
            clear_run_dir(run_dir)
        return
    held = trained_state(run_dir)
    if not held:
        return
    fix = f"choose another run_dir, or {OVERWRITE_HINT} to train afresh in {run_dir} (its models, checkpoints " \
          "and reports are replaced)"
    if resume == "never":
        raise RadalignError(f"resume=never: {run_dir} already holds {_some(held)}. Drop resume=never to continue "
                            f"it (resume=auto), or {fix}")
    old = read_run_spec(run_dir)
    if old is None:
        raise RadalignError(f"{run_dir} holds {_some(held)} but no readable {RUN_SPEC} (written by an older "
                            "radalign, or damaged): what trained them is unknown, so they are not reused. "
                            f"To train: {fix}")
    diff = changed_keys(old, spec)
    if diff:
        raise RadalignError(f"{run_dir} was trained with another configuration (changed: {'; '.join(diff)}); "
                            f"its models would be reported under the new settings. To train: {fix}")


def write_run_spec(run_dir: str | os.PathLike, spec: Mapping) -> None:
    atomic_write_json(Path(run_dir) / RUN_SPEC, {"format": RUN_FORMAT, "spec": dict(spec)})


def clear_run_dir(run_dir: str | os.PathLike) -> list[str]:
    """Remove what `radalign finetune` wrote into RUN (never anything else); returns the removed names."""
    run_dir = Path(run_dir)
    gone = [run_dir / n for n in OUTPUT_DIRS if (run_dir / n).is_dir()]
    gone += [run_dir / n for n in OUTPUT_FILES if (run_dir / n).is_file()]
    gone += [p for g in OUTPUT_GLOBS for p in run_dir.glob(g) if p.is_file()]
    for p in gone:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return sorted(p.name for p in gone)


# ----------------------------------------------------------------------------------------------------------
# Where a model continues from: resume=auto|never, or one model's step-* folder


def _step(path: Path) -> int:
    m = re.fullmatch(r"step-(\d+)", path.name)
    return int(m.group(1)) if m else -1


def check_resume_folder(resume: str, run_dir: str | os.PathLike) -> str | None:
    """For resume=<step-* folder>: the model whose checkpoints hold it (None for auto/never). Refuses a folder
    outside RUN/train/<model>/checkpoints/ and one of a model that finished (it would not be used)."""
    if resume in ("auto", "never"):
        return None
    folder, train = Path(resume).resolve(), (Path(run_dir) / "train").resolve()
    if folder.parent.name != "checkpoints" or folder.parent.parent.parent != train:
        raise RadalignError(f"resume={resume}: not a checkpoint folder of run_dir {run_dir}; pass "
                            f"{Path(run_dir) / 'train' / '<model>' / 'checkpoints' / 'step-N'}, or resume=auto")
    name = folder.parent.parent.name
    done = sorted((Path(run_dir) / "models").rglob(f"{name}.json"))
    if done:
        raise RadalignError(f"resume={resume}: {name} finished already ({done[0]}) and is reused as it is; "
                            "drop resume= (auto)")
    if not folder.is_dir():
        there = [str(Path(resume).parent / p.name) for p in sorted(folder.parent.glob("step-*"))]
        raise RadalignError(f"resume={resume}: no such folder; " + (
            f"{name} has {', '.join(there)}: pass resume=<one of those>, or resume=auto" if there else
            f"{name} has no checkpoint: drop resume= (auto)"))
    return name


def resume_point(ckpt, name: str, resume: str, run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint model `name` continues from (radalign.training.CheckpointManager `ckpt`), None: its
    start. resume=auto (and never, which only runs where nothing is held): the newest complete one; a step-*
    folder of this model: that one. Every refusal names a way out that works."""
    explicit = None
    if resume not in ("auto", "never") and Path(resume).resolve().parent == ckpt.root.resolve():
        explicit = Path(resume)
    existing = ckpt.checkpoints()
    if explicit is not None:
        newer = [p for p in existing if _step(p) > _step(explicit) and ckpt.verify(p) is None]
        if newer:
            raise RadalignError(f"resume={resume}: {newer[-1]} is a complete later checkpoint of {name}; resuming "
                                "from an earlier step would overwrite its history. Drop resume= to continue "
                                f"from {newer[-1].name} (auto), or choose another run_dir")
        existing = [p for p in existing if _step(p) <= _step(explicit)]
    problems = [ckpt.verify(p) for p in existing]
    if existing and all(problems):
        raise RadalignError(f"{name}: no complete checkpoint to continue from in {ckpt.root} ({'; '.join(problems)})."
                            f" To train again from the start: {OVERWRITE_HINT} (every model of {run_dir} is "
                            "trained afresh), or choose another run_dir")
    return ckpt.resolve(str(explicit) if explicit is not None else "auto")

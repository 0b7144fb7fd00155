"""Reproducible 5x200 benchmark lists (GLoRIA's CheXpert-5x200 rule; the same rule on MIMIC shards).

Rule: a frontal image is eligible for class F when F (one of the five competition findings) is positive
and every other label except "No Finding" is negative (blank counts as negative by default: CheXpert's blank
means "not mentioned", as GLoRIA's fillna(0) treats it). Uncertain (-1) is never negative.
From each class's eligible images, sorted by key so the CSV's row order does not matter, `per_class` are
drawn without replacement by `numpy.random.default_rng(seed)`.

The list is written as CSV with a JSON sidecar holding the seed, the rule, eligible/excluded counts, the
sha256 of the source and of the list itself, so another lab can rebuild and verify the same images.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from radalign.data.labels import CHEXPERT_LABELS, COMPETITION_LABELS
from radalign.data.shards import manifest_sha256, scan_meta, shard_paths

from radalign import RadalignError
from radalign.io import atomic_write_json, atomic_write_text, sha256_file

RULE = ("frontal view; exactly one of the five competition findings positive (1); every other label except "
        "'No Finding' negative (0{blank}); uncertain (-1) is not negative")
FRONTAL_VIEWS = ("PA", "AP")


def assign_class(labels: dict, frontal: bool, blank_as_negative: bool = True) -> tuple[str | None, str]:
    """(competition class or None, reason). `labels` maps label name -> 1/0/-1/None (NaN allowed)."""
    if not frontal:
        return None, "not_frontal"

    def val(name):
        v = labels.get(name)
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)

    pos = [c for c in COMPETITION_LABELS if val(c) == 1]
    if not pos:
        return None, "no_competition_finding"
    if len(pos) > 1:
        return None, "several_competition_findings"
    for name in CHEXPERT_LABELS:
        if name in ("No Finding", pos[0]):
            continue
        v = val(name)
        if not (v == 0 or (v is None and blank_as_negative)):
            return None, "other_label_not_negative"
    return pos[0], "eligible"


def sample_per_class(eligible: dict[str, list[str]], per_class: int, seed: int) -> list[tuple[str, str]]:
    """Seeded draw of `per_class` keys per class (classes in COMPETITION_LABELS order). -> [(key, class)]."""
    short = {c: len(eligible.get(c, [])) for c in COMPETITION_LABELS if len(eligible.get(c, [])) < per_class}
    if short:
        raise RadalignError(f"too few eligible images for {per_class} per class: {short}; lower --per-class "
                            "or use a larger source")
    rng = np.random.default_rng(seed)
    rows = []
    for c in COMPETITION_LABELS:
        keys = sorted(eligible[c])
        pick = np.sort(rng.choice(len(keys), size=per_class, replace=False))
        rows += [(keys[i], c) for i in pick]
    return rows


def _write(out: str | os.PathLike, table: pd.DataFrame, meta: dict) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise RadalignError(f"--out {out}: the list is a CSV; give a path ending in .csv")
    atomic_write_text(out, table.to_csv(index=False))
    meta["list_sha256"] = sha256_file(out)
    atomic_write_json(out.with_suffix(".json"), meta)
    return out


def build_chexpert_5x200(csv: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0,
                         per_class: int = 200, blank_as_negative: bool = True) -> Path:
    """CheXpert-5x200 from a CheXpert-format CSV (Path, Frontal/Lateral, 14 labels). Writes OUT.csv + OUT.json."""
    try:
        df = pd.read_csv(csv)
    except FileNotFoundError:
        raise RadalignError(f"--chexpert-csv {csv}: no such file") from None
    need = ["Path", "Frontal/Lateral", *CHEXPERT_LABELS]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise RadalignError(f"--chexpert-csv {csv}: missing column(s) {missing}; a CheXpert-format CSV has "
                            f"Path, Frontal/Lateral and the 14 label columns")
    reasons: Counter = Counter()
    eligible: dict[str, list[str]] = {c: [] for c in COMPETITION_LABELS}
    lab = df[list(CHEXPERT_LABELS)].apply(pd.to_numeric, errors="coerce")
    for path, view, row in zip(df["Path"].astype(str), df["Frontal/Lateral"], lab.to_dict("records")):
        cls, why = assign_class(row, str(view).strip().lower() == "frontal", blank_as_negative)
        reasons[why] += 1
        if cls:
            eligible[cls].append(path)
    rows = sample_per_class(eligible, per_class, seed)
    table = pd.DataFrame(rows, columns=["Path", "class"])
    meta = _meta("chexpert-5x200", seed, per_class, blank_as_negative, eligible, reasons,
                 {"csv": Path(csv).name, "sha256": sha256_file(csv)})
    return _write(out, table, meta)


def build_mimic_5x200(shards: str | os.PathLike, out: str | os.PathLike, *, split: str = "test",
                      seed: int = 0, per_class: int = 200, blank_as_negative: bool = True,
                      one_per_study: bool = True) -> Path:
    """MIMIC-5x200 from shards (frontal = PA/AP view). One image per study by default (the first key),
    so near-duplicate views of one study do not fill a class. Writes OUT.csv (key, study_id, class) + OUT.json."""
    paths = shard_paths(shards, split)
    reasons: Counter = Counter()
    by_study: dict[tuple, str] = {}
    study_of: dict[str, object] = {}
    # The json members only (data.shards' metadata scan): the builder needs labels, not decoded JPEGs.
    for sample in scan_meta(paths, split=split):
        key, meta = sample.key, sample.meta
        cls, why = assign_class(meta.get("labels") or {}, meta.get("view") in FRONTAL_VIEWS, blank_as_negative)
        reasons[why] += 1
        if not cls:
            continue
        sid = meta.get("study_id") if one_per_study else key
        study_of[key] = meta.get("study_id")
        prev = by_study.get((sid, cls))
        if prev is not None:
            reasons["same_study_duplicate"] += 1
        if prev is None or key < prev:
            by_study[(sid, cls)] = key
    eligible: dict[str, list[str]] = {c: [] for c in COMPETITION_LABELS}
    for (_, cls), key in by_study.items():
        eligible[cls].append(key)
    rows = sample_per_class(eligible, per_class, seed)
    table = pd.DataFrame([(k, study_of[k], c) for k, c in rows], columns=["key", "study_id", "class"])
    meta = _meta("mimic-5x200", seed, per_class, blank_as_negative, eligible, reasons,
                 {"shards": str(shards), "split": split, "manifest_sha256": manifest_sha256(shards),
                  "shard_sha256": [sha256_file(p) for p in paths]}, one_per_study=one_per_study)
    return _write(out, table, meta)


def _meta(name, seed, per_class, blank_as_negative, eligible, reasons, source, **extra) -> dict:
    return {
        "benchmark": name, "seed": seed, "per_class": per_class,
        "rule": RULE.format(blank=", or blank" if blank_as_negative else "; blank is not negative"),
        "blank_as_negative": blank_as_negative, "classes": list(COMPETITION_LABELS),
        "eligible": {c: len(v) for c, v in eligible.items()}, "reasons": dict(sorted(reasons.items())),
        "source": source, **extra,
    }

"""The plan for `radalign data prepare-csv`: any CSV with one row per image becomes the same rows as MIMIC's.

Keys: `r{row:07d}-{last path parts}` (row = 0-based data row). Unique even when two rows name the same image,
readable, and free of the `.` and `/` that webdataset would read as an extension or folder.
"""

from __future__ import annotations

import difflib
import os
import re
from collections import Counter
from pathlib import Path

import pandas as pd
from radalign.data.labels import CHEXPERT_LABELS
from radalign.data.mimic import SPLIT_ALIASES, parse_label_column, read_csv_checked, stable_unit
from radalign.data.sections import clean

from radalign import RadalignError

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def row_key(row: int, image: str) -> str:
    parts = [p for p in re.split(r"[\\/]", image) if p][-3:]
    slug = _UNSAFE.sub("_", "_".join(parts))[-80:].strip("_")
    return f"r{row:07d}-{slug}" if slug else f"r{row:07d}"


def resolve_label_cols(requested: list[str] | None, columns: list[str], path: Path) -> dict[str, str]:
    """CheXpert label name -> CSV column. Names match case-, space- and underscore-insensitively
    (`pleural_effusion` finds "Pleural Effusion"); unknown names fail with the closest CheXpert name."""
    canon = {_norm(n): n for n in CHEXPERT_LABELS}
    by_norm = {_norm(c): c for c in columns}
    if requested is None:
        return {canon[k]: c for k, c in by_norm.items() if k in canon}
    out, problems = {}, []
    for col in requested:
        name = canon.get(_norm(col))
        if name is None:
            close = difflib.get_close_matches(col, list(CHEXPERT_LABELS), n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(f"--label-cols {col!r}: not a CheXpert label; {hint}"
                            f"valid: {', '.join(CHEXPERT_LABELS)}")
        elif _norm(col) not in by_norm:
            problems.append(f"--label-cols {col!r}: no such column; found {', '.join(columns)}")
        else:
            out[name] = by_norm[_norm(col)]
    if problems:
        raise RadalignError(f"{path}: " + "; ".join(problems))
    return out


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", " ", str(name)).strip().lower()


def csv_records(cfg) -> tuple[pd.DataFrame, list[tuple[str, str]], Counter]:
    """(frame, set_aside, notes) for a `PrepareConfig` with `csv` set; columns as `mimic.mimic_records`.

    Rows whose image path lies outside the image root (absolute elsewhere, or climbing out with `..`) are set
    aside as `outside_root` unless `cfg.allow_outside_root`."""
    path = Path(cfg.csv)
    wanted = [cfg.image_col, *cfg.text_col, *(c for c in (cfg.split_col, cfg.patient_col, cfg.study_col) if c)]
    df = read_csv_checked(path, list(dict.fromkeys(wanted)), "CSV given to --csv",
                          encoding=getattr(cfg, "encoding", None))
    if df.empty:
        raise RadalignError(f"{path}: a header ({', '.join(map(str, df.columns))}) but no data rows; "
                            f"point --csv at the table with one row per image")
    label_map = resolve_label_cols(cfg.label_cols, list(df.columns), path)
    root = Path(cfg.image_root) if cfg.image_root else path.resolve().parent
    notes: Counter = Counter()

    images = df[cfg.image_col].str.strip()
    keys = [row_key(i, im) for i, im in enumerate(images)]
    outside = [bool(im) and not getattr(cfg, "allow_outside_root", False) and not inside_root(root, im)
               for im in images]
    texts = [" ".join(t for t in (clean(row) for row in cells) if t)
             for cells in zip(*(df[c] for c in cfg.text_col))]
    patients = _ids(df, cfg.patient_col, keys, notes, "no_patient")
    frame = pd.DataFrame({
        "key": keys, "split": _splits(df, cfg, patients, path), "dicom_id": keys,
        "subject_id": patients, "study_id": _ids(df, cfg.study_col, keys, notes, "no_study"),
        "view": None, "study_datetime": None,
        "image": [str(p if p.is_absolute() else root / p) if s else "" for s, p in
                  ((s, Path(s)) for s in images)],
        "report": None, "text": texts,
    })
    for section in ("findings", "impression"):  # a text column named like a section fills that section
        col = next((c for c in cfg.text_col if _norm(c) == section), None)
        frame[section] = [clean(v) for v in df[col]] if col else None
    for name in CHEXPERT_LABELS:
        if name in label_map:
            frame[name], bad = parse_label_column(df[label_map[name]])
            notes["bad_label_values"] += bad
        else:
            frame[name] = float("nan")
    set_aside = [("outside_root", k) for k, out in zip(keys, outside) if out]
    if set_aside and len(set_aside) == len(frame):
        first = images[outside.index(True)]
        raise RadalignError(f"{path}: every image path ({len(frame)}) lies outside the image root {root} "
                            f"(e.g. {first!r}); pass --image-root DIR (the folder they live in), or "
                            f"--allow-outside-root to read them where they are")
    return frame[[not o for o in outside]].reset_index(drop=True), set_aside, notes


def inside_root(root: Path, image: str) -> bool:
    """Whether `image` (relative to `root`, or absolute) names a file under `root`, by path alone: `..` is
    resolved lexically, symlinks inside the root are trusted (the root's owner put them there)."""
    base = os.path.abspath(root)
    target = os.path.abspath(os.path.join(base, image))
    try:
        return os.path.commonpath([base, target]) == base
    except ValueError:  # different drives (Windows)
        return False


def _ids(df: pd.DataFrame, col: str | None, keys: list[str], notes: Counter, note: str) -> list[str]:
    """The column's values as strings; the row key where the column is absent or the cell blank."""
    if col is None:
        return list(keys)
    values = [v.strip() for v in df[col]]
    notes[note] += sum(not v for v in values)
    return [v or k for v, k in zip(values, keys)]


def _splits(df: pd.DataFrame, cfg, patients: list[str], path: Path) -> list[str]:
    """train / validate / test from the split column, or by patient (seeded hash: a patient's rows stay together,
    and adding rows never moves an existing patient)."""
    if cfg.split_col is None:
        cut_test, cut_val = cfg.test_fraction, cfg.test_fraction + cfg.val_fraction
        out = []
        for p in patients:
            u = stable_unit(cfg.seed, f"split:{p}")
            out.append("test" if u < cut_test else "validate" if u < cut_val else "train")
        return out
    raw = df[cfg.split_col].str.strip().str.lower()
    bad = sorted(set(raw) - set(SPLIT_ALIASES))
    if bad:
        raise RadalignError(f"{path}: column {cfg.split_col!r} has value(s) {', '.join(map(repr, bad[:5]))}; "
                            f"expected train, validate or test (val and valid read as validate)")
    return [SPLIT_ALIASES[v] for v in raw]

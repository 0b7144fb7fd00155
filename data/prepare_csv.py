"""The plan for `radalign data prepare-csv`: any CSV with one row per image becomes the same rows as MIMIC's.

Keys: `r{row:07d}-{last path parts}` (row = 0-based data row). Unique even when two rows name the same image,
readable, and free of the `.` and `/` that webdataset would read as an extension or folder.

`read_image_rows` is the one reader of a CSV that lists images (the file read as text, the image column named
or guessed, paths resolved against the image root and checked against it, the patient of each row): prepare-csv
builds its records from it, and zero-shot's CSV input (`zeroshot.inputs.embed_csv`) reads its images through it.
"""

from __future__ import annotations

import difflib
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from radalign.data.labels import CHEXPERT_LABELS
from radalign.data.mimic import SPLIT_ALIASES, parse_label_column, read_csv_checked, stable_unit
from radalign.data.sections import clean

from radalign import RadalignError

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
IMAGE_COLUMNS = ("Path", "path", "image", "image_path")  # the image column, when none is named (first found)
PATIENT_COLUMNS = ("subject_id", "patient_id", "patient", "Patient")  # the patient column, when none is named
_PATIENT_IN_PATH = re.compile(r"(patient\d+)", re.IGNORECASE)  # CheXpert: .../patient00001/study1/view1.jpg


@dataclass
class ImageRows:
    """The rows of a CSV that lists one image per row, as `read_image_rows` read them."""

    path: Path
    """The CSV."""
    frame: pd.DataFrame
    """Every column as text (a blank cell is '')."""
    image_col: str
    """The column that holds the image paths."""
    root: Path
    """The folder relative image paths resolve against."""
    images: list[str]
    """The image cell of each row, stripped."""
    files: list[str]
    """The image file of each row ('' where the cell is blank)."""
    outside: list[bool]
    """Rows whose image lies outside `root` while that is not allowed (prepare-csv sets them aside)."""


def find_image_column(columns: Sequence[str], wanted: str | None, path: str | os.PathLike) -> str:
    """`wanted` when it is a column, else the first of IMAGE_COLUMNS the CSV has; an error naming the columns."""
    columns = [str(c) for c in columns]
    if wanted:
        if wanted not in columns:
            raise RadalignError(f"--image-column {wanted!r}: not a column of {path}; columns: {columns}")
        return wanted
    for c in IMAGE_COLUMNS:
        if c in columns:
            return c
    raise RadalignError(f"{path}: no image column (looked for {', '.join(IMAGE_COLUMNS)}); "
                        f"name it with --image-column (columns: {columns})")


def read_image_rows(path: str | os.PathLike, *, image_col: str | None = None, required: Sequence[str] = (),
                    image_root: str | os.PathLike | None = None, allow_outside_root: bool = False,
                    encoding: str | None = None, what: str = "CSV given to --csv") -> ImageRows:
    """Read a CSV listing images: `required` columns checked (one error naming every missing one), the image
    column named or guessed (`find_image_column`), each path resolved against `image_root` (default: the CSV's
    folder) and checked to lie inside it unless `allow_outside_root`."""
    path = Path(path)
    frame = read_csv_checked(path, list(dict.fromkeys(required)), what, encoding=encoding)
    col = find_image_column(list(frame.columns), image_col, path)
    root = Path(image_root) if image_root else path.resolve().parent
    images = frame[col].str.strip().tolist()
    outside = [bool(im) and not allow_outside_root and not inside_root(root, im) for im in images]
    files = [str(p if p.is_absolute() else root / p) if s else "" for s, p in ((s, Path(s)) for s in images)]
    return ImageRows(path, frame, col, root, images, files, outside)


def csv_patients(frame: pd.DataFrame, image_col: str) -> tuple[list[str] | None, str]:
    """Each row's patient: a patient column (PATIENT_COLUMNS, no blank cell), else `patientNNN` in the image
    path (CheXpert's layout), else None (each image is then its own unit); and where it came from."""
    for c in PATIENT_COLUMNS:
        if c in frame.columns and not _blank(frame[c]).any():
            return frame[c].astype(str).str.strip().tolist(), f"column {c!r}"
    found = [_PATIENT_IN_PATH.search(str(p)) for p in frame[image_col]]
    if found and all(found):
        return [m.group(1).lower() for m in found], "patientNNN in the image path"
    return None, ""


def _blank(column: pd.Series) -> pd.Series:
    return column.isna() | (column.astype(str).str.strip() == "")


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
    rows = read_image_rows(path, image_col=cfg.image_col, required=wanted, image_root=cfg.image_root,
                           allow_outside_root=getattr(cfg, "allow_outside_root", False),
                           encoding=getattr(cfg, "encoding", None))
    df, root, images, outside = rows.frame, rows.root, rows.images, rows.outside
    if df.empty:
        raise RadalignError(f"{path}: a header ({', '.join(map(str, df.columns))}) but no data rows; "
                            f"point --csv at the table with one row per image")
    label_map = resolve_label_cols(cfg.label_cols, list(df.columns), path)
    notes: Counter = Counter()

    keys = [row_key(i, im) for i, im in enumerate(images)]
    texts = [" ".join(t for t in (clean(row) for row in cells) if t)
             for cells in zip(*(df[c] for c in cfg.text_col))]
    patients = _ids(df, cfg.patient_col, keys, notes, "no_patient")
    frame = pd.DataFrame({
        "key": keys, "split": _splits(df, cfg, patients, path), "dicom_id": keys,
        "subject_id": patients, "study_id": _ids(df, cfg.study_col, keys, notes, "no_study"),
        "view": None, "study_datetime": None,
        "image": rows.files,
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

"""The plan for `radalign data prepare-dicom` on MIMIC-CXR's DICOM layout: the same rows as `data.mimic`'s.

    MIMIC_CXR/files/p10/p10000032/s50414267/<dicom_id>.dcm      the images (found by walking files/)
    REPORTS/files/p10/p10000032/s50414267.txt                   the reports, as for `data prepare`
    TABLES/mimic-cxr-2.0.0-{metadata,split,chexpert|negbio}.csv(.gz)   each used when present

The files on disk drive the rows (ids from the path). With the metadata file, view and study time come from
it (and `--views` sets images aside here, as `data prepare` does); without it they are left null and the
worker reads them from each DICOM header (ViewPosition, StudyDate/StudyTime), filtering views there. With the
split file, images it does not list are set aside (`no_split`); without it patients are split by a seeded
hash (`val_fraction`, `test_fraction`, as prepare-csv). Without a label file the labels are null
(`notes.no_labels`). Pixels and report text are never read here.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pandas as pd
from radalign.data.labels import CHEXPERT_LABELS
from radalign.data.mimic import (
    LABEL_FILES,
    METADATA,
    METADATA_COLUMNS,
    SPLIT,
    SPLIT_ALIASES,
    files_root,
    find_csv,
    parse_study_datetime,
    read_csv_checked,
    read_labels,
    stable_unit,
)

from radalign import RadalignError

_SUBJECT, _STUDY = re.compile(r"^p(\d+)$"), re.compile(r"^s(\d+)$")


def walk_dicoms(images: Path) -> tuple[list[tuple[int, int, str, str]], int]:
    """[(subject_id, study_id, dicom_id, path)] under files/pNN/pSUBJECT/sSTUDY/*.dcm, sorted; and how many
    .dcm files lie elsewhere (counted as `notes.dicom_outside_layout`, not read)."""
    rows, outside = [], 0
    for folder, dirs, files in os.walk(images):
        dirs.sort()
        parts = Path(folder).relative_to(images).parts
        subject = _SUBJECT.match(parts[1]) if len(parts) == 3 else None
        study = _STUDY.match(parts[2]) if len(parts) == 3 else None
        for name in sorted(files):
            if not name.lower().endswith(".dcm"):
                continue
            if subject is None or study is None:
                outside += 1
                continue
            rows.append((int(subject.group(1)), int(study.group(1)), name[:-4], os.path.join(folder, name)))
    return rows, outside


def dicom_records(cfg) -> tuple[pd.DataFrame, list[tuple[str, str]], Counter]:
    """(frame, set_aside, notes) for a `PrepareConfig` with `dicom` and `mimic_cxr`; columns as
    `data.mimic.mimic_records`."""
    root = Path(cfg.mimic_cxr)
    if not root.is_dir():
        raise RadalignError(f"--mimic-cxr {root}: not a folder (expected the MIMIC-CXR root holding files/)")
    images = files_root(root, "MIMIC-CXR (DICOM)")
    reports = files_root(cfg.reports, "MIMIC-CXR reports (mimic-cxr-reports)")
    tables = Path(cfg.tables) if cfg.tables else root
    rows, outside = walk_dicoms(images)
    if not rows:
        raise RadalignError(f"{images}: no .dcm files in pNN/pSUBJECT/sSTUDY/ folders; --mimic-cxr must be the "
                            f"MIMIC-CXR (DICOM) root, e.g. physionet.org/files/mimic-cxr/2.0.0")
    notes: Counter = Counter({"dicom_outside_layout": outside})
    subject, study, dicom, path = (list(c) for c in zip(*rows))
    group = [f"p{str(s)[:2]}/p{s}/s{t}" for s, t in zip(subject, study)]
    frame = pd.DataFrame({
        "key": dicom, "dicom_id": dicom, "subject_id": subject, "study_id": study, "image": path,
        "report": [f"{reports}/{g}.txt" for g in group], "view": None, "study_datetime": None,
    })
    set_aside: list[tuple[str, str]] = []
    frame = _join_metadata(frame, tables, cfg, set_aside, notes)
    frame = _join_split(frame, tables, cfg, set_aside, notes)
    return _join_labels(frame, tables, cfg.labels, notes), set_aside, notes


def _optional_csv(tables: Path, stem: str) -> Path | None:
    try:
        return find_csv(tables, stem, stem)
    except RadalignError:
        return None


def _join_metadata(frame: pd.DataFrame, tables: Path, cfg, set_aside: list, notes: Counter) -> pd.DataFrame:
    """View and study time from the metadata file when present (images it lacks keep the header's)."""
    path = _optional_csv(tables, METADATA)
    if path is None:
        notes["views_from_headers"] += len(frame)
        return frame
    meta = read_csv_checked(path, METADATA_COLUMNS, "metadata file").apply(lambda c: c.str.strip())
    meta = meta.drop_duplicates("dicom_id", keep="last").set_index("dicom_id")
    known = frame["dicom_id"].isin(meta.index)
    notes["views_from_headers"] += int((~known).sum())
    rows = meta.reindex(frame["dicom_id"])
    view = rows["ViewPosition"].where(known.to_numpy(), None)
    frame["view"] = view.replace("", None).to_numpy(dtype=object)
    frame["study_datetime"] = pd.Series(
        [parse_study_datetime(d, t) if k else None for d, t, k in
         zip(rows["StudyDate"], rows["StudyTime"], known)], dtype=object).to_numpy()
    if [v.upper() for v in cfg.views] != ["ALL"]:
        # Only images the metadata describes are filtered here; the rest are filtered on their header.
        wanted = {v.upper() for v in cfg.views}
        drop = known.to_numpy() & ~rows["ViewPosition"].fillna("").str.upper().isin(wanted).to_numpy()
        set_aside += [("filtered_view", d) for d in frame.loc[drop, "dicom_id"]]
        frame = frame[~drop].reset_index(drop=True)
    return frame


def _join_split(frame: pd.DataFrame, tables: Path, cfg, set_aside: list, notes: Counter) -> pd.DataFrame:
    path = _optional_csv(tables, SPLIT)
    if path is None:
        cut_test, cut_val = cfg.test_fraction, cfg.test_fraction + cfg.val_fraction
        units = [stable_unit(cfg.seed, f"split:{s}") for s in frame["subject_id"]]
        frame["split"] = ["test" if u < cut_test else "validate" if u < cut_val else "train" for u in units]
        notes["split_by_patient_hash"] += len(frame)
        return frame
    split_df = read_csv_checked(path, ("dicom_id", "split"), "split file")
    raw = split_df["split"].str.strip().str.lower()
    bad = sorted(set(raw) - set(SPLIT_ALIASES))
    if bad:
        raise RadalignError(f"{path}: column 'split' has value(s) {', '.join(map(repr, bad[:5]))}; "
                            f"expected train, validate or test")
    split = frame["dicom_id"].map(dict(zip(split_df["dicom_id"].str.strip(), raw.map(SPLIT_ALIASES))))
    missing = split.isna().to_numpy()
    set_aside += [("no_split", d) for d in frame.loc[missing, "dicom_id"]]
    notes["no_split"] += int(missing.sum())
    frame = frame[~missing].reset_index(drop=True)
    frame["split"] = split[~missing].to_numpy()
    return frame


def _join_labels(frame: pd.DataFrame, tables: Path, which: str, notes: Counter) -> pd.DataFrame:
    if _optional_csv(tables, LABEL_FILES[which]) is None:
        notes["no_labels"] += len(frame)
        for name in CHEXPERT_LABELS:
            frame[name] = float("nan")
        return frame
    labels, label_notes = read_labels(tables, which)
    notes.update(label_notes)
    notes["no_labels"] += int((~frame["study_id"].isin(labels.index)).sum())
    return frame.join(labels, on="study_id")

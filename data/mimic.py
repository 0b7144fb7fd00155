"""Readers for the MIMIC-CXR-JPG release (metadata, split, CheXpert/NegBio labels) and the report files.

Layout (as unpacked from PhysioNet):

    MIMIC_CXR/mimic-cxr-2.0.0-metadata.csv.gz          dicom_id, subject_id, study_id, ViewPosition, StudyDate, ...
    MIMIC_CXR/mimic-cxr-2.0.0-split.csv.gz             dicom_id, study_id, subject_id, split
    MIMIC_CXR/mimic-cxr-2.0.0-chexpert.csv.gz          subject_id, study_id, 14 labels (1.0 / 0.0 / -1.0 / blank)
    MIMIC_CXR/files/p10/p10000032/s50414267/<dicom_id>.jpg
    REPORTS/files/p10/p10000032/s50414267.txt

The `.csv` files may also be uncompressed. Every reader checks its columns and names the file, the missing
column and what it expected. All CSVs are read as text (`dtype=str`) so ids, dates and times keep their
exact spelling (`80556.875` stays `80556.875`).
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import pandas as pd
from radalign.data.labels import CHEXPERT_LABELS, SPLITS

from radalign import RadalignError

METADATA = "mimic-cxr-2.0.0-metadata"
SPLIT = "mimic-cxr-2.0.0-split"
LABEL_FILES = {"chexpert": "mimic-cxr-2.0.0-chexpert", "negbio": "mimic-cxr-2.0.0-negbio"}
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime")
SPLIT_COLUMNS = ("dicom_id", "split")
# Split spellings seen in the wild (CheXpert's "valid", Open-i style "val") -> ours.
SPLIT_ALIASES = {"train": "train", "validate": "validate", "validation": "validate", "val": "validate",
                 "valid": "validate", "test": "test"}


# ----------------------------------------------------------------------------------------------------------
# Files and columns.


def find_csv(root: str | os.PathLike, stem: str, what: str) -> Path:
    """`root/stem.csv.gz` or `root/stem.csv`; RadalignError naming both and the fix when neither exists."""
    root = Path(root)
    for suffix in (".csv.gz", ".csv"):
        path = root / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise RadalignError(f"{root / (stem + '.csv.gz')}: not found (nor {stem}.csv). Expected the MIMIC-CXR-JPG "
                        f"{what} file there; --mimic-cxr must be the folder holding the CSVs and files/.")


def read_csv_checked(path: str | os.PathLike, columns: Iterable[str], what: str = "",
                     encoding: str | None = None) -> pd.DataFrame:
    """Read a CSV as text (blanks stay ''), checking that `columns` exist; one error naming all missing ones.

    `encoding` None reads UTF-8; a file that is not says where and which `--encoding` decodes it."""
    path = Path(path)
    if not path.is_file():
        raise RadalignError(f"{path}: not found{f' (expected the {what})' if what else ''}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], encoding=encoding or "utf-8")
    except UnicodeDecodeError as e:
        raise RadalignError(_encoding_error(path, encoding or "utf-8", e)) from None
    except (OSError, ValueError, EOFError, ImportError, pd.errors.ParserError) as e:  # ImportError: .zst
        raise RadalignError(f"{path}: not a readable CSV ({e})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        found = [str(c) for c in df.columns]
        hints = [f"{m!r} -> did you mean {close[0]!r}?" for m in missing
                 if (close := difflib.get_close_matches(m, found, n=1, cutoff=0.6))]
        raise RadalignError(f"{path}: missing column(s) {', '.join(map(repr, missing))}"
                            f"{' (' + '; '.join(hints) + ')' if hints else ''}; expected "
                            f"{', '.join(columns)}; found {', '.join(found)}")
    return df


def _encoding_error(path: Path, encoding: str, e: UnicodeDecodeError) -> str:
    """Where the bytes stop being `encoding`, and the first of cp1252 / latin-1 that reads the whole file.

    `e` (pandas' error) names the byte only when the bytes read again decode: the file changed in between."""
    raw = _decompressed(path)
    try:
        raw.decode(encoding)
        where = f"byte {e.object[e.start:e.start + 1]!r}"
    except UnicodeDecodeError as exact:
        line = raw[:exact.start].count(b"\n") + 1
        where = f"byte {raw[exact.start:exact.start + 1]!r} on line {line}"
    # latin-1 maps every byte to a character, so it always decodes (and is never the encoding that failed).
    works = "cp1252" if encoding != "cp1252" and _decodes(raw, "cp1252") else "latin-1"
    excel = ", as Excel on Windows writes" if works == "cp1252" else ""
    return f"{path}: not {encoding} text ({where}); pass --encoding {works} (the file decodes as {works}{excel})"


def _decompressed(path: Path) -> bytes:
    """The bytes pandas decoded, unpacked by pandas' own `compression="infer"` (.gz, .bz2, .xz, .zip, .tar and
    .tar.*, .zst; a suffix in any case), so the byte and line named are the CSV's, not the archive's."""
    from pandas.io.common import get_handle

    with get_handle(path, "rb", compression="infer", is_text=False) as h:
        return h.handle.read()


def _decodes(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def files_root(folder: str | os.PathLike, what: str) -> Path:
    """The folder holding `p10/`, `p11/`, ...: `folder/files` (as released) or `folder` itself."""
    folder = Path(folder)
    if (folder / "files").is_dir():
        return folder / "files"
    if folder.is_dir() and any(p.name[:1] == "p" and p.is_dir() for p in folder.iterdir()):
        return folder
    raise RadalignError(f"{folder}: no files/ folder with p10/, p11/, ... inside. Expected the {what} "
                        f"folder as unpacked from PhysioNet.")


def group_dir(subject_id: int | str) -> str:
    """`p10` for subject 10000032: the release groups patients by the first two digits."""
    return f"p{str(subject_id)[:2]}"


def image_path(root: Path, subject_id: int | str, study_id: int | str, dicom_id: str) -> Path:
    return root / group_dir(subject_id) / f"p{subject_id}" / f"s{study_id}" / f"{dicom_id}.jpg"


def report_path(root: Path, subject_id: int | str, study_id: int | str) -> Path:
    return root / group_dir(subject_id) / f"p{subject_id}" / f"s{study_id}.txt"


def read_report(path: str | os.PathLike) -> tuple[str, bool]:
    """(text, used_latin1). A few reports hold non-UTF-8 bytes; latin-1 decodes any byte, so it never fails."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("latin-1"), True


# ----------------------------------------------------------------------------------------------------------
# Values.


def parse_study_datetime(date: str | int | None, time: str | float | None) -> str | None:
    """StudyDate YYYYMMDD + StudyTime HHMMSS[.fff] (unpadded) -> ISO-8601; None when absent or invalid.

    `parse_study_datetime("21800506", "80556.875") == "2180-05-06T08:05:56.875"`. The time is handled as text
    so the fraction keeps its digits (a float would print 80556.875 as 80556.87499999...).
    """
    date = "" if date is None else str(date).strip()
    time = "" if time is None else str(time).strip()
    if not (len(date) == 8 and date.isdigit()):
        return None
    whole, _, frac = time.partition(".")
    if time and not (whole.isdigit() and len(whole) <= 6 and (frac == "" or frac.isdigit())):
        return None
    whole = whole.zfill(6) if time else "000000"
    try:
        datetime(int(date[:4]), int(date[4:6]), int(date[6:]), int(whole[:2]), int(whole[2:4]), int(whole[4:]))
    except ValueError:
        return None
    frac = frac.rstrip("0")
    iso = f"{date[:4]}-{date[4:6]}-{date[6:]}T{whole[:2]}:{whole[2:4]}:{whole[4:]}"
    return f"{iso}.{frac}" if frac else iso


_LABEL_VALUES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "": None, "nan": None}


def parse_label(value) -> int | None:
    """1.0 / 0.0 / -1.0 / blank -> 1 / 0 / -1 / None (-1, "uncertain", is kept). ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN
        return None
    text = str(value).strip().lower()
    if text in _LABEL_VALUES:
        return _LABEL_VALUES[text]
    raise ValueError(f"label value {value!r} is not one of 1, 0, -1 or blank")


def stable_unit(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by (seed, key): deterministic ordering and splitting without a global RNG."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


# ----------------------------------------------------------------------------------------------------------
# The plan: one row per image, no pixels and no report text (a compact DataFrame, not Python objects).


def parse_label_column(values: pd.Series) -> tuple[pd.Series, int]:
    """Text cells -> float 1.0 / 0.0 / -1.0 / NaN (blank); and how many cells held something else (-> NaN)."""
    text = values.astype(str).str.strip().str.lower()
    parsed = text.map(_LABEL_VALUES)
    bad = int((parsed.isna() & ~text.isin(["", "nan"])).sum())
    return pd.to_numeric(parsed, errors="coerce").astype("float64"), bad


def read_labels(mimic_dir: str | os.PathLike, which: str = "chexpert") -> tuple[pd.DataFrame, Counter]:
    """The CheXpert or NegBio file as a frame indexed by study_id (int) with the 14 labels as floats
    (1 / 0 / -1 / NaN for blank); and a Counter of problems (`bad_label_values`, `duplicate_label_rows`)."""
    if which not in LABEL_FILES:
        raise RadalignError(f"--labels {which!r}: valid values are {', '.join(LABEL_FILES)}")
    path = find_csv(mimic_dir, LABEL_FILES[which], f"{which} labels")
    df = read_csv_checked(path, ("study_id", *CHEXPERT_LABELS), f"{which} label file")
    notes: Counter = Counter()
    out = pd.DataFrame(index=_int_ids(df["study_id"], path, "study_id"))
    for name in CHEXPERT_LABELS:
        values, bad = parse_label_column(df[name])
        out[name] = values.to_numpy()
        notes["bad_label_values"] += bad
    dup = out.index.duplicated(keep="last")
    if dup.any():
        notes["duplicate_label_rows"] += int(dup.sum())
        out = out[~dup]
    return out, notes


def _int_ids(values: pd.Series, path: Path, column: str) -> pd.Index:
    ids = pd.to_numeric(values, errors="coerce")
    wrong = ids.isna() | (ids % 1 != 0)  # "50414267.5" is no id (astype would cut it to 50414267)
    if wrong.any():
        bad = values[wrong].iloc[0]
        raise RadalignError(f"{path}: column {column!r} holds {bad!r}; expected integer MIMIC ids. "
                            f"Is this the right file?")
    return pd.Index(ids.astype("int64"), name=column)


def mimic_records(mimic_dir: str | os.PathLike, reports_dir: str | os.PathLike, *, views: list[str],
                  labels: str = "chexpert") -> tuple[pd.DataFrame, list[tuple[str, str]], Counter]:
    """Join metadata, split and labels into one row per image.

    Returns (frame, set_aside, notes). The frame has key, split, dicom_id, subject_id, study_id, view,
    study_datetime, image, report and the 14 label columns. `set_aside` lists (reason, dicom_id) for images
    outside `views` (`filtered_view`) and images absent from the split file (`no_split`). `notes` counts
    non-fatal oddities: `no_split`, `no_labels` (study absent from the label file: labels null),
    `bad_datetime`, `bad_label_values`.
    """
    mimic_dir = Path(mimic_dir)
    if not mimic_dir.is_dir():
        raise RadalignError(f"--mimic-cxr {mimic_dir}: not a folder (expected the MIMIC-CXR-JPG root)")
    images = files_root(mimic_dir, "MIMIC-CXR-JPG")
    reports = files_root(reports_dir, "MIMIC-CXR reports (mimic-cxr-reports)")
    meta_path = find_csv(mimic_dir, METADATA, "metadata")
    meta = read_csv_checked(meta_path, METADATA_COLUMNS, "metadata file")[list(METADATA_COLUMNS)]
    split_path = find_csv(mimic_dir, SPLIT, "split")
    split_df = read_csv_checked(split_path, SPLIT_COLUMNS, "split file")
    bad = sorted(set(split_df["split"].str.strip().str.lower()) - set(SPLIT_ALIASES))
    if bad:
        raise RadalignError(f"{split_path}: column 'split' has value(s) {', '.join(map(repr, bad[:5]))}; "
                            f"expected {', '.join(SPLITS)}")
    split_of = dict(zip(split_df["dicom_id"].str.strip(), split_df["split"].str.strip().str.lower()))
    del split_df
    label_df, notes = read_labels(mimic_dir, labels)

    set_aside: list[tuple[str, str]] = []
    meta = meta.apply(lambda c: c.str.strip())
    if [v.upper() for v in views] != ["ALL"]:
        keep = meta["ViewPosition"].str.upper().isin({v.upper() for v in views})
        set_aside += [("filtered_view", d) for d in meta.loc[~keep, "dicom_id"]]
        meta = meta[keep]
    split = meta["dicom_id"].map(split_of)
    missing = split.isna()
    set_aside += [("no_split", d) for d in meta.loc[missing, "dicom_id"]]
    notes["no_split"] += int(missing.sum())
    meta, split = meta[~missing], split[~missing]

    subject, study = meta["subject_id"], meta["study_id"]
    group = "p" + subject.str[:2] + "/p" + subject + "/s" + study
    when = [parse_study_datetime(d, t) for d, t in zip(meta["StudyDate"], meta["StudyTime"])]
    frame = pd.DataFrame({
        "key": meta["dicom_id"].to_numpy(), "split": split.map(SPLIT_ALIASES).to_numpy(),
        "dicom_id": meta["dicom_id"].to_numpy(),
        "subject_id": _int_ids(subject, meta_path, "subject_id").to_numpy(),
        "study_id": _int_ids(study, meta_path, "study_id").to_numpy(),
        "view": meta["ViewPosition"].replace("", None).to_numpy(dtype=object),
        "study_datetime": pd.Series(when, dtype=object).to_numpy(),
        "image": (str(images) + "/" + group + "/" + meta["dicom_id"] + ".jpg").to_numpy(),
        "report": (str(reports) + "/" + group + ".txt").to_numpy(),
    })
    notes["bad_datetime"] += sum(w is None for w in when)
    notes["no_labels"] += int((~frame["study_id"].isin(label_df.index)).sum())
    frame = frame.join(label_df, on="study_id")
    return frame, set_aside, notes

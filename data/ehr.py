"""`radalign data link-ehr`: every radiograph study joined to the patient's MIMIC-IV record as it stood at the film.

    manifest = link_ehr("/data/mimic-iv/2.2", "/data/shards", "/data/ehr", features="ehr/core")

The rule (docs/ehr.md), with t0 = the study's `study_datetime` from the shards:
* admission: among those whose span [min(edregtime, admittime), max(dischtime, deathtime)] contains t0, the
  latest one already admitted (admittime <= t0), else (an ED film before any admittime) the earliest
  admittime; demographics from it, else from the subject's latest admission that started before t0;
* a feature (`configs/ehr/core.yaml`, `name: itemid`) is the `valuenum` of the latest event (by charttime) of
  its itemid for the subject, with or without hadm_id, that was *available* at t0: storetime <= t0 (charttime
  when storetime is blank) and charttime in [t0 - window, t0). Events without a numeric valuenum are skipped
  and counted. Ties on charttime: the later available, then the larger value;
* outcomes strictly after t0: in-hospital mortality and length of stay of the linked admission, death
  (patients.dod) within N days of t0's date (null, and counted as `films_after_death`, for a film dated after
  the death date).

Engine: DuckDB with `memory_limit` and `temp_directory` set, so nothing big is ever decompressed in memory.
`labevents` (and the vitals of `icu/chartevents`) are converted once to a Parquet file in the cache folder,
keyed by the CSV's size and mtime; the as-of selection is a range join plus a `row_number()` window in SQL.
pandas only touches the small tables (studies, the final study-level frame).

Outputs under OUT (held with `output_lock`, each file written atomically, manifest last):
    ehr.parquet     one row per study of the shards (all splits), columns `ehr_columns(features)`
    finetune/       datasets.DatasetDict train/validate/test: ehr.parquet + dicom_ids + 14 labels + indication
    manifest.json   format radalign-ehr/1: options, inputs, rows scanned, seconds, counts, coverage
    cache/          the Parquet conversions (or --cache DIR)
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import gzip
import hashlib
import json
import os
import re
import shutil
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
from omegaconf import MISSING
from radalign.data.ehr_table import (
    ADMISSION_DEMOGRAPHICS,
    BASE_COLUMNS,
    CATEGORICAL_DEMOGRAPHICS,
    DEMOGRAPHICS,
    EHR_FORMAT,
    read_ehr,
)
from radalign.data.labels import CHEXPERT_LABELS, SPLITS
from radalign.data.shards import list_shards, scan_meta

from radalign import RadalignError
from radalign.log import get_logger

log = get_logger("radalign.data.ehr")

MANIFEST_FORMAT = EHR_FORMAT  # the table's format, schema and readers: data.ehr_table
CACHE_VERSION = 1
RULE_VERSION = 2    # bump when the same inputs link to other values (2: issue 18's admission span and pick)
FRONTAL_VIEWS = ("PA", "AP", "AP AXIAL", "PA LLD", "AP LLD", "AP RLD", "PA RLD")
OUTCOME_KINDS = ("in_hospital_mortality", "los_days", "mortality_within_days")
FINETUNE_EXTRA = ("dicom_ids", *CHEXPERT_LABELS, "indication")
_MEMORY = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

# table -> (path under --mimic-iv without .csv[.gz], the columns link-ehr reads). Real MIMIC-IV (2.x/3.x) layout.
TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "patients": ("hosp/patients", ("subject_id", "gender", "anchor_age", "anchor_year", "dod")),
    "admissions": ("hosp/admissions", ("subject_id", "hadm_id", "admittime", "dischtime", "deathtime",
                                       "edregtime", "hospital_expire_flag", "race", "insurance",
                                       "marital_status", "language")),
    "labevents": ("hosp/labevents", ("subject_id", "hadm_id", "itemid", "charttime", "storetime", "valuenum")),
    "d_labitems": ("hosp/d_labitems", ("itemid", "label")),
}
OPTIONAL_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chartevents": ("icu/chartevents", ("subject_id", "hadm_id", "stay_id", "charttime", "storetime", "itemid",
                                        "valuenum")),
    "d_items": ("icu/d_items", ("itemid", "label")),
}


# ----------------------------------------------------------------------------------------------------------
# The feature list (configs/ehr/*.yaml).


@dataclass
class OutcomeSpec:
    """One outcome column, defined strictly after the film."""

    kind: str = MISSING
    """in_hospital_mortality (linked admission's hospital_expire_flag), los_days (dischtime - admittime of the
    linked admission, days) or mortality_within_days (patients.dod within `days` of t0's date)."""
    days: Optional[int] = None
    """For mortality_within_days: the horizon in days (dod - date(t0) in [0, days] counts as 1)."""


@dataclass
class FeatureList:
    """What `link-ehr` extracts: `name: itemid` maps and the outcomes."""

    features: dict[str, int] = field(default_factory=dict)
    """hosp/labevents itemids by column name; each gives `{name}` and `{name}_hours`."""
    vitals: dict[str, int] = field(default_factory=dict)
    """icu/chartevents itemids by column name; used only when icu/chartevents is present."""
    outcomes: dict[str, Any] = field(default_factory=dict)
    """Outcome columns by name, each `{kind: ..., days: ...}` (an OutcomeSpec; kinds: in_hospital_mortality,
    los_days, mortality_within_days)."""

    def outcome_specs(self) -> dict[str, OutcomeSpec]:
        return {name: OutcomeSpec(**dict(spec)) for name, spec in self.outcomes.items()}

    def validate(self) -> list[str]:
        problems = []
        if not self.features:
            problems.append("features: empty; list at least one `name: itemid` (see configs/ehr/core.yaml)")
        seen: set[str] = set(BASE_COLUMNS) | set(FINETUNE_EXTRA)
        for block in ("features", "vitals", "outcomes"):
            for name, value in getattr(self, block).items():
                if not _NAME.match(name) or name.endswith("_hours"):
                    problems.append(f"{block}.{name}: not a column name; use lower_case_with_underscores "
                                    "(not ending in _hours)")
                if name in seen:
                    problems.append(f"{block}.{name}: used twice (or a reserved column); rename it")
                seen.add(name)
                if block != "outcomes" and int(value) <= 0:
                    problems.append(f"{block}.{name}: itemid {value} must be a positive integer")
        for name, raw in self.outcomes.items():
            if not isinstance(raw, dict) or set(raw) - {"kind", "days"} or "kind" not in raw:
                problems.append(f"outcomes.{name}: {raw!r}; write {{kind: KIND}} or {{kind: mortality_within_days, "
                                "days: N}}")
                continue
            spec = OutcomeSpec(**raw)
            if spec.kind not in OUTCOME_KINDS:
                close = difflib.get_close_matches(spec.kind, OUTCOME_KINDS, n=1)
                fix = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(OUTCOME_KINDS)}"
                problems.append(f"outcomes.{name}.kind: {spec.kind!r} is not an outcome kind; {fix}")
            elif spec.kind == "mortality_within_days" and (spec.days is None or spec.days <= 0):
                problems.append(f"outcomes.{name}.days: {spec.days!r}; mortality_within_days needs days > 0")
        return problems


def load_feature_list(name_or_path: str | os.PathLike = "ehr/core") -> tuple[FeatureList, Path]:
    """The feature list `name_or_path` (a YAML path or a name under configs/, stage "ehr") and its path."""
    from radalign.config import load_config, resolve_config_path

    path = resolve_config_path(name_or_path, stage="ehr")
    return load_config(FeatureList, path), path


def ehr_columns(flist: FeatureList, with_vitals: bool) -> list[str]:
    """The columns of ehr.parquet, in order."""
    cols = list(BASE_COLUMNS)
    for name in list(flist.features) + (list(flist.vitals) if with_vitals else []):
        cols += [name, f"{name}_hours"]
    return cols + list(flist.outcomes)


# ----------------------------------------------------------------------------------------------------------
# Finding and checking the MIMIC-IV tables.


@dataclass
class Table:
    name: str
    path: Path
    columns: list[str]


def _find(root: Path, rel: str) -> Path | None:
    for ext in (".csv.gz", ".csv"):
        if (root / f"{rel}{ext}").is_file():
            return root / f"{rel}{ext}"
    return None


def _header(path: Path) -> list[str]:
    """The column names: line 1 only, so that a bad byte further down is reported where it is, not here."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            line = f.readline()
    except (OSError, EOFError, zlib.error) as e:
        if _is_compression_error(e):
            raise _damaged_gzip(path, e) from None
        raise RadalignError(f"{path}: cannot read its header ({e}); {RESTORE}") from None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RadalignError(f"{path}, line 1 (the header), character {e.start + 1}: byte 0x{line[e.start]:02x} is "
                            f"not UTF-8; {RESTORE}") from None
    return next(csv.reader([text.rstrip("\r\n")]), [])


# ----------------------------------------------------------------------------------------------------------
# Input errors as sentences (file, row, column, fix) instead of a reader's traceback.

RESTORE = "restore the file from the MIMIC-IV release (PhysioNet's SHA256SUMS.txt lists each file's checksum)"
UTF8_SCAN_LINES = 10_000_000   # how far `_bad_utf8_field` reads to name the column (an error path only)


def _is_compression_error(e: BaseException) -> bool:
    """A cut or damaged gzip stream (zlib, ISA-L, Arrow, DuckDB word it differently); not e.g. a full disk."""
    if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)):
        return True
    return isinstance(e, OSError) and bool(re.search(r"compress|gzip|zlib|inflate|crc", str(e), re.IGNORECASE))


def _damaged_gzip(path: Path, e: BaseException | None = None, rows: int | None = None) -> RadalignError:
    where = f", about {rows:,} data rows in" if rows else ""
    text = str(e or "")
    if e is None or isinstance(e, EOFError) or re.search(r"truncat|end of|ended", text, re.IGNORECASE):
        what = f"the gzip stream ends early{where} (the file was cut short: an interrupted download or copy)"
    else:
        what = f"the gzip data is damaged{where} ({text.splitlines()[0] if text else type(e).__name__})"
    return RadalignError(f"{path}: {what}; `gzip -t {path}` confirms it; {RESTORE}")


def _bad_utf8_field(path: Path, line: int) -> tuple[str, int] | None:
    """(column, byte) of the first field of physical line `line` (1 = the header) that is not UTF-8."""
    if not 1 < line <= UTF8_SCAN_LINES:
        return None
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            header = f.readline()
            raw = header
            for _ in range(line - 1):
                raw = f.readline()
    except (OSError, EOFError, zlib.error):
        return None
    names = next(csv.reader([header.decode("utf-8", "replace").rstrip("\r\n")]), [])
    fields = next(csv.reader([raw.decode("latin-1").rstrip("\r\n")]), [])
    for name, value in zip(names, fields):
        data = value.encode("latin-1")
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            return name, data[err.start]
    return None


def _not_utf8(path: Path, line: int) -> RadalignError:
    found = _bad_utf8_field(path, line)
    where = f", column {found[0]!r}: byte 0x{found[1]:02x} is" if found else ": a byte is"
    return RadalignError(
        f"{path}, line {line:,} (data row {line - 1:,}){where} not UTF-8 (MIMIC-IV is UTF-8: the copy is damaged "
        f"or was re-encoded); {RESTORE}, or convert it, e.g. `zcat {path.name} | iconv -f latin1 -t utf-8 | "
        f"gzip > fixed.csv.gz`")


def _size_bytes(size: str) -> float:
    """'512MB' -> 512e6, '2GiB' -> 2 * 2**30 (a size `_check_options` accepted)."""
    m = re.match(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B", size.upper())
    return float(m.group(1)) * (1024 if m.group(3) else 1000) ** " KMGT".index(m.group(2) or " ")


def _out_of_memory(e: BaseException, memory_limit: str) -> RadalignError:
    bigger = "2GB (the default)" if _size_bytes(memory_limit) < 2e9 else f"{2 * _size_bytes(memory_limit) / 1e9:g}GB"
    return RadalignError(f"DuckDB ran out of memory under --memory-limit {memory_limit} ({str(e).splitlines()[0]}); "
                         f"raise it, e.g. --memory-limit {bigger}, or lower --threads (each thread holds buffers)")


def _input_error(e: BaseException, memory_limit: str) -> RadalignError | None:
    """A sentence for a DuckDB error met while reading the tables (None: not one we know)."""
    import duckdb

    text = str(e)
    if isinstance(e, duckdb.OutOfMemoryException):
        return _out_of_memory(e, memory_limit)
    cut = re.search(r"Unexpected end of GZIP stream: (.+)$", text, re.MULTILINE)
    if cut:
        return _damaged_gzip(Path(cut.group(1).strip()))
    line = re.search(r"CSV Error on Line: (\d+)", text)
    file = re.search(r"^\s*file = (.+)$", text, re.MULTILINE)
    if "Invalid unicode" in text and line and file:
        return _not_utf8(Path(file.group(1).strip()), int(line.group(1)))
    return None


def find_tables(mimic_iv: str | os.PathLike, *, vitals: bool) -> dict[str, Table]:
    """The tables link-ehr reads under `mimic_iv` (the folder holding hosp/ and icu/), header-checked.

    A missing table or column: one RadalignError listing each (file, column, what was expected).
    chartevents/d_items are looked for only when `vitals`; absent, the vitals block is left out.
    """
    root = Path(mimic_iv)
    if not root.is_dir():
        raise RadalignError(f"--mimic-iv {root}: no such folder; point at the MIMIC-IV folder that holds hosp/")
    if not (root / "hosp").is_dir() and (root / "labevents.csv.gz").is_file():
        raise RadalignError(f"--mimic-iv {root}: this looks like hosp/ itself; point at its parent (the folder "
                            "that holds hosp/ and icu/)")
    wanted = dict(TABLES)
    if vitals:
        wanted.update({k: v for k, v in OPTIONAL_TABLES.items() if _find(root, v[0]) is not None})
    problems, tables = [], {}
    for name, (rel, columns) in wanted.items():
        path = _find(root, rel)
        if path is None:
            problems.append(f"{root / rel}.csv.gz: missing; expected the MIMIC-IV {name} table with columns "
                            f"{', '.join(columns)}")
            continue
        header = _header(path)
        for col in columns:
            if col not in header:
                close = difflib.get_close_matches(col, header, n=1)
                hint = f" (found {close[0]!r})" if close else ""
                problems.append(f"{path}: no column {col!r}{hint}; expected the MIMIC-IV {name} columns "
                                f"{', '.join(columns)}")
        tables[name] = Table(name, path, header)
    if problems:
        raise RadalignError("MIMIC-IV input is incomplete:\n" + "\n".join(f"  - {p}" for p in problems))
    return tables


# ----------------------------------------------------------------------------------------------------------
# Studies from the shards' json members.


def _subject_int(value, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise RadalignError(f"{where}: subject/study id {value!r} is not a MIMIC integer id; link-ehr joins "
                        "MIMIC-CXR shards (from `radalign data prepare`) to MIMIC-IV")


def _parse_t0(value) -> datetime | None:
    if value in (None, ""):
        return None
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def read_studies(shards: str | os.PathLike, *, progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """One row per study in the shards (all splits) and counts.

    Columns: subject_id, study_id, split, study_datetime (NaT when absent), dicom_ids (frontal images), the 14
    labels, indication. t0 is the earliest image time of the study (images of a study normally share it).
    """
    from tqdm import tqdm

    listed = list_shards(shards)
    counts = Counter(images_in_manifest=sum(e.samples for e in listed), bad_json=0)
    studies: dict[tuple[int, int], dict] = {}
    for entry in tqdm(listed, desc="shards", unit="shard", disable=not progress):
        for sample in scan_meta([entry.path], split=entry.split, bad=counts):
            _add_image(studies, sample.meta, entry.split, sample.shard, counts)
    rows = []
    for st in studies.values():
        times = sorted(t for t in st.pop("times") if t is not None)
        if len(set(times)) > 1:
            counts["studies_with_differing_image_times"] += 1
        rows.append({**st, "study_datetime": times[0] if times else None})
    frame = pd.DataFrame(rows, columns=["subject_id", "study_id", "split", "study_datetime", "dicom_ids",
                                        *CHEXPERT_LABELS, "indication"])
    frame["study_datetime"] = pd.to_datetime(frame["study_datetime"]).astype("datetime64[us]")
    frame = frame.sort_values(["subject_id", "study_id"], kind="stable").reset_index(drop=True)
    counts["studies"] = len(frame)
    counts["studies_without_frontal_image"] = int((frame["dicom_ids"].map(len) == 0).sum())
    return frame, dict(counts)


def _add_image(studies: dict, rec: dict, split: str, where: str, counts: Counter) -> None:
    counts["images"] += 1
    key = (_subject_int(rec.get("subject_id"), where), _subject_int(rec.get("study_id"), where))
    raw = rec.get("study_datetime")
    t0 = _parse_t0(raw)
    if raw not in (None, "") and t0 is None:
        counts["images_with_unparseable_datetime"] += 1
    st = studies.get(key)
    if st is None:
        labels = rec.get("labels") or {}
        indication = (rec.get("sections") or {}).get("indication") or None
        st = studies[key] = {"subject_id": key[0], "study_id": key[1], "split": rec.get("split") or split,
                             "dicom_ids": [], "times": [], "indication": indication,
                             **{n: (None if labels.get(n) is None else float(labels[n])) for n in CHEXPERT_LABELS}}
    elif st["split"] != (rec.get("split") or split):
        raise RadalignError(f"{where}: study {key[1]} appears in splits {st['split']!r} and {rec.get('split')!r}; "
                            "the shards must split by patient (re-run `radalign data prepare`)")
    st["times"].append(t0)
    if str(rec.get("view") or "").upper() in FRONTAL_VIEWS:
        st["dicom_ids"].append(str(rec.get("dicom_id")))
    else:
        counts["non_frontal_images"] += 1


# ----------------------------------------------------------------------------------------------------------
# DuckDB: connection, CSV reading, the Parquet cache.


def _q(text) -> str:
    """A SQL string literal."""
    return "'" + str(text).replace("'", "''") + "'"


def _c(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# TRY_CAST over a bare CSV column is pushed into the CSV scanner as a hard cast by DuckDB 2.0 (duckdb#23818,
# open): a stray `___` would abort the read. trim() keeps the cast in the projection, where it yields NULL.
def _int(col: str) -> str:
    return f"TRY_CAST(trim({_c(col)}) AS BIGINT)"


def _num(col: str) -> str:
    return f"TRY_CAST(trim({_c(col)}) AS DOUBLE)"


def _ts(col: str) -> str:
    return f"TRY_CAST(trim({_c(col)}) AS TIMESTAMP)"


def _do(con, sql: str) -> list:
    """Run one statement to completion (DuckDB 2 refuses new work while a result is unfetched)."""
    return con.execute(sql).fetchall()


def csv_sql(table: Table) -> str:
    """read_csv over `table` with every column VARCHAR (types are applied by TRY_CAST, never guessed)."""
    cols = ", ".join(f"{_q(c)}: 'VARCHAR'" for c in table.columns)
    return (f"read_csv({_q(table.path)}, header=true, auto_detect=false, delim=',', quote='\"', escape='\"', "
            f"columns={{{cols}}})")


def connect(memory_limit: str, temp_dir: Path, threads: int = 0, progress: bool = False):
    import duckdb

    temp_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(":memory:")
    _do(con, f"SET memory_limit = {_q(memory_limit)}")
    _do(con, f"SET temp_directory = {_q(temp_dir)}")
    _do(con, "SET preserve_insertion_order = false")
    # DuckDB >= 1.3 keeps every Parquet block it read in an in-memory file cache outside memory_limit's spill
    # logic: with it on, peak RSS grew with the size of the labs Parquet (the bench's 10^7 rows: +180 MB).
    _do(con, "SET enable_external_file_cache = false")
    if threads:
        _do(con, f"SET threads = {int(threads)}")
    _do(con, f"SET enable_progress_bar = {'true' if progress else 'false'}")
    return con


def _itemhash(itemids) -> str:
    return hashlib.sha256(",".join(str(i) for i in sorted(itemids)).encode()).hexdigest()[:12]


def events_parquet(con, table: Table, cache_dir: Path, itemids=None) -> tuple[Path, dict]:
    """`table` (labevents / chartevents) as a typed Parquet file in `cache_dir`, converted once.

    Keyed by the CSV's size and mtime (and, when `itemids` filters the rows, by those itemids): a changed
    input is converted again, and older conversions of the same table are removed. Returns (path, info).
    The conversion streams (`_arrow_convert`); a file the strict typed reader refuses is converted by DuckDB.
    """
    from radalign.io import atomic_path, atomic_write_json

    st = table.path.stat()
    where_from = hashlib.sha256(str(table.path.resolve()).encode()).hexdigest()[:8]  # two releases can share a cache
    tag = f"{table.name}-{where_from}-{st.st_size}-{st.st_mtime_ns}-v{CACHE_VERSION}"
    tag += f"-items{_itemhash(itemids)}" if itemids else ""
    target, meta = cache_dir / f"{tag}.parquet", cache_dir / f"{tag}.json"
    if target.is_file() and meta.is_file():
        return target, {**json.loads(meta.read_text()), "cache": "hit", "path": str(target)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with atomic_path(target) as tmp:
        try:
            rows, engine = _arrow_convert(table, tmp, itemids), "arrow"
        except _StrictParseError as e:
            log.info(f"{table.path}: {e}; converting with DuckDB's tolerant reader instead (slower)")
            rows, engine = _duckdb_convert(con, table, tmp, itemids), "duckdb"
    info = {"source": str(table.path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "rows": int(rows),
            "filtered_itemids": sorted(int(i) for i in itemids) if itemids else None,
            "convert_seconds": round(time.perf_counter() - t, 3), "engine": engine}
    atomic_write_json(meta, info)
    for old in cache_dir.glob(f"{table.name}-{where_from}-*"):
        if old.name not in (target.name, meta.name) and not old.name.startswith("."):
            old.unlink(missing_ok=True)
    return target, {**info, "cache": "miss", "path": str(target)}


class _StrictParseError(Exception):
    """The typed Arrow reader met a value it will not coerce (e.g. `___` where a number belongs)."""


EVENT_TYPES = {"subject_id": "int64", "hadm_id": "int64", "stay_id": "int64", "itemid": "int64",
               "charttime": "timestamp[us]", "storetime": "timestamp[us]", "valuenum": "float64"}
ROW_GROUP_ROWS = 1 << 19   # ~20 MB of typed columns: bounded memory, and row groups enough for parallel scans
CSV_BLOCK_BYTES = 1 << 20  # Arrow's CSV read block: what the reader holds besides the pending row group


def _event_columns(table: Table) -> list[str]:
    return [c for c in EVENT_TYPES if c in table.columns]


def _csv_stream(path: Path):
    """The CSV bytes of `path`. Gzip is inflated in a thread of its own so that parsing overlaps it: by ISA-L
    (`isal`, 2x zlib's speed) when installed, else by Arrow's zlib stream (its read-ahead thread)."""
    import pyarrow as pa

    if path.suffix != ".gz":
        return pa.OSFile(str(path), "rb")
    try:
        from isal import igzip_threaded
    except ImportError:
        return pa.input_stream(str(path), compression="gzip", buffer_size=1 << 20)
    return pa.PythonFile(igzip_threaded.open(path, "rb", threads=1), mode="r")


def _arrow_convert(table: Table, out: Path, itemids=None) -> int:
    """Stream `table` into the Parquet file `out` (only the columns link-ehr reads, typed); returns rows.

    Why not DuckDB's reader here: every column must be read as VARCHAR and TRY_CAST (duckdb#23818, see `_int`),
    which took 27 CPU-s for 10^7 gzipped lab rows against 13 for this stream (bench/ehr.py); and DuckDB inflates
    gzip on the same thread that parses. Memory is one row group plus Arrow's 1 MB blocks, whatever the size.
    Raises _StrictParseError on a value the typed reader refuses (the caller falls back to DuckDB).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    cols = _event_columns(table)
    types = {c: pa.type_for_alias(EVENT_TYPES[c]) for c in cols}
    keep = pa.array(sorted(int(i) for i in itemids), pa.int64()) if itemids else None
    src = _csv_stream(table.path)
    rows, pending, n_pending, read = 0, [], 0, 0
    try:
        reader = pcsv.open_csv(src, read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES, use_threads=True),
                               parse_options=pcsv.ParseOptions(newlines_in_values=True),
                               convert_options=pcsv.ConvertOptions(include_columns=cols, column_types=types))
        schema = pa.schema([(c, types[c]) for c in cols])
        with pq.ParquetWriter(str(out), schema, compression="zstd") as writer:
            for batch in reader:
                read += batch.num_rows
                if keep is not None:
                    batch = batch.filter(pc.is_in(batch["itemid"], value_set=keep))
                pending.append(batch)
                n_pending += batch.num_rows
                if n_pending >= ROW_GROUP_ROWS:
                    rows, n_pending = rows + _flush(writer, pending), 0
            rows += _flush(writer, pending)
    except pa.ArrowInvalid as e:
        raise _StrictParseError(str(e).splitlines()[0]) from None
    except (OSError, EOFError, zlib.error) as e:
        if not _is_compression_error(e):
            raise
        raise _damaged_gzip(table.path, e, rows=read) from None
    finally:
        src.close()
    return rows


def _flush(writer, pending: list) -> int:
    import pyarrow as pa

    if not pending:
        return 0
    chunk = pa.Table.from_batches(pending)
    writer.write_table(chunk, row_group_size=len(chunk))
    pending.clear()
    return len(chunk)


def _duckdb_convert(con, table: Table, out: Path, itemids=None) -> int:
    """The tolerant conversion: every column VARCHAR, TRY_CAST(trim()) (a bad value becomes NULL)."""
    where = f"WHERE {_int('itemid')} IN ({', '.join(str(int(i)) for i in itemids)})" if itemids else ""
    extra = f", {_int('stay_id')} AS stay_id" if "stay_id" in _event_columns(table) else ""
    _do(con, f"""COPY (SELECT {_int('subject_id')} AS subject_id, {_int('hadm_id')} AS hadm_id{extra},
                        {_int('itemid')} AS itemid, {_ts('charttime')} AS charttime,
                        {_ts('storetime')} AS storetime, {_num('valuenum')} AS valuenum
                 FROM {csv_sql(table)} {where}) TO {_q(out)} (FORMAT parquet, COMPRESSION zstd)""")
    return con.execute(f"SELECT count(*) FROM read_parquet({_q(out)})").fetchall()[0][0]


def check_itemids(con, items: dict[str, int], table: Table, block: str) -> int:
    """Every itemid of `items` must be in `table` (d_labitems / d_items); else one error with the closest labels.
    Returns the number of rows of the dictionary table."""
    rows = con.execute(f"SELECT {_int('itemid')}, label FROM {csv_sql(table)}").fetchall()
    labels = {int(i): str(lab) for i, lab in rows if i is not None}
    problems = []
    for name, itemid in items.items():
        if int(itemid) in labels:
            continue
        words = name.replace("_", " ")
        by_lower = {v.lower(): (k, v) for k, v in labels.items()}
        close = difflib.get_close_matches(words.lower(), list(by_lower), n=5, cutoff=0.3)
        hint = ", ".join(f"{by_lower[c][1]} ({by_lower[c][0]})" for c in close) or "(none close)"
        problems.append(f"{block}.{name}: itemid {itemid} is not in {table.path}; closest labels: {hint}")
    if problems:
        raise RadalignError("feature list names unknown itemids:\n" + "\n".join(f"  - {p}" for p in problems))
    return len(rows)


# ----------------------------------------------------------------------------------------------------------
# The link itself.


def _load_small_tables(con, tables: dict[str, Table]) -> dict[str, int]:
    _do(con, f"""CREATE OR REPLACE TEMP TABLE pat AS
        SELECT {_int('subject_id')} AS subject_id, gender, TRY_CAST(trim(anchor_age) AS INTEGER) AS anchor_age,
               TRY_CAST(trim(anchor_year) AS INTEGER) AS anchor_year, CAST({_ts('dod')} AS DATE) AS dod
        FROM {csv_sql(tables['patients'])}
        QUALIFY row_number() OVER (PARTITION BY subject_id ORDER BY anchor_year) = 1""")
    # The span (docs/ehr.md): real MIMIC-IV has edregtime after admittime, and in-hospital deaths discharged at
    # 00:00 with deathtime later that day; least/greatest skip NULLs (no ED visit, no death).
    _do(con, f"""CREATE OR REPLACE TEMP TABLE adm AS
        SELECT *, least(edregtime, admittime) AS span_start, greatest(dischtime, deathtime) AS span_end,
               (epoch_us(dischtime) - epoch_us(admittime)) / 86400e6 AS los
        FROM (SELECT {_int('subject_id')} AS subject_id, {_int('hadm_id')} AS hadm_id,
                     {_ts('admittime')} AS admittime, {_ts('dischtime')} AS dischtime,
                     {_ts('deathtime')} AS deathtime, {_ts('edregtime')} AS edregtime,
                     TRY_CAST(trim(hospital_expire_flag) AS INTEGER) AS hospital_expire_flag,
                     race, insurance, marital_status, language
              FROM {csv_sql(tables['admissions'])})""")
    n = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ("pat", "adm")}
    bad = con.execute("SELECT count(*) FROM adm WHERE span_start IS NULL OR span_end IS NULL").fetchall()[0][0]
    return {"patients": int(n["pat"]), "admissions": int(n["adm"]), "admissions_without_times": int(bad)}


def _register_studies(con, studies: pd.DataFrame, window_hours: float) -> None:
    s = pd.DataFrame({"study_key": np.arange(len(studies), dtype=np.int64),
                      "subject_id": studies["subject_id"].astype("int64"), "t0": studies["study_datetime"]})
    con.register("studies_in", s)
    window_us = int(round(window_hours * 3600e6))
    _do(con, f"""CREATE OR REPLACE TEMP TABLE s AS
        SELECT study_key, subject_id, CAST(t0 AS TIMESTAMP) AS t0,
               CAST(t0 AS TIMESTAMP) - to_microseconds({window_us}) AS t_lo
        FROM studies_in WHERE t0 IS NOT NULL""")
    con.unregister("studies_in")


def _admission_frame(con) -> pd.DataFrame:
    """Per study with t0: linked admission, demographics admission, patient fields (NULLs when absent).

    Linked: among the admissions whose span contains t0, the latest one already admitted (admittime <= t0);
    when none is (an ED film before any admittime), the earliest admittime; ties: the larger hadm_id.
    hadm_ids are not in time order, so they only break ties of equal times.
    """
    admitted = "coalesce(a.admittime <= s.t0, false)"
    _do(con, f"""CREATE OR REPLACE TEMP TABLE link AS
        SELECT s.study_key, a.hadm_id, a.admittime, a.dischtime, a.hospital_expire_flag, a.los,
               a.race, a.insurance, a.marital_status, a.language
        FROM s JOIN adm a ON a.subject_id = s.subject_id AND a.span_start <= s.t0 AND s.t0 <= a.span_end
        QUALIFY row_number() OVER (PARTITION BY s.study_key ORDER BY {admitted} DESC,
            CASE WHEN {admitted} THEN a.admittime END DESC NULLS LAST, a.admittime ASC NULLS LAST,
            a.hadm_id DESC) = 1""")
    _do(con, """CREATE OR REPLACE TEMP TABLE prior AS
        SELECT s.study_key, a.race, a.insurance, a.marital_status, a.language
        FROM s JOIN adm a ON a.subject_id = s.subject_id AND a.span_start < s.t0
        QUALIFY row_number() OVER (PARTITION BY s.study_key ORDER BY a.span_start DESC, a.hadm_id DESC) = 1""")
    demo = ", ".join(f"CASE WHEN l.study_key IS NULL THEN d.{c} ELSE l.{c} END AS {c}"
                     for c in ADMISSION_DEMOGRAPHICS)
    return con.execute(f"""
        SELECT s.study_key, s.t0, l.hadm_id, l.admittime, l.dischtime, l.hospital_expire_flag, l.los,
               p.subject_id IS NOT NULL AS in_patients, p.gender, p.anchor_age + year(s.t0) - p.anchor_year AS age,
               p.dod, CAST(s.t0 AS DATE) AS t0_date, {demo}
        FROM s LEFT JOIN link l USING (study_key) LEFT JOIN pat p ON p.subject_id = s.subject_id
               LEFT JOIN prior d USING (study_key)""").df()


def latest_values(con, parquet: Path, items: dict[str, int]) -> tuple[pd.DataFrame, dict]:
    """Latest available numeric value per (study, item name): long frame [study_key, name, value, hours,
    outpatient] and per-name counts of in-window events skipped (not yet resulted at t0; non-numeric).

    The range join yields the in-window candidates (events x the subject's studies); one window per (study,
    item) ranks them (usable first, then charttime, available time, value, all descending) and counts the
    skipped ones. Why a window and not `arg_max(struct, struct)` in a hash aggregate: its struct states
    were the largest allocation of the link (bench/ehr.py, 10^7 lab rows: +280 MB of RSS against +170 MB); the window's sort spills to `temp_directory` under `memory_limit`.
    """
    values = ", ".join(f"({_q(n)}, {int(i)})" for n, i in items.items())
    ids = ", ".join(str(int(i)) for i in items.values())
    _do(con, f"CREATE OR REPLACE TEMP TABLE items AS SELECT * FROM (VALUES {values}) t(name, itemid)")
    ready = "coalesce(e.storetime, e.charttime) <= s.t0"
    usable = f"({ready} AND e.valuenum IS NOT NULL)"
    agg = con.execute(f"""
        SELECT study_key, name, CASE WHEN usable THEN v END AS value,
               (epoch_us(t0) - epoch_us(c)) / 3600e6 AS hours, o AS outpatient, late, nonnum
        FROM (SELECT s.study_key, i.name, s.t0, e.valuenum AS v, e.charttime AS c, e.hadm_id IS NULL AS o,
                     {usable} AS usable,
                     count(*) FILTER (WHERE NOT ({ready})) OVER w AS late,
                     count(*) FILTER (WHERE {ready} AND e.valuenum IS NULL) OVER w AS nonnum,
                     row_number() OVER (w ORDER BY {usable} DESC, e.charttime DESC,
                                        coalesce(e.storetime, e.charttime) DESC, e.valuenum DESC) AS rank
              FROM (SELECT subject_id, hadm_id, itemid, charttime, storetime, valuenum
                    FROM read_parquet({_q(parquet)}) WHERE itemid IN ({ids})) e
              JOIN items i ON e.itemid = i.itemid
              JOIN s ON e.subject_id = s.subject_id AND e.charttime >= s.t_lo AND e.charttime < s.t0
              WINDOW w AS (PARTITION BY s.study_key, i.name))
        WHERE rank = 1""").df()
    skipped = {n: {"not_yet_resulted": 0, "non_numeric": 0} for n in items}
    for name, part in agg.groupby("name"):
        skipped[name] = {"not_yet_resulted": int(part["late"].sum()), "non_numeric": int(part["nonnum"].sum())}
    best = agg[agg["value"].notna()][["study_key", "name", "value", "hours", "outpatient"]]
    return best.reset_index(drop=True), skipped


def _table_counts(con, parquet: Path, items: dict[str, int]) -> dict:
    """Table-wide: rows of unknown subjects, non-numeric rows per item."""
    unknown = con.execute(f"""SELECT count(*) FROM read_parquet({_q(parquet)}) e
        WHERE NOT EXISTS (SELECT 1 FROM pat p WHERE p.subject_id = e.subject_id)""").fetchall()[0][0]
    ids = ", ".join(str(int(i)) for i in items.values())
    nonnum = dict(con.execute(f"""SELECT itemid, count(*) FROM read_parquet({_q(parquet)})
        WHERE itemid IN ({ids}) AND valuenum IS NULL GROUP BY itemid""").fetchall())
    bad_time = con.execute(f"SELECT count(*) FROM read_parquet({_q(parquet)}) WHERE charttime IS NULL "
                           "OR subject_id IS NULL OR itemid IS NULL").fetchall()[0][0]
    return {"rows_of_subjects_absent_from_patients": int(unknown),
            "rows_without_subject_itemid_or_charttime": int(bad_time),
            "non_numeric_rows": {n: int(nonnum.get(i, 0)) for n, i in items.items()}}


def _days_to_death(adm: pd.DataFrame) -> pd.Series:
    """patients.dod - date(t0) in whole days (NaN without a dod, a t0 or a patients row)."""
    return (pd.to_datetime(adm["dod"]) - pd.to_datetime(adm["t0_date"])).dt.days


def _after_death(adm: pd.DataFrame) -> pd.Series:
    """Films dated after the patient's death date (real MIMIC-IV has some): their death outcome is unknown."""
    return (adm["in_patients"].fillna(False).astype(bool) & (_days_to_death(adm) < 0)).fillna(False)


def _outcome(spec: OutcomeSpec, adm: pd.DataFrame) -> pd.Series:
    if spec.kind == "in_hospital_mortality":
        return adm["hospital_expire_flag"].astype("Int64")
    if spec.kind == "los_days":
        return adm["los"].astype("float64")
    days = _days_to_death(adm)
    in_patients = adm["in_patients"].fillna(False).astype(bool)   # False for studies without t0 too
    out = pd.Series(pd.NA, index=adm.index, dtype="Int64")
    out[in_patients & adm["dod"].isna()] = 0
    known = in_patients & days.notna() & ~_after_death(adm)       # a death on the film's own date is day 0
    out[known] = (days[known] <= spec.days).astype("int64")
    return out


def link_studies(con, studies: pd.DataFrame, tables: dict[str, Table], flist: FeatureList, *,
                 window_hours: float, labs: Path, vitals: Path | None) -> tuple[pd.DataFrame, dict]:
    """The study-level frame (columns `ehr_columns`) and the counts for the manifest."""
    counts: dict = {"rows_scanned": _load_small_tables(con, tables)}
    _register_studies(con, studies, window_hours)
    adm = _admission_frame(con).set_index("study_key")
    frame = studies[["subject_id", "study_id", "split", "study_datetime"]].copy()
    key = np.arange(len(frame))
    adm = adm.reindex(key)
    for col in ("hadm_id", "admittime", "dischtime", *DEMOGRAPHICS):
        frame[col] = adm[col].to_numpy()
    blocks = [("features", flist.features, labs)] + ([("vitals", flist.vitals, vitals)] if vitals else [])
    coverage, skipped, outpatient = {}, {}, {}
    has_t0 = frame["study_datetime"].notna()
    for _block, items, parquet in blocks:
        best, skip = latest_values(con, parquet, items)
        skipped.update(skip)
        for name in items:
            b = best[best["name"] == name].set_index("study_key")
            frame[name] = b["value"].reindex(key).to_numpy(dtype="float64")
            frame[f"{name}_hours"] = b["hours"].reindex(key).to_numpy(dtype="float64")
            n = int(frame[name].notna().sum())
            coverage[name] = {"studies": n, "fraction": round(n / max(int(has_t0.sum()), 1), 4)}
            outpatient[name] = int(b["outpatient"].sum())
    for name, spec in flist.outcome_specs().items():
        frame[name] = _outcome(spec, adm).to_numpy()
    in_pat = adm["in_patients"].astype("boolean")
    absent = has_t0 & ~in_pat.fillna(True).to_numpy(dtype=bool)
    absent_all = ~frame["subject_id"].isin(con.execute("SELECT subject_id FROM pat").df()["subject_id"])
    counts.update(
        studies=len(frame), studies_per_split={s: int((frame["split"] == s).sum()) for s in frame["split"].unique()},
        studies_without_datetime=int((~has_t0).sum()),
        studies_no_admission=int((has_t0 & frame["hadm_id"].isna()).sum()),
        subjects_absent_from_patients=int(frame.loc[absent_all, "subject_id"].nunique()),
        studies_of_subjects_absent_from_patients=int(absent.sum()),
        films_after_death=int(_after_death(adm).sum()),
        feature_coverage=coverage, skipped_events=skipped, values_from_draws_without_hadm_id=outpatient)
    deaths = [n for n, spec in flist.outcome_specs().items() if spec.kind == "mortality_within_days"]
    if counts["films_after_death"] and deaths:
        log.warning(f"{counts['films_after_death']} film(s) dated after the patient's death date (patients.dod): "
                    f"{', '.join(deaths)} left null for them, never 0 or 1 (manifest: films_after_death)")
    return _typed(frame, flist, vitals is not None), counts


def _typed(frame: pd.DataFrame, flist: FeatureList, with_vitals: bool) -> pd.DataFrame:
    ints = ["subject_id", "study_id", "hadm_id", "age"] + [n for n, s in flist.outcome_specs().items()
                                                           if s.kind != "los_days"]
    for col in ints:
        frame[col] = pd.array(frame[col], dtype="Int64") if frame[col].dtype == object else frame[col].astype("Int64")
    for col in ("study_datetime", "admittime", "dischtime"):
        frame[col] = pd.to_datetime(frame[col]).astype("datetime64[us]")
    for col in ("split", *CATEGORICAL_DEMOGRAPHICS):
        frame[col] = frame[col].astype(object).where(frame[col].notna(), None)
    return frame[ehr_columns(flist, with_vitals)]


# ----------------------------------------------------------------------------------------------------------
# Output: ehr.parquet, finetune/, manifest.json.


def arrow_schema(columns: list[str], flist: FeatureList):
    import pyarrow as pa

    types = {"subject_id": pa.int64(), "study_id": pa.int64(), "split": pa.string(), "hadm_id": pa.int64(),
             "study_datetime": pa.timestamp("us"), "admittime": pa.timestamp("us"), "dischtime": pa.timestamp("us"),
             "age": pa.int64(), "dicom_ids": pa.list_(pa.string()), "indication": pa.string()}
    for name, spec in flist.outcome_specs().items():
        types[name] = pa.float64() if spec.kind == "los_days" else pa.int64()
    fields = []
    for c in columns:
        t = types.get(c, pa.string() if c in BASE_COLUMNS else pa.float64())
        fields.append(pa.field(c, t))
    return pa.schema(fields)


def write_parquet(frame: pd.DataFrame, path: Path, flist: FeatureList) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from radalign.io import atomic_path

    table = pa.Table.from_pandas(frame, schema=arrow_schema(list(frame.columns), flist), preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_finetune(frame: pd.DataFrame, studies: pd.DataFrame, path: Path, flist: FeatureList) -> dict[str, int]:
    """OUT/finetune: a DatasetDict (train/validate/test, the shards' patient split) saved to disk."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    from radalign.io import atomic_path

    full = frame.copy()
    for col in FINETUNE_EXTRA:
        full[col] = studies[col].to_numpy() if col != "dicom_ids" else studies[col].map(list).to_numpy()
    for col in CHEXPERT_LABELS:
        full[col] = pd.to_numeric(full[col], errors="coerce").astype("float64")
    schema = arrow_schema(list(full.columns), flist)
    splits = {}
    for split in SPLITS:
        part = full[full["split"] == split]
        table = pa.Table.from_pandas(part, schema=schema, preserve_index=False)
        splits[split] = datasets.Dataset(InMemoryTable(table))
    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per split of a few-second save is noise
    try:
        with atomic_path(path) as tmp:
            datasets.DatasetDict(splits).save_to_disk(str(tmp))
    finally:
        if was_on:
            datasets.enable_progress_bars()
    return {k: len(v) for k, v in splits.items()}


# ----------------------------------------------------------------------------------------------------------
# The command.


def _fingerprint(tables: dict[str, Table]) -> dict:
    return {name: {"path": str(t.path), "bytes": t.path.stat().st_size, "mtime_ns": t.path.stat().st_mtime_ns}
            for name, t in tables.items()}


def _check_options(window_hours: float, memory_limit: str, shards: Path) -> None:
    problems = []
    if not (isinstance(window_hours, (int, float)) and 0 < window_hours <= 24 * 365):
        problems.append(f"--window-hours {window_hours}: must be a number of hours > 0 (e.g. 24)")
    if not _MEMORY.match(str(memory_limit)):
        problems.append(f"--memory-limit {memory_limit!r}: give a size like 2GB or 512MB")
    if not (shards / "manifest.json").is_file():
        problems.append(f"--shards {shards}: no manifest.json; point at the --out folder of `radalign data prepare`")
    if problems:
        raise RadalignError("link-ehr options:\n" + "\n".join(f"  - {p}" for p in problems))


def _previous(out: Path, options: dict, inputs: dict, overwrite: bool) -> dict | None:
    """The existing manifest when OUT already holds this exact link (then nothing is redone; a link made by an
    older rule is redone); raises when OUT holds a link made with other options and `overwrite` is off."""
    file = out / "manifest.json"
    if not file.is_file():
        return None
    try:
        old = json.loads(file.read_text())
    except (OSError, ValueError):
        old = {}
    if old.get("format") != MANIFEST_FORMAT:  # e.g. the shards folder itself: never overwritten, not even so
        raise RadalignError(f"{out} holds a manifest.json that is not a link-ehr output "
                            f"(format {old.get('format')!r}); choose another --out")
    if overwrite:
        return None
    differ = [k for k in options if old.get("options", {}).get(k) != options[k]]
    if differ:
        desc = ", ".join(f"{k}: {old.get('options', {}).get(k)!r} -> {options[k]!r}" for k in differ)
        raise RadalignError(f"{out} holds a link-ehr output made with other options ({desc}); pass --overwrite "
                            "to replace it, or choose another --out")
    if old.get("inputs") == inputs and old.get("rule_version") == RULE_VERSION:
        return old
    return None


def link_ehr(mimic_iv: str | os.PathLike, shards: str | os.PathLike, out: str | os.PathLike, *,
             features: str | os.PathLike = "ehr/core", window_hours: float = 24.0, memory_limit: str = "2GB",
             cache: str | os.PathLike | None = None, threads: int = 0, overwrite: bool = False,
             progress: bool = False) -> dict:
    """Write OUT/ehr.parquet, OUT/finetune/ and OUT/manifest.json; returns the manifest (module docstring)."""
    from radalign.io import atomic_write_json
    from radalign.lock import output_lock

    t_start = time.perf_counter()
    out, shards = Path(out), Path(shards)
    _check_options(window_hours, memory_limit, shards)
    flist, flist_path = load_feature_list(features)
    tables = find_tables(mimic_iv, vitals=bool(flist.vitals))
    options = {"mimic_iv": str(Path(mimic_iv).resolve()), "shards": str(shards.resolve()),
               "window_hours": float(window_hours), "features": dataclasses.asdict(flist)}
    inputs = {**_fingerprint(tables), "shards_manifest": _fingerprint(
        {"m": Table("m", shards / "manifest.json", [])})["m"]}
    with output_lock(out):
        old = _previous(out, options, inputs, overwrite)
        if old is not None:
            log.info(f"{out}: already linked with these options and inputs; nothing to do (--overwrite redoes it)")
            return old
        (out / "manifest.json").unlink(missing_ok=True)  # from here on OUT is incomplete until the new manifest
        cache_dir = Path(cache) if cache else out / "cache"
        seconds: dict[str, float] = {}
        t = time.perf_counter()
        studies, study_counts = read_studies(shards, progress=progress)
        seconds["read_shards"] = round(time.perf_counter() - t, 3)
        with output_lock(cache_dir, what="cache folder"):
            manifest = _link_and_write(out, cache_dir, studies, study_counts, tables, flist, window_hours,
                                       memory_limit, threads, progress, seconds)
        manifest.update(format=MANIFEST_FORMAT, rule_version=RULE_VERSION,
                        created=time.strftime("%Y-%m-%dT%H:%M:%S"), options=options,
                        feature_list=str(flist_path), memory_limit=memory_limit, inputs=inputs)
        seconds["total"] = round(time.perf_counter() - t_start, 3)
        manifest["seconds"] = seconds
        atomic_write_json(out / "manifest.json", manifest)
    return manifest


def link_frame(studies: pd.DataFrame, tables: dict[str, Table], flist: FeatureList, *, window_hours: float,
               cache_dir: Path, memory_limit: str = "2GB", threads: int = 0, progress: bool = False,
               seconds: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """The study-level frame for `studies` (subject_id, study_id, split, study_datetime) and the counts.

    The whole engine without the shards and the output folder: checks the itemids, converts (or reuses) the
    Parquet cache, runs the link in DuckDB under `memory_limit` (spilling to `cache_dir`). bench/ehr.py calls it.
    """
    seconds = {} if seconds is None else seconds
    tmpdir = cache_dir / f"duckdb-tmp-{os.getpid()}"
    con = connect(memory_limit, tmpdir, threads, progress)
    try:
        t = time.perf_counter()
        dict_rows = {"d_labitems": check_itemids(con, flist.features, tables["d_labitems"], "features")}
        if "chartevents" in tables and "d_items" in tables:
            dict_rows["d_items"] = check_itemids(con, flist.vitals, tables["d_items"], "vitals")
        labs, labs_info = events_parquet(con, tables["labevents"], cache_dir)
        vitals, vitals_info = None, None
        if "chartevents" in tables:
            vitals, vitals_info = events_parquet(con, tables["chartevents"], cache_dir, flist.vitals.values())
        seconds["convert_or_cache"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        frame, counts = link_studies(con, studies, tables, flist, window_hours=window_hours, labs=labs,
                                     vitals=vitals)
        counts["labevents"] = _table_counts(con, labs, flist.features)
        if vitals is not None:
            counts["chartevents"] = _table_counts(con, vitals, flist.vitals)
        seconds["link"] = round(time.perf_counter() - t, 3)
    except Exception as e:
        sentence = _input_error(e, memory_limit)
        if sentence is None:
            raise
        raise sentence from None
    finally:
        con.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    counts["rows_scanned"].update(dict_rows, labevents=labs_info["rows"])
    if vitals_info:
        counts["rows_scanned"]["chartevents_vitals_rows"] = vitals_info["rows"]
    counts["cache"] = {"labevents": labs_info, **({"chartevents": vitals_info} if vitals_info else {})}
    counts["with_vitals"] = vitals is not None
    return frame, counts


def _link_and_write(out, cache_dir, studies, study_counts, tables, flist, window_hours, memory_limit, threads,
                    progress, seconds) -> dict:
    frame, counts = link_frame(studies, tables, flist, window_hours=window_hours, cache_dir=cache_dir,
                               memory_limit=memory_limit, threads=threads, progress=progress, seconds=seconds)
    with_vitals = counts.pop("with_vitals")
    t = time.perf_counter()
    write_parquet(frame, out / "ehr.parquet", flist)
    per_split = write_finetune(frame, studies, out / "finetune", flist)
    seconds["write"] = round(time.perf_counter() - t, 3)
    counts["rows_scanned"]["shard_images"] = study_counts["images"]
    return {"features": list(flist.features), "feature_itemids": dict(flist.features),
            "vitals": list(flist.vitals) if with_vitals else [],
            "vitals_itemids": dict(flist.vitals) if with_vitals else {},
            "vitals_note": None if with_vitals else "no icu/chartevents under --mimic-iv: no vitals columns",
            "outcomes": {k: dataclasses.asdict(v) for k, v in flist.outcome_specs().items()},
            "columns": list(frame.columns), "rows_written": {"ehr.parquet": len(frame), "finetune": per_split},
            "shards": study_counts, **counts}


__all__ = ["link_ehr", "link_frame", "link_studies", "read_studies", "find_tables", "load_feature_list", "FeatureList",
           "OutcomeSpec", "ehr_columns", "events_parquet", "read_ehr", "MANIFEST_FORMAT", "TABLES"]

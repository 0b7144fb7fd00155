"""Write webdataset shards + manifest from MIMIC-CXR (`radalign data prepare`), any CSV (`prepare-csv`), or
DICOM files (`prepare-dicom`: MIMIC-CXR's DICOM layout, data/prepare_dicom.py, or a CSV whose images are .dcm).

Schema: docs/architecture.md §1. How it works:

1. Plan (main process, no pixels, no report text): one row per image with ids, split, view, datetime,
   labels and paths, from the config's source (`SOURCES`: `mimic-cxr` = data.mimic, `csv` =
   data.prepare_csv, `dicom` = data.prepare_dicom; a new input format is one `register_source(Source(...))`
   whose records function returns the same columns). Images outside `views` (and, for MIMIC, images missing from the split file) are
   set aside here. Each split is put in a fixed pseudo-random order (a hash of seed and key, so patients
   mix across shards and the order never depends on the input order) and cut into shards of `shard_size`.
2. Write (a process pool over shards; each worker writes whole shards): read report, parse sections, pick
   the training text, decode + grey + resize the image, write `jpg`/`txt`/`json` into the tar. Missing or
   unreadable images, missing reports and empty texts are skipped and reported back by id. A DICOM goes
   through `data.dicom` (header checks, then the MIMIC-CXR-JPG conversion); its refusals are skip reasons,
   and views/study times the plan lacks come from its header.
3. Record: a worker that finished a shard records it beside the tar (`.shard-NNNNNN.tar.done.json`,
   atomically); the main process folds each result into `OUT/prepare-state.json` (atomically) and drops the
   record, so a finished shard survives any interruption (Ctrl-C with several workers included: the next
   run folds in the records the main process never saw). At the end it writes `OUT/skipped.csv` (reason,
   id of every skipped item) and `OUT/manifest.json`.

Resume: a shard is reused when the plan assigns it the same keys (`keys_sha256`) and its tar has the
recorded size and sha256; anything else is rewritten. Shards are written to a temporary file and renamed,
so a tar that exists is complete. Re-running after an interruption gives the same manifest and the same
bytes. The whole run holds `radalign.lock.output_lock(OUT)`: one writer per folder.
Memory: the plan is a compact DataFrame; a worker holds one image at a time (`data.images`: pixel limit,
reduced JPEG decode, block-wise 16-bit rescale).

Heavy imports (pandas, PIL, webdataset) happen inside the functions so that `PrepareConfig` is cheap to
import (the CLI reads its field docs to build `--help`).
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING
from radalign.data.images import DEFAULT_MAX_PIXELS, target_size
from radalign.data.labels import CHEXPERT_LABELS, SPLITS
from radalign.data.sections import SECTION_KEYS, TEXT_MODES
from radalign.data.shards import MANIFEST_FORMAT

from radalign import RadalignError
from radalign.log import get_logger

# Workers log nothing above debug; the main process configures the logger in `prepare` (get_logger asks
# torch.distributed for the rank, and worker processes should not import torch).
log = logging.getLogger("radalign.data.prepare")

STATE_FORMAT = "radalign-prepare-state/1"
# `manifest["skipped"]` has exactly these keys (docs/architecture.md §1).
SKIP_REASONS = ("missing_image", "unreadable_image", "oversized_image", "missing_report", "empty_text",
                "filtered_view", "outside_root")
LABEL_SOURCES = ("chexpert", "negbio")
DICOM_OPTIONS = ("dicom", "tables", "dicom_transform", "modalities")  # recorded in options only for DICOM input


@dataclass
class PrepareConfig:
    out: str = MISSING
    """Output folder: manifest.json, {train,validate,test}/shard-NNNNNN.tar, skipped.csv, prepare-state.json."""
    mimic_cxr: Optional[str] = None
    """MIMIC-CXR-JPG root (holds mimic-cxr-2.0.0-*.csv.gz and files/). Give with `reports`; or use `csv`."""
    reports: Optional[str] = None
    """MIMIC-CXR reports root (holds files/p10/p10000032/s50414267.txt ...)."""
    labels: str = "chexpert"
    """MIMIC label file joined to each study: 'chexpert' (mimic-cxr-2.0.0-chexpert) or 'negbio'."""
    views: list[str] = field(default_factory=lambda: ["PA", "AP"])
    """ViewPosition values kept (MIMIC); other images count as skipped.filtered_view. ['all'] keeps every image."""
    csv: Optional[str] = None
    """prepare-csv: the CSV with one row per image (CheXpert, Open-i, in-house)."""
    image_col: Optional[str] = None
    """prepare-csv: column holding the image path (relative paths resolve against `image_root`)."""
    text_col: list[str] = field(default_factory=list)
    """prepare-csv: column(s) holding the report text; several are joined with a space (e.g. findings impression)."""
    label_cols: Optional[list[str]] = None
    """prepare-csv: label columns (CheXpert names, any case); None: every CheXpert label column the CSV has."""
    split_col: Optional[str] = None
    """prepare-csv: column with train/validate/test (val, valid read as validate); None: split by patient."""
    patient_col: Optional[str] = None
    """prepare-csv: patient id column (keeps a patient in one split); None: each row is its own patient."""
    study_col: Optional[str] = None
    """prepare-csv: study id column (images of one study are positives of each other); None: the row key."""
    image_root: Optional[str] = None
    """prepare-csv: folder that relative image paths resolve against; None: the CSV's folder."""
    allow_outside_root: bool = False
    """prepare-csv: keep image paths outside image_root (absolute, or with ..); by default they are skipped (outside_root)."""
    encoding: Optional[str] = None
    """prepare-csv: text encoding of the CSV (None: UTF-8; e.g. cp1252 for Excel exports, latin-1)."""
    val_fraction: float = 0.1
    """prepare-csv without a split column: share of patients put in validate."""
    test_fraction: float = 0.1
    """prepare-csv without a split column: share of patients put in test."""
    text: str = "findings+impression"
    """Training text: 'findings+impression' (falls back to the last paragraph), 'impression' or 'findings'."""
    image_size: int = 512
    """Short side of the stored JPEG in pixels (aspect kept; smaller images are stored as they are)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest image (width x height) decoded; JPEGs above it are decoded at 1/2-1/8 scale, others skipped (oversized_image)."""
    shard_size: int = 1000
    """Samples per shard (the last shard of a split, and shards with skipped items, hold fewer)."""
    workers: int = 1
    """Processes writing shards in parallel (1: in this process)."""
    jpeg_quality: int = 90
    """JPEG quality of the stored images (1-95)."""
    seed: int = 0
    """Seeds the sample order within each split and the patient split of prepare-csv."""
    dicom: bool = False
    """Images are DICOM files (set by `data prepare-dicom`): read and converted by data.dicom."""
    tables: Optional[str] = None
    """prepare-dicom, MIMIC layout: folder with mimic-cxr-2.0.0-{metadata,split,chexpert|negbio}.csv(.gz), each used when present; None: --mimic-cxr itself."""
    dicom_transform: str = "mimic"
    """prepare-dicom: 'mimic' (modality LUT, MONOCHROME1 inverted, min-max to 8 bits, histogram equalisation, the JPEG write at quality 95: as MIMIC-CXR-JPG) or 'voi-lut' (the header's window/VOI LUT, no equalisation)."""
    modalities: list[str] = field(default_factory=lambda: ["CR", "DX"])
    """prepare-dicom: DICOM Modality values read; others count as skipped.not_xray_modality (add DR where a site writes it)."""

    def validate(self) -> list[str]:
        problems = []
        mimic = self.mimic_cxr is not None or self.reports is not None
        if mimic and self.csv is not None:
            problems.append("csv: given together with mimic_cxr/reports; use `data prepare` for MIMIC-CXR or "
                            "`data prepare-csv` for a CSV, not both")
        elif mimic:
            for key in ("mimic_cxr", "reports"):
                if getattr(self, key) is None:
                    problems.append(f"{key}: required for MIMIC-CXR input; pass --{key.replace('_', '-')} DIR")
        elif self.csv is None:
            problems.append("mimic_cxr: no input; pass --mimic-cxr DIR --reports DIR, or use prepare-csv --csv FILE")
        else:
            if not self.image_col:
                problems.append("image_col: required with csv; pass --image-col COLUMN")
            if not self.text_col:
                problems.append("text_col: required with csv; pass --text-col COLUMN [COLUMN ...]")
        if self.text not in TEXT_MODES:
            close = difflib.get_close_matches(self.text, list(TEXT_MODES), n=1, cutoff=0.4)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(f"text: {self.text!r} is not a text mode; {hint}valid: {', '.join(TEXT_MODES)}")
        if self.labels not in LABEL_SOURCES:
            problems.append(f"labels: {self.labels!r}; valid: {', '.join(LABEL_SOURCES)}")
        if not self.views or any(not str(v).strip() for v in self.views):
            problems.append(f"views: {list(self.views)} has an empty entry; give view names like PA,AP or 'all'")
        if self.max_pixels < 1:
            problems.append(f"max_pixels: {self.max_pixels}; must be at least 1 (default {DEFAULT_MAX_PIXELS})")
        if self.encoding is not None:
            import codecs

            try:
                codecs.lookup(self.encoding)
            except LookupError:
                problems.append(f"encoding: {self.encoding!r} is not a known text encoding; e.g. utf-8, cp1252, "
                                f"latin-1")
        problems += self._dicom_problems()
        if self.image_size < 16:
            problems.append(f"image_size: {self.image_size} is too small; use at least 16 (default 512)")
        if self.shard_size < 1:
            problems.append(f"shard_size: {self.shard_size}; must be at least 1 (default 1000)")
        if self.workers < 1:
            problems.append(f"workers: {self.workers}; must be at least 1")
        if not 1 <= self.jpeg_quality <= 95:
            problems.append(f"jpeg_quality: {self.jpeg_quality}; must be within 1..95 (default 90)")
        for key in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                problems.append(f"{key}: {getattr(self, key)}; must be within [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            problems.append(f"test_fraction: val_fraction + test_fraction = "
                            f"{self.val_fraction + self.test_fraction}; leave some patients for train (< 1)")
        return problems

    def _dicom_problems(self) -> list[str]:
        from radalign.data.dicom import DICOM_TRANSFORMS

        problems = []
        if self.dicom_transform not in DICOM_TRANSFORMS:
            problems.append(f"dicom_transform: {self.dicom_transform!r}; valid: {', '.join(DICOM_TRANSFORMS)}")
        if not self.modalities or any(not str(m).strip() for m in self.modalities):
            problems.append(f"modalities: {list(self.modalities)} has an empty entry; give DICOM modalities like CR,DX")
        if self.tables is not None and (not self.dicom or self.csv is not None):
            problems.append("tables: only for prepare-dicom on the MIMIC-CXR layout (--mimic-cxr); drop --tables")
        return problems

    @property
    def source(self) -> str:
        return ("csv" if self.csv is not None else "mimic-cxr") + ("-dicom" if self.dicom else "")


def skip_reasons(cfg: PrepareConfig) -> tuple[str, ...]:
    """The keys of `manifest["skipped"]`: SKIP_REASONS, then the DICOM refusals (data.dicom) for DICOM input."""
    from radalign.data.dicom import DICOM_SKIP_REASONS

    return SKIP_REASONS + DICOM_SKIP_REASONS if cfg.dicom else SKIP_REASONS


# ----------------------------------------------------------------------------------------------------------
# Images.


def load_image(path: str | os.PathLike, image_size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """Open (`data.images.open_image`: pixel limit, EXIF orientation, reduced JPEG decode), convert to 8-bit
    grey and shrink the short side to `image_size`. Raises `data.images.OversizedImageError` above `max_pixels`."""
    from radalign.data.images import open_image, to_gray8

    return shrink(to_gray8(open_image(path, max_pixels=max_pixels, short_side=image_size)), image_size)


def shrink(im, image_size: int):
    """The short side down to `image_size` (LANCZOS, aspect kept; never upscaled)."""
    from PIL import Image

    size = target_size(*im.size, image_size)
    return im.resize(size, Image.Resampling.LANCZOS) if size != im.size else im


def encode_jpeg(img, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# One shard (runs in a worker process).


def _value(v: Any) -> Any:
    """DataFrame cell -> JSON value: NaN/None -> None, whole floats/ints -> int, numpy scalars -> Python."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _sections_for(rec: dict, text_mode: str, cache: dict) -> tuple[dict | None, str, bool]:
    """(sections, training text, read with latin-1) for a record; sections None when the report is missing."""
    from radalign.data.mimic import read_report
    from radalign.data.sections import parse_report, training_text

    report = rec.get("report")
    if not report:  # CSV input: the text is in the record
        sections = {k: _value(rec.get(k)) if k in ("findings", "impression") else None for k in SECTION_KEYS}
        return sections, rec.get("text") or "", False
    if report not in cache:
        try:
            text, latin1 = read_report(report)
        except OSError:  # absent, a folder, unreadable: the sample has no report either way
            cache[report] = (None, "", False)
        else:
            sections = parse_report(text)
            cache[report] = (sections, training_text(sections, text_mode), latin1)
    return cache[report]


def write_shard(task: dict) -> dict:
    """Write one shard; returns {path, samples, keys_sha256, skipped: [[reason, id]], latin1: [report paths]}
    plus sha256 and size of the tar. Never raises for bad items: they are skipped and reported. A shard whose
    items were all skipped leaves no tar behind.
    """
    from radalign.io import atomic_path, atomic_write_json, sha256_file

    final = Path(task["out"]) / task["path"]
    skipped: list[list[str]] = []
    latin1: set[str] = set()
    samples = 0
    cache: dict = {}  # report path -> parsed report (a study's frontal images share one report)
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for rec in task["records"]:
                sample, reason, used_latin1 = _build_sample(rec, task, cache)
                if used_latin1:
                    latin1.add(rec["report"])
                if reason:
                    skipped.append([reason, rec["key"]])
                    continue
                for ext in ("jpg", "json", "txt"):
                    _add_member(tar, f"{rec['key']}.{ext}", sample[ext])
                samples += 1
        f.flush()
        os.fsync(f.fileno())
    result = {"path": task["path"], "samples": samples, "keys_sha256": task["keys_sha256"],
              "options_sha256": task.get("options_sha256"), "skipped": skipped, "latin1": sorted(latin1)}
    if samples == 0:
        final.unlink()  # nothing to read; the state records the shard as done with no samples
    else:
        result.update(sha256=sha256_file(final), size=final.stat().st_size)
    # The record survives even when the main process is interrupted before it saves prepare-state.json
    # (Ctrl-C with several workers): the next run merges it (`_merge_records`).
    atomic_write_json(_record_path(Path(task["out"]), task["path"]), result)
    return result


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One tar member, as webdataset's TarWriter writes it (`key.ext`, USTAR), but with a fixed mtime/owner so
    the tar bytes (and sha256) depend only on the content: a resumed run reproduces them. The stdlib is used
    rather than `webdataset.TarWriter` because importing webdataset imports torch in every worker process."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "radalign", "radalign"
    tar.addfile(info, io.BytesIO(data))


def _build_sample(rec: dict, task: dict, cache: dict) -> tuple[dict | None, str | None, bool]:
    """(webdataset sample, None, latin1) or (None, skip reason, latin1). Cheap checks come before decoding."""
    if not rec["image"] or not os.path.isfile(rec["image"]):
        return None, "missing_image", False
    sections, text, used_latin1 = _sections_for(rec, task["text"], cache)
    if sections is None:
        return None, "missing_report", False
    if not text.strip():
        return None, "empty_text", used_latin1
    from radalign.data.dicom import DicomRefused
    from radalign.data.images import OversizedImageError

    header = None
    try:
        if task.get("dicom"):
            img, header = _dicom_image(rec, task)
        else:
            img = load_image(rec["image"], task["image_size"], task["max_pixels"])
        jpg = encode_jpeg(img, task["jpeg_quality"])
    except DicomRefused as e:  # before OversizedImageError: an oversized DICOM is both
        log.debug("%s", e)  # names the key and technical fields only (data.dicom reads no other header text)
        return None, e.reason, used_latin1
    except OversizedImageError as e:
        log.debug("%s: %s", rec["key"], e)
        return None, "oversized_image", used_latin1
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, struct.error, ...
        # for corrupt files; any of them means "this image is unreadable", never a reason to stop the run.
        log.debug("%s: unreadable image (%s: %s)", rec["key"], type(e).__name__, e)
        return None, "unreadable_image", used_latin1
    meta = {
        "subject_id": _value(rec["subject_id"]), "study_id": _value(rec["study_id"]),
        "dicom_id": rec["dicom_id"], "split": rec["split"],
        "view": _value(rec.get("view")) if header is None or rec.get("view") is not None else header.view,
        "study_datetime": (_value(rec.get("study_datetime")) if header is None or rec.get("study_datetime")
                           is not None else header.study_datetime),
        "labels": {name: _value(rec.get(name)) for name in CHEXPERT_LABELS},
        "sections": sections,
    }
    sample = {"jpg": jpg, "txt": text.encode("utf-8"), "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    return sample, None, used_latin1


def _dicom_image(rec: dict, task: dict):
    """(shrunk PIL image, DicomInfo) of a DICOM record; DicomRefused for a refused file, or reason
    filtered_view when the plan had no view and the header's ViewPosition is outside --views."""
    from radalign.data.dicom import DicomRefused, open_dicom

    with open_dicom(rec["image"], max_pixels=task["max_pixels"], modalities=task["modalities"],
                    name=rec["key"]) as d:
        if rec.get("view") is None and not view_kept(d.info.view, task["views"]):
            raise DicomRefused("filtered_view", f"{rec['key']}: ViewPosition {d.info.view!r} not in --views")
        # short_side: the JPG route's reduced DCT decode of the same MIMIC-CXR-JPG bytes (data.dicom, step 6)
        return shrink(d.image(task["dicom_transform"], task["image_size"]), task["image_size"]), d.info


def view_kept(view: str | None, views: list[str]) -> bool:
    """Whether a ViewPosition passes `--views` (['all'] keeps everything; blank passes only 'all')."""
    wanted = {str(v).upper() for v in views}
    return wanted == {"ALL"} or (view or "").upper() in wanted


# ----------------------------------------------------------------------------------------------------------
# Plan -> shard tasks.


# ----------------------------------------------------------------------------------------------------------
# Sources: what turns an input into rows (one per image). A new input format is one more `Source`.


@dataclass(frozen=True)
class Source:
    """One input `radalign data prepare` reads: a function from the config to the rows of every image."""

    name: str
    """Registry name (`mimic-cxr`, `csv`, `dicom`)."""
    selects: Callable[[PrepareConfig], bool]
    """Whether a config asks for this source (the first registered source that says so reads it)."""
    records: Callable[[PrepareConfig], tuple]
    """config -> (frame, set_aside, notes): one row per image with the columns of `data.mimic.mimic_records`
    (key, split, dicom_id, subject_id, study_id, view, study_datetime, image, report/text, the 14 labels),
    the (reason, key) of the images set aside, and a Counter of notes for the manifest."""
    verb: str
    """The CLI verb that fills the config for it (`data prepare`, `data prepare-csv`, ...)."""


# The record readers are imported when used: pandas and the readers stay out of the shard-writing workers.
def _mimic_cxr_records(cfg: PrepareConfig) -> tuple:
    from radalign.data.mimic import mimic_records

    return mimic_records(cfg.mimic_cxr, cfg.reports, views=list(cfg.views), labels=cfg.labels)


def _csv_records(cfg: PrepareConfig) -> tuple:
    from radalign.data.prepare_csv import csv_records

    return csv_records(cfg)


def _dicom_records(cfg: PrepareConfig) -> tuple:
    from radalign.data.prepare_dicom import dicom_records

    return dicom_records(cfg)


# Checked in order: csv (DICOM files listed in a CSV included), the MIMIC-CXR DICOM layout, then MIMIC-CXR-JPG.
SOURCES: dict[str, Source] = {
    "csv": Source("csv", lambda cfg: cfg.csv is not None, _csv_records, "data prepare-csv"),
    "dicom": Source("dicom", lambda cfg: cfg.dicom, _dicom_records, "data prepare-dicom"),
    "mimic-cxr": Source("mimic-cxr", lambda cfg: True, _mimic_cxr_records, "data prepare"),
}


def register_source(source: Source) -> None:
    """Add an input format; it is asked before the built-in ones (whose MIMIC-CXR entry takes any config)."""
    if source.name in SOURCES:
        raise RadalignError(f"source {source.name!r} is already registered; choose another name")
    items = [(source.name, source), *SOURCES.items()]
    SOURCES.clear()
    SOURCES.update(items)


def source_of(cfg: PrepareConfig) -> Source:
    """The registered source the config asks for (the first whose `selects` is true)."""
    return next(s for s in SOURCES.values() if s.selects(cfg))


def plan(cfg: PrepareConfig):
    """(frame, set_aside, notes) for the config's source; frame sorted by split, then a seeded hash of the key."""
    from radalign.data.mimic import stable_unit

    frame, set_aside, notes = source_of(cfg).records(cfg)
    # Sorting by a hash (not by patient) mixes patients across shards; it depends only on (seed, key).
    frame["_split_rank"] = frame["split"].map({s: i for i, s in enumerate(SPLITS)})
    frame["_order"] = [stable_unit(cfg.seed, k) for k in frame["key"]]
    frame = frame.sort_values(["_split_rank", "_order", "key"], kind="stable").reset_index(drop=True)
    return frame.drop(columns=["_split_rank", "_order"]), set_aside, notes


def shard_slices(frame, shard_size: int) -> list[tuple[str, int, int, str]]:
    """[(relative path, start row, end row, sha256 of the keys)] for every shard of every split."""
    out = []
    for split in SPLITS:
        rows = (frame["split"] == split).to_numpy().nonzero()[0]
        if len(rows) == 0:
            continue
        first, last = int(rows[0]), int(rows[-1]) + 1  # rows of a split are contiguous after `plan`
        for i, start in enumerate(range(first, last, shard_size)):
            end = min(start + shard_size, last)
            keys = "\n".join(frame["key"].iloc[start:end])
            out.append((f"{split}/shard-{i:06d}.tar", start, end, hashlib.sha256(keys.encode()).hexdigest()))
    return out


def options_of(cfg: PrepareConfig) -> dict:
    """Everything that decides the shards' bytes (resume refuses to mix runs whose options differ)."""
    from radalign.config import to_dict

    opts = to_dict(cfg)
    for key in ("out", "workers", *(() if cfg.dicom else DICOM_OPTIONS)):
        opts.pop(key)  # JPG/PNG runs record the options they always had (and resume states made before DICOM)
    if cfg.dicom:  # the same options may convert differently after an upgrade: a resume must not mix the two
        from radalign.data.dicom import CONVERSION_VERSION

        opts["dicom_conversion"] = CONVERSION_VERSION
    for key in ("mimic_cxr", "reports", "csv", "image_root", "tables"):
        if opts.get(key) is not None:
            opts[key] = str(Path(opts[key]).resolve())
    return opts


# ----------------------------------------------------------------------------------------------------------
# Resume state.


def _state_path(out: Path) -> Path:
    return out / "prepare-state.json"


def _record_path(out: Path, shard: str) -> Path:
    """Where a worker records a finished shard (`train/shard-000003.tar` -> `train/.shard-000003.tar.done.json`)
    until the main process has merged it into prepare-state.json."""
    split, name = shard.split("/")
    return out / split / f".{name}.done.json"


def _merge_records(out: Path, state: dict, keep: bool = True) -> int:
    """Fold the workers' shard records left by an interrupted run (same options only) into `state`; saves it,
    then removes the records. Returns how many were merged. keep=False (--overwrite) only removes them."""
    from radalign.io import atomic_write_json

    files = [p for split in SPLITS if (out / split).is_dir() for p in (out / split).glob(".shard-*.tar.done.json")]
    merged = 0
    for file in files if keep else []:
        try:
            entry = json.loads(file.read_text(encoding="utf-8"))
            if entry.get("options_sha256") == state["options_sha256"]:
                state["shards"][str(entry["path"])] = entry
                merged += 1
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("%s: unreadable shard record; that shard is rewritten", file)
    if merged:
        atomic_write_json(_state_path(out), state)
    for file in files:
        file.unlink(missing_ok=True)
    return merged


def _load_state(out: Path, options: dict, overwrite: bool) -> dict:
    path = _state_path(out)
    fresh = {"format": STATE_FORMAT, "options": options, "shards": {}}
    if overwrite or not path.is_file():
        return fresh
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s: unreadable (%s); rewriting every shard", path, e)
        return fresh
    if state.get("format") != STATE_FORMAT or not isinstance(state.get("shards"), dict):
        return fresh
    # Options added in later versions are absent from older states: read them as their defaults.
    old = dict(state.get("options") or {})
    defaults = _default_options()
    old.update({k: defaults[k] for k in options if k not in old and k in defaults})
    if old != options:
        diff = [f"{k}: {old.get(k)!r} -> {options.get(k)!r}" for k in options if old.get(k) != options.get(k)]
        raise RadalignError(f"{out} holds shards prepared with other options ({'; '.join(diff)}). "
                            f"Use another --out, or pass --overwrite to rewrite them.")
    state["options"] = options
    return state


def _default_options() -> dict:
    from dataclasses import MISSING as NO_DEFAULT
    from dataclasses import fields

    out = {}
    for f in fields(PrepareConfig):
        if f.default is not NO_DEFAULT:
            out[f.name] = f.default
        elif f.default_factory is not NO_DEFAULT:
            out[f.name] = f.default_factory()
    return out


def _is_done(out: Path, entry: dict | None, keys_sha: str) -> bool:
    """A recorded shard is reused only when the plan gives it the same keys and its tar has the recorded size
    and sha256 (a damaged or replaced tar of the same size is rewritten)."""
    from radalign.io import sha256_file

    if not entry or entry.get("keys_sha256") != keys_sha:
        return False
    if entry["samples"] == 0:
        return True
    tar = out / entry["path"]
    if not (tar.is_file() and tar.stat().st_size == entry.get("size")):
        return False
    if sha256_file(tar) != entry.get("sha256"):
        log.warning("%s: content differs from its record (sha256); rewriting it", tar)
        return False
    return True


def _remove_strays(out: Path, planned: set[str]) -> None:
    """Delete temporary files of interrupted runs and shards no longer in the plan (only our own names)."""
    pattern = re.compile(r"^(\.shard-\d{6}\.tar\.tmp-\d+|shard-\d{6}\.tar)$")
    for split in SPLITS:
        folder = out / split
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if pattern.match(p.name) and f"{split}/{p.name}" not in planned:
                p.unlink()


# ----------------------------------------------------------------------------------------------------------
# The run.


def prepare(cfg: PrepareConfig, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Write (or finish writing) the shards of `cfg` and return the manifest (also saved as OUT/manifest.json).

    Holds `radalign.lock.output_lock(OUT)` throughout: a second prepare into the same folder is refused."""
    from radalign.lock import output_lock

    get_logger("radalign.data.prepare")  # stderr handler on rank 0
    out = Path(cfg.out)
    with output_lock(out, what="--out"):
        _check_writable(out)
        return _prepare_locked(cfg, out, overwrite, progress)


def _check_writable(out: Path) -> None:
    probe = out / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RadalignError(f"--out {out}: cannot write there ({e.strerror or e}); choose a writable folder") from None


def _prepare_locked(cfg: PrepareConfig, out: Path, overwrite: bool, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from radalign.io import atomic_write_json

    options = options_of(cfg)
    state = _load_state(out, options, overwrite)
    state["options_sha256"] = _options_sha(options)
    merged = _merge_records(out, state, keep=not overwrite)
    frame, set_aside, notes = plan(cfg)
    slices = shard_slices(frame, cfg.shard_size)
    done = {path for path, _, _, keys_sha in slices if _is_done(out, state["shards"].get(path), keys_sha)}
    state["shards"] = {p: e for p, e in state["shards"].items() if p in done}
    atomic_write_json(_state_path(out), state)  # the options are on record before any shard is written
    _remove_strays(out, done)
    todo = [s for s in slices if s[0] not in done]
    sizes = {path: end - start for path, start, end, _ in slices}

    _log_set_aside(set_aside, cfg)
    log.info("%d images in %d shards (%d complete%s, %d to write) -> %s", len(frame), len(slices), len(done),
             f", {merged} recovered from worker records" if merged else "", len(todo), out)
    header_views = 0  # filtered_view decided on DICOM headers in the workers: one summary line, not one each
    with tqdm(total=sum(sizes[t[0]] for t in todo), unit="img", desc="prepare", disable=not progress) as bar:
        for result in _run_tasks(_tasks(frame, todo, cfg, state["options_sha256"]), cfg.workers):
            for reason, key in result["skipped"]:
                if reason == "filtered_view":
                    header_views += 1
                else:
                    log.warning("skipped %s: %s", reason, key)
            state["shards"][result["path"]] = result
            atomic_write_json(_state_path(out), state)  # this shard now survives an interruption
            _record_path(out, result["path"]).unlink(missing_ok=True)  # now in the state
            bar.update(sizes[result["path"]])
    if header_views:
        log.info("%d images whose DICOM ViewPosition is outside --views %s set aside (filtered_view); their ids "
                 "are in skipped.csv", header_views, ",".join(cfg.views))
    return _finish(out, cfg, state, slices, set_aside, notes)


def _options_sha(options: dict) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()


def _tasks(frame, todo, cfg: PrepareConfig, options_sha: str):
    """One task per shard, built lazily (only the shards in flight hold their records)."""
    for path, start, end, keys_sha in todo:
        yield {"out": str(Path(cfg.out)), "path": path, "keys_sha256": keys_sha, "options_sha256": options_sha,
               "text": cfg.text,
               "image_size": cfg.image_size, "jpeg_quality": cfg.jpeg_quality, "max_pixels": cfg.max_pixels,
               "dicom": cfg.dicom, "dicom_transform": cfg.dicom_transform, "modalities": list(cfg.modalities),
               "views": list(cfg.views), "records": frame.iloc[start:end].to_dict("records")}


def _run_tasks(tasks, workers: int):
    """Results as shards finish. workers=1 runs in this process; more use a spawn pool (no fork of a process
    that may hold threads), keeping at most 2 tasks per worker in flight so memory stays flat."""
    if workers == 1:
        for task in tasks:
            yield write_shard(task)
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        pending = set()
        for task in tasks:
            pending.add(pool.submit(write_shard, task))
            if len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            yield from (f.result() for f in done)


def _log_set_aside(set_aside: list[tuple[str, str]], cfg: PrepareConfig) -> None:
    counts = Counter(reason for reason, _ in set_aside)
    if counts["filtered_view"]:
        log.info("%d images outside --views %s set aside (filtered_view); their ids are in skipped.csv",
                 counts["filtered_view"], ",".join(cfg.views))
    for reason, key in set_aside:
        if reason != "filtered_view":
            log.warning("skipped %s: %s", reason, key)


def _finish(out: Path, cfg: PrepareConfig, state: dict, slices, set_aside, notes) -> dict:
    """skipped.csv and manifest.json from the plan and every shard's recorded result."""
    from radalign.io import atomic_write_json, atomic_write_text

    reasons = skip_reasons(cfg)
    skipped = Counter(dict.fromkeys(reasons, 0))
    rows = [f"{reason},{key}" for reason, key in set_aside]
    latin1: set[str] = set()
    splits = {s: {"samples": 0, "shards": []} for s in SPLITS}
    for path, *_ in slices:
        entry = state["shards"][path]
        for reason, key in entry["skipped"]:
            skipped[reason] += 1
            rows.append(f"{reason},{key}")
        latin1.update(entry["latin1"])
        if entry["samples"]:
            split = splits[path.split("/")[0]]
            split["samples"] += entry["samples"]
            split["shards"].append({"path": path, "samples": entry["samples"], "sha256": entry["sha256"]})
    for reason, _ in set_aside:  # filtered_view, outside_root (no_split is a note, listed in skipped.csv)
        if reason in skipped:
            skipped[reason] += 1
    atomic_write_text(out / "skipped.csv", "reason,id\n" + "".join(r + "\n" for r in rows))
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": cfg.source,
        "created": datetime.now().isoformat(timespec="seconds"),
        "options": state["options"],
        "labels": list(CHEXPERT_LABELS),
        "splits": splits,
        "skipped": {k: skipped[k] for k in reasons},
        "notes": {"latin1_reports": len(latin1), **{k: v for k, v in sorted(notes.items()) if v}},
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest

"""The shard folder of `radalign data prepare`: its manifest, its shard lists, a metadata-only scan, find-by-id.

    manifest = read_manifest("runs/demo/shards")              # dict, validated (format radalign-shards/1)
    for shard in list_shards("runs/demo/shards", "test"):      # ShardEntry: split, path, samples, sha256
        ...
    for s in scan_split("runs/demo/shards", "test"):           # SampleMeta: shard, key, split, meta (the json)
        ...
    hit = next(find_samples(root, lambda m: m.get("study_id") == 5, splits=["test"]), None)
    index = ShardIndex.build(root)                             # key / dicom_id / study_id -> [SampleMeta]

This module is the one reader of the format: every stage that needs a split's shards, their counts, the samples'
ids or labels, or one sample by id comes here (the training/eval loaders in `data.loader` included). A shard is
a USTAR tar of `KEY.jpg`, `KEY.txt`, `KEY.json` members (`data.prepare` writes them); the scan reads the json
members only and seeks past the images, so listing a split's subjects or labels decodes no JPEG.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radalign import RadalignError
from radalign.io import read_format_json

MANIFEST_FORMAT = "radalign-shards/1"  # the "format" of OUT/manifest.json
MANIFEST_FILE = "manifest.json"
_WHAT = ("the --out folder of `radalign data prepare` (it holds manifest.json and train/, validate/, test/), "
         "or run prepare first")
_FIX = "re-run `radalign data prepare`"


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it."""

    split: str
    """The split that holds it (`train`, `validate`, `test`)."""
    path: Path
    """Absolute path of the tar."""
    samples: int
    """Samples the manifest says the tar holds."""
    sha256: str | None
    """Hex sha256 of the tar (None in manifests that did not record it)."""


@dataclass(frozen=True)
class SampleMeta:
    """One sample found by a metadata scan: where it is and its json member (the image is not read)."""

    shard: str
    """Path of the tar that holds it."""
    key: str
    """The webdataset key (`KEY.jpg`, `KEY.txt`, `KEY.json`)."""
    split: str | None
    """Its split when the scan was of a split, else None."""
    meta: dict
    """The decoded json member (ids, view, labels, sections, ...)."""

    def id(self, field: str) -> str:
        """`meta[field]` as a string (`key` is the sample key; dicom_id falls back to it, as the loader does)."""
        if field == "key":
            return self.key
        value = self.meta.get(field, self.key if field == "dicom_id" else None)
        return "" if value is None else str(value)


# ----------------------------------------------------------------------------------------------------------
# The manifest.


def read_manifest(root: str | Path) -> dict:
    """`ROOT/manifest.json` as a dict; RadalignError naming the file and the fix when missing, foreign or
    malformed (the error names the key: `splits.train.shards[3].samples: ...`)."""
    file = Path(root) / MANIFEST_FILE
    manifest = read_format_json(file, MANIFEST_FORMAT, what=_WHAT, fix=_FIX)
    problems = manifest_problems(manifest)
    if problems:
        raise RadalignError(f"{file}: malformed: {'; '.join(problems[:5])}"
                            f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}; "
                            f"{_FIX} (or restore the file)")
    return manifest


def manifest_problems(manifest: dict) -> list[str]:
    """What is wrong with the `splits` part of a manifest (the part loaders read), as `key: problem`."""
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return [f"splits: expected an object {{split: {{samples, shards}}}}, found {type(splits).__name__}"]
    problems = []
    for split, entry in splits.items():
        where = f"splits.{split}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected an object with samples and shards, found {type(entry).__name__}")
            continue
        if not _count(entry.get("samples")):
            problems.append(f"{where}.samples: expected a count >= 0, found {entry.get('samples')!r}")
        shards = entry.get("shards")
        if not isinstance(shards, list):
            problems.append(f"{where}.shards: expected a list, found {type(shards).__name__}")
            continue
        problems += [p for i, shard in enumerate(shards) for p in _shard_problems(f"{where}.shards[{i}]", shard)]
    return problems


def _shard_problems(where: str, shard: Any) -> list[str]:
    if not isinstance(shard, dict):
        return [f"{where}: expected an object, found {type(shard).__name__}"]
    problems = []
    if not isinstance(shard.get("path"), str) or not shard["path"]:
        problems.append(f"{where}.path: expected a relative path, found {shard.get('path')!r}")
    if not _count(shard.get("samples")):
        problems.append(f"{where}.samples: expected a count >= 0, found {shard.get('samples')!r}")
    return problems


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_shard_manifest(file: str | Path) -> bool:
    """The file is JSON whose format is ours (whether or not the rest of it is well formed)."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT


def manifest_sha256(root: str | Path) -> str | None:
    """sha256 of `ROOT/manifest.json` (what an export records of its training shards); None when absent."""
    file = Path(root) / MANIFEST_FILE
    return hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None


def split_names(root: str | Path) -> list[str]:
    """The manifest's splits, in manifest order."""
    return list(read_manifest(root)["splits"])


# ----------------------------------------------------------------------------------------------------------
# Shard lists.


def _split_entry(root: str | Path, split: str) -> dict:
    splits = read_manifest(root)["splits"]
    if split not in splits:
        raise RadalignError(f"{Path(root) / MANIFEST_FILE}: no split {split!r}; "
                            f"available: {', '.join(splits) or '(none)'}")
    return splits[split]


def list_shards(root: str | Path, split: str | None = None) -> list[ShardEntry]:
    """The shards of `split` (every split when None) in manifest order, with counts and sha256; RadalignError
    naming the first missing tar when one the manifest lists is not there."""
    root = Path(root)
    splits = read_manifest(root)["splits"] if split is None else {split: _split_entry(root, split)}
    entries = [ShardEntry(name, (root / s["path"]).resolve(), s["samples"], s.get("sha256"))
               for name, entry in splits.items() for s in entry["shards"]]
    missing = [str(e.path) for e in entries if not e.path.is_file()]
    if missing:
        which = f"split {split!r}" if split is not None else f"{root / MANIFEST_FILE}"
        raise RadalignError(f"{len(missing)} shard(s) of {which} listed in the manifest are missing, "
                            f"e.g. {missing[0]}; {_FIX} or restore the files")
    return entries


def shard_paths(root: str | Path, split: str) -> list[str]:
    """Absolute paths of the shards of `split` listed in `ROOT/manifest.json`, in manifest order."""
    entries = list_shards(root, split)
    if not entries:
        raise RadalignError(f"{Path(root) / MANIFEST_FILE}: split {split!r} has no shards "
                            f"({split_samples(root, split)} samples); choose another split or prepare more data")
    return [str(e.path) for e in entries]


def split_samples(root: str | Path, split: str) -> int:
    """Number of samples of `split` according to the manifest."""
    return int(_split_entry(root, split).get("samples", 0))


def manifest_shards(shards: Sequence[str]) -> dict[str, dict] | None:
    """{shard: {"samples": n, "sha256": hex or None}} from the manifest two folders up
    (`OUT/<split>/shard-*.tar`); None when some shard has no manifest or is not listed in it. A manifest that
    is there but malformed is an error (RadalignError naming the file and key), not "unknown"."""
    info: dict[str, dict] = {}
    roots = dict.fromkeys(Path(s).resolve().parent.parent for s in shards)
    for root in roots:
        if not (root / MANIFEST_FILE).is_file():
            return None
        try:
            manifest = read_manifest(root)
        except RadalignError:
            if is_shard_manifest(root / MANIFEST_FILE):
                raise
            return None  # some other tool's manifest.json: the shards are not ours to count
        for entry in manifest["splits"].values():
            for s in entry["shards"]:
                info[str((root / s["path"]).resolve())] = {"samples": s["samples"], "sha256": s.get("sha256")}
    resolved = [str(Path(s).resolve()) for s in shards]
    if any(r not in info for r in resolved):
        return None
    return {s: info[r] for s, r in zip(shards, resolved)}


def manifest_counts(shards: Sequence[str]) -> dict[str, int] | None:
    """Samples per shard from the manifest two folders up (`OUT/<split>/shard-*.tar`); None if unknown."""
    info = manifest_shards(shards)
    return None if info is None else {s: e["samples"] for s, e in info.items()}


# ----------------------------------------------------------------------------------------------------------
# Metadata-only scan.


def _key(member_name: str) -> str:
    return Path(member_name).name.split(".", 1)[0]  # webdataset's key: the basename up to its first dot


def scan_meta(paths: Iterable[str | Path], *, split: str | None = None,
              bad: Counter | None = None) -> Iterator[SampleMeta]:
    """Every sample's json member of the tars, in tar order, without reading any image.

    A json member that does not decode is counted in `bad["bad_json"]` when `bad` is given, else it is a
    RadalignError naming the shard and member. A tar that cannot be read (truncated, not a tar) is a
    RadalignError naming it.
    """
    for path in paths:
        yield from _scan_one(str(path), split, bad)


def _scan_one(path: str, split: str | None, bad: Counter | None) -> Iterator[SampleMeta]:
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not (member.isfile() and member.name.endswith(".json")):
                    continue
                meta = _json_member(tar, member, path, bad)
                if meta is not None:
                    yield SampleMeta(path, _key(member.name), split, meta)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise RadalignError(f"{path}: unreadable shard ({e}); {_FIX} or restore the file") from None


def _json_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: str, bad: Counter | None) -> dict | None:
    try:
        meta = json.loads(tar.extractfile(member).read().decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        return meta
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        if bad is None:
            raise RadalignError(f"{path}: member {member.name} is not a JSON object ({e}); {_FIX}") from None
        bad["bad_json"] += 1
        return None


def scan_split(root: str | Path, split: str, *, bad: Counter | None = None) -> Iterator[SampleMeta]:
    """`scan_meta` over the shards of one split of `ROOT/manifest.json` (a split without shards yields none)."""
    return scan_meta([e.path for e in list_shards(root, split)], split=split, bad=bad)


def split_subjects(root: str | Path, split: str) -> set[str]:
    """subject_id (as a string) of every sample of a split (json members only, no image is decoded)."""
    return {s.id("subject_id") for s in scan_split(root, split) if s.meta.get("subject_id") is not None}


# ----------------------------------------------------------------------------------------------------------
# Find by id.


def find_samples(root: str | Path, match: Callable[[SampleMeta], bool], *,
                 splits: Sequence[str] | None = None) -> Iterator[SampleMeta]:
    """The samples for which `match` is true, lazily, in scan order: `splits` in the order given (default:
    the manifest's), each split's shards in manifest order, samples in tar order. `next(...)` stops at the
    first hit, so only the json members up to it are read."""
    for split in split_names(root) if splits is None else splits:
        yield from (s for s in scan_split(root, split) if match(s))


def find_by_id(root: str | Path, field: str, ids: Iterable[Any], *,
               splits: Sequence[str] | None = None) -> SampleMeta | None:
    """The first sample (scan order, as `find_samples`) whose `field` (key, dicom_id, study_id, subject_id)
    is one of `ids` (compared as strings); None when no sample has it."""
    wanted = {str(i) for i in ids}
    return next(find_samples(root, lambda s: s.id(field) in wanted, splits=splits), None)


class ShardIndex:
    """id -> samples over a shard folder, built once from one metadata scan (for many look-ups)."""

    FIELDS = ("key", "dicom_id", "study_id", "subject_id")

    def __init__(self, samples: Iterable[SampleMeta]):
        self._by: dict[str, dict[str, list[SampleMeta]]] = {f: defaultdict(list) for f in self.FIELDS}
        for s in samples:
            for f in self.FIELDS:
                self._by[f][s.id(f)].append(s)

    @classmethod
    def build(cls, root: str | Path, splits: Sequence[str] | None = None) -> ShardIndex:
        """Scan `splits` (default: all) of `ROOT/manifest.json` once."""
        return cls(s for split in (split_names(root) if splits is None else splits)
                   for s in scan_split(root, split))

    def find(self, field: str, value: Any) -> list[SampleMeta]:
        """The samples whose `field` (one of FIELDS) is `value` (as a string), in scan order."""
        if field not in self._by:
            raise RadalignError(f"ShardIndex.find: field {field!r}; choose one of {', '.join(self.FIELDS)}")
        return list(self._by[field].get(str(value), []))


def read_sample(sample: SampleMeta) -> dict[str, bytes]:
    """The members of one sample ({"jpg": ..., "txt": ..., "json": ...}), as the loaders see them."""
    out = {}
    try:
        with tarfile.open(sample.shard, "r:") as tar:
            for member in tar:
                if member.isfile() and _key(member.name) == sample.key:
                    out[Path(member.name).name.split(".", 1)[1]] = tar.extractfile(member).read()
                elif out:
                    break  # a sample's members are consecutive (webdataset's layout)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise RadalignError(f"{sample.shard}: unreadable shard ({e}); {_FIX} or restore the file") from None
    return out


__all__ = ["MANIFEST_FORMAT", "ShardEntry", "SampleMeta", "ShardIndex", "read_manifest", "manifest_problems",
           "is_shard_manifest", "manifest_sha256", "split_names", "list_shards", "shard_paths", "split_samples",
           "manifest_shards", "manifest_counts", "scan_meta", "scan_split", "split_subjects", "find_samples",
           "find_by_id", "read_sample"]

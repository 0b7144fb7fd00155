"""The shard folder reader (data/shards.py): manifest, shard lists, metadata scan, find-by-id.

Shards are written here with the stdlib `tarfile` (the layout of docs/architecture.md §1) and every expected
value comes from an independent reader: webdataset's own tar iterator for the brute-force scan, hashlib for
checksums, the written bytes for `read_sample`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from radalign.data.loader import decode_sample, make_eval_loader
from radalign.data.shards import (
    ShardIndex,
    find_by_id,
    find_samples,
    list_shards,
    manifest_sha256,
    read_manifest,
    read_sample,
    scan_meta,
    scan_split,
    shard_paths,
    split_subjects,
)
from radalign.data.transforms import eval_transform

from radalign import RadalignError

SPLIT_SIZES = {"train": (7, 5, 6), "validate": (), "test": (4, 3)}  # samples per shard, per split
SHARED_STUDY = 777  # one study id planted in both train and test (find-by-id must honour the split order)


def _jpeg(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 18), dtype=np.uint8), mode="L").save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _sample(split: str, i: int, rng) -> dict:
    study = SHARED_STUDY if i in (4, 9) else 1000 + i // 2  # two samples per study; 777 in both splits
    meta = {"subject_id": 20 + i // 4, "study_id": study, "dicom_id": f"{split[:2]}{i:03d}", "view": "PA",
            "labels": {"Edema": [1, 0, -1, None][i % 4]}}
    return {"key": f"{split}-{i:03d}", "jpg": _jpeg(rng), "txt": f"report {i}".encode(),
            "json": json.dumps(meta).encode()}


def _write_folder(root: Path, seed: int = 0) -> dict[str, list[dict]]:
    """Shards of SPLIT_SIZES and their manifest; returns {split: [sample, ...]} in write order."""
    rng = np.random.default_rng(seed)
    manifest = {"format": "radalign-shards/1", "splits": {}}
    written: dict[str, list[dict]] = {}
    for split, sizes in SPLIT_SIZES.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        entries, samples, i = [], [], 0
        for j, n in enumerate(sizes):
            rel = f"{split}/shard-{j:06d}.tar"
            with tarfile.open(root / rel, "w", format=tarfile.USTAR_FORMAT) as tar:
                for _ in range(n):
                    s = _sample(split, i, rng)
                    for ext in ("jpg", "json", "txt"):
                        _add(tar, f"{s['key']}.{ext}", s[ext])
                    samples.append({**s, "shard": str((root / rel).resolve())})
                    i += 1
            entries.append({"path": rel, "samples": n,
                            "sha256": hashlib.sha256((root / rel).read_bytes()).hexdigest()})
        manifest["splits"][split] = {"samples": len(samples), "shards": entries}
        written[split] = samples
    (root / "manifest.json").write_text(json.dumps(manifest))
    return written


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    root = tmp_path_factory.mktemp("shards")
    return root, _write_folder(root)


def _brute_force(root: Path, splits) -> list[tuple[str, str, str, dict]]:
    """(split, shard, key, meta) of every sample, read by webdataset's tar iterator in manifest order."""
    manifest = json.loads((root / "manifest.json").read_text())
    out = []
    for split in splits:
        for entry in manifest["splits"][split]["shards"]:
            path = str((root / entry["path"]).resolve())
            for s in wds.WebDataset(path, shardshuffle=False):
                out.append((split, path, s["__key__"], json.loads(s["json"])))
    return out


# ----------------------------------------------------------------------------------------------------------
# The manifest and the shard lists.


def test_list_shards_gives_every_split_with_counts_and_checksums(folder):
    root, written = folder
    entries = list_shards(root)
    assert [(e.split, e.samples) for e in entries] == [(s, n) for s, sizes in SPLIT_SIZES.items() for n in sizes]
    for e in entries:
        assert e.path.is_absolute() and e.sha256 == hashlib.sha256(e.path.read_bytes()).hexdigest()
    assert [str(e.path) for e in list_shards(root, "test")] == shard_paths(root, "test")
    assert manifest_sha256(root) == hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
    assert manifest_sha256(root / "train") is None


@pytest.mark.parametrize("damage, named", [
    (lambda text: text[: len(text) // 2], "not readable JSON"),                        # truncated mid-write
    (lambda text: "", "not readable JSON"),                                            # empty file
    (lambda text: text.replace("radalign-shards/1", "radalign-shards/0"), "format"),   # another version
    (lambda text: text.replace('"samples": 7', '"samples": -7'), "splits.train.shards[0].samples"),
    (lambda text: text.replace('"path": "test/shard-000001.tar", ', ''), "splits.test.shards[1].path"),
])
def test_a_damaged_manifest_is_an_error_naming_the_file_and_the_key(folder, tmp_path, damage, named):
    root, _ = folder
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(damage((root / "manifest.json").read_text()))
    for read in (read_manifest, list_shards, lambda r: shard_paths(r, "train"), lambda r: list(scan_split(r, "test"))):
        with pytest.raises(RadalignError, match=re.escape(named)) as e:
            read(bad)
        assert str(bad / "manifest.json") in str(e.value) and "radalign data prepare" in str(e.value)


def test_a_missing_shard_is_named_with_the_fix(tmp_path):
    written = _write_folder(tmp_path)
    gone = written["train"][7]["shard"]  # the second train shard
    Path(gone).unlink()
    for read in (list_shards, lambda r: list_shards(r, "train"), lambda r: shard_paths(r, "train"),
                 lambda r: split_subjects(r, "train")):
        with pytest.raises(RadalignError, match="missing") as e:
            read(tmp_path)
        assert gone in str(e.value) and "radalign data prepare" in str(e.value)
    assert len(shard_paths(tmp_path, "test")) == 2  # the other split is still readable
    with pytest.raises(RadalignError, match="no split 'valid'.*train, validate, test"):
        shard_paths(tmp_path, "valid")
    with pytest.raises(RadalignError, match="split 'validate' has no shards"):
        shard_paths(tmp_path, "validate")


# ----------------------------------------------------------------------------------------------------------
# The metadata scan.


def test_scan_equals_a_brute_force_read_of_every_sample(folder):
    root, _ = folder
    truth = _brute_force(root, ["train", "test"])
    scanned = [(s.split, s.shard, s.key, s.meta) for split in ("train", "test") for s in scan_split(root, split)]
    assert scanned == truth and len(truth) == 18 + 7
    assert split_subjects(root, "train") == {str(m["subject_id"]) for sp, _, _, m in truth if sp == "train"}


def test_scan_of_a_truncated_shard_or_a_bad_json_member(tmp_path):
    written = _write_folder(tmp_path)
    shard = Path(written["test"][0]["shard"])
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    with pytest.raises(RadalignError, match="unreadable shard") as e:
        list(scan_split(tmp_path, "test"))
    assert str(shard) in str(e.value)
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, "a.json", b'{"study_id": 1}')
        _add(tar, "b.json", b"{not json")
        _add(tar, "c.json", b"[1, 2]")  # JSON, but not an object
        _add(tar, "d.json", b'{"study_id": 4}')
        _add(tar, "e.x.json", b'{"study_id": 5}')  # webdataset's key: the name up to its first dot
    with pytest.raises(RadalignError, match=r"bad\.tar: member b\.json is not a JSON object"):
        list(scan_meta([bad]))
    counts: Counter = Counter()
    scanned = list(scan_meta([bad], bad=counts))
    assert [s.key for s in scanned] == ["a", "d", "e"] and counts == {"bad_json": 2}
    # dicom_id falls back to the key (as the loader's meta.get("dicom_id", key)); other ids do not.
    assert [scanned[0].id(f) for f in ("dicom_id", "key", "study_id", "subject_id")] == ["a", "a", "1", ""]
    with pytest.raises(RadalignError, match="unreadable shard"):
        list(scan_meta([tmp_path / "nowhere.tar"]))


# ----------------------------------------------------------------------------------------------------------
# Find by id.


@pytest.mark.parametrize("field", ["key", "dicom_id", "study_id", "subject_id"])
@pytest.mark.parametrize("splits", [None, ["test", "train"], ["test"]])
def test_find_by_id_equals_the_first_hit_of_a_brute_force_scan(folder, field, splits):
    root, _ = folder
    order = splits or ["train", "validate", "test"]
    truth = _brute_force(root, order)
    value = (lambda key, meta: key) if field == "key" else (lambda key, meta: str(meta[field]))
    ids = sorted({value(k, m) for _, _, k, m in truth}) + ["no-such-id"]
    for i in ids:
        expected = next(((p, k) for _, p, k, m in truth if value(k, m) == i), None)
        found = find_by_id(root, field, [i], splits=splits)
        assert (found and (found.shard, found.key)) == (expected or None), (field, i)
    index = ShardIndex.build(root, splits=order)
    for i in ids:
        assert [(s.shard, s.key) for s in index.find(field, i)] == [(p, k) for _, p, k, m in truth if value(k, m) == i]


def test_find_follows_the_split_order_and_stops_at_the_first_hit(folder):
    root, written = folder
    first_train = find_by_id(root, "study_id", [SHARED_STUDY])
    first_test = find_by_id(root, "study_id", [SHARED_STUDY], splits=["test", "train"])
    assert (first_train.split, first_train.key) == ("train", "train-004")
    assert (first_test.split, first_test.key) == ("test", "test-004")
    hits = find_samples(root, lambda s: s.meta["study_id"] == SHARED_STUDY)
    assert [s.key for s in hits] == ["train-004", "train-009", "test-004"]
    with pytest.raises(RadalignError, match="field 'view'"):
        ShardIndex([]).find("view", "PA")


def test_read_sample_and_decode_sample_match_what_was_written_and_the_eval_loader(folder):
    root, written = folder
    want = written["test"][5]
    found = find_by_id(root, "dicom_id", [json.loads(want["json"])["dicom_id"]])
    assert read_sample(found) == {"jpg": want["jpg"], "json": want["json"], "txt": want["txt"]}
    tf = eval_transform(16)
    one = decode_sample(found, tf)
    loader = make_eval_loader(shard_paths(root, "test"), batch_size=4, transform=tf)
    by_key = {k: (img, t) for b in loader for k, img, t in zip(b["key"], b["image"], b["text"])}
    assert torch.equal(one["image"], by_key[want["key"]][0]) and one["text"] == by_key[want["key"]][1]
    assert one["meta"] == json.loads(want["json"])

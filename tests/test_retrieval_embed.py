"""data.embed.embed_split: the one shard embedding pass (zero-shot, retrieval, pretrain validation).

Planted damage: a truncated tar, a random-bytes tar, zeroed JPEGs; every sample the manifest lists must come
back embedded or counted lost, by reason.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from radalign.data.embed import embed_split, expected_samples
from radalign.data.transforms import eval_transform

SIZE, PER_SHARD, SHARDS = 24, 12, 5


def _jpeg(rng, h=40, w=32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L").save(buf, format="JPEG")
    return buf.getvalue()


def _samples(n, rng):
    out = []
    for i in range(n):
        meta = {"subject_id": 100 + i // 3, "study_id": 500 + i // 2, "dicom_id": f"d{i:04d}", "split": "test",
                "labels": {"Cardiomegaly": i % 2}}
        out.append({"__key__": meta["dicom_id"], "jpg": _jpeg(rng), "txt": f"report {i}".encode(),
                    "json": json.dumps(meta).encode()})
    return out


def _write(root: Path, samples, per_shard=PER_SHARD, split="test") -> list[Path]:
    (root / split).mkdir(parents=True, exist_ok=True)
    shards, paths = [], []
    for start in range(0, len(samples), per_shard):
        rel = f"{split}/shard-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(root / rel)) as sink:
            for s in samples[start:start + per_shard]:
                sink.write(s)
        shards.append({"path": rel, "samples": len(samples[start:start + per_shard]), "sha256": "-"})
        paths.append(root / rel)
    splits = {s: {"samples": 0, "shards": []} for s in ("train", "validate", "test")}
    splits[split] = {"samples": len(samples), "shards": shards}
    manifest = {"format": "radalign-shards/1", "source": "test", "created": "2026-01-01T00:00:00",
                "options": {"image_size": 40}, "labels": ["Cardiomegaly"], "splits": splits, "skipped": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return paths


PROJ = torch.from_numpy(np.random.default_rng(5).normal(size=(3 * SIZE * SIZE, 8)).astype(np.float32))


def encode(x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, 8]
    return x.flatten(1) @ PROJ


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_clean")
    samples = _samples(SHARDS * PER_SHARD, np.random.default_rng(0))
    _write(root, samples)
    return root, samples


@pytest.mark.parametrize("workers", [0, 2])
def test_embeddings_equal_an_independent_decode(clean, workers):
    root, samples = clean
    tf = eval_transform(SIZE, channels=3)
    got = embed_split(encode, root, "test", tf, batch_size=7, num_workers=workers, thumbnail_size=16)
    assert sorted(got.keys) == sorted(s["__key__"] for s in samples) and got.lost == {}
    assert got.expected == len(samples) and len(got.texts) == len(got.meta) == len(samples)
    by_key = {s["__key__"]: s for s in samples}
    ref = encode(torch.stack([tf(Image.open(io.BytesIO(by_key[k]["jpg"])).convert("L")) for k in got.keys]))
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(got.image, ref, atol=1e-5)
    assert [m["dicom_id"] for m in got.meta] == got.keys
    assert got.texts == [by_key[k]["txt"].decode() for k in got.keys]
    # thumbnails: JPEGs of the source image at most 16 px, the same pixels as PIL's own thumbnail of it
    for k, th in zip(got.keys[:5], got.thumbnails[:5]):
        im = Image.open(io.BytesIO(th))
        assert im.format == "JPEG" and max(im.size) <= 16
        src = Image.open(io.BytesIO(by_key[k]["jpg"])).convert("L")
        src.thumbnail((16, 16))
        assert im.size == src.size
        assert np.abs(np.asarray(im, float) - np.asarray(src, float)).mean() < 8


def test_thumbnails_are_made_by_the_loader_transform_in_the_workers(clean, monkeypatch):
    """The loader receives the composed transform (so decode, transform and thumbnail run in its workers);
    the main loop only unpacks."""
    import radalign.data.embed as de
    import radalign.data.loader as dl

    seen = []
    real = dl.make_eval_loader

    def spy(shards, **kw):
        seen.append(kw["transform"])
        return real(shards, **kw)

    monkeypatch.setattr(dl, "make_eval_loader", spy)
    main_pid, real_thumb = os.getpid(), de.thumbnail_bytes

    def only_in_workers(image, size, quality=80):
        if os.getpid() == main_pid:
            raise AssertionError("thumbnail made in the main process")
        return real_thumb(image, size, quality)

    monkeypatch.setattr(de, "thumbnail_bytes", only_in_workers)  # forked workers inherit the patch
    got = embed_split(encode, clean[0], "test", eval_transform(SIZE, channels=3), batch_size=16, num_workers=2,
                      thumbnail_size=12)
    assert isinstance(seen[0], de.WithThumbnail)
    assert len(got.thumbnails) == len(got.keys) == SHARDS * PER_SHARD
    assert all(t[:2] == b"\xff\xd8" for t in got.thumbnails)
    assert embed_split(encode, clean[0], "test", eval_transform(SIZE, channels=3)).thumbnails is None


def test_max_samples_and_ranks(clean):
    root, samples = clean
    tf = eval_transform(SIZE, channels=3)
    capped = embed_split(encode, root, "test", tf, batch_size=8, max_samples=10)
    assert len(capped) == 10 and capped.lost == {} and capped.capped == len(samples) - 10
    parts = [embed_split(encode, root, "test", tf, batch_size=8, rank=r, world_size=2) for r in (0, 1)]
    assert sorted(parts[0].keys + parts[1].keys) == sorted(s["__key__"] for s in samples)
    assert not set(parts[0].keys) & set(parts[1].keys)
    assert [p.expected for p in parts] == [len(p.keys) for p in parts]


def test_damaged_split_reports_every_lost_sample_by_reason(tmp_path):
    rng = np.random.default_rng(1)
    samples = _samples(SHARDS * PER_SHARD, rng)
    for i in (13, 27, 50):  # zeroed JPEGs in three different intact shards
        samples[i]["jpg"] = bytes(len(samples[i]["jpg"]))
    paths = _write(tmp_path, samples)
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])  # truncated tar: its first half still reads
    paths[3].write_bytes(rng.integers(0, 256, paths[3].stat().st_size, dtype=np.uint8).tobytes())  # noise
    got = embed_split(encode, tmp_path, "test", eval_transform(SIZE, channels=3), batch_size=8)
    read = set(got.keys)
    first = {s["__key__"] for s in samples[:PER_SHARD]}
    survived_first = len(read & first)
    assert 0 < survived_first < PER_SHARD
    assert not read & {s["__key__"] for s in samples[3 * PER_SHARD:4 * PER_SHARD]}
    assert got.expected == len(samples)
    lost_shard = (PER_SHARD - survived_first) + PER_SHARD  # the cut shard's rest + the whole noise shard
    # a partial member at the cut may surface as one missing_member sample; either way all are counted
    assert got.lost["bad_image"] == 3
    shard_reasons = ("bad_shard", "truncated_shard", "unreadable_shard", "missing_member")
    assert sum(got.lost.get(r, 0) for r in shard_reasons) == lost_shard
    assert "unaccounted" not in got.lost
    assert got.lost_total == len(samples) - len(got.keys)
    assert "lost" in got.summary() and str(len(samples)) in got.summary()


def test_expected_samples_follows_the_eval_assignment(clean):
    from radalign.data.loader import shard_paths

    shards = shard_paths(clean[0], "test")
    assert expected_samples(shards) == SHARDS * PER_SHARD
    per = [expected_samples(shards, r, 3, num_workers=2) for r in range(3)]
    assert sum(per) == SHARDS * PER_SHARD

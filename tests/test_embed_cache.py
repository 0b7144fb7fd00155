"""radalign.data.embed's embedding cache: one pass per split and export, shared by every stage.

Reuse is checked by counting encoder calls; what comes back is compared with a pass made without the cache
(every field of EmbeddedSplit). Planted: a changed shard (manifest sha256), a rewritten shard file, another
export, another transform, a truncated / bit-flipped / missing tensors file, a cut JSON, a JSON of another key,
an unwritable folder, concurrent writers, a damaged split whose lost counts must survive the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from radalign.data.embed import CACHE_ENV, EmbedCache, embed_split
from radalign.data.transforms import eval_transform

from tests.test_retrieval_embed import PER_SHARD, SHARDS, SIZE, _samples, _write

CHECKSUM = "ab" * 32


class Counting:
    """An encoder (fixed random projection) that counts the images it was asked to embed."""

    def __init__(self, seed: int = 5):
        self.proj = torch.from_numpy(np.random.default_rng(seed).normal(size=(3 * SIZE * SIZE, 8)).astype(np.float32))
        self.images = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, 8]
        self.images += len(x)
        return x.flatten(1) @ self.proj


def _with_sha(root: Path) -> None:
    """Give the manifest the real sha256 of each shard (as `data prepare` writes it)."""
    m = json.loads((root / "manifest.json").read_text())
    for split in m["splits"].values():
        for sh in split["shards"]:
            sh["sha256"] = hashlib.sha256((root / sh["path"]).read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(m))


def _shards(root: Path, seed: int = 0) -> Path:
    _write(root, _samples(SHARDS * PER_SHARD, np.random.default_rng(seed)))
    _with_sha(root)
    return root


@pytest.fixture
def shards(tmp_path) -> Path:
    return _shards(tmp_path / "shards")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)


def _cache(tmp_path, checksum=CHECKSUM) -> EmbedCache:
    return EmbedCache(tmp_path / "export" / "embeddings", checksum)


TF = eval_transform(SIZE, channels=3)


def _embed(root, enc, cache, **kw):
    kw.setdefault("batch_size", 8)
    return embed_split(enc, root, "test", kw.pop("transform", TF), cache=cache, **kw)


def assert_same(a, b, thumbnails=True):
    """Every field of two EmbeddedSplits."""
    np.testing.assert_array_equal(a.image, b.image)
    assert a.image.dtype == b.image.dtype == np.float32
    assert a.keys == b.keys and a.meta == b.meta and a.texts == b.texts
    assert a.lost == b.lost and a.skipped == b.skipped and a.expected == b.expected and a.capped == b.capped
    if thumbnails:
        assert a.thumbnails == b.thumbnails


def test_second_stage_reuses_everything(shards, tmp_path):
    ref = _embed(shards, Counting(), None, thumbnail_size=16)  # no cache: the reference
    first, second = Counting(), Counting()
    a = _embed(shards, first, _cache(tmp_path), thumbnail_size=16)
    b = _embed(shards, second, _cache(tmp_path), thumbnail_size=16)
    assert first.images == SHARDS * PER_SHARD and second.images == 0
    assert_same(a, ref)
    assert_same(b, ref)
    # a pass that wants no thumbnails is served by the entry that has them (and gets none)
    third = Counting()
    c = _embed(shards, third, _cache(tmp_path))
    assert third.images == 0 and c.thumbnails is None
    assert_same(c, ref, thumbnails=False)
    files = sorted(p.suffix for p in (tmp_path / "export" / "embeddings").iterdir())
    assert files == [".json", ".safetensors"]


def test_entry_without_thumbnails_does_not_serve_a_pass_that_wants_them(shards, tmp_path):
    _embed(shards, Counting(), _cache(tmp_path))
    enc = Counting()
    got = _embed(shards, enc, _cache(tmp_path), thumbnail_size=12)
    assert enc.images == SHARDS * PER_SHARD and len(got.thumbnails) == len(got.keys)
    again = Counting()
    assert _embed(shards, again, _cache(tmp_path), thumbnail_size=12).thumbnails == got.thumbnails
    assert again.images == 0


def test_rows_are_in_the_one_worker_order_whatever_the_workers(shards, tmp_path):
    """Two workers interleave their batches; the pass puts them back, so a cache entry made with workers
    serves a pass without them unchanged."""
    plain = _embed(shards, Counting(), None, batch_size=5)
    keys_in_shards = [s["__key__"] for s in _samples(SHARDS * PER_SHARD, np.random.default_rng(0))]
    assert plain.keys == keys_in_shards  # shard by shard, each tar in its order
    two = _embed(shards, Counting(), _cache(tmp_path), batch_size=5, num_workers=2, thumbnail_size=10)
    assert_same(two, plain, thumbnails=False)
    enc = Counting()
    assert_same(_embed(shards, enc, _cache(tmp_path), batch_size=5), plain, thumbnails=False)
    assert enc.images == 0


@pytest.mark.parametrize("change", ["manifest_sha", "shard_file", "export", "transform", "compute"])
def test_what_changes_the_result_misses_the_cache(shards, tmp_path, change, caplog):
    base = _embed(shards, Counting(), _cache(tmp_path))
    cache, transform = _cache(tmp_path), TF
    if change == "manifest_sha":  # a re-prepared shard: other bytes, the manifest names their sha256
        samples = _samples(SHARDS * PER_SHARD, np.random.default_rng(7))
        _write(shards, samples)
        _with_sha(shards)
    elif change == "shard_file":  # the file replaced behind the manifest's back (same sha256 listed)
        f = shards / "test" / "shard-000002.tar"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    elif change == "export":
        cache = _cache(tmp_path, checksum="cd" * 32)
    elif change == "transform":
        transform = eval_transform(SIZE, channels=3, mean=[0.5], std=[0.25])
    else:
        cache = EmbedCache(cache.folder, CHECKSUM, compute="cuda-fp32")
    enc = Counting()
    with caplog.at_level(logging.WARNING):
        got = _embed(shards, enc, cache, transform=transform)
    assert enc.images == len(got.keys) > 0
    ref = _embed(shards, Counting(), None, transform=transform)
    assert_same(got, ref)
    if change == "shard_file":
        assert got.lost and got.lost_total == PER_SHARD - (len(ref.keys) - (SHARDS - 1) * PER_SHARD)
    if change in ("manifest_sha", "shard_file"):
        assert not np.array_equal(got.image, base.image) or got.lost != base.lost
        assert "stale embedding cache entry" in caplog.text and "shard-00000" in caplog.text
        assert len(list(cache.folder.glob("*.json"))) == 1  # the stale entry went


def _tensors(cache) -> Path:
    (f,) = cache.folder.glob("*.safetensors")
    return f


def _json(cache) -> Path:
    (f,) = cache.folder.glob("*.json")
    return f


@pytest.mark.parametrize("damage", ["truncate_tensors", "flip_tensor_byte", "delete_tensors", "cut_json",
                                    "foreign_key", "fewer_keys"])
def test_damaged_entry_is_detected_and_recomputed(shards, tmp_path, damage, caplog):
    ref = _embed(shards, Counting(), None, thumbnail_size=16)
    cache = _cache(tmp_path)
    _embed(shards, Counting(), cache, thumbnail_size=16)
    t, j = _tensors(cache), _json(cache)
    if damage == "truncate_tensors":
        t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    elif damage == "flip_tensor_byte":
        data = bytearray(t.read_bytes())
        data[-7] ^= 0x10
        t.write_bytes(bytes(data))
    elif damage == "delete_tensors":
        t.unlink()
    elif damage == "cut_json":
        j.write_text(j.read_text()[:200])
    else:
        doc = json.loads(j.read_text())
        if damage == "foreign_key":
            doc["key"]["split"] = "validate"
        else:
            doc["keys"] = doc["keys"][:-1]
        j.write_text(json.dumps(doc))
    enc = Counting()
    with caplog.at_level(logging.WARNING):
        got = _embed(shards, enc, cache, thumbnail_size=16)
    assert "damaged embedding cache entry" in caplog.text
    assert enc.images == SHARDS * PER_SHARD
    assert_same(got, ref)
    again = Counting()  # repaired: the next stage reuses it
    assert_same(_embed(shards, again, cache, thumbnail_size=16), ref)
    assert again.images == 0 and len(list(cache.folder.glob("*.safetensors"))) == 1


def test_lost_counts_survive_the_cache(tmp_path):
    rng = np.random.default_rng(1)
    samples = _samples(SHARDS * PER_SHARD, rng)
    for i in (13, 27, 50):
        samples[i]["jpg"] = bytes(len(samples[i]["jpg"]))  # zeroed JPEGs
    root = tmp_path / "damaged"
    paths = _write(root, samples)
    _with_sha(root)  # the manifest lists the shards as prepared ...
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])  # ... and one was cut afterwards
    ref = _embed(root, Counting(), None)
    assert ref.lost["bad_image"] == 3 and ref.lost_total > 3
    _embed(root, Counting(), _cache(tmp_path))
    enc = Counting()
    got = _embed(root, enc, _cache(tmp_path))
    assert enc.images == 0
    assert got.lost == ref.lost and got.skipped == ref.skipped and got.expected == ref.expected == len(samples)
    assert got.summary() == ref.summary()


def test_max_samples_uses_a_complete_entry_and_never_stores_a_cut_pass(shards, tmp_path):
    cache = _cache(tmp_path)
    cut = _embed(shards, Counting(), cache, max_samples=10)
    assert len(cut) == 10 and cut.capped == SHARDS * PER_SHARD - 10
    assert not cache.folder.exists() or not list(cache.folder.glob("*.json"))
    full = _embed(shards, Counting(), cache)
    enc = Counting()  # a cap the split does not reach: the complete entry is that pass's result
    assert_same(_embed(shards, enc, cache, max_samples=10_000), full)
    assert enc.images == 0
    enc = Counting()  # a cap it reaches: embedded (the first 10), not served from the entry
    again = _embed(shards, enc, cache, max_samples=10)
    assert enc.images == 10 and again.keys == full.keys[:10]


def test_unwritable_folder_means_no_caching_with_a_warning(shards, tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder's parent should be")
    cache = EmbedCache(blocker / "embeddings", CHECKSUM)
    ref = _embed(shards, Counting(), None)
    with caplog.at_level(logging.WARNING):
        got = _embed(shards, Counting(), cache)
    assert_same(got, ref)
    assert "not writable" in caplog.text and "continuing without caching" in caplog.text
    enc = Counting()
    _embed(shards, enc, cache)
    assert enc.images == SHARDS * PER_SHARD


def test_switch_and_location(tmp_path, monkeypatch):
    class Enc:
        folder, checksum, device = tmp_path / "export", CHECKSUM, torch.device("cpu")

    assert EmbedCache.for_encoders(Enc()) == EmbedCache(tmp_path / "export" / "embeddings", CHECKSUM, "cpu-fp32")
    assert EmbedCache.for_encoders(Enc(), enabled=False) is None
    for off in ("off", "0", "false", "OFF"):
        monkeypatch.setenv(CACHE_ENV, off)
        assert EmbedCache.for_encoders(Enc()) is None
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert EmbedCache.for_encoders(Enc()).folder == tmp_path / "elsewhere"
    monkeypatch.delenv(CACHE_ENV)
    Enc.folder = None  # encoders built in memory: nowhere to keep it
    assert EmbedCache.for_encoders(Enc()) is None


def test_no_manifest_sha_or_unstable_transform_is_not_cached(tmp_path):
    root = tmp_path / "nosha"
    _write(root, _samples(12, np.random.default_rng(0)))  # sha256 "-" in the manifest
    cache = _cache(tmp_path)
    _embed(root, Counting(), cache)
    assert not cache.folder.exists()
    root2 = _shards(tmp_path / "withsha")
    _embed(root2, Counting(), cache, transform=lambda im: TF(im))  # repr holds an address
    assert not cache.folder.exists()


def _writer(root: str, folder: str) -> None:
    embed_split(Counting(), root, "test", TF, batch_size=8, cache=EmbedCache(Path(folder), CHECKSUM),
                thumbnail_size=12)


def test_concurrent_writers_leave_one_complete_entry(shards, tmp_path, caplog):
    folder = tmp_path / "export" / "embeddings"
    ctx = mp.get_context("spawn")  # a fork of a process that ran torch's thread pool can hang
    procs = [ctx.Process(target=_writer, args=(str(shards), str(folder))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * 3
    assert len(list(folder.glob("*.json"))) == 1 and len(list(folder.glob("*.safetensors"))) == 1
    assert not [f for f in os.listdir(folder) if ".tmp-" in f]
    enc = Counting()
    with caplog.at_level(logging.WARNING):
        got = _embed(shards, enc, EmbedCache(folder, CHECKSUM), thumbnail_size=12)
    assert enc.images == 0 and "damaged" not in caplog.text
    assert_same(got, _embed(shards, Counting(), None, thumbnail_size=12))
    shutil.rmtree(folder)


# ----------------------------------------------------------------------------------------------------------
# The stages: each split embedded once per export


def _counting_encoders(export: Path):
    from radalign.pretrain.export import load_encoders

    enc = load_encoders(export)
    real, enc.calls = enc.encode_images, [0]

    def counted(x):
        enc.calls[0] += len(x)
        return real(x)

    enc.encode_images = counted
    return enc


@pytest.fixture
def own_export(tiny_export, tmp_path) -> Path:
    """A copy of the session's export with an empty cache (other tests fill the shared one)."""
    return Path(shutil.copytree(tiny_export, tmp_path / "run" / "export", ignore=shutil.ignore_patterns("embeddings")))


def test_zeroshot_retrieval_and_finetune_share_one_pass(own_export, synth_shards, tmp_path, monkeypatch):
    from radalign.finetune.inputs import EmbeddingCache
    from radalign.retrieval.build import embed_shards as retrieval_embed
    from radalign.zeroshot.inputs import embed_shards as zeroshot_embed

    enc = _counting_encoders(own_export)
    zs = zeroshot_embed(enc, synth_shards, "test")
    n = enc.calls[0]
    assert n == len(zs.keys) > 0
    cases = retrieval_embed(enc, synth_shards, "test", thumbnail_size=0, with_text=True, progress=False)
    lookup = EmbeddingCache(enc, synth_shards, tmp_path / "ft", progress=False).images("test")
    assert enc.calls[0] == n  # neither retrieval nor finetune ran the image tower
    assert cases.keys == zs.keys and np.array_equal(cases.image, zs.images)
    assert set(lookup) == set(zs.keys)
    assert all(np.array_equal(lookup[k], zs.images[i]) for i, k in enumerate(zs.keys))
    entries = list((own_export / "embeddings").glob("test-*.json"))
    assert len(entries) == 1
    # and the independent check: an uncached pass gives the same numbers
    fresh = zeroshot_embed(enc, synth_shards, "test", cache=False)
    assert enc.calls[0] == 2 * n and np.array_equal(fresh.images, zs.images)
    monkeypatch.setenv(CACHE_ENV, "off")
    retrieval_embed(enc, synth_shards, "test", thumbnail_size=0, progress=False)
    assert enc.calls[0] == 3 * n


@pytest.mark.parametrize("cap", [None, 2])
def test_pretrain_final_validation_is_kept_for_the_later_stages(synth_shards, tmp_path, cap):
    """The last validation ran the exported weights over the validate split: zero-shot reads that pass (the
    same numbers as the export's own encoders, within float rounding), unless max_samples cut it short."""
    from radalign.pretrain.recipe import run_pretrain
    from radalign.zeroshot.inputs import embed_shards as zeroshot_embed

    from tests.test_pretrain import _cfg

    extra = ["steps=2", "ckpt_every=0", "data.val_split=validate", f"data.val_max_samples={cap or 100_000}"]
    run_dir = run_pretrain(_cfg(tmp_path / "run", synth_shards, *extra))
    enc = _counting_encoders(run_dir / "export")
    got = zeroshot_embed(enc, synth_shards, "validate")
    fresh = zeroshot_embed(enc, synth_shards, "validate", cache=False)
    assert got.keys == fresh.keys and got.skipped == fresh.skipped
    np.testing.assert_allclose(got.images, fresh.images, atol=1e-5)
    if cap is None:
        assert enc.calls[0] == len(fresh.keys)  # only the uncached pass ran the tower
    else:
        assert enc.calls[0] == 2 * len(fresh.keys) > 2 * cap  # the cut pass was not kept

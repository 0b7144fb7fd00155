"""Loaders over webdataset shards (data/loader.py) and chest X-ray transforms (data/transforms.py).

The shards are written here with webdataset.TarWriter following docs/architecture.md §1 exactly, so these
tests do not depend on `data prepare`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from radalign.data.labels import CHEXPERT_LABELS
from radalign.data.loader import (
    LOST_REASONS,
    SKIP_REASONS,
    eval_assignment,
    make_eval_loader,
    make_train_loader,
    manifest_counts,
    shard_paths,
    split_samples,
    study_int64,
)
from radalign.data.text import text_id
from radalign.data.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, eval_transform, train_transform

from radalign import RadalignError

N_SAMPLES, SHARD_SIZE, SIZE = 240, 40, 24  # -> 6 shards; transforms output 24x24
TEXTS = ["No acute cardiopulmonary process.", "no acute cardiopulmonary process",
         "Small left pleural effusion.", "Cardiomegaly without edema.", "Right lower lobe opacity."]


def _jpeg(rng: np.random.Generator, h: int = 32, w: int = 36) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L").save(buf, format="JPEG")
    return buf.getvalue()


def _meta(i: int, split: str = "train") -> dict:
    return {"subject_id": 10000000 + i // 4, "study_id": 50000000 + i // 2, "dicom_id": f"d{i:05d}",
            "split": split, "view": "PA", "study_datetime": "2150-01-01T10:00:00",
            "labels": {name: [1, 0, -1, None][(i + k) % 4] for k, name in enumerate(CHEXPERT_LABELS)},
            "sections": {"findings": TEXTS[i % 5], "impression": "", "last_paragraph": "", "indication": ""}}


def _write(root: Path, samples: list[dict], shard_size: int, split: str = "train") -> dict:
    """Write samples ({"__key__", "jpg", "txt", "json"} with bytes values) + manifest like `data prepare`."""
    shards = []
    for start in range(0, len(samples), shard_size):
        rel = f"{split}/shard-{start // shard_size:06d}.tar"
        (root / split).mkdir(parents=True, exist_ok=True)
        chunk = samples[start:start + shard_size]
        with wds.TarWriter(str(root / rel)) as sink:
            for s in chunk:
                sink.write(s)
        shards.append({"path": rel, "samples": len(chunk), "sha256": "-"})
    manifest = {"format": "radalign-shards/1", "source": "test", "created": "2026-01-01T00:00:00",
                "options": {"views": ["PA"], "text": "findings+impression", "image_size": 32,
                            "shard_size": shard_size},
                "labels": list(CHEXPERT_LABELS),
                "splits": {"train": {"samples": 0, "shards": []}, "validate": {"samples": 0, "shards": []},
                           "test": {"samples": 0, "shards": []}},
                "skipped": {}}
    manifest["splits"][split] = {"samples": len(samples), "shards": shards}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> tuple[Path, dict]:
    """6 shards x 40 samples; returns (root, {key: (text, meta)})."""
    root = tmp_path_factory.mktemp("loader_shards")
    rng = np.random.default_rng(0)
    samples, truth = [], {}
    for i in range(N_SAMPLES):
        meta = _meta(i)
        text = TEXTS[i % 5]
        samples.append({"__key__": meta["dicom_id"], "jpg": _jpeg(rng), "txt": text.encode(),
                        "json": json.dumps(meta).encode()})
        truth[meta["dicom_id"]] = (text, meta)
    _write(root, samples, SHARD_SIZE)
    return root, truth


# Corrupt samples, each with the reason it must be skipped for.
CORRUPT = {"c-badjpg": "bad_image", "c-truncjpg": "bad_image", "c-badjson": "bad_json",
           "c-nostudy": "bad_json", "c-notxt": "missing_member", "c-empty": "empty_text",
           "c-latin1": "bad_text"}


@pytest.fixture(scope="session")
def corrupt_shards(tmp_path_factory) -> tuple[Path, set[str]]:
    """3 shards: 60 good samples with the 7 CORRUPT ones mixed in; returns (root, good keys)."""
    root = tmp_path_factory.mktemp("corrupt_shards")
    rng = np.random.default_rng(1)
    samples, good = [], set()
    for i in range(60):
        meta = _meta(i)
        samples.append({"__key__": f"g{i:03d}", "jpg": _jpeg(rng), "txt": TEXTS[i % 5].encode(),
                        "json": json.dumps(meta).encode()})
        good.add(f"g{i:03d}")
    ok_jpg, ok_json, ok_txt = _jpeg(rng), json.dumps(_meta(0)).encode(), b"Normal chest."
    no_study = {k: v for k, v in _meta(1).items() if k != "study_id"}
    bad = [{"__key__": "c-badjpg", "jpg": b"not a jpeg", "txt": ok_txt, "json": ok_json},
           {"__key__": "c-truncjpg", "jpg": ok_jpg[: len(ok_jpg) // 3], "txt": ok_txt, "json": ok_json},
           {"__key__": "c-badjson", "jpg": ok_jpg, "txt": ok_txt, "json": b"{not json"},
           {"__key__": "c-nostudy", "jpg": ok_jpg, "txt": ok_txt, "json": json.dumps(no_study).encode()},
           {"__key__": "c-notxt", "jpg": ok_jpg, "json": ok_json},
           {"__key__": "c-empty", "jpg": ok_jpg, "txt": b"  \n", "json": ok_json},
           {"__key__": "c-latin1", "jpg": ok_jpg, "txt": "Pleural Erguss \xe9".encode("latin-1"), "json": ok_json}]
    for k, s in enumerate(bad):  # spread over the shards, not at shard ends
        samples.insert(3 + 9 * k, s)
    _write(root, samples, 23)
    return root, good


def _keys(loader, epochs: int = 1) -> list[str]:
    out = []
    for e in range(epochs):
        loader.set_epoch(e)
        for batch in loader:
            out += batch["key"]
    return out


# ----------------------------------------------------------------------------------------------------------
# Manifest


def test_shard_paths_follow_manifest(shards):
    root, _ = shards
    paths = shard_paths(root, "train")
    assert [Path(p).name for p in paths] == [f"shard-{i:06d}.tar" for i in range(6)]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in paths)
    assert split_samples(root, "train") == N_SAMPLES
    assert manifest_counts(paths) == dict.fromkeys(paths, SHARD_SIZE)


def test_shard_paths_errors_name_the_problem(shards, tmp_path):
    root, _ = shards
    with pytest.raises(RadalignError, match=r"manifest\.json.*prepare"):
        shard_paths(tmp_path, "train")
    with pytest.raises(RadalignError, match=r"no split 'valid'.*train, validate, test"):
        shard_paths(root, "valid")
    with pytest.raises(RadalignError, match=r"'test' has no shards"):
        shard_paths(root, "test")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(RadalignError, match=r"'other/9'.*radalign-shards/1"):
        shard_paths(tmp_path, "train")
    manifest = json.loads((root / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))  # same manifest, no shard files
    with pytest.raises(RadalignError, match=r"6 shard\(s\) of split 'train'.*missing.*shard-000000\.tar"):
        shard_paths(tmp_path, "train")
    assert manifest_counts([str(tmp_path / "elsewhere.tar")]) is None


# ----------------------------------------------------------------------------------------------------------
# Training loader


def test_train_batch_contents_match_the_shards(shards):
    from open_clip.tokenizer import SimpleTokenizer

    root, truth = shards
    tok = SimpleTokenizer(context_length=16)
    loader = make_train_loader(shard_paths(root, "train"), batch_size=16, transform=eval_transform(SIZE),
                               tokenize=tok, num_workers=0, seed=0, resampled=False, shuffle_buffer=50)
    batch = next(iter(loader))
    assert set(batch) == {"image", "text", "study_id", "text_id", "key", "skipped"}
    assert batch["image"].shape == (16, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    texts = [truth[k][0] for k in batch["key"]]
    assert torch.equal(batch["text"], tok(texts))  # tokenized in the pipeline exactly as the tokenizer does
    assert batch["study_id"].dtype == torch.int64 and batch["text_id"].dtype == torch.int64
    assert batch["study_id"].tolist() == [truth[k][1]["study_id"] for k in batch["key"]]
    assert batch["text_id"].tolist() == [text_id(t) for t in texts]
    assert batch["skipped"] == {}
    # The image is the stored JPEG through the transform.
    first = next(s for s in wds.WebDataset(shard_paths(root, "train"), shardshuffle=False)
                 if s["__key__"] == batch["key"][0])
    expected = eval_transform(SIZE)(Image.open(io.BytesIO(first["jpg"])))
    assert torch.allclose(batch["image"][0], expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_epoch_sees_every_sample_once(shards, workers):
    root, truth = shards
    loader = make_train_loader(shard_paths(root, "train"), batch_size=16, transform=eval_transform(SIZE),
                               num_workers=workers, seed=3, resampled=False, shuffle_buffer=64)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert all(len(b["key"]) == 16 for b in batches)
    assert len(batches) == len(loader)  # known up front from the manifest
    assert len(keys) == len(set(keys))
    # What is not seen is exactly the short last batch of each worker, counted, never silent.
    assert len(keys) + loader.skipped["incomplete_batch"] == N_SAMPLES
    assert set(keys) <= set(truth)
    shards_per_worker = 6 // max(1, workers)
    assert len(loader) == max(1, workers) * (shards_per_worker * SHARD_SIZE // 16)


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_order(shards, workers):
    root, _ = shards
    paths = shard_paths(root, "train")

    def order(seed: int, epoch: int) -> list[str]:
        loader = make_train_loader(paths, batch_size=8, transform=eval_transform(SIZE), num_workers=workers,
                                   seed=seed, resampled=False, shuffle_buffer=100)
        loader.set_epoch(epoch)
        return _keys_one(loader)

    a, b = order(7, 0), order(7, 0)
    assert a == b
    assert order(8, 0) != a  # another seed, another order
    next_epoch = order(7, 1)
    assert next_epoch != a and sorted(next_epoch) == sorted(a)  # reshuffled, same samples


def _keys_one(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


def test_each_pass_is_a_new_epoch_unless_set(shards):
    root, _ = shards
    loader = make_train_loader(shard_paths(root, "train"), batch_size=8, transform=eval_transform(SIZE),
                               num_workers=0, seed=1, resampled=False, shuffle_buffer=100)
    first, second = _keys_one(loader), _keys_one(loader)
    assert loader.epoch == 1 and first != second and sorted(first) == sorted(second)
    assert _keys(loader, epochs=2) == first + second  # set_epoch(0), set_epoch(1) replay both passes


def test_resampled_epoch_length_and_determinism(shards):
    root, truth = shards
    paths = shard_paths(root, "train")

    def make(seed, rank=0):
        return make_train_loader(paths, batch_size=8, transform=eval_transform(SIZE), num_workers=2, seed=seed,
                                 resampled=True, shuffle_buffer=32, rank=rank, world_size=2)

    loader = make(5)
    assert len(loader) == 2 * math.ceil(N_SAMPLES / (8 * 2 * 2))  # 2 workers x batches per worker
    keys = _keys_one(loader)
    assert len(keys) == 8 * len(loader)
    assert set(keys) <= set(truth)
    assert _keys_one(make(5)) == keys
    assert _keys_one(make(5, rank=1)) != keys  # ranks draw differently


def test_resampled_needs_a_sample_count_without_manifest(shards, tmp_path):
    root, _ = shards
    lone = tmp_path / "x" / "shard-000000.tar"
    lone.parent.mkdir()
    lone.write_bytes(Path(shard_paths(root, "train")[0]).read_bytes())
    with pytest.raises(RadalignError, match="samples_per_epoch"):
        make_train_loader([str(lone)], batch_size=8, transform=eval_transform(SIZE), num_workers=0)
    loader = make_train_loader([str(lone)], batch_size=8, transform=eval_transform(SIZE), num_workers=0,
                               samples_per_epoch=20)
    assert len(_keys_one(loader)) == 8 * math.ceil(20 / 8)


def test_fewer_shards_than_readers_is_an_error_before_any_work(shards):
    root, _ = shards
    paths = shard_paths(root, "train")  # 6 shards
    with pytest.raises(RadalignError) as err:
        make_train_loader(paths, batch_size=8, transform=eval_transform(SIZE), num_workers=2, rank=0,
                          world_size=4, resampled=False)
    msg = str(err.value)
    assert "6 shard(s) for 2 worker(s) x 4 process(es) = 8 readers" in msg
    assert "num_workers <= 1" in msg and "--shard-size" in msg and "resampled=True" in msg
    # Resampling has no such limit.
    make_train_loader(paths, batch_size=8, transform=eval_transform(SIZE), num_workers=2, rank=0, world_size=4)
    with pytest.raises(RadalignError, match="batch_size=0"):
        make_train_loader(paths, batch_size=0, transform=eval_transform(SIZE), num_workers=0)
    with pytest.raises(RadalignError, match=r"do not exist.*nope\.tar"):
        make_train_loader(paths + ["/nope.tar"], batch_size=8, transform=eval_transform(SIZE), num_workers=0)


# ----------------------------------------------------------------------------------------------------------
# Corrupt samples


@pytest.fixture
def loader_log():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    logging.getLogger("radalign.data.loader").addHandler(handler)
    yield records
    logging.getLogger("radalign.data.loader").removeHandler(handler)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_are_skipped_counted_and_logged_once(corrupt_shards, loader_log, workers):
    root, good = corrupt_shards
    loader = make_eval_loader(shard_paths(root, "train"), batch_size=8, transform=eval_transform(SIZE),
                              num_workers=workers)
    per_batch: Counter = Counter()
    keys = []
    for _ in range(2):  # twice: counts add up, the log names each key once
        for batch in loader:
            keys += batch["key"]
            per_batch.update(batch["skipped"])
    # Eval keeps the empty text (only training needs a caption); every other corrupt sample is skipped.
    assert Counter(keys) == Counter({k: 2 for k in good} | {"c-empty": 2})
    expected = Counter({r: 2 * n for r, n in Counter(CORRUPT.values()).items() if r != "empty_text"})
    assert loader.skipped == expected
    assert per_batch <= loader.skipped  # per-batch counts reach the consumer (the rest rode on empty batches)
    assert set(loader.skipped) <= set(SKIP_REASONS)
    logged = [r.getMessage() for r in loader_log]
    assert sorted(logged) == sorted(f"skipped {k} ({r})" for k, r in CORRUPT.items() if r != "empty_text")


def test_training_skips_empty_text_too(corrupt_shards):
    root, good = corrupt_shards
    loader = make_train_loader(shard_paths(root, "train"), batch_size=4, transform=train_transform(SIZE),
                               num_workers=0, resampled=False, shuffle_buffer=10)
    keys = _keys_one(loader)
    assert set(keys) <= good
    skipped = loader.skipped
    assert len(keys) + skipped["incomplete_batch"] == len(good)
    assert {r: n for r, n in skipped.items() if r != "incomplete_batch"} == dict(Counter(CORRUPT.values()))


def test_unreadable_shards_stop_resampling_with_an_error(tmp_path):
    bad = [{"__key__": f"b{i}", "jpg": b"garbage", "txt": b"x", "json": json.dumps(_meta(i)).encode()}
           for i in range(5)]
    _write(tmp_path, bad, 5)
    loader = make_train_loader(shard_paths(tmp_path, "train"), batch_size=2, transform=eval_transform(SIZE),
                               num_workers=0, samples_per_epoch=4)
    with pytest.raises(RadalignError, match=r"1000 samples in a row could not be read \(last: b\d, bad_image\)"):
        next(iter(loader))


def test_truncated_shard_is_counted_and_the_rest_still_loads(shards, tmp_path):
    root, truth = shards
    paths = shard_paths(root, "train")[:2]
    cut = tmp_path / "train" / "shard-000000.tar"
    cut.parent.mkdir()
    data = Path(paths[0]).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    loader = make_eval_loader([str(cut), paths[1]], batch_size=16, transform=eval_transform(SIZE))
    keys = _keys_one(loader)
    second = {k for k in truth if int(k[1:]) in range(SHARD_SIZE, 2 * SHARD_SIZE)}
    assert second <= set(keys)  # the intact shard is complete
    assert loader.skipped["bad_shard"] == 1
    assert 0 < len(set(keys) - second) < SHARD_SIZE  # the readable half of the cut shard


# ----------------------------------------------------------------------------------------------------------
# Evaluation loader


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 6, 7, 13])
@pytest.mark.parametrize("readers", [1, 2, 3, 4, 8, 14])
def test_eval_assignment_covers_every_sample_once(num_shards, readers):
    rng = np.random.default_rng(num_shards * 100 + readers)
    sizes = rng.integers(0, 30, num_shards)
    plan = eval_assignment(num_shards, readers)
    assert len(plan) == readers
    seen = Counter((j, i) for work in plan for j, stride, offset in work for i in range(offset, sizes[j], stride))
    assert seen == Counter({(j, i): 1 for j in range(num_shards) for i in range(sizes[j])})


@pytest.mark.parametrize(("world", "workers", "nshards"), [(1, 0, 6), (3, 2, 6), (7, 0, 6), (2, 2, 1)])
def test_eval_loader_every_sample_once_across_ranks(shards, world, workers, nshards):
    root, truth = shards
    paths = shard_paths(root, "train")[:nshards]
    per_rank = []
    for rank in range(world):
        loader = make_eval_loader(paths, batch_size=16, transform=eval_transform(SIZE), num_workers=workers,
                                  rank=rank, world_size=world)
        batches = list(loader)
        assert len(batches) == len(loader)
        per_rank.append([k for b in batches for k in b["key"]])
        for b in batches:
            assert [m["dicom_id"] for m in b["meta"]] == b["key"]
            assert b["text"] == [truth[k][0] for k in b["key"]]
    union = [k for keys in per_rank for k in keys]
    assert len(union) == len(set(union)) == nshards * SHARD_SIZE
    # Stable: a second pass gives the same order on every rank.
    again = make_eval_loader(paths, batch_size=16, transform=eval_transform(SIZE), num_workers=workers,
                             rank=world - 1, world_size=world)
    assert _keys_one(again) == per_rank[-1]


def _tar_order(path: str) -> list[str]:
    """Sample keys of a tar in the order its members are stored (read with tarfile, not webdataset)."""
    import tarfile

    keys: list[str] = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key = m.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


@pytest.mark.parametrize(("world", "workers", "nshards"), [(1, 0, 6), (1, 2, 6), (1, 3, 2), (2, 2, 1)])
def test_eval_batches_carry_each_samples_place(shards, world, workers, nshards):
    """`place` = (shard index, index in its tar); sorted by it, the samples are in the one-reader order, whatever
    the workers interleaved (several readers sharing one shard included)."""
    root, _ = shards
    paths = shard_paths(root, "train")[:nshards]
    where = {k: (j, i) for j, p in enumerate(paths) for i, k in enumerate(_tar_order(p))}
    for rank in range(world):
        loader = make_eval_loader(paths, batch_size=7, transform=eval_transform(SIZE), num_workers=workers,
                                  rank=rank, world_size=world)
        got = [(k, tuple(pl)) for b in loader for k, pl in zip(b["key"], b["place"])]
        assert all(pl == where[k] for k, pl in got)
        if world == 1:
            assert [k for k, _ in sorted(got, key=lambda x: x[1])] == [k for p in paths for k in _tar_order(p)]


def _rank_main(rank: int, world: int, init: str, paths: list[str], out: str) -> None:
    import multiprocessing

    import torch.distributed as dist

    # Children of mp.spawn default to spawning their DataLoader workers too (each re-imports torch: seconds);
    # ranks started by torchrun / accelerate launch fork them, as we do here.
    multiprocessing.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = {}
        for workers, n in [(0, len(paths)), (2, len(paths)), (2, 1)]:
            loader = make_eval_loader(paths[:n], batch_size=8, transform=eval_transform(8), num_workers=workers)
            result[f"{workers}-{n}"] = [k for b in loader for k in b["key"]]
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_eval_loader_under_torch_distributed(shards, tmp_path):
    """Two real processes (spawn + gloo): rank/world size come from torch.distributed."""
    import torch.multiprocessing as tmp

    root, _ = shards
    paths = shard_paths(root, "train")[:3]
    os.environ.pop("RANK", None)
    os.environ.pop("WORLD_SIZE", None)
    init = f"file://{tmp_path / 'rendezvous'}"
    tmp.spawn(_rank_main, args=(2, init, paths, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for case, n in [("0-3", 3), ("2-3", 3), ("2-1", 1)]:
        a, b = ranks[0][case], ranks[1][case]
        assert a and b, case  # both ranks got work, even with 4 readers on 1 shard
        assert not set(a) & set(b)
        assert len(a) + len(b) == len(set(a) | set(b)) == n * SHARD_SIZE


# ----------------------------------------------------------------------------------------------------------
# Transforms


def _gray(h=48, w=64, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8), mode="L")


def test_constants_match_open_clip():
    from open_clip.constants import OPENAI_DATASET_MEAN as M
    from open_clip.constants import OPENAI_DATASET_STD as S

    assert OPENAI_DATASET_MEAN == tuple(M) and OPENAI_DATASET_STD == tuple(S)


def test_eval_transform_equals_open_clip_on_gray_images():
    from open_clip.transform import image_transform

    reference = image_transform(40, is_train=False)  # resize bicubic, center crop, RGB, normalise
    for mode in ("L", "RGB"):
        img = _gray().convert(mode)
        ours = eval_transform(40)(img)
        assert ours.shape == (3, 40, 40)
        assert torch.allclose(ours, reference(img), atol=1e-5)


def test_one_channel_tower_gets_the_gray_channel():
    img = _gray()
    three = eval_transform(32)(img)
    one = eval_transform(32, channels=1, mean=[OPENAI_DATASET_MEAN[0]], std=[OPENAI_DATASET_STD[0]])(img)
    assert one.shape == (1, 32, 32)
    assert torch.allclose(one[0], three[0])
    averaged = eval_transform(32, channels=1, mean=[sum(OPENAI_DATASET_MEAN) / 3], std=[sum(OPENAI_DATASET_STD) / 3])
    assert torch.allclose(eval_transform(32, channels=1)(img), averaged(img))  # default: RGB stats averaged


def test_train_transform_never_flips_by_default():
    arr = np.zeros((64, 64), dtype=np.uint8)
    arr[:, :32] = 220  # bright left half: a flip would put it on the right
    img = Image.fromarray(arr, mode="L")
    torch.manual_seed(0)
    sides = []
    for hflip in (False, True):
        tf = train_transform(32, hflip=hflip)
        outs = torch.stack([tf(img) for _ in range(40)])  # [40, 3, 32, 32]
        sides.append((outs[..., :16].mean(dim=(1, 2, 3)) > outs[..., 16:].mean(dim=(1, 2, 3))).float().mean())
    assert sides[0] == 1.0  # always left-bright without flips
    assert 0.1 < sides[1] < 0.9  # with hflip=True some are mirrored, so the check above can fail


def test_train_transform_augments_mildly_and_reproducibly():
    img = _gray(64, 80)
    tf = train_transform(32)
    torch.manual_seed(1)
    a = tf(img)
    torch.manual_seed(1)
    assert torch.equal(a, tf(img))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert not torch.equal(a, tf(img))  # random crop/rotation/jitter differ between calls
    # One gray image repeated: undoing each channel's normalisation gives the same pixels.
    pixels = a * torch.tensor(OPENAI_DATASET_STD)[:, None, None] + torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[1], pixels[2], atol=1e-5)


def test_fused_augmentation_equals_torchvision_crop_then_rotate():
    """RandomCropRotateJitter's geometry is torchvision's RandomResizedCrop + rotate, pixel for pixel."""
    from radalign.data.transforms import RandomCropRotateJitter
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms.v2 import functional as F

    img = _gray(64, 80, seed=3)
    aug = RandomCropRotateJitter(32, (0.5, 1.0), (0.8, 1.25), rotation=10.0, brightness=0.0, contrast=0.0,
                                 hflip=False)
    for seed in range(5):
        torch.manual_seed(seed)
        ours = aug(img)  # [1, 32, 32]
        torch.manual_seed(seed)  # replay the same draws through torchvision
        top, left, h, w = RandomResizedCrop.get_params(img, [0.5, 1.0], [0.8, 1.25])
        angle = float(torch.empty(1).uniform_(-10.0, 10.0))
        ref = F.rotate(F.resized_crop(img, top, left, h, w, [32, 32], antialias=True), angle,
                       interpolation=F.InterpolationMode.BILINEAR, fill=0)
        assert ours.shape == (1, 32, 32)
        assert torch.equal(ours, F.pil_to_tensor(ref).float() / 255.0)


def test_fused_augmentation_jitters_brightness_and_contrast_within_range():
    from radalign.data.transforms import RandomCropRotateJitter

    img = Image.fromarray(np.full((32, 32), 100, dtype=np.uint8), mode="L")
    img.paste(200, (0, 0, 16, 32))  # two flat halves: mean 150/255, half-range 50/255
    aug = RandomCropRotateJitter(32, (1.0, 1.0), (1.0, 1.0), rotation=0.0, brightness=0.2, contrast=0.3,
                                 hflip=False)
    torch.manual_seed(0)
    outs = torch.stack([aug(img) for _ in range(200)])  # [200, 1, 32, 32]
    means, spans = outs.mean(dim=(1, 2, 3)), outs.amax(dim=(1, 2, 3)) - outs.amin(dim=(1, 2, 3))
    base_mean, base_span = 150 / 255, 100 / 255
    assert (means / base_mean).min() > 0.79 and (means / base_mean).max() < 1.21  # brightness +-20 %
    assert (spans / base_span).min() > 0.8 * 0.69 and (spans / base_span).max() < 1.2 * 1.31  # x brightness x contrast
    assert means.std() > 0.02 and spans.std() > 0.02  # it does jitter


def test_sixteen_bit_images_are_rescaled_not_clipped():
    arr = (np.linspace(0, 4095, 32 * 32).reshape(32, 32)).astype(np.uint16)  # 12-bit values
    out = eval_transform(32, channels=1, mean=[0.0], std=[1.0])(Image.fromarray(arr))
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.45 < out.mean() < 0.55  # clipping at 255 would give nearly all ones


def test_transform_arguments_are_checked():
    with pytest.raises(RadalignError, match=r"mean=\[0\.5, 0\.5\].*3-channel"):
        eval_transform(32, mean=[0.5, 0.5])
    with pytest.raises(RadalignError, match=r"std=.*> 0"):
        train_transform(32, std=[0.0])
    with pytest.raises(RadalignError, match="channels=2"):
        eval_transform(32, channels=2)
    with pytest.raises(RadalignError, match="image_size=0"):
        train_transform(0)


def test_study_ids_map_to_stable_int64():
    assert study_int64(50414267) == 50414267
    assert study_int64("50414267") == 50414267
    h = study_int64("study-a")
    assert h == study_int64("study-a") != study_int64("study-b")
    assert 0 <= h < 2**63
    assert study_int64("99999999999999999999999") < 2**63  # too big for int64: hashed
    with pytest.raises(ValueError):
        study_int64(None)


# ----------------------------------------------------------------------------------------------------------
# Nothing lost uncounted: every shard read is checked against the manifest's per-shard counts.


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _damaged_split(root: Path, *, cut_mid_member: bool = False) -> dict:
    """4 shards x 20 samples, manifest with the intact shards' sha256; then shard 1 is cut after 8 samples
    (or in the middle of a member), shard 2 replaced by random bytes, and 3 JPEGs of shard 3 zeroed."""
    import tarfile

    rng = np.random.default_rng(5)
    samples = []
    for i in range(80):
        jpg = _jpeg(rng)
        if i in (61, 66, 77):
            jpg = b"\x00" * len(jpg)
        samples.append({"__key__": f"k{i:03d}", "jpg": jpg, "txt": TEXTS[i % 5].encode(),
                        "json": json.dumps(_meta(i)).encode()})
    manifest = _write(root, samples, 20)
    for shard in manifest["splits"]["train"]["shards"]:
        shard["sha256"] = _sha(root / shard["path"])
    (root / "manifest.json").write_text(json.dumps(manifest))
    cut = root / "train" / "shard-000001.tar"
    with tarfile.open(cut) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    data = cut.read_bytes()
    cut.write_bytes(data[: offsets[24] + (700 if cut_mid_member else 0)])  # 24 members = 8 whole samples
    noise = root / "train" / "shard-000002.tar"
    noise.write_bytes(np.random.default_rng(6).integers(0, 256, noise.stat().st_size, dtype=np.uint8).tobytes())
    return manifest


LOST = {"truncated_shard": 12, "unreadable_shard": 20, "bad_image": 3}  # of 80 manifest samples


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_loader_counts_every_lost_sample_by_reason(tmp_path, workers, loader_log):
    _damaged_split(tmp_path)
    loader = make_eval_loader(shard_paths(tmp_path, "train"), batch_size=7, transform=eval_transform(SIZE),
                              num_workers=workers)
    keys = _keys_one(loader)
    readable = {f"k{i:03d}" for i in [*range(20), *range(20, 28), *range(60, 80)] if i not in (61, 66, 77)}
    assert sorted(keys) == sorted(readable)
    assert loader.lost == LOST and loader.delivered == 45 and loader.expected == 80
    assert loader.delivered + sum(loader.lost.values()) == 80  # complete once the pass has ended
    assert set(loader.lost) <= set(LOST_REASONS)
    logged = " ".join(r.getMessage() for r in loader_log)
    assert "shard-000001.tar: 12 of 20 samples missing" in logged and "(truncated_shard)" in logged
    assert "shard-000002.tar: 20 of 20 samples missing" in logged and "(unreadable_shard)" in logged
    _keys_one(loader)  # a second pass starts from zero
    assert loader.lost == LOST and loader.skipped == Counter({r: 2 * n for r, n in LOST.items()})


def test_eval_loader_split_shards_count_their_share(tmp_path):
    """Fewer shards than readers: readers split a shard by sample index; each counts only its own share."""
    _damaged_split(tmp_path)
    total = Counter()
    delivered = 0
    for rank in range(2):
        loader = make_eval_loader(shard_paths(tmp_path, "train")[1:3], batch_size=4, rank=rank, world_size=3,
                                  transform=eval_transform(SIZE))
        _keys_one(loader)
        total += loader.lost
        delivered += loader.delivered
    loader = make_eval_loader(shard_paths(tmp_path, "train")[1:3], batch_size=4, rank=2, world_size=3,
                              transform=eval_transform(SIZE))
    _keys_one(loader)
    assert total + loader.lost == Counter({"truncated_shard": 12, "unreadable_shard": 20})
    assert delivered + loader.delivered == 8


def test_truncated_mid_member_still_adds_up(tmp_path):
    _damaged_split(tmp_path, cut_mid_member=True)
    loader = make_eval_loader(shard_paths(tmp_path, "train"), batch_size=16, transform=eval_transform(SIZE))
    _keys_one(loader)
    assert loader.delivered + sum(loader.lost.values()) == 80
    assert loader.lost["unreadable_shard"] == 20 and loader.lost["truncated_shard"] >= 11
    assert loader.lost["unaccounted"] == 0


def test_training_loader_counts_lost_samples_too(tmp_path):
    _damaged_split(tmp_path)
    loader = make_train_loader(shard_paths(tmp_path, "train"), batch_size=5, transform=train_transform(SIZE),
                               num_workers=0, resampled=False, shuffle_buffer=10)
    keys = _keys_one(loader)
    assert loader.lost == LOST  # bookkeeping (incomplete_batch) is in loader.skipped, not in lost
    assert len(keys) + loader.skipped["incomplete_batch"] + sum(LOST.values()) == 80


def test_verify_refuses_a_shard_whose_bytes_changed(tmp_path):
    manifest = _write_with_sha(tmp_path)
    first = tmp_path / manifest["splits"]["train"]["shards"][0]["path"]
    data = bytearray(first.read_bytes())
    data[1000] ^= 0x01  # one bit, same size: may still decode
    first.write_bytes(bytes(data))
    paths = shard_paths(tmp_path, "train")
    loader = make_eval_loader(paths, batch_size=8, transform=eval_transform(SIZE), verify=True)
    keys = _keys_one(loader)
    assert loader.lost == {"checksum_mismatch": 20} and len(keys) == 20
    loader = make_train_loader(paths, batch_size=4, transform=train_transform(SIZE), num_workers=0,
                               resampled=False, verify=True)
    _keys_one(loader)
    assert loader.lost == {"checksum_mismatch": 20}


def _write_with_sha(root: Path) -> dict:
    rng = np.random.default_rng(9)
    samples = [{"__key__": f"v{i:02d}", "jpg": _jpeg(rng), "txt": b"Clear.", "json": json.dumps(_meta(i)).encode()}
               for i in range(40)]
    manifest = _write(root, samples, 20)
    for shard in manifest["splits"]["train"]["shards"]:
        shard["sha256"] = _sha(root / shard["path"])
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_verify_needs_checksums_in_the_manifest(shards):
    root, _ = shards
    with pytest.raises(RadalignError, match=r"verify=True: the manifest has no sha256 for 6 shard\(s\)"):
        make_eval_loader(shard_paths(root, "train"), batch_size=8, transform=eval_transform(SIZE), verify=True)


@pytest.mark.parametrize(("splits", "message"), [
    (["train"], r"splits: expected an object \{split: \{samples, shards\}\}, found list"),
    ({"train": "shards"}, r"splits\.train: expected an object with samples and shards, found str"),
    ({"train": {"samples": 1, "shards": {"path": "x"}}}, r"splits\.train\.shards: expected a list, found dict"),
    ({"train": {"samples": 1, "shards": [{"path": "train/a.tar", "samples": "ten"}]}},
     r"splits\.train\.shards\[0\]\.samples: expected a count >= 0, found 'ten'"),
    ({"train": {"samples": 1, "shards": [{"samples": 1}]}}, r"splits\.train\.shards\[0\]\.path: expected"),
])
def test_malformed_manifest_names_the_file_and_key(tmp_path, splits, message):
    manifest = {"format": "radalign-shards/1", "splits": splits}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RadalignError, match=rf"manifest.json: malformed: {message}"):
        shard_paths(tmp_path, "train")
    (tmp_path / "train").mkdir(exist_ok=True)
    (tmp_path / "train" / "a.tar").write_bytes(b"")
    with pytest.raises(RadalignError, match="malformed"):
        manifest_counts([str(tmp_path / "train" / "a.tar")])


def test_a_large_unreadable_shard_is_counted_not_fatal_and_resampling_still_stops(tmp_path):
    rng = np.random.default_rng(3)
    manifest = _write(tmp_path, [{"__key__": f"g{i}", "jpg": _jpeg(rng), "txt": b"Clear.",
                                  "json": json.dumps(_meta(i)).encode()} for i in range(10)], 10)
    (tmp_path / "train" / "shard-000001.tar").write_bytes(b"\x07" * 5000)
    manifest["splits"]["train"]["shards"].append({"path": "train/shard-000001.tar", "samples": 1500})
    manifest["splits"]["train"]["samples"] = 1510
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    loader = make_eval_loader(shard_paths(tmp_path, "train"), batch_size=4, transform=eval_transform(SIZE))
    assert len(_keys_one(loader)) == 10 and loader.lost == {"unreadable_shard": 1500}
    only_bad = [shard_paths(tmp_path, "train")[1]]
    loader = make_train_loader(only_bad, batch_size=2, transform=eval_transform(SIZE), num_workers=0)
    with pytest.raises(RadalignError, match=r"1000 samples in a row could not be read .*unreadable_shard"):
        next(iter(loader))

"""Training and evaluation loaders over the webdataset shards of `data prepare` (docs/architecture.md §1-2).

Both loaders are webdataset pipelines run inside torch DataLoader workers (`wds.WebLoader`); decoding,
transforms, tokenization and batching all happen in the workers, so the main process only receives
ready batches.

Training (`make_train_loader`):
    shard source (resampled with replacement, or this reader's fixed share of the shards in a fresh order
    each epoch) -> tar -> samples -> shuffle buffer -> decode + transform -> batch (+ tokenize)
Evaluation (`make_eval_loader`):
    this reader's fixed share of the shards (or of the samples of a shard) -> decode -> batch, in order.

A "reader" is one (process, worker) pair: `world_size * max(1, num_workers)` readers in all.

The manifest, the shard lists and the metadata-only scan are `data.shards`; this module reads images.

Corrupt samples (undecodable JPEG, bad JSON or text, a missing member) are skipped and counted by reason.
Every shard read is checked against the manifest's per-shard sample count: the samples a truncated or
unreadable tar did not yield are counted too, by number (`truncated_shard`, `unreadable_shard`), and with
`verify=True` a shard whose sha256 differs from the manifest is not read (`checksum_mismatch`, all its
samples). Workers are separate processes, so each batch carries `"skipped": {reason: n}` for the samples
its worker skipped since its previous batch; the `Loader` in the main process sums them into
`loader.skipped` (everything this process saw) and `loader.lost` (this pass: complete when a pass ends),
and logs each skipped key once.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import random
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from radalign.data.shards import (
    SampleMeta,
    manifest_counts,
    manifest_problems,
    manifest_shards,
    read_manifest,
    read_sample,
    shard_paths,
    split_samples,
)
from radalign.data.text import text_id

from radalign import RadalignError
from radalign.log import get_logger

log = get_logger("radalign.data.loader")

REQUIRED_MEMBERS = ("jpg", "txt", "json")
# Samples of a shard that never came out of its tar, checked against the manifest count of that shard.
SHARD_REASONS = ("truncated_shard", "unreadable_shard", "checksum_mismatch")
# Left out on purpose (read fine, but not in a batch): by the training loader, or not among the eval loader's
# `keys` (never decoded); not in `loader.lost`.
BOOKKEEPING_REASONS = ("incomplete_batch", "rank_balance", "not_selected")
# Every reason a sample can be skipped for; `loader.skipped` counts these. `bad_shard` (a failing shard,
# counted once, not per sample) appears only for shards without a manifest; `unaccounted` only if the
# per-pass check against the manifest finds samples no other reason explains (it should never).
SKIP_REASONS = ("missing_member", "bad_image", "bad_json", "bad_text", "empty_text", *SHARD_REASONS,
                "bad_shard", "unaccounted", *BOOKKEEPING_REASONS)
LOST_REASONS = tuple(r for r in SKIP_REASONS if r not in BOOKKEEPING_REASONS)

_decode_gray = wds.imagehandler("pill")  # webdataset's own JPEG decoder -> PIL "L" (the shards are gray)


# ----------------------------------------------------------------------------------------------------------
# Small helpers.


def study_int64(value: Any) -> int:
    """A study id as int64: ints (and decimal strings) as they are, other strings as a stable 63-bit hash.

    MIMIC study ids are ints; CSV input may use strings. The hash is blake2b (not `hash()`, which is salted
    per process), so every worker and every rank maps a string to the same id.
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(f"study_id {value!r} is not an id")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.isdigit() and int(text) < (1 << 63):
        return int(text)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the given values, else from RANK/WORLD_SIZE or torch.distributed (as webdataset)."""
    env_rank, env_world, _, _ = wds.utils.pytorch_worker_info()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise RadalignError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    return rank, world_size


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this code; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class SharedEpoch:
    """The epoch number, shared with DataLoader workers (a process-shared int), so `set_epoch` reaches them."""

    def __init__(self, epoch: int = 0):
        self.value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self.value.value = epoch

    def get(self) -> int:
        return self.value.value


class _SkipLog:
    """Per-worker record of skipped samples; drained into the next batch (each worker has its own copy)."""

    # Resampling never runs out of shards, so shards with nothing readable would otherwise spin forever.
    MAX_STREAK = 1000

    def __init__(self, endless: bool = False):
        self.counts: Counter = Counter()
        self.keys: list[tuple[str, str]] = []
        self.endless = endless  # resampled training: stop after MAX_STREAK failed reads in a row
        self.streak = 0  # failed reads (a sample, or a whole shard) since the last good sample

    def record(self, reason: str, key: str, n: int = 1) -> None:
        """`n` samples lost for `reason`; `key` names them in the log (a sample key, or a shard and a count)."""
        self.counts[reason] += n
        self.keys.append((reason, key))
        self.streak += 1
        if self.endless and self.streak >= self.MAX_STREAK:
            raise RadalignError(f"{self.streak} samples in a row could not be read (last: {key}, {reason}); "
                                f"the shards look corrupt: re-run `radalign data prepare`")

    def drain(self) -> dict:
        out = {"skipped": dict(self.counts), "skipped_keys": list(self.keys)}
        self.counts.clear()
        self.keys.clear()
        return out


# ----------------------------------------------------------------------------------------------------------
# Pipeline stages. Each is a small picklable object: DataLoader workers get a copy of the whole pipeline.


class _ShardReader:
    """Raw samples of one shard (or every `stride`-th from `offset`), checked against the manifest.

    The samples the manifest lists but the tar did not yield are recorded by number: `unreadable_shard` when
    the tar yielded nothing (random bytes, not a tar, empty), `truncated_shard` when it stopped early. With
    `verify`, a shard whose sha256 is not the manifest's is not read at all (`checksum_mismatch`, every
    sample); each worker hashes a shard once. Without manifest counts (`info` None) a failing shard is
    counted once as `bad_shard`.
    """

    def __init__(self, info: dict[str, dict] | None, skiplog: _SkipLog, verify: bool):
        self.info, self.skiplog, self.verify = info, skiplog, verify
        self._verified: dict[str, bool] = {}

    def __call__(self, url: str, offset: int = 0, stride: int = 1) -> Iterator[dict]:
        entry = self.info.get(url) if self.info is not None else None
        expected = len(range(offset, entry["samples"], stride)) if entry is not None else None
        name = Path(url).name if "://" not in url else url
        if self.verify and entry is not None and not self._matches(url, entry["sha256"]):
            if expected:
                self.skiplog.record("checksum_mismatch", f"{url}: sha256 differs from the manifest, "
                                                         f"{expected} samples not read", n=expected)
            return
        errors: list[Exception] = []
        got = 0
        samples = wds.tarfile_samples([{"url": url}], handler=lambda exn: errors.append(exn) or True)
        for sample in islice(samples, offset, None, stride):
            got += 1
            yield sample
        why = f", {type(errors[0]).__name__}" if errors else ""
        if expected is None:
            if errors:
                self.skiplog.record("bad_shard", f"{url}{why}")
        elif got < expected:
            reason = "unreadable_shard" if got == 0 else "truncated_shard"
            self.skiplog.record(reason, f"{name}: {expected - got} of {expected} samples missing{why}",
                                n=expected - got)
        elif got > expected:
            log.warning("%s: %d samples, the manifest says %d; is the manifest from another prepare run?",
                        url, got, expected)

    def _matches(self, url: str, sha256: str | None) -> bool:
        from radalign.io import sha256_file

        if url not in self._verified:
            try:
                self._verified[url] = sha256_file(url) == sha256
            except OSError:
                self._verified[url] = False
        return self._verified[url]


class _ReadShards(wds.PipelineStage):
    """{"url"} items -> raw samples of each shard, through a `_ShardReader`."""

    def __init__(self, reader: _ShardReader):
        self.reader = reader

    def run(self, src) -> Iterator[dict]:
        for item in src:
            yield from self.reader(item["url"])


class _TrainShards(wds.PipelineStage):
    """Shard urls for this reader: resampled with replacement, or its fixed share in a new order per epoch.

    Exact epochs keep the shard -> reader assignment fixed (so per-rank sample counts are known from the
    manifest) and reshuffle only the order in which a reader visits its shards.
    """

    def __init__(self, urls: list[str], *, resampled: bool, seed: int, epoch: SharedEpoch, rank: int,
                 world_size: int):
        self.urls, self.resampled, self.seed, self.epoch = urls, resampled, seed, epoch
        self.rank, self.world_size = rank, world_size

    def run(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        rng = random.Random(wds.utils.make_seed(self.seed, self.epoch.get(), self.rank, worker, 1))
        if self.resampled:
            while True:  # endless; `with_epoch` cuts it into epochs
                yield {"url": rng.choice(self.urls)}
        # Same split as wds.split_by_node + wds.split_by_worker, with the rank resolved once in the main
        # process (so the shards-vs-readers check and the split agree).
        mine = list(islice(islice(self.urls, self.rank, None, self.world_size), worker, None, num_workers))
        rng.shuffle(mine)
        for url in mine:
            yield {"url": url}


class _Shuffle(wds.PipelineStage):
    """wds.detshuffle seeded per (seed, epoch, rank, worker), so the same seed gives the same order."""

    def __init__(self, bufsize: int, seed: int, epoch: SharedEpoch, rank: int):
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank

    def run(self, src):
        worker, _ = _worker()
        seed = wds.utils.make_seed(self.seed, self.epoch.get(), self.rank, worker, 2)
        return wds.detshuffle(self.bufsize, initial=min(self.bufsize, 100), seed=seed).run(src)


def eval_assignment(num_shards: int, num_readers: int) -> list[list[tuple[int, int, int]]]:
    """For each reader, its work as (shard index, stride, offset): read samples i with i % stride == offset.

    With at least as many shards as readers, reader r reads whole shards r, r + R, ...; with fewer, the
    readers of one shard split it by sample index. Either way every sample is read exactly once.
    """
    plan: list[list[tuple[int, int, int]]] = [[] for _ in range(num_readers)]
    if num_shards >= num_readers:
        for j in range(num_shards):
            plan[j % num_readers].append((j, 1, 0))
        return plan
    for j in range(num_shards):
        readers = list(range(j, num_readers, num_shards))  # readers j, j + S, ... share shard j
        for offset, r in enumerate(readers):
            plan[r].append((j, len(readers), offset))
    return plan


class _EvalSamples(wds.PipelineStage):
    """Raw samples of this reader's share, in shard order (no shuffle, no resampling)."""

    def __init__(self, urls: list[str], *, rank: int, world_size: int, reader: _ShardReader):
        self.urls, self.rank, self.world_size, self.reader = urls, rank, world_size, reader

    def run(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        plan = eval_assignment(len(self.urls), self.world_size * num_workers)
        for j, stride, offset in plan[self.rank * num_workers + worker]:
            # Grouping tar members into samples is cheap; only the kept samples get decoded downstream.
            for i, sample in enumerate(self.reader(self.urls[j], offset, stride)):
                sample["__place__"] = (j, offset + i * stride)  # shard index, sample index in the shard
                yield sample


class _Select:
    """Only the raw samples whose key is in `keys` go on to be decoded; the others are counted (`not_selected`)."""

    def __init__(self, keys: frozenset[str], skiplog: _SkipLog):
        self.keys, self.skiplog = keys, skiplog

    def __call__(self, src):
        for sample in src:
            if sample.get("__key__") in self.keys:
                yield sample
            else:
                self.skiplog.counts["not_selected"] += 1  # counted, not logged: one line per film would flood


class _Decode:
    """Raw sample -> decoded dict, or None (skipped and recorded) when a member is missing or corrupt."""

    def __init__(self, transform: Callable, skiplog: _SkipLog, train: bool):
        self.transform, self.skiplog, self.train = transform, skiplog, train

    def __call__(self, sample: dict) -> dict | None:
        key = sample.get("__key__", "?")
        if any(m not in sample for m in REQUIRED_MEMBERS):
            return self._skip("missing_member", key)
        # Member bytes are untrusted input: any decoder exception means "corrupt", hence the broad excepts.
        try:
            meta = json.loads(sample["json"])
            study = study_int64(meta["study_id"])
        except Exception:
            return self._skip("bad_json", key)
        try:
            text = sample["txt"].decode("utf-8")
        except Exception:
            return self._skip("bad_text", key)
        if self.train and not text.strip():
            return self._skip("empty_text", key)
        try:
            image = _decode_gray("jpg", sample["jpg"])  # PIL "L"
        except Exception:
            return self._skip("bad_image", key)
        self.skiplog.streak = 0
        out = {"image": self.transform(image), "text": text, "key": key}  # image: [C, H, W]
        if self.train:
            out.update(study_id=study, text_id=text_id(text))
        else:
            out["meta"] = meta
            out["place"] = sample.get("__place__")
        return out

    def _skip(self, reason: str, key: str) -> None:
        self.skiplog.record(reason, key)
        return None


class _Collate:
    """A list of decoded samples -> one batch dict, tokenized if asked, with the worker's skip counts."""

    def __init__(self, skiplog: _SkipLog, tokenize: Callable | None, train: bool):
        self.skiplog, self.tokenize, self.train = skiplog, tokenize, train

    def __call__(self, samples: list[dict]) -> dict:
        texts = [s["text"] for s in samples]
        batch: dict[str, Any] = {
            "image": torch.stack([s["image"] for s in samples]),  # [B, C, H, W]
            "text": texts if self.tokenize is None else self.tokenize(texts),  # [B, L] or list[str]
            "key": [s["key"] for s in samples],
            "n": len(samples),
        }
        if self.train:
            batch["study_id"] = torch.tensor([s["study_id"] for s in samples], dtype=torch.int64)  # [B]
            batch["text_id"] = torch.tensor([s["text_id"] for s in samples], dtype=torch.int64)  # [B]
        else:
            batch["meta"] = [s["meta"] for s in samples]
            batch["place"] = [s["place"] for s in samples]
        batch.update(self.skiplog.drain())
        return batch


class _Finish:
    """Last stage: turn a short final batch into an empty one (training) and flush leftover skip counts.

    Empty batches (`n == 0`) only carry skip counts to the main process; `Loader` never yields them.
    """

    def __init__(self, skiplog: _SkipLog, batch_size: int, drop_last: bool):
        self.skiplog, self.batch_size, self.drop_last = skiplog, batch_size, drop_last

    def __call__(self, src):
        for batch in src:
            if self.drop_last and batch["n"] < self.batch_size:
                # Same-size batches keep the all-gather of the contrastive loss simple; count what is left out.
                skipped = Counter(batch["skipped"])
                skipped["incomplete_batch"] += batch["n"]
                batch = {"n": 0, "skipped": dict(skipped), "skipped_keys": batch["skipped_keys"]}
            yield batch
        left = self.skiplog.drain()
        if left["skipped"]:
            yield {"n": 0, **left}


# ----------------------------------------------------------------------------------------------------------
# The loader the stages use.


class Loader:
    """Iterable of batches over a `wds.WebLoader`, summing skip counts and capping batches per epoch.

    `len(loader)` / `loader.num_batches`: batches one epoch yields on this rank (None when unknown).
    `loader.skipped`: Counter of skipped samples by reason, summed over everything this process has seen.
    `loader.lost`: Counter, samples of the manifest that did not reach a batch in the current (or last)
    pass, by reason (`LOST_REASONS`: corrupt members, truncated / unreadable / checksum-failed shards);
    reset when a pass starts, complete when it ends. For the eval loader it is checked at the end of a pass:
    `delivered + sum(lost) == expected` (this rank's manifest samples; `loader.expected`,
    `loader.delivered`), any remainder counted as `unaccounted`. An early `break` leaves it partial.
    `loader.set_epoch(e)`: reshuffle for epoch `e` (reaches the workers; call it before iterating, e.g.
    when resuming); without it every new pass uses the next epoch number.
    """

    def __init__(self, webloader: wds.WebLoader, *, epoch: SharedEpoch, num_batches: int | None,
                 batch_size: int, readers: int, cap: bool, expected: int | None = None):
        self._loader, self._epoch, self._cap = webloader, epoch, cap
        self.num_batches, self.batch_size, self.readers = num_batches, batch_size, readers
        self.expected = expected  # eval: samples this rank should read per pass (manifest); None: unknown
        self.delivered = 0        # samples yielded in the current (or last) pass
        self.not_selected = 0     # eval with `keys`: samples of the pass read past, never decoded
        self.skipped: Counter = Counter()
        self.lost: Counter = Counter()
        self._logged: set[tuple[str, str]] = set()
        self._started = self._epoch_set = False

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch` for the next pass (shard order, shuffle seeds). Without it, each pass advances by one."""
        self._epoch.set(epoch)
        self._epoch_set = True

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("number of batches unknown (no manifest counts for these shards)")
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        if self._started and not self._epoch_set:
            self._epoch.set(self._epoch.get() + 1)  # a new pass must not repeat the previous order
        self._started, self._epoch_set = True, False
        self.lost, self.delivered, self.not_selected = Counter(), 0, 0
        done = 0
        for batch in self._loader:
            self.skipped.update(batch["skipped"])
            self.lost.update({r: n for r, n in batch["skipped"].items() if r not in BOOKKEEPING_REASONS})
            self.not_selected += batch["skipped"].get("not_selected", 0)
            for reason, key in batch.pop("skipped_keys"):
                if (reason, key) not in self._logged:  # a resampled corrupt sample comes back; log it once
                    self._logged.add((reason, key))
                    log.warning("skipped %s (%s)", key, reason)
            n = batch.pop("n")
            if n == 0:
                continue
            if self._cap and self.num_batches is not None and done >= self.num_batches:
                # Past this rank's share (exact epochs, uneven ranks): read on so that the workers' final
                # skip counts arrive, but yield nothing, so every rank steps the same number of times.
                self.skipped["rank_balance"] += n
                continue
            self.delivered += n
            yield batch
            done += 1
        self._check_against_manifest()

    def _check_against_manifest(self) -> None:
        """End of a full eval pass: every manifest sample was delivered or counted lost; else `unaccounted`."""
        if self.expected is None:
            return
        missing = self.expected - self.delivered - self.not_selected - sum(self.lost.values())
        if missing > 0:
            log.warning("%d of %d samples neither read nor counted as skipped; counted as unaccounted",
                        missing, self.expected)
            self.lost["unaccounted"] += missing
            self.skipped["unaccounted"] += missing


def _check_shards(shards: Sequence[str]) -> list[str]:
    urls = [str(s) for s in shards]
    if not urls:
        raise RadalignError("no shards given; use data.loader.shard_paths(OUT, split) on a prepared folder")
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if missing:
        raise RadalignError(f"{len(missing)} of {len(urls)} shard(s) do not exist, e.g. {missing[0]}; "
                            f"check the path or re-run `radalign data prepare`")
    return urls


def _check_batch_and_workers(batch_size: int, num_workers: int) -> None:
    if batch_size < 1:
        raise RadalignError(f"batch_size={batch_size}: must be >= 1")
    if num_workers < 0:
        raise RadalignError(f"num_workers={num_workers}: must be >= 0 (0 loads in the main process)")


def _webloader(pipeline: wds.DataPipeline, num_workers: int, pin_memory: bool,
               persistent: bool = False) -> wds.WebLoader:
    # batch_size=None: the pipeline batches inside the workers; the DataLoader only moves whole batches.
    # Training keeps its workers across epochs (re-forking a large trainer and refilling the shuffle buffer
    # every epoch cost ~17% throughput on small epochs, bench/pretrain.py); the epoch reaches them through
    # SharedEpoch's shared memory.
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=num_workers,
                         pin_memory=pin_memory, persistent_workers=persistent and num_workers > 0)


def _exact_num_batches(urls: list[str], counts: dict[str, int], batch_size: int, world_size: int,
                       workers: int) -> int:
    """Full batches per epoch on the slowest rank (ranks stop there, so they all step the same number)."""
    per_rank = []
    for r in range(world_size):
        mine = urls[r::world_size]
        per_rank.append(sum(sum(counts[u] for u in mine[w::workers]) // batch_size for w in range(workers)))
    return min(per_rank)


def _eval_num_batches(urls: list[str], counts: dict[str, int], batch_size: int, rank: int, world_size: int,
                      workers: int) -> int:
    """Batches `make_eval_loader` yields on `rank` when no sample is corrupt (each worker's last one short)."""
    plan = eval_assignment(len(urls), world_size * workers)
    total = 0
    for w in range(workers):
        n = sum(len(range(offset, counts[urls[j]], stride)) for j, stride, offset in plan[rank * workers + w])
        total += math.ceil(n / batch_size)
    return total


def make_train_loader(shards: Sequence[str], *, batch_size: int, transform: Callable,
                      tokenize: Callable[[list[str]], torch.Tensor] | None = None, num_workers: int = 2,
                      seed: int = 0, resampled: bool = True, shuffle_buffer: int = 1000,
                      samples_per_epoch: int | None = None, rank: int | None = None,
                      world_size: int | None = None, pin_memory: bool = False, verify: bool = False) -> Loader:
    """Batches `{"image": [B,C,H,W], "text": [B,L] or list[str], "study_id": [B], "text_id": [B], "key",
    "skipped"}` for training; every batch has exactly `batch_size` samples.

    resampled=True (default): each reader draws shards with replacement, endlessly; an epoch is
        `samples_per_epoch` samples (default: the manifest count of `shards`) cut into equal per-worker
        batch counts, so every rank yields `len(loader)` batches.
    resampled=False: exact epochs. Shards are split over ranks then workers (fixed assignment, new visiting
        order each epoch), so each sample is seen once per epoch, but ranks may hold different sample
        counts; the loader stops every rank at the smallest rank's count of full batches (`len(loader)`,
        from the manifest; None without one). Needs at least num_workers x world_size shards.
    Same `seed` (and epoch, see `set_epoch`) -> same order. `tokenize` runs in the workers and must be
    picklable. Short last batches per worker are left out and counted as `skipped["incomplete_batch"]`.
    Every shard visit is checked against the manifest count (`loader.lost`); `verify=True` also checks each
    shard's sha256 against the manifest once per worker (a mismatching shard is not read).
    """
    urls = _check_shards(shards)
    _check_batch_and_workers(batch_size, num_workers)
    rank, world_size = dist_info(rank, world_size)
    workers = max(1, num_workers)
    readers = workers * world_size
    if not resampled and len(urls) < readers:
        raise RadalignError(
            f"{len(urls)} shard(s) for {num_workers} worker(s) x {world_size} process(es) = {readers} readers: "
            f"with resampled=False every reader needs at least one whole shard. Fix: num_workers <= "
            f"{max(len(urls) // world_size, 0)}, smaller shards (`radalign data prepare --shard-size`), "
            f"or resampled=True.")

    epoch = SharedEpoch(0)
    skiplog = _SkipLog(endless=resampled)
    info = _shard_info(urls, verify)
    pipeline = wds.DataPipeline(
        _TrainShards(urls, resampled=resampled, seed=seed, epoch=epoch, rank=rank, world_size=world_size),
        _ReadShards(_ShardReader(info, skiplog, verify)),
        _Shuffle(shuffle_buffer, seed, epoch, rank) if shuffle_buffer > 1 else None,
        wds.map(_Decode(transform, skiplog, train=True)),
        wds.batched(batch_size, collation_fn=_Collate(skiplog, tokenize, train=True), partial=True),
        _Finish(skiplog, batch_size, drop_last=True),
    )
    counts = None if info is None else {u: e["samples"] for u, e in info.items()}
    if resampled:
        total = samples_per_epoch if samples_per_epoch is not None else sum((counts or {}).values())
        if total < 1:
            raise RadalignError("resampled=True needs samples_per_epoch (no manifest next to the shards to "
                                "count them); pass samples_per_epoch=N")
        per_worker = math.ceil(total / (batch_size * readers))
        pipeline = pipeline.with_epoch(nbatches=per_worker)  # batches per worker per epoch
        num_batches: int | None = per_worker * workers
    else:
        num_batches = _exact_num_batches(urls, counts, batch_size, world_size, workers) if counts else None
        if num_batches == 0:
            raise RadalignError(f"batch_size={batch_size}: larger than what some worker's shards hold, so rank "
                                f"{rank} gets no full batch; use a smaller batch_size or fewer workers")
    return Loader(_webloader(pipeline, num_workers, pin_memory, persistent=True), epoch=epoch,
                  num_batches=num_batches,
                  batch_size=batch_size, readers=readers, cap=True)


def make_eval_loader(shards: Sequence[str], *, batch_size: int, transform: Callable, num_workers: int = 0,
                     rank: int | None = None, world_size: int | None = None,
                     pin_memory: bool = False, verify: bool = False,
                     keys: Collection[str] | None = None) -> Loader:
    """Batches `{"image": [B,C,H,W], "text": list[str], "key", "meta": list[dict], "place", "skipped"}`.

    Every sample exactly once across all ranks and workers, in the same order on every run: no shuffle, no
    resampling, no padding, the last batch of each worker may be short. `place`: each sample's (shard index,
    sample index in its tar); sorting by it gives the one-worker order whatever `num_workers` was (the
    workers' batches arrive interleaved). Ranks may get different numbers of
    samples (gather with `all_gather_object`, not a fixed-size all_gather). rank/world_size default to
    RANK/WORLD_SIZE or torch.distributed.

    After a full pass, `loader.lost` holds every manifest sample of this rank that is not in a batch, by
    reason (checked: `loader.delivered + sum(loader.lost.values()) == loader.expected`). `verify=True`
    checks each shard's sha256 against the manifest before reading it. `keys`: decode only the samples with
    these keys (the others are read past, never decoded, and counted `not_selected`, not lost).
    """
    urls = _check_shards(shards)
    _check_batch_and_workers(batch_size, num_workers)
    rank, world_size = dist_info(rank, world_size)
    skiplog = _SkipLog()
    info = _shard_info(urls, verify)
    select = [] if keys is None else [_Select(frozenset(map(str, keys)), skiplog)]
    pipeline = wds.DataPipeline(
        _EvalSamples(urls, rank=rank, world_size=world_size, reader=_ShardReader(info, skiplog, verify)),
        *select,
        wds.map(_Decode(transform, skiplog, train=False)),
        wds.batched(batch_size, collation_fn=_Collate(skiplog, None, train=False), partial=True),
        _Finish(skiplog, batch_size, drop_last=False),
    )
    workers = max(1, num_workers)
    counts = None if info is None else {u: e["samples"] for u, e in info.items()}
    num_batches = _eval_num_batches(urls, counts, batch_size, rank, world_size, workers) if counts else None
    expected = _eval_expected(urls, counts, rank, world_size, workers) if counts else None
    # Not capped: an eval epoch is whatever the shards hold (the count is for progress bars).
    return Loader(_webloader(pipeline, num_workers, pin_memory), epoch=SharedEpoch(0), num_batches=num_batches,
                  batch_size=batch_size, readers=world_size * workers, cap=False, expected=expected)


def _eval_expected(urls: list[str], counts: dict[str, int], rank: int, world_size: int, workers: int) -> int:
    """Samples `rank` reads in one eval pass, from the manifest counts."""
    plan = eval_assignment(len(urls), world_size * workers)
    return sum(len(range(offset, counts[urls[j]], stride))
               for w in range(workers) for j, stride, offset in plan[rank * workers + w])


def _shard_info(urls: list[str], verify: bool) -> dict[str, dict] | None:
    """Per-shard manifest entries, or None (with a warning) when the shards have no manifest; `verify` needs one."""
    info = manifest_shards(urls)
    if info is None:
        if verify:
            raise RadalignError("verify=True needs the manifest.json of `radalign data prepare` two folders above "
                                f"the shards (e.g. {urls[0]}); none lists them")
        log.warning("no manifest lists these shards (e.g. %s): samples lost to a damaged shard cannot be "
                    "counted, only the shard (bad_shard)", urls[0])
        return None
    if verify:
        bad = [u for u, e in info.items() if not re.fullmatch(r"[0-9a-f]{64}", str(e.get("sha256")))]
        if bad:
            raise RadalignError(f"verify=True: the manifest has no sha256 for {len(bad)} shard(s), e.g. {bad[0]}; "
                                f"re-run `radalign data prepare`, or pass verify=False")
    return info


def decode_sample(sample: SampleMeta, transform: Callable) -> dict | None:
    """One sample found by a `data.shards` scan (find-by-id), decoded as the eval loader decodes it
    ({"image": [C, H, W], "text", "key", "meta"}); None when a member is missing or corrupt."""
    raw = {"__key__": sample.key, **read_sample(sample)}
    return _Decode(transform, _SkipLog(), train=False)(raw)


# The manifest readers live in data.shards (the one reader of the format); re-exported for the loaders' callers.
__all__ = ["shard_paths", "split_samples", "read_manifest", "manifest_counts", "manifest_shards",
           "manifest_problems", "decode_sample", "make_train_loader", "make_eval_loader", "eval_assignment", "study_int64", "Loader",
           "SharedEpoch", "SKIP_REASONS", "LOST_REASONS", "SHARD_REASONS", "BOOKKEEPING_REASONS"]

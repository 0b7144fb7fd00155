"""One embedding pass over a shard split, shared by pretrain validation, zero-shot and retrieval.

    emb = embed_split(encoders.encode_images, "runs/demo/shards", "test", encoders.image_transform(),
                      batch_size=64, num_workers=2, thumbnail_size=96)
    emb.image       # [N, D] float32, L2-normalised
    emb.keys        # dicom ids (the samples' keys), emb.meta: the shard json dicts, emb.texts: the reports
    emb.thumbnails  # small grayscale JPEGs, made in the loader workers (None without thumbnail_size)
    emb.lost        # {reason: samples}: every sample the manifest lists that did not come back, by reason

Images are decoded, transformed and (optionally) thumbnailed in the DataLoader workers: the transform is
composed with the thumbnail maker (`WithThumbnail`), so a worker returns the model input and the JPEG bytes
together (packed in one tensor, through the public `make_eval_loader`) and the main process only runs the
encoder.

Nothing is dropped uncounted: the samples read are checked against the manifest's per-shard counts (this
reader's share of them). Sample-level failures come from the loader (`loader.lost` when it provides per-reason
sample counts, else `loader.skipped`); samples missing beyond those (the rest of a truncated or unreadable tar)
are counted as `bad_shard`, and anything still unexplained as `unaccounted`.

Rows come in the one-worker order (shard by shard, each tar in its order) whatever `num_workers` is: the
workers' batches arrive interleaved and are put back in place (the loader's `place` of each sample).

The embedding cache (`EmbedCache`, `cache=`): one pass per split and export, shared by every stage (pretrain's
final validation, zeroshot, retrieval build/eval/classify, finetune and its eval/explain/few-shot). It lives in
the export folder, `<export>/embeddings/`, so it travels with the model and goes when the export is replaced;
`RADALIGN_EMBED_CACHE=off` turns it off everywhere, `RADALIGN_EMBED_CACHE=/some/folder` puts it there instead
(one folder can hold several exports: entries are named by the export's checksum). An entry is
`<split>-<export checksum>-<key hash>.json` (keys, meta, texts, lost counts, the key itself) beside
`...-<sha256 of the tensors>.safetensors` (image embeddings, thumbnails): never a pickle. The key is everything
the result depends on: the export's checksum and how it ran (device, precision), the transform (image size,
mean/std), and each shard of the split as the manifest lists it (path, samples, sha256) with the file's size
and mtime, so a re-prepared or replaced shard misses the cache. Both files are written atomically (JSON last,
naming its tensors by content hash), so concurrent writers never tear an entry: the last complete one wins.
A damaged entry (unreadable JSON, a tensors file that is missing, truncated or not what the JSON's sha256
says) and a stale one (the same shards folder, other shard contents) are reported with a warning and embedded
again. An unwritable cache folder means no caching, with a warning, never a failed stage. Thumbnails: an entry
made without them does not serve a pass that wants them (it is embedded again, with thumbnails, and replaced).

This module belongs to `data/` and imports no other stage: the encoder is passed in as a callable.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from radalign.data.shards import list_shards, manifest_counts, shard_paths

from radalign import RadalignError
from radalign.log import get_logger

log = get_logger("radalign.data.embed")

# Loader skip reasons that are not one sample each: a shard-level event, or samples left out on purpose.
_NOT_SAMPLE_REASONS = ("bad_shard", "incomplete_batch", "rank_balance")


@dataclass
class EmbeddedSplit:
    """The result of one pass: rows in loader order (the same on every run)."""

    image: np.ndarray  # [N, D] float32, L2-normalised ([N, P, W] for a per-token output, each token normalised)
    keys: list[str]
    meta: list[dict]
    texts: list[str]
    thumbnails: list[bytes] | None = None
    lost: dict[str, int] = field(default_factory=dict)
    """Samples listed in the manifest (this rank's share) that were not embedded, by reason."""
    skipped: dict[str, int] = field(default_factory=dict)
    """The loader's raw skip counts (a `bad_shard` there is one event, not one sample)."""
    expected: int | None = None
    """Samples the manifest lists for this rank's share (None when the shards have no manifest)."""
    capped: int = 0
    """Samples not read because of max_samples (not lost: left out on request)."""

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def lost_total(self) -> int:
        return int(sum(self.lost.values()))

    def summary(self) -> str:
        """'247 of 266 samples embedded; lost 19: bad_shard 16, bad_image 3' (for printouts)."""
        head = f"{len(self)} of {self.expected if self.expected is not None else '?'} samples embedded"
        if self.capped:
            head += f" ({self.capped} left out by max_samples)"
        if not self.lost:
            return head + "; none lost"
        return head + f"; lost {self.lost_total}: " + ", ".join(f"{k} {v}" for k, v in sorted(self.lost.items()))


def thumbnail_bytes(image, size: int, quality: int = 80) -> bytes:
    """A PIL image -> a small grayscale JPEG whose longer side is at most `size` pixels."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"thumbnail_bytes needs a PIL image, got {type(image).__name__}")
    im = image if image.mode == "L" else image.convert("L")
    im = im.copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def thumbnail_jpeg(image: torch.Tensor, mean, std, size: int) -> bytes:
    """A model-input tensor [C, H, W] of a shard image back to a small grayscale JPEG (what the model saw:
    resized, cropped); `mean`/`std` are the export's normalisation."""
    from PIL import Image

    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)[: image.shape[0]]
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)[: image.shape[0]]
    pixels = (image.float().cpu() * std_t + mean_t)[0].clamp(0, 1)  # [H, W], first channel (gray repeated)
    return thumbnail_bytes(Image.fromarray((pixels.numpy() * 255).round().astype(np.uint8), mode="L"), size)


class WithThumbnail:
    """transform composed with the thumbnail maker, run in the loader workers: PIL image -> one packed float
    tensor [5 + C*H*W + cap] holding the model input and the thumbnail's JPEG bytes (`unpack` splits a batch).

    Why packed: the loaders stack what the transform returns into one batch tensor, so the worker's second
    output rides in the same tensor (a header with the input's shape and the JPEG's length, then the input,
    then the bytes as exact small floats, zero-padded to a fixed capacity). Picklable (a plain object).
    """

    def __init__(self, transform: Callable, size: int):
        self.transform, self.size = transform, int(size)
        self.cap = 2 * self.size * self.size + 4096  # a grayscale JPEG of size x size px never needs more

    def __call__(self, image) -> torch.Tensor:
        x = self.transform(image)  # [C, H, W]
        if x.dim() != 3:
            raise ValueError(f"transform returned a {tuple(x.shape)} tensor; expected [C, H, W]")
        jpeg = thumbnail_bytes(image, self.size)
        if len(jpeg) > self.cap:  # pragma: no cover - cannot happen at quality 80
            jpeg = thumbnail_bytes(image, self.size, quality=30)[: self.cap]
        data = torch.zeros(self.cap)
        data[: len(jpeg)] = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8).float()
        head = torch.tensor([x.dim(), *x.shape, len(jpeg)], dtype=torch.float32)
        return torch.cat([head, x.float().flatten(), data])

    @staticmethod
    def unpack(batch: torch.Tensor) -> tuple[torch.Tensor, list[bytes]]:
        """[B, 5 + C*H*W + cap] -> (images [B, C, H, W], JPEG bytes per row)."""
        c, h, w = (int(v) for v in batch[0, 1:4])
        n = c * h * w
        images = batch[:, 5:5 + n].reshape(-1, c, h, w)  # [B, C, H, W]
        lengths = batch[:, 4].long().tolist()
        raw = batch[:, 5 + n:].to(torch.uint8)  # [B, cap]
        return images, [bytes(raw[i, :m].numpy()) for i, m in enumerate(lengths)]


def expected_samples(shards: list[str], rank: int = 0, world_size: int = 1, num_workers: int = 0) -> int | None:
    """Samples this rank's readers (its workers) should read, from the manifest's per-shard counts (None: no
    manifest). Same assignment as the eval loader (`data.loader.eval_assignment`)."""
    from radalign.data.loader import eval_assignment

    counts = manifest_counts(shards)
    if counts is None:
        return None
    workers = max(1, num_workers)
    plan = eval_assignment(len(shards), world_size * workers)
    mine = [item for w in range(workers) for item in plan[rank * workers + w]]
    return int(sum(len(range(offset, counts[shards[j]], stride)) for j, stride, offset in mine))


def lost_counts(skipped: dict, loader_lost: dict | None, expected: int | None, read: int) -> dict[str, int]:
    """Samples lost by reason, reconciled with the manifest (see the module docstring)."""
    if loader_lost is not None:
        counts = {k: int(v) for k, v in dict(loader_lost).items() if v}
    else:
        counts = {k: int(v) for k, v in dict(skipped).items() if v and k not in _NOT_SAMPLE_REASONS}
    if expected is None:
        return counts
    missing = expected - read - sum(counts.values())
    if missing > 0:
        reason = "bad_shard" if skipped.get("bad_shard") and "bad_shard" not in counts else "unaccounted"
        counts[reason] = counts.get(reason, 0) + missing
    elif missing < 0:
        log.warning("%d more samples read or counted lost than the manifest lists (%d read, %d expected)",
                    -missing, read, expected)
    return counts


# ----------------------------------------------------------------------------------------------------------
# The embedding cache (module docstring)

CACHE_FORMAT = "radalign-embeddings/1"
CACHE_ENV = "RADALIGN_EMBED_CACHE"
CACHE_DIR = "embeddings"
_OFF = ("0", "off", "false", "no", "none")
_warned: set[str] = set()  # unwritable cache folders already reported (once per process)


@dataclass(frozen=True)
class EmbedCache:
    """Where `embed_split` keeps its results, and which encoder they are of."""

    folder: Path
    """The cache folder (by default `<export>/embeddings`)."""
    encoder: str
    """The export's checksum (sha256 over its weight files): entries of other weights are never read."""
    compute: str = "cpu-fp32"
    """Device and precision the encoder ran in: another device or precision gives other numbers."""
    output: str = "pooled"
    """What the encoder callable returns per image: "pooled" ([D], the embedding) or another name for another
    output (finetune's "patch_tokens", [P, W]); part of the key, so the outputs never serve each other."""

    @classmethod
    def for_encoders(cls, encoders, *, enabled: bool = True, output: str = "pooled") -> EmbedCache | None:
        """The cache of an export's encoders (`pretrain.export.Encoders`: `.folder`, `.checksum`, `.device`);
        None when turned off (`enabled=False`, RADALIGN_EMBED_CACHE=off) or when the encoders have no folder."""
        folder = getattr(encoders, "folder", None)
        device = getattr(encoders, "device", None)
        return cls.at(folder, encoders.checksum, f"{getattr(device, 'type', 'cpu')}-fp32", enabled=enabled,
                      output=output)

    @classmethod
    def at(cls, export_folder: str | os.PathLike | None, checksum: str, compute: str = "cpu-fp32", *,
           enabled: bool = True, output: str = "pooled") -> EmbedCache | None:
        """The cache of the export in `export_folder` (checksum from its config.json); None when turned off."""
        env = os.environ.get(CACHE_ENV, "").strip()
        if not enabled or env.lower() in _OFF:
            return None
        if env:
            return cls(Path(env), checksum, compute, output)
        return cls(Path(export_folder) / CACHE_DIR, checksum, compute, output) if export_folder else None


def _transform_id(transform) -> str | None:
    """The transform's description: torchvision's repr (sizes, interpolation) plus every module's buffers and
    parameters (a repr may leave out e.g. the mean/std); None when it holds an object address (a lambda, a
    plain object), which would differ on every run and never hit."""
    parts: list[str] = []

    def walk(t) -> None:
        parts.append(repr(t))
        if isinstance(t, torch.nn.Module):
            state = [*t.named_buffers(), *t.named_parameters()]
            parts.extend(f"{name}={v.detach().flatten().tolist()}" for name, v in sorted(state, key=lambda x: x[0]))
        for sub in getattr(t, "transforms", None) or []:
            walk(sub)

    walk(transform)
    text = "\n".join(parts)
    return None if re.search(r" at 0x[0-9a-fA-F]+", text) else text


def _shards_id(root: str | os.PathLike, split: str) -> list[list] | None:
    """The split's shards as the manifest lists them (path, samples, sha256) with each file's size and mtime;
    None when they cannot be identified (no manifest, a shard without sha256, a missing file)."""
    try:
        base = Path(root).resolve()
        out = []
        for sh in list_shards(root, split):
            st = sh.path.stat()
            if not re.fullmatch(r"[0-9a-f]{64}", str(sh.sha256)):
                return None
            out.append([sh.path.relative_to(base).as_posix(), sh.samples, sh.sha256, st.st_size, st.st_mtime_ns])
        return out
    except (RadalignError, OSError, ValueError):
        return None


@dataclass
class CacheEntry:
    """One split's entry in an `EmbedCache`: `find` it, `load` it (None on a miss), `store` a pass."""

    cache: EmbedCache
    key: dict
    name: str
    root: str

    @property
    def json_file(self) -> Path:
        return self.cache.folder / f"{self.name}.json"

    @classmethod
    def find(cls, cache: EmbedCache, root, split: str, transform) -> CacheEntry | None:
        """The entry of this pass; None (no caching) when the shards or the transform cannot be identified."""
        shards, tf = _shards_id(root, split), _transform_id(transform)
        if shards is None or tf is None:
            log.info("%s split %s: not cached (%s)", root, split,
                     "no manifest sha256 for its shards" if shards is None else "the transform has no stable repr")
            return None
        key = {"format": CACHE_FORMAT, "encoder": cache.encoder, "compute": cache.compute, "split": split,
               "transform": tf, "shards": shards}
        if cache.output != "pooled":  # pooled entries keep the key they had before outputs were named
            key["output"] = cache.output
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", split)
        return cls(cache, key, f"{safe}-{cache.encoder[:12]}-{digest}", str(Path(root).resolve()))

    def load(self, thumbnail_size: int | None) -> EmbeddedSplit | None:
        """The cached result, or None: a miss, an entry without the wanted thumbnails, or a damaged entry
        (warned)."""
        if not self.json_file.is_file():
            self._warn_stale()
            return None
        try:
            doc = json.loads(self.json_file.read_text())
            if doc.get("format") != CACHE_FORMAT or doc.get("key") != self.key:
                raise ValueError("its key is not this pass's")
            if thumbnail_size and doc.get("thumbnail_size") != thumbnail_size:
                log.info("%s: made without %d px thumbnails; embedding again with them", self.json_file,
                         thumbnail_size)
                return None
            return self._read(doc, bool(thumbnail_size))
        except Exception as e:  # noqa: BLE001 - any damage (JSON, safetensors, shapes) means: embed again
            log.warning("%s: damaged embedding cache entry (%s: %s); embedding again", self.json_file,
                        type(e).__name__, e)
            return None

    def _read(self, doc: dict, thumbnails: bool) -> EmbeddedSplit:
        from safetensors.numpy import load

        tfile = self.cache.folder / doc["tensors"]
        data = tfile.read_bytes()
        if hashlib.sha256(data).hexdigest() != doc["tensors_sha256"]:
            raise ValueError(f"{tfile.name}: sha256 differs from the entry's (truncated or modified)")
        t = load(data)
        image, keys = t["image"], list(doc["keys"])
        if image.shape[0] != len(keys) or len(doc["meta"]) != len(keys) or len(doc["texts"]) != len(keys):
            raise ValueError(f"{image.shape[0]} embeddings for {len(keys)} keys")
        thumbs = None
        if thumbnails:
            raw, off = t["thumbnail_bytes"].tobytes(), t["thumbnail_offsets"].tolist()
            thumbs = [raw[off[i]:off[i + 1]] for i in range(len(keys))]
        return EmbeddedSplit(image, keys, list(doc["meta"]), list(doc["texts"]), thumbs,
                             lost=dict(doc["lost"]), skipped=dict(doc["skipped"]), expected=doc["expected"])

    def store(self, emb: EmbeddedSplit, thumbnail_size: int | None) -> None:
        """Write the entry (tensors, then the JSON naming them); an unwritable folder is warned once."""
        from safetensors.numpy import save

        from radalign.io import atomic_write_bytes, atomic_write_json

        tensors = {"image": np.ascontiguousarray(emb.image, np.float32)}
        if emb.thumbnails is not None:
            tensors["thumbnail_bytes"] = np.frombuffer(b"".join(emb.thumbnails) or b"\0", np.uint8).copy()
            tensors["thumbnail_offsets"] = np.cumsum([0] + [len(b) for b in emb.thumbnails]).astype(np.int64)
        data = save(tensors)
        sha = hashlib.sha256(data).hexdigest()
        doc = {"format": CACHE_FORMAT, "key": self.key, "root": self.root, "tensors": f"{self.name}-{sha[:16]}"
               ".safetensors", "tensors_sha256": sha, "thumbnail_size": thumbnail_size if emb.thumbnails is not None
               else None, "keys": list(emb.keys), "meta": list(emb.meta), "texts": list(emb.texts),
               "lost": dict(emb.lost), "skipped": dict(emb.skipped), "expected": emb.expected}
        try:
            self.cache.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.cache.folder / doc["tensors"], data)
            atomic_write_json(self.json_file, doc, indent=None)
        except OSError as e:
            if str(self.cache.folder) not in _warned:
                _warned.add(str(self.cache.folder))
                log.warning("embedding cache %s is not writable (%s): continuing without caching (set %s to "
                            "another folder, or to off)", self.cache.folder, e, CACHE_ENV)
            return
        for old in self.cache.folder.glob(f"{self.name}-*.safetensors"):  # tensors of the entry it replaced
            if old.name != doc["tensors"]:
                _remove(old)

    def _warn_stale(self) -> None:
        """An entry of the same split, export and shards folder from other shard contents: stale; removed."""
        prefix = self.name.rsplit("-", 1)[0]
        for other in self.cache.folder.glob(f"{prefix}-*.json"):
            try:
                doc = json.loads(other.read_text())
                if doc.get("root") != self.root or doc.get("key", {}).get("shards") == self.key["shards"]:
                    continue
            except (OSError, ValueError):
                continue
            changed = _first_change(doc["key"]["shards"], self.key["shards"])
            log.warning("%s: stale embedding cache entry (the shards changed since: %s); embedding again",
                        other, changed)
            for f in [other, *self.cache.folder.glob(f"{other.stem}-*.safetensors")]:
                _remove(f)


def _remove(path: Path) -> None:
    """Delete a cache file; one that cannot be deleted (read-only folder) only stays behind."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        log.info("%s: not removed (%s)", path, e)


def _first_change(old: list, new: list) -> str:
    """What differs between two shard lists of a key, for the warning (the first shard that does)."""
    before = {s[0]: s for s in old}
    for s in new:
        was = before.get(s[0])
        if was is None:
            return f"{s[0]} is new"
        if was[2] != s[2]:
            return f"{s[0]} sha256 {was[2][:12]}... -> {s[2][:12]}..."
        if was != s:
            return f"{s[0]} file rewritten (size or mtime)"
    return f"{len(old) - len(new)} shard(s) fewer"


def embed_split(encode_images: Callable[[torch.Tensor], torch.Tensor], shards_root: str | os.PathLike, split: str,
                transform: Callable, *, batch_size: int = 64, num_workers: int = 0, max_samples: int | None = None,
                rank: int = 0, world_size: int = 1, thumbnail_size: int | None = None,
                progress: bool = False, cache: EmbedCache | None = None) -> EmbeddedSplit:
    """Embed this rank's share of `shards_root/<split>` (every sample once across ranks, in a fixed order).

    encode_images: [B, C, H, W] float tensor -> [B, D] tensor (on any device; moved to CPU here), or [B, P, W]
    per-token outputs (each token L2-normalised; name the output in the cache: `EmbedCache.output`).
    max_samples: stop after this many samples (on this rank). thumbnail_size: make JPEG thumbnails (longest
    side in pixels) in the loader workers. cache: reuse / keep the result (`EmbedCache`, module docstring;
    only one-process passes are cached, and a pass cut short by max_samples is not stored).
    Raises RadalignError when nothing could be read.
    """
    rank, world_size = _rank_world(rank, world_size)
    entry = CacheEntry.find(cache, shards_root, split, transform) if cache is not None and world_size == 1 else None
    if entry is not None:
        hit = entry.load(thumbnail_size)
        if hit is not None and (max_samples is None or len(hit) <= max_samples):
            log.info("%s split %s: cached embeddings (%s)", shards_root, split, entry.json_file.name)
            return hit
    emb, capped = _embed_pass(encode_images, shards_root, split, transform, batch_size=batch_size,
                              num_workers=num_workers, max_samples=max_samples, rank=rank, world_size=world_size,
                              thumbnail_size=thumbnail_size, progress=progress)
    if entry is not None and not capped:
        entry.store(emb, thumbnail_size)
    return emb


@torch.no_grad()
def _embed_pass(encode_images, shards_root, split: str, transform, *, batch_size: int, num_workers: int,
                max_samples: int | None, rank: int, world_size: int, thumbnail_size: int | None,
                progress: bool) -> tuple[EmbeddedSplit, bool]:
    """One pass through the loader -> (result, whether max_samples cut it short)."""
    from radalign.data.loader import make_eval_loader
    from tqdm import tqdm

    shards = shard_paths(shards_root, split)
    tf = WithThumbnail(transform, thumbnail_size) if thumbnail_size else transform
    loader = make_eval_loader(shards, batch_size=batch_size, transform=tf, num_workers=num_workers, rank=rank,
                              world_size=world_size)
    rows = _Rows(thumbs=[] if thumbnail_size else None)
    capped = False
    bar = tqdm(loader, total=loader.num_batches, desc=f"embed {split}", unit="batch", disable=not progress)
    for batch in bar:
        images, n = batch["image"], len(batch["key"])  # images: [B, C, H, W] (packed with thumbnails)
        jpegs = None
        if thumbnail_size:
            images, jpegs = WithThumbnail.unpack(images)
        if max_samples is not None and len(rows.keys) + n > max_samples:
            n, capped = max(0, max_samples - len(rows.keys)), True
        if n:
            rows.add(encode_images(images[:n]).float().cpu(), batch, n, jpegs)  # [n, D]
        if capped:
            break
    bar.close()
    return _finish(loader, shards, split, shards_root, rows.in_place(), capped, rank, world_size,
                   num_workers), capped


@dataclass
class _Rows:
    """What a pass collects, batch by batch (image chunks [n, D], ids, texts, thumbnails, loader places)."""

    chunks: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    meta: list = field(default_factory=list)
    texts: list = field(default_factory=list)
    thumbs: list | None = None
    places: list = field(default_factory=list)

    def add(self, emb: torch.Tensor, batch: dict, n: int, jpegs: list[bytes] | None) -> None:
        self.chunks.append(emb)
        self.keys += list(batch["key"][:n])
        self.meta += list(batch["meta"][:n])
        self.texts += list(batch["text"][:n])
        self.places += list(batch.get("place") or [None] * n)[:n]
        if self.thumbs is not None:
            self.thumbs += jpegs[:n]

    def in_place(self) -> _Rows:
        """The rows sorted by (shard, index in the shard): the one-worker order whatever the worker count."""
        if not self.chunks or any(p is None for p in self.places):
            return self
        order = sorted(range(len(self.keys)), key=lambda i: tuple(self.places[i]))
        if order == list(range(len(order))):
            return self
        pick = lambda xs: [xs[i] for i in order]  # noqa: E731
        return _Rows([torch.cat(self.chunks)[order]], pick(self.keys), pick(self.meta), pick(self.texts),
                     pick(self.thumbs) if self.thumbs is not None else None, pick(self.places))


def _finish(loader, shards, split, root, rows: _Rows, capped: bool, rank: int, world_size: int,
            num_workers: int) -> EmbeddedSplit:
    skipped = {k: int(v) for k, v in dict(loader.skipped).items() if v}
    expected = expected_samples(shards, rank, world_size, num_workers)
    lost_attr = getattr(loader, "lost", None)
    out = EmbeddedSplit(np.zeros((0, 0), np.float32), rows.keys, rows.meta, rows.texts, rows.thumbs,
                        skipped=skipped, expected=expected)
    # A capped pass stopped early: what it did not read is left out on request, not lost.
    out.lost = lost_counts(skipped, lost_attr, None if capped else expected, len(rows.keys))
    if capped and expected is not None:
        out.capped = max(0, expected - len(rows.keys) - out.lost_total)
    if out.lost:
        log.warning("%s split %s: %s", root, split, out.summary())
    if not rows.chunks:
        raise RadalignError(f"{root} split {split!r}: no readable samples ({out.summary()}); "
                            "check the shards with `radalign data info` or re-run `radalign data prepare`")
    out.image = torch.nn.functional.normalize(torch.cat(rows.chunks), dim=-1).numpy().astype(np.float32)  # [N, D]
    if rows.thumbs is not None and len(rows.thumbs) != len(rows.keys):
        raise RadalignError(f"internal: {len(rows.thumbs)} thumbnails for {len(rows.keys)} samples")
    return out


# ----------------------------------------------------------------------------------------------------------
# Texts longer than the text tower's context (the tokenizer cuts them silently)


def _pad_id(tokenize) -> int:
    """The id a tokenizer pads with: the last position of an empty text."""
    return int(tokenize([""])[0, -1])


def fills_context(tokenize: Callable[[list[str]], torch.Tensor], texts: list[str]) -> np.ndarray:
    """[N] bool: the text's tokens reach the last position of the context (it was cut, or fits exactly)."""
    if not texts:
        return np.zeros(0, dtype=bool)
    tokens = tokenize(list(texts))  # [N, L]
    return (tokens[:, -1] != _pad_id(tokenize)).cpu().numpy()


def chars_used(tokenize, text: str) -> int:
    """About how many leading characters of `text` fit the context (binary search over prefixes)."""
    lo, hi = 0, len(text)  # prefix text[:lo] fits; text[:hi] fills the context
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fills_context(tokenize, [text[:mid]])[0]:
            hi = mid
        else:
            lo = mid
    return lo


def check_query_text(tokenize, text: str, what: str = "--text") -> dict | None:
    """Warn (with the lengths) when a query text is longer than the text context; None when it fits.

    -> {"chars": len(text), "chars_used": about how many are read, "context_tokens": L}."""
    if not fills_context(tokenize, [text])[0]:
        return None
    ctx = int(tokenize([""]).shape[1])
    used = chars_used(tokenize, text)
    if used >= len(text) - 1:  # fits exactly
        return None
    log.warning("%s: %d characters, more than the text tower's context of %d tokens: only about the first %d "
                "characters are read, the rest is ignored. Shorten the text to its key findings", what, len(text),
                ctx, used)
    return {"chars": len(text), "chars_used": used, "context_tokens": ctx}


def context_report(tokenize, texts: list[str], what: str = "texts", batch: int = 1024) -> dict:
    """How many `texts` reach the end of the text context (cut, or exactly full); logged when any.

    -> {"texts", "over_context", "context_tokens", "max_chars_over"} (counts only: no text is logged)."""
    if not texts:
        return {"texts": 0, "over_context": 0, "context_tokens": None, "max_chars_over": None}
    full = np.concatenate([fills_context(tokenize, texts[i:i + batch]) for i in range(0, len(texts), batch)])
    ctx = int(tokenize([""]).shape[1])
    over = [len(t) for t, f in zip(texts, full) if f]
    out = {"texts": len(texts), "over_context": len(over), "context_tokens": ctx,
           "max_chars_over": max(over) if over else None}
    if over:
        log.warning("%d of %d %s reach the text tower's context of %d tokens and are cut there (longest: %d "
                    "characters)", len(over), len(texts), what, ctx, max(over))
    return out


def _rank_world(rank: int, world_size: int) -> tuple[int, int]:
    if world_size < 1 or not 0 <= rank < world_size:
        raise RadalignError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    return rank, world_size


__all__ = ["embed_split", "EmbeddedSplit", "EmbedCache", "CacheEntry", "CACHE_ENV", "WithThumbnail", "thumbnail_bytes", "thumbnail_jpeg", "expected_samples", "lost_counts",
           "fills_context", "chars_used", "check_query_text", "context_report"]

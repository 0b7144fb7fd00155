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

This module belongs to `data/` and imports no other stage: the encoder is passed in as a callable.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from radalign import RadalignError
from radalign.log import get_logger

log = get_logger("data.embed")

# Loader skip reasons that are not one sample each: a shard-level event, or samples left out on purpose.
_NOT_SAMPLE_REASONS = ("bad_shard", "incomplete_batch", "rank_balance")


@dataclass
class EmbeddedSplit:
    """The result of one pass: rows in loader order (the same on every run)."""

    image: np.ndarray  # [N, D] float32, L2-normalised
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
    from data.loader import eval_assignment, manifest_counts

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


@torch.no_grad()
def embed_split(encode_images: Callable[[torch.Tensor], torch.Tensor], shards_root: str | os.PathLike, split: str,
                transform: Callable, *, batch_size: int = 64, num_workers: int = 0, max_samples: int | None = None,
                rank: int = 0, world_size: int = 1, thumbnail_size: int | None = None,
                progress: bool = False) -> EmbeddedSplit:
    """Embed this rank's share of `shards_root/<split>` (every sample once across ranks, in a fixed order).

    encode_images: [B, C, H, W] float tensor -> [B, D] tensor (on any device; moved to CPU here).
    max_samples: stop after this many samples (on this rank). thumbnail_size: make JPEG thumbnails (longest
    side in pixels) in the loader workers. Raises RadalignError when nothing could be read.
    """
    from tqdm import tqdm

    from data.loader import make_eval_loader, shard_paths

    rank, world_size = _rank_world(rank, world_size)
    shards = shard_paths(shards_root, split)
    tf = WithThumbnail(transform, thumbnail_size) if thumbnail_size else transform
    loader = make_eval_loader(shards, batch_size=batch_size, transform=tf, num_workers=num_workers, rank=rank,
                              world_size=world_size)
    chunks, keys, meta, texts, thumbs = [], [], [], [], []
    capped = False
    bar = tqdm(loader, total=loader.num_batches, desc=f"embed {split}", unit="batch", disable=not progress)
    for batch in bar:
        images, n = batch["image"], len(batch["key"])  # images: [B, C, H, W] (packed with thumbnails)
        if thumbnail_size:
            images, jpegs = WithThumbnail.unpack(images)
        if max_samples is not None and len(keys) + n > max_samples:
            n, capped = max(0, max_samples - len(keys)), True
        if n:
            chunks.append(encode_images(images[:n]).float().cpu())  # [n, D]
            keys += list(batch["key"][:n])
            meta += list(batch["meta"][:n])
            texts += list(batch["text"][:n])
            if thumbnail_size:
                thumbs += jpegs[:n]
        if capped:
            break
    bar.close()
    return _finish(loader, shards, split, shards_root, chunks, keys, meta, texts,
                   thumbs if thumbnail_size else None, capped, rank, world_size, num_workers)


def _finish(loader, shards, split, root, chunks, keys, meta, texts, thumbs, capped: bool, rank: int,
            world_size: int, num_workers: int) -> EmbeddedSplit:
    skipped = {k: int(v) for k, v in dict(loader.skipped).items() if v}
    expected = expected_samples(shards, rank, world_size, num_workers)
    lost_attr = getattr(loader, "lost", None)
    out = EmbeddedSplit(np.zeros((0, 0), np.float32), keys, meta, texts, thumbs, skipped=skipped,
                        expected=expected)
    # A capped pass stopped early: what it did not read is left out on request, not lost.
    out.lost = lost_counts(skipped, lost_attr, None if capped else expected, len(keys))
    if capped and expected is not None:
        out.capped = max(0, expected - len(keys) - out.lost_total)
    if out.lost:
        log.warning("%s split %s: %s", root, split, out.summary())
    if not chunks:
        raise RadalignError(f"{root} split {split!r}: no readable samples ({out.summary()}); "
                            "check the shards with `radalign data info` or re-run `radalign data prepare`")
    out.image = torch.nn.functional.normalize(torch.cat(chunks), dim=-1).numpy().astype(np.float32)  # [N, D]
    if thumbs is not None and len(thumbs) != len(keys):
        raise RadalignError(f"internal: {len(thumbs)} thumbnails for {len(keys)} samples")
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


__all__ = ["embed_split", "EmbeddedSplit", "WithThumbnail", "thumbnail_bytes", "expected_samples", "lost_counts",
           "fills_context", "chars_used", "check_query_text", "context_report"]

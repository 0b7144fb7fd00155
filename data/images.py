"""The one way every stage reads an image file and makes it 8-bit grayscale.

    from radalign.data.images import open_image, to_gray8
    img = to_gray8(open_image(path, max_pixels=DEFAULT_MAX_PIXELS))     # PIL "L"

Used by `data prepare` (shards), `data.transforms.ToGray` (every transform) and the zero-shot / retrieval
readers of loose image files, so a 12-bit PNG gives the same pixels wherever it is read.

- `open_image` checks the pixel count from the file header *before* decoding. JPEGs above `max_pixels` are
  decoded at a reduced DCT scale (`draft`: 1/2, 1/4, 1/8) when that brings them under the limit; anything
  else above it raises `OversizedImageError` (a RadalignError naming the file, its size and the limit), never
  PIL's raw `DecompressionBombError`, and never after allocating the full image.
- `to_gray8` rescales 16-bit, 32-bit int and float images (`I;16*`, `I`, `F`) from their own min..max to
  0..255 (PIL's `convert("L")` clips them: a 12-bit radiograph comes out nearly white), in row blocks so the
  peak memory stays about one float32 block beside the image; transparent pixels go onto black.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from radalign import RadalignError

# ~ 7000 x 7000. MIMIC-CXR JPEGs are ~ 3000 x 2500 (7.5 Mpx); larger files are scans gone wrong or bombs.
DEFAULT_MAX_PIXELS = 50_000_000
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ROWS_PER_BLOCK = 256
_PIL_LIMIT = threading.Lock()  # guards the temporary lift of PIL's own limit in `_open_lazy`


class OversizedImageError(RadalignError):
    """An image with more pixels than `max_pixels` (and no reduced decode that fits)."""


def _open_lazy(path: str | os.PathLike):
    """`Image.open` (header only) with PIL's own bomb check lifted: `open_image` applies `max_pixels` itself,
    before any pixel is decoded, so a limit above PIL's (89 Mpx) works and a bomb still never decodes."""
    from PIL import Image

    with _PIL_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def target_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(w, h) with the short side `short` and the aspect kept; unchanged when already that small (no upscaling:
    it adds no information and the loader's transform resizes to the model's input anyway)."""
    if min(width, height) <= short:
        return width, height
    if width <= height:
        return short, max(1, round(height * short / width))
    return max(1, round(width * short / height)), short


def _reduced_draft(im, max_pixels: int, target: tuple[int, int] | None) -> None:
    """Ask a JPEG decoder for a reduced DCT scale: the smallest one still >= `target` (if given); above
    `max_pixels`, the mildest of 1/2, 1/4, 1/8 that fits (the limit wins over `target`)."""
    w, h = im.size
    request = target
    if w * h > max_pixels:
        k = next((k for k in (2, 4, 8) if -(-w // k) * -(-h // k) <= max_pixels), 8)
        request = (max(1, w // k), max(1, h // k))
    if request is not None and request != im.size:
        im.draft("L", request)  # RGB JPEGs decode straight to luminance (the caller wants grey anyway)


def open_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               short_side: int | None = None):
    """A loaded PIL image with EXIF orientation applied; `OversizedImageError` above `max_pixels`.

    `short_side`: the short side the caller will shrink to; JPEGs are then decoded at the smallest DCT scale
    still at least that large (about 4x faster on MIMIC-sized files). `max_pixels=None`: no limit.
    Other decode errors (OSError, ValueError, SyntaxError, ...) propagate: callers count them as unreadable.
    """
    from PIL import Image, ImageOps

    try:
        im = _open_lazy(path)
    except Image.DecompressionBombError as e:  # pragma: no cover - the limit is lifted in _open_lazy
        raise OversizedImageError(f"{path}: {e}") from None
    with im:
        w, h = im.size
        if im.format == "JPEG":
            target = target_size(w, h, short_side) if short_side else None
            _reduced_draft(im, max_pixels if max_pixels is not None else w * h, None if target == (w, h) else target)
        pixels = im.size[0] * im.size[1]
        if max_pixels is not None and pixels > max_pixels:
            raise OversizedImageError(
                f"{path}: {w} x {h} = {w * h:,} pixels, above the limit of {max_pixels:,}"
                f"{' (even decoded at 1/8 scale)' if im.format == 'JPEG' else ''}; raise max_pixels "
                f"(e.g. max_pixels={w * h}) if the file is a genuine image")
        out = ImageOps.exif_transpose(im)  # a loaded copy
        if out is im:  # pragma: no cover - older PIL returns the same object without EXIF
            out = im.copy()
    return out


def to_gray8(img) -> Any:
    """Any PIL image -> 8-bit grayscale ("L").

    `I;16*`, `I` and `F` images are rescaled from their own min..max to 0..255 (a constant image becomes
    black); clipping, as `convert("L")` does, would turn a 12-bit radiograph white. Transparent pixels are
    composited onto black (the background of a radiograph). Palette/RGB/CMYK go through PIL's luminance.
    """
    from PIL import Image

    if img.mode in HIGH_BIT_MODES:
        return _rescale_high_bit(img)
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return img if img.mode == "L" else img.convert("L")


def _rescale_high_bit(img):
    """min..max -> 0..255 in blocks of rows (float32 per block, not one float64 copy of the whole image)."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(img)  # [H, W] uint16 / int32 / float32
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
    else:
        lo, hi = float(arr.min()), float(arr.max())
    out = np.zeros(arr.shape, dtype=np.uint8)  # [H, W]
    if hi > lo:
        scale = 255.0 / (hi - lo)
        for r in range(0, arr.shape[0], _ROWS_PER_BLOCK):
            block = arr[r:r + _ROWS_PER_BLOCK].astype(np.float64 if arr.dtype.kind == "i" else np.float32)
            block = np.nan_to_num((block - lo) * scale, nan=0.0, posinf=255.0, neginf=0.0)
            out[r:r + _ROWS_PER_BLOCK] = np.clip(np.rint(block), 0, 255).astype(np.uint8)
    return Image.fromarray(out)


__all__ = ["open_image", "to_gray8", "target_size", "OversizedImageError", "DEFAULT_MAX_PIXELS", "HIGH_BIT_MODES"]

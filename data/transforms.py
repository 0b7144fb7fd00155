"""Chest X-ray image transforms: PIL image (any mode) -> normalised float tensor `[C, H, W]`.

Built from torchvision transforms v2 and PIL (the training augmentation is one fused module, see
`RandomCropRotateJitter` for why). Choices specific to radiographs:
- No horizontal flip by default: left/right carries meaning (the heart sits on the patient's left;
  "left pleural effusion" must stay on the left). `hflip=True` exists only for ablations.
- Mild geometry: a random resized crop that keeps 80-100 % of the area with a near-square aspect, and a
  small rotation (±7°), i.e. the positioning jitter a real acquisition has; no shear or large zoom that
  would move findings out of the field.
- Brightness/contrast jitter only (exposure varies between machines); no saturation/hue: the images are
  grayscale.
- Augmentations run on the single-channel image, and only then is it repeated to 3 channels when the
  tower wants 3 (three times cheaper than augmenting RGB; the channels are identical either way).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from radalign.data.images import to_gray8
from torchvision.transforms import RandomResizedCrop, v2

from radalign import RadalignError

# The same values as open_clip.constants.OPENAI_DATASET_MEAN / _STD (tests check they agree). Copied rather
# than imported because importing open_clip costs ~2 s, in every loader worker of every data command.
OPENAI_DATASET_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def _stats(values: Sequence[float] | None, default: tuple[float, ...], channels: int, name: str) -> list[float]:
    """Per-channel mean or std for `channels`; a 1-channel tower gets the average of the RGB defaults."""
    if channels not in (1, 3):
        raise RadalignError(f"channels={channels}: image towers take 1 or 3 channels; set channels to 1 or 3")
    if values is None:
        values = default if channels == 3 else (sum(default) / len(default),)
    values = [float(v) for v in values]
    if len(values) == 1 and channels == 3:
        values = values * 3
    if len(values) != channels:
        raise RadalignError(f"{name}={values}: {len(values)} values for a {channels}-channel image; "
                            f"give {channels} value(s) (one per channel) or a single value")
    if name == "std" and min(values) <= 0:
        raise RadalignError(f"std={values}: every std must be > 0")
    return values


class ToGray(torch.nn.Module):
    """Any PIL mode (RGB, I;16, I, F, LA, ...) -> 8-bit grayscale "L", the form the shards store.

    `data.images.to_gray8`, the one conversion every reader uses: 16-bit / float images are rescaled from
    their own min..max (PIL's convert("L") clips them), transparent pixels go onto black.
    """

    def forward(self, img):
        return img if img.mode == "L" else to_gray8(img)


class RandomCropRotateJitter(torch.nn.Module):
    """PIL "L" -> `[1, S, S]` float in [0, 1]: random resized crop, rotation, brightness/contrast, optional flip.

    The same augmentation as `v2.RandomResizedCrop -> v2.RandomRotation -> v2.ColorJitter(brightness, contrast)`
    (crop parameters come from torchvision's own `RandomResizedCrop.get_params`), done as two PIL calls on the
    8-bit image plus a few in-place tensor ops. Why fused: at 112-224 px, torchvision v2's per-transform dispatch
    costs more than the pixels, and the chain made our pretrain loop slower than open_clip's (`bench/data.py`
    times the three; bench/RESULTS.md, "data"). Brightness is applied before contrast (ColorJitter draws the
    order at random; with these ranges only the clipping differs).
    """

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float], rotation: float,
                 brightness: float, contrast: float, hflip: bool):
        super().__init__()
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)
        self.rotation, self.brightness, self.contrast, self.hflip = float(rotation), brightness, contrast, hflip

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return float(torch.empty(1).uniform_(lo, hi)) if hi > lo else lo

    def forward(self, img):
        top, left, h, w = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        bilinear = Image.Resampling.BILINEAR
        out = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), bilinear)  # antialiased
        angle = self._uniform(-self.rotation, self.rotation)
        if angle:
            out = out.rotate(angle, resample=bilinear, fillcolor=0)  # counter-clockwise, like torchvision
        if self.hflip and torch.rand(1).item() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(out, dtype=np.float32)[None]).div_(255.0)  # [1, S, S]
        b = self._uniform(max(0.0, 1 - self.brightness), 1 + self.brightness)
        c = self._uniform(max(0.0, 1 - self.contrast), 1 + self.contrast)
        if b != 1.0:
            x.mul_(b).clamp_(0.0, 1.0)
        if c != 1.0:
            m = x.mean()
            x.sub_(m).mul_(c).add_(m).clamp_(0.0, 1.0)
        return x

    def extra_repr(self) -> str:
        return (f"size={self.size}, scale={self.scale}, ratio={self.ratio}, rotation={self.rotation}, "
                f"brightness={self.brightness}, contrast={self.contrast}, hflip={self.hflip}")


class NormalizeChannels(torch.nn.Module):
    """`[1, H, W]` in [0, 1] -> `[C, H, W]` normalised per channel (one broadcast op, no copy of the gray plane)."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[:, None, None], persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32)[:, None, None],
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [1, H, W] -> [C, H, W]
        return (x - self.mean) * self.inv_std


def train_transform(image_size: int, channels: int = 3, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None, *, scale: tuple[float, float] = (0.8, 1.0),
                    ratio: tuple[float, float] = (0.9, 1.1), rotation: float = 7.0, brightness: float = 0.2,
                    contrast: float = 0.2, hflip: bool = False) -> v2.Compose:
    """Training augmentation for chest radiographs; PIL image (any mode) -> `[channels, S, S]` float.

    `mean`/`std` default to open_clip's OPENAI_DATASET_MEAN/STD (their average for a 1-channel tower).
    `scale`/`ratio` are RandomResizedCrop's, `rotation` is the max angle in degrees, `brightness`/`contrast`
    are ColorJitter's. `hflip=True` adds a horizontal flip (off by default: left/right carries meaning).
    """
    if image_size < 1:
        raise RadalignError(f"image_size={image_size}: must be a positive number of pixels")
    m, s = _stats(mean, OPENAI_DATASET_MEAN, channels, "mean"), _stats(std, OPENAI_DATASET_STD, channels, "std")
    return v2.Compose([
        ToGray(),
        RandomCropRotateJitter(image_size, scale, ratio, rotation, brightness, contrast, hflip),  # [1, S, S]
        NormalizeChannels(m, s),                                                                 # [C, S, S]
    ])


def eval_transform(image_size: int, channels: int = 3, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> v2.Compose:
    """Deterministic: resize the short side to `image_size`, center crop; -> `[channels, S, S]` float."""
    if image_size < 1:
        raise RadalignError(f"image_size={image_size}: must be a positive number of pixels")
    m, s = _stats(mean, OPENAI_DATASET_MEAN, channels, "mean"), _stats(std, OPENAI_DATASET_STD, channels, "std")
    steps: list = [
        ToGray(),
        v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
    ]
    return v2.Compose(steps + [
        v2.PILToTensor(),                         # [1, S, S] uint8
        v2.ToDtype(torch.float32, scale=True),    # [1, S, S] in [0, 1]
        NormalizeChannels(m, s),                  # [C, S, S]
    ])


__all__ = ["train_transform", "eval_transform", "ToGray", "RandomCropRotateJitter",
           "NormalizeChannels", "OPENAI_DATASET_MEAN", "OPENAI_DATASET_STD"]

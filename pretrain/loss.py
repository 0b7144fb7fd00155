"""Contrastive losses over the global batch: symmetric InfoNCE (default) or SigLIP, false-negative aware.

    loss_fn = ContrastiveLoss(rank=r, world_size=w)            # one per process
    loss = loss_fn(img [B,D], txt [B,D], logit_scale, study_id=[B], text_id=[B])

Distribution: every process computes the loss of its own B rows against the features of all W*B pairs
(local loss), gathered *with* gradient (`torch.distributed.nn.functional.all_gather`), so that after DDP's
gradient averaging W processes of B give exactly the gradients of one process of W*B (open_clip's
`ClipLoss(local_loss=True, gather_with_grad=True)`). Gathering without gradient would halve the encoder gradients
at W=2. Every rank must pass the same B (the loaders drop incomplete batches).

False negatives (default on): in MIMIC-CXR one study has several images, and thousands of reports read "No acute
cardiopulmonary process.". Pairs of the global batch that share a `study_id` or a `text_id` (data.text.text_id of
the normalised report) are positives of each other: each row's target is uniform over its positives (for
image->text and text->image alike). Negative ids mean "unknown" and never match. Without duplicates the loss is
exactly InfoNCE.

This module uses torch.distributed only; it never imports accelerate or deepspeed (docs/architecture.md).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from radalign import RadalignError
from radalign.log import get_logger

log = get_logger(__name__)

KINDS = ("infonce", "siglip")


def _all_gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """[B, ...] on each rank -> [W*B, ...] in rank order; gradients flow back to the rank that owns each row."""
    if world_size == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():  # torch 2.14 deprecates it in favour of a private API; it is what open_clip uses
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)
        return torch.cat(dist_fn.all_gather(x), dim=0)


def _all_gather_ids(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """[B] int64 on each rank -> [W*B] (ids carry no gradient)."""
    if world_size == 1:
        return ids
    import torch.distributed as dist

    out = [torch.empty_like(ids) for _ in range(world_size)]
    dist.all_gather(out, ids.contiguous())
    return torch.cat(out)


def positive_mask(local_ids: list[torch.Tensor], global_ids: list[torch.Tensor], *, offset: int, b: int,
                  n_global: int, device=None) -> torch.Tensor:
    """[B, N] bool: local pair i (global index offset+i) is positive with global pair j when they share any of the
    ids (negative ids never match); the diagonal (each pair with itself) is always positive."""
    pos = torch.zeros(b, n_global, dtype=torch.bool, device=device)
    for loc, glob in zip(local_ids, global_ids):
        pos |= (loc[:, None] == glob[None, :]) & (loc[:, None] >= 0)  # [B, N]
    rows = torch.arange(b, device=device)
    pos[rows, offset + rows] = True
    return pos


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE or SigLIP over the global batch, with local loss + gather-with-grad.

    `logit_scale` is the exp'd scale (shape [] or [1]); it is clamped at `max_logit_scale` functionally
    (never in place on the parameter: ZeRO-3 forbids touching parameters outside forward).

    kind="siglip" needs the model's `logit_bias` (`"init_logit_bias": -10` in the model config). Without false
    negatives it is open_clip's `SigLipLoss`; with them, labels are +1 for every positive pair (same study or
    identical report) and -1 otherwise, computed against the gathered texts.
    """

    def __init__(self, *, rank: int = 0, world_size: int = 1, false_negatives: bool = True, kind: str = "infonce",
                 max_logit_scale: float = 100.0):
        super().__init__()
        if kind not in KINDS:
            raise RadalignError(f"loss kind {kind!r}: must be one of {', '.join(KINDS)}")
        if not 0 <= rank < world_size:
            raise RadalignError(f"loss rank={rank} is outside world_size={world_size}")
        self.rank, self.world_size = rank, world_size
        self.false_negatives, self.kind, self.max_logit_scale = false_negatives, kind, max_logit_scale
        self._warned_no_ids = False
        self._siglip = None
        if kind == "siglip" and not false_negatives:
            from open_clip.loss import SigLipLoss

            self._siglip = SigLipLoss(rank=rank, world_size=world_size)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, false_negatives={self.false_negatives}, rank={self.rank}, "
                f"world_size={self.world_size}, max_logit_scale={self.max_logit_scale}")

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                study_id: torch.Tensor | None = None, text_id: torch.Tensor | None = None,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        _check_shapes(image_features, text_features, study_id, text_id)
        scale = torch.clamp(logit_scale, max=self.max_logit_scale).reshape(())  # functional clamp, a new tensor
        pos = self._positives(image_features.shape[0], study_id, text_id)
        if self.kind == "siglip":
            return self._siglip_loss(image_features, text_features, scale, logit_bias, pos)
        return self._infonce(image_features, text_features, scale, logit_bias, pos)

    # ------------------------------------------------------------------------------------------------------

    def _positives(self, b: int, study_id, text_id) -> torch.Tensor | None:
        """[B, W*B] positive mask, or None for plain one-positive-per-row targets."""
        if not self.false_negatives:
            return None
        local = [ids for ids in (study_id, text_id) if ids is not None]
        if not local:
            if not self._warned_no_ids:
                log.warning("false_negatives=True but neither study_id nor text_id was given: plain targets")
                self._warned_no_ids = True
            return None
        glob = [_all_gather_ids(ids, self.world_size) for ids in local]
        return positive_mask(local, glob, offset=self.rank * b, b=b, n_global=b * self.world_size,
                             device=local[0].device)

    def _infonce(self, img, txt, scale, bias, pos) -> torch.Tensor:
        all_img = _all_gather_with_grad(img, self.world_size)  # [N, D]
        all_txt = _all_gather_with_grad(txt, self.world_size)  # [N, D]
        logits_per_image = scale * img @ all_txt.T  # [B, N]: local images vs every text
        logits_per_text = scale * txt @ all_img.T  # [B, N]: local texts vs every image
        if bias is not None:  # a constant shift: no effect on softmax, kept for parity with open_clip
            logits_per_image, logits_per_text = logits_per_image + bias, logits_per_text + bias
        if pos is None:
            b = img.shape[0]
            target = torch.arange(b, device=img.device) + self.rank * b  # [B] global index of each own pair
        else:
            # Multi-positive soft targets, uniform over each row's positives. The pair relation is symmetric,
            # so the same mask serves image->text and text->image. One-hot rows reduce exactly to InfoNCE.
            target = pos.to(logits_per_image.dtype)
            target = target / target.sum(dim=1, keepdim=True)  # [B, N], rows sum to 1
        return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_text, target)) / 2

    def _siglip_loss(self, img, txt, scale, bias, pos) -> torch.Tensor:
        if bias is None:
            raise RadalignError('loss kind "siglip" needs the model\'s logit_bias: add "init_logit_bias": -10 to '
                                "the model config and pass the model's logit_bias to the loss")
        bias = bias.reshape(())
        if self._siglip is not None:
            return self._siglip(img, txt, scale, bias)
        b = img.shape[0]
        if pos is None:  # false negatives on but no ids given: one positive per row
            pos = positive_mask([], [], offset=self.rank * b, b=b, n_global=b * self.world_size, device=img.device)
        all_txt = _all_gather_with_grad(txt, self.world_size)  # [N, D]
        logits = scale * img @ all_txt.T + bias  # [B, N]
        labels = pos.to(logits.dtype) * 2 - 1  # +1 positives, -1 negatives
        # Sum over all N columns / local B, as open_clip's SigLipLoss: DDP's averaging then gives sum / (W*B).
        return -F.logsigmoid(labels * logits).sum() / b


def _check_shapes(img: torch.Tensor, txt: torch.Tensor, study_id, text_id) -> None:
    if img.ndim != 2 or img.shape != txt.shape:
        raise ValueError(f"image_features {tuple(img.shape)} and text_features {tuple(txt.shape)} must both be "
                         "[B, D] with the same B and D")
    for name, ids in (("study_id", study_id), ("text_id", text_id)):
        if ids is not None and (ids.shape != (img.shape[0],) or ids.dtype not in (torch.int64, torch.int32)):
            raise ValueError(f"{name} must be an int64 tensor of shape [{img.shape[0]}], got {ids.dtype} "
                             f"{tuple(ids.shape)}")

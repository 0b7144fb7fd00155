"""A small in-process trainer for models on cached embeddings (few-shot fits, baselines in tests).

    losses = fit_model(model, batch, labels, task="binary", steps=200, lr=1e-3, seed=0)
    logits = predict_logits(model, batch)          # [N, C], eval mode, no grad

Full batch (or seeded minibatches of `batch_size` rows), AdamW, a fixed number of steps (no early stopping):
the few-shot protocol's fixed recipe. Multi-process training, checkpoints and logging are the recipe's job
(radalign.training); this module never imports accelerate or deepspeed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from radalign.finetune.models import masked_loss
from torch import nn


def logits_of(out) -> torch.Tensor:
    """A FusionOutput's logits, or the tensor a baseline returns."""
    return out.logits if hasattr(out, "logits") else out


def take_rows(batch, rows: torch.Tensor):
    """The same rows of every tensor in a (nested) batch dict."""
    if isinstance(batch, Mapping):
        return {k: take_rows(v, rows) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch[rows]
    return batch


def fit_model(model: nn.Module, batch: Mapping, labels: torch.Tensor, *, task: str, steps: int = 200,
              lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0, batch_size: int | None = None,
              penalty=None) -> list[float]:
    """Train in place; returns the loss per step. `penalty(model) -> scalar` is added (e.g. L2 to an init)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    n = labels.shape[0]
    losses = []
    model.train()
    for _ in range(steps):
        if batch_size and batch_size < n:
            rows = torch.randperm(n, generator=gen)[:batch_size]
            b, y = take_rows(batch, rows), labels[rows]
        else:
            b, y = batch, labels
        loss = masked_loss(logits_of(model(b)), y, task)
        if penalty is not None:
            loss = loss + penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def predict_logits(model: nn.Module, batch: Mapping, present_override=None) -> np.ndarray:
    model.eval()
    out = model(batch, present_override=present_override) if present_override is not None else model(batch)
    return logits_of(out).float().cpu().numpy()

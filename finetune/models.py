"""The fusion model: modality tokens (image, indication text, EHR) and a transformer head that survives absence.

    model = FusionModel(build_encoders(image_dim=512, text_dim=512, ehr=EHREncoder(n_features=13,
                        cardinalities=fz.cardinalities)), n_outputs=1, task="binary")
    out = model(batch)                             # FusionOutput: logits [B, C], attention [B, M], present [B, M]
    out = model(batch, present_override={"text": torch.zeros(B, dtype=torch.bool)})   # mask any subset
    loss = masked_loss(out.logits, labels, "binary")                                  # NaN labels ignored

Batch: {"image": [B, D] cached image-tower embedding, "image_patches": [B, P, W] the tower's last-layer patch
tokens (read instead of "image" by a model built with `image_patches=(P, W)`: data.image_patch_tokens; each
token projected plus a learned position embedding), "text": [B, D] cached text-tower embedding of the indication, "ehr": ehr_tensors(EHRFeatures), "present": {modality: [B] bool},
optionally "dropout_u": [B, M] uniforms for modality dropout (else torch.rand)}.
A modality missing from the batch is absent for every row.

EHR encoder (FT-Transformer style, Gorishniy et al. 2021): one token per lab item = value x item embedding +
item bias + (log hours since drawn) x item hours embedding; a learned "not measured" embedding per item replaces
the token when the item is absent (the value slot is zeroed before the product, so whatever number sits there,
NaN included, the output is the same and gradients stay finite); age a numeric token with its own unknown
embedding; each categorical demographic a token (index 0 = unknown). A [CLS] token is prepended and a small
FT-Transformer backbone pools them into the EHR token. The tokenizer and the backbone are `rtdl_revisiting_models`
(the paper authors' package: `LinearEmbeddings`, `CategoricalEmbeddings`, `FTTransformerBackbone`); the missing
and hours paths are ours, since the package has none.

Fusion: [CLS] + every modality's tokens, each plus its modality-type embedding, through pre-norm transformer
layers. An absent modality (no data, dropped in training, or masked by `present_override`) is replaced by that
modality's learned mask token BEFORE its encoder output is used (all P patch tokens of an absent image), its input
is zeroed before encoding (NaN-safe), and an attention mask stops the other modality tokens from attending to it.
The [CLS] query still sees the mask token (absence is information: outpatients have no labs) unless
`cls_sees_absent=False`. Either way the absent modality's input never reaches the output. Attention weights
returned: the [CLS] query's last-layer attention, averaged over heads, summed over each modality's tokens.

Modality dropout (training mode only): each present modality is dropped independently with its own rate.

This module never imports accelerate or deepspeed (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from radalign.finetune.config import DEFAULT_MODALITY_DROPOUT
from rtdl_revisiting_models import CategoricalEmbeddings, FTTransformerBackbone, LinearEmbeddings
from torch import nn

from radalign import RadalignError

MODALITIES = ("image", "text", "ehr")
PATCH_KEY = "image_patches"  # the batch entry of the image tower's patch tokens [B, P, W] (finetune.inputs)
TASKS = ("binary", "multilabel", "multiclass")


def _uniform(shape: Sequence[int], d: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape).uniform_(-d ** -0.5, d ** -0.5))


# ----------------------------------------------------------------------------------------------------------
# EHR encoder.


def ehr_tensors(x, device=None) -> dict[str, torch.Tensor]:
    """finetune.features.EHRFeatures -> the model's "ehr" input (dict of tensors)."""
    def t(a, dtype):
        return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)
    return {"values": t(x.values, torch.float32), "hours": t(x.hours, torch.float32),
            "measured": t(x.measured, torch.bool), "num": t(x.num, torch.float32),
            "num_known": t(x.num_known, torch.bool), "cat": t(x.cat, torch.long)}


class EHREncoder(nn.Module):
    """Labs + demographics -> one EHR vector [B, d] (FT-Transformer tokenizer and backbone)."""

    def __init__(self, n_features: int, cardinalities: Sequence[int], *, n_numeric: int = 1, d: int = 64,
                 n_blocks: int = 2, n_heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.n_features, self.n_numeric, self.d = n_features, n_numeric, d
        if n_features:
            self.value = LinearEmbeddings(n_features, d)  # value * w_item + b_item
            self.hours = LinearEmbeddings(n_features, d)  # log1p(hours) * h_item + c_item
            self.not_measured = _uniform((n_features, d), d)
        if n_numeric:
            self.num = LinearEmbeddings(n_numeric, d)
            self.num_unknown = _uniform((n_numeric, d), d)
        self.cat = CategoricalEmbeddings(list(cardinalities), d) if len(cardinalities) else None
        self.cls = _uniform((d,), d)
        self.backbone = FTTransformerBackbone(
            d_out=None, n_blocks=n_blocks, d_block=d, attention_n_heads=n_heads, attention_dropout=dropout,
            ffn_d_hidden=None, ffn_d_hidden_multiplier=4 / 3, ffn_dropout=dropout, residual_dropout=0.0)

    def tokens(self, ehr: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, 1 + F + K + J, d]: [CLS], lab items, numeric and categorical demographics."""
        b = ehr["cat"].shape[0] if "cat" in ehr else ehr["values"].shape[0]
        parts = [self.cls.expand(b, 1, self.d)]
        if self.n_features:
            m = ehr["measured"].bool()  # [B, F]
            v = torch.where(m, ehr["values"], torch.zeros_like(ehr["values"]))  # whatever sits in a NaN slot
            h = torch.where(m, ehr["hours"], torch.zeros_like(ehr["hours"]))
            tok = self.value(v) + self.hours(h)  # [B, F, d]
            parts.append(torch.where(m[..., None], tok, self.not_measured.expand_as(tok)))
        if self.n_numeric:
            k = ehr["num_known"].bool()  # [B, K]
            tok = self.num(torch.where(k, ehr["num"], torch.zeros_like(ehr["num"])))
            parts.append(torch.where(k[..., None], tok, self.num_unknown.expand_as(tok)))
        if self.cat is not None:
            parts.append(self.cat(ehr["cat"].long()))  # [B, J, d]
        return torch.cat(parts, dim=1)

    def forward(self, ehr: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(self.tokens(ehr))  # [B, d] ([CLS] after the blocks)


# ----------------------------------------------------------------------------------------------------------
# Modality tokenizers: each maps its input to [B, T, d_model].


class EmbeddingTokens(nn.Module):
    """Cached tower embedding(s) [B, D] or [B, P, D] -> [B, T, d_model] (LayerNorm + linear projection).

    With several tokens (P > 1: the image tower's patch tokens) each also gets a learned position embedding, so
    the head knows where a patch sits (a patch's content alone does not say); `input_key` is the batch entry it
    reads ("image_patches" for patch tokens, else the modality's name)."""

    def __init__(self, d_in: int, d_model: int, n_tokens: int = 1, input_key: str | None = None):
        super().__init__()
        self.d_in, self.n_tokens, self.input_key = d_in, n_tokens, input_key
        self.norm = nn.LayerNorm(d_in)
        self.proj = nn.Linear(d_in, d_model)
        self.pos = _uniform((n_tokens, d_model), d_model) if n_tokens > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x[:, None]  # [B, 1, D]
        if x.shape[1] != self.n_tokens or x.shape[2] != self.d_in:
            raise RadalignError(f"modality input has shape {tuple(x.shape)}; this model expects "
                                f"[B, {self.n_tokens}, {self.d_in}] (or [B, {self.d_in}] for one token): the "
                                "cached embeddings come from another encoder or patch setting than the model's")
        t = self.proj(self.norm(x.float()))  # [B, T, d_model]
        return t if self.pos is None else t + self.pos


class EHRTokens(nn.Module):
    """EHREncoder -> one token [B, 1, d_model]."""

    n_tokens = 1

    def __init__(self, encoder: EHREncoder, d_model: int):
        super().__init__()
        self.encoder = encoder
        self.proj = nn.Linear(encoder.d, d_model)

    def forward(self, ehr: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.proj(self.encoder(ehr))[:, None]


def build_encoders(d_model: int = 128, *, image_dim: int | None = None, text_dim: int | None = None,
                   ehr: EHREncoder | None = None, image_patches: Sequence[int] | None = None) -> dict[str, nn.Module]:
    """The modality tokenizers for the inputs given (image / text cached embeddings, the EHR encoder).
    image_patches: (P, W) to read the image tower's P patch tokens of width W (batch["image_patches"]) instead
    of the pooled embedding (batch["image"], image_dim)."""
    enc: dict[str, nn.Module] = {}
    if image_dim and image_patches:
        enc["image"] = EmbeddingTokens(int(image_patches[1]), d_model, int(image_patches[0]), PATCH_KEY)
    elif image_dim:
        enc["image"] = EmbeddingTokens(image_dim, d_model)
    if text_dim:
        enc["text"] = EmbeddingTokens(text_dim, d_model)
    if ehr is not None:
        enc["ehr"] = EHRTokens(ehr, d_model)
    if not enc:
        raise RadalignError("fusion model: no modality; give image_dim, text_dim or an EHR encoder")
    return enc


# ----------------------------------------------------------------------------------------------------------
# Fusion.


@dataclass
class FusionOutput:
    logits: torch.Tensor  # [B, C]
    attention: torch.Tensor  # [B, M] [CLS] attention per modality (last layer, head mean, over its tokens)
    attention_cls: torch.Tensor  # [B] what [CLS] kept on itself (attention sums to 1 with the M columns)
    present: torch.Tensor  # [B, M] bool: the modalities that reached the model (after dropout/override)
    modalities: tuple[str, ...]


def _blank(x, keep: torch.Tensor):
    """Zero a modality's input on rows where it is absent (tensors, or dicts of them), so no NaN flows."""
    if isinstance(x, Mapping):
        return {k: _blank(v, keep) for k, v in x.items()}
    k = keep.view(-1, *([1] * (x.dim() - 1)))
    return torch.where(k, x, torch.zeros((), dtype=x.dtype, device=x.device))


class FusionLayer(nn.Module):
    """Pre-norm transformer layer that can return its attention weights."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor, need_weights: bool = False):
        h = self.norm1(x)
        a, w = self.attn(h, h, h, attn_mask=blocked, need_weights=need_weights, average_attn_weights=True)
        x = x + self.drop(a)
        x = x + self.drop(self.ffn(self.norm2(x)))
        return x, w  # [B, L, d], [B, L, L] or None


class FusionModel(nn.Module):
    """Transformer over modality tokens with type embeddings, learned mask tokens and modality dropout."""

    def __init__(self, encoders: Mapping[str, nn.Module], *, n_outputs: int = 1, task: str = "binary",
                 d_model: int = 128, n_layers: int = 2, n_heads: int = 4, dropout: float = 0.1,
                 modality_dropout: Mapping[str, float] | None = None, cls_sees_absent: bool = True):
        super().__init__()
        if task not in TASKS:
            raise RadalignError(f"task: {task!r} is not one of {', '.join(TASKS)}")
        self.task, self.n_heads, self.cls_sees_absent = task, n_heads, cls_sees_absent
        self.modalities = tuple(encoders)
        self.encoders = nn.ModuleDict(dict(encoders))
        self.n_tokens = {m: int(getattr(e, "n_tokens", 1)) for m, e in encoders.items()}
        self.input_keys = {m: getattr(e, "input_key", None) or m for m, e in encoders.items()}
        n = len(self.modalities)
        self.cls = _uniform((d_model,), d_model)
        self.type_emb = _uniform((n, d_model), d_model)
        self.mask_token = _uniform((n, d_model), d_model)
        self.layers = nn.ModuleList([FusionLayer(d_model, n_heads, dropout) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_outputs)
        rates = dict(DEFAULT_MODALITY_DROPOUT if modality_dropout is None else modality_dropout)
        unknown = sorted(set(rates) - set(MODALITIES) - set(self.modalities))
        if unknown or any(not 0 <= r < 1 for r in rates.values()):
            raise RadalignError(f"modality_dropout: {rates} — keys must be modalities "
                                f"({', '.join(self.modalities)}), rates in [0, 1)")
        self.register_buffer("dropout_rates", torch.tensor([float(rates.get(m, 0.0)) for m in self.modalities]),
                             persistent=False)

    # -- presence -------------------------------------------------------------------------------------------

    def _input(self, batch: Mapping, m: str):
        """Modality m's input in the batch (None: absent for every row). A patch-token model given only the
        pooled image embedding is refused: reading that as "no image" would silently drop every film."""
        key = self.input_keys[m]
        if key != m and batch.get(key) is None and batch.get(m) is not None:
            raise RadalignError(f"this model reads the image tower's patch tokens (batch[{key!r}], "
                                "data.image_patch_tokens=true) but the batch holds only the pooled image embedding: "
                                "build the inputs with the run's config (finetune.predict.load_run does)")
        return batch.get(key)

    def _batch_size(self, batch: Mapping) -> int:
        for m in self.modalities:
            x = self._input(batch, m)
            if x is not None:
                return int((x["cat"] if isinstance(x, Mapping) else x).shape[0])
        raise RadalignError(f"batch has none of the model's modalities ({', '.join(self.modalities)})")

    def presence(self, batch: Mapping, present_override=None) -> torch.Tensor:
        """[B, M] bool: data present (batch["present"]) AND the override (a subset to keep), per modality."""
        b = self._batch_size(batch)
        given = batch.get("present")
        cols = []
        for j, m in enumerate(self.modalities):
            if self._input(batch, m) is None:
                col = torch.zeros(b, dtype=torch.bool)
            elif given is None:
                col = torch.ones(b, dtype=torch.bool)
            elif isinstance(given, Mapping):
                col = torch.as_tensor(given[m], dtype=torch.bool) if m in given else torch.ones(b, dtype=torch.bool)
            else:
                col = torch.as_tensor(given, dtype=torch.bool)[:, j]
            cols.append(col)
        present = torch.stack(cols, dim=1).to(self.cls.device)
        if present_override is not None:
            present = present & self._override(present_override, b).to(present.device)
        return present

    def _override(self, override, b: int) -> torch.Tensor:
        if isinstance(override, Mapping):
            bad = sorted(set(override) - set(self.modalities))
            if bad:
                raise RadalignError(f"present_override: unknown modality {bad}; the model has "
                                    f"{', '.join(self.modalities)}")
            cols = [torch.as_tensor(override[m], dtype=torch.bool).expand(b) if m in override
                    else torch.ones(b, dtype=torch.bool) for m in self.modalities]
            return torch.stack(cols, dim=1)
        if isinstance(override, (set, frozenset, list, tuple)):  # the coalition kept, e.g. {"image", "ehr"}
            return torch.tensor([[m in override for m in self.modalities]], dtype=torch.bool).expand(b, -1)
        return torch.as_tensor(override, dtype=torch.bool).expand(b, len(self.modalities))

    def modality_dropout(self, present: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """Drop each present modality with its own rate (training); returns the new [B, M] presence.

        u: [B, M] uniform draws to use instead of torch.rand (the recipe draws them from its own seeded
        generator for the global batch, so a row is dropped the same way whatever the number of processes)."""
        if u is None:
            u = torch.rand(present.shape, device=present.device)
        drop = u.to(present.device) < self.dropout_rates.to(present.device)
        return present & ~drop

    # -- forward --------------------------------------------------------------------------------------------

    def forward(self, batch: Mapping, present_override=None) -> FusionOutput:
        present = self.presence(batch, present_override)  # [B, M]
        if self.training:
            present = self.modality_dropout(present, batch.get("dropout_u"))
        b = present.shape[0]
        tokens, owner = [self.cls.expand(b, 1, -1)], [-1]
        for j, m in enumerate(self.modalities):
            keep = present[:, j]
            t_m = self.n_tokens[m]
            mask_tok = self.mask_token[j].expand(b, t_m, -1)
            x_m = self._input(batch, m)
            if x_m is None or not bool(keep.any()):
                t = mask_tok  # every token of the modality: P patch tokens are absent (or dropped) together
            else:
                t = self.encoders[m](_blank(x_m, keep))  # [B, T_m, d]
                t = torch.where(keep[:, None, None], t, mask_tok)
            tokens.append(t + self.type_emb[j])
            owner += [j] * t_m
        x = torch.cat(tokens, dim=1)  # [B, L, d]
        owner_t = torch.tensor(owner, device=x.device)  # [L]
        blocked = self._attention_mask(present, owner_t)  # [B*h, L, L]
        w = None
        for i, layer in enumerate(self.layers):
            x, w = layer(x, blocked, need_weights=i == len(self.layers) - 1)
        logits = self.head(self.norm(x[:, 0]))  # [B, C]
        cls_w = (w[:, 0] if w is not None else torch.zeros(b, x.shape[1], device=x.device)).float()  # [B, L]
        per_mod = torch.zeros(b, len(self.modalities), device=x.device).index_add_(
            1, owner_t[1:], cls_w[:, 1:])
        return FusionOutput(logits, per_mod, cls_w[:, 0], present, self.modalities)

    def _attention_mask(self, present: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """[B*heads, L, L] bool, True = blocked: no query attends to an absent modality's token (the [CLS]
        query excepted when cls_sees_absent), a token always attends to itself (no empty rows)."""
        b, L = present.shape[0], owner.shape[0]
        key_present = torch.ones(b, L, dtype=torch.bool, device=present.device)
        key_present[:, 1:] = present[:, owner[1:]]  # [B, L]
        blocked = ~key_present[:, None, :].expand(b, L, L).clone()  # [B, Lq, Lk]
        if self.cls_sees_absent:
            blocked[:, 0, :] = False
        eye = torch.eye(L, dtype=torch.bool, device=present.device)
        blocked &= ~eye
        return blocked.repeat_interleave(self.n_heads, dim=0)


# ----------------------------------------------------------------------------------------------------------
# Loss and probabilities.


def masked_loss(logits: torch.Tensor, labels: torch.Tensor, task: str, reduction: str = "mean") -> torch.Tensor:
    """Loss over labelled cells; NaN labels are left out (0 with a graph when nothing is labelled).

    binary / multilabel: logits [B, C], labels [B, C] in {0, 1, NaN} (BCE with logits).
    multiclass: logits [B, C], labels [B] or [B, 1] class index as float, NaN = unlabelled (cross-entropy).
    reduction: "mean" over labelled cells, or "sum" (the recipe divides by the global batch's count, so
    several processes give the gradient of one).
    """
    labels = labels.to(logits.device)
    if task == "multiclass":
        y = labels.reshape(-1)
        ok = ~torch.isnan(y)
        if not bool(ok.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits[ok], y[ok].long(), reduction=reduction)
    if task not in TASKS:
        raise RadalignError(f"task: {task!r} is not one of {', '.join(TASKS)}")
    y = labels.reshape(logits.shape).float()
    ok = ~torch.isnan(y)
    if not bool(ok.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[ok], y[ok], reduction=reduction)


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Sigmoid per output (binary / multilabel) or softmax over classes (multiclass)."""
    return torch.softmax(logits, dim=-1) if task == "multiclass" else torch.sigmoid(logits)


def dropout_rates_from_presence(present: Mapping[str, np.ndarray], floor: float = 0.05,
                                ceiling: float = 0.5) -> dict[str, float]:
    """Per-modality training drop rates = the absence rate observed (training split), clipped to
    [floor, ceiling]: the model practises each modality's absence about as often as it will meet it."""
    return {m: float(np.clip(1.0 - np.asarray(p, bool).mean(), floor, ceiling)) for m, p in present.items()}

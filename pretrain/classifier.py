"""The prompt classifier of the exported encoders: text weights from prompts, class probabilities, logit scale.

A capability of the towers (beside `export.py`), shared by every stage that scores images against prompts:
`radalign zeroshot`, retrieval's k-NN comparison (`retrieval.classify`), few-shot prompt initialisation
(`finetune.fewshot_recipe`) and the quick zero-shot check of pretraining validation (`pretrain.validation`).
Prompt sets themselves are loaded by `pretrain.prompts`.

Prompt ensembling follows open_clip's `build_zero_shot_classifier`: embed every prompt, L2-normalise,
average per class, renormalise. Two scoring modes:
- binary (CheXzero): per class, p = softmax([s*cos(x, pos_c), s*cos(x, neg_c)])[0];
- multiclass (5x200): p = softmax over classes of s*cos(x, pos_c).
Several checkpoints are ensembled by averaging their probabilities (each checkpoint embeds with its
own towers; embeddings of different models live in different spaces and are never mixed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from radalign.data.embed import check_query_text
from radalign.pretrain.prompts import PromptSet

from radalign import RadalignError

DEFAULT_LOGIT_SCALE = 100.0


@dataclass
class TextWeights:
    """Ensembled (and per-prompt) text embeddings of one prompt set under one checkpoint."""

    positive: torch.Tensor  # [C, D] ensembled positive prompts per class
    negative: torch.Tensor | None  # [C, D] ensembled negatives (binary mode), else None
    per_prompt: list[torch.Tensor]  # C tensors [P_c, D]: each positive prompt, normalised


def logit_scale_of(encoders) -> float:
    scale = getattr(encoders, "logit_scale", None)
    if scale is None:
        scale = (getattr(encoders, "config", None) or {}).get("logit_scale", DEFAULT_LOGIT_SCALE)
    return float(scale)


def check_tokenizer(encoders, prompts: list[str], name: str) -> None:
    """Fail early, naming the checkpoint, when its tokenizer emits ids its text tower cannot embed."""
    tokens = encoders.tokenize(prompts[:256])
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise RadalignError(f"{name}: tokenizer returned {type(tokens).__name__}, not a [N, L] tensor; "
                            "the export's tokenizer does not match the radalign export format")
    text_cfg = ((getattr(encoders, "config", None) or {}).get("model_cfg") or {}).get("text_cfg") or {}
    if text_cfg.get("hf_model_name"):
        return  # HF towers: vocab size lives in the HF config; the try/except in embed_prompts covers them
    vocab = text_cfg.get("vocab_size")
    ctx = text_cfg.get("context_length")
    if vocab is not None and int(tokens.max()) >= int(vocab):
        raise RadalignError(f"{name}: tokenizer produces token id {int(tokens.max())} but the text tower has "
                            f"a vocabulary of {vocab}; the tokenizer does not match this checkpoint. "
                            "Re-export the run so config.json and tokenizer/ come from the trained model")
    if ctx is not None and tokens.shape[1] != int(ctx):
        raise RadalignError(f"{name}: tokenizer pads to {tokens.shape[1]} tokens but the text tower expects "
                            f"{ctx}; the tokenizer does not match this checkpoint. Re-export the run")


def _warn_long_prompts(encoders, prompts: list[str], name: str) -> None:
    """Warn, with the lengths, for prompts longer than the text context (the tokenizer cuts them silently)."""
    for p in prompts:
        check_query_text(encoders.tokenize, p, what=f"{name}: prompt {p[:40]!r}")


def embed_prompts(encoders, prompts: list[str], name: str = "checkpoint") -> torch.Tensor:
    """[N, D] normalised embeddings of `prompts`; a tokenizer/tower mismatch becomes a RadalignError."""
    try:
        emb = encoders.encode_texts(list(prompts))
    except (IndexError, RuntimeError) as e:
        raise RadalignError(f"{name}: the text tower cannot embed its own tokenizer's output ({e}); the "
                            "tokenizer does not match this checkpoint. Re-export the run") from None
    return F.normalize(emb.float(), dim=-1)  # [N, D]; already unit length in an export, kept for fakes


def ensemble(per_prompt: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Mean of normalised prompt embeddings per class, renormalised: [sum(counts), D] -> [C, D]."""
    groups = torch.split(F.normalize(per_prompt, dim=-1), counts)
    return F.normalize(torch.stack([g.mean(dim=0) for g in groups]), dim=-1)


def text_weights(encoders, prompt_set: PromptSet, name: str = "checkpoint") -> TextWeights:
    """Embed every prompt of the set once (one batched call) and ensemble per class."""
    pos_lists = [list(c.positive) for c in prompt_set.classes]
    neg_lists = [list(c.negative) for c in prompt_set.classes] if prompt_set.mode == "binary" else []
    flat = [p for lst in pos_lists + neg_lists for p in lst]
    check_tokenizer(encoders, flat, name)
    _warn_long_prompts(encoders, flat, name)
    emb = embed_prompts(encoders, flat, name)  # [P, D]
    n_pos = sum(len(x) for x in pos_lists)
    pos_counts = [len(x) for x in pos_lists]
    positive = ensemble(emb[:n_pos], pos_counts)  # [C, D]
    negative = ensemble(emb[n_pos:], [len(x) for x in neg_lists]) if neg_lists else None
    return TextWeights(positive, negative, list(torch.split(emb[:n_pos], pos_counts)))


def binary_probs(images: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """P(positive) per class: softmax over [s*cos(x, pos_c), s*cos(x, neg_c)]. [N, D] -> [N, C]."""
    logits = scale * torch.stack([images @ positive.T, images @ negative.T], dim=-1)  # [N, C, 2]
    return logits.softmax(dim=-1)[..., 0]


def multiclass_probs(images: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax over classes of s*cos(x, w_c). [N, D] x [C, D] -> [N, C]."""
    return (scale * images @ weights.T).softmax(dim=-1)


def class_probs(images: torch.Tensor, weights: TextWeights, mode: str, scale: float) -> torch.Tensor:
    if mode == "binary":
        return binary_probs(images, weights.positive, weights.negative, scale)
    return multiclass_probs(images, weights.positive, scale)


def template_scores(images: torch.Tensor, weights: TextWeights, mode: str,
                    scale: float) -> list[list[np.ndarray]]:
    """Scores for class c when only its i-th positive prompt is used (the rest of the set ensembled).

    Returns scores[c][i] -> [N]; feeds the prompt-sensitivity table (AUROC spread across templates).
    """
    out: list[list[np.ndarray]] = []
    for c, prompts in enumerate(weights.per_prompt):
        per_c = []
        for i in range(prompts.shape[0]):
            pos = weights.positive.clone()
            pos[c] = prompts[i]
            probs = class_probs(images, TextWeights(pos, weights.negative, []), mode, scale)  # [N, C]
            per_c.append(probs[:, c].numpy())
        out.append(per_c)
    return out


def average(arrays: list) -> np.ndarray:
    """Checkpoint ensemble: the mean of each checkpoint's probabilities (same shape)."""
    return np.mean(np.stack([np.asarray(a, dtype=np.float64) for a in arrays]), axis=0)

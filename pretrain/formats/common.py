"""Pieces every format writer shares: the open_clip view of a radalign model, its tokenizer files, sample inputs.

A radalign export (pretrain/export.py) holds an open_clip model (CLIP, or CustomTextCLIP for Hugging Face text
towers) plus a few keys of ours in its model config. Writers start from `Encoders.model.state_dict()` and the
config written beside it; nothing here knows a target library's layout.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from radalign.pretrain.export import TOKENIZER_DIR, Encoders

# Keys of a radalign model config that open_clip's constructors do not take (pretrain/models.py: EXTRA_KEYS).
OURS_TOP = ("open_clip_name", "description")
OURS_TEXT = ("hf_model_type", "hf_model_pretrained")
# open_clip's BPE names its two special tokens differently from Hugging Face's CLIPTokenizer (same ids).
HF_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
SOT_ID, EOT_ID = 49406, 49407

# Report-like sentences the round-trip checks embed (with the export's own tokenizer and the target's).
SAMPLE_TEXTS = (
    "No acute cardiopulmonary process.",
    "Small left pleural effusion with adjacent atelectasis.",
    "Moderate cardiomegaly. Mild pulmonary edema, unchanged since the prior study.",
    "ET tube terminates 3.5 cm above the carina; NG tube courses below the diaphragm.",
    "Right-sided PICC line tip in the low SVC.  No pneumothorax.",
)


def is_hf_text(model_cfg: dict) -> bool:
    return bool(model_cfg.get("text_cfg", {}).get("hf_model_name"))


def open_clip_model_cfg(model_cfg: dict) -> dict:
    """The model config as open_clip's constructors take it (our extra keys removed)."""
    cfg = {k: copy.deepcopy(v) for k, v in model_cfg.items() if k not in OURS_TOP}
    cfg["text_cfg"] = {k: v for k, v in cfg["text_cfg"].items() if k not in OURS_TEXT}
    return cfg


def full_state_dict(encoders: Encoders) -> dict[str, torch.Tensor]:
    """Every tensor of the open_clip model, fp32 on CPU; `logit_scale` 0-dim (open_clip's own shape)."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone()
             for k, v in encoders.model.state_dict().items()}
    state["logit_scale"] = torch.tensor(float(torch.log(torch.tensor(encoders.logit_scale))))
    return state


def preprocess_cfg(encoders: Encoders) -> dict:
    """open_clip's PreprocessCfg fields for the export: what `Encoders.image_transform` does."""
    return {"size": encoders.image_size, "mode": "RGB", "mean": list(encoders.config["mean"]),
            "std": list(encoders.config["std"]), "interpolation": "bicubic", "resize_mode": "shortest",
            "fill_color": 0}


def bpe_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """open_clip's BPE as a Hugging Face CLIPTokenizer takes it: token -> id (special tokens renamed) and the
    merges in rank order. Same ids, so the text tower needs no change."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    vocab = {HF_SPECIAL.get(tok, tok): i for tok, i in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    return vocab, merges


def write_bpe_tokenizer(folder: Path, context_length: int) -> None:
    """A CLIPTokenizer for open_clip's BPE: vocab.json + merges.txt (the slow format) and tokenizer.json.

    It pads with <|endoftext|> where open_clip pads with 0: both text towers pool at the first end-of-text token
    behind a causal mask, so padding never reaches the embedding (tests/test_export_formats.py checks ids)."""
    from transformers import CLIPTokenizer

    vocab, merges = bpe_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length).save_pretrained(str(folder))


def copy_hf_tokenizer(encoders: Encoders, folder: Path) -> None:
    """HF text towers: the export's tokenizer/ folder (tokenizer files + the tower's config.json) into `folder`."""
    src = Path(encoders.folder) / TOKENIZER_DIR
    for file in sorted(src.iterdir()):
        if file.is_file():
            shutil.copy2(file, folder / file.name)


def sample_images(encoders: Encoders, n: int = 3, seed: int = 0) -> torch.Tensor:
    """Deterministic normalised-looking image batch [n, 3, S, S] for round-trip checks."""
    g = torch.Generator().manual_seed(seed)
    s = encoders.image_size
    return torch.randn(n, 3, s, s, generator=g)  # [n, 3, S, S]

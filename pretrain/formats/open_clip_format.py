"""open_clip format: a folder laid out as open_clip's hub folders are (BiomedCLIP's, for one).

    open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...} (what create_model reads)
    open_clip_model.safetensors  the whole open_clip state dict (image tower, text tower, logit scale)
    config.json + tokenizer files   HF text towers only: the tower's config and its tokenizer

Load with no radalign import:
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT")
    tokenizer = open_clip.get_tokenizer("local-dir:OUT")

HF text towers: open_clip builds the tower from `text_cfg.hf_model_name` (AutoConfig.from_pretrained), so that
key holds this folder's absolute path; a moved folder needs it rewritten (docs/pretrain.md, "Sharing a model").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from radalign.pretrain.export import Encoders
from radalign.pretrain.formats import common
from safetensors.torch import save_file

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def write(encoders: Encoders, folder: Path) -> dict:
    """Write the open_clip folder into `folder` (exists, empty); returns what export.json records."""
    cfg = common.open_clip_model_cfg(encoders.config["model_cfg"])
    if common.is_hf_text(cfg):
        common.copy_hf_tokenizer(encoders, folder)
    doc = {"model_cfg": cfg, "preprocess_cfg": common.preprocess_cfg(encoders)}
    (folder / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    relocate(folder, folder)
    save_file(common.full_state_dict(encoders), str(folder / WEIGHTS_FILE))
    return {"hf_text_tower": common.is_hf_text(cfg),
            "load": 'open_clip.create_model_and_transforms("local-dir:OUT"); open_clip.get_tokenizer("local-dir:OUT")'}


def relocate(folder: Path, where: Path) -> None:
    """Point an HF text tower's `hf_model_name`/`hf_tokenizer_name` at `where` (the folder's final path): open_clip
    builds the tower from that name. Built-in text towers need nothing."""
    path = folder / CONFIG_FILE
    doc = json.loads(path.read_text())
    text = doc["model_cfg"]["text_cfg"]
    if text.get("hf_model_name"):
        text.update(hf_model_name=str(where.resolve()), hf_tokenizer_name=str(where.resolve()))
        path.write_text(json.dumps(doc, indent=2) + "\n")


@torch.no_grad()
def embed(folder: Path, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text embeddings through open_clip's own loader and tokenizer (the round trip)."""
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    img = model.encode_image(images, normalize=True)  # [N, D]
    txt = model.encode_text(tokenizer(texts), normalize=True)  # [M, D]
    return img, txt

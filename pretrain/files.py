"""The names inside an export folder, defined once: pretrain.export writes them; the model card, the public
layouts and the export formats read them. This module imports no radalign module, so any of them may use it."""

import copy
from pathlib import Path

FORMAT = "radalign-export/1"
IMAGE_FILE = "image_encoder.safetensors"
TEXT_FILE = "text_encoder.safetensors"
TOKENIZER_DIR = "tokenizer"
# Stored in config.json in place of a machine-specific path: "the tokenizer/ folder of this export".
LOCAL_TOKENIZER = "<export>/tokenizer"


def localise(model_cfg: dict, folder: Path) -> dict:
    """The model config with LOCAL_TOKENIZER replaced by `folder`'s tokenizer path (a copy; the input is kept)."""
    cfg = copy.deepcopy(model_cfg)
    text_cfg = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key) == LOCAL_TOKENIZER:
            text_cfg[key] = str(folder / TOKENIZER_DIR)
    return cfg

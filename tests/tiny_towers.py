"""Tiny Hugging Face BERT text towers written on the spot (no download): a WordPiece vocabulary of report words,
a 2-layer BERT config, and a radalign model config around one. Used by the export and public-layout tests."""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("no acute cardiopulmonary process small left right pleural effusion with adjacent atelectasis moderate "
         "cardiomegaly mild pulmonary edema unchanged since the prior study et tube terminates cm above carina ng "
         "courses below diaphragm sided picc line tip in low svc pneumothorax heart size is normal lungs are clear "
         "of and a an opacity consolidation support devices").split()


def vocab() -> list[str]:
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:-()'/")
    return SPECIAL + sorted(set(WORDS)) + chars + [f"##{c}" for c in chars if c.isalnum()]


def write_tiny_bert(folder: Path, *, hidden: int = 32, layers: int = 2, max_positions: int = 64,
                    extra_config: dict | None = None) -> dict:
    """config.json + tokenizer files of a random-init BERT in `folder`; returns the config dict."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = vocab()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(str(folder))
    cfg = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": len(words), "hidden_size": hidden,
           "num_hidden_layers": layers, "num_attention_heads": 2, "intermediate_size": 2 * hidden,
           "max_position_embeddings": max_positions, "type_vocab_size": 2, "hidden_act": "gelu",
           "layer_norm_eps": 1e-12, "pad_token_id": 0, "hidden_dropout_prob": 0.1,
           "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02, **(extra_config or {})}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return cfg


def hf_model_cfg(tower: Path, *, pooler: str, proj: str | None, embed_dim: int = 32, context: int = 24) -> dict:
    """A nano ViT + the tower at `tower` (random init: its config only), pooled and projected as asked."""
    text = {"hf_model_name": str(tower), "hf_model_pretrained": False, "hf_pooler_type": pooler,
            "context_length": context}
    if proj is not None:
        text["hf_proj_type"] = proj
    return {"description": f"nano + tiny BERT ({pooler}, {proj})", "embed_dim": embed_dim,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": text}

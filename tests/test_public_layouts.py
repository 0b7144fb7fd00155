"""`model.pretrained=` reads public checkpoint layouts: every tensor lands where it should, the rest is one error.

The checkpoints are built here, with random weights and the key names and shapes of the anchors' own code
(widths and depths shrunk where the layout allows; names kept):
- CheXzero: OpenAI CLIP's `model.py` (CheXzero's copy): `visual.conv1.weight`, `visual.transformer.resblocks.*`,
  `transformer.resblocks.*`, `token_embedding`, `text_projection`, ... saved with torch.save like its checkpoints.
- BiomedCLIP: its open_clip hub folder (open_clip_config.json with a timm ViT and an HF PubMedBERT text tower,
  open_clip_pytorch_model.bin, tokenizer files); the timm trunk keys are timm's VisionTransformer's.
- CXR-BERT: hi-ml's CXRBertModel (BertForMaskedLM + `cls_projection_head`), config.json of model_type cxr-bert.
The expected placement of each tensor is written out below, not derived from the loader under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from radalign.pretrain.export import load_encoders
from radalign.pretrain.layouts import load_pretrained, read_checkpoint
from radalign.pretrain.models import build_model, get_model_config

from radalign import RadalignError
from tests.tiny_towers import write_tiny_bert

G = torch.Generator().manual_seed(11)


def _r(*shape) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


# ----------------------------------------------------------------------------------------------------------
# CheXzero: OpenAI CLIP ViT state dict


def _meta(*shape) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def _resblock(prefix: str, d: int, r=_r) -> dict:
    """One ResidualAttentionBlock of CheXzero's model.py (nn.MultiheadAttention + c_fc/c_proj MLP)."""
    return {f"{prefix}attn.in_proj_weight": r(3 * d, d), f"{prefix}attn.in_proj_bias": r(3 * d),
            f"{prefix}attn.out_proj.weight": r(d, d), f"{prefix}attn.out_proj.bias": r(d),
            f"{prefix}ln_1.weight": r(d), f"{prefix}ln_1.bias": r(d),
            f"{prefix}mlp.c_fc.weight": r(4 * d, d), f"{prefix}mlp.c_fc.bias": r(4 * d),
            f"{prefix}mlp.c_proj.weight": r(d, 4 * d), f"{prefix}mlp.c_proj.bias": r(d),
            f"{prefix}ln_2.weight": r(d), f"{prefix}ln_2.bias": r(d)}


def chexzero_state(embed=32, resolution=64, v_layers=2, v_width=64, patch=32, context=77, vocab=49408,
                   t_width=64, t_layers=2, r=_r) -> dict:
    """CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, context_length,
    vocab_size, transformer_width, transformer_heads, transformer_layers).state_dict() of CheXzero's model.py."""
    s = {"visual.class_embedding": r(v_width),
         "visual.positional_embedding": r((resolution // patch) ** 2 + 1, v_width),
         "visual.proj": r(v_width, embed), "visual.conv1.weight": r(v_width, 3, patch, patch),
         "visual.ln_pre.weight": r(v_width), "visual.ln_pre.bias": r(v_width),
         "visual.ln_post.weight": r(v_width), "visual.ln_post.bias": r(v_width),
         "token_embedding.weight": r(vocab, t_width), "positional_embedding": r(context, t_width),
         "ln_final.weight": r(t_width), "ln_final.bias": r(t_width), "text_projection": r(t_width, embed),
         "logit_scale": torch.tensor(math.log(1 / 0.07))}
    for i in range(v_layers):
        s.update(_resblock(f"visual.transformer.resblocks.{i}.", v_width, r))
    for i in range(t_layers):
        s.update(_resblock(f"transformer.resblocks.{i}.", t_width, r))
    return s


# CheXzero loads ViT-B/32 through clip.load: QuickGELU, heads = width // 64 in both towers (shrunk here).
CHEXZERO_CFG = {"embed_dim": 32, "quick_gelu": True,
                "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 64, "patch_size": 32},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}


def test_registered_chexzero_config_has_chexzeros_full_size_shapes():
    """configs/models/ViT-B-32-chexzero.json against clip.load("ViT-B/32")'s dimensions (meta tensors: no memory):
    embed 512, 224 px, 12 x 768 vision layers, patch 32, context 77, vocab 49408, 12 x 512 text layers."""
    real = chexzero_state(embed=512, resolution=224, v_layers=12, v_width=768, patch=32, t_width=512,
                          t_layers=12, r=_meta)
    cfg = get_model_config("ViT-B-32-chexzero")
    assert cfg["quick_gelu"] is True and cfg["vision_cfg"].get("head_width", 64) == 64 and cfg["text_cfg"]["heads"] == 8
    with torch.device("meta"):
        model = build_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(shapes) == set(real)
    for key, value in real.items():
        assert shapes[key] == tuple(value.shape) or (key == "logit_scale" and shapes[key] == (1,)), key


def test_chexzero_checkpoint_lands_tensor_by_tensor(tmp_path):
    source = chexzero_state()
    path = tmp_path / "best_64_5e-05_original_22000_0.864.pt"  # CheXzero's checkpoint naming
    torch.save(source, path)
    layout, _ = read_checkpoint(path)
    assert layout.name == "openai-clip"
    model = build_model(CHEXZERO_CFG, pretrained=str(path))
    state = model.state_dict()
    assert set(state) == set(source)  # every tensor of the checkpoint, and nothing else
    for key, value in source.items():
        assert torch.equal(state[key].reshape(value.shape), value), key
    assert model.logit_scale.shape == (1,)


def test_chexzero_torchscript_metadata_is_ignored_and_ddp_prefix_unwrapped(tmp_path):
    source = chexzero_state()
    wrapped = {f"module.{k}": v for k, v in source.items()}
    wrapped.update({"module.input_resolution": torch.tensor(64), "module.context_length": torch.tensor(77),
                    "module.vocab_size": torch.tensor(49408)})
    torch.save({"state_dict": wrapped}, tmp_path / "ckpt.pt")
    model = build_model(CHEXZERO_CFG)
    summary = load_pretrained(model, str(tmp_path / "ckpt.pt"))
    assert summary["layout"] == "openai-clip" and summary["loaded"] == len(source)
    assert set(summary["ignored"]) == {"input_resolution", "context_length", "vocab_size"}
    assert torch.equal(model.state_dict()["transformer.resblocks.1.mlp.c_proj.weight"],
                       source["transformer.resblocks.1.mlp.c_proj.weight"])


def test_chexzero_positions_resized_to_the_config_grid(tmp_path):
    """A 64 px checkpoint (2x2 patches) into a 96 px model (3x3): open_clip's bicubic resize, not an error."""
    source = chexzero_state()
    torch.save(source, tmp_path / "c.pt")
    cfg = json.loads(json.dumps(CHEXZERO_CFG))
    cfg["vision_cfg"]["image_size"] = 96
    model = build_model(cfg, pretrained=str(tmp_path / "c.pt"))
    pos = model.state_dict()["visual.positional_embedding"]
    assert pos.shape == (10, 64) and torch.equal(pos[0], source["visual.positional_embedding"][0])


# ----------------------------------------------------------------------------------------------------------
# BiomedCLIP: open_clip hub folder, timm ViT + HF PubMedBERT


def _timm_vit(prefix: str, d: int, depth: int, tokens: int) -> dict:
    """timm VisionTransformer (vit_*_patch16_224) tensors after open_clip's reset_classifier(0)."""
    s = {f"{prefix}cls_token": _r(1, 1, d), f"{prefix}pos_embed": _r(1, tokens, d),
         f"{prefix}patch_embed.proj.weight": _r(d, 3, 16, 16), f"{prefix}patch_embed.proj.bias": _r(d),
         f"{prefix}norm.weight": _r(d), f"{prefix}norm.bias": _r(d)}
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        s.update({f"{b}norm1.weight": _r(d), f"{b}norm1.bias": _r(d), f"{b}attn.qkv.weight": _r(3 * d, d),
                  f"{b}attn.qkv.bias": _r(3 * d), f"{b}attn.proj.weight": _r(d, d), f"{b}attn.proj.bias": _r(d),
                  f"{b}norm2.weight": _r(d), f"{b}norm2.bias": _r(d), f"{b}mlp.fc1.weight": _r(4 * d, d),
                  f"{b}mlp.fc1.bias": _r(4 * d), f"{b}mlp.fc2.weight": _r(d, 4 * d), f"{b}mlp.fc2.bias": _r(d)})
    return s


def _bert(prefix: str, vocab: int, h: int, layers: int, positions: int, buffer: bool = True) -> dict:
    """BertModel tensors (no pooler) under `prefix`; `buffer`: the position_ids older transformers saved."""
    s = {f"{prefix}embeddings.word_embeddings.weight": _r(vocab, h),
         f"{prefix}embeddings.position_embeddings.weight": _r(positions, h),
         f"{prefix}embeddings.token_type_embeddings.weight": _r(2, h),
         f"{prefix}embeddings.LayerNorm.weight": _r(h), f"{prefix}embeddings.LayerNorm.bias": _r(h)}
    if buffer:
        s[f"{prefix}embeddings.position_ids"] = torch.arange(positions)[None]
    for i in range(layers):
        b = f"{prefix}encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            s.update({f"{b}{name}.weight": _r(h, h), f"{b}{name}.bias": _r(h)})
        s.update({f"{b}attention.output.LayerNorm.weight": _r(h), f"{b}attention.output.LayerNorm.bias": _r(h),
                  f"{b}intermediate.dense.weight": _r(2 * h, h), f"{b}intermediate.dense.bias": _r(2 * h),
                  f"{b}output.dense.weight": _r(h, 2 * h), f"{b}output.dense.bias": _r(h),
                  f"{b}output.LayerNorm.weight": _r(h), f"{b}output.LayerNorm.bias": _r(h)})
    return s


TIMM_NAME = "vit_tiny_patch16_224"  # BiomedCLIP: vit_base_patch16_224; the same key names, width 192
BIOMEDBERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"


def biomedclip_folder(folder: Path, *, embed: int = 64, hidden: int = 32, tower_config: bool = True) -> dict:
    """BiomedCLIP's hub folder, shrunk: its open_clip_config.json (timm + HF tower), weights, tokenizer."""
    bert = write_tiny_bert(folder, hidden=hidden, max_positions=512)
    if not tower_config:
        (folder / "config.json").unlink()
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": embed,
                      "vision_cfg": {"timm_model_name": TIMM_NAME, "timm_model_pretrained": False, "timm_pool": "",
                                     "timm_proj": "linear", "image_size": 224},
                      "text_cfg": {"hf_model_name": BIOMEDBERT, "hf_tokenizer_name": BIOMEDBERT,
                                   "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                                   "context_length": 256}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}))
    s = _timm_vit("visual.trunk.", 192, 12, 197)
    s["visual.head.proj.weight"] = _r(embed, 192)
    s.update(_bert("text.transformer.", bert["vocab_size"], hidden, 2, 512))
    mid = (hidden + embed) // 2
    s.update({"text.proj.0.weight": _r(mid, hidden), "text.proj.2.weight": _r(embed, mid),
              "logit_scale": torch.tensor(math.log(1 / 0.07))})
    torch.save(s, folder / "open_clip_pytorch_model.bin")
    return s


def test_timm_trunk_names_are_biomedclips(tmp_path):
    """The shrunk trunk spells its tensors as BiomedCLIP's vit_base_patch16_224 does (built on the meta device)."""
    import timm

    with torch.device("meta"):
        base = timm.create_model("vit_base_patch16_224", pretrained=False)
    base.reset_classifier(0)
    ours = _timm_vit("", 192, 12, 197)
    assert set(base.state_dict()) == set(ours)
    assert tuple(base.state_dict()["pos_embed"].shape) == (1, 197, 768)


def test_biomedclip_folder_lands_tensor_by_tensor(tmp_path):
    folder = tmp_path / "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    source = biomedclip_folder(folder)
    cfg = get_model_config(str(folder))  # model.name=FOLDER: the folder's architecture
    assert cfg["text_cfg"]["hf_model_name"] == str(folder) and cfg["text_cfg"]["hf_tokenizer_name"] == str(folder)
    model = build_model(cfg, pretrained=str(folder))
    state = model.state_dict()
    expected = {k: v for k, v in source.items() if not k.endswith("position_ids")}
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key].reshape(value.shape), value), key


def test_biomedclip_without_the_tower_config_offline_says_how_to_fix(tmp_path):
    folder = tmp_path / "biomedclip"
    biomedclip_folder(folder, tower_config=False)
    with pytest.raises(RadalignError, match=f"huggingface-cli download {BIOMEDBERT} config.json --local-dir"):
        get_model_config(str(folder))


# ----------------------------------------------------------------------------------------------------------
# CXR-BERT: a BERT-style Hugging Face text tower (hi-ml's CXRBertModel)


def cxr_bert_folder(folder: Path, *, hidden: int = 32, projection: int = 16) -> dict:
    bert = write_tiny_bert(folder, hidden=hidden, extra_config={
        "architectures": ["CXRBertModel"], "model_type": "cxr-bert", "projection_size": projection,
        "auto_map": {"AutoConfig": "configuration_cxrbert.CXRBertConfig",
                     "AutoModel": "modeling_cxrbert.CXRBertModel"}})
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok.update(tokenizer_class="CXRBertTokenizer",
               auto_map={"AutoTokenizer": ["configuration_cxrbert.CXRBertTokenizer", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    v, h, p = bert["vocab_size"], hidden, projection
    s = _bert("bert.", v, h, 2, 64)
    s.update({"cls.predictions.bias": _r(v), "cls.predictions.transform.dense.weight": _r(h, h),
              "cls.predictions.transform.dense.bias": _r(h), "cls.predictions.transform.LayerNorm.weight": _r(h),
              "cls.predictions.transform.LayerNorm.bias": _r(h), "cls.predictions.decoder.weight": _r(v, h),
              "cls.predictions.decoder.bias": _r(v),
              "cls_projection_head.dense_to_hidden.weight": _r(p, h), "cls_projection_head.dense_to_hidden.bias": _r(p),
              "cls_projection_head.LayerNorm.weight": _r(p), "cls_projection_head.LayerNorm.bias": _r(p),
              "cls_projection_head.dense_to_output.weight": _r(p, p), "cls_projection_head.dense_to_output.bias": _r(p)})
    torch.save(s, folder / "pytorch_model.bin")
    return s


def _cxr_bert_model_cfg(folder: Path, pooler: str = "cls_last_hidden_state_pooler") -> dict:
    """configs/models/ViT-B-16-cxrbert.json's text tower (bert type, CLS hidden state, MLP) on a nano ViT."""
    return {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                            "patch_size": 16},
            "text_cfg": {"hf_model_name": str(folder), "hf_model_type": "bert", "hf_pooler_type": pooler,
                         "hf_proj_type": "mlp", "context_length": 32}}


def test_cxr_bert_tower_lands_tensor_by_tensor(tmp_path):
    folder = tmp_path / "BiomedVLP-CXR-BERT-specialized"
    source = cxr_bert_folder(folder)
    layout, _ = read_checkpoint(folder)
    assert layout.name == "hf-text-tower"
    cfg = _cxr_bert_model_cfg(folder)
    model = build_model(cfg)
    summary = load_pretrained(model, str(folder))
    state = model.state_dict()
    tower = {k: v for k, v in source.items() if k.startswith("bert.") and not k.endswith("position_ids")}
    assert {k for k in state if k.startswith("text.transformer.")} == {"text.transformer." + k[5:] for k in tower}
    for key, value in tower.items():
        assert torch.equal(state["text.transformer." + key[5:]], value), key
    assert set(summary["ignored"]) == {k for k in source if k.startswith(("cls.", "cls_projection_head."))} | {
        "bert.embeddings.position_ids"}
    assert summary["left_at_init"] == ["logit_scale", "text", "visual"]  # text.proj and the image tower
    # transformers' own loader (text_cfg.hf_model_name, no pretrained=) puts the same tensors in the same places
    via_hf = build_model(cfg).state_dict()
    for key, value in tower.items():
        assert torch.equal(via_hf["text.transformer." + key[5:]], value), key


def test_cxr_bert_into_a_tower_that_needs_a_pooler_is_one_error_naming_it(tmp_path):
    folder = tmp_path / "cxr-bert"
    cxr_bert_folder(folder)
    cfg = _cxr_bert_model_cfg(folder, pooler="cls_pooler")  # BERT's pooler: CXR-BERT (an MLM model) has none
    cfg["text_cfg"]["hf_model_pretrained"] = False
    with pytest.raises(RadalignError) as e:
        build_model(cfg, pretrained=str(folder))
    msg = str(e.value)
    assert "layout hf-text-tower" in msg
    assert "model keys the checkpoint does not fill (2): text.transformer.pooler.dense.bias, " \
           "text.transformer.pooler.dense.weight" in msg


# ----------------------------------------------------------------------------------------------------------
# Other layouts and errors


def test_a_radalign_export_continues_training_from_itself(tiny_export):
    cfg = get_model_config(str(tiny_export))
    model = build_model(cfg, pretrained=str(tiny_export))
    ref = load_encoders(tiny_export).model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref[key]), key
    assert math.isclose(float(model.logit_scale.detach().exp()), json.loads((tiny_export / "config.json").read_text())["logit_scale"],
                        rel_tol=1e-6)


def test_an_unknown_layout_is_one_error_listing_both_sides(tmp_path, nano_model_cfg):
    torch.save({"backbone.layer1.weight": _r(4, 4), "head.fc.weight": _r(2, 4)}, tmp_path / "resnet.pt")
    with pytest.raises(RadalignError) as e:
        build_model(nano_model_cfg, pretrained=str(tmp_path / "resnet.pt"))
    msg = str(e.value)
    assert "layout unrecognised" in msg
    assert "checkpoint keys with no place in the model (2): backbone.layer1.weight, head.fc.weight" in msg
    n_model = len(build_model(nano_model_cfg).state_dict())
    assert f"model keys the checkpoint does not fill ({n_model}): ln_final.bias, ln_final.weight, logit_scale" in msg
    assert f"... and {n_model - 20} more" in msg
    assert msg.count("pretrained=") == 1  # one error, not one per key


def test_shape_mismatches_are_listed_with_both_shapes(tmp_path, nano_model_cfg):
    torch.save(chexzero_state(embed=64, resolution=64, v_width=64, patch=32, t_width=64), tmp_path / "c.pt")
    cfg = json.loads(json.dumps(nano_model_cfg))  # same names, other widths and patch size
    with pytest.raises(RadalignError) as e:
        build_model(cfg, pretrained=str(tmp_path / "c.pt"))
    msg = str(e.value)
    assert "shape mismatches" in msg
    assert "visual.conv1.weight: checkpoint (64, 3, 32, 32) vs model (64, 3, 16, 16)" in msg
    assert "text_projection: checkpoint (64, 64) vs model" not in msg  # equal shapes are not listed

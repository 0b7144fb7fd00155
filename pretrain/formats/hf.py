"""transformers format: a folder `transformers.AutoModel.from_pretrained` loads, with tokenizer and image processor.

Which class, by tower (each one exact: the round trip equals radalign's own embeddings):
- open_clip ViT + open_clip text transformer -> `CLIPModel`; open_clip's BPE becomes a `CLIPTokenizer`
  (vocab.json, merges.txt, tokenizer.json; same ids).
- open_clip ViT + Hugging Face text tower pooled by BERT's pooler with one linear projection ->
  `VisionTextDualEncoderModel` (CLIPVisionModel + the tower's own class).
- open_clip ViT + any other HF tower (CLS hidden state or mean pooling, MLP projection: CXR-BERT-style and
  sentence-transformer towers) -> `RadalignDualEncoderModel` (pretrain/formats/modeling_radalign.py, copied into
  the folder; `AutoModel.from_pretrained(OUT, trust_remote_code=True)`), a VisionTextDualEncoderModel subclass.
Vision towers from timm (BiomedCLIP's) have no transformers equivalent here: use the open_clip or onnx format.

Weight mapping (open_clip -> transformers CLIP): `attn.in_proj_weight` [3W, W] splits into q/k/v projections,
`ln_1/ln_2 -> layer_norm1/2`, `mlp.c_fc/c_proj -> mlp.fc1/fc2`, `proj`/`text_projection` [W, D] transpose into
`nn.Linear` weights [D, W]. Every source tensor must be used and every target tensor filled, or the export stops.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from radalign.pretrain.export import Encoders
from radalign.pretrain.formats import common

from radalign import RadalignError

REMOTE_CODE = "modeling_radalign.py"
# Keys of the open_clip state dict that are no weights of an encoder (SigLIP's bias: radalign's export drops it).
NOT_ENCODER = ("logit_bias",)

# open_clip vision/text config values a transformers CLIP tower reproduces (anything else is refused by name).
_VISION_DEFAULTS = {"attentional_pool": False, "pool_type": "tok", "final_ln_after_pool": False, "no_ln_pre": False,
                    "ls_init_value": None, "pos_embed_type": "learnable", "act_kwargs": None, "norm_kwargs": None,
                    "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                    "scale_attn": False, "scale_fc": False, "output_tokens": False}
_TEXT_DEFAULTS = {"pool_type": "argmax", "embed_cls": False, "no_causal_mask": False, "final_ln_after_pool": False,
                  "proj_type": "linear", "proj_bias": False, "ls_init_value": None, "act_kwargs": None,
                  "norm_kwargs": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
                  "scale_attn_inner": False, "scale_attn": False, "scale_fc": False}


# ----------------------------------------------------------------------------------------------------------
# What fits


def _differences(sub: dict, defaults: dict, where: str) -> list[str]:
    return [f"{where}.{k}={sub[k]!r} (transformers' CLIP towers need {v!r})"
            for k, v in defaults.items() if k in sub and sub[k] != v]


def vision_problems(model_cfg: dict) -> list[str]:
    v = model_cfg["vision_cfg"]
    if v.get("timm_model_name"):
        return [f"vision_cfg.timm_model_name={v['timm_model_name']!r}: a timm image tower has no transformers "
                "equivalent here; export with --format open_clip or --format onnx"]
    problems = _differences(v, _VISION_DEFAULTS, "vision_cfg")
    if isinstance(v.get("layers", 12), (list, tuple)):
        problems.append("vision_cfg.layers is a list (a ResNet tower); transformers' CLIP vision tower is a ViT")
    size = v.get("image_size", 224)
    if isinstance(size, (list, tuple)) and size[0] != size[1]:
        problems.append(f"vision_cfg.image_size={size}: transformers' CLIP takes square images")
    if int(v.get("width", 768)) % int(v.get("head_width", 64)):
        problems.append("vision_cfg.width is not a multiple of head_width")
    return problems


def text_problems(model_cfg: dict) -> list[str]:
    t = model_cfg["text_cfg"]
    if common.is_hf_text(model_cfg):
        from radalign.pretrain.formats.modeling_radalign import POOLERS

        pooler = t.get("hf_pooler_type", "mean_pooler")
        return [] if pooler is None or pooler in POOLERS else [
            f"text_cfg.hf_pooler_type={pooler!r}: not one of {', '.join(POOLERS)} (open_clip's max pooler fails on "
            "its own attention mask, so no model can have been trained with it)"]
    problems = _differences(t, _TEXT_DEFAULTS, "text_cfg")
    if int(t.get("vocab_size", 49408)) <= common.EOT_ID:
        problems.append(f"text_cfg.vocab_size={t.get('vocab_size')}: the CLIP tokenizer's end-of-text id "
                        f"{common.EOT_ID} must fit")
    return problems


# ----------------------------------------------------------------------------------------------------------
# Configs


def _act(model_cfg: dict) -> str:
    return "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"


def _square(size) -> int:
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def vision_config(model_cfg: dict):
    from transformers import CLIPVisionConfig

    v = model_cfg["vision_cfg"]
    width = int(v.get("width", 768))
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=int(width * v.get("mlp_ratio", 4.0)),
        num_hidden_layers=int(v.get("layers", 12)), num_attention_heads=width // int(v.get("head_width", 64)),
        image_size=_square(v.get("image_size", 224)), patch_size=int(v.get("patch_size", 16)), num_channels=3,
        hidden_act=_act(model_cfg), layer_norm_eps=1e-5, projection_dim=int(model_cfg["embed_dim"]))


def text_config(model_cfg: dict):
    from transformers import CLIPTextConfig

    t = model_cfg["text_cfg"]
    width = int(t.get("width", 512))
    return CLIPTextConfig(
        vocab_size=int(t.get("vocab_size", 49408)), hidden_size=width, intermediate_size=int(width * t.get("mlp_ratio", 4.0)),
        num_hidden_layers=int(t.get("layers", 12)), num_attention_heads=int(t.get("heads", 8)),
        max_position_embeddings=int(t.get("context_length", 77)), hidden_act=_act(model_cfg), layer_norm_eps=1e-5,
        bos_token_id=common.SOT_ID, eos_token_id=common.EOT_ID, pad_token_id=common.EOT_ID,
        projection_dim=int(model_cfg["embed_dim"]))


# ----------------------------------------------------------------------------------------------------------
# Weights


class _Mapper:
    """Source (open_clip) -> target (transformers) tensors; remembers which source keys were used."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state, self.out, self.used = state, {}, set()

    def take(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return self.state[key]

    def copy(self, src: str, dst: str, transpose: bool = False) -> None:
        t = self.take(src)
        self.out[dst] = t.t().contiguous() if transpose else t

    def norm_or_linear(self, src: str, dst: str) -> None:
        for p in ("weight", "bias"):
            self.copy(f"{src}.{p}", f"{dst}.{p}")

    def blocks(self, src: str, dst: str) -> None:
        """open_clip `{src}.resblocks.i.*` -> CLIP encoder `{dst}.layers.i.*` (q/k/v split from in_proj)."""
        i = 0
        while f"{src}.resblocks.{i}.ln_1.weight" in self.state:
            s, d = f"{src}.resblocks.{i}.", f"{dst}.layers.{i}."
            for (name, w), b in zip(zip("qkv", self.take(s + "attn.in_proj_weight").chunk(3)),
                                    self.take(s + "attn.in_proj_bias").chunk(3)):
                self.out[f"{d}self_attn.{name}_proj.weight"] = w.contiguous()
                self.out[f"{d}self_attn.{name}_proj.bias"] = b.contiguous()
            for a, c in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                self.norm_or_linear(s + a, d + c)
            i += 1

    def unused(self) -> list[str]:
        return sorted(k for k in self.state if k not in self.used and k not in NOT_ENCODER)


def map_vision(m: _Mapper, dst: str) -> None:
    """open_clip VisionTransformer (`visual.*`) -> CLIPVisionTransformer at `dst`; `visual_projection`."""
    m.copy("visual.conv1.weight", f"{dst}.embeddings.patch_embedding.weight")
    m.copy("visual.class_embedding", f"{dst}.embeddings.class_embedding")
    m.copy("visual.positional_embedding", f"{dst}.embeddings.position_embedding.weight")
    m.norm_or_linear("visual.ln_pre", f"{dst}.pre_layrnorm")
    m.blocks("visual.transformer", f"{dst}.encoder")
    m.norm_or_linear("visual.ln_post", f"{dst}.post_layernorm")
    m.copy("visual.proj", "visual_projection.weight", transpose=True)


def map_clip_text(m: _Mapper) -> None:
    """open_clip TextTransformer (top level in CLIP, under `text.` in CustomTextCLIP) -> CLIPTextTransformer."""
    p = "text." if "text.token_embedding.weight" in m.state else ""
    m.copy(f"{p}token_embedding.weight", "text_model.embeddings.token_embedding.weight")
    m.copy(f"{p}positional_embedding", "text_model.embeddings.position_embedding.weight")
    m.blocks(f"{p}transformer", "text_model.encoder")
    m.norm_or_linear(f"{p}ln_final", "text_model.final_layer_norm")
    m.copy(f"{p}text_projection", "text_projection.weight", transpose=True)


def map_hf_text(m: _Mapper) -> None:
    """open_clip HFTextEncoder (`text.transformer.*`, `text.proj.*`) -> `text_model.*`, `text_projection.*`."""
    for key in [k for k in m.state if k.startswith("text.transformer.")]:
        m.copy(key, "text_model." + key[len("text.transformer."):])
    for key in [k for k in m.state if k.startswith("text.proj.")]:
        m.copy(key, "text_projection." + key[len("text.proj."):])


def _vision_prefix(model) -> str:
    """Where the CLIPVisionTransformer's tensors sit in the dual encoder (`vision_model.` or, in transformers
    4.x, `vision_model.vision_model.`)."""
    key = next(k for k in model.state_dict() if k.endswith("embeddings.class_embedding"))
    return key[: -len(".embeddings.class_embedding")]


def _load_exact(model, m: _Mapper) -> None:
    missing = sorted(set(model.state_dict()) - set(m.out))
    unexpected = sorted(set(m.out) - set(model.state_dict()))
    unused = m.unused()
    if missing or unexpected or unused:
        raise RadalignError(f"transformers conversion is incomplete: target tensors not filled {missing[:8]}, "
                            f"unknown targets {unexpected[:8]}, source tensors not used {unused[:8]}; "
                            "this model config is not supported by --format transformers (use open_clip or onnx)")
    model.load_state_dict(m.out, strict=True)


# ----------------------------------------------------------------------------------------------------------
# Models


def _text_pooler(model_cfg: dict, tower_config) -> tuple[str, str]:
    """The tower's pooler and projection as pretrain/models.py builds them: absent keys mean mean pooling and an
    MLP projection; an explicit null pooler means open_clip's default for the architecture."""
    from open_clip.hf_configs import arch_dict

    t = model_cfg["text_cfg"]
    pooler = t.get("hf_pooler_type", "mean_pooler") or arch_dict[tower_config.model_type]["pooler"]
    return pooler, t.get("hf_proj_type", "mlp") or "none"


def build_clip(model_cfg: dict, state: dict):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config=text_config(model_cfg).to_dict(), vision_config=vision_config(model_cfg).to_dict(),
                     projection_dim=int(model_cfg["embed_dim"]), logit_scale_init_value=float(state["logit_scale"]))
    model = CLIPModel(cfg).eval()
    m = _Mapper(state)
    map_vision(m, "vision_model")
    map_clip_text(m)
    m.copy("logit_scale", "logit_scale")
    _load_exact(model, m)
    return model


def build_dual_encoder(model_cfg: dict, state: dict, tower_config):
    """VisionTextDualEncoderModel where BERT's pooler + one linear layer is the tower; else our subclass."""
    from radalign.pretrain.formats.modeling_radalign import (
        RadalignDualEncoderConfig,
        RadalignDualEncoderModel,
    )
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    pooler, proj = _text_pooler(model_cfg, tower_config)
    plain = pooler == "cls_pooler" and proj == "linear"
    cls_cfg, cls_model = ((VisionTextDualEncoderConfig, VisionTextDualEncoderModel) if plain
                          else (RadalignDualEncoderConfig, RadalignDualEncoderModel))
    extra = {} if plain else {"text_pooler": pooler, "text_proj": proj}
    cfg = cls_cfg(vision_config=vision_config(model_cfg).to_dict(), text_config=tower_config.to_dict(),
                  projection_dim=int(model_cfg["embed_dim"]), logit_scale_init_value=float(state["logit_scale"]),
                  **extra)
    model = cls_model(cfg).eval()
    m = _Mapper(state)
    map_vision(m, _vision_prefix(model))
    map_hf_text(m)
    m.copy("logit_scale", "logit_scale")
    _load_exact(model, m)
    if not plain:
        model.config.auto_map = {"AutoConfig": "modeling_radalign.RadalignDualEncoderConfig",
                                 "AutoModel": "modeling_radalign.RadalignDualEncoderModel"}
    return model, plain


def _image_processor(encoders: Encoders):
    from transformers import CLIPImageProcessor

    s = encoders.image_size
    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": s}, resample=3, do_center_crop=True,
                              crop_size={"height": s, "width": s}, do_rescale=True, rescale_factor=1 / 255,
                              do_normalize=True, image_mean=list(encoders.config["mean"]),
                              image_std=list(encoders.config["std"]), do_convert_rgb=True)


def write(encoders: Encoders, folder: Path) -> dict:
    """Write the transformers folder into `folder` (exists, empty); returns what export.json records."""
    cfg = encoders.config["model_cfg"]
    problems = vision_problems(cfg) + text_problems(cfg)
    if problems:
        raise RadalignError("--format transformers cannot express this model:\n  - " + "\n  - ".join(problems))
    state = common.full_state_dict(encoders)
    if common.is_hf_text(cfg):
        model, plain = build_dual_encoder(cfg, state, encoders.model.text.transformer.config)
        common.copy_hf_tokenizer(encoders, folder)
        (folder / "config.json").unlink()  # the tower's own config: the model's config.json replaces it
        if not plain:
            shutil.copy2(Path(__file__).with_name(REMOTE_CODE), folder / REMOTE_CODE)
        kind = "VisionTextDualEncoderModel" if plain else "RadalignDualEncoderModel (trust_remote_code=True)"
    else:
        model = build_clip(cfg, state)
        common.write_bpe_tokenizer(folder, int(cfg["text_cfg"].get("context_length", 77)))
        kind, plain = "CLIPModel", True
    model.save_pretrained(str(folder), safe_serialization=True)
    _image_processor(encoders).save_pretrained(str(folder))
    return {"class": kind, "trust_remote_code": not plain,
            "context_length": int(cfg["text_cfg"].get("context_length", 77))}


# ----------------------------------------------------------------------------------------------------------
# Round trip


def _features(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the projected feature; 4.x a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


@torch.no_grad()
def embed(folder: Path, images: torch.Tensor, texts: list[str], context_length: int):
    """L2-normalised image and text embeddings through transformers' AutoModel and AutoTokenizer."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    batch = tok(list(texts), padding="max_length", max_length=context_length, truncation=True, return_tensors="pt")
    img = _features(model.get_image_features(pixel_values=images))
    txt = _features(model.get_text_features(**{k: v for k, v in batch.items()
                                               if k in ("input_ids", "attention_mask", "token_type_ids")}))
    return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)

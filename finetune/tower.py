"""The image tower trained with the fusion head: `model.image_tower=last_blocks|lora` (issue 20 §2).

    tower = tune_tower(encoders.model.visual, {"mode": "lora", "lora_rank": 8, ...})   # in place
    model = TunedModel(tower, head, export_checksum=encoders.checksum)
    out = model(batch)          # batch["pixels"] [F, C, H, W] films, batch["film_owner"] [F] row of each film
    model.state_dict()          # the trainable weights only (head + adapters / unfrozen blocks), never the export's
    data = study_tokens(model, film_inputs)   # the tower once per film: `image` = study tokens (+ `patches`), the
                                              # head scores them
    find_tuned_export(spec["tower"], checkpoint=cfg.data.checkpoint)   # the export trained on (checksum decides)

`last_blocks`: every weight of the export stays frozen except the last `tune_blocks` transformer blocks, the
final LayerNorm (`ln_post`, which only acts on their output) and the projection `proj` (not with patch tokens:
only the pooled token goes through it).

`lora` (Hu et al. 2021) through `peft` on the attention and MLP projections of every block. Why these targets and
not peft's own `nn.MultiheadAttention` support: open_clip's blocks hold a `torch.nn.MultiheadAttention`, whose
q/k/v projection `in_proj_weight` is a bare Parameter (no `nn.Linear` to wrap) and whose `out_proj`, although an
`nn.Linear`, is never *called* (`F.multi_head_attention_forward` reads `out_proj.weight` directly), so a LoRA
wrapper on `out_proj` alone is silently ignored. peft's `lora.MultiheadAttention` works around that by adding the
adapter's delta into the frozen weights before every forward and subtracting it after: (W + dW) - dW is not W in
floating point, so the "frozen" export weights drift a rounding error per step, and the saved adapter applied to
the export would not give the model that was trained. Instead each block's attention is swapped (before peft) for
`LinearAttention`, the same computation with `in_proj` and `out_proj` as called `nn.Linear`s holding the export's
very tensors; peft then wraps them (and the MLP's `c_fc` / `c_proj`, which are called `nn.Linear`s already) with
its plain `lora.Linear`, which adds `scale * B(A(x))` beside the untouched base weight. LoRA parameters per
targeted Linear: r * (in + out) (A: r x in, B: out x r); B starts at zero, so the untrained model is the export.

The head is the fusion model of finetune.models; a study's image token is the mean of its films' L2-normalised
tower embeddings, normalised again, as the frozen path computes it (finetune.inputs.study_images). With
`data.image_patch_tokens` the head reads the tower's last-layer patch tokens instead (`batch["image_patches"]`,
[rows, P, W]: the same forward with open_clip's `output_tokens`, each token normalised, averaged position by
position over the study's films and normalised again, as the frozen patch cache does), so the adapters train
through every patch. This module never imports accelerate or deepspeed (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from radalign.finetune.config import LORA_TARGETS  # the LoRA-able Linears of a block: one list
from radalign.finetune.inputs import check_patch_tower, pooled_and_patches
from radalign.finetune.models import PATCH_KEY
from torch import nn

from radalign import RadalignError

TUNE_MODES = ("last_blocks", "lora")
TUNED_KIND = "tuned_fusion"


class LinearAttention(nn.Module):
    """Self-attention as nn.MultiheadAttention computes it, with q/k/v (`in_proj`, [3D, D]) and `out_proj` as
    called nn.Linear layers (so LoRA can wrap them); the weights are the given attention's tensors, not copies."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise RadalignError("image tower: an attention layer with separate q/k/v sizes or bias_k/zero_attn; "
                                "model.image_tower=lora supports open_clip ViT blocks only (use last_blocks)")
        d = mha.embed_dim
        self.heads, self.batch_first, self.dropout = mha.num_heads, mha.batch_first, mha.dropout
        self.in_proj = nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None)
        self.in_proj.weight = mha.in_proj_weight
        if mha.in_proj_bias is not None:
            self.in_proj.bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise RadalignError("LinearAttention: self-attention only (query, key and value the same tensor)")
        x = query if self.batch_first else query.transpose(0, 1)  # [B, L, D]
        b, n, d = x.shape
        q, k, v = self.in_proj(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [B, h, L, d/h]
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # nn.MultiheadAttention: True = blocked; SDPA: True = attend
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        o = self.out_proj(o.transpose(1, 2).reshape(b, n, d))  # [B, L, D]
        return (o if self.batch_first else o.transpose(0, 1)), None


def _blocks(visual: nn.Module) -> nn.ModuleList:
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None:
        raise RadalignError(f"image tower: {type(visual).__name__} is not an open_clip VisionTransformer "
                            "(no transformer.resblocks); model.image_tower=last_blocks|lora need one "
                            "(use model.image_tower=frozen)")
    return blocks


def _unfreeze_last(visual: nn.Module, n: int, projection: bool = True) -> None:
    blocks = _blocks(visual)
    if not 1 <= n <= len(blocks):
        raise RadalignError(f"model.tune_blocks: {n}; the export's image tower has {len(blocks)} blocks: use 1 to "
                            f"{len(blocks)}")
    for block in list(blocks)[len(blocks) - n:]:
        block.requires_grad_(True)
    for name in ("ln_post", "proj") if projection else ("ln_post",):  # patch tokens never reach proj
        part = getattr(visual, name, None)
        if isinstance(part, nn.Parameter):
            part.requires_grad_(True)
        elif isinstance(part, nn.Module):
            part.requires_grad_(True)


def _add_lora(visual: nn.Module, rank: int, alpha: float, targets) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    bad = sorted(set(targets) - set(LORA_TARGETS))
    if bad or not targets:
        raise RadalignError(f"model.lora_targets: {list(targets)}; use a non-empty subset of {', '.join(LORA_TARGETS)}")
    for block in _blocks(visual):
        if isinstance(block.attn, nn.MultiheadAttention):
            block.attn = LinearAttention(block.attn)
    # A regex over the full module names: exactly the named Linear layers of the ViT blocks, nothing else.
    pattern = r"transformer\.resblocks\.\d+\.(" + "|".join(t.replace(".", r"\.") for t in targets) + ")"
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=pattern)
    return inject_adapter_in_model(cfg, visual)  # freezes nothing itself; the caller froze the tower first


def tune_tower(visual: nn.Module, tower: Mapping) -> nn.Module:
    """`visual` (the export's open_clip image tower) made trainable as `tower["mode"]` asks, in place: every
    export weight frozen, then the last blocks unfrozen (last_blocks; the projection too unless the head reads
    the patch tokens, `tower["patch_tokens"]`) or LoRA adapters added (lora)."""
    visual.requires_grad_(False)
    mode = tower["mode"]
    if mode == "last_blocks":
        _unfreeze_last(visual, int(tower["tune_blocks"]), projection=not tower.get("patch_tokens", False))
    elif mode == "lora":
        visual = _add_lora(visual, int(tower["lora_rank"]), float(tower["lora_alpha"]), list(tower["lora_targets"]))
    else:
        raise RadalignError(f"model.image_tower: {mode!r} is not one of {', '.join(TUNE_MODES)}")
    return visual


def export_view(visual: nn.Module) -> dict[str, torch.Tensor]:
    """The tower's weights under the export's names (image_encoder.safetensors), adapters left out: what a
    frozen-weights check compares with the export file."""
    out = {}
    for name, t in visual.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        name = name.replace("attn.in_proj.weight", "attn.in_proj_weight").replace("attn.in_proj.bias",
                                                                                 "attn.in_proj_bias")
        out[name] = t
    return out


class TunedModel(nn.Module):
    """The image tower (partly trainable) in front of a fusion head; see the module docstring.

    state_dict() holds only what trains (head, adapters or unfrozen blocks): the export's frozen weights are
    left out, and load_state_dict() accepts that subset (the export supplies the rest)."""

    def __init__(self, tower: nn.Module, head: nn.Module, export_checksum: str):
        super().__init__()
        self.tower, self.head, self.export_checksum = tower, head, export_checksum
        self.modalities = head.modalities
        # the head's image tokenizer reads the patch tokens (data.image_patch_tokens) or the pooled embedding
        self.reads_patches = "image" in head.modalities and \
            getattr(head.encoders["image"], "input_key", None) == PATCH_KEY
        if self.reads_patches:
            check_patch_tower(tower)
            _check_patch_shape(tower, head.encoders["image"])
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        self.frozen_keys = frozenset(k for k in super().state_dict() if k not in trainable)
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_post_hook(_allow_frozen_missing)

    def _films(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"image": [F, D] pooled, + PATCH_KEY: [F, P, W] patch tokens when the head reads them}: one forward."""
        if not self.reads_patches:
            return {"image": self.tower(pixels)}
        pooled, tokens = pooled_and_patches(self.tower, pixels)
        return {"image": pooled, PATCH_KEY: tokens}

    def image_tokens(self, batch: Mapping, rows: int) -> dict[str, torch.Tensor]:
        """{"image": [rows, D], and PATCH_KEY: [rows, P, W] when the head reads patch tokens}: each study's films
        through the tower, each film's vector (each patch token) L2-normalised, summed per study and normalised
        again (zeros without films)."""
        pixels, owner = batch.get("pixels"), batch.get("film_owner")
        if pixels is None or owner is None:
            raise RadalignError("this model trains the image tower: it scores films, not cached embeddings; give "
                                "it inputs from finetune.films (finetune predict/eval do for a tuned run)")
        if not len(pixels):
            return {k: torch.zeros(rows, *shape, device=pixels.device) for k, shape in self.token_shapes().items()}
        out = {}
        for key, emb in self._films(pixels).items():
            emb = F.normalize(emb.float(), dim=-1)  # [F, D] or [F, P, W]
            total = torch.zeros(rows, *emb.shape[1:], device=pixels.device)
            out[key] = F.normalize(total.index_add(0, owner.to(pixels.device), emb), dim=-1)  # sum per study
        return out  # normalise(mean) == normalise(sum); zero rows stay zero

    def token_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of one study's entries of image_tokens (no rows)."""
        image = self.head.encoders["image"]
        if not self.reads_patches:
            return {"image": (image.d_in,)}
        return {"image": (self.tower.output_dim,), PATCH_KEY: (image.n_tokens, image.d_in)}  # an open_clip ViT

    def forward(self, batch: Mapping, present_override=None):
        if "image" in self.modalities:
            rows = len(next(iter(batch["present"].values())))
            batch = {**batch, **self.image_tokens(batch, rows)}
        if present_override is not None:
            return self.head(batch, present_override=present_override)
        return self.head(batch)


@torch.no_grad()
def study_tokens(model: TunedModel, data, batch_size: int = 2048):
    """`data` (finetune.films.FilmInputs) with `image` = the model's study tokens [N, D] (and `patches` [N, P, W]
    for a head that reads patch tokens): the tower runs once per film, and every score of the split
    (predictions, each degradation condition, explain's coalitions) then runs the head only, as on a frozen run's
    embeddings. A split already holding this tower's tokens is returned as is.
    Rows are batched as registry.logits_on batches them, so the tokens are the ones a full forward computes."""
    if getattr(data, "tokens_of", None) is model.tower:
        return data
    was = model.training
    model.eval()
    parts = [{k: v.float().cpu().numpy() for k, v in model.image_tokens(  # numpy per chunk: P x W floats a study
        data.film_batch(np.arange(i, min(i + batch_size, len(data)))), min(batch_size, len(data) - i)).items()}
        for i in range(0, len(data), batch_size)]
    model.train(was)
    tokens = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros((0, *shape), np.float32)
              for k, shape in model.token_shapes().items()}
    return data.with_tokens(tokens["image"], model.tower, patches=tokens.get(PATCH_KEY))


def _drop_frozen(module: TunedModel, state: dict, prefix: str, local_metadata) -> None:
    for k in module.frozen_keys:
        state.pop(prefix + k, None)


def _allow_frozen_missing(module: TunedModel, incompatible) -> None:
    keep = [k for k in incompatible.missing_keys if not any(k == f or k.endswith("." + f) for f in module.frozen_keys)]
    incompatible.missing_keys[:] = keep


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tower_spec(cfg, export_config: Mapping, export_path: str) -> dict:
    """The `tower` part of a tuned model's spec (finetune.registry): the mode, its options and the export it tunes
    (the checksum is checked whenever the model is built again; the path is where it was when first trained)."""
    m = cfg.model
    out = {"mode": m.image_tower, "export": str(export_path), "export_checksum": export_config.get("checksum")}
    if cfg.data.image_patch_tokens:  # only then: a pooled run's spec stays what earlier releases recorded
        out["patch_tokens"] = True
    if m.image_tower == "last_blocks":
        out["tune_blocks"] = m.tune_blocks
    else:
        out.update(lora_rank=m.lora_rank, lora_alpha=m.lora_alpha, lora_targets=list(m.lora_targets))
    return out


def _checksum_at(path) -> str | None:
    """The checksum in the config.json of the export at `path` (a run or export folder); None: no export there."""
    import json

    from radalign.pretrain.export import find_export

    try:
        return json.loads((find_export(path) / "config.json").read_text()).get("checksum")
    except (RadalignError, OSError, ValueError):
        return None


def find_tuned_export(tower: Mapping, checkpoint=None) -> Path:
    """The export folder a tuned tower was trained on: the run's current `data.checkpoint` when its checksum is
    `tower["export_checksum"]` (a run and its export copied or moved together), else the path recorded at
    training (`tower["export"]`); neither: one error naming both paths, the checksums found and the fix."""
    from radalign.pretrain.export import find_export

    want, found = tower["export_checksum"], []
    for where, path in (("the run's data.checkpoint", checkpoint), ("the path recorded at training "
                                                                    "(spec.tower.export)", tower.get("export"))):
        if path is None:
            continue
        got = _checksum_at(path)
        if got is not None and got == want:
            return find_export(path)
        found.append(f"{where} {path} holds " + (f"export {got[:16]}" if got else "no export"))
    raise RadalignError(f"the tuned model was trained on export {str(want)[:16]} and its adapter / block weights "
                        f"fit that export only, but {' and '.join(found)}. Fix: copy that export beside the run and "
                        "point data.checkpoint in RUN/config.yaml at it (the export whose config.json has checksum "
                        f"{want}), or train again on this one")


def load_tuned_tower(tower: Mapping, device="cpu", checkpoint=None) -> nn.Module:
    """The export's image tower (found by find_tuned_export), made trainable per `tower`."""
    from radalign.pretrain.export import load_encoders

    enc = load_encoders(find_tuned_export(tower, checkpoint), device=device)  # verifies the weights' checksum
    return tune_tower(enc.model.visual, tower)


def patch_geometry(export_config: Mapping) -> list[int]:
    """[P, W] of the export's ViT patch tokens (P = the patch grid's cells, W = the width), from its model
    config with open_clip's defaults (CLIPVisionCfg): a tuned run has no patch cache to read the shape from.
    TunedModel checks it against the built tower before any film is read."""
    from open_clip.model import CLIPVisionCfg

    raw = (export_config.get("model_cfg") or {}).get("vision_cfg") or {}
    v = CLIPVisionCfg(**{k: x for k, x in raw.items() if k in CLIPVisionCfg.__dataclass_fields__})
    why = ("it is a timm model" if v.timm_model_name else "it pools by attention" if v.attentional_pool else
           f"its pool_type {v.pool_type!r} gives no patch tokens apart from the pooled one"
           if v.pool_type not in ("tok", "avg") else
           f"its patch_dropout {v.patch_dropout} drops patch tokens while the tower trains" if v.patch_dropout else
           None)
    if why:
        raise RadalignError(f"data.image_patch_tokens with model.image_tower: the export's image tower "
                            f"({export_config.get('model_name')}) has no fixed set of patch tokens to train "
                            f"through: {why}. Use data.image_patch_tokens=false (the pooled embedding), or "
                            "model.image_tower=frozen")
    size = v.image_size if isinstance(v.image_size, (list, tuple)) else (v.image_size, v.image_size)
    patch = v.patch_size if isinstance(v.patch_size, (list, tuple)) else (v.patch_size, v.patch_size)
    return [(int(size[0]) // int(patch[0])) * (int(size[1]) // int(patch[1])), int(v.width)]


def _check_patch_shape(tower: nn.Module, head_input: nn.Module) -> None:
    """The built tower's patch tokens [P, W] against what the head was built to read (the spec's image_patches)."""
    grid = getattr(tower, "grid_size", None)
    width = getattr(getattr(tower, "transformer", None), "width", None)
    have = (int(np.prod(grid)), int(width)) if grid is not None and width is not None else None
    if have != (head_input.n_tokens, head_input.d_in):
        raise RadalignError(f"data.image_patch_tokens: the tuned tower gives patch tokens {have} [P, W], the head "
                            f"reads [{head_input.n_tokens}, {head_input.d_in}] (spec image_patches): the run's "
                            "spec was made for another export; train the run again on this one")


def recorded_export(run_dir, checksum: str | None) -> str | None:
    """The export path a run folder's tuned model (finished, or its checkpoints) recorded for export `checksum`:
    a run whose export moved keeps its recorded spec, so its finished model is reused, not "changed"."""
    import json

    for f in (Path(run_dir) / "models" / "fusion.json", Path(run_dir) / "train" / "fusion" / "spec.json"):
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        tower = (doc.get("spec", doc) if isinstance(doc, dict) else {}).get("tower") or {}
        if tower.get("export_checksum") == checksum and tower.get("export"):
            return str(tower["export"])
    return None


def tuned_specs(run, specs: Mapping[str, dict]) -> dict[str, dict]:
    """A run's model specs (finetune.registry.model_specs) when its image tower trains: the fusion model becomes
    the tuned kind; the models that read the frozen image embedding (fusion_no_dropout, image_only,
    early_fusion) are left out, the text / EHR baselines stay."""
    from radalign.pretrain.export import find_export

    checksum = run.export_config.get("checksum")
    export = recorded_export(run.run_dir, checksum) or str(find_export(run.cfg.data.checkpoint).resolve())
    fusion = {**specs["fusion"], "kind": TUNED_KIND, "image_dim": int(run.export_config["embed_dim"]),
              "tower": tower_spec(run.cfg, run.export_config, export)}
    if run.cfg.data.image_patch_tokens:
        fusion["image_patches"] = patch_geometry(run.export_config)
    return {"fusion": fusion, **{n: s for n, s in specs.items() if "image" not in s["modalities"]}}

"""The export: trained image and text encoders as safetensors + a JSON config + the tokenizer.

Later stages (zeroshot, retrieval, finetune) load encoders through `load_encoders` only; they never import the
training recipe or Accelerate. `path` may be a run folder (its `export/` is used) or an export folder.

Layout of an export folder:
    config.json                 format, model config, embed dim, image size, mean/std, logit scale, checksums
    image_encoder.safetensors   the vision tower (`visual.*` of the open_clip model, prefix stripped)
    text_encoder.safetensors    everything else except the logit scale/bias
    tokenizer/                  Hugging Face tokenizer + config, for HF text towers only
    MODEL_CARD.md               generated from what the run recorded (pretrain/formats/card.py)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from radalign.pretrain.files import FORMAT, IMAGE_FILE, LOCAL_TOKENIZER, TEXT_FILE, TOKENIZER_DIR, localise
from safetensors.torch import load_file, save_file
from torch import nn

from radalign import RadalignError
from radalign.io import atomic_path, sha256_file
from radalign.log import get_logger

log = get_logger(__name__)


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def image_size_of(model_cfg: dict) -> int:
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _split_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, float]:
    image, text = {}, {}
    logit_scale = 1.0 / 0.07
    for key, value in state.items():
        value = value.detach().to("cpu", torch.float32).contiguous()
        if key.startswith("visual."):
            image[key[len("visual."):]] = value
        elif key == "logit_scale":
            logit_scale = float(value.exp().reshape(-1)[0])
        elif key == "logit_bias":
            continue
        else:
            text[key] = value
    return image, text, logit_scale


def _combined_checksum(folder: Path) -> str:
    h = hashlib.sha256()
    for name in (IMAGE_FILE, TEXT_FILE):
        h.update(sha256_file(folder / name).encode())
    return h.hexdigest()


def _save_hf_tokenizer(model_cfg: dict, model: nn.Module, folder: Path) -> dict:
    """HF towers: save tokenizer + transformer config inside the export, so loading needs no hub."""
    text_cfg = model_cfg.get("text_cfg", {})
    if not text_cfg.get("hf_model_name"):
        return model_cfg
    from radalign.pretrain.models import build_tokenizer

    build_tokenizer(model_cfg).save_pretrained(str(folder / TOKENIZER_DIR))
    model.text.transformer.config.save_pretrained(folder / TOKENIZER_DIR)
    cfg = copy.deepcopy(model_cfg)
    cfg["text_cfg"]["hf_model_name"] = LOCAL_TOKENIZER
    cfg["text_cfg"]["hf_tokenizer_name"] = LOCAL_TOKENIZER
    cfg["text_cfg"]["hf_model_pretrained"] = False  # the weights are in text_encoder.safetensors
    return cfg


def export_encoders(model: nn.Module, model_cfg: dict, out_dir: str | os.PathLike, *,
                    state_dict: dict[str, torch.Tensor] | None = None,
                    mean=OPENAI_MEAN, std=OPENAI_STD, extra: dict | None = None) -> Path:
    """Write an export folder atomically. `state_dict` overrides `model.state_dict()` (e.g. ZeRO-3 gathered)."""
    out_dir = Path(out_dir)
    state = state_dict if state_dict is not None else model.state_dict()
    image, text, logit_scale = _split_state(state)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_file(image, str(tmp / IMAGE_FILE))
        save_file(text, str(tmp / TEXT_FILE))
        cfg = _save_hf_tokenizer(model_cfg, model, tmp)
        meta = {
            "format": FORMAT,
            "model_cfg": cfg,
            "embed_dim": int(model_cfg["embed_dim"]),
            "image_size": image_size_of(model_cfg),
            "mean": list(mean),
            "std": list(std),
            "logit_scale": logit_scale,
            "checksum": _combined_checksum(tmp),
            **(extra or {}),
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        write_model_card(tmp, run_dir_of(out_dir))
    return out_dir


def run_dir_of(export_folder: str | os.PathLike) -> Path | None:
    """The pretrain run an export folder belongs to (RUN/export with RUN/config.yaml), else None."""
    folder = Path(export_folder)
    run = folder.parent
    return run if folder.name == "export" and (run / "config.yaml").is_file() else None


def write_model_card(export_folder: Path, run_dir: Path | None, out: Path | None = None, **options) -> Path:
    """MODEL_CARD.md from what the run recorded (pretrain/formats/card.py), into `out` (default: the export).

    A card that cannot be built never costs the export: the reason is logged and written in its place."""
    from radalign.pretrain.formats import card

    out = out or export_folder / card.CARD_FILE
    try:
        text = card.render(card.gather(export_folder, run_dir=run_dir, **options))
    except Exception as e:  # noqa: BLE001 - the weights are written; say what the card could not read
        log.warning(f"model card: {type(e).__name__}: {e}")
        text = f"# Model card\n\nNot generated: {card.md(f'{type(e).__name__}: {e}')}\n"
    out.write_text(text, encoding="utf-8")
    return out


def find_export(path: str | os.PathLike, what: str = "--checkpoint") -> Path:
    """A run folder (uses RUN/export) or an export folder; a clear error (naming the option `what`) otherwise."""
    path = Path(path)
    for cand in (path, path / "export"):
        cfg = cand / "config.json"
        if cfg.is_file():
            try:
                doc = json.loads(cfg.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RadalignError(f"{cfg}: corrupt export config ({e}); re-export the run") from None
            if isinstance(doc, dict) and doc.get("format") == FORMAT:  # another tool's config.json: not ours
                return cand
    raise RadalignError(
        f"{what} {path}: not a radalign export or run folder (looked for {path}/config.json and "
        f"{path}/export/config.json with format {FORMAT}). Pass the run_dir of `radalign pretrain` "
        "or its export/ folder.")


class Encoders(nn.Module):
    """Image and text encoders of an export, for inference. Outputs are L2-normalised float32."""

    def __init__(self, model: nn.Module, tokenizer, meta: dict, folder: Path | None = None):
        super().__init__()
        self.model = model.eval()
        self._tokenizer = tokenizer
        self.config = meta
        self.folder = folder
        self.embed_dim: int = meta["embed_dim"]
        self.image_size: int = meta["image_size"]
        self.checksum: str = meta["checksum"]
        self.logit_scale: float = meta["logit_scale"]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_transform(self):
        """PIL image (any mode) -> [3, S, S] float tensor, as the towers expect."""
        from radalign.data.transforms import eval_transform

        return eval_transform(self.image_size, channels=3, mean=self.config["mean"], std=self.config["std"])

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(list(texts))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.model.encode_image(images.to(self.device))  # [B, D]
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        if isinstance(texts, str):
            raise RadalignError("encode_texts expects a list of strings, got one string; wrap it in a list")
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[i:i + batch_size]).to(self.device)  # [b, L]
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        if not out:
            return torch.zeros(0, self.embed_dim)
        return torch.cat(out)  # [N, D]


def load_encoders(path: str | os.PathLike, device: str | torch.device = "cpu",
                  verify: bool = True) -> Encoders:
    """Load an export (or a run folder's export) without Accelerate or the training recipe."""
    from radalign.pretrain.models import build_model, build_tokenizer

    folder = find_export(path)
    meta = json.loads((folder / "config.json").read_text())
    for name in (IMAGE_FILE, TEXT_FILE):
        if not (folder / name).is_file():
            raise RadalignError(f"{folder / name}: missing from the export; re-export the run")
    if verify and _combined_checksum(folder) != meta["checksum"]:
        raise RadalignError(f"{folder}: weight files do not match the checksum in config.json "
                            "(corrupt or modified export); re-export the run")
    model_cfg = localise(meta["model_cfg"], folder)
    model = build_model(model_cfg)
    state = {f"visual.{k}": v for k, v in load_file(str(folder / IMAGE_FILE)).items()}
    state.update(load_file(str(folder / TEXT_FILE)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in ("logit_scale", "logit_bias")]
    if missing or unexpected:
        raise RadalignError(f"{folder}: weights do not fit model config (missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}); the export is from another architecture")
    with torch.no_grad():
        model.logit_scale.fill_(float(torch.log(torch.tensor(meta["logit_scale"]))))
    return Encoders(model.to(device), build_tokenizer(model_cfg), meta, folder)

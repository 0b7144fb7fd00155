"""`radalign export`: a pretrain run (or its export) in the layout of open_clip, transformers or ONNX.

    cfg = ExportConfig(source="runs/demo/pretrain", format="open_clip", out="share/open_clip")
    out = run_export(cfg)     # OUT/ in the target's layout + export.json + MODEL_CARD.md, written atomically

Every export is checked before it is kept: the folder is loaded back through the target library's own loader
(open_clip, transformers, onnxruntime) and must give the embeddings radalign's loader gives for the same images
and texts (max abs difference <= 1e-5 in fp32, 1e-4 through onnxruntime); the measured differences are recorded
in export.json. The writers live in pretrain/formats/.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from radalign import RadalignError, __version__
from radalign.io import atomic_path
from radalign.lock import output_lock
from radalign.log import get_logger

log = get_logger(__name__)

EXPORT_JSON = "export.json"
FORMAT = "radalign-share/1"
TOLERANCE = {"open_clip": 1e-5, "transformers": 1e-5, "onnx": 1e-4}


@dataclass
class ExportConfig:
    source: str = ""
    """A pretrain run folder (its export/ is used) or an export folder."""
    format: str = ""
    """Target layout: open_clip, transformers or onnx."""
    out: str = ""
    """Folder to write (refused when it exists and is not empty, unless overwrite)."""
    overwrite: bool = False
    """Replace an existing, non-empty `out` (the old folder stays until the new one is complete)."""
    opset: int = 17
    """ONNX opset version (recorded in export.json)."""
    verify: bool = True
    """Load the written folder back with the target library and compare embeddings with radalign's loader; a
    difference above the tolerance (1e-5 fp32, 1e-4 through onnxruntime) stops the export."""
    evals: list[str] = field(default_factory=list)
    """`radalign zeroshot` metrics.json files (or their folders) for the model card; the run's own and its
    siblings' zeroshot*/ folders are always searched. Only results made with these exact weights are used."""
    data_use: Optional[str] = None
    """Licence / data-use statement for the card. Default: from the training data (MIMIC-derived runs:
    "derived from credentialed data: share under the source's data use agreement")."""
    license: Optional[str] = None
    """Licence of the weights, for the card (default: as the data use allows)."""
    overlap_check: bool = True
    """Count the training split's patients found in validate/test (reads each shard's sample metadata)."""

    def validate(self) -> list[str]:
        from radalign.pretrain.formats import FORMATS

        p = []
        if self.format not in FORMATS:
            p.append(f"format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if not self.source:
            p.append("source: required; pass a pretrain run folder or an export folder")
        if not self.out:
            p.append("out: required; pass --out DIR")
        if not 9 <= self.opset <= 21:
            p.append(f"opset: {self.opset} is outside 9..21 (torch's ONNX exporter); 17 is a safe choice")
        return p


# ----------------------------------------------------------------------------------------------------------
# Writing


def _check_out(cfg: ExportConfig, source: Path) -> Path:
    out = Path(cfg.out)
    src = source.resolve()
    if out.resolve() == src or src in out.resolve().parents or out.resolve() in src.parents:
        raise RadalignError(f"--out {out}: inside (or around) the source export {source}; choose another folder")
    if out.exists() and not out.is_dir():
        raise RadalignError(f"--out {out} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise RadalignError(f"--out {out} exists and is not empty; pass --overwrite to replace it, or choose "
                            "another folder")
    return out


def _write_format(fmt: str, encoders, folder: Path, opset: int) -> dict:
    from radalign.pretrain.formats import hf, onnx_format, open_clip_format

    if fmt == "open_clip":
        return open_clip_format.write(encoders, folder)
    if fmt == "transformers":
        return hf.write(encoders, folder)
    return onnx_format.write(encoders, folder, opset=opset)


def _token_ids_equal(fmt: str, encoders, folder: Path, info: dict) -> bool | None:
    """The target's tokenizer gives radalign's ids for the sample reports (up to the end-of-text token for the
    BPE, whose two tokenizers pad differently; padding never reaches the embedding)."""
    from radalign.pretrain.formats import common

    if fmt != "transformers":
        return None
    from transformers import AutoTokenizer

    texts = list(common.SAMPLE_TEXTS)
    ours = encoders.tokenize(texts)  # [N, L]
    theirs = AutoTokenizer.from_pretrained(str(folder))(texts, padding="max_length", truncation=True,
                                                         max_length=info["context_length"], return_tensors="pt")
    theirs = theirs.input_ids
    if common.is_hf_text(encoders.config["model_cfg"]):
        return bool(torch.equal(ours, theirs))
    return all(torch.equal(a[: int((a == common.EOT_ID).nonzero()[0]) + 1], b[: int((b == common.EOT_ID).nonzero()[0]) + 1])
               for a, b in zip(ours, theirs))


def verify(fmt: str, encoders, folder: Path, info: dict) -> dict:
    """Embeddings of sample images and reports through the target library vs radalign's loader."""
    from radalign.pretrain.formats import common, hf, onnx_format, open_clip_format

    images, texts = common.sample_images(encoders), list(common.SAMPLE_TEXTS)
    ref_img, ref_txt = encoders.encode_images(images), encoders.encode_texts(texts)
    if fmt == "open_clip":
        img, txt = open_clip_format.embed(folder, images, texts)
    elif fmt == "transformers":
        img, txt = hf.embed(folder, images, texts, info["context_length"])
    else:
        img, txt = onnx_format.embed(folder, images, encoders.tokenize(texts))
    d_img, d_txt = float((img - ref_img).abs().max()), float((txt - ref_txt).abs().max())
    ids = _token_ids_equal(fmt, encoders, folder, info)
    report = {"images": len(images), "texts": len(texts), "max_abs_diff_image": d_img, "max_abs_diff_text": d_txt,
              "tolerance": TOLERANCE[fmt], "token_ids_equal": ids}
    if max(d_img, d_txt) > TOLERANCE[fmt] or ids is False:
        raise RadalignError(f"--format {fmt}: the written folder does not reproduce radalign's embeddings "
                            f"(max abs difference image {d_img:.2e}, text {d_txt:.2e}, tolerance {TOLERANCE[fmt]:.0e}; "
                            f"token ids equal: {ids}); nothing was kept. Please report this with the model config")
    return report


def _card_text(cfg: ExportConfig, source: Path, fmt_line: str) -> str:
    from radalign.pretrain.export import run_dir_of
    from radalign.pretrain.formats import card

    facts = card.gather(source, run_dir=run_dir_of(source), evals=[Path(p) for p in cfg.evals],
                        data_use=cfg.data_use, license=cfg.license, overlap=cfg.overlap_check)
    return card.render(facts, extra=["## This folder", "", fmt_line, ""])


def run_export(cfg: ExportConfig) -> Path:
    """Write `cfg.out` in the target layout; returns it. See the module docstring."""
    from radalign.pretrain.export import find_export, load_encoders
    from radalign.pretrain.formats import card, open_clip_format

    problems = cfg.validate()
    if problems:
        from radalign.config import ConfigError

        raise ConfigError(problems, source="export options")
    source = find_export(cfg.source, what="RUN_OR_EXPORT")
    out = _check_out(cfg, source)
    encoders = load_encoders(source)  # verifies the weights against the export's checksum
    t0 = time.perf_counter()
    with output_lock(out, what="--out"), atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        info = _write_format(cfg.format, encoders, tmp, cfg.opset)
        checked = verify(cfg.format, encoders, tmp, info) if cfg.verify else {"skipped": "verify=false"}
        if cfg.format == "open_clip":
            open_clip_format.relocate(tmp, out)  # HF towers: the config names the folder's final path
        record = {"format": FORMAT, "target": cfg.format, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "radalign_version": __version__,
                  "source": {"path": str(source.resolve()), "checksum": encoders.checksum,
                             "model_name": encoders.config.get("model_name"),
                             "trained_steps": encoders.config.get("trained_steps")},
                  "details": info, "verified": checked, "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / EXPORT_JSON).write_text(json.dumps(record, indent=2) + "\n")
        line = (f"Format {card.md(cfg.format)}; round trip through the target library: "
                + (f"max abs difference image {checked['max_abs_diff_image']:.1e}, text "
                   f"{checked['max_abs_diff_text']:.1e} (tolerance {checked['tolerance']:.0e})."
                   if cfg.verify else "not checked (verify=false)."))
        (tmp / card.CARD_FILE).write_text(_card_text(cfg, source, line), encoding="utf-8")
    log.info(f"export {cfg.format} written to {out} ({record['seconds']} s)")
    return out


__all__ = ["ExportConfig", "run_export", "verify", "EXPORT_JSON"]

"""ONNX format: the image encoder and the text encoder as two graphs, for search services that do not run torch.

    image_encoder.onnx   pixel_values [B, 3, S, S] float32 (preprocessed) -> image_embeds [B, D], L2-normalised
    text_encoder.onnx    input_ids [B, L] int64 (tokenized, L = context length) -> text_embeds [B, D], L2-normalised
    tokenizer/           the tokenizer files (tokenizer.json loads with the `tokenizers` package alone)
    export.json          opset, inputs and outputs, preprocessing (size, mean, std, resize rule), pad id

Exported with torch's TorchScript-based exporter (`dynamo=False`: the dynamo exporter needs onnxscript, which
radalign does not depend on); the batch axis is dynamic. Run with onnxruntime:
    sess = onnxruntime.InferenceSession("OUT/image_encoder.onnx"); sess.run(None, {"pixel_values": x})
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from radalign.pretrain.export import Encoders
from radalign.pretrain.formats import common
from torch import nn

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
TOKENIZER_DIR = "tokenizer"
DEFAULT_OPSET = 17


class _Graph(nn.Module):
    """One tower as a graph: `encode_image` or `encode_text` of the open_clip model, L2-normalised [B, D]."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(getattr(self.model, self.method)(x), dim=-1)  # [B, D]


def _export(module: nn.Module, example: torch.Tensor, path: Path, names: tuple[str, str], opset: int) -> None:
    # nn.MultiheadAttention's fused inference path (`_native_multi_head_attention`) has no ONNX symbolic; the
    # plain path computes the same attention from exportable ops.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about python ints in shape code: shapes are static
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[names[0]], output_names=[names[1]],
                              dynamic_axes={names[0]: {0: "batch"}, names[1]: {0: "batch"}})
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def write(encoders: Encoders, folder: Path, opset: int = DEFAULT_OPSET) -> dict:
    """Write both graphs, the tokenizer and the recorded settings into `folder`; returns export.json's entry."""
    import onnx

    model, cfg = encoders.model.eval(), encoders.config["model_cfg"]
    ctx = int(cfg["text_cfg"].get("context_length", 77))
    images = common.sample_images(encoders, n=2)
    tokens = encoders.tokenize(list(common.SAMPLE_TEXTS[:2]))  # [2, L]
    with torch.no_grad():  # wrappers in eval mode: the exporter restores each module's mode to the wrapper's
        _export(_Graph(model, "encode_image").eval(), images, folder / IMAGE_FILE, ("pixel_values", "image_embeds"),
                opset)
        _export(_Graph(model, "encode_text").eval(), tokens, folder / TEXT_FILE, ("input_ids", "text_embeds"), opset)
    for name in (IMAGE_FILE, TEXT_FILE):
        onnx.checker.check_model(str(folder / name))
    tok = folder / TOKENIZER_DIR
    tok.mkdir()
    if common.is_hf_text(cfg):
        common.copy_hf_tokenizer(encoders, tok)
        pad = encoders.model.text.config.pad_token_id
    else:
        common.write_bpe_tokenizer(tok, ctx)
        pad = 0
    return {"opset": opset, "exporter": f"torch.onnx.export (TorchScript, torch {torch.__version__})",
            "image": {"file": IMAGE_FILE, "input": "pixel_values", "shape": ["batch", 3, encoders.image_size,
                      encoders.image_size], "dtype": "float32", "output": "image_embeds", "normalised": True,
                      "preprocess": common.preprocess_cfg(encoders)},
            "text": {"file": TEXT_FILE, "input": "input_ids", "shape": ["batch", ctx], "dtype": "int64",
                     "output": "text_embeds", "normalised": True, "tokenizer": TOKENIZER_DIR, "pad_id": pad,
                     "context_length": ctx},
            "embed_dim": encoders.embed_dim}


def embed(folder: Path, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings through onnxruntime (CPU) from preprocessed images and token ids."""
    import onnxruntime as ort

    out = []
    for name, x in ((IMAGE_FILE, images.numpy().astype(np.float32)), (TEXT_FILE, tokens.numpy().astype(np.int64))):
        sess = ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
        out.append(torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x})[0]))
    return out[0], out[1]

"""A VisionTextDualEncoderModel whose text side pools and projects as open_clip's Hugging Face text tower does.

Shipped beside the weights of a `radalign export --format transformers` folder when the text tower cannot be
expressed by transformers' own VisionTextDualEncoderModel (that class takes the BERT pooler output and one linear
projection; radalign towers may pool the [CLS] hidden state or the mean of the tokens, and project with a 2-layer
MLP). Loaded by `AutoModel.from_pretrained(folder, trust_remote_code=True)`.

Self-contained on purpose: it imports torch and transformers only, never radalign.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, VisionTextDualEncoderConfig, VisionTextDualEncoderModel
from transformers.models.clip.modeling_clip import CLIPOutput

# open_clip's MaxPooler fails on its own integer attention mask, so no radalign tower pools with it.
POOLERS = ("cls_pooler", "cls_last_hidden_state_pooler", "mean_pooler")
PROJECTIONS = ("linear", "mlp", "none")


class RadalignDualEncoderConfig(VisionTextDualEncoderConfig):
    """VisionTextDualEncoderConfig plus `text_pooler` (one of POOLERS) and `text_proj` (one of PROJECTIONS)."""

    model_type = "radalign-dual-encoder"


def _pool(kind: str, out, mask: torch.Tensor) -> torch.Tensor:
    """open_clip's HF poolers (open_clip/hf_model.py): [B, L, H] hidden states -> [B, H]."""
    hidden = out.last_hidden_state
    if kind == "cls_pooler" and getattr(out, "pooler_output", None) is not None:
        return out.pooler_output
    if kind in ("cls_pooler", "cls_last_hidden_state_pooler"):
        return hidden[:, 0, :]
    masked = hidden * mask.unsqueeze(-1)  # mean_pooler
    return masked.sum(dim=1) / mask.sum(-1, keepdim=True)


class RadalignDualEncoderModel(VisionTextDualEncoderModel):
    config_class = RadalignDualEncoderConfig

    def __init__(self, config, vision_model=None, text_model=None):
        pooler = getattr(config, "text_pooler", "cls_pooler")
        proj = getattr(config, "text_proj", "linear")
        if pooler not in POOLERS or proj not in PROJECTIONS:
            raise ValueError(f"text_pooler={pooler!r} / text_proj={proj!r}: expected one of {POOLERS} / {PROJECTIONS}")
        if text_model is None:  # the pooling layer exists only where the pooler uses it (as in open_clip)
            text_model = AutoModel.from_config(config.text_config, add_pooling_layer=pooler == "cls_pooler")
        super().__init__(config, vision_model=vision_model, text_model=text_model)
        width, dim = config.text_config.hidden_size, config.projection_dim
        if proj == "mlp":
            hidden = (width + dim) // 2
            self.text_projection = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(),
                                                 nn.Linear(hidden, dim, bias=False))
        elif proj == "none":
            self.text_projection = nn.Identity()

    def get_text_features(self, input_ids, attention_mask=None, position_ids=None, token_type_ids=None, **kwargs):
        if attention_mask is None:  # open_clip masks the pad id
            attention_mask = (input_ids != self.config.text_config.pad_token_id).long()
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              token_type_ids=token_type_ids, return_dict=True)
        out.pooler_output = self.text_projection(_pool(self.config.text_pooler, out, attention_mask))
        return out

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                return_loss=None, token_type_ids=None, **kwargs):
        image = self.get_image_features(pixel_values=pixel_values).pooler_output  # [B, D]
        text = self.get_text_features(input_ids, attention_mask, position_ids, token_type_ids).pooler_output
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        logits_per_text = text @ image.t() * self.logit_scale.exp()  # [T, B]
        loss = None
        if return_loss:
            labels = torch.arange(len(logits_per_text), device=logits_per_text.device)
            loss = (nn.functional.cross_entropy(logits_per_text, labels)
                    + nn.functional.cross_entropy(logits_per_text.t(), labels)) / 2
        return CLIPOutput(loss=loss, logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
                          text_embeds=text, image_embeds=image)

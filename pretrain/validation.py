"""Validation during pretraining: image<->report recall and a quick zero-shot AUROC.

Positives for recall follow CLIP_benchmark's rule extended to MIMIC: every image of the same study and every
report whose normalised text is identical count as a hit; recall is `radalign.metrics.recall_at_k` (the one
definition retrieval uses too). The zero-shot check uses a minimal built-in prompt set
(positive vs negative prompt per finding); `radalign zeroshot` is the full, statistically careful evaluation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from radalign.data.text import text_id

from radalign.metrics import auroc, recall_at_k

# One positive and one negative phrasing per finding, in report language.
QUICK_PROMPTS: dict[str, tuple[str, str]] = {
    "Cardiomegaly": ("Cardiomegaly.", "Heart size is normal."),
    "Pleural Effusion": ("Pleural effusion.", "No pleural effusion."),
    "Pneumothorax": ("Pneumothorax.", "No pneumothorax."),
    "Edema": ("Pulmonary edema.", "No pulmonary edema."),
    "Consolidation": ("Focal consolidation.", "No focal consolidation."),
    "Atelectasis": ("Atelectasis.", "No atelectasis."),
    "Support Devices": ("Support devices in place.", "No lines or tubes."),
}


@torch.no_grad()
def embed_part(net, tokenizer, shards_root, split, transform, *, batch_size: int, max_samples: int, device,
               rank: int = 0, world_size: int = 1) -> dict:
    """Embed this process's share of a split with `net` (a plain module: `radalign.training.eval_module`).

    Images go through the shared pass (`data.embed.embed_split`: manifest-checked, lost samples counted and
    logged); the reports it returns are then encoded in batches of `batch_size`. No distribution here: the
    recipe gathers the parts (`radalign.training.gather_to_main`) and calls `merge_parts` on rank 0.
    """
    from radalign.data.embed import embed_split

    def encode_images(x: torch.Tensor) -> torch.Tensor:  # [b, C, H, W] -> [b, D]
        return net(image=x.to(device))["image_features"]

    cap = max(1, max_samples // world_size)
    emb = embed_split(encode_images, shards_root, split, transform, batch_size=batch_size, num_workers=0,
                      max_samples=cap, rank=rank, world_size=world_size)
    txt = [F.normalize(net(text=tokenizer(emb.texts[i:i + batch_size]).to(device))["text_features"].float(),
                       dim=-1).cpu() for i in range(0, len(emb.texts), batch_size)]  # [b, D] each
    return {"img": torch.from_numpy(emb.image), "txt": torch.cat(txt),
            "study_id": [m["study_id"] for m in emb.meta], "text_id": [text_id(t) for t in emb.texts],
            "labels": [m.get("labels", {}) for m in emb.meta], "pass": emb}


def cache_final_pass(emb, export_folder, shards_root, split: str, transform, compute: str) -> bool:
    """Keep the final validation's image pass (`embed_part(...)["pass"]`, one process, not cut by max_samples) in
    the export's embedding cache (`data.embed.EmbedCache`), so zero-shot and finetune read that split instead of
    embedding it again. Only right after the export: the weights that embedded it are the exported ones.
    `compute`: "<device>-<precision>" of the pass (a bf16 pass is never served to the fp32 encoders)."""
    import json
    from pathlib import Path

    from radalign.data.embed import CacheEntry, EmbedCache

    if emb is None or emb.capped:
        return False
    checksum = json.loads((Path(export_folder) / "config.json").read_text())["checksum"]
    cache = EmbedCache.at(export_folder, checksum, compute)
    entry = CacheEntry.find(cache, shards_root, split, transform) if cache is not None else None
    if entry is None:
        return False
    entry.store(emb, None)
    return True


def merge_parts(parts: list[dict]) -> dict | None:
    """One embedding set from the per-process parts (None when all are empty; each part's "pass" is left out)."""
    parts = [p for p in parts if len(p["study_id"])]
    if not parts:
        return None
    return {"img": torch.cat([p["img"] for p in parts]), "txt": torch.cat([p["txt"] for p in parts]),
            "study_id": sum((p["study_id"] for p in parts), []), "text_id": sum((p["text_id"] for p in parts), []),
            "labels": sum((p["labels"] for p in parts), [])}


def positives_matrix(study_id: list, text_ids: list) -> torch.Tensor:
    """[N, N] bool: i and j are a positive pair (same study, or identical normalised report)."""
    s = torch.tensor([hash(x) for x in study_id])
    t = torch.tensor(text_ids)
    return (s[:, None] == s[None, :]) | (t[:, None] == t[None, :])


def retrieval_recall(emb: dict) -> dict[str, float]:
    pos = positives_matrix(emb["study_id"], emb["text_id"])
    sim = emb["img"] @ emb["txt"].T  # [N, N]
    out = {f"i2t_R@{k}": v for k, v in recall_at_k(sim, pos).items()}
    out.update({f"t2i_R@{k}": v for k, v in recall_at_k(sim.T, pos.T).items()})
    return out


@torch.no_grad()
def zero_shot_auroc(emb: dict, model, tokenizer, logit_scale: float | None = None) -> dict[str, float]:
    """Macro AUROC of P(positive prompt) per finding; the softmax uses `logit_scale` (default: the model's
    learned scale, exp(model.logit_scale)); a fixed 100 saturates float32 and ties most scores at 1.0."""
    if logit_scale is None:
        logit_scale = float(model.logit_scale.detach().exp().reshape(-1)[0])
    device = next(model.parameters()).device
    names = list(QUICK_PROMPTS)
    prompts = [p for n in names for p in QUICK_PROMPTS[n]]
    out = model(text=tokenizer(prompts).to(device))
    t = F.normalize(out["text_features"].float(), dim=-1).cpu().view(len(names), 2, -1)  # [C, 2, D]
    logits = logit_scale * torch.einsum("nd,cpd->ncp", emb["img"], t)  # [N, C, 2]
    prob = logits.softmax(dim=-1)[..., 0].numpy()  # [N, C] P(positive prompt)
    result, aucs = {}, []
    for c, name in enumerate(names):
        y = np.array([lab.get(name) if lab.get(name) in (0, 1) else -1 for lab in emb["labels"]])
        keep = y >= 0
        if keep.sum() and 0 < y[keep].sum() < keep.sum():
            auc = auroc(y[keep], prob[keep, c])
            result[f"auroc/{name}"] = auc
            aucs.append(auc)
    if aucs:
        result["zeroshot_macro_auroc"] = float(np.mean(aucs))
    return result

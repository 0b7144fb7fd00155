"""Validation during pretraining: image<->report recall and a quick zero-shot AUROC.

Positives for recall follow CLIP_benchmark's rule extended to MIMIC: every image of the same study and every
report whose normalised text is identical count as a hit. The zero-shot check uses a minimal built-in prompt set
(positive vs negative prompt per finding); `radalign zeroshot` is the full, statistically careful evaluation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from data.text import text_id

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


def _core(accelerator, model):
    """The module to run forward on: the engine under ZeRO-3 (partitioned params), else the plain module
    (DDP forward would broadcast buffers, a collective that hangs when ranks have unequal batch counts)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        return model
    return accelerator.unwrap_model(model)


@torch.no_grad()
def embed_split(accelerator, model, tokenizer, shards_root, split, transform, *, batch_size: int,
                max_samples: int) -> dict | None:
    """Embed a split (each process its share), gather to rank 0. Returns None on other ranks."""
    from data.loader import make_eval_loader, shard_paths

    shards = shard_paths(shards_root, split)
    world, rank = accelerator.num_processes, accelerator.process_index
    loader = make_eval_loader(shards, batch_size=batch_size, transform=transform, num_workers=0,
                              rank=rank, world_size=world)
    net = _core(accelerator, model)
    img, txt, sid, tid, labels = [], [], [], [], []
    cap = max(1, max_samples // world)
    for batch in loader:
        if sum(len(x) for x in img) >= cap:
            break
        out = net(batch["image"].to(accelerator.device), tokenizer(batch["text"]).to(accelerator.device))
        img.append(F.normalize(out["image_features"].float(), dim=-1).cpu())  # [b, D]
        txt.append(F.normalize(out["text_features"].float(), dim=-1).cpu())  # [b, D]
        sid += [m["study_id"] for m in batch["meta"]]
        tid += [text_id(t) for t in batch["text"]]
        labels += [m.get("labels", {}) for m in batch["meta"]]
    part = {"img": torch.cat(img) if img else torch.zeros(0, 1), "txt": torch.cat(txt) if txt else torch.zeros(0, 1),
            "study_id": sid, "text_id": tid, "labels": labels}
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, part)
    else:
        parts = [part]
    if not accelerator.is_main_process:
        return None
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


def recall_at_k(sim: torch.Tensor, pos: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Share of queries (rows) with at least one positive among their top-k columns."""
    order = sim.argsort(dim=1, descending=True)  # [N, N]
    hits = torch.gather(pos, 1, order)  # [N, N] positive flags in rank order
    return {f"R@{k}": float(hits[:, :k].any(dim=1).float().mean()) for k in ks}


def retrieval_recall(emb: dict) -> dict[str, float]:
    pos = positives_matrix(emb["study_id"], emb["text_id"])
    sim = emb["img"] @ emb["txt"].T  # [N, N]
    out = {f"i2t_{k}": v for k, v in recall_at_k(sim, pos).items()}
    out.update({f"t2i_{k}": v for k, v in recall_at_k(sim.T, pos.T).items()})
    return out


@torch.no_grad()
def zero_shot_auroc(emb: dict, model, tokenizer) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    device = next(model.parameters()).device
    names = list(QUICK_PROMPTS)
    prompts = [p for n in names for p in QUICK_PROMPTS[n]]
    out = model(text=tokenizer(prompts).to(device))
    t = F.normalize(out["text_features"].float(), dim=-1).cpu().view(len(names), 2, -1)  # [C, 2, D]
    logits = 100.0 * torch.einsum("nd,cpd->ncp", emb["img"], t)  # [N, C, 2]
    prob = logits.softmax(dim=-1)[..., 0].numpy()  # [N, C] P(positive prompt)
    result, aucs = {}, []
    for c, name in enumerate(names):
        y = np.array([lab.get(name) if lab.get(name) in (0, 1) else -1 for lab in emb["labels"]])
        keep = y >= 0
        if keep.sum() and 0 < y[keep].sum() < keep.sum():
            auc = float(roc_auc_score(y[keep], prob[keep, c]))
            result[f"auroc/{name}"] = auc
            aucs.append(auc)
    if aucs:
        result["zeroshot_macro_auroc"] = float(np.mean(aucs))
    return result

"""`radalign retrieval eval`: cross-modal Recall@K and image-to-image label precision@K, each beside chance.

Cross-modal (within the query split, as CLIP_benchmark does): candidates are the split's images and its
distinct normalised reports. A candidate is a positive for a query when it belongs to the same study or its
normalised report equals the query's (`data.text.normalize_report`), so template reports ("No acute
cardiopulmonary process.") are not counted as misses.

Image-to-image (queries against the index's case base, through `Retriever.search_vectors`, the query's patient
excluded and studies de-duplicated): label precision@K = share of the K neighbours that carry at least one of
the query's positive labels, over queries with a positive label.

Chance levels are exact expectations under a random ranking:
    R@K   = 1 - C(M - P, K) / C(M, K)   for a query with P positives among M candidates (hypergeometric)
    P@K   = share of case-base studies carrying one of the query's positive labels (sampling without
            replacement keeps the expected share)
each averaged over the same queries as the metric.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy.special import gammaln

from data.text import normalize_report
from radalign.io import atomic_write_json
from radalign.log import get_logger
from retrieval.search import Retriever

log = get_logger("retrieval.eval")
KS = (1, 5, 10)


def chance_recall(num_pos: np.ndarray, m: int, k: int) -> np.ndarray:
    """P(at least one of P positives in a random top-k of M candidates), per query. [Q] -> [Q]."""
    num_pos = np.asarray(num_pos, dtype=np.float64)
    k = min(k, m)
    # log C(M-P, k) - log C(M, k); C(M-P, k) = 0 when M-P < k
    none = np.where(m - num_pos >= k,
                    np.exp(_log_comb(m - num_pos, k) - _log_comb(np.full_like(num_pos, m), k)), 0.0)
    return 1.0 - none


def _log_comb(n: np.ndarray, k: int) -> np.ndarray:
    n = np.maximum(n, k)
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def recall_at_ks(sim: np.ndarray, pos: np.ndarray, ks=KS) -> dict:
    """Recall@K (a positive in the top K) with chance, for similarities [Q, M] and a boolean positives mask."""
    order = np.argsort(-sim, axis=1, kind="stable")  # [Q, M]
    ranked_pos = np.take_along_axis(pos, order, axis=1)  # [Q, M]
    first = np.where(ranked_pos.any(1), ranked_pos.argmax(1), sim.shape[1])  # rank of the first positive [Q]
    num_pos = pos.sum(1)  # [Q]
    out = {}
    for k in ks:
        out[f"R@{k}"] = float(np.mean(first < k))
        out[f"R@{k}_chance"] = float(np.mean(chance_recall(num_pos, sim.shape[1], k)))
    out["queries"], out["candidates"] = int(sim.shape[0]), int(sim.shape[1])
    out["mean_positives"] = float(num_pos.mean())
    return out


def cross_modal(image_emb: np.ndarray, text_emb: np.ndarray, texts: list[str], studies: list,
                ks=KS) -> dict:
    """Image->report and report->image recall within one split. image_emb/text_emb: [N, D] per image row."""
    norm = [normalize_report(t) for t in texts]
    unique = list(dict.fromkeys(norm))  # distinct normalised reports = report candidates / queries
    u_index = {t: i for i, t in enumerate(unique)}
    first_row = {}
    for i, t in enumerate(norm):
        first_row.setdefault(t, i)
    reports = text_emb[[first_row[t] for t in unique]]  # [U, D]
    # Positives: image i <-> report u when u is i's own report or the report of any image of i's study.
    study_reports: dict = {}
    for s, t in zip(studies, norm):
        study_reports.setdefault(s, set()).add(u_index[t])
    pos = np.zeros((len(norm), len(unique)), dtype=bool)  # [N, U]
    for i, (s, t) in enumerate(zip(studies, norm)):
        pos[i, list(study_reports[s] | {u_index[t]})] = True
    sim = image_emb @ reports.T  # [N, U]
    return {"image_to_report": recall_at_ks(sim, pos, ks), "report_to_image": recall_at_ks(sim.T, pos.T, ks)}


def label_precision(retriever: Retriever, queries: np.ndarray, query_labels: np.ndarray, subjects: list,
                    ks=KS) -> dict:
    """Image->image label precision@K against the index, with chance. query_labels: [Q, L] 1/0/-1/NaN."""
    base = retriever.store.label_matrix() == 1  # [N, L]
    qpos = query_labels == 1  # [Q, L]
    has = qpos.any(1)
    if not has.any():
        return {"queries": 0, "note": "no query has a positive label"}
    kmax = min(max(ks), retriever.store.count)
    hits = retriever.search_vectors(queries[has], kmax, exclude_subjects=[str(s) for s in np.asarray(subjects)[has]])
    # Chance: a random case (study) of the base. One row per study so studies weigh as in de-duplicated results.
    studies = retriever.store.column("study_id")
    _, first = np.unique(studies, return_index=True)
    base_studies = base[first]  # [S, L]
    shares = (qpos[has].astype(np.float32) @ base_studies.T.astype(np.float32) > 0).mean(1)  # [Q']
    out: dict = {"queries": int(has.sum()), "skipped_no_positive_label": int((~has).sum())}
    for k in ks:
        prec = []
        for h, q in zip(hits, qpos[has]):
            rows = h.rows[:k]
            prec.append(float((base[rows] & q).any(1).mean()) if rows else 0.0)
        out[f"P@{k}"] = float(np.mean(prec))
        out[f"P@{k}_chance"] = float(shares.mean())
    return out


def evaluate(retriever: Retriever, data: str | os.PathLike, split: str = "test", *, out: str | os.PathLike | None,
             batch_size: int = 64, num_workers: int = 0, progress: bool = True, ks=KS) -> dict:
    """Embed the query split, score both tasks, write OUT/metrics.json; returns the metrics."""
    from retrieval.build import embed_shards

    enc = retriever.encoders
    cases = embed_shards(enc, data, split, batch_size=batch_size, num_workers=num_workers, thumbnail_size=0,
                         with_text=True, progress=progress, desc="queries")
    studies = [str(m.get("study_id")) for m in cases.metas]
    subjects = [str(m.get("subject_id")) for m in cases.metas]
    labels = np.array([[np.nan if (m.get("labels") or {}).get(n) is None else float(m["labels"][n])
                        for n in retriever.store.labels] for m in cases.metas], dtype=np.float32)  # [Q, L]
    metrics = {
        "index": str(retriever.store.path), "queries": {"data": str(Path(data).resolve()), "split": split,
                                                       "images": len(studies), "skipped": cases.skipped},
        **cross_modal(cases.image, cases.text, cases.texts, studies, ks),
        "image_to_image": label_precision(retriever, cases.image, labels, subjects, ks),
    }
    metrics["summary"] = {
        "image_to_report_R@10": metrics["image_to_report"]["R@10"],
        "image_to_report_R@10_chance": metrics["image_to_report"]["R@10_chance"],
        "report_to_image_R@10": metrics["report_to_image"]["R@10"],
        "label_P@5": metrics["image_to_image"].get("P@5"),
        "label_P@5_chance": metrics["image_to_image"].get("P@5_chance"),
    }
    if out:
        atomic_write_json(Path(out) / "metrics.json", metrics)
    return metrics


def format_metrics(m: dict, ks=KS) -> str:
    """The printed table: each number with its chance level beside it."""
    lines = [f"{'task':18s} " + "  ".join(f"{'@' + str(k):>17s}" for k in ks), ""]
    for task, key in (("image->report", "image_to_report"), ("report->image", "report_to_image")):
        r = m[key]
        lines.append(f"{task + ' R':18s} " + "  ".join(f"{r[f'R@{k}']:.3f} (chance {r[f'R@{k}_chance']:.3f})"
                                                         for k in ks) + f"   {r['queries']} queries")
    p = m["image_to_image"]
    if p.get("queries"):
        lines.append(f"{'image->image P':18s} " + "  ".join(f"{p[f'P@{k}']:.3f} (chance {p[f'P@{k}_chance']:.3f})"
                                                            for k in ks) + f"   {p['queries']} queries")
    return "\n".join(lines)


__all__ = ["evaluate", "cross_modal", "label_precision", "recall_at_ks", "chance_recall", "format_metrics", "KS"]

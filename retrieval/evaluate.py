"""`radalign retrieval eval`: cross-modal Recall@K and image-to-image label precision@K, each beside chance.

Cross-modal (within the query split, as CLIP_benchmark does): candidates are the split's images and its
distinct normalised reports. A candidate is a positive for a query when it belongs to the same study or its
normalised report equals the query's (`data.text.normalize_report`), so template reports ("No acute
cardiopulmonary process.") are not counted as misses.

Image-to-image (queries against the index's case base, through `Retriever.search_vectors`, the query's patient
excluded and studies de-duplicated): label precision@K = share of the K neighbours that carry at least one of
the query's positive labels, over queries with a positive label.

Recall@K is `radalign.metrics.recall_at_k` (the share of queries with at least one positive among their top K
candidates; pretrain validation uses the same function on its own candidate set, so compare values only with
the same candidates). Each metric comes with a patient-level bootstrap interval (`radalign.metrics.mean_ci`:
patients resampled, all their queries together); a report->image query (a distinct report) belongs to the
patient of its first image.

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
from radalign.data.text import normalize_report
from radalign.retrieval.search import Retriever
from scipy.special import gammaln

from radalign import metrics as rm
from radalign import report as R
from radalign.lock import output_lock
from radalign.log import get_logger

log = get_logger("retrieval.eval")
KS = (1, 5, 10)
METRICS_STAGE = "retrieval"  # metrics.json format: radalign-retrieval-metrics/1


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


RECALL_DEFINITION = "share of queries with at least one positive among their top K candidates"
PRECISION_DEFINITION = ("share of the K nearest cases (other patients, one image per study) carrying at least one "
                        "of the query's positive labels, averaged over queries with a positive label")


def _unit_info(patients, n_boot: int, seed: int, level: float) -> dict:
    if patients is None or n_boot < 1:
        return {"unit": None}
    return {"unit": rm.UNIT, "n_patients": len(set(patients)), "n_boot": n_boot, "seed": seed, "level": level}


def recall_at_ks(sim: np.ndarray, pos: np.ndarray, ks=KS, *, patients=None, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Recall@K (a positive in the top K) with chance, for similarities [Q, M] and a boolean positives mask.

    patients [Q]: the query's patient; given, each R@K gets a patient bootstrap interval (R@K_ci_low/high).
    """
    recall = rm.recall_at_k(sim, pos, ks)
    first = rm.first_positive_rank(sim, pos)  # [Q] per-query rank of the first positive
    num_pos = pos.sum(1)  # [Q]
    out: dict = {"definition": RECALL_DEFINITION}
    for k in ks:
        out[f"R@{k}"] = recall[k]
        out[f"R@{k}_chance"] = float(np.mean(chance_recall(num_pos, sim.shape[1], k)))
        hits = (first < k).astype(float)  # [Q]
        for end, v in rm.mean_interval(hits, patients, n_boot=n_boot, seed=seed, level=level).items():
            out[f"R@{k}_{end}"] = v
    out["queries"], out["candidates"] = int(sim.shape[0]), int(sim.shape[1])
    out["mean_positives"] = float(num_pos.mean())
    out.update(_unit_info(patients, n_boot, seed, level))
    return out


def cross_modal(image_emb: np.ndarray, text_emb: np.ndarray, texts: list[str], studies: list,
                ks=KS, *, subjects: list | None = None, n_boot: int = 1000, seed: int = 0,
                level: float = 0.95) -> dict:
    """Image->report and report->image recall within one split. image_emb/text_emb: [N, D] per image row.

    subjects [N]: each image's patient, for the patient bootstrap (None: no intervals)."""
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
    report_patients = [subjects[first_row[t]] for t in unique] if subjects is not None else None
    kw = dict(n_boot=n_boot, seed=seed, level=level)
    return {"image_to_report": recall_at_ks(sim, pos, ks, patients=subjects, **kw),
            "report_to_image": recall_at_ks(sim.T, pos.T, ks, patients=report_patients, **kw)}


def label_precision(retriever: Retriever, queries: np.ndarray, query_labels: np.ndarray, subjects: list,
                    ks=KS, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Image->image label precision@K against the index, with chance and a patient bootstrap interval.

    query_labels: [Q, L] 1/0/-1/NaN; subjects [Q]: each query's patient (left out of its neighbours, and the
    bootstrap unit). Exactly the K nearest remaining cases count, each study once."""
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
    out: dict = {"definition": PRECISION_DEFINITION, "queries": int(has.sum()),
                 "skipped_no_positive_label": int((~has).sum())}
    patients = [str(s) for s in np.asarray(subjects)[has]]
    for k in ks:
        prec = []
        for h, q in zip(hits, qpos[has]):
            rows = h.rows[:k]
            prec.append(float((base[rows] & q).any(1).mean()) if rows else 0.0)
        out[f"P@{k}"] = float(np.mean(prec))
        out[f"P@{k}_chance"] = float(shares.mean())
        for end, v in rm.mean_interval(prec, patients, n_boot=n_boot, seed=seed, level=level).items():
            out[f"P@{k}_{end}"] = v
    out.update(_unit_info(patients, n_boot, seed, level))
    return out


def evaluate(retriever: Retriever, data: str | os.PathLike, split: str = "test", *, out: str | os.PathLike | None,
             batch_size: int = 64, num_workers: int = 0, progress: bool = True, ks=KS, n_boot: int = 1000,
             seed: int = 0, level: float = 0.95) -> dict:
    """Embed the query split, score both tasks, write OUT/metrics.json (OUT locked); returns the metrics."""
    if out:
        with output_lock(out, what="--out"):
            return _evaluate(retriever, data, split, out=out, batch_size=batch_size, num_workers=num_workers,
                             progress=progress, ks=ks, n_boot=n_boot, seed=seed, level=level)
    return _evaluate(retriever, data, split, out=None, batch_size=batch_size, num_workers=num_workers,
                     progress=progress, ks=ks, n_boot=n_boot, seed=seed, level=level)


def _evaluate(retriever, data, split, *, out, batch_size, num_workers, progress, ks, n_boot, seed, level) -> dict:
    from radalign.retrieval.build import embed_shards

    enc = retriever.encoders
    cases = embed_shards(enc, data, split, batch_size=batch_size, num_workers=num_workers, thumbnail_size=0,
                         with_text=True, progress=progress, desc="queries")
    studies = [str(m.get("study_id")) for m in cases.meta]
    subjects = [str(m.get("subject_id")) for m in cases.meta]
    labels = np.array([[np.nan if (m.get("labels") or {}).get(n) is None else float(m["labels"][n])
                        for n in retriever.store.labels] for m in cases.meta], dtype=np.float32)  # [Q, L]
    kw = dict(n_boot=n_boot, seed=seed, level=level)
    metrics = {
        "index": str(retriever.store.path),
        "queries": {"data": str(Path(data).resolve()), "split": split, "images": len(studies),
                    "patients": len(set(subjects)), "expected": cases.expected, "lost": cases.lost,
                    "skipped": cases.lost, "texts_cut": cases.texts_cut},
        "bootstrap": {"unit": rm.UNIT, "n_patients": len(set(subjects)), "n_boot": n_boot, "seed": seed,
                      "level": level, "method": "percentile"},
        **cross_modal(cases.image, cases.text, cases.texts, studies, ks, subjects=subjects, **kw),
        "image_to_image": label_precision(retriever, cases.image, labels, subjects, ks, **kw),
    }
    i2r, r2i, i2i = metrics["image_to_report"], metrics["report_to_image"], metrics["image_to_image"]
    metrics["summary"] = {
        "image_to_report_R@10": i2r["R@10"],
        "image_to_report_R@10_chance": i2r["R@10_chance"],
        "image_to_report_R@10_ci": [i2r.get("R@10_ci_low"), i2r.get("R@10_ci_high")],
        "report_to_image_R@10": r2i["R@10"],
        "report_to_image_R@10_ci": [r2i.get("R@10_ci_low"), r2i.get("R@10_ci_high")],
        "label_P@5": i2i.get("P@5"),
        "label_P@5_chance": i2i.get("P@5_chance"),
        "label_P@5_ci": [i2i.get("P@5_ci_low"), i2i.get("P@5_ci_high")],
        "ci_unit": rm.UNIT, "ci_level": level,
    }
    if out:
        metrics = R.write_metrics(Path(out) / "metrics.json", metrics, stage=METRICS_STAGE,
                                  unit=rm.UNIT if n_boot >= 1 else None)
    return metrics


def _cell(r: dict, name: str) -> str:
    return f"{R.ci(r[name], r.get(f'{name}_ci_low'), r.get(f'{name}_ci_high'))} (chance {R.num(r[f'{name}_chance'])})"


def format_metrics(m: dict, ks=KS) -> str:
    """The printed table: each number with its patient-level interval and its chance level beside it."""
    lines = [f"{'task':18s} " + "  ".join(f"{'@' + str(k):>32s}" for k in ks), ""]
    for task, key in (("image->report", "image_to_report"), ("report->image", "report_to_image")):
        r = m[key]
        lines.append(f"{task + ' R':18s} " + "  ".join(_cell(r, f"R@{k}") for k in ks) + f"   {r['queries']} queries")
    p = m["image_to_image"]
    if p.get("queries"):
        lines.append(f"{'image->image P':18s} " + "  ".join(_cell(p, f"P@{k}") for k in ks)
                     + f"   {p['queries']} queries")
    b = m.get("bootstrap") or {}
    if b.get("unit"):
        lines += ["", f"[lo, hi]: {round(100 * b['level'])}% percentile bootstrap over patients ({b['n_patients']} "
                      f"patients resampled, all their queries together; {b['n_boot']} resamples, seed {b['seed']})"]
    lost = (m.get("queries") or {}).get("lost")
    if lost:
        lines.append(f"queries lost on read: {sum(lost.values())} ({', '.join(f'{k} {v}' for k, v in sorted(lost.items()))})")
    return "\n".join(lines)


__all__ = ["evaluate", "cross_modal", "label_precision", "recall_at_ks", "chance_recall", "format_metrics", "KS"]

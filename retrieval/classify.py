"""`radalign retrieval classify`: the FAISS index as a classifier (a similarity-weighted k-nearest-neighbour vote).

For each query image, the k nearest cases of the index (other patients only, one image per study:
`Retriever.search_vectors`), weighted by a softmax of their cosine similarities over the k:

    w_i = exp(s_i / T) / sum_j exp(s_j / T)             i, j over the query's k neighbours
    p(label) = sum_i w_i * v_i                          v_i = 1 when neighbour i carries the label, else 0

A neighbour carries a label when its value is 1 (an uncertain -1 counts as carrying it only with
`uncertain="positive"`; 0 and blank never do): the case base is voted on as the search explanation counts it.
T defaults to 0.07 with k = 20, the weighted k-NN classifier of Wu et al. 2018 that DINO (Caron et al. 2021)
uses to evaluate frozen embeddings; `val_split` instead picks T from a fixed grid by the mean binary log loss
on that split's queries (never on the scored split). A query left with no neighbour (its patient fills the
whole index) gets the index's prevalence and is counted.

The probabilities are scored like prompt zero-shot (`radalign.metrics.auroc_table`: per-label AUROC with a
patient-level bootstrap interval, macro means, the same label policy `data.labels.apply_label_policy`); with a
prompt set, the encoders' prompt classifier (`pretrain.classifier`) scores the same query embeddings beside them,
with the paired difference per label and for the macro (`radalign.metrics.paired_difference`: both scored on the same patient resamples).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from radalign.data.labels import apply_label_policy, label_counts
from radalign.pretrain import classifier
from radalign.retrieval.search import Retriever

from radalign import RadalignError
from radalign import metrics as rm
from radalign import report as R
from radalign.io import atomic_write_text
from radalign.lock import output_lock
from radalign.log import get_logger
from radalign.report import md, predictions_frame

log = get_logger("radalign.retrieval.classify")

DEFAULT_K = 20
METRICS_STAGE = "retrieval-classify"  # metrics.json format: radalign-retrieval-classify-metrics/1
DEFAULT_TEMPERATURE = 0.07  # Wu et al. 2018 / DINO's k-NN evaluation: k = 20, T = 0.07
TEMPERATURE_GRID = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
# Log loss clips probabilities: one confident miss costs at most -log(1e-3) = 6.9 nats, so a single label of a
# single query cannot decide the temperature.
LOG_LOSS_EPS = 1e-3
VOTE_DEFINITION = ("softmax(similarity / T) over the k nearest cases (other patients, one image per study); "
                   "p(label) = weight of the neighbours carrying the label (value 1)")


@dataclass
class Neighbours:
    """The k nearest cases of each query after the filters, padded: rows -1 and valid False past the end."""

    rows: np.ndarray  # [Q, k] int64 index rows, -1 where fewer than k cases survived
    sims: np.ndarray  # [Q, k] float32 cosine similarities, best first
    valid: np.ndarray  # [Q, k] bool
    filtered: dict  # what the filters removed, summed over queries

    @property
    def found(self) -> np.ndarray:
        return self.valid.sum(1)  # [Q]


def neighbours(retriever: Retriever, queries: np.ndarray, subjects, k: int) -> Neighbours:
    """The k nearest index cases of L2-normalised queries [Q, D], leaving out each query's own patient."""
    if any(s is None for s in subjects):
        raise RadalignError("a query has no subject_id; the vote must leave out the query's own patient, so "
                            "every query needs its patient (re-run `radalign data prepare`)")
    hits = retriever.search_vectors(queries, k, exclude_subjects=[str(s) for s in subjects], dedup_study=True)
    q = len(hits)
    rows = np.full((q, k), -1, dtype=np.int64)
    sims = np.zeros((q, k), dtype=np.float32)
    filtered = {"same_patient": 0, "same_study": 0}
    for i, h in enumerate(hits):
        rows[i, :len(h.rows)] = h.rows
        sims[i, :len(h.scores)] = h.scores
        for key, v in h.filtered.items():
            filtered[key] = filtered.get(key, 0) + int(v)
    return Neighbours(rows, sims, rows >= 0, filtered)


def neighbour_votes(base_labels: np.ndarray, nb: Neighbours, uncertain: str = "exclude") -> np.ndarray:
    """What each neighbour says per label: [N, L] 1/0/-1/NaN index labels -> [Q, k, L] 1.0 carries / 0.0 not."""
    carries = base_labels == 1
    if uncertain == "positive":
        carries |= base_labels == -1
    votes = carries[np.maximum(nb.rows, 0)].astype(np.float64)  # [Q, k, L]
    votes[~nb.valid] = 0.0
    return votes


def vote(sims: np.ndarray, votes: np.ndarray, valid: np.ndarray, temperature: float,
         prior: np.ndarray) -> np.ndarray:
    """Similarity-weighted vote. sims [Q, k], votes [Q, k, L], valid [Q, k] -> probabilities [Q, L].

    A query without any valid neighbour gets `prior` [L] (the index's prevalence)."""
    if not temperature > 0:
        raise RadalignError(f"--temperature {temperature}: must be > 0 (e.g. {DEFAULT_TEMPERATURE})")
    logits = np.where(valid, sims.astype(np.float64) / temperature, -np.inf)  # [Q, k]
    top = logits.max(1, keepdims=True)  # [Q, 1]; subtracted so exp never overflows at small T
    w = np.exp(logits - np.where(np.isfinite(top), top, 0.0))  # [Q, k], 0 where invalid
    total = w.sum(1, keepdims=True)  # [Q, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.einsum("qk,qkl->ql", w, votes) / total  # [Q, L]
    empty = total[:, 0] == 0
    p[empty] = prior
    return p


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary log loss over the (query, label) pairs with a known label (labels 1/0/NaN). [Q, L] x2."""
    known = ~np.isnan(labels)
    if not known.any():
        return float("nan")
    p = np.clip(probs[known], LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
    y = labels[known]
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_temperature(sims: np.ndarray, votes: np.ndarray, valid: np.ndarray, labels: np.ndarray,
                    prior: np.ndarray, grid=TEMPERATURE_GRID) -> dict:
    """The grid temperature with the lowest validation log loss; returns {temperature, grid: [{T, log_loss}]}.

    Ties go to the larger T (the smoother vote)."""
    tried = [{"temperature": float(t), "log_loss": log_loss(vote(sims, votes, valid, t, prior), labels)}
             for t in grid]
    usable = [r for r in tried if not np.isnan(r["log_loss"])]
    if not usable:
        raise RadalignError("--val-split: its queries have no known label to fit the temperature on; use "
                            f"another split or a fixed --temperature (default {DEFAULT_TEMPERATURE})")
    best = min(usable, key=lambda r: (r["log_loss"], -r["temperature"]))
    edge = best["temperature"] in (min(grid), max(grid))
    if edge:
        log.warning("fitted temperature %g is at the edge of the grid %s; the best value may lie beyond it",
                    best["temperature"], list(grid))
    return {"temperature": best["temperature"], "at_grid_edge": edge, "objective": "mean binary log loss (probabilities clipped to "
            f"[{LOG_LOSS_EPS}, {1 - LOG_LOSS_EPS}])", "grid": tried}


def query_labels(meta: list[dict], names: list[str], uncertain: str, blank: str) -> tuple[np.ndarray, dict]:
    """Each query's labels under the zero-shot policy: [Q, L] 1/0/NaN, and the raw counts per label."""
    raw = pd.DataFrame([{n: (m.get("labels") or {}).get(n) for n in names} for m in meta], columns=names)
    return apply_label_policy(raw, uncertain, blank), label_counts(raw)


# ------------------------------------------------------------------------------------------------------
# Zero-shot beside the vote, and the paired comparison.


def zeroshot_probs(encoders, images: np.ndarray, prompt_set) -> np.ndarray:
    """Prompt zero-shot probabilities [Q, C] of the same query embeddings (binary prompt sets only)."""
    if prompt_set.mode != "binary":
        raise RadalignError(f"--prompts {prompt_set.name}: a {prompt_set.mode} prompt set; the vote is per label, "
                            "so compare it with a binary set (chexpert14, competition5)")
    w = classifier.text_weights(encoders, prompt_set, "--export")
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return classifier.class_probs(x, w, "binary", classifier.logit_scale_of(encoders)).numpy().astype(np.float64)


def _macro_auroc(cols: list[int]):
    """A metric for paired_difference: the mean AUROC over label columns `cols` of y/score [n, L]."""
    def metric(y, s, w):  # y, s [n, L]; w [B, n] -> [B]
        return np.mean([rm.weighted_auroc(y[:, j], s[:, j], w) for j in cols], axis=0)
    return metric


def compare(vote_p: np.ndarray, zs_p: np.ndarray, labels: np.ndarray, names: list[str], macro: list[str],
            patients, *, n_boot: int, seed: int, level: float) -> dict:
    """Per label and for the macro: AUROC(vote) - AUROC(zero-shot), on the same patient resamples."""
    kw = dict(n_boot=n_boot, seed=seed, level=level)
    out = {"definition": "AUROC(retrieval vote) - AUROC(prompt zero-shot), paired patient bootstrap",
           "classes": {}}
    for j, name in enumerate(names):
        if not (0 < np.nansum(labels[:, j]) < (~np.isnan(labels[:, j])).sum()):
            out["classes"][name] = None  # one label value: no AUROC for either
            continue
        out["classes"][name] = rm.paired_difference("auroc", labels[:, j], vote_p[:, j], zs_p[:, j], patients, **kw)
    cols = [names.index(c) for c in macro]
    out["macro"] = (rm.paired_difference(_macro_auroc(cols), labels, vote_p, zs_p, patients, **kw) | {"classes": macro}
                    if cols else None)
    return out


# ------------------------------------------------------------------------------------------------------
# The whole command.


def classify(retriever: Retriever, data: str | os.PathLike, split: str = "test", *, k: int = DEFAULT_K,
             temperature: float | None = None, val_split: str | None = None, uncertain: str = "exclude",
             blank: str = "exclude", prompt_set=None, macro_classes: list[str] | None = None,
             min_per_label: int = 10, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
             out: str | os.PathLike | None = None, batch_size: int = 64, num_workers: int = 0,
             progress: bool = True) -> dict:
    """Embed `data/<split>` (and `val_split`), then `classify_embedded`; OUT is locked throughout. -> metrics."""
    if val_split is not None and val_split == split:
        raise RadalignError(f"--val-split {val_split}: the scored split itself; fit the temperature on another "
                            "split (e.g. validate), never on the one the metrics come from")
    if val_split is not None and temperature is not None:
        raise RadalignError("--temperature and --val-split: give one (a fixed temperature, or a split to fit it on)")
    _check_options(retriever, k, temperature, uncertain, blank, n_boot, macro_classes)
    kw = dict(k=k, temperature=temperature, uncertain=uncertain, blank=blank, prompt_set=prompt_set,
              macro_classes=macro_classes, min_per_label=min_per_label, n_boot=n_boot, seed=seed, level=level,
              out=out, source=str(Path(data).resolve()), split=split)
    with output_lock(out, what="--out") if out else contextlib.nullcontext():
        val = _embed(retriever, data, val_split, batch_size, num_workers, progress) if val_split else None
        test = _embed(retriever, data, split, batch_size, num_workers, progress)
        return classify_embedded(retriever, test, val, val_split=val_split, **kw)


def _embed(retriever, data, split, batch_size, num_workers, progress):
    from radalign.retrieval.build import embed_shards

    return embed_shards(retriever.encoders, data, split, batch_size=batch_size, num_workers=num_workers,
                        thumbnail_size=0, progress=progress, desc=split)


def _check_options(retriever, k, temperature, uncertain, blank, n_boot, macro_classes) -> None:
    if temperature is not None and not temperature > 0:
        raise RadalignError(f"--temperature {temperature}: must be > 0 (e.g. {DEFAULT_TEMPERATURE})")
    if uncertain not in ("exclude", "positive", "negative"):
        raise RadalignError(f"--uncertain {uncertain!r}: choose exclude, positive or negative")
    if blank not in ("exclude", "negative"):
        raise RadalignError(f"--blank {blank!r}: choose exclude or negative")
    if n_boot < 1:
        raise RadalignError(f"--bootstrap {n_boot}: must be >= 1 (the table states an interval per label)")
    unknown = [c for c in macro_classes or () if c not in retriever.store.labels]
    if unknown:
        raise RadalignError(f"--classes {unknown}: not labels of this index; choose from {retriever.store.labels}")
    retriever._check_k(k)  # before the (slow) embedding pass
    _ = retriever.encoders  # loaded and checked against the index (both checksums named) before any work


@dataclass
class _Voted:
    probs: np.ndarray | None  # [Q, L] (None before the temperature is known)
    votes: np.ndarray  # [Q, k, L]
    labels: np.ndarray  # [Q, L] 1/0/NaN
    counts: dict  # raw 1/0/-1/blank counts per label
    nb: Neighbours


def _vote_cases(retriever, cases, *, k, uncertain, blank, temperature, prior) -> _Voted:
    labels, counts = query_labels(cases.meta, retriever.store.labels, uncertain, blank)
    nb = neighbours(retriever, cases.image, [m.get("subject_id") for m in cases.meta], k)
    votes = neighbour_votes(retriever.store.label_matrix(), nb, uncertain)
    probs = vote(nb.sims, votes, nb.valid, temperature, prior) if temperature else None
    return _Voted(probs, votes, labels, counts, nb)


def classify_embedded(retriever: Retriever, cases, val_cases=None, *, k: int = DEFAULT_K,
                      temperature: float | None = None, uncertain: str = "exclude", blank: str = "exclude",
                      prompt_set=None, macro_classes: list[str] | None = None, min_per_label: int = 10,
                      n_boot: int = 1000, seed: int = 0, level: float = 0.95, out: str | os.PathLike | None = None,
                      source: str = "", split: str = "test", val_split: str | None = None) -> dict:
    """Vote and score already-embedded queries; write OUT. -> metrics.

    cases / val_cases: `retrieval.build.EmbeddedCases` (or anything with `image` [Q, D] L2-normalised, `keys`,
    `meta` with `subject_id` and `labels`). With val_cases, T is fitted on them (they must not be the scored
    queries) and `temperature` must be None."""
    _check_options(retriever, k, temperature, uncertain, blank, n_boot, macro_classes)
    t0 = time.perf_counter()
    names = retriever.store.labels
    base = retriever.store.label_matrix()  # [N, L]
    prior = (base == 1).mean(0) if len(base) else np.zeros(len(names))  # [L] index prevalence
    common = dict(k=k, uncertain=uncertain, blank=blank, prior=prior)
    fit = None
    if val_cases is not None:
        if temperature is not None:
            raise RadalignError("--temperature and --val-split: give one (a fixed temperature, or a split to fit it on)")
        val = _vote_cases(retriever, val_cases, temperature=None, **common)
        fit = fit_temperature(val.nb.sims, val.votes, val.nb.valid, val.labels, prior)
        fit.update(split=val_split, queries=len(val_cases.keys))
        temperature = fit["temperature"]
        log.info("temperature %.3g fitted on %s (%d queries)", temperature, val_split, len(val_cases.keys))
    temperature = DEFAULT_TEMPERATURE if temperature is None else float(temperature)
    test = _vote_cases(retriever, cases, temperature=temperature, **common)
    patients = [str(m.get("subject_id")) for m in cases.meta]
    macro = _macro_classes(macro_classes, prompt_set, names)
    table_kw = dict(n_boot=n_boot, seed=seed, level=level, min_per_label=min_per_label, patient_ids=patients)
    voted = rm.auroc_table(test.probs, test.labels, names, macro_classes=macro, **table_kw)
    m: dict = {
        "index": {"path": str(retriever.store.path), "split": retriever.store.manifest["data"].get("split"),
                  "count": retriever.store.count, "encoder_checksum": retriever.store.manifest["encoder"]["checksum"]},
        "queries": {"data": source, "split": split, "images": len(cases.keys), "patients": len(set(patients)),
                    "expected": getattr(cases, "expected", None), "lost": getattr(cases, "lost", {})},
        "method": {"definition": VOTE_DEFINITION, "k": k, "temperature": temperature,
                   "temperature_source": (f"fitted on split {val_split}" if fit else
                                          "fixed" + (" (default: Wu et al. 2018 / DINO k-NN)"
                                                     if temperature == DEFAULT_TEMPERATURE else "")),
                   "temperature_fit": fit, "filtered": test.nb.filtered,
                   "queries_with_fewer_than_k": int((test.nb.found < k).sum()),
                   "queries_without_neighbours": int((test.nb.found == 0).sum())},
        "label_policy": {"uncertain": uncertain, "blank": blank,
                         "neighbour_carries": "value 1" + (" or -1" if uncertain == "positive" else "")},
        "label_counts": test.counts,
        "bootstrap": {"unit": voted["macro"]["unit"], "n_units": voted["macro"]["n_units"], "n_boot": n_boot,
                      "seed": seed, "level": level, "method": "percentile"},
        "retrieval": voted,
        "controls": {"shuffled_labels_macro_auroc": rm.shuffled_label_control(
            test.probs, test.labels, names, voted["macro"]["classes"] or names, seed=seed)},
    }
    zs_p, zs_names = None, []
    if prompt_set is not None:
        zs_p, zs_names = _beside_zeroshot(m, retriever, cases, test, prompt_set, macro, voted, table_kw)
    m["timing_s"] = round(time.perf_counter() - t0, 3)
    if out:
        with output_lock(out, what="--out"):  # re-entrant: classify() already holds it
            _write(out, m, cases, test, names, zs_p, zs_names)
    return m


def _beside_zeroshot(m: dict, retriever, cases, test: _Voted, prompt_set, macro, voted, table_kw):
    """Zero-shot of the same query embeddings over the labels both have, and the paired comparison (into m)."""
    names = retriever.store.labels
    zs_names = [n for n in prompt_set.class_names if n in names]
    if not zs_names:
        raise RadalignError(f"--prompts {prompt_set.name}: none of its classes {prompt_set.class_names} is a "
                            f"label of this index ({names}); use a prompt set over the same labels")
    cols = [names.index(n) for n in zs_names]
    zs_p = zeroshot_probs(retriever.encoders, cases.image, prompt_set.subset(zs_names))  # [Q, C']
    m["zeroshot"] = {"prompt_set": prompt_set.name, "prompt_file": prompt_set.source,
                     "classes_not_in_index": [n for n in prompt_set.class_names if n not in names],
                     **rm.auroc_table(zs_p, test.labels[:, cols], zs_names,
                                      macro_classes=[c for c in macro if c in zs_names], **table_kw)}
    m["comparison"] = compare(test.probs[:, cols], zs_p, test.labels[:, cols], zs_names,
                              [c for c in voted["macro"]["classes"] if c in zs_names], table_kw["patient_ids"],
                              n_boot=table_kw["n_boot"], seed=table_kw["seed"], level=table_kw["level"])
    return zs_p, zs_names


def _macro_classes(wanted, prompt_set, names: list[str]) -> list[str]:
    """The headline macro's labels: --classes, else the prompt set's macro classes, else every index label."""
    chosen = list(wanted or (prompt_set.macro_classes if prompt_set is not None else ()) or names)
    return [c for c in chosen if c in names]


def _write(out, m: dict, cases, test: _Voted, names: list[str], zs_p, zs_names) -> None:
    out = Path(out)
    m.update(R.write_metrics(out / "metrics.json", m, stage=METRICS_STAGE, unit=m["bootstrap"]["unit"]))
    preds = predictions_frame(list(cases.keys), test.probs, test.labels, names)
    preds.insert(1, "subject_id", [str(x.get("subject_id")) for x in cases.meta])
    preds.insert(2, "study_id", [str(x.get("study_id")) for x in cases.meta])
    if zs_p is not None:
        for j, n in enumerate(zs_names):
            preds[f"zeroshot:{n}"] = zs_p[:, j]
    atomic_write_text(out / "predictions.csv", preds.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "metrics.md", markdown(m))


# ------------------------------------------------------------------------------------------------------
# The table.


def unit_sentence(m: dict) -> str:
    b = m["bootstrap"]
    what = (f"over patients ({b['n_units']} patients, {m['queries']['images']} images; all images of a patient "
            "resampled together)" if b["unit"] == rm.UNIT else f"over {b['n_units']} images")
    return f"{round(100 * b['level'])}% percentile bootstrap {what}, {b['n_boot']} resamples, seed {b['seed']}"


def markdown(m: dict) -> str:
    """The table: per label, the vote's AUROC beside prompt zero-shot's and the paired difference (escaped)."""
    meth, zs, cmp_ = m["method"], m.get("zeroshot"), m.get("comparison")
    head = ["# Retrieval as a classifier (k-NN vote)", "",
            f"Index: {md(m['index']['path'])} ({m['index']['count']} images of split "
            f"{md(m['index']['split'])}; encoder {md(m['index']['encoder_checksum'][:12])}). "
            f"Queries: {md(m['queries']['data'])} split {md(m['queries']['split'])}, {m['queries']['images']} "
            f"images of {m['queries']['patients']} patients.",
            f"Vote: k = {meth['k']}, T = {meth['temperature']:g} ({md(meth['temperature_source'])}"
            f"{'; at the edge of the grid' if (meth.get('temperature_fit') or {}).get('at_grid_edge') else ''}); "
            f"{md(VOTE_DEFINITION)}. Same-patient neighbours left out: {meth['filtered'].get('same_patient', 0)}.",
            f"Label policy: uncertain={md(m['label_policy']['uncertain'])}, blank={md(m['label_policy']['blank'])}.",
            f"CI: {unit_sentence(m)}.", ""]
    if zs:
        head[-1:] = [f"Zero-shot: prompt set {md(zs['prompt_set'])} on the same query embeddings; "
                     "Δ = vote − zero-shot, paired on the same patient resamples.", ""]
        header = ["label", "n_pos", "n_neg", "k-NN vote AUROC", "zero-shot AUROC", "Δ AUROC"]
    else:
        header = ["label", "n_pos", "n_neg", "k-NN vote AUROC"]
    rows = []
    for name, c in m["retrieval"]["classes"].items():
        cells = [name, c["n_pos"], c["n_neg"], R.ci_of(c, "auroc")]
        if zs:
            cells += [R.ci_of(zs["classes"].get(name), "auroc"), R.delta_of((cmp_["classes"] or {}).get(name))]
        rows.append(cells)
    mac = m["retrieval"]["macro"]
    cells = [R.Md(f"**macro ({md(', '.join(mac['classes']))})**"), R.Md(""), R.Md(""), R.ci_of(mac, "auroc")]
    if zs:
        cells += [R.ci_of(zs["macro"], "auroc"), R.delta_of(cmp_.get("macro"))]
    rows.append(cells)
    rows = R.md_table(header, rows, align="lrr" + "r" * (len(header) - 3))
    tail = [""]
    if mac.get("classes_too_few"):
        tail.append(f"Left out of the macro, fewer than {mac.get('min_per_label')} positives or negatives: "
                    f"{', '.join(md(c) for c in mac['classes_too_few'])}.")
    none = [n for n, c in m["retrieval"]["classes"].items() if c["auroc"] is None]
    if none:
        tail.append(f"No AUROC (one label value among the scored queries): {', '.join(md(c) for c in none)}.")
    ctrl = m["controls"].get("shuffled_labels_macro_auroc")
    if ctrl is not None:
        tail.append(f"Shuffled-label control (macro AUROC, should be ~0.5): {ctrl:.3f}.")
    if meth["queries_with_fewer_than_k"]:
        tail.append(f"Queries with fewer than k neighbours after the filters: {meth['queries_with_fewer_than_k']} "
                    f"(none left: {meth['queries_without_neighbours']}, given the index prevalence).")
    return "\n".join(head + rows + tail) + "\n"


def format_summary(m: dict) -> str:
    """The printed lines: macro AUROC of the vote (and of zero-shot, with the paired difference)."""
    mac = m["retrieval"]["macro"]
    lines = [f"k-NN vote (k {m['method']['k']}, T {m['method']['temperature']:g}): macro AUROC {R.ci_of(mac, 'auroc')} over "
             f"{len(mac['classes'])} labels, {m['queries']['images']} images"]
    if m.get("zeroshot"):
        lines.append(f"zero-shot ({m['zeroshot']['prompt_set']}): macro AUROC {R.ci_of(m['zeroshot']['macro'], 'auroc')}; "
                     f"vote - zero-shot {R.delta_of(m['comparison'].get('macro'))}")
    lines.append(f"[lo, hi]: {unit_sentence(m)}")
    return "\n".join(lines)


__all__ = ["classify", "classify_embedded", "neighbours", "neighbour_votes", "vote", "fit_temperature", "log_loss", "query_labels",
           "zeroshot_probs", "compare", "markdown", "format_summary", "Neighbours", "DEFAULT_K",
           "DEFAULT_TEMPERATURE", "TEMPERATURE_GRID"]

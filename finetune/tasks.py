"""What a task kind means to the models, the metrics and the files: class names, outputs, one-vs-rest targets,
and the seeded draw of a fraction of the training patients.

    names = class_names(cfg.task)                 # binary: [label]; multilabel: the labels; multiclass: classes
    k = n_outputs(cfg.task)                       # logits per row (the head's width)
    t = targets(y, "multiclass", k)               # [N, K] 1/0/NaN one-vs-rest (binary / multilabel: y itself)
    ids = draw_patients(frame, 0.01, seed=0)      # sorted subject ids (str), drawn by patient
    doc = patient_list(ids, frame, 0.01, 0)       # what RUN/train_patients.json holds, with the list's sha256

Kinds: binary (one 0/1 column, one logit, sigmoid), multilabel (one 0/1 column per class, one logit each,
sigmoid each, BCE over the labelled cells only), multiclass (one column holding the class index 0..K-1, K logits,
softmax, cross-entropy over the labelled rows). Uncertain (-1) and blank CheXpert values follow the one label
policy (data.labels.apply_label_policy); an excluded cell is NaN and enters neither loss nor metric.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from radalign import RadalignError
from radalign.metrics import auroc


def class_names(task) -> list[str]:
    """The output names of a TaskConfig, in logit order."""
    if task.kind == "multiclass":
        return list(task.classes)
    if task.kind == "multilabel":
        return list(task.labels)
    return list(task.labels[:1])


def n_outputs(task) -> int:
    """Logits per row: 1 (binary), one per label (multilabel), one per class (multiclass)."""
    return len(class_names(task))


def as_matrix(scores: np.ndarray) -> np.ndarray:
    """[N] (a binary task's scores) or [N, K] -> [N, K]."""
    scores = np.asarray(scores)
    return scores.reshape(len(scores), -1)


def task_scores(logits: np.ndarray, kind: str) -> np.ndarray:
    """The recipe's per-model scores: [N] for a binary task (its one output), [N, K] otherwise."""
    return logits[:, 0] if kind == "binary" else logits


def targets(y: np.ndarray, kind: str, k: int) -> np.ndarray:
    """[N, K] one-vs-rest targets 1/0/NaN. binary / multilabel: `y` itself; multiclass: `y` [N] or [N, 1]
    class indices, one-hot, a NaN row (unlabelled) NaN in every column."""
    y = np.asarray(y, np.float64)
    if kind != "multiclass":
        return y.reshape(len(y), -1)
    idx = y.reshape(-1)
    check_class_index(idx, k)
    out = np.zeros((idx.size, k))
    lab = ~np.isnan(idx)
    out[np.flatnonzero(lab), idx[lab].astype(int)] = 1.0
    out[~lab] = np.nan
    return out


def check_class_index(idx: np.ndarray, k: int, column: str = "label", classes: Sequence[str] = ()) -> None:
    """A multiclass label column must hold 0..k-1 (or null); otherwise one error naming the value and the fix."""
    idx = np.asarray(idx, np.float64).reshape(-1)
    lab = idx[~np.isnan(idx)]
    bad = lab[(lab != np.round(lab)) | (lab < 0) | (lab >= k)]
    if bad.size:
        names = f" ({', '.join(classes)})" if classes else ""
        raise RadalignError(f"task label column {column!r} holds {bad[0]:g} ({bad.size} row(s)); a multiclass "
                            f"label is the class index 0..{k - 1} of task.classes{names} or null: fix the "
                            "column, or list every class in task.classes")


def probabilities(logits: np.ndarray, kind: str) -> np.ndarray:
    """Softmax over the classes (multiclass) or a sigmoid per output, in float64."""
    z = np.asarray(logits, np.float64)
    if kind == "multiclass":
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-z))


def macro_point_auroc(y: np.ndarray, prob: np.ndarray) -> float:
    """Mean AUROC over the columns of y [N, K] (1/0/NaN) that have both values (NaN when none has)."""
    vals = [auroc(y[:, j], prob[:, j]) for j in range(y.shape[1])]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


# ----------------------------------------------------------------------------------------------------------
# A fraction of the training patients (the 1 % / 10 % / 100 % benchmarks)


def draw_patients(frame: pd.DataFrame, fraction: float, seed: int) -> list[str]:
    """round(fraction x patients) patients (at least 1) of `frame`, drawn without replacement by a generator
    seeded with `seed` from the sorted patient ids: the same table, fraction and seed give the same list."""
    if not 0 < fraction <= 1:
        raise RadalignError(f"task.train_fraction: {fraction}; use a fraction in (0, 1], e.g. 0.01 for 1 %")
    ids = sorted(frame["subject_id"].astype(str).unique())
    n = max(1, int(round(fraction * len(ids))))
    rows = np.random.default_rng(seed).choice(len(ids), size=min(n, len(ids)), replace=False)
    return sorted(ids[i] for i in rows)


def list_sha256(ids: Sequence[str]) -> str:
    """sha256 of the patient list as the file's `subject_ids` lines would be written: one id per line."""
    return hashlib.sha256("".join(f"{i}\n" for i in ids).encode()).hexdigest()


def keep_patients(frame: pd.DataFrame, ids: Sequence[str]) -> pd.DataFrame:
    """The rows (studies) of the drawn patients, every study of each."""
    return frame[frame["subject_id"].astype(str).isin(set(ids))].reset_index(drop=True)


def patient_list(ids: Sequence[str], frame: pd.DataFrame, fraction: float, seed: int, split: str) -> dict:
    """RUN/train_patients.json: the drawn patients, their sha256, and what they were drawn from."""
    return {"format": "radalign-train-patients/1", "split": split, "fraction": fraction, "seed": seed,
            "drawn_by": "patient", "n_patients": len(ids), "of_patients": int(frame["subject_id"].nunique()),
            "n_studies": int(frame["subject_id"].astype(str).isin(set(ids)).sum()), "of_studies": len(frame),
            "sha256": list_sha256(ids), "sha256_of": "the subject_ids joined as one id per line, each ending in \\n",
            "subject_ids": list(ids)}

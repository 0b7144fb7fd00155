"""From finetune-table rows to model inputs: robustly scaled labs, hours since drawn, missing masks, demographics.

    fz = EHRFeaturizer.fit(table[table.split == "train"], features=manifest["features"])
    x = fz.transform(table)          # EHRFeatures: arrays per row + counts of what was treated as missing
    fz.to_dict() / EHRFeaturizer.from_dict(d)   # JSON for checkpoints; fz.check_features(names) refuses others

Scaling is robust (median and IQR) and its statistics come from the TRAINING split only (`fit` takes the
training rows; `fit_on_train` picks them from the `split` column). A lab value is missing when the cell is null,
NaN, +-inf, or its hours since drawn are negative (drawn after the film: not available at prediction time);
every one of these is counted by reason in `EHRFeatures.counts`, and the model sees "not measured" through a
learned embedding, never an imputed number (the scaled-value slot holds 0.0 and `measured` is False).

Demographics: `age` is numeric (scaled like a lab, its own missing flag); gender, race, insurance, marital status
and language are categorical with index 0 = unknown (null, empty, or a value never seen in training; counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from radalign.data.ehr_table import CATEGORICAL_DEMOGRAPHICS, NUMERIC_DEMOGRAPHICS
from radalign.data.labels import apply_label_policy

from radalign import RadalignError

FORMAT = "radalign-ehr-features/1"
CATEGORICAL = CATEGORICAL_DEMOGRAPHICS  # the EHR table's schema (data.ehr_table)
NUMERIC = NUMERIC_DEMOGRAPHICS
UNKNOWN = "<unknown>"
MIN_IQR = 1e-6  # a constant feature in training: scale by 1 instead of dividing by 0


@dataclass
class EHRFeatures:
    """Model inputs for N rows and F lab features (numpy; `as_tensors` in finetune.models)."""

    values: np.ndarray  # [N, F] float32 robust-scaled lab values, 0.0 where not measured
    hours: np.ndarray  # [N, F] float32 log1p(hours since drawn), 0.0 where not measured
    measured: np.ndarray  # [N, F] bool
    num: np.ndarray  # [N, K] float32 scaled numeric demographics (age), 0.0 where unknown
    num_known: np.ndarray  # [N, K] bool
    cat: np.ndarray  # [N, J] int64 category index per categorical demographic, 0 = unknown
    counts: dict = field(default_factory=dict)  # reason -> count of cells treated as missing/unknown

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def present(self) -> np.ndarray:
        """[N] bool: the EHR modality has anything for the row (a lab measured or a demographic known)."""
        return self.measured.any(axis=1) | self.num_known.any(axis=1) | (self.cat > 0).any(axis=1)

    def take(self, rows) -> EHRFeatures:
        rows = np.asarray(rows)
        return EHRFeatures(self.values[rows], self.hours[rows], self.measured[rows], self.num[rows],
                           self.num_known[rows], self.cat[rows], dict(self.counts))


def features_from_columns(columns: Sequence[str]) -> list[str]:
    """Lab features of a finetune table: every column `X` that has a companion `X_hours` (in column order)."""
    cols = set(columns)
    return [c for c in columns if f"{c}_hours" in cols]


def require_columns(columns: Sequence[str], wanted: Sequence[str], what: str) -> None:
    """A RadalignError naming every wanted column the table lacks, and the available ones."""
    missing = [w for w in wanted if w not in set(columns)]
    if missing:
        raise RadalignError(f"{what}: column(s) {', '.join(map(repr, missing))} not in the table; available: "
                            f"{', '.join(map(str, columns))}")


def _numeric(col: pd.Series) -> np.ndarray:
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _robust_stats(x: np.ndarray) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return 0.0, 1.0
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    iqr = float(q3 - q1)
    return float(med), (iqr if iqr > MIN_IQR else 1.0)


def _categories(col: pd.Series) -> list[str]:
    vals = col.dropna().astype(str)
    return sorted(v for v in vals.unique() if v.strip())


@dataclass
class EHRFeaturizer:
    """Fitted scaling statistics and category vocabularies; JSON-serialisable (`to_dict`/`from_dict`)."""

    features: list[str]
    median: dict[str, float]
    iqr: dict[str, float]
    categories: dict[str, list[str]]  # index i+1 = categories[i]; 0 = unknown
    numeric: list[str] = field(default_factory=lambda: list(NUMERIC))
    n_fit_rows: int = 0

    @classmethod
    def fit(cls, train: pd.DataFrame, features: Sequence[str]) -> EHRFeaturizer:
        """Statistics from `train` (the training split's rows, nothing else)."""
        features = list(features)
        require_columns(list(train.columns), features + [f"{f}_hours" for f in features] + list(NUMERIC)
                        + list(CATEGORICAL), "EHR features")
        if len(train) == 0:
            raise RadalignError("EHR features: no training rows to fit the scaling on; the table's `split` "
                                "column needs rows with split == 'train'")
        med, iqr = {}, {}
        for f in features + list(NUMERIC):
            x = _numeric(train[f])
            if f in features:
                x = np.where(_numeric(train[f"{f}_hours"]) < 0, np.nan, x)  # not available at the film
            med[f], iqr[f] = _robust_stats(x)
        cats = {c: _categories(train[c]) for c in CATEGORICAL}
        return cls(features=features, median=med, iqr=iqr, categories=cats, n_fit_rows=len(train))

    @classmethod
    def fit_on_train(cls, table: pd.DataFrame, features: Sequence[str], split_column: str = "split",
                     train_split: str = "train") -> EHRFeaturizer:
        require_columns(list(table.columns), [split_column], "EHR features")
        return cls.fit(table[table[split_column] == train_split], features)

    def check_features(self, features: Sequence[str]) -> None:
        """Refuse data (or a checkpoint) whose lab feature list differs from the one this was fitted on."""
        features = list(features)
        if features == self.features:
            return
        extra = [f for f in features if f not in self.features]
        lacking = [f for f in self.features if f not in features]
        detail = []
        if lacking:
            detail.append(f"missing {', '.join(lacking)}")
        if extra:
            detail.append(f"unexpected {', '.join(extra)}")
        if not detail:
            detail.append("same names in another order")
        raise RadalignError(f"EHR feature list differs from the one the model was trained with ({'; '.join(detail)})."
                            f" Trained with: {', '.join(self.features)}. Re-link the table with the same "
                            "configs/ehr feature list, or train a new model on this one")

    def transform(self, table: pd.DataFrame) -> EHRFeatures:
        require_columns(list(table.columns), self.features + [f"{f}_hours" for f in self.features]
                        + self.numeric + list(CATEGORICAL), "EHR features")
        n = len(table)
        counts = {"null_value": 0, "nonfinite_value": 0, "negative_hours": 0, "missing_hours": 0,
                  "unknown_numeric": 0, "nonfinite_numeric": 0, "unknown_category": 0, "unseen_category": 0}
        values = np.zeros((n, len(self.features)), np.float32)
        hours = np.zeros_like(values)
        measured = np.zeros(values.shape, bool)
        for j, f in enumerate(self.features):
            values[:, j], hours[:, j], measured[:, j] = self._lab(table, f, counts)
        num = np.zeros((n, len(self.numeric)), np.float32)
        num_known = np.zeros(num.shape, bool)
        for j, f in enumerate(self.numeric):
            raw = _numeric(table[f])
            null = pd.isna(table[f]).to_numpy()
            counts["unknown_numeric"] += int(null.sum())
            counts["nonfinite_numeric"] += int((~null & ~np.isfinite(raw)).sum())  # inf, or unparsable text
            ok = np.isfinite(raw)
            num[:, j] = np.where(ok, (np.where(ok, raw, 0.0) - self.median[f]) / self.iqr[f], 0.0)
            num_known[:, j] = ok
        cat = np.stack([self._cat(table[c], c, counts) for c in CATEGORICAL], axis=1) if n else \
            np.zeros((0, len(CATEGORICAL)), np.int64)
        return EHRFeatures(values, hours, measured, num, num_known, cat.astype(np.int64), counts)

    def _lab(self, table: pd.DataFrame, f: str, counts: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        null = pd.isna(table[f]).to_numpy()
        raw = _numeric(table[f])
        h = _numeric(table[f"{f}_hours"])
        nonfinite = ~null & ~np.isfinite(raw)  # inf, -inf, or a NaN/unparsable that was not a null
        negative = np.isfinite(raw) & (h < 0)
        ok = np.isfinite(raw) & ~negative
        no_hours = ok & ~np.isfinite(h)
        counts["null_value"] += int(null.sum())
        counts["nonfinite_value"] += int(nonfinite.sum())
        counts["negative_hours"] += int(negative.sum())
        counts["missing_hours"] += int(no_hours.sum())  # measured, time unknown: hours slot 0 (counted)
        scaled = np.where(ok, (np.where(ok, raw, 0.0) - self.median[f]) / self.iqr[f], 0.0)
        hrs = np.where(ok & np.isfinite(h), np.log1p(np.clip(np.nan_to_num(h), 0.0, None)), 0.0)
        return scaled.astype(np.float32), hrs.astype(np.float32), ok

    def _cat(self, col: pd.Series, name: str, counts: dict) -> np.ndarray:
        index = {v: i + 1 for i, v in enumerate(self.categories[name])}
        out = np.zeros(len(col), np.int64)
        for i, v in enumerate(col.tolist()):
            if v is None or (isinstance(v, float) and np.isnan(v)) or not str(v).strip():
                counts["unknown_category"] += 1
            elif str(v) in index:
                out[i] = index[str(v)]
            else:
                counts["unseen_category"] += 1
        return out

    @property
    def cardinalities(self) -> list[int]:
        """Categories per categorical demographic, unknown (index 0) included."""
        return [len(self.categories[c]) + 1 for c in CATEGORICAL]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "features": list(self.features), "numeric": list(self.numeric),
                "median": dict(self.median), "iqr": dict(self.iqr),
                "categories": {k: list(v) for k, v in self.categories.items()}, "n_fit_rows": self.n_fit_rows}

    @classmethod
    def from_dict(cls, d: dict) -> EHRFeaturizer:
        if d.get("format") != FORMAT:
            raise RadalignError(f"EHR featurizer state has format {d.get('format')!r}, expected {FORMAT!r}; "
                                "the checkpoint was written by another radalign version")
        return cls(features=list(d["features"]), median={k: float(v) for k, v in d["median"].items()},
                   iqr={k: float(v) for k, v in d["iqr"].items()},
                   categories={k: list(v) for k, v in d["categories"].items()},
                   numeric=list(d.get("numeric", NUMERIC)), n_fit_rows=int(d.get("n_fit_rows", 0)))


# ----------------------------------------------------------------------------------------------------------
# Labels.


def label_matrix(table: pd.DataFrame, columns: Sequence[str], kind: str = "binary",
                 uncertain: str = "exclude", blank: str = "exclude") -> np.ndarray:
    """[N, C] float labels, NaN = excluded from the loss and the metric.

    binary / multilabel: 1/0 per column (CheXpert -1 = uncertain: 'exclude' -> NaN, 'positive' -> 1,
    'negative' -> 0; null = blank: 'exclude' -> NaN, 'negative' -> 0). multiclass: one column holding the class
    index (float, NaN = unlabelled).
    """
    require_columns(list(table.columns), list(columns), "task labels")
    y = np.stack([_numeric(table[c]) for c in columns], axis=1) if len(columns) else np.zeros((len(table), 0))
    if kind == "multiclass":
        return y.astype(np.float64)
    y = apply_label_policy(y, uncertain, blank)  # the one policy (data.labels)
    bad = np.isfinite(y) & (y != 0) & (y != 1)
    if bad.any():
        j = int(np.argwhere(bad)[0, 1])
        raise RadalignError(f"task labels: column {columns[j]!r} holds {float(y[bad][0]):g}; a binary label must be "
                            "1, 0, -1 (uncertain) or null")
    return y.astype(np.float64)


def text_present(texts: Sequence[str | None]) -> np.ndarray:
    """[N] bool: the indication exists and is not blank."""
    return np.array([isinstance(t, str) and bool(t.strip()) for t in texts], bool)


def threshold_label(table: pd.DataFrame, column: str, threshold: float) -> np.ndarray:
    """[N] float: 1.0 where `column > threshold`, 0.0 where not, NaN where the column is null/non-finite
    (e.g. long stay = los_days > 7; a study with no admission is unlabelled, not negative)."""
    require_columns(list(table.columns), [column], "task threshold_column")
    x = _numeric(table[column])
    return np.where(np.isfinite(x), (x > threshold).astype(np.float64), np.nan)

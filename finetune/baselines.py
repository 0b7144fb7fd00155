"""Baselines on the same data and splits as the fusion model.

    image_only = unimodal("image", build_encoders(...))        # a FusionModel with one modality
    early = EarlyFusionModel(image_dim=512, text_dim=512, n_features=13, cardinalities=fz.cardinalities)
    late = LateFusion("stacked").fit(val_logits, val_present, y_val)   # per-modality models' validation logits
    gbdt = GBDTBaseline("binary").fit(gbdt_matrix(ehr_train, img_train, img_present_train), y_train)

- image / EHR / text only: the fusion model restricted to one modality (same tokenizer, same head; a row where
  that modality is absent gets the mask-token prediction, so every row is scored and comparisons stay paired).
- late fusion: per-modality models' logits averaged over the modalities present, or stacked with a logistic
  regression fitted on the VALIDATION split (logit x presence and presence per modality as inputs).
- early fusion: concatenate the raw inputs (embeddings zeroed when absent, lab values with measured flags and
  hours, demographics one-hot, presence flags) into an MLP.
- gradient-boosted trees (HAIM's approach, without its NaN-row drop): scikit-learn's
  HistGradientBoostingClassifier on EHR features with NaN where not measured (native missing-value splits) plus
  the frozen image embedding. sklearn's built-in early stopping holds out random ROWS, which leaks a patient's
  films across the split, so it is off: a fixed number of iterations (choose it on the validation split).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from radalign.finetune.features import EHRFeatures
from radalign.finetune.models import TASKS, FusionModel
from torch import nn

from radalign import RadalignError


def unimodal(modality: str, encoders: Mapping[str, nn.Module], **fusion_kwargs) -> FusionModel:
    """`image_only` / `text_only` / `ehr_only`: the fusion model over one modality (no modality dropout)."""
    if modality not in encoders:
        raise RadalignError(f"{modality}_only: the data has no {modality!r} modality; available: "
                            f"{', '.join(encoders)}")
    fusion_kwargs.setdefault("modality_dropout", {})
    return FusionModel({modality: encoders[modality]}, **fusion_kwargs)


# ----------------------------------------------------------------------------------------------------------
# Early fusion.


class EarlyFusionModel(nn.Module):
    """Concatenation of every modality's raw input (+ presence flags) -> MLP -> logits [B, C]."""

    modalities = ("image", "text", "ehr")

    def __init__(self, *, image_dim: int = 0, text_dim: int = 0, n_features: int = 0,
                 cardinalities: Sequence[int] = (), n_numeric: int = 1, n_outputs: int = 1, task: str = "binary",
                 hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.task, self.image_dim, self.text_dim = task, image_dim, text_dim
        self.cardinalities = list(cardinalities)
        ehr_dim = 3 * n_features + 2 * n_numeric + sum(self.cardinalities) if (n_features or cardinalities) else 0
        self.ehr_dim = ehr_dim
        d_in = image_dim + text_dim + ehr_dim + 3
        self.mlp = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_outputs))

    def _ehr_flat(self, ehr: Mapping[str, torch.Tensor]) -> torch.Tensor:
        m = ehr["measured"].bool()
        k = ehr["num_known"].bool()
        parts = [torch.where(m, ehr["values"], 0.0), m.float(), torch.where(m, ehr["hours"], 0.0),
                 torch.where(k, ehr["num"], 0.0), k.float()]
        parts += [nn.functional.one_hot(ehr["cat"][:, j].long(), c).float()
                  for j, c in enumerate(self.cardinalities)]
        return torch.cat(parts, dim=1)  # [B, ehr_dim]

    def forward(self, batch: Mapping, present_override=None) -> torch.Tensor:
        present = _presence(batch, self.modalities, present_override)  # [B, 3]
        b = present.shape[0]
        parts = []
        for j, (m, dim) in enumerate(zip(self.modalities, (self.image_dim, self.text_dim, self.ehr_dim))):
            if not dim:
                continue
            x = batch.get(m)
            if x is None:
                parts.append(torch.zeros(b, dim))
                continue
            x = self._ehr_flat(x) if m == "ehr" else (x.float().mean(1) if x.dim() == 3 else x.float())
            parts.append(torch.where(present[:, j, None], torch.nan_to_num(x), 0.0))
        parts.append(present.float())
        return self.mlp(torch.cat(parts, dim=1))  # [B, C]


def _presence(batch: Mapping, modalities: Sequence[str], override=None) -> torch.Tensor:
    x0 = next((batch[m] for m in modalities if batch.get(m) is not None), None)
    if x0 is None:
        raise RadalignError(f"batch has none of the modalities {', '.join(modalities)}")
    b = int((x0["cat"] if isinstance(x0, Mapping) else x0).shape[0])
    given = batch.get("present") or {}
    cols = [torch.zeros(b, dtype=torch.bool) if batch.get(m) is None else
            torch.as_tensor(given[m], dtype=torch.bool) if m in given else torch.ones(b, dtype=torch.bool)
            for m in modalities]
    present = torch.stack(cols, dim=1)
    if override is not None:
        keep = torch.stack([torch.as_tensor(override.get(m, True), dtype=torch.bool).expand(b)
                            for m in modalities], dim=1)
        present &= keep
    return present


# ----------------------------------------------------------------------------------------------------------
# Late fusion.


class LateFusion:
    """Combine per-modality models' logits: 'average' over present modalities, or 'stacked' (validation fit)."""

    def __init__(self, mode: str = "average", C: float = 1.0):
        if mode not in ("average", "stacked"):
            raise RadalignError(f"late fusion mode {mode!r}: use 'average' or 'stacked'")
        self.mode, self.C = mode, C
        self.modalities: list[str] = []
        self.stackers: list = []  # fitted LogisticRegressions, one per output ('stacked')
        self.weights: list[tuple[np.ndarray, np.ndarray]] = []  # their (coef [1, 2M], intercept [1])
        self.members: dict = {}  # {modality: (model, spec)} whose logits it combines (finetune.registry)

    def _x(self, logits: Mapping[str, np.ndarray], present: Mapping[str, np.ndarray], j: int) -> np.ndarray:
        cols = []
        for m in self.modalities:
            p = np.asarray(present[m], bool).astype(np.float64)
            cols += [np.asarray(logits[m], np.float64)[:, j] * p, p]
        return np.stack(cols, axis=1)  # [N, 2M]

    def fit(self, logits: Mapping[str, np.ndarray], present: Mapping[str, np.ndarray], y: np.ndarray):
        """Validation logits {modality: [N, C]}, presence {modality: [N]}, labels [N, C] (NaN = unlabelled)."""
        from sklearn.linear_model import LogisticRegression

        self.modalities = list(logits)
        if self.mode == "average":
            return self
        y = np.asarray(y, np.float64).reshape(len(y), -1)
        self.stackers = []
        for j in range(y.shape[1]):
            ok = ~np.isnan(y[:, j])
            if len(np.unique(y[ok, j])) < 2:
                raise RadalignError(f"late fusion (stacked): output {j} has one class on the validation split "
                                    f"({int(ok.sum())} labelled rows); use mode 'average'")
            self.stackers.append(LogisticRegression(C=self.C, max_iter=1000).fit(self._x(logits, present, j)[ok],
                                                                                   y[ok, j].astype(int)))
        self.weights = [(s.coef_, s.intercept_) for s in self.stackers]
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """The stackers' weights ({} for 'average'): what RUN/models/late_fusion.safetensors holds."""
        out = {}
        for j, (coef, intercept) in enumerate(self.weights):
            out[f"output{j}.coef"], out[f"output{j}.intercept"] = coef, intercept
        return out

    def load_state_dict(self, arrays: Mapping[str, np.ndarray]) -> None:
        n = len([k for k in arrays if k.endswith(".coef")])
        self.weights = [(arrays[f"output{j}.coef"], arrays[f"output{j}.intercept"]) for j in range(n)]

    def combine(self, logits: Mapping[str, np.ndarray], present: Mapping[str, np.ndarray]) -> np.ndarray:
        """[N, C] fused logits."""
        if not self.modalities:
            self.modalities = list(logits)
        if self.mode == "average":
            lg = np.stack([np.asarray(logits[m], np.float64) for m in self.modalities])  # [M, N, C]
            p = np.stack([np.asarray(present[m], bool) for m in self.modalities]).astype(np.float64)  # [M, N]
            p = np.where(p.sum(0, keepdims=True) > 0, p, 1.0)  # nothing present: plain mean
            return (lg * p[..., None]).sum(0) / p.sum(0)[:, None]
        # sklearn's decision_function, from the weights alone (a loaded stacker has no LogisticRegression)
        return np.stack([(self._x(logits, present, j) @ coef.T + intercept)[:, 0]
                         for j, (coef, intercept) in enumerate(self.weights)], axis=1)


# ----------------------------------------------------------------------------------------------------------
# Gradient-boosted trees.


def gbdt_matrix(ehr: EHRFeatures, image: np.ndarray | None = None,
                image_present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """([N, P] features with NaN for absent, [P] bool categorical mask). Labs NaN where not measured (which
    covers null, NaN, inf and negative-hours values, counted in `ehr.counts`); categories NaN when unknown."""
    cols = [np.where(ehr.measured, ehr.values, np.nan), np.where(ehr.measured, ehr.hours, np.nan),
            np.where(ehr.num_known, ehr.num, np.nan), np.where(ehr.cat > 0, ehr.cat - 1, np.nan)]
    cat_mask = [np.zeros(c.shape[1], bool) for c in cols[:3]] + [np.ones(ehr.cat.shape[1], bool)]
    if image is not None:
        img = np.asarray(image, np.float64).reshape(len(image), -1)
        if image_present is not None:
            img = np.where(np.asarray(image_present, bool)[:, None], img, np.nan)
        cols.append(img)
        cat_mask.append(np.zeros(img.shape[1], bool))
    return np.concatenate(cols, axis=1).astype(np.float64), np.concatenate(cat_mask)


class GBDTBaseline:
    """One HistGradientBoostingClassifier per output (binary / multilabel) or one multi-class model."""

    def __init__(self, task: str = "binary", *, max_iter: int = 200, learning_rate: float = 0.05,
                 max_leaf_nodes: int = 15, l2_regularization: float = 1.0, min_samples_leaf: int = 20,
                 seed: int = 0):
        if task not in TASKS:
            raise RadalignError(f"task: {task!r} is not one of {', '.join(TASKS)}")
        self.task, self.seed = task, seed
        self.params = dict(max_iter=max_iter, learning_rate=learning_rate, max_leaf_nodes=max_leaf_nodes,
                           l2_regularization=l2_regularization, min_samples_leaf=min_samples_leaf,
                           early_stopping=False, random_state=seed)
        self.models: list = []
        self.unlabelled: list[int] = []  # rows left out per output (NaN label), counted

    @property
    def min_rows(self) -> int:
        """Fewer labelled rows than this and no tree can split (each side of a split needs min_samples_leaf):
        every tree is one leaf, and every row gets the same score."""
        return 2 * self.params["min_samples_leaf"]

    def _new(self, categorical: np.ndarray):
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(categorical_features=categorical, **self.params)

    def fit(self, data: tuple[np.ndarray, np.ndarray], y: np.ndarray) -> GBDTBaseline:
        x, categorical = data
        # A column never measured in training carries nothing, and sklearn's binning crashes on it
        # ("window shape cannot be larger than input array shape"): left out, and counted.
        self.keep = ~np.all(np.isnan(x), axis=0)  # [F]
        self.dropped_columns = int((~self.keep).sum())
        x, categorical = x[:, self.keep], categorical[self.keep]
        y = np.asarray(y, np.float64).reshape(len(y), -1)
        self.models, self.unlabelled = [], []
        for j in range(y.shape[1]):
            ok = ~np.isnan(y[:, j])
            self.unlabelled.append(int((~ok).sum()))
            if len(np.unique(y[ok, j])) < 2:
                raise RadalignError(f"gbdt: output {j} has one class in training ({int(ok.sum())} labelled rows)")
            self.models.append(self._new(categorical).fit(x[ok], y[ok, j].astype(int)))
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every fitted tree as arrays (no pickle): what RUN/models/gbdt.safetensors holds."""
        out = {"keep": self.keep.astype(np.uint8), "dropped_columns": np.array([self.dropped_columns])}
        for j, m in enumerate(self.models):
            trees = m if isinstance(m, ArrayTrees) else ArrayTrees.from_sklearn(m)
            out.update({f"output{j}.{k}": v for k, v in trees.arrays.items()})
        return out

    def load_state_dict(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.keep, self.dropped_columns = arrays["keep"].astype(bool), int(arrays["dropped_columns"][0])
        n = len({k.split(".", 1)[0] for k in arrays if k.startswith("output")})
        self.models = [ArrayTrees({k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"output{j}.")})
                       for j in range(n)]

    def predict_proba(self, data: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """[N, C] probability of the positive class per output (multiclass: [N, classes])."""
        x = data[0][:, self.keep]
        if self.task == "multiclass":
            return self.models[0].predict_proba(x)
        return np.stack([m.predict_proba(x)[:, 1] for m in self.models], axis=1)

    def predict_logits(self, data: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        p = np.clip(self.predict_proba(data), 1e-7, 1 - 1e-7)
        return np.log(p) if self.task == "multiclass" else np.log(p / (1 - p))


# The fields of sklearn's tree nodes (PREDICTOR_RECORD_DTYPE) that prediction reads.
NODE_FIELDS = ("value", "feature_idx", "num_threshold", "missing_go_to_left", "left", "right", "is_leaf",
               "is_categorical", "bitset_idx")


class ArrayTrees:
    """A fitted HistGradientBoostingClassifier as plain arrays, and its predict_proba in numpy.

    arrays: every tree's nodes concatenated, one array per node field (`NODE_FIELDS`), `tree_start` [T + 1]
    (tree t's nodes are tree_start[t]:tree_start[t+1]; its left/right/bitset_idx are local to it), the
    categorical left-branch bitsets concatenated with `bitset_start` [T + 1], `known_cats` [F_cat, 8] and
    `f_idx_map` [F] (the categories seen in training), `baseline` [1, K] and `classes` [K or 2]. T = iterations x K
    (trees per iteration). The walk is sklearn's (_predictor.pyx): NaN follows missing_go_to_left, a category
    goes left when in the node's bitset, right when known, else as missing; the leaves are summed in sklearn's
    order (baseline, then iteration by iteration), so the probabilities are sklearn's.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = dict(arrays)

    @classmethod
    def from_sklearn(cls, model) -> ArrayTrees:
        trees = [p for it in model._predictors for p in it]  # iteration-major, as sklearn sums them
        nodes = [t.nodes for t in trees]
        bitsets = [t.raw_left_cat_bitsets.reshape(-1, 8) for t in trees]
        known, f_idx_map = model._bin_mapper.make_known_categories_bitsets()
        categorical = np.zeros(model.n_features_in_, bool) if model.is_categorical_ is None else model.is_categorical_
        cats = ([] if model._preprocessor is None else  # the OrdinalEncoder's categories, NaN (missing) left out
                [c[~np.isnan(c)] for c in model._preprocessor.named_transformers_["encoder"].categories_])
        arrays = {f: np.ascontiguousarray(np.concatenate([n[f] for n in nodes])) for f in NODE_FIELDS}
        arrays.update(column_order=np.concatenate([np.flatnonzero(categorical), np.flatnonzero(~categorical)]),
                      categories=np.concatenate([np.zeros(0), *cats]).astype(np.float64),
                      category_start=np.cumsum([0] + [len(c) for c in cats]))
        arrays.update(tree_start=np.cumsum([0] + [len(n) for n in nodes]),
                      bitset_start=np.cumsum([0] + [len(b) for b in bitsets]),
                      bitsets=np.concatenate(bitsets).astype(np.uint32).reshape(-1, 8),
                      known_cats=np.asarray(known, np.uint32).reshape(-1, 8), f_idx_map=np.asarray(f_idx_map),
                      baseline=np.asarray(model._baseline_prediction, np.float64),
                      classes=np.asarray(model.classes_))
        return cls(arrays)

    def _encode(self, x: np.ndarray) -> np.ndarray:
        """sklearn's preprocessing of X: the categorical columns first, each as its category's index among the
        training categories (NaN when missing or unseen), then the numeric columns."""
        a = self.arrays
        x = np.asarray(x, np.float64)[:, a["column_order"]]
        bounds = a["category_start"]
        for j in range(len(bounds) - 1):
            cats = a["categories"][bounds[j]:bounds[j + 1]]  # sorted
            if not len(cats):
                x[:, j] = np.nan
                continue
            code = np.searchsorted(cats, x[:, j]).clip(0, len(cats) - 1)
            x[:, j] = np.where(cats[code] == x[:, j], code, np.nan)
        return x

    def _walk(self, x: np.ndarray) -> np.ndarray:
        """[T, N] leaf value of every tree for every row."""
        a = self.arrays
        start, bstart = a["tree_start"][:-1], a["bitset_start"][:-1]
        bitsets = a["bitsets"] if len(a["bitsets"]) else np.zeros((1, 8), np.uint32)
        known = a["known_cats"] if len(a["known_cats"]) else np.zeros((1, 8), np.uint32)
        rows = np.arange(len(x))[None, :]  # [1, N]
        node = np.broadcast_to(start[:, None], (len(start), len(x))).astype(np.int64)  # [T, N] global index
        for _ in range(len(a["value"]) + 1):
            leaf = a["is_leaf"][node].astype(bool)
            if leaf.all():
                return a["value"][node]
            f = a["feature_idx"][node]
            v = x[rows, f]  # [T, N]
            miss_left = a["missing_go_to_left"][node].astype(bool)
            cat_v = np.where(np.isnan(v) | (v < 0) | (v > 255), 0, v).astype(np.int64)
            which = np.minimum(a["bitset_idx"][node] + bstart[:, None], len(bitsets) - 1)  # any, off categorical nodes
            in_left = _in_bitset(bitsets[which], cat_v)
            in_known = _in_bitset(known[a["f_idx_map"][f]], cat_v)
            unknown = (v < 0) | (v > 255) | ~(in_left | in_known)
            go_cat = np.where(unknown, miss_left, in_left)
            go_left = np.where(np.isnan(v), miss_left,
                               np.where(a["is_categorical"][node].astype(bool), go_cat, v <= a["num_threshold"][node]))
            child = np.where(go_left, a["left"][node], a["right"][node]).astype(np.int64)
            node = np.where(leaf, node, child + start[:, None])
        raise RadalignError("gbdt: a tree has a cycle (damaged gbdt.safetensors); retrain the run")

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """[N, classes], as HistGradientBoostingClassifier.predict_proba."""
        from scipy.special import expit, softmax

        baseline = self.arrays["baseline"]  # [1, K]
        k = baseline.shape[1]
        raw = np.zeros((len(x), k), np.float64, order="F") + baseline
        for t, values in enumerate(self._walk(self._encode(x))):
            raw[:, t % k] += values
        if k == 1:
            p = expit(raw[:, 0])
            return np.stack([1 - p, p], axis=1)
        return softmax(raw, axis=1)


def _in_bitset(bitset: np.ndarray, v: np.ndarray) -> np.ndarray:
    """bitset [..., 8] uint32 words, v [...] in 0..255 -> bit v of each bitset (sklearn's in_bitset)."""
    word = np.take_along_axis(bitset, (v // 32)[..., None], axis=-1)[..., 0]
    return ((word >> (v % 32).astype(np.uint32)) & 1).astype(bool)

"""The 14 CheXpert labels, in the two column orders the real files use, and the one label policy
(CheXpert -1 = uncertain, blank = not mentioned -> positive / negative / excluded).
"""

import numpy as np
import pandas as pd

from radalign import RadalignError

# CheXpert's own CSV order (train.csv / valid.csv of CheXpert-v1.0); also our canonical order.
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)

# mimic-cxr-2.0.0-chexpert.csv.gz / -negbio.csv.gz: subject_id, study_id, then the labels alphabetically.
MIMIC_LABEL_ORDER: tuple[str, ...] = tuple(sorted(CHEXPERT_LABELS))

# The five CheXpert competition labels (GLoRIA's 5x200 classes).
COMPETITION_LABELS: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

SPLITS: tuple[str, ...] = ("train", "validate", "test")

# ----------------------------------------------------------------------------------------------------------
# The label policy: what a CheXpert value means for a loss or a metric.

UNCERTAIN_POLICIES: tuple[str, ...] = ("exclude", "positive", "negative")  # what -1 (uncertain) becomes
BLANK_POLICIES: tuple[str, ...] = ("exclude", "negative")  # what a blank (not mentioned) becomes
_AS = {"exclude": np.nan, "positive": 1.0, "negative": 0.0}


def apply_label_policy(raw, uncertain: str = "exclude", blank: str = "exclude") -> np.ndarray:
    """Raw CheXpert values -> float 1/0/NaN, NaN = excluded from that class's loss and metric. [N, C]

    `raw` is an array (or DataFrame) of 1, 0, -1 and blank (NaN/None; a value that is not a number counts as
    blank). -1 becomes `uncertain` (exclude -> NaN, positive -> 1, negative -> 0), blank becomes `blank`
    (exclude -> NaN, negative -> 0); 1 and 0 stay. Any other number is returned as it is (callers that need
    strictly binary labels check for it).
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise RadalignError(f"uncertain: {uncertain!r} is not one of {', '.join(UNCERTAIN_POLICIES)}")
    if blank not in BLANK_POLICIES:
        raise RadalignError(f"blank: {blank!r} is not one of {', '.join(BLANK_POLICIES)}")
    x = pd.DataFrame(raw).apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    x = x.reshape(np.shape(raw)) if np.ndim(raw) == 1 else x
    out = x.copy()
    out[x == -1] = _AS[uncertain]
    out[np.isnan(x)] = _AS[blank]
    return out


def label_counts(raw: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per class: how many 1, 0, -1 and blank values the data holds (reported beside the metrics)."""
    x = raw.apply(pd.to_numeric, errors="coerce")
    return {c: {"positive": int((x[c] == 1).sum()), "negative": int((x[c] == 0).sum()),
                "uncertain": int((x[c] == -1).sum()), "blank": int(x[c].isna().sum())} for c in raw.columns}

"""The 14 CheXpert labels, in the two column orders the real files use, and the label policy.

The label policy (`encode_labels`) is the one place where CheXpert's raw values (1, 0, -1 uncertain, blank)
become what a metric scores: 1, 0, or NaN (left out of that label's metric).
"""

import numpy as np
import pandas as pd

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


def encode_labels(raw: pd.DataFrame, uncertain: str = "exclude", blank: str = "exclude") -> np.ndarray:
    """Raw 1/0/-1/blank -> float 1/0/NaN (NaN = excluded from that class's metric). [N, C]."""
    x = raw.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    out = x.copy()
    out[x == -1] = {"exclude": np.nan, "positive": 1.0, "negative": 0.0}[uncertain]
    out[np.isnan(x)] = {"exclude": np.nan, "negative": 0.0}[blank]
    return out


def label_counts(raw: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per class: how many 1, 0, -1 and blank values the data holds (reported beside the metrics)."""
    x = raw.apply(pd.to_numeric, errors="coerce")
    return {c: {"positive": int((x[c] == 1).sum()), "negative": int((x[c] == 0).sum()),
                "uncertain": int((x[c] == -1).sum()), "blank": int(x[c].isna().sum())} for c in raw.columns}

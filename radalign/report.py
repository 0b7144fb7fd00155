"""The core reporting kit: what every stage's Markdown and CSV outputs share.

`md` is the one escaper for text in Markdown; `predictions_frame` is the per-image predictions table (scores
and encoded labels) that zero-shot and retrieval's k-NN vote write as predictions.csv.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd


def md(text) -> str:
    """Text for a Markdown table cell or line: HTML-escaped (no raw tags), pipes and newlines neutralised."""
    return html.escape(str(text), quote=True).replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def predictions_frame(keys: list[str], scores: np.ndarray, labels: np.ndarray, names: list[str],
                      true_class: list[str] | None = None) -> pd.DataFrame:
    """key, score:<class>..., label:<class>... (blank = excluded), and true/predicted class if multi-class."""
    df = pd.DataFrame({"key": keys})
    for j, n in enumerate(names):
        df[f"score:{n}"] = scores[:, j]
    for j, n in enumerate(names):
        df[f"label:{n}"] = pd.array(np.where(np.isnan(labels[:, j]), pd.NA, labels[:, j]), dtype="Int64")
    if true_class is not None:
        df["true_class"] = true_class
        df["pred_class"] = [names[i] for i in scores.argmax(axis=1)]
    return df


__all__ = ["md", "predictions_frame"]

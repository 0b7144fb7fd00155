"""Report text normalisation shared by the loss (false negatives), retrieval and evaluation.

Two reports are "identical" for contrastive purposes when they match after lower-casing, dropping
punctuation and collapsing whitespace: "No acute cardiopulmonary process." == "no acute  cardiopulmonary process".
"""

from __future__ import annotations

import hashlib
import re

_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")


def normalize_report(text: str) -> str:
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def text_id(text: str) -> int:
    """A stable signed 63-bit id of the normalised text (fits int64 tensors; equal texts -> equal ids)."""
    digest = hashlib.blake2b(normalize_report(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)

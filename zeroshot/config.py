"""Typed configs of `radalign zeroshot eval` and `radalign zeroshot build-5x200` (YAML, flags and key=value
fill them through radalign.cli.config_from_args; the Python API takes them directly)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

UNCERTAIN_POLICIES = ("exclude", "positive", "negative")
BLANK_POLICIES = ("exclude", "negative")


@dataclass
class ZeroshotConfig:
    checkpoints: list[str] = field(default_factory=list)
    """Pretrain run folders or their export folders (repeatable). Several: their probabilities are averaged."""
    data: str = ""
    """Shards folder (with manifest.json), a CheXpert-format CSV, or any CSV with an image column."""
    out: str = ""
    """Output folder (required): metrics.json, predictions.csv, roc.png, metrics.md (one subfolder per prompt set
    when several are given)."""
    prompts: list[str] = field(default_factory=lambda: ["chexpert14"])
    """Prompt sets: names under configs/zeroshot/ (chexpert14, competition5, 5x200) or YAML paths."""
    split: str = "test"
    """Shard split to evaluate (shards input only)."""
    val_split: Optional[str] = None
    """Shard split used ONLY to choose thresholds for threshold metrics (F1, sensitivity...). None: none are
    reported, only threshold-free metrics."""
    val_data: Optional[str] = None
    """CSV input: a separate validation CSV for thresholds (same columns as `data`)."""
    subset: Optional[str] = None
    """A 5x200 list CSV (from `zeroshot build-5x200`): evaluate only its images, with its class labels."""
    image_root: Optional[str] = None
    """CSV input: folder the image paths are relative to (default: the CSV's folder)."""
    image_column: Optional[str] = None
    """CSV input: the column holding image paths (default: 'Path', 'path', 'image' or 'image_path')."""
    class_column: str = "class"
    """CSV input, multiclass sets: the column naming each image's single class (if absent, one-hot label
    columns are used: rows with exactly one positive class)."""
    label_columns: Optional[list[str]] = None
    """CSV input: the label columns; every one must have prompts (default: detect 1/0/-1/blank columns and
    report those without prompts)."""
    uncertain: str = "exclude"
    """Label -1 (uncertain): 'exclude' from that class's metric (counted), or count it as 'positive' or
    'negative'."""
    blank: str = "exclude"
    """Blank/null label (not mentioned): 'exclude' from that class's metric (counted) or 'negative'."""
    macro_classes: Optional[list[str]] = None
    """Classes of the headline macro AUROC (default: the prompt set's `macro_classes`, else all)."""
    min_per_label: int = 10
    """A class enters the macro AUROC only with at least this many positives and as many negatives (its own
    AUROC is reported either way). 1 keeps every class with both labels."""
    bootstrap: int = 1000
    """Bootstrap resamples for the 95% confidence intervals."""
    ci_level: float = 0.95
    """Confidence level of the percentile intervals."""
    seed: int = 0
    """Seed for the bootstrap and the shuffled-label control."""
    shuffled_control: bool = True
    """Also report the macro AUROC after permuting labels (a sanity control; should be ~0.5)."""
    batch_size: int = 64
    """Images per forward pass when embedding."""
    num_workers: int = 0
    """Image loading worker processes."""
    device: str = "cpu"
    """Torch device for the encoders."""
    cache: bool = True
    """Keep image embeddings in OUT/cache/ keyed by checkpoint checksum and data fingerprint."""

    def validate(self) -> list[str]:
        p = []
        if not self.checkpoints:
            p.append("checkpoints: none given; pass --export RUN_OR_EXPORT (repeatable)")
        if not self.data:
            p.append("data: none given; pass --shards SHARDS_DIR or --csv FILE")
        if not self.out:
            p.append("out: none given; pass --out DIR (the folder for metrics.json, predictions.csv, roc.png)")
        if not self.prompts:
            p.append("prompts: none given; pass --prompts chexpert14 (or a YAML path)")
        if self.uncertain not in UNCERTAIN_POLICIES:
            p.append(f"uncertain: {self.uncertain!r} is not one of {', '.join(UNCERTAIN_POLICIES)}")
        if self.blank not in BLANK_POLICIES:
            p.append(f"blank: {self.blank!r} is not one of {', '.join(BLANK_POLICIES)}")
        if self.min_per_label < 1:
            p.append(f"min_per_label: must be >= 1 (got {self.min_per_label}); "
                     "1 keeps every class with both labels")
        if self.bootstrap < 1:
            p.append(f"bootstrap: must be >= 1 (got {self.bootstrap})")
        if not 0 < self.ci_level < 1:
            p.append(f"ci_level: must be within (0, 1) (got {self.ci_level})")
        if self.batch_size < 1:
            p.append(f"batch_size: must be >= 1 (got {self.batch_size})")
        if self.num_workers < 0:
            p.append(f"num_workers: must be >= 0 (got {self.num_workers})")
        if self.val_split is not None and self.val_split == self.split:
            p.append(f"val_split: equals split {self.split!r}; thresholds must come from another split "
                     "(e.g. validate), never from the test split")
        if self.val_data is not None and self.val_data == self.data:
            p.append("val_data: is the evaluation data itself; thresholds must come from separate data")
        return p


@dataclass
class Build5x200Config:
    """`radalign zeroshot build-5x200`: a seeded 5x200 image list from a CheXpert CSV or from shards."""

    chexpert_csv: Optional[str] = None
    """A CheXpert-format CSV (Path, Frontal/Lateral, 14 labels): CheXpert-5x200. Give this or `shards`."""
    shards: Optional[str] = None
    """A shards folder from `radalign data prepare`: MIMIC-5x200. Give this or `chexpert_csv`."""
    split: str = "test"
    """Shard split to draw from (shards only)."""
    out: str = ""
    """The list to write (.csv); its JSON sidecar (seed, rule, sha256) gets .json."""
    seed: int = 0
    """Sampling seed."""
    per_class: int = 200
    """Images per class."""
    blank_as_negative: bool = True
    """A blank label of the other classes counts as negative (False: they must be explicitly 0)."""

    def validate(self) -> list[str]:
        p = []
        if (self.chexpert_csv is None) == (self.shards is None):
            p.append("chexpert_csv: give exactly one source, --chexpert-csv FILE or --shards DIR")
        if not self.out:
            p.append("out: none given; pass --out LIST.csv")
        if self.per_class < 1:
            p.append(f"per_class: must be >= 1 (got {self.per_class})")
        return p

"""Typed configs of the `radalign retrieval` verbs: build, search, eval, classify.

YAML (`--config`, e.g. configs/retrieval/demo.yaml), flags and key=value fill them through
radalign.cli.config_from_args. This module imports neither numpy nor faiss, so `radalign --help` stays fast; the
defaults that the library also uses are written out here and tests/test_retrieval_classify.py checks they agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from radalign.config import OUTPUT_FORMATS, output_problems

# retrieval.classify's DEFAULT_K and DEFAULT_TEMPERATURE; retrieval.index's DEFAULT_FLAT_MAX.
DEFAULT_K, DEFAULT_TEMPERATURE, DEFAULT_FLAT_MAX = 20, 0.07, 1_000_000
MODALITIES = ("image", "both")
INDEX_TYPES = ("auto", "flat", "hnsw", "ivf-flat", "ivf-pq")
TARGETS = ("image", "report")
FORMATS = OUTPUT_FORMATS
UNCERTAIN_POLICIES = ("exclude", "positive", "negative")
BLANK_POLICIES = ("exclude", "negative")


@dataclass
class _Batches:
    """How queries or cases are embedded (shared by build, eval and classify)."""

    batch_size: int = 64
    """Images per forward pass."""
    num_workers: int = 0
    """Image loading worker processes."""
    device: str = "cpu"
    """Torch device for the encoders."""

    def validate(self) -> list[str]:
        p = [f"batch_size: must be >= 1 (got {self.batch_size})"] if self.batch_size < 1 else []
        return p + ([f"num_workers: must be >= 0 (got {self.num_workers})"] if self.num_workers < 0 else [])


def _required(*inputs: tuple[str, str, str]) -> list[str]:
    """One problem per empty required input (key, value, metavar), naming its flag."""
    return [f"{key}: none given; pass --{key.replace('_', '-')} {metavar}" for key, value, metavar in inputs
            if not value]


@dataclass
class BuildConfig(_Batches):
    """`radalign retrieval build`: embed a shard split and write an index folder."""

    export: str = ""
    """Pretrain run folder or its export folder: the encoders that embed the case base."""
    shards: str = ""
    """Shards folder of `radalign data prepare` holding the case base."""
    split: str = "train"
    """Split that forms the case base."""
    out: str = ""
    """Index folder to write (atomically)."""
    modality: str = "image"
    """Index image embeddings ('image'), or images and reports ('both')."""
    index_type: str = "auto"
    """FAISS index type; 'auto' chooses by size and memory budget."""
    memory_budget: Optional[str] = None
    """RAM the index may use, e.g. 4G (None: no limit)."""
    flat_max: int = DEFAULT_FLAT_MAX
    """index_type=auto: exact (flat) search up to this many vectors."""
    recall_target: float = 0.95
    """Approximate indexes: nprobe/efSearch are tuned to reach this recall@10."""
    thumbnail_size: int = 96
    """Pixels of the thumbnails stored for HTML results; 0 stores none."""

    def validate(self) -> list[str]:
        p = super().validate() + _required(("export", self.export, "RUN_OR_EXPORT"),
                                           ("shards", self.shards, "DIR"), ("out", self.out, "INDEX_DIR"))
        if self.modality not in MODALITIES:
            p.append(f"modality: {self.modality!r} is not one of {', '.join(MODALITIES)}")
        if self.index_type not in INDEX_TYPES:
            p.append(f"index_type: {self.index_type!r} is not one of {', '.join(INDEX_TYPES)}")
        return p


@dataclass
class SearchConfig:
    """`radalign retrieval search`: the k most similar cases of one query."""

    index_dir: str = ""
    """Index folder of `radalign retrieval build`."""
    image: Optional[str] = None
    """Query image (JPEG/PNG)."""
    text: Optional[str] = None
    """Query text (searches images, or reports with target=report)."""
    study_id: Optional[str] = None
    """Query study: from the index, or from `example_from`'s shards."""
    example_from: Optional[str] = None
    """Shards folder to take the query study from (its `split`); without study_id, the first frontal study with
    a finding."""
    split: str = "test"
    """Split of `example_from`."""
    k: int = 5
    """Number of cases."""
    target: str = "image"
    """Search image or report embeddings ('report' needs an index built with modality=both)."""
    exclude_patient: Optional[bool] = None
    """Leave out the query's own patient (None: on for study queries)."""
    dedup: bool = True
    """One image per study in the results (False: list several images of one study)."""
    format: Optional[str] = None
    """Output format: json, markdown or html (None: each `out` file's suffix, .json .md .html; json when printed)."""
    out: list[str] = field(default_factory=list)
    """File(s) to write, repeatable (`--out case.html --out case.md`: one search, several formats); none: print."""
    export: Optional[str] = None
    """Encoders (None: the export recorded in the index; must be the same weights)."""
    device: str = "cpu"
    """Torch device for the encoders."""

    def validate(self) -> list[str]:
        p = _required(("index_dir", self.index_dir, "INDEX_DIR"))
        if self.image is None and self.text is None and self.study_id is None and self.example_from is None:
            p.append('image: no query; pass --image PATH, --text "...", --study-id ID or --example-from SHARDS')
        if self.image is not None and self.text is not None:
            p.append("text: give one query, --image or --text, not both")
        if self.example_from and (self.image or self.text is not None):
            p.append("example_from: picks a study query; do not combine it with --image or --text")
        if self.target not in TARGETS:
            p.append(f"target: {self.target!r} is not one of {', '.join(TARGETS)}")
        return p + output_problems(self.format, self.out)


@dataclass
class EvalConfig(_Batches):
    """`radalign retrieval eval`: Recall@K and label precision@K with chance levels."""

    index_dir: str = ""
    """Index folder of `radalign retrieval build`."""
    shards: str = ""
    """Shards folder holding the query split."""
    split: str = "test"
    """Query split."""
    out: Optional[str] = None
    """Folder for metrics.json (None: print only)."""
    export: Optional[str] = None
    """Encoders (None: the export recorded in the index)."""
    bootstrap: int = 1000
    """Patient-level bootstrap resamples for the 95% intervals; 0: none."""
    seed: int = 0
    """Bootstrap seed."""

    def validate(self) -> list[str]:
        p = super().validate() + _required(("index_dir", self.index_dir, "INDEX_DIR"), ("shards", self.shards, "DIR"))
        return p + ([f"bootstrap: must be >= 0 (got {self.bootstrap})"] if self.bootstrap < 0 else [])


@dataclass
class ClassifyConfig(_Batches):
    """`radalign retrieval classify`: per-label probabilities from a k-NN vote, beside prompt zero-shot."""

    index_dir: str = ""
    """Index folder of `radalign retrieval build`."""
    shards: str = ""
    """Shards folder holding the query split."""
    split: str = "test"
    """Query split scored."""
    k: int = DEFAULT_K
    """Neighbours that vote."""
    temperature: Optional[float] = None
    """Softmax temperature over similarities (None: fitted on val_split when given, else the k-NN evaluation's
    standard value, DEFAULT_TEMPERATURE of retrieval/config.py)."""
    val_split: Optional[str] = None
    """Fit the temperature on this split (lowest log loss on a grid); never the scored split. Not with
    temperature."""
    prompts: Optional[str] = None
    """A binary prompt set (chexpert14, competition5 or a YAML): prompt zero-shot beside the vote, paired."""
    export: Optional[str] = None
    """Encoders (None: the export recorded in the index; another checkpoint is refused)."""
    classes: Optional[list[str]] = None
    """Labels of the headline macro AUROC (None: the prompt set's, else all)."""
    uncertain: str = "exclude"
    """Query label -1: 'exclude' from that label's metric, or 'positive' / 'negative'; with positive, uncertain
    neighbours vote for the label."""
    blank: str = "exclude"
    """Blank query label: 'exclude' from that label's metric, or 'negative'."""
    min_per_label: int = 10
    """A label enters the macro only with this many positives and as many negatives."""
    bootstrap: int = 1000
    """Patient bootstrap resamples."""
    seed: int = 0
    """Bootstrap seed."""
    out: Optional[str] = None
    """Folder for metrics.json, metrics.md, predictions.csv (None: print only)."""

    def validate(self) -> list[str]:
        p = super().validate() + _required(("index_dir", self.index_dir, "INDEX_DIR"), ("shards", self.shards, "DIR"))
        if self.temperature is not None and self.val_split is not None:
            p.append("val_split: fits the temperature; give either --temperature or --val-split, not both")
        for key, value, choices in (("uncertain", self.uncertain, UNCERTAIN_POLICIES),
                                    ("blank", self.blank, BLANK_POLICIES)):
            if value not in choices:
                p.append(f"{key}: {value!r} is not one of {', '.join(choices)}")
        return p


__all__ = ["BuildConfig", "SearchConfig", "EvalConfig", "ClassifyConfig", "DEFAULT_K", "DEFAULT_TEMPERATURE",
           "DEFAULT_FLAT_MAX"]


@dataclass
class ServeCliConfig:
    """`radalign retrieval serve`: the lookup page and JSON API over one index (retrieval/serve.py)."""

    index_dir: str = ""
    """Index folder of `radalign retrieval build`."""
    finetune_run: Optional[str] = None
    """A finetune run: study answers carry its prediction, Shapley values and similar cases."""
    export: Optional[str] = None
    """Encoders (None: the export recorded in the index)."""
    host: str = "127.0.0.1"
    """Address to bind; anything but loopback needs allow_remote."""
    allow_remote: bool = False
    """Allow a host other than loopback (no login: anyone who reaches it can query)."""
    port: int = 8765
    """Port."""
    max_upload_mb: float = 32.0
    """Largest upload in MiB."""
    max_pixels: Optional[int] = None
    """Largest image in pixels (None: data.images' limit)."""
    audit_log: str = "serve-audit.jsonl"
    """JSONL audit log of queries (ids and filters only)."""
    device: str = "cpu"
    """Torch device."""

    def validate(self) -> list[str]:
        p = _required(("index_dir", self.index_dir, "INDEX_DIR"))
        if not 0 < self.port < 65536:
            p.append(f"port: {self.port} is not a TCP port (1-65535)")
        if self.max_upload_mb <= 0:
            p.append(f"max_upload_mb: must be > 0 (got {self.max_upload_mb})")
        return p

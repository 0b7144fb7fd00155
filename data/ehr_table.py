"""The EHR table `radalign data link-ehr` writes: its format tag, its column schema, and its readers.

    table = load_table("runs/demo/ehr/finetune")   # FinetuneTable: {split: DataFrame} + the link manifest
    frame = read_ehr("runs/demo/ehr")              # OUT/ehr.parquet, every split in one frame

`data.ehr` writes the table (OUT/ehr.parquet, OUT/finetune/ as a datasets DatasetDict, OUT/manifest.json with
format EHR_FORMAT); finetune reads it through this module only. One row per study: the BASE_COLUMNS, then
each lab/vital `{name}` and `{name}_hours`, the outcomes, and in finetune/ the films, labels and indication.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from radalign import RadalignError
from radalign.io import read_format_json

EHR_FORMAT = "radalign-ehr/1"  # the "format" of a link-ehr OUT/manifest.json
# Demographics: categorical ones (finetune embeds each; this order is the embedding order) and numeric ones.
CATEGORICAL_DEMOGRAPHICS: tuple[str, ...] = ("gender", "race", "insurance", "marital_status", "language")
NUMERIC_DEMOGRAPHICS: tuple[str, ...] = ("age",)
# The demographics taken from an admission (the linked one, else the latest before the film).
ADMISSION_DEMOGRAPHICS: tuple[str, ...] = ("race", "insurance", "marital_status", "language")
DEMOGRAPHICS: tuple[str, ...] = ("gender", "age", *ADMISSION_DEMOGRAPHICS)  # column order in the table
BASE_COLUMNS: tuple[str, ...] = ("subject_id", "study_id", "split", "study_datetime", "hadm_id", "admittime",
                                 "dischtime", *DEMOGRAPHICS)
_FIX = "re-run `radalign data link-ehr`"


@dataclass
class FinetuneTable:
    """The `finetune/` DatasetDict of a link-ehr output, one DataFrame per split, with the link manifest."""

    path: Path
    """The finetune/ folder."""
    splits: dict[str, pd.DataFrame]
    """{split: one row per study}."""
    manifest: dict
    """OUT/manifest.json of the link ({} when the folder has none beside it)."""

    @property
    def features(self) -> list[str]:
        """Lab features and vitals of the link (each has `{name}` and `{name}_hours` columns)."""
        return list(self.manifest.get("features", [])) + list(self.manifest.get("vitals", []))

    def split(self, name: str) -> pd.DataFrame:
        if name not in self.splits:
            raise RadalignError(f"split {name!r} is not in the table {self.path} (it has "
                                f"{', '.join(self.splits)}); set data.*_split to one of those")
        return self.splits[name]

    @property
    def columns(self) -> list[str]:
        return list(next(iter(self.splits.values())).columns)


def load_table(path: str | os.PathLike) -> FinetuneTable:
    """The `finetune/` DatasetDict of a link-ehr output (or the output folder itself), with its manifest."""
    import datasets  # heavy (pyarrow datasets, fsspec): only the finetune readers need it

    path = Path(path)
    if (path / "finetune" / "dataset_dict.json").is_file():
        path = path / "finetune"
    if not (path / "dataset_dict.json").is_file():
        raise RadalignError(f"data.table {path}: not a finetune table (no dataset_dict.json). Pass the "
                            "`finetune/` folder written by `radalign data link-ehr --out DIR` (DIR/finetune)")
    manifest_file = path.parent / "manifest.json"
    manifest = (read_format_json(manifest_file, EHR_FORMAT, what="the --out folder of `radalign data link-ehr`",
                                 fix=_FIX) if manifest_file.is_file() else {})
    dd = datasets.load_from_disk(str(path))
    splits = {name: ds.to_pandas() for name, ds in dd.items()}
    return FinetuneTable(path, splits, manifest)


def read_ehr(out: str | os.PathLike) -> pd.DataFrame:
    """OUT/ehr.parquet after checking OUT/manifest.json (a finished link-ehr output)."""
    read_format_json(Path(out) / "manifest.json", EHR_FORMAT, what="the --out folder of `radalign data link-ehr`",
                     fix=_FIX)
    return pd.read_parquet(Path(out) / "ehr.parquet")


__all__ = ["EHR_FORMAT", "CATEGORICAL_DEMOGRAPHICS", "NUMERIC_DEMOGRAPHICS", "ADMISSION_DEMOGRAPHICS",
           "DEMOGRAPHICS", "BASE_COLUMNS", "FinetuneTable", "load_table", "read_ehr"]

"""The index folder on disk: FAISS indexes, embeddings, a metadata table and a manifest, written atomically.

    INDEX_DIR/
      manifest.json     format, encoder checksum + config, dim, normalisation, per-modality index string,
                        parameters and tuning, count, build time, data source and skip counts, file sizes
      image.faiss       FAISS index of the image embeddings (ids = metadata rows)
      image.npy         the embeddings themselves [N, D] float32 (study-id queries, re-tuning, eval)
      text.faiss/.npy   the same for report embeddings (`--modality both`)
      metadata.arrow    one row per indexed image, row i = index id i (Arrow IPC, uncompressed)

Why Arrow IPC rather than Parquet for the metadata: an uncompressed IPC file memory-maps with zero copies,
so opening a 10^6-row case base costs no RAM until columns are touched; Parquet must be decoded.
"""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from radalign.data.labels import CHEXPERT_LABELS
from radalign.data.sections import SECTION_KEYS
from radalign.retrieval.index import faiss_module

from radalign import RadalignError
from radalign.io import atomic_path, atomic_write_json, read_format_json

FORMAT = "radalign-retrieval/1"
MANIFEST = "manifest.json"
METADATA = "metadata.arrow"
MODALITIES = ("image", "text")
STRING_COLUMNS = ("key", "dicom_id", "study_id", "subject_id", "split", "view", "study_datetime", "text",
                  *(f"section_{s}" for s in SECTION_KEYS), "outcomes")


def index_file(modality: str) -> str:
    return f"{modality}.faiss"


def vectors_file(modality: str) -> str:
    return f"{modality}.npy"


def metadata_schema(labels: tuple[str, ...] = CHEXPERT_LABELS, thumbnails: bool = False) -> pa.Schema:
    fields = [pa.field("row", pa.int64())] + [pa.field(c, pa.string()) for c in STRING_COLUMNS]
    fields += [pa.field(f"label:{name}", pa.float32()) for name in labels]  # 1 / 0 / -1 (uncertain) / NaN
    if thumbnails:
        fields.append(pa.field("thumbnail", pa.binary()))  # small grayscale JPEG
    return pa.schema(fields)


def metadata_table(columns: dict[str, list], labels: tuple[str, ...] = CHEXPERT_LABELS) -> pa.Table:
    """Columns (STRING_COLUMNS, `label:<name>`, optional `thumbnail`) -> a table with `row` = 0..N-1."""
    n = len(columns["key"])
    schema = metadata_schema(labels, thumbnails="thumbnail" in columns)
    data = {"row": np.arange(n, dtype=np.int64)}
    for f in schema:
        if f.name == "row":
            continue
        values = columns.get(f.name, [None] * n)
        if len(values) != n:
            raise ValueError(f"metadata column {f.name} has {len(values)} values for {n} rows")
        data[f.name] = values
    return pa.table(data, schema=schema)


def data_uri(jpeg: bytes | None) -> str | None:
    """A stored JPEG thumbnail as a `data:` URI for self-contained HTML (None when there is none)."""
    return None if not jpeg else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def check_out_dir(out: str | os.PathLike) -> Path:
    """`--out` may be new, empty, or an index to replace; anything else is refused (before any work is done)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise RadalignError(f"--out {out}: exists and is not a retrieval index folder; choose an empty or new "
                            "folder")
    return out


def write_index_dir(out: str | os.PathLike, *, indexes: dict, vectors: dict[str, np.ndarray],
                    metadata: pa.Table, manifest: dict) -> Path:
    """Write a complete index folder into a temporary folder beside `out`, then move it into place."""
    faiss = faiss_module()
    out = check_out_dir(out)
    n = metadata.num_rows
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        files = {}
        for modality, index in indexes.items():
            if index.ntotal != n or len(vectors[modality]) != n:
                raise ValueError(f"{modality}: index holds {index.ntotal}, vectors {len(vectors[modality])}, "
                                 f"metadata {n} rows; they must agree")
            faiss.write_index(index, str(tmp / index_file(modality)))
            np.save(tmp / vectors_file(modality), np.ascontiguousarray(vectors[modality], dtype=np.float32))
            files[index_file(modality)] = (tmp / index_file(modality)).stat().st_size
            files[vectors_file(modality)] = (tmp / vectors_file(modality)).stat().st_size
        with pa.OSFile(str(tmp / METADATA), "wb") as sink, pa.ipc.new_file(sink, metadata.schema) as writer:
            writer.write_table(metadata, max_chunksize=65536)
        files[METADATA] = (tmp / METADATA).stat().st_size
        atomic_write_json(tmp / MANIFEST, {"format": FORMAT, **manifest, "count": n, "files": files})
    return out  # atomic_path moved any old index aside and removed it only once this one was in place


@dataclass
class IndexStore:
    """A loaded index folder: manifest, FAISS indexes (memory-mapped), embeddings (memory-mapped), metadata."""

    path: Path
    manifest: dict
    indexes: dict
    vectors: dict[str, np.ndarray]
    metadata: pa.Table

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def modalities(self) -> list[str]:
        return list(self.indexes)

    @property
    def labels(self) -> list[str]:
        return [n[len("label:"):] for n in self.metadata.column_names if n.startswith("label:")]

    def label_matrix(self) -> np.ndarray:
        """[N, L] float32 of 1/0/-1/NaN, in `self.labels` order."""
        cols = [self.metadata.column(f"label:{n}").to_numpy(zero_copy_only=False) for n in self.labels]
        return np.stack(cols, axis=1).astype(np.float32) if cols else np.zeros((self.count, 0), np.float32)

    def column(self, name: str) -> np.ndarray:
        return self.metadata.column(name).to_numpy(zero_copy_only=False)

    def rows_of_study(self, study_id) -> np.ndarray:
        """Rows of one study (ids compared as strings, as stored)."""
        mask = pc.equal(self.metadata.column("study_id"), pa.scalar(str(study_id)))
        return np.flatnonzero(mask.to_numpy(zero_copy_only=False))

    def row(self, i: int) -> dict:
        return {k: v[0] for k, v in self.metadata.slice(int(i), 1).to_pydict().items()}

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True) -> IndexStore:
        path = Path(path)
        manifest = read_manifest(path)
        _check_files(path, manifest)
        faiss = faiss_module()
        # MMAP_IFC maps flat codes, refine vectors, HNSW storage and IVF lists zero-copy; IO_FLAG_MMAP maps only
        # IVF lists and copies the rest into RAM (measured, faiss 1.15.1, 200k x 256: +195 MiB anonymous memory
        # for Flat, HNSW and IVF-PQ+Refine vs 0 with MMAP_IFC), which broke ivf-pq's memory budget.
        flags = (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY) if mmap else 0
        indexes, vectors = {}, {}
        for modality in manifest["modalities"]:
            f = path / index_file(modality)
            try:
                indexes[modality] = faiss.read_index(str(f), flags)
                vectors[modality] = np.load(path / vectors_file(modality), mmap_mode="r" if mmap else None)
            except Exception as e:  # FAISS raises RuntimeError with C++ text; numpy ValueError/OSError
                raise RadalignError(f"{f.parent}: cannot read {modality} index files ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:200]}); the index is corrupt: rebuild it with "
                                    f"`radalign retrieval build`") from None
            params = manifest["indexes"][modality].get("params") or {}
            if params:
                from radalign.retrieval.index import set_params

                set_params(indexes[modality], params)
        try:
            metadata = pa.ipc.open_file(pa.memory_map(str(path / METADATA))).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise RadalignError(f"{path / METADATA}: unreadable ({e}); rebuild the index") from None
        store = cls(path, manifest, indexes, vectors, metadata)
        store._check_counts()
        return store

    def _check_counts(self) -> None:
        n = self.count
        for modality, index in self.indexes.items():
            found = {"index": index.ntotal, "embeddings": len(self.vectors[modality]), "metadata": self.metadata.num_rows}
            if any(v != n for v in found.values()) or index.d != self.dim:
                raise RadalignError(f"{self.path}: {modality} files disagree with the manifest (count {n}, dim "
                                    f"{self.dim}; found {found}, index dim {index.d}); rebuild the index")


def read_manifest(path: Path) -> dict:
    return read_format_json(path / MANIFEST, FORMAT, what="the --out folder of `radalign retrieval build`",
                            fix="rebuild the index")


def _check_files(path: Path, manifest: dict) -> None:
    """Every file the manifest lists exists with its recorded size (catches partial copies, truncation)."""
    for name, size in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise RadalignError(f"{f}: missing from the index folder; rebuild the index or restore the file")
        if f.stat().st_size != size:
            raise RadalignError(f"{f}: {f.stat().st_size} bytes, the manifest says {size} (truncated or "
                                f"replaced); rebuild the index")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


__all__ = ["FORMAT", "MANIFEST", "METADATA", "MODALITIES", "STRING_COLUMNS", "IndexStore", "write_index_dir",
           "metadata_table", "metadata_schema", "read_manifest", "data_uri", "check_out_dir", "index_file",
           "vectors_file", "now_iso"]

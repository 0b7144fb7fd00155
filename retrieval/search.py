"""Similar-case search with explanations: `Retriever.load(index_dir).search(image=... | text=... | study_id=...)`.

Results are cases, not images: several images of one study collapse into the best-scoring one, and the query's
own patient can be left out (default for study queries, where the patient's other studies would otherwise
fill the list). FAISS is asked for more than k (`k * overfetch`) and the request widens until k cases survive
the filters or the index is exhausted; what the filters removed is counted in the result.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from radalign.data.embed import check_query_text, thumbnail_jpeg
from radalign.data.shards import find_samples
from radalign.retrieval import index as ix
from radalign.retrieval.store import IndexStore, data_uri

from radalign import RadalignError
from radalign.log import get_logger

log = get_logger("radalign.retrieval.search")
EXCERPT_CHARS = 240


@dataclass
class Hits:
    """Filtered neighbours of one query: rows and similarities, best first, and what was filtered out."""

    rows: list[int]
    scores: list[float]
    filtered: dict[str, int] = field(default_factory=lambda: {"same_patient": 0, "same_study": 0})


@dataclass
class SearchResult:
    """One query's k similar cases with the label explanation; render with retrieval.render."""

    query: dict
    k: int
    neighbours: list[dict]
    explanation: list[dict]
    filtered: dict[str, int]
    index: dict

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, thumbnails: bool = False) -> str:
        d = self.to_dict()
        if not thumbnails:  # base64 images are for the HTML page; programs can re-read them from the index
            d["query"].pop("thumbnail", None)
            for n in d["neighbours"]:
                n.pop("thumbnail", None)
        return json.dumps(d, indent=2, default=str)


class Retriever:
    """A loaded index plus (lazily) the encoders that built it, checked to be the same ones."""

    def __init__(self, store: IndexStore, encoders=None, checkpoint: str | os.PathLike | None = None,
                 device: str = "cpu"):
        self.store = store
        self._encoders = None
        self._checkpoint = checkpoint
        self._device = device
        self.last_text_cut: dict | None = None  # lengths when the last text query was longer than the context
        if encoders is not None:
            self.encoders = encoders

    @classmethod
    def load(cls, index_dir: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None, encoders=None,
             device: str = "cpu", mmap: bool = True) -> Retriever:
        return cls(IndexStore.load(index_dir, mmap=mmap), encoders=encoders, checkpoint=checkpoint,
                   device=device)

    # ------------------------------------------------------------------------------------------------------
    # Encoders, checked against the index.

    @property
    def encoders(self):
        if self._encoders is None:
            ckpt = self._checkpoint or self.store.manifest["encoder"].get("checkpoint")
            if not ckpt or not Path(ckpt).exists():
                raise RadalignError(f"{self.store.path}: the encoder export it was built with ({ckpt}) is not "
                                    f"there; pass --export RUN_OR_EXPORT (the same weights)")
            from radalign.pretrain.export import load_encoders

            self.encoders = load_encoders(ckpt, device=self._device)
        return self._encoders

    @encoders.setter
    def encoders(self, enc) -> None:
        check_encoder(self.store.manifest, enc, self.store.path)
        self._encoders = enc

    def embed_image(self, image) -> np.ndarray:
        """A PIL image or an image file path -> [D] L2-normalised."""
        pil = load_query_image(image)
        x = self.encoders.image_transform()(pil).unsqueeze(0)  # [1, C, H, W]
        return ix.normalize(self.encoders.encode_images(x).cpu().numpy())[0]  # encode_images runs under no_grad

    def embed_text(self, text: str) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise RadalignError("--text: empty query text; give a report sentence, e.g. --text \"large left "
                                "pleural effusion\"")
        self.last_text_cut = check_query_text(self.encoders.tokenize, text)  # warns with the lengths
        return ix.normalize(self.encoders.encode_texts([text]).cpu().numpy())[0]

    # ------------------------------------------------------------------------------------------------------
    # Search.

    def search(self, *, image=None, text: str | None = None, study_id=None, vector: np.ndarray | None = None,
               k: int = 5, target: str = "image", exclude_patient: bool | None = None,
               subject_id=None, dedup_study: bool = True, query_info: dict | None = None,
               overfetch: int = 4, allowed: np.ndarray | None = None) -> SearchResult:
        """The k most similar cases to exactly one of image / text / study_id (in the index) / vector.

        exclude_patient: leave out cases of the query's patient (default: on for study_id queries, which
        know their patient; for others pass `subject_id`). Study queries always leave out the study itself.
        allowed: bool [N], the rows a case may come from (metadata filters: view, date, labels...); others are
        skipped before the one-image-per-study rule and counted as `filtered["not_allowed"]`.
        """
        given = [n for n, v in (("image", image), ("text", text), ("study_id", study_id), ("vector", vector))
                 if v is not None]
        if len(given) != 1:
            raise RadalignError(f"give exactly one query (--image, --text or --study-id); got {given or 'none'}")
        self._check_k(k)
        query = dict(query_info or {})
        exclude_study = None
        if image is not None:
            q = self.embed_image(image)
            query.setdefault("kind", "image")
            query.setdefault("source", str(image) if isinstance(image, (str, os.PathLike)) else "PIL image")
        elif text is not None:
            q = self.embed_text(text)
            query.update(kind="text", text=text)
            if self.last_text_cut:
                query["text_cut"] = self.last_text_cut  # chars, chars_used, context_tokens
        elif study_id is not None:
            q, info = self._study_query(study_id, target)
            query.update(info)
            subject_id = info.get("subject_id") if subject_id is None else subject_id
            exclude_study = str(study_id)
            exclude_patient = True if exclude_patient is None else exclude_patient
        else:
            q = ix.normalize(np.asarray(vector, dtype=np.float32).reshape(1, -1))[0]
            query.setdefault("kind", "vector")
            if query["kind"] == "study":  # a study from outside the index (query_from_shards)
                exclude_study = query.get("study_id")
                subject_id = query.get("subject_id") if subject_id is None else subject_id
                exclude_patient = True if exclude_patient is None else exclude_patient
        if q.shape[-1] != self.store.dim:
            raise RadalignError(f"query vector has dim {q.shape[-1]}, the index {self.store.dim}")
        subject = str(subject_id) if (exclude_patient and subject_id is not None) else None
        if exclude_patient and subject is None:
            log.warning("exclude_patient asked but the query's patient is unknown; nothing excluded")
        hits = self.search_vectors(q[None], k, target=target, exclude_subjects=[subject],
                                   exclude_studies=[exclude_study], dedup_study=dedup_study,
                                   overfetch=overfetch, allowed=allowed)[0]
        neighbours = [self.describe_row(r, s, rank=i + 1) for i, (r, s) in enumerate(zip(hits.rows, hits.scores))]
        if len(neighbours) < k:
            log.warning("only %d of k=%d cases left after the filters (%s)", len(neighbours), k, hits.filtered)
        return SearchResult(query=query, k=k, neighbours=neighbours,
                            explanation=explain(neighbours, self.store.labels, query.get("labels")),
                            filtered=hits.filtered, index=self._index_summary(target))

    def search_vectors(self, q: np.ndarray, k: int, *, target: str = "image", exclude_subjects=None,
                       exclude_studies=None, dedup_study: bool = True, overfetch: int = 4,
                       allowed: np.ndarray | None = None) -> list[Hits]:
        """Batch search of L2-normalised queries [Q, D] with the case filters; one `Hits` per query.
        allowed: bool [N] rows that may be returned (None: all)."""
        index = self._index(target)
        self._check_k(k)
        n = self.store.count
        q = np.ascontiguousarray(q, dtype=np.float32)
        exclude_subjects = list(exclude_subjects) if exclude_subjects is not None else [None] * len(q)
        exclude_studies = list(exclude_studies) if exclude_studies is not None else [None] * len(q)
        filtering = dedup_study or allowed is not None or any(s is not None for s in exclude_subjects + exclude_studies)
        fetch = min(n, k * overfetch if filtering else k)
        studies, subjects = self._id_columns()
        results: list[Hits | None] = [None] * len(q)
        todo = np.arange(len(q))
        while len(todo):
            scores, ids = ix.search(index, q[todo], fetch)  # [T, fetch] each
            again = []
            for t, qi in enumerate(todo):
                hits = _filter(ids[t], scores[t], k, studies, subjects, exclude_subjects[qi], exclude_studies[qi],
                               dedup_study, allowed)
                if len(hits.rows) < k and fetch < n:
                    again.append(qi)  # not enough cases survived: ask FAISS for more
                results[qi] = hits
            todo = np.asarray(again, dtype=np.int64)
            fetch = min(n, fetch * 4)
        return results  # type: ignore[return-value]

    def _check_k(self, k: int) -> None:
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise RadalignError(f"--k {k}: must be a positive whole number")
        if k > self.store.count:
            raise RadalignError(f"--k {k}: larger than the index ({self.store.count} cases); use --k "
                                f"{self.store.count} or less")

    def _index(self, target: str):
        if target not in self.store.indexes:
            raise RadalignError(f"--target {target}: this index holds {', '.join(self.store.modalities)} "
                                f"embeddings; rebuild with --modality both to search reports")
        return self.store.indexes[target]

    def _id_columns(self) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(self, "_ids"):
            self._ids = (self.store.column("study_id"), self.store.column("subject_id"))
        return self._ids

    def _study_query(self, study_id, target: str) -> tuple[np.ndarray, dict]:
        rows = self.store.rows_of_study(study_id)
        if not len(rows):
            raise RadalignError(f"--study-id {study_id}: not in this index ({self.store.count} images of split "
                                f"{self.store.manifest['data'].get('split')!r}); use --example-from SHARDS "
                                f"--split test --study-id {study_id} for a study outside it")
        views = self.store.metadata.column("view").take(pa.array(rows)).to_pylist()  # only the study's rows
        frontal = [r for r, v in zip(rows, views) if v in ("PA", "AP")]
        row = int((frontal or list(rows))[0])  # a frontal image speaks for the study when there is one
        q = np.asarray(self.store.vectors["image"][row], dtype=np.float32)
        info = self.describe_row(row, None, rank=0)
        info.update(kind="study", images_in_study=len(rows))
        return q, info

    def describe_row(self, row: int, score: float | None, rank: int) -> dict:
        """A metadata row as a result entry: ids, similarity, excerpt, positive labels, outcome, thumbnail."""
        r = self.store.row(row)
        labels = {name: r[f"label:{name}"] for name in self.store.labels}
        impression = r.get("section_impression") or ""
        excerpt = (impression or r.get("text") or "").strip()
        return {
            "rank": rank, "row": int(row), "similarity": None if score is None else round(float(score), 4),
            "dicom_id": r["dicom_id"], "study_id": r["study_id"], "subject_id": r["subject_id"],
            "split": r["split"], "view": r["view"], "study_datetime": r["study_datetime"],
            "excerpt": excerpt[:EXCERPT_CHARS] + ("..." if len(excerpt) > EXCERPT_CHARS else ""),
            "labels": positive_labels(labels),
            "uncertain": [n for n, v in labels.items() if v == -1],
            "outcomes": json.loads(r["outcomes"]) if r.get("outcomes") else None,
            "thumbnail": data_uri(r.get("thumbnail")),
        }

    def _index_summary(self, target: str) -> dict:
        m = self.store.manifest
        entry = m["indexes"][target]
        return {"path": str(self.store.path), "target": target, "count": m["count"], "index_string":
                entry["index_string"], "params": entry.get("params"), "encoder_checksum": m["encoder"]["checksum"]}


def _filter(ids, scores, k, studies, subjects, exclude_subject, exclude_study, dedup, allowed=None) -> Hits:
    hits = Hits([], [])
    if allowed is not None:
        hits.filtered["not_allowed"] = 0
    seen: set = set()
    for i, s in zip(ids.tolist(), scores.tolist()):
        if len(hits.rows) == k:
            break  # what lies beyond rank k is neither shown nor counted as filtered
        if i < 0:
            continue  # FAISS pads with -1 when it found fewer than asked
        if allowed is not None and not allowed[i]:
            hits.filtered["not_allowed"] += 1
            continue
        if exclude_subject is not None and subjects[i] == exclude_subject:
            hits.filtered["same_patient"] += 1
            continue
        if exclude_study is not None and studies[i] == exclude_study:
            hits.filtered["same_study"] += 1
            continue
        if dedup:
            if studies[i] in seen:  # results come best first: the first image of a study is its best one
                hits.filtered["same_study"] += 1
                continue
            seen.add(studies[i])
        hits.rows.append(i)
        hits.scores.append(s)
    return hits


def positive_labels(labels: dict) -> list[str]:
    return [n for n, v in labels.items() if v == 1]


def explain(neighbours: list[dict], labels: list[str], query_labels: list[str] | None = None) -> list[dict]:
    """Per label: how many neighbours carry it, the similarity-weighted share, and which ones.

    Weighted share = sum(sim_i * y_i) / sum(sim_i) over the neighbours, with similarities clipped at 0 (a
    negative cosine is no evidence for or against). Sorted by count, then weighted share.
    """
    total = sum(max(n["similarity"] or 0.0, 0.0) for n in neighbours)
    out = []
    for name in labels:
        carry = [n for n in neighbours if name in n["labels"]]
        if not carry:
            continue
        w = sum(max(n["similarity"] or 0.0, 0.0) for n in carry)
        out.append({
            "label": name, "count": len(carry), "of": len(neighbours),
            "weighted": round(w / total, 4) if total > 0 else round(len(carry) / len(neighbours), 4),
            "studies": [n["study_id"] for n in carry], "dicom_ids": [n["dicom_id"] for n in carry],
            "query_has": None if query_labels is None else name in query_labels,
            "text": f"{len(carry)}/{len(neighbours)} similar cases: {name.lower()}",
        })
    return sorted(out, key=lambda e: (-e["count"], -e["weighted"], e["label"]))


def check_encoder(manifest: dict, enc, where) -> None:
    """The encoders must be the ones the index was built with: same checksum, same embedding dim."""
    want = manifest["encoder"]
    if int(enc.embed_dim) != int(manifest["dim"]):
        raise RadalignError(f"{where}: index embeddings have dim {manifest['dim']}, the encoders give "
                            f"{enc.embed_dim}; use the checkpoint the index was built with ({want.get('checkpoint')}) "
                            f"or rebuild the index")
    if enc.checksum != want["checksum"]:
        raise RadalignError(f"{where}: built with encoder checksum {want['checksum'][:12]}..., these encoders are "
                            f"{enc.checksum[:12]}...; embeddings from different weights are not comparable: use "
                            f"{want.get('checkpoint')} or rebuild the index with this checkpoint")


def load_query_image(image, max_pixels: int | None = None):
    """A PIL image, or a file read through `data.images` (pixel limit checked before decoding, the one
    grayscale conversion); a clear error for missing, oversized or unreadable files."""
    from PIL import Image
    from radalign.data.images import DEFAULT_MAX_PIXELS, OversizedImageError, open_image, to_gray8

    if isinstance(image, Image.Image):
        return to_gray8(image)
    path = Path(image)
    if not path.is_file():
        raise RadalignError(f"--image {path}: no such file")
    try:
        return to_gray8(open_image(path, max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels))
    except OversizedImageError as e:
        raise RadalignError(f"--image {e}") from None
    except Exception as e:  # untrusted file bytes: any decoder error means "not an image we can read"
        raise RadalignError(f"--image {path}: not a readable image ({type(e).__name__}); give a JPEG or PNG") from None


def query_from_shards(retriever: Retriever, data, split: str, study_id=None) -> tuple[np.ndarray, dict]:
    """A query case from shards outside the index: the given study, else the first study with a finding.

    Returns (embedding [D], query info with ids, labels and thumbnail). The image goes through the same
    encoders (checked against the index) as the case base. The study is found from the shards' json members;
    only its film is decoded.
    """
    from radalign.data.loader import decode_sample

    enc = retriever.encoders
    for found in find_samples(data, lambda s: _query_wanted(s.meta, study_id), splits=[split]):
        sample = decode_sample(found, enc.image_transform())
        if sample is None:  # a corrupt film is skipped, as the loader skips it
            continue
        image, meta, key = sample["image"], sample["meta"], sample["key"]
        q = ix.normalize(enc.encode_images(image[None]).cpu().numpy())[0]
        sections = meta.get("sections") or {}
        excerpt = (sections.get("impression") or "").strip()[:EXCERPT_CHARS]
        info = {"kind": "study", "source": f"{data} ({split})", "dicom_id": meta.get("dicom_id", key),
                "study_id": str(meta.get("study_id")), "subject_id": str(meta.get("subject_id")),
                "view": meta.get("view"), "labels": positive_labels(meta.get("labels") or {}), "excerpt": excerpt,
                "thumbnail": data_uri(thumbnail_jpeg(image, enc.config["mean"], enc.config["std"], 128))}
        return q, info
    what = f"study {study_id}" if study_id is not None else "a frontal study with a finding"
    raise RadalignError(f"--example-from {data} --split {split}: found no {what}")


def _query_wanted(meta: dict, study_id) -> bool:
    """The given study, else a frontal study with a finding (not only No Finding)."""
    if study_id is not None:
        return str(meta.get("study_id")) == str(study_id)
    labels = positive_labels(meta.get("labels") or {})
    return bool(labels) and labels != ["No Finding"] and meta.get("view") in ("PA", "AP")


__all__ = ["Retriever", "SearchResult", "Hits", "explain", "check_encoder", "load_query_image",
           "query_from_shards", "positive_labels", "data_uri"]

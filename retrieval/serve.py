"""`radalign retrieval serve`: the similar-case lookup as a local web service and page (FastAPI + uvicorn).

    app = serve_api.create_app("runs/demo/retrieval/index")      # encoders and index loaded once, here
    serve(app, host="127.0.0.1", port=8765)             # what the CLI verb does

The page (static/index.html, app.js, app.css: served from the package, nothing from a CDN) and scripts use
the same JSON API (OpenAPI schema at /openapi.json, browsable at /docs):

    GET  /api/info                   the index, the filters it supports with their values, the limits
    POST /api/search/text            {"text": "...", "k": 8, "filters": {...}}
    POST /api/search/study           {"study_id": "...", "k": 8, "exclude_patient": true, "filters": {...}}
    POST /api/search/image?k=8&filters={...}   body: the file's bytes (JPEG, PNG or DICOM, told by its bytes)
    GET  /api/case/{study_id}        one case of the index: report sections, labels, images, explanation
    GET  /api/thumbnail/{dicom_id}   its stored JPEG thumbnail, looked up by id in the index (never a path)

Results are `Retriever.search`'s (retrieval.search: one image per study, the query's patient left out of
study queries, the k-NN label vote of `explain`) with the metadata filters as its `allowed` rows. With an
explainer (`--finetune-run`, found through the `radalign.serve_explainers` entry point, so retrieval never
imports finetune), study answers carry what `radalign finetune explain` computes for the study.

Safe by default: binds 127.0.0.1 (another address only with allow_remote, logged as a warning); Host headers
other than the bound names refused (DNS rebinding); read-only (the index is memory-mapped read-only; the only
file written is the audit log); uploads capped in bytes (before they are read whole), in pixels from the
header before decoding (PIL's decompression-bomb guard, then `data.images`' cap; DICOM Rows x Columns through
`data.dicom`); a malformed upload is a 4xx naming the reason; JSON carries text verbatim and the page shows
it through `textContent` only, under a Content-Security-Policy that runs no inline script. The audit log
(JSONL) holds the time, query kind, filters, k and result ids: no pixels, no query or report text, no DICOM
header.
"""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
import json
import os
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from radalign.data.dicom import DicomRefused, read_dicom
from radalign.data.images import DEFAULT_MAX_PIXELS, OversizedImageError, open_image, to_gray8
from radalign.data.sections import SECTION_KEYS
from radalign.retrieval.search import Retriever

from radalign import RadalignError
from radalign.log import get_logger

log = get_logger("radalign.retrieval.serve")
STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")  # as Host headers name them
EXPLAINER_GROUP = "radalign.serve_explainers"
DATE_FILTER = "study_datetime"


@dataclass
class ServeConfig:
    """Limits and files of one service (the CLI's flags)."""

    max_upload_bytes: int = 32 * 1024 * 1024
    """uploads above this many bytes are refused (413) before they are read whole"""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """width x height (DICOM: rows x columns x frames) above this is refused (413) before decoding"""
    max_k: int = 100
    """the largest k a query may ask for"""
    default_k: int = 8
    """k when a query gives none"""
    audit_log: str | None = "serve-audit.jsonl"
    """JSONL audit log (time, query kind, filters, k, result ids); None: no log"""
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES
    """Host header values served (others get 400: a DNS-rebinding page cannot reach the service)"""


class UploadRefused(RadalignError):
    """An upload the service will not read: the HTTP status and a reason code with the message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


# ----------------------------------------------------------------------------------------------------------
# Binding


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def check_bind(host: str, allow_remote: bool) -> None:
    """Loopback always; any other address only with allow_remote (and a warning: there is no login)."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise RadalignError(f"--host {host}: not a loopback address; the service has no login, so anyone who "
                            f"can reach {host} could query the case base. Keep the default 127.0.0.1 (reach it "
                            f"through an SSH tunnel), or pass --allow-remote to serve on {host} anyway")
    log.warning("serving on %s, reachable from other machines: the service has no login; every query is in "
                "the audit log", host)


def allowed_hosts(host: str) -> tuple[str, ...]:
    """Host headers to serve: the loopback names, plus the bound address; any for 0.0.0.0 / :: (all of them)."""
    bare = host.strip("[]")
    if bare in ("0.0.0.0", "::"):
        return ("*",)
    if is_loopback(bare):
        return LOOPBACK_NAMES
    return (*LOOPBACK_NAMES, f"[{bare}]" if ":" in bare else bare)  # an IPv6 literal comes in brackets


# ----------------------------------------------------------------------------------------------------------
# Uploads


def sniff(data: bytes) -> str | None:
    """"dicom" | "png" | "jpeg" from the bytes themselves (the file name and Content-Type are not trusted)."""
    if len(data) > 132 and data[128:132] == b"DICM":
        return "dicom"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    return None


def decode_upload(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Upload bytes -> (8-bit grayscale PIL image, query info). Raises UploadRefused with a 4xx status."""
    if not data:
        raise UploadRefused(400, "empty_upload", "the upload is empty; choose a JPEG, PNG or DICOM file")
    kind = sniff(data)
    if kind is None:
        raise UploadRefused(415, "unsupported_format", "not a JPEG, PNG or DICOM file (judged by its first "
                                                       "bytes); export the film as one of those")
    if kind == "dicom":
        try:
            img, info = read_dicom(data, max_pixels=max_pixels, name="uploaded DICOM")
        except DicomRefused as e:
            raise UploadRefused(413 if e.reason == "oversized_image" else 422, e.reason, str(e)) from None
        return img, {"format": "DICOM", "modality": info.modality, "view": info.view, "width": info.columns,
                     "height": info.rows}
    img = _decode_picture(data, kind, max_pixels)
    return img, {"format": kind.upper(), "width": img.width, "height": img.height}


def _decode_picture(data: bytes, kind: str, max_pixels: int):
    """PIL's own decompression-bomb guard on the header, then `data.images`' explicit cap and conversion."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.open(io.BytesIO(data)).close()  # header only: raises for more than Image.MAX_IMAGE_PIXELS
        return to_gray8(open_image(io.BytesIO(data), max_pixels=max_pixels))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, OversizedImageError) as e:
        raise UploadRefused(413, "oversized_image", f"uploaded {kind.upper()}: too many pixels "
                            f"({str(e).split(': ', 1)[-1][:160]}); the limit is {max_pixels:,}") from None
    except Exception as e:  # untrusted bytes: any decoder error means "not an image we can read"
        raise UploadRefused(422, "unreadable_image", f"uploaded {kind.upper()}: not a readable image "
                            f"({type(e).__name__}); the file is damaged or not what its first bytes say") from None


# ----------------------------------------------------------------------------------------------------------
# Filters


@dataclass
class Filters:
    """Metadata filters; a case must pass every one that is set (lists: any of the values)."""

    view: list[str] | None = None
    """keep these views (PA, AP, LATERAL, ...)"""
    split: list[str] | None = None
    """keep cases of these splits"""
    date_from: str | None = None
    """study date on or after this day (YYYY-MM-DD); cases without a date are left out"""
    date_to: str | None = None
    """study date on or before this day (YYYY-MM-DD)"""
    labels_present: list[str] = field(default_factory=list)
    """labels the case must carry (1)"""
    labels_absent: list[str] = field(default_factory=list)
    """labels the case must not carry: negative (0) or not mentioned; uncertain (-1) is neither"""
    sex: list[str] | None = None
    """keep these sexes (where the index or the finetune run's table has them)"""
    age_band: list[str] | None = None
    """keep these age bands (as `finetune eval` groups them)"""

    @classmethod
    def parse(cls, d: dict | None) -> Filters:
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise RadalignError(f"filters: unknown key(s) {unknown}; valid: {', '.join(cls.__dataclass_fields__)}")
        f = cls(**{k: v for k, v in d.items() if v not in (None, "", [])})
        for name in ("view", "split", "labels_present", "labels_absent", "sex", "age_band"):
            v = getattr(f, name)
            if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) for x in v)):
                raise RadalignError(f"filters.{name}: {v!r} must be a list of strings")
        for name in ("date_from", "date_to"):
            v = getattr(f, name)
            if v is not None:
                try:
                    dt.date.fromisoformat(str(v))
                except ValueError:
                    raise RadalignError(f"filters.{name}: {v!r} is not a date; write YYYY-MM-DD") from None
        return f

    def active(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, [])}


class CaseTable:
    """The index's metadata as numpy columns for filtering, plus sex / age band where known."""

    def __init__(self, retriever: Retriever, demographics: dict[str, dict] | None = None):
        store = retriever.store
        self.store = store
        self.columns = {c: store.column(c).astype(object) for c in ("study_id", "subject_id", "dicom_id", "view",
                                                                       "split", DATE_FILTER)}
        self.dates = np.array([str(v)[:10] if v else "" for v in self.columns[DATE_FILTER]], dtype="<U10")  # [N]
        self.labels = store.labels
        self._label_matrix = store.label_matrix()  # [N, L]
        self.rows_by_dicom = {str(d): i for i, d in enumerate(self.columns["dicom_id"])}
        for name in ("sex", "age_band"):
            own = _own_column(store, name)
            if own is not None:
                self.columns[name] = own
            elif demographics:
                self.columns[name] = np.array([(demographics.get(str(s)) or {}).get(name)
                                               for s in self.columns["study_id"]], dtype=object)

    def values(self, name: str) -> list[str]:
        col = self.columns.get(name)
        return [] if col is None else sorted({str(v) for v in col if v is not None and v == v and v != ""})

    def options(self) -> dict:
        dates = self.dates[self.dates != ""].tolist()
        return {"view": self.values("view"), "split": self.values("split"), "labels": list(self.labels),
                "sex": self.values("sex"), "age_band": self.values("age_band"),
                "date_min": min(dates) if len(dates) else None, "date_max": max(dates) if len(dates) else None}

    def mask(self, f: Filters) -> np.ndarray | None:
        """bool [N] of the rows that pass every filter; None when no filter is set."""
        if not f.active():
            return None
        keep = np.ones(self.store.count, dtype=bool)
        for name in ("view", "split", "sex", "age_band"):
            wanted = getattr(f, name)
            if wanted is not None:
                keep &= np.isin(self._column(name), np.asarray(wanted, dtype=object))
        if f.date_from:
            keep &= (self.dates != "") & (self.dates >= f.date_from)  # ISO days compare as text
        if f.date_to:
            keep &= (self.dates != "") & (self.dates <= f.date_to)
        for name in f.labels_present:
            keep &= self._label(name) == 1
        for name in f.labels_absent:
            y = self._label(name)
            keep &= (y == 0) | np.isnan(y)
        return keep

    def _column(self, name: str) -> np.ndarray:
        if name not in self.columns:
            raise RadalignError(f"filters.{name}: this index has no {name} (it needs a `{name}` metadata column "
                                f"or --finetune-run with a table that has it); remove the filter")
        return self.columns[name]

    def _label(self, name: str) -> np.ndarray:
        if name not in self.labels:
            raise RadalignError(f"filters: label {name!r} is not in this index; valid: {', '.join(self.labels)}")
        return self._label_matrix[:, self.labels.index(name)]


def _own_column(store, name: str) -> np.ndarray | None:
    """The index's own sex / age-band column when its metadata has one (`gender` is sex in MIMIC-IV)."""
    names = {"sex": ("sex", "gender"), "age_band": ("age_band",)}[name]
    have = [c for c in names if c in store.metadata.column_names]
    return store.column(have[0]).astype(object) if have else None


# ----------------------------------------------------------------------------------------------------------
# The service


class AuditLog:
    """Append-only JSONL, one line per answered or refused request: ids and filters, never text or pixels."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()

    def write(self, kind: str, *, status: int, filters: dict | None = None, k: int | None = None,
              result_ids: list[str] | None = None, query_id: str | None = None, reason: str | None = None) -> None:
        if self.path is None:
            return
        entry = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "kind": kind,
                 "status": status, "k": k, "filters": filters or {}, "query_study_id": query_id,
                 "result_ids": result_ids or [], "reason": reason}
        line = json.dumps(entry, default=str) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


class Service:
    """The loaded index, encoders and optional explainer; thread-safe queries (one model call at a time)."""

    def __init__(self, retriever: Retriever, config: ServeConfig, explainer=None):
        self.retriever, self.config, self.explainer = retriever, config, explainer
        _ = retriever.encoders  # load (and check against the index) now, not on the first query
        demographics = explainer.demographics() if explainer is not None else None
        self.cases = CaseTable(retriever, demographics)
        self.audit = AuditLog(config.audit_log)
        self._lock = threading.Lock()  # Retriever keeps per-query state (last_text_cut); torch runs one at a time

    def info(self) -> dict:
        s = self.retriever.store
        return {"index": {"path": s.path.name, "count": s.count, "dim": s.dim, "modalities": s.modalities,
                          "split": s.manifest.get("data", {}).get("split"),
                          "encoder_checksum": s.manifest["encoder"]["checksum"][:12]},
                "filters": self.cases.options(), "task": getattr(self.explainer, "task", None),
                "limits": {"max_upload_bytes": self.config.max_upload_bytes, "max_pixels": self.config.max_pixels,
                           "max_k": self.config.max_k, "default_k": self.config.default_k}}

    def search(self, *, k: int | None, filters: Filters, image=None, text: str | None = None,
               study_id: str | None = None, exclude_patient: bool | None = None, query_info: dict | None = None,
               ) -> dict:
        """One query (exactly one of image, text, study_id) as the API's answer; RadalignError when refused."""
        k = self._k(k)
        allowed = self.cases.mask(filters)
        with self._lock:
            res = self.retriever.search(image=image, text=text, study_id=study_id, k=min(k, self.retriever.store.count),
                                        exclude_patient=exclude_patient, query_info=query_info, allowed=allowed)
            explanation = self._explain(study_id, k) if study_id is not None else None
        query = {key: v for key, v in res.query.items() if key not in ("thumbnail", "excerpt", "source", "row")}
        if study_id is not None:
            query["dicom_id"] = res.query.get("dicom_id")
        return {"query": query, "k": k, "filters": filters.active(), "filtered": res.filtered,
                "neighbours": [self.case_entry(n) for n in res.neighbours], "vote": res.explanation,
                "explanation": explanation, "index": {"count": res.index["count"], "target": res.index["target"]}}

    def case_entry(self, n: dict) -> dict:
        """A neighbour for the API: ids, similarity, labels, report sections (verbatim), thumbnail URL."""
        row = self.retriever.store.row(n["row"])
        out = {key: n[key] for key in ("rank", "row", "similarity", "dicom_id", "study_id", "subject_id", "split",
                                       "view", "study_datetime", "labels", "uncertain", "outcomes")}
        out["sections"] = {s: row.get(f"section_{s}") for s in SECTION_KEYS if row.get(f"section_{s}")}
        out["report"] = row.get("text")
        out["thumbnail_url"] = f"/api/thumbnail/{n['dicom_id']}" if row.get("thumbnail") else None
        for name in ("sex", "age_band"):
            if name in self.cases.columns:
                out[name] = self.cases.columns[name][n["row"]]
        return out

    def case(self, study_id: str, k: int | None = None) -> dict:
        rows = self.retriever.store.rows_of_study(study_id)
        if not len(rows):
            raise LookupError(f"study {study_id}: not in this index")
        entries = [self.case_entry(self.retriever.describe_row(int(r), None, rank=0)) for r in rows]
        with self._lock:
            explanation = self._explain(study_id, self._k(k))
        first = entries[0]
        return {**{key: first[key] for key in ("study_id", "subject_id", "split", "study_datetime", "labels",
                                               "uncertain", "outcomes", "sections", "report")},
                **{name: first[name] for name in ("sex", "age_band") if name in first},
                "images": [{key: e[key] for key in ("dicom_id", "view", "thumbnail_url")} for e in entries],
                "explanation": explanation}

    def thumbnail(self, dicom_id: str) -> bytes | None:
        row = self.cases.rows_by_dicom.get(dicom_id)
        return None if row is None else self.retriever.store.row(row).get("thumbnail")

    def _explain(self, study_id: str | None, k: int) -> dict | None:
        if self.explainer is None or study_id is None:
            return None
        return self.explainer.explain(str(study_id), k)

    def _k(self, k: int | None) -> int:
        k = self.config.default_k if k is None else k
        if not isinstance(k, int) or not 1 <= k <= self.config.max_k:
            raise RadalignError(f"k={k!r}: give a whole number from 1 to {self.config.max_k}")
        return k


def load_explainer(finetune_run: str | os.PathLike, index_dir: str | os.PathLike):
    """The explainer registered under the `radalign.serve_explainers` entry point (finetune's), for a run."""
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group=EXPLAINER_GROUP)}
    if "finetune" not in found:
        raise RadalignError(f"--finetune-run {finetune_run}: no explainer registered under the "
                            f"{EXPLAINER_GROUP} entry point; reinstall radalign (pip install -e .)")
    return found["finetune"].load()(finetune_run, index_dir)


def serve(app, host: str = "127.0.0.1", port: int = 8765, allow_remote: bool = False) -> None:
    """Run the app with uvicorn (after the bind check)."""
    import uvicorn

    check_bind(host, allow_remote)
    log.info("serving on http://%s:%d/ (Ctrl-C stops)", host if ":" not in host else f"[{host}]", port)
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["ServeConfig", "Filters", "CaseTable", "Service", "AuditLog", "UploadRefused",
           "serve", "check_bind", "allowed_hosts", "is_loopback", "sniff", "decode_upload", "load_explainer"]

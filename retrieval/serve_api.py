"""The HTTP face of `radalign retrieval serve`: routes, request bodies, error statuses, security headers, and
one audit line per query (retrieval/serve.py holds the service itself; this module only translates)."""

from __future__ import annotations

import json
import os
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from radalign.retrieval.search import Retriever
from radalign.retrieval.serve import (
    STATIC,
    Filters,
    ServeConfig,
    Service,
    UploadRefused,
    decode_upload,
    load_explainer,
)
from starlette.middleware.trustedhost import TrustedHostMiddleware

from radalign import RadalignError

FILTERS_DOC = ("metadata filters, each optional: view, split, sex, age_band (lists of values); date_from, date_to "
               "(YYYY-MM-DD); labels_present, labels_absent (label names). GET /api/info lists the values")
# The page loads only its own files; images are its own thumbnails or a local preview (blob:) of the upload.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class TextQuery(BaseModel):
    text: str = Field(min_length=1, max_length=10_000, description="a report sentence, e.g. 'left pleural effusion'")
    k: int | None = Field(None, description="number of cases (default and maximum: GET /api/info)")
    filters: dict[str, Any] | None = Field(None, description=FILTERS_DOC)


class StudyQuery(BaseModel):
    study_id: str = Field(min_length=1, max_length=64, description="a study id of the index")
    k: int | None = Field(None, description="number of cases")
    exclude_patient: bool = Field(True, description="leave out the query's own patient (on by default)")
    filters: dict[str, Any] | None = Field(None, description=FILTERS_DOC)


def api_app(service: Service) -> FastAPI:
    app = FastAPI(title="radalign similar-case lookup", version="1",
                  description="Similar past cases from a retrieval index: by image (JPEG, PNG, DICOM), text or "
                              "study id, with metadata filters, the k-NN label vote and, with a finetune run, "
                              "the prediction's explanation.")
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(service.config.allowed_hosts))
    app.state.service = service

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(UploadRefused)
    async def refused(request: Request, e: UploadRefused):
        return JSONResponse({"detail": str(e), "reason": e.reason}, status_code=e.status)

    @app.exception_handler(RadalignError)
    async def invalid(request: Request, e: RadalignError):
        return JSONResponse({"detail": str(e), "reason": "invalid_query"}, status_code=422)

    @app.exception_handler(LookupError)
    async def missing(request: Request, e: LookupError):
        return JSONResponse({"detail": str(e).strip("'\""), "reason": "not_found"}, status_code=404)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info", summary="the index, its filters and their values, the limits")
    def info() -> dict:
        return service.info()

    @app.post("/api/search/text", summary="cases whose films are most similar to a text")
    def search_text(q: TextQuery) -> dict:
        return _audited(service, "text", q.k, q.filters, text=q.text)

    @app.post("/api/search/study", summary="cases most similar to a study of the index (its patient left out)")
    def search_study(q: StudyQuery) -> dict:
        return _audited(service, "study", q.k, q.filters, study_id=q.study_id, exclude_patient=q.exclude_patient)

    @app.post("/api/search/image", summary="cases most similar to an uploaded film (JPEG, PNG or DICOM)",
              openapi_extra={"requestBody": {"required": True, "description": "the file's bytes",
                                             "content": {"application/octet-stream":
                                                         {"schema": {"type": "string", "format": "binary"}}}}})
    async def search_image(request: Request, k: int | None = Query(None, description="number of cases"),
                           filters: str | None = Query(None, description=FILTERS_DOC + " (as JSON)")) -> dict:
        parsed = _json_filters(filters)
        try:
            data = await _read_capped(request, service.config.max_upload_bytes)
            image, info = await run_in_threadpool(decode_upload, data, service.config.max_pixels)
        except UploadRefused as e:
            service.audit.write("image", status=e.status, k=k, filters=parsed, reason=e.reason)
            raise
        return await run_in_threadpool(_audited, service, "image", k, parsed, image=image,
                                       query_info={"kind": "image", **info})

    @app.get("/api/case/{study_id}", summary="one case of the index: report, labels, images, explanation")
    def case(study_id: str, k: int | None = Query(None, description="similar cases in the explanation")) -> dict:
        out = service.case(study_id, k)
        service.audit.write("case", status=200, k=k, query_id=study_id)
        return out

    @app.get("/api/thumbnail/{dicom_id}", summary="a case's stored thumbnail (JPEG), by its dicom_id",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def thumbnail(dicom_id: str) -> Response:
        jpeg = service.thumbnail(dicom_id)  # a dictionary lookup: the id never reaches the file system
        if jpeg is None:
            return JSONResponse({"detail": "no such image in this index", "reason": "not_found"}, status_code=404)
        return Response(jpeg, media_type="image/jpeg")

    return app


def _audited(service: Service, kind: str, k, filters, **query) -> dict:
    """Run one search; audit it (ids and filters only), also when it is refused."""
    try:
        result = service.search(k=k, filters=Filters.parse(filters), **query)
    except RadalignError as e:
        service.audit.write(kind, status=422, k=k, filters=filters, query_id=query.get("study_id"),
                            reason=type(e).__name__)
        raise
    service.audit.write(kind, status=200, k=result["k"], filters=result["filters"], query_id=query.get("study_id"),
                        result_ids=[n["study_id"] for n in result["neighbours"]])
    return result


def _json_filters(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise RadalignError("filters: not valid JSON; give an object, e.g. {\"view\": [\"PA\"]}") from None
    if not isinstance(value, dict):
        raise RadalignError(f"filters: {type(value).__name__}; give a JSON object, e.g. {{\"view\": [\"PA\"]}}")
    return value


async def _read_capped(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit` bytes: the declared length first, then as read."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise UploadRefused(413, "upload_too_large", f"the upload has {int(declared):,} bytes, above the limit of "
                                                     f"{limit:,}; send a smaller file (or raise --max-upload-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise UploadRefused(413, "upload_too_large", f"the upload passes the limit of {limit:,} bytes; send "
                                                         f"a smaller file (or raise --max-upload-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


__all__ = ["api_app", "TextQuery", "StudyQuery", "CSP"]


def create_app(index_dir: str | os.PathLike, *, finetune_run: str | os.PathLike | None = None,
               checkpoint: str | os.PathLike | None = None, encoders=None, explainer=None,
               config: ServeConfig | None = None, device: str = "cpu"):
    """The FastAPI app over one index: encoders, index (and the finetune run) loaded here, once."""
    retriever = Retriever.load(index_dir, checkpoint=checkpoint, encoders=encoders, device=device)
    if explainer is None and finetune_run is not None:
        explainer = load_explainer(finetune_run, index_dir)
    return api_app(Service(retriever, config or ServeConfig(), explainer))

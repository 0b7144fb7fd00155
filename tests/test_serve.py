"""`radalign retrieval serve`: the JSON API against numpy brute force and the Python API, its filters, and
the hostile inputs of issue 21 (each a test): truncated DICOM, another modality, a 60,000 x 60,000 header, a
PNG decompression bomb, report text with <script>/<img onerror>, `../` in a thumbnail id, a non-loopback bind
without the flag, 50 concurrent queries."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from radalign.data.dicom import dicom_bytes, read_dicom
from radalign.retrieval import index as ix
from radalign.retrieval.build import build_tuned
from radalign.retrieval.search import Retriever
from radalign.retrieval.serve import (
    STATIC,
    Filters,
    ServeConfig,
    allowed_hosts,
    check_bind,
)
from radalign.retrieval.serve_api import create_app
from radalign.retrieval.store import metadata_table, write_index_dir

from radalign import RadalignError
from tests.test_retrieval import FakeEncoders

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

N, D = 48, 32
SCRIPT = "<script>window.__pwned = 1</script> effusion"
IMG_ONERROR = "<img src=x onerror=\"window.__pwned = 2\"> edema"
LABELS = ("Edema", "Pleural Effusion")
BASE = "http://127.0.0.1"


# ----------------------------------------------------------------------------------------------------------
# A small case base whose embeddings are FakeEncoders' (a fixed random linear map of the pixels).


class Encoders(FakeEncoders):
    """FakeEncoders with a tokenizer (one token per word, a context of 64), as text queries need, that refuse
    to be entered by two threads at once (as a Hugging Face fast tokenizer does: "Already borrowed")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._inside = 0
        self._count = threading.Lock()

    def _enter(self, call):
        with self._count:
            self._inside += 1
            inside = self._inside
        try:
            if inside > 1:
                raise RuntimeError("Already borrowed: the encoders were entered by two threads at once")
            time.sleep(0.002)  # long enough for unserialised concurrent queries to overlap
            return call()
        finally:
            with self._count:
                self._inside -= 1

    def encode_images(self, images):
        return self._enter(lambda: FakeEncoders.encode_images(self, images))

    def encode_texts(self, texts, batch_size=256):
        return self._enter(lambda: FakeEncoders.encode_texts(self, texts, batch_size))

    def tokenize(self, texts):
        import torch

        out = torch.zeros(len(texts), 64, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [1 + len(w) for w in t.split()][:64]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def _stored(i: int) -> np.ndarray:
    """A 12-bit film [24, 24] for case i."""
    return np.random.default_rng(100 + i).integers(0, 4096, (24, 24), dtype=np.uint16)


def _images():
    """Case i's 8-bit picture: the DICOM conversion of its film (so a DICOM upload of film i finds case i)."""
    return [read_dicom(dicom_bytes(_stored(i)))[0] for i in range(N)]


def _thumb(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def _columns(images) -> dict:
    """Cases: studies of 1-2 images, 3 images per patient, views PA/AP/LATERAL, two splits, dated, labelled
    1/0/-1/blank, two report texts that are attacks."""
    studies = [f"5{i // 2:04d}" if i < 16 else f"5{i:04d}" for i in range(N)]  # rows 0-15: two images a study
    subjects = [f"1{i // 3:03d}" for i in range(N)]
    texts = [f"report of case {i}" for i in range(N)]
    texts[21], texts[23] = SCRIPT, IMG_ONERROR
    edema = [[1.0, 0.0, -1.0, float("nan")][i % 4] for i in range(N)]
    effusion = [[0.0, 1.0, 1.0][i % 3] for i in range(N)]
    return {"key": [f"k{i}" for i in range(N)], "dicom_id": [f"dcm{i:03d}" for i in range(N)],
            "study_id": studies, "subject_id": subjects, "split": ["train" if i % 5 else "validate" for i in range(N)],
            "view": [("PA", "AP", "LATERAL")[i % 3] for i in range(N)],
            "study_datetime": [f"21{50 + i % 10}-0{1 + i % 9}-1{i % 10}T08:00:00" if i % 7 else None for i in range(N)],
            "text": texts, "section_impression": texts, "section_findings": [f"findings {i}" for i in range(N)],
            "label:Edema": edema, "label:Pleural Effusion": effusion, "thumbnail": [_thumb(im) for im in images]}


class FakeExplainer:
    """What the finetune explainer gives the service: demographics for the filters, explanations by study."""

    task = "toy_task"

    def __init__(self, studies):
        self.studies = studies
        self.calls: list[tuple[str, int]] = []

    def demographics(self):
        return {s: {"sex": "F" if int(s) % 2 else "M", "age_band": ("<40", "40-64", "65-79")[int(s) % 3]}
                for s in self.studies}

    def explain(self, study_id, k):
        self.calls.append((study_id, k))
        return {"study_id": study_id, "task": self.task, "shapley": {"image": 0.5, "ehr": -0.25},
                "output": {"space": "logit", "full": 0.25, "empty": 0.0, "probability": 0.562}, "used": "image",
                "similar_cases": [], "neighbour_vote": None}


@pytest.fixture(scope="module")
def case_base(tmp_path_factory):
    return build_case_base(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def service(case_base, tmp_path_factory):
    return build_service(case_base, tmp_path_factory.mktemp("audit") / "audit.jsonl")


def build_case_base(folder: Path) -> dict:
    """The index folder (under `folder`) of N cases with their encoders, embeddings, columns and pictures."""
    import torch

    enc = Encoders(dim=D)
    images = _images()
    x = ix.normalize(torch.cat([enc.encode_images(enc.image_transform()(im)[None]) for im in images]).numpy())
    index, entry = build_tuned(x, kind="flat")
    manifest = {"encoder": {"checksum": enc.checksum, "embed_dim": D, "checkpoint": None, "config": enc.config},
                "dim": D, "normalisation": "l2", "metric": "inner_product", "modalities": ["image"],
                "indexes": {"image": entry}, "data": {"split": "train", "skipped": {}}}
    cols = _columns(images)
    out = folder / "index"
    write_index_dir(out, indexes={"image": index}, vectors={"image": x}, metadata=metadata_table(cols, LABELS),
                    manifest=manifest)
    return {"dir": out, "enc": enc, "x": x, "cols": cols, "images": images}


def build_service(case_base: dict, audit: Path) -> dict:
    """The app over `case_base` with a FakeExplainer, a TestClient and the audit log's path."""
    explainer = FakeExplainer(sorted(set(case_base["cols"]["study_id"])))
    app = create_app(case_base["dir"], encoders=case_base["enc"], explainer=explainer,
                     config=ServeConfig(audit_log=str(audit), max_upload_bytes=4 * 1024 * 1024, max_k=40))
    return {"app": app, "client": TestClient(app, base_url=BASE), "audit": audit, "explainer": explainer}


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _reference(case_base, q: np.ndarray, k: int, keep=None, exclude_subject=None, exclude_study=None) -> list[str]:
    """dicom_ids of the k best cases by numpy brute force: rows passing `keep`, not of the excluded patient or
    study, the best image per study."""
    cols, x = case_base["cols"], case_base["x"]
    out, seen = [], set()
    for j in np.argsort(-(x @ q), kind="stable"):
        if (keep is not None and not keep[j]) or cols["subject_id"][j] == exclude_subject:
            continue
        if cols["study_id"][j] == exclude_study or cols["study_id"][j] in seen:
            continue
        seen.add(cols["study_id"][j])
        out.append(cols["dicom_id"][j])
        if len(out) == k:
            break
    return out


def _ids(answer: dict) -> list[str]:
    return [n["dicom_id"] for n in answer["neighbours"]]


def _text_vector(case_base, text: str) -> np.ndarray:
    return ix.normalize(case_base["enc"].encode_texts([text]).numpy())[0]


# ----------------------------------------------------------------------------------------------------------
# Queries: the API equals numpy brute force and the Python API.


@pytest.mark.parametrize("text", ["left pleural effusion", "no acute process", "edema"])
def test_text_query_equals_bruteforce_and_python_api(service, case_base, text):
    r = service["client"].post("/api/search/text", json={"text": text, "k": 5})
    assert r.status_code == 200, r.text
    ans = r.json()
    assert _ids(ans) == _reference(case_base, _text_vector(case_base, text), 5)
    py = Retriever.load(case_base["dir"], encoders=case_base["enc"]).search(text=text, k=5)
    assert _ids(ans) == [n["dicom_id"] for n in py.neighbours]
    assert [n["similarity"] for n in ans["neighbours"]] == [n["similarity"] for n in py.neighbours]
    assert ans["query"] == {"kind": "text", "text": text} and ans["explanation"] is None
    assert ans["vote"] == py.explanation  # the k-NN label vote of retrieval.search.explain


def test_png_and_jpeg_uploads_find_their_own_case(service, case_base):
    for i, fmt in ((4, "PNG"), (9, "JPEG")):
        buf = io.BytesIO()
        case_base["images"][i].save(buf, fmt, quality=100) if fmt == "JPEG" else case_base["images"][i].save(buf, fmt)
        r = service["client"].post("/api/search/image?k=3", content=buf.getvalue())
        assert r.status_code == 200, r.text
        ans = r.json()
        assert ans["query"]["format"] == fmt and ans["query"]["width"] == 24
        assert ans["neighbours"][0]["dicom_id"] == f"dcm{i:03d}"
        if fmt == "PNG":  # lossless: the very same embedding
            assert ans["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
            assert _ids(ans) == _reference(case_base, case_base["x"][i], 3)


def test_dicom_upload_goes_through_the_mimic_conversion(service, case_base):
    """A DICOM (MONOCHROME2 and the same film stored inverted as MONOCHROME1, RLE-compressed) finds its case:
    the conversion of data.dicom is the one the case base went through."""
    i = 11
    for kw in ({}, {"photometric": "MONOCHROME1", "compression": "rle"}):
        stored = _stored(i) if not kw else (4095 - _stored(i))
        data = dicom_bytes(stored, header={"ViewPosition": "PA", "PatientID": "p-secret"}, **kw)
        r = service["client"].post("/api/search/image?k=4", content=data)
        assert r.status_code == 200, r.text
        ans = r.json()
        assert ans["query"]["format"] == "DICOM" and ans["query"]["view"] == "PA"
        assert "p-secret" not in r.text  # the patient id of the header is not echoed
        assert ans["neighbours"][0]["dicom_id"] == f"dcm{i:03d}"
        if not kw:  # the very film of case i
            assert ans["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
            assert _ids(ans) == _reference(case_base, case_base["x"][i], 4)
        else:  # inverted in storage and back: the truncating 8-bit scale may move a pixel by one grey level
            assert ans["neighbours"][0]["similarity"] > 0.999


def test_study_query_leaves_out_the_patient_by_default(service, case_base):
    cols = case_base["cols"]
    row = 20
    study, subject = cols["study_id"][row], cols["subject_id"][row]
    c = service["client"]
    ans = c.post("/api/search/study", json={"study_id": study, "k": 6}).json()
    assert _ids(ans) == _reference(case_base, case_base["x"][row], 6, exclude_subject=subject, exclude_study=study)
    assert all(n["subject_id"] != subject for n in ans["neighbours"]) and ans["filtered"]["same_patient"] >= 1
    off = c.post("/api/search/study", json={"study_id": study, "k": 40, "exclude_patient": False}).json()
    assert _ids(off) == _reference(case_base, case_base["x"][row], 40, exclude_study=study)
    assert sorted(n["dicom_id"] for n in off["neighbours"] if n["subject_id"] == subject) == ["dcm018", "dcm019"]
    on = c.post("/api/search/study", json={"study_id": study, "k": 40}).json()
    assert len(on["neighbours"]) == len(off["neighbours"]) - 2 == 37  # 40 studies: itself and two of its patient
    assert ans["explanation"]["study_id"] == study and ans["explanation"]["shapley"] == {"image": 0.5, "ehr": -0.25}
    assert service["explainer"].calls[-3:] == [(study, 6), (study, 40), (study, 40)]


def _keep(case_base, service, f: dict) -> np.ndarray:
    """The rows passing filters `f`, computed here from the raw columns (not by the service's mask)."""
    cols = case_base["cols"]
    demo = service["explainer"].demographics()
    keep = np.ones(N, dtype=bool)
    for i in range(N):
        date = (cols["study_datetime"][i] or "")[:10]
        edema, effusion = cols["label:Edema"][i], cols["label:Pleural Effusion"][i]
        label = {"Edema": edema, "Pleural Effusion": effusion}
        checks = [
            "view" not in f or cols["view"][i] in f["view"],
            "split" not in f or cols["split"][i] in f["split"],
            "sex" not in f or demo[cols["study_id"][i]]["sex"] in f["sex"],
            "age_band" not in f or demo[cols["study_id"][i]]["age_band"] in f["age_band"],
            "date_from" not in f or (date != "" and date >= f["date_from"]),
            "date_to" not in f or (date != "" and date <= f["date_to"]),
            all(label[n] == 1 for n in f.get("labels_present", [])),
            all(label[n] == 0 or label[n] != label[n] for n in f.get("labels_absent", [])),
        ]
        keep[i] = all(checks)
    return keep


FILTERS = [
    {"view": ["PA"]},
    {"view": ["AP", "LATERAL"], "split": ["train"]},
    {"date_from": "2153-01-01", "date_to": "2156-12-31"},
    {"date_from": "2155-01-01"},  # cases without a date are left out, also by a one-sided range
    {"date_to": "2153-06-30"},
    {"labels_present": ["Pleural Effusion"]},
    {"labels_absent": ["Edema"]},
    {"labels_present": ["Edema"], "labels_absent": ["Pleural Effusion"]},
    {"sex": ["F"], "age_band": ["40-64", "65-79"]},
]


@pytest.mark.parametrize("f", FILTERS, ids=lambda f: "+".join(f))
def test_filters_equal_bruteforce_over_the_kept_rows(service, case_base, f):
    text = "filtered query"
    keep = _keep(case_base, service, f)
    assert 3 <= keep.sum() < N  # the filter matters
    ans = service["client"].post("/api/search/text", json={"text": text, "k": 5, "filters": f}).json()
    assert _ids(ans) == _reference(case_base, _text_vector(case_base, text), 5, keep=keep)
    assert ans["filters"] == f
    # the filter comes before one-image-per-study: a study whose best image is filtered out still counts
    img = service["client"].post("/api/search/image?k=5&filters=" + json.dumps(f),
                                 content=_png(case_base["images"][0])).json()
    assert _ids(img) == _reference(case_base, case_base["x"][0], 5, keep=keep)


def test_filter_leaving_fewer_than_k_returns_what_there_is(service, case_base):
    f = {"view": ["PA"], "labels_present": ["Edema", "Pleural Effusion"], "split": ["validate"]}
    keep = _keep(case_base, service, f)
    ans = service["client"].post("/api/search/text", json={"text": "x", "k": 10, "filters": f}).json()
    assert _ids(ans) == _reference(case_base, _text_vector(case_base, "x"), 10, keep=keep)
    assert len(ans["neighbours"]) == len({case_base["cols"]["study_id"][i] for i in np.flatnonzero(keep)}) < 10


@pytest.mark.parametrize("body, message", [
    ({"text": "x", "filters": {"view": ["SIDEWAYS"]}}, None),
    ({"text": "x", "filters": {"colour": ["red"]}}, "unknown key"),
    ({"text": "x", "filters": {"labels_present": ["Cardiomegaly"]}}, "label 'Cardiomegaly' is not in this index"),
    ({"text": "x", "filters": {"date_from": "yesterday"}}, "not a date; write YYYY-MM-DD"),
    ({"text": "x", "filters": {"view": "PA"}}, "must be a list of strings"),
    ({"text": "x", "k": 0}, "from 1 to 40"),
    ({"text": "x", "k": 41}, "from 1 to 40"),
])
def test_bad_queries_are_422_with_the_reason(service, body, message):
    r = service["client"].post("/api/search/text", json=body)
    if message is None:  # an unknown view is no error: it matches no case
        assert r.status_code == 200 and r.json()["neighbours"] == []
        return
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_unknown_study_and_filter_column_without_data(case_base, tmp_path):
    app = create_app(case_base["dir"], encoders=case_base["enc"], config=ServeConfig(audit_log=None))
    c = TestClient(app, base_url=BASE)
    r = c.post("/api/search/text", json={"text": "x", "filters": {"sex": ["F"]}})
    assert r.status_code == 422 and "this index has no sex" in r.json()["detail"]
    assert c.get("/api/info").json()["filters"]["sex"] == []  # the page hides what the index cannot filter
    r = c.post("/api/search/study", json={"study_id": "999"})
    assert r.status_code == 422 and "not in this index" in r.json()["detail"]
    assert c.get("/api/case/999").status_code == 404


def test_case_view_and_info(service, case_base):
    c = service["client"]
    cols = case_base["cols"]
    case = c.get("/api/case/" + cols["study_id"][2]).json()  # rows 2 and 3: one study, two images
    assert [im["dicom_id"] for im in case["images"]] == ["dcm002", "dcm003"]
    assert case["sections"]["findings"] == "findings 2" and case["labels"] == ["Pleural Effusion"]
    assert case["uncertain"] == ["Edema"] and case["explanation"]["task"] == "toy_task"
    info = c.get("/api/info").json()
    assert info["index"]["count"] == N and info["filters"]["view"] == ["AP", "LATERAL", "PA"]
    assert info["filters"]["labels"] == list(LABELS) and info["filters"]["sex"] == ["F", "M"]
    assert info["filters"]["date_min"] == "2150-02-10"  # row 10 (row 0 has no date) and info["task"] == "toy_task"
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/api/search/text", "/api/search/study", "/api/search/image", "/api/case/{study_id}",
            "/api/thumbnail/{dicom_id}", "/api/info"} <= set(paths)


# ----------------------------------------------------------------------------------------------------------
# Hostile uploads: each a 4xx naming the reason, never a 500.


def _upload(service, data, **params) -> tuple[int, dict]:
    r = service["client"].post("/api/search/image", content=data, params=params)
    return r.status_code, r.json()


def test_truncated_dicom_is_422(service):
    whole = dicom_bytes(_stored(1), compression="rle")
    for cut in (len(whole) // 2, len(whole) - 7, 200):
        status, body = _upload(service, whole[:cut])
        assert (status, body["reason"]) == (422, "truncated_dicom"), (cut, body)
    status, body = _upload(service, dicom_bytes(_stored(1))[:-100])  # native: fewer pixel bytes than the header says
    assert (status, body["reason"]) == (422, "truncated_dicom")


@pytest.mark.parametrize("name, reason", [("CT_small.dcm", "not_xray_modality"), ("MR_small.dcm", "not_xray_modality"),
                                          ("rtplan.dcm", "not_xray_modality")])
def test_dicom_of_another_modality_is_422(service, name, reason):
    from pydicom.data import get_testdata_file

    status, body = _upload(service, Path(get_testdata_file(name)).read_bytes())
    assert (status, body["reason"]) == (422, reason) and "Modality" in body["detail"]


def _huge_dicom_header(rows: int, columns: int) -> bytes:
    """A DICOM that claims rows x columns but carries 16 bytes of pixels (no decoder may allocate for it)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((2, 4), np.uint16))))
    ds.Rows, ds.Columns = rows, columns
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_60000_square_headers_are_413_before_decoding(service):
    import tracemalloc

    tracemalloc.start()
    status, body = _upload(service, _huge_dicom_header(60_000, 60_000))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (status, body["reason"]) == (413, "oversized_image") and "60000 x 60000" in body["detail"]
    assert peak < 64 * 1024 * 1024  # 3.6 G pixels were never allocated
    status, body = _upload(service, _png_header_only(60_000, 60_000))
    assert (status, body["reason"]) == (413, "oversized_image")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int, idat: bytes = b"") -> bytes:
    """A grayscale PNG whose header says width x height, with the given IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _png_bomb(side: int) -> bytes:
    """A real decompression bomb: side x side black pixels, which deflate to a few hundred KiB."""
    z = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [z.compress(row) for _ in range(side)]
    return _png_header_only(side, side, b"".join(parts) + z.flush())


def test_png_decompression_bomb_is_413(service, case_base):
    bomb = _png_bomb(10_000)  # 100 M pixels: above PIL's own guard (89 M) and the service's cap (50 M)
    assert len(bomb) < 1_000_000
    status, body = _upload(service, bomb)
    assert (status, body["reason"]) == (413, "oversized_image")
    # the service's own cap, below PIL's: a 2000 x 2000 PNG against max_pixels = 1 M
    small = create_app(case_base["dir"], encoders=case_base["enc"], config=ServeConfig(audit_log=None, max_pixels=10**6))
    r = TestClient(small, base_url=BASE).post("/api/search/image", content=_png_bomb(2000))
    assert r.status_code == 413 and r.json()["reason"] == "oversized_image" and "1,000,000" in r.json()["detail"]
    # PIL's own guard, where the service's cap is set above it (Image.MAX_IMAGE_PIXELS, about 89 M)
    large = create_app(case_base["dir"], encoders=case_base["enc"], config=ServeConfig(audit_log=None,
                                                                                        max_pixels=4 * 10**8))
    r = TestClient(large, base_url=BASE).post("/api/search/image", content=bomb)
    assert r.status_code == 413 and r.json()["reason"] == "oversized_image"


@pytest.mark.parametrize("data, status, reason", [
    (b"", 400, "empty_upload"),
    (b"GIF89a" + b"\x00" * 50, 415, "unsupported_format"),
    (b"%PDF-1.4 not an image", 415, "unsupported_format"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 422, "unreadable_image"),
    (b"\xff\xd8\xff\xe0" + b"garbage" * 10, 422, "unreadable_image"),
    (b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00", 422, "truncated_dicom"),
])
def test_malformed_uploads_are_4xx_with_the_reason(service, data, status, reason):
    got, body = _upload(service, data)
    assert (got, body["reason"]) == (status, reason), body
    assert body["detail"]


def test_uploads_above_the_byte_limit_are_413_also_without_a_length(service):
    big = b"\x89PNG\r\n\x1a\n" + b"\x00" * (4 * 1024 * 1024)
    r = service["client"].post("/api/search/image", content=big)
    assert r.status_code == 413 and r.json()["reason"] == "upload_too_large"

    def chunks():  # chunked transfer: no Content-Length to judge by, the cap applies while reading
        for _ in range(80):
            yield b"\x00" * 65536

    r = service["client"].post("/api/search/image", content=chunks())
    assert r.status_code == 413 and r.json()["reason"] == "upload_too_large"


def test_report_text_is_returned_verbatim_as_json_and_the_page_never_uses_innerhtml(service, case_base):
    c = service["client"]
    case = c.get("/api/case/" + case_base["cols"]["study_id"][21])  # row 21 holds the <script> report
    assert case.headers["content-type"] == "application/json"
    assert case.json()["sections"]["impression"] == SCRIPT and case.json()["report"] == SCRIPT
    assert case.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in case.headers["content-security-policy"]
    page = c.get("/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    js = c.get("/static/app.js").text
    assert "innerHTML" not in js.replace("never innerHTML", "") and "insertAdjacentHTML" not in js
    assert "textContent" in js and "eval(" not in js
    for f in STATIC.iterdir():  # everything from the package: no CDN
        assert "http://" not in f.read_text() and "https://" not in f.read_text(), f


@pytest.mark.parametrize("path", ["/api/thumbnail/..%2Fmanifest.json", "/api/thumbnail/..%2F..%2Fetc%2Fpasswd",
                                  "/api/thumbnail/../manifest.json", "/api/thumbnail/%2e%2e",
                                  "/api/thumbnail/image.npy", "/api/thumbnail/%2Fetc%2Fpasswd",
                                  "/static/..%2Fserve.py", "/static/../serve.py"])
def test_thumbnail_ids_never_reach_the_file_system(service, path):
    r = service["client"].get(path)
    assert r.status_code == 404, (path, r.status_code)
    assert b"root:" not in r.content and b"radalign-retrieval" not in r.content and b"import" not in r.content


def test_thumbnail_by_id_is_the_stored_jpeg(service, case_base):
    r = service["client"].get("/api/thumbnail/dcm007")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == case_base["cols"]["thumbnail"][7]


# ----------------------------------------------------------------------------------------------------------
# Binding and hosts


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_binds_need_no_flag(host):
    check_bind(host, allow_remote=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "example.org"])
def test_non_loopback_bind_without_the_flag_is_refused(host, tmp_path, capsys):
    with pytest.raises(RadalignError, match="--allow-remote"):
        check_bind(host, allow_remote=False)
    from radalign.cli import main

    # the CLI refuses before loading anything (the index folder does not even exist)
    assert main(["retrieval", "serve", "--index-dir", str(tmp_path / "none"), "--host", host]) == 2
    assert "not a loopback address" in capsys.readouterr().err


def test_non_loopback_bind_with_the_flag_warns(caplog):
    import logging

    logger = logging.getLogger("radalign.retrieval.serve")
    got = []
    handler = logging.Handler()
    handler.emit = lambda record: got.append(record.getMessage())
    logger.addHandler(handler)
    try:
        check_bind("0.0.0.0", allow_remote=True)
    finally:
        logger.removeHandler(handler)
    assert any("no login" in m for m in got)
    assert allowed_hosts("0.0.0.0") == ("*",) and "10.1.2.3" in allowed_hosts("10.1.2.3")
    assert allowed_hosts("127.0.0.1") == allowed_hosts("::1") == ("127.0.0.1", "localhost", "[::1]")
    assert "[fd00::5]" in allowed_hosts("fd00::5")


def test_foreign_host_header_is_refused(service):
    r = TestClient(service["app"], base_url="http://evil.example").get("/api/info")
    assert r.status_code == 400  # DNS rebinding: a page from another origin resolved to 127.0.0.1
    for base in ("http://127.0.0.1:8765", "http://localhost:8765", "http://[::1]:8765"):
        assert TestClient(service["app"], base_url=base).get("/api/info").status_code == 200, base


# ----------------------------------------------------------------------------------------------------------
# 50 concurrent queries on a real uvicorn server, and the audit log.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """The app on a real uvicorn server on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def live(service):
    with running(service["app"]) as url:
        yield url


def test_50_concurrent_queries_all_answered_none_mixed_up(live, case_base):
    import httpx

    texts = [f"query number {i}" for i in range(25)]
    rows = list(range(25))

    def ask(job):
        kind, value = job
        with httpx.Client(base_url=live, timeout=60) as c:
            if kind == "text":
                return job, c.post("/api/search/text", json={"text": value, "k": 4})
            return job, c.post("/api/search/image?k=4", content=_png(case_base["images"][value]))

    jobs = [("text", t) for t in texts] + [("image", r) for r in rows]
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(ask, jobs))
    assert len(answers) == 50
    for (kind, value), r in answers:
        assert r.status_code == 200, r.text
        ans = r.json()
        if kind == "text":
            assert ans["query"]["text"] == value
            assert _ids(ans) == _reference(case_base, _text_vector(case_base, value), 4)
        else:
            assert _ids(ans)[0] == f"dcm{value:03d}"
            assert _ids(ans) == _reference(case_base, case_base["x"][value], 4)


def test_audit_log_has_ids_and_filters_only(service, case_base):
    c = service["client"]
    secret = "patient jane doe with effusion"
    c.post("/api/search/text", json={"text": secret, "k": 3, "filters": {"view": ["PA"]}})
    c.post("/api/search/image?k=2", content=_png(case_base["images"][6]))
    c.post("/api/search/image", content=_huge_dicom_header(60_000, 60_000))
    c.get("/api/case/" + case_base["cols"]["study_id"][3])
    lines = [json.loads(x) for x in service["audit"].read_text().splitlines()]
    text, image, refused, case = lines[-4:]
    assert text["kind"] == "text" and text["filters"] == {"view": ["PA"]} and text["k"] == 3
    assert text["result_ids"] == [case_base["cols"]["study_id"][int(d[3:])] for d in
                                  _reference(case_base, _text_vector(case_base, secret), 3,
                                             keep=np.array(case_base["cols"]["view"]) == "PA")]
    assert image["kind"] == "image" and len(image["result_ids"]) == 2 and image["status"] == 200
    assert (refused["status"], refused["reason"]) == (413, "oversized_image")
    assert case["kind"] == "case" and case["query_study_id"] == case_base["cols"]["study_id"][3]
    raw = service["audit"].read_text()
    assert secret not in raw and "report of case" not in raw and "<script>" not in raw and "findings" not in raw
    assert set(text) == {"time", "kind", "status", "k", "filters", "query_study_id", "result_ids", "reason"}


def test_filters_parse_round_trip():
    f = Filters.parse({"view": ["PA"], "date_from": "2150-01-01", "labels_absent": [], "sex": None})
    assert f.active() == {"view": ["PA"], "date_from": "2150-01-01"}

"""The page of `radalign retrieval serve` in a real headless Chromium (Playwright): upload a DICOM and a PNG,
type a text query, query a study, apply a filter, open a case; the neighbours shown equal the Python API's
(`Retriever.search`). Report text with <script> / <img onerror> shows as text and runs nothing. Makes the
README's screenshot, docs/img/serve.png (written when missing, or refreshed with RADALIGN_SCREENSHOT=1).

Needs Chromium: Debian's `chromium` (`apt-get install -y chromium`; .ci/run installs it) or Playwright's own
browser; the tests skip, saying so, where neither is found."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from radalign.data.dicom import dicom_bytes, read_dicom
from radalign.retrieval.search import Retriever
from radalign.retrieval.serve import ServeConfig
from radalign.retrieval.serve_api import create_app

from tests.test_serve import IMG_ONERROR, SCRIPT, build_case_base, build_service, running

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "img" / "serve.png"


def _chromium() -> str | None:
    """Debian's chromium, else None (Playwright then tries its own downloaded browser)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        exe = _chromium()
        try:
            b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        except Exception as e:  # noqa: BLE001 - no browser at all: say how to get one
            pytest.skip(f"no Chromium to drive ({type(e).__name__}: {str(e).splitlines()[0][:120]}); install "
                        "Debian's chromium (apt-get install -y chromium) or run `playwright install chromium`")
        yield b
        b.close()


@pytest.fixture(scope="module")
def real_index(tiny_export, synth_shards, tmp_path_factory):
    from radalign.cli import main

    out = tmp_path_factory.mktemp("serve_browser") / "index"
    assert main(["retrieval", "build", "--checkpoint", str(tiny_export), "--data", str(synth_shards), "--split",
                 "train", "--out", str(out), "--batch-size", "16"]) == 0
    return out


def _film(synth_root) -> np.ndarray:
    """A synthetic radiograph of the test patients as 12-bit stored values [H, W]."""
    from PIL import Image

    jpg = sorted((synth_root / "mimic-cxr-jpg" / "files").rglob("*.jpg"))[-1]
    return np.asarray(Image.open(jpg).convert("L"), dtype=np.uint16) * 16


def _wait(page, key: str, before: int) -> None:
    """Until the page has finished one more search (answers), case (cases) or error (errors) than `before`."""
    page.wait_for_selector(f"body[data-{key}='{before + 1}']", state="attached", timeout=60_000)  # no eval: CSP


def _count(page, key: str) -> int:
    return int(page.evaluate(f"Number(document.body.dataset.{key} || 0)"))


def _shown(page) -> list[str]:
    return page.eval_on_selector_all("#results .card", "cards => cards.map(c => c.dataset.dicomId)")


def _ids(res) -> list[str]:
    return [n["dicom_id"] for n in res.neighbours]


def test_page_shows_the_python_api_neighbours(browser, real_index, synth_root, tmp_path):
    app = create_app(real_index, config=ServeConfig(audit_log=str(tmp_path / "audit.jsonl")))
    retriever = Retriever.load(real_index)
    k = 6
    stored = _film(synth_root)
    dicom = dicom_bytes(stored, header={"ViewPosition": "PA"}, compression="rle")
    png_img = read_dicom(dicom)[0].rotate(90)  # another picture than the DICOM's, the same route through PIL
    png = io.BytesIO()
    png_img.save(png, "PNG")
    with running(app) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#k-input", str(k))

        # 1. a DICOM upload
        page.set_input_files("#image-file", files=[{"name": "film.dcm", "mimeType": "application/dicom",
                                                    "buffer": dicom}])
        n = _count(page, "answers")
        page.click("#image-go")
        _wait(page, "answers", n)
        assert _shown(page) == _ids(retriever.search(image=read_dicom(dicom)[0], k=k))

        # 2. a PNG upload
        page.set_input_files("#image-file", files=[{"name": "film.png", "mimeType": "image/png",
                                                    "buffer": png.getvalue()}])
        n = _count(page, "answers")
        page.click("#image-go")
        _wait(page, "answers", n)
        assert _shown(page) == _ids(retriever.search(image=png_img, k=k))

        # 3. a typed text query
        text = "large left pleural effusion"
        page.fill("#text-input", text)
        n = _count(page, "answers")
        page.click("#text-go")
        _wait(page, "answers", n)
        assert _shown(page) == _ids(retriever.search(text=text, k=k))

        # 4. a filter (frontal views only), applied to the same text query
        page.check("#f-view input[value='PA']")
        n = _count(page, "answers")
        page.click("#text-go")
        _wait(page, "answers", n)
        pa = retriever.store.column("view") == "PA"
        expected = _ids(retriever.search(text=text, k=k, allowed=pa))
        assert _shown(page) == expected and expected != _ids(retriever.search(text=text, k=k))
        views = page.eval_on_selector_all("#results .card div:nth-of-type(2)", "d => d.map(x => x.textContent)")
        assert all(" PA " in v for v in views)
        page.uncheck("#f-view input[value='PA']")

        # 5. a study of the index (its patient left out: the box is ticked by default)
        study = retriever.store.row(0)["study_id"]
        assert page.is_checked("#exclude-patient")
        page.fill("#study-input", study)
        n = _count(page, "answers")
        page.click("#study-go")
        _wait(page, "answers", n)
        res = retriever.search(study_id=study, k=k)
        assert _shown(page) == _ids(res) and all(x["subject_id"] != retriever.store.row(0)["subject_id"]
                                                 for x in res.neighbours)

        # 6. open a case
        first = res.neighbours[0]
        n = _count(page, "cases")
        page.click("#results .card >> nth=0")
        _wait(page, "cases", n)
        assert page.is_visible("#case")
        assert page.text_content("#case h2").startswith(f"Study {first['study_id']} ")
        shown_images = page.eval_on_selector_all("#case .case-images img", "i => i.map(x => x.naturalWidth)")
        assert shown_images and all(w > 0 for w in shown_images)  # thumbnails loaded from /api/thumbnail/<id>
        page.evaluate("window.scrollTo(0, 0)")
        shot = tmp_path / "serve.png"
        page.screenshot(path=str(shot), full_page=True)
        assert errors == []
        page.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("RADALIGN_SCREENSHOT") or not SCREENSHOT.exists():  # the README's, refreshed on request
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


def test_page_shows_hostile_text_as_text_and_errors_on_the_page(browser, tmp_path):
    """Report text `<script>` and `<img onerror>` in the results and the case view: shown verbatim, nothing
    runs; a refused upload shows the service's reason on the page."""
    case_base = build_case_base(tmp_path)
    service = build_service(case_base, tmp_path / "audit.jsonl")
    cols = case_base["cols"]
    with running(service["app"]) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#k-input", "40")  # every study: the attacks are among the results
        page.fill("#study-input", cols["study_id"][0])
        page.uncheck("#exclude-patient")
        n = _count(page, "answers")
        page.click("#study-go")
        _wait(page, "answers", n)
        excerpts = page.eval_on_selector_all("#results .card .excerpt", "e => e.map(x => x.textContent)")
        assert SCRIPT in excerpts and IMG_ONERROR in excerpts
        for row, attack in ((21, SCRIPT), (23, IMG_ONERROR)):
            n = _count(page, "cases")
            page.click(f"#results .card[data-study-id='{cols['study_id'][row]}']")
            _wait(page, "cases", n)
            assert attack in page.eval_on_selector_all("#case .section-text", "e => e.map(x => x.textContent)")
        assert page.evaluate("window.__pwned === undefined")
        assert page.eval_on_selector_all("img[src='x'], #results script, #case script", "e => e.length") == 0

        # a refused upload: the reason is shown, the last results stay
        page.set_input_files("#image-file", files=[{"name": "x.gif", "mimeType": "image/gif",
                                                    "buffer": b"GIF89a" + b"\0" * 40}])
        n = _count(page, "errors")
        page.click("#image-go")
        _wait(page, "errors", n)
        assert page.is_visible("#error") and "unsupported_format" in page.text_content("#error")
        page.close()


def test_chromium_is_installed_where_ci_runs():
    """CI installs Debian's chromium first (.ci/run); without it the browser tests above would only skip."""
    if os.environ.get("CI") and _chromium() is None:
        pytest.fail("CI without Chromium: .ci/run must `apt-get install -y chromium` before `make test`")
    ci = (REPO / ".ci" / "run").read_text()
    assert "apt-get install -y" in ci and "chromium" in ci

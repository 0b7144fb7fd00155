"""The serve page's finetune panel shows the EHR attribution (`ehr_groups` of `finetune explain --format json`):
through the JSON API unchanged, and on the page in a real headless Chromium as a ranked table, the record row
first, every text shown as text (a group name with <script> or <img onerror> runs nothing). The explainer is a
fake giving a fixed explanation (the real one, checked against `finetune explain`, is test_serve_finetune.py)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from radalign.retrieval.serve import ServeConfig
from radalign.retrieval.serve_api import create_app

from tests.test_serve import BASE, IMG_ONERROR, SCRIPT, FakeExplainer, build_case_base, running
from tests.test_serve_browser import browser  # noqa: F401 - the module's Chromium fixture

EHR_GROUPS = {
    "method": "Owen value (EHR groups inside the EHR modality; the record enters first)", "space": "logit",
    "removal": "a removed group is shown as unknown", "total": 1.75, "record": -0.5, "forward_passes": 36,
    "coarsened": f"17 known groups > 16; merged {SCRIPT}",
    "groups": [{"name": "lactate", "kind": "lab", "shown": "3.5 (8.5 h before the film)", "value": 1.5, "known": True},
               {"name": SCRIPT, "kind": "numeric", "shown": IMG_ONERROR, "value": 0.75, "known": True},
               {"name": "creatinine", "kind": "lab", "shown": "absent", "value": 0.0, "known": False}]}


class EHRExplainer(FakeExplainer):
    def explain(self, study_id, k):
        return {**super().explain(study_id, k), "shapley": {"image": 0.5, "ehr": 1.75}, "ehr_groups": EHR_GROUPS}


@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    base = build_case_base(tmp_path_factory.mktemp("panel"))
    app = create_app(base["dir"], encoders=base["enc"], explainer=EHRExplainer(sorted(set(base["cols"]["study_id"]))),
                     config=ServeConfig(audit_log=None, max_k=40))
    return {"app": app, "study": base["cols"]["study_id"][0]}


def test_json_api_carries_the_ehr_groups(panel):
    client = TestClient(panel["app"], base_url=BASE)
    ans = client.post("/api/search/study", json={"study_id": panel["study"], "k": 3}).json()
    assert ans["explanation"]["ehr_groups"] == EHR_GROUPS
    assert client.get(f"/api/case/{panel['study']}").json()["explanation"]["ehr_groups"] == EHR_GROUPS


def test_page_shows_the_ehr_groups_as_text(browser, panel):  # noqa: F811 - the imported fixture
    with running(panel["app"]) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#study-input", panel["study"])
        page.click("#study-go")
        page.wait_for_selector("body[data-answers='1']", state="attached", timeout=60_000)
        rows = page.eval_on_selector_all(
            ".ehr-groups tr", "rows => rows.map(r => Array.from(r.cells).map(c => c.textContent))")
        assert rows == [["group", "value", "contribution", ""],
                        ["record present, nothing known", "every lab not measured, demographics unknown", "-0.500", ""],
                        ["lactate", "3.5 (8.5 h before the film)", "+1.500", ""],
                        [SCRIPT, IMG_ONERROR, "+0.750", ""],
                        ["creatinine", "absent", "+0.000", ""]]
        widths = page.eval_on_selector_all(".ehr-groups tr span", "s => s.map(x => x.style.width)")
        assert widths == ["40px", "120px", "60px", "0px"]  # bars scaled to the largest |value|
        note = page.text_content(".ehr-groups p")
        assert note.startswith("The rows sum to +1.750, the EHR modality's Shapley value")
        assert page.text_content(".ehr-groups .coarsened") == f"Partition coarsened: 17 known groups > 16; merged {SCRIPT}."
        assert page.evaluate("window.__pwned === undefined")
        assert page.eval_on_selector_all("img[src='x'], .ehr-groups script", "e => e.length") == 0
        page.close()


def test_study_explainer_computes_each_study_once_and_keeps_the_latest(monkeypatch):
    from radalign.finetune import serve_explain as S

    calls = []

    class Expl:
        def __init__(self, study_id, k):
            self.d = {"study_id": study_id, "k": k, "ehr_groups": {"total": 1.0}}

    monkeypatch.setattr(S, "explain_study", lambda run, sid, index, k: calls.append((sid, k)) or Expl(sid, k))
    monkeypatch.setattr(S, "to_json", lambda e: S.json.dumps(e.d))
    monkeypatch.setattr(S, "CACHED", 2)
    ex = object.__new__(S.StudyExplainer)  # no run to load: the explanations are stubbed
    ex.trained, ex.index_dir, ex.task = None, None, "t"
    ex._studies, ex._cache = {"1", "2", "3"}, S.OrderedDict()
    first = ex.explain("1", 5)
    first["ehr_groups"]["total"] = 99.0  # the caller's copy
    assert ex.explain("1", 5) == {"study_id": "1", "k": 5, "ehr_groups": {"total": 1.0}}
    assert calls == [("1", 5)]
    ex.explain("1", 3)
    ex.explain("1", 5)  # used last: kept when the third comes
    ex.explain("2", 5)  # ("1", 3) dropped
    ex.explain("1", 5)
    ex.explain("1", 3)
    assert calls == [("1", 5), ("1", 3), ("2", 5), ("1", 3)]
    assert ex.explain("9", 5) is None and len(calls) == 4

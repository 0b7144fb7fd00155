"""The serve page's finetune panel shows the EHR attribution (`ehr_groups` of `finetune explain --format json`):
through the JSON API unchanged, and on the page in a real headless Chromium as a ranked table, the record row
first, every text shown as text (a group name with <script> or <img onerror> runs nothing). The explainer is a
fake giving a fixed explanation (the real one, checked against `finetune explain`, is test_serve_finetune.py).
An attribution not computed (refused above MAX_GROUPS players, a model without EHR, no explanation at all) is
said through the API and on the page, its reason as text."""

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
    ex.trained, ex.index_dir, ex.task, ex.tuned = None, None, "t", False
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


# ----------------------------------------------------------------------------------------------------------
# An attribution that was not computed: refused (TooManyGroups), no EHR in the model, no explanation at all.
# The explanations are the real ones (finetune.attribution on a small fusion model, finetune.explain's JSON,
# StudyExplainer's cache and error branch); only `explain_study`'s loading of a trained run is stubbed.

HOSTILE_LAB = f"{SCRIPT} {IMG_ONERROR}"  # a lab feature whose name would run if it were inserted as HTML


def _real_explanation(study_id: str, *, refused: bool, monkeypatch):
    """finetune.explain's Explanation of a small fusion model's study, its EHR attribution from explain_ehr: with
    MAX_GROUPS = 2 the coarsest partition (the lab, the vital sign, demographics) is refused; without a
    featurizer (a model without EHR) there is nothing to split."""
    from types import SimpleNamespace

    from radalign.finetune import attribution as A
    from radalign.finetune import explain as ex
    from radalign.finetune.evaluate import coalition_logit

    from tests.test_explain_ehr import fusion, one_row

    monkeypatch.setattr(A, "MAX_GROUPS", 2)
    net = fusion(0)
    batch = one_row(measured=(True, False, False, True))  # the first lab and the vital sign measured
    labs = [HOSTILE_LAB, "lactate", "sodium"]
    fz = SimpleNamespace(features=[*labs, "heart_rate"], numeric=["age"]) if refused else None
    ehr = A.explain_ehr(SimpleNamespace(featurizer=fz), net, batch, list(net.modalities), {}, labs=labs)
    return ex.explain(coalition_logit(net, batch), list(net.modalities), study_id=study_id, used="image, text, ehr",
                      task="toy_task", ehr=ehr)


def _refusal() -> str:
    """The reason, written out by hand: 6 known groups (2 measured, age, sex, insurance, language), the lab and the
    vital sign keep their names (one known each), age joins the 3 known categories."""
    return (f"6 EHR groups are known for this study and even the coarsest partition ({HOSTILE_LAB}, heart_rate, "
            "demographics) has 3 players, above MAX_GROUPS = 2 (2^3 x 2^2 forward passes); set "
            "finetune.attribution.MAX_GROUPS to at least 3 (16 is the default), or read the modality Shapley values "
            "alone")


@pytest.fixture
def refusals(tmp_path_factory, monkeypatch):
    """The app with finetune's StudyExplainer: study 0 refused, study 1 without EHR, study 2 not explainable."""
    from radalign.finetune import serve_explain as S

    from radalign import RadalignError

    base = build_case_base(tmp_path_factory.mktemp("refusals"))
    studies = sorted(set(base["cols"]["study_id"]))[:3]
    made = {studies[0]: _real_explanation(studies[0], refused=True, monkeypatch=monkeypatch),
            studies[1]: _real_explanation(studies[1], refused=False, monkeypatch=monkeypatch)}

    def explain_study(trained, study_id, index, k):
        if study_id not in made:
            raise RadalignError(f"study {study_id}: its film was not embedded {SCRIPT}")
        return made[study_id]
    monkeypatch.setattr(S, "explain_study", explain_study)
    explainer = object.__new__(S.StudyExplainer)  # no trained run to load: explain_study above stands for it
    explainer.trained, explainer.index_dir, explainer.task, explainer.tuned = None, base["dir"], "toy_task", False
    explainer._studies, explainer._cache = set(studies), S.OrderedDict()
    explainer.demographics = lambda: {}
    app = create_app(base["dir"], encoders=base["enc"], explainer=explainer,
                     config=ServeConfig(audit_log=None, max_k=40))
    return {"app": app, "studies": studies, "made": made}


def test_json_api_says_why_the_ehr_attribution_is_missing(refusals):
    client = TestClient(refusals["app"], base_url=BASE)
    refused, no_ehr, broken = refusals["studies"]
    for route in ("search", "case"):
        got = {s: (client.post("/api/search/study", json={"study_id": s, "k": 3}) if route == "search"
                   else client.get(f"/api/case/{s}")).json()["explanation"] for s in refusals["studies"]}
        assert got[refused]["ehr_groups"] == {"error": _refusal()}, route
        expl = refusals["made"][refused]  # the modality Shapley values still stand, the EHR one unsplit
        assert got[refused]["shapley"] == pytest.approx(expl.shapley, abs=1e-12)
        assert sum(got[refused]["shapley"].values()) == pytest.approx(expl.full - expl.empty, abs=1e-6)
        assert got[no_ehr]["ehr_groups"] is None and "error" not in got[no_ehr]
        assert got[broken] == {"study_id": broken, "task": "toy_task",
                               "error": f"study {broken}: its film was not embedded {SCRIPT}"}


def test_finetune_explain_html_escapes_the_refusal(refusals, monkeypatch):
    import html

    from radalign.finetune import explain as ex

    page = ex.to_html(refusals["made"][refusals["studies"][0]])
    assert f"<p class='muted'>Not computed: {html.escape(_refusal())}.</p>" in page
    assert SCRIPT not in page and IMG_ONERROR not in page


def test_page_shows_the_refusal_as_text(browser, refusals):  # noqa: F811 - the imported fixture
    refused, no_ehr, broken = refusals["studies"]
    with running(refusals["app"]) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        for n, study in enumerate((refused, no_ehr, broken), start=1):
            page.fill("#study-input", study)
            page.click("#study-go")
            page.wait_for_selector(f"body[data-answers='{n}']", state="attached", timeout=60_000)
            boxes = page.eval_on_selector_all(".ehr-groups", "b => b.map(x => Array.from(x.children).map("
                                              "c => [c.tagName, c.textContent]))")
            explanation = page.text_content(".explanation")
            if study == refused:  # the heading, then the reason as text: no table of groups
                assert boxes == [[["H4", "Inside the EHR (exact Owen values over its groups, logit)"],
                                  ["P", f"Not computed: {_refusal()}"]]]
            elif study == no_ehr:  # nothing to split: no panel, the modality table still there
                assert boxes == [] and "Shapley (logit)" in explanation
            else:
                assert boxes == [] and explanation == f"No explanation: study {broken}: its film was not embedded {SCRIPT}"
        assert page.evaluate("window.__pwned === undefined")
        assert page.eval_on_selector_all(".explanation script, .explanation img", "e => e.length") == 0
        page.close()


class TunedExplainer(FakeExplainer):  # a tuned run's explanation: no neighbour vote, and why (serve_explain)
    def explain(self, study_id, k):
        return {**super().explain(study_id, k), "similar_cases": [], "neighbour_vote": None,
                "similar_note": f"no neighbour vote: the run's image tower was tuned {SCRIPT}"}


def test_page_says_why_a_tuned_run_has_no_neighbour_vote(browser, tmp_path_factory):  # noqa: F811
    base = build_case_base(tmp_path_factory.mktemp("tuned"))
    study = base["cols"]["study_id"][0]
    app = create_app(base["dir"], encoders=base["enc"], explainer=TunedExplainer(sorted(set(base["cols"]["study_id"]))),
                     config=ServeConfig(audit_log=None, max_k=40))
    with running(app) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#study-input", study)
        page.click("#study-go")
        page.wait_for_selector("body[data-answers='1']", state="attached", timeout=60_000)
        assert page.text_content(".explanation .similar-note") == \
            f"no neighbour vote: the run's image tower was tuned {SCRIPT}"
        assert page.evaluate("window.__pwned === undefined")
        assert page.eval_on_selector_all(".explanation script", "e => e.length") == 0
        page.close()

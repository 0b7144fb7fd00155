"""Per-prediction explanations: exact Shapley values over modalities, the `used` sentence, similar cases, and
the JSON / Markdown / HTML renderers (every text escaped).

Expectations are independent of the code under test: Shapley values against a brute-force average over all
orderings of the modalities and a hand-worked two-player game; escaping checked by parsing the output HTML
(html.parser, and the `markdown` package for the Markdown).
"""

from __future__ import annotations

import itertools
import json
import math
from html.parser import HTMLParser

import markdown
import numpy as np
import pytest
import torch
from radalign.finetune import explain as ex
from torch import nn

from radalign import RadalignError

torch.set_num_threads(1)
EVIL = "<script>alert('x')</script>"


def brute_force_shapley(f, players):
    """Average marginal contribution of each player over all M! orderings (the definition)."""
    phi = dict.fromkeys(players, 0.0)
    perms = list(itertools.permutations(players))
    for order in perms:
        kept: frozenset = frozenset()
        for p in order:
            phi[p] += f(kept | {p}) - f(kept)
            kept = kept | {p}
    return {p: v / len(perms) for p, v in phi.items()}


def toy_game(players, seed=0, ignored=()):
    """A random game with main effects, pairwise and triple interactions; `ignored` players change nothing."""
    rng = np.random.default_rng(seed)
    live = [p for p in players if p not in ignored]
    main = {p: rng.normal() for p in live}
    pair = {frozenset(c): rng.normal() for c in itertools.combinations(live, 2)}
    triple = {frozenset(c): rng.normal() for c in itertools.combinations(live, 3)}
    bias = rng.normal()

    def f(kept: frozenset) -> float:
        v = bias + sum(main[p] for p in kept if p in main)
        v += sum(w for c, w in pair.items() if c <= kept) + sum(w for c, w in triple.items() if c <= kept)
        return math.tanh(v) * 3  # non-linear on top of the interactions
    return f


class MaskedFusion(nn.Module):
    """A tiny fusion transformer: one token per modality, an absent one replaced by its learned mask token."""

    def __init__(self, names, dim=8, ignore=None):
        super().__init__()
        torch.manual_seed(0)
        self.names, self.ignore = list(names), ignore
        self.mask = nn.Parameter(torch.randn(len(names), dim))
        self.kind = nn.Parameter(torch.randn(len(names), dim))
        layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1)
        self.head = nn.Linear(dim, 1)

    @torch.no_grad()
    def logit(self, tokens: torch.Tensor, kept: frozenset) -> float:  # tokens [M, D]
        keep = torch.tensor([n in kept for n in self.names])[:, None]  # [M, 1]
        x = torch.where(keep, tokens, self.mask) + self.kind  # [M, D]
        if self.ignore is not None:  # the model never looks at this modality's token
            i = self.names.index(self.ignore)
            x = torch.cat([x[:i], x[i + 1:]])
        return float(self.head(self.enc(x[None]).mean(1))[0, 0])


# ----------------------------------------------------------------------------------------------------------
# Shapley


def test_two_player_game_by_hand():
    v = {frozenset(): 0.0, frozenset("a"): 1.0, frozenset("b"): 2.0, frozenset("ab"): 5.0}
    phi = ex.shapley_values(v, ["a", "b"])
    # a: 1/2 (1 - 0) + 1/2 (5 - 2) = 2;  b: 1/2 (2 - 0) + 1/2 (5 - 1) = 3
    assert phi == pytest.approx({"a": 2.0, "b": 3.0}, abs=1e-12)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_shapley_sums_to_full_minus_empty_and_equals_brute_force(m):
    players = ["image", "ehr", "text", "demographics", "report"][:m]
    f = toy_game(players, seed=m)
    values = ex.subset_values(f, players)
    phi = ex.shapley_values(values, players)
    assert sum(phi.values()) == pytest.approx(f(frozenset(players)) - f(frozenset()), abs=1e-6)
    ref = brute_force_shapley(f, players)
    for p in players:
        assert phi[p] == pytest.approx(ref[p], abs=1e-6)


def test_shapley_on_a_masked_fusion_transformer():
    names = ["image", "ehr", "text"]
    model = MaskedFusion(names)
    tokens = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    expl = ex.explain(lambda kept: model.logit(tokens, kept), names, study_id=1, used="image and labs")
    assert sum(expl.shapley.values()) == pytest.approx(expl.full - expl.empty, abs=1e-6)
    ref = brute_force_shapley(lambda kept: model.logit(tokens, kept), names)
    assert expl.shapley == pytest.approx(ref, abs=1e-6)
    assert expl.full == pytest.approx(model.logit(tokens, frozenset(names)))
    assert expl.empty == pytest.approx(model.logit(tokens, frozenset()))


def test_ignored_modality_gets_zero():
    players = ["image", "ehr", "text", "report"]
    f = toy_game(players, seed=3, ignored=("text",))
    phi = ex.shapley_values(ex.subset_values(f, players), players)
    assert phi["text"] == pytest.approx(0.0, abs=1e-12)
    assert any(abs(phi[p]) > 1e-3 for p in ("image", "ehr", "report"))
    model = MaskedFusion(["image", "ehr", "text"], ignore="ehr")
    tokens = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    expl = ex.explain(lambda kept: model.logit(tokens, kept), ["image", "ehr", "text"], study_id=1, used="x")
    assert expl.shapley["ehr"] == pytest.approx(0.0, abs=1e-6)


class FakeFusion:
    """The FusionModel calling convention: model(batch, present_override=frozenset(kept)).logits [B, 1], where
    the override is ANDed with each row's own presence (an absent modality stays masked)."""

    def __init__(self, names, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.names = list(names)
        self.w, self.mask = torch.randn(len(names), 4, generator=g), torch.randn(len(names), generator=g)

    def __call__(self, batch, present_override=frozenset()):
        x, present = batch["x"], batch["present"]  # [B, M, 4], [B, M]
        keep = present & torch.tensor([n in present_override for n in self.names])[None, :]  # [B, M]
        per = torch.where(keep, (x * self.w).sum(-1), self.mask)  # [B, M]
        logit = per.sum(1) + torch.tanh(per[:, 0] * per[:, -1])  # an interaction too
        return type("Out", (), {"logits": logit[:, None]})()


def test_batched_values_equal_per_row_and_absent_modality_is_a_null_player():
    names = ["image", "text", "ehr"]
    model = FakeFusion(names)
    g = torch.Generator().manual_seed(3)
    batch = {"x": torch.randn(6, 3, 4, generator=g),
             "present": torch.tensor([[1, 1, 1], [1, 0, 1], [1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1]],
                                     dtype=torch.bool)}
    phi = ex.shapley_values(ex.subset_values(lambda kept: model(batch, kept).logits[:, 0], names), names)
    for i in range(6):
        row = {"x": batch["x"][i:i + 1], "present": batch["present"][i:i + 1]}
        one = ex.explain(lambda kept, row=row: model(row, kept).logits[:, 0], names, study_id=i, used="")
        for j, m in enumerate(names):
            assert phi[m][i] == pytest.approx(one.shapley[m], abs=1e-9)
            if not batch["present"][i, j]:
                assert one.shapley[m] == 0.0  # exactly: keeping an absent modality changes nothing
        present = [m for j, m in enumerate(names) if batch["present"][i, j]]
        ref = brute_force_shapley(lambda kept, row=row: float(model(row, kept).logits[0, 0]), present)
        assert {m: one.shapley[m] for m in present} == pytest.approx(ref, abs=1e-6)
    with pytest.raises(RadalignError, match="6 logits per subset"):
        ex.explain(lambda kept: model(batch, kept).logits[:, 0], names, study_id=1, used="")


def test_every_subset_evaluated_exactly_once():
    calls = []

    def f(kept):
        calls.append(kept)
        return float(len(kept))

    ex.subset_values(f, ["a", "b", "c", "d"])
    assert len(calls) == 16 and len(set(calls)) == 16


def test_shapley_bad_input():
    with pytest.raises(RadalignError, match="at most 5"):
        ex.subset_values(lambda s: 0.0, list("abcdef"))
    with pytest.raises(RadalignError, match="once"):
        ex.subset_values(lambda s: 0.0, ["a", "a"])
    with pytest.raises(RadalignError, match=r"\['a'\].*nan"):
        ex.subset_values(lambda s: float("nan") if s == {"a"} else 0.0, ["a", "b"])
    with pytest.raises(RadalignError, match="missing for 1 subset"):
        ex.shapley_values({frozenset(): 0.0, frozenset("a"): 1.0, frozenset("b"): 1.0}, ["a", "b"])


# ----------------------------------------------------------------------------------------------------------
# `used`, similar cases


def test_used_statement_reads_like_the_issue():
    values = {f"lab{i}": (1.0 if i < 9 else float("nan")) for i in range(13)}
    hours = {f"lab{i}": 3.2 + i for i in range(13)}
    hours["lab12"] = 0.5  # not measured: its hours must not count as the latest
    details = {"ehr": ex.lab_details(values, hours)}
    present = {"image": True, "ehr": True, "text": True, "report": False}
    want = "image, labs (9 of 13 measured, latest 3.2 h before the film) and indication; no report"
    assert ex.used_statement(present, details) == want
    assert ex.used_statement({"image": True, "ehr": False, "text": False}) == "image; no labs or indication"
    assert ex.used_statement({"image": False}) == "nothing (every modality masked); no image"
    assert ex.lab_details({"a": None, "b": float("nan")}) == "0 of 2 measured"
    row = {"lactate": 2.1, "lactate_hours": 5.25, "creatinine": None, "creatinine_hours": None, "wbc": 7.0,
           "wbc_hours": 12.0}
    assert ex.lab_details_from_row(row, ["lactate", "creatinine", "wbc"]) == ("2 of 3 measured, latest 5.2 h "
                                                                              "before the film")


def _neighbours():
    return [
        {"study_id": 11, "subject_id": 7, "similarity": 0.95, "labels": ["Edema"], "outcome": 1},  # query's
        {"study_id": 12, "subject_id": 8, "similarity": 0.9, "labels": ["Edema"], "outcome": 1},
        {"study_id": 13, "subject_id": 9, "similarity": 0.6, "labels": [], "outcome": 0},
        {"study_id": 14, "subject_id": 10, "similarity": 0.3, "labels": [EVIL], "outcome": 1},
        {"study_id": 15, "subject_id": 11, "similarity": -0.2, "labels": [], "outcome": 1},
        {"study_id": 16, "subject_id": 12, "similarity": 0.2, "labels": [], "outcome": None},
    ]


def test_similar_cases_other_patients_and_weighted_vote():
    sim = ex.similar_cases(_neighbours(), subject_id=7)
    assert [c["study_id"] for c in sim.cases] == [12, 13, 14, 16, 15]  # best first
    assert sim.skipped == {"same_patient": 1, "no_outcome": 1}
    # weights 0.9, 0.6, 0.3, 0 (negative similarity clipped): (0.9 * 1 + 0.6 * 0 + 0.3 * 1) / 1.8
    assert sim.vote == pytest.approx(1.2 / 1.8)
    top2 = ex.similar_cases(_neighbours(), subject_id="7", k=2)  # ids compared as text
    assert [c["study_id"] for c in top2.cases] == [12, 13] and top2.vote == pytest.approx(0.6)
    with pytest.raises(RadalignError, match="lacks.*outcome"):
        ex.similar_cases([{"study_id": 1, "subject_id": 2, "similarity": 0.1, "labels": []}], subject_id=3)


# ----------------------------------------------------------------------------------------------------------
# Renderers


def _explanation() -> ex.Explanation:
    players = ["image", "ehr", "text"]
    f = toy_game(players, seed=5)
    return ex.explain(f, players, study_id=EVIL, subject_id=7, task="in_hospital_mortality",
                      used=f"image and indication ({EVIL})",
                      attention={"image": 0.5, "ehr": 0.3, "text": 0.2},
                      neighbours=_neighbours(), thumbnail="data:image/jpeg;base64,/9j/AAAA")


def test_json_has_the_agreed_keys():
    expl = _explanation()
    d = json.loads(ex.render(expl, "json"))
    assert d["study_id"] == EVIL
    assert d["output"]["space"] == "logit"
    assert d["output"]["full"] == pytest.approx(expl.full)
    assert d["output"]["empty"] == pytest.approx(expl.empty)
    assert d["output"]["probability"] == pytest.approx(1 / (1 + math.exp(-expl.full)))
    assert set(d["shapley"]) == {"image", "ehr", "text"}
    assert sum(d["shapley"].values()) == pytest.approx(expl.full - expl.empty, abs=1e-6)
    assert d["attention"] == {"image": 0.5, "ehr": 0.3, "text": 0.2} and d["used"].startswith("image")
    assert len(d["similar_cases"]) == 5
    for c in d["similar_cases"]:
        assert set(c) == {"study_id", "subject_id", "similarity", "labels", "outcome"}
    assert "thumbnail" not in json.dumps(d)


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_html_escapes_text_and_is_self_contained(tmp_path):
    out = tmp_path / "e.html"
    text = ex.write(_explanation(), "html", out)
    assert out.read_text() == text
    p = _Tags()
    p.feed(text)
    assert "script" not in [t for t, _ in p.tags]
    assert EVIL in "".join(p.text)  # shown as text
    srcs = [a.get("src") for t, a in p.tags if t == "img"]
    assert srcs == ["data:image/jpeg;base64,/9j/AAAA"]
    assert "http://" not in text and "https://" not in text
    assert text.count("<span class='pos'") + text.count("<span class='neg'") == 3  # one bar per modality


def test_html_refuses_a_thumbnail_that_is_not_a_data_image():
    expl = _explanation()
    expl.thumbnail = "javascript:alert(1)"
    p = _Tags()
    p.feed(ex.to_html(expl))
    assert not [t for t, _ in p.tags if t == "img"]


def test_markdown_escapes_text():
    md = ex.render(_explanation(), "markdown")
    page = markdown.markdown(md, extensions=["tables"])
    p = _Tags()
    p.feed(page)
    assert "script" not in [t for t, _ in p.tags]
    assert EVIL in "".join(p.text)
    assert "in_hospital_mortality" in "".join(p.text)  # underscores survive as text
    assert "similar past cases" in md
    assert ("1 neighbour(s) of the query's own patient left out of the list; 1 with an unknown outcome "
            "left out of the vote") in md
    assert "| 0.200 | 16 | 12 |  | unknown |" in md


def test_no_index_and_bad_format():
    expl = ex.explain(lambda s: float(len(s)), ["image"], study_id=3, used="image")
    assert "No retrieval index" in ex.to_markdown(expl) and "No retrieval index" in ex.to_html(expl)
    assert json.loads(ex.to_json(expl))["similar_cases"] == []
    with pytest.raises(RadalignError, match="json, markdown, html"):
        ex.render(expl, "pdf")


# ----------------------------------------------------------------------------------------------------------
# Edge cases a real prediction meets: large logits, tensors with a graph, no signal, unknown names.


@pytest.mark.parametrize("logit", [-800.0, -2.0, 0.0, 1.5, 800.0])
def test_probability_is_the_sigmoid_of_the_full_logit(logit):
    expl = ex.explain(lambda kept: logit if kept else 0.0, ["image"], study_id=1, used="image")
    ref = 0.5 * (1 + math.tanh(logit / 2))  # the logistic function written another way (no overflow)
    assert expl.probability == pytest.approx(ref, abs=1e-12)
    assert json.loads(ex.to_json(expl))["output"]["probability"] == pytest.approx(ref, abs=1e-12)
    assert f"- probability: {ref:.3f} (logit {logit:+.3f}; with every modality masked +0.000)" in ex.to_markdown(expl)


def test_values_from_tensors_with_a_graph_and_numpy_ids():
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    names = ["image", "ehr", "text"]

    def f(kept):  # a torch scalar that requires grad, as a model output would
        return (w * torch.tensor([float(n in kept) for n in names])).sum()

    expl = ex.explain(f, names, study_id=np.int64(42), subject_id=np.int64(7), used="all")
    assert expl.shapley == pytest.approx({"image": 1.0, "ehr": -2.0, "text": 0.5})  # additive game: the weights
    d = json.loads(ex.to_json(expl))  # numpy ids are written (as text), not refused
    assert str(d["study_id"]) == "42" and d["task"] == ""


def test_a_model_with_no_signal_renders_and_a_vote_without_weight_is_none():
    expl = ex.explain(lambda kept: 0.25, ["image", "ehr"], study_id=1, used="image and labs",
                      neighbours=[{"study_id": 5, "subject_id": 9, "similarity": -0.1, "labels": [], "outcome": 1},
                                  {"study_id": 6, "subject_id": 8, "similarity": 0.0, "labels": [], "outcome": 0}])
    assert expl.shapley == {"image": 0.0, "ehr": 0.0}
    page = ex.to_html(expl)  # every bar 0 px wide, no division by a zero scale
    assert page.count("style='width:0px'") == 2
    assert expl.similar.vote is None  # weights clipped at 0 sum to 0: no vote, not a division by zero
    assert "Neighbour vote <b>–</b>" in page and "neighbour vote of 2 similar cases: –" in ex.to_markdown(expl)


def test_bars_scale_to_the_largest_value():
    v = {frozenset(): 0.0, frozenset("a"): 1.0, frozenset("b"): -0.5, frozenset("ab"): 0.5}
    expl = ex.Explanation(study_id=1, full=0.5, empty=0.0, shapley=ex.shapley_values(v, ["a", "b"]), used="")
    page = ex.to_html(expl)
    assert "<span class='pos' style='width:120px'>" in page and "<span class='neg' style='width:60px'>" in page


def test_used_statement_names_unknown_modalities_as_given():
    assert ex.used_statement({"xray": True, "notes": False}) == "xray; no notes"
    assert ex.used_statement({"image": True, "text": True}) == "image and indication"  # nothing absent: no "no"


def test_html_case_rows_show_each_neighbour():
    neighbours = [dict(n) for n in _neighbours()]
    neighbours[1]["thumbnail"] = "data:image/png;base64,AAAA"
    expl = ex.explain(lambda s: float(len(s)), ["image"], study_id=3, subject_id=7, used="image",
                      neighbours=neighbours, k=3)
    page = ex.to_html(expl)
    p = _Tags()
    p.feed(page)
    imgs = [a for t, a in p.tags if t == "img"]
    assert imgs == [{"src": "data:image/png;base64,AAAA", "alt": "film"}]
    assert "<td>1</td><td><img src=" in page and "<td>0.900</td><td>12</td><td>8</td><td>Edema</td>" in page
    assert f"Neighbour vote <b>{expl.similar.vote:.3f}</b>" in page
    assert page.rstrip().endswith("</body></html>")


def test_float32_nan_labs_and_outcomes_count_as_missing():
    """Tables and indexes may hold float32: a float32 NaN is not a Python float, and must still read as missing."""
    f32 = np.float32
    assert ex.lab_details({"a": f32("nan"), "b": f32(1.0)}, {"a": f32(0.5), "b": f32(3.0)}) == (
        "1 of 2 measured, latest 3.0 h before the film")
    n = [{"study_id": 1, "subject_id": 2, "similarity": 0.8, "labels": [], "outcome": f32("nan")},
         {"study_id": 3, "subject_id": 4, "similarity": 0.4, "labels": [], "outcome": f32(1.0)}]
    sim = ex.similar_cases(n, subject_id=9)
    assert sim.vote == 1.0 and sim.skipped["no_outcome"] == 1
    assert "| unknown |" in "\n".join(ex._md_cases(sim))


def test_indication_attention_and_outcomes_are_rendered():
    expl = ex.explain(lambda s: float(len(s)), ["image", "ehr"], study_id=3, subject_id=7, used="image",
                      attention={"image": 0.5, "ehr": 0.25}, indication="cough", neighbours=_neighbours())
    assert expl.indication == "cough"
    md, page = ex.to_markdown(expl), ex.to_html(expl)
    assert "- indication: cough" in md and "<p>Indication: cough</p>" in page
    assert "| image | +1.000 | 0.500 |" in md and "<td>ehr</td><td>+1.000</td>" in page
    assert "<td>0.250</td></tr>" in page
    assert "| 1 | 0.900 | 12 | 8 | Edema | 1 |" in md and "<td>Edema</td><td>1</td>" in page

"""The reporting kit (radalign/report.py): hostile text through the one Markdown rule and the one HTML rule,
rendered by a real CommonMark parser; number / interval formatting against hand-worked strings; tables; the
page shell; plots; the metrics.json writer and the schema check."""

from __future__ import annotations

import datetime as dt
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest

from radalign import RadalignError
from radalign import report as R

markdown_it = pytest.importorskip("markdown_it")
COMMONMARK = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"])

HOSTILE = [
    "a | b", "x|y|z", "`code` and ``two``", "<script>alert(1)</script>", '<img src=x onerror="alert(1)">',
    "line one\nline two\r\nthree", "[click](javascript:alert(1))", "![pic](http://evil.example/x.png)",
    "&amp; &lt;b&gt; &#x27; &copy;", "*bold* _it_ **b** __u__", "# heading", "- item", "+ item", "1. first",
    "2) second", "===", "---", "~~gone~~", "back\\slash \\| \\", "[ref]: http://evil.example", "<http://evil.example>",
    "> quote", "| --- |", "a\u2028b\tc", "'quoted' \"double\"", "   leading and trailing   ", "",
]


class _Doc(HTMLParser):
    """Tags met and the text of each <td> / <p> / <h1> / <title> (entities decoded)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.cells, self.attrs, self._open = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [v for _, v in attrs]
        if tag in ("td", "p", "h1", "title"):
            self._open = []

    def handle_endtag(self, tag):
        if tag in ("td", "p", "h1", "title") and self._open is not None:
            self.cells.append("".join(self._open))
            self._open = None

    def handle_data(self, data):
        if self._open is not None:
            self._open.append(data)


def _parse(html: str) -> _Doc:
    d = _Doc()
    d.feed(html)
    return d


def _flat(s: str) -> str:
    return " ".join(s.split())


@pytest.mark.parametrize("text", HOSTILE)
def test_md_renders_hostile_text_as_itself_in_a_table_cell(text):
    doc = _parse(COMMONMARK.render("\n".join(R.md_table(["value", "n"], [[text, 1]])) + "\n"))
    assert set(doc.tags) <= {"table", "thead", "tbody", "tr", "th", "td"}  # no a, img, code, em, script
    assert doc.cells == [_flat(text), "1"]  # still one row of two cells, the text exactly as given


@pytest.mark.parametrize("text", HOSTILE)
def test_md_renders_hostile_text_as_itself_in_a_line(text):
    for src in (f"Source: {R.md(text)}.", f"intro line\n{R.md(text)}", R.md(text) or "x"):
        doc = _parse(COMMONMARK.render(src + "\n"))
        assert set(doc.tags) <= {"p"}, (text, src, doc.tags)  # no heading, list, rule, quote, link or code
    assert _parse(COMMONMARK.render(f"Source: {R.md(text)}.\n")).cells == [f"Source: {_flat(text)}."]


@pytest.mark.parametrize("text", HOSTILE)
def test_html_text_renders_hostile_text_as_itself(text):
    page = R.html_page(text, [f"<p title=\"{R.html_text(text)}\">{R.html_text(text)}</p>"])
    doc = _parse(page)
    assert doc.tags == ["html", "head", "meta", "title", "style", "body", "h1", "p"]
    assert doc.cells == [text, text, text]  # <title>, <h1>, <p>: the data, never markup
    assert doc.attrs[-1] == text  # an attribute cannot be closed early
    assert page.count("<") == R.html_page("", ["<p title=\"\"></p>"]).count("<")  # no `<` came from the data
    assert page.startswith("<!doctype html>") and page.endswith("</p>\n</body></html>\n")


def test_md_is_readable_for_ordinary_text():
    assert R.md("Pleural Effusion 0.91 (test split)") == "Pleural Effusion 0.91 (test split)"
    assert R.md(None) == "" and isinstance(R.md("x"), R.Md)
    assert R.md("a<b & c") == "a&lt;b &amp; c" and R.md("n_pos") == "n\\_pos" and R.md("40-64") == "40-64"
    assert R.md("-1") == "\\-1" and R.md("12. x") == "12\\. x"


def test_html_img_only_embeds_data_uris():
    assert R.html_img("data:image/png;base64,AAAA", 'a"b', "large") == \
        "<img class='large' src=\"data:image/png;base64,AAAA\" alt=\"a&quot;b\">"
    assert R.html_img("data:image/jpeg;base64,AA", "x") == "<img src=\"data:image/jpeg;base64,AA\" alt=\"x\">"
    for uri in ("http://evil.example/x.png", "javascript:alert(1)", "", None):
        assert "<img" not in R.html_img(uri, "x")


@pytest.mark.parametrize("value,low,high,signed,expected", [
    (0.91666, 0.87149, 0.95351, False, "0.917 [0.871, 0.954]"),
    (0.5, None, None, False, "0.500"),
    (0.5, 0.4, float("nan"), False, "0.500"),
    (None, 0.1, 0.2, False, "–"),
    (float("nan"), 0.1, 0.2, False, "–"),
    (0.0123, -0.0104, 0.0301, True, "+0.012 [-0.010, +0.030]"),
    (-0.2, -0.3, -0.1, True, "-0.200 [-0.300, -0.100]"),
    (np.float32(0.25), np.float64(0.125), 1, False, "0.250 [0.125, 1.000]"),
])
def test_ci_formats(value, low, high, signed, expected):
    assert R.ci(value, low, high, signed=signed) == expected
    assert R.ci_of({"v": value, "ci_low": low, "ci_high": high}, "v", signed=signed) == expected


def test_num_and_delta_formats():
    assert R.num(None) == R.num(math.nan) == R.NONE == "–"
    assert R.num(2 / 3) == "0.667" and R.num(2 / 3, 1) == "0.7" and R.num(0.05, signed=True) == "+0.050"
    assert R.ci_of(None) == R.ci_of({}) == "–"
    assert R.ci_of({"value": 0.25, "ci_low": 0.125, "ci_high": 0.5}) == "0.250 [0.125, 0.500]"  # default key
    d = {"delta": 0.0123, "ci_low": -0.0104, "ci_high": 0.0301, "p_value": 0.31}
    assert R.delta_of(d) == "+0.012 [-0.010, +0.030], p 0.310"
    assert R.delta_of({**d, "p_value": None}) == "+0.012 [-0.010, +0.030]" and R.delta_of({"delta": None}) == "–"


def test_md_table_cells_and_shape():
    lines = R.md_table(["a", "b", "c", "d", "e"], [[R.Md("**x**"), 3, 0.5, None, True]], align="lrrrl")
    assert lines == ["| a | b | c | d | e |", "|---|---:|---:|---:|---|", "| **x** | 3 | 0.500 | – | yes |"]
    with pytest.raises(RadalignError, match="row of 2 cells under a header of 3"):
        R.md_table(["a", "b", "c"], [[1, 2]])
    with pytest.raises(RadalignError, match="align"):
        R.md_table(["a"], [], align="lr")


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    y = (rng.random(60) < 0.4).astype(float)
    s = y + rng.normal(size=60)
    R.roc_plot(tmp_path / "roc.png", {"<model>": (y, s), "one class": (np.ones(60), s)}, "<title>", bold="<model>")
    R.reliability_plot(tmp_path / "rel.png", {"before": [{"mean_prob": 0.2, "observed": 0.3}]}, title="t")
    R.interval_plot(tmp_path / "sub.png", [("g", {"auroc": 0.7, "ci_low": 0.6, "ci_high": 0.8})], "AUROC")
    R.learning_curve_plot(tmp_path / "lc.png", {"m": [(1, 0.6, 0.5, 0.7), ("all", 0.8, 0.75, 0.85)]},
                          xlabel="k", ylabel="AUROC", baseline=("zero-shot", 0.55))
    for name in ("roc", "rel", "sub", "lc"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lc.png", "rel.png", "roc.png", "sub.png"]  # no temp


def test_write_metrics_tags_the_format_unit_and_time(tmp_path):
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    out = R.write_metrics(tmp_path / "m" / "metrics.json", {"macro": {"auroc": 0.8}}, stage="zeroshot",
                          unit="patient")
    doc = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert doc == out and list(doc)[:3] == ["format", "unit", "created"]
    assert doc["format"] == "radalign-zeroshot-metrics/1" and doc["unit"] == "patient"
    assert before <= dt.datetime.fromisoformat(doc["created"]) <= dt.datetime.now(dt.timezone.utc)
    assert R.write_metrics(tmp_path / "again.json", doc, stage="zeroshot", unit="patient")["macro"] == {"auroc": 0.8}
    assert R.metrics_format("finetune", 2) == "radalign-finetune-metrics/2"
    with pytest.raises(RadalignError, match="mislabel"):
        R.write_metrics(tmp_path / "x.json", doc, stage="retrieval", unit="patient")
    with pytest.raises(RadalignError, match="mislabel"):
        R.write_metrics(tmp_path / "x.json", doc, stage="zeroshot", unit="image")
    assert not (tmp_path / "x.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.json", "m"]


def test_check_schema_lists_every_problem():
    schema = {"required": {"a": int, "b": (dict, type(None))}, "optional": {"c": str}}
    R.check_schema({"a": 1, "b": None}, schema, what="doc")
    R.check_schema({"a": 1, "b": {}, "c": "x"}, schema, what="doc")
    with pytest.raises(RadalignError) as e:
        R.check_schema({"b": 3, "c": "x", "zz": 1}, schema, what="doc")
    msg = str(e.value)
    assert msg.startswith("doc: missing 'a'; 'b' is int") and msg.endswith("; unknown key 'zz'")


@pytest.mark.parametrize("value,expected", [
    (1, 1.0), ("2.5", 2.5), (np.float32(0.25), 0.25), (-0.0, 0.0), ("1e3", 1000.0),
    (None, None), ("___", None), ("", None), ("n/a", None), (float("nan"), None), (np.nan, None),
    (float("inf"), None), ("-inf", None), (np.float64("inf"), None), ([1], None)])
def test_finite_or_none(value, expected):
    """One reading of "a number or nothing" (EHR values shown, outcomes, few-shot pulls): MIMIC's "___", blanks,
    NaN and inf are nothing."""
    assert R.finite_or_none(value) == expected and (expected is None or isinstance(R.finite_or_none(value), float))

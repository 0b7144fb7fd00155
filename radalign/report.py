"""The reporting kit every stage writes its reports with: escaping, number formatting, Markdown tables, the
HTML page shell, plots, and the one `metrics.json` writer.

    md(text)                      any text for Markdown: one rule (below), safe in a line or a table cell
    html_text(text)               any text for HTML (element content or a quoted attribute)
    num(0.91666) -> "0.917"       ci(0.917, 0.871, 0.954) -> "0.917 [0.871, 0.954]"; None -> "–"
    md_table(header, rows)        Markdown table lines; a cell that is not `Md` is escaped with md()
    html_page(title, parts)       a self-contained page: one CSS, the title escaped
    roc_plot / reliability_plot / interval_plot / learning_curve_plot   PNGs (backend set once), atomic
    write_metrics(path, doc, stage="zeroshot", unit="patient")          metrics.json with its format tag

The Markdown rule: every ASCII character Markdown or HTML gives a meaning inside a line (\\ ` * _ [ ] # | ~
< > &, and a leading + - = or "1." that would start a list or a heading) is neutralised, `<`, `>` and `&` by
HTML-escaping (so `<script>` and `&amp;` render as the text they are), the rest with a backslash; every run of
whitespace (newlines included) becomes one space, so a value can never end a table row, a line or a paragraph.
Escaped text is never put inside a code span (a backslash is literal there): the kit has no code spans.
This module imports no stage package.
"""

from __future__ import annotations

import datetime as dt
import html
import io
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from radalign import RadalignError
from radalign import metrics as M
from radalign.io import atomic_write_bytes, atomic_write_json

NONE = "–"  # how a missing / undefined number reads in every report
_MD_SPECIAL = re.compile(r"([\\`*_\[\]#|~])")
_MD_LEADING = re.compile(r"^([+\-=])|^(\d+)([.)])")  # list items, setext underlines, ordered lists


class Md(str):
    """Text that is already safe Markdown (escaped text, formatted numbers, the kit's own markup)."""


# ----------------------------------------------------------------------------------------------------------
# Escaping


def md(text) -> Md:
    """Any value as Markdown text that renders as exactly that text (None -> empty); see the module docstring."""
    s = " ".join(str("" if text is None else text).split())
    s = _MD_SPECIAL.sub(r"\\\1", s)
    s = _MD_LEADING.sub(lambda m: "\\" + m.group(1) if m.group(1) else m.group(2) + "\\" + m.group(3), s)
    return Md(html.escape(s, quote=False))


def html_text(text) -> str:
    """Any value for HTML element content or a quoted attribute (None -> empty): & < > " ' escaped."""
    return html.escape(str("" if text is None else text), quote=True)


# ----------------------------------------------------------------------------------------------------------
# Numbers


def finite_or_none(v) -> float | None:
    """`v` as a float, or None when it is missing, not a number ("___", "n/a") or not finite (NaN, inf)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _missing(x) -> bool:
    return x is None or (isinstance(x, (float, np.floating)) and np.isnan(x))


def num(x, nd: int = 3, *, signed: bool = False) -> Md:
    """A number with `nd` decimals ("+" first when `signed`); None or NaN -> "–"."""
    if _missing(x):
        return Md(NONE)
    return Md(f"{x:{'+' if signed else ''}.{nd}f}")


def ci(value, low, high, nd: int = 3, *, signed: bool = False) -> Md:
    """"0.917 [0.871, 0.954]"; the value alone when the interval is unknown; "–" when the value is."""
    if _missing(value):
        return Md(NONE)
    if _missing(low) or _missing(high):
        return num(value, nd, signed=signed)
    return Md(f"{num(value, nd, signed=signed)} [{num(low, nd, signed=signed)}, {num(high, nd, signed=signed)}]")


def ci_of(d: Mapping | None, key: str = "value", nd: int = 3, *, signed: bool = False) -> Md:
    """ci() of a result dict {key, "ci_low", "ci_high"} (radalign.metrics' bootstrap results); None -> "–"."""
    if not d:
        return Md(NONE)
    return ci(d.get(key), d.get("ci_low"), d.get("ci_high"), nd, signed=signed)


def delta_of(d: Mapping | None, nd: int = 3) -> Md:
    """A paired difference: "+0.012 [-0.010, +0.030], p 0.310" (p left out when unknown)."""
    text = ci_of(d, "delta", nd, signed=True)
    if d and d.get("delta") is not None and d.get("p_value") is not None:
        return Md(f"{text}, p {num(d['p_value'], nd)}")
    return text


# ----------------------------------------------------------------------------------------------------------
# Markdown tables


def _cell(v) -> Md:
    if isinstance(v, Md):
        return v
    if isinstance(v, (bool, np.bool_)):
        return md("yes" if v else "no")
    if isinstance(v, (int, np.integer)):
        return Md(str(int(v)))
    if v is None or isinstance(v, (float, np.floating)):
        return num(v)
    return md(v)


def md_table(header: Sequence, rows: Iterable[Sequence], align: str | None = None) -> list[str]:
    """A Markdown table as lines. Cells: `Md` as is, ints as digits, floats/None via num(), the rest via md().

    align: one letter per column, "l" or "r" (default: all left, `---`).
    """
    n = len(header)
    marks = ["---:" if a == "r" else "---" for a in (align or "l" * n)]
    if len(marks) != n:
        raise RadalignError(f"md_table: align {align!r} has {len(marks)} letters for {n} columns")
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(marks) + "|"]
    for r in rows:
        if len(r) != n:
            raise RadalignError(f"md_table: a row of {len(r)} cells under a header of {n} columns")
        lines.append("| " + " | ".join(_cell(c) for c in r) + " |")
    return lines


# ----------------------------------------------------------------------------------------------------------
# The HTML page shell


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
img{width:96px;height:96px;object-fit:contain;background:#000}img.large{width:192px;height:192px}
.muted{color:#666}.bar,.pos,.neg{height:10px;display:inline-block}.bar{background:#4a7}
.pos{background:#c44}.neg{background:#47c}"""


def html_page(title: str, parts: Iterable[str]) -> str:
    """A self-contained page (CSS inline, no external assets): <title> and <h1> are `title`, escaped; `parts`
    are HTML the caller built with html_text() around every piece of data."""
    t = html_text(title)
    head = (f"<!doctype html><html><head><meta charset='utf-8'><title>{t}</title><style>{CSS}</style></head>"
            f"<body><h1>{t}</h1>")
    return "\n".join([head, *parts, "</body></html>"]) + "\n"


def html_img(uri: str | None, alt: str, cls: str = "") -> str:
    """An <img> of a `data:image/` URI (the page never loads anything from elsewhere); otherwise a muted
    "no image" note."""
    if not uri or not str(uri).startswith("data:image/"):
        return "<span class='muted'>no image</span>"
    c = f" class='{html_text(cls)}'" if cls else ""
    return f"<img{c} src=\"{html_text(uri)}\" alt=\"{html_text(alt)}\">"


# ----------------------------------------------------------------------------------------------------------
# Plots (PNG, written atomically)


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, set here and nowhere else. Imported on first use:
    matplotlib costs a second of start-up that commands writing no plot should not pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def roc_plot(path: str | os.PathLike, curves: Mapping[str, tuple], title: str, bold: str | None = None) -> None:
    """One ROC curve per entry {name: (y, score)} (y 1/0, NaN rows left out), AUROC in the legend; a curve
    whose labels have one class is left out. `bold`: the name drawn thicker (the model the report is about)."""
    fig, ax = pyplot().subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--")
    for name, (y, score) in curves.items():
        y, score = np.asarray(y, dtype=np.float64), np.asarray(score, dtype=np.float64)
        tpr, fpr = M.roc_points(y, score)
        if np.isnan(tpr).any() or np.isnan(fpr).any():
            continue
        ax.plot(fpr[0], tpr[0], lw=1.8 if name == bold else 1.1, label=f"{name} ({M.auroc(y, score):.3f})")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=7)
    save_png(fig, path)


def reliability_plot(path: str | os.PathLike, curves: Mapping[str, Sequence[Mapping]], title: str = "") -> None:
    """Observed rate against mean probability per bin (`metrics.calibration_bins`), one line per curve."""
    fig, ax = pyplot().subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="perfect")
    for name, bins in curves.items():
        ax.plot([b["mean_prob"] for b in bins], [b["observed"] for b in bins], marker="o", label=name)
    ax.set(xlabel="mean predicted probability (equal-mass bins)", ylabel="observed rate", xlim=(0, 1),
           ylim=(0, 1), title=title)
    ax.legend(loc="upper left", fontsize=8)
    save_png(fig, path)


def interval_plot(path: str | os.PathLike, rows: Sequence[tuple[str, Mapping]], xlabel: str, key: str = "auroc",
                  chance: float = 0.5) -> None:
    """One point with its interval per row (name, {key, ci_low, ci_high}), top to bottom (subgroup AUROCs)."""
    fig, ax = pyplot().subplots(figsize=(6, 0.3 * max(len(rows), 1) + 1.2))
    for i, (_, r) in enumerate(rows):
        ax.errorbar(r[key], i, xerr=[[r[key] - r["ci_low"]], [r["ci_high"] - r[key]]], fmt="o", color="#357",
                    capsize=2)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(chance, color="#999", lw=1, ls="--")
    ax.set(xlabel=xlabel, xlim=(0, 1))
    save_png(fig, path)


def learning_curve_plot(path: str | os.PathLike, series: Mapping[str, Sequence[tuple]], *, xlabel: str,
                        ylabel: str, ticks: Sequence | None = None, baseline: tuple[str, float] | None = None) -> None:
    """Means with intervals against ordered categories: series {name: [(x label, mean, low, high), ...]}; the
    categories (`ticks`, default first-seen order) take positions 1..n, `baseline` (label, value) sits at 0 with
    a dotted line."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    ticks = list(ticks) if ticks is not None else list(dict.fromkeys(x for pts in series.values() for x, *_ in pts))
    pos = {x: i + 1 for i, x in enumerate(ticks)}
    for name, pts in series.items():
        m = np.array([p[1] for p in pts], dtype=np.float64)
        err = [m - np.array([p[2] for p in pts], dtype=np.float64), np.array([p[3] for p in pts]) - m]
        ax.errorbar([pos[p[0]] for p in pts], m, yerr=err, marker="o", capsize=3, label=name)
    if baseline is not None:
        ax.scatter([0], [baseline[1]], marker="*", s=120, color="k", zorder=5, label=baseline[0])
        ax.axhline(baseline[1], color="k", lw=0.6, ls=":")
    ax.set_xticks([0] + list(pos.values()), ["0"] + [str(x) for x in pos])
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    save_png(fig, path, dpi=110)


# ----------------------------------------------------------------------------------------------------------
# metrics.json


def metrics_format(stage: str, version: int = 1) -> str:
    """The format tag of a stage's metrics.json: "radalign-<stage>-metrics/<version>"."""
    return f"radalign-{stage}-metrics/{version}"


def write_metrics(path: str | os.PathLike, doc: Mapping, *, stage: str, unit: str | None,
                  version: int = 1) -> dict:
    """Write `doc` as metrics.json, atomically, headed by {"format": metrics_format(stage, version), "unit",
    "created" (UTC, ISO 8601)}; returns what was written. `unit`: what every interval resamples ("patient",
    "image"), None when the file has no interval. A document that already carries another format or unit is
    an error (rewriting a document this writer wrote is not)."""
    head = {"format": metrics_format(stage, version), "unit": unit,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if doc.get("format", head["format"]) != head["format"] or doc.get("unit", unit) != unit:
        raise RadalignError(f"write_metrics({path}): the document says format {doc.get('format')!r}, unit "
                            f"{doc.get('unit')!r}; writing it as {head['format']!r}, unit {unit!r} would "
                            "mislabel it")
    out = {**head, **{k: v for k, v in doc.items() if k not in head}}
    atomic_write_json(path, out)
    return out


def check_schema(doc: Mapping, schema: Mapping[str, Mapping[str, type | tuple]], *, what: str) -> None:
    """One RadalignError listing every problem of `doc` against schema {"required": {key: types}, "optional":
    {key: types}}: a missing required key, a value of another type, a key the schema does not know."""
    req, opt = schema["required"], schema.get("optional", {})
    problems = [f"missing {k!r}" for k in req if k not in doc]
    for k, v in doc.items():
        types = req.get(k, opt.get(k))
        if types is None:
            problems.append(f"unknown key {k!r}")
        elif not isinstance(v, types):
            problems.append(f"{k!r} is {type(v).__name__}, expected {types}")
    if problems:
        raise RadalignError(f"{what}: " + "; ".join(problems))


def predictions_frame(keys: list[str], scores: np.ndarray, labels: np.ndarray, names: list[str],
                      true_class: list[str] | None = None) -> pd.DataFrame:
    """key, score:<class>..., label:<class>... (blank = excluded), and true/predicted class if multi-class: the
    per-image predictions.csv of zero-shot and retrieval's k-NN vote."""
    df = pd.DataFrame({"key": keys})
    for j, n in enumerate(names):
        df[f"score:{n}"] = scores[:, j]
    for j, n in enumerate(names):
        df[f"label:{n}"] = pd.array(np.where(np.isnan(labels[:, j]), pd.NA, labels[:, j]), dtype="Int64")
    if true_class is not None:
        df["true_class"] = true_class
        df["pred_class"] = [names[i] for i in scores.argmax(axis=1)]
    return df


__all__ = ["predictions_frame", "finite_or_none", "NONE", "Md", "md", "html_text", "num", "ci", "ci_of", "delta_of", "md_table", "CSS", "html_page",
           "html_img", "pyplot", "save_png", "roc_plot", "reliability_plot", "interval_plot",
           "learning_curve_plot", "metrics_format", "write_metrics", "check_schema"]

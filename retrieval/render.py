"""Search results for people: Markdown, and a self-contained HTML page (thumbnails as data URIs, no external
assets, so the file can be mailed or attached to a ticket). JSON for programs is `SearchResult.to_json()`."""

from __future__ import annotations

import html
import os

from radalign.retrieval.search import SearchResult

from radalign import RadalignError
from radalign.io import atomic_write_text

FORMATS = ("json", "markdown", "html")


def _query_title(q: dict) -> str:
    kind = q.get("kind", "query")
    if kind == "text":
        return f"text: \u201c{q.get('text', '')}\u201d"
    if kind == "study":
        return f"study {q.get('study_id')} (patient {q.get('subject_id')}, image {q.get('dicom_id')})"
    return f"{kind}: {q.get('source', '')}"


def _md_cell(text) -> str:
    """Any text (report excerpts are untrusted) for Markdown: HTML-escaped, so `<script>` or `<img onerror>`
    render as text; brackets escaped (no links or images); pipes and line breaks cannot break the table."""
    t = html.escape(str(text if text is not None else ""), quote=True)
    t = t.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]").replace("`", "\\`")
    return t.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def to_markdown(res: SearchResult) -> str:
    q = res.query
    lines = [f"# Similar cases for {_md_cell(_query_title(q))}", ""]
    if q.get("text_cut"):
        c = q["text_cut"]
        lines += [f"Note: the query text has {c['chars']} characters; the text tower reads {c['context_tokens']} "
                  f"tokens, about the first {c['chars_used']} characters.", ""]
    if q.get("labels") is not None:
        lines += [f"Query labels: {_md_cell(', '.join(q['labels']) or 'none positive')}", ""]
    if q.get("excerpt"):
        lines += [f"Query report: {_md_cell(q['excerpt'])}", ""]
    lines += ["## Why these cases", ""]
    if res.explanation:
        for e in res.explanation:
            has = "" if e["query_has"] is None else (" (query: yes)" if e["query_has"] else " (query: no)")
            lines.append(f"- **{_md_cell(e['text'])}** (similarity-weighted {e['weighted']:.0%}){has}: studies "
                         f"{_md_cell(', '.join(map(str, e['studies'])))}")
    else:
        lines.append("- none of the neighbours carries a positive label")
    lines += ["", f"## {len(res.neighbours)} most similar cases (k={res.k})", "",
              "| # | similarity | study | patient | view | labels | outcome | report excerpt |",
              "|---|---|---|---|---|---|---|---|"]
    for n in res.neighbours:
        lines.append(f"| {n['rank']} | {n['similarity']:.3f} | {_md_cell(n['study_id'])} | {_md_cell(n['subject_id'])} | "
                     f"{_md_cell(n['view'])} | {_md_cell(', '.join(n['labels']))} | {_md_cell(n['outcomes'])} | "
                     f"{_md_cell(n['excerpt'])} |")
    lines += ["", _filter_note(res), "", f"Index: {_md_cell(res.index['index_string'])} "
              f"{_md_cell(res.index['params'] or '')}, {res.index['count']} images, encoder "
              f"{_md_cell(res.index['encoder_checksum'][:12])}", ""]
    return "\n".join(lines)


def _filter_note(res: SearchResult) -> str:
    f = res.filtered
    return (f"Filtered out: {f.get('same_patient', 0)} image(s) of the query's patient, "
            f"{f.get('same_study', 0)} further image(s) of studies already listed.")


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
img{width:96px;height:96px;object-fit:contain;background:#000}.q img{width:160px;height:160px}
.bar{background:#4a7;height:10px;display:inline-block}.muted{color:#666}"""


def _img(uri: str | None) -> str:
    return f'<img src="{html.escape(uri)}" alt="thumbnail">' if uri else '<span class="muted">no image</span>'


def to_html(res: SearchResult) -> str:
    e = html.escape
    q = res.query
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Similar cases</title><style>{_CSS}"
             f"</style></head><body><h1>Similar cases for {e(_query_title(q))}</h1>",
             f"<div class='q'>{_img(q.get('thumbnail'))}"]
    if q.get("text_cut"):
        c = q["text_cut"]
        parts.append(f"<p class='muted'>Note: the query text has {int(c['chars'])} characters; the text tower "
                     f"reads {int(c['context_tokens'])} tokens, about the first {int(c['chars_used'])} characters.</p>")
    if q.get("labels") is not None:
        parts.append(f"<p>Query labels: {e(', '.join(q['labels']) or 'none positive')}</p>")
    if q.get("excerpt"):
        parts.append(f"<p class='muted'>{e(q['excerpt'])}</p>")
    parts.append("</div><h2>Why these cases</h2><table><tr><th>label</th><th>neighbours</th>"
                 "<th>weighted</th><th>query</th><th>studies</th></tr>")
    for x in res.explanation:
        has = "" if x["query_has"] is None else ("yes" if x["query_has"] else "no")
        parts.append(f"<tr><td>{e(x['label'])}</td><td>{x['count']}/{x['of']}</td><td><span class='bar' "
                     f"style='width:{round(80 * x['weighted'])}px'></span> {x['weighted']:.0%}</td><td>{has}</td>"
                     f"<td>{e(', '.join(map(str, x['studies'])))}</td></tr>")
    parts.append(f"</table><h2>{len(res.neighbours)} most similar cases (k={res.k})</h2><table><tr><th>#</th>"
                 "<th>image</th><th>similarity</th><th>study / patient</th><th>labels</th><th>outcome</th>"
                 "<th>report excerpt</th></tr>")
    for n in res.neighbours:
        parts.append(f"<tr><td>{n['rank']}</td><td>{_img(n['thumbnail'])}</td><td>{n['similarity']:.3f}</td>"
                     f"<td>study {e(str(n['study_id']))}<br>patient {e(str(n['subject_id']))}<br>"
                     f"<span class='muted'>{e(str(n['dicom_id']))} {e(str(n['view'] or ''))}</span></td>"
                     f"<td>{e(', '.join(n['labels']))}</td><td>{e(str(n['outcomes'] or ''))}</td>"
                     f"<td>{e(n['excerpt'])}</td></tr>")
    parts.append(f"</table><p class='muted'>{e(_filter_note(res))}<br>Index {e(res.index['index_string'])} "
                 f"{e(str(res.index['params'] or ''))}, {res.index['count']} images, encoder "
                 f"{e(res.index['encoder_checksum'][:12])}</p></body></html>")
    return "\n".join(parts)


def render(res: SearchResult, fmt: str) -> str:
    if fmt == "json":
        return res.to_json()
    if fmt == "markdown":
        return to_markdown(res)
    if fmt == "html":
        return to_html(res)
    raise RadalignError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def write(res: SearchResult, fmt: str, out: str | os.PathLike | None) -> str:
    """Render; write atomically to `out` when given. Returns the text."""
    text = render(res, fmt)
    if out:
        atomic_write_text(out, text)
    return text


__all__ = ["FORMATS", "to_markdown", "to_html", "render", "write"]

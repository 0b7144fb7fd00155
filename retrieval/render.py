"""Search results for people: Markdown, and a self-contained HTML page (thumbnails as data URIs, no external
assets, so the file can be mailed or attached to a ticket). JSON for programs is `SearchResult.to_json()`."""

from __future__ import annotations

import os

from radalign.retrieval.search import SearchResult

from radalign import RadalignError
from radalign import report as R
from radalign.config import OUTPUT_FORMATS
from radalign.io import atomic_write_text

FORMATS = OUTPUT_FORMATS  # one list of report formats: radalign.config


def _query_title(q: dict) -> str:
    kind = q.get("kind", "query")
    if kind == "text":
        return f"text: \u201c{q.get('text', '')}\u201d"
    if kind == "study":
        return f"study {q.get('study_id')} (patient {q.get('subject_id')}, image {q.get('dicom_id')})"
    return f"{kind}: {q.get('source', '')}"


def to_markdown(res: SearchResult) -> str:
    q = res.query
    lines = [f"# Similar cases for {R.md(_query_title(q))}", ""]
    if q.get("text_cut"):
        c = q["text_cut"]
        lines += [f"Note: the query text has {c['chars']} characters; the text tower reads {c['context_tokens']} "
                  f"tokens, about the first {c['chars_used']} characters.", ""]
    if q.get("labels") is not None:
        lines += [f"Query labels: {R.md(', '.join(q['labels']) or 'none positive')}", ""]
    if q.get("excerpt"):
        lines += [f"Query report: {R.md(q['excerpt'])}", ""]
    lines += ["## Why these cases", ""]
    if res.explanation:
        for e in res.explanation:
            has = "" if e["query_has"] is None else (" (query: yes)" if e["query_has"] else " (query: no)")
            lines.append(f"- **{R.md(e['text'])}** (similarity-weighted {e['weighted']:.0%}){has}: studies "
                         f"{R.md(', '.join(map(str, e['studies'])))}")
    else:
        lines.append("- none of the neighbours carries a positive label")
    lines += ["", f"## {len(res.neighbours)} most similar cases (k={res.k})", ""]
    lines += R.md_table(["#", "similarity", "study", "patient", "view", "labels", "outcome", "report excerpt"],
                        [[n["rank"], n["similarity"], str(n["study_id"]), str(n["subject_id"]), n["view"],
                          ", ".join(n["labels"]), n["outcomes"], n["excerpt"]] for n in res.neighbours])
    lines += ["", _filter_note(res), "", f"Index: {R.md(res.index['index_string'])} "
              f"{R.md(res.index['params'] or '')}, {res.index['count']} images, encoder "
              f"{R.md(res.index['encoder_checksum'][:12])}", ""]
    return "\n".join(lines)


def _filter_note(res: SearchResult) -> str:
    f = res.filtered
    return (f"Filtered out: {f.get('same_patient', 0)} image(s) of the query's patient, "
            f"{f.get('same_study', 0)} further image(s) of studies already listed.")


def to_html(res: SearchResult) -> str:
    e = R.html_text
    q = res.query
    parts = [f"<div class='q'>{R.html_img(q.get('thumbnail'), 'thumbnail', 'large')}"]
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
        parts.append(f"<tr><td>{n['rank']}</td><td>{R.html_img(n['thumbnail'], 'thumbnail')}</td><td>{n['similarity']:.3f}</td>"
                     f"<td>study {e(str(n['study_id']))}<br>patient {e(str(n['subject_id']))}<br>"
                     f"<span class='muted'>{e(str(n['dicom_id']))} {e(str(n['view'] or ''))}</span></td>"
                     f"<td>{e(', '.join(n['labels']))}</td><td>{e(str(n['outcomes'] or ''))}</td>"
                     f"<td>{e(n['excerpt'])}</td></tr>")
    parts.append(f"</table><p class='muted'>{e(_filter_note(res))}<br>Index {e(res.index['index_string'])} "
                 f"{e(str(res.index['params'] or ''))}, {res.index['count']} images, encoder "
                 f"{e(res.index['encoder_checksum'][:12])}</p>")
    return R.html_page(f"Similar cases for {_query_title(q)}", parts)


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

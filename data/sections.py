"""Report section parsing, ported from the MIT-LCP MIMIC-CXR section parser (`txt/section_parser.py`).

A MIMIC-CXR report looks like this (every line indented one space; the blank lines hold that one space)::

                                     FINAL REPORT
     EXAMINATION:  CHEST (PA AND LAT)

     INDICATION:  ___F with cough

     FINDINGS:

     No focal consolidation ...

     IMPRESSION:

     No acute cardiopulmonary process.

`section_text` splits on the header regex `\\n ([A-Z ()/,-]+):\\s` exactly as the reference does, including
its quirks (the text before the first header is the `preamble`; empty findings/impression sections are
dropped; with neither, the text after the first blank line of the last section becomes `last_paragraph`).
`normalize_section_names` keeps the reference's table of frequent headers and misspellings, with two
deliberate differences (see the comments in `_FREQUENT`): history-type headers map to `indication`, and a
provisional read (`PROVISIONAL FINDINGS IMPRESSION (PFI)`) is named `pfi`, so it never displaces the final
impression (the reference calls it history or, by substring, impression).

`parse_report` adds two things on top (documented there): addenda and provisional reads above the
`FINAL REPORT` line are set aside, and when the reference finds no text at all because the report ends in a
one-paragraph NOTIFICATION, the last paragraph comes from the last section that has several paragraphs.

`parse_report` gives the four sections stored in every shard sample; `training_text` picks the text the
model is trained on (`--text`). When a section occurs more than once (an addendum placed before the final
report that restates the impression, two FINDINGS blocks) the last one wins, as in the reference.
"""

from __future__ import annotations

import re

# The reference's header regex, unchanged: a newline, one space, an all-caps name, a colon, whitespace.
_HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s", re.DOTALL)

# Header -> normalised name (from the reference; comments there give the counts over MIMIC-CXR).
_FREQUENT: dict[str, str] = {
    "preamble": "preamble", "impression": "impression", "comparison": "comparison",
    "indication": "indication", "findings": "findings", "examination": "examination",
    "technique": "technique",
    # The reference maps these to "history"; we store one `indication` field, and these headers hold the
    # same thing (why the study was ordered).
    "history": "indication", "clinical history": "indication", "clinical information": "indication",
    "patient history": "indication",
    "comparisons": "comparison", "reason for examination": "indication", "notification": "notification",
    "reason for exam": "indication", "exam": "examination", "clinical indication": "indication",
    "conclusion": "impression", "chest, two views": "findings", "recommendation(s)": "recommendations",
    "type of examination": "examination", "reference exam": "comparison", "addendum": "addendum",
    "comparison exam": "comparison", "date": "date", "comment": "comment",
    "findings and impression": "impression", "wet read": "wet read", "comparison film": "comparison",
    "recommendations": "recommendations", "findings/impression": "impression",
    "impression and recommendation": "impression", "impression and recommendations": "impression",
    "final impression": "impression",
    # A provisional read given before the final report. The reference maps "pfi" to history and lets
    # "provisional findings impression (pfi)" fall through to "impression" by substring; either way it is
    # not the radiologist's final impression, so it keeps its own name here.
    "pfi": "pfi", "provisional findings impression (pfi)": "pfi", "provisional findings impression": "pfi",
    "recommendation": "recommendations", "wetread": "wet read",
    # Misspellings found in MIMIC-CXR by the reference authors.
    "ndication": "impression", "impresson": "impression", "imprression": "impression",
    "imoression": "impression", "impressoin": "impression", "imprssion": "impression",
    "impresion": "impression", "imperssion": "impression", "mpression": "impression",
    "impession": "impression", "findings/ impression": "impression", "finding": "findings",
    "findins": "findings", "findindgs": "findings", "findgings": "findings", "findngs": "findings",
    "findnings": "findings", "finidngs": "findings", "idication": "indication",
    "reference findings": "findings", "comparision": "comparison", "comparsion": "comparison",
    "comparrison": "comparison", "comparisions": "comparison",
}

# Substring rules, in the reference's order (first match wins), then the "describes the whole study" rule.
_MAIN_SECTIONS = ("impression", "findings", "history", "comparison", "addendum")
_FINDINGS_LIKE = re.compile("(" + "|".join([
    "chest", "portable", "pa and lateral", "lateral and pa", "ap and lateral", "lateral and ap", "frontal and",
    "two views", "frontal view", "pa view", "ap view", "one view", "lateral view", "bone window",
    "frontal upright", "frontal semi-upright", "ribs", "pa and lat",
]) + ")")

# The centred title line of the final report (addenda and provisional reads may come before it).
_FINAL_REPORT = re.compile(r"^[ \t]*FINAL REPORT[ \t]*$", re.MULTILINE)

SECTION_KEYS: tuple[str, ...] = ("findings", "impression", "last_paragraph", "indication")

# `--text` choices: name -> the sections tried in order (the first non-empty one is used; a "+" joins two).
TEXT_MODES: dict[str, tuple[str, ...]] = {
    "findings+impression": ("findings+impression", "last_paragraph"),
    "impression": ("impression", "findings", "last_paragraph"),
    "findings": ("findings", "impression", "last_paragraph"),
}


def normalize_section_names(names: list[str]) -> list[str]:
    """Lower-case, strip and map each header to its canonical name (see `_FREQUENT`)."""
    out = []
    for raw in names:
        name = raw.lower().strip()
        if name in _FREQUENT:
            out.append(_FREQUENT[name])
            continue
        main = next((m for m in _MAIN_SECTIONS if m in name), None)
        if main is not None:
            out.append("indication" if main == "history" else main)
        elif _FINDINGS_LIKE.search(name):
            out.append("findings")
        else:
            out.append(name)
    return out


def section_text(text: str) -> tuple[list[str], list[str], list[int]]:
    """Split a report into (sections, normalised names, start offsets), as the reference `section_text`."""
    sections: list[str] = []
    names: list[str] = []
    starts: list[int] = []
    s = _HEADER.search(text, 0)
    if s:
        sections.append(text[0:s.start(1)])
        names.append("preamble")
        starts.append(0)
        while s:
            current = s.group(1).lower()
            idx_start = s.end()
            # Skip past the first newline before looking for the next header (avoids some bad parses).
            idx_skip = text[idx_start:].find("\n")
            if idx_skip == -1:
                idx_skip = 0
            s = _HEADER.search(text, idx_start + idx_skip)
            idx_end = len(text) if s is None else s.start()
            sections.append(text[idx_start:idx_end])
            names.append(current)
            starts.append(idx_start)
    else:
        sections.append(text)
        names.append("full report")
        starts.append(0)

    names = normalize_section_names(names)

    # Empty findings/impression sections are titles ("CHEST, PA LATERAL:") or duplicates: drop them.
    for i in reversed(range(len(names))):
        if names[i] in ("impression", "findings") and sections[i].strip() == "":
            sections.pop(i)
            names.pop(i)
            starts.pop(i)

    if "impression" not in names and "findings" not in names:
        # No usable section: the paragraphs after the first blank line of the last section.
        if "\n \n" in sections[-1]:
            head, *rest = sections[-1].split("\n \n")
            sections.append("\n \n".join(rest))
            sections[-2] = head
            names.append("last_paragraph")
            starts.append(starts[-1] + len(head))
    return sections, names, starts


def clean(text: str | None) -> str | None:
    """Collapse the report's hard line wraps and indentation into single spaces; None when empty."""
    if text is None:
        return None
    joined = " ".join(text.split())
    return joined or None


def _sections(text: str) -> dict[str, str | None]:
    sections, names, _ = section_text(text)
    out: dict[str, str | None] = dict.fromkeys(SECTION_KEYS)
    for section, name in zip(sections, names):
        if name in out:
            out[name] = clean(section) or out[name]  # last non-empty occurrence wins
    if not (out["findings"] or out["impression"] or out["last_paragraph"]):
        # Beyond the reference: when the last section is a one-paragraph trailer (a NOTIFICATION line that
        # wrapped to the start of a line), the reference finds no text at all. Take the paragraphs after the
        # first one of the last section that has several instead.
        for section in reversed(sections):
            _, *rest = section.split("\n \n")
            if clean("\n \n".join(rest)):
                out["last_paragraph"] = clean("\n \n".join(rest))
                break
    return out


def parse_report(text: str) -> dict[str, str | None]:
    """{findings, impression, last_paragraph, indication}: the last section of each name, cleaned, or None.

    Addenda, wet reads and provisional impressions written above the centred `FINAL REPORT` line are set
    aside: the sections come from the final report. (The reference parses the whole file; for a final
    report without headers it would then take its "last paragraph" from inside the addendum, headers and
    all.) When the final report yields no text, the whole file is parsed as the reference does.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    marks = list(_FINAL_REPORT.finditer(text))
    if marks:
        final = _sections(text[marks[-1].end():])
        if any(final[k] for k in ("findings", "impression", "last_paragraph")):
            return final
    return _sections(text)


def training_text(sections: dict[str, str | None], mode: str = "findings+impression") -> str:
    """The text the model is trained on; empty string when the report has none of the sections `mode` uses.

    Never includes headers, the indication (it states the question, not the answer) or the preamble.
    """
    if mode not in TEXT_MODES:
        raise ValueError(f"text mode {mode!r}; valid: {', '.join(TEXT_MODES)}")
    for choice in TEXT_MODES[mode]:
        parts = [sections.get(name) for name in choice.split("+")]
        joined = " ".join(p for p in parts if p)
        if joined:
            return joined
    return ""

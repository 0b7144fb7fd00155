"""Report section parsing: equivalence with the MIT-LCP reference, tricky reports, synthetic ground truth."""

from __future__ import annotations

import re

import numpy as np
import pytest

from data.mimic import read_report
from data.sections import (
    TEXT_MODES,
    clean,
    normalize_section_names,
    parse_report,
    section_text,
    training_text,
)

# ----------------------------------------------------------------------------------------------------------
# The reference: MIT-LCP/mimic-cxr txt/section_parser.py `section_text` (MIT licence), verbatim except that the
# name normaliser is a parameter: ours maps a few headers differently on purpose (see data/sections.py).


def reference_section_text(text, normalize_section_names):
    p_section = re.compile(r'\n ([A-Z ()/,-]+):\s', re.DOTALL)
    sections, section_names, section_idx = [], [], []
    idx = 0
    s = p_section.search(text, idx)
    if s:
        sections.append(text[0:s.start(1)])
        section_names.append('preamble')
        section_idx.append(0)
        while s:
            current_section = s.group(1).lower()
            idx_start = s.end()
            idx_skip = text[idx_start:].find('\n')
            if idx_skip == -1:
                idx_skip = 0
            s = p_section.search(text, idx_start + idx_skip)
            if s is None:
                idx_end = len(text)
            else:
                idx_end = s.start()
            sections.append(text[idx_start:idx_end])
            section_names.append(current_section)
            section_idx.append(idx_start)
    else:
        sections.append(text)
        section_names.append('full report')
        section_idx.append(0)
    section_names = normalize_section_names(section_names)
    for i in reversed(range(len(section_names))):
        if section_names[i] in ('impression', 'findings'):
            if sections[i].strip() == '':
                sections.pop(i)
                section_names.pop(i)
                section_idx.pop(i)
    if ('impression' not in section_names) & ('findings' not in section_names):
        if '\n \n' in sections[-1]:
            sections.append('\n \n'.join(sections[-1].split('\n \n')[1:]))
            sections[-2] = sections[-2].split('\n \n')[0]
            section_names.append('last_paragraph')
            section_idx.append(section_idx[-1] + len(sections[-2]))
    return sections, section_names, section_idx


C = " " * 33  # the real files centre FINAL REPORT with 33 spaces

STANDARD = (f" \n{C}FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n INDICATION:  ___F with cough  // eval\n"
            " \n TECHNIQUE:  Chest PA and lateral\n \n COMPARISON:  None.\n \n FINDINGS: \n \n There is no focal"
            " consolidation, pleural effusion or pneumothorax.  The\n cardiomediastinal silhouette is normal.\n"
            " \n IMPRESSION: \n \n No acute cardiopulmonary process.\n")
NO_HEADERS = (f" \n{C}FINAL REPORT\n CHEST RADIOGRAPH PORTABLE\n \n Lines and tubes unchanged.  Heart size\n"
              " is normal.\n \n No pneumothorax.\n")
ADDENDUM_THEN_NO_HEADERS = (f" \n{C}FINAL ADDENDUM\n ADDENDUM:\n Discussed with Dr. ___ at 3 pm.\n \n"
                            + NO_HEADERS)
PFI_THEN_NO_IMPRESSION = (" \n PROVISIONAL FINDINGS IMPRESSION (PFI): ___ ___ 4:30 PM\n  Right lower lobe"
                          f" pneumonia.\n \n{C}FINAL REPORT\n EXAMINATION:  CHEST\n \n INDICATION:  fever\n"
                          " \n There is a right lower lobe opacity.\n \n Heart size normal.\n")
EMPTY_FINDINGS = (f"{C}FINAL REPORT\n HISTORY:  ___M with chest pain\n \n FINDINGS:\n \n IMPRESSION:  Mild"
                  " cardiomegaly.\n")
CONCLUSION = f"{C}FINAL REPORT\n REASON FOR EXAM:  dyspnea\n \n FINDINGS:  Small effusion.\n \n CONCLUSION:  Effusion.\n"
TWO_IMPRESSIONS = (f"{C}FINAL REPORT\n IMPRESSION:  Preliminary read.\n \n FINDINGS:  Opacity.\n \n"
                   " FINDINGS AND IMPRESSION:  Left lower lobe pneumonia.\n")
MISSPELT = f"{C}FINAL REPORT\n FINDNGS:  Clear lungs.\n \n IMPRESSON:  Normal chest.\n"
TRICKY = [STANDARD, NO_HEADERS, ADDENDUM_THEN_NO_HEADERS, PFI_THEN_NO_IMPRESSION, EMPTY_FINDINGS, CONCLUSION,
          TWO_IMPRESSIONS, MISSPELT]


def _synth_reports(n: int):
    from data.synth_reports import write_report

    combos = [{}, {"Cardiomegaly": 1, "Edema": 1}, {"Pneumonia": 1, "Consolidation": 1, "Lung Opacity": 1},
              {"Pleural Effusion": 1}, {"Pneumothorax": 1, "Fracture": 1}, {"Support Devices": 1}]
    for i in range(n):
        f = combos[i % len(combos)]
        yield write_report(findings=f, sides=dict.fromkeys(f, "left"), severity=dict.fromkeys(f, 2),
                           devices=("ett",) if "Support Devices" in f else (), exam="CHEST (PA AND LAT)",
                           portable=i % 3 == 0, age=60, sex="MF"[i % 2], latin1=i % 9 == 0,
                           rng=np.random.default_rng(i))


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_split_equals_reference_on_tricky_reports(text):
    assert section_text(text) == reference_section_text(text, normalize_section_names)


def test_split_equals_reference_on_synthetic_reports():
    for rep in _synth_reports(150):
        assert section_text(rep.text) == reference_section_text(rep.text, normalize_section_names)


def test_standard_report():
    got = parse_report(STANDARD)
    assert got == {
        "findings": "There is no focal consolidation, pleural effusion or pneumothorax. The cardiomediastinal "
                    "silhouette is normal.",
        "impression": "No acute cardiopulmonary process.",
        "last_paragraph": None,
        "indication": "___F with cough // eval",
    }
    assert training_text(got) == got["findings"] + " " + got["impression"]
    assert training_text(got, "impression") == "No acute cardiopulmonary process."
    assert training_text(got, "findings") == got["findings"]


def test_last_paragraph_is_the_reference_fallback():
    # The reference's "last paragraph": every paragraph of the last section after its first one.
    got = parse_report(NO_HEADERS)
    assert got["findings"] is None and got["impression"] is None
    assert got["last_paragraph"] == "Lines and tubes unchanged. Heart size is normal. No pneumothorax."
    assert training_text(got) == got["last_paragraph"]
    assert training_text(got, "impression") == got["last_paragraph"]


def test_addendum_before_final_report_is_set_aside():
    got = parse_report(ADDENDUM_THEN_NO_HEADERS)
    assert got["last_paragraph"] == "Lines and tubes unchanged. Heart size is normal. No pneumothorax."
    # The reference on the whole file would take the addendum section's tail, title and all:
    ref, names, _ = section_text(ADDENDUM_THEN_NO_HEADERS)
    assert "FINAL REPORT" in clean(ref[names.index("last_paragraph")])


def test_provisional_read_never_becomes_the_impression():
    got = parse_report(PFI_THEN_NO_IMPRESSION)
    assert got["impression"] is None
    assert got["indication"] == "fever"
    assert got["last_paragraph"] == "There is a right lower lobe opacity. Heart size normal."
    assert "pfi" in section_text(PFI_THEN_NO_IMPRESSION)[1]


def test_header_normalisation():
    assert parse_report(EMPTY_FINDINGS) == {"findings": None, "impression": "Mild cardiomegaly.",
                                            "last_paragraph": None, "indication": "___M with chest pain"}
    got = parse_report(CONCLUSION)
    assert (got["impression"], got["indication"], got["findings"]) == ("Effusion.", "dyspnea", "Small effusion.")
    assert parse_report(TWO_IMPRESSIONS)["impression"] == "Left lower lobe pneumonia."  # the last one wins
    got = parse_report(MISSPELT)
    assert (got["findings"], got["impression"]) == ("Clear lungs.", "Normal chest.")
    assert normalize_section_names(["Clinical History", "FINAL IMPRESSION", "PA AND LATERAL VIEWS",
                                    "impression and recommendation", "WET READ", "Notification"]) == \
        ["indication", "impression", "findings", "impression", "wet read", "notification"]


def test_text_before_a_trailing_notification_is_kept():
    text = (f"{C}FINAL REPORT\n CHEST PORTABLE\n \n Small left effusion.  Normal heart.\n \n Small left"
            " effusion.\n NOTIFICATION:  The findings were communicated to ___ at ___.\n")
    _, names, _ = section_text(text)
    assert names == ["preamble", "notification"]  # the reference finds no findings/impression/last paragraph
    assert parse_report(text)["last_paragraph"] == "Small left effusion. Normal heart. Small left effusion."


def test_windows_line_endings_parse_the_same():
    assert parse_report(STANDARD.replace("\n", "\r\n")) == parse_report(STANDARD)


def test_empty_and_headerless_reports():
    assert training_text(parse_report("")) == ""
    assert training_text(parse_report(f"{C}FINAL REPORT\n INDICATION:  cough\n")) == ""  # indication only
    assert parse_report("just one line") == dict.fromkeys(("findings", "impression", "last_paragraph",
                                                             "indication"))


def test_unknown_text_mode_lists_valid_ones():
    with pytest.raises(ValueError, match="findings\\+impression"):
        training_text({}, "summary")
    assert set(TEXT_MODES) == {"findings+impression", "impression", "findings"}


def test_synthetic_reports_round_trip():
    """The synthetic generator knows what it wrote into each section; the parser must recover it."""
    styles = set()
    for rep in _synth_reports(300):
        styles.add(rep.style)
        got = parse_report(rep.text)
        assert got["findings"] == clean(rep.sections.get("findings")), rep.text
        impression = clean(rep.sections.get("impression") or rep.sections.get("conclusion"))
        if impression and " NOTIFICATION:" in impression and got["impression"] != impression:
            # A NOTIFICATION line wrapped to the start of a line is its own section, as in the reference.
            impression = impression.split(" NOTIFICATION:")[0]
        assert got["impression"] == impression, rep.text
        tail = clean(rep.sections.get("last_paragraph"))
        if tail and " NOTIFICATION:" in tail and not got["last_paragraph"].endswith(tail):
            tail = tail.split(" NOTIFICATION:")[0]
        if tail:  # the generator's "last paragraph" is the final one; the reference's includes earlier ones
            assert got["last_paragraph"].endswith(tail)
        else:
            assert got["last_paragraph"] is None
        assert training_text(got)  # every synthetic report yields training text
    assert styles == {"standard", "no_findings", "no_impression", "neither"}


def test_read_report_falls_back_to_latin1(tmp_path):
    good, bad = tmp_path / "a.txt", tmp_path / "b.txt"
    good.write_bytes("Rotated 5\u00b0.".encode())
    bad.write_bytes("Rotated 5\u00b0.".encode("latin-1"))  # 0xB0 alone is not valid UTF-8
    assert read_report(good) == ("Rotated 5\u00b0.", False)
    assert read_report(bad) == ("Rotated 5\u00b0.", True)

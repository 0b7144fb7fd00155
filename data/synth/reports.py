"""Free-text radiology reports for the synthetic MIMIC stand-in, written from the study's ground truth.

Each sentence is chosen from a template bank and carries the CheXpert mentions it makes
(`{label: 1.0 | 0.0 | -1.0}`: positive, negated, uncertain). The report keeps the mentions of the
section the real MIMIC-CXR CheXpert labeller read: IMPRESSION (CONCLUSION counts as impression), else
FINDINGS, else the last paragraph. `radalign.data.synth.generate` turns those mentions into the noisy label files.

Radiologists miss or hedge some true findings and hedge about some absent ones ("cannot exclude
pneumonia"), so report mentions differ from the ground truth on purpose.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import numpy as np

POS, NEG, UNC = 1.0, 0.0, -1.0
Mentions = dict[str, float]
Statement = tuple[str, Mentions]

CENTRED = " " * 33                                  # the real files centre FINAL REPORT with 33 spaces
WIDTH = 78                                          # wrapped lines are at most 78 characters (< 80)

# Which negatives a radiologist states about an absent finding, and how often.
NEG_RATE = {"Pleural Effusion": 0.55, "Pneumothorax": 0.55, "Consolidation": 0.40, "Edema": 0.30,
            "Cardiomegaly": 0.35, "Enlarged Cardiomediastinum": 0.30, "Pneumonia": 0.12, "Lung Lesion": 0.03,
            "Fracture": 0.04, "Atelectasis": 0.02, "Lung Opacity": 0.08}
# Hedges about an absent finding ("cannot exclude pneumonia").
FALSE_HEDGE = {"Pneumonia": 0.06, "Edema": 0.03, "Pleural Effusion": 0.02, "Atelectasis": 0.03,
               "Cardiomegaly": 0.02, "Pneumothorax": 0.005, "Lung Lesion": 0.01, "Fracture": 0.005}
P_POSITIVE, P_HEDGED = 0.86, 0.08              # of true findings; the remaining 6% are not mentioned

POSITIVE: dict[str, list[tuple[str, Mentions]]] = {
    "Pleural Effusion": [
        ("{Size} {side} pleural effusion.", {}),
        ("There is a {size} {side} pleural effusion.", {}),
        ("{Size} {side} pleural effusion is again seen.", {}),
        ("Blunting of the {side} costophrenic angle reflects a {size} pleural effusion.", {}),
        ("{Size} {side} effusion with a meniscus along the lateral chest wall.", {}),
        ("Layering {side} pleural effusion, {size}.", {}),
    ],
    "Pleural Effusion/bilateral": [
        ("{Size} bilateral pleural effusions.", {}),
        ("Bilateral pleural effusions, {size}.", {}),
        ("There are {size} bilateral pleural effusions.", {}),
        ("Blunting of both costophrenic angles from {size} pleural effusions.", {}),
    ],
    "Cardiomegaly": [
        ("The heart is {deg}ly enlarged.", {}),
        ("{Deg} cardiomegaly.", {}),
        ("The cardiac silhouette is enlarged.", {}),
        ("Heart size is {deg}ly enlarged.", {}),
        ("{Deg} enlargement of the cardiac silhouette.", {}),
        ("Cardiomegaly is again noted.", {}),
    ],
    "Enlarged Cardiomediastinum": [
        ("The mediastinum is widened.", {}),
        ("Widened superior mediastinum.", {}),
        ("The cardiomediastinal silhouette is enlarged.", {}),
        ("Mediastinal widening is noted.", {}),
    ],
    "Lung Opacity": [
        ("Patchy opacity in the {side} {zone}.", {}),
        ("Ill-defined {side} {zone} opacity.", {}),
        ("Hazy opacity at the {side} {zone}.", {}),
        ("There is a new {side} {zone} opacity.", {}),
    ],
    "Edema": [
        ("{Deg} pulmonary edema.", {}),
        ("There is {deg} interstitial pulmonary edema.", {}),
        ("Perihilar haziness and vascular congestion consistent with {deg} pulmonary edema.", {}),
        ("Bilateral perihilar opacities compatible with pulmonary edema.", {"Lung Opacity": POS}),
        ("Findings are compatible with {deg} pulmonary edema.", {}),
        ("{Deg} interstitial edema with cephalization of the vessels.", {}),
    ],
    "Consolidation": [
        ("{Side} {lobe} consolidation.", {"Lung Opacity": POS}),
        ("Dense consolidation in the {side} {lobe}.", {"Lung Opacity": POS}),
        ("There is consolidation of the {side} {lobe}.", {"Lung Opacity": POS}),
    ],
    "Pneumonia": [
        ("{Side} {lobe} pneumonia.", {}),
        ("Findings consistent with {side} {lobe} pneumonia.", {}),
        ("Opacity in the {side} {lobe} consistent with pneumonia.", {"Lung Opacity": POS}),
        ("Patchy {side} {lobe} opacities compatible with pneumonia.", {"Lung Opacity": POS}),
    ],
    "Consolidation+Pneumonia": [
        ("{Side} {lobe} consolidation compatible with pneumonia.", {"Lung Opacity": POS}),
        ("Dense {side} {lobe} consolidation consistent with pneumonia.", {"Lung Opacity": POS}),
    ],
    "Atelectasis": [
        ("{Deg} {side} basilar atelectasis.", {}),
        ("Plate-like atelectasis at the {side} lung base.", {}),
        ("Linear opacity at the {side} base consistent with atelectasis.", {"Lung Opacity": POS}),
        ("Subsegmental atelectasis at the {side} base.", {}),
    ],
    "Pneumothorax": [
        ("{Size} {side} apical pneumothorax.", {}),
        ("There is a {size} {side} pneumothorax.", {}),
        ("{Side} pneumothorax, {size}.", {}),
        ("A {size} {side} pneumothorax is present with a visible pleural line.", {}),
    ],
    "Pleural Other": [
        ("{Side} pleural thickening.", {}),
        ("{Side} apical pleural thickening.", {}),
        ("Pleural thickening along the {side} lateral chest wall.", {}),
    ],
    "Lung Lesion": [
        ("A {mm} mm nodule in the {side} {zone}.", {}),
        ("{Side} {zone} nodule measuring ___ mm.", {}),
        ("Rounded nodule in the {side} {zone}, recommend chest CT for further evaluation.", {}),
        ("Pulmonary nodule in the {side} {zone}.", {}),
    ],
    "Fracture": [
        ("Displaced fracture of the {side} {nth} rib.", {}),
        ("Acute-appearing {side} posterior {nth} rib fracture.", {}),
        ("Healed {side} rib fractures.", {}),
        ("{Side} {nth} rib fracture is noted.", {}),
    ],
}

HEDGED: dict[str, list[tuple[str, Mentions]]] = {
    "Pleural Effusion": [
        ("Possible small {side} pleural effusion.", {}),
        ("Small {side} pleural effusion cannot be excluded.", {}),
        ("Blunting of the {side} costophrenic angle may reflect a small effusion.", {}),
    ],
    "Cardiomegaly": [
        ("Heart size is borderline enlarged.", {}),
        ("The cardiac silhouette may be mildly enlarged, accentuated by technique.", {}),
        ("Possible mild cardiomegaly.", {}),
    ],
    "Enlarged Cardiomediastinum": [
        ("Apparent mediastinal widening may be due to rotation.", {}),
        ("Possible mediastinal widening.", {}),
    ],
    "Lung Opacity": [
        ("Subtle {side} {zone} opacity, possibly artifactual.", {}),
        ("Questionable opacity in the {side} {zone}.", {}),
    ],
    "Edema": [
        ("Possible mild pulmonary edema.", {}),
        ("Perihilar haziness may reflect mild edema.", {}),
        ("Mild vascular congestion, possibly early edema.", {}),
    ],
    "Consolidation": [
        ("Possible {side} {lobe} consolidation.", {}),
        ("Questionable consolidation in the {side} {lobe}.", {}),
    ],
    "Pneumonia": [
        ("Opacity in the {side} {lobe} concerning for pneumonia.", {"Lung Opacity": POS}),
        ("Cannot exclude pneumonia.", {}),
        ("Possible early {side} {lobe} pneumonia.", {}),
        ("{Side} basilar opacity could represent pneumonia in the appropriate clinical setting.",
         {"Lung Opacity": POS}),
    ],
    "Atelectasis": [
        ("{Side} basilar opacity likely reflects atelectasis.", {"Lung Opacity": POS}),
        ("Atelectasis versus early infection at the {side} base.", {"Pneumonia": UNC}),
        ("Possible {side} basilar atelectasis.", {}),
    ],
    "Pneumothorax": [
        ("Possible tiny {side} apical pneumothorax.", {}),
        ("Questionable {side} apical pneumothorax.", {}),
    ],
    "Pleural Other": [("Possible {side} pleural thickening.", {})],
    "Lung Lesion": [
        ("Possible nodule in the {side} {zone}, possibly a nipple shadow.", {}),
        ("Questionable {side} {zone} nodule.", {}),
    ],
    "Fracture": [
        ("Possible nondisplaced {side} rib fracture.", {}),
        ("Cortical irregularity of the {side} {nth} rib may reflect a fracture.", {}),
    ],
}

NEGATIVE: dict[str, list[str]] = {
    "Pleural Effusion": ["No pleural effusion.", "There is no pleural effusion.", "No effusion is seen.",
                         "The costophrenic angles are sharp, without effusion."],
    "Cardiomegaly": ["Heart size is normal.", "The heart is normal in size.", "No cardiomegaly.",
                     "Normal heart size."],
    "Enlarged Cardiomediastinum": ["The cardiomediastinal silhouette is normal.",
                                   "Mediastinal and hilar contours are unremarkable.",
                                   "Normal mediastinal contours."],
    "Lung Opacity": ["No focal opacity.", "No focal airspace opacity is seen."],
    "Edema": ["No pulmonary edema.", "There is no edema.", "No evidence of pulmonary edema."],
    "Consolidation": ["No focal consolidation.", "There is no consolidation."],
    "Pneumonia": ["No evidence of pneumonia.", "No findings to suggest pneumonia."],
    "Atelectasis": ["No atelectasis."],
    "Pneumothorax": ["No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen."],
    "Lung Lesion": ["No pulmonary nodules.", "No suspicious pulmonary nodules."],
    "Fracture": ["No displaced rib fracture.", "No acute fracture."],
}
# Negations that radiologists merge into one sentence ("No pleural effusion or pneumothorax.").
MERGE_NOUNS = {"Consolidation": "focal consolidation", "Pleural Effusion": "pleural effusion",
               "Pneumothorax": "pneumothorax", "Edema": "pulmonary edema"}

DEVICES: dict[str, list[str]] = {
    "ett": ["Endotracheal tube tip terminates {cm} cm above the carina.", "The endotracheal tube is in "
            "standard position.", "Endotracheal tube in appropriate position."],
    "ng": ["Enteric tube courses below the diaphragm, tip in the stomach.", "Nasogastric tube tip is in the "
           "stomach.", "An orogastric tube extends into the stomach."],
    "cvc": ["Right internal jugular central venous catheter tip in the mid SVC.",
            "Right IJ line terminates at the cavoatrial junction."],
    "picc": ["Left PICC line tip in the distal SVC.", "Left upper extremity PICC terminates in the low SVC."],
    "pacemaker": ["Left-sided pacemaker with leads in the right atrium and right ventricle.",
                  "Left chest wall dual-chamber pacemaker, leads unchanged in position."],
    "sternal": ["Median sternotomy wires are intact.", "Sternotomy wires and mediastinal clips are noted."],
}

NORMAL_IMPRESSION = ["No acute cardiopulmonary process.", "No acute intrathoracic process.",
                     "No evidence of acute cardiopulmonary disease.", "Normal chest radiograph.",
                     "No radiographic evidence of acute cardiopulmonary process."]
NORMAL_LUNGS = ["The lungs are clear.", "Lungs are well expanded and clear.", "The lungs are well aerated.",
                "Lung volumes are normal and the lungs are clear."]
FILLER = ["The hila are unremarkable.", "Pulmonary vasculature is normal.",
          "Mild degenerative changes of the thoracic spine.", "Surgical clips in the right upper quadrant.",
          "Mild atherosclerotic calcification of the aortic knob.", "Bony structures are intact.",
          "The aorta is tortuous."]
CHANGES = ["unchanged", "new since the prior study", "slightly increased", "slightly decreased",
           "similar to prior", "improved compared to ___"]
COMMUNICATION = ["Dr. ___ was paged with these findings at ___ on ___.",
                 "Findings were discussed with Dr. ___ by Dr. ___ by telephone at ___.",
                 "NOTIFICATION:  The findings were communicated to ___ at ___ on ___."]

SIZES = {1: "small", 2: "moderate", 3: "large"}
DEGREES = {1: "mild", 2: "moderate", 3: "severe"}
ORDER = ("Support Devices", "Lung Opacity", "Consolidation", "Pneumonia", "Edema", "Atelectasis",
         "Lung Lesion", "Pleural Effusion", "Pneumothorax", "Pleural Other", "Cardiomegaly",
         "Enlarged Cardiomediastinum", "Fracture")


@dataclass
class Report:
    text: str                                    # the whole report (may contain a latin-1 character)
    mentions: Mentions                           # CheXpert mentions of the labelled section
    style: str                                   # standard | no_findings | no_impression | neither
    sections: dict[str, str] = field(default_factory=dict)


def _fill(rng: np.random.Generator, template: str, finding: str, sides: dict, severity: dict) -> str:
    side = sides.get(finding, "right")
    sev = severity.get(finding, 2)
    lobe = str(rng.choice(["lower lobe", "lower lobe", "upper lobe", "middle lobe" if side == "right"
                           else "lingula"]))
    zone = str(rng.choice(["lung base", "mid lung", "upper lung"]))
    side_word = "bibasilar" if side == "bilateral" and "basilar" in template else side
    vals = {"side": side_word, "size": SIZES[sev], "deg": DEGREES[sev], "lobe": lobe, "zone": zone,
            "mm": int(rng.integers(6, 25)), "nth": str(rng.choice(["fifth", "sixth", "seventh", "eighth"])),
            "cm": int(rng.integers(2, 6))}
    if side == "bilateral":
        template = template.replace("{side} basilar", "{side}").replace("the {side} base", "both bases")
        template = template.replace("the {side} lung base", "both lung bases")
    out = template.format(**vals, Side=str(vals["side"]).capitalize(), Size=str(vals["size"]).capitalize(),
                          Deg=str(vals["deg"]).capitalize())
    return out[0].upper() + out[1:]


def _statement(rng, bank, key, finding, own: float, sides, severity) -> Statement:
    template, extra = bank[key][int(rng.integers(len(bank[key])))]
    mentions = {finding: own, **extra}
    if key == "Consolidation+Pneumonia":
        mentions = {"Consolidation": POS, "Pneumonia": POS, **extra}
    text = _fill(rng, template, finding, sides, severity)
    if own == POS and rng.random() < 0.25 and "again" not in text and "unchanged" not in text:
        text = text[:-1] + ", " + str(rng.choice(CHANGES)) + "."
    return text, mentions


def _finding_statements(rng, findings: dict[str, int], sides: dict, severity: dict,
                        devices: tuple[str, ...]) -> list[Statement]:
    """Sentences about every finding, in the order radiologists write them (devices, lungs, pleura, heart)."""
    out: list[Statement] = []
    negatives: list[str] = []
    both = findings.get("Consolidation") and findings.get("Pneumonia") and rng.random() < 0.5
    for name in ORDER:
        if name == "Support Devices":
            for dev in devices:
                if rng.random() < 0.93:
                    out.append((_fill(rng, str(rng.choice(DEVICES[dev])), name, sides, severity),
                                {name: POS}))
            continue
        if name == "Lung Opacity" and any(findings.get(n) for n in ("Consolidation", "Pneumonia", "Edema",
                                                                      "Atelectasis")):
            continue                                  # the children's sentences carry the opacity
        if name == "Pneumonia" and both:
            continue
        if findings.get(name):
            r = rng.random()
            key = "Consolidation+Pneumonia" if (name == "Consolidation" and both) else name
            if name == "Pleural Effusion" and sides.get(name) == "bilateral":
                key = "Pleural Effusion/bilateral"
            if r < P_POSITIVE:
                out.append(_statement(rng, POSITIVE, key, name, POS, sides, severity))
            elif r < P_POSITIVE + P_HEDGED and name in HEDGED:
                out.append(_statement(rng, HEDGED, name, name, UNC, sides, severity))
        else:
            r = rng.random()
            if r < NEG_RATE.get(name, 0.0):
                negatives.append(name)
            elif r < NEG_RATE.get(name, 0.0) + FALSE_HEDGE.get(name, 0.0) and name in HEDGED:
                out.append(_statement(rng, HEDGED, name, name, UNC, {}, {}))
    return out + _negations(rng, negatives)


def _negations(rng, names: list[str]) -> list[Statement]:
    out: list[Statement] = []
    mergeable = [n for n in names if n in MERGE_NOUNS]
    if len(mergeable) >= 2 and rng.random() < 0.6:
        nouns = [MERGE_NOUNS[n] for n in mergeable]
        body = nouns[0] if len(nouns) == 1 else ", ".join(nouns[:-1]) + (", or " if len(nouns) > 2 else " or ") \
            + nouns[-1]
        lead = str(rng.choice(["No ", "There is no ", "No evidence of "]))
        out.append((lead + body + ".", {n: NEG for n in mergeable}))
        names = [n for n in names if n not in mergeable]
    for n in names:
        out.append((str(rng.choice(NEGATIVE[n])), {n: NEG}))
    return out


def _merge(statements: list[Statement]) -> Mentions:
    """CheXpert aggregation within a section: positive beats uncertain beats negative."""
    out: Mentions = {}
    rank = {POS: 2, UNC: 1, NEG: 0}
    for _, mentions in statements:
        for name, value in mentions.items():
            if name not in out or rank[value] > rank[out[name]]:
                out[name] = value
    return out


def _wrap(text: str, first: str = " ") -> list[str]:
    return textwrap.wrap(text, width=WIDTH, initial_indent=first, subsequent_indent=" ",
                         break_on_hyphens=False) or [first.rstrip()]


def _section(header: str, statements: list[Statement], rng) -> list[str]:
    body = "  ".join(s for s, _ in statements)
    if rng.random() < 0.5:
        return [f" {header}:", " "] + _wrap(body)
    return _wrap(body, first=f" {header}:  ")


def write_report(*, findings: dict[str, int], sides: dict[str, str], severity: dict[str, int],
                 devices: tuple[str, ...], exam: str, portable: bool, age: int, sex: str,
                 latin1: bool, rng: np.random.Generator) -> Report:
    """Compose one report in the MIMIC-CXR template; `latin1` adds a degree sign (a non-UTF-8 byte on disk)."""
    body = _finding_statements(rng, findings, sides, severity, devices)
    pathology = [s for s in body if any(v != NEG for k, v in s[1].items() if k != "Support Devices")]
    if not any(v == POS for _, m in body for v in m.values()):
        body.insert(0, (str(rng.choice(NORMAL_LUNGS)), {}))
    if rng.random() < 0.35:
        body.append((str(rng.choice(FILLER)), {}))
    if latin1:
        body.append((f"The patient is rotated approximately {int(rng.integers(5, 25))}\xb0 to the "
                     f"{rng.choice(['right', 'left'])}.", {}))

    # Impression: the key positive and hedged statements, plus a normal line when nothing acute is seen.
    impression = [s for s in pathology if rng.random() < 0.9]
    if not impression:
        impression = [(str(rng.choice(NORMAL_IMPRESSION)), {})]
        devices_said = [s for s in body if "Support Devices" in s[1]]
        impression = devices_said[:1] + impression
    elif rng.random() < 0.12:
        impression.append((str(rng.choice(COMMUNICATION)), {}))

    u = rng.random()
    style = ("neither" if u < 0.04 else "no_findings" if u < 0.34 else "no_impression" if u < 0.51
             else "standard")
    lines = [" ", CENTRED + "FINAL REPORT"]
    lines = _addendum(rng, impression) + lines
    head = _header_lines(rng, exam, portable, age, sex, findings, devices)
    sections: dict[str, str] = {}
    if style == "neither" and rng.random() < 0.5:
        # No section headers at all: the exam line, then paragraphs; the labeller reads the last one.
        lines += [f" {exam}" + (f" {'PORTABLE' if portable else ''}".rstrip()), " "]
        lines += _wrap("  ".join(s for s, _ in body)) + [" "] + _wrap("  ".join(s for s, _ in impression))
        labelled = impression
        sections["last_paragraph"] = "  ".join(s for s, _ in impression)
    else:
        lines += head
        if style in ("standard", "no_impression"):
            lines += _section("FINDINGS", body, rng) + [" "]
            sections["findings"] = "  ".join(s for s, _ in body)
        if style in ("standard", "no_findings"):
            stmts = impression if style == "standard" else body + [s for s in impression if s not in body]
            lines += _section("IMPRESSION", stmts, rng) + [" "]
            sections["impression"] = "  ".join(s for s, _ in stmts)
            labelled = stmts
        elif style == "neither" or rng.random() < 0.3:
            stmts = impression if style == "no_impression" else body + [s for s in impression if s not in body]
            lines += _section("CONCLUSION", stmts, rng) + [" "]
            sections["conclusion"] = "  ".join(s for s, _ in stmts)
            labelled = stmts
        else:
            labelled = body
    text = "\n".join(lines).rstrip() + "\n"
    return Report(text=text, mentions=_merge(labelled), style=style, sections=sections)


def _addendum(rng, impression: list[Statement]) -> list[str]:
    """About 3% of reports carry an addendum or a provisional impression before the final report."""
    u = rng.random()
    if u < 0.015:
        return [" ", CENTRED + "FINAL ADDENDUM", " ADDENDUM:", *_wrap(str(rng.choice(COMMUNICATION))), " "]
    if u < 0.03:
        first = impression[0][0] if impression else str(rng.choice(NORMAL_IMPRESSION))
        return [" ", f" PROVISIONAL FINDINGS IMPRESSION (PFI): ___ ___ {int(rng.integers(1, 12))}:"
                f"{int(rng.integers(0, 60)):02d} {rng.choice(['AM', 'PM'])}", *_wrap(first, "  "), " "]
    return []


def _header_lines(rng, exam, portable, age, sex, findings, devices) -> list[str]:
    who = "man" if sex == "M" else "woman"
    if devices and "ett" in devices:
        why = "intubated patient  // assess ETT position"
    elif findings.get("Pneumonia") or findings.get("Consolidation"):
        why = str(rng.choice(["fever and cough  // eval for pneumonia", "productive cough  // r/o infiltrate"]))
    elif findings.get("Edema") or findings.get("Pleural Effusion"):
        why = str(rng.choice(["shortness of breath  // ? effusion", "dyspnea, CHF  // eval for edema"]))
    elif findings.get("Fracture") or findings.get("Pneumothorax"):
        why = "fall, chest wall pain  // eval for fracture, pneumothorax"
    else:
        why = str(rng.choice(["chest pain  // eval for acute process", "cough", "preop", "fall  // r/o injury",
                              "shortness of breath  // eval for pneumonia"]))
    technique = str(rng.choice(["Portable AP chest radiograph.", "AP portable upright view of the chest."]
                               if portable else ["Chest PA and lateral.", "PA and lateral views of the chest."]))
    comparison = str(rng.choice(["___", "___", "None.", "Chest radiograph ___.", "Prior studies from ___ and ___."]))
    indication = f"___ year old {who} with {why}" if rng.random() < 0.8 else f"History: ___{sex} with {why}"
    return ([f" EXAMINATION:  {exam}", " "] + _wrap(indication, " INDICATION:  ") + [" "]
            + [f" TECHNIQUE:  {technique}", " ", f" COMPARISON:  {comparison}", " "])

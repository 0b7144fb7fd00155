"""`radalign data synth`: a synthetic, deterministic stand-in for MIMIC-CXR-JPG + reports + MIMIC-IV hosp.

Layout written under `out_dir` (see docs/synthetic-data.md for every column and format):

    mimic-cxr-jpg/files/p{NN}/p{subject}/s{study}/{dicom}.jpg   8-bit grayscale JPEGs
    mimic-cxr/files/p{NN}/p{subject}/s{study}/{dicom}.dcm       --dicom only: the same films as DICOM
    mimic-cxr-jpg/mimic-cxr-2.0.0-{metadata,split,chexpert,negbio}.csv.gz
    mimic-cxr-reports/files/p{NN}/p{subject}/s{study}.txt        reports in the MIMIC template
    mimic-iv/hosp/{patients,admissions,labevents,d_labitems}.csv.gz
    chexpert-format.csv                                          CheXpert-style CSV over the same JPEGs
    ground_truth.csv.gz                                          synthetic only: the true findings
    synth.json                                                   the arguments and counts (written last)

Determinism: patient `i` draws everything from `default_rng([seed, 1, i])`, ids from `[seed, 0]`, and
image `j` from `[seed, 2, j]`, so the output is a function of the arguments only (not of `workers`).
Gzip members are written with mtime 0 and no file name, so the .csv.gz bytes repeat too.
"""

from __future__ import annotations

import gzip
import io
import math
import multiprocessing as mp
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from radalign.data.labels import CHEXPERT_LABELS, MIMIC_LABEL_ORDER
from radalign.data.synth import ehr
from radalign.data.synth.images import ImageSpec, quantize, render_float
from radalign.data.synth.reports import write_report
from tqdm import tqdm

from radalign import RadalignError
from radalign.io import atomic_path, atomic_write_bytes, atomic_write_json
from radalign.log import get_logger

log = get_logger("radalign.data.synth")

METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
SPLIT_COLUMNS = ["dicom_id", "study_id", "subject_id", "split"]
LABEL_COLUMNS = ["subject_id", "study_id", *MIMIC_LABEL_ORDER]
CHEXPERT_FORMAT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
SIDED = ("Pleural Effusion", "Pneumothorax", "Consolidation", "Pneumonia", "Atelectasis", "Pleural Other",
         "Fracture", "Lung Lesion")
SEVERITY_SHOWN = ("Cardiomegaly", "Enlarged Cardiomediastinum", "Pleural Effusion", "Pneumothorax", "Lung Lesion",
                  "Fracture")                     # findings whose drawn extent follows their severity
GROUND_TRUTH_COLUMNS = ["dicom_id", "study_id", "subject_id", "view", *CHEXPERT_LABELS,
                        *[f"{n} side" for n in SIDED], "devices", *[f"{n} severity" for n in SEVERITY_SHOWN]]
LINKAGE_CASE_COLUMNS = ["case", "subject_id", "study_id", "hadm_id", "labevent_id", "itemid", "eligible"]
PATHOLOGIES = tuple(n for n in CHEXPERT_LABELS if n not in ("No Finding", "Support Devices"))
VIEW_CODE = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}
SPLIT_FRACTIONS = (("train", 0.8), ("validate", 0.1), ("test", 0.1))
MARKER = "synth.json"
GENERATOR_VERSION = 5                                 # bump when the same arguments give different data


@dataclass
class Study:
    subject_id: int
    when: datetime
    age: int
    sex: str
    findings: dict[str, int]
    sides: dict[str, str]
    severity: dict[str, int]
    devices: tuple[str, ...]
    portable: bool
    exam: str
    views: list[tuple[str, str]]                      # (ViewPosition as written, view actually drawn)
    study_id: int = 0
    case: str = ""                                    # a linkage case this study plants (linkage_cases.csv.gz)
    hadm: int | None = None                           # the admission it was taken in (local index, then id)


@dataclass
class PatientRecord:
    row: dict                                         # patients.csv.gz row (subject_id filled in later)
    studies: list[Study]
    admissions: list[dict]                            # hadm_id holds a local index until ids are assigned
    labs: list[dict]                                  # planted cases carry "_case", "_study" (a local index)
    fewer_labs: bool
    stays: list[dict] = field(default_factory=list)   # icustays rows (+ "_vitals" arrays), local hadm index
    cases: list[tuple] = field(default_factory=list)  # planted quirks: (case, study index, expected hadm_id)


# ----------------------------------------------------------------------------------------------------
# Ground truth


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _side(rng, p_bilateral: float = 0.0) -> str:
    r = rng.random()
    return "bilateral" if r < p_bilateral else ("right" if r < p_bilateral + (1 - p_bilateral) * 0.55 else "left")


def _sample_findings(rng, *, z: float, age: int, chronic: dict, portable: bool, devices: tuple[str, ...]):
    """One study's true findings: logistic in severity `z` and age, with MIMIC-like co-occurrence."""
    b = lambda p: int(rng.random() < p)  # noqa: E731
    f = dict.fromkeys(CHEXPERT_LABELS, 0)
    f["Support Devices"] = int(bool(devices))
    f["Cardiomegaly"] = b(_sigmoid(-2.3 + 0.04 * (age - 65) + 0.5 * z + 2.5 * chronic["card"]))
    f["Edema"] = b(_sigmoid(-3.6 + 0.8 * z + 1.8 * f["Cardiomegaly"]))
    f["Pleural Effusion"] = b(_sigmoid(-2.0 + 0.7 * z + 1.2 * f["Edema"] + 0.6 * f["Cardiomegaly"]))
    f["Pneumonia"] = b(_sigmoid(-3.2 + 0.8 * z))
    f["Consolidation"] = b(0.45 if f["Pneumonia"] else _sigmoid(-4.2 + 0.5 * z))
    f["Atelectasis"] = b(_sigmoid(-2.3 + 0.5 * z + 1.0 * f["Pleural Effusion"] + 0.6 * portable))
    f["Fracture"] = chronic["fracture"]
    f["Pneumothorax"] = b(_sigmoid(-4.0 + 0.5 * z + 0.8 * bool(devices) + 2.0 * f["Fracture"]))
    f["Lung Lesion"] = chronic["lesion"]
    f["Enlarged Cardiomediastinum"] = b(_sigmoid(-4.1 + 0.4 * z + 1.2 * f["Cardiomegaly"]))
    f["Pleural Other"] = chronic["pleural_other"]
    f["Lung Opacity"] = b(_sigmoid(-3.6 + 0.5 * z))
    if any(f[n] for n in ("Edema", "Consolidation", "Pneumonia", "Atelectasis")):
        f["Lung Opacity"] = 1                         # CheXpert's hierarchy: these are lung opacities
    f["No Finding"] = int(not any(f[n] for n in PATHOLOGIES))
    sides = {"Pleural Effusion": _side(rng, 0.35), "Pneumothorax": _side(rng), "Atelectasis": _side(rng, 0.4),
             "Pleural Other": chronic["pleural_side"], "Fracture": chronic["fracture_side"],
             "Lung Lesion": chronic["lesion_side"]}
    sides["Consolidation"] = sides["Pneumonia"] = _side(rng)
    severity = {n: int(rng.choice([1, 1, 2, 2, 3])) for n in CHEXPERT_LABELS}
    severity["Lung Lesion"] = chronic["lesion_burden"]           # nodules drawn: 1, 2, or 3 (3 = with a mass)
    sides = {k: v for k, v in sides.items() if f[k]}
    severity = {k: v for k, v in severity.items() if f[k]}
    return f, sides, severity


def _devices(rng, *, z: float, resp: float, inpatient: bool, chronic: dict) -> tuple[str, ...]:
    out = []
    if inpatient and rng.random() < _sigmoid(-3.6 + 0.9 * z + 1.6 * resp):     # intubated for respiratory failure
        out.append("ett")
        if rng.random() < 0.7:
            out.append("ng")
    elif inpatient and rng.random() < _sigmoid(-4.0 + 0.8 * z):
        out.append("ng")
    if inpatient and rng.random() < _sigmoid(-2.4 + 1.1 * z):
        out.append("cvc" if rng.random() < 0.6 else "picc")
    if chronic["pacemaker"]:
        out.append("pacemaker")
    if chronic["sternal"]:
        out.append("sternal")
    return tuple(out)


def _views(rng, portable: bool) -> tuple[str, list[tuple[str, str]]]:
    """Exam name and (ViewPosition, drawn view) per image: most PA+lateral, sicker patients portable AP."""
    if portable:
        views = [("AP", "AP")] + ([("AP", "AP")] if rng.random() < 0.06 else [])
        exam = "CHEST (PORTABLE AP)"
    else:
        r = rng.random()
        lateral = ("LL", "LATERAL") if rng.random() < 0.12 else ("LATERAL", "LATERAL")
        if r < 0.05:
            views, exam = [("PA", "PA")], "CHEST (SINGLE VIEW)"
        else:
            views = [("PA", "PA"), lateral] + ([("LATERAL", "LATERAL")] if rng.random() < 0.03 else [])
            exam = "CHEST (PRE-OP PA AND LAT)" if rng.random() < 0.06 else "CHEST (PA AND LAT)"
    # A few images have no ViewPosition in the DICOM header (it is blank in the metadata too).
    views = [("" if rng.random() < 0.02 else vp, drawn) for vp, drawn in views]
    return exam, views


def _patient(seed: int, index: int, difficulty: float) -> PatientRecord:
    """Everything about patient `index` except ids: demographics, encounters, studies, reports, labs."""
    rng = np.random.default_rng([seed, 1, index])
    sex = "M" if rng.random() < 0.52 else "F"
    anchor_age = int(np.clip(rng.normal(62, 17), 18, 91))
    anchor_year = int(rng.integers(2110, 2190))
    frailty = float(rng.normal(0, 1) + 0.02 * (anchor_age - 62))
    insurance = str(rng.choice(ehr.INSURANCE, p=[0.45, 0.15, 0.40]))
    fewer_labs = insurance == "Other" and anchor_age < 50          # a group that gets fewer labs drawn
    demo = {"insurance": insurance, "language": "ENGLISH" if rng.random() < 0.9 else "?",
            "marital_status": str(rng.choice(ehr.MARITAL)), "race": str(rng.choice(ehr.RACE))}
    chronic = {"card": int(rng.random() < _sigmoid(-1.6 + 0.04 * (anchor_age - 65) + 0.5 * frailty)),
               "lesion": int(rng.random() < 0.035), "lesion_side": _side(rng),
               "lesion_burden": 1 + int(rng.random() < 0.35) + int(rng.random() < 0.25),
               "fracture": int(rng.random() < 0.025), "fracture_side": _side(rng),
               "pleural_other": int(rng.random() < 0.015), "pleural_side": _side(rng),
               "pacemaker": int(rng.random() < 0.02 + 0.04 * (anchor_age > 70)),
               "sternal": int(rng.random() < 0.04)}
    end = datetime(anchor_year, 1, 1) + timedelta(days=float(rng.uniform(0, 730)))
    rec = PatientRecord({}, [], [], [], fewer_labs)
    dod = ""
    for _ in range(1 + int(rng.poisson(0.55 + 0.35 * max(frailty, 0)))):
        t = end + timedelta(days=float(rng.exponential(150)), hours=float(rng.uniform(0, 24)))
        t = t.replace(microsecond=0)                  # encounters never overlap: each starts after the last ends
        z = 0.8 * frailty + float(rng.normal(0, 0.9))
        inpatient = rng.random() < _sigmoid(-0.2 + 1.3 * z)
        kind = "inpatient" if inpatient else ("ed" if rng.random() < 0.5 else "outpatient")
        enc = _Encounter(rng, rec, t, z, anchor_age + (t.year - anchor_year), sex)
        dod, end = _encounter(enc, kind, chronic, demo)
        if dod:
            break                                     # nothing happens after death
    if not dod and rng.random() < _sigmoid(-3.5 + 0.06 * (anchor_age - 65) + 0.8 * frailty):
        dod = (end + timedelta(days=float(rng.uniform(32, 700)))).strftime("%Y-%m-%d")
    rec.row = {"gender": sex, "anchor_age": anchor_age, "anchor_year": anchor_year,
               "anchor_year_group": str(rng.choice(ehr.YEAR_GROUPS)), "dod": dod}
    return rec


@dataclass
class _Encounter:
    """What one encounter's helpers share (filled in by `_encounter`)."""

    rng: np.random.Generator
    rec: PatientRecord
    t: datetime                                       # the first film's time (whole seconds)
    z: float
    age: int
    sex: str
    findings: dict = field(default_factory=dict)
    sides: dict = field(default_factory=dict)
    severity: dict = field(default_factory=dict)
    devices: tuple[str, ...] = ()
    phys: ehr.Physiology | None = None

    @property
    def first(self) -> int:
        """Local index of the encounter's first study."""
        return len(self.rec.studies)


def _encounter(e: _Encounter, kind: str, chronic: dict, demo: dict) -> tuple[str, datetime]:
    """One outpatient visit, ED visit or admission with its studies and labs; returns (dod or "", its end)."""
    rng = e.rng
    latent = ehr.Latent.sample(rng)
    e.devices = _devices(rng, z=e.z, resp=latent.resp, inpatient=kind == "inpatient", chronic=chronic)
    portable_p = {"inpatient": _sigmoid(-1.2 + 1.4 * e.z + 2.0 * ("ett" in e.devices)), "ed": 0.2,
                  "outpatient": 0.03}
    portable = bool(rng.random() < portable_p[kind])
    e.findings, e.sides, e.severity = _sample_findings(rng, z=e.z, age=e.age, chronic=chronic, portable=portable,
                                                       devices=e.devices)
    e.phys = ehr.Physiology.sample(rng, z=e.z, age=e.age, female=e.sex == "F", truth=e.findings, latent=latent)
    if kind == "inpatient":
        times, hadm, dod, end = _admission(e, demo)
    else:
        times, hadm, dod, end = [e.t], None, _visit(e, kind), e.t
    findings, sides, severity = e.findings, e.sides, e.severity
    for i, when in enumerate(times):
        if i:                                         # findings evolve between studies of one admission
            findings, sides, severity = _evolve(rng, findings, sides, severity, e.z, e.age, chronic, portable,
                                                e.devices)
        exam, views = _views(rng, portable)
        case = "ed_film_before_admittime" if i == 0 and hadm is not None and \
            e.rec.admissions[hadm]["edregtime"] else ""
        e.rec.studies.append(Study(subject_id=0, when=when.replace(microsecond=int(rng.integers(0, 1000)) * 1000),
                                   age=e.age, sex=e.sex, findings=findings, sides=sides, severity=severity,
                                   devices=e.devices, portable=portable, exam=exam, views=views, case=case,
                                   hadm=hadm))
    return dod, end


def _admission(e: _Encounter, demo: dict) -> tuple[list[datetime], int, str, datetime]:
    """An admission (via the ED 85%: its first film is taken before admittime), its ICU stay, labs, outcome."""
    rng, t, labs, fewer = e.rng, e.t, e.rec.labs, e.rec.fewer_labs
    out = ehr.outcome(rng, z=e.z, age=e.age, truth=e.findings, severity=e.severity, sides=e.sides,
                      devices=e.devices, phys=e.phys)
    via_ed = rng.random() < 0.85
    edreg = (t - timedelta(hours=float(rng.uniform(0.5, 3)))).replace(second=0)
    if via_ed:                                        # edregtime < first film < admittime
        admit = (t + timedelta(hours=float(rng.uniform(1, 8)))).replace(second=0)
    else:                                             # direct admission: the first film after arrival
        admit = (t - timedelta(hours=float(rng.uniform(0.5, 6)))).replace(second=0)
    disch = (admit + timedelta(days=out.los_days)).replace(second=0)
    hadm = len(e.rec.admissions)
    e.rec.admissions.append({
        "hadm_id": hadm, "admittime": ehr.fmt_time(admit), "dischtime": ehr.fmt_time(disch),
        "deathtime": ehr.fmt_time(disch) if out.died else "",
        "admission_type": str(rng.choice(ehr.ADMISSION_TYPES)), "admit_provider_id": ehr.provider_id(rng),
        "admission_location": "EMERGENCY ROOM" if via_ed else str(rng.choice(
            ["TRANSFER FROM HOSPITAL", "PHYSICIAN REFERRAL", "CLINIC REFERRAL"])),
        "discharge_location": "DIED" if out.died else str(rng.choice(ehr.DISCHARGE)), **demo,
        "edregtime": ehr.fmt_time(edreg) if via_ed else "", "edouttime": ehr.fmt_time(admit) if via_ed else "",
        "hospital_expire_flag": int(out.died)})
    stay = ehr.icu_stay(rng, hadm=hadm, admit=admit, disch=disch, z=e.z, phys=e.phys, devices=e.devices,
                        died=out.died, truth=e.findings)
    if stay is not None:
        e.rec.stays.append(stay)
    los = out.los_days
    n_more = min(int(rng.poisson(0.35 + 0.5 * max(e.z, 0) + 0.8 * (stay is not None))), int(los))
    times = [t] + sorted(admit + timedelta(days=float(rng.uniform(0.3, los))) for _ in range(n_more))
    # Labs: ED draw before admission (no hadm_id yet) or admission bloods, then daily, some follow-up after.
    if rng.random() < (0.6 if fewer else 0.9):
        if via_ed:
            draw = _draws(e, t - timedelta(hours=float(rng.uniform(0.3, 4))), None, "STAT")
            _plant_result_time(rng, draw, t, e.first)
        else:
            draw = _draws(e, admit + timedelta(minutes=float(rng.uniform(5, 40))), hadm, "STAT")
        labs += draw
    for d in range(min(int(los) + 1, 12)):
        when = admit + timedelta(days=d, hours=float(rng.uniform(0.5, 10)))
        if when < disch and rng.random() < (0.5 if fewer else 0.8):
            labs += _draws(e, when, hadm, "STAT", first=False)
    if out.died:
        return times, hadm, disch.strftime("%Y-%m-%d"), disch
    if out.died_after:                                # died at home or in hospice within 30 days
        return times, hadm, (disch + timedelta(days=float(rng.uniform(0.5, 25)))).strftime("%Y-%m-%d"), disch
    if rng.random() < 0.2:
        labs += _draws(e, disch + timedelta(days=float(rng.uniform(7, 30))), None, "ROUTINE")
    return times, hadm, "", disch


def _visit(e: _Encounter, kind: str) -> str:
    """An ED or outpatient visit's labs (hadm_id blank) and whether the patient died within 30 days."""
    rng, t, fewer = e.rng, e.t, e.rec.fewer_labs
    p_labs = {"ed": 0.75, "outpatient": 0.35}[kind] * (0.6 if fewer else 1.0)
    r = rng.random()
    if kind == "outpatient" and r < 0.15:
        # A clinic draw the day before the film, one minute inside or outside the 24 h window before it.
        inside = rng.random() < 0.5
        when = t - timedelta(hours=24) + timedelta(minutes=1 if inside else -1)
        draw = _draws(e, when, None, "ROUTINE")
        _mark(draw, "window_inside" if inside else "window_outside", e.first, inside)
        e.rec.labs += draw
    elif kind == "outpatient" and r < 0.15 + p_labs:
        if rng.random() < 0.5:                        # drawn at the clinic the same day, before the film
            draw = _draws(e, t - timedelta(hours=float(rng.uniform(0.5, 6))), None, "ROUTINE")
            for row in draw:
                _mark([row], "outpatient_draw", e.first, bool(row["storetime"] <= ehr.fmt_time(t)))
        else:
            draw = _draws(e, t + timedelta(days=float(rng.uniform(-10, 10)), hours=float(rng.uniform(-2, 2))),
                          None, "ROUTINE")
        e.rec.labs += draw
    elif kind == "ed" and r < p_labs:
        when = t + timedelta(hours=float(rng.uniform(-2, 2)))
        draw = _draws(e, when, None, "STAT")
        if when <= t - timedelta(minutes=3):
            _plant_result_time(rng, draw, t, e.first)
        e.rec.labs += draw
    if ehr.visit_death(rng, z=e.z, age=e.age, truth=e.findings, severity=e.severity):
        return (t + timedelta(days=float(rng.uniform(1, 30)))).strftime("%Y-%m-%d")
    return ""


def _plant_result_time(rng, draw: list[dict], t: datetime, study: int) -> None:
    """On 20% of draws taken before a film: results stored one minute after it (unusable) or before it."""
    r = rng.random()
    if not draw or r >= 0.2:
        return
    after = r < 0.1
    stored = ehr.fmt_time(t + timedelta(minutes=1 if after else -1))
    for row in draw:
        row["storetime"] = stored
    _mark(draw, "resulted_after_film" if after else "resulted_before_film", study, not after)


def _mark(draw: list[dict], case: str, study: int, eligible: bool) -> None:
    for row in draw:
        row.update(_case=case, _study=study, _eligible=int(eligible))


def _draws(e: _Encounter, when: datetime, hadm: int | None, priority: str, first: bool = True) -> list[dict]:
    return ehr.draw_labs(e.rng, subject_id=0, hadm=hadm, when=when.replace(second=0, microsecond=0), phys=e.phys,
                         priority=priority, first=first, truth=e.findings, z=e.z, fewer=e.rec.fewer_labs)


def _evolve(rng, findings, sides, severity, z, age, chronic, portable, devices):
    fresh, fresh_sides, fresh_sev = _sample_findings(rng, z=z, age=age, chronic=chronic, portable=portable,
                                                     devices=devices)
    if rng.random() < 0.6:                            # most follow-up films look like the previous one
        return findings, sides, severity
    return fresh, fresh_sides, fresh_sev


# ----------------------------------------------------------------------------------------------------
# Ids, label files, tables


def _unique_ids(rng, n: int, low: int, high: int) -> np.ndarray:
    """n distinct ints in [low, high), in random order."""
    if n > high - low:
        raise RadalignError(f"cannot draw {n} distinct ids from [{low}, {high}); use fewer patients")
    return rng.choice(high - low, size=n, replace=False) + low


def _dicom_id(rng) -> str:
    return "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, size=5))


def _noisy_labels(mentions: dict[str, float], rng, flavour: str) -> dict[str, float]:
    """Labeller output from a report's mentions: realistic errors, -1 for hedges, blank when unmentioned."""
    # flavour: chexpert misses some hedges (-1 -> 1); negbio is looser with negation scope (0 -> -1).
    p_unc_to_pos, p_pos_to_unc, p_neg_to_pos, p_neg_to_unc = ((0.10, 0.02, 0.01, 0.0) if flavour == "chexpert"
                                                              else (0.15, 0.01, 0.01, 0.03))
    out = {}
    for name in CHEXPERT_LABELS:
        if name == "No Finding":
            continue
        v = mentions.get(name, math.nan)
        r = rng.random()
        if v == 1.0 and r < p_pos_to_unc:
            v = -1.0
        elif v == -1.0 and r < p_unc_to_pos:
            v = 1.0
        elif v == 0.0 and r < p_neg_to_pos:
            v = 1.0
        elif v == 0.0 and r < p_neg_to_pos + p_neg_to_unc:
            v = -1.0
        out[name] = v
    positive = any(out[n] in (1.0, -1.0) for n in PATHOLOGIES)
    out["No Finding"] = math.nan if positive else 1.0
    return out


def _gz_csv(path: Path, df: pd.DataFrame) -> None:
    """Write a .csv.gz with reproducible bytes (gzip mtime 0, no embedded file name), atomically."""
    text = df.to_csv(index=False, lineterminator="\n")
    atomic_write_bytes(path, gzip.compress(text.encode("utf-8"), compresslevel=6, mtime=0))


def _study_time(when: datetime) -> str:
    """StudyTime as in MIMIC-CXR: an unpadded float HHMMSS.fff (e.g. 80556.875)."""
    hhmmss = when.hour * 10000 + when.minute * 100 + when.second
    return repr(float(f"{hhmmss}.{when.microsecond // 1000:03d}"))


def _rows_cols(rng, view: str) -> tuple[int, int]:
    sizes = {"AP": [(2544, 3056), (3050, 2539), (2539, 2705)], "PA": [(3056, 2544), (2544, 3056)],
             "LATERAL": [(3056, 2544), (2544, 3056)]}
    options = sizes.get(view, sizes["PA"])
    return options[int(rng.integers(len(options)))]


# ----------------------------------------------------------------------------------------------------
# Images (multiprocessing)


def _render_task(task) -> int:
    """Worker: draw one image from its own seed and write it (and its DICOM in --dicom mode); returns bytes
    written. The drawing is the same in both modes; only the stored form differs."""
    path, spec, size, difficulty, seed, index, *dicom = task
    drawn = render_float(spec, size, difficulty, np.random.default_rng([seed, 2, index]))  # [S, S] in [0, 1]
    if dicom:
        # As MIMIC-CXR-JPG was made: the JPG is dcm2img's file for the DICOM's (decoded) pixels.
        jpg, written = _write_dicom(dicom[0], drawn, np.random.default_rng([seed, 5, index]))
    else:
        buf, written = io.BytesIO(), 0
        Image.fromarray(quantize(drawn, 8), mode="L").save(buf, format="JPEG", quality=95)
        jpg = buf.getvalue()
    # Temp file + rename (no fsync per image: 50k fsyncs would dominate; a crash leaves no partial JPEG).
    with atomic_path(path) as tmp:
        tmp.write_bytes(jpg)
    return written + len(jpg)


def _write_dicom(info: dict, drawn: np.ndarray, rng: np.random.Generator) -> tuple[bytes, int]:
    """One film as MIMIC-CXR's DICOM release holds it: CR or DX, 12 bits stored, MONOCHROME1 (30%, values
    inverted) or MONOCHROME2, uncompressed (50%), RLE or JPEG 2000 lossless. `rng` is the image's own
    acquisition stream ([seed, 5, index]), so the drawing's stream is the one the JPG-only mode uses.
    Returns (the MIMIC-CXR-JPG file of what was written, read back through `data.dicom`; DICOM bytes written)."""
    from pydicom.uid import generate_uid
    from radalign.data.dicom import open_dicom, write_dicom

    modality = "CR" if rng.random() < 0.5 else "DX"
    photometric = "MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2"
    compression = str(rng.choice(["none", "none", "rle", "j2k"]))
    stored = quantize(drawn, 12)  # [S, S] uint16, 0 .. 4095
    if photometric == "MONOCHROME1":
        stored = 4095 - stored
    when = info["when"]
    header = {"PatientID": str(info["subject_id"]), "PatientName": f"SYNTHETIC^PATIENT{info['subject_id']}",
              "StudyID": str(info["study_id"]), "ViewPosition": info["view"],
              "StudyInstanceUID": generate_uid(entropy_srcs=["radalign-synth-study", str(info["study_id"])]),
              "SOPInstanceUID": generate_uid(entropy_srcs=["radalign-synth-image", info["dicom_id"]]),
              "StudyDate": when.strftime("%Y%m%d"), "StudyTime": when.strftime("%H%M%S.%f")}
    write_dicom(info["path"], stored, modality=modality, photometric=photometric, compression=compression,
                header=header, rescale=(1.0, 0.0) if modality == "DX" else None)
    with open_dicom(info["path"], max_pixels=None) as d:
        jpg = d.jpeg()
    return jpg, Path(info["path"]).stat().st_size


def _write_images(tasks: list, workers: int, progress: bool) -> int:
    bar = tqdm(total=len(tasks), desc="synth images", unit="img", disable=not progress)
    written = 0
    if workers <= 1:
        for task in tasks:
            written += _render_task(task)
            bar.update()
    else:
        # Results are tiny ints and each worker writes its own files: memory stays flat at any count.
        with mp.get_context().Pool(workers) as pool:
            for n in pool.imap_unordered(_render_task, tasks, chunksize=16):
                written += n
                bar.update()
    bar.close()
    return written


# ----------------------------------------------------------------------------------------------------
# Entry point


def _check_args(patients, seed, image_size, difficulty, workers) -> list[str]:
    problems = []
    if not isinstance(patients, int) or patients < 1:
        problems.append(f"--patients must be a positive integer, got {patients!r}")
    elif patients > 9_000_000:
        problems.append(f"--patients {patients} is more than the 8-digit subject id space allows (9,000,000)")
    if not isinstance(seed, int) or seed < 0:
        problems.append(f"--seed must be a non-negative integer, got {seed!r}")
    if not isinstance(image_size, int) or not 32 <= image_size <= 4096:
        problems.append(f"--image-size must be an integer in 32..4096 pixels, got {image_size!r}")
    if not isinstance(difficulty, (int, float)) or not 0.0 <= float(difficulty) <= 1.0:
        problems.append(f"--difficulty must be in [0, 1] (0 blatant, 1 subtle), got {difficulty!r}")
    if not isinstance(workers, int) or workers < 1:
        problems.append(f"--num-workers must be a positive integer, got {workers!r}")
    return problems


def _prepare_out(out: Path) -> None:
    """Allow an empty/new folder or a previous synth output (regenerated); refuse anything else."""
    if out.exists() and not out.is_dir():
        raise RadalignError(f"--out {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise RadalignError(f"--out {out} is not empty and holds no {MARKER} from an earlier `data synth`; "
                            "choose an empty or new folder (synth replaces what it writes)")
    # A previous run's images/reports may have other ids; remove our own trees so no stale file remains.
    for sub in ("mimic-cxr-jpg/files", "mimic-cxr-reports/files", "mimic-cxr/files"):
        if (out / sub).is_dir() and (out / MARKER).exists():
            shutil.rmtree(out / sub)
    (out / MARKER).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def synthesize(out_dir, *, patients: int = 2000, seed: int = 0, image_size: int = 256,
               difficulty: float = 0.3, workers: int = 1, progress: bool = True, images: bool = True,
               icu: bool = True, with_dicom: bool = False) -> dict:
    """Write the synthetic MIMIC stand-in under `out_dir`; returns counts and the paths written.

    `images=False` writes every table and report but no JPEG (the EHR cohort and the truth table need no
    pixels; the tables are byte-identical to a run with images). `icu=False` leaves out `mimic-iv/icu`.
    `with_dicom=True` also writes each film as DICOM under `mimic-cxr/files/...` (MIMIC-CXR's DICOM layout) and
    makes each JPG the MIMIC-CXR-JPG conversion of that DICOM (`_write_dicom`); the tables are the same.
    """
    problems = _check_args(patients, seed, image_size, difficulty, workers)
    if problems:
        raise RadalignError("data synth: " + "; ".join(problems))
    out = Path(out_dir)
    _prepare_out(out)
    difficulty = float(difficulty)

    records = [_patient(seed, i, difficulty)
               for i in tqdm(range(patients), desc="synth patients", unit="pt", disable=not progress)]
    ids_rng = np.random.default_rng([seed, 0])
    subject_ids = np.sort(_unique_ids(ids_rng, patients, 10_000_000, 20_000_000))
    studies = [s for r in records for s in r.studies]
    study_ids = _unique_ids(ids_rng, len(studies), 50_000_000, 60_000_000)     # random, not chronological
    n_adm = sum(len(r.admissions) for r in records)
    hadm_ids = _unique_ids(ids_rng, n_adm, 20_000_000, 30_000_000)
    split_of = _split_patients(ids_rng, patients)
    _assign_hadm(records, hadm_ids)
    extra_rng = np.random.default_rng([seed, 4])                              # ids added in generator v2
    _assign_stays(records, _unique_ids(extra_rng, sum(len(r.stays) for r in records), 30_000_000, 40_000_000))
    absent_patients = _absent_patients(extra_rng, patients)
    ehr.plant_quirks(records, seed)                   # streams of their own: films and splits stay as they were
    latin1 = set(ids_rng.choice(len(studies), size=max(1, round(0.01 * len(studies))), replace=False).tolist())
    absent = set(ids_rng.choice(len(studies), size=max(1, round(0.01 * len(studies))), replace=False).tolist()) \
        if len(studies) >= 3 else set()

    jpg_root, rep_root, dcm_root = out / "mimic-cxr-jpg", out / "mimic-cxr-reports", out / "mimic-cxr"
    meta, split_rows, gt_rows, cx_rows, label_rows = [], [], [], {"chexpert": [], "negbio": []}, []
    tasks, styles, seen_dicoms = [], Counter(), set()
    k = 0
    for p, (rec, subject) in enumerate(zip(records, subject_ids)):
        subject = int(subject)
        rec.row["subject_id"] = subject
        for s in rec.studies:
            s.subject_id, s.study_id = subject, int(study_ids[k])
            rel = Path("files") / f"p{str(subject)[:2]}" / f"p{subject}"
            label_rng = np.random.default_rng([seed, 3, k])
            rep = write_report(findings=s.findings, sides=s.sides, severity=s.severity, devices=s.devices,
                               exam=s.exam, portable=s.portable, age=s.age, sex=s.sex, latin1=k in latin1,
                               rng=label_rng)
            styles[rep.style] += 1
            with atomic_path(rep_root / rel / f"s{s.study_id}.txt") as tmp:
                tmp.write_bytes(rep.text.encode("latin-1"))       # ASCII except the rare latin-1 degree sign
            labels = {fl: _noisy_labels(rep.mentions, label_rng, fl) for fl in ("chexpert", "negbio")}
            if k not in absent:
                for fl in labels:
                    cx_rows[fl].append({"subject_id": subject, "study_id": s.study_id, **labels[fl]})
            k += 1
            for vp, drawn in s.views:
                dicom = _dicom_id(ids_rng)
                while dicom in seen_dicoms:
                    dicom = _dicom_id(ids_rng)
                seen_dicoms.add(dicom)
                rows, cols = _rows_cols(ids_rng, drawn)
                meta.append(_metadata_row(dicom, s, vp, rows, cols, ids_rng))
                split_rows.append({"dicom_id": dicom, "study_id": s.study_id, "subject_id": subject,
                                   "split": split_of[p]})
                jpg_rel = rel / f"s{s.study_id}" / f"{dicom}.jpg"
                spec = ImageSpec(view=drawn, findings=s.findings, sides=s.sides, severity=s.severity,
                                 devices=s.devices)
                tasks.append((jpg_root / jpg_rel, spec, image_size, difficulty, seed, len(tasks),
                              *([{"path": dcm_root / jpg_rel.with_suffix(".dcm"), "subject_id": subject,
                                  "study_id": s.study_id, "dicom_id": dicom, "view": vp, "when": s.when}]
                                if with_dicom else [])))
                gt_rows.append({"dicom_id": dicom, "study_id": s.study_id, "subject_id": subject, "view": drawn,
                                **s.findings, **{f"{n} side": s.sides.get(n, "") for n in SIDED},
                                "devices": ";".join(s.devices),
                                **{f"{n} severity": s.severity.get(n, "") for n in SEVERITY_SHOWN}})
                label_rows.append({"Path": f"mimic-cxr-jpg/{jpg_rel.as_posix()}",
                                   "Sex": "Male" if s.sex == "M" else "Female", "Age": s.age,
                                   "Frontal/Lateral": "Lateral" if drawn == "LATERAL" else "Frontal",
                                   "AP/PA": vp if vp in ("AP", "PA", "LL") else "",
                                   **(labels["chexpert"] if k - 1 not in absent else {})})
        for row in (*rec.admissions, *rec.labs, *rec.stays):
            row["subject_id"] = subject
        for lab in rec.labs:
            if "_study" in lab:
                lab["_study_id"] = rec.studies[lab["_study"]].study_id
        if p in absent_patients:
            _drop_from_hosp(rec)

    bytes_written = _write_images(tasks, workers, progress) if images else 0
    paths, counts = _write_tables(out, records, meta, split_rows, cx_rows, gt_rows, label_rows, icu=icu)
    summary = {
        "patients": patients, "studies": len(studies), "images": len(tasks) if images else 0,
        "reports": len(studies), "lab_rows": sum(len(r.labs) for r in records),
        "admissions": sum(len(r.admissions) for r in records),
        "studies_without_admission": sum(1 for r in records for s in r.studies if not _in_admission(s, r)),
        "studies_absent_from_label_files": len(absent), "latin1_reports": len(latin1),
        "subjects_absent_from_patients": len(absent_patients), **counts,
        "report_styles": dict(sorted(styles.items())), "image_bytes": bytes_written,
        "generator_version": GENERATOR_VERSION,
        "args": _args(patients, seed, image_size, difficulty, images, icu, with_dicom),
        "paths": {**paths, "images": str(jpg_root / "files"), "reports": str(rep_root / "files"),
                  **({"dicom": str(dcm_root / "files")} if with_dicom and images else {})},
    }
    atomic_write_json(out / MARKER, summary)
    log.info(f"wrote {summary['images']} images, {summary['studies']} reports, {summary['lab_rows']} lab rows, "
             f"{counts.get('chartevents_rows', 0)} chartevents rows "
             f"for {patients} patients under {out}")
    return summary


def _assign_hadm(records: list[PatientRecord], hadm_ids: np.ndarray) -> None:
    """Replace each patient's local admission indices with globally unique hadm_ids (8 digits, leading 2)."""
    offset = 0
    for r in records:
        local = {a["hadm_id"]: int(hadm_ids[offset + i]) for i, a in enumerate(r.admissions)}
        offset += len(r.admissions)
        for a in r.admissions:
            a["hadm_id"] = local[a["hadm_id"]]
        for lab in r.labs:
            if lab["hadm_id"] is not None:
                lab["hadm_id"] = local[lab["hadm_id"]]
        for s in r.studies:
            if s.hadm is not None:
                s.hadm = local[s.hadm]
        for stay in r.stays:
            stay["hadm_id"] = local[stay["hadm_id"]]


def _assign_stays(records: list[PatientRecord], stay_ids: np.ndarray) -> None:
    """Globally unique ICU stay_ids (8 digits, leading 3), in patient order."""
    k = 0
    for r in records:
        for stay in r.stays:
            stay["stay_id"] = int(stay_ids[k])
            k += 1


def _absent_patients(rng, n: int) -> set[int]:
    """~1% of patients (one from 20 patients on) are missing from patients.csv (their labs remain)."""
    if n < 20:
        return set()
    return set(rng.choice(n, size=max(1, round(0.01 * n)), replace=False).tolist())


def _drop_from_hosp(rec: PatientRecord) -> None:
    """A subject with films and labs but no MIMIC-IV `patients`/`admissions`/ICU rows (outpatient labs only)."""
    rec.row["_absent"] = True
    rec.admissions.clear()
    rec.stays.clear()
    for lab in rec.labs:
        lab["hadm_id"] = None
    for s in rec.studies:
        s.hadm, s.case = None, "subject_absent_from_patients"
    rec.cases.clear()


def _in_admission(s: Study, r: PatientRecord) -> bool:
    """Whether a study's time lies in one of the subject's admission spans (the earlier of edregtime and
    admittime to the later of dischtime and deathtime) -- independent of `Study.hadm`, as a check."""
    t = s.when.strftime("%Y-%m-%d %H:%M:%S")
    return any(min(a["edregtime"] or a["admittime"], a["admittime"]) <= t <= max(a["dischtime"], a["deathtime"])
               for a in r.admissions)


def _split_patients(rng, n: int) -> list[str]:
    """Split by patient: every image of a subject lands in the same split."""
    u = rng.random(n)
    cuts = np.cumsum([f for _, f in SPLIT_FRACTIONS])
    return [SPLIT_FRACTIONS[int(np.searchsorted(cuts, v, side="right"))][0] for v in u]


def _metadata_row(dicom: str, s: Study, vp: str, rows: int, cols: int, rng) -> dict:
    if vp == "AP":
        orientation = str(rng.choice(["Recumbent", "Erect", ""]))
    elif vp:
        orientation = "Erect"
    else:
        orientation = ""
    exam = s.exam if rng.random() > 0.01 else ""
    return {"dicom_id": dicom, "subject_id": s.subject_id, "study_id": s.study_id,
            "PerformedProcedureStepDescription": exam, "ViewPosition": vp, "Rows": rows, "Columns": cols,
            "StudyDate": int(s.when.strftime("%Y%m%d")), "StudyTime": _study_time(s.when),
            "ProcedureCodeSequence_CodeMeaning": s.exam, "ViewCodeSequence_CodeMeaning": VIEW_CODE.get(vp, ""),
            "PatientOrientationCodeSequence_CodeMeaning": orientation}


def _write_tables(out: Path, records, meta, split_rows, cx_rows, gt_rows, label_rows, *,
                  icu: bool) -> tuple[dict[str, str], dict[str, int]]:
    jpg, hosp = out / "mimic-cxr-jpg", out / "mimic-iv" / "hosp"
    paths = {
        "metadata": jpg / "mimic-cxr-2.0.0-metadata.csv.gz", "split": jpg / "mimic-cxr-2.0.0-split.csv.gz",
        "chexpert": jpg / "mimic-cxr-2.0.0-chexpert.csv.gz", "negbio": jpg / "mimic-cxr-2.0.0-negbio.csv.gz",
        "patients": hosp / "patients.csv.gz", "admissions": hosp / "admissions.csv.gz",
        "labevents": hosp / "labevents.csv.gz", "d_labitems": hosp / "d_labitems.csv.gz",
        "chexpert_format": out / "chexpert-format.csv", "ground_truth": out / "ground_truth.csv.gz",
        "linkage_cases": out / "linkage_cases.csv.gz",
    }
    by_study = ["subject_id", "study_id", "dicom_id"]
    _gz_csv(paths["metadata"], pd.DataFrame(meta, columns=METADATA_COLUMNS).sort_values(by_study))
    _gz_csv(paths["split"], pd.DataFrame(split_rows, columns=SPLIT_COLUMNS).sort_values(
        ["subject_id", "study_id", "dicom_id"]))
    for fl in ("chexpert", "negbio"):
        df = pd.DataFrame(cx_rows[fl], columns=LABEL_COLUMNS).sort_values(["subject_id", "study_id"])
        _gz_csv(paths[fl], df.astype({n: "float64" for n in MIMIC_LABEL_ORDER}))
    _gz_csv(paths["ground_truth"], pd.DataFrame(gt_rows, columns=GROUND_TRUTH_COLUMNS).sort_values(by_study))
    cx = pd.DataFrame(label_rows, columns=CHEXPERT_FORMAT_COLUMNS).astype({n: "float64" for n in CHEXPERT_LABELS})
    with atomic_path(paths["chexpert_format"]) as tmp:
        cx.to_csv(tmp, index=False, lineterminator="\n")
    _gz_csv(paths["patients"], pd.DataFrame([r.row for r in records if not r.row.get("_absent")],
                                            columns=ehr.PATIENT_COLUMNS))
    adm = pd.DataFrame([a for r in records for a in r.admissions], columns=ehr.ADMISSION_COLUMNS)
    _gz_csv(paths["admissions"], adm.sort_values(["subject_id", "admittime"]))
    labs = _labevents(records)
    _gz_csv(paths["labevents"], labs[ehr.LAB_COLUMNS])
    _gz_csv(paths["d_labitems"], pd.DataFrame(ehr.d_labitems_rows(), columns=ehr.D_LABITEMS_COLUMNS))
    cases = _linkage_cases(records, labs)
    _gz_csv(paths["linkage_cases"], cases)
    counts = {f"case_{k}": int(v) for k, v in sorted(cases["case"].value_counts().items())}
    counts["non_numeric_lab_values"] = int(labs["valuenum"].isna().sum())
    if icu:
        paths.update(_write_icu(out / "mimic-iv" / "icu", records, counts))
    return {k: str(v) for k, v in paths.items()}, counts


def _labevents(records) -> pd.DataFrame:
    """labevents rows sorted as the real file, with the planted-case columns (`_case`, ...) still attached."""
    cols = [*ehr.LAB_COLUMNS, "_case", "_study_id", "_eligible", "_also"]
    labs = pd.DataFrame([lab for r in records for lab in r.labs], columns=cols)
    labs = labs.sort_values(["subject_id", "charttime", "itemid"], kind="stable").reset_index(drop=True)
    labs["labevent_id"] = np.arange(1, len(labs) + 1)
    labs["hadm_id"] = labs["hadm_id"].astype("Int64")          # ints with blanks, as in the real file
    return labs


def _linkage_cases(records, labs: pd.DataFrame) -> pd.DataFrame:
    """Where each planted linkage case is (docs/synthetic-data.md, "Linkage cases"): one row per study or lab."""
    lab_rows = [_lab_case_rows(labs[labs[col].notna()], col) for col in ("_case", "_also")]
    study_rows = pd.DataFrame([{"case": s.case, "subject_id": s.subject_id, "study_id": s.study_id,
                                "hadm_id": s.hadm} for r in records for s in r.studies if s.case]
                              + [{"case": case, "subject_id": r.studies[k].subject_id,
                                  "study_id": r.studies[k].study_id, "hadm_id": hadm}
                                 for r in records for case, k, hadm in r.cases],
                              columns=["case", "subject_id", "study_id", "hadm_id"])
    out = pd.concat([study_rows, *lab_rows], ignore_index=True).reindex(columns=LINKAGE_CASE_COLUMNS)
    for col in ("study_id", "hadm_id", "labevent_id", "itemid", "eligible"):
        out[col] = out[col].astype("Int64")
    return out.sort_values(["case", "subject_id", "study_id", "labevent_id"], kind="stable")


def _lab_case_rows(planted: pd.DataFrame, column: str) -> pd.DataFrame:
    return pd.DataFrame({"case": planted[column], "subject_id": planted["subject_id"],
                         "study_id": planted["_study_id"].astype("Int64"), "hadm_id": planted["hadm_id"],
                         "labevent_id": planted["labevent_id"], "itemid": planted["itemid"],
                         "eligible": planted["_eligible"].astype("Int64")})


def _write_icu(icu: Path, records, counts: dict) -> dict[str, Path]:
    """mimic-iv/icu/{icustays,d_items,chartevents}.csv.gz in the real column order and formats."""
    paths = {"icustays": icu / "icustays.csv.gz", "d_items": icu / "d_items.csv.gz",
             "chartevents": icu / "chartevents.csv.gz"}
    stays = [st for r in records for st in r.stays]
    _gz_csv(paths["icustays"], pd.DataFrame(stays, columns=ehr.ICUSTAY_COLUMNS).sort_values(
        ["subject_id", "intime"]))
    _gz_csv(paths["d_items"], pd.DataFrame(ehr.d_items_rows(), columns=ehr.D_ITEMS_COLUMNS))
    _gz_csv(paths["chartevents"], _chartevents(stays))
    counts["icu_stays"] = len(stays)
    counts["chartevents_rows"] = sum(len(st["_vitals"]["itemid"]) for st in stays)
    return paths


def _chartevents(stays: list[dict]) -> pd.DataFrame:
    if not stays:
        return pd.DataFrame(columns=ehr.CHARTEVENT_COLUMNS)
    sizes = [len(st["_vitals"]["itemid"]) for st in stays]
    ce = pd.DataFrame({k: np.concatenate([st["_vitals"][k] for st in stays]) for k in stays[0]["_vitals"]})
    for key in ("subject_id", "hadm_id", "stay_id"):
        ce[key] = np.repeat([st[key] for st in stays], sizes)
    for key in ("charttime", "storetime"):
        ce[key] = pd.to_datetime(ce[key], unit="s").dt.strftime("%Y-%m-%d %H:%M:%S")
    decimals = ce["itemid"].map({k: v[4] for k, v in ehr.VITAL_ITEMS.items()})
    ce["value"] = [f"{v:.{d}f}" for v, d in zip(ce["valuenum"], decimals)]
    ce["valueuom"] = ce["itemid"].map({k: v[3] for k, v in ehr.VITAL_ITEMS.items()})
    ce = ce.sort_values(["subject_id", "stay_id", "charttime", "itemid"], kind="stable")
    return ce[ehr.CHARTEVENT_COLUMNS]


def _args(patients, seed, image_size, difficulty, images, icu, with_dicom) -> dict:
    """synth.json's "args" ("dicom" only when set, so JPG-only runs keep the marker they always had)."""
    return {"patients": patients, "seed": seed, "image_size": image_size, "difficulty": float(difficulty),
            "images": bool(images), "icu": bool(icu), **({"dicom": True} if with_dicom else {})}


def synth_complete(out_dir, *, patients: int, seed: int, image_size: int, difficulty: float,
                   images: bool = True, icu: bool = True, with_dicom: bool = False) -> bool:
    """True when `out_dir` holds a finished synth run with these arguments (callers may skip regenerating)."""
    import json

    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        return False
    try:
        summary = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict) or summary.get("generator_version") != GENERATOR_VERSION:
        return False                                  # made by an older generator: regenerate
    return summary.get("args") == _args(patients, seed, image_size, difficulty, images, icu, with_dicom)


__all__ = ["synthesize", "synth_complete", "METADATA_COLUMNS", "SPLIT_COLUMNS", "LABEL_COLUMNS",
           "CHEXPERT_FORMAT_COLUMNS", "GROUND_TRUTH_COLUMNS"]

"""MIMIC-IV `hosp` tables for the synthetic stand-in: patients, admissions, labevents, d_labitems.

Values follow the real column lists and formats (times "YYYY-MM-DD HH:MM:SS", dod "YYYY-MM-DD",
`___` for removed free text). Everything is on the subject's shifted timeline, the same one the
chest radiographs' StudyDate/StudyTime use.

Clinical structure that later stages can learn from:
* labs follow the findings (NT-proBNP with edema/cardiomegaly, WBC and CRP with pneumonia, lactate with
  severity) and the encounter's severity;
* missingness is not at random: outpatients rarely get labs, NT-proBNP/CRP/lactate are ordered on
  suspicion, and one group (insurance "Other" under 50) gets fewer draws;
* outcomes (hospital_expire_flag, length of stay) depend on findings, labs and age together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

# itemid: (label, fluid, category, uom, ref_lower, ref_upper, decimals) -- the real MIMIC-IV itemids.
LAB_ITEMS: dict[int, tuple[str, str, str, str, float, float, int]] = {
    50912: ("Creatinine", "Blood", "Chemistry", "mg/dL", 0.5, 1.2, 1),
    51301: ("White Blood Cells", "Blood", "Hematology", "K/uL", 4.0, 11.0, 1),
    51222: ("Hemoglobin", "Blood", "Hematology", "g/dL", 13.7, 17.5, 1),
    51265: ("Platelet Count", "Blood", "Hematology", "K/uL", 150.0, 440.0, 0),
    50983: ("Sodium", "Blood", "Chemistry", "mEq/L", 133.0, 145.0, 0),
    50971: ("Potassium", "Blood", "Chemistry", "mEq/L", 3.3, 5.1, 1),
    51006: ("Urea Nitrogen", "Blood", "Chemistry", "mg/dL", 6.0, 20.0, 0),
    50882: ("Bicarbonate", "Blood", "Chemistry", "mEq/L", 22.0, 32.0, 0),
    50931: ("Glucose", "Blood", "Chemistry", "mg/dL", 70.0, 100.0, 0),
    50813: ("Lactate", "Blood", "Blood Gas", "mmol/L", 0.5, 2.0, 1),
    50963: ("NTproBNP", "Blood", "Chemistry", "pg/mL", 0.0, 353.0, 0),
    51003: ("Troponin T", "Blood", "Chemistry", "ng/mL", 0.0, 0.01, 2),
    50889: ("C-Reactive Protein", "Blood", "Chemistry", "mg/L", 0.0, 5.0, 1),
}
BMP = (50912, 50983, 50971, 51006, 50882, 50931)
CBC = (51301, 51222, 51265)

PATIENT_COLUMNS = ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"]
ADMISSION_COLUMNS = ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                     "admit_provider_id", "admission_location", "discharge_location", "insurance", "language",
                     "marital_status", "race", "edregtime", "edouttime", "hospital_expire_flag"]
LAB_COLUMNS = ["labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "order_provider_id", "charttime",
               "storetime", "value", "valuenum", "valueuom", "ref_range_lower", "ref_range_upper", "flag",
               "priority", "comments"]
D_LABITEMS_COLUMNS = ["itemid", "label", "fluid", "category"]

YEAR_GROUPS = ("2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019")
INSURANCE = ("Medicare", "Medicaid", "Other")
MARITAL = ("MARRIED", "SINGLE", "WIDOWED", "DIVORCED", "")
RACE = ("WHITE", "WHITE", "WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO - PUERTO RICAN", "ASIAN",
        "OTHER", "UNKNOWN")
ADMISSION_TYPES = ("EW EMER.", "EW EMER.", "URGENT", "DIRECT EMER.", "OBSERVATION ADMIT", "EU OBSERVATION")
DEVICES = ("ett", "ng", "cvc", "picc", "pacemaker", "sternal")
DISCHARGE = ("HOME", "HOME HEALTH CARE", "SKILLED NURSING FACILITY", "REHAB", "")


def fmt_time(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S")


def provider_id(rng: np.random.Generator) -> str:
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return "P" + "".join(alphabet[i] for i in rng.integers(0, len(alphabet), 5))


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


@dataclass
class Latent:
    """An encounter's hidden states beyond its severity `z`, each seen by one modality only.

    `shock`, `aki` and `mi` show in the labs (lactate and bicarbonate; creatinine, urea and potassium;
    troponin) and in the decision to order them, never on the film; `resp` (respiratory failure) shows on
    the film as an endotracheal tube and in ICU vitals (SpO2, respiratory rate), never in the labs.
    """

    shock: float
    aki: float
    mi: float
    resp: float

    @classmethod
    def sample(cls, rng) -> Latent:
        v = rng.standard_normal(4)
        return cls(float(v[0]), float(v[1]), float(v[2]), float(v[3]))


@dataclass
class Physiology:
    """An encounter's latent lab levels (measured or not); outcomes depend on them too."""

    values: dict[int, float]
    latent: Latent

    @classmethod
    def sample(cls, rng, *, z: float, age: int, female: bool, truth: dict[str, int], latent: Latent) -> Physiology:
        pna = truth.get("Pneumonia", 0) or truth.get("Consolidation", 0)
        edema, card = truth.get("Edema", 0), truth.get("Cardiomegaly", 0)
        zp, lt = max(z, 0.0), latent
        n = rng.standard_normal(13)
        creat = math.exp(math.log(0.95) + 0.08 * zp + 0.006 * (age - 60) + 0.15 * edema - 0.15 * female
                         + 0.42 * lt.aki + 0.2 * n[0])
        v = {
            50912: creat,
            51006: creat * 15.0 * math.exp(0.25 * n[1]),
            51301: math.exp(math.log(7.5) + 0.55 * pna + 0.12 * zp + 0.12 * lt.shock + 0.25 * n[2]),
            50889: min(300.0, math.exp(math.log(4.0) + 2.8 * pna + 0.4 * zp + 0.8 * n[3])),
            51222: 14.2 - 0.5 * zp - 1.2 * female + 1.3 * n[4],
            51265: math.exp(math.log(240.0) - 0.1 * zp + 0.3 * n[5]),
            50983: 139.0 - 1.5 * edema + 3.0 * n[6],
            50971: 4.2 + 0.12 * lt.aki + 0.15 * (creat > 2) + 0.45 * n[7],
            50882: 25.5 - 0.6 * zp - 2.2 * lt.shock + 2.0 * n[8],
            50931: math.exp(math.log(110.0) + 0.1 * zp + 0.25 * n[9]),
            50813: math.exp(math.log(1.3) + 0.1 * zp + 0.1 * pna + 0.45 * lt.shock + 0.2 * n[10]),
            50963: min(70000.0, math.exp(math.log(150.0) + 2.6 * edema + 1.8 * card + 0.02 * (age - 60) + 0.8 * n[11])),
            51003: math.exp(math.log(0.006) + 0.25 * zp + 0.6 * edema + 1.4 * lt.mi + 0.6 * n[12]),
        }
        return cls(v, latent)


@dataclass
class Outcome:
    los_days: float
    died: bool                                        # in hospital (hospital_expire_flag)
    died_after: bool                                  # within 30 days of discharge


def _film_risk(truth: dict[str, int], severity: dict[str, int], sides: dict[str, str],
               devices: tuple[str, ...]) -> float:
    """The part of the death risk that the film shows: effusion, cardiomegaly and edema weigh most (a CXR encoder
    reads them well); pneumothorax, lesion burden, tubes and lines less. Intubation is light on purpose: it
    follows respiratory failure, which the ICU vitals show too (docs/synthetic-data.md, "Outcome model")."""
    f = truth
    lines = "cvc" in devices or "picc" in devices
    return (0.6 * ("ett" in devices) + 0.3 * lines
            + f.get("Pneumothorax", 0) * (0.8 + 0.4 * severity.get("Pneumothorax", 2))
            + f.get("Lung Lesion", 0) * (0.5 + 0.6 * severity.get("Lung Lesion", 1))
            + 1.2 * f.get("Edema", 0) + 0.6 * (f.get("Pneumonia", 0) or f.get("Consolidation", 0))
            + 1.6 * f.get("Pleural Effusion", 0) + 0.6 * (sides.get("Pleural Effusion") == "bilateral")
            + 1.6 * f.get("Cardiomegaly", 0))


def _lab_risk(lt: Latent) -> float:
    """The part of the death risk that only the labs show (and, through ordering, their missingness)."""
    return 0.8 * lt.shock + 0.6 * lt.aki + 0.5 * lt.mi


def outcome(rng, *, z: float, age: int, truth: dict[str, int], severity: dict[str, int], sides: dict[str, str],
            devices: tuple[str, ...], phys: Physiology) -> Outcome:
    """Length of stay, in-hospital death and death within 30 days of discharge.

    The log-odds add a shared part (age, severity), a film-only part and a lab-only part, so each
    modality carries information the other lacks (docs/synthetic-data.md, "Outcome model").
    """
    lt, zp = phys.latent, max(z, 0.0)
    film, lab = _film_risk(truth, severity, sides, devices), _lab_risk(lt)
    risk = -5.4 + 0.03 * (age - 65) + 0.1 * zp + 0.15 * lt.resp + film + lab
    died = bool(rng.random() < sigmoid(risk))
    mu = (math.log(3.5) + 0.2 * zp + 0.3 * truth.get("Pneumonia", 0) + 0.25 * truth.get("Edema", 0)
          + 0.4 * ("ett" in devices) + 0.15 * max(lt.shock, 0) + 0.15 * max(lt.aki, 0) + 0.005 * (age - 65))
    los = max(0.3, min(45.0, math.exp(mu + 0.6 * rng.standard_normal())))
    after = -4.0 + 0.04 * (age - 65) + 0.2 * zp + 0.6 * film + 0.6 * lab
    died_after = (not died) and bool(rng.random() < sigmoid(after))
    return Outcome(los, died, died_after)


def visit_death(rng, *, z: float, age: int, truth: dict[str, int], severity: dict[str, int]) -> bool:
    """Death within 30 days of an ED or outpatient visit (rare; lesion burden and age dominate)."""
    lesion = truth.get("Lung Lesion", 0) * (0.5 + 0.6 * severity.get("Lung Lesion", 1))
    return bool(rng.random() < sigmoid(-6.5 + 0.05 * (age - 65) + 0.5 * max(z, 0.0) + lesion))


def _lab_row(rng, itemid: int, value: float, *, subject_id: int, hadm: int | None, when: datetime,
             specimen: int, priority: str, stored: datetime | None) -> dict:
    label, _, _, uom, lo, hi, dec = LAB_ITEMS[itemid]
    row = {"subject_id": subject_id, "hadm_id": hadm, "specimen_id": specimen, "itemid": itemid,
           "order_provider_id": provider_id(rng) if rng.random() < 0.5 else "",
           "charttime": fmt_time(when),
           "storetime": fmt_time(stored) if stored is not None else "",
           "valueuom": uom, "ref_range_lower": lo, "ref_range_upper": hi, "priority": priority, "comments": ""}
    if rng.random() < 0.01:
        # Removed free text: the value is "___" and there is no number (real MIMIC-IV does this).
        row.update(value="___", valuenum=None, flag="", comments="___")
        return row
    if itemid == 51003 and value < 0.01:
        row.update(value="<0.01", valuenum=None, flag="", comments="")
        return row
    num = round(value, dec) if dec else float(round(value))
    text = f"{num:.{dec}f}" if dec else str(int(num))
    row.update(value=text, valuenum=num, flag="abnormal" if (num < lo or num > hi) else "")
    return row


def draw_labs(rng, *, subject_id: int, hadm: int | None, when: datetime, phys: Physiology, priority: str,
              first: bool, truth: dict[str, int], z: float, fewer: bool) -> list[dict]:
    """One blood draw: basic panels usually, the rest ordered on clinical suspicion (not at random)."""
    items: list[int] = []
    if rng.random() < (0.7 if fewer else 0.9):
        items += BMP
    if rng.random() < (0.65 if fewer else 0.85):
        items += CBC
    if rng.random() < sigmoid(-1.2 + 0.6 * z + 1.3 * phys.latent.shock):     # hypotension: lactate ordered
        items.append(50813)
    if first:
        suspect_hf = truth.get("Edema", 0) or truth.get("Cardiomegaly", 0)
        if rng.random() < (0.6 if suspect_hf else 0.06):
            items.append(50963)
        if rng.random() < sigmoid(-0.3 + 1.0 * phys.latent.mi):               # chest pain: troponin ordered
            items.append(51003)
        if rng.random() < 0.12 + 0.5 * (truth.get("Pneumonia", 0) or truth.get("Consolidation", 0)):
            items.append(50889)
    rows = []
    specimen = {"chem": int(rng.integers(10_000_000, 99_999_999)), "heme": int(rng.integers(10_000_000, 99_999_999))}
    stored = {kind: _result_time(rng, when, priority, kind) for kind in ("chem", "heme")}
    for itemid in items:
        drift = math.exp(0.08 * rng.standard_normal())                      # day-to-day variation
        kind = "heme" if itemid in CBC else "chem"
        rows.append(_lab_row(rng, itemid, phys.values[itemid] * drift, subject_id=subject_id, hadm=hadm,
                             when=when, specimen=specimen[kind], priority=priority, stored=stored[kind]))
    return rows


def _result_time(rng, when: datetime, priority: str, kind: str) -> datetime | None:
    """When a specimen's results were stored (one time per specimen); blank for ~1% (real MIMIC-IV has some)."""
    if rng.random() < 0.01:
        return None
    lo, hi = {("STAT", "heme"): (10, 45), ("STAT", "chem"): (20, 90)}.get((priority, kind), (60, 360))
    return when + timedelta(minutes=int(rng.integers(lo, hi)))


def d_labitems_rows() -> list[dict]:
    return [{"itemid": k, "label": v[0], "fluid": v[1], "category": v[2]} for k, v in sorted(LAB_ITEMS.items())]


# ----------------------------------------------------------------------------------------------------
# ICU module: icustays, d_items, chartevents (vital signs only)

ICUSTAY_COLUMNS = ["subject_id", "hadm_id", "stay_id", "first_careunit", "last_careunit", "intime", "outtime", "los"]
D_ITEMS_COLUMNS = ["itemid", "label", "abbreviation", "linksto", "category", "unitname", "param_type",
                   "lownormalvalue", "highnormalvalue"]
CHARTEVENT_COLUMNS = ["subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime", "storetime", "itemid",
                      "value", "valuenum", "valueuom", "warning"]
# itemid: (label, abbreviation, category, unit, decimals, charted every N hours) -- the real MIMIC-IV itemids.
VITAL_ITEMS: dict[int, tuple[str, str, str, str, int, int]] = {
    220045: ("Heart Rate", "HR", "Routine Vital Signs", "bpm", 0, 1),
    220179: ("Non Invasive Blood Pressure systolic", "NBPs", "Routine Vital Signs", "mmHg", 0, 1),
    220180: ("Non Invasive Blood Pressure diastolic", "NBPd", "Routine Vital Signs", "mmHg", 0, 1),
    220210: ("Respiratory Rate", "RR", "Respiratory", "insp/min", 0, 1),
    220277: ("O2 saturation pulseoxymetry", "SpO2", "Respiratory", "%", 0, 1),
    223761: ("Temperature Fahrenheit", "Temperature F", "Routine Vital Signs", "\u00b0F", 1, 4),
}
CAREUNITS = ("Medical Intensive Care Unit (MICU)", "Medical Intensive Care Unit (MICU)",
             "Medical/Surgical Intensive Care Unit (MICU/SICU)", "Surgical Intensive Care Unit (SICU)",
             "Cardiac Vascular Intensive Care Unit (CVICU)", "Coronary Care Unit (CCU)", "Trauma SICU (TSICU)")


def d_items_rows() -> list[dict]:
    return [{"itemid": k, "label": v[0], "abbreviation": v[1], "linksto": "chartevents", "category": v[2],
             "unitname": v[3], "param_type": "Numeric", "lownormalvalue": None, "highnormalvalue": None}
            for k, v in sorted(VITAL_ITEMS.items())]


def icu_stay(rng, *, hadm: int, admit: datetime, disch: datetime, z: float, phys: Physiology,
             devices: tuple[str, ...], died: bool, truth: dict[str, int]) -> dict | None:
    """An ICU stay inside the admission (always when intubated) with hourly vitals, or None."""
    lt = phys.latent
    if "ett" not in devices and rng.random() >= sigmoid(-2.6 + 0.9 * z + 0.7 * lt.shock + 0.5 * lt.resp):
        return None
    span = (disch - admit).total_seconds()
    intime = admit + timedelta(seconds=float(rng.uniform(0.02, 0.15)) * span)
    left = (disch - intime).total_seconds()
    stay = left if died else min(left - 3600.0, float(rng.lognormal(math.log(2.2 * 86400), 0.6)))
    outtime = intime + timedelta(seconds=max(stay, 0.2 * left))
    intime, outtime = intime.replace(microsecond=0), outtime.replace(microsecond=0)
    unit = str(rng.choice(CAREUNITS))
    last = unit if rng.random() < 0.9 else str(rng.choice(CAREUNITS))
    return {"hadm_id": hadm, "first_careunit": unit, "last_careunit": last, "intime": fmt_time(intime),
            "outtime": fmt_time(outtime), "los": (outtime - intime).total_seconds() / 86400,
            "_vitals": _vitals(rng, intime, outtime, z, lt, truth)}


def _vitals(rng, intime: datetime, outtime: datetime, z: float, lt: Latent, truth: dict[str, int]) -> dict:
    """Hourly charted vital signs as arrays (charttime/storetime as epoch seconds); formatted when written."""
    hours = max(1, int((outtime - intime).total_seconds() // 3600))
    base = np.datetime64(intime.replace(minute=0, second=0), "s").astype(np.int64) + 3600   # [1]
    zp, pna = max(z, 0.0), truth.get("Pneumonia", 0) or truth.get("Consolidation", 0)
    mean = {220045: 82 + 6 * zp + 9 * lt.shock + 4 * lt.resp, 220179: 122 - 11 * lt.shock - 3 * zp,
            220180: 70 - 7 * lt.shock, 220210: 18 + 3.5 * lt.resp + zp, 220277: 97 - 2.2 * max(lt.resp, 0) - 0.5 * zp,
            223761: 98.4 + 1.3 * pna + 0.3 * lt.shock}
    sd = {220045: 8, 220179: 12, 220180: 8, 220210: 3, 220277: 1.5, 223761: 0.6}
    lo_hi = {220045: (30, 200), 220179: (60, 220), 220180: (30, 130), 220210: (6, 50), 220277: (70, 100),
             223761: (93.0, 106.0)}
    caregivers = rng.integers(10_000, 99_999, size=3)
    end = np.datetime64(outtime, "s").astype(np.int64)
    parts = []
    for itemid, (_, _, _, _, dec, every) in VITAL_ITEMS.items():
        slots = np.arange(0, hours, every)                                # [n]
        keep = slots[rng.random(len(slots)) > 0.05]                       # a few readings not charted
        chart = base + keep * 3600 + rng.integers(0, 15, len(keep)) * 60
        keep, chart = keep[chart < end], chart[chart < end]                 # charted inside the stay only
        value = np.clip(mean[itemid] + sd[itemid] * rng.standard_normal(len(keep)), *lo_hi[itemid])
        parts.append({"itemid": np.full(len(keep), itemid), "charttime": chart,
                      "storetime": chart + rng.integers(1, 90, len(keep)) * 60,
                      "valuenum": np.round(value, dec), "caregiver_id": rng.choice(caregivers, len(keep)),
                      "warning": (rng.random(len(keep)) < 0.005).astype(np.int64)})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ----------------------------------------------------------------------------------------------------
# Real MIMIC-IV quirks, planted after the encounters are drawn (docs/synthetic-data.md, "Linkage cases").
#
# Each patient draws them from a stream of its own, `default_rng([seed, 6, i])`, and new hadm_ids come from
# `[seed, 7]`: the films, reports, labels and splits stay byte-identical to a generator without them.

SPLIT_RATE = 0.04         # ED admissions (without an ICU stay) split into an observation stay + an admission
EDREG_AFTER_RATE = 0.3    # direct admissions given an ED registration after admittime
DEATH_DAY_RATE = 0.3      # in-hospital deaths discharged at 00:00/00:01 (always when a film was taken that day)
AFTER_DEATH_RATE = 0.03   # surviving patients given a dod before their last film (when it can be)
DUPLICATE_RATE = 0.08     # planted usable lab rows repeated at the same charttime with a smaller value
MASKED_RATE = (0.005, 0.05)   # `___` value with a numeric valuenum: any numeric row / a planted usable row


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S")


def plant_quirks(records: list, seed: int) -> None:
    """Plant the quirks of real MIMIC-IV in every patient record (after hadm_ids are assigned).

    A record (radalign.data.synth.generate.PatientRecord) has `row` (patients), `admissions`, `labs`, `stays` and `studies` (each
    with `when` and `hadm`); study-level cases go to `record.cases` as (case, study index, expected hadm_id),
    lab-level ones to the row's `_case`/`_study`/`_eligible` (a new row) or `_also` (a second case of a row).
    """
    taken = {a["hadm_id"] for r in records for a in r.admissions}
    id_rng = np.random.default_rng([seed, 7])

    def new_hadm() -> int:
        while True:
            hadm = int(id_rng.integers(20_000_000, 30_000_000))
            if hadm not in taken:
                taken.add(hadm)
                return hadm

    for i, rec in enumerate(records):
        rng = np.random.default_rng([seed, 6, i])
        _split_admissions(rec, rng, new_hadm)
        _edreg_after_admittime(rec, rng)
        _death_day_discharge(rec, rng)
        _dod_before_last_film(rec, rng)
        _duplicate_draws(rec, rng)
        _masked_values(rec, rng)


def _films(rec, hadm: int) -> list[tuple[datetime, int]]:
    return sorted((s.when, k) for k, s in enumerate(rec.studies) if s.hadm == hadm)


def _split_admissions(rec, rng, new_hadm) -> None:
    """An ED observation stay ended by an admission a minute later, both with the ED visit's edregtime and
    hadm_ids in no time order (real: subject 10002930). Its films link to the stay up to its dischtime (an ED
    film before admittime to the stay too: the earlier admittime), later ones to the admission."""
    with_icu = {st["hadm_id"] for st in rec.stays}
    for a in list(rec.admissions):
        if not a["edregtime"] or a["hadm_id"] in with_icu or rng.random() >= SPLIT_RATE:
            continue
        admit, disch = parse_time(a["admittime"]), parse_time(a["dischtime"])
        after = [w for w, _ in _films(rec, a["hadm_id"]) if w >= admit]
        end = ((after[0] if after else admit) + timedelta(hours=float(rng.uniform(0.2, 4)))).replace(
            second=0, microsecond=0)
        if end >= disch - timedelta(hours=2):
            continue
        first, second = a["hadm_id"], new_hadm()
        rec.admissions.append(dict(a, hadm_id=second, admittime=fmt_time(end + timedelta(minutes=1))))
        a.update(dischtime=fmt_time(end), deathtime="", hospital_expire_flag=0, discharge_location="",
                 admission_type="EU OBSERVATION")
        for lab in rec.labs:
            if lab["hadm_id"] == first and parse_time(lab["charttime"]) > end:
                lab["hadm_id"] = second
        for when, k in _films(rec, first):
            rec.studies[k].hadm = first if when <= end else second
            rec.cases.append(("overlapping_admissions", k, rec.studies[k].hadm))


def _edreg_after_admittime(rec, rng) -> None:
    """A direct admission whose ED registration is recorded after admittime (real: subject 10019003): the
    films between admittime and edregtime belong to the admission."""
    for a in rec.admissions:
        if a["edregtime"] or rng.random() >= EDREG_AFTER_RATE:
            continue
        admit, disch = parse_time(a["admittime"]), parse_time(a["dischtime"])
        films = _films(rec, a["hadm_id"])
        if not films:
            continue
        edreg = (films[0][0] + timedelta(hours=float(rng.uniform(0.5, 12)))).replace(second=0, microsecond=0)
        if edreg >= disch:
            continue
        a.update(edregtime=fmt_time(edreg),
                 edouttime=fmt_time(min(disch, edreg + timedelta(hours=float(rng.uniform(1, 4))))))
        rec.cases += [("edreg_after_admittime", k, a["hadm_id"]) for w, k in films if admit <= w < edreg]


def _death_day_discharge(rec, rng) -> None:
    """An in-hospital death discharged at 00:00 or 00:01 of the death day, deathtime later that day (real:
    four in the MIMIC-IV demo). Films of that morning belong to the admission."""
    for a in rec.admissions:
        if not a["deathtime"]:
            continue
        admit, death = parse_time(a["admittime"]), parse_time(a["deathtime"])
        midnight = death.replace(hour=0, minute=0, second=0) + timedelta(minutes=int(rng.integers(0, 2)))
        films = [(w, k) for w, k in _films(rec, a["hadm_id"]) if midnight < w <= death]
        if midnight <= admit or death <= midnight or (not films and rng.random() >= DEATH_DAY_RATE):
            continue
        a["dischtime"] = fmt_time(midnight)
        rec.cases += [("death_day_discharge", k, a["hadm_id"]) for _, k in films]


def _dod_before_last_film(rec, rng) -> None:
    """A patient whose dod precedes the last encounter's films by 1-3 days (real MIMIC-IV has films dated after
    the death date); only when the earlier films are over 30 days before it, so that no 30-day outcome turns
    into a death the films cannot show. The films on a death date are listed too (a death on day 0 counts)."""
    if not rec.row.get("dod") and rng.random() < AFTER_DEATH_RATE:
        days = sorted({s.when.date() for s in rec.studies})
        dod = days[-1] - timedelta(days=int(rng.integers(1, 4)))
        if len(days) >= 2 and (dod - days[-2]).days > 30:
            rec.row["dod"] = dod.isoformat()
    dod = rec.row.get("dod")
    for k, s in enumerate(rec.studies):
        day = s.when.date().isoformat()
        if dod and day > dod:
            rec.cases.append(("film_after_death", k, None))
        elif dod and day == dod:
            rec.cases.append(("death_on_film_date", k, None))


def _latest_before(labs: list[dict], lab: dict, t0: datetime) -> bool:
    """Whether `lab` is the only row of its item drawn in [its charttime, t0) (so it alone decides the value)."""
    chart = parse_time(lab["charttime"])
    return not any(o is not lab and o["itemid"] == lab["itemid"] and chart <= parse_time(o["charttime"]) < t0
                   for o in labs)


def _value(itemid: int, num: float) -> dict:
    _, _, _, _, lo, hi, dec = LAB_ITEMS[itemid]
    return {"value": f"{num:.{dec}f}" if dec else str(int(num)), "valuenum": num,
            "flag": "abnormal" if (num < lo or num > hi) else ""}


def _duplicate_draws(rec, rng) -> None:
    """A usable lab result repeated at the same charttime (another specimen) with a *smaller* value, stored
    later: by the film (it wins the tie: the later stored) or after it (not yet resulted: the first stands)."""
    for lab in list(rec.labs):
        if lab.get("_eligible") != 1 or lab["valuenum"] is None or not lab["storetime"] \
                or rng.random() >= DUPLICATE_RATE:
            continue
        t0, stored = rec.studies[lab["_study"]].when, parse_time(lab["storetime"])
        dec = LAB_ITEMS[lab["itemid"]][6]
        num = round(min(lab["valuenum"] * (1 - rng.uniform(0.03, 0.2)), lab["valuenum"] - 10.0 ** -dec), dec)
        room = int((t0 - stored).total_seconds() // 60)            # whole minutes from storetime to the film
        if num <= 0 or not _latest_before(rec.labs, lab, t0):
            continue
        late = room < 1 or rng.random() < 0.3
        store = (t0.replace(second=0, microsecond=0) + timedelta(minutes=int(rng.integers(1, 30))) if late
                 else stored + timedelta(minutes=int(rng.integers(1, room + 1))))
        dup = {k: v for k, v in lab.items() if k != "_also"}
        dup.update(_value(lab["itemid"], float(num)), specimen_id=int(rng.integers(10_000_000, 99_999_999)),
                   storetime=fmt_time(store), _case="duplicate_charttime", _eligible=int(not late))
        rec.labs.append(dup)


def _masked_values(rec, rng) -> None:
    """`value` removed as `___` while `valuenum` keeps the number (real MIMIC-IV): the number is usable."""
    for lab in rec.labs:
        planted = lab.get("_eligible") == 1
        if lab["valuenum"] is None or rng.random() >= MASKED_RATE[planted]:
            continue
        lab["value"] = "___"
        if planted and _latest_before(rec.labs, lab, rec.studies[lab["_study"]].when):
            lab["_also"] = "masked_value_numeric"


# ----------------------------------------------------------------------------------------------------
# The truth-level table: how much each modality can tell about the outcomes (issue 11)

TRUTH_WINDOW_HOURS = 24.0
OUTCOMES = ("in_hospital_mortality", "mortality_30d")
LAB_NAMES = {50912: "creatinine", 51301: "white_blood_cells", 51222: "hemoglobin", 51265: "platelets",
             50983: "sodium", 50971: "potassium", 51006: "urea_nitrogen", 50882: "bicarbonate", 50931: "glucose",
             50813: "lactate", 50963: "ntprobnp", 51003: "troponin_t", 50889: "crp"}


def _study_times(root) -> pd.DataFrame:
    """One row per study: subject_id, study_id, split, t0 (StudyDate + StudyTime, milliseconds kept)."""
    jpg = Path(root) / "mimic-cxr-jpg"
    meta = pd.read_csv(jpg / "mimic-cxr-2.0.0-metadata.csv.gz", dtype={"StudyTime": str})
    split = pd.read_csv(jpg / "mimic-cxr-2.0.0-split.csv.gz")
    meta = meta.merge(split[["dicom_id", "split"]], on="dicom_id").drop_duplicates("study_id")
    hhmmss = meta["StudyTime"].astype(float)
    secs = (hhmmss // 10000) * 3600 + (hhmmss // 100 % 100) * 60 + (hhmmss % 100)
    t0 = pd.to_datetime(meta["StudyDate"].astype(str), format="%Y%m%d") + pd.to_timedelta(secs.round(3), unit="s")
    out = meta[["subject_id", "study_id", "split"]].assign(t0=t0.to_numpy())
    return out.sort_values(["subject_id", "t0"]).reset_index(drop=True)


def linked_studies(root, window_hours: float = TRUTH_WINDOW_HOURS) -> pd.DataFrame:
    """A plain-pandas reference of the linkage rule (issue 10) on a synthetic set, one row per study.

    Admission: among those whose span [min(edregtime, admittime), max(dischtime, deathtime)] contains t0, the
    latest already admitted (admittime <= t0), else the earliest admittime.
    Lab `{name}`: valuenum of the latest event (outpatient ones included) with storetime <= t0 (charttime
    when storetime is blank) and charttime in [t0 - window, t0); ties on charttime go to the later
    storetime, then the larger labevent_id; non-numeric valuenum is skipped. `{name}_hours`: t0 - charttime.
    Outcomes: in_hospital_mortality (null without an admission), los_days, mortality_30d (dod within 30
    days of t0's date; 0 when blank; null for subjects absent from patients and for films dated after the
    dod). Age from patients.
    """
    hosp = Path(root) / "mimic-iv" / "hosp"
    st = _study_times(root)
    times = ["admittime", "dischtime", "deathtime", "edregtime"]
    adm = pd.read_csv(hosp / "admissions.csv.gz", usecols=["subject_id", "hadm_id", *times, "hospital_expire_flag"],
                      parse_dates=times)
    adm["start"], adm["end"] = adm[["edregtime", "admittime"]].min(axis=1), adm[["dischtime", "deathtime"]].max(axis=1)
    pair = st[["study_id", "subject_id", "t0"]].merge(adm, on="subject_id")
    pair = pair[(pair["start"] <= pair["t0"]) & (pair["t0"] <= pair["end"])].copy()
    pair["admitted"] = pair["admittime"] <= pair["t0"]
    ns = pair["admittime"].astype("int64")
    pair["order"] = np.where(pair["admitted"], ns, -ns)          # kept last: the latest admitted, else the earliest
    pair = pair.sort_values(["study_id", "admitted", "order", "hadm_id"]).drop_duplicates("study_id", keep="last")
    pair["los_days"] = (pair["dischtime"] - pair["admittime"]).dt.total_seconds() / 86400
    out = st.merge(pair[["study_id", "hadm_id", "hospital_expire_flag", "los_days"]], on="study_id", how="left")
    out = out.rename(columns={"hospital_expire_flag": "in_hospital_mortality"})
    pats = pd.read_csv(hosp / "patients.csv.gz", usecols=["subject_id", "anchor_age", "anchor_year", "dod"],
                       parse_dates=["dod"])
    out = out.merge(pats, on="subject_id", how="left")
    out["age"] = out["anchor_age"] + out["t0"].dt.year - out["anchor_year"]
    days = (out["dod"] - out["t0"].dt.normalize()).dt.days
    known = out["anchor_age"].notna()
    out["mortality_30d"] = np.where(known & ~(days < 0), (days.notna() & (days <= 30)).astype(float), np.nan)
    out = out.drop(columns=["anchor_age", "anchor_year", "dod"])
    return out.merge(_lab_features(hosp, st, window_hours), on="study_id", how="left")


def _lab_features(hosp: Path, st: pd.DataFrame, window_hours: float) -> pd.DataFrame:
    labs = pd.read_csv(hosp / "labevents.csv.gz", usecols=["labevent_id", "subject_id", "itemid", "charttime",
                                                          "storetime", "valuenum"],
                       parse_dates=["charttime", "storetime"])
    labs["valuenum"] = pd.to_numeric(labs["valuenum"], errors="coerce")
    labs = labs[labs["valuenum"].notna() & labs["itemid"].isin(list(LAB_NAMES))]
    labs["storetime"] = labs["storetime"].fillna(labs["charttime"])
    pair = st[["study_id", "subject_id", "t0"]].merge(labs, on="subject_id")
    lo = pair["t0"] - pd.Timedelta(hours=window_hours)
    pair = pair[(pair["storetime"] <= pair["t0"]) & (pair["charttime"] >= lo) & (pair["charttime"] < pair["t0"])]
    pair = pair.sort_values(["study_id", "itemid", "charttime", "storetime", "labevent_id"])
    last = pair.drop_duplicates(["study_id", "itemid"], keep="last").copy()
    last["hours"] = (last["t0"] - last["charttime"]).dt.total_seconds() / 3600
    last["name"] = last["itemid"].map(LAB_NAMES)
    wide = last.pivot(index="study_id", columns="name", values=["valuenum", "hours"])
    cols = {}
    for name in LAB_NAMES.values():
        cols[name] = wide["valuenum"][name] if name in wide["valuenum"] else np.nan
        cols[f"{name}_hours"] = wide["hours"][name] if name in wide["hours"] else np.nan
    return pd.DataFrame(cols, index=wide.index).reset_index()


def _study_findings(root) -> pd.DataFrame:
    """Per study, everything the film shows (ground truth): findings, sides, severities, devices."""
    gt = pd.read_csv(Path(root) / "ground_truth.csv.gz", keep_default_na=False, na_values=[""])
    gt = gt[gt["view"] != "LATERAL"].drop_duplicates("study_id")
    out = gt[["study_id"]].copy()
    for col in gt.columns:
        if col in ("dicom_id", "study_id", "subject_id", "view", "devices"):
            continue
        if col.endswith(" side"):
            out[col.replace(" side", " bilateral")] = (gt[col] == "bilateral").astype(float)
        else:
            out[col] = pd.to_numeric(gt[col], errors="coerce").fillna(0.0)
    devices = gt["devices"].fillna("").astype(str)
    for d in DEVICES:
        out[f"device {d}"] = devices.str.split(";").map(lambda ds, d=d: d in ds).astype(float)
    return out


@dataclass
class TruthTable:
    """AUROC on the test split of a gradient-boosted model trained on the train split, per feature set."""

    rows: list[dict]                                  # outcome, n_train, events_train, n_test, events_test, ...

    def markdown(self) -> str:
        head = ("| outcome | train studies (events) | test studies (events) | test patients | findings | "
                "labs + age | both |\n|---|---|---|---|---|---|---|")
        lines = [head]
        for r in self.rows:
            lines.append(f"| {r['outcome']} | {r['n_train']} ({r['events_train']}) | {r['n_test']} "
                         f"({r['events_test']}) | {r['patients_test']} | {r['findings']:.3f} | "
                         f"{r['labs']:.3f} | {r['both']:.3f} |")
        return "\n".join(lines)


def truth_table(root, *, window_hours: float = TRUTH_WINDOW_HOURS, seed: int = 0,
                split: str = "test") -> TruthTable:
    """Findings (image upper bound) vs labs + age vs both, on the generator's own truth (docs/synthetic-data.md).

    One gradient-boosted model (scikit-learn's HistGradientBoostingClassifier, NaN as missing) per outcome
    and feature set, fitted on the train split's studies and scored (AUROC, unit: study) on `split`.
    """
    from threadpoolctl import threadpool_limits

    table = linked_studies(root, window_hours).merge(_study_findings(root), on="study_id", how="left")
    finding_cols = _study_findings_columns(table)
    lab_cols = ["age", *LAB_NAMES.values(), *[f"{n}_hours" for n in LAB_NAMES.values()]]
    sets = {"findings": finding_cols, "labs": lab_cols, "both": finding_cols + lab_cols}
    with threadpool_limits(1):                        # OpenMP on shared cores is far slower than one thread
        return TruthTable([_truth_row(table, outcome, sets, seed, split) for outcome in OUTCOMES])


def _truth_row(table: pd.DataFrame, outcome: str, sets: dict[str, list[str]], seed: int, split: str) -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    data = table[table[outcome].notna()]
    held_out = [x.strip() for x in split.split(",")]  # "validate,test": more events, same rule
    train, test = data[data["split"] == "train"], data[data["split"].isin(held_out)]
    row = {"outcome": outcome, "n_train": len(train), "events_train": int(train[outcome].sum()),
           "n_test": len(test), "events_test": int(test[outcome].sum()),
           "patients_test": int(test["subject_id"].nunique())}
    for name, cols in sets.items():
        model = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.05, max_leaf_nodes=15,
                                               min_samples_leaf=20, l2_regularization=1.0,
                                               early_stopping=False, random_state=seed)
        model.fit(train[cols].to_numpy(float), train[outcome].to_numpy(int))
        row[name] = float(roc_auc_score(test[outcome].to_numpy(int),
                                        model.predict_proba(test[cols].to_numpy(float))[:, 1]))
    return row


def _study_findings_columns(table: pd.DataFrame) -> list[str]:
    skip = {"subject_id", "study_id", "split", "t0", "hadm_id", "los_days", "age", *OUTCOMES}
    labs = {*LAB_NAMES.values(), *[f"{n}_hours" for n in LAB_NAMES.values()]}
    return [c for c in table.columns if c not in skip and c not in labs]

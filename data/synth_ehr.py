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

import numpy as np

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
DISCHARGE = ("HOME", "HOME HEALTH CARE", "SKILLED NURSING FACILITY", "REHAB", "")


def fmt_time(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S")


def provider_id(rng: np.random.Generator) -> str:
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return "P" + "".join(alphabet[i] for i in rng.integers(0, len(alphabet), 5))


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


@dataclass
class Physiology:
    """An encounter's latent lab levels (measured or not); outcomes depend on them too."""

    values: dict[int, float]

    @classmethod
    def sample(cls, rng, *, z: float, age: int, female: bool, truth: dict[str, int]) -> Physiology:
        pna = truth.get("Pneumonia", 0) or truth.get("Consolidation", 0)
        edema, card = truth.get("Edema", 0), truth.get("Cardiomegaly", 0)
        zp = max(z, 0.0)
        n = rng.standard_normal(13)
        creat = math.exp(math.log(0.95) + 0.15 * zp + 0.006 * (age - 60) + 0.3 * edema - 0.15 * female + 0.3 * n[0])
        v = {
            50912: creat,
            51006: creat * 15.0 * math.exp(0.25 * n[1]),
            51301: math.exp(math.log(7.5) + 0.55 * pna + 0.12 * zp + 0.25 * n[2]),
            50889: min(300.0, math.exp(math.log(4.0) + 2.8 * pna + 0.4 * zp + 0.8 * n[3])),
            51222: 14.2 - 0.8 * zp - 1.2 * female + 1.3 * n[4],
            51265: math.exp(math.log(240.0) - 0.1 * zp + 0.3 * n[5]),
            50983: 139.0 - 1.5 * edema + 3.0 * n[6],
            50971: 4.2 + 0.15 * (creat > 2) + 0.45 * n[7],
            50882: 25.5 - 1.5 * zp + 3.0 * n[8],
            50931: math.exp(math.log(110.0) + 0.1 * zp + 0.25 * n[9]),
            50813: math.exp(math.log(1.3) + 0.35 * zp + 0.3 * pna + 0.35 * n[10]),
            50963: min(70000.0, math.exp(math.log(150.0) + 2.6 * edema + 1.8 * card + 0.02 * (age - 60) + 0.8 * n[11])),
            51003: math.exp(math.log(0.006) + 0.8 * zp + 1.0 * edema + 1.0 * n[12]),
        }
        return cls(v)


def outcome(rng, *, z: float, age: int, truth: dict[str, int], phys: Physiology) -> tuple[float, bool]:
    """Length of stay (days) and in-hospital death, from findings, labs and age together."""
    f = truth
    lact, creat = phys.values[50813], phys.values[50912]
    risk = (-5.4 + 0.045 * (age - 65) + 0.6 * max(z, 0) + 0.9 * f.get("Edema", 0) + 0.7 * f.get("Pneumonia", 0)
            + 0.4 * f.get("Pleural Effusion", 0) + 0.9 * math.log(lact / 1.3) + 0.5 * math.log(creat))
    died = bool(rng.random() < sigmoid(risk))
    mu = (math.log(2.5) + 0.25 * max(z, 0) + 0.35 * f.get("Pneumonia", 0) + 0.3 * f.get("Edema", 0)
          + 0.2 * math.log(max(creat, 0.3)) + 0.005 * (age - 65))
    los = min(45.0, math.exp(mu + 0.5 * rng.standard_normal()))
    return max(0.3, los), died


def _lab_row(rng, itemid: int, value: float, *, subject_id: int, hadm: int | None, when: datetime,
             specimen: int, priority: str) -> dict:
    label, _, _, uom, lo, hi, dec = LAB_ITEMS[itemid]
    row = {"subject_id": subject_id, "hadm_id": hadm, "specimen_id": specimen, "itemid": itemid,
           "order_provider_id": provider_id(rng) if rng.random() < 0.5 else "",
           "charttime": fmt_time(when),
           "storetime": fmt_time(when + timedelta(minutes=int(rng.integers(20, 240)))),
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
    if rng.random() < sigmoid(-2.2 + 1.5 * z):
        items.append(50813)
    if first:
        suspect_hf = truth.get("Edema", 0) or truth.get("Cardiomegaly", 0)
        if rng.random() < (0.6 if suspect_hf else 0.06):
            items.append(50963)
        if rng.random() < 0.35:
            items.append(51003)
        if rng.random() < 0.12 + 0.5 * (truth.get("Pneumonia", 0) or truth.get("Consolidation", 0)):
            items.append(50889)
    rows = []
    specimen = {"chem": int(rng.integers(10_000_000, 99_999_999)), "heme": int(rng.integers(10_000_000, 99_999_999))}
    for itemid in items:
        drift = math.exp(0.08 * rng.standard_normal())                      # day-to-day variation
        spec = specimen["heme" if itemid in CBC else "chem"]
        rows.append(_lab_row(rng, itemid, phys.values[itemid] * drift, subject_id=subject_id, hadm=hadm,
                             when=when, specimen=spec, priority=priority))
    return rows


def d_labitems_rows() -> list[dict]:
    return [{"itemid": k, "label": v[0], "fluid": v[1], "category": v[2]} for k, v in sorted(LAB_ITEMS.items())]

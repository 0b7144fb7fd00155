"""`radalign data link-ehr` (data/ehr.py): the as-of rule on hand-made MIMIC-IV folders with planted cases,
the generator's output against an independent pandas implementation, bad input, re-runs and the cache.

The hand-made folders use the real MIMIC-IV column lists; every expected value below is worked out by hand
from the rows written in `planted` (times are on one synthetic day, t0 = 2152-03-10 12:00:00).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import subprocess
import sys
import tarfile
import textwrap
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from radalign.data.ehr import MANIFEST_FORMAT, link_ehr, read_ehr
from radalign.data.labels import CHEXPERT_LABELS

from radalign import RadalignError

PATIENT_COLS = ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"]
ADMISSION_COLS = ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                  "admit_provider_id", "admission_location", "discharge_location", "insurance", "language",
                  "marital_status", "race", "edregtime", "edouttime", "hospital_expire_flag"]
LAB_COLS = ["labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "order_provider_id", "charttime",
            "storetime", "value", "valuenum", "valueuom", "ref_range_lower", "ref_range_upper", "flag", "priority",
            "comments"]
CHART_COLS = ["subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime", "storetime", "itemid", "value",
              "valuenum", "valueuom", "warning"]
D_LAB = {50912: "Creatinine", 51301: "White Blood Cells", 51222: "Hemoglobin", 51265: "Platelet Count",
         50983: "Sodium", 50971: "Potassium", 51006: "Urea Nitrogen", 50882: "Bicarbonate", 50931: "Glucose",
         50813: "Lactate", 50963: "NTproBNP", 51003: "Troponin T", 50889: "C-Reactive Protein"}
T0 = datetime(2152, 3, 10, 12, 0, 0)
A, B, C, D, E, F = 10000001, 10000002, 10000003, 10000004, 10000005, 10000006  # subjects


def ts(t: datetime | None) -> str:
    return "" if t is None else t.strftime("%Y-%m-%d %H:%M:%S")


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def write_csv_gz(path: Path, rows: list[dict], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows, columns=columns)
    with gzip.open(path, "wt", newline="") as f:
        frame.to_csv(f, index=False)


def lab(subject, itemid, drawn, stored, valuenum, hadm=None, value=None) -> dict:
    return {"labevent_id": 0, "subject_id": subject, "hadm_id": hadm, "specimen_id": 1, "itemid": itemid,
            "order_provider_id": "", "charttime": ts(drawn), "storetime": ts(stored),
            "value": value if value is not None else valuenum, "valuenum": valuenum, "valueuom": "",
            "ref_range_lower": "", "ref_range_upper": "", "flag": "", "priority": "STAT", "comments": ""}


def admission(subject, hadm, admit, disch, *, edreg=None, died=0, race="WHITE", insurance="Medicare",
              death=None) -> dict:
    return {"subject_id": subject, "hadm_id": hadm, "admittime": ts(admit), "dischtime": ts(disch),
            "deathtime": ts(death or disch) if died else "", "admission_type": "EW EMER.", "admit_provider_id": "P1",
            "admission_location": "EMERGENCY ROOM", "discharge_location": "DIED" if died else "HOME",
            "insurance": insurance, "language": "ENGLISH", "marital_status": "MARRIED", "race": race,
            "edregtime": ts(edreg), "edouttime": ts(admit) if edreg else "", "hospital_expire_flag": died}


def patient(subject, age, year, dod="", gender="F") -> dict:
    return {"subject_id": subject, "gender": gender, "anchor_age": age, "anchor_year": year,
            "anchor_year_group": "2014 - 2016", "dod": dod}


def write_shards(root: Path, images: list[dict]) -> Path:
    """A minimal `data prepare` output: manifest.json + one tar per split with the json members (and stubs)."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split in ("train", "validate", "test"):
        mine = [im for im in images if im["split"] == split]
        shards = []
        if mine:
            rel = f"{split}/shard-000000.tar"
            (root / split).mkdir(exist_ok=True)
            with tarfile.open(root / rel, "w") as tar:
                for im in mine:
                    for ext, data in (("jpg", b"\xff\xd8stub"), ("txt", b"report"),
                                      ("json", json.dumps(im).encode())):
                        info = tarfile.TarInfo(f"{im['dicom_id']}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            shards.append({"path": rel, "samples": len(mine), "sha256": ""})
        splits[split] = {"samples": len(mine), "shards": shards}
    (root / "manifest.json").write_text(json.dumps({"format": "radalign-shards/1", "splits": splits}))
    return root


def image(subject, study, dicom, split, when, view="PA", labels=None, indication=None) -> dict:
    lab_values = {n: None for n in CHEXPERT_LABELS}
    lab_values.update(labels or {})
    return {"subject_id": subject, "study_id": study, "dicom_id": dicom, "split": split, "view": view,
            "study_datetime": when.isoformat(timespec="milliseconds") if when else None, "labels": lab_values,
            "sections": {"findings": "x", "impression": "y", "last_paragraph": "y", "indication": indication}}


@pytest.fixture()
def planted(tmp_path) -> tuple[Path, Path]:
    """MIMIC-IV hosp (+ icu) and shards with every planted case of issue 10."""
    hosp = tmp_path / "mimic-iv" / "hosp"
    write_csv_gz(hosp / "patients.csv.gz", [
        patient(A, 60, 2150, dod=(T0 + timedelta(days=3)).strftime("%Y-%m-%d")),
        patient(B, 45, 2152), patient(D, 30, 2140), patient(E, 70, 2151),
        patient(F, 50, 2152, dod=(T0 + timedelta(days=40)).strftime("%Y-%m-%d"), gender="M"),
    ], PATIENT_COLS)                                       # C is absent from patients
    write_csv_gz(hosp / "admissions.csv.gz", [
        # A: ED film: edregtime 10:00 < t0 12:00 < admittime 14:00; died; LOS from admittime = 3.5 days
        admission(A, 20000001, h(2), h(2 + 84), edreg=h(-2), died=1),
        # B: only a past admission (demographics come from it) and a future one (never used)
        admission(B, 20000002, h(-24 * 400), h(-24 * 395), race="ASIAN", insurance="Medicaid"),
        admission(B, 20000003, h(24 * 5), h(24 * 9), race="FUTURE", insurance="FUTURE"),
        # E: two admissions contain t0, both admitted by then; the latest admitted (20000005) wins
        admission(E, 20000004, h(-48), h(48), race="OLDER"),
        admission(E, 20000005, h(-6), h(24), race="LATER", died=0),
        # C (absent from patients) has an admission containing t0
        admission(C, 20000006, h(-1), h(30)),
    ], ADMISSION_COLS)
    labs = [
        lab(A, 50912, h(-1), h(-1) + timedelta(minutes=40), 1.1),           # creatinine: available -> used
        lab(A, 50912, h(-0.5), h(0) + timedelta(minutes=1), 9.9),           # resulted 1 min after t0 -> never
        lab(A, 50983, h(-24) + timedelta(minutes=1), h(-23), 140),        # sodium just inside the window
        lab(A, 50971, h(-24) - timedelta(minutes=1), h(-23), 4.4),        # potassium just outside
        lab(A, 50931, h(-24), h(-23), 101),                               # glucose exactly t0-24h: inside
        lab(A, 50813, h(0), h(0), 2.5),                                   # lactate drawn at t0: outside [.., t0)
        lab(A, 51222, h(-2), None, 12.5),                                 # hemoglobin, blank storetime
        lab(B, 51301, h(-3), h(-2), 8.2),                                 # outpatient WBC (no hadm_id): used
        lab(B, 51222, h(-5), h(-4), 13.1),                                # hemoglobin numeric, older
        lab(B, 51222, h(-1), h(-0.5), "", value="___"),                   # ... newer but "___": skipped
        lab(B, 51265, h(-2), h(-1), "___", value="___"),                  # platelets: non-numeric valuenum
        lab(C, 50912, h(-2), h(-1), 2.0, hadm=20000006),                  # absent subject: value still linked
        lab(E, 50912, h(-3), h(-2), 0.8, hadm=20000005),
        lab(E, 50912, h(-3), h(-1.5), 0.9, hadm=20000005),               # same charttime, later storetime wins
        lab(99999999, 50912, h(-3), h(-2), 1.0),                          # subject in no table at all
    ]
    for i, row in enumerate(labs):
        row["labevent_id"] = i + 1
    write_csv_gz(hosp / "labevents.csv.gz", labs, LAB_COLS)
    write_csv_gz(hosp / "d_labitems.csv.gz", [{"itemid": k, "label": v, "fluid": "Blood", "category": "Chemistry"}
                                              for k, v in D_LAB.items()], ["itemid", "label", "fluid", "category"])
    shards = write_shards(tmp_path / "shards", [
        image(A, 50000001, "a-pa", "train", T0, labels={"Edema": 1.0, "Cardiomegaly": -1.0, "No Finding": 0.0},
              indication="Shortness of breath."),
        image(A, 50000001, "a-lat", "train", T0, view="LATERAL"),
        image(B, 50000002, "b-pa", "validate", T0),
        image(C, 50000003, "c-ap", "test", T0, view="AP"),
        image(D, 50000004, "d-pa", "train", None),                         # no study_datetime
        image(E, 50000005, "e-pa", "test", T0),
        image(F, 50000006, "f-pa", "train", T0),
    ])
    return tmp_path / "mimic-iv", shards


def run(planted, tmp_path, **kw) -> tuple[pd.DataFrame, dict]:
    mimic, shards = planted
    out = kw.pop("out", tmp_path / "ehr")
    manifest = link_ehr(mimic, shards, out, **kw)
    frame = read_ehr(out).set_index("subject_id")
    return frame, manifest


# ----------------------------------------------------------------------------------------------------------
# The rule, case by case.


def test_lab_resulted_after_t0_is_never_used_and_window_edges(planted, tmp_path):
    f, _ = run(planted, tmp_path)
    a = f.loc[A]
    assert a["creatinine"] == 1.1 and a["creatinine_hours"] == pytest.approx(1.0)   # not 9.9 (stored t0+1min)
    assert a["sodium"] == 140 and a["sodium_hours"] == pytest.approx(24 - 1 / 60)   # inside by one minute
    assert np.isnan(a["potassium"]) and np.isnan(a["potassium_hours"])             # outside by one minute
    assert a["glucose"] == 101 and a["glucose_hours"] == pytest.approx(24.0)        # [t0 - 24 h, ...
    assert np.isnan(a["lactate"])                                                  # ..., t0): drawn at t0
    assert a["hemoglobin"] == 12.5                                                 # blank storetime: charttime
    assert f.loc[E, "creatinine"] == 0.9                                           # tie: later storetime


def test_ed_film_before_admittime_links_and_outcomes(planted, tmp_path):
    f, _ = run(planted, tmp_path)
    a = f.loc[A]
    assert a["hadm_id"] == 20000001 and a["admittime"] == h(2) and a["dischtime"] == h(86)
    assert a["in_hospital_mortality"] == 1 and a["los_days"] == pytest.approx(3.5)
    assert a["mortality_30d"] == 1 and a["age"] == 62 and a["gender"] == "F"
    assert f.loc[E, "hadm_id"] == 20000005 and f.loc[E, "race"] == "LATER"          # latest admitted
    assert f.loc[F, "mortality_30d"] == 0 and f.loc[F, "age"] == 50                # dod 40 days later


def test_outpatient_labs_and_demographics_from_the_past_admission(planted, tmp_path):
    f, m = run(planted, tmp_path)
    b = f.loc[B]
    assert pd.isna(b["hadm_id"]) and pd.isna(b["in_hospital_mortality"]) and np.isnan(b["los_days"])
    assert b["white_blood_cells"] == 8.2 and b["white_blood_cells_hours"] == pytest.approx(3.0)
    assert b["hemoglobin"] == 13.1                     # the newer "___" is skipped, the older number is used
    assert np.isnan(b["platelets"])
    assert b["race"] == "ASIAN" and b["insurance"] == "Medicaid"     # past admission, never the future one
    assert b["mortality_30d"] == 0                                   # dod blank
    assert m["values_from_draws_without_hadm_id"]["white_blood_cells"] == 1


def test_absent_subject_and_study_without_datetime_get_nulls(planted, tmp_path):
    f, m = run(planted, tmp_path)
    c = f.loc[C]
    assert pd.isna(c["gender"]) and pd.isna(c["age"]) and pd.isna(c["mortality_30d"])
    assert c["hadm_id"] == 20000006 and c["creatinine"] == 2.0
    d = f.loc[D]
    assert pd.isna(d["study_datetime"]) and pd.isna(d["hadm_id"]) and pd.isna(d["gender"])
    assert d[[n for n in m["features"]] + list(m["outcomes"])].isna().all()


def test_manifest_counts_match_the_data(planted, tmp_path):
    f, m = run(planted, tmp_path)
    assert m["format"] == MANIFEST_FORMAT and len(f) == 6 == m["rows_written"]["ehr.parquet"]
    assert m["rows_written"]["finetune"] == {"train": 3, "validate": 1, "test": 2}
    assert m["studies_without_datetime"] == 1
    assert m["studies_no_admission"] == 2                                # B (outpatient) and F
    assert m["subjects_absent_from_patients"] == 1 and m["studies_of_subjects_absent_from_patients"] == 1
    assert m["rows_scanned"]["labevents"] == 15 and m["rows_scanned"]["patients"] == 5
    assert m["rows_scanned"]["admissions"] == 6 and m["shards"]["images"] == 7
    assert m["shards"]["non_frontal_images"] == 1
    assert m["skipped_events"]["creatinine"]["not_yet_resulted"] == 1    # the 9.9
    assert m["skipped_events"]["hemoglobin"]["non_numeric"] == 1
    assert m["skipped_events"]["platelets"]["non_numeric"] == 1
    assert m["labevents"]["rows_of_subjects_absent_from_patients"] == 2  # C's and 99999999's
    assert m["labevents"]["non_numeric_rows"]["hemoglobin"] == 1
    assert m["feature_coverage"]["creatinine"] == {"studies": 3, "fraction": round(3 / 5, 4)}
    assert m["feature_itemids"]["creatinine"] == 50912 and m["features"][0] == "creatinine"
    assert m["options"]["window_hours"] == 24.0 and m["inputs"]["labevents"]["bytes"] > 0


def test_window_option_changes_the_rule(planted, tmp_path):
    f, _ = run(planted, tmp_path, window_hours=0.75)
    assert np.isnan(f.loc[A, "creatinine"])                # drawn 1 h before: outside a 45-minute window
    assert f.loc[B, "white_blood_cells"] != f.loc[B, "white_blood_cells"]


# ----------------------------------------------------------------------------------------------------------
# The refined rule on the real MIMIC-IV cases (issue 18), and every as-of comparison at equality.

G, H, Q, J, J2, K, L, N = (10000011, 10000012, 10000013, 10000014, 10000015, 10000016, 10000017, 10000018)
M0, M30, M31, MNEG = 10000021, 10000022, 10000023, 10000024      # dod 0, 30, 31, -1 days from the film's date


def at(hhmm: str, day: int = 0) -> datetime:
    """A time on T0's day (+ `day` days): at("06:24"), at("11:44:30")."""
    return datetime.fromisoformat(f"2152-03-{10 + day:02d} {hhmm}")


@pytest.fixture()
def edges(tmp_path) -> tuple[Path, Path]:
    """A hand-made MIMIC-IV folder for the refined admission rule and the boundaries (expected values in the
    tests below are worked out by hand from these rows)."""
    hosp = tmp_path / "mimic-iv" / "hosp"
    day = lambda n: (T0 + timedelta(days=n)).strftime("%Y-%m-%d")  # noqa: E731
    write_csv_gz(hosp / "patients.csv.gz", [
        *[patient(s, 60, 2152) for s in (G, H, Q, K, L, N)],
        patient(J, 80, 2152, dod=day(0)), patient(J2, 81, 2152, dod=day(0)),
        patient(M0, 70, 2152, dod=day(0)), patient(M30, 70, 2152, dod=day(30)),
        patient(M31, 70, 2152, dod=day(31)), patient(MNEG, 70, 2152, dod=day(-1)),
    ], PATIENT_COLS)
    write_csv_gz(hosp / "admissions.csv.gz", [
        # G (real: subject 10002930): ED observation 06:18-11:44, admission from 11:45, one edregtime 05:04;
        # the later admission has the larger hadm_id. H: the same times, hadm_ids the other way round.
        admission(G, 22380825, at("06:18"), at("11:44"), edreg=at("05:04"), race="FIRST"),
        admission(G, 23688993, at("11:45"), at("09:30", 6), edreg=at("05:04"), race="SECOND"),
        admission(H, 29000001, at("06:18"), at("11:44"), edreg=at("05:04"), race="FIRST"),
        admission(H, 21000001, at("11:45"), at("09:30", 6), edreg=at("05:04"), race="SECOND"),
        # Q (real: subject 10019003): edregtime 21:03 after admittime 00:02 of the same day
        admission(Q, 26529390, at("00:02"), at("10:00", 3), edreg=at("21:03")),
        # J: died 15:00, discharged 00:00 that day; J2: discharged 00:01, died 06:30
        admission(J, 27000001, at("08:00", -3), at("00:00"), died=1, death=at("15:00")),
        admission(J2, 27000002, at("20:00", -2), at("00:01"), died=1, death=at("06:30")),
        # K: two admissions contain t0; the second was admitted exactly at t0 (it is the latest admitted)
        admission(K, 28000009, T0 - timedelta(hours=30), T0 + timedelta(hours=48), race="EARLIER"),
        admission(K, 28000001, T0, T0 + timedelta(hours=72), edreg=T0 - timedelta(hours=2), race="AT_T0"),
        # L: the ED registration exactly at t0, admitted 3 h later
        admission(L, 28000002, T0 + timedelta(hours=3), T0 + timedelta(days=4), edreg=T0),
    ], ADMISSION_COLS)
    labs = [
        lab(N, 50912, h(-5), h(-4), 1.2),                                  # creatinine: older value
        lab(N, 50912, h(-2), T0, 1.7),                                     # ... stored exactly at t0: used
        lab(N, 50983, h(-3), h(-2), 141),                                  # sodium tie on charttime: the later
        lab(N, 50983, h(-3), h(-1), 135),                                  # stored (the smaller value) wins
        lab(N, 50971, h(-3), h(-2), 4.1),                                  # potassium tie on charttime and
        lab(N, 50971, h(-3), h(-2), 3.9),                                  # storetime: the larger value
        lab(N, 50931, h(-3), h(-2), 120),                                  # glucose tie, the later stored one
        lab(N, 50931, h(-3), T0 + timedelta(seconds=1), 90),              # one second after t0: not yet
        lab(N, 51222, h(-1), h(-0.5), 11.2, value="___"),                  # hemoglobin `___`, valuenum 11.2
        lab(N, 51301, h(-24), h(-23), 9.1),                                # WBC drawn exactly t0 - 24 h
        lab(N, 51265, T0, T0, 300),                                        # platelets drawn at t0: not before
    ]
    for i, row in enumerate(labs):
        row["labevent_id"] = i + 1
    write_csv_gz(hosp / "labevents.csv.gz", labs, LAB_COLS)
    write_csv_gz(hosp / "d_labitems.csv.gz", [{"itemid": k, "label": v, "fluid": "Blood", "category": "Chemistry"}
                                              for k, v in D_LAB.items()], ["itemid", "label", "fluid", "category"])
    films = [(G, at("05:30")), (G, at("06:24")), (G, at("08:24")), (G, at("11:44")), (G, at("11:44:30")),
             (G, at("11:45")), (G, at("08:00", 2)),
             (H, at("05:30")), (H, at("06:24")), (H, at("08:24")), (H, at("11:44")), (H, at("11:44:30")),
             (H, at("11:45")), (H, at("08:00", 2)),
             (Q, at("00:01:59")), (Q, at("10:32")), (Q, at("21:03")),
             (J, at("09:00")), (J, at("15:00")), (J, at("15:00:01")), (J2, at("06:29")),
             (K, T0), (L, T0 - timedelta(seconds=1)), (L, T0), (N, T0),
             (M0, T0), (M30, T0), (M31, T0), (MNEG, T0)]
    shards = write_shards(tmp_path / "shards", [image(s, 60000000 + k, f"d{k}", "train", when)
                                                for k, (s, when) in enumerate(films)])
    return tmp_path / "mimic-iv", shards


def run_edges(edges, tmp_path) -> tuple[pd.DataFrame, dict]:
    manifest = link_ehr(*edges, tmp_path / "ehr")
    return read_ehr(tmp_path / "ehr").set_index(["subject_id", "study_datetime"]), manifest


@pytest.mark.parametrize("subject, first, second", [(G, 22380825, 23688993), (H, 29000001, 21000001)])
def test_overlapping_admissions_sharing_edregtime_link_the_one_admitted(edges, tmp_path, subject, first, second):
    """Films before the later admittime link to the earlier admission whatever the hadm_ids' order: an ED film
    before both admittimes to the earliest, one during the first to it (its own dischtime included)."""
    f, _ = run_edges(edges, tmp_path)
    expected = {at("05:30"): first, at("06:24"): first, at("08:24"): first, at("11:44"): first,
                at("11:44:30"): second, at("11:45"): second, at("08:00", 2): second}
    for when, hadm in expected.items():
        row = f.loc[(subject, when)]
        assert row["hadm_id"] == hadm, when
        assert row["race"] == ("FIRST" if hadm == first else "SECOND"), when          # demographics follow
    los_first = (at("11:44") - at("06:18")).total_seconds() / 86400                   # 0.23 days, not 5.9
    assert f.loc[(subject, at("06:24")), "los_days"] == pytest.approx(los_first)
    assert f.loc[(subject, at("05:30")), "admittime"] == at("06:18")


def test_edregtime_after_admittime_and_death_day_discharge_extend_the_span(edges, tmp_path):
    """The span runs from the earlier of edregtime and admittime to the later of dischtime and deathtime, both
    ends included: one second outside it there is no admission."""
    f, m = run_edges(edges, tmp_path)
    assert pd.isna(f.loc[(Q, at("00:01:59")), "hadm_id"])                              # before admittime 00:02
    for when in (at("10:32"), at("21:03")):
        assert f.loc[(Q, when), "hadm_id"] == 26529390
    assert f.loc[(Q, at("10:32")), "los_days"] == pytest.approx((at("10:00", 3) - at("00:02")).total_seconds()
                                                                 / 86400)
    for subject, when in ((J, at("09:00")), (J, at("15:00")), (J2, at("06:29"))):     # deathtime 15:00 / 06:30
        row = f.loc[(subject, when)]
        assert row["hadm_id"] in (27000001, 27000002) and row["in_hospital_mortality"] == 1, (subject, when)
        assert row["mortality_30d"] == 1
    assert f.loc[(J, at("09:00")), "los_days"] == pytest.approx(64 / 24)              # dischtime - admittime
    late = f.loc[(J, at("15:00:01"))]
    assert pd.isna(late["hadm_id"]) and pd.isna(late["in_hospital_mortality"]) and late["mortality_30d"] == 1
    assert m["rows_scanned"]["admissions_without_times"] == 0


def test_admission_boundaries_at_equality(edges, tmp_path):
    """admittime == t0 counts as admitted (K: the latest admitted wins over the earlier one, whose hadm_id is
    larger); edregtime == t0 starts the span (L), one second earlier does not."""
    f, _ = run_edges(edges, tmp_path)
    assert f.loc[(K, T0), "hadm_id"] == 28000001 and f.loc[(K, T0), "race"] == "AT_T0"
    assert f.loc[(K, T0), "los_days"] == pytest.approx(3.0)
    assert f.loc[(L, T0), "hadm_id"] == 28000002
    assert pd.isna(f.loc[(L, T0 - timedelta(seconds=1)), "hadm_id"])


def test_as_of_boundaries_at_equality_and_ties(edges, tmp_path):
    f, m = run_edges(edges, tmp_path)
    n = f.loc[(N, T0)]
    assert n["creatinine"] == 1.7 and n["creatinine_hours"] == pytest.approx(2.0)    # stored exactly at t0
    assert n["sodium"] == 135                         # same charttime: the later stored, although smaller
    assert n["potassium"] == 4.1                      # same charttime and storetime: the larger value
    assert n["glucose"] == 120                        # the later stored is one second after t0: not yet
    assert n["hemoglobin"] == 11.2                    # `___` in value, the number in valuenum: used
    assert n["white_blood_cells"] == 9.1 and n["white_blood_cells_hours"] == pytest.approx(24.0)
    assert np.isnan(n["platelets"])                   # drawn at t0: not before the film
    assert m["skipped_events"]["glucose"]["not_yet_resulted"] == 1
    assert m["skipped_events"]["creatinine"]["not_yet_resulted"] == 0


def test_mortality_horizon_boundaries_and_films_after_death(edges, tmp_path, caplog):
    """dod - date(t0): 0 (died the film's day) and 30 count, 31 does not, -1 (a film after the death date) is
    unknown: null, counted in the manifest and said in the log and the CLI summary."""
    from radalign.data.ehr_cli import summary

    with caplog.at_level("WARNING", logger="radalign.data.ehr"):
        f, m = run_edges(edges, tmp_path)
    assert f.loc[(M0, T0), "mortality_30d"] == 1 and f.loc[(M30, T0), "mortality_30d"] == 1
    assert f.loc[(M31, T0), "mortality_30d"] == 0 and pd.isna(f.loc[(MNEG, T0), "mortality_30d"])
    assert m["films_after_death"] == 1
    assert "1 film(s) dated after the patient's death date" in caplog.text and "mortality_30d" in caplog.text
    assert "films dated after the death date 1" in summary(m, tmp_path / "ehr")


def test_finetune_table_contract(planted, tmp_path):
    import datasets

    run(planted, tmp_path)
    dd = datasets.load_from_disk(str(tmp_path / "ehr" / "finetune"))
    assert set(dd) == {"train", "validate", "test"}
    ehr_cols = list(pd.read_parquet(tmp_path / "ehr" / "ehr.parquet").columns)
    assert dd["train"].column_names == ehr_cols + ["dicom_ids", *CHEXPERT_LABELS, "indication"]
    row = [r for r in dd["train"] if r["subject_id"] == A][0]
    assert row["dicom_ids"] == ["a-pa"]                                   # the lateral is left out
    assert row["Edema"] == 1.0 and row["Cardiomegaly"] == -1.0 and row["No Finding"] == 0.0
    assert row["Pneumonia"] is None and row["indication"] == "Shortness of breath."
    assert all(dd["train"].features[n].dtype == "float64" for n in CHEXPERT_LABELS)
    assert {r["subject_id"] for r in dd["test"]} == {C, E}


def test_vitals_from_chartevents_same_rule(planted, tmp_path):
    mimic, _ = planted
    rows = [{"subject_id": A, "hadm_id": 20000001, "stay_id": 30000001, "caregiver_id": 1, "charttime": ts(h(-1)),
             "storetime": ts(h(-0.9)), "itemid": 220045, "value": "88", "valuenum": 88, "valueuom": "bpm",
             "warning": 0},
            {"subject_id": A, "hadm_id": 20000001, "stay_id": 30000001, "caregiver_id": 1,
             "charttime": ts(h(-0.2)), "storetime": ts(h(0.1)), "itemid": 220045, "value": "130", "valuenum": 130,
             "valueuom": "bpm", "warning": 0}]
    write_csv_gz(mimic / "icu" / "chartevents.csv.gz", rows, CHART_COLS)
    write_csv_gz(mimic / "icu" / "d_items.csv.gz", [{"itemid": i, "label": n} for i, n in (
        (220045, "Heart Rate"), (220210, "Respiratory Rate"), (220277, "O2 saturation pulseoxymetry"),
        (223761, "Temperature Fahrenheit"), (220179, "Non Invasive Blood Pressure systolic"),
        (220180, "Non Invasive Blood Pressure diastolic"))], ["itemid", "label"])
    f, m = run(planted, tmp_path)
    assert f.loc[A, "heart_rate"] == 88 and f.loc[A, "heart_rate_hours"] == pytest.approx(1.0)
    assert "nibp_systolic_hours" in f.columns and m["vitals_itemids"]["spo2"] == 220277
    assert m["skipped_events"]["heart_rate"]["not_yet_resulted"] == 1


# ----------------------------------------------------------------------------------------------------------
# Bad input, re-runs, cache, atomicity, lock.


def test_missing_column_and_table_name_file_column_and_expected(planted, tmp_path):
    mimic, shards = planted
    labs = pd.read_csv(mimic / "hosp" / "labevents.csv.gz").drop(columns=["storetime"])
    write_csv_gz(mimic / "hosp" / "labevents.csv.gz", labs.to_dict("records"), list(labs.columns))
    (mimic / "hosp" / "patients.csv.gz").unlink()
    with pytest.raises(RadalignError) as e:
        link_ehr(mimic, shards, tmp_path / "ehr")
    msg = str(e.value)
    assert "labevents.csv.gz: no column 'storetime'" in msg and "expected the MIMIC-IV labevents columns" in msg
    assert "patients.csv.gz: missing" in msg and "anchor_age" in msg


def _edit_gz(path: Path, edit) -> None:
    """Rewrite the gzipped CSV `path` with `edit(lines)` applied to its lines (bytes, header first)."""
    lines = gzip.decompress(path.read_bytes()).split(b"\n")
    path.write_bytes(gzip.compress(b"\n".join(edit(lines))))


def _link_error(planted, tmp_path, capsys, *extra) -> str:
    """link-ehr through the CLI: rc 2 and one sentence on stderr, never a traceback."""
    from radalign.cli import main

    mimic, shards = planted
    rc = main(["data", "link-ehr", "--mimic-iv", str(mimic), "--shards", str(shards), "--out",
               str(tmp_path / "ehr"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err and "_duckdb" not in err, err
    assert not (tmp_path / "ehr" / "manifest.json").exists()
    return err


@pytest.mark.parametrize("table", ["hosp/admissions", "hosp/patients", "hosp/labevents", "hosp/d_labitems"])
@pytest.mark.parametrize("keep", [0.6, 20])
def test_gzip_cut_mid_stream_names_the_file_and_the_fix(planted, tmp_path, capsys, table, keep):
    """A download cut short: mid-stream (60% of the bytes; labevents padded to 60k rows, read by the Arrow
    stream, whose read-ahead thread may meet the cut before or after it has handed batches over) or inside the
    gzip header (20 bytes)."""
    mimic, _ = planted
    path = mimic / f"{table}.csv.gz"
    if table == "hosp/labevents":            # values the typed Arrow stream takes (`___` -> blank, 2.0e7 -> 2e7)
        _edit_gz(path, lambda lines: [re.sub(rb",(\d+)\.0,", rb",\1,", ln.replace(b",___,___,", b",___,,"))
                                      for ln in lines[:-1] + [lines[1]] * 60000 + [b""]])
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    err = _link_error(planted, tmp_path, capsys)
    assert f"{path}: the gzip stream ends early" in err and f"gzip -t {path}" in err
    assert "restore the file from the MIMIC-IV release" in err
    rows = re.search(r"about ([\d,]+) data rows in", err)     # when Arrow handed batches over before the cut
    assert rows is None or (table == "hosp/labevents" and 0 < int(rows.group(1).replace(",", "")) < 60015), err


@pytest.mark.parametrize("table, row, column", [("admissions", "last", "race"), ("admissions", 1, "race"),
                                                ("admissions", 1, "subject_id"), ("patients", "last", "gender"),
                                                ("labevents", "last", "valuenum"), ("labevents", 2, "itemid")])
def test_non_utf8_byte_names_file_line_and_column(planted, tmp_path, capsys, table, row, column):
    """A byte that is not UTF-8 in a data row is reported at its line and column (row 1 is not the header)."""
    path = planted[0] / "hosp" / f"{table}.csv.gz"
    n = _plant_byte(path, row, column)
    err = _link_error(planted, tmp_path, capsys)
    assert f"{path}, line {n + 1} (data row {n}), column {column!r}: byte 0xb0 is not UTF-8" in err, err
    assert "header" not in err and "restore the file" in err and "iconv -f latin1 -t utf-8" in err


def _plant_byte(path: Path, row, column: str) -> int:
    """A raw 0xb0 byte after the value of `column` in data row `row` (or "last"); returns the row number."""
    lines = gzip.decompress(path.read_bytes()).split(b"\n")
    n = len(lines) - 2 if row == "last" else row                       # lines[-1] is the empty tail
    col = next(csv.reader([lines[0].decode()])).index(column)
    fields = next(csv.reader([lines[n].decode()]))
    fields[col] += "\udcb0"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(fields)
    lines[n] = buf.getvalue().encode("utf-8", "surrogateescape")
    path.write_bytes(gzip.compress(b"\n".join(lines)))
    return n


def test_non_utf8_byte_in_a_column_never_read_is_no_error(planted, tmp_path):
    """link-ehr reads six labevents columns: a bad byte in `comments` changes nothing."""
    mimic, shards = planted
    before = link_ehr(mimic, shards, tmp_path / "a")
    _plant_byte(mimic / "hosp" / "labevents.csv.gz", 2, "comments")
    link_ehr(mimic, shards, tmp_path / "b")
    pd.testing.assert_frame_equal(read_ehr(tmp_path / "a"), read_ehr(tmp_path / "b"))
    assert before["rows_scanned"]["labevents"] == 15


def test_non_utf8_byte_in_the_header_says_header(planted, tmp_path, capsys):
    mimic, _ = planted
    path = mimic / "hosp" / "admissions.csv.gz"
    _edit_gz(path, lambda lines: [lines[0].replace(b"race", b"ra\xb0ce")] + lines[1:])
    err = _link_error(planted, tmp_path, capsys)
    assert f"{path}, line 1 (the header), character" in err and "byte 0xb0 is not UTF-8" in err


@pytest.mark.parametrize("limit, advice", [("1MB", "--memory-limit 2GB (the default)"), ("1KiB", "2GB")])
def test_too_small_memory_limit_says_raise_it(planted, tmp_path, capsys, limit, advice):
    err = _link_error(planted, tmp_path, capsys, "--memory-limit", limit)
    assert f"DuckDB ran out of memory under --memory-limit {limit}" in err and advice in err and "raise it" in err


def test_unknown_itemid_lists_the_closest_labels(planted, tmp_path):
    mimic, shards = planted
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("features:\n  creatinine: 50911\n  sodium: 50983\n")
    with pytest.raises(RadalignError) as e:
        link_ehr(mimic, shards, tmp_path / "ehr", features=yaml)
    assert "features.creatinine: itemid 50911 is not in" in str(e.value)
    assert "Creatinine (50912)" in str(e.value) and "sodium" not in str(e.value)


def test_rerun_other_options_refuses_unless_overwrite(planted, tmp_path):
    mimic, shards = planted
    out = tmp_path / "ehr"
    first = link_ehr(mimic, shards, out)
    assert link_ehr(mimic, shards, out)["created"] == first["created"]      # same options, same inputs: kept
    with pytest.raises(RadalignError, match="other options.*window_hours.*--overwrite"):
        link_ehr(mimic, shards, out, window_hours=12)
    again = link_ehr(mimic, shards, out, window_hours=12, overwrite=True)
    assert again["options"]["window_hours"] == 12.0
    old = {k: v for k, v in again.items() if k not in ("rule_version", "films_after_death")}
    (out / "manifest.json").write_text(json.dumps({**old, "created": "made by the rule before issue 18"}))
    relinked = link_ehr(mimic, shards, out, window_hours=12)                # an older rule's link is redone
    assert relinked["created"] != "made by the rule before issue 18" and relinked["rule_version"] == 2
    assert relinked["films_after_death"] == 0
    assert again["cache"]["labevents"]["cache"] == "hit"                    # the Parquet conversion is reused
    before = (shards / "manifest.json").read_bytes()
    with pytest.raises(RadalignError, match="not a link-ehr output"):     # --out pointing at the shards
        link_ehr(mimic, shards, shards, overwrite=True)
    assert (shards / "manifest.json").read_bytes() == before


def test_cache_is_keyed_by_size_and_mtime(planted, tmp_path):
    mimic, shards = planted
    m1 = link_ehr(mimic, shards, tmp_path / "a", cache=tmp_path / "cache")
    assert m1["cache"]["labevents"]["cache"] == "miss"
    labs = mimic / "hosp" / "labevents.csv.gz"
    frame = pd.read_csv(labs, dtype=str, keep_default_na=False)
    creat = frame["itemid"] == "50912"
    frame.loc[creat, "valuenum"] = [str(float(v) * 10) for v in frame.loc[creat, "valuenum"]]
    write_csv_gz(labs, frame.to_dict("records"), list(frame.columns))
    m2 = link_ehr(mimic, shards, tmp_path / "b", cache=tmp_path / "cache")
    assert m2["cache"]["labevents"]["cache"] == "miss"
    assert read_ehr(tmp_path / "b").set_index("subject_id").loc[A, "creatinine"] == pytest.approx(11.0)
    assert len(list((tmp_path / "cache").glob("labevents-*.parquet"))) == 1   # the stale one is removed


def test_streaming_conversion_matches_duckdb_and_refused_values_fall_back(planted, tmp_path, monkeypatch):
    """The typed Arrow stream and DuckDB's tolerant reader write the same Parquet; `___` in valuenum (platelets
    of B) makes the stream refuse the file, and the DuckDB conversion turns it into NULL instead."""
    from radalign.data.ehr import _arrow_convert, _duckdb_convert, connect, find_tables

    mimic, shards = planted
    tolerant = link_ehr(mimic, shards, tmp_path / "a", cache=tmp_path / "c1")
    assert tolerant["cache"]["labevents"]["engine"] == "duckdb"
    labs = mimic / "hosp" / "labevents.csv.gz"
    frame = pd.read_csv(labs, dtype=str, keep_default_na=False)
    assert (frame["valuenum"] == "___").sum() == 1
    frame.loc[frame["valuenum"] == "___", "valuenum"] = ""                   # what real MIMIC-IV writes
    frame["hadm_id"] = frame["hadm_id"].str.removesuffix(".0")               # pandas wrote 20000006.0: refused too
    write_csv_gz(labs, frame.to_dict("records"), list(frame.columns))
    streamed = link_ehr(mimic, shards, tmp_path / "b", cache=tmp_path / "c2")
    assert streamed["cache"]["labevents"]["engine"] == "arrow"
    pd.testing.assert_frame_equal(read_ehr(tmp_path / "a"), read_ehr(tmp_path / "b"))
    table = find_tables(mimic, vitals=False)["labevents"]
    con = connect("256MB", tmp_path / "duck")
    for items in (None, [50912, 51222]):
        _arrow_convert(table, tmp_path / "arrow.parquet", items)
        _duckdb_convert(con, table, tmp_path / "duck.parquet", items)
        x, y = pd.read_parquet(tmp_path / "arrow.parquet"), pd.read_parquet(tmp_path / "duck.parquet")
        assert len(x) == (len(frame) if items is None else frame["itemid"].isin(["50912", "51222"]).sum())
        pd.testing.assert_frame_equal(x, y, check_dtype=False)
    # Many small CSV blocks and row groups flushed mid-stream: every row written once, in order.
    import pyarrow.parquet as pq
    import radalign.data.ehr as ehr

    whole = _arrow_convert(table, tmp_path / "whole.parquet")
    monkeypatch.setattr(ehr, "CSV_BLOCK_BYTES", 400)
    monkeypatch.setattr(ehr, "ROW_GROUP_ROWS", 2)
    rows = _arrow_convert(table, tmp_path / "groups.parquet")
    meta = pq.ParquetFile(tmp_path / "groups.parquet").metadata
    assert rows == whole == meta.num_rows == len(frame) and meta.num_row_groups > 1
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "groups.parquet"),
                                  pd.read_parquet(tmp_path / "whole.parquet"))


def test_failed_write_leaves_no_manifest(planted, tmp_path, monkeypatch):
    import radalign.data.ehr as ehr

    mimic, shards = planted
    out = tmp_path / "ehr"
    link_ehr(mimic, shards, out)

    def boom(*a, **k):
        raise OSError("disk full (planted)")

    monkeypatch.setattr(ehr, "write_finetune", boom)
    with pytest.raises(OSError, match="planted"):
        link_ehr(mimic, shards, out, window_hours=6, overwrite=True)
    assert not (out / "manifest.json").exists()            # the folder reads as unfinished, never as the old one
    with pytest.raises(RadalignError, match="no manifest.json"):
        read_ehr(out)
    assert not [p for p in out.iterdir() if p.name.startswith(".") and "tmp" in p.name]


def test_second_writer_is_refused(planted, tmp_path):
    mimic, shards = planted
    out = tmp_path / "ehr"
    code = textwrap.dedent(f"""
        import sys, time
        from radalign.lock import output_lock
        with output_lock({str(out)!r}):
            print("held", flush=True)
            time.sleep(30)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RadalignError, match=f"in use by another process \\(pid {holder.pid}"):
            link_ehr(mimic, shards, out)
    finally:
        holder.kill()
        holder.wait()


def test_cli_runs_and_reports_errors(planted, tmp_path, capsys):
    from radalign.cli import main

    mimic, shards = planted
    rc = main(["data", "link-ehr", "--mimic-iv", str(mimic), "--shards", str(shards), "--out",
               str(tmp_path / "ehr"), "--no-progress", "--memory-limit", "512MB"])
    assert rc == 0 and "6 studies" in capsys.readouterr().out
    rc = main(["data", "link-ehr", "--mimic-iv", str(mimic), "--shards", str(shards), "--out",
               str(tmp_path / "ehr2"), "--features", "ehr/cor", "--no-progress"])
    assert rc != 0 and "ehr/core" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# The generator's output against an independent plain-pandas implementation of the rule, and each planted
# real-MIMIC-IV case against its documented outcome.


def _shard_studies(shards: Path) -> pd.DataFrame:
    manifest = json.loads((shards / "manifest.json").read_text())
    rows = []
    for entry in manifest["splits"].values():
        for s in entry["shards"]:
            with tarfile.open(shards / s["path"]) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".json"):
                        rows.append(json.load(tar.extractfile(m)))
    df = pd.DataFrame(rows)
    df["t0"] = pd.to_datetime(df["study_datetime"], format="ISO8601")
    return df.groupby(["subject_id", "study_id"], as_index=False).agg(split=("split", "first"), t0=("t0", "min"))


def _metadata_studies(jpg: Path) -> pd.DataFrame:
    """subject_id, study_id, t0 from MIMIC-CXR-JPG's metadata (StudyDate + the HHMMSS.fff StudyTime, by string)."""
    meta = pd.read_csv(jpg / "mimic-cxr-2.0.0-metadata.csv.gz", dtype={"StudyTime": str, "StudyDate": str})
    meta = meta.drop_duplicates("study_id")
    parts = meta["StudyTime"].str.partition(".")
    hhmmss, frac = parts[0].str.zfill(6), parts[2]
    t0 = pd.to_datetime(meta["StudyDate"] + hhmmss, format="%Y%m%d%H%M%S") + pd.to_timedelta(
        frac.str.ljust(3, "0").str[:3].replace("", "0").astype(int), unit="ms")
    return pd.DataFrame({"subject_id": meta["subject_id"], "study_id": meta["study_id"], "t0": t0.to_numpy()})


def _events(path: Path) -> pd.DataFrame:
    ev = pd.read_csv(path, dtype={"value": str, "valuenum": str})
    ev["valuenum"] = pd.to_numeric(ev["valuenum"], errors="coerce")
    ev["charttime"] = pd.to_datetime(ev["charttime"])
    ev["avail"] = pd.to_datetime(ev["storetime"]).fillna(ev["charttime"])
    return ev[ev["valuenum"].notna()]


def _latest(events: pd.DataFrame, studies: pd.DataFrame, items: dict[str, int], window) -> pd.DataFrame:
    """Per study: `{name}` and `{name}_hours` of the latest numeric event drawn in [t0 - window, t0) and stored by
    t0 (ties: the later stored, then the larger value); a merge on subject_id, masks, a sort, the last row."""
    m = studies[["study_id", "subject_id", "t0"]].merge(events[events.itemid.isin(items.values())], on="subject_id")
    m = m[(m.charttime >= m.t0 - window) & (m.charttime < m.t0) & (m.avail <= m.t0)]
    last = m.sort_values(["study_id", "itemid", "charttime", "avail", "valuenum"]).groupby(["study_id", "itemid"]).tail(1)
    out = pd.DataFrame(index=pd.Index(studies["study_id"], name="study_id"))
    for name, itemid in items.items():
        mine = last[last.itemid == itemid].set_index("study_id")
        out[name] = mine.valuenum.reindex(out.index)
        out[f"{name}_hours"] = ((mine.t0 - mine.charttime).dt.total_seconds() / 3600).reindex(out.index)
    return out


def _admission(mine: pd.DataFrame, t0) -> pd.DataFrame:
    """The documented pick: spans [min(edreg, admit), max(disch, death)] holding t0; the latest admitted by t0,
    else the earliest admittime; ties the larger hadm_id."""
    a = mine[(mine.start <= t0) & (t0 <= mine.end)]
    admitted = a[a.admittime <= t0]
    if len(admitted):
        return admitted.sort_values(["admittime", "hadm_id"]).tail(1)
    return a.sort_values(["admittime", "hadm_id"], ascending=[False, True]).tail(1)


def reference_link(mimic: Path, studies: pd.DataFrame, items: dict[str, int], window_hours: float,
                   vitals: dict[str, int]) -> pd.DataFrame:
    """The rule of docs/ehr.md in plain pandas: the admission study by study, the values by a merge (small inputs
    only). `studies`: subject_id, study_id, t0."""
    hosp = mimic / "hosp"
    pat = pd.read_csv(hosp / "patients.csv.gz").set_index("subject_id")
    adm = pd.read_csv(hosp / "admissions.csv.gz")
    for col in ("admittime", "dischtime", "deathtime", "edregtime"):
        adm[col] = pd.to_datetime(adm[col])
    adm["start"] = adm[["edregtime", "admittime"]].min(axis=1)
    adm["end"] = adm[["dischtime", "deathtime"]].max(axis=1)
    adm_of = dict(tuple(adm.groupby("subject_id")))
    window = pd.Timedelta(hours=window_hours)
    out = []
    for st in studies.itertuples():
        row = {"subject_id": st.subject_id, "study_id": st.study_id}
        t0, adms = st.t0, adm_of.get(st.subject_id, adm.iloc[:0])
        a = _admission(adms, t0)
        row["hadm_id"] = a.hadm_id.iloc[0] if len(a) else None
        row["in_hospital_mortality"] = a.hospital_expire_flag.iloc[0] if len(a) else None
        row["los_days"] = ((a.dischtime - a.admittime).dt.total_seconds() / 86400).iloc[0] if len(a) else np.nan
        if not len(a):
            a = adms[adms.start < t0].sort_values(["start", "hadm_id"]).tail(1)
        row["race"] = a.race.iloc[0] if len(a) and pd.notna(a.race.iloc[0]) else None
        if st.subject_id in pat.index:
            p = pat.loc[st.subject_id]
            row["age"] = p.anchor_age + t0.year - p.anchor_year
            days = (pd.Timestamp(p.dod) - t0.normalize()).days if pd.notna(p.dod) else None
            row["mortality_30d"] = 0 if days is None else (None if days < 0 else int(days <= 30))
        else:
            row["age"], row["mortality_30d"] = None, None
        out.append(row)
    frame = pd.DataFrame(out).set_index("study_id")
    frame = frame.join(_latest(_events(hosp / "labevents.csv.gz"), studies, items, window))
    if vitals:
        frame = frame.join(_latest(_events(mimic / "icu" / "chartevents.csv.gz"), studies, vitals, window))
    return frame.reset_index().set_index(["subject_id", "study_id"]).sort_index()


def _assert_same(ours: pd.DataFrame, ref: pd.DataFrame) -> None:
    assert list(ours.index) == list(ref.index)
    for col in ref.columns.drop("race"):
        a, b = ours[col].astype("float64").to_numpy(), ref[col].astype("float64").to_numpy()
        assert np.allclose(a, b, equal_nan=True, atol=1e-9), (col, int((~np.isclose(a, b, equal_nan=True)).sum()))
    assert list(ours["race"].fillna("-")) == list(ref["race"].fillna("-"))


def test_generator_output_matches_the_pandas_reference(synth_root, synth_shards, tmp_path):
    manifest = link_ehr(synth_root / "mimic-iv", synth_shards, tmp_path / "ehr")
    ours = read_ehr(tmp_path / "ehr").set_index(["subject_id", "study_id"]).sort_index()
    ref = reference_link(synth_root / "mimic-iv", _shard_studies(synth_shards), manifest["feature_itemids"], 24.0,
                         manifest["vitals_itemids"])
    _assert_same(ours, ref)
    # the generator plants what the rule must get right, often enough to matter
    assert manifest["studies_no_admission"] > 0
    assert sum(v["not_yet_resulted"] for v in manifest["skipped_events"].values()) > 0
    assert sum(manifest["values_from_draws_without_hadm_id"].values()) > 0
    assert ours["creatinine"].notna().sum() >= 5
    if (synth_root / "mimic-iv" / "icu" / "chartevents.csv.gz").is_file():
        assert manifest["vitals"] and ours["heart_rate"].notna().sum() > 0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """1,000 synthetic patients without pixels (every planted case at least 3 times), linked by `link_frame` on
    the studies of the metadata file (no shards needed)."""
    from radalign.data.ehr import find_tables, link_frame, load_feature_list
    from radalign.data.synth import synthesize

    root = tmp_path_factory.mktemp("cohort")
    synthesize(root, patients=1000, seed=1, image_size=32, progress=False, images=False)
    studies = _metadata_studies(root / "mimic-cxr-jpg")
    flist, _ = load_feature_list("ehr/core")
    frame, counts = link_frame(studies.assign(split="train", study_datetime=studies["t0"].astype("datetime64[us]")),
                               find_tables(root / "mimic-iv", vitals=True), flist, window_hours=24.0,
                               cache_dir=root / "cache")
    return {"root": root, "studies": studies, "flist": flist, "counts": counts,
            "frame": frame.set_index(["subject_id", "study_id"]).sort_index(),
            "cases": pd.read_csv(root / "linkage_cases.csv.gz", dtype={c: "Int64" for c in (
                "study_id", "hadm_id", "labevent_id", "itemid", "eligible")})}


def test_generated_cohort_matches_the_pandas_reference(cohort):
    ref = reference_link(cohort["root"] / "mimic-iv", cohort["studies"], cohort["flist"].features, 24.0,
                         cohort["flist"].vitals)
    _assert_same(cohort["frame"], ref)


def test_generated_linkage_cases_get_the_documented_outcome(cohort):
    """Every planted case of the generator (linkage_cases.csv.gz) against the outcome docs/ehr.md documents."""
    f, cases = cohort["frame"], cohort["cases"]
    counts = cases["case"].value_counts()
    study_cases = ("ed_film_before_admittime", "overlapping_admissions", "edreg_after_admittime",
                   "death_day_discharge")
    for case in (*study_cases, "film_after_death", "death_on_film_date", "duplicate_charttime",
                 "masked_value_numeric"):
        assert counts.get(case, 0) >= 3, (case, dict(counts))
    row = lambda c: f.loc[(c.subject_id, c.study_id)]  # noqa: E731
    for c in cases[cases["case"].isin(study_cases)].itertuples():
        assert row(c)["hadm_id"] == c.hadm_id, c                          # linked to the admission planted
    for c in cases[cases["case"] == "death_day_discharge"].itertuples():
        assert row(c)["in_hospital_mortality"] == 1 and row(c)["mortality_30d"] == 1, c
    after = cases[cases["case"] == "film_after_death"]
    assert all(pd.isna(row(c)["mortality_30d"]) for c in after.itertuples())
    assert cohort["counts"]["films_after_death"] == len(after)
    assert all(row(c)["mortality_30d"] == 1 for c in cases[cases["case"] == "death_on_film_date"].itertuples())
    labs = pd.read_csv(cohort["root"] / "mimic-iv/hosp/labevents.csv.gz", dtype={"value": str})
    name = {v: k for k, v in cohort["flist"].features.items()}
    for c in cases[cases["case"].isin(["duplicate_charttime", "masked_value_numeric"])].itertuples():
        lab = labs.set_index("labevent_id").loc[c.labevent_id]
        twin = labs[(labs.subject_id == c.subject_id) & (labs.itemid == c.itemid) & (labs.charttime == lab.charttime)
                    & (labs.labevent_id != c.labevent_id)]
        if c.case == "masked_value_numeric":
            assert lab.value == "___" and len(twin) == 0 and c.eligible == 1
            assert row(c)[name[c.itemid]] == lab.valuenum, c
        else:                      # the twin: stored earlier with a larger value; the later stored wins if ready
            assert len(twin) == 1 and twin.valuenum.iloc[0] > lab.valuenum and twin.storetime.iloc[0] < lab.storetime
            assert row(c)[name[c.itemid]] == (lab.valuenum if c.eligible == 1 else twin.valuenum.iloc[0]), c

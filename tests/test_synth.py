"""The synthetic MIMIC stand-in: formats as in the real releases, determinism, and learnable content."""

from __future__ import annotations

import gzip
import re
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from radalign.data.labels import CHEXPERT_LABELS, MIMIC_LABEL_ORDER
from radalign.data.synth import (
    CHEXPERT_FORMAT_COLUMNS,
    GROUND_TRUTH_COLUMNS,
    LABEL_COLUMNS,
    METADATA_COLUMNS,
    SPLIT_COLUMNS,
    synth_complete,
    synthesize,
)
from radalign.data.synth.ehr import ADMISSION_COLUMNS, D_LABITEMS_COLUMNS, LAB_COLUMNS, PATIENT_COLUMNS
from radalign.data.synth.generate import _patient
from radalign.data.synth.images import ImageSpec, render
from radalign.data.synth.reports import write_report

from radalign import RadalignError

PATIENTS, SEED, SIZE = 30, 7, 64
DICOM_RE = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
REAL_ITEMIDS = {50912, 51301, 51222, 51265, 50983, 50971, 51006, 50882, 50931, 50813, 50963, 51003, 50889}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_a")
    summary = synthesize(out, patients=PATIENTS, seed=SEED, image_size=SIZE, workers=1, progress=False)
    return out, summary


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"StudyTime": str, "hadm_id": "Int64"}, keep_default_na=True)


def _raw_header(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return f.readline().rstrip("\n").split(",")


def test_every_table_has_the_exact_columns(run):
    out, _ = run
    expected = {
        "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz": METADATA_COLUMNS,
        "mimic-cxr-jpg/mimic-cxr-2.0.0-split.csv.gz": SPLIT_COLUMNS,
        "mimic-cxr-jpg/mimic-cxr-2.0.0-chexpert.csv.gz": LABEL_COLUMNS,
        "mimic-cxr-jpg/mimic-cxr-2.0.0-negbio.csv.gz": LABEL_COLUMNS,
        "mimic-iv/hosp/patients.csv.gz": PATIENT_COLUMNS,
        "mimic-iv/hosp/admissions.csv.gz": ADMISSION_COLUMNS,
        "mimic-iv/hosp/labevents.csv.gz": LAB_COLUMNS,
        "mimic-iv/hosp/d_labitems.csv.gz": D_LABITEMS_COLUMNS,
        "chexpert-format.csv": CHEXPERT_FORMAT_COLUMNS,
        "ground_truth.csv.gz": GROUND_TRUTH_COLUMNS,
    }
    for rel, cols in expected.items():
        assert _raw_header(out / rel) == list(cols), rel
    # The literal lists from the real releases (guards against a typo in both code and test).
    assert METADATA_COLUMNS[:5] == ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                                    "ViewPosition"]
    assert LABEL_COLUMNS[2:] == sorted(CHEXPERT_LABELS) and CHEXPERT_FORMAT_COLUMNS[5:] == list(CHEXPERT_LABELS)


def test_value_formats_match_the_real_release(run):
    out, summary = run
    meta = _csv(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz")
    assert len(meta) == summary["images"] and meta["dicom_id"].is_unique
    assert meta["dicom_id"].map(lambda d: bool(DICOM_RE.match(d))).all()
    assert meta["subject_id"].astype(str).str.fullmatch(r"1\d{7}").all()
    assert meta["study_id"].astype(str).str.fullmatch(r"5\d{7}").all()
    assert meta["StudyDate"].astype(str).str.fullmatch(r"21\d{2}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])").all()
    assert meta["StudyTime"].str.fullmatch(r"\d{1,6}(\.\d+)?").all()
    hhmmss = meta["StudyTime"].astype(float).astype(int)
    assert ((hhmmss // 10000 < 24) & (hhmmss // 100 % 100 < 60) & (hhmmss % 100 < 60)).all()
    assert set(meta["ViewPosition"].fillna("")) <= {"PA", "AP", "LATERAL", "LL", ""}
    assert {"PA", "AP", "LATERAL"} <= set(meta["ViewPosition"].dropna())
    assert set(meta["ViewCodeSequence_CodeMeaning"].dropna()) <= {"postero-anterior", "antero-posterior",
                                                                  "lateral", "left lateral"}
    assert (meta["Rows"] > 2000).all() and (meta["Columns"] > 2000).all()      # DICOM sizes, not the JPEG's
    # Study ids are random, not in the order of the studies' dates.
    ordered = meta.drop_duplicates("study_id").sort_values(["StudyDate", "StudyTime"])["study_id"]
    assert not ordered.is_monotonic_increasing
    for name in ("chexpert", "negbio"):
        labels = _csv(out / f"mimic-cxr-jpg/mimic-cxr-2.0.0-{name}.csv.gz")
        values = set(np.unique(labels[list(MIMIC_LABEL_ORDER)].to_numpy().ravel().astype(str)))
        assert values <= {"1.0", "0.0", "-1.0", "nan"}, values
        assert {"1.0", "0.0", "-1.0"} <= values
        assert labels["study_id"].is_unique
        assert 0 < summary["studies"] - len(labels) <= max(2, summary["studies"] // 20)   # a few absent
        assert set(labels["No Finding"].dropna()) <= {1.0}


def test_paths_and_split_by_patient(run):
    out, summary = run
    meta = _csv(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz")
    for row in meta.itertuples():
        s = str(row.subject_id)
        jpg = out / "mimic-cxr-jpg/files" / f"p{s[:2]}" / f"p{s}" / f"s{row.study_id}" / f"{row.dicom_id}.jpg"
        assert jpg.is_file()
        assert (out / "mimic-cxr-reports/files" / f"p{s[:2]}" / f"p{s}" / f"s{row.study_id}.txt").is_file()
    assert len(list((out / "mimic-cxr-jpg/files").rglob("*.jpg"))) == summary["images"]
    split = _csv(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-split.csv.gz")
    assert set(split["dicom_id"]) == set(meta["dicom_id"])
    assert set(split["split"]) <= {"train", "validate", "test"}
    assert (split.groupby("subject_id")["split"].nunique() == 1).all()
    cx = pd.read_csv(out / "chexpert-format.csv")
    assert len(cx) == summary["images"] and all((out / p).is_file() for p in cx["Path"])
    assert set(cx["Frontal/Lateral"]) <= {"Frontal", "Lateral"} and set(cx["Sex"]) <= {"Male", "Female"}


def test_images_are_8bit_grayscale_jpeg(run):
    out, _ = run
    for jpg in sorted((out / "mimic-cxr-jpg/files").rglob("*.jpg"))[:10]:
        with Image.open(jpg) as im:
            assert im.format == "JPEG" and im.mode == "L" and im.size == (SIZE, SIZE)
            assert np.asarray(im).std() > 10                                    # not blank


def test_reports_follow_the_template(run):
    out, summary = run
    reports = sorted((out / "mimic-cxr-reports/files").rglob("*.txt"))
    assert len(reports) == summary["studies"]
    not_utf8 = 0
    for path in reports:
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            not_utf8 += 1
        lines = raw.decode("latin-1").split("\n")
        assert any(re.fullmatch(r" {20,}FINAL REPORT", ln) for ln in lines), path
        assert max(len(ln) for ln in lines) < 80, path
        headers = [ln.split(":")[0] for ln in lines if re.match(r"^ ?[A-Z][A-Z ()]+:", ln)]
        assert all(h.startswith(" ") and not h.startswith("  ") for h in headers), (path, headers)
    assert not_utf8 >= 1


def test_report_sections_at_the_specified_rates():
    """On ~1,000 studies: ~1/3 without FINDINGS, ~1/5 without IMPRESSION, a few with neither."""
    texts = []
    for i in range(450):
        for s in _patient(3, i, 0.3).studies:
            rep = write_report(findings=s.findings, sides=s.sides, severity=s.severity, devices=s.devices,
                               exam=s.exam, portable=s.portable, age=s.age, sex=s.sex, latin1=False,
                               rng=np.random.default_rng([3, i, len(texts)]))
            texts.append(rep.text)
    n = len(texts)
    no_findings = sum(" FINDINGS:" not in t for t in texts) / n
    no_impression = sum(" IMPRESSION:" not in t for t in texts) / n
    neither = sum(" FINDINGS:" not in t and " IMPRESSION:" not in t for t in texts) / n
    assert n > 800
    assert 0.27 < no_findings < 0.42 and 0.14 < no_impression < 0.28 and 0.01 < neither < 0.08
    assert sum(" CONCLUSION:" in t for t in texts) > 0 and sum("ADDENDUM" in t or "(PFI)" in t for t in texts) > 0
    assert sum("No pleural effusion" in t for t in texts) > 0 and sum("cannot exclude" in t.lower() for t in texts) > 0


def test_labels_follow_report_mentions_not_truth():
    """A hedged mention gives -1, a negation 0; an unmentioned finding stays blank."""
    rng = np.random.default_rng(0)
    findings = dict.fromkeys(CHEXPERT_LABELS, 0)
    findings.update({"Pleural Effusion": 1})
    seen = set()
    for _ in range(300):
        rep = write_report(findings=findings, sides={"Pleural Effusion": "left"}, severity={}, devices=(),
                           exam="CHEST (PA AND LAT)", portable=False, age=70, sex="F", latin1=False, rng=rng)
        value = rep.mentions.get("Pleural Effusion")
        seen.add(value)
        if value == 1.0:
            assert "effusion" in rep.text.lower() and "left" in rep.text.lower()
        assert rep.mentions.get("Pneumothorax") in (None, 0.0, -1.0)
    assert {1.0, -1.0, None} <= seen


def test_mimic_iv_tables_and_dates_are_consistent(run):
    out, summary = run
    hosp = out / "mimic-iv/hosp"
    items = _csv(hosp / "d_labitems.csv.gz")
    assert set(items["itemid"]) == REAL_ITEMIDS
    assert dict(zip(items["itemid"], items["label"]))[50912] == "Creatinine"
    labs = _csv(hosp / "labevents.csv.gz")
    assert set(labs["itemid"]) <= REAL_ITEMIDS and labs["labevent_id"].is_unique
    assert labs["hadm_id"].isna().any() and labs["hadm_id"].notna().any()     # labs with and without hadm_id
    assert labs["charttime"].str.fullmatch(r"21\d\d-\d\d-\d\d \d\d:\d\d:\d\d").all()
    masked = labs[labs["value"] == "___"]                     # removed text: with and without a valuenum
    assert masked["valuenum"].isna().any() and masked["valuenum"].notna().any()
    adm = _csv(hosp / "admissions.csv.gz")
    assert adm["hadm_id"].astype(str).str.fullmatch(r"2\d{7}").all() and adm["hadm_id"].is_unique
    assert summary["studies_without_admission"] > 0
    pats = _csv(hosp / "patients.csv.gz")
    assert pats["anchor_year_group"].str.fullmatch(r"20\d\d - 20\d\d").all()
    meta = _csv(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz")
    study_times = {}
    for row in meta.drop_duplicates("study_id").itertuples():
        hhmmss = int(float(row.StudyTime))
        t = datetime.strptime(str(row.StudyDate), "%Y%m%d") + timedelta(
            hours=hhmmss // 10000, minutes=hhmmss // 100 % 100, seconds=hhmmss % 100)
        study_times.setdefault(row.subject_id, []).append(t)
    # One shift per subject: every lab lies within weeks of one of that subject's studies.
    for row in labs.itertuples():
        t = datetime.strptime(row.charttime, "%Y-%m-%d %H:%M:%S")
        assert min(abs(t - s) for s in study_times[row.subject_id]) < timedelta(days=60), row
    # Labs with an hadm_id lie inside that admission (to deathtime when later); years agree with anchor_year.
    spans = {r.hadm_id: (r.admittime, max(r.dischtime, r.deathtime if isinstance(r.deathtime, str) else ""))
             for r in adm.itertuples()}
    for row in labs.dropna(subset=["hadm_id"]).itertuples():
        lo, hi = spans[row.hadm_id]
        assert lo <= row.charttime <= hi, (lo, row.charttime, hi)
    anchor = dict(zip(pats["subject_id"], pats["anchor_year"]))
    absent = set(study_times) - set(anchor)
    assert len(absent) == summary["subjects_absent_from_patients"] == 1          # 1% of 30, at least one
    assert not absent & set(adm["subject_id"])                                   # and from admissions
    assert all(0 <= t.year - anchor[s] <= 12 for s, ts in study_times.items() if s in anchor for t in ts)


def test_ground_truth_matches_images_and_labels(run):
    out, summary = run
    gt = _csv(out / "ground_truth.csv.gz")
    assert len(gt) == summary["images"]
    truth = gt[list(CHEXPERT_LABELS)].to_numpy()
    assert set(np.unique(truth)) <= {0, 1}
    others = gt[[n for n in CHEXPERT_LABELS if n not in ("No Finding", "Support Devices")]].sum(axis=1)
    assert ((gt["No Finding"] == 1) == (others == 0)).all()
    sided = gt[gt["Pleural Effusion"] == 1]["Pleural Effusion side"]
    assert set(sided) <= {"left", "right", "bilateral"}


def test_deterministic_by_seed_and_independent_of_workers(run, tmp_path):
    out_a, _ = run
    out_b, out_c = tmp_path / "b", tmp_path / "c"
    synthesize(out_b, patients=PATIENTS, seed=SEED, image_size=SIZE, workers=2, progress=False)
    files_a = sorted(p.relative_to(out_a) for p in out_a.rglob("*") if p.is_file() and p.name != "synth.json")
    files_b = sorted(p.relative_to(out_b) for p in out_b.rglob("*") if p.is_file() and p.name != "synth.json")
    assert files_a == files_b
    for rel in files_a:
        assert (out_a / rel).read_bytes() == (out_b / rel).read_bytes(), rel
    synthesize(out_c, patients=PATIENTS, seed=SEED + 1, image_size=SIZE, workers=1, progress=False)
    meta = "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz"
    assert (out_a / meta).read_bytes() != (out_c / meta).read_bytes()


def test_rerun_regenerates_and_foreign_dirs_are_refused(tmp_path):
    out = tmp_path / "s"
    first = synthesize(out, patients=4, seed=1, image_size=32, progress=False)
    assert synth_complete(out, patients=4, seed=1, image_size=32, difficulty=0.3)
    assert not synth_complete(out, patients=5, seed=1, image_size=32, difficulty=0.3)
    second = synthesize(out, patients=4, seed=2, image_size=32, progress=False)
    # No stale images from the first seed remain.
    assert len(list((out / "mimic-cxr-jpg/files").rglob("*.jpg"))) == second["images"]
    assert first["paths"]["metadata"] == second["paths"]["metadata"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RadalignError, match="not empty"):
        synthesize(foreign, patients=2, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kwargs, word", [({"patients": 0}, "--patients"), ({"difficulty": 1.5}, "--difficulty"),
                                          ({"image_size": 8}, "--image-size"), ({"workers": 0}, "--num-workers")])
def test_bad_arguments_name_the_value(tmp_path, kwargs, word):
    with pytest.raises(RadalignError, match=re.escape(word)):
        synthesize(tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def _renders(findings: dict, sides: dict, view: str = "PA", n: int = 24, size: int = 64, difficulty: float = 0.3):
    base = dict.fromkeys(CHEXPERT_LABELS, 0)
    base.update(findings)
    spec = ImageSpec(view=view, findings=base, sides=sides)
    return np.stack([render(spec, size, difficulty, np.random.default_rng([99, i])) for i in range(n)]).astype(float)


def test_effusion_brightens_the_correct_base():
    """Patient's left is image right: a left effusion brightens the lower right of the image, not the left."""
    none = _renders({}, {})
    left = _renders({"Pleural Effusion": 1}, {"Pleural Effusion": "left"})
    rows, right_cols, left_cols = slice(38, 50), slice(46, 58), slice(6, 18)   # lateral lung bases at 64 px
    gain_right = (left[:, rows, right_cols].mean((1, 2)) - none[:, rows, right_cols].mean((1, 2))).mean()
    gain_left = (left[:, rows, left_cols].mean((1, 2)) - none[:, rows, left_cols].mean((1, 2))).mean()
    assert gain_right > 15 and abs(gain_left) < 3, (gain_right, gain_left)


def test_cardiomegaly_widens_the_heart_and_difficulty_makes_it_subtler():
    def heart_gain(difficulty):
        none = _renders({}, {}, difficulty=difficulty)
        big = _renders({"Cardiomegaly": 1}, {}, difficulty=difficulty)
        band = (slice(38, 46), np.r_[12:20, 46:52])                 # just outside a normal heart's borders
        return (big[:, band[0]][:, :, band[1]].mean() - none[:, band[0]][:, :, band[1]].mean())

    easy, hard = heart_gain(0.0), heart_gain(1.0)
    assert easy > hard > 3, (easy, hard)


# ----------------------------------------------------------------------------------------------------
# Linkage cases (issue 10), ICU tables, and the truth-level table (issue 11)


def _t0(meta: pd.DataFrame) -> dict[int, datetime]:
    out = {}
    for row in meta.drop_duplicates("study_id").itertuples():
        v = float(row.StudyTime)
        secs = int(v // 10000) * 3600 + int(v // 100 % 100) * 60 + (v % 100)
        out[row.study_id] = datetime.strptime(str(row.StudyDate), "%Y%m%d") + timedelta(seconds=round(secs, 3))
    return out


@pytest.fixture(scope="module")
def ehr_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_ehr")
    summary = synthesize(out, patients=1000, seed=1, image_size=32, progress=False, images=False)
    return out, summary


def test_linkage_cases_are_planted_as_documented(ehr_run):
    """Each planted case holds by hand-checkable times: ED film between edregtime and admittime, results
    stored one minute after/before the film, draws one minute inside/outside 24 h, outpatient draws."""
    out, summary = ehr_run
    assert summary["images"] == 0 and not (out / "mimic-cxr-jpg/files").exists()
    cases = pd.read_csv(out / "linkage_cases.csv.gz", dtype={"hadm_id": "Int64", "labevent_id": "Int64"})
    counts = cases["case"].value_counts()
    for case in ("ed_film_before_admittime", "resulted_after_film", "resulted_before_film", "window_inside",
                 "window_outside", "outpatient_draw", "subject_absent_from_patients"):
        assert counts.get(case, 0) >= 3, (case, dict(counts))
    t0 = _t0(_csv(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz"))
    labs = _csv(out / "mimic-iv/hosp/labevents.csv.gz").set_index("labevent_id")
    adm = _csv(out / "mimic-iv/hosp/admissions.csv.gz").set_index("hadm_id")
    parse = lambda v: datetime.strptime(v, "%Y-%m-%d %H:%M:%S")  # noqa: E731
    for row in cases[cases["case"] == "ed_film_before_admittime"].itertuples():
        a = adm.loc[row.hadm_id]
        assert parse(a.edregtime) < t0[row.study_id] < parse(a.admittime)
    day = timedelta(hours=24)
    for row in cases[cases["labevent_id"].notna()].itertuples():
        lab, t = labs.loc[row.labevent_id], t0[row.study_id]
        chart = parse(lab.charttime)
        stored = parse(lab.storetime) if isinstance(lab.storetime, str) else chart
        assert pd.isna(lab.hadm_id) or row.case not in ("window_inside", "window_outside", "outpatient_draw")
        if row.case == "resulted_after_film":
            assert chart < t < stored <= t + timedelta(minutes=1) and row.eligible == 0
        elif row.case == "resulted_before_film":
            assert chart < stored < t and row.eligible == 1
        elif row.case == "window_inside":
            assert t - day <= chart < t - day + timedelta(minutes=1) and row.eligible == 1
        elif row.case == "window_outside":
            assert t - day - timedelta(minutes=2) < chart < t - day and row.eligible == 0
        # The generator's eligibility flag agrees with the rule applied by hand.
        assert row.eligible == int(stored <= t and t - day <= chart < t), row
    hosp = out / "mimic-iv/hosp"
    absent = set(cases.loc[cases["case"] == "subject_absent_from_patients", "subject_id"])
    assert absent & set(labs["subject_id"]) and not absent & set(_csv(hosp / "patients.csv.gz")["subject_id"])
    assert summary["non_numeric_lab_values"] == int(_csv(hosp / "labevents.csv.gz")["valuenum"].isna().sum()) > 0


def test_icu_tables_follow_the_real_layout(ehr_run):
    out, summary = ehr_run
    icu = out / "mimic-iv/icu"
    from radalign.data.synth.ehr import CHARTEVENT_COLUMNS, D_ITEMS_COLUMNS, ICUSTAY_COLUMNS
    assert _raw_header(icu / "icustays.csv.gz") == ICUSTAY_COLUMNS == [
        "subject_id", "hadm_id", "stay_id", "first_careunit", "last_careunit", "intime", "outtime", "los"]
    assert _raw_header(icu / "d_items.csv.gz") == D_ITEMS_COLUMNS
    assert _raw_header(icu / "chartevents.csv.gz") == CHARTEVENT_COLUMNS
    items = pd.read_csv(icu / "d_items.csv.gz")
    assert dict(zip(items["itemid"], items["abbreviation"])) == {
        220045: "HR", 220210: "RR", 220277: "SpO2", 223761: "Temperature F", 220179: "NBPs", 220180: "NBPd"}
    stays = pd.read_csv(icu / "icustays.csv.gz")
    adm = _csv(out / "mimic-iv/hosp/admissions.csv.gz").set_index("hadm_id")
    assert len(stays) == summary["icu_stays"] > 0 and stays["stay_id"].astype(str).str.fullmatch(r"3\d{7}").all()
    for st in stays.itertuples():
        a = adm.loc[st.hadm_id]
        end = max(a.dischtime, a.deathtime) if isinstance(a.deathtime, str) else a.dischtime
        assert a.admittime <= st.intime < st.outtime <= end and a.subject_id == st.subject_id
        hours = (datetime.fromisoformat(st.outtime) - datetime.fromisoformat(st.intime)).total_seconds() / 86400
        assert abs(st.los - hours) < 1e-6
    ce = pd.read_csv(icu / "chartevents.csv.gz")
    assert len(ce) == summary["chartevents_rows"]
    assert ce["charttime"].str.fullmatch(r"21\d\d-\d\d-\d\d \d\d:\d\d:\d\d").all()
    span = stays.set_index("stay_id")
    assert (ce["charttime"].to_numpy() >= span.loc[ce["stay_id"], "intime"].to_numpy()).all()
    assert (ce["charttime"].to_numpy() < span.loc[ce["stay_id"], "outtime"].to_numpy()).all()
    assert (ce["storetime"] > ce["charttime"]).all()
    spo2 = ce[ce["itemid"] == 220277]["valuenum"]
    assert spo2.between(70, 100).all() and set(ce[ce["itemid"] == 223761]["valueuom"]) == {"\u00b0F"}


def test_truth_table_orders_both_above_each_modality(tmp_path):
    """On 2,500 patients (no pixels): findings + labs beat findings alone and labs alone by a margin, for
    both outcomes; scored on validate+test together to have enough events. The reference is sklearn."""
    from radalign.data.synth.ehr import linked_studies, truth_table

    synthesize(tmp_path, patients=2500, seed=11, image_size=32, progress=False, images=False)
    table = truth_table(tmp_path, split="validate,test")
    linked = linked_studies(tmp_path)
    adm = linked[linked["in_hospital_mortality"].notna()]
    assert 0.06 <= adm["in_hospital_mortality"].mean() <= 0.14
    assert 0.06 <= linked["mortality_30d"].mean() <= 0.13
    assert 3.5 <= linked.drop_duplicates("hadm_id")["los_days"].dropna().median() <= 6.5
    for row in table.rows:
        assert row["events_test"] >= 25, row
        assert row["both"] > row["findings"] + 0.02 and row["both"] > row["labs"] + 0.02, row
    assert "| in_hospital_mortality |" in table.markdown()


def test_real_mimic_iv_quirks_are_planted_as_documented(ehr_run):
    """The quirks of real MIMIC-IV (docs/synthetic-data.md), each checked by hand from the written rows:
    overlapping admissions sharing one edregtime (hadm_ids in either order), edregtime after admittime, deaths
    discharged at 00:00/00:01, films after the death date, duplicate draws at one charttime, `___` with a
    numeric valuenum. tests/test_ehr.py checks what link-ehr makes of each."""
    out, summary = ehr_run
    cases = pd.read_csv(out / "linkage_cases.csv.gz", dtype={"hadm_id": "Int64", "labevent_id": "Int64"})
    quirks = ("overlapping_admissions", "edreg_after_admittime", "death_day_discharge", "film_after_death",
              "death_on_film_date", "duplicate_charttime", "masked_value_numeric")
    for case in quirks:
        assert summary[f"case_{case}"] == (cases["case"] == case).sum() >= 3, case
    t0 = _t0(_csv(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz"))
    hosp = out / "mimic-iv/hosp"
    adm = _csv(hosp / "admissions.csv.gz")
    by_hadm, dod = adm.set_index("hadm_id"), _csv(hosp / "patients.csv.gz").set_index("subject_id")["dod"]
    parse = lambda v: datetime.strptime(v, "%Y-%m-%d %H:%M:%S")  # noqa: E731
    orders = set()
    for row in cases[cases["case"] == "overlapping_admissions"].itertuples():
        a = by_hadm.loc[row.hadm_id]
        pair = adm[(adm.subject_id == row.subject_id) & (adm.edregtime == a.edregtime)].sort_values("admittime")
        assert len(pair) == 2, row
        first, second = pair.iloc[0], pair.iloc[1]
        assert parse(second.admittime) == parse(first.dischtime) + timedelta(minutes=1)
        assert parse(first.edregtime) <= t0[row.study_id]
        assert row.hadm_id == (first.hadm_id if t0[row.study_id] <= parse(first.dischtime) else second.hadm_id)
        orders.add(first.hadm_id < second.hadm_id)
    assert orders == {True, False}                                       # hadm_ids are not in time order
    for row in cases[cases["case"] == "edreg_after_admittime"].itertuples():
        a = by_hadm.loc[row.hadm_id]
        assert parse(a.admittime) <= t0[row.study_id] < parse(a.edregtime) <= parse(a.dischtime), row
    for row in cases[cases["case"] == "death_day_discharge"].itertuples():
        a = by_hadm.loc[row.hadm_id]
        assert a.dischtime[11:] in ("00:00:00", "00:01:00") and a.deathtime[:10] == a.dischtime[:10], row
        assert parse(a.dischtime) < t0[row.study_id] <= parse(a.deathtime) and a.hospital_expire_flag == 1
    for case, holds in (("film_after_death", lambda day, d: day > d), ("death_on_film_date", lambda day, d: day == d)):
        for row in cases[cases["case"] == case].itertuples():
            assert holds(t0[row.study_id].strftime("%Y-%m-%d"), dod[row.subject_id]), row
    labs = _csv(hosp / "labevents.csv.gz").set_index("labevent_id")
    for row in cases[cases["case"] == "duplicate_charttime"].itertuples():
        lab = labs.loc[row.labevent_id]
        twin = labs[(labs.subject_id == row.subject_id) & (labs.itemid == row.itemid)
                    & (labs.charttime == lab.charttime) & (labs.index != row.labevent_id)]
        assert len(twin) == 1 and twin.valuenum.iloc[0] > lab.valuenum and twin.storetime.iloc[0] < lab.storetime
        assert row.eligible == int(parse(lab.storetime) <= t0[row.study_id])
    assert set(cases.loc[cases["case"] == "duplicate_charttime", "eligible"]) == {0, 1}
    masked = labs.loc[cases.loc[cases["case"] == "masked_value_numeric", "labevent_id"]]
    assert (masked["value"] == "___").all() and masked["valuenum"].notna().all()


def test_quirks_leave_films_reports_labels_and_splits_as_they_were(run, tmp_path, monkeypatch):
    """The quirks draw from streams of their own: without them every file outside mimic-iv/ (images, reports,
    label files, splits, ground truth) is byte-identical, so pretraining and zero-shot numbers do not move."""
    import radalign.data.synth.ehr as synth_ehr

    out, _ = run
    monkeypatch.setattr(synth_ehr, "plant_quirks", lambda records, seed: None)
    plain = tmp_path / "plain"
    synthesize(plain, patients=PATIENTS, seed=SEED, image_size=SIZE, workers=1, progress=False)
    outside = lambda root: sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()  # noqa: E731
                                  and p.parts[len(root.parts)] != "mimic-iv"
                                  and p.name not in ("synth.json", "linkage_cases.csv.gz"))
    assert outside(out) == outside(plain) and len(outside(out)) > 100
    for rel in outside(out):
        assert (out / rel).read_bytes() == (plain / rel).read_bytes(), rel
    labs = "mimic-iv/hosp/labevents.csv.gz"
    assert (out / labs).read_bytes() != (plain / labs).read_bytes()     # the quirks did plant something

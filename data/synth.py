"""`radalign data synth`: a synthetic, deterministic stand-in for MIMIC-CXR-JPG + reports + MIMIC-IV hosp.

Layout written under `out_dir` (see docs/synthetic-data.md for every column and format):

    mimic-cxr-jpg/files/p{NN}/p{subject}/s{study}/{dicom}.jpg   8-bit grayscale JPEGs
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
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from data import synth_ehr as ehr
from data.labels import CHEXPERT_LABELS, MIMIC_LABEL_ORDER
from data.synth_images import ImageSpec, render
from data.synth_reports import write_report
from radalign import RadalignError
from radalign.io import atomic_path, atomic_write_bytes, atomic_write_json
from radalign.log import get_logger

log = get_logger("data.synth")

METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
SPLIT_COLUMNS = ["dicom_id", "study_id", "subject_id", "split"]
LABEL_COLUMNS = ["subject_id", "study_id", *MIMIC_LABEL_ORDER]
CHEXPERT_FORMAT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
SIDED = ("Pleural Effusion", "Pneumothorax", "Consolidation", "Pneumonia", "Atelectasis", "Pleural Other",
         "Fracture", "Lung Lesion")
GROUND_TRUTH_COLUMNS = ["dicom_id", "study_id", "subject_id", "view", *CHEXPERT_LABELS,
                        *[f"{n} side" for n in SIDED], "devices"]
PATHOLOGIES = tuple(n for n in CHEXPERT_LABELS if n not in ("No Finding", "Support Devices"))
VIEW_CODE = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}
SPLIT_FRACTIONS = (("train", 0.8), ("validate", 0.1), ("test", 0.1))
MARKER = "synth.json"


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


@dataclass
class PatientRecord:
    row: dict                                         # patients.csv.gz row (subject_id filled in later)
    studies: list[Study]
    admissions: list[dict]                            # hadm_id holds a local index until ids are assigned
    labs: list[dict]
    fewer_labs: bool


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
    sides = {k: v for k, v in sides.items() if f[k]}
    severity = {k: v for k, v in severity.items() if f[k]}
    return f, sides, severity


def _devices(rng, *, z: float, inpatient: bool, chronic: dict) -> tuple[str, ...]:
    out = []
    if inpatient and rng.random() < _sigmoid(-3.2 + 1.5 * z):
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
               "fracture": int(rng.random() < 0.025), "fracture_side": _side(rng),
               "pleural_other": int(rng.random() < 0.015), "pleural_side": _side(rng),
               "pacemaker": int(rng.random() < 0.02 + 0.04 * (anchor_age > 70)),
               "sternal": int(rng.random() < 0.04)}
    t = datetime(anchor_year, 1, 1) + timedelta(days=float(rng.uniform(0, 730)))
    studies: list[Study] = []
    admissions: list[dict] = []
    labs: list[dict] = []
    for _ in range(1 + int(rng.poisson(0.55 + 0.35 * max(frailty, 0)))):
        t += timedelta(days=float(rng.exponential(150)), hours=float(rng.uniform(0, 24)))
        t = t.replace(microsecond=0)
        z = 0.8 * frailty + float(rng.normal(0, 0.9))
        inpatient = rng.random() < _sigmoid(-0.2 + 1.3 * z)
        kind = "inpatient" if inpatient else ("ed" if rng.random() < 0.5 else "outpatient")
        _encounter(rng, kind, t, z, anchor_age + (t.year - anchor_year), sex, chronic, demo, fewer_labs,
                   studies, admissions, labs)
    if admissions and admissions[-1]["hospital_expire_flag"]:
        dod = admissions[-1]["dischtime"][:10]
    elif rng.random() < _sigmoid(-3.5 + 0.06 * (anchor_age - 65) + 0.8 * frailty):
        dod = (t + timedelta(days=float(rng.uniform(30, 700)))).strftime("%Y-%m-%d")
    else:
        dod = ""
    row = {"gender": sex, "anchor_age": anchor_age, "anchor_year": anchor_year,
           "anchor_year_group": str(rng.choice(ehr.YEAR_GROUPS)), "dod": dod}
    return PatientRecord(row, studies, admissions, labs, fewer_labs)


def _encounter(rng, kind, t, z, age, sex, chronic, demo, fewer, studies, admissions, labs) -> None:
    """One outpatient visit, ED visit or admission with its studies, labs and (for admissions) outcome."""
    devices = _devices(rng, z=z, inpatient=kind == "inpatient", chronic=chronic)
    portable_p = {"inpatient": _sigmoid(-1.2 + 1.4 * z + 2.0 * ("ett" in devices)), "ed": 0.2, "outpatient": 0.03}
    portable = bool(rng.random() < portable_p[kind])
    findings, sides, severity = _sample_findings(rng, z=z, age=age, chronic=chronic, portable=portable,
                                                 devices=devices)
    phys = ehr.Physiology.sample(rng, z=z, age=age, female=sex == "F", truth=findings)
    hadm: int | None = None
    study_times = [t]
    priority = "ROUTINE" if kind == "outpatient" else "STAT"
    if kind == "inpatient":
        los, died = ehr.outcome(rng, z=z, age=age, truth=findings, phys=phys)
        edreg = (t - timedelta(hours=float(rng.uniform(0.5, 3)))).replace(second=0)
        admit = (t + timedelta(hours=float(rng.uniform(1, 8)))).replace(second=0)
        disch = (admit + timedelta(days=los)).replace(second=0)
        hadm = len(admissions)
        via_ed = rng.random() < 0.85
        admissions.append({
            "hadm_id": hadm, "admittime": ehr.fmt_time(admit), "dischtime": ehr.fmt_time(disch),
            "deathtime": ehr.fmt_time(disch) if died else "",
            "admission_type": str(rng.choice(ehr.ADMISSION_TYPES)), "admit_provider_id": ehr.provider_id(rng),
            "admission_location": "EMERGENCY ROOM" if via_ed else str(rng.choice(
                ["TRANSFER FROM HOSPITAL", "PHYSICIAN REFERRAL", "CLINIC REFERRAL"])),
            "discharge_location": "DIED" if died else str(rng.choice(ehr.DISCHARGE)), **demo,
            "edregtime": ehr.fmt_time(edreg) if via_ed else "", "edouttime": ehr.fmt_time(admit) if via_ed else "",
            "hospital_expire_flag": int(died)})
        n_more = min(int(rng.poisson(0.35 + 0.5 * max(z, 0))), int(los))
        study_times += sorted(admit + timedelta(days=float(rng.uniform(0.3, los))) for _ in range(n_more))
        # Labs: ED draw before admission (no hadm_id yet), then daily in hospital, some follow-up after.
        if rng.random() < (0.6 if fewer else 0.9):
            labs += _draws(rng, t - timedelta(hours=float(rng.uniform(0, 2))), None, phys, priority, findings, z, fewer)
        for d in range(min(int(los) + 1, 12)):
            when = admit + timedelta(days=d, hours=float(rng.uniform(0.5, 10)))
            if when < disch and rng.random() < (0.5 if fewer else 0.8):
                labs += _draws(rng, when, hadm, phys, priority, findings, z, fewer, first=False)
        if rng.random() < 0.2:
            labs += _draws(rng, disch + timedelta(days=float(rng.uniform(7, 30))), None, phys, "ROUTINE",
                           findings, z, fewer)
    else:
        p_labs = {"ed": 0.75, "outpatient": 0.25}[kind] * (0.6 if fewer else 1.0)
        if rng.random() < p_labs:
            when = t + timedelta(days=float(rng.uniform(-10, 10)) if kind == "outpatient" else 0,
                                 hours=float(rng.uniform(-2, 2)))
            labs += _draws(rng, when, None, phys, priority, findings, z, fewer)
    for i, when in enumerate(study_times):
        if i:                                         # findings evolve between studies of one admission
            findings, sides, severity = _evolve(rng, findings, sides, severity, z, age, chronic, portable, devices)
        exam, views = _views(rng, portable)
        studies.append(Study(subject_id=0, when=when.replace(microsecond=int(rng.integers(0, 1000)) * 1000),
                             age=age, sex=sex, findings=findings, sides=sides, severity=severity,
                             devices=devices, portable=portable, exam=exam, views=views))


def _draws(rng, when, hadm, phys, priority, findings, z, fewer, first=True) -> list[dict]:
    return ehr.draw_labs(rng, subject_id=0, hadm=hadm, when=when.replace(second=0, microsecond=0), phys=phys,
                         priority=priority, first=first, truth=findings, z=z, fewer=fewer)


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
    """Worker: draw one image from its own seed and write it; returns bytes written."""
    path, spec, size, difficulty, seed, index = task
    pixels = render(spec, size, difficulty, np.random.default_rng([seed, 2, index]))
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=95)
    # Temp file + rename (no fsync per image: 50k fsyncs would dominate; a crash leaves no partial JPEG).
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return len(buf.getvalue())


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
        problems.append(f"--workers must be a positive integer, got {workers!r}")
    return problems


def _prepare_out(out: Path) -> None:
    """Allow an empty/new folder or a previous synth output (regenerated); refuse anything else."""
    if out.exists() and not out.is_dir():
        raise RadalignError(f"--out {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise RadalignError(f"--out {out} is not empty and holds no {MARKER} from an earlier `data synth`; "
                            "choose an empty or new folder (synth replaces what it writes)")
    # A previous run's images/reports may have other ids; remove our own trees so no stale file remains.
    for sub in ("mimic-cxr-jpg/files", "mimic-cxr-reports/files"):
        if (out / sub).is_dir() and (out / MARKER).exists():
            shutil.rmtree(out / sub)
    (out / MARKER).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def synthesize(out_dir, *, patients: int = 2000, seed: int = 0, image_size: int = 256,
               difficulty: float = 0.3, workers: int = 1, progress: bool = True) -> dict:
    """Write the synthetic MIMIC stand-in under `out_dir`; returns counts and the paths written."""
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
    latin1 = set(ids_rng.choice(len(studies), size=max(1, round(0.01 * len(studies))), replace=False).tolist())
    absent = set(ids_rng.choice(len(studies), size=max(1, round(0.01 * len(studies))), replace=False).tolist()) \
        if len(studies) >= 3 else set()

    jpg_root, rep_root = out / "mimic-cxr-jpg", out / "mimic-cxr-reports"
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
                tasks.append((jpg_root / jpg_rel, spec, image_size, difficulty, seed, len(tasks)))
                gt_rows.append({"dicom_id": dicom, "study_id": s.study_id, "subject_id": subject, "view": drawn,
                                **s.findings, **{f"{n} side": s.sides.get(n, "") for n in SIDED},
                                "devices": ";".join(s.devices)})
                label_rows.append({"Path": f"mimic-cxr-jpg/{jpg_rel.as_posix()}",
                                   "Sex": "Male" if s.sex == "M" else "Female", "Age": s.age,
                                   "Frontal/Lateral": "Lateral" if drawn == "LATERAL" else "Frontal",
                                   "AP/PA": vp if vp in ("AP", "PA", "LL") else "",
                                   **(labels["chexpert"] if k - 1 not in absent else {})})
        for row in (*rec.admissions, *rec.labs):
            row["subject_id"] = subject

    bytes_written = _write_images(tasks, workers, progress)
    paths = _write_tables(out, records, meta, split_rows, cx_rows, gt_rows, label_rows)
    summary = {
        "patients": patients, "studies": len(studies), "images": len(tasks), "reports": len(studies),
        "lab_rows": sum(len(r.labs) for r in records), "admissions": n_adm,
        "studies_without_admission": sum(1 for r in records for s in r.studies if not _in_admission(s, r)),
        "studies_absent_from_label_files": len(absent), "latin1_reports": len(latin1),
        "report_styles": dict(sorted(styles.items())), "image_bytes": bytes_written,
        "args": {"patients": patients, "seed": seed, "image_size": image_size, "difficulty": difficulty},
        "paths": {**paths, "images": str(jpg_root / "files"), "reports": str(rep_root / "files")},
    }
    atomic_write_json(out / MARKER, summary)
    log.info(f"wrote {summary['images']} images, {summary['studies']} reports, {summary['lab_rows']} lab rows "
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


def _in_admission(s: Study, r: PatientRecord) -> bool:
    t = s.when.strftime("%Y-%m-%d %H:%M:%S")
    return any((a["edregtime"] or a["admittime"]) <= t <= a["dischtime"] for a in r.admissions)


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


def _write_tables(out: Path, records, meta, split_rows, cx_rows, gt_rows, label_rows) -> dict[str, str]:
    jpg, hosp = out / "mimic-cxr-jpg", out / "mimic-iv" / "hosp"
    paths = {
        "metadata": jpg / "mimic-cxr-2.0.0-metadata.csv.gz", "split": jpg / "mimic-cxr-2.0.0-split.csv.gz",
        "chexpert": jpg / "mimic-cxr-2.0.0-chexpert.csv.gz", "negbio": jpg / "mimic-cxr-2.0.0-negbio.csv.gz",
        "patients": hosp / "patients.csv.gz", "admissions": hosp / "admissions.csv.gz",
        "labevents": hosp / "labevents.csv.gz", "d_labitems": hosp / "d_labitems.csv.gz",
        "chexpert_format": out / "chexpert-format.csv", "ground_truth": out / "ground_truth.csv.gz",
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
    _gz_csv(paths["patients"], pd.DataFrame([r.row for r in records], columns=ehr.PATIENT_COLUMNS))
    adm = pd.DataFrame([a for r in records for a in r.admissions], columns=ehr.ADMISSION_COLUMNS)
    _gz_csv(paths["admissions"], adm.sort_values(["subject_id", "admittime"]))
    _gz_csv(paths["labevents"], _labevents(records))
    _gz_csv(paths["d_labitems"], pd.DataFrame(ehr.d_labitems_rows(), columns=ehr.D_LABITEMS_COLUMNS))
    return {k: str(v) for k, v in paths.items()}


def _labevents(records) -> pd.DataFrame:
    labs = pd.DataFrame([lab for r in records for lab in r.labs], columns=ehr.LAB_COLUMNS)
    labs = labs.sort_values(["subject_id", "charttime", "itemid"], kind="stable").reset_index(drop=True)
    labs["labevent_id"] = np.arange(1, len(labs) + 1)
    labs["hadm_id"] = labs["hadm_id"].astype("Int64")          # ints with blanks, as in the real file
    return labs


def synth_complete(out_dir, *, patients: int, seed: int, image_size: int, difficulty: float) -> bool:
    """True when `out_dir` holds a finished synth run with these arguments (callers may skip regenerating)."""
    import json

    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        return False
    try:
        args = json.loads(marker.read_text()).get("args", {})
    except (OSError, ValueError):
        return False
    return args == {"patients": patients, "seed": seed, "image_size": image_size, "difficulty": float(difficulty)}


__all__ = ["synthesize", "synth_complete", "METADATA_COLUMNS", "SPLIT_COLUMNS", "LABEL_COLUMNS",
           "CHEXPERT_FORMAT_COLUMNS", "GROUND_TRUTH_COLUMNS"]

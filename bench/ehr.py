"""EHR link benchmark (never part of CI): `data.ehr` (DuckDB) vs a plain pandas implementation of the same rule.

    .venv/bin/python bench/ehr.py [--rows 1e6,1e7] [--memory-limit 2GB] [--threads 0] [--keep DIR]

For each size N: a MIMIC-IV-like `hosp/` (labevents.csv.gz with N rows in the real 16-column layout, 13
feature itemids among 40 itemids, 1% `___` values, 5% blank storetime, labs clustered around the films,
patients, admissions, d_labitems) and matching studies (one per 270 lab rows, like MIMIC-CXR x MIMIC-IV).
Then, each in its own child process (peak RSS from the kernel's rusage of that process, `bench.common`):

* ours, cold: `data.ehr.link_frame` from the gzipped CSV (includes the one-off Parquet conversion);
* ours, warm: the same with the cache in place (what every later run with other options costs);
* pandas: `read_csv` of the gzipped CSV (usecols, parsed dates), filter, merge on subject, window and
  availability masks, sort, keep the latest per (study, item), pivot.

The lab columns (`{name}`, `{name}_hours`) of ours and pandas must be equal (asserted). Prints seconds, peak
RSS, the time ratio and our RSS growth between the smallest and the largest size.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from bench.common import REPO, ratio, run_measured, table  # noqa: E402

FEATURES = {"creatinine": 50912, "white_blood_cells": 51301, "hemoglobin": 51222, "platelets": 51265,
            "sodium": 50983, "potassium": 50971, "urea_nitrogen": 51006, "bicarbonate": 50882, "glucose": 50931,
            "lactate": 50813, "ntprobnp": 50963, "troponin_t": 51003, "crp": 50889}
OTHER_ITEMS = list(range(51000, 51054, 2))[:27]           # 27 itemids that are not features
LAB_COLS = ["labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "order_provider_id", "charttime",
            "storetime", "value", "valuenum", "valueuom", "ref_range_lower", "ref_range_upper", "flag", "priority",
            "comments"]
LABS_PER_STUDY = 270          # MIMIC-IV labevents 118M rows / ~440k CXR-like studies of the linked subjects
STUDIES_PER_SUBJECT = 3
WINDOW_H = 24.0
BASE = np.datetime64("2150-01-01T00:00:00", "s")


# ----------------------------------------------------------------------------------------------------------
# Inputs (vectorised numpy -> pyarrow CSV writer with gzip).


def _write_csv_gz(path: Path, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    path.parent.mkdir(parents=True, exist_ok=True)
    tbl = pa.table(columns)
    with gzip.open(path, "wb", compresslevel=1) as f:   # level 1: generation time; reading speed is the same
        pcsv.write_csv(tbl, f, pcsv.WriteOptions(batch_size=1 << 16))


def generate(root: Path, n_rows: int, seed: int = 0) -> dict:
    """hosp/ tables and studies.parquet under `root`; returns sizes."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng([seed, n_rows])
    n_studies = max(100, n_rows // LABS_PER_STUDY)
    n_subj = max(30, n_studies // STUDIES_PER_SUBJECT)
    subjects = 10_000_000 + np.arange(n_subj, dtype=np.int64)
    st_subj = np.sort(rng.integers(0, n_subj, n_studies))
    st_time = BASE + rng.integers(0, 5 * 365 * 86400, n_studies).astype("timedelta64[s]")
    st_time += rng.integers(0, 1000, n_studies).astype("timedelta64[ms]")
    hosp = root / "mimic-iv" / "hosp"
    _write_csv_gz(hosp / "patients.csv.gz", {
        "subject_id": subjects, "gender": pa.repeat("F", n_subj), "anchor_age": rng.integers(18, 90, n_subj),
        "anchor_year": np.full(n_subj, 2150), "anchor_year_group": pa.repeat("2014 - 2016", n_subj),
        "dod": pa.nulls(n_subj, pa.string())})
    adm_idx = rng.choice(n_studies, n_studies // 2, replace=False)           # half the films are inpatient
    admit = st_time[adm_idx].astype("datetime64[s]") - rng.integers(0, 3 * 3600, len(adm_idx)).astype("timedelta64[s]")
    _write_csv_gz(hosp / "admissions.csv.gz", {
        "subject_id": subjects[st_subj[adm_idx]], "hadm_id": 20_000_000 + np.arange(len(adm_idx)),
        "admittime": admit, "dischtime": admit + rng.integers(1, 20 * 86400, len(adm_idx)).astype("timedelta64[s]"),
        "deathtime": pa.nulls(len(adm_idx), pa.timestamp("s")), "edregtime": pa.nulls(len(adm_idx), pa.timestamp("s")),
        "hospital_expire_flag": rng.integers(0, 2, len(adm_idx)),
        "race": pa.repeat("WHITE", len(adm_idx)), "insurance": pa.repeat("Medicare", len(adm_idx)),
        "marital_status": pa.repeat("MARRIED", len(adm_idx)), "language": pa.repeat("ENGLISH", len(adm_idx))})
    _write_csv_gz(hosp / "d_labitems.csv.gz", {
        "itemid": np.array(list(FEATURES.values()) + OTHER_ITEMS),
        "label": [n.replace("_", " ").title() for n in FEATURES] + [f"Other {i}" for i in OTHER_ITEMS],
        "fluid": pa.repeat("Blood", len(FEATURES) + len(OTHER_ITEMS)),
        "category": pa.repeat("Chemistry", len(FEATURES) + len(OTHER_ITEMS))})
    # Labs: 60% clustered in [-48 h, +24 h] around one of the subject's films, the rest anywhere on its timeline.
    which = rng.integers(0, n_studies, n_rows)
    near = rng.random(n_rows) < 0.6
    offset = np.where(near, rng.integers(-48 * 3600, 24 * 3600, n_rows), rng.integers(-400 * 86400, 400 * 86400, n_rows))
    chart = (st_time[which].astype("datetime64[m]") + (offset // 60).astype("timedelta64[m]")).astype("datetime64[s]")
    store = chart + rng.integers(10 * 60, 300 * 60, n_rows).astype("timedelta64[s]")
    items = np.array(list(FEATURES.values()) + OTHER_ITEMS)
    itemid = items[np.where(rng.random(n_rows) < 0.5, rng.integers(0, 13, n_rows), rng.integers(13, len(items), n_rows))]
    val = np.round(rng.lognormal(1.5, 0.8, n_rows), 1)
    bad = rng.random(n_rows) < 0.01
    valuenum = pa.array(val, mask=bad)
    value = pc.if_else(pa.array(bad), "___", pc.cast(valuenum, pa.string()))
    blank = rng.random(n_rows) < 0.05
    hadm = pa.array(20_000_000 + rng.integers(0, max(1, len(adm_idx)), n_rows), mask=rng.random(n_rows) < 0.4)
    _write_csv_gz(hosp / "labevents.csv.gz", {
        "labevent_id": np.arange(1, n_rows + 1), "subject_id": subjects[st_subj[which]], "hadm_id": hadm,
        "specimen_id": rng.integers(10_000_000, 99_999_999, n_rows), "itemid": itemid,
        "order_provider_id": pa.nulls(n_rows, pa.string()), "charttime": chart,
        "storetime": pa.array(store, mask=blank), "value": value, "valuenum": valuenum,
        "valueuom": pa.repeat("mg/dL", n_rows), "ref_range_lower": np.full(n_rows, 0.5),
        "ref_range_upper": np.full(n_rows, 1.2), "flag": pa.nulls(n_rows, pa.string()),
        "priority": pa.repeat("STAT", n_rows), "comments": pa.nulls(n_rows, pa.string())})
    pq.write_table(pa.table({"subject_id": subjects[st_subj], "study_id": 50_000_000 + np.arange(n_studies),
                             "split": pa.repeat("train", n_studies),
                             "study_datetime": pa.array(st_time.astype("datetime64[us]"))}), root / "studies.parquet")
    return {"rows": n_rows, "studies": n_studies, "subjects": n_subj,
            "labevents_mb": (hosp / "labevents.csv.gz").stat().st_size / 2**20}


# ----------------------------------------------------------------------------------------------------------
# The two implementations (run in child processes).


def child_ours(root: Path, out: Path, memory_limit: str, threads: int) -> None:
    import pandas as pd
    from radalign.data.ehr import find_tables, link_frame, load_feature_list

    flist, _ = load_feature_list("ehr/core")
    flist.vitals = {}
    studies = pd.read_parquet(root / "studies.parquet")
    studies["study_datetime"] = studies["study_datetime"].astype("datetime64[us]")
    tables = find_tables(root / "mimic-iv", vitals=False)
    seconds: dict = {}
    frame, counts = link_frame(studies, tables, flist, window_hours=WINDOW_H, cache_dir=root / "cache",
                               memory_limit=memory_limit, threads=threads, seconds=seconds)
    cols = ["subject_id", "study_id"] + [c for n in FEATURES for c in (n, f"{n}_hours")]
    frame[cols].to_parquet(out)
    print(json.dumps({"seconds": seconds, "cache": counts["cache"]["labevents"]["cache"],
                      "engine": counts["cache"]["labevents"].get("engine"), "cpu_s": _cpu_seconds()}))


def child_pandas(root: Path, out: Path) -> None:
    import pandas as pd

    studies = pd.read_parquet(root / "studies.parquet")
    studies["t0"] = studies["study_datetime"].astype("datetime64[ns]")
    labs = pd.read_csv(root / "mimic-iv" / "hosp" / "labevents.csv.gz",
                       usecols=["subject_id", "itemid", "charttime", "storetime", "valuenum"],
                       parse_dates=["charttime", "storetime"], dtype={"valuenum": "string"})
    labs["valuenum"] = pd.to_numeric(labs["valuenum"], errors="coerce")
    by_id = {v: k for k, v in FEATURES.items()}
    labs = labs[labs["itemid"].isin(by_id) & labs["valuenum"].notna()]
    labs["avail"] = labs["storetime"].fillna(labs["charttime"])
    m = studies[["subject_id", "study_id", "t0"]].merge(labs, on="subject_id")
    m = m[(m["charttime"] >= m["t0"] - pd.Timedelta(hours=WINDOW_H)) & (m["charttime"] < m["t0"])
          & (m["avail"] <= m["t0"])]
    m = m.sort_values(["study_id", "itemid", "charttime", "avail", "valuenum"])
    last = m.groupby(["study_id", "itemid"]).tail(1).copy()
    last["hours"] = (last["t0"] - last["charttime"]).dt.total_seconds() / 3600
    last["name"] = last["itemid"].map(by_id)
    wide = studies[["subject_id", "study_id"]].set_index("study_id")
    for name in FEATURES:
        part = last[last["name"] == name].set_index("study_id")
        wide[name] = part["valuenum"].reindex(wide.index)
        wide[f"{name}_hours"] = part["hours"].reindex(wide.index)
    wide.reset_index()[["subject_id", "study_id"] + [c for n in FEATURES for c in (n, f"{n}_hours")]].to_parquet(out)
    print(json.dumps({"cpu_s": _cpu_seconds()}))


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads: the measure the other agents' load on the
    shared cores does not inflate (wall time does)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return round(r.ru_utime + r.ru_stime, 2)


# ----------------------------------------------------------------------------------------------------------
# The parent.


def _child(kind: str, root: Path, out: Path, args) -> object:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--dir", str(root), "--result", str(out),
           "--memory-limit", args.memory_limit, "--threads", str(args.threads)]
    run = run_measured(cmd, cwd=REPO)
    if run.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{run.output[-3000:]}")
    run.info = json.loads(run.output.strip().splitlines()[-1])
    return run


def _assert_equal(a: Path, b: Path) -> None:
    import pandas as pd

    x = pd.read_parquet(a).sort_values("study_id").reset_index(drop=True)
    y = pd.read_parquet(b).sort_values("study_id").reset_index(drop=True)
    assert list(x["study_id"]) == list(y["study_id"]), "different studies"
    for col in x.columns:
        u, v = x[col].astype("float64").to_numpy(), y[col].astype("float64").to_numpy()
        assert np.allclose(u, v, equal_nan=True, atol=1e-9), f"column {col} differs"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1e6,1e7", help="labevents sizes, comma-separated (default: %(default)s)")
    p.add_argument("--memory-limit", default="2GB")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--keep", metavar="DIR", help="keep the generated inputs here (default: a temporary folder)")
    p.add_argument("--child", choices=("ours", "pandas"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "ours":
        child_ours(Path(args.dir), Path(args.result), args.memory_limit, args.threads)
        return 0
    if args.child == "pandas":
        child_pandas(Path(args.dir), Path(args.result))
        return 0
    sizes = [int(float(s)) for s in args.rows.split(",")]
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-ehr-"))
    rows, ours_rss = [], []
    try:
        for n in sizes:
            root = base / f"n{n}"
            if not (root / "studies.parquet").is_file():
                import time

                t = time.perf_counter()
                info = generate(root, n)
                print(f"generated {n:,} lab rows ({info['labevents_mb']:.0f} MiB gz), {info['studies']:,} studies "
                      f"in {time.perf_counter() - t:.0f} s", flush=True)
            shutil.rmtree(root / "cache", ignore_errors=True)
            cold = _child("ours", root, root / "ours.parquet", args)
            warm = _child("ours", root, root / "ours.parquet", args)
            pdr = _child("pandas", root, root / "pandas.parquet", args)
            _assert_equal(root / "ours.parquet", root / "pandas.parquet")
            ours_rss.append(max(cold.peak_rss_mb, warm.peak_rss_mb))
            cpu = [r.info["cpu_s"] for r in (cold, warm, pdr)]
            rows.append([f"{n:,}", cold.seconds, warm.seconds, pdr.seconds, ratio(pdr.seconds, cold.seconds),
                         ratio(pdr.seconds, warm.seconds), *cpu, ratio(cpu[2], cpu[0]), cold.peak_rss_mb,
                         warm.peak_rss_mb, pdr.peak_rss_mb])
            print(f"  {n:,} rows: outputs equal; ours cold {cold.seconds:.1f} s ({cpu[0]:.1f} CPU-s, "
                  f"{cold.info['engine']} conversion) / {cold.peak_rss_mb:.0f} MiB, warm {warm.seconds:.1f} s "
                  f"({cpu[1]:.1f} CPU-s) / {warm.peak_rss_mb:.0f} MiB; pandas {pdr.seconds:.1f} s ({cpu[2]:.1f} "
                  f"CPU-s) / {pdr.peak_rss_mb:.0f} MiB; load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(table(["labevents rows", "ours cold s", "ours warm s", "pandas s", "speed-up cold", "speed-up warm",
                 "ours cold CPU-s", "ours warm CPU-s", "pandas CPU-s", "CPU ratio cold", "ours cold RSS MiB", "ours warm RSS MiB", "pandas RSS MiB"], rows))
    if len(ours_rss) > 1:
        print(f"our peak RSS grows {ours_rss[-1] / ours_rss[0]:.2f}x from {sizes[0]:,} to {sizes[-1]:,} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How much the film can add to the EHR the finetune stage sees, on the generator's own truth.

One gradient-boosted model (scikit-learn's HistGradientBoosting, NaN as missing; the settings of
`radalign.data.synth.ehr.truth_table`) per feature set, fitted on the train split's admitted studies and scored (AUROC,
unit: study) on the test split for in-hospital mortality: the link-ehr table's features (labs, their hours,
ICU vitals, age, demographics), the film's true findings, both, and the labs without the vitals.

    .venv/bin/python bench/ehr_truth.py --synthetic runs/ihm12k/synthetic --ehr runs/ihm12k/ehr

Needs a `radalign data synth` folder and its `radalign data link-ehr` output (docs/synthetic-data.md,
"Why version 4").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

CATEGORICAL = ("gender", "insurance", "race", "marital_status", "language")
VITALS = ("heart_rate", "respiratory_rate", "spo2", "temperature", "nibp")


def main(argv=None) -> None:
    from radalign.data.synth.ehr import _study_findings
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", type=Path, required=True, help="radalign data synth output")
    ap.add_argument("--ehr", type=Path, required=True, help="radalign data link-ehr output (ehr.parquet)")
    args = ap.parse_args(argv)
    ehr = pd.read_parquet(args.ehr / "ehr.parquet")
    findings = _study_findings(args.synthetic)
    t = ehr.merge(findings, on="study_id", how="left")
    t = t[t["in_hospital_mortality"].notna()].copy()
    measured = [c[: -len("_hours")] for c in ehr.columns if c.endswith("_hours")]
    ehr_cols = [*measured, *[f"{c}_hours" for c in measured], "age"]
    for c in CATEGORICAL:
        t[f"{c}_code"] = t[c].astype("category").cat.codes
        ehr_cols.append(f"{c}_code")
    film_cols = [c for c in findings.columns if c != "study_id"]
    train, test = t[t["split"] == "train"], t[t["split"] == "test"]

    def auroc(cols):
        m = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=20,
                                           early_stopping=False, random_state=0)
        m.fit(train[cols].to_numpy(float), train["in_hospital_mortality"].astype(int))
        return roc_auc_score(test["in_hospital_mortality"].astype(int), m.predict_proba(test[cols].to_numpy(float))[:, 1])

    with threadpool_limits(1):
        rows = {"EHR table": auroc(ehr_cols), "findings": auroc(film_cols), "both": auroc(ehr_cols + film_cols),
                "labs + demographics (no vitals)": auroc([c for c in ehr_cols if not c.startswith(VITALS)])}
    print(f"in-hospital mortality, test split: {len(test)} admitted studies, "
          f"{int(test['in_hospital_mortality'].sum())} deaths; AUROC by study")
    for name, v in rows.items():
        print(f"  {name:34s} {v:.3f}")
    print(f"  both - EHR table                   {rows['both'] - rows['EHR table']:+.3f}")


if __name__ == "__main__":
    main()

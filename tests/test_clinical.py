"""Clinical evaluation: intervals over patients, operating points, calibration and temperature scaling,
subgroups and missingness patterns, graceful degradation, and the Markdown report.

Expectations are independent of the code under test: sklearn (roc_auc_score, average_precision_score,
roc_curve, brier_score_loss), rows expanded with np.repeat instead of weights, a grid search for the
temperature, counts made by a plain loop over rows, and hand-worked values.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser

import markdown
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from radalign.finetune import clinical as C
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score, roc_curve

from radalign import RadalignError
from radalign import metrics as M
from radalign import report as R

EVIL = "<script>alert('x')</script>"
N_BOOT = 200


def cohort(n_pat=120, seed=0, films=(1, 4)):
    """Patients with 1-3 films each; score informative of y."""
    rng = np.random.default_rng(seed)
    per = rng.integers(films[0], films[1], n_pat)
    pid = np.repeat(np.arange(n_pat), per)
    risk = rng.normal(size=n_pat)[pid]
    y = (rng.random(pid.size) < 1 / (1 + np.exp(-(risk * 1.5 - 1)))).astype(float)
    score = risk + rng.normal(scale=1.0, size=pid.size)
    return y, score, pid


def sklearn_sens_at_spec(y, s, target=0.9):
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return tpr[(1 - fpr) >= target - 1e-12].max()


def sklearn_spec_at_sens(y, s, target=0.9):
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return (1 - fpr)[tpr >= target - 1e-12].max()


# ----------------------------------------------------------------------------------------------------------
# Operating-point metrics


def test_sens_at_spec_and_spec_at_sens_match_sklearn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300).astype(float)
    s = np.round(y + rng.normal(size=300), 1)  # many ties
    ones = np.ones((1, 300))
    assert C.sensitivity_at_specificity(y, s, ones)[0] == pytest.approx(sklearn_sens_at_spec(y, s))
    assert C.specificity_at_sensitivity(y, s, ones)[0] == pytest.approx(sklearn_spec_at_sens(y, s))
    w = rng.integers(0, 4, size=(3, 300)).astype(float)
    for b in range(3):  # weights = rows repeated
        yr, sr = np.repeat(y, w[b].astype(int)), np.repeat(s, w[b].astype(int))
        assert C.sensitivity_at_specificity(y, s, w)[b] == pytest.approx(sklearn_sens_at_spec(yr, sr))
        assert C.specificity_at_sensitivity(y, s, w)[b] == pytest.approx(sklearn_spec_at_sens(yr, sr))
    assert np.isnan(C.sensitivity_at_specificity(np.zeros(5), np.arange(5.0), np.ones((1, 5)))[0])


def test_sens_at_spec_hand_worked():
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1], float)
    s = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 9, 11], float)
    # 90% specificity allows 1 of 10 negatives above the threshold: threshold 9 catches both positives
    assert C.sensitivity_at_specificity(y, s, np.ones((1, 12)))[0] == pytest.approx(1.0)
    # 90% sensitivity needs both positives (threshold 9): 9 of 10 negatives below
    assert C.specificity_at_sensitivity(y, s, np.ones((1, 12)))[0] == pytest.approx(0.9)


# ----------------------------------------------------------------------------------------------------------
# evaluate_binary


def test_evaluate_binary_values_match_sklearn():
    y, s, pid = cohort()
    rng = np.random.default_rng(2)
    base = s + rng.normal(scale=2.0, size=s.size)
    res = C.evaluate_binary(y, s, pid, baselines={"image_only": base}, n_boot=N_BOOT, seed=3)
    m = res["metrics"]
    assert m["auroc"]["value"] == pytest.approx(roc_auc_score(y, s))
    assert m["auprc"]["value"] == pytest.approx(average_precision_score(y, s))
    assert m["sensitivity_at_90_specificity"]["value"] == pytest.approx(sklearn_sens_at_spec(y, s))
    assert m["specificity_at_90_sensitivity"]["value"] == pytest.approx(sklearn_spec_at_sens(y, s))
    for v in m.values():
        assert v["unit"] == "patient" and v["n_patients"] == 120 and v["ci_low"] <= v["value"] <= v["ci_high"]
    d = res["paired_differences"]["image_only"]["auroc"]
    assert d["delta"] == pytest.approx(roc_auc_score(y, s) - roc_auc_score(y, base))
    assert d["ci_low"] <= d["delta"] <= d["ci_high"]
    assert res["n_patients"] == 120 and res["n_rows"] == y.size and res["unit"] == "patient"


def test_every_film_duplicated_gives_the_same_intervals():
    y, s, pid = cohort(seed=4)
    base = s[::-1].copy()
    kw = dict(n_boot=N_BOOT, seed=7)
    one = C.evaluate_binary(y, s, pid, baselines={"b": base}, **kw)
    two = C.evaluate_binary(np.repeat(y, 2), np.repeat(s, 2), np.repeat(pid, 2),
                            baselines={"b": np.repeat(base, 2)}, **kw)
    for k in one["metrics"]:
        for key in ("value", "ci_low", "ci_high"):
            assert two["metrics"][k][key] == pytest.approx(one["metrics"][k][key], abs=1e-12), (k, key)
    for key in ("delta", "ci_low", "ci_high"):
        ref = one["paired_differences"]["b"]["auroc"][key]
        assert two["paired_differences"]["b"]["auroc"][key] == pytest.approx(ref, abs=1e-12)
    # control: treating the duplicates as new patients (film-level resampling) narrows the interval
    films = C.evaluate_binary(np.repeat(y, 2), np.repeat(s, 2), np.arange(2 * y.size), **kw)
    width = lambda r: r["metrics"]["auroc"]["ci_high"] - r["metrics"]["auroc"]["ci_low"]  # noqa: E731
    assert width(films) < 0.85 * width(one)


def test_thresholds_never_see_test_labels(monkeypatch):
    y, s, pid = cohort(seed=5)
    yv, sv, _ = cohort(n_pat=80, seed=6)
    seen = []
    real = M.choose_threshold

    def spy(y_arg, s_arg, *a, **k):
        seen.append((np.asarray(y_arg).copy(), np.asarray(s_arg).copy()))
        return real(y_arg, s_arg, *a, **k)

    monkeypatch.setattr(C.M, "choose_threshold", spy)
    a = C.evaluate_binary(y, s, pid, val=(yv, sv), n_boot=20)
    flipped = 1 - y  # test labels that would move a test-chosen threshold far
    b = C.evaluate_binary(flipped, s, pid, val=(yv, sv), n_boot=20)
    assert a["operating_point"]["threshold"] == b["operating_point"]["threshold"]
    assert real(y, s) != real(flipped, s)  # a chooser given test labels would have moved
    assert len(seen) == 2
    for ys, ss in seen:
        assert np.array_equal(ys, yv) and np.array_equal(ss, sv)
    op = a["operating_point"]
    assert op["chosen_on"] == "validation" and op["rule"] == "youden" and op["n_validation"] == yv.size
    t = op["threshold"]  # test counts by hand at the validation threshold
    pred = s >= t
    assert op["test"]["tp"] == int((pred & (y == 1)).sum())
    assert op["test"]["tn"] == int((~pred & (y == 0)).sum())
    assert op["test"]["sensitivity"] == pytest.approx((pred & (y == 1)).sum() / (y == 1).sum())
    # a target-sensitivity rule: validation sensitivity at the threshold reaches the target
    tgt = C.evaluate_binary(y, s, pid, val=(yv, sv), n_boot=20, threshold_rule="sensitivity",
                            threshold_target=0.9)
    thr = tgt["operating_point"]["threshold"]
    assert (sv[yv == 1] >= thr).mean() >= 0.9


def test_evaluate_binary_bad_input():
    y, s, pid = cohort(n_pat=10)
    with pytest.raises(RadalignError, match="other than 0/1"):
        C.evaluate_binary(np.where(y == 1, 2.0, 0.0), s, pid, n_boot=5)
    bad = s.copy()
    bad[0] = np.nan
    with pytest.raises(RadalignError, match="1 NaN or infinite"):
        C.evaluate_binary(y, bad, pid, n_boot=5)
    with pytest.raises(RadalignError, match="rule 'f1': use one of youden, sensitivity, specificity"):
        C.choose_operating_point(y, s, rule="f1")
    with pytest.raises(RadalignError, match="needs a target"):
        C.choose_operating_point(y, s, rule="sensitivity")
    with pytest.raises(RadalignError, match="patient ids for"):
        C.evaluate_binary(y, s, pid[:-1], n_boot=5)
    yn = y.copy()
    yn[:3] = np.nan  # unknown labels are left out and counted
    res = C.evaluate_binary(yn, s, pid, n_boot=5)
    assert res["n_rows_unlabelled"] == 3
    assert res["metrics"]["auroc"]["value"] == pytest.approx(roc_auc_score(y[3:], s[3:]))


# ----------------------------------------------------------------------------------------------------------
# Calibration


def test_ece_brier_hand_worked_and_sklearn():
    y = np.array([0, 0, 1, 1], float)
    p = np.array([0.1, 0.3, 0.6, 0.8])
    # 2 equal-mass bins: {0.1, 0.3} mean 0.2 observed 0; {0.6, 0.8} mean 0.7 observed 1 -> 0.5*0.2 + 0.5*0.3
    assert C.expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.25)
    assert [b["n"] for b in C.calibration_bins(y, p, n_bins=2)] == [2, 2]
    assert C.brier_score(y, p) == pytest.approx(brier_score_loss(y, p))
    rng = np.random.default_rng(0)
    pp = rng.random(1003)
    yy = (rng.random(1003) < pp).astype(float)
    bins = C.calibration_bins(yy, pp, n_bins=10)
    assert len(bins) == 10 and sum(b["n"] for b in bins) == 1003 and {b["n"] for b in bins} <= {100, 101}
    assert C.calibration_bins(y, p, n_bins=10) and len(C.calibration_bins(y, p, n_bins=10)) == 4


def overconfident(n, seed, factor=4.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=1.5, size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    return y, factor * z  # true logits z, reported logits 4 z: far too confident


def test_temperature_scaling_fixes_an_overconfident_model():
    yv, zv = overconfident(4000, seed=1)
    t = C.fit_temperature(yv, zv)
    grid = np.exp(np.linspace(np.log(0.5), np.log(10), 2001))  # independent: NLL on a grid
    nll = [np.mean(np.logaddexp(0, zv / g) - yv * zv / g) for g in grid]
    assert t == pytest.approx(grid[int(np.argmin(nll))], rel=2e-3)
    assert 3.0 < t < 5.0
    y, z = overconfident(3000, seed=2)
    cal = C.calibration_report(y, z, yv, zv, n_bins=15)
    assert {"ece_before", "ece_after", "brier_before", "brier_after", "temperature", "bins"} <= set(cal)
    assert cal["bins"] == 15 and cal["binning"] == "equal-mass" and cal["fitted_on"] == "validation"
    assert cal["validation_ece_after"] < 0.5 * cal["validation_ece_before"]
    assert cal["ece_after"] < cal["ece_before"] and cal["brier_after"] < cal["brier_before"]
    p = 1 / (1 + np.exp(-z))
    assert cal["brier_before"] == pytest.approx(brier_score_loss(y, p))
    assert cal["temperature"] == pytest.approx(t)
    # the temperature is fitted on validation only: other test labels do not move it
    assert C.calibration_report(1 - y, z, yv, zv)["temperature"] == pytest.approx(t)


def test_temperature_needs_both_classes():
    with pytest.raises(RadalignError, match="both classes"):
        C.fit_temperature(np.zeros(10), np.arange(10.0))


def test_reliability_diagram_png(tmp_path):
    y, z = overconfident(500, seed=3)
    out = tmp_path / "reliability.png"
    R.reliability_plot(out, {"before": C.calibration_bins(y, C.sigmoid(z)),
                                "after": C.calibration_bins(y, C.sigmoid(z / 4))}, title=EVIL)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_to_logit_round_trip():
    p = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
    z = C.to_logit(p)
    assert np.isfinite(z).all() and C.sigmoid(z)[1:4] == pytest.approx(p[1:4])


# ----------------------------------------------------------------------------------------------------------
# Subgroups and missingness


def ehr_frame(n_pat=200, seed=0):
    rng = np.random.default_rng(seed)
    y, s, pid = cohort(n_pat, seed=seed)
    n = y.size
    labs = {f: np.where(rng.random(n) < 0.6, rng.normal(size=n), np.nan) for f in ("lactate", "creatinine")}
    frame = pd.DataFrame({"gender": rng.choice(["F", "M"], n), "age": rng.uniform(20, 95, n),
                          "race": rng.choice(["WHITE", "BLACK", None], n, p=[0.6, 0.3, 0.1]),
                          "insurance": rng.choice(["Medicare", "Other"], n), **labs})
    present = {"image": np.ones(n, bool), "ehr": frame[list(labs)].notna().any(axis=1).to_numpy(),
               "text": rng.random(n) < 0.7}
    return frame, present, y, 1 / (1 + np.exp(-s)), pid  # probabilities


def test_missingness_pattern_counts_match_the_data():
    frame, present, y, s, pid = ehr_frame()
    frame = C.add_group_columns(frame, present, ["lactate", "creatinine"])
    counts: dict = {}
    for i in range(len(frame)):  # by hand, row by row
        key = "+".join(m for m in ("image", "ehr", "text") if present[m][i])
        counts[key] = counts.get(key, 0) + 1
    res = C.subgroup_table(frame, y, s, pid, ["modalities", "labs"], n_boot=20, min_count=5)
    groups = res["columns"]["modalities"]["groups"]
    assert {g: r["n"] for g, r in groups.items()} == counts
    n_labs = sum(1 for i in range(len(frame))
                 if not (np.isnan(frame["lactate"][i]) and np.isnan(frame["creatinine"][i])))
    labs = res["columns"]["labs"]["groups"]
    assert labs["labs present"]["n"] == n_labs and labs["labs absent"]["n"] == len(frame) - n_labs
    for g, r in groups.items():
        m = frame["modalities"].to_numpy() == g
        assert r["n_positive"] == int(y[m].sum())
    assert list(C.modality_pattern({"image": [False], "ehr": [False]})) == ["none"]
    assert set(C.SUBGROUPS + C.MISSINGNESS) <= set(frame.columns) | {"age_band"}
    with pytest.raises(RadalignError, match="3 rows for a table of"):
        C.add_group_columns(frame, {"image": [True] * 3}, [])


def test_subgroup_auroc_gap_and_not_scored_groups(tmp_path):
    frame, _, y, s, pid = ehr_frame(seed=1)
    frame["age_band"] = C.age_bands(frame["age"])
    # a group with no positives, and one too small
    frame["site"] = np.where(y == 0, "A", "B")
    frame.loc[frame.index[(y == 0)][-8:], "site"] = "C"  # 8 negatives only: no positives
    frame.loc[frame.index[:3], "site"] = "tiny"
    res = C.subgroup_table(frame, y, s, pid, ["gender", "age_band", "race", "site"], n_boot=N_BOOT, seed=2,
                           min_count=5)
    g = res["columns"]["gender"]["groups"]
    for sex in ("F", "M"):
        m = frame["gender"].to_numpy() == sex
        assert g[sex]["auroc"] == pytest.approx(roc_auc_score(y[m], s[m]))
        assert g[sex]["prevalence"] == pytest.approx(y[m].mean()) and g[sex]["ci_low"] <= g[sex]["auroc"]
    assert "unknown" in res["columns"]["race"]["groups"]  # missing race is its own group, not dropped
    assert sum(r["n"] for r in res["columns"]["race"]["groups"].values()) == len(frame)
    site = res["columns"]["site"]["groups"]
    assert not site["C"]["scored"] and site["C"]["reason"] == "no positives" and site["C"]["n"] == 8
    assert not site["tiny"]["scored"] and "fewer than 5" in site["tiny"]["reason"]
    gap = res["columns"]["gender"]["largest_gap"]
    hi, lo = gap["highest"], gap["lowest"]
    assert gap["gap"] == pytest.approx(g[hi]["auroc"] - g[lo]["auroc"]) and gap["gap"] >= 0
    # the gap's interval: both groups on the same patient resamples, scored here with sklearn
    diffs = []
    mh, ml = frame["gender"].to_numpy() == hi, frame["gender"].to_numpy() == lo
    for w in M.patient_weights(pid, N_BOOT, 2):
        for row in w:
            diffs.append(roc_auc_score(y[mh], s[mh], sample_weight=row[mh])
                         - roc_auc_score(y[ml], s[ml], sample_weight=row[ml]))
    lo_ref, hi_ref = np.percentile(diffs, [2.5, 97.5])
    assert gap["ci_low"] == pytest.approx(lo_ref, abs=1e-9)
    assert gap["ci_high"] == pytest.approx(hi_ref, abs=1e-9)
    assert res["unit"] == "patient" and res["grouping"] == "pandas groupby"
    C.subgroup_plot(tmp_path / "subgroups.png", res)
    with Image.open(tmp_path / "subgroups.png") as im:
        assert im.format == "PNG"
    bands = list(res["columns"]["age_band"]["groups"])
    assert bands == ["<40", "40-64", "65-79", "80+"]  # reading order, not string order


def test_gap_interval_excludes_zero_for_a_real_gap():
    rng = np.random.default_rng(3)
    n = 600
    pid = np.arange(n)
    grp = np.where(np.arange(n) < n // 2, "good", "bad")
    y = rng.integers(0, 2, n).astype(float)
    s = np.where(grp == "good", y * 2 + rng.normal(size=n), rng.normal(size=n))
    res = C.subgroup_table(pd.DataFrame({"g": grp}), y, C.sigmoid(s), pid, ["g"], n_boot=N_BOOT)
    gap = res["columns"]["g"]["largest_gap"]
    assert gap["highest"] == "good" and gap["ci_low"] > 0


def test_missing_subgroup_column_names_it_and_the_available_ones():
    frame, _, y, s, pid = ehr_frame(n_pat=20)
    with pytest.raises(RadalignError, match=r"'ethnicity'.*available columns: gender, age, race, insurance"):
        C.subgroup_table(frame, y, s, pid, ["gender", "ethnicity"], n_boot=5)
    with pytest.raises(RadalignError, match="lab feature.*'troponin'"):
        C.labs_pattern(frame, ["troponin"])
    with pytest.raises(RadalignError, match="outside \\[0, 1\\].*not raw scores"):
        C.subgroup_table(frame, y, s * 3 - 1, pid, ["gender"], n_boot=5)


def test_age_bands_hand_worked():
    got = C.age_bands([30, 40, 64.9, 65, 80, 95, None, float("nan")])
    assert list(got) == ["<40", "40-64", "40-64", "65-79", "80+", "80+", "unknown", "unknown"]


def test_cross_table_counts_and_small_cells():
    frame, present, y, s, pid = ehr_frame(seed=2)
    frame["modalities"] = C.modality_pattern(present)
    ct = C.cross_table(frame, y, s, "gender", "modalities", min_count=40)
    for sex in ct["row_values"]:
        for pat in ct["column_values"]:
            m = (frame["gender"].to_numpy() == sex) & (frame["modalities"].to_numpy() == pat)
            cell = ct["cells"][sex][pat]
            assert cell["n"] == int(m.sum()) and cell["n_positive"] == int(y[m].sum())
            if m.sum() < 40:
                assert not cell["scored"] and cell["auroc"] is None
            elif 0 < y[m].sum() < m.sum():
                assert cell["scored"] and cell["auroc"] == pytest.approx(roc_auc_score(y[m], s[m]))
    assert any(not c["scored"] for row in ct["cells"].values() for c in row.values())


# ----------------------------------------------------------------------------------------------------------
# Degradation and the report


def degradation_models(y, rng):
    out = {}
    for name, noise in (("with_dropout", 0.8), ("without_dropout", 2.5)):
        full = y * 2 + rng.normal(size=y.size)
        out[name] = {"all": full, "image": full + rng.normal(scale=noise, size=y.size),
                     "ehr": full + rng.normal(scale=noise, size=y.size)}
    return out


def test_degradation_table():
    y, _, pid = cohort(seed=8)
    models = degradation_models(y, np.random.default_rng(0))
    deg = C.degradation_table(y, pid, models, n_boot=N_BOOT)
    assert [r["removed"] for r in deg["rows"]] == [None, "image", "ehr"]
    for r in deg["rows"]:
        cond = r["removed"] or "all"
        for m in models:
            assert r[m]["value"] == pytest.approx(roc_auc_score(y, models[m][cond]))
            if cond != "all":
                assert r[m]["drop"]["delta"] == pytest.approx(roc_auc_score(y, models[m]["all"])
                                                              - roc_auc_score(y, models[m][cond]))
        gap = r["with_dropout"]["value"] - r["without_dropout"]["value"]
        assert r["difference"]["delta"] == pytest.approx(gap)
    bad = {"a": {"all": y, "image": y}, "b": {"all": y}}
    with pytest.raises(RadalignError, match="same ones"):
        C.degradation_table(y, pid, bad, n_boot=5)


def test_degradation_table_over_seeds_against_sklearn():
    """Per training seed: AUROC and drop by sklearn; mean, sample sd and the mean-drop difference from them;
    the first seed's intervals are the table's own rows; a seed missing a condition is refused."""
    y, _, pid = cohort(seed=8)
    runs = [degradation_models(y, np.random.default_rng(s)) for s in range(3)]
    seeds = {m: [r[m] for r in runs] for m in runs[0]}
    deg = C.degradation_table(y, pid, runs[0], seeds=seeds, n_boot=N_BOOT)
    plain = C.degradation_table(y, pid, runs[0], n_boot=N_BOOT)
    assert deg["n_seeds"] == 3 and "n_seeds" not in plain
    for r, p in zip(deg["rows"], plain["rows"]):
        cond = r["removed"] or "all"
        drops = {}
        for m in seeds:
            au = [roc_auc_score(y, run[m][cond]) for run in runs]
            got = r[m]["over_seeds"]
            assert got["auroc"] == pytest.approx(au)
            assert got["mean"] == pytest.approx(np.mean(au)) and got["sd"] == pytest.approx(np.std(au, ddof=1))
            assert r[m]["ci_low"] == p[m]["ci_low"] and r[m]["value"] == p[m]["value"]
            if cond != "all":
                d = [roc_auc_score(y, run[m]["all"]) - a for run, a in zip(runs, au)]
                assert got["drop"] == pytest.approx(d) and got["drop_sd"] == pytest.approx(np.std(d, ddof=1))
                drops[m] = np.mean(d)
        if cond != "all":
            assert r["mean_drop_difference"] == pytest.approx(drops["with_dropout"] - drops["without_dropout"])
            assert r["mean_drop_difference"] < 0  # the planted less-degrading model
        else:
            assert "mean_drop_difference" not in r
    text = "\n".join(C.md_degradation(deg))
    assert "Over 3 training seeds" in text and "drop difference" in text and "One training seed" not in text
    one = "\n".join(C.md_degradation(C.degradation_table(y, pid, runs[0], n_boot=5)))
    assert "One training seed" in one and "Over " not in one  # a single run's table says it is one
    broken = {m: [*v[:2], {"all": y}] for m, v in seeds.items()}
    with pytest.raises(RadalignError, match="each seed"):
        C.degradation_table(y, pid, runs[0], seeds=broken, n_boot=5)


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_report_has_every_section_and_escapes_text(tmp_path):
    frame, present, y, s, pid = ehr_frame(seed=3)
    frame["modalities"] = C.modality_pattern(present)
    frame["race"] = frame["race"].replace({"BLACK": EVIL})
    yv, sv, _ = cohort(n_pat=80, seed=9)
    binary = C.evaluate_binary(y, s, pid, val=(yv, sv), baselines={"ehr_only": s[::-1].copy()}, n_boot=50)
    cal = C.calibration_report(y, C.to_logit(s), yv, sv)
    sub = C.subgroup_table(frame, y, s, pid, ["race", "modalities"], n_boot=50, min_count=10)
    cross = C.cross_table(frame, y, s, "race", "modalities", min_count=10)
    deg = C.degradation_table(y, pid, degradation_models(y, np.random.default_rng(1)), n_boot=50)
    for part in (binary, cal, sub, cross, deg):  # metrics.json material: strict JSON, no NaN
        json.dumps(part, allow_nan=False)
    out = tmp_path / "report.md"
    text = C.write_report(out, title=f"mortality {EVIL}", binary=binary, calibration=cal, subgroups=sub,
                          cross=[cross], degradation=deg, plots=["reliability.png"])
    assert out.read_text() == text
    for needle in ("## Discrimination", "## Calibration", "## Subgroups and missingness patterns",
                   "## Graceful degradation", "equal-mass", "Chosen on validation",
                   "by Youden's J (max sensitivity + specificity - 1), never on test",
                   "percentile bootstrap over patients", "T = "):
        assert needle in text, needle
    p = _Tags()
    p.feed(markdown.markdown(text, extensions=["tables"]))
    assert "script" not in p.tags and "table" in p.tags and "img" in p.tags
    assert EVIL in "".join(p.text)


# ----------------------------------------------------------------------------------------------------------
# From predictions tables to the evaluation folder


def predictions(n_pat, seed):
    """The predictions.csv layout: subject_id, study_id, label, score:<model> per model."""
    y, s, pid = cohort(n_pat, seed=seed)
    rng = np.random.default_rng(seed + 100)
    df = pd.DataFrame({"subject_id": pid, "study_id": 1000 * seed + np.arange(y.size), "label": y})
    df["score:fusion"] = 1 / (1 + np.exp(-2 * s))  # over-confident
    df["score:image_only"] = 1 / (1 + np.exp(-(s + rng.normal(scale=2, size=y.size))))
    return df


def test_evaluate_predictions_writes_the_evaluation_folder(tmp_path):
    test, val = predictions(150, seed=1), predictions(100, seed=2)
    frame, present, *_ = ehr_frame(n_pat=150, seed=1)
    frame = C.add_group_columns(frame.iloc[: len(test)].reset_index(drop=True),
                                {m: v[: len(test)] for m, v in present.items()}, ["lactate", "creatinine"])
    groups = frame.assign(study_id=test["study_id"].to_numpy()).sample(frac=1.0, random_state=0)  # any order
    res = C.evaluate_predictions(test, val, groups=groups, n_boot=50, min_count=10)
    disc = res["discrimination"]
    assert disc["metrics"]["auroc"]["value"] == pytest.approx(roc_auc_score(test["label"], test["score:fusion"]))
    assert set(disc["paired_differences"]) == {"image_only"}
    assert res["calibration"]["temperature"] > 1.3  # the scores were made over-confident
    g = res["subgroups"]["columns"]["gender"]["groups"]["F"]
    m = frame["gender"].to_numpy() == "F"  # groups were shuffled: alignment must be by study_id
    assert g["auroc"] == pytest.approx(roc_auc_score(test["label"][m], test["score:fusion"][m]))
    assert [c["rows"] for c in res["subgroup_x_missingness"]] == list(C.SUBGROUPS)
    json.dumps(res, allow_nan=False)  # strict JSON: no NaN anywhere
    files = C.write_evaluation(tmp_path / "eval", res)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"ece_before", "ece_after", "brier_before", "brier_after", "temperature", "bins"} <= set(
        metrics["calibration"])
    for key in ("report", "reliability", "subgroups"):
        assert (tmp_path / "eval" / files[key].split("/")[-1]).is_file()
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "![reliability.png](reliability.png)" in report and "### gender x modalities" in report


def test_evaluate_predictions_bad_input():
    test, val = predictions(30, seed=3), predictions(30, seed=4)
    with pytest.raises(RadalignError, match="no column 'score:gbdt'.*available: subject_id"):
        C.evaluate_predictions(test, val, model="gbdt", n_boot=5)
    groups = pd.DataFrame({"study_id": test["study_id"][:-2], "gender": "F"})
    with pytest.raises(RadalignError, match="lacks 2 of the"):
        C.evaluate_predictions(test, val, groups=groups, subgroup_columns=["gender"], n_boot=5)
    groups = pd.DataFrame({"study_id": test["study_id"], "gender": "F"})
    with pytest.raises(RadalignError, match="'insurance'.*available columns: study_id, gender"):
        C.evaluate_predictions(test, val, groups=groups, subgroup_columns=["gender", "insurance"], n_boot=5)


# ----------------------------------------------------------------------------------------------------------
# Hand-worked tables: bin mass, reliability bins, thresholds applied with >=, the rules' chosen points.

# 7 rows, 3 equal-mass bins of 3, 2 and 2 rows (np.array_split), given out of order with an unlabelled row.
P7 = np.array([0.1, 0.2, 0.3, 0.35, 0.45, 0.8, 1.0])
Y7 = np.array([0, 0, 1, 1, 1, 1, 0], float)
BINS7 = [  # by hand: mean probability, observed rate, range
    {"n": 3, "mean_prob": 0.2, "observed": 1 / 3, "prob_low": 0.1, "prob_high": 0.3},
    {"n": 2, "mean_prob": 0.4, "observed": 1.0, "prob_low": 0.35, "prob_high": 0.45},
    {"n": 2, "mean_prob": 0.9, "observed": 0.5, "prob_low": 0.8, "prob_high": 1.0},
]


def _shuffled_with_unlabelled():
    order = np.array([4, 0, 6, 2, 5, 1, 3])
    return np.r_[Y7[order], np.nan], np.r_[P7[order], 0.99]


def test_reliability_bins_hand_worked():
    y, p = _shuffled_with_unlabelled()
    bins = C.calibration_bins(y, p, n_bins=3)
    assert len(bins) == 3
    for got, want in zip(bins, BINS7):
        assert got == pytest.approx(want), (got, want)


def test_ece_weights_each_bin_by_its_share_of_rows():
    y, p = _shuffled_with_unlabelled()
    # |1/3 - 0.2| = 2/15 over 3 rows, |1 - 0.4| = 0.6 over 2, |0.5 - 0.9| = 0.4 over 2: (0.4 + 1.2 + 0.8) / 7
    assert C.expected_calibration_error(y, p, n_bins=3) == pytest.approx(2.4 / 7)
    # unequal bins, a second table: 3 rows at 0.1 (observed 0) and 2 at 0.5 (observed 1): 0.6 * 0.1 + 0.4 * 0.5
    assert C.expected_calibration_error([0, 0, 0, 1, 1], [0.1, 0.1, 0.1, 0.5, 0.5], n_bins=2) == pytest.approx(0.26)
    assert C.expected_calibration_error([np.nan], [0.5]) is None


def test_a_score_exactly_at_the_threshold_is_positive():
    point = {"rule": "youden", "target": None, "threshold": 0.8, "chosen_on": "validation"}
    y = np.array([1, 0, 1, 0, 1, np.nan])
    s = np.array([0.8, 0.8, 0.9, 0.1, 0.5, 0.8])
    t = C.apply_operating_point(point, y, s)["test"]
    # predicted positive: rows 0, 1, 2 (score >= 0.8); the unlabelled row is left out
    assert (t["tp"], t["fp"], t["fn"], t["tn"], t["n"]) == (2, 1, 1, 1, 5)
    assert t["sensitivity"] == pytest.approx(2 / 3) and t["specificity"] == pytest.approx(0.5)
    assert t["precision"] == pytest.approx(2 / 3) and t["npv"] == pytest.approx(0.5)
    assert t["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1)) and t["accuracy"] == pytest.approx(3 / 5)


# Validation by hand: negatives 0.1 0.2 0.3 0.6, positives 0.4 0.7 0.8 0.9. At threshold t (score >= t):
#   t:     0.9   0.8   0.7   0.6   0.4   0.3   0.2   0.1
#   sens:  1/4   2/4   3/4   3/4   1     1     1     1
#   spec:  1     1     1     3/4   3/4   2/4   1/4   0
YV = np.array([0, 0, 0, 0, 1, 1, 1, 1], float)
SV = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])


@pytest.mark.parametrize("rule,target,threshold", [
    ("youden", None, 0.7),  # J = 0.75 at 0.7 and at 0.4: the higher threshold (the first on the curve)
    ("sensitivity", 0.9, 0.4),  # the highest threshold with sensitivity >= 0.9
    ("sensitivity", 0.5, 0.8),
    ("sensitivity", 1.0, 0.4),
    ("specificity", 0.75, 0.4),  # the lowest threshold with specificity >= 0.75
    ("specificity", 1.0, 0.7),
    ("specificity", 0.5, 0.3),
])
def test_operating_point_rules_hand_worked(rule, target, threshold):
    op = C.choose_operating_point(YV, SV, rule, target)
    assert op["threshold"] == pytest.approx(threshold) and op["chosen_on"] == "validation"
    assert op["n_validation"] == 8 and op["n_validation_positive"] == 4
    on_val = C.apply_operating_point(op, YV, SV)["test"]  # the threshold reproduces its row of the table
    if rule == "sensitivity":
        assert on_val["sensitivity"] >= target
    if rule == "specificity":
        assert on_val["specificity"] >= target


def test_operating_point_edge_cases():
    with pytest.raises(RadalignError, match="needs a target"):
        C.choose_operating_point(YV, SV, "specificity", 0.0)
    with pytest.raises(RadalignError, match="needs a target"):
        C.choose_operating_point(YV, SV, "sensitivity", 1.5)
    # inverted validation scores: no threshold beats "predict nothing", which must stay finite (JSON)
    op = C.choose_operating_point([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4])
    assert 0.4 < op["threshold"] < 0.4 + 1e-12
    t = C.apply_operating_point(op, np.array([0, 1, 1.0]), np.array([0.4, 0.4, 0.1]))["test"]
    assert t["tp"] == t["fp"] == 0 and t["tn"] == 1 and t["fn"] == 2
    one = C.apply_operating_point(C.choose_operating_point([1, 1, 1], [0.2, 0.5, 0.9]), YV, SV)
    assert one["threshold"] is None and one["test"] is None and "one class" in one["note"]
    res = C.evaluate_binary(YV, SV, np.arange(8), val=(YV, SV), n_boot=5, threshold_rule="specificity",
                            threshold_target=1.0)
    assert res["operating_point"]["threshold"] == pytest.approx(0.7)
    assert (res["operating_point"]["test"]["tp"], res["operating_point"]["test"]["fp"]) == (3, 0)


def test_roc_summaries_at_other_targets_hand_worked():
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1], float)
    s = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 9, 11], float)
    ones = np.ones((1, 12))
    # specificity >= 0.95 allows no negative above the threshold: threshold 11, one positive of two
    assert C.sensitivity_at_specificity(y, s, ones, target=0.95)[0] == pytest.approx(0.5)
    # sensitivity >= 0.5: threshold 11 already, no negative above it
    assert C.specificity_at_sensitivity(y, s, ones, target=0.5)[0] == pytest.approx(1.0)
    # weights: the negative at 10 counted 3 times -> 12 negatives; 90% specificity allows 1 above: threshold 11
    w = np.ones((1, 12))
    w[0, 9] = 3
    assert C.sensitivity_at_specificity(y, s, w)[0] == pytest.approx(0.5)


def test_counts_and_prevalence_leave_unknown_labels_out():
    y = np.array([1, 0, np.nan, 1, 0, 0, np.nan, 1])
    s = np.arange(8.0)
    res = C.evaluate_binary(y, s, [0, 0, 1, 1, 2, 3, 3, 4], n_boot=5)
    assert (res["n_rows"], res["n_rows_unlabelled"], res["n_positive"], res["n_patients"]) == (8, 2, 3, 5)
    assert res["prevalence"] == pytest.approx(3 / 6)


# ----------------------------------------------------------------------------------------------------------
# Temperature: the gradient, the bounds, and which curves the report computes with it.


def test_temperature_gradient_matches_finite_differences():
    rng = np.random.default_rng(4)
    z = rng.normal(scale=3, size=50)
    y = (rng.random(50) < 0.4).astype(float)
    for u in (-1.0, 0.0, 0.7):
        _, g = M._nll_and_grad(np.array([u]), y, z)
        h = 1e-6
        up, _ = M._nll_and_grad(np.array([u + h]), y, z)
        down, _ = M._nll_and_grad(np.array([u - h]), y, z)
        assert g[0] == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8)
        t = np.exp(u)
        assert M._nll_and_grad(np.array([u]), y, z)[0] == pytest.approx(np.mean(np.logaddexp(0, z / t) - y * z / t))


def test_temperature_stays_inside_its_bounds():
    y = np.array([0, 0, 1, 1], float)
    z = np.array([-0.1, -0.05, 0.05, 0.1])  # separable, far too timid: the best T is as small as allowed
    assert C.fit_temperature(y, z, bounds=(0.5, 20.0)) == pytest.approx(0.5)
    assert C.fit_temperature(1 - y, z, bounds=(0.05, 4.0)) == pytest.approx(4.0)  # inverted: as flat as allowed


def _ece_by_hand(y, p, bins):
    order = np.argsort(p, kind="mergesort")
    parts = np.array_split(order, bins)
    return sum(len(i) / len(p) * abs(y[i].mean() - p[i].mean()) for i in parts)


def test_calibration_report_curves_use_the_validation_temperature():
    yv, zv = overconfident(2000, seed=5)
    y, z = overconfident(1000, seed=6)
    cal = C.calibration_report(y, z, yv, zv, n_bins=8)
    t = cal["temperature"]
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    assert cal["ece_before"] == pytest.approx(_ece_by_hand(y, sig(z), 8))
    assert cal["ece_after"] == pytest.approx(_ece_by_hand(y, sig(z / t), 8))
    assert cal["validation_ece_before"] == pytest.approx(_ece_by_hand(yv, sig(zv), 8))
    assert cal["validation_ece_after"] == pytest.approx(_ece_by_hand(yv, sig(zv / t), 8))
    assert cal["brier_after"] == pytest.approx(brier_score_loss(y, sig(z / t)))
    after = cal["reliability_after"]
    assert [b["mean_prob"] for b in after] == pytest.approx(
        [sig(z / t)[i].mean() for i in np.array_split(np.argsort(z, kind="mergesort"), 8)])
    assert [b["observed"] for b in cal["reliability_before"]] == pytest.approx(
        [y[i].mean() for i in np.array_split(np.argsort(z, kind="mergesort"), 8)])


def test_evaluation_uses_the_logit_columns_when_present():
    test, val = predictions(60, seed=7), predictions(60, seed=8)
    for df in (test, val):
        df["logit:fusion"] = 0.5 * C.to_logit(df["score:fusion"])  # another calibration than the scores'
    res = C.evaluate_predictions(test, val, n_boot=5)
    assert res["calibration"]["temperature"] == pytest.approx(
        C.fit_temperature(val["label"], val["logit:fusion"]), rel=1e-6)
    p = 1 / (1 + np.exp(-test["logit:fusion"].to_numpy()))
    assert res["calibration"]["brier_before"] == pytest.approx(brier_score_loss(test["label"], p))


# ----------------------------------------------------------------------------------------------------------
# Subgroups: the min_count boundary, unknown labels, probabilities at 0 and 1.


def test_subgroup_min_count_boundary_and_unlabelled_rows():
    rng = np.random.default_rng(6)
    g = np.array(["a"] * 10 + ["b"] * 9 + ["c"] * 12 + ["d"] * 14)
    y = np.tile([0.0, 1.0], 23)[:45]
    y[19:22] = np.nan  # three of c's rows unlabelled: 9 labelled
    p = rng.random(45)
    p[0], p[1] = 0.0, 1.0  # probabilities at the ends of [0, 1] are valid
    res = C.subgroup_table(pd.DataFrame({"g": g}), y, p, np.arange(45), ["g"], n_boot=20, min_count=10)
    rows = res["columns"]["g"]["groups"]
    assert rows["a"]["scored"] and rows["a"]["n_labelled"] == 10  # exactly min_count: scored
    assert rows["a"]["auroc"] == pytest.approx(roc_auc_score(y[:10], p[:10]))
    assert rows["a"]["ece"] == pytest.approx(_ece_by_hand(y[:10], p[:10], 10))
    assert not rows["b"]["scored"] and rows["b"]["reason"] == "fewer than 10 labelled rows"
    assert set(rows["b"]) == set(rows["a"]) and rows["b"]["ci_high"] is None  # one schema, scored or not
    with pytest.raises(RadalignError, match="subgroup frame has 44 rows for 45 predictions; align them by study"):
        C.subgroup_table(pd.DataFrame({"g": g[:-1]}), y, p, np.arange(45), ["g"], n_boot=5)
    c = rows["c"]
    assert not c["scored"] and (c["n"], c["n_labelled"]) == (12, 9)
    assert c["n_positive"] == int(np.nansum(y[19:31])) and c["prevalence"] == pytest.approx(np.nanmean(y[19:31]))
    gap = res["columns"]["g"]["largest_gap"]
    hi, lo = (("a", "d") if rows["a"]["auroc"] > rows["d"]["auroc"] else ("d", "a"))
    assert (gap["highest"], gap["lowest"]) == (hi, lo)
    ct = C.cross_table(pd.DataFrame({"g": g, "h": "x"}), y, p, "g", "h", min_count=10)
    assert ct["cells"]["a"]["x"]["scored"] and not ct["cells"]["b"]["x"]["scored"]


def test_one_seed_has_no_spread_and_evaluation_passes_degradation_through():
    y, _, pid = cohort(seed=8)
    models = degradation_models(y, np.random.default_rng(2))
    deg = C.degradation_table(y, pid, models, seeds={m: [v] for m, v in models.items()}, n_boot=5)
    for r in deg["rows"]:
        for m in models:
            assert r[m]["over_seeds"]["sd"] == 0.0 and r[m]["over_seeds"].get("drop_sd", 0.0) == 0.0
    test = pd.DataFrame({"subject_id": pid, "study_id": np.arange(y.size), "label": y,
                         "score:fusion": C.sigmoid(models["with_dropout"]["all"])})
    val = predictions(60, seed=9)
    res = C.evaluate_predictions(test, val.rename(columns={"score:image_only": "x"}), degradation=models,
                                 degradation_seeds={m: [v, v] for m, v in models.items()}, n_boot=5)
    rows = res["degradation"]["rows"]
    assert rows[1]["without_dropout"]["value"] == pytest.approx(roc_auc_score(y, models["without_dropout"]["image"]))
    assert res["degradation"]["n_seeds"] == 2


def test_report_prints_the_numbers_of_each_section():
    y, s, pid = cohort(seed=10)
    base = s + np.random.default_rng(0).normal(scale=2, size=s.size)
    binary = C.evaluate_binary(y, s, pid, baselines={"ehr_only": base}, n_boot=30)
    d = binary["paired_differences"]["ehr_only"]["auroc"]
    runs = [degradation_models(y, np.random.default_rng(k)) for k in range(2)]
    deg = C.degradation_table(y, pid, runs[0], seeds={m: [r[m] for r in runs] for m in runs[0]}, n_boot=30)
    frame = pd.DataFrame({"g": np.where(np.arange(y.size) < 5, "tiny", "big")})
    sub = C.subgroup_table(frame, y, C.sigmoid(s), pid, ["g"], n_boot=10, min_count=10)
    cal = C.calibration_report(y, s, y, s)
    text = C.format_report(binary=binary, calibration=cal, subgroups=sub, degradation=deg)
    assert (f"| ehr\\_only | auroc | {d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], "
            f"p {d['p_value']:.3f} |") in text
    assert "| tiny | 5 |" in text and "not scored: fewer than 10 labelled rows |" in text
    assert f"| ECE (validation) | {cal['validation_ece_before']:.3f} | {cal['validation_ece_after']:.3f} |" in text
    img = deg["rows"][1]["with_dropout"]["over_seeds"]
    assert f"{img['drop_mean']:+.3f} ({img['drop_sd']:.3f})" in text
    assert "No validation data given" in text
    op = C.apply_operating_point(C.choose_operating_point([1, 1], [0.2, 0.3]), y, s)
    assert "validation has one class only: no threshold" in "\n".join(C._md_operating(op))

"""`radalign finetune eval` and `radalign finetune explain` on a small trained run: the evaluation folder and
its numbers against the data, thresholds that never see test labels (planted: flipped test labels), exact
Shapley values of a real prediction, escaping, similar cases from a retrieval index, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from radalign import RadalignError

REPO = Path(__file__).resolve().parents[1]
NANO = REPO / "tests" / "assets" / "nano.json"
SCRIPT = "<script>alert('x')</script> cough"
CAL_KEYS = {"ece_before", "ece_after", "brier_before", "brier_after", "temperature", "bins"}


def _cli(*argv) -> int:
    from radalign.cli import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def cohort(ft_cohort):
    return ft_cohort


@pytest.fixture(scope="module")
def run(cohort):
    """A long-stay run (image, indication, labs) with fusion, fusion without dropout and an EHR baseline."""
    from radalign.finetune.config import FinetuneConfig
    from radalign.finetune.recipe import run_finetune

    from radalign.config import load_config

    over = [f"run_dir={cohort['root'] / 'run'}", f"data.table={cohort['table']}", f"data.shards={cohort['shards']}",
            f"data.checkpoint={cohort['export']}", "bootstrap=50", "optim.epochs=2", "optim.batch_size=64",
            "model.d_model=16", "model.ehr_d=8", "model.n_layers=1", "model.ehr_blocks=1", "model.n_heads=2",
            "model.ehr_heads=2", "progress=false", "precision=fp32", "baselines.models=[ehr_only]"]
    return run_finetune(load_config(FinetuneConfig, "finetune/long_stay", over, stage="finetune"))


@pytest.fixture(scope="module")
def planted(cohort, run):
    """A copy of the table with every TEST label flipped (los_days moved across the 7-day cut) and a train
    study whose indication holds a <script> tag (train is never evaluated, so the eval scores are unchanged)."""
    import datasets
    from radalign.data.ehr_table import load_table

    t = load_table(cohort["table"])
    out = cohort["root"] / "planted"
    splits = {k: v.copy() for k, v in t.splits.items()}
    los = splits["test"]["los_days"]
    splits["test"]["los_days"] = np.where(los.isna(), np.nan, np.where(los > 7, 1.0, 10.0))
    tr = splits["train"]
    row = int(np.flatnonzero(tr["indication"].notna().to_numpy() & tr["dicom_ids"].notna().to_numpy())[0])
    tr.loc[row, "indication"] = SCRIPT
    datasets.DatasetDict({k: datasets.Dataset.from_pandas(v, preserve_index=False)
                          for k, v in splits.items()}).save_to_disk(str(out / "finetune"))
    shutil.copy(t.path.parent / "manifest.json", out / "manifest.json")
    return {"table": out / "finetune", "script_study": str(tr.loc[row, "study_id"])}


@pytest.fixture(scope="module")
def evaluation(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "eval"
    assert _cli("finetune", "eval", "--run", run, "--out", out, "--bootstrap", 50, "--min-count", 5) == 0
    return out, json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def index(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "index"
    assert _cli("retrieval", "build", "--export", cohort["export"], "--shards", cohort["shards"], "--split",
                "train", "--out", out) == 0
    return out


def _test_inputs(run):
    from radalign.finetune.predict import load_run

    trained = load_run(run)
    return trained, trained.inputs("test")


# ----------------------------------------------------------------------------------------------------------
# eval


def test_eval_writes_metrics_report_and_plots_with_the_run_numbers(run, evaluation):
    from sklearn.metrics import roc_auc_score

    out, m = evaluation
    for f in ("metrics.json", "report.md", "reliability.png", "subgroups.png"):
        assert (out / f).is_file(), f
    assert CAL_KEYS <= set(m["calibration"])
    assert m["calibration"]["fitted_on"] == "validation" and m["calibration"]["temperature"] > 0
    pred = pd.read_csv(run / "predictions.csv")
    lab = pred[pred["label"].notna()]
    assert lab["label"].nunique() == 2, "the test split needs both classes for this test to mean anything"
    auroc = m["discrimination"]["metrics"]["auroc"]
    assert auroc["value"] == pytest.approx(roc_auc_score(lab["label"], lab["score:fusion"]), abs=1e-9)
    assert auroc["ci_low"] <= auroc["value"] <= auroc["ci_high"]
    assert set(m["discrimination"]["paired_differences"]) == {"fusion_no_dropout", "ehr_only"}
    report = (out / "report.md").read_text()
    for section in ("## Calibration", "## Subgroups and missingness patterns", "## Graceful degradation",
                    "### Decision threshold", "never on test"):
        assert section in report


def test_training_and_eval_write_one_metrics_schema_and_the_same_model_numbers(run, evaluation):
    """One metrics.json schema for `radalign finetune` and `finetune eval`: both validate, and eval on the test
    split repeats training's models and paired differences (same rows, same patient resamples)."""
    from radalign.finetune import clinical as C

    _, ev = evaluation
    tr = json.loads((run / "metrics.json").read_text())
    for doc in (tr, ev):
        C.check_metrics(doc)
        assert doc["format"] == "radalign-finetune-metrics/2" and doc["unit"] == "patient" and doc["created"]
    assert (ev["task"], ev["split"], ev["n_boot"], ev["seed"]) == (tr["task"], tr["split"], tr["n_boot"], tr["seed"])
    assert list(ev["models"]) == list(tr["models"]) == ["fusion", "fusion_no_dropout", "ehr_only"]
    for name, r in tr["models"].items():
        assert ev["models"][name] == pytest.approx(r, abs=1e-9), name
    assert list(ev["paired_differences"]) == list(tr["paired_differences"])
    for name, r in tr["paired_differences"].items():
        assert {k: v for k, v in ev["paired_differences"][name].items() if k != "metric"} == pytest.approx(
            {k: v for k, v in r.items() if k != "metric"}, abs=1e-9), name
    with pytest.raises(RadalignError) as e:
        C.check_metrics({**{k: v for k, v in tr.items() if k != "models"}, "degradation": 1, "surprise": 0})
    assert "missing 'models'" in str(e.value) and "'degradation' is int" in str(e.value)
    assert "unknown key 'surprise'" in str(e.value)


def _without(model, data, removed):
    """Test logits with `removed` left out of the batch altogether (absent on every row): the independent way to
    remove a modality (the evaluation masks it with present_override instead)."""
    import torch

    keep = [m for m in ("image", "text", "ehr") if m != removed]
    with torch.no_grad():
        return model.eval()(data.batch(None, keep)).logits[:, 0].double().numpy()


def test_degradation_table_matches_sklearn_on_models_fed_without_the_modality(run, evaluation):
    """Every AUROC of the degradation table (each training seed's too) from the saved weights, each modality
    removed from the batch, scored by sklearn; drops and their mean/sd by numpy."""
    from radalign.finetune.registry import SEEDS_DIR, load_model
    from sklearn.metrics import roc_auc_score

    _, m = evaluation
    trained, data = _test_inputs(run)
    y = data.y[:, 0]
    ok = ~np.isnan(y)
    deg = m["degradation"]
    assert deg["models"] == ["fusion", "fusion_no_dropout"]
    assert [r["removed"] for r in deg["rows"]] == [None, "image", "text", "ehr"]
    seeds_dir = run / "models" / SEEDS_DIR
    assert deg["n_seeds"] == 3
    for name in deg["models"]:
        models = [trained.models[name][0]] + [load_model(seeds_dir, f"{name}_seed{s}")[0] for s in (1, 2)]
        full = [roc_auc_score(y[ok], _without(mod, data, None)[ok]) for mod in models]
        for r in deg["rows"]:
            au = [roc_auc_score(y[ok], _without(mod, data, r["removed"])[ok]) for mod in models]
            got = r[name]
            assert got["value"] == pytest.approx(au[0], abs=1e-6), (name, r["removed"])
            assert got["over_seeds"]["auroc"] == pytest.approx(au, abs=1e-6), (name, r["removed"])
            assert got["over_seeds"]["mean"] == pytest.approx(np.mean(au), abs=1e-6)
            assert got["over_seeds"]["sd"] == pytest.approx(np.std(au, ddof=1), abs=1e-6)
            if r["removed"]:
                drops = np.subtract(full, au)
                assert got["drop"]["delta"] == pytest.approx(drops[0], abs=1e-6)
                assert got["over_seeds"]["drop_mean"] == pytest.approx(drops.mean(), abs=1e-6)
    assert len(set(deg["rows"][0]["fusion"]["over_seeds"]["auroc"])) == 3  # three trained models, not one


def test_subgroup_and_missingness_counts_match_the_data(run, evaluation):
    from radalign.data.ehr_table import load_table

    _, m = evaluation
    trained, data = _test_inputs(run)
    frame, y = data.frame, data.y[:, 0]
    cols = m["subgroups"]["columns"]
    # modality presence pattern, by brute force over the rows
    pattern = ["+".join(k for k in ("image", "text", "ehr") if data.present[k][i]) or "none"
               for i in range(len(frame))]
    want = pd.Series(pattern).value_counts().to_dict()
    assert {g: r["n"] for g, r in cols["modalities"]["groups"].items()} == want
    assert len(want) > 1, "the test split should have more than one missingness pattern"
    labs = load_table(trained.table_path).manifest["features"]  # labs only (vitals are not "labs")
    has_lab = frame[labs].notna().any(axis=1).to_numpy()
    got = cols["labs"]["groups"]
    assert got["labs present"]["n"] == int(has_lab.sum())
    assert got["labs absent"]["n"] == int((~has_lab).sum())
    assert got["labs present"]["n_positive"] == int(np.nansum(y[has_lab]))
    for g, r in cols["gender"]["groups"].items():
        mask = (frame["gender"].astype(object).where(frame["gender"].notna(), "unknown").astype(str) == g).to_numpy()
        assert r["n"] == int(mask.sum()) and r["n_positive"] == int(np.nansum(y[mask])), g
    assert sum(r["n"] for r in cols["gender"]["groups"].values()) == len(frame)


def test_thresholds_and_temperature_never_see_test_labels(run, evaluation, planted, tmp_path):
    """Every test label flipped: the test AUROC becomes 1 - AUROC, the threshold and temperature stay."""
    _, m = evaluation
    assert _cli("finetune", "eval", "--run", run, "--table", planted["table"], "--out", tmp_path / "e",
                "--bootstrap", 50, "--min-count", 5) == 0
    flipped = json.loads((tmp_path / "e" / "metrics.json").read_text())
    a, b = m["discrimination"], flipped["discrimination"]
    assert b["metrics"]["auroc"]["value"] == pytest.approx(1 - a["metrics"]["auroc"]["value"], abs=1e-9)
    assert b["operating_point"]["threshold"] == a["operating_point"]["threshold"]
    assert b["operating_point"]["chosen_on"] == "validation"
    assert flipped["calibration"]["temperature"] == m["calibration"]["temperature"]
    ta, tb = a["operating_point"]["test"], b["operating_point"]["test"]
    assert (tb["tp"], tb["fn"]) == (ta["fp"], ta["tn"])  # the labels did flip, the threshold did not move


def test_eval_refuses_a_subgroup_column_that_does_not_exist(run, tmp_path, capsys):
    assert _cli("finetune", "eval", "--run", run, "--out", tmp_path / "e", "--bootstrap", 5,
                "--subgroups", "gender,shoe_size") == 2
    err = capsys.readouterr().err
    assert "'shoe_size'" in err and "available columns" in err


# ----------------------------------------------------------------------------------------------------------
# explain


def test_explain_json_shapley_sums_to_full_minus_empty_and_matches_the_model(run, tmp_path):
    trained, data = _test_inputs(run)
    no_text = np.flatnonzero(~data.present["text"])
    i = int(no_text[0]) if no_text.size else 0
    sid = data.studies[i]
    out = tmp_path / "e.json"
    assert _cli("finetune", "explain", "--run", run, "--study-id", sid, "--format", "json",
                "--out", out) == 0
    d = json.loads(out.read_text())
    assert str(d["study_id"]) == str(sid) and d["output"]["space"] == "logit"
    full, empty = d["output"]["full"], d["output"]["empty"]
    assert sum(d["shapley"].values()) == pytest.approx(full - empty, abs=1e-6)
    assert full == pytest.approx(float(trained.logits(data, "fusion")[i]), abs=1e-4)
    assert empty == pytest.approx(float(trained.logits(data, "fusion", present_override=frozenset())[i]),
                                  abs=1e-4)
    assert set(d["shapley"]) == {"image", "text", "ehr"}
    assert sum(d["attention"].values()) <= 1 + 1e-6
    if no_text.size:  # a modality the study lacks is a null player: exactly 0
        assert d["shapley"]["text"] == 0.0
        assert "no indication" in d["used"]
    assert "measured" in d["used"] and d["similar_cases"] == []


def test_explain_names_a_missing_study_and_an_example(run, capsys):
    assert _cli("finetune", "explain", "--run", run, "--study-id", "424242", "--format", "json") == 2
    err = capsys.readouterr().err
    assert "424242" in err and "e.g." in err


def test_explain_html_and_markdown_escape_free_text(run, planted, tmp_path):
    html_file, md_file = tmp_path / "e.html", tmp_path / "e.md"
    for fmt, f in (("html", html_file), ("markdown", md_file)):
        assert _cli("finetune", "explain", "--run", run, "--table", planted["table"], "--study-id",
                    planted["script_study"], "--format", fmt, "--out", f) == 0
    page = html_file.read_text()
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "data:image/jpeg;base64," in page  # the film, inline: the page is self-contained
    assert "http://" not in page and "https://" not in page
    md = md_file.read_text()
    assert "<script" not in md and "&lt;script&gt;" in md


def test_explain_writes_every_format_asked_from_one_explanation(run, index, tmp_path):
    """--out x.json --out x.md --out x.html: the files one call per format writes, byte for byte."""
    _, data = _test_inputs(run)
    common = ["finetune", "explain", "--run", run, "--study-id", data.studies[0], "--index-dir", index, "--k", 3]
    outs = [tmp_path / "x.json", tmp_path / "x.md", tmp_path / "x.html"]
    assert _cli(*common, *[a for f in outs for a in ("--out", f)]) == 0
    for f, fmt in zip(outs, ("json", "markdown", "html")):
        sep = tmp_path / f"sep{f.suffix}"
        assert _cli(*common, "--format", fmt, "--out", sep) == 0
        assert f.read_bytes() == sep.read_bytes(), f
    assert "data:image/jpeg;base64," in outs[2].read_text()  # the html file still gets its thumbnail


def test_explain_with_an_index_lists_other_patients_and_their_vote(run, cohort, index, tmp_path):
    from radalign.data.ehr_table import load_table
    from radalign.finetune.inputs import task_labels
    from radalign.finetune.predict import load_run

    _, data = _test_inputs(run)
    sid, subject = data.studies[0], str(data.subjects[0])
    out = tmp_path / "e.json"
    assert _cli("finetune", "explain", "--run", run, "--study-id", sid, "--index-dir", index, "--k", 4,
                "--format", "json", "--out", out) == 0
    d = json.loads(out.read_text())
    cases = d["similar_cases"]
    assert len(cases) == 4 and all(str(c["subject_id"]) != subject for c in cases)
    sims = [c["similarity"] for c in cases]
    assert sims == sorted(sims, reverse=True)
    task = load_run(run).cfg.task
    truth = {}
    for frame in load_table(cohort["table"]).splits.values():
        truth.update(zip(frame["study_id"].astype(str), task_labels(frame, task)[:, 0]))
    for c in cases:
        y = truth[str(c["study_id"])]
        assert c["outcome"] == (None if np.isnan(y) else int(y))
    known = [c for c in cases if c["outcome"] is not None]
    if known:
        w = np.array([max(c["similarity"], 0) for c in known])
        assert d["neighbour_vote"] == pytest.approx(float(w @ [c["outcome"] for c in known] / w.sum()))


def test_explain_refuses_an_index_of_another_encoder_naming_both_checksums(run, cohort, tmp_path, capsys):
    from radalign.pretrain.export import load_encoders

    other = tmp_path / "other_index"
    assert _cli("retrieval", "build", "--export", cohort["other_export"], "--shards", cohort["shards"],
                "--split", "validate", "--out", other) == 0
    capsys.readouterr()
    _, data = _test_inputs(run)
    assert _cli("finetune", "explain", "--run", run, "--study-id", data.studies[0], "--index-dir", other,
                "--format", "json") == 2
    err = capsys.readouterr().err
    ours, theirs = load_encoders(cohort["export"]).checksum, load_encoders(cohort["other_export"]).checksum
    assert ours != theirs
    assert ours[:12] in err and theirs[:12] in err


def test_explain_study_library_call_finds_the_split(run):
    from radalign.finetune.evaluate import explain_study, find_study
    from radalign.finetune.predict import load_run

    trained, data = _test_inputs(run)
    assert find_study(trained, data.studies[1]) == ("test", 1)
    with pytest.raises(RadalignError, match="not in split"):
        find_study(load_run(run), data.studies[1], split="train")
    expl = explain_study(run, data.studies[1])
    assert sum(expl.shapley.values()) == pytest.approx(expl.full - expl.empty, abs=1e-6)

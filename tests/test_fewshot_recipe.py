"""`radalign finetune fewshot` with the anchored head (finetune.fewshot_heads): its k=0 row is the zero-shot
classifier exactly, its pull shrinks with k in the recipe's output, the bench gives the same numbers on the same
draws, the label policy's blank choice changes the task's rows as a hand count says, and the previous release's
prompt_init / fewshot.l2 are refused with their fix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from radalign.finetune.config import FinetuneConfig, TaskConfig
from radalign.finetune.inputs import task_labels

from radalign import RadalignError
from radalign.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
LABEL = "Pleural Effusion"
KS = [1, 2, 4, 8, "all"]
LAM0 = 4.0


def _cfg(cohort, run_dir, *over) -> FinetuneConfig:
    return load_config(FinetuneConfig, "finetune/fewshot_chexpert", [
        f"run_dir={run_dir}", f"data.table={cohort['table']}", f"data.shards={cohort['shards']}",
        f"data.checkpoint={cohort['export']}", f"data.cache={cohort['root'] / 'cache'}", "progress=false",
        "precision=fp32", f"fewshot.ks=[{','.join(map(str, KS))}]", *over], stage="finetune")


@pytest.fixture(scope="module")
def swept(ft_cohort, tmp_path_factory):
    """The recipe on the test cohort, blank = negative (as zero-shot evaluation counts a blank)."""
    from radalign.finetune.fewshot_recipe import run_fewshot_recipe

    out = tmp_path_factory.mktemp("fewshot") / "run"
    # the cohort is small (no k here reaches 64 patients per class): the rule runs from 8, as until session 11
    run_fewshot_recipe(_cfg(ft_cohort, out, "task.blank=negative", "fewshot.min_patients_adapt=8"))
    return out, json.loads((out / "fewshot.json").read_text())


def _test_split_zero_shot_auroc(cohort) -> float:
    """Independently: the zero-shot stage's prompt classifier (softmax over the scaled cosines) on the test
    split's image embeddings, sklearn's AUROC, labels counted from the raw column (blank = negative)."""
    from radalign.finetune.inputs import EmbeddingCache, load_table, split_inputs
    from radalign.pretrain.classifier import binary_probs, logit_scale_of, text_weights
    from radalign.pretrain.export import load_encoders
    from radalign.pretrain.prompts import load_prompt_set
    from sklearn.metrics import roc_auc_score

    enc = load_encoders(cohort["export"])
    table = load_table(cohort["table"])
    frame = table.split("test")
    task = TaskConfig(name="t", labels=[LABEL], blank="negative")
    ev = split_inputs("test", frame, task, ["image"], cache=EmbeddingCache(enc, cohort["shards"],
                      cohort["root"] / "cache", progress=False), featurizer=None)
    tw = text_weights(enc, load_prompt_set("chexpert14").subset([LABEL]))
    import torch

    p = binary_probs(torch.as_tensor(ev.image, dtype=torch.float64), tw.positive.double(), tw.negative.double(),
                     logit_scale_of(enc))[:, 0].numpy()
    raw = pd.to_numeric(frame.set_index("study_id").loc[ev.studies, LABEL], errors="coerce").to_numpy()
    keep = raw != -1  # uncertain excluded; blank (NaN) is a negative
    return float(roc_auc_score((raw[keep] == 1).astype(int), p[keep]))


def test_k0_row_is_zero_shot_exactly(swept, ft_cohort):
    _, doc = swept
    zs = doc["zero_shot_auroc"]
    k0 = [r for r in doc["methods"]["anchored"]["per_draw"] if r["k"] == 0]
    assert len(k0) == 5 and all(r["auroc"] == zs and r["n"] == 0 and r["pull"] == 1.0 for r in k0)
    assert doc["methods"]["anchored"]["summary"]["0"]["mean"] == zs
    assert zs == pytest.approx(_test_split_zero_shot_auroc(ft_cohort), abs=1e-12)
    assert "0" not in doc["methods"]["linear_probe"]["summary"]  # a probe has no k = 0


def test_anchored_pull_shrinks_with_k_in_the_output(swept):
    out, doc = swept
    s = doc["methods"]["anchored"]["summary"]
    pulls = [s[str(k)]["pull"] for k in [0, *KS]]
    assert pulls[0] == 1.0 and all(a >= b for a, b in zip(pulls, pulls[1:])) and pulls[-1] < 1.0, pulls
    for r in doc["methods"]["anchored"]["per_draw"]:
        n = r["n"]
        if r["k"] == 0 or (r["k"] != "all" and r["k"] < 8):  # no shots, or too few to cross-validate: zero-shot
            assert (r["pull"], r["lam"]) == (1.0, None)
        elif r["lam"] is None:  # the cross-validation kept the zero-shot head
            assert r["pull"] == 1.0 and r.get("prior", "zero_shot") == "zero_shot"
        elif r["prior"] == "zero":  # the linear probe itself, its prior weight 1 / fewshot.probe_C
            assert (r["pull"], r["lam"]) == (0.0, 1.0)
        else:  # the prior is worth lam examples among n shots
            assert r["prior"] == "zero_shot" and r["pull"] == pytest.approx(r["lam"] / (r["lam"] + n), rel=1e-12)
    report = (out / "report.md").read_text()
    assert "## anchored" in report and "| draws | pull |" in report
    assert f"| 1 | {s['1']['mean']:.3f}" in report and f"| {s['1']['pull']:.3f} |" in report


def test_recipe_and_bench_agree_on_the_same_draws(swept, ft_cohort, tmp_path):
    sys.path.insert(0, str(REPO))
    from bench import fewshot_heads as bench

    _, doc = swept
    enc, data = bench.load_inputs(ft_cohort["root"], ft_cohort["root"] / "cache", "test", [LABEL], "negative")
    pool, ev, exclude = data[LABEL]
    got = bench.sweep_finding(enc, pool, ev, exclude, LABEL, ["anchored"], {"min_patients_adapt": 8}, KS, range(5))
    for method in ("anchored", "linear_probe"):
        ours = {(str(r["k"]), r["seed"]): r for r in doc["methods"][method]["per_draw"] if r["k"] != 0}
        theirs = {(str(r["k"]), r["seed"]): r for r in got["methods"][method]["per_draw"]}
        assert ours.keys() == theirs.keys() and len(ours) == 5 * len(KS)
        for key, r in ours.items():
            assert (r["sha256"], r["auroc"], r.get("pull")) == (theirs[key]["sha256"], theirs[key]["auroc"],
                                                                 theirs[key].get("pull")), (method, key)
    assert {s["mean"] for s in got["methods"]["zero_shot"]["summary"].values()} == {doc["zero_shot_auroc"]}


def test_summary_line_names_k_zero_shot_probe_and_anchored(swept):
    from radalign.finetune.fewshot_recipe import summary_line

    _, doc = swept
    line = summary_line(doc, 5)
    assert "\n" not in line and "k: zero-shot / anchored / linear_probe" in line
    s = doc["methods"]
    for k in ("1", "all"):
        want = f"{k}: {doc['zero_shot_auroc']:.3f}/{s['anchored']['summary'][k]['mean']:.3f}/" \
               f"{s['linear_probe']['summary'][k]['mean']:.3f}"
        assert want in line, (want, line)


# ----------------------------------------------------------------------------------------------------------
# The label policy: blank = unlabelled or negative, through data.labels.apply_label_policy


RAW = pd.DataFrame({"Pneumothorax": [1.0, 0.0, -1.0, None, np.nan, 1.0, "", 0.0]})


@pytest.mark.parametrize("blank, uncertain, want", [
    ("exclude", "exclude", [1, 0, None, None, None, 1, None, 0]),
    ("negative", "exclude", [1, 0, None, 0, 0, 1, 0, 0]),
    ("negative", "positive", [1, 0, 1, 0, 0, 1, 0, 0]),
    ("exclude", "negative", [1, 0, 0, None, None, 1, None, 0]),
])
def test_blank_policy_decides_the_rows_as_a_hand_count(blank, uncertain, want):
    y = task_labels(RAW, TaskConfig(name="t", labels=["Pneumothorax"], uncertain=uncertain, blank=blank))[:, 0]
    np.testing.assert_array_equal(y, [np.nan if v is None else v for v in want])


def test_blank_policy_on_the_cohort_table_matches_pandas_counts(ft_cohort, swept):
    from radalign.finetune.inputs import load_table

    _, doc = swept
    frame = load_table(ft_cohort["table"]).split("test")
    raw = pd.to_numeric(frame[LABEL], errors="coerce")
    for blank, rows in (("exclude", (raw == 1) | (raw == 0)), ("negative", (raw == 1) | (raw == 0) | raw.isna())):
        y = task_labels(frame, TaskConfig(name="t", labels=[LABEL], blank=blank))[:, 0]
        assert int((~np.isnan(y)).sum()) == int(rows.sum()) and np.nansum(y) == int((raw == 1).sum())
    assert raw.isna().any()  # otherwise the two policies cannot differ here
    assert doc["eval_rows"] == int(((raw == 1) | (raw == 0) | raw.isna()).sum())
    assert doc["label_policy"] == {"uncertain": "exclude", "blank": "negative"}


def test_blank_negative_is_refused_where_a_null_is_no_measurement():
    with pytest.raises(ConfigError, match=r"task\.blank: 'negative' applies to binary/multilabel"):
        load_config(FinetuneConfig, "finetune/long_stay", ["task.blank=negative"], stage="finetune")
    with pytest.raises(ConfigError, match=r"task\.blank: 'zero' is not one of exclude, negative"):
        load_config(FinetuneConfig, "finetune/fewshot_chexpert", ["task.blank=zero"], stage="finetune")


# ----------------------------------------------------------------------------------------------------------
# The previous release's spellings


OLD_YAML = """\
run_dir: runs/demo/finetune/fewshot_pleural_effusion
data: {modalities: [image]}
task: {name: fewshot_pleural_effusion, kind: binary, labels: [Pleural Effusion]}
baselines: {models: []}
fewshot:
  enabled: true
  label: Pleural Effusion
  methods: [prompt_init, linear_probe]
  l2: 1.0
"""


def test_an_old_config_is_refused_once_with_both_fixes(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(OLD_YAML)
    with pytest.raises(ConfigError) as e:
        load_config(FinetuneConfig, str(path), [], stage="finetune")
    msg = str(e.value)
    assert "2 problem(s)" in msg, msg
    assert "fewshot.l2: removed with the prompt_init method" in msg and f"drop fewshot.l2 (in {path})" in msg
    assert "fewshot.methods: 'prompt_init' was removed" in msg and "fewshot.methods=[anchored,linear_probe]" in msg


@pytest.mark.parametrize("over, want", [
    (["fewshot.l2=0.5"], "fewshot.l2: removed with the prompt_init method.*\\(command line: fewshot.l2=0.5\\)"),
    (["fewshot.methods=[prompt_init]"], "fewshot.methods: 'prompt_init' was removed"),
    (["fewshot.methods=[anchored,prompt_init,fusion]"], "fewshot.methods: 'prompt_init' was removed"),
])
def test_old_spellings_on_the_command_line_are_refused(over, want):
    with pytest.raises(ConfigError, match=want):
        load_config(FinetuneConfig, "finetune/fewshot_chexpert", over, stage="finetune")


def test_the_new_defaults_load():
    cfg = load_config(FinetuneConfig, "finetune/fewshot_pneumothorax", [], stage="finetune")
    assert cfg.fewshot.methods == ["anchored", "linear_probe"] and cfg.fewshot.lam0 == LAM0
    assert cfg.fewshot.label == "Pneumothorax" and cfg.fewshot.ks[-1] == "all"
    with pytest.raises(ConfigError, match=r"fewshot\.lam0: 0\.0"):
        load_config(FinetuneConfig, "finetune/fewshot_pneumothorax", ["fewshot.lam0=0"], stage="finetune")
    with pytest.raises(ConfigError, match=r"fewshot\.probe_C: 0\.0; .* must be > 0"):
        load_config(FinetuneConfig, "finetune/fewshot_pneumothorax", ["fewshot.probe_C=0"], stage="finetune")
    from radalign.finetune.fewshot_heads import AnchoredLogistic

    assert cfg.fewshot.min_patients_adapt == AnchoredLogistic.min_patients_adapt == 64  # one default, two places
    assert load_config(FinetuneConfig, "finetune/fewshot_pneumothorax", ["fewshot.min_patients_adapt=8"],
                       stage="finetune").fewshot.min_patients_adapt == 8
    with pytest.raises(ConfigError, match=r"fewshot\.min_patients_adapt: -1; use an integer >= 0"):
        load_config(FinetuneConfig, "finetune/fewshot_pneumothorax", ["fewshot.min_patients_adapt=-1"],
                    stage="finetune")
    with pytest.raises(RadalignError, match=r"fewshot.methods: unknown \['wise'\]"):
        load_config(FinetuneConfig, "finetune/fewshot_pneumothorax", ["fewshot.methods=[wise]"], stage="finetune")


def test_a_sweep_with_a_tuned_tower_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"model.image_tower: lora; the few-shot sweep fits heads.*image_tower=frozen"):
        load_config(FinetuneConfig, "finetune/fewshot_pneumothorax", ["model.image_tower=lora"], stage="finetune")


def test_a_pool_below_the_floor_keeps_anchored_zero_shot_and_says_so(swept, ft_cohort, tmp_path):
    """The default floor (64 patients per class) on a cohort whose pool holds fewer: the head is zero-shot at
    every k, all included, and fewshot.json and report.md say why; the swept run (floor 8) says nothing."""
    from radalign.finetune.fewshot_recipe import run_fewshot_recipe

    out = tmp_path / "run"
    run_fewshot_recipe(_cfg(ft_cohort, out, "task.blank=negative", "fewshot.ks=[1,all]"))
    doc = json.loads((out / "fewshot.json").read_text())
    swept_dir, swept_doc = swept
    floor = doc["anchored_floor"]
    assert floor == {"min_patients_adapt": 64,
                     "pool_patients_per_class": swept_doc["anchored_floor"]["pool_patients_per_class"]}
    assert 8 <= floor["pool_patients_per_class"] < 64  # the swept run's floor of 8 adapts on the same pool
    for k, s in doc["methods"]["anchored"]["summary"].items():
        assert (s["mean"], s["pull"]) == (doc["zero_shot_auroc"], 1.0), k
    note = f"holds {floor['pool_patients_per_class']} patients of its rarer class, fewer than fewshot.min_patients_adapt (64)"
    from radalign import report as R

    assert R.md(note) in (out / "report.md").read_text()  # escaped, as every text of the report
    assert swept_doc["anchored_floor"]["min_patients_adapt"] == 8
    assert R.md("min_patients_adapt") not in (swept_dir / "report.md").read_text()


def test_the_floor_counts_the_drawable_pool_only():
    """Unlabelled rows and validation/test patients are never drawn, so they do not count toward the floor."""
    from types import SimpleNamespace

    from radalign.finetune.fewshot_recipe import _anchored_floor, floor_note

    y = np.array([1, 1, 1, 0, 0, 0, np.nan, 1])
    subjects = np.array([1, 2, 3, 4, 5, 6, 7, 8])  # ids as the table holds them; exclude holds strings
    f = SimpleNamespace(min_patients_adapt=3)
    got = _anchored_floor(f, y, subjects, {"8"}, {"anchored": None})["anchored_floor"]
    assert got == {"min_patients_adapt": 3, "pool_patients_per_class": 3}
    assert floor_note({"anchored_floor": got}) is None
    low = _anchored_floor(f, y, subjects, {"3", "8"}, {"anchored": None})["anchored_floor"]
    assert low["pool_patients_per_class"] == 2 and "holds 2 patients" in floor_note({"anchored_floor": low})
    assert _anchored_floor(f, y, subjects, set(), {"linear_probe": None}) == {}

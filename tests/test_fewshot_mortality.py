"""Few-shot for a clinical task without a prompt (in-hospital mortality, configs/finetune/fewshot_mortality.yaml):
any registry model is a few-shot method (finetune.registry.fewshot_method) whose scores equal fitting that model
directly on the same drawn rows (sklearn's trees; a hand-written AdamW loop), anchored is refused in the one
config error for a prompt-less task, the draws are k per class by patient, the curve JSON holds every (k, method)
with its draws, and every skipped draw is counted by reason."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from radalign.finetune.config import FinetuneConfig
from radalign.finetune.fewshot import UNSCORED, SkipDraw, run_sweep

from radalign import RadalignError
from radalign.config import ConfigError, configs_root, load_config

KS = [1, 2, "all"]
SEEDS = 5
METHODS = ["fusion", "ehr_only", "gbdt", "early_fusion"]
STEPS = 6
BATCH = 16  # optim.batch_size: a k=all draw trains on seeded minibatches, a k <= 8 draw on all its rows


def _cfg(cohort, run_dir, *over) -> FinetuneConfig:
    return load_config(FinetuneConfig, "finetune/fewshot_mortality", [
        f"run_dir={run_dir}", f"data.table={cohort['table']}", f"data.shards={cohort['shards']}",
        f"data.checkpoint={cohort['export']}", f"data.cache={cohort['root'] / 'cache'}", "progress=false",
        "precision=fp32", f"fewshot.ks=[{','.join(map(str, KS))}]", f"fewshot.methods=[{','.join(METHODS)}]",
        f"fewshot.steps={STEPS}", f"optim.batch_size={BATCH}", "baselines.gbdt_max_iter=30", *over],
        stage="finetune")


@pytest.fixture(scope="module")
def swept(ft_cohort, tmp_path_factory):
    from radalign.finetune.fewshot_recipe import run_fewshot_recipe

    out = tmp_path_factory.mktemp("fsmort") / "run"
    cfg = _cfg(ft_cohort, out)
    run_fewshot_recipe(cfg)
    return cfg, out, json.loads((out / "fewshot.json").read_text())


@pytest.fixture(scope="module")
def inputs(ft_cohort, tmp_path_factory):
    """The sweep's train and test inputs, set up by the session in another folder (the same table, export, cache)."""
    from radalign.finetune.session import open_run

    with open_run(_cfg(ft_cohort, tmp_path_factory.mktemp("fsmort-inputs") / "run")) as run:
        return run


def _drawn_rows(out, method, k, seed, pool) -> np.ndarray:
    """The pool rows of the written draw's study ids (read back from draws/, not from the sweep)."""
    ids = json.loads((out / "draws" / f"{method}-k{k}-seed{seed}.json").read_text())["ids"]
    where = {str(s): i for i, s in enumerate(pool.studies)}
    return np.array([where[i] for i in ids])


def _auroc(y, s) -> float:
    from sklearn.metrics import roc_auc_score

    ok = ~np.isnan(y)
    return float(roc_auc_score(y[ok].astype(int), s[ok]))


# ----------------------------------------------------------------------------------------------------------
# A registry model as a few-shot method = that model fitted directly on the same drawn rows


def _sklearn_trees_logit(spec, pool, test, rows) -> np.ndarray:
    """sklearn's HistGradientBoostingClassifier with the registry spec's settings on the drawn rows."""
    from radalign.finetune.registry import gbdt_inputs
    from sklearn.ensemble import HistGradientBoostingClassifier

    (x, cat), (xt, _) = gbdt_inputs(pool, spec["with_image"]), gbdt_inputs(test, spec["with_image"])
    keep = ~np.all(np.isnan(x[rows]), axis=0)  # a column never measured in the draw carries nothing
    clf = HistGradientBoostingClassifier(categorical_features=cat[keep], max_iter=spec["max_iter"],
                                         learning_rate=spec["learning_rate"], max_leaf_nodes=15,
                                         l2_regularization=1.0, early_stopping=False, random_state=spec["seed"])
    clf.fit(x[rows][:, keep], pool.y[rows, 0].astype(int))
    return clf.decision_function(xt[:, keep])


def _hand_trained_logit(spec, pool, test, rows, seed, lr, wd, batch_size=BATCH) -> np.ndarray:
    """The registry model trained by a hand-written loop: AdamW, BCE on the drawn rows, all of them per step or
    `batch_size` of them drawn without replacement by a generator seeded with the draw's seed."""
    from radalign.finetune.registry import build_model

    torch.manual_seed(seed)
    model = build_model(spec)
    torch.manual_seed(seed)  # dropout's draws start from the seed, as in every trainer of the repo
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(list(model.parameters()), lr=lr, weight_decay=wd)
    model.train()
    for _ in range(STEPS):
        sub = rows[torch.randperm(len(rows), generator=gen)[:batch_size].numpy()] if len(rows) > batch_size else rows
        batch = pool.batch(sub, spec["modalities"])
        y = torch.as_tensor(pool.y[sub], dtype=torch.float32)
        out = model(batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(getattr(out, "logits", out), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(test.batch(None, spec["modalities"]))
    return getattr(out, "logits", out)[:, 0].numpy()


@pytest.mark.parametrize("k,seed", [("all", 1), ("all", 4)])
def test_gbdt_method_scores_as_sklearn_trees_fitted_on_the_drawn_rows(swept, inputs, k, seed):
    from radalign.finetune.fewshot_recipe import registry_specs

    cfg, out, doc = swept
    rows = _drawn_rows(out, "gbdt", k, seed, inputs.train)
    want = _auroc(inputs.test.y[:, 0], _sklearn_trees_logit(registry_specs(inputs, ["gbdt"])["gbdt"],
                                                            inputs.train, inputs.test, rows))
    got = next(r for r in doc["methods"]["gbdt"]["per_draw"] if r["k"] == k and r["seed"] == seed)
    assert got["auroc"] == pytest.approx(want, abs=1e-12) and got["n"] == len(rows) and "skipped" not in got
    # the trees ignore the draw's seed: k=all is fitted once and reused (seed 1 above: a reused fit, still equal to
    # sklearn's own fit); torch methods are seeded by the draw and refitted
    assert doc["methods"]["gbdt"]["summary"]["all"]["n_reused"] == 4
    assert doc["methods"]["fusion"]["summary"]["all"]["n_reused"] == 0


@pytest.mark.parametrize("method,k,seed", [("ehr_only", 2, 4), ("fusion", 1, 2), ("early_fusion", "all", 0),
                                           ("fusion", "all", 3)])
def test_torch_method_scores_as_the_model_trained_by_hand_on_the_drawn_rows(swept, inputs, method, k, seed):
    from radalign.finetune.fewshot_recipe import registry_specs

    cfg, out, doc = swept
    rows = _drawn_rows(out, method, k, seed, inputs.train)
    assert k != "all" or len(rows) > BATCH  # k=all trains on minibatches, the others on the whole draw
    spec = registry_specs(inputs, [method])[method]
    want = _hand_trained_logit(spec, inputs.train, inputs.test, rows, seed, cfg.optim.lr, cfg.optim.weight_decay)
    got = next(r for r in doc["methods"][method]["per_draw"] if r["k"] == k and r["seed"] == seed)
    assert got["auroc"] == pytest.approx(_auroc(inputs.test.y[:, 0], want), abs=1e-9)


def test_registry_method_logits_equal_the_direct_fit_and_differ_by_seed(inputs):
    """The wrapper's logits themselves (not only their AUROC), and the seed decides the torch model's fit."""
    from radalign.finetune.fewshot_recipe import registry_specs
    from radalign.finetune.registry import fewshot_method

    pool, test = inputs.train, inputs.test
    rows = np.flatnonzero(~np.isnan(pool.y[:, 0]))[:40]
    spec = registry_specs(inputs, ["ehr_only"])["ehr_only"]
    fit = fewshot_method(spec, pool, test, steps=STEPS, lr=1e-3, weight_decay=1e-2, batch_size=BATCH)
    got = fit(rows, pool.y[rows, 0], 7)
    assert np.allclose(got, _hand_trained_logit(spec, pool, test, rows, 7, 1e-3, 1e-2), atol=1e-5)
    assert not np.allclose(got, fit(rows, pool.y[rows, 0], 8), atol=1e-5)
    g = registry_specs(inputs, ["gbdt"])["gbdt"]
    assert np.allclose(fewshot_method(g, pool, test, steps=1, lr=1, weight_decay=0)(rows, pool.y[rows, 0], 0),
                       _sklearn_trees_logit(g, pool, test, rows), atol=1e-9)


GBDT_SKIP = ("gbdt: fewer than 40 drawn rows; no tree can split (sklearn's min_samples_leaf 20 on each side), so "
             "every study would get the same score")


def test_gbdt_draws_too_small_for_a_split_are_skipped_and_counted_by_reason(swept, inputs):
    """k=1 and k=2 draw 2 and 4 rows: sklearn's trees (min_samples_leaf 20) cannot split them, so the fitted trees
    score every test study the same (checked here with sklearn) and the AUROC would be 0.5 by construction. Those
    draws are skipped with the reason, counted by reason in fewshot.json and report.md; k=all is scored."""
    from radalign.finetune.fewshot_recipe import registry_specs

    _, out, doc = swept
    spec = registry_specs(inputs, ["gbdt"])["gbdt"]
    for k in (1, 2):
        rows = _drawn_rows(out, "gbdt", k, 0, inputs.train)
        assert len(rows) == 2 * k and np.ptp(_sklearn_trees_logit(spec, inputs.train, inputs.test, rows)) == 0
        s = doc["methods"]["gbdt"]["summary"][str(k)]
        assert s["n_skipped"] == SEEDS and s["skipped_by_reason"] == {GBDT_SKIP: SEEDS}
        assert s["n_draws"] == 0 and s["mean"] is None and s["n_unscored"] == 0
        for r in (r for r in doc["methods"]["gbdt"]["per_draw"] if r["k"] == k):
            assert r["skipped"] == GBDT_SKIP and r["auroc"] is None and r["n"] == 2 * k and r["sha256"]
    assert doc["methods"]["gbdt"]["summary"]["all"]["n_skipped"] == 0
    assert doc["skipped"]["total"] == 2 * SEEDS and doc["skipped"]["by_reason"] == {GBDT_SKIP: 2 * SEEDS}
    assert sorted((d["method"], d["k"], d["seed"]) for d in doc["skipped"]["draws"]) == sorted(
        ("gbdt", k, s) for k in (1, 2) for s in range(SEEDS))
    report = (out / "report.md").read_text()
    assert f"Skipped draws: {2 * SEEDS} (method, k, seed in fewshot.json), by reason:" in report
    escaped = GBDT_SKIP.replace("_", "\\_")  # as Markdown shows it
    assert f"| {escaped} | {2 * SEEDS} |" in report
    gbdt = report.split("## gbdt", 1)[1]
    assert f"| 1 | – | 0 | {SEEDS} |" in gbdt and f"| 2 | – | 0 | {SEEDS} |" in gbdt


def test_gbdt_fits_from_the_rows_two_leaves_need(inputs):
    """39 labelled rows: every sklearn tree is one leaf (all test scores equal), skipped; 40: fitted as sklearn."""
    from radalign.finetune.fewshot import SkipDraw
    from radalign.finetune.fewshot_recipe import registry_specs
    from radalign.finetune.registry import fewshot_method

    pool, test = inputs.train, inputs.test
    labelled = np.flatnonzero(~np.isnan(pool.y[:, 0]))
    rows = np.concatenate([labelled[pool.y[labelled, 0] == 1][:10], labelled[pool.y[labelled, 0] == 0][:30]])
    spec = registry_specs(inputs, ["gbdt"])["gbdt"]
    fit = fewshot_method(spec, pool, test, steps=1, lr=1, weight_decay=0)
    assert np.ptp(_sklearn_trees_logit(spec, pool, test, rows[:39])) == 0  # the recipe cannot split 39 rows
    with pytest.raises(SkipDraw) as e:
        fit(rows[:39], pool.y[rows[:39], 0], 0)
    assert str(e.value) == GBDT_SKIP
    want = _sklearn_trees_logit(spec, pool, test, rows)
    assert np.ptp(want) > 0 and np.allclose(fit(rows, pool.y[rows, 0], 0), want, atol=1e-9)


def test_registry_kinds_that_cannot_fit_a_draw_are_refused(inputs):
    from radalign.finetune.registry import fewshot_method

    for kind, why in (("late_fusion", "validation"), ("tuned_fusion", "films"), ("nope", "nope")):
        with pytest.raises(RadalignError, match=why):
            fewshot_method({"kind": kind}, inputs.train, inputs.test, steps=1, lr=1e-3, weight_decay=0)


# ----------------------------------------------------------------------------------------------------------
# The draws: by patient, k per class, from the training split only


def test_every_draw_is_k_per_class_by_patient_from_training(swept, ft_cohort):
    from radalign.finetune.inputs import load_table

    _, out, _ = swept
    t = load_table(ft_cohort["table"])
    train = t.split("train")
    others = {str(p) for s in ("validate", "test") for p in t.split(s)["subject_id"]}
    label = dict(zip(train["study_id"].astype(str), train["in_hospital_mortality"]))
    patient = dict(zip(train["study_id"].astype(str), train["subject_id"].astype(str)))
    labelled = {s for s, v in label.items() if pd.notna(v) and patient[s] not in others}
    n_files = 0
    for method in METHODS:
        for k in KS:
            for seed in range(SEEDS):
                d = json.loads((out / "draws" / f"{method}-k{k}-seed{seed}.json").read_text())
                n_files += 1
                pats = [patient[s] for s in d["ids"]]
                assert not set(pats) & others and set(d["ids"]) <= labelled
                if k == "all":
                    assert set(d["ids"]) == labelled
                    continue
                assert len(set(pats)) == len(pats) == 2 * k  # no patient twice in one draw
                ys = [label[s] for s in d["ids"]]
                assert sorted(ys) == [0.0] * k + [1.0] * k and d["patients"] == pats
    assert n_files == len(METHODS) * len(KS) * SEEDS


def test_methods_share_each_draw(swept):
    _, _, doc = swept
    for k in KS:
        for seed in range(SEEDS):
            shas = {m: next(r["sha256"] for r in doc["methods"][m]["per_draw"] if r["k"] == k and r["seed"] == seed)
                    for m in METHODS}
            assert len(set(shas.values())) == 1, (k, seed, shas)
    two = {next(r["sha256"] for r in doc["methods"]["gbdt"]["per_draw"] if r["k"] == 2 and r["seed"] == s)
           for s in range(SEEDS)}
    assert len(two) == SEEDS  # the seed changes the draw


# ----------------------------------------------------------------------------------------------------------
# The curve: every (k, method) with its draws; no zero-shot point, said with its reason


def test_curve_json_has_every_k_and_method_with_its_draws(swept):
    _, out, doc = swept
    assert list(doc["methods"]) == METHODS
    for m in METHODS:
        s = doc["methods"][m]["summary"]
        assert list(s) == [str(k) for k in KS] and "0" not in s
        for k in KS:
            if m == "gbdt" and k != "all":  # too few rows for a tree to split: skipped (the test above)
                continue
            aus = [r["auroc"] for r in doc["methods"][m]["per_draw"] if r["k"] == k]
            assert len(aus) == SEEDS and s[str(k)]["n_draws"] == SEEDS and s[str(k)]["n_skipped"] == 0
            assert s[str(k)]["mean"] == pytest.approx(np.mean(aus), abs=1e-12)
            assert s[str(k)]["unit"] == "draw" and s[str(k)]["ci_low"] <= s[str(k)]["mean"] <= s[str(k)]["ci_high"]
        assert (out / f"learning_curve-{m}.png").stat().st_size > 1000
    assert (out / "learning_curve.png").stat().st_size > 1000
    assert doc["skipped"]["by_reason"] == {GBDT_SKIP: 2 * SEEDS}  # the gbdt draws of k=1 and 2, no other
    assert doc["unit"].startswith("study")


def test_no_zero_shot_point_is_said_with_its_reason(swept):
    _, out, doc = swept
    assert doc["zero_shot_auroc"] is None and "no prompt" in doc["no_zero_shot"]
    assert "fewshot.prompts is empty" in doc["no_zero_shot"]
    report = (out / "report.md").read_text()
    assert "no zero-shot point" in report and "Zero-shot (k=0" not in report
    for m in METHODS:
        assert json.loads((out / f"fewshot-{m}.json").read_text())["no_zero_shot"] == doc["no_zero_shot"]
    from radalign.finetune.fewshot_recipe import summary_line

    line = summary_line(doc, SEEDS)
    assert "zero-shot" not in line.split(":")[0] and "no zero-shot point" in line
    assert line.count("/") >= len(KS) * (len(METHODS) - 1)


def test_a_prompted_task_keeps_its_zero_shot_sentence():
    from radalign.finetune.fewshot_recipe import _zero_shot_sentence, no_zero_shot_reason

    cfg = load_config(FinetuneConfig, "finetune/fewshot_pneumothorax", stage="finetune")
    assert no_zero_shot_reason(cfg) is None
    assert _zero_shot_sentence({"prompts": "chexpert14", "zero_shot_auroc": 0.6681}) == \
        "Zero-shot (k=0, prompts chexpert14): 0.668."
    img_less = load_config(FinetuneConfig, "finetune/fewshot_pneumothorax",
                           ["data.modalities=[ehr]", "fewshot.methods=[gbdt]"], stage="finetune")
    assert "no image modality" in no_zero_shot_reason(img_less)


# ----------------------------------------------------------------------------------------------------------
# The config check: anchored needs prompts; each method needs its modality; one error lists every problem


@pytest.mark.parametrize("over,why", [
    ([], "fewshot.prompts is empty"),
    (["fewshot.prompts=chexpert14"], "no prompt in prompt set 'chexpert14'"),
    (["fewshot.prompts=5x200"], "no prompt in prompt set '5x200'"),
])
def test_anchored_is_refused_for_a_task_without_prompts(over, why):
    with pytest.raises(ConfigError) as e:
        load_config(FinetuneConfig, "finetune/fewshot_mortality", ["fewshot.methods=[anchored,gbdt]", *over],
                    stage="finetune")
    (p,) = [x for x in e.value.problems if "anchored" in x]
    assert p.startswith("fewshot.methods:") and why in p
    assert "drop anchored" in p and "fewshot.prompts" in p  # the fix: both ways


def test_anchored_refusal_comes_in_the_one_error_with_the_others():
    with pytest.raises(ConfigError) as e:
        load_config(FinetuneConfig, "finetune/fewshot_mortality",
                    ["fewshot.methods=[anchored,text_only]", "fewshot.seeds=3", "data.modalities=[image,ehr]"],
                    stage="finetune")
    keys = sorted(p.split(":")[0] for p in e.value.problems)
    assert keys == ["fewshot.methods", "fewshot.methods", "fewshot.seeds"], e.value.problems
    assert any("text_only reads the text modality" in p for p in e.value.problems)


def test_a_binary_prompt_set_that_is_not_multiclass_is_needed():
    from radalign.finetune.config import prompt_free_reason

    assert prompt_free_reason("Pneumothorax", "chexpert14") is None
    assert "multiclass, not binary" in prompt_free_reason("Atelectasis", "5x200")
    assert "does not load" in prompt_free_reason("Pneumothorax", "no_such_set")


def test_prompted_configs_still_load_with_anchored():
    for name in ("fewshot_pneumothorax", "fewshot_chexpert"):
        cfg = load_config(FinetuneConfig, f"finetune/{name}", stage="finetune")
        assert "anchored" in cfg.fewshot.methods


@pytest.mark.parametrize("method,modality", [("ehr_only", "ehr"), ("gbdt", "ehr"), ("image_only", "image"),
                                             ("linear_probe", "image")])
def test_a_method_without_its_modality_is_refused(method, modality):
    others = [m for m in ("image", "text", "ehr") if m != modality]
    with pytest.raises(ConfigError, match=f"{method} reads the {modality} modality"):
        load_config(FinetuneConfig, "finetune/fewshot_mortality",
                    [f"fewshot.methods=[{method}]", f"data.modalities=[{','.join(others)}]"], stage="finetune")


# ----------------------------------------------------------------------------------------------------------
# Skipped draws: counted by reason, out of the summary's draws


def test_skipped_draws_are_counted_by_reason_and_left_out_of_the_mean():
    rng = np.random.default_rng(0)
    y = np.array([0.0, 1.0] * 20)
    pats = np.array([f"p{i}" for i in range(40)])
    ids = np.array([f"s{i}" for i in range(40)])
    eval_y = rng.integers(0, 2, 30).astype(float)

    def method(rows, yy, seed):
        if seed in (1, 3):
            raise SkipDraw("no drawn row has the EHR")
        if seed == 4 and len(rows) == 2:
            raise SkipDraw("too few rows")
        return eval_y + np.random.default_rng(seed).normal(size=30)

    res = run_sweep(method, y, pats, ids, eval_y=eval_y, ks=(1, 2), seeds=range(5))
    s1, s2 = res.summary["1"], res.summary["2"]
    assert s1["n_skipped"] == 3 and s1["skipped_by_reason"] == {"no drawn row has the EHR": 2, "too few rows": 1}
    assert s2["n_skipped"] == 2 and s2["skipped_by_reason"] == {"no drawn row has the EHR": 2}
    kept = [_auroc(eval_y, eval_y + np.random.default_rng(s).normal(size=30)) for s in (0, 2)]
    assert s1["n_draws"] == 2 and s1["mean"] == pytest.approx(np.mean(kept))
    for s in (s1, s2):  # a skipped draw is counted once, as skipped, never also as an unscored draw
        assert s["n_draws"] + s["n_skipped"] == 5 and s["n_unscored"] == 0
    one_class = run_sweep(method, y, pats, ids, eval_y=np.ones(30), ks=(1,), seeds=range(5))
    assert one_class.summary["1"]["skipped_by_reason"] == {UNSCORED: 2, "no drawn row has the EHR": 2,
                                                           "too few rows": 1}
    assert one_class.summary["1"]["mean"] is None and one_class.summary["1"]["n_draws"] == 0


def test_the_recipe_counts_every_skipped_method_k_and_seed():
    from radalign.finetune.fewshot import SweepResult
    from radalign.finetune.fewshot_recipe import _skipped

    a = SweepResult("gbdt", [1], list(range(5)), [{"k": 1, "seed": s, "auroc": None, "skipped": "r1"}
                                                 for s in (0, 2)] + [{"k": 1, "seed": 1, "auroc": 0.7}], {}, None)
    b = SweepResult("fusion", [4], list(range(5)), [{"k": 4, "seed": 3, "auroc": None, "skipped": "r2"}], {}, None)
    got = _skipped([a, b])
    assert got["total"] == 3 and got["by_reason"] == {"r1": 2, "r2": 1}
    assert {(d["method"], d["k"], d["seed"]) for d in got["draws"]} == {("gbdt", 1, 0), ("gbdt", 1, 2),
                                                                        ("fusion", 4, 3)}


@pytest.mark.parametrize("name", sorted(p.stem for p in (configs_root() / "finetune").glob("*.yaml")))
def test_every_finetune_yaml_loads_and_validates(name):
    cfg = load_config(FinetuneConfig, f"finetune/{name}", stage="finetune")
    assert cfg.validate() == []


def test_a_training_config_is_not_held_to_the_fewshot_methods():
    """fewshot.methods defaults to [anchored, linear_probe] in every config; only a sweep (fewshot.enabled) needs
    their image modality and prompts."""
    cfg = load_config(FinetuneConfig, "finetune/in_hospital_mortality", ["data.modalities=[ehr]"], stage="finetune")
    assert cfg.data.modalities == ["ehr"] and not cfg.fewshot.enabled
    with pytest.raises(ConfigError, match="anchored reads the image modality"):
        load_config(FinetuneConfig, "finetune/in_hospital_mortality",
                    ["data.modalities=[ehr]", "fewshot.enabled=true", "fewshot.label=in_hospital_mortality",
                     "fewshot.prompts=chexpert14"], stage="finetune")

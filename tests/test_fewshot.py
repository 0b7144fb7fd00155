"""Few-shot protocol: draws by patient, seeded, disjoint from validation/test, written with sha256; a head that
starts at the zero-shot classifier (finetune.fewshot_heads through head_method) is exactly zero-shot at k=0."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from radalign.finetune.fewshot import (
    check_disjoint,
    draw_k_per_class,
    head_method,
    linear_probe_method,
    prompt_init,
    read_draw,
    run_sweep,
    summarise,
    write_draw,
    write_sweep,
)
from radalign.finetune.fewshot_heads import ZeroShotInit, anchored_head, make_head

from radalign import RadalignError


def _pool(n_pat=30, seed=0):
    rng = np.random.default_rng(seed)
    pats, ids, y = [], [], []
    for p in range(n_pat):
        for s in range(rng.integers(1, 4)):  # several studies per patient
            pats.append(f"p{p}")
            ids.append(f"s{p}_{s}")
            y.append(float(rng.integers(0, 2)) if rng.random() > 0.1 else np.nan)
    return np.array(y), np.array(pats), np.array(ids)


def test_draw_is_by_patient_seeded_and_order_free():
    y, pats, ids = _pool()
    d = draw_k_per_class(y, pats, ids, 4, seed=3, exclude_patients=["p0", "p1"])
    assert d.classes == {"0": 4, "1": 4} and len(set(d.patients)) == 8  # one example per patient
    assert not {"p0", "p1"} & set(d.patients)
    assert all(not np.isnan(y[r]) for r in d.rows)
    assert d.sha256 == hashlib.sha256("\n".join(sorted(d.ids)).encode()).hexdigest()
    perm = np.random.default_rng(9).permutation(len(y))  # the table's row order does not matter
    d2 = draw_k_per_class(y[perm], pats[perm], ids[perm], 4, seed=3, exclude_patients=["p0", "p1"])
    assert d2.ids == d.ids
    # another seed, the same pool and exclusions (one variable changed): another draw
    assert draw_k_per_class(y, pats, ids, 4, seed=4, exclude_patients=["p0", "p1"]).sha256 != d.sha256
    with pytest.raises(RadalignError, match="also in test"):
        check_disjoint(d, validate=["p99"], test=[d.patients[0]])


def test_class_with_too_few_patients_is_named(tmp_path):
    y, pats, ids = _pool(n_pat=6)
    counts = {c: len({p for p, v in zip(pats, y) if v == c}) for c in (0, 1)}
    rare = min(counts, key=lambda c: (counts[c], c))  # the rarest class is drawn first
    with pytest.raises(RadalignError, match=f"class {rare} has {counts[rare]} patient"):
        draw_k_per_class(y, pats, ids, 50, seed=0)
    d = draw_k_per_class(y, pats, ids, "all", seed=0)
    assert len(d.ids) == int((~np.isnan(y)).sum())
    write_draw(tmp_path / "d.json", d)
    assert read_draw(tmp_path / "d.json").ids == d.ids
    doc = json.loads((tmp_path / "d.json").read_text())
    doc["ids"] = doc["ids"][:-1]
    (tmp_path / "d.json").write_text(json.dumps(doc))
    with pytest.raises(RadalignError, match="sha256"):
        read_draw(tmp_path / "d.json")
    (tmp_path / "d.json").write_text(json.dumps({**doc, "format": "something/9"}))
    with pytest.raises(RadalignError, match=r"not a few-shot draw \(format 'something/9'"):
        read_draw(tmp_path / "d.json")


def test_prompt_head_at_k0_is_zero_shot():
    from radalign.pretrain.classifier import binary_probs

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tp, tn = rng.normal(size=8), rng.normal(size=8)
    init = ZeroShotInit(np.stack([tp, tn]), 50.0)
    for make in (anchored_head, lambda: make_head("zero_shot")):
        s, chosen = head_method(make, x, x, [f"p{i}" for i in range(20)], init)(np.array([], int), np.array([]), 0)
        norm = lambda v: torch.tensor(v / np.linalg.norm(v))[None].double()  # noqa: E731
        ref = binary_probs(torch.tensor(x), norm(tp), norm(tn), 50.0)[:, 0].numpy()
        assert np.allclose(1 / (1 + np.exp(-s)), ref, atol=1e-12) and chosen["pull"] == 1.0


def test_summary_and_sweep(tmp_path):
    from scipy import stats

    v = [0.6, 0.7, 0.8, 0.65, 0.75]
    s = summarise(v)
    lo, hi = stats.t.interval(0.95, 4, loc=np.mean(v), scale=stats.sem(v))
    assert s["ci_low"] == pytest.approx(lo) and s["ci_high"] == pytest.approx(hi)
    wide = summarise([0.99, 0.7, 0.98, 0.97, 0.99])  # t-interval [0.75, 1.10]: clipped to the AUROC range
    assert wide["ci_high"] == 1.0 and wide["ci_low"] < wide["mean"]
    rng = np.random.default_rng(0)
    n = 400
    y = (rng.random(n) < 0.4).astype(float)
    d = np.zeros(16)
    d[0] = 1
    x = rng.normal(size=(n, 16)) * 0.5 + y[:, None] * d
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pats, ids = np.array([f"p{i}" for i in range(n)]), np.array([f"s{i}" for i in range(n)])
    w0, b0 = prompt_init(d + 0.3 * rng.normal(size=16), -d + 0.3 * rng.normal(size=16), 10.0)
    ev = slice(300, 400)
    with pytest.raises(RadalignError, match="at least 5"):
        run_sweep(lambda r, yy, s: x[ev] @ w0, y[:300], pats[:300], ids[:300], eval_y=y[ev], seeds=range(3))
    init = ZeroShotInit(np.stack([d + 0.3 * rng.normal(size=16), -d + 0.3 * rng.normal(size=16)]), 10.0)
    res = run_sweep(head_method(anchored_head, x[:300], x[ev], pats[:300], init), y[:300], pats[:300], ids[:300],
                    eval_y=y[ev], ks=(0, 1, 2, 4), seeds=range(5), method_name="anchored")
    assert [r["k"] for r in res.per_draw] == [0] * 5 + [1] * 5 + [2] * 5 + [4] * 5
    # the pull the head chose, per draw and as the mean per k: below 8 patients per class the zero-shot head (1)
    assert [r["pull"] for r in res.per_draw] == [1.0] * 20 and [r["lam"] for r in res.per_draw] == [None] * 20
    assert res.summary["2"]["pull"] == 1.0 and res.per_draw[0]["n"] == 0
    write_sweep(tmp_path, res)
    assert (tmp_path / "learning_curve-anchored.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "draws").glob("*.json"))) == 20


# ----------------------------------------------------------------------------------------------------------
# Draws: one variable changed at a time, expectations counted by hand over the pool.


def _both_classes_pool(n_pat=12):
    """Every patient has studies of BOTH classes (1-3 of each), ids not in patient order."""
    rng = np.random.default_rng(5)
    pats, ids, y = [], [], []
    for p in range(n_pat):
        for c in (0.0, 1.0):
            for s in range(rng.integers(1, 4)):
                pats.append(f"q{p}")
                ids.append(f"{(p * 7919 + int(c) * 31 + s) % 1000:03d}-{p}-{int(c)}-{s}")
                y.append(c)
    return np.array(y), np.array(pats), np.array(ids)


def _check_draw(d, y, pats, k):
    """k distinct patients per class (k counts patients), one row each, the row's label is its class."""
    assert len(d.patients) == len(set(d.patients)) == 2 * k  # a patient enters a draw once
    per_class = {}
    for r, p in zip(d.rows, d.patients):
        assert pats[r] == p and not np.isnan(y[r])
        per_class.setdefault(y[r], set()).add(p)
    assert {c: len(v) for c, v in per_class.items()} == {0.0: k, 1.0: k}
    assert d.classes == {"0": k, "1": k}


def test_a_patient_with_both_classes_is_drawn_for_one_only():
    y, pats, ids = _both_classes_pool(12)
    for seed in range(20):
        _check_draw(draw_k_per_class(y, pats, ids, 6, seed=seed), y, pats, 6)  # needs all 12 patients
    # k=7: the first class takes 7 of the 12 patients, 5 remain for the other; the error says why
    with pytest.raises(RadalignError, match=r"class 1 has 5 patient\(s\).*7 more already drawn for another class"):
        draw_k_per_class(y, pats, ids, 7, seed=0)


def test_the_seed_decides_the_draw_with_everything_else_fixed():
    y, pats, ids = _pool(n_pat=40)
    ex = ["p0", "p1", "p2"]
    draws = {s: draw_k_per_class(y, pats, ids, 3, seed=s, exclude_patients=ex) for s in range(10)}
    assert all(d.seed == s for s, d in draws.items())
    assert len({d.sha256 for d in draws.values()}) >= 9  # C(~18, 3)^2 draws: ten seeds almost never repeat
    again = draw_k_per_class(y, pats, ids, 3, seed=7, exclude_patients=ex)
    assert again.ids == draws[7].ids and again.rows == draws[7].rows


def test_every_eligible_patient_and_example_can_be_drawn():
    """Over many seeds, k=1 draws each eligible patient about equally often (not always the first ones), and
    a patient with several studies of the class gives each of them (not always its first)."""
    pats = np.array([f"p{i}" for i in range(8)] + ["p0", "p0"])
    ids = np.array([f"s{i:02d}" for i in range(10)])
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1], float)  # class 1: p0 (3 studies), p1, p2, p3
    n = 400
    first = {}
    chosen_p0 = set()
    for seed in range(n):
        d = draw_k_per_class(y, pats, ids, 1, seed=seed)
        for r, p in zip(d.rows, d.patients):
            if y[r] == 1:
                first[p] = first.get(p, 0) + 1
                if p == "p0":
                    chosen_p0.add(ids[r])
    assert sorted(first) == ["p0", "p1", "p2", "p3"]
    for p, c in first.items():  # binomial(400, 1/4): mean 100, sd 8.7
        assert 60 < c < 140, (p, c)
    assert chosen_p0 == {"s00", "s08", "s09"}


def test_excluded_patients_are_never_drawn_whatever_k():
    y, pats, ids = _pool(n_pat=30)
    pats_int = np.array([int(p[1:]) for p in pats])  # integer subject ids, excluded as integers
    ex = [0, 1, 2, 3, 4, 5]
    keep = ~np.isin(pats_int, ex) & ~np.isnan(y)
    d = draw_k_per_class(y, pats_int, ids, "all", seed=0, exclude_patients=ex)
    assert sorted(d.ids) == sorted(ids[keep]) and len(d.ids) == int(keep.sum())  # by hand over the pool
    assert d.classes == {"0": int((y[keep] == 0).sum()), "1": int((y[keep] == 1).sum())}
    for k in (1, 2, 4):
        for seed in range(5):
            got = draw_k_per_class(y, pats_int, ids, k, seed=seed, exclude_patients=ex)
            assert not {str(p) for p in ex} & set(got.patients)
    with pytest.raises(RadalignError, match="also in validate"):
        check_disjoint(d, validate=[str(pats_int[keep][0])], test=["nobody"])
    check_disjoint(d, validate=["0"], test=[1, 2])  # excluded ones: no overlap, no error


@pytest.mark.parametrize("k", [-1, "3", 2.5, None, True])
def test_bad_k_is_refused(k):
    y, pats, ids = _pool()
    with pytest.raises(RadalignError, match="few-shot k"):
        draw_k_per_class(y, pats, ids, k, seed=0)


def test_bad_pool_is_refused():
    y, pats, ids = _pool()
    with pytest.raises(RadalignError, match="must match"):
        draw_k_per_class(y[:-1], pats, ids, 1, seed=0)
    dup = ids.copy()
    dup[1] = dup[0]
    with pytest.raises(RadalignError, match="not unique"):
        draw_k_per_class(y, pats, dup, 1, seed=0)


# ----------------------------------------------------------------------------------------------------------
# The sweep: each (k, seed) draws with its own seed and the exclusions, fits on the draw, scores eval rows.


def test_sweep_draws_with_each_seed_and_scores_eval_rows_by_sklearn():
    from sklearn.metrics import roc_auc_score

    y, pats, ids = _pool(n_pat=40, seed=2)
    ex = ["p3", "p4"]
    rng = np.random.default_rng(0)
    eval_y = rng.integers(0, 2, 60).astype(float)
    eval_y[:5] = np.nan  # unlabelled evaluation rows are left out of the AUROC
    calls = []

    def method(rows, yy, seed):
        calls.append((np.asarray(rows).copy(), np.asarray(yy).copy(), seed))
        return eval_y * 0.5 + np.random.default_rng(100 + seed + len(rows)).normal(size=60)  # seed-dependent

    res = run_sweep(method, y, pats, ids, eval_y=eval_y, ks=(1, 3), seeds=range(5), exclude_patients=ex)
    assert [(r["k"], r["seed"]) for r in res.per_draw] == [(k, s) for k in (1, 3) for s in range(5)]
    ok = ~np.isnan(eval_y)
    for (rows, yy, seed), r in zip(calls, res.per_draw):
        ref = draw_k_per_class(y, pats, ids, r["k"], seed=r["seed"], exclude_patients=ex)
        assert seed == r["seed"] and list(rows) == ref.rows and r["sha256"] == ref.sha256
        assert np.array_equal(yy, y[rows]) and r["n"] == 2 * r["k"]
        assert not set(ex) & set(pats[rows])
        s = method(rows, yy, seed)
        assert r["auroc"] == pytest.approx(roc_auc_score(eval_y[ok], s[ok]))
    for k in (1, 3):
        au = [r["auroc"] for r in res.per_draw if r["k"] == k]
        assert res.summary[str(k)]["mean"] == pytest.approx(np.mean(au))
        assert res.summary[str(k)]["sd"] == pytest.approx(np.std(au, ddof=1))
        assert res.summary[str(k)]["n_draws"] == 5


def test_summary_counts_unscored_draws_and_clips_at_both_ends():
    s = summarise([0.6, None, float("nan"), 0.7])
    assert s["n_draws"] == 2 and s["n_unscored"] == 2 and s["mean"] == pytest.approx(0.65)
    assert s["sd"] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    one = summarise([0.8])
    assert one["sd"] == 0.0 and one["ci_low"] == one["ci_high"] == pytest.approx(0.8)
    low = summarise([0.01, 0.3, 0.02, 0.03, 0.01])  # t-interval reaches below 0: clipped
    assert low["ci_low"] == 0.0 and low["ci_high"] < 1.0 and low["min"] == 0.01 and low["max"] == 0.3
    assert summarise([None, None])["mean"] is None and summarise([])["n_draws"] == 0
    keys = {"n_draws", "n_unscored", "unit", "mean", "sd", "min", "max", "ci_low", "ci_high"}
    for r in (s, one, summarise([None])):
        assert set(r) == keys and r["unit"] == "draw"


def test_sweep_files_name_method_k_and_seed(tmp_path):
    y, pats, ids = _pool(n_pat=30)
    eval_y = np.tile([0.0, 1.0], 20)
    res = run_sweep(lambda rows, yy, seed: eval_y + seed, y, pats, ids, eval_y=eval_y, ks=(1, "all"),
                    seeds=range(5), method_name="probe")
    doc = write_sweep(tmp_path, res)
    assert json.loads((tmp_path / "fewshot-probe.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["summary"]["1"]["mean"] == 1.0 and doc["ks"] == [1, "all"]
    assert doc["method"] == "probe" and doc["seeds"] == list(range(5)) and doc["per_draw"] == res.per_draw
    assert doc["metric"] == "auroc on the evaluation split" and doc["validation"].startswith("none")
    for k in (1, "all"):
        for seed in range(5):
            d = read_draw(tmp_path / "draws" / f"probe-k{k}-seed{seed}.json")
            assert d.k == k and d.seed == seed
            assert d.ids == draw_k_per_class(y, pats, ids, k, seed=seed).ids


# ----------------------------------------------------------------------------------------------------------
# Methods against independent fits.


def test_prompt_init_hand_worked():
    w0, b0 = prompt_init(np.array([3.0, 4.0]), np.array([0.0, 2.0]), 10.0)
    # t+ / |t+| = (0.6, 0.8), t- / |t-| = (0, 1): w0 = 10 (0.6, -0.2)
    assert w0 == pytest.approx([6.0, -2.0]) and b0 == 0.0


def test_k0_draws_nothing_whatever_the_seed():
    y, pats, ids = _pool()
    for seed in range(3):
        d = draw_k_per_class(y, pats, ids, 0, seed=seed, exclude_patients=["p0"])
        assert (d.k, d.ids, d.rows, d.classes) == (0, [], [], {}) and d.sha256 == hashlib.sha256(b"").hexdigest()


def test_linear_probe_is_sklearn_logistic_regression_with_its_C():
    from radalign.finetune.fewshot import linear_probe_method
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    x, xe = rng.normal(size=(20, 5)), rng.normal(size=(7, 5))
    y = np.array([0, 1] * 10, float)
    rows = np.arange(3, 17)
    got = linear_probe_method(x, xe, C=0.05)(rows, y[rows], 3)
    ref = LogisticRegression(C=0.05, max_iter=5000, tol=1e-10).fit(x[rows], y[rows].astype(int))
    assert got == pytest.approx(ref.decision_function(xe), abs=1e-4)


def _sweep_pool(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n + 100) < 0.4).astype(float)
    d = np.zeros(16)
    d[0] = 1
    x = rng.normal(size=(n + 100, 16)) * 0.5 + y[:, None] * d
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pats = np.array([f"p{i // 2}" for i in range(n + 100)])  # two studies per patient: k=all still draws one each
    ids = np.array([f"s{i}" for i in range(n + 100)])
    init = ZeroShotInit(np.stack([d + 0.3 * rng.normal(size=16), -d + 0.3 * rng.normal(size=16)]), 10.0)
    return x, y, pats, ids, init


def test_a_seed_free_method_is_fitted_once_per_distinct_draw_and_reused():
    x, y, pats, ids, _ = _sweep_pool()
    calls = []

    def method(rows, yy, seed):
        calls.append(rows.tobytes())
        return x[300:] @ x[rows].T @ (2 * yy - 1)

    marked = lambda rows, yy, seed: method(rows, yy, seed)  # noqa: E731
    marked.seed_free = True
    kw = dict(eval_y=y[300:], ks=(2, "all"), seeds=range(5))
    a = run_sweep(marked, y[:300], pats[:300], ids[:300], **kw)
    distinct = {np.asarray(d.rows, int).tobytes() for d in a.draws}
    assert len(calls) == len(distinct) == 6  # five different k=2 draws, one k=all draw shared by the five seeds
    assert [bool(r.get("reused")) for r in a.per_draw] == [False] * 6 + [True] * 4
    assert a.summary["all"]["n_reused"] == 4 and a.summary["2"]["n_reused"] == 0
    calls.clear()
    b = run_sweep(method, y[:300], pats[:300], ids[:300], **kw)  # not marked: every draw fitted
    assert len(calls) == 10 and [r["auroc"] for r in b.per_draw] == [r["auroc"] for r in a.per_draw]


def test_the_anchored_head_and_the_probe_are_seed_free_so_reuse_changes_no_number():
    """What makes the reuse exact: the heads marked seed-free give the same numbers when every draw is fitted."""
    x, y, pats, ids, init = _sweep_pool()
    for make in (head_method(anchored_head, x[:300], x[300:], pats[:300], init), linear_probe_method(x[:300], x[300:])):
        assert make.seed_free
        refit = lambda rows, yy, seed, m=make: m(rows, yy, seed)  # noqa: E731 (unmarked: fitted every time)
        kw = dict(eval_y=y[300:], ks=(16, "all"), seeds=range(5))
        a = run_sweep(make, y[:300], pats[:300], ids[:300], **kw)
        b = run_sweep(refit, y[:300], pats[:300], ids[:300], **kw)
        assert a.summary["all"]["n_reused"] == 4
        assert [r["auroc"] for r in a.per_draw] == [r["auroc"] for r in b.per_draw]
        assert [r.get("pull") for r in a.per_draw] == [r.get("pull") for r in b.per_draw]

"""Few-shot heads (finetune/fewshot_heads.py): k=0 is zero-shot exactly, the pull toward zero-shot shrinks as k
grows, the MAP head is sklearn's logistic regression where the pull is 0 (or centred at 0), it reaches the probe's
solution with many shots, determinism, and the inner cross-validation never splits a patient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from radalign.finetune.fewshot_heads import (
    HEADS,
    AnchoredLogistic,
    ZeroShotInit,
    anchored_head,
    anchored_path,
    corrected_one_se_choice,
    fit_anchored,
    grouped_folds,
    make_head,
    map_newton,
    one_se_choice,
    prompt_init,
)
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from radalign import RadalignError

D = 8


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The torch heads (clap, lppp, tip_f) fit tiny problems: one thread, not a spin-waiting pool on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _unit_rows(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _problem(n, seed=0, w_true=None, rows_per_patient=1, noise=1.0):
    """n unit-norm embeddings [n, D], labels from a logistic model, patient ids (rows_per_patient rows each)."""
    rng = np.random.default_rng(seed)
    w_true = np.r_[6.0, 3.0, np.zeros(D - 2)] if w_true is None else w_true
    x = _unit_rows(rng.normal(size=(n, D)) + 0.3)
    y = (rng.random(n) < 1 / (1 + np.exp(-(x @ w_true) / noise))).astype(float)
    groups = np.array([f"p{i // rows_per_patient}" for i in range(n)])
    return x, y, groups


def _init(pos_dir=None, scale=10.0):
    """Text prototypes whose zero-shot direction (t+ - t-) is `pos_dir` (default: axis 2, unrelated to w_true)."""
    t = np.zeros((2, D))
    pos_dir = np.eye(D)[2] if pos_dir is None else pos_dir
    t[0] = _unit_rows((np.eye(D)[3] + 0.5 * pos_dir)[None])[0]
    t[1] = _unit_rows((np.eye(D)[3] - 0.5 * pos_dir)[None])[0]
    return ZeroShotInit(t, scale)


def _balanced_k(x, y, groups, k, seed=0):
    rng = np.random.default_rng(seed)
    rows = np.r_[rng.permutation(np.flatnonzero(y == 1))[:k], rng.permutation(np.flatnonzero(y == 0))[:k]]
    return x[rows], y[rows], groups[rows]


# ----------------------------------------------------------------------------------------------------------
# k = 0: the zero-shot logit, exactly, for every head


@pytest.mark.parametrize("name", sorted(HEADS))
def test_no_shots_is_zero_shot_exactly(name):
    init = _init()
    x_test = _problem(40, seed=5)[0]
    expect = x_test @ (init.logit_scale * (init.prototypes[0] - init.prototypes[1]))  # s (t+ - t-), b0 = 0
    head = make_head(name).fit(np.zeros((0, D)), [], [], init, seed=0)
    np.testing.assert_array_equal(head.predict_logit(x_test), init.logit(x_test))
    np.testing.assert_allclose(head.predict_logit(x_test), expect, rtol=1e-12, atol=1e-12)
    assert head.pull_ == 1.0


@pytest.mark.parametrize("name", sorted(HEADS))
def test_refit_with_no_shots_forgets_the_previous_fit(name):
    x, y, g = _problem(200, seed=1)
    init = _init()
    head = make_head(name).fit(x, y, g, init, seed=0)
    head.fit(np.zeros((0, D)), [], [], init, seed=0)
    np.testing.assert_array_equal(head.predict_logit(x), init.logit(x))


# ----------------------------------------------------------------------------------------------------------
# The pull shrinks as k grows


@pytest.mark.parametrize("least", [None, 8])  # None: the default, 64 patients per class; 8: the rule until session 11
def test_anchored_is_zero_shot_below_its_least_patients_per_class_and_pull_is_lam_over_lam_plus_n(least):
    x, y, g = _problem(4000, seed=2)
    xt = _problem(50, seed=20)[0]
    init = _init()
    options = {} if least is None else {"min_patients_adapt": least}
    least = AnchoredLogistic(**options).min_patients_adapt
    assert least == (64 if not options else 8)
    for k in (1, 2, 4, 7, 8, 16, 63, 64):
        xs, ys, gs = _balanced_k(x, y, g, k, seed=k)
        head = AnchoredLogistic(**options).fit(xs, ys, gs, init, seed=0)
        lam = head.info_["lam"]
        if k < least:  # no cross-validation: the zero-shot head itself, exactly
            assert (lam, head.pull_, head.folds_) == (math.inf, 1.0, [])
            np.testing.assert_array_equal(head.predict_logit(xt), init.logit(xt))
        else:
            assert len(head.folds_) == 15  # 3 repeats x 5 grouped folds
            expect = 1.0 if math.isinf(lam) else lam / (lam + 2 * k)
            assert head.pull_ == pytest.approx(expect, rel=1e-12)


def test_anchored_pull_shrinks_with_k_in_expectation():
    """The zero-shot direction is wrong (axis 2, the planted one is axes 0-1): the mean pull over draws falls
    (weakly) as k grows, from 1 (no shots can show a gain) to almost nothing once the shots outweigh the prior."""
    x, y, g = _problem(6000, seed=3, w_true=np.r_[12.0, 6.0, np.zeros(D - 2)])
    init = _init()
    means = [np.mean([AnchoredLogistic().fit(*_balanced_k(x, y, g, k, seed=s), init).pull_ for s in range(4)])
             for k in (1, 4, 8, 32, 128, 512)]
    assert means[0] == means[1] == 1.0
    assert all(a >= b for a, b in zip(means, means[1:])), means
    assert means[-1] < 0.01, means


@pytest.mark.parametrize("name", ["anchored_cv", "wise"])
def test_cv_heads_pull_shrinks_from_small_to_large_k(name):
    x, y, g = _problem(6000, seed=3, w_true=np.r_[12.0, 6.0, np.zeros(D - 2)])
    init = _init()
    small = make_head(name).fit(*_balanced_k(x, y, g, 1), init, seed=0)
    large = make_head(name).fit(*_balanced_k(x, y, g, 1000), init, seed=0)
    assert small.pull_ == 1.0  # 1 patient per class: no CV, the zero-shot head
    assert large.pull_ < 0.2


def test_anchored_weights_move_from_w0_toward_the_data_as_k_grows():
    x, y, g = _problem(6000, seed=4)
    init = _init()
    w0, _ = init.head()
    dist = [np.linalg.norm(AnchoredLogistic().fit(*_balanced_k(x, y, g, k), init).w_ - w0) for k in (1, 4, 1000)]
    assert dist[0] == dist[1] == 0.0 < dist[2]  # below 8 patients per class the head stays at w0


# ----------------------------------------------------------------------------------------------------------
# Against sklearn and scipy


@pytest.mark.parametrize("lam", [0.25, 1.0, 8.0])
def test_map_head_centred_at_zero_is_sklearn_l2_logistic_regression(lam):
    """sklearn minimises C sum BCE + |w|^2 / 2 with an unpenalised intercept (lbfgs): lam = 1 / C."""
    x, y, _ = _problem(300, seed=6)
    theta = fit_anchored(x, y, np.zeros(D), lam)
    ref = LogisticRegression(C=1 / lam, tol=1e-12, max_iter=10000).fit(x, y.astype(int))
    np.testing.assert_allclose(theta[:-1], ref.coef_[0], atol=1e-4)  # lbfgs stops near, not at, the optimum
    assert theta[-1] == pytest.approx(ref.intercept_[0], abs=1e-4)


def test_map_head_with_vanishing_pull_is_the_unpenalised_probe_whatever_w0():
    x, y, _ = _problem(400, seed=7, noise=3.0)  # not separable: the unpenalised optimum is finite
    init = _init(scale=50.0)
    w0, _ = init.head()
    theta = fit_anchored(x, y, w0, 1e-9)
    ref = LogisticRegression(penalty=None, tol=1e-12, max_iter=10000).fit(x, y.astype(int))
    np.testing.assert_allclose(theta[:-1], ref.coef_[0], rtol=1e-4, atol=1e-4)


def test_map_head_is_the_minimum_of_the_anchored_objective_scipy():
    """argmin sum BCE(x w + b) + lam/2 |w - w0|^2 with b unpenalised, checked by scipy's BFGS on the same sum."""
    x, y, _ = _problem(120, seed=8)
    init = _init()
    w0, _ = init.head()
    lam = 3.0

    def f(t):
        z = x @ t[:-1] + t[-1]
        return np.sum(np.logaddexp(0, z) - y * z) + lam / 2 * np.sum((t[:-1] - w0) ** 2)
    ref = minimize(f, np.zeros(D + 1), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(fit_anchored(x, y, w0, lam), ref, atol=1e-5)


def test_map_newton_reaches_the_minimum_from_a_far_start():
    x, y, _ = _problem(80, seed=9)
    xa = np.hstack([x, np.ones((80, 1))])
    centre, prec = np.linspace(-1, 1, D + 1), np.full(D + 1, 0.5)
    a = map_newton(xa, y, centre, prec)
    b = map_newton(xa, y, centre, prec, start=np.full(D + 1, 40.0))
    np.testing.assert_allclose(a, b, atol=1e-7)
    grad = xa.T @ (1 / (1 + np.exp(-xa @ a)) - y) + prec * (a - centre)
    assert np.abs(grad).max() < 1e-6


def test_anchored_head_reaches_the_probe_on_a_planted_problem_as_k_grows():
    """The zero-shot direction is wrong (orthogonal to the planted one): with few shots the head stays near it,
    with many it matches the unpenalised probe's direction and test AUROC."""
    w_true = np.r_[6.0, 3.0, np.zeros(D - 2)]
    x, y, g = _problem(20000, seed=10, w_true=w_true)
    xt, yt, _ = _problem(4000, seed=11, w_true=w_true)
    init = _init()
    cos = []
    for k in (2, 4000):
        xs, ys, gs = _balanced_k(x, y, g, k)
        head = AnchoredLogistic().fit(xs, ys, gs, init, seed=0)
        probe = LogisticRegression(penalty=None, max_iter=10000).fit(xs, ys.astype(int))
        cos.append(head.w_ @ probe.coef_[0] / np.linalg.norm(head.w_) / np.linalg.norm(probe.coef_[0]))
    assert cos[0] < 0.5 < 0.999 < cos[1]
    probe_auc = roc_auc_score(yt, probe.decision_function(xt))
    assert roc_auc_score(yt, head.predict_logit(xt)) == pytest.approx(probe_auc, abs=0.002)
    assert roc_auc_score(yt, init.logit(xt)) < probe_auc - 0.1


def test_intercept_is_not_pulled():
    """All shots negative but one: b follows the base rate (strong pull on w leaves b free)."""
    x, y, g = _problem(200, seed=12)
    y = np.zeros(200)
    y[:10] = 1
    theta = fit_anchored(x, y, np.zeros(D), 1e6)  # w pinned at 0: b alone fits the base rate
    assert theta[-1] == pytest.approx(math.log(10 / 190), abs=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Choosing the pull: the one-SE rule and the gain-over-default rule, by hand


def test_one_se_choice_takes_the_strongest_pull_within_one_se_of_the_best():
    a = np.array([[0.60, 0.70, 0.72, 0.71],
                  [0.62, 0.76, 0.78, 0.73],
                  [0.58, 0.75, 0.75, 0.75]])  # folds x grid: means 0.60, 0.737, 0.75, 0.73
    mean = a.mean(0)
    se = a.std(0, ddof=1) / math.sqrt(3)
    best = int(np.argmax(mean))  # column 2
    expect = int(np.flatnonzero(mean >= mean[best] - se[best])[0])
    assert expect == 1 and one_se_choice(a) == 1
    assert one_se_choice(a[:, [0, 2]]) == 1  # nothing within one SE but the best itself


def _corrected_by_hand(a, n_folds, se_mult=1.0):
    """The rule written out with explicit loops: paired deficits, sd with ddof 1, Nadeau-Bengio factor."""
    a = [row for row in a.tolist() if not any(math.isnan(v) for v in row)]
    j = len(a)
    means = [sum(row[g] for row in a) / j for g in range(len(a[0]))]
    best = means.index(max(means))
    for g in range(len(means)):
        d = [row[best] - row[g] for row in a]
        md = sum(d) / j
        sd = math.sqrt(sum((v - md) ** 2 for v in d) / (j - 1))
        if md <= se_mult * sd * math.sqrt(1 / j + 1 / (n_folds - 1)):
            return g
    return best


def test_corrected_one_se_rule_on_a_hand_worked_table():
    # 6 folds (2 repeats x 3 folds) x grid [inf, 4, 1/4]: grid 2 is best (mean 0.75); grid 1 trails it by
    # d = [.05, .02, .06, .01, .04, .02], mean 0.0333, sd 0.0197, corrected SE 0.0197 sqrt(1/6 + 1/2) = 0.0161:
    # 0.0333 > 0.0161, so grid 1 is out; grid 0 trails by more. The naive SE (0.0197 / sqrt 6 = 0.0080) would
    # also reject; with se_mult 2.5 the corrected margin 0.0402 keeps grid 1, the naive 0.0201 would not.
    a = np.array([[0.60, 0.70, 0.75], [0.62, 0.74, 0.76], [0.58, 0.68, 0.74],
                  [0.61, 0.73, 0.74], [0.59, 0.71, 0.75], [0.63, 0.74, 0.76]])
    d = a[:, 2] - a[:, 1]
    assert d.std(ddof=1) * math.sqrt(1 / 6 + 1 / 2) == pytest.approx(0.0161, abs=1e-4)
    assert corrected_one_se_choice(a, 3) == _corrected_by_hand(a, 3) == 2
    assert corrected_one_se_choice(a, 3, se_mult=2.5) == _corrected_by_hand(a, 3, 2.5) == 1
    assert corrected_one_se_choice(a, 3, se_mult=100.0) == 0  # a huge margin: the prior whatever the folds
    naive = d.mean() <= 2.5 * d.std(ddof=1) / math.sqrt(6)
    assert not naive  # the uncorrected rule would leave grid 1 here


@pytest.mark.parametrize("seed", range(6))
def test_corrected_one_se_rule_matches_the_hand_loop_on_random_tables(seed):
    rng = np.random.default_rng(seed)
    n_folds = int(rng.integers(2, 6))
    a = np.clip(0.7 + 0.08 * rng.normal(size=(3 * n_folds, 7)) + np.linspace(0, 0.05, 7), 0, 1)
    a[rng.integers(len(a))] = np.nan  # a fold that held one class
    assert corrected_one_se_choice(a, n_folds) == _corrected_by_hand(a, n_folds)


def test_corrected_one_se_rule_keeps_the_prior_without_two_usable_folds():
    assert corrected_one_se_choice(np.array([[0.5, 0.9]]), 5) == 0
    assert corrected_one_se_choice(np.array([[0.5, 0.9], [np.nan, np.nan]]), 5) == 0
    assert corrected_one_se_choice(np.zeros((0, 3)), 5) == 0
    tied = np.array([[0.7, 0.7, 0.7], [0.8, 0.8, 0.8]])
    assert corrected_one_se_choice(tied, 2) == 0  # equal everywhere: the strongest pull


def test_anchored_keeps_the_zero_shot_head_when_the_shots_show_no_clear_gain():
    """The zero-shot direction is the planted one: a weaker prior cannot gain clearly, the prior (inf) stays."""
    w_true = np.r_[6.0, 3.0, np.zeros(D - 2)]
    x, y, g = _problem(4000, seed=13, w_true=w_true)
    init = _init(pos_dir=_unit_rows(w_true[None])[0])
    shots = _balanced_k(x, y, g, 32)
    head = AnchoredLogistic(min_patients_adapt=8).fit(*shots, init, seed=0)  # 32 per class: the rule runs
    assert head.folds_ and head.info_["lam"] == math.inf and head.pull_ == 1.0
    np.testing.assert_array_equal(head.predict_logit(x), init.logit(x))
    greedy = AnchoredLogistic(se_mult=0.0, min_patients_adapt=8).fit(*shots, init, seed=0)  # no margin: the best mean wins
    cv = greedy.info_["cv_auroc"]
    assert greedy.info_["lam"] == float(max(cv, key=cv.get))


def _scipy_anchored(x, y, w0, lam):
    """argmin sum BCE(x w + b) + lam/2 |w - w0|^2 by scipy's BFGS (inf: w0 with b = 0, the zero-shot head)."""
    if math.isinf(lam):
        return np.r_[w0, 0.0]

    def f(t):
        z = x @ t[:-1] + t[-1]
        return np.sum(np.logaddexp(0, z) - y * z) + lam / 2 * np.sum((t[:-1] - w0) ** 2)
    return minimize(f, np.r_[w0, 0.0], method="BFGS", options={"gtol": 1e-9}).x


def test_anchored_choice_is_an_independent_grouped_cross_validation():
    """Re-derive the chosen lam from the head's own folds with scipy fits, sklearn's AUROC and the hand rule."""
    x, y, g = _problem(3000, seed=21, w_true=np.r_[8.0, 4.0, np.zeros(D - 2)], noise=1.5)
    init = _init()
    w0, _ = init.head()
    xs, ys, gs = _balanced_k(x, y, g, 12, seed=1)
    head = AnchoredLogistic(lam0=1.0, min_patients_adapt=8).fit(xs, ys, gs, init, seed=0)
    grid = [math.inf] + [4.0 ** j for j in range(3, -5, -1)]
    cols = [(lam, w0) for lam in grid] + [(1.0, np.zeros_like(w0))]  # then the probe: prior 1 at 0 (probe_C = 1)
    table = []
    for tr, te in head.folds_:
        assert not set(gs[tr]) & set(gs[te])
        fits = [_scipy_anchored(xs[tr], ys[tr], centre, lam) for lam, centre in cols]
        table.append([roc_auc_score(ys[te], xs[te] @ t[:-1] + t[-1]) for t in fits])
    want = cols[_corrected_by_hand(np.array(table), 5)][0]
    assert head.info_["cv_lam"] == want  # the rule's choice; the nested check (tests/test_fewshot_nested.py) may undo it
    np.testing.assert_allclose(list(head.info_["cv_auroc"].values()), np.mean(table, 0), atol=1e-6)


def test_anchored_head_is_a_function_of_its_shots_not_the_seed():
    """Every seed draws the same rows at k = all: the head must be the same, so a sweep can fit it once."""
    x, y, g = _problem(400, seed=22)
    init = _init()
    a = AnchoredLogistic().fit(x, y, g, init, seed=0)
    b = AnchoredLogistic().fit(x, y, g, init, seed=7)
    np.testing.assert_array_equal(a.predict_logit(x), b.predict_logit(x))
    assert all(np.array_equal(fa[1], fb[1]) for fa, fb in zip(a.folds_, b.folds_))
    other = AnchoredLogistic().fit(x[:-1], y[:-1], g[:-1], init, seed=0)  # other shots: other folds
    assert any(not np.array_equal(fa[1], fb[1]) for fa, fb in zip(a.folds_, other.folds_))


def test_lam0_scales_the_grid_and_inf_is_always_first():
    assert AnchoredLogistic().grid() == [math.inf, 256.0, 64.0, 16.0, 4.0, 1.0, 0.25, 0.0625, 0.015625]
    assert anchored_head(1.0).grid() == [math.inf] + [4.0 ** j for j in range(3, -5, -1)]
    assert AnchoredLogistic(lams=[0.5, 8.0, 0.5]).grid() == [math.inf, 8.0, 0.5]


# ----------------------------------------------------------------------------------------------------------
# Patient-grouped folds, determinism


def _multi_row_problem():
    x, y, _ = _problem(600, seed=14)
    rng = np.random.default_rng(0)
    groups = np.array([f"p{i}" for i in rng.integers(0, 120, size=600)])  # ~5 rows per patient, mixed labels
    return x, y, groups


@pytest.mark.parametrize("name", ["anchored", "anchored_cv", "wise", "tip_f"])
def test_inner_cv_never_puts_a_patient_on_both_sides(name):
    x, y, groups = _multi_row_problem()
    head = make_head(name).fit(x, y, groups, _init(), seed=3)
    assert len(head.folds_) >= 5
    held = []
    for tr, te in head.folds_:
        assert not set(groups[tr]) & set(groups[te])
        assert set(y[te]) == {0.0, 1.0}
        held.append(te)
    first = head.folds_[:5] if name == "anchored" else head.folds_
    assert sorted(np.concatenate([te for _, te in first])) == list(range(len(y)))  # each row held out once


def test_grouped_folds_need_two_patients_per_class():
    y = np.array([1.0, 0.0, 0.0, 0.0])
    assert grouped_folds(y, np.array(["a", "b", "c", "d"]), seed=0) == []
    y = np.array([1.0, 1.0, 0.0, 0.0])
    assert grouped_folds(y, np.array(["a", "a", "c", "d"]), seed=0) == []  # both positives are one patient
    assert len(grouped_folds(y, np.array(["a", "b", "c", "d"]), seed=0)) == 2


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_is_deterministic_given_its_seed(name):
    x, y, groups = _multi_row_problem()
    xt = _problem(50, seed=15)[0]
    a = make_head(name).fit(x, y, groups, _init(), seed=7).predict_logit(xt)
    b = make_head(name).fit(x, y, groups, _init(), seed=7).predict_logit(xt)
    np.testing.assert_array_equal(a, b)


def test_the_seed_changes_the_folds():
    x, y, groups = _multi_row_problem()
    a = make_head("anchored_cv").fit(x, y, groups, _init(), seed=0).folds_
    b = make_head("anchored_cv").fit(x, y, groups, _init(), seed=1).folds_
    assert any(not np.array_equal(fa[1], fb[1]) for fa, fb in zip(a, b))


# ----------------------------------------------------------------------------------------------------------
# Errors name the bad value and the fix


def test_bad_inputs_are_refused_in_one_error():
    init = _init()
    x, y, g = _problem(10, seed=16)
    with pytest.raises(RadalignError, match=r"y holds 2\.0 in row 0.*0 or 1"):
        make_head("anchored").fit(x, np.r_[2.0, y[1:]], g, init)
    with pytest.raises(RadalignError, match="only class 1"):
        make_head("anchored").fit(x, np.ones(10), g, init)
    with pytest.raises(RadalignError, match=r"x has 10 rows, y 9, groups 10"):
        make_head("anchored").fit(x, y[:9], g, init)
    with pytest.raises(RadalignError, match=r"prototypes has shape \(3, 8\).*logit_scale is -1"):
        make_head("anchored").fit(x, y, g, ZeroShotInit(np.zeros((3, D)), -1.0))
    xn = x.copy()
    xn[4, 1] = np.nan
    with pytest.raises(RadalignError, match="non-finite value in row 4"):
        make_head("anchored").fit(xn, y, g, init)
    protos = init.prototypes.copy()
    protos[0, 2] = np.nan  # a NaN text embedding gave all-NaN weights, silently
    for name in HEADS:
        with pytest.raises(RadalignError, match=r"^few-shot head: init\.prototypes hold a non-finite value \(a NaN "
                                                r"text embedding\?\); re-embed the prompts with the export$"):
            make_head(name).fit(x, y, g, ZeroShotInit(protos, init.logit_scale))


def test_unknown_head_predict_before_fit_and_bad_grid_are_refused():
    with pytest.raises(RadalignError, match="'lora'.*anchored"):
        make_head("lora")
    with pytest.raises(RadalignError, match="predict_logit before fit"):
        make_head("anchored").predict_logit(np.zeros((2, D)))
    x, y, g = _problem(200, seed=17)
    for bad in ([0.0], [math.inf], [-1.0]):
        with pytest.raises(RadalignError, match=rf"prior weight {bad[0]!r}; lam0 and lams must be finite and > 0"):
            AnchoredLogistic(lams=bad).fit(x, y, g, _init())
    with pytest.raises(RadalignError, match=r"prior weight 0\.0"):
        AnchoredLogistic(lam0=0.0).fit(x, y, g, _init())
    for bad in (-1, 2.5, "8"):
        with pytest.raises(RadalignError, match=rf"min_patients_adapt {bad!r}; use an integer >= 0"):
            AnchoredLogistic(min_patients_adapt=bad).fit(x, y, g, _init())


# ----------------------------------------------------------------------------------------------------------
# The bench fits the rows every seed draws at k = all once


def test_the_heads_marked_seed_free_ignore_the_seed():
    """run_sweep reuses a seed-free head's fit for the same rows: sound only where the seed changes nothing."""
    x, y, groups = _multi_row_problem()
    free = [name for name in HEADS if make_head(name).seed_free]
    assert "anchored" in free and "zero_shot" in free
    for name in free:
        a = make_head(name).fit(x, y, groups, _init(), seed=0).predict_logit(x)
        np.testing.assert_array_equal(a, make_head(name).fit(x, y, groups, _init(), seed=9).predict_logit(x))


# ----------------------------------------------------------------------------------------------------------
# The folds, the path and the bench's candidate heads against independent computations (mutation guards)


def _shots_seed_by_hand(y, groups):
    """sha256 over the float64 bytes of y, then the newline-joined patient ids; first 4 bytes little-endian."""
    import hashlib

    h = hashlib.sha256(np.asarray(y, np.float64).tobytes() + "\n".join(groups).encode())
    return int.from_bytes(h.digest()[:4], "little")


def test_anchored_folds_are_sklearns_grouped_splits_seeded_by_the_shots():
    """Three repeats of StratifiedGroupKFold(5, shuffle) with random_state = shots seed + 1000 r, in order."""
    from sklearn.model_selection import StratifiedGroupKFold

    x, y, groups = _multi_row_problem()
    head = AnchoredLogistic().fit(x, y, groups, _init(), seed=0)
    base = _shots_seed_by_hand(y, groups)
    want = [te for r in range(3) for _, te in StratifiedGroupKFold(5, shuffle=True, random_state=base + 1000 * r)
            .split(x, y.astype(int), groups)]
    assert len(head.folds_) == len(want) == 15
    for (_, te), w in zip(head.folds_, want):
        np.testing.assert_array_equal(te, w)
    flipped = y.copy()
    flipped[:2] = 1 - flipped[:2]  # other labels, same rows: another seed, other folds
    other = AnchoredLogistic().fit(x, flipped, groups, _init(), seed=0)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(head.folds_, other.folds_))


def test_anchored_head_ignores_last_bit_noise_in_the_embeddings():
    """Two embedding passes of the same films differ in the last bits (thread count, instruction set): the same
    folds, the same chosen prior. The seed digested the embeddings' bytes before, and this noise moved the choice
    at k = 8 on 3 of 20 demo draws."""
    x, y, groups = _multi_row_problem()
    noisy = x * (1 + 1e-7 * np.random.default_rng(3).standard_normal(x.shape))  # float32 rounding's size
    a = AnchoredLogistic().fit(x, y, groups, _init(), seed=0)
    b = AnchoredLogistic().fit(noisy, y, groups, _init(), seed=0)
    for (_, ta), (_, tb) in zip(a.folds_, b.folds_, strict=True):
        np.testing.assert_array_equal(ta, tb)
    assert a.info_["lam"] == b.info_["lam"]
    np.testing.assert_allclose(a.predict_logit(x), b.predict_logit(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 5])
def test_anchored_cv_folds_are_sklearns_grouped_split_with_the_callers_seed(seed):
    from sklearn.model_selection import StratifiedGroupKFold

    x, y, groups = _multi_row_problem()
    head = make_head("anchored_cv").fit(x, y, groups, _init(), seed=seed)
    want = StratifiedGroupKFold(5, shuffle=True, random_state=seed).split(x, y.astype(int), groups)
    for (tr, te), (wtr, wte) in zip(head.folds_, want, strict=True):
        np.testing.assert_array_equal(te, wte)
        np.testing.assert_array_equal(tr, wtr)


def test_anchored_cv_head_is_the_scipy_fit_at_its_chosen_prior():
    """Whatever lam the one-SE rule picked, the head is argmin sum BCE + lam/2 |w - w0|^2 (b unpenalised)."""
    x, y, g = _problem(3000, seed=23, w_true=np.r_[8.0, 4.0, np.zeros(D - 2)], noise=1.5)
    xs, ys, gs = _balanced_k(x, y, g, 40, seed=2)
    init = _init()
    head = make_head("anchored_cv").fit(xs, ys, gs, init, seed=0)
    lam = head.info_["lam"]
    assert math.isfinite(lam)  # the planted problem moves it off the zero-shot head
    ref = _scipy_anchored(xs, ys, init.head()[0], lam)
    np.testing.assert_allclose(head.w_, ref[:-1], atol=1e-5)
    assert head.b_ == pytest.approx(ref[-1], abs=1e-5)
    assert head.pull_ == pytest.approx(lam / (lam + len(ys)), rel=1e-12)


def test_the_path_starts_at_the_zero_shot_head_and_follows_the_scipy_fits():
    x, y, _ = _problem(60, seed=24)
    w0 = _init().head()[0]
    path = anchored_path(x, y, w0, [math.inf, 16.0, 0.5])
    np.testing.assert_array_equal(path[0], np.r_[w0, 0.0])  # the zero-shot logit x w0 + 0, not a shifted one
    for theta, lam in zip(path[1:], [16.0, 0.5]):
        np.testing.assert_allclose(theta, _scipy_anchored(x, y, w0, lam), atol=1e-5)


def test_one_se_rule_with_one_fold_takes_the_first_grid_point_that_ties_the_best():
    assert one_se_choice(np.array([[0.7, 0.8, 0.8, 0.6]])) == 1  # SE undefined: margin 0, ties count
    assert one_se_choice(np.array([[0.7, 0.8], [0.7, 0.8]])) == 1  # SE 0: only the tie with the best


def test_corrected_rule_with_exactly_two_folds_can_leave_the_prior():
    # d between grid 1 (best, mean 0.925) and grid 0 = [0.40, 0.35]: mean 0.375 > sd 0.0354 x sqrt(1/2 + 1/1)
    a = np.array([[0.50, 0.90], [0.60, 0.95]])
    assert corrected_one_se_choice(a, 2) == _corrected_by_hand(a, 2) == 1


def test_wise_head_is_the_norm_scaled_mix_of_the_unit_zero_shot_and_sklearn_probe():
    """alphas = [a] only: the head is |w0| ((1 - a) w0/|w0| + a wp/|wp|), wp sklearn's L2 probe on all shots."""
    x, y, g = _problem(300, seed=25)
    init = _init(scale=7.0)
    w0 = init.head()[0]
    wp = LogisticRegression(C=1.0, max_iter=5000).fit(x, y.astype(int)).coef_[0]
    for a in (0.0, 0.3, 1.0):
        head = make_head("wise", alphas=[a]).fit(x, y, g, init, seed=0)
        want = np.linalg.norm(w0) * ((1 - a) * w0 / np.linalg.norm(w0) + a * wp / np.linalg.norm(wp))
        np.testing.assert_allclose(head.w_, want, rtol=1e-6, atol=1e-8)
        assert (head.b_, head.pull_, head.info_["alpha"]) == (0.0, pytest.approx(1 - a), a)
    few = make_head("wise").fit(*_balanced_k(x, y, g, 1), init, seed=0)  # no fold: zero-shot, alpha 0
    assert few.info_["alpha"] == 0.0 and few.pull_ == 1.0


def _clap_by_scipy(x, y, init):
    """CLAP's objective written in numpy, minimised by scipy: returns the class-1 minus class-0 unit prototype x s."""
    t = _unit_rows(np.asarray(init.prototypes, np.float64)[[1, 0]])  # [2, D] class 0, 1
    xu, s, yi = _unit_rows(x), init.logit_scale, y.astype(int)
    p0 = np.exp(s * xu @ t.T)
    p0 /= p0.sum(1, keepdims=True)
    alpha = np.array([p0[yi == c, c].mean() for c in (0, 1)])

    def f(flat):
        w = flat.reshape(2, -1)
        z = s * xu @ _unit_rows(w).T  # [n, 2]
        ce = np.mean(np.logaddexp(z[:, 0], z[:, 1]) - z[np.arange(len(yi)), yi])
        return ce + np.mean(alpha * ((w - t) ** 2).sum(1))
    w = _unit_rows(minimize(f, t.ravel(), method="BFGS", options={"gtol": 1e-10}).x.reshape(2, -1))
    return s * (w[1] - w[0]), alpha


def test_clap_head_is_the_minimum_of_its_objective_and_scores_unnormalised_rows_as_unit_ones():
    x, y, g = _problem(200, seed=26)
    init = _init()
    head = make_head("clap").fit(x, y, g, init, seed=0)
    want, alpha = _clap_by_scipy(x, y, init)
    np.testing.assert_allclose(head.w_, want, atol=1e-4)
    np.testing.assert_allclose(head.info_["alpha"], alpha, rtol=1e-9)
    assert head.pull_ == pytest.approx(alpha.mean(), rel=1e-9)
    scaled = x * np.geomspace(0.01, 100, len(x))[:, None]  # rows of any length: each scored as its unit row
    np.testing.assert_allclose(head.predict_logit(scaled), _unit_rows(scaled) @ head.w_, rtol=1e-9)


def _lppp_by_hand(x, y, init, steps):
    """LP++ as the authors' loop, with hand-written gradients of the mean cross-entropy (no autograd)."""
    n, yi = len(y), y.astype(int)
    t = _unit_rows(np.asarray(init.prototypes, np.float64)[[1, 0]])
    onehot = np.eye(2)[yi]
    text = x @ t.T  # [n, 2]
    w, b = onehot.T @ x, np.zeros(2)
    shots = n / 2
    a = np.full(2, 250 / shots * ((onehot.T @ text) / onehot.sum(0)[:, None] * shots).mean())
    lr_w = 4 * n / np.linalg.eigvalsh(x.T @ x).max()
    lr_a = n / (4 * (text ** 2).sum(0).max())
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for step in range(steps):
        z = x @ w.T + b + a * text
        p = np.exp(z - z.max(1, keepdims=True))
        r = (p / p.sum(1, keepdims=True) - onehot) / n  # dCE/dz [n, 2]
        gw, gb, ga = r.T @ x, r.sum(0), (r * text).sum(0)
        vw, vb = (gw, gb) if step == 0 else (0.9 * vw + gw, 0.9 * vb + gb)  # torch SGD momentum
        w, b = w - lr_w * vw, b - lr_w * vb
        if (step + 1) % 10 == 0:
            a = a - lr_a * ga
    return (w[1] + a[1] * t[1]) - (w[0] + a[0] * t[0]), b[1] - b[0], a


def test_lppp_head_repeats_the_authors_loop_written_by_hand():
    x, y, g = _problem(120, seed=27)
    init = _init()
    head = make_head("lppp", steps=30).fit(x, y, g, init, seed=0)
    w, b, a = _lppp_by_hand(x, y, init, 30)
    np.testing.assert_allclose(head.w_, w, rtol=1e-8, atol=1e-10)
    assert head.b_ == pytest.approx(b, rel=1e-8, abs=1e-10)
    np.testing.assert_allclose(head.info_["text_multipliers"], a, rtol=1e-8)
    assert math.isnan(head.pull_)


def test_tip_adapter_choice_cache_and_pull_by_hand():
    """(a, b) maximise the mean held-out AUROC (sklearn) of the training-free cache on the head's own folds; with
    no key fine-tuning (epochs 0) the logit is x w0 + a sum_j exp(-b (1 - x k_j)) (2 y_j - 1) on unit rows."""
    x, y, g = _problem(80, seed=28, w_true=np.r_[12.0, 6.0, np.zeros(D - 2)])
    init = _init()
    w0 = init.head()[0]
    head = make_head("tip_f", epochs=0).fit(x, y, g, init, seed=1)
    xu = _unit_rows(x)
    grid = [(a, b) for a in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0) for b in (1.0, 3.0, 5.5, 8.0)]

    def cache(xq, keys, ys, a, b):
        return xq @ w0 + a * np.exp(-b * (1 - xq @ keys.T)) @ (2 * ys - 1)
    cv = [np.mean([roc_auc_score(y[te], cache(xu[te], xu[tr], y[tr], a, b)) for tr, te in head.folds_])
          for a, b in grid]
    a, b = grid[int(np.argmax(cv))]
    assert a > 0 and (head.info_["alpha"], head.info_["beta"]) == (a, b)
    assert head.pull_ == pytest.approx(1 / (1 + a), rel=1e-12)
    xt = _problem(30, seed=29)[0] * np.geomspace(0.05, 20, 30)[:, None]  # not unit: scored as unit rows
    np.testing.assert_allclose(head.predict_logit(xt), cache(_unit_rows(xt), xu, y, a, b), rtol=1e-9)


def test_bad_grid_error_says_inf_is_always_in_it():
    with pytest.raises(RadalignError, match=r"must be finite and > 0 \(inf, the zero-shot head, is always in the "
                                            r"grid\)"):
        AnchoredLogistic(lams=[0.0]).grid()


def _one_se_by_hand(a):
    """Plain one-SE rule with loops: per column the mean and sd/sqrt(n) over the folds that are not NaN."""
    cols = [[v for v in col if not math.isnan(v)] for col in a.T.tolist()]
    means = [sum(c) / len(c) for c in cols]
    ses = [math.sqrt(sum((v - m) ** 2 for v in c) / (len(c) - 1) / len(c)) if len(c) > 1 else 0.0
           for c, m in zip(cols, means)]
    best = means.index(max(means))
    return next(g for g, m in enumerate(means) if m >= means[best] - ses[best])


@pytest.mark.parametrize("seed", range(6))
def test_one_se_choice_matches_the_hand_loop_on_random_tables(seed):
    rng = np.random.default_rng(100 + seed)
    n_folds = 2 + seed % 4  # 2 folds included: the SE's n - 1 is 1 there
    a = np.clip(0.7 + 0.05 * rng.normal(size=(n_folds, 6)) + np.linspace(0, 0.06, 6), 0, 1)
    if n_folds > 2:
        a[0, 1] = np.nan  # a fold that held one class, in one column
    assert one_se_choice(a) == _one_se_by_hand(a)


def test_a_label_column_is_the_same_as_flat_labels():
    x, y, g = _problem(150, seed=30)
    init = _init()
    flat = AnchoredLogistic().fit(x, y, g, init)
    column = AnchoredLogistic().fit(x, y[:, None], g, init)
    np.testing.assert_array_equal(column.predict_logit(x), flat.predict_logit(x))


def test_input_errors_name_the_row_and_the_fix():
    init = _init()
    x, y, g = _problem(10, seed=16)
    bad = y.copy()
    bad[3] = 0.5
    with pytest.raises(RadalignError, match=r"y holds 0\.5 in row 3"):
        make_head("anchored").fit(x, bad, g, init)
    with pytest.raises(RadalignError, match="pass one label and one patient id per row"):
        make_head("anchored").fit(x, y, g[:9], init)


def test_one_se_rule_with_two_folds_uses_the_sample_sd():
    # best column [0.80, 0.90]: mean 0.85, sd 0.0707 (ddof 1), SE 0.05; column 0 has mean 0.81 >= 0.80: taken
    a = np.array([[0.80, 0.80], [0.82, 0.90]])
    assert one_se_choice(a) == _one_se_by_hand(a) == 0


def _hand_folds(y, groups, seed, n_folds):
    from sklearn.model_selection import StratifiedGroupKFold

    return [te for _, te in StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(y, y, groups)]


def test_cv_table_follows_max_folds_repeats_and_the_two_patient_floor():
    x, y, groups = _multi_row_problem()
    w0 = _init().head()[0]
    head = AnchoredLogistic(max_folds=3)
    table, k = head.cv_table(x, y, groups, w0)
    assert table.shape == (9, 10) and k == 3  # 3 repeats x 3 folds, 9 grid points and the probe
    once = AnchoredLogistic(one_repeat_above=10)  # ~60 patients per class: one split is enough
    assert once.cv_table(x, y, groups, w0)[0].shape[0] == 5 and len(once.folds_) == 5
    two = np.array(["a", "b", "c", "d"])  # two patients per class: 2 folds per split
    xs, ys = x[:4], np.array([1.0, 1.0, 0.0, 0.0])
    table, k = AnchoredLogistic().cv_table(xs, ys, two, w0)
    assert table.shape == (6, 10) and k == 2
    table, k = AnchoredLogistic().cv_table(xs, ys, np.array(["a", "a", "c", "d"]), w0)  # one positive patient
    assert table.shape == (0, 10) and k == 0


def test_anchored_head_is_the_scipy_fit_at_its_chosen_prior():
    x, y, g = _problem(3000, seed=31, w_true=np.r_[8.0, 4.0, np.zeros(D - 2)], noise=1.5)
    xs, ys, gs = _balanced_k(x, y, g, 40, seed=3)
    init = _init()
    head = AnchoredLogistic(min_patients_adapt=8).fit(xs, ys, gs, init)
    lam = head.info_["lam"]
    assert math.isfinite(lam)
    ref = _scipy_anchored(xs, ys, init.head()[0], lam)
    np.testing.assert_allclose(head.w_, ref[:-1], atol=1e-5)
    assert head.b_ == pytest.approx(ref[-1], abs=1e-5)


@pytest.mark.parametrize("k", [12, 16])  # 12: the weakest pull is clearly best; 16: all four within one SE
def test_anchored_cv_choice_is_an_independent_one_se_rule_from_the_strongest_pull(k):
    """lams given in any order: the grid runs from inf down, and the one-SE rule (hand loop) on scipy fits over
    the head's folds picks the strongest pull within one SE of the best."""
    x, y, g = _problem(3000, seed=21, w_true=np.r_[8.0, 4.0, np.zeros(D - 2)], noise=1.5)
    xs, ys, gs = _balanced_k(x, y, g, k, seed=1)
    init = _init()
    w0 = init.head()[0]
    lams = [0.25, math.inf, 64.0, 4.0]
    head = make_head("anchored_cv", lams=lams).fit(xs, ys, gs, init, seed=0)
    grid = [math.inf, 64.0, 4.0, 0.25]
    table = [[roc_auc_score(ys[te], xs[te] @ t[:-1] + t[-1]) for t in
              (_scipy_anchored(xs[tr], ys[tr], w0, lam) for lam in grid)] for tr, te in head.folds_]
    assert head.info_["lam"] == grid[_one_se_by_hand(np.array(table))]
    one = make_head("anchored_cv").fit(*_balanced_k(x, y, g, 1), init)
    assert one.info_["lam"] == math.inf and one.folds_ == []


@pytest.mark.parametrize("n,C,alphas", [(400, 0.05, [0.0, 0.5, 1.0]),  # the probe alone wins
                                         (100, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])])  # a mix within one SE
def test_wise_choice_and_probe_strength_by_hand(n, C, alphas):
    """alpha: the one-SE rule (hand loop) over held-out AUROCs of (1 - a) u0 + a up on the head's folds, up from
    sklearn's probe with the head's C on each training fold; the final probe uses that C too."""
    x, y, g = _problem(n, seed=32, w_true=np.r_[12.0, 6.0, np.zeros(D - 2)])
    init = _init()
    w0 = init.head()[0]
    u0 = w0 / np.linalg.norm(w0)
    head = make_head("wise", alphas=alphas, C=C).fit(x, y, g, init, seed=0)
    for (_, te), want in zip(head.folds_, _hand_folds(y, g, 0, 5), strict=True):
        np.testing.assert_array_equal(te, want)

    def unit_probe(rows):
        w = LogisticRegression(C=C, max_iter=5000).fit(x[rows], y[rows].astype(int)).coef_[0]
        return w / np.linalg.norm(w)
    table = [[roc_auc_score(y[te], x[te] @ ((1 - a) * u0 + a * unit_probe(tr))) for a in alphas]
             for tr, te in head.folds_]
    a = alphas[_one_se_by_hand(np.array(table))]
    assert a > 0 and head.info_["alpha"] == a
    want = np.linalg.norm(w0) * ((1 - a) * u0 + a * unit_probe(np.arange(len(y))))
    np.testing.assert_allclose(head.w_, want, rtol=1e-6, atol=1e-8)


def test_wise_with_identical_prompts_has_a_zero_head_not_nan():
    t = np.tile(_init().prototypes[:1], (2, 1))  # t+ == t-: w0 = 0
    x, y, g = _problem(200, seed=33)
    head = make_head("wise", alphas=[0.0]).fit(x, y, g, ZeroShotInit(t, 10.0), seed=0)
    np.testing.assert_array_equal(head.predict_logit(x), np.zeros(len(x)))


@pytest.mark.parametrize("name", ["clap", "lppp", "tip_f"])
def test_float32_prototypes_fit_as_their_float64_values(name):
    """Exports store float32 text embeddings: the torch heads must fit them as the same numbers in float64."""
    x, y, g = _problem(120, seed=34)
    p32 = _init().prototypes.astype(np.float32)
    kw = {"steps": 20} if name == "lppp" else {}
    a = make_head(name, **kw).fit(x, y, g, ZeroShotInit(p32, 10.0), seed=0).predict_logit(x)
    b = make_head(name, **kw).fit(x, y, g, ZeroShotInit(p32.astype(np.float64), 10.0), seed=0).predict_logit(x)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_tip_adapter_folds_and_one_key_step_by_hand():
    """Folds: sklearn's grouped split with the caller's seed and max_folds. One fine-tuning epoch: AdamW's first
    step moves each key by -lr g/(|g| + eps) after decoupled decay (1 - lr wd), g the hand gradient of the mean
    BCE of z_i = x_i w0 + a sum_j exp(-b (1 - x_i k_j)) s_j."""
    x, y, g = _problem(80, seed=28, w_true=np.r_[12.0, 6.0, np.zeros(D - 2)])
    init = _init()
    w0 = init.head()[0]
    head = make_head("tip_f", epochs=1, max_folds=4).fit(x, y, g, init, seed=3)
    for (_, te), want in zip(head.folds_, _hand_folds(y, g, 3, 4), strict=True):
        np.testing.assert_array_equal(te, want)
    a, b = head.info_["alpha"], head.info_["beta"]
    assert a > 0
    xu, s = _unit_rows(x), 2 * y - 1
    e = np.exp(-b * (1 - xu @ xu.T))  # [n, n] keys = the shots
    r = (1 / (1 + np.exp(-(xu @ w0 + a * e @ s))) - y) / len(y)  # dBCE/dz
    grad = a * b * s[:, None] * ((r[:, None] * e).T @ xu)  # [n, D] d/dk_j
    keys = xu * (1 - 1e-3 * 0.01) - 1e-3 * grad / (np.abs(grad) + 1e-8)
    xt = _problem(30, seed=35)[0]
    want = xt @ w0 + a * np.exp(-b * (1 - xt @ keys.T)) @ s
    np.testing.assert_allclose(head.predict_logit(xt), want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_integer_labels_fit_as_float_labels(name):
    x, y, g = _problem(120, seed=36)
    kw = {"steps": 20} if name == "lppp" else {}
    a = make_head(name, **kw).fit(x, y.astype(np.int64), g, _init(), seed=0).predict_logit(x)
    b = make_head(name, **kw).fit(x, y, g, _init(), seed=0).predict_logit(x)
    np.testing.assert_array_equal(a, b)


def test_prompt_init_of_float32_prototypes_is_their_float64_computation():
    t32 = _init().prototypes.astype(np.float32) * np.float32(1.7)  # not unit: normalised in float64
    t = t32.astype(np.float64)
    want = 10.0 * (t[0] / math.sqrt(t[0] @ t[0]) - t[1] / math.sqrt(t[1] @ t[1]))
    for w0, b0 in (ZeroShotInit(t32, 10.0).head(), prompt_init(t32[0], t32[1], 10.0)):
        np.testing.assert_allclose(w0, want, rtol=0, atol=1e-14)
        assert b0 == 0.0


def test_an_export_of_another_width_is_named_with_both_widths_and_the_fix():
    x, y, g = _problem(10, seed=16)
    with pytest.raises(RadalignError, match=r"^few-shot head: init\.prototypes are 4-d but x is 8-d; use the export "
                                            r"that embedded x$"):
        make_head("anchored").fit(x, y, g, ZeroShotInit(np.ones((2, 4)), 10.0))


def test_unit_scales_every_nonzero_vector_to_norm_one():
    from radalign.finetune.fewshot_heads import _unit

    np.testing.assert_allclose(_unit(np.array([0.3, 0.4])), [0.6, 0.8])  # a norm below 1 is scaled up too
    np.testing.assert_allclose(_unit(np.array([3.0, 4.0])), [0.6, 0.8])
    np.testing.assert_array_equal(_unit(np.zeros(3)), np.zeros(3))

"""The anchored few-shot head's nested check (AnchoredLogistic.nested): its outer folds and gains against a loop
written with sklearn, and its effect on planted problems: no signal beyond zero-shot -> it keeps the zero-shot head
where the plain rule leaves it; a real gain -> it keeps the rule's weaker prior."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from radalign.finetune.fewshot_heads import AnchoredLogistic, ZeroShotInit, fit_anchored
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

D = 8


def _init():
    """Zero-shot direction axis 0 (t+ - t-), scale 10."""
    t = np.zeros((2, D))
    t[0, [0, 3]], t[1, [0, 3]] = (0.5, 1.0), (-0.5, 1.0)
    return ZeroShotInit(t / np.linalg.norm(t, axis=1, keepdims=True), 10.0)


def _shots(k, seed, w_true):
    """k patients per class (one row each), unit embeddings, labels drawn from a logistic model on w_true."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    while min(sum(v == c for v in ys) for c in (0.0, 1.0)) < k:
        x = rng.normal(size=D) + 0.2
        x /= np.linalg.norm(x)
        y = float(rng.random() < 1 / (1 + np.exp(-x @ w_true)))
        if sum(v == y for v in ys) < k:
            xs.append(x)
            ys.append(y)
    return np.array(xs), np.array(ys), np.array([f"p{seed}-{i}" for i in range(len(ys))])


def _seed_by_hand(y, groups):
    h = hashlib.sha256(np.asarray(y, np.float64).tobytes() + "\n".join(groups).encode())
    return int.from_bytes(h.digest()[:4], "little")


@pytest.mark.parametrize("repeats", [1, 2])
def test_nested_gains_are_the_rule_rerun_on_each_outer_training_part(repeats):
    """Outer folds: `nested_repeats` StratifiedGroupKFold(5, shuffle) splits seeded shots seed + 7, + 1007, ...;
    per fold the rule's own choice on the training part, refitted there, minus zero-shot, in sklearn's AUROC."""
    x, y, g = _shots(24, 1, np.r_[2.0, 8.0, np.zeros(D - 2)])
    head, w0 = AnchoredLogistic(nested=False, nested_repeats=repeats), _init().head()[0]
    want = []
    for r in range(repeats):
        cv = StratifiedGroupKFold(5, shuffle=True, random_state=_seed_by_hand(y, g) + 7 + 1000 * r)
        for tr, te in cv.split(x, y.astype(int), g):
            i, _ = head.choose(x[tr], y[tr], g[tr], w0)
            zero = roc_auc_score(y[te], x[te] @ w0)
            if i == 0:
                want.append(0.0)
                continue
            lam, centre = head.candidates(w0)[i]  # a grid point toward w0, or the probe (toward 0)
            t = fit_anchored(x[tr], y[tr], centre, lam)
            want.append(roc_auc_score(y[te], x[te] @ t[:-1] + t[-1]) - zero)
    got = head.nested_gains(x, y, g, w0)
    assert len(got) == 5 * repeats and any(v != 0 for v in want)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_without_signal_beyond_zero_shot_the_nested_check_keeps_zero_shot():
    """Labels follow the zero-shot direction (axis 0) only: every weaker prior the plain rule takes is noise.
    The nested check must undo that on the draws where it happens, and never leave where the rule stays."""
    w = np.r_[2.0, np.zeros(D - 1)]
    left = kept = 0
    for seed in range(12):
        x, y, g = _shots(12, seed, w)  # 12 patients per class: the rule runs from 8 (the default waits for 64)
        plain = AnchoredLogistic(nested=False, min_patients_adapt=8).fit(x, y, g, _init())
        nested = AnchoredLogistic(nested=True, min_patients_adapt=8).fit(x, y, g, _init())
        left += not math.isinf(plain.info_["lam"])
        kept += not math.isinf(nested.info_["lam"])
        if math.isinf(plain.info_["lam"]):
            assert "nested_gain" not in nested.info_  # the check runs only where the rule leaves the prior
            np.testing.assert_array_equal(nested.predict_logit(x), plain.predict_logit(x))
    assert left >= 2, "the planted problem no longer shows the plain rule's noise: the test cannot fail"
    assert kept < left


def test_with_a_real_gain_the_nested_check_keeps_the_weaker_prior():
    """Labels on axes 1-2, zero-shot on axis 0: the gain survives its own selection, and the fit is the rule's."""
    w = np.r_[0.0, 9.0, 6.0, np.zeros(D - 3)]
    for seed in range(3):
        x, y, g = _shots(64, seed, w)
        plain = AnchoredLogistic(nested=False).fit(x, y, g, _init())
        nested = AnchoredLogistic(nested=True).fit(x, y, g, _init())
        assert not math.isinf(plain.info_["lam"])
        assert nested.info_["lam"] == plain.info_["lam"]
        info = nested.info_["nested_gain"]
        assert info["folds"] == 15 and info["mean"] > info["se"] > 0
        np.testing.assert_array_equal(nested.predict_logit(x), plain.predict_logit(x))


@pytest.mark.parametrize("k", [0, 4])
def test_nested_check_is_zero_shot_exactly_below_the_cross_validation(k):
    init = _init()
    head = AnchoredLogistic(nested=True, min_patients_adapt=0)  # the rule's own floor of 8 decides
    if k:
        x, y, g = _shots(k, 0, np.r_[0.0, 9.0, np.zeros(D - 2)])
        head.fit(x, y, g, init)
    else:
        head.fit(np.zeros((0, D)), np.zeros(0), np.zeros(0, str), init)
    probe = np.random.default_rng(0).normal(size=(5, D))
    np.testing.assert_array_equal(head.predict_logit(probe), init.logit(probe))
    assert head.pull_ == 1.0


@pytest.mark.parametrize("rule_name, options", [
    ("(chosen)", {}),
    ("; chosen until 2026-12-06, session 11)", {"min_patients_adapt": 8}),
    ("(chosen until 2026-12-06, session 10)", {"probe_lam": None, "min_patients_adapt": 8})])
def test_the_pull_rules_benchs_rules_are_the_head(rule_name, options):
    """bench/fewshot_pull_rules.py scores rules from stored tables; its chosen row, and the probe-candidate row,
    must be what the head does with those options."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import fewshot_pull_rules as P

    rule = next(rule for name, rule in P.rules().items() if rule_name in name)
    plain = next(rule for name, rule in P.rules().items() if "(the plain rule)" in name)
    init, seen = _init(), set()
    for k, amp, seed in [(12, 2.0, s) for s in range(12)] + [(64, 9.0, 0), (4, 9.0, 0)]:
        x, y, g = _shots(k, seed, np.r_[0.0, amp, 0.5 * amp, np.zeros(D - 3)] if k != 12 else np.r_[amp, np.zeros(D - 1)])
        record = P.draw_tables(x, y, g, init, x, y.astype(int))
        head = AnchoredLogistic(**options).fit(x, y, g, init)
        cands = head.candidates(init.head()[0])
        i = rule(record)
        assert (cands[i][0], i >= len(head.grid())) == (head.info_["lam"], head.info_["prior"] == "zero")
        if "probe_lam" not in options and record["npc"] >= head.min_patients_adapt:  # the rule ran
            assert cands[plain(record)][0] == head.info_["cv_lam"]
        seen.add((math.isinf(head.info_["cv_lam"]), math.isinf(head.info_["lam"])))
    if options:  # undone, kept, never left: every branch ran
        assert {(False, True), (False, False), (True, True)} <= seen
    else:  # the default waits for 64 patients per class: zero-shot without a table at 12 and 4, kept at 64
        assert {(False, False), (True, True)} == seen and head.min_patients_adapt == P.FLOOR == 64


@pytest.mark.parametrize("gains, kept, se_mult", [([0.2, 0.3], True, 0.0), ([0.2], False, 0.0),
                                                  ([0.3, -0.2], True, 0.0), ([0.3, -0.4], False, 0.0),
                                                  ([0.0, 0.0], False, 0.0), ([0.3, -0.2], False, 1.0)])
def test_the_check_keeps_the_prior_on_a_positive_mean_gain_from_two_outer_folds(monkeypatch, gains, kept, se_mult):
    """Two usable outer folds are enough; one is not; the mean must be > 0 (> nested_se_mult naive SEs: 0.05 is
    under its SE 0.25)."""
    x, y, g = _shots(64, 0, np.r_[0.0, 9.0, 6.0, np.zeros(D - 3)])
    plain = AnchoredLogistic(nested=False).fit(x, y, g, _init())
    assert not math.isinf(plain.info_["lam"])
    monkeypatch.setattr(AnchoredLogistic, "nested_gains", lambda self, *a: np.asarray(gains))
    head = AnchoredLogistic(nested_se_mult=se_mult).fit(x, y, g, _init())
    assert head.info_["lam"] == (plain.info_["lam"] if kept else math.inf)
    assert head.info_["nested_gain"]["folds"] == len(gains)


@pytest.mark.parametrize("repeats", [0, 1.5])
def test_nested_repeats_below_one_is_refused_naming_the_value(repeats):
    from radalign import RadalignError

    x, y, g = _shots(12, 0, np.r_[2.0, np.zeros(D - 1)])
    with pytest.raises(RadalignError, match=rf"nested_repeats {repeats!r}; use an integer >= 1"):
        AnchoredLogistic(nested_repeats=repeats).nested_gains(x, y, g, _init().head()[0])


@pytest.mark.parametrize("mult", [-1.0, float("nan"), float("inf")])
def test_nested_se_mult_that_is_negative_or_not_finite_is_refused(mult):
    from radalign import RadalignError

    x, y, g = _shots(12, 0, np.r_[2.0, np.zeros(D - 1)])
    with pytest.raises(RadalignError, match="nested_se_mult .*; use a finite number >= 0"):
        AnchoredLogistic(nested_se_mult=mult).nested_gains(x, y, g, _init().head()[0])

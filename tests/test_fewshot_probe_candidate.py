"""The anchored head's probe candidate (AnchoredLogistic.probe_lam, on by default): the plain L2 linear probe, its
prior at 0, as the grid's weakest column. Its fit against sklearn; what the head records when the rule takes it;
the grid's columns unchanged by it (probe_lam=None: session 9's head); bad values refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
from radalign.finetune.fewshot_heads import AnchoredLogistic
from sklearn.linear_model import LogisticRegression

from tests.test_fewshot_nested import D, _init, _shots


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_the_probe_column_is_sklearns_l2_probe(lam):
    """C = 1 / probe_lam, intercept unpenalised in both: the same minimiser."""
    x, y, g = _shots(12, 0, np.r_[0.0, 9.0, np.zeros(D - 2)])
    head, w0 = AnchoredLogistic(probe_lam=lam), _init().head()[0]
    cands = head.candidates(w0)
    assert len(cands) == len(head.grid()) + 1 and cands[-1][0] == lam and not cands[-1][1].any()
    t = head.fit_candidate(x, y, w0, len(cands) - 1)
    m = LogisticRegression(C=1 / lam, tol=1e-12, max_iter=10_000).fit(x, y.astype(int))
    np.testing.assert_allclose(t[:-1], m.coef_[0], atol=1e-6)
    assert t[-1] == pytest.approx(m.intercept_[0], abs=1e-6)


def test_without_the_option_the_table_and_choice_are_the_grids():
    """probe_lam=None: one column per grid point; with it, the grid's columns are the same numbers plus one."""
    x, y, g = _shots(16, 3, np.r_[2.0, 5.0, np.zeros(D - 2)])
    w0 = _init().head()[0]
    plain = AnchoredLogistic(probe_lam=None)
    table, k = plain.cv_table(x, y, g, w0)
    wide, k2 = AnchoredLogistic(probe_lam=1.0).cv_table(x, y, g, w0)
    assert table.shape[1] == len(plain.grid()) and wide.shape[1] == table.shape[1] + 1 and k == k2
    np.testing.assert_array_equal(wide[:, :-1], table)


def test_when_the_rule_takes_the_probe_the_head_is_the_probe_with_no_pull(monkeypatch):
    """A table where the probe column wins by a mile: the head is the probe fitted on every shot, pull 0, prior
    'zero'; the nested check then compares it with zero-shot as it does any other column."""
    x, y, g = _shots(16, 0, np.r_[0.0, 9.0, np.zeros(D - 2)])
    init = _init()
    head = AnchoredLogistic(probe_lam=1.0, nested=False, min_patients_adapt=8)  # 16 per class: the rule runs
    n_cols = len(head.candidates(init.head()[0]))
    table = np.full((15, n_cols), 0.5) + np.random.default_rng(0).normal(0, 0.01, (15, n_cols))
    table[:, -1] = 0.95
    monkeypatch.setattr(AnchoredLogistic, "cv_table", lambda self, *a: (table, 5))
    head.fit(x, y, g, init)
    want = LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(x, y.astype(int)).decision_function(x)
    np.testing.assert_allclose(head.predict_logit(x), want, atol=1e-5)
    assert (head.pull_, head.info_["prior"], head.info_["lam"], head.info_["cv_lam"]) == (0.0, "zero", 1.0, 1.0)
    assert set(head.info_["cv_auroc"]) == {*map(str, head.grid()), "probe"}
    monkeypatch.setattr(AnchoredLogistic, "nested_gains", lambda self, *a: np.array([-0.1, -0.2]))
    undone = AnchoredLogistic(probe_lam=1.0, min_patients_adapt=8).fit(x, y, g, init)
    assert (undone.pull_, undone.info_["prior"], undone.info_["lam"]) == (1.0, "zero_shot", math.inf)
    np.testing.assert_array_equal(undone.predict_logit(x), init.logit(x))


@pytest.mark.parametrize("lam", [0.0, -1.0, float("inf"), float("nan"), "1"])
def test_a_probe_lam_that_is_not_a_positive_finite_number_is_refused(lam):
    from radalign import RadalignError

    with pytest.raises(RadalignError, match=rf"probe_lam {lam!r}; use a finite number > 0"):
        AnchoredLogistic(probe_lam=lam).candidates(_init().head()[0])


def test_the_recipes_head_takes_its_probe_from_probe_C():
    from radalign.finetune.fewshot_heads import anchored_head

    assert anchored_head().probe_lam == 1.0 and anchored_head(4.0, 0.25).probe_lam == 4.0
    assert anchored_head().min_patients_adapt == 64 and anchored_head(4.0, 1.0, 8).min_patients_adapt == 8
    assert AnchoredLogistic(probe_lam=None).candidates(_init().head()[0])[-1][0] == 1 / 64  # the grid's weakest

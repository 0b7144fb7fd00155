"""The few-shot head's numerical kernels against their references: grouped folds equal to sklearn's
StratifiedGroupKFold row for row, the Gram matrix and the Cholesky solve against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from radalign.finetune.fewshot_heads import _gram, _spd_solve, grouped_folds, patients_per_class
from sklearn.model_selection import StratifiedGroupKFold


def _problem(rng: np.random.Generator, kind: int):
    """(y, groups): patients with 1-4 studies, labels per study or per patient, rare or common positives."""
    n_groups = int(rng.integers(2, 300))
    per = rng.integers(1, 5, n_groups)
    ids = rng.permutation(100_000)[:n_groups]
    groups = np.repeat(np.array([f"p{i}" for i in ids]) if kind % 2 else ids, per)  # str and int patients
    if kind % 3 == 0:  # one label per patient, as a finding that lasts
        y = np.repeat(rng.random(n_groups) < rng.uniform(0.05, 0.6), per).astype(np.float64)
    else:
        y = (rng.random(len(groups)) < rng.uniform(0.05, 0.6)).astype(np.float64)
    return y, groups


def test_grouped_folds_equal_sklearn_row_for_row():
    """Every fold, train and test rows in sklearn's order, on 250 random problems (sizes 2 .. 1200 rows, 2 .. 5
    folds, imbalanced, ties in the greedy score): the head's folds are sklearn's, so its choices are unchanged."""
    rng = np.random.default_rng(20261206)
    checked = 0
    for kind in range(250):
        y, groups = _problem(rng, kind)
        max_folds = int(rng.integers(2, 6))
        seed = int(rng.integers(0, 2**32 - 1))
        got = grouped_folds(y, groups, seed, max_folds)
        n_folds = min(max_folds, patients_per_class(y, groups))
        if n_folds < 2:
            assert got == []
            continue
        want = list(StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(
            np.zeros((len(y), 1)), y.astype(int), groups))
        assert len(got) == len(want)
        for (gtr, gte), (wtr, wte) in zip(got, want):
            np.testing.assert_array_equal(gte, wte)
            np.testing.assert_array_equal(gtr, wtr)
        checked += 1
    assert checked > 180  # most problems have two patients of each class


def test_grouped_folds_keep_patients_whole_and_classes_spread():
    rng = np.random.default_rng(3)
    y, groups = _problem(rng, 1)
    for tr, te in grouped_folds(y, groups, seed=11):
        assert not set(groups[tr]) & set(groups[te])
        assert sorted([*tr, *te]) == list(range(len(y)))


@pytest.mark.parametrize("n", [3, 64, 700])
def test_gram_is_the_symmetric_product(n):
    a = np.random.default_rng(n).normal(size=(n, 33))
    g = _gram(a)
    np.testing.assert_allclose(g, a.T @ a, rtol=1e-12, atol=1e-10)
    np.testing.assert_array_equal(g, g.T)  # mirrored exactly, not recomputed


def test_spd_solve_matches_numpy_and_refuses_an_indefinite_hessian():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(40, 12))
    h, g = a.T @ a + np.eye(12), rng.normal(size=12)
    np.testing.assert_allclose(_spd_solve(h, g), np.linalg.solve(h, g), rtol=1e-10)
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        _spd_solve(-h, g)


def test_grouped_folds_break_near_ties_as_sklearn():
    """Patients with thousands of studies: two folds' scores differ by less than np.isclose's relative tolerance
    but not exactly, and sklearn then takes the smaller fold. A tie-break on exact equality alone differs here."""
    r = np.random.default_rng(1748)
    n_groups = int(r.integers(6, 20))
    groups = np.repeat(np.arange(n_groups), r.integers(1, 6000, n_groups))
    y = (r.random(len(groups)) < 0.3).astype(np.float64)
    want = StratifiedGroupKFold(5, shuffle=True, random_state=1748).split(np.zeros((len(y), 1)), y.astype(int), groups)
    for (_, gte), (_, wte) in zip(grouped_folds(y, groups, 1748), want, strict=True):
        np.testing.assert_array_equal(gte, wte)

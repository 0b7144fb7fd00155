"""The one label policy (data/labels.py: CheXpert -1 = uncertain, blank = not mentioned) and its two users,
zero-shot's `apply_label_policy` and finetune's `label_matrix`. Expected values are a hand-worked table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from radalign.data.labels import BLANK_POLICIES, UNCERTAIN_POLICIES, apply_label_policy
from radalign.finetune.features import label_matrix

from radalign import RadalignError

N = np.nan
# Raw values as the shards' json and the CSVs hold them: 1, 0, -1, blank (None / NaN / ""), a stray word, and
# numbers that are no CheXpert value (left as they are: only -1 and blank are the policy's business).
RAW = pd.DataFrame({"Edema": [1, 0, -1, None, "", 2], "Pneumonia": [-1.0, np.nan, 1.0, 0.0, "n/a", -2]})
# (uncertain, blank) -> the result, worked by hand row by row from RAW.
TABLE = {
    ("exclude", "exclude"):   [[1, N], [0, N], [N, 1], [N, 0], [N, N], [2, -2]],
    ("positive", "exclude"):  [[1, 1], [0, N], [1, 1], [N, 0], [N, N], [2, -2]],
    ("negative", "exclude"):  [[1, 0], [0, N], [0, 1], [N, 0], [N, N], [2, -2]],
    ("exclude", "negative"):  [[1, N], [0, 0], [N, 1], [0, 0], [0, 0], [2, -2]],
    ("positive", "negative"): [[1, 1], [0, 0], [1, 1], [0, 0], [0, 0], [2, -2]],
    ("negative", "negative"): [[1, 0], [0, 0], [0, 1], [0, 0], [0, 0], [2, -2]],
}


def test_the_table_covers_every_policy():
    assert set(TABLE) == {(u, b) for u in UNCERTAIN_POLICIES for b in BLANK_POLICIES}


@pytest.mark.parametrize("uncertain, blank", sorted(TABLE))
def test_policy_matches_the_hand_worked_table(uncertain, blank):
    expected = np.array(TABLE[(uncertain, blank)], dtype=np.float64)
    got = apply_label_policy(RAW, uncertain, blank)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(apply_label_policy(RAW, uncertain, blank), expected)  # zero-shot goes through it
    np.testing.assert_array_equal(apply_label_policy(RAW.to_numpy(), uncertain, blank), expected)
    np.testing.assert_array_equal(apply_label_policy(RAW["Edema"].to_numpy(), uncertain, blank), expected[:, 0])


@pytest.mark.parametrize("uncertain", UNCERTAIN_POLICIES)
def test_finetune_labels_use_the_same_policy_with_blank_excluded(uncertain):
    table = pd.DataFrame({"Edema": [1, 0, -1, None], "Pneumonia": [-1.0, np.nan, 1.0, 0.0]})
    expected = np.array(TABLE[(uncertain, "exclude")][:4], dtype=np.float64)
    np.testing.assert_array_equal(label_matrix(table, ["Edema", "Pneumonia"], "binary", uncertain), expected)


def test_an_unknown_policy_names_the_value_and_the_choices():
    with pytest.raises(RadalignError, match="uncertain: 'ignore' is not one of exclude, positive, negative"):
        apply_label_policy(RAW, uncertain="ignore")
    with pytest.raises(RadalignError, match="blank: 'positive' is not one of exclude, negative"):
        apply_label_policy(RAW, blank="positive")
    with pytest.raises(RadalignError, match="uncertain: 'zero'"):
        label_matrix(RAW.iloc[:4], ["Edema"], "binary", "zero")


def test_the_input_is_not_changed():
    raw = np.array([[1.0, -1.0, np.nan]])
    apply_label_policy(raw, "positive", "negative")
    np.testing.assert_array_equal(raw, [[1.0, -1.0, np.nan]])

"""The attribution inside the EHR token (finetune.attribution) and how `finetune explain` shows it.

Expectations are independent of the code under test: the Owen value by its definition (the average marginal
contribution over every ordering in which each modality's players enter together, the EHR record first),
written here with itertools over player names; the modality Shapley values from `explain.shapley_values` (its own
brute-force tests are in test_explain.py); a hand-made linear model whose values are its coefficients times
(value - unknown value); and the rendered HTML/Markdown parsed back (html.parser, the `markdown` package).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from html.parser import HTMLParser
from types import SimpleNamespace

import markdown
import numpy as np
import pytest
import torch
from radalign.finetune import attribution as A
from radalign.finetune import explain as ex
from radalign.finetune.evaluate import coalition_logit
from radalign.finetune.features import CATEGORICAL
from radalign.finetune.models import EHREncoder, FusionModel, build_encoders
from torch import nn

torch.set_num_threads(1)
EVIL = "<script>alert('x')</script>"
RECORD = "record"


# ----------------------------------------------------------------------------------------------------------
# An independent Owen value: every admissible ordering of the players, by name


def orderings(unions: list[list[str]], first: dict[int, str] | None = None):
    """Every ordering in which the unions enter in some order and each union's players enter together;
    first[u]: the player that must lead union u (the EHR record)."""
    first = first or {}
    for order in itertools.permutations(range(len(unions))):
        inner = []
        for u in order:
            perms = [p for p in itertools.permutations(unions[u]) if u not in first or p[0] == first[u]]
            inner.append(perms)
        for blocks in itertools.product(*inner):
            yield [p for block in blocks for p in block]


def brute_force_owen(value, unions, first=None) -> dict[str, float]:
    """Average marginal contribution of each player over the admissible orderings (the definition)."""
    total: dict[str, float] = {p: 0.0 for u in unions for p in u}
    count = 0
    for seq in orderings(unions, first):
        kept: frozenset = frozenset()
        for p in seq:
            total[p] += value(kept | {p}) - value(kept)
            kept = kept | {p}
        count += 1
    return {p: v / count for p, v in total.items()}


def random_game(items, seed, ignored=()):
    """A non-linear game on sets of item names: main effects, pairs and triples; `ignored` items do nothing."""
    rng = np.random.default_rng(seed)
    live = [p for p in items if p not in ignored]
    terms = {frozenset(c): rng.normal() for r in (1, 2, 3) for c in itertools.combinations(live, r)}
    bias = rng.normal()
    return lambda s: 3 * math.tanh(bias + sum(w for c, w in terms.items() if c <= s))


def table_of(game):
    """attribute()'s coalition table for a game on names: v[r, t] = game(others in r + record + the groups of the
    players in t), masked[r] = game(others in r) (bit j of r / t = others[j] / players[j])."""
    def table(players, others):
        sets = [frozenset(g.name for g in p.members) for p in players]
        pick = lambda bits, xs: frozenset(x for j, x in enumerate(xs) if bits >> j & 1)  # noqa: E731
        v = np.array([[game(pick(r, others) | {RECORD} | frozenset().union(*pick(t, sets)))
                       for t in range(1 << len(sets))] for r in range(1 << len(others))])
        return v, np.array([game(pick(r, others)) for r in range(1 << len(others))])
    return table


def groups_named(names):
    return [A.EHRGroup(n, "lab", i, f"{i}.5") for i, n in enumerate(names)]


def modality_value_of(game, others, groups) -> float:
    """The EHR modality's Shapley value in the modality game (EHR kept = record and every group known)."""
    def f(kept):
        return game(frozenset(kept - {"ehr"}) | ({RECORD, *groups} if "ehr" in kept else set()))
    mods = [*others, "ehr"]
    return ex.shapley_values(ex.subset_values(f, mods), mods)["ehr"]


def modality_value(game, others) -> float:
    return modality_value_of(game, others, GROUPS)


GROUPS = ["age", "sex", "creatinine", "lactate"]


@pytest.mark.parametrize("seed,others", [(0, ["image", "text"]), (1, ["image"]), (2, []), (3, ["text", "image"])])
def test_owen_values_equal_the_brute_force_over_orderings_with_the_record_first(seed, others):
    game = random_game([*others, RECORD, *GROUPS], seed)
    att = A.attribute(table_of(game), groups_named(GROUPS), [True] * 4, others)
    unions = [[o] for o in others] + [[RECORD, *GROUPS]]
    want = brute_force_owen(game, unions, first={len(others): RECORD})
    got = {g.name: g.value for g in att.groups}
    assert got == pytest.approx({g: want[g] for g in GROUPS}, abs=1e-9)
    assert att.record == pytest.approx(want[RECORD], abs=1e-9)
    # the modalities' own values in that ordering game are the modality Shapley values: the EHR's splits exactly
    assert att.total == pytest.approx(modality_value(game, others), abs=1e-9)
    assert att.total == pytest.approx(att.record + sum(got.values()), abs=1e-12)


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_when_no_record_step_exists_it_is_the_textbook_owen_value(seed):
    """A game where "every group removed" equals "EHR masked": the record gets 0 and the groups get Owen's value
    (orderings with any EHR player first)."""
    others = ["image", "text"]
    game = random_game([*others, *GROUPS], seed)  # the record changes nothing
    att = A.attribute(table_of(game), groups_named(GROUPS), [True] * 4, others)
    want = brute_force_owen(game, [[o] for o in others] + [GROUPS])
    assert att.record == pytest.approx(0.0, abs=1e-12)
    assert {g.name: g.value for g in att.groups} == pytest.approx({g: want[g] for g in GROUPS}, abs=1e-9)


def test_ignored_group_gets_zero_and_symmetric_groups_share_equally():
    others = ["image"]
    game = random_game([*others, RECORD, *GROUPS], 7, ignored=("sex",))
    att = {g.name: g.value for g in A.attribute(table_of(game), groups_named(GROUPS), [True] * 4, others).groups}
    assert att["sex"] == pytest.approx(0.0, abs=1e-12) and att["age"] != pytest.approx(0.0, abs=1e-3)

    def sym(s):  # creatinine and lactate enter only through their count
        return math.tanh(0.7 * len(s & {"creatinine", "lactate"}) + 0.3 * ("image" in s) * ("age" in s)) + ("record" in s)
    att = {g.name: g.value for g in A.attribute(table_of(sym), groups_named(GROUPS), [True] * 4, others).groups}
    assert att["creatinine"] == pytest.approx(att["lactate"], abs=1e-12) and att["creatinine"] > 0.1


def test_unknown_groups_are_left_out_ranked_last_and_read_absent_or_unknown():
    seen = {}

    def table(players, others):
        seen["players"] = [g.name for g in players]
        return table_of(random_game([RECORD, *GROUPS], 8))(players, others)
    groups = [A.EHRGroup("creatinine", "lab", 0, "1.2"), A.EHRGroup("age", "numeric", 0, "77"),
              A.EHRGroup("race", "categorical", 1, "WHITE"), A.EHRGroup("lactate", "lab", 1, "2.0")]
    att = A.attribute(table, groups, [False, True, False, True], [])
    assert seen["players"] == ["age", "lactate"]
    assert [(g.name, g.shown, g.value, g.known) for g in att.groups[2:]] == [
        ("creatinine", "absent", 0.0, False), ("race", "unknown", 0.0, False)]
    assert abs(att.groups[0].value) >= abs(att.groups[1].value)
    assert att.forward_passes == 4 + 1


# ----------------------------------------------------------------------------------------------------------
# More known groups than MAX_GROUPS: a coarser partition (set-players), still exact

CATS = [A.DEMOGRAPHIC_NAMES.get(c, c) for c in CATEGORICAL]  # sex, race, insurance, marital status, language


def all_groups(labs=("creatinine", "lactate", "sodium"), vitals=("heart_rate", "spo2")):
    """Labs, vitals, age and the 5 categorical demographics, as ehr_groups makes them (token order)."""
    return A.ehr_groups([*labs, *vitals], ["age"], list(CATEGORICAL), vitals=vitals)


# the documented order, by hand: demographics, vital signs, labs, then age joins the demographics
FINEST = ["creatinine", "lactate", "sodium", "heart_rate", "spo2", "age", *CATS]
STEP1 = ["creatinine", "lactate", "sodium", "heart_rate", "spo2", "age", ("demographics", CATS)]
STEP2 = ["creatinine", "lactate", "sodium", ("vital signs", ["heart_rate", "spo2"]), "age", ("demographics", CATS)]
STEP3 = [("labs", ["creatinine", "lactate", "sodium"]), ("vital signs", ["heart_rate", "spo2"]), "age",
         ("demographics", CATS)]
STEP4 = [("labs", ["creatinine", "lactate", "sodium"]), ("vital signs", ["heart_rate", "spo2"]),
         ("demographics", ["age", *CATS])]


def _players(players):
    return [p.name if not p.merged else (p.name, [g.name for g in p.members]) for p in players]


@pytest.mark.parametrize("limit,want,steps", [(11, FINEST, 0), (10, STEP1, 1), (7, STEP1, 1), (6, STEP2, 2),
                                              (5, STEP3, 3), (4, STEP3, 3), (3, STEP4, 4)])
def test_partition_merges_in_the_documented_order_only_while_above_the_limit(monkeypatch, limit, want, steps):
    monkeypatch.setattr(A, "MAX_GROUPS", limit)
    players, why = A.partition(all_groups(), 1)
    assert _players(players) == want
    assert [g.name for p in players for g in p.members] == FINEST  # a partition: every group once, in order
    if steps:
        assert why.startswith(f"11 EHR groups are known, more than the exact limit of {limit} players")
        assert why.count(" as one player, ") == steps and why.endswith(f"{len(want)} players, still exact")
    else:
        assert why is None


def test_a_family_with_one_known_group_keeps_its_name(monkeypatch):
    monkeypatch.setattr(A, "MAX_GROUPS", 4)
    players, why = A.partition(all_groups(labs=("creatinine", "lactate"), vitals=("heart_rate",)), 0)
    assert _players(players) == [("labs", ["creatinine", "lactate"]), "heart_rate", "age", ("demographics", CATS)]
    assert "the vital signs" not in why and "the labs (2 groups) as one player, 'labs'" in why


def test_refused_only_when_even_the_coarsest_partition_is_above_the_limit(monkeypatch):
    monkeypatch.setattr(A, "MAX_GROUPS", 2)
    called = []
    groups = all_groups()
    with pytest.raises(A.TooManyGroups, match=r"11 EHR groups are known .*coarsest partition \(labs, vital signs, "
                                              r"demographics\) has 3 players, above MAX_GROUPS = 2 \(2\^3 x 2\^1 "
                                              r"forward passes\); set finetune.attribution.MAX_GROUPS to at least 3"):
        A.attribute(lambda p, o: called.append(1), groups, [True] * len(groups), ["image"])
    assert not called
    # labs and vitals known, age and demographics unknown: 2 players fit
    att = A.attribute(table_of(random_game([RECORD, *FINEST], 0)), groups, [True] * 5 + [False] * 6, [])
    assert sorted(g.name for g in att.groups if g.known) == ["labs", "vital signs"]
    assert [(g.name, g.value) for g in att.groups if not g.known] == [("age", 0.0)] + [(c, 0.0) for c in CATS]


def set_player_owen(game, players, others):
    """The Owen value by its definition over set-players: each player (a set of group names) enters whole."""
    members = {p.name: frozenset(g.name for g in p.members) for p in players}

    @functools.cache
    def value(s):  # a set of player names (and others, RECORD) -> the game on group names
        return game(frozenset(x for x in s if x not in members).union(*(members[x] for x in s if x in members)))
    return brute_force_owen(value, [[o] for o in others] + [[RECORD, *members]], first={len(others): RECORD})


@pytest.mark.parametrize("seed,limit,others", [(20, 6, ["image", "text"]), (21, 4, ["image"]), (22, 3, []),
                                               (23, 5, ["text"])])
def test_set_player_values_equal_the_brute_force_where_each_merged_set_moves_together(monkeypatch, seed, limit,
                                                                                      others):
    monkeypatch.setattr(A, "MAX_GROUPS", limit)
    groups = all_groups()
    game = random_game([*others, RECORD, *FINEST], seed)
    att = A.attribute(table_of(game), groups, [True] * len(groups), others)
    players, _ = A.partition(groups, len(others))
    assert any(p.merged for p in players) and len(players) <= limit
    want = set_player_owen(game, players, others)
    assert {g.name: g.value for g in att.groups} == pytest.approx({p.name: want[p.name] for p in players}, abs=1e-9)
    assert att.record == pytest.approx(want[RECORD], abs=1e-9)
    assert att.total == pytest.approx(modality_value_of(game, others, FINEST), abs=1e-9)  # still the EHR's value
    merged = next(g for g in att.groups if g.members)
    assert merged.kind == "merged" and merged.shown.startswith(f"{merged.members[0]} ")
    # not the sum of its groups' values in the finer game (interactions): the merged value is its own
    monkeypatch.setattr(A, "MAX_GROUPS", 16)
    fine = {g.name: g.value for g in A.attribute(table_of(game), groups, [True] * len(groups), others).groups}
    assert merged.value != pytest.approx(sum(fine[m] for m in merged.members), abs=1e-3)


def test_coalition_table_shape_is_checked():
    with pytest.raises(A.RadalignError, match=r"shape \(2, 3\)"):
        A.group_values(np.zeros((2, 3)), np.zeros(2))


# ----------------------------------------------------------------------------------------------------------
# On the fusion model


LABS = ["creatinine", "lactate", "sodium", "troponin_t"]


def fusion(seed=0):
    torch.manual_seed(seed)
    ehr = EHREncoder(len(LABS), [3, 4, 3, 3, 3], d=16, n_blocks=1, n_heads=2, dropout=0.0)
    enc = build_encoders(32, image_dim=10, text_dim=8, ehr=ehr)
    net = FusionModel(enc, d_model=32, n_heads=4, n_layers=2, dropout=0.0).eval()
    with torch.no_grad():
        net.head.weight.mul_(20)  # logits of a trained model's size (random init gives ~0.01)
    return net


def one_row(measured=(True, False, True, True), age=True, cat=(1, 0, 2, 0, 1), image=True, text=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(1, 10, generator=g), "text": torch.randn(1, 8, generator=g),
            "ehr": {"values": torch.randn(1, len(LABS), generator=g), "hours": torch.rand(1, len(LABS), generator=g),
                    "measured": torch.tensor([measured]), "num": torch.randn(1, 1, generator=g),
                    "num_known": torch.tensor([[age]]), "cat": torch.tensor([cat])},
            "present": {"image": torch.tensor([image]), "text": torch.tensor([text]), "ehr": torch.tensor([True])}}


def model_groups():
    return A.ehr_groups(LABS, ["age"], list(CATEGORICAL))


def model_shapley(net, batch):
    mods = list(net.modalities)
    return ex.shapley_values(ex.subset_values(coalition_logit(net, batch), mods), mods)


@pytest.mark.parametrize("seed,row", [
    (0, {}), (1, {"text": False}), (2, {"image": False, "text": False}),
    (3, {"measured": (False,) * 4}), (4, {"measured": (True,) * 4, "cat": (2, 3, 1, 1, 2)}),
])
def test_groups_and_record_sum_to_the_fusion_models_ehr_shapley_value(seed, row):
    net, batch = fusion(seed), one_row(seed=seed, **row)
    att = A.ehr_attribution(net, batch, list(net.modalities), model_groups())
    assert att.total == pytest.approx(model_shapley(net, batch)["ehr"], abs=2e-5)
    assert att.total == pytest.approx(att.record + sum(g.value for g in att.groups), abs=1e-9)
    present = [m for m in ("image", "text") if row.get(m, True)]
    assert att.others == present
    known = sum(row.get("measured", (True, False, True, True))) + 1 + sum(c > 0 for c in row.get("cat", (1, 0, 2, 0, 1)))
    assert att.forward_passes == (1 << len(present)) * ((1 << known) + 1)


def _unknown(batch, names, groups):
    """The batch with every group not in `names` shown unknown, written out by hand per kind."""
    e = {k: v.clone() for k, v in batch["ehr"].items()}
    for g in groups:
        if g.name in names:
            continue
        if g.kind == "lab":
            e["measured"][0, g.index] = False
        elif g.kind == "numeric":
            e["num_known"][0, g.index] = False
        else:
            e["cat"][0, g.index] = 0
    return {**batch, "ehr": e}


def test_fusion_model_values_equal_the_brute_force_over_orderings():
    net = fusion(5)
    batch = one_row(measured=(True, False, False, True), cat=(0, 0, 1, 0, 0), text=False, seed=5)
    groups = model_groups()
    players = ["creatinine", "troponin_t", "age", "insurance"]  # the known ones

    def game(s):  # a set of player names -> the fusion logit, each coalition its own forward pass
        kept = {"image"} & s | ({"ehr"} if RECORD in s else set())
        with torch.no_grad():
            return float(net(_unknown(batch, s, groups), present_override=frozenset(kept)).logits[0, 0])
    want = brute_force_owen(game, [["image"], [RECORD, *players]], first={1: RECORD})
    att = A.ehr_attribution(net, batch, list(net.modalities), groups)
    got = {g.name: g.value for g in att.groups}
    assert {p: got[p] for p in players} == pytest.approx({p: want[p] for p in players}, abs=2e-5)
    assert att.record == pytest.approx(want[RECORD], abs=2e-5)
    assert all(got[g.name] == 0.0 for g in groups if g.name not in players)


FEATURES = ["creatinine", "lactate", "heart_rate", "spo2"]  # the 4 feature slots of fusion(), 2 of them vitals


def trained_run(labs=("creatinine", "lactate")):
    """What explain_ehr reads of a run: its featurizer's features and numeric demographics."""
    return SimpleNamespace(featurizer=SimpleNamespace(features=FEATURES, numeric=["age"])), list(labs)


@pytest.mark.parametrize("seed,limit,row", [(30, 4, {}), (31, 3, {"text": False}), (32, 5, {"cat": (2, 3, 1, 1, 2)})])
def test_a_coarsened_fusion_model_case_sums_to_the_ehr_value_and_equals_the_brute_force(monkeypatch, seed, limit,
                                                                                       row):
    """More known groups than MAX_GROUPS (lowered to keep it cheap) on the real FusionModel, through explain_ehr
    (the run's labs: the other features are vital signs); every coalition its own forward pass in the brute
    force, each merged set of groups kept or shown unknown together."""
    monkeypatch.setattr(A, "MAX_GROUPS", limit)
    net, batch = fusion(seed), one_row(measured=(True,) * 4, seed=seed, **row)
    trained, labs = trained_run()
    att = A.explain_ehr(trained, net, batch, list(net.modalities), {"gender": "F", "race": EVIL}, labs=labs)
    assert att.coarsened and att.total == pytest.approx(model_shapley(net, batch)["ehr"], abs=2e-5)
    assert att.total == pytest.approx(att.record + sum(g.value for g in att.groups), abs=1e-9)
    groups = A.ehr_groups(FEATURES, ["age"], list(CATEGORICAL), vitals=["heart_rate", "spo2"])
    known = [g for g, k in zip(groups, A.known_groups(groups, batch["ehr"])) if k]
    members = {g.name: g.members or [g.name] for g in att.groups if g.known}
    assert len(members) <= limit < len(known) and sorted(sum(members.values(), [])) == sorted(g.name for g in known)
    assert members.get("vital signs", ["heart_rate", "spo2"]) == ["heart_rate", "spo2"]
    others = att.others

    @functools.cache
    def game(s):  # player names -> the fusion logit with their groups known
        kept = set(others) & s | ({"ehr"} if RECORD in s else set())
        names = set().union(*(members[p] for p in s if p in members))
        with torch.no_grad():
            return float(net(_unknown(batch, names, groups), present_override=frozenset(kept)).logits[0, 0])
    want = brute_force_owen(game, [[o] for o in others] + [[RECORD, *members]], first={len(others): RECORD})
    assert {g.name: g.value for g in att.groups if g.known} == pytest.approx({p: want[p] for p in members}, abs=2e-5)
    assert att.record == pytest.approx(want[RECORD], abs=2e-5)
    assert att.forward_passes == (1 << len(others)) * ((1 << len(members)) + 1)


def test_a_merged_player_of_a_model_additive_in_its_groups_gets_their_sum(monkeypatch):
    """LinearFusion has no interaction between groups: a merged set's value is the sum of its groups' closed-form
    values (coefficient x (value - unknown)), and the record is unchanged by the coarsening."""
    monkeypatch.setattr(A, "MAX_GROUPS", 3)
    cat = (2, 3, 1, 1, 2)
    net, batch = LinearFusion(), one_row(measured=(True, False, True, True), cat=cat, seed=12)
    lin, e = net.encoders["ehr"], batch["ehr"]
    trained, labs = trained_run()
    att = A.explain_ehr(trained, net, batch, list(net.modalities), {}, labs=labs)
    got = {g.name: (g.value, g.members) for g in att.groups if g.known}
    x = e["values"][0].tolist()
    lab = [float(lin.beta[j]) * (x[j] - float(lin.u[j])) for j in range(4)]
    demo = lin.gamma * (float(e["num"][0, 0]) - lin.u_age) + sum(float(d[c] - d[0]) for d, c in zip(lin.delta, cat))
    assert got == {"creatinine": (pytest.approx(lab[0], abs=1e-6), []),  # lactate absent: labs is one group
                   "vital signs": (pytest.approx(lab[2] + lab[3], abs=1e-6), ["heart_rate", "spo2"]),
                   "demographics": (pytest.approx(demo, abs=1e-6), ["age", *CATS])}
    all_unknown = lin.r + float(lin.beta @ lin.u) + lin.gamma * lin.u_age + sum(float(d[0]) for d in lin.delta)
    assert att.record == pytest.approx(all_unknown, abs=1e-6)


def test_a_lab_the_encoder_cannot_see_gets_zero():
    """Lab 2's measured token made equal to its not-measured token: the model ignores that lab."""
    net = fusion(7)
    batch = one_row(measured=(True, True, True, False), seed=7)

    def values():
        return {g.name: g.value for g in A.ehr_attribution(net, batch, list(net.modalities), model_groups()).groups}
    assert abs(values()["sodium"]) > 0.3  # before: it matters
    enc = net.encoders["ehr"].encoder
    with torch.no_grad():
        enc.value.weight[2] = 0.0
        enc.hours.weight[2] = 0.0
        enc.value.bias[2] = enc.not_measured[2]
        enc.hours.bias[2] = 0.0
    got = values()
    assert got["sodium"] == pytest.approx(0.0, abs=1e-5)
    assert abs(got["creatinine"]) > 0.03 and abs(got["lactate"]) > 0.03


class LinearEHR(nn.Module):
    """The EHR term r + sum beta_j x_j + gamma age + sum delta_j[cat_j]; an unknown lab counts as u_j, an unknown
    age as u_age, category 0 as delta_j[0]. Output [N, 1, 1], a token as the fusion model's tokenizers give."""

    def __init__(self):
        super().__init__()
        self.beta, self.u = torch.tensor([0.8, -1.5, 0.3, 2.0]), torch.tensor([0.1, -0.4, 0.7, 0.0])
        self.gamma, self.u_age, self.r = 0.6, -0.2, 0.45
        self.delta = [torch.tensor(d) for d in ([0.2, -0.3, 0.9], [0.0, 0.5, 1.1, -0.7], [0.3, -0.6, 0.2],
                                                 [-0.1, 0.4, 0.8], [0.05, 0.25, -0.35])]

    def forward(self, e):
        x = self.r + torch.where(e["measured"], e["values"], self.u) @ self.beta
        x = x + self.gamma * torch.where(e["num_known"][:, 0], e["num"][:, 0], torch.tensor(self.u_age))
        return (x + sum(d[e["cat"][:, j]] for j, d in enumerate(self.delta)))[:, None, None]


class LinearFusion(nn.Module):
    """A hand-made model linear in the EHR inputs: logit = c + [image kept] sum(image) + [EHR kept] LinearEHR.
    Its attribution is known in closed form."""

    modalities = ("image", "ehr")

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict({"ehr": LinearEHR()})
        self.c = -1.0

    def presence(self, batch, present_override=None):
        p = torch.stack([batch["present"][m] for m in self.modalities], dim=1)
        return p if present_override is None else p & torch.as_tensor(present_override, dtype=torch.bool)

    def forward(self, batch, present_override=None):
        p = self.presence(batch, present_override)
        ehr = self.encoders["ehr"](batch["ehr"])[:, 0, 0]
        logit = self.c + p[:, 0] * batch["image"].sum(1) + p[:, 1] * ehr
        return SimpleNamespace(logits=logit[:, None].double())


@pytest.mark.parametrize("measured,cat", [((True, False, True, True), (1, 0, 2, 0, 1)),
                                          ((False, True, False, True), (2, 3, 1, 1, 2)),
                                          ((True, True, True, True), (0, 0, 0, 0, 0))])
def test_linear_model_attribution_is_coefficient_times_delta(measured, cat):
    net, batch = LinearFusion(), one_row(measured=measured, cat=cat, seed=9)
    lin, e = net.encoders["ehr"], batch["ehr"]
    att = A.ehr_attribution(net, batch, list(net.modalities), model_groups())
    got = {g.name: g.value for g in att.groups}
    x = e["values"][0].tolist()
    for j, lab in enumerate(LABS):
        want = float(lin.beta[j]) * (x[j] - float(lin.u[j])) if measured[j] else 0.0
        assert got[lab] == pytest.approx(want, abs=1e-6), lab
    assert got["age"] == pytest.approx(lin.gamma * (float(e["num"][0, 0]) - lin.u_age), abs=1e-6)
    names = [A.DEMOGRAPHIC_NAMES.get(c, c) for c in CATEGORICAL]
    for j, name in enumerate(names):
        assert got[name] == pytest.approx(float(lin.delta[j][cat[j]] - lin.delta[j][0]), abs=1e-6), name
    all_unknown = lin.r + float(lin.beta @ lin.u) + lin.gamma * lin.u_age + sum(float(d[0]) for d in lin.delta)
    assert att.record == pytest.approx(all_unknown, abs=1e-6)  # no interaction: the step itself


def test_no_ehr_means_nothing_to_split():
    net = fusion(0)
    batch = one_row()
    batch["present"]["ehr"] = torch.tensor([False])
    assert A.ehr_attribution(net, batch, list(net.modalities), model_groups()) is None
    assert A.ehr_attribution(net, {k: v for k, v in batch.items() if k != "ehr"}, ["image", "text"], []) is None


def test_groups_read_as_the_table_row():
    row = {"creatinine": 1.25, "creatinine_hours": 8.46, "lactate": None, "lactate_hours": None, "sodium": 140,
           "sodium_hours": float("nan"), "troponin_t": float("nan"), "age": 77.0, "gender": "F", "race": "",
           "insurance": "Medicare", "marital_status": None, "language": "ENGLISH"}
    shown = {g.name: g.shown for g in A.ehr_groups(LABS, ["age"], list(CATEGORICAL), row)}
    assert shown == {"creatinine": "1.25 (8.5 h before the film)", "lactate": "absent", "sodium": "140",
                     "troponin_t": "absent", "age": "77", "sex": "F", "race": "unknown", "insurance": "Medicare",
                     "marital status": "unknown", "language": "ENGLISH"}
    with pytest.raises(A.RadalignError, match="has no 'measured' column 4"):
        A.known_groups([A.EHRGroup("x", "lab", 4)], one_row()["ehr"])


def _two_rows() -> dict:
    """Row 0 by hand (row 1 flips every flag: only row 0 counts). A measured lab whose value is 0.0 is known; an
    unknown age whose slot holds a stale 71.0 is not; category 0 is unknown whatever the others hold."""
    return {"values": torch.tensor([[0.0, 2.5, -1.0, 0.0], [1.0, 0.0, 0.0, 3.0]]),
            "hours": torch.tensor([[0.0, 3.0, 1.0, 0.0], [1.0, 0.0, 0.0, 2.0]]),
            "measured": torch.tensor([[True, False, True, False], [False, True, False, True]]),
            "num": torch.tensor([[71.0], [0.0]]), "num_known": torch.tensor([[False], [True]]),
            "cat": torch.tensor([[2, 0, 1, 0, 3], [0, 2, 0, 1, 0]])}


# the hand-worked table of row 0: (group, known)
KNOWN_ROW0 = [("creatinine", True), ("lactate", False), ("sodium", True), ("troponin_t", False), ("age", False),
              ("sex", True), ("race", False), ("insurance", True), ("marital status", False), ("language", True)]


def test_known_groups_read_row_0_by_kind():
    groups = model_groups()
    assert [(g.name, k) for g, k in zip(groups, A.known_groups(groups, _two_rows()))] == KNOWN_ROW0
    ehr = _two_rows()
    ehr["num_known"][0, 0], ehr["num"][0, 0] = True, 0.0  # an age known to be 0 is known
    assert A.known_groups([g for g in groups if g.kind == "numeric"], ehr) == [True]


@pytest.mark.parametrize("group,key", [
    (A.EHRGroup("lactate", "lab", 4), "measured"),  # one past the 4 lab columns
    (A.EHRGroup("weight", "numeric", 1), "num_known"),  # the model has one numeric demographic
    (A.EHRGroup("ethnicity", "categorical", 5), "cat"),  # five categorical columns
    (A.EHRGroup("creatinine", "lab", 9), "measured"),
])
def test_a_group_beyond_the_models_ehr_columns_is_refused_naming_it_and_the_fix(group, key):
    with pytest.raises(A.RadalignError) as e:
        A.known_groups([*model_groups(), group], _two_rows())
    assert str(e.value) == (f"EHR group {group.name!r} ({group.kind} #{group.index}): the model's EHR input has no "
                            f"{key!r} column {group.index}; the groups must come from the run's featurizer")


@pytest.mark.parametrize("kind,key", [("lab", "measured"), ("numeric", "num_known"), ("categorical", "cat")])
def test_a_group_whose_input_key_is_absent_is_refused(kind, key):
    ehr = {k: v for k, v in _two_rows().items() if k != key}
    group = next(g for g in model_groups() if g.kind == kind)
    with pytest.raises(A.RadalignError, match=rf"EHR group {group.name!r} \({kind} #0\): the model's EHR input has "
                       rf"no '{key}' column 0; the groups must come from the run's featurizer"):
        A.known_groups(model_groups(), ehr)
    others = [g for g in model_groups() if g.kind != kind]  # the other kinds never read the missing key
    assert A.known_groups(others, ehr) == [k for (n, k), g in zip(KNOWN_ROW0, model_groups()) if g.kind != kind]


# ----------------------------------------------------------------------------------------------------------
# In `finetune explain`: JSON, Markdown, HTML


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.rows, self._row = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self._row = []
            self.rows.append(self._row)

    def handle_endtag(self, tag):
        if tag in ("tr", "table"):
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._row is not None and data.strip():
            self._row.append(data.strip())


def _explained(ehr=None):
    game = random_game(["image", RECORD, EVIL, "age"], 11)
    groups = [A.EHRGroup(EVIL, "lab", 0, f"{EVIL} (2.0 h before the film)"), A.EHRGroup("age", "numeric", 0, "77"),
              A.EHRGroup("sodium", "lab", 1, "140")]
    att = A.attribute(table_of(game), groups, [True, True, False], ["image"]) if ehr is None else ehr

    def f(kept):
        return game(frozenset(kept - {"ehr"}) | ({RECORD, EVIL, "age"} if "ehr" in kept else set()))
    return ex.explain(f, ["image", "ehr"], study_id="7", used="image and labs", ehr=att), att


def test_json_carries_the_groups():
    expl, att = _explained()
    d = json.loads(ex.to_json(expl))["ehr_groups"]
    assert d["total"] == pytest.approx(expl.shapley["ehr"], abs=1e-9)
    assert d["record"] == pytest.approx(att.record) and d["space"] == "logit"
    assert [(g["name"], g["known"]) for g in d["groups"]][-1] == ("sodium", False)
    assert {g["name"]: g["value"] for g in d["groups"]} == pytest.approx({g.name: g.value for g in att.groups})


def test_html_shows_the_ranked_groups_escaped():
    expl, att = _explained()
    p = _Tags()
    p.feed(ex.to_html(expl))
    assert "script" not in [t for t, _ in p.tags]
    table = [r for r in p.rows if r and r[0] in {ex.RECORD_ROW, EVIL, "age", "sodium"}]
    want = [[ex.RECORD_ROW, "every lab not measured, demographics unknown", f"{att.record:+.3f}"]]
    want += [[g.name, g.shown, f"{g.value:+.3f}"] for g in att.groups]
    assert table == want
    assert table[-1] == ["sodium", "absent", "+0.000"]
    assert abs(float(table[1][2])) >= abs(float(table[2][2]))  # ranked by |value|
    assert f"The rows sum to {att.total:+.3f}, the EHR modality's Shapley value ({expl.shapley['ehr']:+.3f})" \
        in "".join(p.text)


def test_markdown_shows_the_groups_escaped():
    expl, att = _explained()
    page = markdown.markdown(ex.to_markdown(expl), extensions=["tables"])
    p = _Tags()
    p.feed(page)
    assert "script" not in [t for t, _ in p.tags]
    rows = [r for r in p.rows if r and r[0] in {ex.RECORD_ROW, EVIL, "age", "sodium"}]
    assert [r[0] for r in rows] == [ex.RECORD_ROW] + [g.name for g in att.groups]
    shown = {r[0]: r[1:] for r in rows}
    assert shown[EVIL][0] == f"{EVIL} (2.0 h before the film)" and rows[-1][1:] == ["absent", "+0.000"]


def _coarsened_explained():
    groups = [A.EHRGroup("sodium", "lab", 0, "140"), A.EHRGroup("age", "numeric", 0, "77"),
              A.EHRGroup("sex", "categorical", 0, "F"), A.EHRGroup("race", "categorical", 1, EVIL),
              A.EHRGroup(EVIL, "categorical", 2, "Medicare")]
    game = random_game(["image", RECORD, *(g.name for g in groups)], 13)
    return _explained(A.attribute(table_of(game), groups, [True] * 5, ["image"]))


def test_merged_rows_list_their_members_escaped_in_json_html_and_markdown(monkeypatch):
    monkeypatch.setattr(A, "MAX_GROUPS", 3)
    expl, att = _coarsened_explained()
    value = {g.name: g.value for g in att.groups}
    members = f"sex F; race {EVIL}; {EVIL} Medicare"
    d = json.loads(ex.to_json(expl))["ehr_groups"]
    row = next(g for g in d["groups"] if g["name"] == "demographics")
    assert row["members"] == ["sex", "race", EVIL] and row["kind"] == "merged" and row["shown"] == members
    assert d["coarsened"].startswith("5 EHR groups are known, more than the exact limit of 3 players")
    note = f"Partition coarsened: {d['coarsened']}."
    for page in (ex.to_html(expl), markdown.markdown(ex.to_markdown(expl), extensions=["tables"])):
        p = _Tags()
        p.feed(page)
        assert "script" not in [t for t, _ in p.tags]
        rows = {r[0]: r[1:] for r in p.rows if r and r[0] in {"demographics", "sodium", "age"}}
        assert rows["demographics"][:2] == [members, f"{value['demographics']:+.3f}"] and len(rows) == 3
        assert note in "".join(p.text)
    monkeypatch.setattr(A, "MAX_GROUPS", 16)
    expl, _ = _coarsened_explained()
    assert "Partition coarsened" not in ex.to_html(expl) + ex.to_markdown(expl)
    assert json.loads(ex.to_json(expl))["ehr_groups"]["coarsened"] is None


def test_a_refused_attribution_says_why_everywhere():
    expl, _ = _explained(ehr="19 EHR groups are known <b>")
    assert json.loads(ex.to_json(expl))["ehr_groups"] == {"error": "19 EHR groups are known <b>"}
    assert "Not computed: 19 EHR groups are known &lt;b&gt;." in ex.to_html(expl)
    assert "Not computed: 19 EHR groups are known &lt;b&gt;." in ex.to_markdown(expl)
    plain = ex.explain(lambda kept: 0.0, ["image"], study_id="7", used="image")
    assert json.loads(ex.to_json(plain))["ehr_groups"] is None and ex.EHR_TITLE not in ex.to_html(plain)


def test_chunked_table_equals_one_pass_and_the_model_is_left_untouched():
    net, batch = fusion(3), one_row(seed=3)
    groups = A.singletons([g for g, k in zip(model_groups(), A.known_groups(model_groups(), batch["ehr"])) if k])
    tokenizer = net.encoders["ehr"]
    v1, m1 = A.coalition_table(net, batch, list(net.modalities), groups, ["image", "text"])
    v7, m7 = A.coalition_table(net, batch, list(net.modalities), groups, ["image", "text"], chunk=7)
    assert v1.shape == (4, 1 << len(groups)) and np.allclose(v1, v7, atol=1e-5) and np.allclose(m1, m7)
    assert net.encoders["ehr"] is tokenizer and set(net.encoders) == {"image", "text", "ehr"}
    # row (r=image only, t=every group) is the model on the unmodified row with the indication masked
    with torch.no_grad():
        want = float(net(batch, present_override=frozenset({"image", "ehr"})).logits[0, 0])
        text_only = float(net(batch, present_override=frozenset({"text"})).logits[0, 0])
    assert v1[1, -1] == pytest.approx(want, abs=1e-5) and m1[2] == pytest.approx(text_only, abs=1e-5)

"""finetune features, EHR encoder, fusion model and baselines: behaviour checked against hand-worked values,
numpy/sklearn references and invariances (missing routing, absent-modality irrelevance, dropout rates)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from radalign.finetune.baselines import EarlyFusionModel, GBDTBaseline, LateFusion, gbdt_matrix, unimodal
from radalign.finetune.features import (
    CATEGORICAL,
    EHRFeaturizer,
    features_from_columns,
    label_matrix,
    text_present,
    threshold_label,
)
from radalign.finetune.fit import fit_model, predict_logits
from radalign.finetune.models import (
    EHREncoder,
    EmbeddingTokens,
    FusionModel,
    build_encoders,
    dropout_rates_from_presence,
    masked_loss,
    probabilities,
)

from radalign import RadalignError

FEATURES = ["creatinine", "lactate"]


def _table(n_train=5, seed=0) -> pd.DataFrame:
    rows = []
    for i in range(n_train):
        rows.append({"split": "train", "creatinine": float(i + 1), "creatinine_hours": 2.0,
                     "lactate": [0.5, 1.0, 2.0, 4.0, 8.0][i % 5], "lactate_hours": 1.0, "age": 40.0 + 10 * i,
                     "gender": "F" if i % 2 else "M", "race": "WHITE", "insurance": "Medicare",
                     "marital_status": "MARRIED", "language": "ENGLISH"})
    for split, v in (("validate", 1000.0), ("test", -1000.0)):
        rows.append({"split": split, "creatinine": v, "creatinine_hours": 3.0, "lactate": v, "lactate_hours": 3.0,
                     "age": 99.0, "gender": "F", "race": "ASIAN", "insurance": "Other", "marital_status": None,
                     "language": "ENGLISH"})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------
# Features.


def test_scaling_statistics_come_from_the_training_split_only():
    t = _table()
    fz = EHRFeaturizer.fit_on_train(t, FEATURES)
    # train creatinine 1..5: median 3, q1 2, q3 4 -> IQR 2 (numpy's linear percentiles, worked by hand)
    assert fz.median["creatinine"] == 3.0 and fz.iqr["creatinine"] == 2.0
    # lactate 0.5, 1, 2, 4, 8: median 2, q1 1, q3 4 -> IQR 3
    assert fz.median["lactate"] == 2.0 and fz.iqr["lactate"] == 3.0
    assert fz.median["age"] == 60.0 and fz.iqr["age"] == 20.0
    t2 = t.copy()
    t2.loc[t2.split != "train", ["creatinine", "lactate", "age"]] = 1e9  # other splits cannot move the statistics
    assert EHRFeaturizer.fit_on_train(t2, FEATURES).to_dict() == fz.to_dict()
    x = fz.transform(t)
    assert x.values[4, 0] == pytest.approx((5 - 3) / 2)
    assert x.values[5, 0] == pytest.approx((1000 - 3) / 2)  # validation row scaled with train statistics
    assert x.hours[0, 0] == pytest.approx(math.log1p(2.0))
    assert x.num[0, 0] == pytest.approx((40 - 60) / 20)
    assert fz.categories["race"] == ["WHITE"]  # ASIAN only outside train -> unseen -> unknown bucket
    assert x.cat[5, CATEGORICAL.index("race")] == 0 and x.counts["unseen_category"] == 4  # race, insurance x2
    assert x.counts["unknown_category"] == 2  # marital_status None in validate and test


def test_nan_inf_null_and_negative_hours_are_missing_and_counted():
    t = _table()
    fz = EHRFeaturizer.fit_on_train(t, FEATURES)
    t.loc[0, "creatinine"] = np.nan
    t.loc[1, "creatinine"] = np.inf
    t.loc[2, "creatinine"] = -np.inf
    t.loc[3, "lactate"] = None
    t.loc[4, "lactate_hours"] = -0.5  # drawn after the film
    t.loc[0, "lactate_hours"] = np.nan  # measured, time unknown
    t.loc[1, "age"] = np.inf
    x = fz.transform(t)
    assert x.measured[:5].tolist() == [[False, True], [False, True], [False, True], [True, False], [True, False]]
    assert np.all(x.values[~x.measured] == 0) and np.all(np.isfinite(x.values))
    # pandas keeps the float NaN as a null; inf/-inf are non-finite values
    assert x.counts["null_value"] == 2 and x.counts["nonfinite_value"] == 2
    assert x.counts["negative_hours"] == 1 and x.counts["missing_hours"] == 1
    assert x.counts["nonfinite_numeric"] == 1 and not x.num_known[1, 0]
    sparse = fz.transform(t.assign(creatinine=np.nan, lactate=np.nan))
    assert not sparse.measured.any() and sparse.present.all()  # demographics still known


def _train_only(**cols) -> pd.DataFrame:
    """Training rows with the given lab columns (hours 1.0 unless given) and fixed demographics."""
    n = len(next(iter(cols.values())))
    base = {"split": "train", "age": 50.0, "gender": "F", "race": "WHITE", "insurance": "Medicare",
            "marital_status": "MARRIED", "language": "ENGLISH"}
    out = pd.DataFrame({**base, **cols}, index=range(n))
    for f in FEATURES:
        out[f] = out[f] if f in out else 1.0
        out[f"{f}_hours"] = out[f"{f}_hours"] if f"{f}_hours" in out else 1.0
    return out


def test_a_constant_training_feature_is_scaled_by_one():
    """IQR 0 in training: divide by 1 (not by MIN_IQR, which would blow a 0.5 difference up to 5e5)."""
    t = _train_only(creatinine=[2.0] * 6, lactate=[1.0, 1.0, 1.0, 1.0, 1.001, 1.002])
    fz = EHRFeaturizer.fit_on_train(t, FEATURES)
    assert fz.median["creatinine"] == 2.0 and fz.iqr["creatinine"] == 1.0
    assert fz.iqr["age"] == 1.0  # every training age 50
    # a small but real IQR is kept: lactate q1 = 1.0, q3 = 1.00075 (numpy linear percentiles, by hand)
    assert fz.iqr["lactate"] == pytest.approx(0.00075)
    x = fz.transform(t.assign(creatinine=[2.5, 1.0, 2.0, 2.0, 2.0, 2.0], age=[51.5] + [50.0] * 5))
    assert x.values[:2, 0].tolist() == [0.5, -1.0] and x.num[0, 0] == pytest.approx(1.5)
    none = EHRFeaturizer.fit_on_train(t.assign(creatinine=np.nan), FEATURES)  # never measured in training
    assert none.median["creatinine"] == 0.0 and none.iqr["creatinine"] == 1.0


def test_training_statistics_leave_out_values_drawn_after_the_film():
    """Negative hours since drawn: not available at the film, so not in the scaling statistics either; a value
    drawn at the film's own time (0 h) is available, in fit and in transform."""
    t = _train_only(creatinine=[1.0, 2.0, 3.0, 4.0, 5.0, 1000.0, 2000.0],
                    creatinine_hours=[0.0, 1.0, 2.0, 3.0, 4.0, -0.5, -3.0])
    fz = EHRFeaturizer.fit_on_train(t, FEATURES)
    assert fz.median["creatinine"] == 3.0 and fz.iqr["creatinine"] == 2.0  # 1..5 only
    x = fz.transform(t)
    assert x.measured[:, 0].tolist() == [True] * 5 + [False] * 2
    assert x.hours[0, 0] == 0.0 and x.values[0, 0] == pytest.approx(-1.0)
    assert x.counts["negative_hours"] == 2


def test_categories_index_sorted_vocabulary_and_presence():
    t = _train_only(creatinine=[1.0, 2.0, 3.0]).assign(gender=["M", "F", "X"], race=[None, "B", "A"])
    fz = EHRFeaturizer.fit_on_train(t, FEATURES)
    assert fz.categories["gender"] == ["F", "M", "X"] and fz.categories["race"] == ["A", "B"]
    assert fz.cardinalities == [4, 3, 2, 2, 2]  # unknown (0) + each category, in CATEGORICAL order
    x = fz.transform(t)
    j, r = CATEGORICAL.index("gender"), CATEGORICAL.index("race")
    assert x.cat[:, j].tolist() == [2, 1, 3] and x.cat[:, r].tolist() == [0, 2, 1]
    # presence of the EHR modality: any lab, the age, or any category known
    blank = {c: None for c in CATEGORICAL}
    rows = pd.concat([t.iloc[:1].assign(creatinine=np.nan, lactate=np.nan, age=np.nan, **blank),
                      t.iloc[:1].assign(creatinine=np.nan, lactate=np.nan, age=np.nan, **{**blank, "race": "B"}),
                      t.iloc[:1].assign(creatinine=np.nan, lactate=np.nan, **blank)], ignore_index=True)
    assert fz.transform(rows).present.tolist() == [False, True, True]
    sub = x.take([2, 0])
    assert sub.cat[:, j].tolist() == [3, 2] and np.array_equal(sub.values, x.values[[2, 0]])


def test_counts_add_up_over_features_and_unknowns_stay_zero():
    t = _train_only(creatinine=[1.0, 2.0, 3.0, 4.0], lactate=[1.0, 2.0, 3.0, 4.0])
    fz = EHRFeaturizer.fit_on_train(t, FEATURES)
    bad = t.assign(creatinine_hours=[-1.0, -2.0, 1.0, 1.0], lactate_hours=[1.0, -1.0, 1.0, 1.0],
                   age=[np.nan, 30.0, 40.0, 50.0], gender=["  ", "", None, "F"], race=["Z", "WHITE", "WHITE", None])
    x = fz.transform(bad)
    assert x.counts["negative_hours"] == 3  # 2 creatinine + 1 lactate: summed over features
    assert x.counts["unknown_numeric"] == 1 and x.num[0, 0] == 0.0 and not x.num_known[0, 0]
    text_age = fz.transform(bad.assign(age=["n/a", 30.0, np.inf, 50.0]))  # unparsable text, inf: counted
    assert text_age.counts["nonfinite_numeric"] == 2 and text_age.counts["unknown_numeric"] == 0
    assert text_age.num_known[:, 0].tolist() == [False, True, False, True]
    assert x.counts["unknown_category"] == 4 and x.counts["unseen_category"] == 1  # blank text is unknown
    assert x.cat[:3, CATEGORICAL.index("gender")].tolist() == [0, 0, 0]
    assert np.isfinite(x.num).all() and x.num.dtype == np.float32 and x.cat.dtype == np.int64
    sub = x.take([3, 1])
    for name in ("values", "hours", "measured", "num", "num_known", "cat"):
        assert np.array_equal(getattr(sub, name), getattr(x, name)[[3, 1]]), name
    empty = fz.transform(t.iloc[:0])
    assert empty.values.shape == (0, 2) and empty.cat.shape == (0, len(CATEGORICAL)) and len(empty) == 0


def test_featurizer_round_trip_and_feature_list_refusal():
    fz = EHRFeaturizer.fit_on_train(_table(), FEATURES)
    back = EHRFeaturizer.from_dict(json.loads(json.dumps(fz.to_dict())))
    assert back == fz
    fz.numeric = []  # what was fitted comes back, not the defaults
    assert EHRFeaturizer.from_dict(json.loads(json.dumps(fz.to_dict()))).numeric == []
    old = {k: v for k, v in fz.to_dict().items() if k not in ("numeric", "n_fit_rows")}  # an older state file
    assert EHRFeaturizer.from_dict(old).n_fit_rows == 0 and EHRFeaturizer.from_dict(old).numeric == ["age"]
    with pytest.raises(RadalignError, match="no training rows"):
        EHRFeaturizer.fit_on_train(_table().assign(split="validate"), FEATURES)
    one = EHRFeaturizer.fit(_table().iloc[:1], FEATURES)  # a single training row is enough to fit
    assert one.median["creatinine"] == 1.0 and one.n_fit_rows == 1
    x = one.transform(_table())
    assert x.values.dtype == x.hours.dtype == x.num.dtype == np.float32 and x.measured.dtype == bool
    back.check_features(FEATURES)
    with pytest.raises(RadalignError, match="missing lactate.*unexpected troponin"):
        back.check_features(["creatinine", "troponin"])
    with pytest.raises(RadalignError, match="another order"):
        back.check_features(["lactate", "creatinine"])
    with pytest.raises(RadalignError, match="format"):
        EHRFeaturizer.from_dict({**fz.to_dict(), "format": "x/0"})
    assert features_from_columns(list(_table().columns)) == FEATURES


def test_label_columns_checked_and_policies():
    t = pd.DataFrame({"Edema": [1.0, 0.0, -1.0, None], "los_days": [8.0, 2.0, None, 7.0]})
    with pytest.raises(RadalignError, match=r"'in_hospital_mortality'.*available: Edema, los_days"):
        label_matrix(t, ["in_hospital_mortality"])
    y = label_matrix(t, ["Edema"])
    assert y.dtype == np.float64 and text_present(["a"]).dtype == bool
    assert y[:2, 0].tolist() == [1.0, 0.0] and np.isnan(y[2:, 0]).all()
    assert label_matrix(t, ["Edema"], uncertain="positive")[2, 0] == 1.0
    assert label_matrix(t, ["Edema"], uncertain="negative")[:3, 0].tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(RadalignError, match="uncertain: 'maybe'"):
        label_matrix(t, ["Edema"], uncertain="maybe")
    mc = label_matrix(pd.DataFrame({"cls": [2.0, None, 0.0]}), ["cls"], kind="multiclass")
    assert mc[[0, 2], 0].tolist() == [2.0, 0.0] and np.isnan(mc[1, 0])
    with pytest.raises(RadalignError, match="'los_days' holds 8"):
        label_matrix(t, ["los_days"])
    lab = threshold_label(t, "los_days", 7.0)
    assert lab[:2].tolist() == [1.0, 0.0] and np.isnan(lab[2]) and lab[3] == 0.0
    assert text_present(["cough", "  ", None, ""]).tolist() == [True, False, False, False]


# ----------------------------------------------------------------------------------------------------------
# EHR encoder.


def _ehr(b=4, f=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"values": torch.randn(b, f, generator=g), "hours": torch.rand(b, f, generator=g),
            "measured": torch.ones(b, f, dtype=torch.bool), "num": torch.randn(b, 1, generator=g),
            "num_known": torch.ones(b, 1, dtype=torch.bool), "cat": torch.randint(0, 2, (b, 5), generator=g)}


def _encoder(f=3, d=16):
    torch.manual_seed(0)
    return EHREncoder(f, [2, 2, 2, 2, 2], d=d, n_blocks=2, n_heads=2, dropout=0.0).eval()


def test_missing_lab_routes_through_the_learned_embedding_whatever_the_slot_holds():
    enc = _encoder()
    base = _ehr()
    base["measured"][:, 1] = False
    outs = []
    for filler in (0.0, 1e6, float("nan"), float("-inf")):
        e = {k: v.clone() for k, v in base.items()}
        e["values"][:, 1] = filler
        e["hours"][:, 1] = filler
        tok = enc.tokens(e)
        assert torch.equal(tok[:, 2], enc.not_measured[1].expand(4, -1))  # [CLS] at 0, item 1 at 2
        outs.append(enc(e))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    measured = enc(_ehr())
    assert not torch.allclose(measured, outs[0])  # absence is information: the output moves
    e = {k: v.clone() for k, v in base.items()}
    e["values"][:, 1] = float("nan")
    enc.train()
    enc(e).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)
    assert enc.not_measured.grad[1].abs().sum() > 0 and enc.not_measured.grad[0].abs().sum() == 0


def test_every_ehr_input_reaches_the_encoder_output():
    """A measured value, its hours, a known age and each categorical demographic all move the EHR vector."""
    enc = _encoder()
    base = _ehr()
    ref = enc(base)
    for key, col in (("values", 0), ("hours", 2), ("num", 0), ("cat", 0), ("cat", 4)):
        e = {k: v.clone() for k, v in base.items()}
        e[key][:, col] = 1 - e[key][:, col] if key == "cat" else e[key][:, col] + 1.5
        assert not torch.allclose(enc(e), ref), (key, col)


def test_unknown_age_routes_through_its_embedding():
    enc = _encoder()
    a, b = _ehr(), _ehr()
    for e, v in ((a, 3.0), (b, float("nan"))):
        e["num"][:, 0] = v
        e["num_known"][:, 0] = False
    assert torch.equal(enc(a), enc(b))


# ----------------------------------------------------------------------------------------------------------
# Fusion model.


def _batch(b=6, seed=0, patches=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 10, generator=g) if patches == 1 else torch.randn(b, patches, 10, generator=g)
    return {"image" if patches == 1 else "image_patches": image, "text": torch.randn(b, 8, generator=g), "ehr": _ehr(b, 3, seed),
            "present": {"image": torch.ones(b, dtype=torch.bool),
                        "text": torch.tensor([True, False] * (b // 2)),
                        "ehr": torch.tensor([True, True, False] * (b // 3))}}


def _model(task="binary", n_outputs=1, patches=1, **kw):
    torch.manual_seed(0)
    enc = build_encoders(32, image_dim=10, text_dim=8, ehr=_encoder(), image_patches=(patches, 10) if patches > 1 else None)
    return FusionModel(enc, n_outputs=n_outputs, task=task, d_model=32, n_heads=4, dropout=0.0, **kw).eval()


@pytest.mark.parametrize("cls_sees_absent", [True, False])
def test_absent_modality_input_is_irrelevant(cls_sees_absent):
    model = _model(cls_sees_absent=cls_sees_absent)
    batch = _batch()
    ref = model(batch)
    pert = _batch(seed=1)  # new inputs everywhere...
    for m in ("image", "text", "ehr"):  # ...kept only where the modality is present
        keep = batch["present"][m]
        if m == "ehr":
            pert[m] = {k: torch.where(keep.view(-1, 1), batch[m][k], v) for k, v in pert[m].items()}
        else:
            pert[m] = torch.where(keep.view(-1, 1), batch[m], pert[m])
    pert["text"][~batch["present"]["text"]] = float("nan")
    pert["present"] = batch["present"]
    out = model(pert)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.attention, ref.attention)
    if not cls_sees_absent:
        absent = ~ref.present
        assert torch.all(ref.attention[absent] == 0)
    assert torch.allclose(ref.attention.sum(1) + ref.attention_cls, torch.ones(6), atol=1e-5)


def test_present_override_equals_absent_data_and_rows_are_independent():
    model = _model()
    batch = _batch()
    masked = model(batch, present_override={"text": torch.zeros(6, dtype=torch.bool)})
    no_text = model({k: v for k, v in batch.items() if k != "text"})
    assert torch.equal(masked.logits, no_text.logits)
    assert torch.equal(model(batch, present_override={"image", "ehr"}).logits, masked.logits)
    assert not masked.present[:, 1].any()
    full = model(batch).logits
    for i in range(6):  # one row alone gives the same output as in the batch (no mixing across rows)
        row = {"image": batch["image"][i:i + 1], "text": batch["text"][i:i + 1],
               "ehr": {k: v[i:i + 1] for k, v in batch["ehr"].items()},
               "present": {k: v[i:i + 1] for k, v in batch["present"].items()}}
        assert torch.allclose(model(row).logits, full[i:i + 1], atol=1e-5)
    with pytest.raises(RadalignError, match="unknown modality"):
        model(batch, present_override={"report": torch.zeros(6, dtype=torch.bool)})


def test_gradient_never_reaches_an_absent_input():
    model = _model().train()
    model.dropout_rates.zero_()
    batch = _batch()
    batch["text"].requires_grad_(True)
    masked_loss(model(batch).logits, torch.ones(6, 1), "binary").backward()
    g = batch["text"].grad
    absent = ~batch["present"]["text"]
    assert torch.all(g[absent] == 0) and g[~absent].abs().sum() > 0


def test_modality_dropout_rates_are_honoured():
    rates = {"image": 0.1, "text": 0.25, "ehr": 0.4}
    model = _model(modality_dropout=rates).train()
    torch.manual_seed(1)
    n = 40_000
    present = torch.ones(n, 3, dtype=torch.bool)
    present[: n // 2, 2] = False  # absent rows stay absent; dropping acts on present ones only
    kept = model.modality_dropout(present)
    assert not kept[: n // 2, 2].any()
    for j, m in enumerate(("image", "text", "ehr")):
        pool = present[:, j]
        dropped = (~kept[pool, j]).float().mean().item()
        sigma = math.sqrt(rates[m] * (1 - rates[m]) / int(pool.sum()))
        assert abs(dropped - rates[m]) < 4 * sigma, (m, dropped)
    model.eval()
    batch = _batch()
    assert torch.equal(model(batch).present, model.presence(batch))  # no dropout in eval
    assert dropout_rates_from_presence({"text": np.array([1, 1, 1, 0]), "ehr": np.ones(5),
                                        "image": np.zeros(3)}) == {"text": 0.25, "ehr": 0.05, "image": 0.5}
    with pytest.raises(RadalignError, match="modality_dropout"):
        _model(modality_dropout={"image": 1.0})


@pytest.mark.parametrize("task,n_out", [("binary", 1), ("multilabel", 3), ("multiclass", 4)])
def test_forward_backward_each_task_with_patch_tokens(task, n_out):
    model = _model(task=task, n_outputs=n_out, patches=5).train()
    model.dropout_rates.zero_()  # every present modality reaches the model
    batch = _batch(patches=5)
    batch["image_patches"].requires_grad_(True)
    out = model(batch)
    assert out.logits.shape == (6, n_out) and out.attention.shape == (6, 3)
    y = torch.tensor([0.0, 1, 2, 3, float("nan"), 1])[:, None] if task == "multiclass" else \
        torch.bernoulli(torch.full((6, n_out), 0.5), generator=torch.Generator().manual_seed(0))
    loss = masked_loss(out.logits, y, task)
    z = out.logits.detach().double().numpy()
    if task == "multiclass":  # cross-entropy over the 5 labelled rows, by hand with numpy
        lse = np.log(np.exp(z).sum(1))
        ref = np.mean([lse[i] - z[i, int(c)] for i, c in enumerate(y[:, 0].tolist()) if not math.isnan(c)])
        prob_ref = np.exp(z) / np.exp(z).sum(1, keepdims=True)  # softmax over classes
    else:  # BCE over every cell
        t = y.double().numpy()
        ref = np.mean(np.logaddexp(0, z) - t * z)
        prob_ref = 1 / (1 + np.exp(-z))  # a sigmoid per output
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert probabilities(out.logits, task).detach().double().numpy() == pytest.approx(prob_ref, abs=1e-6)
    loss.backward()
    for name in ("encoders.image.proj.weight", "encoders.ehr.encoder.value.weight", "head.weight", "mask_token"):
        assert torch.isfinite(dict(model.named_parameters())[name].grad).all()
    g = batch["image_patches"].grad  # [B, 5, D]: every patch token of a labelled row reaches the loss
    labelled = ~torch.isnan(y).all(1)
    assert (g[labelled].abs().sum(-1) > 0).all() and (g[~labelled] == 0).all()
    model.eval()
    moved = {**batch, "image_patches": batch["image_patches"].detach().clone()}
    moved["image_patches"][:, 4] = torch.randn(6, 10, generator=torch.Generator().manual_seed(9))  # the last patch alone
    # (a constant shift would vanish in the token LayerNorm) changes the logits
    assert not torch.allclose(model(moved).logits, model(batch).logits)
    with pytest.raises(RadalignError, match="expects"):
        model({"image_patches": torch.randn(6, 10)})  # one token given, model built for 5 patch tokens
    with pytest.raises(RadalignError, match="patch tokens"):
        model({"image": torch.randn(6, 10)})  # the pooled embedding only: refused, not read as "no image"


def test_modality_dropout_draw_boundaries():
    """Drop when u < rate: rate 0 never drops (even u = 0), u at the rate keeps, u below drops."""
    model = _model(modality_dropout={"image": 0.0, "text": 0.5, "ehr": 0.25}).train()
    present = torch.ones(4, 3, dtype=torch.bool)
    u = torch.tensor([[0.0, 0.5, 0.25], [0.0, 0.49, 0.24], [0.9, 0.0, 0.9], [0.3, 0.7, 0.1]])
    kept = model.modality_dropout(present, u)
    assert kept.tolist() == [[True, True, True], [True, False, False], [True, False, True], [True, True, False]]
    batch = _batch(b=4)
    batch["present"] = {m: torch.ones(4, dtype=torch.bool) for m in ("image", "text", "ehr")}
    batch["dropout_u"] = u  # the recipe's seeded draws are used in training
    assert model(batch).present.tolist() == kept.tolist()


def test_presence_from_a_tensor_an_override_set_or_a_missing_modality():
    model = _model()
    batch = _batch()
    by_map = model.presence(batch)
    as_tensor = {**batch, "present": torch.stack([batch["present"][m] for m in ("image", "text", "ehr")], 1)}
    assert torch.equal(model.presence(as_tensor), by_map)
    assert by_map[:, 1].tolist() == [True, False] * 3 and by_map[:, 2].tolist() == [True, True, False] * 2
    partial = {**batch, "present": {"text": batch["present"]["text"]}}  # unnamed modalities count as present
    assert model.presence(partial)[:, [0, 2]].all()
    no_ehr = {k: v for k, v in batch.items() if k != "ehr"}
    assert not model.presence(no_ehr)[:, 2].any()
    keep = model.presence(batch, present_override={"image", "text"})
    assert not keep[:, 2].any() and torch.equal(keep[:, :2], by_map[:, :2])
    rows = torch.tensor([True, False, True, False, True, False])
    one = model.presence(batch, present_override={"image": rows})
    assert one[:, 0].tolist() == rows.tolist() and torch.equal(one[:, 1:], by_map[:, 1:])
    tensor_override = model.presence(batch, present_override=torch.tensor([False, True, True]))
    assert not tensor_override[:, 0].any() and torch.equal(tensor_override[:, 1:], by_map[:, 1:])


def test_attention_mask_blocks_absent_tokens_except_for_cls():
    """Hand-built: 3 modalities, one token each, row 0 lacks text. Blocked = True."""
    for sees in (True, False):
        model = _model(cls_sees_absent=sees)
        present = torch.tensor([[True, False, True], [True, True, True]])
        owner = torch.tensor([-1, 0, 1, 2])
        m = model._attention_mask(present, owner).view(2, model.n_heads, 4, 4)[:, 0]
        want0 = torch.zeros(4, 4, dtype=torch.bool)
        want0[1:, 2] = True  # image, text, ehr queries may not look at the absent text token ...
        want0[2, 2] = False  # ... except the text token at itself (no empty row)
        want0[0, 2] = not sees
        assert torch.equal(m[0], want0), sees
        assert not m[1].any()


def test_masked_loss_matches_hand_computation():
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-0.3, 1.5]])
    y = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("nan"), 0.0]])
    cells = [(0.5, 1), (2.0, 0), (0.0, 1), (1.5, 0)]
    bce = [-(t * math.log(1 / (1 + math.exp(-z))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-z))))
           for z, t in cells]
    assert masked_loss(logits, y, "multilabel").item() == pytest.approx(sum(bce) / 4, rel=1e-6)
    yc = torch.tensor([1.0, float("nan"), 0.0])
    ce = [-(logits[0, 1] - torch.logsumexp(logits[0], 0)).item(), -(logits[2, 0] - torch.logsumexp(logits[2], 0)).item()]
    assert masked_loss(logits, yc, "multiclass").item() == pytest.approx(sum(ce) / 2, rel=1e-6)
    z = torch.zeros(2, 1, requires_grad=True)
    loss = masked_loss(z, torch.full((2, 1), float("nan")), "binary")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros(2, 1))


def test_embedding_tokens_forward_backward():
    tok = EmbeddingTokens(10, 16, n_tokens=4)
    x = torch.randn(3, 4, 10, requires_grad=True)
    out = tok(x)
    out.sum().backward()
    assert out.shape == (3, 4, 16) and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------------------------
# Baselines and a small learning check.


def _planted(n=240, seed=0):
    """Label depends on image dim 0 and lab 0; lab 0 missing for a third of rows (then no lab signal)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, 10)).astype(np.float32)
    lab = rng.normal(size=(n, 3)).astype(np.float32)
    measured = rng.random((n, 3)) > 0.33
    logit = 2.0 * img[:, 0] + 2.0 * np.where(measured[:, 0], lab[:, 0], 0.0)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    ehr = {"values": torch.tensor(np.where(measured, lab, np.nan)), "hours": torch.rand(n, 3),
           "measured": torch.tensor(measured), "num": torch.zeros(n, 1),
           "num_known": torch.ones(n, 1, dtype=torch.bool), "cat": torch.zeros(n, 5, dtype=torch.long)}
    batch = {"image": torch.tensor(img), "text": torch.tensor(rng.normal(size=(n, 8)).astype(np.float32)),
             "ehr": ehr, "present": {"image": torch.ones(n, dtype=torch.bool),
                                     "text": torch.tensor(rng.random(n) > 0.3), "ehr": torch.ones(n, dtype=torch.bool)}}
    return batch, torch.tensor(y)[:, None]


def _auroc(y, s):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(np.asarray(y).ravel(), np.asarray(s).ravel())


def _split(batch, rows):
    from radalign.finetune.fit import take_rows

    return take_rows(batch, torch.as_tensor(rows))


def test_every_baseline_runs_and_the_fusion_model_learns():
    batch, y = _planted()
    tr, te = np.arange(160), np.arange(160, 240)
    btr, bte = _split(batch, tr), _split(batch, te)
    torch.manual_seed(0)
    encoders = build_encoders(32, image_dim=10, text_dim=8, ehr=EHREncoder(3, [2] * 5, d=16, n_heads=2))
    fusion = FusionModel(encoders, d_model=32, n_heads=4, modality_dropout={"image": 0.1, "ehr": 0.1})
    losses = fit_model(fusion, btr, y[tr], task="binary", steps=40, lr=3e-3, weight_decay=1e-2, seed=0)
    assert losses[-1] < 0.6 * losses[0]
    assert _auroc(y[te], predict_logits(fusion, bte)) > 0.75  # the planted logit itself scores 0.93
    logits_val = {}
    for m in ("image", "text", "ehr"):
        torch.manual_seed(0)
        enc = build_encoders(32, image_dim=10, text_dim=8, ehr=EHREncoder(3, [2] * 5, d=16, n_heads=2))
        uni = unimodal(m, enc, d_model=32, n_heads=4)
        fit_model(uni, btr, y[tr], task="binary", steps=15, lr=3e-3, seed=0)
        logits_val[m] = predict_logits(uni, bte)
        assert logits_val[m].shape == (80, 1) and np.isfinite(logits_val[m]).all()
    present = {m: batch["present"][m][te].numpy() for m in logits_val}
    avg = LateFusion("average").fit(logits_val, present, y[te].numpy()).combine(logits_val, present)
    hand = np.array([np.mean([logits_val[m][i, 0] for m in logits_val if present[m][i]]) for i in range(80)])
    assert np.allclose(avg[:, 0], hand)
    stacked = LateFusion("stacked").fit(logits_val, present, y[te].numpy()).combine(logits_val, present)
    assert stacked.shape == (80, 1) and np.isfinite(stacked).all()
    early = EarlyFusionModel(image_dim=10, text_dim=8, n_features=3, cardinalities=[2] * 5, hidden=32)
    fit_model(early, btr, y[tr], task="binary", steps=40, lr=3e-3, seed=0)
    e_out = predict_logits(early, bte)
    assert np.isfinite(e_out).all() and _auroc(y[te], e_out) > 0.7
    with pytest.raises(RadalignError, match="no 'report' modality"):
        unimodal("report", encoders)


def test_early_fusion_ignores_absent_input():
    early = EarlyFusionModel(image_dim=10, text_dim=8, n_features=3, cardinalities=[2] * 5).eval()
    batch = _batch()
    ref = early(batch)
    batch["text"][~batch["present"]["text"]] = float("nan")
    assert torch.equal(early(batch), ref)
    # removing a modality at test time (override) equals a batch without it; an override keeps, never adds
    no_text = {k: v for k, v in batch.items() if k != "text"}
    masked = early(batch, present_override={"text": False})
    assert torch.allclose(masked, early(no_text), atol=1e-6)
    assert not torch.allclose(masked, ref)
    assert torch.equal(early(batch, present_override={"text": True}), ref)


def test_unimodal_baselines_train_without_modality_dropout():
    enc = build_encoders(16, image_dim=10, text_dim=8)
    for m in ("image", "text"):
        uni = unimodal(m, enc, d_model=16, n_heads=2)
        assert uni.modalities == (m,) and uni.dropout_rates.tolist() == [0.0]


def test_gbdt_takes_nan_natively_and_learns():
    t = pd.DataFrame({"split": ["train"] * 300, "creatinine": np.random.default_rng(0).normal(size=300),
                      "creatinine_hours": 1.0, "lactate": np.nan, "lactate_hours": np.nan, "age": 50.0,
                      "gender": "F", "race": None, "insurance": "Medicare", "marital_status": None,
                      "language": "ENGLISH"})
    rng = np.random.default_rng(1)
    miss = rng.random(300) < 0.3
    t.loc[miss, "creatinine"] = np.nan
    t.loc[rng.random(300) < 0.05, "creatinine"] = np.inf  # treated as missing (counted by the featurizer)
    y = np.where(t.creatinine.isna() | np.isinf(t.creatinine), 1.0, (t.creatinine > 0).astype(float))
    y[:5] = np.nan  # unlabelled rows are left out and counted
    fz = EHRFeaturizer.fit_on_train(t, FEATURES)
    x = fz.transform(t)
    img = rng.normal(size=(300, 4))
    data = gbdt_matrix(x, img, image_present=rng.random(300) > 0.2)
    assert data[0].shape == (300, 2 * 2 + 1 + 5 + 4) and data[1].sum() == 5
    model = GBDTBaseline("binary", max_iter=50).fit(data, y[:, None])
    assert model.unlabelled == [5]
    p = model.predict_proba(data)[:, 0]
    ok = ~np.isnan(y)
    assert _auroc(y[ok], p[ok]) > 0.95  # missingness itself carries the label here
    assert np.isfinite(model.predict_logits(data)).all()


def _features(values, measured, hours, num, num_known, cat):
    from radalign.finetune.features import EHRFeatures

    a = lambda v, t: np.asarray(v, t)  # noqa: E731
    return EHRFeatures(a(values, np.float32), a(hours, np.float32), a(measured, bool), a(num, np.float32),
                       a(num_known, bool), a(cat, np.int64))


def test_gbdt_matrix_hand_worked():
    x = _features(values=[[0.5, 9.0], [1.5, 2.0]], measured=[[True, False], [True, True]],
                  hours=[[0.1, 9.0], [0.2, 0.3]], num=[[1.0], [7.0]], num_known=[[True], [False]],
                  cat=[[0, 2, 1, 1, 1], [1, 0, 1, 1, 1]])
    m, cat_mask = gbdt_matrix(x, np.array([[1.0, 2.0], [3.0, 4.0]]), image_present=np.array([True, False]))
    nan = np.nan
    want = np.array([[0.5, nan, 0.1, nan, 1.0, nan, 1, 0, 0, 0, 1.0, 2.0],
                     [1.5, 2.0, 0.2, 0.3, nan, 0, nan, 0, 0, 0, nan, nan]])
    np.testing.assert_allclose(m, want, rtol=1e-6)
    assert cat_mask.tolist() == [False] * 5 + [True] * 5 + [False] * 2


def test_late_fusion_stacked_equals_sklearn_on_the_documented_design():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    n = 200
    logits = {m: rng.normal(size=(n, 1)) for m in ("image", "ehr")}
    present = {"image": np.ones(n, bool), "ehr": rng.random(n) < 0.6}
    y = (logits["image"][:, 0] + np.where(present["ehr"], logits["ehr"][:, 0], 0) + rng.normal(size=n) > 0)
    y = y.astype(float)[:, None]
    y[:4] = np.nan
    design = np.stack([logits["image"][:, 0], np.ones(n), logits["ehr"][:, 0] * present["ehr"],
                       present["ehr"].astype(float)], axis=1)
    ok = ~np.isnan(y[:, 0])
    ref = LogisticRegression(C=0.3, max_iter=1000).fit(design[ok], y[ok, 0].astype(int))
    lf = LateFusion("stacked", C=0.3).fit(logits, present, y)
    assert lf.stackers[0].coef_ == pytest.approx(ref.coef_, abs=1e-5)
    assert lf.combine(logits, present)[:, 0] == pytest.approx(ref.decision_function(design), abs=1e-5)
    with pytest.raises(RadalignError, match="one class on the validation split.*'average'"):
        LateFusion("stacked").fit(logits, present, np.zeros((n, 1)))
    with pytest.raises(RadalignError, match="'vote'"):
        LateFusion("vote")
    nothing = {"image": np.zeros(3, bool), "ehr": np.array([False, True, False])}
    three = {m: v[:3] for m, v in logits.items()}
    avg = LateFusion("average").fit(three, nothing, y[:3]).combine(three, nothing)[:, 0]
    assert avg.tolist() == pytest.approx([(three["image"][0, 0] + three["ehr"][0, 0]) / 2, three["ehr"][1, 0],
                                          (three["image"][2, 0] + three["ehr"][2, 0]) / 2])  # none: plain mean


def test_early_fusion_flattens_ehr_as_documented():
    x = _features(values=[[0.5, 9.0]], measured=[[True, False]], hours=[[0.1, 9.0]], num=[[1.5]],
                  num_known=[[False]], cat=[[0, 2, 1, 1, 1]])
    from radalign.finetune.models import ehr_tensors

    early = EarlyFusionModel(n_features=2, cardinalities=[2, 3, 2, 2, 2])
    assert early.ehr_dim == 3 * 2 + 2 + 11
    flat = early._ehr_flat(ehr_tensors(x))[0].tolist()
    assert flat == pytest.approx([0.5, 0.0, 1, 0, 0.1, 0.0, 0.0, 0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 0, 1])


def test_gbdt_logits_are_the_log_odds_of_its_probabilities_and_one_class_is_refused():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 3))
    x[:, 2] = np.nan  # never measured in training: dropped and counted
    y = (x[:, 0] > 0).astype(float)[:, None]
    data = (x, np.zeros(3, bool))
    g = GBDTBaseline("binary", max_iter=20).fit(data, y)
    assert g.dropped_columns == 1
    p = g.predict_proba(data)[:, 0]
    assert g.predict_logits(data)[:, 0] == pytest.approx(np.log(p / (1 - p)), rel=1e-6)
    with pytest.raises(RadalignError, match="one class in training"):
        GBDTBaseline("binary", max_iter=5).fit(data, np.ones((120, 1)))


def test_average_late_fusion_without_fit_and_multiclass_gbdt_log_probabilities():
    logits = {"image": np.array([[1.0], [3.0]]), "ehr": np.array([[3.0], [5.0]])}
    present = {"image": np.array([True, True]), "ehr": np.array([True, False])}
    assert LateFusion("average").combine(logits, present)[:, 0].tolist() == [2.0, 3.0]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 2))
    y = np.digitize(x[:, 0], [-0.5, 0.5]).astype(float)[:, None]  # classes 0, 1, 2
    g = GBDTBaseline("multiclass", max_iter=10).fit((x, np.zeros(2, bool)), y)
    p = g.predict_proba((x, None))
    assert p.shape == (150, 3) and np.allclose(p.sum(1), 1)
    assert g.predict_logits((x, None)) == pytest.approx(np.log(np.clip(p, 1e-7, 1 - 1e-7)))

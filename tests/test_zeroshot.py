"""Zero-shot stage: prompt ensembling, scoring modes, bootstrap statistics, label policy, outputs, bad input.

Most tests use `FakeEncoders`, a tiny object with the `pretrain.export.Encoders` protocol whose text
vectors can be pinned per prompt, so expected scores can be computed by hand. End-to-end tests with the
real export and shards are in tests/test_zeroshot_e2e.py.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from radalign.data.labels import apply_label_policy, label_counts
from radalign.pretrain import classifier
from radalign.pretrain.prompts import load_prompt_set, parse_prompt_set
from radalign.zeroshot import metrics
from radalign.zeroshot.config import ZeroshotConfig
from radalign.zeroshot.evaluate import Checkpoint, evaluate, run_zeroshot
from radalign.zeroshot.inputs import Embedded
from sklearn.metrics import roc_auc_score

from radalign import RadalignError
from radalign import metrics as rm
from radalign.config import ConfigError

torch.set_num_threads(1)


class FakeEncoders:
    """The Encoders protocol: 8x8 gray images projected to D dims; text vectors hash-seeded or pinned."""

    def __init__(self, dim: int = 8, seed: int = 0, vocab: int = 1000, ctx: int = 12, scale: float = 10.0):
        self.embed_dim, self.logit_scale, self.vocab, self.ctx = dim, scale, vocab, ctx
        self.checksum = hashlib.sha256(f"fake{seed}".encode()).hexdigest()
        self.config = {"logit_scale": scale, "model_cfg": {"text_cfg": {"vocab_size": vocab, "context_length": ctx}}}
        self.proj = torch.randn(3 * 64, dim, generator=torch.Generator().manual_seed(seed))
        self.bias = torch.zeros(dim)
        self.pinned: dict[str, torch.Tensor] = {}
        self.seed = seed

    def image_transform(self):
        def tf(im):  # PIL -> [3, 8, 8]
            x = torch.from_numpy(np.asarray(im.convert("L").resize((8, 8)), dtype=np.float32) / 255.0)
            return x.expand(3, 8, 8).contiguous()
        return tf

    def encode_images(self, images):  # [B, 3, 8, 8] -> [B, D]
        return F.normalize(images.flatten(1) @ self.proj + self.bias, dim=-1)

    def tokenize(self, texts):  # [N, ctx]
        out = torch.zeros(len(texts), self.ctx, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [int(hashlib.md5(w.encode()).hexdigest(), 16) % self.vocab for w in t.split()][: self.ctx]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def _vec(self, text: str) -> torch.Tensor:
        if text in self.pinned:
            return self.pinned[text]
        g = torch.Generator().manual_seed(int(hashlib.md5(f"{self.seed}{text}".encode()).hexdigest(), 16) % 2**31)
        return torch.randn(self.embed_dim, generator=g)

    def encode_texts(self, texts, batch_size: int = 256):
        return F.normalize(torch.stack([self._vec(t) for t in texts]), dim=-1)


def _unit(i: int, d: int = 8) -> torch.Tensor:
    return F.one_hot(torch.tensor(i), d).float()


def _set(classes: dict, mode: str = "binary", **kw):
    return parse_prompt_set({"name": "t", "mode": mode, "classes": classes, **kw})


# ----------------------------------------------------------------------------------------------------------
# Prompt ensembling and scoring modes.


def test_text_ensemble_equals_open_clip_build_zero_shot_classifier():
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    torch.manual_seed(0)
    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                                        image_size=16),
                 text_cfg=CLIPTextCfg(context_length=16, width=32, heads=2, layers=1)).eval()
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)

    class Wrapped:  # the export's protocol around an open_clip model
        config = {"model_cfg": {"text_cfg": {"vocab_size": 49408, "context_length": 16}}}

        def tokenize(self, texts):
            return tok(texts)

        @torch.no_grad()
        def encode_texts(self, texts, batch_size=256):
            return F.normalize(model.encode_text(tok(texts)), dim=-1)

    names = ["pleural effusion", "cardiomegaly", "pneumothorax"]
    templates = ["{}.", "small {}.", "there is {}.", "findings of {} on this radiograph."]
    ps = _set({n: {"positive": [t.format(n) for t in templates]} for n in names}, mode="multiclass")
    ours = classifier.text_weights(Wrapped(), ps).positive  # [C, D]
    ref = build_zero_shot_classifier(model, tok, names, templates, num_classes_per_batch=2).T  # [C, D]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_binary_mode_matches_hand_computation():
    enc = FakeEncoders(dim=4, scale=7.0)
    pos = [torch.tensor([1.0, 0, 0, 0]), torch.tensor([1.0, 1.0, 0, 0])]
    neg = [torch.tensor([0, 0, 1.0, 0])]
    for t, v in zip(["p1", "p2", "n1"], pos + neg):
        enc.pinned[t] = v
    ps = _set({"A": {"positive": ["p1", "p2"], "negative": ["n1"]}})
    w = classifier.text_weights(enc, ps)
    images = F.normalize(torch.tensor([[1.0, 0.2, 0.1, 0.0], [0.1, 0.0, 1.0, 0.3], [0.5, 0.5, 0.5, 0.5]]), dim=-1)
    probs = classifier.class_probs(images, w, "binary", 7.0)[:, 0].numpy()
    # By hand: ensembled positive = normalise(mean(normalise(p1), normalise(p2))), negative = e3.
    p = np.array([1.0, 0, 0, 0]) + np.array([1.0, 1.0, 0, 0]) / np.sqrt(2)
    p /= np.linalg.norm(p)
    n = np.array([0, 0, 1.0, 0])
    for x, got in zip(images.numpy(), probs):
        lp, ln = 7.0 * x @ p, 7.0 * x @ n
        assert got == pytest.approx(np.exp(lp) / (np.exp(lp) + np.exp(ln)), rel=1e-5)


def test_multiclass_mode_is_softmax_over_classes():
    enc = FakeEncoders(dim=4, scale=5.0)
    for i, t in enumerate(["a", "b", "c"]):
        enc.pinned[t] = _unit(i, 4)
    ps = _set({"A": {"positive": ["a"]}, "B": {"positive": ["b"]}, "C": {"positive": ["c"]}}, mode="multiclass")
    images = F.normalize(torch.tensor([[0.9, 0.1, 0.0, 0.4]]), dim=-1)
    probs = classifier.class_probs(images, classifier.text_weights(enc, ps), "multiclass", 5.0)
    logits = 5.0 * images[0, :3]
    torch.testing.assert_close(probs[0], logits.softmax(-1))


def _embedded(n: int, rng, dim: int = 8):
    """Images near e0 (normal) or e1 (cardiomegaly) with labels; NaN label for a few uncertain ones."""
    normal = rng.random(n) < 0.5
    x = np.where(normal[:, None], np.eye(dim)[0], np.eye(dim)[1]) + 0.6 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = pd.DataFrame({"No Finding": normal.astype(float), "Cardiomegaly": (~normal).astype(float)},
                          index=pd.Index([f"k{i}" for i in range(n)], name="key"))
    labels.iloc[:3, 1] = -1.0  # uncertain: excluded under the default policy
    return Embedded(list(labels.index), x.astype(np.float32), labels, {}, "synthetic")


def test_no_finding_is_scored_with_the_right_sign(tmp_path):
    ps = load_prompt_set("chexpert14").subset(["No Finding", "Cardiomegaly"])
    enc = FakeEncoders(dim=8)
    for c in ps.classes:  # normal phrasings point at e0, finding phrasings at e1, "no X"/"normal" at e0
        for t in c.positive:
            enc.pinned[t] = _unit(0) if c.name == "No Finding" else _unit(1)
        for t in c.negative:
            enc.pinned[t] = _unit(1) if c.name == "No Finding" else _unit(0)
    emb = _embedded(300, np.random.default_rng(0))
    cfg = ZeroshotConfig(checkpoints=["fake"], data="x", bootstrap=50)
    res = evaluate([Checkpoint("fake", enc)], [emb], ps, cfg)
    assert res.metrics["classes"]["No Finding"]["auroc"] > 0.9  # normal studies score HIGH for No Finding
    assert res.metrics["classes"]["Cardiomegaly"]["auroc"] > 0.9
    assert res.metrics["classes"]["Cardiomegaly"]["n_excluded"] == 3


def test_no_finding_negatives_are_finding_prompts_not_negations():
    ps = load_prompt_set("chexpert14")
    nf = next(c for c in ps.classes if c.name == "No Finding")
    finding_positives = {p for c in ps.classes if c.name != "No Finding" for p in c.positive}
    assert nf.negative and set(nf.negative) <= finding_positives
    with pytest.raises(ConfigError, match="No Finding"):
        _set({"No Finding": {"positive": ["Normal chest radiograph."], "negative": ["No finding."]}})


def test_checkpoint_ensemble_averages_probabilities():
    ps = _set({"A": {"positive": ["a1", "a2"], "negative": ["n"]}, "B": {"positive": ["b"], "negative": ["m"]}})
    encs = [FakeEncoders(seed=1), FakeEncoders(seed=2)]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 8)).astype(np.float32)
    labels = pd.DataFrame({"A": rng.integers(0, 2, 20), "B": rng.integers(0, 2, 20)},
                          index=[f"k{i}" for i in range(20)])
    embs = [Embedded(list(labels.index), x / np.linalg.norm(x, axis=1, keepdims=True), labels)] * 2
    from radalign.zeroshot.evaluate import score

    both, _ = score([Checkpoint(str(i), e) for i, e in enumerate(encs)], embs, ps)
    singles = [score([Checkpoint("c", e)], embs[:1], ps)[0] for e in encs]
    np.testing.assert_allclose(both, (singles[0] + singles[1]) / 2, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Statistics.


def _brute_patient_ci(y, s, pids, n_boot, seed, level=0.95):
    """Independent patient bootstrap: the documented draws (patients in sorted id order, one
    default_rng(seed).integers(0, P, (n_boot, P)) call), rows rebuilt by repetition, NaN rows dropped, sklearn."""
    patients = sorted({str(p) for p in pids})
    rows_of = {p: [i for i, q in enumerate(pids) if str(q) == p] for p in patients}
    draws = np.random.default_rng(seed).integers(0, len(patients), size=(n_boot, len(patients)))
    vals = []
    for d in draws:
        rows = np.array([i for j in d for i in rows_of[patients[j]]])
        rows = rows[~np.isnan(y[rows])]
        yy = y[rows]
        vals.append(roc_auc_score(yy, s[rows]) if 0 < yy.sum() < len(yy) else np.nan)
    vals = np.array(vals)
    return tuple(np.percentile(vals[~np.isnan(vals)], [100 * (1 - level) / 2, 100 * (1 + level) / 2]))


def test_auroc_table_bootstrap_never_scores_excluded_rows():
    """600 rows, 30% uncertain (NaN) labels: a bootstrap that scores them as negatives gave [0.581, 0.681]
    around 0.768. The interval must equal an independent patient bootstrap over the included rows only."""
    rng = np.random.default_rng(0)
    n = 600
    y = (rng.random(n) < 0.4).astype(float)
    s = y * 1.1 + rng.standard_normal(n)
    y[rng.random(n) < 0.3] = np.nan
    s[np.isnan(y)] += 1.5  # uncertain rows score high: as negatives they would drag the AUROC down
    pids = [f"p{i // 3:03d}" for i in range(n)]  # 200 patients x 3 images
    t = rm.auroc_table(s[:, None], y[:, None], ["a"], n_boot=200, seed=4, patient_ids=pids)
    c = t["classes"]["a"]
    keep = ~np.isnan(y)
    assert c["auroc"] == pytest.approx(roc_auc_score(y[keep], s[keep]))
    assert (c["ci_low"], c["ci_high"]) == pytest.approx(_brute_patient_ci(y, s, pids, 200, 4), abs=1e-12)
    assert c["ci_low"] < c["auroc"] < c["ci_high"]
    assert t["macro"]["unit"] == "patient" and t["macro"]["n_units"] == 200


def test_auroc_table_resamples_patients_duplicates_change_nothing():
    s, y = _noisy(150, 5)
    pids = [i // 5 for i in range(150)]
    one = rm.auroc_table(s, y, list("abc"), n_boot=200, seed=1, patient_ids=pids)
    two = rm.auroc_table(np.r_[s, s], np.r_[y, y], list("abc"), n_boot=200, seed=1, patient_ids=pids + pids)
    for k in ("auroc", "ci_low", "ci_high"):
        assert two["macro"][k] == pytest.approx(one["macro"][k], abs=1e-12)
        assert two["classes"]["b"][k] == pytest.approx(one["classes"]["b"][k], abs=1e-12)
    no_ids = rm.auroc_table(s, y, list("abc"), n_boot=50, seed=1)
    assert no_ids["macro"]["unit"] == "image" and no_ids["macro"]["n_units"] == 150


def _noisy(n: int, seed: int, sep: float = 1.0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < 0.3).astype(float)
    return y * sep + rng.standard_normal((n, 3)), y


def test_bootstrap_ci_contains_point_is_seeded_and_narrows_with_n():
    names = ["a", "b", "c"]
    s, y = _noisy(300, 0)
    t1 = rm.auroc_table(s, y, names, n_boot=300, seed=7)
    t2 = rm.auroc_table(s, y, names, n_boot=300, seed=7)
    t3 = rm.auroc_table(s, y, names, n_boot=300, seed=8)
    assert t1 == t2
    assert t1["classes"]["a"]["ci_low"] != t3["classes"]["a"]["ci_low"]
    for part in [*t1["classes"].values(), t1["macro"]]:
        assert part["ci_low"] < part["auroc"] < part["ci_high"]
    assert t1["macro"]["auroc"] == pytest.approx(np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(3)]))
    s_big, y_big = _noisy(3000, 1)
    big = rm.auroc_table(s_big, y_big, names, n_boot=300, seed=7)
    width = lambda t: t["macro"]["ci_high"] - t["macro"]["ci_low"]  # noqa: E731
    assert width(big) < 0.6 * width(t1)  # ~1/sqrt(10) in theory


def test_bootstrap_counts_single_class_resamples_and_excluded_rows():
    s = np.arange(12, dtype=float)[:, None]
    y = np.zeros((12, 1))
    y[11] = 1
    y[0] = np.nan  # excluded
    t = rm.auroc_table(s, y, ["a"], n_boot=200, seed=0)
    c = t["classes"]["a"]
    assert (c["n_pos"], c["n_neg"], c["n_excluded"]) == (1, 10, 1)
    # P(row 11 never drawn in 12 draws) = (11/12)^12 ~ 0.35: those resamples have no positive and are skipped.
    assert 30 < c["skipped_resamples"] < 110
    one_class = rm.auroc_table(s, np.zeros((12, 1)), ["a"], n_boot=20, seed=0)
    assert one_class["classes"]["a"]["auroc"] is None and one_class["macro"]["auroc"] is None


def _brute_macro(y, s, pids, n_boot, seed, level=0.95):
    """Independent macro bootstrap (numpy + sklearn): the documented patient draws; per resample every class's
    AUROC over the drawn rows (NaN labels dropped); the macro mean only over resamples where EVERY class has
    both labels. Returns (interval, dropped, dropped per class, interval of the nanmean-over-the-rest rule)."""
    patients = sorted({str(p) for p in pids})
    rows_of = {p: [i for i, q in enumerate(pids) if str(q) == p] for p in patients}
    draws = np.random.default_rng(seed).integers(0, len(patients), size=(n_boot, len(patients)))
    per = np.full((n_boot, y.shape[1]), np.nan)
    for b, d in enumerate(draws):
        rows = np.array([i for j in d for i in rows_of[patients[j]]])
        for c in range(y.shape[1]):
            r = rows[~np.isnan(y[rows, c])]
            if 0 < y[r, c].sum() < len(r):
                per[b, c] = roc_auc_score(y[r, c], s[r, c])
    full = ~np.isnan(per).any(axis=1)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    ci = tuple(np.percentile(per[full].mean(axis=1), q))
    rest = tuple(np.percentile(np.nanmean(per, axis=1), q))
    by_class = {c: int(np.isnan(per[:, c]).sum()) for c in range(y.shape[1]) if np.isnan(per[:, c]).any()}
    return ci, int((~full).sum()), by_class, rest


def _planted_thin_class(n_pat=40, films=2, seed=0):
    """Classes a, b: common, well separated. Class c: positive in 3 patients only, and scored at random, so
    a resample without them has no c AUROC and the average over the rest (a and b) is much higher."""
    rng = np.random.default_rng(seed)
    pids = [f"p{i:02d}" for i in range(n_pat) for _ in range(films)]
    n = len(pids)
    y = np.zeros((n, 3))
    per_pat = rng.random((n_pat, 2)) < 0.4
    y[:, :2] = np.repeat(per_pat, films, axis=0)
    y[: 3 * films, 2] = 1.0  # patients p00..p02
    y[rng.random(n) < 0.1, 0] = np.nan  # some excluded labels too
    s = y * np.array([2.5, 2.5, 0.0]) + rng.standard_normal((n, 3))
    return s, y, pids


def test_macro_interval_drops_resamples_where_a_class_has_one_label_value():
    """Planted: a thin class (3 positive patients of 40) kept in the macro (min_per_label=1). The macro interval
    equals an independent bootstrap that drops every resample where a class is unscorable, counts them, and
    names the class; the silent rule (average over the classes that remain) gives another interval."""
    s, y, pids = _planted_thin_class()
    t = rm.auroc_table(s, y, list("abc"), n_boot=400, seed=3, patient_ids=pids, min_per_label=1)
    (lo, hi), dropped, by_class, rest = _brute_macro(y, s, pids, 400, 3)
    mac = t["macro"]
    assert mac["classes"] == ["a", "b", "c"]
    assert (mac["ci_low"], mac["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)
    assert mac["skipped_resamples"] == dropped and mac["skipped_by_class"] == {"c": by_class[2]}
    # (1 - 3/40)^40 ~ 4.4% of resamples draw none of the 3 patients
    assert 5 <= dropped <= 40
    assert max(abs(rest[0] - lo), abs(rest[1] - hi)) > 0.01  # the plant tells the two rules apart
    assert t["classes"]["c"]["skipped_resamples"] == by_class[2]
    keep = ~np.isnan(y)
    assert mac["auroc"] == pytest.approx(np.mean([roc_auc_score(y[keep[:, j], j], s[keep[:, j], j])
                                                   for j in range(3)]), abs=1e-12)


def test_macro_says_when_its_interval_is_conditional_on_a_thin_class():
    s, y, pids = _planted_thin_class(n_pat=40)
    y[2:6, 2] = 0.0  # class c: one positive patient (p00) of 40; ~36% of resamples miss it
    t = rm.auroc_table(s, y, list("abc"), n_boot=300, seed=0, patient_ids=pids, min_per_label=1)
    _, dropped, by_class, _ = _brute_macro(y, s, pids, 300, 0)
    mac = t["macro"]
    assert mac["skipped_resamples"] == dropped and 0.25 * 300 < dropped < 0.5 * 300
    assert f"{dropped} of 300 resamples dropped" in mac["note"] and f"(c ({by_class[2]}))" in mac["note"]
    assert "min_per_label" in mac["note"]
    # the subset macro without c drops nothing and says nothing
    sub = rm.auroc_table(s, y, list("abc"), n_boot=300, seed=0, patient_ids=pids, min_per_label=1,
                              macro_classes=["a", "b"])
    assert sub["macro"]["skipped_resamples"] == 0 and sub["macro"]["note"] == ""
    assert sub["macro_all"]["skipped_resamples"] == dropped
    # two thin classes: the note names the one that dropped more resamples first
    y2 = y.copy()
    y2[:, 1] = 0.0
    y2[10:16, 1] = 1.0  # class b: three positive patients (p05..p07), c keeps one
    two = rm.auroc_table(s, y2, list("abc"), n_boot=300, seed=0, patient_ids=pids, min_per_label=1)
    _, _, by2, _ = _brute_macro(y2, s, pids, 300, 0)
    assert by2[2] > by2[1] > 0 and two["macro"]["skipped_by_class"] == {"b": by2[1], "c": by2[2]}
    assert f"(c ({by2[2]}), b ({by2[1]}))" in two["macro"]["note"]
    # min_per_label (rows) above c's 2 positive films keeps it out of the macro up front
    thin = rm.auroc_table(s, y, list("abc"), n_boot=300, seed=0, patient_ids=pids, min_per_label=3)
    assert thin["macro"]["classes_too_few"] == ["c"] and thin["macro"]["skipped_resamples"] == 0


def test_min_per_label_keeps_thin_classes_out_of_the_macro_but_reports_them():
    s, y = _noisy(200, 3)
    y[:, 2] = 1.0
    y[:4, 2] = 0.0  # class "c": 196 positives, 4 negatives
    names = ["a", "b", "c"]
    t = rm.auroc_table(s, y, names, n_boot=50, seed=0, min_per_label=10)
    assert t["classes"]["c"]["auroc"] is not None  # its own AUROC is still reported
    assert t["macro"]["classes"] == ["a", "b"] and t["macro"]["classes_too_few"] == ["c"]
    assert t["macro"]["auroc"] == pytest.approx(np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(2)]))
    every = rm.auroc_table(s, y, names, n_boot=50, seed=0, min_per_label=1)
    assert every["macro"]["classes"] == names and every["macro"]["classes_too_few"] == []


def test_multiclass_metrics_against_sklearn():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    probs = rng.dirichlet(np.ones(4), 400) + 0.5 * np.eye(4)[y]
    probs /= probs.sum(1, keepdims=True)
    t = metrics.multiclass_table(probs, y, list("abcd"), n_boot=200, seed=0)
    pred = probs.argmax(1)
    assert t["accuracy"]["value"] == pytest.approx((pred == y).mean())
    assert t["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, pred))
    for k in ("accuracy", "balanced_accuracy"):
        assert t[k]["ci_low"] < t[k]["value"] < t[k]["ci_high"]
    assert sum(t["confusion"]["a"].values()) == int((y == 0).sum())


def test_thresholds_come_from_validation_only():
    rng = np.random.default_rng(0)
    s_val, y_val = _noisy(400, 2, sep=2.0)
    thr = metrics.choose_thresholds(s_val, y_val, ["a", "b", "c"])
    # The chosen threshold maximises Youden's J on validation: no other cut point does better there.
    for j, n in enumerate("abc"):
        def j_at(t, j=j):
            p = s_val[:, j] >= t
            return p[y_val[:, j] == 1].mean() - p[y_val[:, j] == 0].mean()
        assert all(j_at(thr[n]) >= j_at(t) - 1e-12 for t in rng.choice(s_val[:, j], 50))
    s_test, y_test = _noisy(200, 3, sep=2.0)
    tm = metrics.threshold_metrics(s_test, y_test, ["a", "b", "c"], thr)
    p = s_test[:, 0] >= thr["a"]
    assert tm["a"]["sensitivity"] == pytest.approx(p[y_test[:, 0] == 1].mean())
    assert tm["a"]["threshold"] == thr["a"]


def test_shuffled_label_control_is_near_chance():
    s, y = _noisy(2000, 4, sep=3.0)
    assert rm.shuffled_label_control(s, y, list("abc"), list("abc"), seed=0) == pytest.approx(0.5, abs=0.05)


def test_multiclass_intervals_against_a_brute_force_patient_bootstrap():
    """Accuracy and balanced accuracy resampled by patient, rebuilt by hand and scored with sklearn; a rare
    class missing from many resamples gives NaN recall there, averaged over the classes present (as sklearn),
    without numpy warnings."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(5)
    n = 120
    y = rng.choice(4, n, p=[0.45, 0.45, 0.07, 0.03])
    probs = rng.dirichlet(np.ones(4), n) + 0.6 * np.eye(4)[y]
    probs /= probs.sum(1, keepdims=True)
    pids = [f"p{i // 2:03d}" for i in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = metrics.multiclass_table(probs, y, list("abcd"), n_boot=150, seed=2, level=0.9, patient_ids=pids)
    pred = probs.argmax(1)
    accs, baccs = [], []
    patients = sorted(set(pids))
    for d in np.random.default_rng(2).integers(0, len(patients), size=(150, len(patients))):
        rows = np.concatenate([[2 * j, 2 * j + 1] for j in d])  # patient j owns rows 2j, 2j+1
        accs.append((pred[rows] == y[rows]).mean())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn: "y_pred contains classes not in y_true"
            baccs.append(balanced_accuracy_score(y[rows], pred[rows]))
    assert (t["accuracy"]["ci_low"], t["accuracy"]["ci_high"]) == pytest.approx(
        tuple(np.percentile(accs, [5, 95])), abs=1e-12)
    assert (t["balanced_accuracy"]["ci_low"], t["balanced_accuracy"]["ci_high"]) == pytest.approx(
        tuple(np.percentile(baccs, [5, 95])), abs=1e-12)
    assert (t["unit"], t["n_units"], t["level"], t["n_boot"], t["seed"]) == ("patient", 60, 0.9, 150, 2)
    assert t["n_per_class"] == {c: int((y == i).sum()) for i, c in enumerate("abcd")}
    assert t["confusion"]["c"]["a"] == int(((y == 2) & (pred == 0)).sum())


def test_multiclass_balanced_accuracy_with_a_single_image_class():
    """Class d has one image: in a resample that draws it once, its recall is 0 or 1 (weight 1 is a class
    present), never left out; checked against sklearn on the rebuilt resamples."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(11)
    y = np.r_[rng.integers(0, 3, 59), 3]
    probs = rng.dirichlet(np.ones(4), 60) + 0.8 * np.eye(4)[y]
    probs /= probs.sum(1, keepdims=True)
    t = metrics.multiclass_table(probs, y, list("abcd"), n_boot=200, seed=4)
    pred = probs.argmax(1)
    baccs = []
    units = sorted(str(i) for i in range(60))  # each image its own unit, ids in sorted str order ("0", "1", "10")
    for d in np.random.default_rng(4).integers(0, 60, size=(200, 60)):
        rows = [int(units[j]) for j in d]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            baccs.append(balanced_accuracy_score(y[rows], pred[rows]))
    assert (t["balanced_accuracy"]["ci_low"], t["balanced_accuracy"]["ci_high"]) == pytest.approx(
        tuple(np.percentile(baccs, [2.5, 97.5])), abs=1e-12)
    assert t["unit"] == "image"


def test_threshold_metrics_without_a_threshold_or_labels_is_none():
    s, y = _noisy(50, 10)
    y[:, 2] = np.nan  # class c: every label excluded
    got = metrics.threshold_metrics(s, y, list("abc"), {"a": 0.5, "b": None, "c": 0.1})
    assert got["b"] is None and got["c"] is None
    assert got["a"]["tp"] == int(((s[:, 0] >= 0.5) & (y[:, 0] == 1)).sum())


def test_a_class_without_auroc_does_not_stop_the_later_classes_bootstrap():
    s, y = _noisy(120, 6)
    y[:, 0] = 0.0  # class a: one label value, no AUROC
    t = rm.auroc_table(s, y, list("abc"), n_boot=100, patient_ids=list(range(120)))
    assert t["classes"]["a"]["auroc"] is None and t["classes"]["a"]["skipped_resamples"] == 100
    for j, name in ((1, "b"), (2, "c")):
        c = t["classes"][name]
        assert (c["ci_low"], c["ci_high"]) == pytest.approx(
            _brute_patient_ci(y[:, j], s[:, j], list(range(120)), 100, 0), abs=1e-12)  # default seed 0
    assert t["macro"]["classes"] == ["b", "c"] and t["macro"]["classes_without_auroc"] == ["a"]


def test_macro_without_a_usable_class_keeps_its_keys():
    s, y = _noisy(60, 7)
    y[:, 0], y[:, 1] = 0.0, 1.0
    y[:3, 1] = 0.0  # class b: 3 negatives only
    t = rm.auroc_table(s[:, :2], y[:, :2], ["a", "b"], n_boot=20, min_per_label=5)
    assert t["macro"] == {"auroc": None, "ci_low": None, "ci_high": None, "classes": [],
                          "classes_without_auroc": ["a"], "classes_too_few": ["b"], "skipped_resamples": 20,
                          "skipped_by_class": {}, "note": "", "n_boot": 20, "seed": 0, "level": 0.95,
                          "min_per_label": 5, "unit": "image", "n_units": 60}


def test_choose_thresholds_passes_the_rule_and_target():
    s, y = _noisy(300, 8, sep=1.5)
    thr = metrics.choose_thresholds(s, y, list("abc"), rule="sensitivity", target=0.9)
    for j, name in enumerate("abc"):
        sens = lambda c, j=j: ((s[:, j] >= c) & (y[:, j] == 1)).sum() / (y[:, j] == 1).sum()  # noqa: E731
        assert thr[name] == max(c for c in s[:, j] if sens(c) >= 0.9)  # the highest threshold keeping 90%
    spec = metrics.choose_thresholds(s, y, list("abc"), rule="specificity", target=0.8)
    for j, name in enumerate("abc"):
        sp = lambda c, j=j: ((s[:, j] < c) & (y[:, j] == 0)).sum() / (y[:, j] == 0).sum()  # noqa: E731
        assert spec[name] == min(c for c in s[:, j] if sp(c) >= 0.8)  # the lowest threshold keeping 80%


def test_shuffled_label_control_skips_a_class_with_one_label_value():
    s, y = _noisy(400, 9, sep=3.0)
    y[:, 2] = 0.0
    got = rm.shuffled_label_control(s, y, list("abc"), list("abc"), seed=1)
    only_ab = rm.shuffled_label_control(s, y, list("abc"), ["a", "b"], seed=1)
    assert got == pytest.approx(only_ab, abs=1e-12) and got == pytest.approx(0.5, abs=0.1)
    assert rm.shuffled_label_control(s, y, list("abc"), ["c"]) is None


def test_prompt_sensitivity_by_hand():
    y = np.array([[1.0], [0.0], [1.0], [0.0], [np.nan]])
    t1 = np.array([0.9, 0.1, 0.8, 0.2, 0.5])  # perfect: 1.0
    t2 = np.array([0.1, 0.9, 0.8, 0.2, 0.5])  # pairs (pos, neg): (0.1<0.9), (0.1<0.2), (0.8<0.9), (0.8>0.2): 0.25
    rows = metrics.prompt_sensitivity([[t1, t2]], y, ["a"], [["p1", "p2"]], {"a": 0.7})
    assert rows == [{"class": "a", "ensemble_auroc": 0.7,
                     "templates": [{"prompt": "p1", "auroc": 1.0}, {"prompt": "p2", "auroc": 0.25}],
                     "min": 0.25, "max": 1.0, "std": pytest.approx(0.375)}]


# ----------------------------------------------------------------------------------------------------------
# Label policy.


def test_label_policy_and_counts():
    raw = pd.DataFrame({"A": [1, 0, -1, None], "B": [-1, None, 1, 0]})
    np.testing.assert_array_equal(apply_label_policy(raw), [[1, np.nan], [0, np.nan], [np.nan, 1], [np.nan, 0]])
    np.testing.assert_array_equal(apply_label_policy(raw, "positive", "negative"), [[1, 1], [0, 0], [1, 1], [0, 0]])
    np.testing.assert_array_equal(apply_label_policy(raw, "negative", "exclude")[:, 0], [1, 0, 0, np.nan])
    assert label_counts(raw)["A"] == {"positive": 1, "negative": 1, "uncertain": 1, "blank": 1}


# ----------------------------------------------------------------------------------------------------------
# Prompt files and bad input.


@pytest.mark.parametrize("name", ["chexpert14", "competition5", "5x200"])
def test_builtin_prompt_sets_load(name):
    from radalign.data.labels import CHEXPERT_LABELS, COMPETITION_LABELS

    ps = load_prompt_set(name)
    want = CHEXPERT_LABELS if name == "chexpert14" else COMPETITION_LABELS
    assert sorted(ps.class_names) == sorted(want)
    assert all(len(c.positive) >= 3 for c in ps.classes)  # several phrasings per class


def test_bad_prompt_files_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"classes.Edema.positive: empty class"):
        _set({"Edema": {"positive": [], "negative": ["No edema."]}})
    with pytest.raises(ConfigError, match=r"classes.Edema.negative"):
        _set({"Edema": {"positive": ["Edema."]}})
    with pytest.raises(ConfigError, match=r"macro_classes: 'Foo'"):
        _set({"Edema": {"positive": ["Edema."], "negative": ["No edema."]}}, macro_classes=["Foo"])
    with pytest.raises(ConfigError, match="chexpert14"):
        load_prompt_set("chexpert41")
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump({"mode": "binary", "clases": {}}))
    with pytest.raises(ConfigError, match="did you mean 'classes'"):
        load_prompt_set(bad)


def test_prompt_class_missing_from_data_is_an_error():
    ps = _set({"Edema": {"positive": ["e"], "negative": ["n"]}, "Fracture": {"positive": ["f"], "negative": ["m"]}})
    emb = Embedded(["a", "b"], np.eye(8, dtype=np.float32)[:2], pd.DataFrame({"Edema": [1, 0]}, index=["a", "b"]))
    with pytest.raises(RadalignError, match=r"\['Fracture'\] that the data lacks"):
        evaluate([Checkpoint("c", FakeEncoders())], [emb], ps, ZeroshotConfig(bootstrap=5))


def test_data_class_missing_from_multiclass_prompts_is_an_error():
    ps = _set({"A": {"positive": ["a"]}, "B": {"positive": ["b"]}}, mode="multiclass")
    emb = Embedded(["x", "y"], np.eye(8, dtype=np.float32)[:2],
                   pd.DataFrame({"class": ["A", "Edema"]}, index=["x", "y"]))
    with pytest.raises(RadalignError, match=r"\['Edema'\] that prompt set 't'"):
        evaluate([Checkpoint("c", FakeEncoders())], [emb], ps, ZeroshotConfig(bootstrap=5))


def test_tokenizer_mismatch_names_the_checkpoint():
    ps = _set({"A": {"positive": ["a"], "negative": ["b"]}})
    enc = FakeEncoders(vocab=1000)
    enc.config["model_cfg"]["text_cfg"]["vocab_size"] = 10  # the tower embeds 10 ids; the tokenizer emits 1000
    with pytest.raises(RadalignError, match=r"--checkpoint runs/x.*tokenizer does not match"):
        classifier.text_weights(enc, ps, "--checkpoint runs/x")
    enc = FakeEncoders(ctx=12)
    enc.config["model_cfg"]["text_cfg"]["context_length"] = 77
    with pytest.raises(RadalignError, match="pads to 12 tokens"):
        classifier.text_weights(enc, ps, "ck")


# ----------------------------------------------------------------------------------------------------------
# CSV input end to end (fake encoders): outputs, skipped images, 5x200 multi-class.


def _write_csv_set(root, n: int = 40, seed: int = 0):
    """Bright images are 'Cardiomegaly' positives; plus one missing and one corrupt image."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        pos = i % 2
        arr = (rng.random((8, 8)) * 60 + (150 if pos else 40)).astype(np.uint8)
        Image.fromarray(arr, "L").save(root / f"img{i}.png")
        rows.append({"Path": f"img{i}.png", "Cardiomegaly": pos, "Edema": [1, 0, -1, None][i % 4],
                     "Sex": "F", "class": "Cardiomegaly" if pos else "Edema"})
    (root / "broken.png").write_bytes(b"not a png")
    rows += [{"Path": "broken.png", "Cardiomegaly": 1, "Edema": 0, "Sex": "M", "class": "Edema"},
             {"Path": "gone.png", "Cardiomegaly": 0, "Edema": 1, "Sex": "M", "class": "Edema"}]
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def _bright_encoder():
    """Image embedding direction tracks brightness; 'enlarged heart' prompts point the same way."""
    enc = FakeEncoders(dim=8)
    enc.proj = torch.zeros(3 * 64, 8)
    enc.proj[:, 0] = 1.0 / 192  # mean brightness -> e0
    enc.bias[1] = 0.5  # constant offset along e1, so brightness changes the angle
    return enc


def test_csv_end_to_end_outputs_and_skips(tmp_path):
    csv = _write_csv_set(tmp_path)
    enc = _bright_encoder()
    ps_file = tmp_path / "p.yaml"
    ps_file.write_text(yaml.safe_dump({"name": "card", "mode": "binary", "classes": {
        "Cardiomegaly": {"positive": ["big heart", "enlarged heart"], "negative": ["normal heart"]},
        "Edema": {"positive": ["edema"], "negative": ["no edema"]}}}))
    for t in ("big heart", "enlarged heart"):
        enc.pinned[t] = torch.tensor([1.0, 0.1, 0, 0, 0, 0, 0, 0])
    enc.pinned["normal heart"] = torch.tensor([0.0, 1.0, 0, 0, 0, 0, 0, 0])
    cfg = ZeroshotConfig(checkpoints=["fake"], data=str(csv), prompts=[str(ps_file)], out=str(tmp_path / "out"),
                         bootstrap=100)
    res = run_zeroshot(cfg, checkpoints=[Checkpoint("fake", enc)])["card"]
    out = tmp_path / "out"
    m = json.loads((out / "metrics.json").read_text())
    assert m == json.loads(json.dumps(res, default=str))
    assert m["data"]["skipped"] == {"missing_image": 1, "unreadable_image": 1}
    assert m["data"]["n_images"] == 40
    card = m["classes"]["Cardiomegaly"]
    assert card["auroc"] == pytest.approx(1.0) and (card["n_pos"], card["n_neg"]) == (20, 20)
    assert m["classes"]["Edema"]["n_excluded"] == 20  # -1 and blank rows, excluded and counted
    assert m["label_counts"]["Edema"] == {"positive": 10, "negative": 10, "uncertain": 10, "blank": 10}
    assert m["labels_without_prompts"] == []
    assert m["threshold_metrics"]["available"] is False
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == 40 and {"key", "score:Cardiomegaly", "label:Edema"} <= set(preds.columns)
    assert preds["label:Edema"].isna().sum() == 20
    assert roc_auc_score(preds["label:Cardiomegaly"], preds["score:Cardiomegaly"]) == pytest.approx(card["auroc"])
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "metrics.md").read_text()
    assert "| Cardiomegaly | 1.000 |" in md and "Prompt sensitivity" in md
    sens = {r["class"]: r for r in m["prompt_sensitivity"]}
    assert [t["prompt"] for t in sens["Cardiomegaly"]["templates"]] == ["big heart", "enlarged heart"]
    assert list((out / "cache").glob("emb-*.npz"))  # embeddings cached; a rerun reads them
    again = run_zeroshot(cfg, checkpoints=[Checkpoint("fake", enc)])["card"]
    assert again["classes"] == res["classes"]


def test_csv_multiclass_from_class_column(tmp_path):
    csv = _write_csv_set(tmp_path)
    enc = _bright_encoder()
    enc.pinned["bright"] = torch.tensor([1.0, 0.1, 0, 0, 0, 0, 0, 0])
    enc.pinned["dark"] = torch.tensor([0.0, 1.0, 0, 0, 0, 0, 0, 0])
    ps_file = tmp_path / "mc.yaml"
    ps_file.write_text(yaml.safe_dump({"name": "mc", "mode": "multiclass", "classes": {
        "Cardiomegaly": {"positive": ["bright"]}, "Edema": {"positive": ["dark"]}}}))
    cfg = ZeroshotConfig(checkpoints=["f"], data=str(csv), prompts=[str(ps_file)], out=str(tmp_path / "o"),
                         bootstrap=50, cache=False)
    m = run_zeroshot(cfg, checkpoints=[Checkpoint("f", enc)])["mc"]
    assert m["multiclass"]["accuracy"]["value"] == pytest.approx(1.0)
    assert m["multiclass"]["n_per_class"] == {"Cardiomegaly": 20, "Edema": 20}
    preds = pd.read_csv(tmp_path / "o" / "predictions.csv")
    assert (preds["true_class"] == preds["pred_class"]).all()


def test_config_rejects_thresholds_on_the_test_split():
    problems = ZeroshotConfig(checkpoints=["a"], data="d", val_split="test").validate()
    assert any("never from the test split" in p for p in problems)
    with pytest.raises(ConfigError, match="uncertain"):
        run_zeroshot(ZeroshotConfig(checkpoints=["a"], data="d", uncertain="maybe"))


def test_evaluating_1000_images_takes_seconds():
    import time

    ps = load_prompt_set("chexpert14")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 8)).astype(np.float32)
    labels = pd.DataFrame(rng.choice([1.0, 0.0, -1.0, np.nan], (1000, 14)), columns=ps.class_names,
                          index=[f"k{i}" for i in range(1000)])
    emb = Embedded(list(labels.index), x / np.linalg.norm(x, axis=1, keepdims=True), labels)
    t0 = time.perf_counter()
    res = evaluate([Checkpoint("f", FakeEncoders())], [emb], ps, ZeroshotConfig(bootstrap=1000))
    assert time.perf_counter() - t0 < 10.0
    assert res.metrics["macro_all"]["auroc"] == pytest.approx(0.5, abs=0.06)  # random embeddings: chance


def test_csv_reader_rescales_a_12_bit_png_instead_of_clipping_it_white(tmp_path):
    """A 12-bit radiograph (0..4095 in a 16-bit PNG): convert("L") before the transform clipped it ~94% white.
    The reader goes through data.images, so the pixels equal an independent min..max rescale."""
    from PIL import Image
    from radalign.zeroshot.inputs import _CsvImages

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 4096, (32, 40)).astype(np.uint16)
    arr[0, 0], arr[0, 1] = 0, 4095
    Image.fromarray(arr).save(tmp_path / "x.png")  # mode I;16
    ds = _CsvImages([tmp_path / "x.png"], lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)))
    _, x, reason = ds[0]
    assert reason is None
    want = np.rint(arr.astype(np.float64) / 4095 * 255)
    assert np.abs(x.numpy() - want).max() <= 1
    assert (x.numpy() >= 254).mean() < 0.05  # not white
    too_big = _CsvImages([tmp_path / "x.png"], lambda im: im, max_pixels=100)
    assert too_big[0][2] == "oversized_image"


def test_csv_patients_from_column_or_chexpert_path():
    from radalign.zeroshot.inputs import csv_patients

    df = pd.DataFrame({"Path": ["train/patient00001/study1/view1_frontal.jpg",
                                "train/patient00001/study2/view1_frontal.jpg", "train/patient00002/s/v.jpg"]})
    assert csv_patients(df, "Path") == (["patient00001", "patient00001", "patient00002"],
                                        "patientNNN in the image path")
    df["subject_id"] = [7, 8, 8]
    assert csv_patients(df, "Path")[0] == ["7", "8", "8"]
    assert csv_patients(pd.DataFrame({"Path": ["a.png", "b.png"]}), "Path") == (None, "")


def test_zeroshot_locks_its_out_folder(tmp_path):
    import fcntl
    import os

    from radalign.lock import lock_file

    csv = _write_csv_set(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(lock_file(out), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another writer holds it
    try:
        with pytest.raises(RadalignError, match="in use by another process"):
            run_zeroshot(ZeroshotConfig(checkpoints=["f"], data=str(csv), out=str(out), bootstrap=5),
                         checkpoints=[Checkpoint("f", _bright_encoder())])
    finally:
        os.close(fd)
    assert not list(out.iterdir())  # nothing written


def test_markdown_report_escapes_text_and_states_the_unit():
    from radalign.zeroshot.report import markdown

    m = {"prompt_set": "<b>x</b>", "mode": "binary", "data": {"source": "a|b", "n_images": 4, "n_scored": 4,
                                                               "skipped": {}},
         "checkpoints": [{"checksum": "c" * 64}], "label_policy": {"uncertain": "exclude", "blank": "exclude"},
         "classes": {"<script>": {"auroc": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n_pos": 2, "n_neg": 2,
                                  "n_excluded": 0}},
         "macro": {"auroc": 0.5, "ci_low": 0.4, "ci_high": 0.6, "classes": ["<script>"], "level": 0.95,
                   "n_boot": 10, "seed": 0, "unit": "patient", "n_units": 3},
         "macro_all": {"auroc": 0.5, "ci_low": 0.4, "ci_high": 0.6},
         "threshold_metrics": {"available": False, "reason": "none"}, "prompt_sensitivity": []}
    md = markdown(m)
    assert "<script>" not in md and "<b>" not in md and "&lt;script&gt;" in md and "a\\|b" in md
    assert "95% percentile bootstrap over patients (3 patients, 4 images" in md

def test_prompt_longer_than_the_context_warns_with_lengths(embed_log):
    ps = _set({"A": {"positive": ["word " * 30], "negative": ["short negative"]}})
    classifier.text_weights(FakeEncoders(ctx=12), ps, "--checkpoint c")
    assert "149 characters" in "\n".join(embed_log) and "12 tokens" in "\n".join(embed_log)
    embed_log.clear()
    classifier.text_weights(FakeEncoders(ctx=12), _set({"A": {"positive": ["a b"], "negative": ["c"]}}))
    assert "tokens" not in "\n".join(embed_log)

"""Pretraining validation's quick zero-shot check goes through the encoders' prompt classifier
(`pretrain.classifier`) and the label policy of `data.labels`; its numbers are checked against a brute-force
numpy + sklearn computation of the documented rule (per finding: softmax over [s*cos(x, pos), s*cos(x, neg)];
uncertain -1 and blank labels left out; macro = mean over findings with both label values)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from radalign.pretrain.validation import QUICK_PROMPT_SET, QUICK_PROMPTS, zero_shot_auroc
from sklearn.metrics import roc_auc_score

NAMES = list(QUICK_PROMPTS)
PROMPTS = [p for n in NAMES for p in QUICK_PROMPTS[n]]  # pos, neg of each finding in turn
D = 16


class TextModel(torch.nn.Module):
    """model(text=ids [N, 1]) -> text_features: a fixed random (unnormalised) vector per prompt."""

    def __init__(self, scale: float = 7.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(len(PROMPTS) + 1, D, generator=g) * 3.0  # row 0: any other text
        self.logit_scale = torch.nn.Parameter(torch.tensor([math.log(scale)]))

    def forward(self, text):
        return {"text_features": self.table[text[:, 0]]}


def tokenize(prompts):
    return torch.tensor([[PROMPTS.index(p) + 1 if p in PROMPTS else 0] for p in prompts], dtype=torch.long)


def _case(n: int = 160, seed: int = 1):
    """Image embeddings that lean toward each finding's positive prompt when positive, and raw labels with
    1 / 0 / -1 / missing, so the label policy matters."""
    rng = np.random.default_rng(seed)
    text = F.normalize(TextModel().table[1:], dim=-1).numpy()  # [2C, D]
    y = rng.choice([1.0, 0.0, -1.0, np.nan], size=(n, len(NAMES)), p=[0.35, 0.4, 0.15, 0.1])
    x = rng.normal(size=(n, D))
    for c in range(len(NAMES)):
        x += np.where(y[:, c:c + 1] == 1, 1.2, 0.0) * text[2 * c] + np.where(y[:, c:c + 1] == -1, 1.5, 0.0) * text[2 * c + 1]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = [{name: y[i, c] for c, name in enumerate(NAMES) if not np.isnan(y[i, c])} for i in range(n)]
    return torch.from_numpy(x.astype(np.float32)), labels, y


def _brute_force(img: np.ndarray, y: np.ndarray, scale: float) -> dict:
    t = TextModel().table[1:].numpy().astype(np.float64)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    out, aucs = {}, []
    for c, name in enumerate(NAMES):
        lp, ln = scale * img @ t[2 * c], scale * img @ t[2 * c + 1]  # [N] each
        p = 1.0 / (1.0 + np.exp(ln - lp))  # softmax([lp, ln])[0]
        keep = (y[:, c] == 0) | (y[:, c] == 1)  # uncertain (-1) and blank left out
        if 0 < y[keep, c].sum() < keep.sum():
            out[f"auroc/{name}"] = roc_auc_score(y[keep, c], p[keep])
            aucs.append(out[f"auroc/{name}"])
    out["zeroshot_macro_auroc"] = float(np.mean(aucs))
    return out


@pytest.mark.parametrize("scale", [None, 3.0])
def test_quick_zero_shot_matches_brute_force(scale):
    """Per finding and macro, with the model's learned scale (7) or a given one (scales that do not saturate
    float32: the AUROC of a 2-prompt softmax does not depend on the scale otherwise; the saturation case is
    test_pretrain's). Kills a positive/negative swap, a prompt paired with the wrong finding, uncertain or blank
    scored as negative."""
    img, labels, y = _case()
    got = zero_shot_auroc({"img": img, "labels": labels}, TextModel(), tokenize, logit_scale=scale)
    want = _brute_force(img.numpy().astype(np.float64), y, 7.0 if scale is None else scale)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k
    assert 0.6 < got["zeroshot_macro_auroc"] < 1.0  # the case is informative, not a chance-level tie


def test_quick_zero_shot_leaves_out_a_finding_with_one_label_value():
    img, labels, y = _case()
    for lab in labels:
        lab["Edema"] = 0  # no positive left for Edema
    got = zero_shot_auroc({"img": img, "labels": labels}, TextModel(), tokenize)
    assert "auroc/Edema" not in got
    y[:, NAMES.index("Edema")] = 0.0
    want = _brute_force(img.numpy().astype(np.float64), y, 7.0)
    assert got["zeroshot_macro_auroc"] == pytest.approx(want["zeroshot_macro_auroc"], abs=1e-6)
    assert len([k for k in got if k.startswith("auroc/")]) == len(NAMES) - 1


def test_quick_prompt_set_is_validations_own_data():
    """The validation prompts stay validation's data, as a binary prompt set of the one loader's type."""
    assert QUICK_PROMPT_SET.mode == "binary" and QUICK_PROMPT_SET.class_names == NAMES
    assert [(c.positive, c.negative) for c in QUICK_PROMPT_SET.classes] == [((p,), (n,)) for p, n in
                                                                             QUICK_PROMPTS.values()]

"""Few-shot protocol: draws by patient, seeded, disjoint from validation/test, written with sha256; the
prompt-initialised head is exactly zero-shot at k=0."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from finetune.fewshot import (
    check_disjoint,
    draw_k_per_class,
    prompt_init,
    prompt_init_method,
    read_draw,
    run_sweep,
    summarise,
    write_draw,
    write_sweep,
)
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
    assert draw_k_per_class(y, pats, ids, 4, seed=4).sha256 != d.sha256
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


def test_prompt_head_at_k0_is_zero_shot():
    from zeroshot.classifier import binary_probs

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tp, tn = rng.normal(size=8), rng.normal(size=8)
    w0, b0 = prompt_init(tp, tn, 50.0)
    s = prompt_init_method(x, x, w0, b0)(np.array([], int), np.array([]), 0)
    norm = lambda v: torch.tensor(v / np.linalg.norm(v))[None].float()  # noqa: E731
    ref = binary_probs(torch.tensor(x).float(), norm(tp), norm(tn), 50.0)[:, 0].numpy()
    assert np.allclose(1 / (1 + np.exp(-s)), ref, atol=1e-5)


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
    res = run_sweep(prompt_init_method(x[:300], x[ev], w0, b0, l2=1.0), y[:300], pats[:300], ids[:300],
                    eval_y=y[ev], ks=(1, 2, 4), seeds=range(5), method_name="prompt_init")
    assert [r["k"] for r in res.per_draw] == [1] * 5 + [2] * 5 + [4] * 5
    write_sweep(tmp_path, res)
    assert (tmp_path / "learning_curve-prompt_init.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "draws").glob("*.json"))) == 15

"""`radalign retrieval classify`: the similarity-weighted k-NN vote, its filters, its temperature, its table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from radalign.retrieval import classify as kc
from radalign.retrieval.build import EmbeddedCases
from radalign.retrieval.search import Retriever

from radalign import RadalignError
from tests.conftest import nearest_other_patients
from tests.test_retrieval import FakeEncoders, _write

NAN = float("nan")


def _unit_with_cos(cos: list[float], d: int = 8) -> np.ndarray:
    """Rows with cosine `cos[i]` to e0, each rotated into its own axis so no two rows tie. [N, d]."""
    x = np.zeros((len(cos), d), dtype=np.float32)
    for i, c in enumerate(cos):
        x[i, 0], x[i, 1 + i % (d - 1)] = c, math.sqrt(1 - c * c)
    return x


def _cases(x: np.ndarray, subjects, labels: dict[str, list] | None = None, studies=None) -> EmbeddedCases:
    n = len(x)
    studies = studies or [f"q{i}" for i in range(n)]
    meta = [{"subject_id": str(subjects[i]), "study_id": str(studies[i]),
             "labels": {name: v[i] for name, v in (labels or {}).items() if not np.isnan(v[i])}} for i in range(n)]
    return EmbeddedCases(image=np.asarray(x, dtype=np.float32), keys=[f"key{i}" for i in range(n)], meta=meta,
                         texts=[""] * n)


@pytest.fixture
def planted(tmp_path):
    """Six cases; cosine to the query e0: 0.9 (the query's own patient), 0.8 and 0.79 (one study of s1),
    0.6, 0.3, -0.5."""
    x = _unit_with_cos([0.9, 0.8, 0.79, 0.6, 0.3, -0.5])
    labels = {"Cardiomegaly": [1, 1, 0, 0, 1, 0], "Pleural Effusion": [1, -1, 1, 1, NAN, 0]}
    idx, _ = _write(tmp_path, x, studies=["t0", "t1", "t1", "t3", "t4", "t5"],
                    subjects=["P", "s1", "s1", "s2", "s3", "s4"], labels=labels)
    return Retriever.load(idx, encoders=FakeEncoders(dim=8))


def test_vote_equals_a_hand_computed_reference(planted):
    q = np.eye(8, dtype=np.float32)[:1]
    nb = kc.neighbours(planted, q, ["P"], k=3)
    # Row 0 is the query's patient, row 2 a second image of row 1's study: the three cases are rows 1, 3, 4.
    assert nb.rows.tolist() == [[1, 3, 4]] and nb.sims[0] == pytest.approx([0.8, 0.6, 0.3], abs=1e-6)
    assert nb.filtered == {"same_patient": 1, "same_study": 1}
    names = planted.store.labels
    c, e = names.index("Cardiomegaly"), names.index("Pleural Effusion")
    prior = np.zeros(len(names))
    # T = 0.1: weights e^8, e^6, e^3 over their sum S. Cardiomegaly: rows 1 and 4 carry it -> (e^8 + e^3) / S.
    # Effusion: row 3 carries it; row 1 is uncertain (-1) and votes only with uncertain="positive".
    p = kc.vote(nb.sims, kc.neighbour_votes(planted.store.label_matrix(), nb), nb.valid, 0.1, prior)
    assert p[0, c] == pytest.approx(0.8815003, abs=1e-6) and p[0, e] == pytest.approx(0.1184997, abs=1e-6)
    p = kc.vote(nb.sims, kc.neighbour_votes(planted.store.label_matrix(), nb, "positive"), nb.valid, 0.1, prior)
    assert p[0, e] == pytest.approx(0.9941002, abs=1e-6)
    # T -> large: the plain share of neighbours (2 of 3 carry Cardiomegaly)
    p = kc.vote(nb.sims, kc.neighbour_votes(planted.store.label_matrix(), nb), nb.valid, 1e6, prior)
    assert p[0, c] == pytest.approx(2 / 3, abs=1e-5)


def test_same_patient_neighbours_are_left_out(planted):
    q = np.eye(8, dtype=np.float32)[:1]
    # The query belongs to s1: rows 1 and 2 (its two images) go, and so does nothing else.
    nb = kc.neighbours(planted, q, ["s1"], k=4)
    assert nb.rows.tolist() == [[0, 3, 4, 5]] and nb.filtered["same_patient"] == 2
    # A query whose patient owns every case gets no neighbour, and the vote falls back on the prior.
    lone = kc.Neighbours(np.full((1, 2), -1), np.zeros((1, 2), np.float32), np.zeros((1, 2), bool), {})
    votes = kc.neighbour_votes(planted.store.label_matrix(), lone)
    prior = np.linspace(0, 1, len(planted.store.labels))
    assert kc.vote(lone.sims, votes, lone.valid, 0.07, prior)[0] == pytest.approx(prior)


def test_same_patient_exclusion_equals_brute_force(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((120, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    subjects = [f"p{i % 30}" for i in range(120)]  # 4 images (4 studies) per patient
    idx, _ = _write(tmp_path, x, subjects=subjects)
    r = Retriever.load(idx, encoders=FakeEncoders(dim=16))
    q = x[:10] + 0.05 * rng.standard_normal((10, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    nb = kc.neighbours(r, q, subjects[:10], k=7)
    for i in range(10):
        others = [j for j in np.argsort(-(x @ q[i]), kind="stable") if subjects[j] != subjects[i]]
        assert nb.rows[i].tolist() == others[:7]
    assert nb.filtered["same_patient"] > 0


def _informative(n, labels_names, rng, signal=1.0, noise=0.25, d=32):
    """Embeddings that encode their labels: sum of one direction per positive label plus noise."""
    y = (rng.random((n, len(labels_names))) < 0.35).astype(float)  # [n, L]
    x = y @ np.eye(len(labels_names), d) * signal + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


LABELS = ["Cardiomegaly", "Edema", "Pleural Effusion"]


@pytest.fixture
def informative_index(tmp_path):
    rng = np.random.default_rng(0)
    x, y = _informative(400, LABELS, rng)
    idx, _ = _write(tmp_path, x, subjects=[f"train{i // 2}" for i in range(400)],
                    labels={n: y[:, j] for j, n in enumerate(LABELS)})
    return Retriever.load(idx, encoders=FakeEncoders(dim=32)), rng


def test_informative_embeddings_give_auroc_near_1_and_shuffled_about_half(informative_index, tmp_path):
    r, rng = informative_index
    xq, yq = _informative(300, LABELS, rng)
    subjects = [f"test{i // 3}" for i in range(300)]  # 3 images per patient: the bootstrap unit is 100 patients
    kw = dict(n_boot=200, min_per_label=1, macro_classes=LABELS)
    m = kc.classify_embedded(r, _cases(xq, subjects, {n: yq[:, j] for j, n in enumerate(LABELS)}), **kw)
    mac = m["retrieval"]["macro"]
    assert mac["classes"] == LABELS and mac["auroc"] > 0.97
    assert mac["ci_low"] <= mac["auroc"] <= mac["ci_high"]
    assert m["bootstrap"]["unit"] == "patient" and m["bootstrap"]["n_units"] == 100
    assert abs(m["controls"]["shuffled_labels_macro_auroc"] - 0.5) < 0.1
    assert m["method"]["temperature"] == kc.DEFAULT_TEMPERATURE and m["method"]["k"] == kc.DEFAULT_K
    # the same embeddings with each label column permuted across queries: no information left
    shuffled = {n: rng.permutation(yq[:, j]) for j, n in enumerate(LABELS)}
    m = kc.classify_embedded(r, _cases(xq, subjects, shuffled), **kw)
    assert abs(m["retrieval"]["macro"]["auroc"] - 0.5) < 0.08
    # labels never given to the queries are excluded, not scored as negatives (the zero-shot policy) ...
    assert m["retrieval"]["classes"]["Atelectasis"]["auroc"] is None
    assert m["retrieval"]["classes"]["Atelectasis"]["n_excluded"] == 300


def test_blank_negative_scores_blank_query_labels_as_negatives(informative_index):
    r, rng = informative_index
    xq, yq = _informative(60, LABELS, rng)
    given = {n: np.where(yq[:, j] == 1, 1.0, NAN) for j, n in enumerate(LABELS)}  # negatives left blank
    cases = _cases(xq, [f"t{i}" for i in range(60)], given)
    excl = kc.classify_embedded(r, cases, n_boot=20, min_per_label=1)
    neg = kc.classify_embedded(r, cases, n_boot=20, min_per_label=1, blank="negative")
    c = "Edema"
    assert excl["retrieval"]["classes"][c]["auroc"] is None  # only positives: nothing to rank
    assert neg["retrieval"]["classes"][c]["n_neg"] == int((yq[:, 1] == 0).sum()) > 0
    assert neg["retrieval"]["classes"][c]["auroc"] > 0.9


def test_temperature_fit_follows_the_validation_evidence():
    sims = np.array([[0.9, 0.86, 0.85]] * 20, dtype=np.float32)  # [Q, k]; close, so no T saturates the vote
    valid = np.ones((20, 3), bool)
    y = (np.arange(20) % 2).astype(float)[:, None]  # [Q, 1]
    prior = np.array([0.5])
    right_first = np.stack([y, 1 - y, 1 - y], axis=1)  # [Q, k, 1]: only the nearest neighbour is right
    wrong_first = np.stack([1 - y, y, y], axis=1)  # only the farther two are right
    sharp = kc.fit_temperature(sims, right_first, valid, y, prior)
    smooth = kc.fit_temperature(sims, wrong_first, valid, y, prior)
    assert sharp["temperature"] == min(kc.TEMPERATURE_GRID) and smooth["temperature"] == max(kc.TEMPERATURE_GRID)
    assert len(sharp["grid"]) == len(kc.TEMPERATURE_GRID)
    best = min(sharp["grid"], key=lambda g: g["log_loss"])
    assert best["temperature"] == sharp["temperature"]


def test_temperature_is_fitted_on_validation_never_on_the_scored_queries(informative_index):
    r, rng = informative_index
    xv, yv = _informative(100, LABELS, rng)
    xq, yq = _informative(80, LABELS, rng)
    val = _cases(xv, [f"v{i}" for i in range(100)], {n: yv[:, j] for j, n in enumerate(LABELS)})
    temps = []
    for flip in (False, True):  # the scored queries' labels change; the fitted temperature must not
        yy = 1 - yq if flip else yq
        m = kc.classify_embedded(r, _cases(xq, [f"q{i}" for i in range(80)], {n: yy[:, j] for j, n in
                                                                              enumerate(LABELS)}),
                                 val, val_split="validate", n_boot=20, min_per_label=1)
        temps.append(m["method"]["temperature"])
        assert m["method"]["temperature_fit"]["split"] == "validate"
        assert m["method"]["temperature_source"] == "fitted on split validate"
    assert temps[0] == temps[1] in kc.TEMPERATURE_GRID
    with pytest.raises(RadalignError, match="--val-split test: the scored split itself"):
        kc.classify(r, "unused", "test", val_split="test")
    with pytest.raises(RadalignError, match="give one"):
        kc.classify(r, "unused", "test", val_split="validate", temperature=0.1)


def test_bad_options_are_refused_before_any_work(informative_index):
    r, _ = informative_index
    for kw, msg in (({"k": 0}, "--k 0"), ({"k": 401}, "--k 401: larger than the index"),
                    ({"temperature": 0.0}, "--temperature 0.0"), ({"classes": ["Nope"]}, r"--classes \['Nope'\]")):
        kw = {"macro_classes" if k == "classes" else k: v for k, v in kw.items()}
        with pytest.raises(RadalignError, match=msg):
            kc.classify(r, "no/such/shards", "test", **kw)


def test_paired_comparison_macro_is_the_mean_of_the_labels(informative_index):
    r, rng = informative_index
    _, y = _informative(150, LABELS, rng)
    good = y + 0.3 * rng.standard_normal(y.shape)
    bad = rng.random(y.shape)
    patients = [f"p{i // 2}" for i in range(150)]
    out = kc.compare(good, bad, y, LABELS, LABELS, patients, n_boot=200, seed=0, level=0.95)
    deltas = [out["classes"][n]["delta"] for n in LABELS]
    assert out["macro"]["delta"] == pytest.approx(np.mean(deltas), abs=1e-12)
    assert out["macro"]["ci_low"] > 0 and out["macro"]["unit"] == "patient"  # the better scorer wins, clearly


def test_markdown_escapes_text(informative_index):
    r, rng = informative_index
    xq, yq = _informative(40, LABELS, rng)
    m = kc.classify_embedded(r, _cases(xq, [f"q{i}" for i in range(40)], {n: yq[:, j] for j, n in
                                                                          enumerate(LABELS)}),
                             n_boot=10, min_per_label=1, source="<script>alert(1)</script>|x")
    text = kc.markdown(m)
    assert "<script>" not in text and "&lt;script&gt;" in text and "\\|x" in text
    assert "| label | n\\_pos | n\\_neg | k-NN vote AUROC |" in text and "over patients (40 patients" in text


def test_cli_defaults_are_the_library_defaults():
    from radalign.retrieval import cli

    assert (cli.DEFAULT_K, cli.DEFAULT_TEMPERATURE) == (kc.DEFAULT_K, kc.DEFAULT_TEMPERATURE)


# ----------------------------------------------------------------------------------------------------------
# End to end on the synthetic shards and the tiny export.


def _read_split(shards, split):
    """(keys, metas) of a split straight from the tar files (independent of data.loader)."""
    import tarfile

    keys, metas = [], []
    for tar_path in sorted((shards / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    keys.append(m.name[:-5])
                    metas.append(json.loads(tar.extractfile(m).read()))
    return keys, metas


def test_cli_end_to_end_beside_zero_shot(tiny_export, synth_shards, tmp_path, capsys):
    from radalign.retrieval.store import IndexStore

    from radalign.cli import main

    idx, out = tmp_path / "index", tmp_path / "classify"
    assert main(["retrieval", "build", "--export", str(tiny_export), "--shards", str(synth_shards), "--split",
                 "train", "--out", str(idx), "--thumbnail-size", "0", "--batch-size", "32"]) == 0
    assert main(["retrieval", "classify", "--index-dir", str(idx), "--shards", str(synth_shards), "--split", "test",
                 "--k", "5", "--val-split", "validate", "--prompts", "chexpert14", "--bootstrap", "50",
                 "--min-per-label", "1", "--out", str(out), "--batch-size", "32"]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    keys, metas = _read_split(synth_shards, "test")
    assert m["queries"]["images"] == len(keys) and m["queries"]["lost"] == {}
    assert m["method"]["temperature_fit"]["split"] == "validate" and m["method"]["k"] == 5
    assert m["bootstrap"]["unit"] == "patient"
    assert m["bootstrap"]["n_units"] == len({str(x["subject_id"]) for x in metas})
    # the paired difference is vote - zero-shot, label by label
    for name, d in m["comparison"]["classes"].items():
        if d is not None:
            assert d["delta"] == pytest.approx(m["retrieval"]["classes"][name]["auroc"]
                                               - m["zeroshot"]["classes"][name]["auroc"], abs=1e-9)
    assert "zero-shot (chexpert14)" in printed and "over patients" in printed
    table = (out / "metrics.md").read_text()
    assert "| label | n\\_pos | n\\_neg | k-NN vote AUROC | zero-shot AUROC | Δ AUROC |" in table
    # brute force: each query's vote from the stored vectors, in numpy
    import pandas as pd

    preds = pd.read_csv(out / "predictions.csv").set_index("key")
    store = IndexStore.load(idx)
    x, subj, stud = np.asarray(store.vectors["image"]), store.column("subject_id"), store.column("study_id")
    carries = store.label_matrix() == 1
    t = m["method"]["temperature"]
    import torch
    from PIL import Image
    from radalign.pretrain.export import load_encoders

    enc = load_encoders(tiny_export)

    tf = enc.image_transform()
    for key, meta in list(zip(keys, metas))[:6]:
        img = _image(synth_shards, key)
        with torch.no_grad():
            q = enc.encode_images(tf(Image.open(img).convert("L"))[None]).numpy()[0]
        q /= np.linalg.norm(q)
        rows = nearest_other_patients(x, q, subj, stud, str(meta["subject_id"]), 5)
        w = np.exp((x[rows] @ q) / t)
        p = (w[:, None] * carries[rows]).sum(0) / w.sum()
        for li, name in enumerate(store.labels):
            assert preds.loc[key, f"score:{name}"] == pytest.approx(p[li], abs=2e-4)


def _image(shards, key):
    import io
    import tarfile

    for tar_path in sorted((shards / "test").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
            if key + ".jpg" in names:
                return io.BytesIO(tar.extractfile(key + ".jpg").read())
    raise KeyError(key)


def test_an_index_of_other_encoders_is_refused_naming_both_checksums(tmp_path, tiny_export):
    from radalign.pretrain.export import load_encoders

    x = _unit_with_cos([0.9, 0.5, 0.1], d=int(load_encoders(tiny_export).embed_dim))
    idx, _ = _write(tmp_path, x, enc=FakeEncoders(dim=x.shape[1], checksum="b" * 64))
    r = Retriever.load(idx, checkpoint=tiny_export)
    want = load_encoders(tiny_export).checksum[:12]
    with pytest.raises(RadalignError, match=f"built with encoder checksum {'b' * 12}.*{want}"):
        kc.classify(r, "unused", "test", k=2)

"""Retrieval: exact and approximate FAISS search, the index folder, case filters, explanations, bad input."""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from radalign.retrieval import index as ix
from radalign.retrieval.build import build_tuned
from radalign.retrieval.evaluate import chance_recall, cross_modal, recall_at_ks
from radalign.retrieval.search import Retriever, explain
from radalign.retrieval.store import IndexStore, check_out_dir, metadata_table, write_index_dir

from radalign import RadalignError

D = 32


class FakeEncoders:
    """The export protocol (docs/architecture.md §4) with fixed weights: a random linear map of pixels."""

    def __init__(self, dim=D, checksum="a" * 64, seed=0):
        import torch

        self.embed_dim, self.checksum, self.image_size = dim, checksum, 16
        self.config = {"embed_dim": dim, "mean": [0.5] * 3, "std": [0.5] * 3}
        self._w = torch.randn(3 * 16 * 16, dim, generator=torch.Generator().manual_seed(seed))

    def image_transform(self):
        import torch
        from torchvision.transforms import v2

        return v2.Compose([v2.Grayscale(3), v2.Resize((16, 16)), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize([0.5] * 3, [0.5] * 3)])

    def encode_images(self, images):
        import torch.nn.functional as F

        return F.normalize(images.flatten(1) @ self._w, dim=-1)

    def encode_texts(self, texts, batch_size=256):
        import torch
        import torch.nn.functional as F

        if not texts:
            return torch.zeros(0, self.embed_dim)
        rows = [torch.randn(self.embed_dim, generator=torch.Generator().manual_seed(hash(t) % 2**31)) for t in texts]
        return F.normalize(torch.stack(rows), dim=-1)


def _meta(n, studies, subjects, labels=None, texts=None):
    """Metadata columns for n rows (labels: {name: [values]})."""
    cols = {"key": [f"k{i}" for i in range(n)], "dicom_id": [f"d{i}" for i in range(n)],
            "study_id": [str(s) for s in studies], "subject_id": [str(s) for s in subjects],
            "split": ["train"] * n, "view": ["PA"] * n,
            "text": texts if texts is not None else [f"report {s}" for s in studies]}
    for name, values in (labels or {}).items():
        cols[f"label:{name}"] = [float(v) for v in values]
    return metadata_table(cols)


def _write(tmp_path, x, studies=None, subjects=None, labels=None, kind="flat", enc=None, texts=None, **kw):
    n = len(x)
    studies = list(range(n)) if studies is None else studies
    subjects = list(range(n)) if subjects is None else subjects
    index, entry = build_tuned(x, kind=kind, **kw)
    enc = enc or FakeEncoders(dim=x.shape[1])
    manifest = {"encoder": {"checksum": enc.checksum, "embed_dim": enc.embed_dim, "checkpoint": None,
                            "config": enc.config},
                "dim": x.shape[1], "normalisation": "l2", "metric": "inner_product", "modalities": ["image"],
                "indexes": {"image": entry}, "data": {"split": "train", "skipped": {}}}
    out = tmp_path / "idx"
    write_index_dir(out, indexes={"image": index}, vectors={"image": x}, metadata=_meta(n, studies, subjects, labels, texts),
                    manifest=manifest)
    return out, index


def _numpy_topk(x, q, k):
    sims = q @ x.T  # [Q, N]
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


# ----------------------------------------------------------------------------------------------------------
# FAISS indexes.


def test_blas_threshold_is_lowered():
    faiss = ix.faiss_module()
    assert faiss.cvar.distance_compute_blas_threshold == ix.BLAS_THRESHOLD < 128000


def test_flat_search_equals_numpy_bruteforce():
    x = ix.clustered_vectors(3000, D, clusters=50, seed=1)
    q = ix.clustered_vectors(40, D, clusters=50, seed=1)[:40] + 0.01  # batch >= BLAS threshold: BLAS path
    q = ix.normalize(q)
    index, entry = build_tuned(x, kind="flat")
    assert entry["index_string"] == "Flat" and entry["params"] == {}
    scores, ids = ix.search(index, q, 10)
    ref_scores, ref_ids = _numpy_topk(x, q, 10)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    # Ties aside, the ids agree exactly; clustered float data has no exact ties at these sizes.
    assert (ids == ref_ids).mean() > 0.999
    for row in range(len(q)):  # and every returned id's score is its true similarity
        np.testing.assert_allclose(q[row] @ x[ids[row]].T, scores[row], atol=1e-5)


def test_plan_rules():
    assert ix.plan_index(10_000, 256).kind == "flat"
    assert ix.plan_index(2_000_000, 256).kind == "ivf-flat"
    p = ix.plan_index(200_000, 256, memory_budget=ix.parse_memory("50M"))
    assert p.kind == "ivf-pq" and p.factory == "IVF2048,PQ128x4fs,Refine(Flat)"
    assert p.ram_bytes < ix.parse_memory("50M")
    assert ix.plan_index(50_000, 64, flat_max=10_000).kind == "ivf-flat"
    assert ix.plan_index(50_000, 64, "hnsw").factory == "HNSW32,Flat"
    assert ix.parse_memory("1.5G") == int(1.5 * 2**30) and ix.parse_memory("512M") == 512 * 2**20
    with pytest.raises(RadalignError, match="--memory-budget 'lots'"):
        ix.parse_memory("lots")
    with pytest.raises(RadalignError, match="--index-type 'annoy'"):
        ix.plan_index(100, 8, "annoy")
    with pytest.raises(RadalignError, match="too few"):
        ix.plan_index(50, 8, "ivf-flat")


def _fresh_recall(index, x, k=10, n=300, seed=7):
    """Recall@k on new queries (perturbed database points, not those used for tuning) against exact search."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, x.shape[1])) * (0.2 / math.sqrt(x.shape[1]))  # norm ~0.2, as bench/
    q = ix.normalize(x[rng.choice(len(x), n, replace=False)] + noise)
    _, truth = ix.exact_topk(x, q, k)
    _, found = ix.search(index, q, k)
    return ix.neighbour_recall(found, truth)


def test_auto_approximate_index_reaches_recall_on_100k_clustered():
    x = ix.clustered_vectors(100_000, 64, clusters=1000, spread=1.0, seed=0)
    index, entry = build_tuned(x, kind="auto", flat_max=50_000, recall_target=0.95)
    assert entry["kind"] == "ivf-flat" and entry["tuning"]["reached"]
    assert entry["params"]["nprobe"] < index.nlist  # it is approximate, not a full scan
    assert _fresh_recall(index, x) >= 0.95


def test_memory_budget_gives_compressed_index_with_refine():
    x = ix.clustered_vectors(20_000, 32, clusters=200, spread=1.0, seed=3)
    index, entry = build_tuned(x, kind="auto", memory_budget=ix.parse_memory("1M"), recall_target=0.95)
    assert entry["kind"] == "ivf-pq" and "k_factor_rf" in entry["params"]
    assert entry["estimated_ram_bytes"] <= ix.parse_memory("1M") and _fresh_recall(index, x) >= 0.93


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hnsw", "ivf-pq"])
def test_other_kinds_reach_recall_on_100k(kind):
    x = ix.clustered_vectors(100_000, 64, clusters=1000, spread=1.0, seed=0)
    index, entry = build_tuned(x, kind=kind, recall_target=0.95)
    assert entry["tuning"]["reached"] and _fresh_recall(index, x) >= 0.93


# ----------------------------------------------------------------------------------------------------------
# The index folder.


def test_save_load_round_trip_identical(tmp_path):
    x = ix.clustered_vectors(5000, D, clusters=40, seed=2)
    out, index = _write(tmp_path, x, kind="ivf-flat")
    q = ix.normalize(x[:50] + 0.02)
    before = ix.search(index, q, 10)
    for mmap in (True, False):
        store = IndexStore.load(out, mmap=mmap)
        after = ix.search(store.indexes["image"], q, 10)  # tuned nprobe restored from the manifest
        np.testing.assert_array_equal(before[1], after[1])
        np.testing.assert_array_equal(before[0], after[0])
        np.testing.assert_array_equal(np.asarray(store.vectors["image"]), x)
        assert store.count == 5000 and store.row(7)["dicom_id"] == "d7"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["indexes"]["image"]["params"] == {"nprobe": store.indexes["image"].nprobe}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_missing_and_corrupt_files(tmp_path):
    x = ix.clustered_vectors(200, D, clusters=5, seed=0)
    out, _ = _write(tmp_path, x)
    with pytest.raises(RadalignError, match="no manifest.json"):
        IndexStore.load(tmp_path / "nope")
    size = (out / "image.faiss").stat().st_size
    (out / "image.faiss").write_bytes(b"\0" * size)  # same size, garbage content
    with pytest.raises(RadalignError, match="image.faiss|cannot read image index"):
        IndexStore.load(out)
    (out / "image.faiss").write_bytes(b"\0" * 10)  # truncated
    with pytest.raises(RadalignError, match="truncated"):
        IndexStore.load(out)
    (out / "image.faiss").unlink()
    with pytest.raises(RadalignError, match="image.faiss: missing"):
        IndexStore.load(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(RadalignError, match="not readable JSON"):
        IndexStore.load(out)


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "precious.txt").write_text("keep")
    x = ix.clustered_vectors(100, D, clusters=5)
    with pytest.raises(RadalignError, match="not a retrieval index"):
        _write(tmp_path, x)
    assert (tmp_path / "idx" / "precious.txt").read_text() == "keep"
    (tmp_path / "file").write_text("")
    with pytest.raises(RadalignError, match="--out .*file: exists and is not a retrieval index folder"):
        check_out_dir(tmp_path / "file")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc")
@pytest.mark.parametrize("kind", ["flat", "ivf-pq"])
def test_mmap_load_keeps_vectors_out_of_process_memory(tmp_path, kind):
    """The memory budget holds when serving: a memory-mapped index does not copy its vectors into RAM. Measured
    in a fresh process: once an earlier test has trained in-process (make_accelerator's keep_freed_memory), glibc
    keeps freed memory and the copy of the second load reuses it, so RssAnon would not grow either way."""
    import subprocess
    import sys

    x = ix.clustered_vectors(40_000, 256, clusters=64, seed=0)  # 39 MiB of float32
    out, _ = _write(tmp_path, x, kind=kind)
    del x
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from radalign.retrieval.store import IndexStore\n"
        "def anon_mib():\n"
        "    line = next(x for x in Path('/proc/self/status').read_text().splitlines() if x.startswith('RssAnon'))\n"
        "    return int(line.split()[1]) / 1024\n"
        "IndexStore.load(sys.argv[1], mmap=True)  # once first: the imports a load makes are not the index\n"
        "grown = {}\n"
        "for mmap in (True, False):\n"
        "    before = anon_mib()\n"
        "    store = IndexStore.load(sys.argv[1], mmap=mmap)\n"
        "    grown[str(mmap)] = anon_mib() - before\n"
        "    del store\n"
        "print(json.dumps(grown))\n")
    run = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    grown = json.loads(run.stdout.strip().splitlines()[-1])
    assert grown["True"] < 8 and grown["False"] > 30, grown


# ----------------------------------------------------------------------------------------------------------
# Case filters and explanations.


def _cases(tmp_path):
    """Query at e0. Rows 0-2: study 10 (patient 1); 3-4: study 11 (patient 1); 5: study 12 (patient 2); then far."""
    rng = np.random.default_rng(0)
    base = np.eye(D, dtype=np.float32)[0]
    near = [base + 0.01 * i * np.eye(D, dtype=np.float32)[1] for i in range(6)]
    far = [rng.standard_normal(D).astype(np.float32) for _ in range(20)]
    x = ix.normalize(np.stack(near + far))
    studies = [10, 10, 10, 11, 11, 12] + list(range(100, 120))
    subjects = [1, 1, 1, 1, 1, 2] + list(range(200, 220))
    effusion = [1, 1, 1, 0, 0, 1] + [0] * 20
    edema = [0, 0, 0, 1, 1, float("nan")] + [1] * 20
    return _write(tmp_path, x, studies, subjects, {"Pleural Effusion": effusion, "Edema": edema})[0], base


def test_study_dedup_and_patient_exclusion(tmp_path):
    out, q = _cases(tmp_path)
    r = Retriever.load(out, encoders=FakeEncoders())
    res = r.search(vector=q, k=3)
    assert [n["study_id"] for n in res.neighbours][:3] == ["10", "11", "12"]  # one image per study, best kept
    assert res.neighbours[0]["row"] == 0 and res.filtered["same_study"] == 3
    assert r.search(vector=q, k=1).filtered["same_study"] == 0  # nothing beyond rank k is counted
    res = r.search(vector=q, k=3, dedup_study=False)
    assert [n["row"] for n in res.neighbours] == [0, 1, 2]
    res = r.search(vector=q, k=3, subject_id="1", exclude_patient=True)
    assert res.neighbours[0]["study_id"] == "12" and all(n["subject_id"] != "1" for n in res.neighbours)
    assert res.filtered["same_patient"] == 5 and len(res.neighbours) == 3  # widened past the first fetch
    # A study query excludes its patient by default, and never returns itself.
    res = r.search(study_id="11", k=2)
    assert res.query["study_id"] == "11" and all(n["subject_id"] != "1" for n in res.neighbours)
    res = r.search(study_id="11", k=2, exclude_patient=False)
    assert "11" not in [n["study_id"] for n in res.neighbours] and res.neighbours[0]["study_id"] == "10"


def test_explanation_counts_and_weights(tmp_path):
    out, q = _cases(tmp_path)
    res = Retriever.load(out, encoders=FakeEncoders()).search(vector=q, k=3)
    by = {e["label"]: e for e in res.explanation}
    sims = [n["similarity"] for n in res.neighbours]  # studies 10 (effusion), 11 (edema), 12 (effusion)
    assert by["Pleural Effusion"]["count"] == 2 and by["Pleural Effusion"]["text"].startswith("2/3 similar cases")
    assert by["Pleural Effusion"]["studies"] == ["10", "12"]
    assert by["Pleural Effusion"]["weighted"] == pytest.approx((sims[0] + sims[2]) / sum(sims), abs=1e-3)
    assert by["Edema"]["count"] == 1 and res.explanation[0]["label"] == "Pleural Effusion"
    neigh = [{"similarity": 0.5, "labels": ["Edema"], "study_id": "a", "dicom_id": "x"},
             {"similarity": -0.2, "labels": [], "study_id": "b", "dicom_id": "y"}]
    e = explain(neigh, ["Edema", "Fracture"], query_labels=["Fracture"])
    assert e == [{"label": "Edema", "count": 1, "of": 2, "weighted": 1.0, "studies": ["a"], "dicom_ids": ["x"],
                  "query_has": False, "text": "1/2 similar cases: edema"}]


def test_bad_queries(tmp_path):
    out, q = _cases(tmp_path)
    r = Retriever.load(out, encoders=FakeEncoders())
    with pytest.raises(RadalignError, match="--k 27: larger than the index \\(26 cases\\)"):
        r.search(vector=q, k=27)
    with pytest.raises(RadalignError, match="empty query text"):
        r.search(text="   ")
    with pytest.raises(RadalignError, match="--image .*no such file"):
        r.search(image=tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(RadalignError, match="not a readable image"):
        r.search(image=tmp_path / "bad.jpg")
    with pytest.raises(RadalignError, match="--study-id 999: not in this index"):
        r.search(study_id="999")
    with pytest.raises(RadalignError, match="exactly one query"):
        r.search(vector=q, text="x")
    with pytest.raises(RadalignError, match="--target text"):
        r.search(vector=q, target="text")


def test_image_query_through_encoders(tmp_path):
    from PIL import Image

    enc = FakeEncoders()
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20), dtype=np.uint8)) for i in range(30)]
    import torch

    x = ix.normalize(torch.cat([enc.encode_images(enc.image_transform()(im)[None]) for im in images]).numpy())
    out, _ = _write(tmp_path, x, enc=enc)
    images[4].save(tmp_path / "q.png")
    res = Retriever.load(out, encoders=enc).search(image=tmp_path / "q.png", k=2)
    assert res.neighbours[0]["row"] == 4 and res.neighbours[0]["similarity"] == pytest.approx(1.0, abs=1e-4)


def test_encoder_mismatch(tmp_path):
    x = ix.clustered_vectors(100, D, clusters=5)
    out, _ = _write(tmp_path, x)
    with pytest.raises(RadalignError, match="encoder checksum aaaaaaaaaaaa.*bbbbbbbbbbbb"):
        Retriever.load(out, encoders=FakeEncoders(checksum="b" * 64))
    with pytest.raises(RadalignError, match="dim 32, the encoders give 16"):
        Retriever.load(out, encoders=FakeEncoders(dim=16))
    with pytest.raises(RadalignError, match="pass --export"):
        Retriever.load(out).search(text="effusion")  # built without a recorded export


# ----------------------------------------------------------------------------------------------------------
# Metrics.


def test_chance_recall_matches_combinatorics():
    m = 7
    for p in (1, 2, 3):
        for k in (1, 2, 5):
            subsets = list(combinations(range(m), k))
            exact = sum(any(i < p for i in s) for s in subsets) / len(subsets)  # positives = items 0..p-1
            assert chance_recall(np.array([p]), m, k)[0] == pytest.approx(exact)
    assert chance_recall(np.array([1]), 100, 10)[0] == pytest.approx(0.1)


def test_recall_and_positive_pairs():
    sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    pos = np.array([[False, True, False], [False, False, True]])
    r = recall_at_ks(sim, pos, ks=(1, 2, 3))
    assert (r["R@1"], r["R@2"], r["R@3"]) == (0.5, 0.5, 1.0)
    assert r["R@1_chance"] == pytest.approx(1 / 3)
    # Same study or identical normalised report count as positives.
    img = np.eye(4, dtype=np.float32)[[0, 1, 2, 2]]
    txt = np.eye(4, dtype=np.float32)[[0, 0, 2, 3]]  # rows 0, 1 share a study; 2, 3 share a normalised report
    m = cross_modal(img, txt, ["A.", "A.", "No acute process.", "no acute  process"], ["s1", "s1", "s2", "s3"],
                    ks=(1,))
    assert m["image_to_report"]["candidates"] == 2  # two distinct normalised reports
    assert m["image_to_report"]["R@1"] == 1.0 and m["report_to_image"]["queries"] == 2
    assert not math.isnan(m["report_to_image"]["R@1_chance"])


def _brute_mean_ci(values, patients, n_boot, seed, level=0.95):
    """Independent patient bootstrap of a per-query mean: documented draws (patients in sorted id order,
    default_rng(seed).integers(0, P, (n_boot, P))), the patients' queries repeated, np.percentile."""
    values = np.asarray(values, dtype=float)
    ids = sorted({str(p) for p in patients})
    rows_of = {p: [i for i, q in enumerate(patients) if str(q) == p] for p in ids}
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    means = [values[[i for j in d for i in rows_of[ids[j]]]].mean() for d in draws]
    return tuple(np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2]))


def _precision_index(tmp_path):
    """Query at e0 of patient "Q". Rows 0-4 walk away from e0 (row 0 is the query's own patient, positive);
    rows 5-14 are far away. Effusion: rows 0, 2, 4. Every row its own study."""
    e = np.eye(D, dtype=np.float32)
    near = [e[0] + 0.1 * i * e[1] for i in range(5)]
    far = [-e[0] + 0.05 * i * e[2] for i in range(10)]
    x = ix.normalize(np.stack(near + far))
    subjects = ["Q"] + [f"p{i}" for i in range(1, 15)]
    effusion = [1, 0, 1, 0, 1] + [0] * 10
    out, _ = _write(tmp_path, x, list(range(15)), subjects, {"Pleural Effusion": effusion})
    return Retriever.load(out, encoders=FakeEncoders()), e[0]


def test_label_precision_hand_worked_excludes_own_patient_and_takes_exactly_k(tmp_path):
    """Excluding patient Q, the neighbours are rows 1 (neg), 2 (pos), 3 (neg), 4 (pos): P@1 0, P@2 1/2, P@3 1/3,
    P@4 1/2. Keeping Q's own row would give P@1 = 1; taking K+1 neighbours would give P@1 = 1/2."""
    from radalign.retrieval.evaluate import label_precision

    r, q = _precision_index(tmp_path)
    labels = np.full((1, len(r.store.labels)), np.nan, dtype=np.float32)
    labels[0, r.store.labels.index("Pleural Effusion")] = 1.0
    m = label_precision(r, q[None], labels, ["Q"], ks=(1, 2, 3, 4), n_boot=0)
    assert (m["P@1"], m["P@2"], m["P@3"], m["P@4"]) == pytest.approx((0.0, 0.5, 1 / 3, 0.5))
    assert m["P@1_chance"] == pytest.approx(3 / 15)  # studies of the case base with effusion
    assert m["queries"] == 1
    none = label_precision(r, q[None], np.zeros_like(labels), ["Q"], ks=(1,))
    assert none["queries"] == 0


def test_label_precision_interval_resamples_query_patients(tmp_path):
    from radalign.retrieval.evaluate import label_precision

    r, q = _precision_index(tmp_path)
    e = np.eye(D, dtype=np.float32)
    qs = ix.normalize(np.stack([q, q + 0.25 * e[1], q + 0.45 * e[1], -e[0], -e[0] + 0.3 * e[2], q]))
    labels = np.full((6, len(r.store.labels)), np.nan, dtype=np.float32)
    labels[:, r.store.labels.index("Pleural Effusion")] = 1.0
    subjects = ["Q", "A", "A", "B", "C", "C"]
    m = label_precision(r, qs, labels, subjects, ks=(2,), n_boot=300, seed=3)
    # per-query P@2 by brute force: neighbours = the 2 nearest rows of other patients
    x = np.asarray(r.store.vectors["image"])
    eff = np.array([1, 0, 1, 0, 1] + [0] * 10, bool)
    subj = r.store.column("subject_id")
    per = []
    for qq, s in zip(qs, subjects):
        order = [i for i in np.argsort(-(x @ qq), kind="stable") if subj[i] != s][:2]
        per.append(eff[order].mean())
    assert m["P@2"] == pytest.approx(np.mean(per))
    assert (m["P@2_ci_low"], m["P@2_ci_high"]) == pytest.approx(_brute_mean_ci(per, subjects, 300, 3), abs=1e-12)
    assert m["unit"] == "patient" and m["n_patients"] == 4


def test_cross_modal_recall_intervals_are_patient_level():
    rng = np.random.default_rng(0)
    n = 40
    img = ix.normalize(rng.standard_normal((n, 8)).astype(np.float32))
    txt = ix.normalize(img + 0.9 * rng.standard_normal((n, 8)).astype(np.float32))
    texts = [f"report {i // 2}" for i in range(n)]  # two images per study share a report
    studies = [f"s{i // 2}" for i in range(n)]
    subjects = [f"p{i // 4}" for i in range(n)]  # two studies per patient
    m = cross_modal(img, txt, texts, studies, ks=(1, 5), subjects=subjects, n_boot=200, seed=1)
    i2r = m["image_to_report"]
    reports = txt[::2]  # [20, 8] the distinct reports, first image of each study
    hits = []
    for i in range(n):  # brute force: rank of the own study's report among the 20
        sims = reports @ img[i]
        rank = int((sims > sims[i // 2]).sum())
        hits.append(rank < 5)
    assert i2r["R@5"] == pytest.approx(np.mean(hits))
    assert (i2r["R@5_ci_low"], i2r["R@5_ci_high"]) == pytest.approx(_brute_mean_ci(hits, subjects, 200, 1),
                                                                    abs=1e-12)
    assert i2r["unit"] == "patient" and i2r["n_patients"] == 10
    assert m["report_to_image"]["n_patients"] == 10  # a report belongs to its first image's patient


def test_markdown_escapes_report_text(tmp_path):
    from radalign.retrieval.render import to_html, to_markdown

    x = ix.normalize(np.eye(D, dtype=np.float32)[:4] + 0.1)
    out, _ = _write(tmp_path, x, texts=["<script>alert(1)</script> <img src=x onerror=alert(2)> "
                                        "[x](javascript:alert(3)) a|b"] * 4)
    res = Retriever.load(out, encoders=FakeEncoders()).search(vector=x[0], k=2)
    md, page = to_markdown(res), to_html(res)
    for text in (md, page):
        assert "<script" not in text and "<img src=x" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "\\[x\\](javascript" in md and "a\\|b" in md  # no link, no broken table

def test_long_text_query_warns_with_lengths(tmp_path, embed_log):
    import torch

    out, _ = _write(tmp_path, ix.normalize(np.eye(D, dtype=np.float32)[:4] + 0.1))
    enc = FakeEncoders()
    ctx = 16

    def tokenize(texts):  # one token per word, cut at ctx (as open_clip does), pad 0
        outt = torch.zeros(len(texts), ctx, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [1 + len(w) for w in t.split()][:ctx]
            outt[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return outt

    enc.tokenize = tokenize
    r = Retriever.load(out, encoders=enc)
    res = r.search(text="effusion " * 50, k=1)  # 450 characters, 50 words > 16 tokens
    cut = res.query["text_cut"]
    assert cut["chars"] == 450 and cut["context_tokens"] == 16
    assert 15 * 9 <= cut["chars_used"] <= 16 * 9  # about the first 15-16 words
    assert "450 characters" in "\n".join(embed_log) and "16 tokens" in "\n".join(embed_log)
    assert "text_cut" not in r.search(text="small effusion", k=1).query

"""`radalign retrieval build / search / eval` end to end on the synthetic shards and the tiny export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from radalign.cli import main
from tests.conftest import nearest_other_patients


@pytest.fixture(scope="module")
def index_dir(tiny_export, synth_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieval") / "index"
    rc = main(["retrieval", "build", "--export", str(tiny_export), "--shards", str(synth_shards),
               "--split", "train", "--out", str(out), "--modality", "both", "--batch-size", "16"])
    assert rc == 0
    return out


def test_build_writes_a_complete_index(index_dir, synth_shards):
    from radalign.data.loader import split_samples
    from radalign.retrieval.store import IndexStore

    m = json.loads((index_dir / "manifest.json").read_text())
    assert m["count"] == split_samples(synth_shards, "train") - sum(m["data"]["skipped"].values())
    assert m["modalities"] == ["image", "text"] and m["normalisation"] == "l2"
    assert m["indexes"]["image"]["index_string"] == "Flat" and len(m["encoder"]["checksum"]) == 64
    store = IndexStore.load(index_dir)
    x = np.asarray(store.vectors["image"])
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert store.metadata.num_rows == m["count"] and store.row(0)["thumbnail"][:2] == b"\xff\xd8"  # JPEG


def test_study_search_json_excludes_patient(index_dir, tmp_path, capsys):
    from radalign.retrieval.store import IndexStore

    store = IndexStore.load(index_dir)
    study = store.row(0)["study_id"]
    out = tmp_path / "r.json"
    assert main(["retrieval", "search", "--index-dir", str(index_dir), "--study-id", study, "--k", "3",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["query"]["study_id"] == study and len(res["neighbours"]) == 3
    assert all(n["subject_id"] != res["query"]["subject_id"] for n in res["neighbours"])
    sims = [n["similarity"] for n in res["neighbours"]]
    assert sims == sorted(sims, reverse=True)
    assert len({n["study_id"] for n in res["neighbours"]}) == 3


def test_example_html_is_self_contained(index_dir, synth_shards, tmp_path):
    html, md = tmp_path / "ex.html", tmp_path / "ex.md"
    for fmt, out in (("html", html), ("markdown", md)):
        assert main(["retrieval", "search", "--index-dir", str(index_dir), "--example-from", str(synth_shards),
                     "--split", "test", "--k", "3", "--format", fmt, "--out", str(out)]) == 0
    page = html.read_text()
    assert page.count("data:image/jpeg;base64,") == 4  # query + 3 neighbours
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "similar cases" in md.read_text() and "| 3 |" in md.read_text()


def test_one_search_writes_each_format_of_its_out_suffixes(index_dir, synth_shards, tmp_path):
    """--out repeated: one search, each file in its suffix's format, byte-identical to one call per format."""
    common = ["retrieval", "search", "--index-dir", str(index_dir), "--example-from", str(synth_shards),
              "--split", "test", "--k", "3"]
    one = [tmp_path / "one.html", tmp_path / "one.md", tmp_path / "one.json"]
    assert main(common + [a for f in one for a in ("--out", str(f))]) == 0
    for f, fmt in zip(one, ("html", "markdown", "json")):
        sep = tmp_path / f"sep{f.suffix}"
        assert main(common + ["--format", fmt, "--out", str(sep)]) == 0
        assert f.read_bytes() == sep.read_bytes(), f
    assert main(common + ["--format", "html", "--out", str(one[0]), "--out", str(one[1])]) == 2  # which format?
    assert main(common + ["--out", str(tmp_path / "case.txt")]) == 2  # no suffix to go by, no --format


def _test_split(shards, enc):
    """Independent of data.loader / data.embed: (metas, image embeddings [N, D], texts) read straight from
    the tar files, decoded with PIL, embedded with the export."""
    import io
    import tarfile

    import torch
    from PIL import Image

    metas, images, texts = [], [], []
    tf = enc.image_transform()
    for tar_path in sorted((shards / "test").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n[:-5] for n in members if n.endswith(".json")):
                metas.append(json.loads(tar.extractfile(members[name + ".json"]).read()))
                texts.append(tar.extractfile(members[name + ".txt"]).read().decode())
                images.append(tf(Image.open(io.BytesIO(tar.extractfile(members[name + ".jpg"]).read())).convert("L")))
    with torch.no_grad():
        x = enc.encode_images(torch.stack(images)).numpy()
    return metas, x / np.linalg.norm(x, axis=1, keepdims=True), texts


def test_text_search_on_reports(index_dir, tiny_export, capsys):
    from radalign.pretrain.export import load_encoders
    from radalign.retrieval.store import IndexStore

    assert main(["retrieval", "search", "--index-dir", str(index_dir), "--text", "large pleural effusion",
                 "--target", "report", "--k", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["query"]["kind"] == "text" and len(res["neighbours"]) == 2
    # brute force: the query's embedding against every stored report vector, best image per study
    q = load_encoders(tiny_export).encode_texts(["large pleural effusion"]).numpy()[0]
    store = IndexStore.load(index_dir)
    sims = np.asarray(store.vectors["text"]) @ q
    studies = store.column("study_id")
    best: dict = {}
    for i in np.argsort(-sims, kind="stable"):
        best.setdefault(studies[i], float(sims[i]))
    want = sorted(best.items(), key=lambda kv: -kv[1])[:2]
    assert [n["study_id"] for n in res["neighbours"]] == [w[0] for w in want]
    assert [n["similarity"] for n in res["neighbours"]] == pytest.approx([w[1] for w in want], abs=1e-4)


def test_eval_metrics_equal_a_brute_force_computation(index_dir, synth_shards, tiny_export, tmp_path, capsys):
    from radalign.data.text import normalize_report
    from radalign.pretrain.export import load_encoders
    from radalign.retrieval.store import IndexStore

    assert main(["retrieval", "eval", "--index-dir", str(index_dir), "--shards", str(synth_shards), "--split",
                 "test", "--out", str(tmp_path), "--bootstrap", "100"]) == 0
    printed = capsys.readouterr().out
    m = json.loads((tmp_path / "metrics.json").read_text())
    enc = load_encoders(tiny_export)
    metas, img, texts = _test_split(synth_shards, enc)
    assert m["queries"]["images"] == len(metas) and m["queries"]["lost"] == {}
    # image -> report: candidates are the distinct normalised reports; positives: the study's reports
    norm = [normalize_report(t) for t in texts]
    unique = sorted(set(norm))
    rep = enc.encode_texts([texts[norm.index(u)] for u in unique]).numpy()
    rep /= np.linalg.norm(rep, axis=1, keepdims=True)
    study_reports: dict = {}
    for meta, t in zip(metas, norm):
        study_reports.setdefault(meta["study_id"], set()).add(t)
    for k in (1, 5, 10):
        hits = []
        for i, meta in enumerate(metas):
            sims = rep @ img[i]
            best_pos = max(sims[unique.index(t)] for t in study_reports[meta["study_id"]])
            hits.append((sims > best_pos + 1e-6).sum() < k)
        r = m["image_to_report"]
        assert r[f"R@{k}"] == pytest.approx(np.mean(hits), abs=1e-9)
        assert r[f"R@{k}_ci_low"] <= r[f"R@{k}"] <= r[f"R@{k}_ci_high"]
    assert m["image_to_report"]["candidates"] == len(unique)
    # image -> image label precision@5 against the index: other patients, one image per study
    store = IndexStore.load(index_dir)
    x = np.asarray(store.vectors["image"])
    subj, stud = store.column("subject_id"), store.column("study_id")
    base = np.stack([np.asarray(store.metadata.column(f"label:{n}").to_numpy(zero_copy_only=False)) == 1
                     for n in store.labels], axis=1)  # [N, L]
    prec = []
    for i, meta in enumerate(metas):
        qpos = np.array([(meta.get("labels") or {}).get(n) == 1 for n in store.labels])
        if not qpos.any():
            continue
        rows = nearest_other_patients(x, img[i], subj, stud, str(meta["subject_id"]), 5)
        prec.append((base[rows] & qpos).any(1).mean())
    assert m["image_to_image"]["queries"] == len(prec) > 0
    assert m["image_to_image"]["P@5"] == pytest.approx(np.mean(prec), abs=1e-6)
    assert m["summary"]["label_P@5"] == pytest.approx(np.mean(prec), abs=1e-6)
    # chance and the unit are stated
    n_pat = len({str(meta["subject_id"]) for meta in metas})
    assert m["bootstrap"]["unit"] == "patient" and m["bootstrap"]["n_patients"] == n_pat
    assert m["summary"]["ci_unit"] == "patient"
    assert "chance" in printed and f"over patients ({n_pat} patients" in printed


def test_build_on_a_damaged_split_counts_every_lost_sample(tiny_export, synth_shards, tmp_path, capsys):
    import io
    import shutil
    import tarfile

    from radalign.data.loader import read_manifest

    data = tmp_path / "shards"
    shutil.copytree(synth_shards, data)
    manifest = read_manifest(data)
    entries = manifest["splits"]["train"]["shards"]
    assert len(entries) >= 3
    paths = [data / e["path"] for e in entries]
    raw = paths[0].read_bytes()
    paths[0].write_bytes(raw[: len(raw) // 2])  # truncated tar
    paths[1].write_bytes(np.random.default_rng(0).integers(0, 256, len(paths[1].read_bytes()),
                                                           dtype=np.uint8).tobytes())  # random bytes
    with tarfile.open(paths[2]) as tar:  # three zeroed JPEGs in an otherwise intact shard
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    zeroed = 0
    with tarfile.open(paths[2], "w") as tar:
        for m, body in members:
            if m.name.endswith(".jpg") and zeroed < 3:
                body, zeroed = bytes(len(body)), zeroed + 1
            m.size = len(body)
            tar.addfile(m, io.BytesIO(body))
    out = tmp_path / "index"
    assert main(["retrieval", "build", "--export", str(tiny_export), "--shards", str(data), "--split", "train",
                 "--out", str(out), "--batch-size", "16"]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    expected = sum(e["samples"] for e in entries)
    lost = m["data"]["lost"]
    assert m["data"]["expected"] == expected
    assert m["count"] + sum(lost.values()) == expected  # nothing vanished uncounted
    assert lost["bad_image"] == 3 and "unaccounted" not in lost
    assert sum(lost.values()) >= entries[1]["samples"] + 3  # the random-bytes shard counts all its samples
    assert f"indexed {m['count']} of {expected} images" in printed and f"lost {sum(lost.values())}" in printed


def test_build_and_eval_lock_their_output_folders(index_dir, tiny_export, synth_shards, tmp_path, capsys):
    import fcntl
    import os

    from radalign.lock import lock_file

    build = ["retrieval", "build", "--export", str(tiny_export), "--shards", str(synth_shards), "--split",
             "test", "--out", str(tmp_path / "idx")]
    ev = ["retrieval", "eval", "--index-dir", str(index_dir), "--shards", str(synth_shards), "--split", "test",
          "--out", str(tmp_path / "ev")]
    for folder, argv in ((tmp_path / "idx", build), (tmp_path / "ev", ev)):
        folder.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file(folder), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another writer holds the folder
        try:
            assert main(argv) == 2
            assert "in use by another process" in capsys.readouterr().err
        finally:
            os.close(fd)


def test_bad_input_errors(index_dir, tiny_export, nano_model_cfg, tmp_path, capsys):
    import torch
    from radalign.pretrain.export import export_encoders
    from radalign.pretrain.models import build_model

    torch.manual_seed(1)
    other = export_encoders(build_model(nano_model_cfg), nano_model_cfg, tmp_path / "other")
    assert main(["retrieval", "search", "--index-dir", str(index_dir), "--text", "effusion",
                 "--export", str(other)]) == 2
    assert "encoder checksum" in capsys.readouterr().err
    assert main(["retrieval", "search", "--index-dir", str(index_dir), "--text", "x", "--k", "100000"]) == 2
    assert "larger than the index" in capsys.readouterr().err
    assert main(["retrieval", "search", "--index-dir", str(tmp_path / "none"), "--text", "x"]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["retrieval", "search", "--index-dir", str(index_dir), "--image", str(tmp_path / "no.jpg")]) == 2
    assert "no such file" in capsys.readouterr().err

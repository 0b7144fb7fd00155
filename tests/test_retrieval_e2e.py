"""`radalign retrieval build / search / eval` end to end on the synthetic shards and the tiny export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from radalign.cli import main


@pytest.fixture(scope="module")
def index_dir(tiny_export, synth_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieval") / "index"
    rc = main(["retrieval", "build", "--checkpoint", str(tiny_export), "--data", str(synth_shards),
               "--split", "train", "--out", str(out), "--modality", "both", "--batch-size", "16"])
    assert rc == 0
    return out


def test_build_writes_a_complete_index(index_dir, synth_shards):
    from data.loader import split_samples
    from retrieval.store import IndexStore

    m = json.loads((index_dir / "manifest.json").read_text())
    assert m["count"] == split_samples(synth_shards, "train") - sum(m["data"]["skipped"].values())
    assert m["modalities"] == ["image", "text"] and m["normalisation"] == "l2"
    assert m["indexes"]["image"]["index_string"] == "Flat" and len(m["encoder"]["checksum"]) == 64
    store = IndexStore.load(index_dir)
    x = np.asarray(store.vectors["image"])
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert store.metadata.num_rows == m["count"] and store.row(0)["thumbnail"][:2] == b"\xff\xd8"  # JPEG


def test_study_search_json_excludes_patient(index_dir, tmp_path, capsys):
    from retrieval.store import IndexStore

    store = IndexStore.load(index_dir)
    study = store.row(0)["study_id"]
    out = tmp_path / "r.json"
    assert main(["retrieval", "search", "--index", str(index_dir), "--study-id", study, "--k", "3",
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
        assert main(["retrieval", "search", "--index", str(index_dir), "--example-from", str(synth_shards),
                     "--split", "test", "--k", "3", "--format", fmt, "--out", str(out)]) == 0
    page = html.read_text()
    assert page.count("data:image/jpeg;base64,") == 4  # query + 3 neighbours
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "similar cases" in md.read_text() and "| 3 |" in md.read_text()


def test_text_search_on_reports(index_dir, capsys):
    assert main(["retrieval", "search", "--index", str(index_dir), "--text", "large pleural effusion",
                 "--target", "report", "--k", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["query"]["kind"] == "text" and len(res["neighbours"]) == 2


def test_eval_writes_metrics_with_chance(index_dir, synth_shards, tmp_path, capsys):
    assert main(["retrieval", "eval", "--index", str(index_dir), "--queries", str(synth_shards), "--split",
                 "test", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    for task in ("image_to_report", "report_to_image"):
        for k in (1, 5, 10):
            assert 0 <= m[task][f"R@{k}"] <= 1 and 0 < m[task][f"R@{k}_chance"] <= 1
    assert "chance" in capsys.readouterr().out
    assert m["summary"]["image_to_report_R@10_chance"] == m["image_to_report"]["R@10_chance"]


def test_bad_input_errors(index_dir, tiny_export, nano_model_cfg, tmp_path, capsys):
    import torch

    from pretrain.export import export_encoders
    from pretrain.models import build_model

    torch.manual_seed(1)
    other = export_encoders(build_model(nano_model_cfg), nano_model_cfg, tmp_path / "other")
    assert main(["retrieval", "search", "--index", str(index_dir), "--text", "effusion",
                 "--checkpoint", str(other)]) == 2
    assert "encoder checksum" in capsys.readouterr().err
    assert main(["retrieval", "search", "--index", str(index_dir), "--text", "x", "--k", "100000"]) == 2
    assert "larger than the index" in capsys.readouterr().err
    assert main(["retrieval", "search", "--index", str(tmp_path / "none"), "--text", "x"]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["retrieval", "search", "--index", str(index_dir), "--image", str(tmp_path / "no.jpg")]) == 2
    assert "no such file" in capsys.readouterr().err

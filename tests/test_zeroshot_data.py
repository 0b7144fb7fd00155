"""Zero-shot on shards (through data.loader), the 5x200 builders, the CLI, and the real export end to end."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from radalign.data.labels import CHEXPERT_LABELS, COMPETITION_LABELS
from radalign.zeroshot.benchmarks import assign_class, build_chexpert_5x200, build_mimic_5x200
from radalign.zeroshot.config import ZeroshotConfig
from radalign.zeroshot.evaluate import Checkpoint, run_zeroshot
from sklearn.metrics import roc_auc_score

from radalign import RadalignError
from radalign.io import sha256_file
from tests.test_zeroshot import FakeEncoders, _bright_encoder

torch.set_num_threads(1)


def zs(argv: list[str]) -> int:
    """`radalign zeroshot ARGV` through the real parser classes, independent of the other stages' CLIs."""
    import radalign.zeroshot.cli

    from radalign.cli import new_parser, run_entry

    parser = new_parser("radalign", "test")
    radalign.zeroshot.cli.register(parser.add_subparsers(dest="stage"))
    args = parser.parse_args(["zeroshot", *argv])
    return run_entry(args.func, args)


def _labels(rng, comp: str | None) -> dict:
    """14 labels: `comp` alone positive (5x200-eligible) or a random mix (comp None)."""
    if comp:
        return {n: (1 if n == comp else (None if rng.random() < 0.3 and n != comp else 0)) for n in CHEXPERT_LABELS}
    return {n: rng.choice([1, 0, -1, None]) for n in CHEXPERT_LABELS}


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root, n: dict[str, int], seed: int = 0, corrupt: int = 1, per_shard: int = 16):
    """Shards in the docs/architecture.md §1 format. Bright images <=> Cardiomegaly; a few corrupt JPEGs in test."""
    rng = np.random.default_rng(seed)
    manifest = {"format": "radalign-shards/1", "source": "test", "labels": list(CHEXPERT_LABELS), "splits": {}}
    for split, count in n.items():
        entry, i = {"samples": 0, "shards": []}, 0
        (root / split).mkdir(parents=True)
        while i < count:
            path = root / split / f"shard-{len(entry['shards']):06d}.tar"
            m = 0
            with tarfile.open(path, "w") as tar:
                for _ in range(min(per_shard, count - i)):
                    comp = COMPETITION_LABELS[i % 5] if i % 3 else None
                    labels = _labels(rng, comp)
                    labels["Cardiomegaly"] = int(i % 2) if comp is None else labels["Cardiomegaly"]
                    bright = labels["Cardiomegaly"] == 1
                    arr = (rng.random((16, 16)) * 60 + (150 if bright else 40)).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(arr, "L").save(buf, format="JPEG")
                    jpg = b"garbage" if split == "test" and i < corrupt else buf.getvalue()
                    key = f"{split}{i:05d}"
                    meta = {"subject_id": 10 + i // 4, "study_id": 500 + i // 2, "dicom_id": key, "split": split,
                            "view": "LATERAL" if i % 7 == 6 else "PA", "labels": labels, "sections": {}}
                    _member(tar, f"{key}.jpg", jpg)
                    _member(tar, f"{key}.txt", b"report text")
                    _member(tar, f"{key}.json", json.dumps(meta).encode())
                    i, m = i + 1, m + 1
            entry["shards"].append({"path": f"{split}/{path.name}", "samples": m, "sha256": sha256_file(path)})
            entry["samples"] += m
        manifest["splits"][split] = entry
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards", {"validate": 40, "test": 60})


def _pinned(enc):
    enc.pinned["bright"] = torch.tensor([1.0, 0.1, 0, 0, 0, 0, 0, 0])
    enc.pinned["dark"] = torch.tensor([0.0, 1.0, 0, 0, 0, 0, 0, 0])
    return enc


def test_shards_input_thresholds_from_validation_and_skips(shards, tmp_path):
    ps = tmp_path / "card.yaml"
    ps.write_text("name: card\nclasses:\n  Cardiomegaly: {positive: [bright], negative: [dark]}\n")
    cfg = ZeroshotConfig(checkpoints=["a"], data=str(shards), split="test", val_split="validate",
                         prompts=[str(ps)], out=str(tmp_path / "out"), bootstrap=100, batch_size=16)
    m = run_zeroshot(cfg, checkpoints=[Checkpoint("a", _pinned(_bright_encoder()))])["card"]
    assert m["data"]["skipped"] == {"bad_image": 1}  # the corrupt JPEG: skipped by the loader, counted here
    assert m["data"]["n_images"] == 59
    assert m["classes"]["Cardiomegaly"]["auroc"] == pytest.approx(1.0)
    assert len(m["labels_without_prompts"]) == 13  # the other CheXpert labels: listed, not evaluated
    thr = m["threshold_metrics"]
    assert thr["available"] and thr["chosen_on"].endswith(":validate")
    t = thr["classes"]["Cardiomegaly"]
    preds = pd.read_csv(tmp_path / "out" / "predictions.csv")  # test rows: the threshold is applied, not fit
    pos = preds[preds["label:Cardiomegaly"] == 1]
    assert t["sensitivity"] == pytest.approx((pos["score:Cardiomegaly"] >= t["threshold"]).mean())
    assert t["sensitivity"] > 0.5 and t["specificity"] > 0.5
    assert m["controls"]["shuffled_labels_macro_auroc"] < 0.85


def shard_metas(root, split: str) -> dict[str, dict]:
    """key -> json metadata, read straight from the tar files (independent of data.loader)."""
    out = {}
    for tar_path in sorted((root / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    out[m.name[:-5]] = json.loads(tar.extractfile(m).read())
    return out


def _policy_exclude(v) -> float:
    """Label value under the default policy: 1/0 kept, -1 and blank excluded (NaN)."""
    return float(v) if v in (0, 1) else np.nan


def _policy_blank_negative(v) -> float:
    """The demo's policy (--blank negative): 1/0 kept, blank -> 0, -1 excluded (NaN)."""
    return 0.0 if v is None else (float(v) if v in (0, 1) else np.nan)


def test_checkpoint_ensemble_and_several_prompt_sets(shards, tmp_path):
    cfg = ZeroshotConfig(checkpoints=["a", "b"], data=str(shards), prompts=["chexpert14", "competition5"],
                         out=str(tmp_path / "out"), bootstrap=20)
    ckpts = [Checkpoint("a", FakeEncoders(seed=1)), Checkpoint("b", FakeEncoders(seed=2))]
    calls = {"a": 0, "b": 0}
    for c in ckpts:
        def counted(x, real=c.encoders.encode_images, path=c.path):
            calls[path] += len(x)
            return real(x)
        c.encoders.encode_images = counted
    res = run_zeroshot(cfg, checkpoints=ckpts)
    assert set(res) == {"chexpert14", "competition5"}
    for name in res:
        m = json.loads((tmp_path / "out" / name / "metrics.json").read_text())
        assert [c["path"] for c in m["checkpoints"]] == ["a", "b"]
    # images were embedded once per checkpoint and reused by both prompt sets
    n = res["competition5"]["data"]["n_images"]
    assert n > 50 and calls == {"a": n, "b": n}
    # The ensemble's scores are the mean of the single checkpoints' scores, and its AUROC is sklearn's on
    # those means against the labels read from the tar files.
    singles = []
    for i, c in enumerate(ckpts):
        one = ZeroshotConfig(checkpoints=[c.path], data=str(shards), prompts=["competition5"],
                             out=str(tmp_path / f"single{i}"), bootstrap=5, cache=False)
        run_zeroshot(one, checkpoints=[c])
        singles.append(pd.read_csv(tmp_path / f"single{i}" / "predictions.csv").set_index("key"))
    ens = pd.read_csv(tmp_path / "out" / "competition5" / "predictions.csv").set_index("key")
    metas = shard_metas(shards, "test")
    m = res["competition5"]
    checked = 0
    for name in COMPETITION_LABELS:
        mean = (singles[0][f"score:{name}"] + singles[1].loc[singles[0].index, f"score:{name}"]) / 2
        np.testing.assert_allclose(ens.loc[mean.index, f"score:{name}"], mean, rtol=1e-5)
        y = np.array([_policy_exclude(metas[k]["labels"].get(name)) for k in mean.index])
        keep = ~np.isnan(y)
        if 0 < y[keep].sum() < keep.sum():
            assert m["classes"][name]["auroc"] == pytest.approx(roc_auc_score(y[keep], mean[keep]), abs=1e-5)
            checked += 1
    assert checked >= 3


def test_assign_class_follows_the_gloria_rule():
    base = {n: 0 for n in CHEXPERT_LABELS}
    assert assign_class({**base, "Edema": 1}, True) == ("Edema", "eligible")
    assert assign_class({**base, "Edema": 1, "No Finding": 1}, True)[0] == "Edema"  # No Finding is ignored
    assert assign_class({**base, "Edema": 1}, False) == (None, "not_frontal")
    assert assign_class({**base, "Edema": 1, "Atelectasis": 1}, True)[1] == "several_competition_findings"
    assert assign_class({**base, "Edema": 1, "Fracture": -1}, True)[1] == "other_label_not_negative"
    assert assign_class({**base, "Edema": 1, "Fracture": None}, True)[0] == "Edema"
    assert assign_class({**base, "Edema": 1, "Fracture": None}, True, blank_as_negative=False)[0] is None
    assert assign_class(base, True)[1] == "no_competition_finding"


def _chexpert_csv(path, n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        comp = COMPETITION_LABELS[i % 5] if rng.random() < 0.7 else None
        rows.append({"Path": f"CheXpert-v1.0/valid/patient{i:05d}/study1/view1_frontal.jpg", "Sex": "F",
                     "Age": 50, "Frontal/Lateral": "Lateral" if i % 9 == 0 else "Frontal", "AP/PA": "AP",
                     **_labels(rng, comp)})
    df = pd.DataFrame(rows)
    df.to_csv(path, index=False)
    return df


def test_chexpert_5x200_is_seeded_follows_the_rule_and_ignores_row_order(tmp_path):
    df = _chexpert_csv(tmp_path / "valid.csv")
    a = build_chexpert_5x200(tmp_path / "valid.csv", tmp_path / "a.csv", seed=3, per_class=10)
    b = build_chexpert_5x200(tmp_path / "valid.csv", tmp_path / "b.csv", seed=3, per_class=10)
    df.sample(frac=1.0, random_state=1).to_csv(tmp_path / "shuffled.csv", index=False)
    c = build_chexpert_5x200(tmp_path / "shuffled.csv", tmp_path / "c.csv", seed=3, per_class=10)
    d = build_chexpert_5x200(tmp_path / "valid.csv", tmp_path / "d.csv", seed=4, per_class=10)
    assert sha256_file(a) == sha256_file(b) == sha256_file(c) != sha256_file(d)
    meta = json.loads(a.with_suffix(".json").read_text())
    assert meta["seed"] == 3 and meta["list_sha256"] == sha256_file(a)
    assert meta["source"]["sha256"] == sha256_file(tmp_path / "valid.csv")
    lst = pd.read_csv(a)
    assert lst["class"].value_counts().to_dict() == {c: 10 for c in COMPETITION_LABELS}
    assert lst["Path"].is_unique
    src = df.set_index("Path")
    for path, cls in zip(lst["Path"], lst["class"]):
        row = src.loc[path]
        assert row["Frontal/Lateral"] == "Frontal" and row[cls] == 1
        others = [n for n in CHEXPERT_LABELS if n not in ("No Finding", cls)]
        assert all(pd.isna(row[n]) or row[n] == 0 for n in others)
    with pytest.raises(RadalignError, match="too few eligible images"):
        build_chexpert_5x200(tmp_path / "valid.csv", tmp_path / "e.csv", per_class=500)


def test_mimic_5x200_from_shards_one_per_study(shards, tmp_path):
    out = build_mimic_5x200(shards, tmp_path / "m.csv", split="test", seed=0, per_class=2)
    again = build_mimic_5x200(shards, tmp_path / "m2.csv", split="test", seed=0, per_class=2)
    assert sha256_file(out) == sha256_file(again)
    lst = pd.read_csv(out)
    assert lst["study_id"].is_unique and len(lst) == 10
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["reasons"]["not_frontal"] > 0 and len(meta["source"]["shard_sha256"]) == 4
    # the list evaluates as a multi-class subset of the shards
    cfg = ZeroshotConfig(checkpoints=["a"], data=str(shards), subset=str(out), prompts=["5x200"],
                         out=str(tmp_path / "ev"), bootstrap=20, cache=False)
    m = run_zeroshot(cfg, checkpoints=[Checkpoint("a", FakeEncoders())])["5x200"]
    assert m["multiclass"]["n_per_class"] == {c: 2 for c in COMPETITION_LABELS}
    assert m["data"]["n_images"] == 10


def test_cli_build_and_errors(tmp_path, capsys):
    _chexpert_csv(tmp_path / "valid.csv")
    rc = zs(["build-5x200", "--chexpert-csv", str(tmp_path / "valid.csv"), "--out",
               str(tmp_path / "l.csv"), "--per-class", "5", "--seed", "1"])
    assert rc == 0 and len(pd.read_csv(tmp_path / "l.csv")) == 25
    assert zs(["list-prompts"]) == 0
    assert "chexpert14" in capsys.readouterr().out
    rc = zs(["eval", "--csv", str(tmp_path / "valid.csv"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "--export RUN_OR_EXPORT" in capsys.readouterr().err
    rc = zs(["eval", "--export", str(tmp_path), "--csv", "x.csv", "--out", str(tmp_path / "o")])
    assert rc == 2 and "x.csv: no such file" in capsys.readouterr().err
    rc = zs(["eval", "--export", str(tmp_path), "--csv", str(tmp_path / "valid.csv"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "not a radalign export or run folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# The real export and the real synthetic shards (conftest fixtures).


def test_real_export_on_synthetic_shards(request, tmp_path, capsys):
    pytest.importorskip("radalign.pretrain.models")
    pytest.importorskip("radalign.data.synth")
    from tests.test_zeroshot import _brute_patient_ci

    export, shards_root = request.getfixturevalue("tiny_export"), request.getfixturevalue("synth_shards")
    out = tmp_path / "zs"
    rc = zs(["eval", "--export", str(export), "--shards", str(shards_root), "--split", "test",
             "--prompts", "chexpert14", "--out", str(out), "--bootstrap", "50", "--blank", "negative"])
    assert rc == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["classes"]) == set(CHEXPERT_LABELS)
    metas = shard_metas(shards_root, "test")
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == m["data"]["n_scored"] == len(metas)  # every test image of the tars, none lost
    subjects = [str(metas[k]["subject_id"]) for k in preds["key"]]
    assert m["macro"]["unit"] == "patient" and m["macro"]["n_units"] == len(set(subjects))
    assert m["bootstrap"]["unit"] == "patient" and m["data"]["n_patients"] == len(set(subjects))
    scored = 0
    for name in CHEXPERT_LABELS:
        y = np.array([_policy_blank_negative(metas[k]["labels"].get(name)) for k in preds["key"]])
        s = preds[f"score:{name}"].to_numpy()
        np.testing.assert_array_equal(np.isnan(y), preds[f"label:{name}"].isna().to_numpy())
        keep = ~np.isnan(y)
        c = m["classes"][name]
        assert c["n_excluded"] == int((~keep).sum())
        if not 0 < y[keep].sum() < keep.sum():
            assert c["auroc"] is None
            continue
        assert c["auroc"] == pytest.approx(roc_auc_score(y[keep], s[keep]), abs=1e-6)
        lo, hi = _brute_patient_ci(y, s, subjects, 50, 0)
        assert (c["ci_low"], c["ci_high"]) == pytest.approx((lo, hi), abs=1e-6)
        scored += 1
    assert scored >= 2
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "metrics.md").read_text()
    assert f"over patients ({len(set(subjects))} patients" in md
    assert f"{len(set(subjects))} patients resampled" in printed


def test_real_export_on_contract_shards(request, shards, tmp_path):
    """The real `load_encoders` + `make_eval_loader` path, on shards written to the §1 format."""
    pytest.importorskip("radalign.pretrain.models")
    export = request.getfixturevalue("tiny_export")
    out = tmp_path / "zs"
    rc = zs(["eval", "--export", str(export), "--export", str(export), "--shards", str(shards), "--prompts",
             "competition5", "--out", str(out), "--bootstrap", "30", "--val-split", "validate"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["skipped"] == {"bad_image": 1} and m["data"]["n_images"] == 59
    assert m["threshold_metrics"]["available"]
    assert len(m["checkpoints"]) == 2 and m["checkpoints"][0]["checksum"] == m["checkpoints"][1]["checksum"]
    assert set(m["classes"]) == set(COMPETITION_LABELS)

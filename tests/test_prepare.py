"""`data prepare` / `prepare-csv`: MIMIC joins, shard contents against the source files, skips counted by reason,
resume, parallel = serial, image modes, and bad input."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.labels import CHEXPERT_LABELS
from data.mimic import parse_label, parse_study_datetime, stable_unit
from data.prepare import SKIP_REASONS, PrepareConfig, _target_size, prepare, to_gray8
from data.sections import parse_report, training_text
from radalign import RadalignError
from radalign.config import ConfigError, load_config
from radalign.io import sha256_file

SIZE = 48  # stored short side: below the synthetic 64 px, so resizing is exercised


def _cfg(out, root=None, **kw) -> PrepareConfig:
    base = {"out": str(out), "image_size": SIZE, "shard_size": 8}
    if root is not None:
        base.update(mimic_cxr=str(root / "mimic-cxr-jpg"), reports=str(root / "mimic-cxr-reports"))
    return load_config(PrepareConfig, {**base, **kw})


def _read_csv_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def read_shards(out: Path, manifest: dict) -> dict[str, dict]:
    """key -> {jpg: PIL image, txt: str, json: dict, shard: path}, reading every shard the manifest lists."""
    samples: dict[str, dict] = {}
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            path = out / shard["path"]
            assert sha256_file(path) == shard["sha256"]
            members: dict[str, dict] = {}
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
            assert len(members) == shard["samples"]
            for key, mem in members.items():
                assert set(mem) == {"jpg", "txt", "json"}
                assert key not in samples, f"{key} in two shards"
                meta = json.loads(mem["json"])
                assert meta["split"] == split
                samples[key] = {"jpg": Image.open(io.BytesIO(mem["jpg"])), "txt": mem["txt"].decode("utf-8"),
                                "json": meta, "shard": shard["path"]}
        assert entry["samples"] == sum(s["samples"] for s in entry["shards"])
    return samples


@pytest.fixture(scope="module")
def prepared(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    manifest = prepare(_cfg(out, synth_root), progress=False)
    return out, manifest


# ----------------------------------------------------------------------------------------------------------
# Values.


@pytest.mark.parametrize("date,time,expected", [
    ("21800506", "80556.875", "2180-05-06T08:05:56.875"),
    ("21800506", "235959", "2180-05-06T23:59:59"),
    ("21800506", "5.5", "2180-05-06T00:00:05.5"),
    ("21800506", "120000.000", "2180-05-06T12:00:00"),
    (21511231, 93000.25, "2151-12-31T09:30:00.25"),
    ("21800506", "", "2180-05-06T00:00:00"),
    ("21800230", "80556.875", None),      # 30 February
    ("21800506", "250000", None),         # hour 25
    ("", "80556.875", None),
    ("2180-05-06", "80556.875", None),
])
def test_study_datetime(date, time, expected):
    assert parse_study_datetime(date, time) == expected


def test_label_values():
    assert [parse_label(v) for v in ("1.0", "0.0", "-1.0", "", None, float("nan"), "1", " -1 ")] == \
        [1, 0, -1, None, None, None, 1, -1]
    with pytest.raises(ValueError, match="'yes'"):
        parse_label("yes")


def test_resize_keeps_aspect_and_never_upscales():
    assert _target_size(2000, 2500, 512) == (512, 640)
    assert _target_size(3000, 2000, 512) == (768, 512)
    assert _target_size(300, 400, 512) == (300, 400)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "I", "F", "1", "LA", "CMYK"])
def test_any_mode_becomes_8bit_grey(mode):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(12, 10), dtype=np.uint8)
    img = Image.fromarray(grey).convert(mode) if mode not in ("I;16", "I", "F") else None
    if mode == "I;16":  # a 12-bit radiograph: values 0..4095 must be rescaled, not clipped at 255
        img = Image.fromarray(grey.astype(np.uint16) * 16)
    elif mode in ("I", "F"):
        img = Image.fromarray(grey.astype(np.int32 if mode == "I" else np.float32) * 1000 - 7)
    assert img.mode == mode
    out = to_gray8(img)
    assert out.mode == "L" and out.size == (10, 12)
    arr = np.asarray(out).astype(int)
    if mode in ("L", "RGB", "P", "LA", "RGBA"):
        assert np.abs(arr - grey).max() <= 1
    elif mode in ("I;16", "I", "F"):  # min..max -> 0..255
        g = grey.astype(float)
        lo, hi = g.min(), g.max()
        assert np.abs(arr - np.rint((g - lo) * 255 / (hi - lo))).max() <= 1


def test_transparent_pixels_become_black():
    rgba = Image.new("RGBA", (4, 4), (200, 200, 200, 255))
    rgba.putpixel((0, 0), (255, 255, 255, 0))
    out = to_gray8(rgba)
    assert out.getpixel((0, 0)) == 0 and out.getpixel((1, 1)) == 200


# ----------------------------------------------------------------------------------------------------------
# MIMIC round trip.


def test_shards_match_the_source_files(prepared, synth_root):
    out, manifest = prepared
    samples = read_shards(out, manifest)
    jpg = synth_root / "mimic-cxr-jpg"
    meta = {r["dicom_id"]: r for r in _read_csv_gz(jpg / "mimic-cxr-2.0.0-metadata.csv.gz")}
    split = {r["dicom_id"]: r["split"] for r in _read_csv_gz(jpg / "mimic-cxr-2.0.0-split.csv.gz")}
    labels = {int(r["study_id"]): r for r in _read_csv_gz(jpg / "mimic-cxr-2.0.0-chexpert.csv.gz")}

    frontal = {d for d, r in meta.items() if r["ViewPosition"] in ("PA", "AP")}
    assert set(samples) == frontal  # the synthetic set has no missing or corrupt files
    assert manifest["skipped"] == {**dict.fromkeys(SKIP_REASONS, 0), "filtered_view": len(meta) - len(frontal)}
    assert manifest["notes"]["latin1_reports"] >= 1
    uncertain = 0
    for key, s in samples.items():
        m, row = meta[key], s["json"]
        assert row["dicom_id"] == key and row["view"] == m["ViewPosition"]
        assert (row["subject_id"], row["study_id"]) == (int(m["subject_id"]), int(m["study_id"]))
        assert row["split"] == split[key]
        assert row["study_datetime"] == parse_study_datetime(m["StudyDate"], m["StudyTime"]) is not None
        source = labels.get(int(m["study_id"]))
        expected = {n: (None if source is None or source[n] == "" else int(float(source[n])))
                    for n in CHEXPERT_LABELS}
        assert row["labels"] == expected
        uncertain += sum(v == -1 for v in expected.values())
        report = (synth_root / "mimic-cxr-reports" / "files" / f"p{m['subject_id'][:2]}" / f"p{m['subject_id']}"
                  / f"s{m['study_id']}.txt").read_bytes().decode("latin-1")
        sections = parse_report(report)
        assert row["sections"] == sections
        assert s["txt"] == training_text(sections) != ""
        img = s["jpg"]
        assert img.mode == "L" and min(img.size) == SIZE
        with Image.open(jpg / "files" / f"p{m['subject_id'][:2]}" / f"p{m['subject_id']}" / f"s{m['study_id']}"
                        / f"{key}.jpg") as src:
            assert _target_size(*src.size, SIZE) == img.size
    assert uncertain > 0  # -1 survives as -1
    assert any(s["json"]["labels"]["No Finding"] is None for s in samples.values())  # blanks become null


def test_manifest_schema_and_order(prepared):
    out, manifest = prepared
    assert manifest["format"] == "radalign-shards/1" and manifest["source"] == "mimic-cxr"
    assert manifest["labels"] == list(CHEXPERT_LABELS)
    assert list(manifest["splits"]) == ["train", "validate", "test"]
    assert list(manifest["skipped"]) == list(SKIP_REASONS)
    opts = manifest["options"]
    assert (opts["views"], opts["text"], opts["image_size"], opts["shard_size"]) == \
        (["PA", "AP"], "findings+impression", SIZE, 8)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # Shards hold consecutive runs of each split in the seeded hash order.
    for entry in manifest["splits"].values():
        keys = []
        for shard in entry["shards"]:
            with tarfile.open(out / shard["path"]) as tar:
                keys += list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))
        assert keys == sorted(keys, key=lambda k: (stable_unit(0, k), k))
        assert all(s["samples"] == 8 for s in entry["shards"][:-1])
    rows = (out / "skipped.csv").read_text().splitlines()
    assert rows[0] == "reason,id" and len(rows) - 1 == sum(manifest["skipped"].values())


def test_views_all_and_text_mode(synth_root, tmp_path):
    m = prepare(_cfg(tmp_path, synth_root, views=["all"], text="impression", image_size=16), progress=False)
    samples = read_shards(tmp_path, m)
    assert m["skipped"]["filtered_view"] == 0
    assert {s["json"]["view"] for s in samples.values()} >= {"PA", "AP", "LATERAL"}
    for s in samples.values():
        assert s["txt"] == training_text(s["json"]["sections"], "impression")


# ----------------------------------------------------------------------------------------------------------
# Bad items inside the dataset: skipped, counted, logged with their id, never fatal.


@pytest.fixture()
def damaged(synth_root, tmp_path):
    root = tmp_path / "synth"
    shutil.copytree(synth_root / "mimic-cxr-jpg", root / "mimic-cxr-jpg")
    shutil.copytree(synth_root / "mimic-cxr-reports", root / "mimic-cxr-reports")
    meta = _read_csv_gz(root / "mimic-cxr-jpg" / "mimic-cxr-2.0.0-metadata.csv.gz")
    frontal = [r for r in meta if r["ViewPosition"] in ("PA", "AP")]
    per_study: dict[str, list[dict]] = {}
    for r in frontal:
        per_study.setdefault(r["study_id"], []).append(r)
    singles = [rows[0] for rows in per_study.values() if len(rows) == 1]

    def image(r):
        return (root / "mimic-cxr-jpg" / "files" / f"p{r['subject_id'][:2]}" / f"p{r['subject_id']}"
                / f"s{r['study_id']}" / f"{r['dicom_id']}.jpg")

    def report(r):
        return (root / "mimic-cxr-reports" / "files" / f"p{r['subject_id'][:2]}" / f"p{r['subject_id']}"
                / f"s{r['study_id']}.txt")

    gone, corrupt, no_report, empty = singles[:4]
    image(gone).unlink()
    image(corrupt).write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    report(no_report).unlink()
    report(empty).write_text(" \n                                 FINAL REPORT\n INDICATION:  cough\n")
    expected = {"missing_image": gone["dicom_id"], "unreadable_image": corrupt["dicom_id"],
                "missing_report": no_report["dicom_id"], "empty_text": empty["dicom_id"]}
    return root, expected, len(frontal)


def test_bad_items_are_counted_by_reason_and_logged(damaged, tmp_path, caplog):
    root, expected, n_frontal = damaged
    m = prepare(_cfg(tmp_path / "out", root), progress=False)
    for reason in expected:
        assert m["skipped"][reason] == 1, reason
    samples = read_shards(tmp_path / "out", m)
    assert len(samples) == n_frontal - 4 and not set(expected.values()) & set(samples)
    err = caplog.text
    for reason, key in expected.items():
        assert f"skipped {reason}: {key}" in err
    listed = (tmp_path / "out" / "skipped.csv").read_text().splitlines()
    for reason, key in expected.items():
        assert f"{reason},{key}" in listed
    assert "cough" not in err  # report text never reaches the log


# ----------------------------------------------------------------------------------------------------------
# Resume and parallelism.


def _without_created(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "created"}


def test_interrupted_run_resumes_to_the_same_bytes(prepared, synth_root, tmp_path, monkeypatch):
    ref_out, reference = prepared
    import data.prepare as prep

    real, calls = prep.write_shard, []

    def dies_after_two(task):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(task["path"])
        return real(task)

    monkeypatch.setattr(prep, "write_shard", dies_after_two)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(out, synth_root), progress=False)
    assert not (out / "manifest.json").exists()
    state = json.loads((out / "prepare-state.json").read_text())
    assert sorted(state["shards"]) == sorted(calls)
    mtimes = {p: (out / p).stat().st_mtime_ns for p in calls}
    (out / "train" / ".shard-000099.tar.tmp-123").write_bytes(b"half a shard")  # left by a killed worker

    monkeypatch.setattr(prep, "write_shard", lambda task: calls.append(task["path"]) or real(task))
    resumed = prepare(_cfg(out, synth_root), progress=False)
    assert _without_created(resumed) == _without_created(reference)
    assert {p: (out / p).stat().st_mtime_ns for p in mtimes} == mtimes  # complete shards left alone
    n_shards = sum(len(e["shards"]) for e in reference["splits"].values())
    assert len(calls) == n_shards  # 2 before the interruption + the rest, nothing twice
    assert not list(out.rglob("*.tmp-*"))

    # A deleted shard is the only one rewritten, byte-identical.
    victim = reference["splits"]["train"]["shards"][1]["path"]
    (out / victim).unlink()
    calls.clear()
    again = prepare(_cfg(out, synth_root), progress=False)
    assert calls == [victim] and _without_created(again) == _without_created(reference)


def test_changed_options_refuse_to_mix_unless_overwrite(synth_root, tmp_path):
    prepare(_cfg(tmp_path, synth_root, image_size=16), progress=False)
    with pytest.raises(RadalignError, match="image_size: 16 -> 24"):
        prepare(_cfg(tmp_path, synth_root, image_size=24), progress=False)
    m = prepare(_cfg(tmp_path, synth_root, image_size=24), overwrite=True, progress=False)
    assert all(min(s["jpg"].size) == 24 for s in read_shards(tmp_path, m).values())


def test_two_workers_write_the_same_shards(prepared, synth_root, tmp_path):
    _, reference = prepared
    m = prepare(_cfg(tmp_path, synth_root, workers=2), progress=False)
    assert m["splits"] == reference["splits"]


# ----------------------------------------------------------------------------------------------------------
# prepare-csv.


def _write_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(90, 70), dtype=np.uint8)
    images = {
        "rgb.png": Image.fromarray(np.stack([grey] * 3, -1)),
        "rgba.png": Image.fromarray(np.stack([grey] * 3 + [np.full_like(grey, 255)], -1)),
        "palette.png": Image.fromarray(grey).convert("P"),
        "deep.png": Image.fromarray(grey.astype(np.uint16) * 16),
        "small.jpg": Image.fromarray(grey[:30, :20]),
    }
    for name, img in images.items():
        img.save(folder / name)
    return {name: folder / name for name in images}


def _csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_prepare_csv_any_image_mode_and_row_rules(tmp_path):
    paths = _write_images(tmp_path / "imgs")
    blank = dict.fromkeys(CHEXPERT_LABELS, "")
    rows = [
        {"Path": "imgs/rgb.png", "Report": "Heart enlarged.", "Split": "train", "pid": "a", **blank,
         "Cardiomegaly": "1.0", "Edema": "-1.0"},
        {"Path": "imgs/rgba.png", "Report": "Clear.", "Split": "val", "pid": "b", **blank, "Edema": "0"},
        {"Path": "imgs/palette.png", "Report": "Clear lungs.", "Split": "valid", "pid": "b", **blank},
        {"Path": str(paths["deep.png"]), "Report": "Nodule.", "Split": "test", "pid": "c", **blank},
        {"Path": "imgs/rgb.png", "Report": "Same image, second read.", "Split": "train", "pid": "a", **blank},
        {"Path": "imgs/small.jpg", "Report": "  ", "Split": "train", "pid": "d", **blank},
        {"Path": "imgs/nowhere.png", "Report": "Lost.", "Split": "train", "pid": "d", **blank},
        {"Path": "imgs/small.jpg", "Report": "Small.", "Split": "TRAIN", "pid": "d", **blank},
    ]
    table = _csv(tmp_path / "table.csv", rows)
    cfg = load_config(PrepareConfig, {"out": str(tmp_path / "out"), "csv": str(table), "image_col": "Path",
                                      "text_col": ["Report"], "split_col": "Split", "patient_col": "pid",
                                      "image_size": 64, "shard_size": 4})
    m = prepare(cfg, progress=False)
    samples = read_shards(tmp_path / "out", m)
    assert m["source"] == "csv"
    assert m["skipped"] == {**dict.fromkeys(SKIP_REASONS, 0), "empty_text": 1, "missing_image": 1}
    assert len(samples) == 6
    by_text = {s["txt"]: s for s in samples.values()}
    assert by_text["Heart enlarged."]["json"]["labels"]["Cardiomegaly"] == 1
    assert by_text["Heart enlarged."]["json"]["labels"]["Edema"] == -1
    assert by_text["Clear."]["json"]["labels"]["Edema"] == 0
    assert by_text["Clear."]["json"]["labels"]["No Finding"] is None
    assert {by_text[t]["json"]["split"] for t in ("Clear.", "Clear lungs.")} == {"validate"}
    assert by_text["Small."]["json"]["split"] == "train"
    # The same image on two rows: two samples, distinct keys, identical pixels.
    a, b = by_text["Heart enlarged."], by_text["Same image, second read."]
    assert a["json"]["dicom_id"] != b["json"]["dicom_id"]
    assert np.array_equal(np.asarray(a["jpg"]), np.asarray(b["jpg"]))
    for s in samples.values():
        assert s["jpg"].mode == "L" and "." not in s["json"]["dicom_id"]
        assert s["json"]["subject_id"] in ("a", "b", "c", "d")
    assert by_text["Small."]["jpg"].size == (20, 30)  # never upscaled
    assert by_text["Heart enlarged."]["jpg"].size == (64, 82)
    deep = np.asarray(by_text["Nodule."]["jpg"]).astype(int)
    assert deep.max() >= 250 and deep.min() <= 5  # 16-bit range rescaled, not clipped to white


def test_prepare_csv_split_by_patient(tmp_path):
    from data.prepare_csv import csv_records

    rows = [{"img": f"x{i}.png", "text": "t", "patient": f"p{i % 300}"} for i in range(900)]
    table = _csv(tmp_path / "t.csv", rows)
    cfg = load_config(PrepareConfig, {"out": str(tmp_path), "csv": str(table), "image_col": "img",
                                      "text_col": ["text"], "patient_col": "patient", "seed": 3})
    frame, _, _ = csv_records(cfg)
    per_patient = frame.groupby("subject_id")["split"].nunique()
    assert (per_patient == 1).all()  # a patient never straddles splits
    share = frame.drop_duplicates("subject_id")["split"].value_counts(normalize=True)
    assert 0.72 < share["train"] < 0.88 and 0.05 < share["validate"] < 0.15 and 0.05 < share["test"] < 0.15
    assert frame["image"].iloc[0] == str(tmp_path / "x0.png")  # relative to the CSV's folder
    again, _, _ = csv_records(cfg)
    assert again["split"].tolist() == frame["split"].tolist()
    other = load_config(PrepareConfig, {**cfg.__dict__, "seed": 4})
    assert csv_records(other)[0]["split"].tolist() != frame["split"].tolist()


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file / column / value and the fix.


def test_every_config_field_is_documented():
    from radalign.config import describe

    assert not [key for key, _, doc in describe(PrepareConfig) if not doc]


def test_config_lists_every_problem():
    with pytest.raises(ConfigError) as e:
        load_config(PrepareConfig, {"out": "x", "mimic_cxr": "a", "text": "findings+impresion",
                                    "shard_size": 0, "views": []})
    msg = str(e.value)
    assert "reports: required" in msg and "did you mean 'findings+impression'" in msg
    assert "shard_size" in msg and "views" in msg
    with pytest.raises(ConfigError, match="image_col: required"):
        load_config(PrepareConfig, {"out": "x", "csv": "t.csv", "text_col": ["r"]})


def test_missing_files_and_columns_are_named(synth_root, tmp_path):
    root = tmp_path / "jpg"
    shutil.copytree(synth_root / "mimic-cxr-jpg", root, ignore=shutil.ignore_patterns("files"))
    (root / "files" / "p10").mkdir(parents=True)
    reports = synth_root / "mimic-cxr-reports"
    (root / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(RadalignError, match="mimic-cxr-2.0.0-split.csv.gz: not found"):
        prepare(_cfg(tmp_path / "o", mimic_cxr=str(root), reports=str(reports)), progress=False)
    meta = root / "mimic-cxr-2.0.0-metadata.csv.gz"
    rows = _read_csv_gz(meta)
    with gzip.open(meta, "wt", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in rows[0] if c != "StudyTime"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    shutil.copy(synth_root / "mimic-cxr-jpg" / "mimic-cxr-2.0.0-split.csv.gz", root)
    with pytest.raises(RadalignError, match=r"metadata.csv.gz: missing column\(s\) 'StudyTime'"):
        prepare(_cfg(tmp_path / "o", mimic_cxr=str(root), reports=str(reports)), progress=False)
    with pytest.raises(RadalignError, match="no files/ folder"):
        prepare(_cfg(tmp_path / "o", mimic_cxr=str(root), reports=str(tmp_path / "o")), progress=False)


def test_bad_csv_values_are_named(tmp_path):
    table = _csv(tmp_path / "t.csv", [{"img": "a.png", "text": "t", "split": "dev", "Cardiomegaly": "1"}])
    base = {"out": str(tmp_path / "o"), "csv": str(table), "image_col": "img", "text_col": ["text"]}
    with pytest.raises(RadalignError, match="column 'split' has value.*'dev'"):
        prepare(load_config(PrepareConfig, {**base, "split_col": "split"}), progress=False)
    with pytest.raises(RadalignError, match="did you mean 'Cardiomegaly'"):
        prepare(load_config(PrepareConfig, {**base, "label_cols": ["Cardiomegally"]}), progress=False)
    with pytest.raises(RadalignError, match=r"t.csv: missing column\(s\) 'Report'"):
        prepare(load_config(PrepareConfig, {**base, "text_col": ["Report"]}), progress=False)


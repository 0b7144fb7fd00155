"""`data prepare` / `prepare-csv`: MIMIC joins, shard contents against the source files, skips counted by reason,
resume, parallel = serial, image modes, and bad input."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from radalign.data.images import target_size as _target_size
from radalign.data.images import to_gray8
from radalign.data.labels import CHEXPERT_LABELS
from radalign.data.mimic import parse_label, parse_study_datetime, stable_unit
from radalign.data.prepare import SKIP_REASONS, PrepareConfig, prepare

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


_RSS_SCRIPT = """
import sys
from radalign.data.images import OversizedImageError, open_image, to_gray8

def peak_kb():  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's peak over the exec)
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])

import numpy, PIL.Image, PIL.PngImagePlugin  # noqa: E401 - imported before the baseline
path, limit = sys.argv[1], None if sys.argv[2] == "none" else int(sys.argv[2])
base = peak_kb()
try:
    result = to_gray8(open_image(path, max_pixels=limit)).mode
except OversizedImageError:
    result = "oversized"
print(result, peak_kb() - base)
"""


def _peak_rss_kb(path: Path, limit: str) -> tuple[str, int]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), limit], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent.parent).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS read from /proc (Linux)")
def test_oversized_16bit_png_is_refused_before_decoding_and_decoded_in_blocks(tmp_path):
    png = tmp_path / "deep.png"
    arr = (np.arange(3000 * 3000, dtype=np.uint32) % 4096).astype(np.uint16).reshape(3000, 3000)
    Image.fromarray(arr).save(png)  # 9 Mpx, 18 MB of pixels, ~0.1 MB on disk
    result, kb = _peak_rss_kb(png, "1000000")
    assert result == "oversized" and kb < 12_000  # the header was read, the pixels never
    result, kb = _peak_rss_kb(png, "none")
    # decoded: 18 MB image + its array + 9 MB output + one block; a float64 copy of the image alone is 72 MB
    assert result == "L" and 18_000 < kb < 100_000


def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A valid 1-bit PNG of w x h black pixels, streamed (a few KB on disk, never held in memory)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z, row, parts = zlib.compressobj(9), b"\x00" * (1 + (w + 7) // 8), []
    for _ in range(h):
        parts.append(z.compress(row))
    parts.append(z.flush())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_an_oversized_error_naming_the_limit(tmp_path):
    from radalign.data.images import DEFAULT_MAX_PIXELS, OversizedImageError, open_image

    bomb = _png_header_only(tmp_path / "bomb.png", 14000, 14000)  # above PIL's own 2 x 89 Mpx error limit
    with pytest.raises(OversizedImageError, match=r"bomb.png: 14000 x 14000 = 196,000,000 pixels, above the "
                                                  r"limit of 50,000,000; raise max_pixels"):
        open_image(bomb)
    assert isinstance(OversizedImageError("x"), RadalignError) and DEFAULT_MAX_PIXELS == 50_000_000
    small = _png_header_only(tmp_path / "ok.png", 300, 200)
    assert open_image(small, max_pixels=60_000).size == (300, 200)  # exactly at the limit: read


def test_twelve_bit_png_read_like_the_zero_shot_reader_is_not_white(tmp_path):
    """open_image + eval_transform (what zeroshot/retrieval do with a loose file) keep a 12-bit range."""
    from radalign.data.images import open_image
    from radalign.data.transforms import eval_transform

    arr = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "x.png")
    img = open_image(tmp_path / "x.png")
    assert img.mode.startswith("I")
    x = eval_transform(32, channels=1, mean=[0.0], std=[1.0])(img)  # [1, 32, 32]
    assert 0.45 < float(x.mean()) < 0.55 and float(x.min()) < 0.02 and float(x.max()) > 0.98
    assert float((np.asarray(img.convert("L")) == 255).mean()) > 0.9  # what convert("L") first would give


# ----------------------------------------------------------------------------------------------------------
# MIMIC round trip.


# A hand-made MIMIC-CXR layout of 3 studies whose every stored value is written out below by hand.
_REPORTS = {
    "s50000001": (b"                                 FINAL REPORT\n"
                  b" EXAMINATION:  CHEST (PA AND LAT)\n \n INDICATION:  ___F with cough\n \n"
                  b" FINDINGS:\n \n The lungs are clear.  No pleural\n effusion.\n \n"
                  b" IMPRESSION:\n \n No acute cardiopulmonary process.\n"),
    "s50000002": (b"                                 FINAL REPORT\n"
                  b" HISTORY:  Shortness of breath.\n \n CONCLUSION:  Small left pleural effusion.\n"),
    "s50000003": (b"                                 FINAL REPORT\n"
                  b" FINDINGS:  Heart size is normal.\n \n IMPRESSION:  Right lower lobe opacity (\xb5 nodule).\n"),
}
_MINI_META = [  # dicom_id, subject_id, study_id, ViewPosition, StudyDate, StudyTime, split
    ("d1", "10000001", "50000001", "PA", "21800506", "80556.875", "train"),
    ("d1lat", "10000001", "50000001", "LATERAL", "21800506", "80556.875", "train"),
    ("d2", "10000002", "50000002", "AP", "21511231", "235959", "validate"),
    ("d3", "13000003", "50000003", "PA", "21800102", "", "test"),
]


def _write_csv_gz(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture()
def mini_mimic(tmp_path) -> Path:
    jpg, rep = tmp_path / "mimic-cxr-jpg", tmp_path / "mimic-cxr-reports"
    jpg.mkdir()
    _write_csv_gz(jpg / "mimic-cxr-2.0.0-metadata.csv.gz",
                  ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                   "Rows", "Columns", "StudyDate", "StudyTime"],
                  [[d, su, st, "CHEST", v, "60", "80", date, time] for d, su, st, v, date, time, _ in _MINI_META])
    _write_csv_gz(jpg / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
                  [[d, st, su, sp] for d, su, st, _, _, _, sp in _MINI_META])
    labels = {name: "" for name in CHEXPERT_LABELS}
    first = {**{n: "0.0" for n in CHEXPERT_LABELS}, "Cardiomegaly": "1.0", "Edema": "-1.0", "No Finding": ""}
    third = {**labels, "Lung Opacity": "1.0"}
    _write_csv_gz(jpg / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *CHEXPERT_LABELS],
                  [["10000001", "50000001", *first.values()], ["13000003", "50000003", *third.values()]])
    rng = np.random.default_rng(7)
    for d, su, st, *_ in _MINI_META:
        folder = jpg / "files" / f"p{su[:2]}" / f"p{su}" / f"s{st}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (60, 80), dtype=np.uint8)).save(folder / f"{d}.jpg")
        report = rep / "files" / f"p{su[:2]}" / f"p{su}" / f"s{st}.txt"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_bytes(_REPORTS[f"s{st}"])
    return tmp_path


def _mini_cfg(out, root, **kw) -> PrepareConfig:
    return _cfg(out, root, **kw)


def test_mini_mimic_samples_hold_hand_written_values(mini_mimic, tmp_path):
    m = prepare(_mini_cfg(tmp_path / "out", mini_mimic), progress=False)
    samples = read_shards(tmp_path / "out", m)
    assert sorted(samples) == ["d1", "d2", "d3"]  # the LATERAL image is filtered by the default PA,AP
    assert m["skipped"]["filtered_view"] == 1 and m["notes"]["latin1_reports"] == 1
    assert m["notes"]["no_labels"] == 1  # study 50000002 is absent from the label file
    zero = dict.fromkeys(CHEXPERT_LABELS, 0)
    expected = {
        "d1": {"subject_id": 10000001, "study_id": 50000001, "dicom_id": "d1", "split": "train", "view": "PA",
               "study_datetime": "2180-05-06T08:05:56.875",
               "labels": {**zero, "Cardiomegaly": 1, "Edema": -1, "No Finding": None},
               "sections": {"findings": "The lungs are clear. No pleural effusion.",
                            "impression": "No acute cardiopulmonary process.", "last_paragraph": None,
                            "indication": "___F with cough"}},
        "d2": {"subject_id": 10000002, "study_id": 50000002, "dicom_id": "d2", "split": "validate", "view": "AP",
               "study_datetime": "2151-12-31T23:59:59", "labels": dict.fromkeys(CHEXPERT_LABELS),
               "sections": {"findings": None, "impression": "Small left pleural effusion.", "last_paragraph": None,
                            "indication": "Shortness of breath."}},
        "d3": {"subject_id": 13000003, "study_id": 50000003, "dicom_id": "d3", "split": "test", "view": "PA",
               "study_datetime": "2180-01-02T00:00:00",
               "labels": {**dict.fromkeys(CHEXPERT_LABELS), "Lung Opacity": 1},
               "sections": {"findings": "Heart size is normal.", "impression": "Right lower lobe opacity (\u00b5 nodule).",
                            "last_paragraph": None, "indication": None}},
    }
    texts = {"d1": "The lungs are clear. No pleural effusion. No acute cardiopulmonary process.",
             "d2": "Small left pleural effusion.", "d3": "Heart size is normal. Right lower lobe opacity (\u00b5 nodule)."}
    for key, want in expected.items():
        assert samples[key]["json"] == want, key
        assert samples[key]["txt"] == texts[key], key
        assert samples[key]["jpg"].mode == "L" and samples[key]["jpg"].size == (64, 48)  # 80x60 -> short side 48


def test_mini_mimic_views_all_and_impression_text(mini_mimic, tmp_path):
    m = prepare(_mini_cfg(tmp_path / "out", mini_mimic, views=["all"], text="impression"), progress=False)
    samples = read_shards(tmp_path / "out", m)
    assert m["skipped"]["filtered_view"] == 0
    assert {k: s["txt"] for k, s in samples.items()} == {
        "d1": "No acute cardiopulmonary process.", "d1lat": "No acute cardiopulmonary process.",
        "d2": "Small left pleural effusion.", "d3": "Right lower lobe opacity (\u00b5 nodule)."}
    assert samples["d1lat"]["json"]["view"] == "LATERAL"


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


def test_shards_match_the_source_files(prepared, synth_root):
    """The synthetic set against its own source files, with checks that do not reuse the pipeline's parsers
    (exact section values are hand-checked on the mini set above)."""
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
        date, time = m["StudyDate"], m["StudyTime"].split(".")[0].zfill(6)
        assert row["study_datetime"].startswith(f"{date[:4]}-{date[4:6]}-{date[6:]}T{time[:2]}:{time[2:4]}:{time[4:]}")
        source = labels.get(int(m["study_id"]))
        expected = {n: (None if source is None or source[n] == "" else int(float(source[n])))
                    for n in CHEXPERT_LABELS}
        assert row["labels"] == expected
        uncertain += sum(v == -1 for v in expected.values())
        report = (synth_root / "mimic-cxr-reports" / "files" / f"p{m['subject_id'][:2]}" / f"p{m['subject_id']}"
                  / f"s{m['study_id']}.txt").read_bytes().decode("latin-1")
        flat = " ".join(report.split())
        assert s["txt"] and all(part in flat for part in s["txt"].split(". ") if part)  # text from the report
        assert not re.search(r"\b(FINDINGS|IMPRESSION|INDICATION|FINAL REPORT):?", s["txt"])  # no headers
        for section in ("findings", "impression"):
            if row["sections"][section]:
                assert " ".join(_words(row["sections"][section])) in " ".join(_words(report))
        img = s["jpg"]
        assert img.mode == "L" and min(img.size) == SIZE
        with Image.open(jpg / "files" / f"p{m['subject_id'][:2]}" / f"p{m['subject_id']}" / f"s{m['study_id']}"
                        / f"{key}.jpg") as src:
            w, h = src.size
        assert img.size == ((SIZE, round(h * SIZE / w)) if w <= h else (round(w * SIZE / h), SIZE))
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
    for s in samples.values():  # impression mode: the impression when there is one (hand-checked on mini_mimic)
        sections = s["json"]["sections"]
        if sections["impression"]:
            assert s["txt"] == sections["impression"]
        elif sections["findings"]:
            assert s["txt"] == sections["findings"]


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
    import radalign.data.prepare as prep

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
    from radalign.data.prepare_csv import csv_records

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



# ----------------------------------------------------------------------------------------------------------
# Resume must verify what it reuses; interruption with workers; one writer per --out.


def _counting(monkeypatch, calls: list[str]):
    import radalign.data.prepare as prep

    real = prep.write_shard
    monkeypatch.setattr(prep, "write_shard", lambda task: calls.append(task["path"]) or real(task))


def test_damaged_finished_shard_of_the_same_size_is_rewritten(mini_mimic, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = prepare(_mini_cfg(out, mini_mimic), progress=False)
    shard = first["splits"]["train"]["shards"][0]
    tar = out / shard["path"]
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # inside the first member's bytes; same size, other content
    tar.write_bytes(bytes(data))
    assert tar.stat().st_size == len(data) and sha256_file(tar) != shard["sha256"]
    calls: list[str] = []
    _counting(monkeypatch, calls)
    again = prepare(_mini_cfg(out, mini_mimic), progress=False)
    assert calls == [shard["path"]]  # only the damaged one
    assert sha256_file(tar) == shard["sha256"] and again["splits"] == first["splits"]


def _interrupt_on_victim(task):
    """Runs in a spawned prepare worker: Ctrl-C arrives while writing the shard named by the env var."""
    import os as _os

    import radalign.data.prepare as prep

    if task["path"] == _os.environ["RADALIGN_TEST_VICTIM"]:
        raise KeyboardInterrupt
    return prep.write_shard(task)


def test_ctrl_c_with_two_workers_keeps_every_finished_shard(mini_mimic, tmp_path, monkeypatch):
    import radalign.data.prepare as prep

    out = tmp_path / "out"
    cfg = dict(views=["all"], shard_size=1)  # 4 shards: train/0, train/1, validate/0, test/0
    monkeypatch.setenv("RADALIGN_TEST_VICTIM", "train/shard-000001.tar")
    monkeypatch.setattr(prep, "write_shard", _interrupt_on_victim)  # pickled by name into the workers
    with pytest.raises(KeyboardInterrupt):
        prepare(_mini_cfg(out, mini_mimic, workers=2, **cfg), progress=False)
    monkeypatch.undo()
    finished = {str(p.relative_to(out)) for p in out.glob("*/shard-*.tar")}
    assert finished and "train/shard-000001.tar" not in finished  # the pool finished the others
    mtimes = {p: (out / p).stat().st_mtime_ns for p in finished}

    calls: list[str] = []
    _counting(monkeypatch, calls)
    m = prepare(_mini_cfg(out, mini_mimic, **cfg), progress=False)
    planned = {s["path"] for e in m["splits"].values() for s in e["shards"]}
    assert sorted(calls) == sorted(planned - finished)  # every shard a worker finished is reused
    assert {p: (out / p).stat().st_mtime_ns for p in finished} == mtimes
    state = json.loads((out / "prepare-state.json").read_text())
    assert set(state["shards"]) == planned and not list(out.rglob(".shard-*.done.json"))


def test_second_prepare_into_the_same_out_is_refused(mini_mimic, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    tmp_file = out / "train" / ".shard-000000.tar.tmp-999999"  # the first writer's half-written shard
    tmp_file.write_bytes(b"in progress")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from radalign.lock import output_lock\n"
                               f"with output_lock({str(out)!r}):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RadalignError, match=rf"{re.escape(str(out))} is in use by another process \(pid {holder.pid}"):
            prepare(_mini_cfg(out, mini_mimic), progress=False)
        assert tmp_file.read_bytes() == b"in progress"  # nothing of the first writer's was touched
    finally:
        holder.communicate("", timeout=30)
    assert prepare(_mini_cfg(out, mini_mimic), progress=False)["splits"]["train"]["samples"] == 1


# ----------------------------------------------------------------------------------------------------------
# Hostile CSV input: paths outside the root, huge images, header-only and non-UTF-8 tables.


def _csv_cfg(tmp_path, table, **kw) -> PrepareConfig:
    return load_config(PrepareConfig, {"out": str(tmp_path / "out"), "csv": str(table), "image_col": "img",
                                       "text_col": ["text"], "image_size": 64, "val_fraction": 0.0,
                                       "test_fraction": 0.0, **kw})


def test_prepare_csv_counts_paths_outside_the_root(tmp_path):
    root, secret = tmp_path / "root", tmp_path / "secret"
    for folder in (root / "imgs", secret):
        folder.mkdir(parents=True)
        Image.new("L", (40, 30), 99).save(folder / "x.jpg")
    rows = [{"img": "imgs/x.jpg", "text": "inside"}, {"img": "../secret/x.jpg", "text": "climbs out"},
            {"img": str(secret / "x.jpg"), "text": "absolute elsewhere"},
            {"img": str(root / "imgs" / "x.jpg"), "text": "absolute inside"},
            {"img": "imgs/../imgs/x.jpg", "text": "dots that stay inside"}]
    table = _csv(tmp_path / "t.csv", rows)
    m = prepare(_csv_cfg(tmp_path, table, image_root=str(root)), progress=False)
    samples = read_shards(tmp_path / "out", m)
    assert sorted(s["txt"] for s in samples.values()) == ["absolute inside", "dots that stay inside", "inside"]
    assert m["skipped"] == {**dict.fromkeys(SKIP_REASONS, 0), "outside_root": 2}
    listed = (tmp_path / "out" / "skipped.csv").read_text().splitlines()
    assert sorted(line.split(",")[0] for line in listed[1:]) == ["outside_root", "outside_root"]
    assert any(line.startswith("outside_root,r0000001-") for line in listed)

    m = prepare(_csv_cfg(tmp_path, table, image_root=str(root), allow_outside_root=True), overwrite=True,
                progress=False)
    assert m["splits"]["train"]["samples"] == 5 and m["skipped"]["outside_root"] == 0

    only_outside = _csv(tmp_path / "o.csv", rows[1:3])
    with pytest.raises(RadalignError, match=r"every image path \(2\) lies outside the image root .*"
                                            r"--image-root DIR.*--allow-outside-root"):
        prepare(_csv_cfg(tmp_path, only_outside, image_root=str(root)), overwrite=True, progress=False)


def _sixteen_bit_png(path: Path, w: int, h: int) -> Path:
    arr = (np.arange(w * h, dtype=np.uint32) % 4096).astype(np.uint16).reshape(h, w)  # 12-bit values
    Image.fromarray(arr).save(path)
    return path


def test_oversized_images_are_counted_and_large_jpegs_decoded_reduced(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _sixteen_bit_png(folder / "huge.png", 1200, 1000)  # 1.2 Mpx, no reduced decode for PNG
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1200), dtype=np.uint8)).save(
        folder / "huge.jpg", quality=90)  # 1.2 Mpx; at 1/2 scale 0.3 Mpx
    Image.new("L", (80, 60), 50).save(folder / "small.png")
    table = _csv(tmp_path / "t.csv", [{"img": "imgs/huge.png", "text": "png"}, {"img": "imgs/huge.jpg", "text": "jpg"},
                                      {"img": "imgs/small.png", "text": "small"}])
    m = prepare(_csv_cfg(tmp_path, table, max_pixels=400_000), progress=False)
    assert m["skipped"] == {**dict.fromkeys(SKIP_REASONS, 0), "oversized_image": 1}
    samples = {s["txt"]: s for s in read_shards(tmp_path / "out", m).values()}
    assert sorted(samples) == ["jpg", "small"]
    assert samples["jpg"]["jpg"].size == (77, 64)  # 600x500 after the 1/2 DCT decode -> short side 64
    assert "oversized_image,r0000000-imgs_huge_png" in (tmp_path / "out" / "skipped.csv").read_text()


def test_header_only_csv_is_an_error(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("img,text\n")
    with pytest.raises(RadalignError, match=r"t.csv: a header \(img, text\) but no data rows"):
        prepare(_csv_cfg(tmp_path, table), progress=False)


def test_non_utf8_csv_names_the_encoding_to_pass(tmp_path):
    Image.new("L", (40, 30), 99).save(tmp_path / "a.jpg")
    table = tmp_path / "t.csv"
    table.write_bytes("img,text\na.jpg,Cardiomégalie\n".encode("cp1252"))
    with pytest.raises(RadalignError, match=r"t.csv: not utf-8 text \(byte b'\\xe9' on line 2\); "
                                            r"pass --encoding cp1252"):
        prepare(_csv_cfg(tmp_path, table), progress=False)
    m = prepare(_csv_cfg(tmp_path, table, encoding="cp1252"), progress=False)
    assert [s["txt"] for s in read_shards(tmp_path / "out", m).values()] == ["Cardiomégalie"]
    with pytest.raises(ConfigError, match="encoding: 'klingon' is not a known text encoding"):
        _csv_cfg(tmp_path, table, encoding="klingon")


def test_state_of_an_older_version_without_the_new_options_still_resumes(mini_mimic, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(_mini_cfg(out, mini_mimic), progress=False)
    state_file = out / "prepare-state.json"
    state = json.loads(state_file.read_text())
    for key in ("max_pixels", "allow_outside_root", "encoding"):  # options added by this version
        del state["options"][key]
    state_file.write_text(json.dumps(state))
    calls: list[str] = []
    _counting(monkeypatch, calls)
    prepare(_mini_cfg(out, mini_mimic), progress=False)
    assert calls == []  # absent options read as their defaults: nothing rewritten
    with pytest.raises(RadalignError, match="max_pixels: 50000000 -> 1000"):
        prepare(_mini_cfg(out, mini_mimic, max_pixels=1000), progress=False)


# ----------------------------------------------------------------------------------------------------------
# The source registry.


def test_each_config_selects_its_registered_source(tmp_path):
    from radalign.data.prepare import SOURCES, source_of

    assert list(SOURCES) == ["csv", "dicom", "mimic-cxr"]
    mimic = _cfg(tmp_path, tmp_path)
    csv_cfg = load_config(PrepareConfig, {"out": str(tmp_path), "csv": "t.csv", "image_col": "p", "text_col": ["r"]})
    dicom = load_config(PrepareConfig, {**mimic.__dict__, "dicom": True})
    csv_dicom = load_config(PrepareConfig, {**csv_cfg.__dict__, "dicom": True})
    assert [source_of(c).name for c in (mimic, csv_cfg, dicom, csv_dicom)] == ["mimic-cxr", "csv", "dicom", "csv"]
    assert [c.source for c in (mimic, csv_cfg, dicom, csv_dicom)] == [  # the manifest's name, unchanged
        "mimic-cxr", "csv", "mimic-cxr-dicom", "csv-dicom"]


def test_a_registered_source_plugs_into_prepare(tmp_path, monkeypatch):
    """A new input format is one `register_source`: its rows go through the same shard writer (here a source
    that reads a CSV and rewrites every report; the shards hold the rewritten texts)."""
    import radalign.data.prepare as P
    from radalign.data.prepare_csv import csv_records

    monkeypatch.setattr(P, "SOURCES", dict(P.SOURCES))
    _write_images(tmp_path / "imgs")
    table = _csv(tmp_path / "t.csv", [{"img": f"imgs/{n}", "text": f"row {i}"}
                                      for i, n in enumerate(["rgb.png", "small.jpg", "palette.png"])])

    def shouting(cfg):
        frame, set_aside, notes = csv_records(cfg)
        frame["text"] = frame["text"].str.upper()
        return frame, set_aside, notes

    P.register_source(P.Source("shouting", lambda cfg: cfg.text_col == ["text"], shouting, "test"))
    with pytest.raises(RadalignError, match="source 'csv' is already registered"):
        P.register_source(P.Source("csv", lambda cfg: True, shouting, "test"))
    cfg = _csv_cfg(tmp_path, table)
    assert P.source_of(cfg).name == "shouting"
    m = prepare(cfg, progress=False)
    assert sorted(s["txt"] for s in read_shards(tmp_path / "out", m).values()) == ["ROW 0", "ROW 1", "ROW 2"]


def test_zero_shot_reads_a_csv_through_the_prepare_csv_reader(tmp_path):
    """One CSV reader: the same image column, the same resolved files, the same patients, whoever reads it."""
    from radalign.data.prepare_csv import csv_patients, find_image_column, read_image_rows

    rows = [{"id": "1", "Path": " a/patient00007/study1/view1_frontal.jpg ", "Edema": "1.0", "subject_id": ""},
            {"id": "2", "Path": "/abs/patient00008/study2/view1_frontal.jpg", "Edema": "", "subject_id": "9"}]
    table = _csv(tmp_path / "t.csv", rows)
    got = read_image_rows(table, allow_outside_root=True)
    assert got.image_col == "Path" and got.root == tmp_path
    assert got.images == ["a/patient00007/study1/view1_frontal.jpg", "/abs/patient00008/study2/view1_frontal.jpg"]
    assert got.files == [str(tmp_path / "a/patient00007/study1/view1_frontal.jpg"),
                         "/abs/patient00008/study2/view1_frontal.jpg"]
    assert got.frame["Edema"].tolist() == ["1.0", ""]  # text: a blank stays blank, never "nan"
    assert read_image_rows(table).outside == [False, True]  # prepare-csv's default refuses the absolute one
    # subject_id has a blank cell, so the patient comes from the path (CheXpert's patientNNNNN).
    assert csv_patients(got.frame, "Path") == (["patient00007", "patient00008"], "patientNNN in the image path")
    assert find_image_column(["x", "image", "path"], None, table) == "path"  # IMAGE_COLUMNS order
    with pytest.raises(RadalignError, match="--image-column 'img': not a column of .*t.csv"):
        read_image_rows(table, image_col="img")
    with pytest.raises(RadalignError, match="no image column"):
        find_image_column(["x"], None, table)

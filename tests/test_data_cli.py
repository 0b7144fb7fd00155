"""`radalign data`: every verb wired to its function, flags mapped onto PrepareConfig, helpful errors."""

from __future__ import annotations

import csv
import json

import pytest
import radalign.data.cli
from PIL import Image

from radalign.cli import Parser, new_parser, run_entry


def run(argv: list[str]) -> int:
    """`radalign data ...` through the same parser and error handling as `radalign.cli.main`.

    Only the data stage is registered, so these tests do not depend on the other stages' CLIs.
    """
    parser = new_parser("radalign", "test")
    radalign.data.cli.register(parser.add_subparsers(dest="stage", parser_class=Parser))
    args = parser.parse_args(argv)
    return run_entry(args.func, args)


def test_synth_no_images_no_icu_flags(tmp_path, capsys):
    """--no-images writes the tables and reports but no JPEG; --no-icu leaves out mimic-iv/icu; the marker
    records both, so a run with images is not mistaken for the finished image-less one."""
    full, bare = tmp_path / "full", tmp_path / "bare"
    args = ["--patients", "5", "--seed", "2", "--image-size", "32", "--no-progress"]
    assert run(["data", "synth", "--out", str(full), *args]) == 0
    assert run(["data", "synth", "--out", str(bare), *args, "--no-images", "--no-icu"]) == 0
    assert list(full.rglob("*.jpg")) and not list(bare.rglob("*.jpg"))
    assert (full / "mimic-iv" / "icu").is_dir() and not (bare / "mimic-iv" / "icu").exists()
    assert json.loads((bare / "synth.json").read_text())["args"] | {"images": True, "icu": True} == \
        json.loads((full / "synth.json").read_text())["args"]
    for rel in ("mimic-iv/hosp/labevents.csv.gz", "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz"):
        assert (bare / rel).read_bytes() == (full / rel).read_bytes()     # same tables, only the pixels differ
    capsys.readouterr()
    assert run(["data", "synth", "--out", str(bare), *args, "--no-images"]) == 0   # icu now wanted: redone
    assert "skipping" not in capsys.readouterr().out and (bare / "mimic-iv" / "icu").is_dir()

def test_synth_then_prepare_then_info(tmp_path, capsys):
    root, out = tmp_path / "synth", tmp_path / "shards"
    assert run(["data", "synth", "--out", str(root), "--patients", "6", "--seed", "1", "--image-size", "32",
                "--difficulty", "0.1", "--no-progress"]) == 0
    assert "patients 6" in capsys.readouterr().out
    assert json.loads((root / "synth.json").read_text())["patients"] == 6
    # a second run with the same arguments finds the finished set and skips it
    mtime = (root / "synth.json").stat().st_mtime_ns
    assert run(["data", "synth", "--out", str(root), "--patients", "6", "--seed", "1", "--image-size", "32",
                "--difficulty", "0.1", "--no-progress"]) == 0
    assert "skipping" in capsys.readouterr().out
    assert (root / "synth.json").stat().st_mtime_ns == mtime
    assert (root / "mimic-cxr-jpg" / "mimic-cxr-2.0.0-metadata.csv.gz").is_file()

    assert run(["data", "prepare", "--mimic-cxr", str(root / "mimic-cxr-jpg"), "--reports",
                str(root / "mimic-cxr-reports"), "--out", str(out), "--views", "PA, AP,LATERAL",
                "--image-size", "16", "--shard-size", "4", "--text", "impression", "--no-progress",
                "jpeg_quality=80"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    opts = manifest["options"]
    assert (opts["views"], opts["image_size"], opts["shard_size"], opts["text"], opts["jpeg_quality"]) == \
        (["PA", "AP", "LATERAL"], 16, 4, "impression", 80)
    printed = capsys.readouterr().out
    total = sum(e["samples"] for e in manifest["splits"].values())
    assert total > 0 and "samples in" in printed

    assert run(["data", "info", str(out)]) == 0
    info = capsys.readouterr().out
    lines = {line.split()[0]: line for line in info.splitlines()[1:]}
    for split, entry in manifest["splits"].items():
        assert f"{entry['samples']:,} samples in {len(entry['shards']):>5} shards" in lines[split]
    assert f"filtered_view {manifest['skipped']['filtered_view']:,}" in info
    assert run(["data", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == manifest


def test_prepare_csv_flags(tmp_path):
    Image.new("RGB", (40, 30), (90, 90, 90)).save(tmp_path / "a.png")
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "findings", "impression", "Cardiomegaly", "Edema", "who"])
        w.writerow(["a.png", "Big heart.", "Cardiomegaly.", "1.0", "", "p1"])
        w.writerow(["a.png", "", "Normal.", "0.0", "-1.0", "p2"])
    out = tmp_path / "out"
    assert run(["data", "prepare-csv", "--csv", str(tmp_path / "t.csv"), "--image-col", "file",
                "--text-col", "findings", "impression", "--label-cols", "cardiomegaly,Edema",
                "--patient-col", "who", "--out", str(out), "--image-size", "20", "--no-progress",
                "val_fraction=0", "test_fraction=0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 2 and manifest["source"] == "csv"
    import tarfile

    with tarfile.open(out / manifest["splits"]["train"]["shards"][0]["path"]) as tar:
        texts = {tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")}
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert texts == {"Big heart. Cardiomegaly.", "Normal."}
    by_subject = {m["subject_id"]: m for m in metas}
    assert by_subject["p1"]["labels"]["Cardiomegaly"] == 1 and by_subject["p2"]["labels"]["Edema"] == -1
    assert by_subject["p1"]["sections"]["findings"] == "Big heart."
    assert by_subject["p2"]["sections"]["impression"] == "Normal."


def test_misspelt_option_suggests_the_right_one(capsys):
    with pytest.raises(SystemExit) as e:
        run(["data", "prepare", "--out", "x", "--image-szie", "64"])
    assert e.value.code == 2
    assert "--image-size" in capsys.readouterr().err


def test_bad_values_are_one_error_listing_every_problem(tmp_path, capsys):
    rc = run(["data", "prepare", "--out", str(tmp_path), "--mimic-cxr", str(tmp_path), "--text", "impresion",
              "--shard-size", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "3 problem" in err
    assert "reports: required" in err and "did you mean 'impression'" in err and "shard_size" in err


def test_missing_inputs_are_named(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    rc = run(["data", "prepare", "--mimic-cxr", str(missing), "--reports", str(tmp_path), "--out",
              str(tmp_path / "o")])
    assert rc == 2 and f"--mimic-cxr {missing}: not a folder" in capsys.readouterr().err
    rc = run(["data", "prepare-csv", "--csv", str(tmp_path / "none.csv"), "--image-col", "p", "--text-col", "t",
              "--out", str(tmp_path / "o")])
    assert rc == 2 and "none.csv: not found" in capsys.readouterr().err
    assert run(["data", "info", str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_unknown_verb_suggests(capsys):
    with pytest.raises(SystemExit) as e:
        run(["data", "prepar"])
    assert e.value.code == 2
    assert "prepare" in capsys.readouterr().err


def _one_image_csv(tmp_path, body: bytes | None = None):
    Image.new("L", (40, 30), 90).save(tmp_path / "a.png")
    (tmp_path / "t.csv").write_bytes(body if body is not None else b"file,report\na.png,Clear.\n")
    return ["data", "prepare-csv", "--csv", str(tmp_path / "t.csv"), "--image-col", "file", "--text-col", "report",
            "--image-size", "20", "--no-progress", "val_fraction=0", "test_fraction=0"]


@pytest.mark.parametrize("out", ["/proc/radalign-test/x", "FILE"])
def test_unwritable_out_is_a_clear_error(tmp_path, capsys, out):
    if out == "FILE":
        out = str(tmp_path / "taken")
        (tmp_path / "taken").write_text("a file, not a folder")
    rc = run(_one_image_csv(tmp_path) + ["--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"--out {out}" in err and ("cannot create it" in err or "exists and is not a folder" in err)
    assert "choose" in err


def test_header_only_and_non_utf8_csv_are_clear_errors(tmp_path, capsys):
    rc = run(_one_image_csv(tmp_path, b"file,report\n") + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "but no data rows" in err and "Traceback" not in err
    argv = _one_image_csv(tmp_path, "file,report\na.png,Épanchement pleural.\n".encode("cp1252"))
    assert run(argv + ["--out", str(tmp_path / "o")]) == 2
    assert "pass --encoding cp1252" in capsys.readouterr().err
    assert run(argv + ["--out", str(tmp_path / "o"), "--encoding", "cp1252"]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["options"]["encoding"] == "cp1252" and manifest["splits"]["train"]["samples"] == 1


def test_outside_root_and_pixel_limit_flags(tmp_path, capsys):
    (tmp_path / "root").mkdir()
    Image.new("L", (40, 30), 90).save(tmp_path / "outside.png")
    Image.new("L", (400, 300), 90).save(tmp_path / "root" / "big.png")
    (tmp_path / "t.csv").write_text("file,report\n../outside.png,Out.\nbig.png,Big.\n")
    base = ["data", "prepare-csv", "--csv", str(tmp_path / "t.csv"), "--image-col", "file", "--text-col", "report",
            "--image-root", str(tmp_path / "root"), "--image-size", "20", "--no-progress", "val_fraction=0",
            "test_fraction=0"]
    assert run(base + ["--out", str(tmp_path / "a"), "--max-pixels", "100000"]) == 0
    skipped = json.loads((tmp_path / "a" / "manifest.json").read_text())["skipped"]
    assert (skipped["outside_root"], skipped["oversized_image"]) == (1, 1)
    assert "outside_root 1" in capsys.readouterr().out
    assert run(base + ["--out", str(tmp_path / "b"), "--allow-outside-root"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 2 and manifest["options"]["allow_outside_root"] is True


def test_info_on_a_malformed_manifest(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "radalign-shards/1", "splits": ["train"]}))
    assert run(["data", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "manifest.json: malformed: splits: expected an object" in err and "Traceback" not in err

"""Tests written to kill mutants that survived `make mutate` (tools/mutate.py; scores in docs/testing.md).

Every expected value here is written out by hand (or comes from hashlib / a brute-force loop), never from
the function under test. Grouped by the module whose mutants they kill.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from radalign import RadalignError

# ----------------------------------------------------------------------------------------------------------
# data/labels.py: the column orders are data, not code (mutmut does not mutate constants), so pin them.


def test_label_orders_are_the_release_orders():
    from radalign.data.labels import CHEXPERT_LABELS, COMPETITION_LABELS, MIMIC_LABEL_ORDER, SPLITS

    assert CHEXPERT_LABELS == (
        "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
        "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
        "Fracture", "Support Devices")
    # The header of mimic-cxr-2.0.0-chexpert.csv.gz after subject_id, study_id.
    assert MIMIC_LABEL_ORDER == (
        "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
        "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
        "Pneumothorax", "Support Devices")
    assert COMPETITION_LABELS == ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
    assert SPLITS == ("train", "validate", "test")


# ----------------------------------------------------------------------------------------------------------
# data/mimic.py: values.

DATETIMES = [
    # (StudyDate, StudyTime) -> ISO-8601, worked by hand from the DICOM spellings
    (("21800506", "80556.875"), "2180-05-06T08:05:56.875"),
    (("21800506", "80556"), "2180-05-06T08:05:56"),
    (("21800506", 80556.0), "2180-05-06T08:05:56"),  # a float cell: the ".0" is no fraction
    (("21800506", " 80556.500 "), "2180-05-06T08:05:56.5"),  # trailing zeros of the fraction dropped
    (("21800506", "5"), "2180-05-06T00:00:05"),  # unpadded: 5 s past midnight
    (("21800506", "235959.999"), "2180-05-06T23:59:59.999"),
    ((21800506, "123456"), "2180-05-06T12:34:56"),  # an int date cell
    ((" 21800506 ", None), "2180-05-06T00:00:00"),  # no time: midnight
    (("21800506", ""), "2180-05-06T00:00:00"),
    (("21810229", "0"), None),  # 2181 is not a leap year
    (("21000229", "0"), None),  # nor is 2100 (a century not divisible by 400)
    (("21800229", "0"), "2180-02-29T00:00:00"),  # 2180 is
    (("21801306", "0"), None),  # month 13
    (("21800500", "0"), None),  # day 0
    (("21800506", "240000"), None),  # hour 24
    (("21800506", "86000"), None),  # minute 60
    (("21800506", "80560"), None),  # second 60
    (("21800506", "1234567"), None),  # 7 digits
    (("21800506", "1234059"), None),  # 7 digits that would split into a valid 12:34:059
    (("21800506", "0123045.5"), None),
    (("21800506", "12.3.4"), None),
    (("21800506", "-5"), None),
    (("21800506", ".5"), None),  # no whole seconds
    (("21800506", "abc"), None),
    (("2180056", "0"), None),  # 7-digit date
    (("218005061", "0"), None),
    (("2180O506", "0"), None),
    ((None, "80556"), None),
    (("", "80556"), None),
]


@pytest.mark.parametrize("args,expected", DATETIMES, ids=[f"{a[0]}-{a[1]}" for a, _ in DATETIMES])
def test_study_datetime_by_hand(args, expected):
    from radalign.data.mimic import parse_study_datetime

    assert parse_study_datetime(*args) == expected


def test_label_values_by_hand():
    from radalign.data.mimic import parse_label

    for value, expected in [(1, 1), (1.0, 1), ("1.0", 1), (" 1 ", 1), (0, 0), ("0.0", 0), (-1.0, -1),
                            ("-1", -1), (" -1.0 ", -1), ("", None), (None, None), (float("nan"), None),
                            ("NaN", None)]:
        got = parse_label(value)
        assert got == expected and type(got) is type(expected), (value, got)
    for bad in ("2", "yes", "0.5", True):
        with pytest.raises(ValueError, match=repr(bad).replace("(", r"\(")):
            parse_label(bad)


def test_label_column_counts_what_it_could_not_read():
    from radalign.data.mimic import parse_label_column

    values, bad = parse_label_column(pd.Series(["1.0", "0.0", "-1.0", "", " 1 ", "x", "nan", "2", "-1"]))
    assert values.dtype == np.float64
    np.testing.assert_array_equal(values.to_numpy(), [1, 0, -1, np.nan, 1, np.nan, np.nan, np.nan, -1])
    assert bad == 2  # "x" and "2"; blanks and "nan" are blank, not bad


def test_stable_unit_is_a_pinned_uniform_hash():
    from radalign.data.mimic import stable_unit

    def by_hand(seed, key):  # blake2b-64 of "seed:key", little-endian, over 2**64
        digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2 ** 64

    # Pinned: these decide the shard order and the CSV path's patient splits of data already prepared.
    assert stable_unit(0, "p10000032") == 0.9296318985201776
    assert stable_unit(0, "10000032") == 0.2504289737575563
    assert stable_unit(1, "10000032") == 0.3231048110539517
    u = np.array([stable_unit(7, f"split:{i}") for i in range(4000)])
    np.testing.assert_array_equal(u, [by_hand(7, f"split:{i}") for i in range(4000)])
    assert u.min() >= 0 and u.max() < 1 and u.max() > 0.99
    assert abs(u.mean() - 0.5) < 0.02 and abs((u < 0.1).mean() - 0.1) < 0.02


def test_release_paths():
    from radalign.data.mimic import group_dir, image_path, report_path

    root = Path("/r/files")
    assert group_dir(10000032) == "p10" and group_dir("19999999") == "p19"
    assert image_path(root, 10000032, 50414267, "abc-1") == Path("/r/files/p10/p10000032/s50414267/abc-1.jpg")
    assert report_path(root, "12345678", "59999999") == Path("/r/files/p12/p12345678/s59999999.txt")


# ----------------------------------------------------------------------------------------------------------
# data/mimic.py: files, on a release laid out by hand.

LABELS14 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
            "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
            "Pneumothorax", "Support Devices")


def _write_gz(path: Path, text: str) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)


def _tiny_release(root: Path) -> tuple[Path, Path]:
    mimic, reports = root / "mimic-cxr-jpg", root / "reports"
    for sub, study in (("10000032", "50414267"), ("11000011", "51000001"), ("11000011", "51000002")):
        (mimic / "files" / f"p{sub[:2]}" / f"p{sub}" / f"s{study}").mkdir(parents=True, exist_ok=True)
        (reports / "files" / f"p{sub[:2]}" / f"p{sub}").mkdir(parents=True, exist_ok=True)
    _write_gz(mimic / "mimic-cxr-2.0.0-metadata.csv.gz",
              "dicom_id,subject_id,study_id,ViewPosition,StudyDate,StudyTime\n"
              "d1,10000032,50414267,PA,21800506,80556.875\n"
              "d2,10000032,50414267,LATERAL,21800506,80556.875\n"
              "d3,11000011,51000001,ap,21811231,235959\n"
              "d4,11000011,51000002,AP,2181123,0\n"  # bad date
              "d5,11000011,51000002,AP,21820101,0\n")  # not in the split file
    (mimic / "mimic-cxr-2.0.0-split.csv").write_text(  # uncompressed also works
        "dicom_id,study_id,subject_id,split\nd1,50414267,10000032,train\nd2,50414267,10000032,train\n"
        "d3,51000001,11000011,Valid\nd4,51000002,11000011, test\n")
    row = {name: "" for name in LABELS14}
    first = dict(row, **{"Cardiomegaly": "1.0", "Edema": "-1.0", "No Finding": "", "Pneumonia": "0.0"})
    dup = dict(row, **{"Cardiomegaly": "0.0"})
    odd = dict(row, **{"Fracture": "maybe"})
    lines = ["subject_id,study_id," + ",".join(LABELS14)]
    for sub, study, cells in (("10000032", "50414267", dup), ("10000032", "50414267", first),
                              ("11000011", "51000001", odd)):
        lines.append(f"{sub},{study}," + ",".join(cells[n] for n in LABELS14))
    _write_gz(mimic / "mimic-cxr-2.0.0-chexpert.csv.gz", "\n".join(lines) + "\n")
    return mimic, reports


def test_read_labels_keeps_the_last_duplicate_and_counts_bad_cells(tmp_path):
    from radalign.data.mimic import read_labels

    mimic, _ = _tiny_release(tmp_path)
    labels, notes = read_labels(mimic)
    assert list(labels.index) == [50414267, 51000001] and labels.index.dtype == np.int64
    assert labels.loc[50414267, "Cardiomegaly"] == 1.0  # the later row of the duplicate study wins
    assert labels.loc[50414267, "Edema"] == -1.0 and labels.loc[50414267, "Pneumonia"] == 0.0
    assert math.isnan(labels.loc[50414267, "No Finding"]) and math.isnan(labels.loc[51000001, "Fracture"])
    assert notes == {"bad_label_values": 1, "duplicate_label_rows": 1}
    with pytest.raises(RadalignError, match="'vqa'.*chexpert, negbio"):
        read_labels(mimic, "vqa")


def test_mimic_records_join_by_hand(tmp_path):
    from radalign.data.mimic import mimic_records

    mimic, reports = _tiny_release(tmp_path)
    frame, set_aside, notes = mimic_records(mimic, reports, views=["PA", "AP"])
    assert sorted(set_aside) == [("filtered_view", "d2"), ("no_split", "d5")]
    assert notes["no_split"] == 1 and notes["bad_datetime"] == 1 and notes["no_labels"] == 1
    assert notes["bad_label_values"] == 1 and notes["duplicate_label_rows"] == 1
    got = frame.set_index("key")
    assert list(got.index) == ["d1", "d3", "d4"]
    assert list(got["split"]) == ["train", "validate", "test"]  # "Valid" and " test" are aliases
    assert list(got["subject_id"]) == [10000032, 11000011, 11000011]
    assert list(got["study_id"]) == [50414267, 51000001, 51000002]
    assert list(got["view"]) == ["PA", "ap", "AP"]  # kept as written; the filter is case-blind
    assert list(got["study_datetime"][:2]) == ["2180-05-06T08:05:56.875", "2181-12-31T23:59:59"]
    assert pd.isna(got.loc["d4", "study_datetime"])  # the 7-digit date
    assert got.loc["d1", "image"] == str(mimic / "files/p10/p10000032/s50414267/d1.jpg")
    assert got.loc["d3", "report"] == str(reports / "files/p11/p11000011/s51000001.txt")
    assert got.loc["d1", "Cardiomegaly"] == 1.0 and got.loc["d1", "Edema"] == -1.0
    assert math.isnan(got.loc["d4", "Cardiomegaly"])  # study absent from the label file: null labels
    everything, aside, _ = mimic_records(mimic, reports, views=["all"])
    assert sorted(everything["key"]) == ["d1", "d2", "d3", "d4"] and aside == [("no_split", "d5")]


def test_find_csv_prefers_the_release_spelling_and_names_both(tmp_path):
    from radalign.data.mimic import find_csv

    with pytest.raises(RadalignError, match=r"x\.csv\.gz: not found \(nor x\.csv\)\. Expected the MIMIC-CXR-JPG metadata file"):
        find_csv(tmp_path, "x", "metadata")
    (tmp_path / "x.csv").write_text("a\n1\n")
    assert find_csv(tmp_path, "x", "metadata") == tmp_path / "x.csv"
    _write_gz(tmp_path / "x.csv.gz", "a\n1\n")
    assert find_csv(tmp_path, "x", "metadata") == tmp_path / "x.csv.gz"


def test_read_csv_checked_reads_text_and_names_missing_columns(tmp_path):
    from radalign.data.mimic import read_csv_checked

    f = tmp_path / "m.csv"
    f.write_text("dicom_id,StudyTime,subjectid\nd1,80556.875,\nd2,080556,x\n")
    df = read_csv_checked(f, ["dicom_id", "StudyTime"])
    assert list(df["StudyTime"]) == ["80556.875", "080556"]  # text: no float rounding, zeros kept
    assert list(df["subjectid"]) == ["", "x"]  # blanks stay ''
    with pytest.raises(RadalignError, match=r"missing column\(s\) 'subject_id', 'split' \('subject_id' -> did you "
                                            r"mean 'subjectid'\?\); expected dicom_id, subject_id, split; found"):
        read_csv_checked(f, ["dicom_id", "subject_id", "split"])
    with pytest.raises(RadalignError, match=r"nope\.csv: not found \(expected the split file\)"):
        read_csv_checked(tmp_path / "nope.csv", ["a"], "split file")


def test_files_root_accepts_both_layouts(tmp_path):
    from radalign.data.mimic import files_root

    (tmp_path / "a" / "files" / "p10").mkdir(parents=True)
    (tmp_path / "b" / "p10").mkdir(parents=True)
    (tmp_path / "c" / "x10").mkdir(parents=True)
    assert files_root(tmp_path / "a", "X") == tmp_path / "a" / "files"
    assert files_root(tmp_path / "b", "X") == tmp_path / "b"
    with pytest.raises(RadalignError, match=r"no files/ folder.*Expected the MIMIC-CXR-JPG folder"):
        files_root(tmp_path / "c", "MIMIC-CXR-JPG")


# ----------------------------------------------------------------------------------------------------------
# radalign/io.py


def test_atomic_write_json_layout_by_hand(tmp_path):
    from radalign.io import atomic_write_json

    f = tmp_path / "m.json"
    atomic_write_json(f, {"z": 1, "a": [1, 2], "p": Path("/x")})
    assert f.read_text() == '{\n  "z": 1,\n  "a": [\n    1,\n    2\n  ],\n  "p": "/x"\n}\n'  # order kept
    atomic_write_json(f, {"b": 2}, indent=None)
    assert f.read_text() == '{"b": 2}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_sha256_file_matches_hashlib_across_chunks(tmp_path):
    from radalign.io import sha256_file

    f = tmp_path / "w.bin"
    data = bytes(range(256)) * 41 + b"tail"
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()
    assert sha256_file(f, chunk=100) == hashlib.sha256(data).hexdigest()
    f.write_bytes(b"")
    assert sha256_file(f) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_read_format_json_names_a_missing_folder_and_a_non_object(tmp_path):
    from radalign.io import read_format_json

    kw = dict(what="the --out folder", fix="re-run it")
    with pytest.raises(RadalignError, match=r"no manifest\.json \(the folder does not exist\); point at"):
        read_format_json(tmp_path / "gone" / "manifest.json", "x/1", **kw)
    with pytest.raises(RadalignError, match=r"manifest\.json: no manifest\.json; point at"):
        read_format_json(tmp_path / "manifest.json", "x/1", **kw)
    (tmp_path / "manifest.json").write_text(json.dumps([1, 2]))
    with pytest.raises(RadalignError, match=r"format 'list', expected 'x/1'"):
        read_format_json(tmp_path / "manifest.json", "x/1", **kw)
    (tmp_path / "manifest.json").write_text('{"format": "x/1", "who": "Zoë"}', encoding="utf-8")
    assert read_format_json(tmp_path / "manifest.json", "x/1", **kw)["who"] == "Zoë"


# ----------------------------------------------------------------------------------------------------------
# pretrain/loss.py


def _unit_rows(n: int, d: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, d, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(x[0], dim=-1), torch.nn.functional.normalize(x[1], dim=-1)


def test_siglip_without_ids_is_one_positive_per_row():
    import torch
    from open_clip.loss import SigLipLoss
    from radalign.pretrain.loss import ContrastiveLoss

    img, txt = _unit_rows(10, 8, seed=11)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    got = ContrastiveLoss(kind="siglip")(img, txt, scale, logit_bias=bias)  # false negatives on, no ids
    # by hand: -log sigmoid(z) on the diagonal, -log sigmoid(-z) off it, summed over 10x10 pairs, / 10 rows
    z = (scale * img @ txt.T + bias).tolist()
    naive = sum(math.log1p(math.exp(-z[i][j] if i == j else z[i][j])) for i in range(10) for j in range(10)) / 10
    assert got.item() == pytest.approx(naive, abs=1e-10)
    assert got.item() == pytest.approx(SigLipLoss()(img, txt, scale, bias).item(), abs=1e-10)


def test_int32_ids_are_accepted_and_mean_the_same():
    import torch
    from radalign.pretrain.loss import ContrastiveLoss

    img, txt = _unit_rows(8, 8, seed=12)
    study = torch.tensor([5, 5, 6, 7, 8, 9, 10, 11])
    scale = torch.tensor(10.0, dtype=torch.float64)
    a = ContrastiveLoss()(img, txt, scale, study_id=study)
    b = ContrastiveLoss()(img, txt, scale, study_id=study.to(torch.int32))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"study_id must be an int64 tensor of shape \[8\], got torch.float32 \(8,\)"):
        ContrastiveLoss()(img, txt, scale, study_id=study.float())
    with pytest.raises(ValueError, match=r"text_id must be an int64 tensor of shape \[8\], got torch.int64 \(8, 1\)"):
        ContrastiveLoss()(img, txt, scale, text_id=study[:, None])
    with pytest.raises(ValueError, match=r"image_features \(8, 8\) and text_features \(8, 4\) must both be \[B, D\] "
                                         "with the same B and D"):
        ContrastiveLoss()(img, txt[:, :4], scale)
    with pytest.raises(ValueError, match=r"image_features \(8,\) and text_features \(8,\)"):
        ContrastiveLoss()(img[:, 0], txt[:, 0], scale)


def test_positive_mask_by_hand():
    import torch
    from radalign.pretrain.loss import positive_mask

    # rank 1 of 2, B=2: local rows are global 2 and 3
    study_local, study_global = torch.tensor([7, -1]), torch.tensor([7, -1, 7, -1])
    text_local, text_global = torch.tensor([-1, 30]), torch.tensor([30, 31, -1, 30])
    pos = positive_mask([study_local, text_local], [study_global, text_global], offset=2, b=2, n_global=4)
    assert pos.tolist() == [[True, False, True, False],  # same study as global 0; itself; -1 text never matches
                            [True, False, False, True]]  # same text as global 0; -1 study never matches; itself
    assert positive_mask([], [], offset=0, b=3, n_global=3).tolist() == torch.eye(3, dtype=torch.bool).tolist()


def test_loss_errors_and_repr_name_the_fix(caplog):
    import torch
    from radalign.pretrain.loss import ContrastiveLoss

    img, txt = _unit_rows(4, 8, seed=13)
    with pytest.raises(RadalignError) as e:
        ContrastiveLoss(kind="siglip")(img, txt, torch.tensor(10.0))
    assert str(e.value) == ('loss kind "siglip" needs the model\'s logit_bias: add "init_logit_bias": -10 to the '
                            "model config and pass the model's logit_bias to the loss")
    with pytest.raises(RadalignError, match=r"^loss kind 'clip': must be one of infonce, siglip$"):
        ContrastiveLoss(kind="clip")
    with pytest.raises(RadalignError, match=r"^loss rank=-1 is outside world_size=2$"):
        ContrastiveLoss(rank=-1, world_size=2)
    assert repr(ContrastiveLoss(rank=1, world_size=3, kind="siglip", max_logit_scale=50.0)) == (
        "ContrastiveLoss(kind=siglip, false_negatives=True, rank=1, world_size=3, max_logit_scale=50.0)")


def test_missing_ids_warn_once_and_fall_back_to_plain_targets(caplog):
    import torch
    from radalign.pretrain.loss import ContrastiveLoss

    img, txt = _unit_rows(6, 8, seed=14)
    scale = torch.tensor(10.0, dtype=torch.float64)
    fn = ContrastiveLoss()
    first, second = fn(img, txt, scale), fn(img, txt, scale)
    plain = ContrastiveLoss(false_negatives=False)(img, txt, scale)
    assert torch.equal(first, plain) and torch.equal(second, plain)
    warned = [r for r in caplog.records if "neither study_id nor text_id was given" in r.getMessage()]
    assert len(warned) == 1


def test_max_logit_scale_is_the_cap():
    import torch
    from radalign.pretrain.loss import ContrastiveLoss

    img, txt = _unit_rows(6, 8, seed=15)
    capped = ContrastiveLoss(false_negatives=False, max_logit_scale=30.0)
    at_30 = ContrastiveLoss(false_negatives=False)(img, txt, torch.tensor(30.0, dtype=torch.float64))
    assert capped(img, txt, torch.tensor(80.0, dtype=torch.float64)).item() == pytest.approx(at_30.item(), abs=1e-12)
    at_20 = ContrastiveLoss(false_negatives=False)(img, txt, torch.tensor(20.0, dtype=torch.float64))
    assert capped(img, txt, torch.tensor(20.0, dtype=torch.float64)).item() == pytest.approx(at_20.item(), abs=1e-12)


# ----------------------------------------------------------------------------------------------------------
# data/sections.py


def test_crlf_is_one_line_break_before_a_header_that_follows_a_header():
    from radalign.data.sections import parse_report

    # The reference's quirk, worked by hand: the FINDINGS header's `:\s` eats the newline, so the IMPRESSION
    # header right below it has no leading newline left and becomes findings text. A "\r\n" must be one
    # line break: turned into "\n\n" (or "\r" alone first), the second header would be found.
    text = "                 FINAL REPORT\n EXAMINATION:  CHEST\n \n FINDINGS:\n IMPRESSION:  No effusion.\n"
    want = {"findings": "IMPRESSION: No effusion.", "impression": None, "last_paragraph": None,
            "indication": None}
    for eol in ("\n", "\r\n", "\r"):
        assert parse_report(text.replace("\n", eol)) == want, repr(eol)


def test_the_next_header_is_looked_for_after_the_first_newline_only():
    from radalign.data.sections import section_text

    # "XX\nXX" later in the text must not move the search start past the IMPRESSION header.
    text = "\n FINDINGS: lung XX\n IMPRESSION: clear XX\nXX end"
    sections, names, starts = section_text(text)
    assert names == ["preamble", "findings", "impression"]
    assert sections == ["\n ", "lung XX", "clear XX\nXX end"]  # the preamble ends where the name starts
    assert starts == [0, 12, 33]


# ----------------------------------------------------------------------------------------------------------
# data/mimic.py: the encoding error, ids and the release's error messages.

_CP1252_CSV = "a,b\n1,x\n2,Cardiomégalie\n".encode("cp1252")  # é is the one byte 0xE9, on line 3
_EXCEL_FIX = "pass --encoding cp1252 (the file decodes as cp1252, as Excel on Windows writes)"
_ID_HINT = "expected integer MIMIC ids. Is this the right file?"
_RELEASE_HINT = "--mimic-cxr must be the folder holding the CSVs and files/."


def _error(fn, *args, **kwargs) -> str:
    """The message of the RadalignError that `fn(*args, **kwargs)` raises."""
    with pytest.raises(RadalignError) as e:
        fn(*args, **kwargs)
    return str(e.value)


def _zip_one(data: bytes) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("t.csv", data)
    return buf.getvalue()


def _tar_one(mode: str):
    def pack(data: bytes) -> bytes:
        import io
        import tarfile

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as t:
            info = tarfile.TarInfo("t.csv")
            info.size, info.uname = len(data), "lab\nuser"  # a newline in the header: the line named is the CSV's
            t.addfile(info, io.BytesIO(data))
        return buf.getvalue()
    return pack


@pytest.mark.parametrize("name,pack", [
    ("t.csv", lambda b: b), ("t.csv.gz", gzip.compress), ("t.CSV.GZ", gzip.compress),
    ("t.csv.bz2", bz2.compress), ("t.csv.xz", lzma.compress), ("t.csv.zip", _zip_one),
    ("t.csv.tar", _tar_one("w")), ("t.csv.tar.gz", _tar_one("w:gz")), ("t.csv.tar.xz", _tar_one("w:xz"))])
def test_a_cp1252_csv_read_as_utf8_names_the_byte_its_line_and_the_fix(tmp_path, name, pack):
    from radalign.data.mimic import read_csv_checked

    f = tmp_path / name
    f.write_bytes(pack(_CP1252_CSV))  # pandas unpacks each of these by its suffix; the message must too
    want = f"{f}: not utf-8 text (byte b'\\xe9' on line 3); {_EXCEL_FIX}"
    assert _error(read_csv_checked, f, ["a"]) == want
    assert list(read_csv_checked(f, ["a"], encoding="cp1252")["b"]) == ["x", "Cardiomégalie"]


def test_a_zst_csv_without_zstandard_names_the_package(tmp_path, monkeypatch):
    """pandas reads .zst through the optional `zstandard`; without it the error names the file and the package."""
    import builtins

    from radalign.data.mimic import read_csv_checked

    real_import = builtins.__import__

    def no_zstandard(name, *args, **kwargs):
        if name == "zstandard":
            raise ImportError("No module named 'zstandard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zstandard)
    f = tmp_path / "t.csv.zst"
    f.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 8)
    msg = _error(read_csv_checked, f, ["a"])
    assert msg.startswith(f"{f}: not a readable CSV (") and "zstandard" in msg


def test_the_encoding_error_names_the_first_bad_byte_after_good_multibyte_text(tmp_path):
    from radalign.data.mimic import read_csv_checked

    f = tmp_path / "t.csv"
    # Lines 1-3 are valid UTF-8 (é is 2 bytes there); 0x81 on line 4 is undefined in cp1252: only latin-1
    # reads it.
    f.write_bytes("a\né\nx\n".encode() + b"y\x81\n")
    latin1 = "(byte b'\\x81' on line 4); pass --encoding latin-1 (the file decodes as latin-1)"
    assert _error(read_csv_checked, f, ["a"]) == f"{f}: not utf-8 text {latin1}"
    # The user's own --encoding is never offered back: cp1252 fails on 0x81, latin-1 is what works.
    assert _error(read_csv_checked, f, ["a"], encoding="cp1252") == f"{f}: not cp1252 text {latin1}"
    g = tmp_path / "g.csv"
    g.write_bytes(_CP1252_CSV)
    assert (_error(read_csv_checked, g, ["a"], encoding="ascii")
            == f"{g}: not ascii text (byte b'\\xe9' on line 3); {_EXCEL_FIX}")


@pytest.mark.parametrize("bad", ["p10000032", "", "10000032.5", "inf"])
@pytest.mark.parametrize("column,cell", [("subject_id", "d3,11000011,"), ("study_id", ",51000001,")])
def test_a_non_integer_id_in_the_metadata_names_the_file_column_and_value(tmp_path, bad, column, cell):
    from radalign.data.mimic import mimic_records

    mimic, reports = _tiny_release(tmp_path)
    meta = mimic / "mimic-cxr-2.0.0-metadata.csv.gz"
    with gzip.open(meta, "rt", encoding="utf-8") as f:
        text = f.read()
    assert text.count(cell) == 1
    _write_gz(meta, text.replace(cell, cell.replace(cell.strip(",").split(",")[-1], bad)))
    assert (_error(mimic_records, mimic, reports, views=["all"])
            == f"{meta}: column {column!r} holds {bad!r}; {_ID_HINT}")


def test_a_float_spelled_integer_id_is_an_id(tmp_path):
    from radalign.data.mimic import read_labels

    mimic, _ = _tiny_release(tmp_path)
    path = mimic / "mimic-cxr-2.0.0-chexpert.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    _write_gz(path, text.replace(",51000001,", ",51000001.0,"))  # as pandas writes an int column holding NaN
    labels = read_labels(mimic)[0]
    assert list(labels.index) == [50414267, 51000001] and labels.index.name == "study_id"
    _write_gz(path, text.replace(",51000001,", ",s51000001,"))
    assert _error(read_labels, mimic) == f"{path}: column 'study_id' holds 's51000001'; {_ID_HINT}"


def test_release_errors_name_what_is_missing_or_wrong(tmp_path):
    from radalign.data.mimic import mimic_records

    mimic, reports = _tiny_release(tmp_path)
    nope = tmp_path / "nope"
    assert (_error(mimic_records, nope, reports, views=["all"])
            == f"--mimic-cxr {nope}: not a folder (expected the MIMIC-CXR-JPG root)")
    assert _error(mimic_records, mimic, nope, views=["all"]) == (
        f"{nope}: no files/ folder with p10/, p11/, ... inside. Expected the MIMIC-CXR reports "
        "(mimic-cxr-reports) folder as unpacked from PhysioNet.")
    (mimic / "files").rename(tmp_path / "elsewhere")
    assert _error(mimic_records, mimic, reports, views=["all"]) == (
        f"{mimic}: no files/ folder with p10/, p11/, ... inside. Expected the MIMIC-CXR-JPG folder as "
        "unpacked from PhysioNet.")
    (tmp_path / "elsewhere").rename(mimic / "files")

    split = mimic / "mimic-cxr-2.0.0-split.csv"
    split.write_text(split.read_text().replace(",train\n", ",bogus\n", 1).replace("Valid", "dev"))
    assert (_error(mimic_records, mimic, reports, views=["all"])
            == f"{split}: column 'split' has value(s) 'bogus', 'dev'; expected train, validate, test")
    for stem, what in (("split", "split"), ("metadata", "metadata")):
        for f in mimic.glob(f"mimic-cxr-2.0.0-{stem}.csv*"):
            f.unlink()
        assert _error(mimic_records, mimic, reports, views=["all"]) == (
            f"{mimic / f'mimic-cxr-2.0.0-{stem}.csv.gz'}: not found (nor mimic-cxr-2.0.0-{stem}.csv). "
            f"Expected the MIMIC-CXR-JPG {what} file there; {_RELEASE_HINT}")


def test_read_csv_checked_messages_without_what_or_hints(tmp_path):
    from radalign.data.mimic import read_csv_checked

    nope = tmp_path / "nope.csv"
    assert _error(read_csv_checked, nope, ["a"]) == f"{nope}: not found"  # no "(expected the ...)": no `what`
    f = tmp_path / "m.csv"
    f.write_text("x,y\n1,2\n")
    # nothing close to either name: no "did you mean" and no empty "()"
    assert (_error(read_csv_checked, f, ["dicom_id", "split"])
            == f"{f}: missing column(s) 'dicom_id', 'split'; expected dicom_id, split; found x, y")


def test_the_encoding_error_falls_back_to_pandas_byte_when_the_file_changed(tmp_path):
    from radalign.data.mimic import _encoding_error

    f = tmp_path / "t.csv"
    f.write_text("a\n1\n")  # rewritten after pandas failed on it: it decodes now
    e = UnicodeDecodeError("utf-8", b"a\n\xe9x\n", 2, 3, "invalid continuation byte")
    assert _encoding_error(f, "utf-8", e) == f"{f}: not utf-8 text (byte b'\\xe9'); {_EXCEL_FIX}"
    # the encoding that failed is never the advice, even though the changed file now decodes as cp1252
    e = UnicodeDecodeError("cp1252", b"\x81", 0, 1, "character maps to <undefined>")
    assert (_encoding_error(f, "cp1252", e)
            == f"{f}: not cp1252 text (byte b'\\x81'); pass --encoding latin-1 (the file decodes as latin-1)")


def test_release_choices_and_caps(tmp_path):
    from radalign.data.mimic import mimic_records, read_labels

    mimic, reports = _tiny_release(tmp_path)
    negbio = mimic / "mimic-cxr-2.0.0-negbio.csv.gz"
    assert _error(read_labels, mimic, "negbio") == (
        f"{negbio}: not found (nor mimic-cxr-2.0.0-negbio.csv). Expected the MIMIC-CXR-JPG negbio labels "
        f"file there; {_RELEASE_HINT}")
    cells = ",".join("1.0" if name == "Edema" else "" for name in LABELS14)
    _write_gz(negbio, "subject_id,study_id," + ",".join(LABELS14) + f"\n10000032,50414267,{cells}\n")
    frame, _, _ = mimic_records(mimic, reports, views=["all"], labels="negbio")
    got = frame.set_index("key")
    assert got.loc["d1", "Edema"] == 1.0 and math.isnan(got.loc["d1", "Cardiomegaly"])  # chexpert says -1 / 1

    meta = mimic / "mimic-cxr-2.0.0-metadata.csv.gz"
    with gzip.open(meta, "rt", encoding="utf-8") as f:
        text = f.read()
    _write_gz(meta, text.replace("d3,11000011,51000001,ap,", "d3,11000011,51000001,,"))
    frame, _, _ = mimic_records(mimic, reports, views=["all"])
    assert pd.isna(frame.set_index("key").loc["d3", "view"])  # a blank ViewPosition is null, not ""

    split = mimic / "mimic-cxr-2.0.0-split.csv"
    rows = "".join(f"d{i},1,1,{name}\n" for i, name in enumerate(("f", "e", "d", "c", "b", "a"), 1))
    split.write_text("dicom_id,study_id,subject_id,split\n" + rows)
    assert _error(mimic_records, mimic, reports, views=["all"]) == (  # sorted, the first five only
        f"{split}: column 'split' has value(s) 'a', 'b', 'c', 'd', 'e'; expected train, validate, test")


def test_read_csv_checked_unreadable_files_and_several_hints(tmp_path):
    from radalign.data.mimic import read_csv_checked

    f = tmp_path / "t.csv.gz"
    f.write_text("a,b\n1,2\n")  # not gzip
    assert _error(read_csv_checked, f, ["a"]) == f"{f}: not a readable CSV (Not a gzipped file (b'a,'))"
    g = tmp_path / "r.csv"
    g.write_text("a,b\n1,2\n3,4,5\n")  # a ragged row
    message = _error(read_csv_checked, g, ["a"])  # pandas' own words after the file's name
    assert message.startswith(f"{g}: not a readable CSV (")
    assert "Expected 2 fields in line 3, saw 3" in message
    h = tmp_path / "h.csv"
    h.write_text("dicomid,Split\n1,2\n")
    assert _error(read_csv_checked, h, ["dicom_id", "split"]) == (
        f"{h}: missing column(s) 'dicom_id', 'split' ('dicom_id' -> did you mean 'dicomid'?; "
        "'split' -> did you mean 'Split'?); expected dicom_id, split; found dicomid, Split")

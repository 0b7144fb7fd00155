"""DICOM in: the MIMIC-CXR-JPG conversion against independent numpy, hostile files (pydicom's own test files,
truncations, a 60,000 x 60,000 header) refused by reason, `data prepare-dicom` against `data prepare` on the
generator's JPGs, skips counted, only whitelisted header fields in any output, and the generator's DICOM mode."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import re
import shutil
import tarfile
import tracemalloc
from fractions import Fraction
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from radalign.data.dicom import (
    DICOM_SKIP_REASONS,
    DicomRefused,
    dicom_bytes,
    equalize_hist,
    minmax_uint8,
    open_dicom,
    read_dicom,
)
from radalign.data.images import OversizedImageError
from radalign.data.prepare import SKIP_REASONS, PrepareConfig, prepare

from radalign import RadalignError
from radalign.cli import main
from radalign.config import ConfigError, load_config

ALL_REASONS = set(SKIP_REASONS) | set(DICOM_SKIP_REASONS)
PLANTED = "Zyxwvut^Planted"  # a Patient Name that must never leave data.dicom


# ----------------------------------------------------------------------------------------------------------
# Independent references (no code from data.dicom).


def ref_equalize(u8: np.ndarray) -> np.ndarray:
    """Histogram equalisation by its definition, in exact rationals: v -> round(255 (cdf(v) - n_min) / (N - n_min)),
    n_min the count of the smallest value (OpenCV's equalizeHist); a constant image is unchanged."""
    values, counts = np.unique(u8, return_counts=True)
    n, n_min = u8.size, int(counts[0])
    if n_min == n:
        return u8.copy()
    lut, cdf = {}, 0
    for v, c in zip(values.tolist(), counts.tolist()):
        cdf += c
        lut[v] = round(Fraction(cdf - n_min, n - n_min) * 255)  # Python rounds half to even
    return np.vectorize(lut.__getitem__, otypes=[np.uint8])(u8)


def ref_mimic_minmax(values: np.ndarray) -> np.ndarray:
    """MIT-LCP's dcm2img, literally (github.com/MIT-LCP/mimic-cxr/issues/16)."""
    raw = values - values.min()
    return (raw / raw.max() * 255).astype(np.uint8)


def ref_mimic(stored: np.ndarray, slope: float, intercept: float, monochrome1: bool) -> np.ndarray:
    """dcm2img up to its last line (steps 1-5): the pixels it hands to `cv2.imwrite`."""
    u8 = ref_mimic_minmax(stored.astype(np.float64) * slope + intercept)
    return ref_equalize(255 - u8 if monochrome1 else u8)


def ref_jpeg95_bytes(u8: np.ndarray) -> bytes:
    """dcm2img's last line, `cv2.imwrite(path, img)`: OpenCV's default JPEG quality, 95. libjpeg through PIL at
    quality 95 writes the same bytes (checked with opencv-python-headless 5.1 on 60 generated films)."""
    buf = io.BytesIO()
    Image.fromarray(u8, mode="L").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def ref_mimic_jpg(stored: np.ndarray, slope: float, intercept: float, monochrome1: bool) -> np.ndarray:
    """What a MIMIC-CXR-JPG file decodes to: dcm2img whole (steps 1-6), read back."""
    return np.asarray(Image.open(io.BytesIO(ref_jpeg95_bytes(ref_mimic(stored, slope, intercept, monochrome1)))))


def ref_linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR) onto [0, 1]."""
    lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5)
    return np.where(x <= lo, 0.0, np.where(x > hi, 1.0, y))


def _arrays():
    rng = np.random.default_rng(0)
    yield rng.integers(0, 4096, (37, 53)).astype(np.uint16)                          # uniform 12-bit
    yield (rng.beta(2, 8, (64, 48)) * 4095).astype(np.uint16)                        # skewed, like a film
    yield np.repeat(np.arange(5, dtype=np.uint16) * 700, 40).reshape(20, 10)        # five levels, ties
    yield np.where(rng.random((16, 16)) < 0.9, 100, 3000).astype(np.uint16)          # two values, unbalanced


# ----------------------------------------------------------------------------------------------------------
# The conversion.


@pytest.mark.parametrize("index", range(4))
def test_histogram_equalisation_equals_the_definition(index):
    stored = list(_arrays())[index]
    u8 = ref_mimic_minmax(stored.astype(np.float64))
    assert np.array_equal(equalize_hist(u8), ref_equalize(u8))
    assert np.array_equal(equalize_hist(np.full((5, 7), 77, np.uint8)), np.full((5, 7), 77, np.uint8))


def test_histogram_equalisation_rounds_exact_ties_to_even():
    """N - n_min = 510: one pixel above the minimum maps to 255 / 510 = 0.5 exactly -> 0 (half to even, as
    rint/cvRound), three pixels to 1.5 -> 2."""
    img = np.array([0] * 10 + [5] + [6] * 2 + [9] * 507, dtype=np.uint8).reshape(20, 26)
    out = equalize_hist(img)
    assert np.array_equal(out, ref_equalize(img))
    assert (out[img == 5] == 0).all() and (out[img == 6] == 2).all() and (out[img == 9] == 255).all()


@pytest.mark.parametrize("index", range(4))
def test_minmax_truncates_as_mimic_dcm2img(index):
    values = list(_arrays())[index].astype(np.float64) * -0.5 + 17.25  # negative values, a flipped range
    assert np.array_equal(minmax_uint8(values), ref_mimic_minmax(values))
    assert not minmax_uint8(np.full((3, 4), 9.0)).any()  # constant -> 0 (dcm2img would divide by zero)


@pytest.mark.parametrize("compression", ["none", "rle", "j2k"])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("rescale", [None, (0.5, -1024.0), (-2.0, 8000.0)])
def test_mimic_conversion_on_hand_made_files(compression, photometric, rescale):
    """Decode, modality LUT (a negative slope flips the image: the LUT is applied), truncating min-max,
    MONOCHROME1 inversion and equalisation, each against numpy; every codec the generator writes."""
    for stored in list(_arrays())[:2]:
        data = dicom_bytes(stored, photometric=photometric, compression=compression, rescale=rescale)
        img, info = read_dicom(data)
        slope, intercept = rescale or (1.0, 0.0)
        expected = ref_mimic(stored, slope, intercept, photometric == "MONOCHROME1")
        with open_dicom(data) as d:
            assert np.array_equal(d.pixels(), expected)  # steps 1-5, exact
            assert d.jpeg() == ref_jpeg95_bytes(expected)  # step 6: the MIMIC-CXR-JPG file itself
        got = np.asarray(img)
        assert img.mode == "L" and np.array_equal(got, ref_mimic_jpg(stored, slope, intercept,
                                                                      photometric == "MONOCHROME1"))
        assert not np.array_equal(got, expected)  # the JPEG round trip is there (q95 is lossy here)
        assert (info.rows, info.columns, info.photometric) == (*stored.shape, photometric)


def test_monochrome1_is_inverted():
    """The same film stored both ways reads the same (up to the one grey level of truncating before
    inverting, as dcm2img does); without the inversion it would be the negative."""
    stored = list(_arrays())[1]
    mono2, _ = read_dicom(dicom_bytes(stored, photometric="MONOCHROME2"))
    mono1, _ = read_dicom(dicom_bytes(4095 - stored, photometric="MONOCHROME1"))
    a, b = np.asarray(mono2, float), np.asarray(mono1, float)
    assert np.abs(a - b).mean() < 2.0 and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_voi_lut_transform_windows_after_the_rescale(photometric):
    """`voi-lut`: the window is in rescaled units (PS3.3 linear formula), then inversion, min-max; no
    equalisation. A window read on the stored values would give another image."""
    stored = list(_arrays())[1]
    slope, intercept, center, width = 2.0, -1000.0, 2000.0, 3000.0
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(stored, photometric=photometric, rescale=(slope, intercept))))
    ds.WindowCenter, ds.WindowWidth = center, width
    buf = io.BytesIO()
    ds.save_as(buf)
    img, _ = read_dicom(buf.getvalue(), transform="voi-lut")
    y = ref_linear_window(stored * slope + intercept, center, width)
    if photometric == "MONOCHROME1":
        y = y.max() - y
    expected = ref_mimic_minmax(y)
    got = np.asarray(img).astype(int)
    assert np.abs(got - expected).max() <= 1 and (got != expected).mean() < 0.01  # float rounding only
    on_stored = ref_mimic_minmax(ref_linear_window(stored.astype(float), center, width))
    assert np.abs(got - on_stored).mean() > 5  # (11.6 grey levels here)


@pytest.mark.parametrize("compression", ["none", "rle", "j2k"])
def test_written_files_keep_their_sop_instance_uid(compression):
    """The UID given (the generator derives it from the dicom_id) is the data set's and the file meta's, for
    every codec: a compressed copy does not get a fresh random one, so the generator's files are reproducible."""
    uid = "1.2.826.0.1.3680043.8.498.1234567890"
    stored = list(_arrays())[1]
    data = dicom_bytes(stored, compression=compression, header={"SOPInstanceUID": uid})
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == uid
    assert data == dicom_bytes(stored, compression=compression, header={"SOPInstanceUID": uid})


def test_unknown_transform_and_compression_are_named():
    with pytest.raises(RadalignError, match="dicom_transform: 'window'; valid: mimic, voi-lut"):
        read_dicom(dicom_bytes(list(_arrays())[0]), transform="window")
    with pytest.raises(RadalignError, match="compression 'jpeg'; valid: none, rle, j2k"):
        dicom_bytes(list(_arrays())[0], compression="jpeg")


# ----------------------------------------------------------------------------------------------------------
# Hostile inputs: pydicom's bundled files, truncations, a bomb header.

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent
BUNDLED = {  # as shipped: refused by the first check that fails
    "CT_small.dcm": "not_xray_modality", "MR_small.dcm": "not_xray_modality", "rtdose.dcm": "not_xray_modality",
    "MR_truncated.dcm": "not_xray_modality", "JPEG2000.dcm": "not_xray_modality",
    "MR_small_RLE.dcm": "not_xray_modality", "SC_rgb_jpeg_gdcm.dcm": "not_xray_modality",
    "examples_ybr_color.dcm": "not_xray_modality", "reportsi.dcm": "not_xray_modality",
    "rtplan_truncated.dcm": "truncated_dicom", "image_dfl.dcm": "unsupported_transfer_syntax",
    "meta_missing_tsyntax.dcm": "unsupported_transfer_syntax", "no_meta.dcm": "unreadable_image",
    "zipMR.gz": "unreadable_image", "README.txt": "unreadable_image",
}
AS_DX = {  # Modality rewritten to DX: the next check decides (None: a valid image, decoded)
    "CT_small.dcm": None, "MR_small_RLE.dcm": None, "MR_small_jp2klossless.dcm": None, "JPEG2000.dcm": None,
    "JPGExtended.dcm": None, "MR_small_jpeg_ls_lossless.dcm": None, "MR_small_bigendian.dcm": None,
    "rtdose.dcm": None, "rtplan.dcm": "no_pixel_data", "reportsi.dcm": "no_pixel_data",
    "SC_rgb_rle.dcm": "unsupported_pixel_format", "examples_palette.dcm": "unsupported_pixel_format",
    "liver_1frame.dcm": "unsupported_pixel_format", "image_dfl.dcm": "unsupported_transfer_syntax",
}


def _as_dx(name: str, **changes) -> bytes:
    ds = pydicom.dcmread(TEST_FILES / name)
    ds.Modality = "DX"
    for key, value in changes.items():
        setattr(ds.file_meta if key == "TransferSyntaxUID" else ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_pydicom_test_files_are_refused_by_reason(name):
    with pytest.raises(DicomRefused) as e:
        read_dicom(TEST_FILES / name)
    assert e.value.reason == BUNDLED[name] and name in str(e.value)


def test_every_bundled_file_is_refused_or_read_never_a_traceback():
    """Every file pydicom ships, as shipped and as DX: a DicomRefused with a known reason, or an 8-bit image."""
    outcomes = {}
    for path in sorted(p for p in TEST_FILES.iterdir() if p.is_file()):
        variants = [path.read_bytes()]
        try:
            variants.append(_as_dx(path.name))
        except Exception:  # noqa: BLE001 - files pydicom itself cannot rewrite; the raw bytes are still tried
            pass
        for data in variants:
            try:
                img, _ = read_dicom(data)
                outcomes[path.name] = img.mode
            except DicomRefused as e:
                assert e.reason in ALL_REASONS
    assert len(outcomes) >= 8 and set(outcomes.values()) == {"L"}


@pytest.mark.parametrize("name", sorted(AS_DX))
def test_pydicom_test_files_as_radiographs(name):
    data = _as_dx(name)
    if AS_DX[name] is not None:
        with pytest.raises(DicomRefused) as e:
            read_dicom(data, name=f"upload {name}")
        assert e.value.reason == AS_DX[name] and str(e.value).startswith(f"upload {name}: ")
        return
    img, info = read_dicom(data)
    ds = pydicom.dcmread(io.BytesIO(data))
    stored = ds.pixel_array if int(ds.get("NumberOfFrames", 1) or 1) == 1 else ds.pixel_array[0]
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    assert np.array_equal(np.asarray(img), ref_mimic_jpg(stored, slope, intercept, False)), name
    assert info.modality == "DX"


def test_unknown_transfer_syntax_and_truncated_pixels_of_a_real_file():
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    ds.Modality, ds.PixelData = "DX", encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID("1.2.840.10008.1.2.4.100")  # MPEG2: no decoder
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    mpeg2 = buf.getvalue()
    with pytest.raises(DicomRefused) as e:
        read_dicom(mpeg2)
    assert e.value.reason == "unsupported_transfer_syntax" and "1.2.840.10008.1.2.4.100" in str(e.value)
    raw = (TEST_FILES / "MR_truncated.dcm").read_bytes()
    patched = raw.replace(b"\x08\x00\x60\x00CS\x02\x00MR", b"\x08\x00\x60\x00CS\x02\x00DX", 1)
    assert patched != raw
    with pytest.raises(DicomRefused) as e:
        read_dicom(patched, name="cut.dcm")
    assert e.value.reason == "truncated_dicom"
    assert str(e.value).startswith("cut.dcm: 8,130 bytes of Pixel Data, 8,192 expected")


def test_paths_and_file_objects_are_named_and_left_as_found(tmp_path):
    with pytest.raises(DicomRefused, match=r"^.*missing\.dcm: cannot open") as e:
        read_dicom(tmp_path / "missing.dcm")
    assert e.value.reason == "unreadable_image"
    with open(TEST_FILES / "CT_small.dcm", "rb") as f:
        with pytest.raises(DicomRefused, match=r"CT_small\.dcm: Modality 'CT'"):
            read_dicom(f)
        assert not f.closed  # the caller's file stays open
    with pytest.raises(DicomRefused, match=r"^DICOM stream: Modality 'CT'"):
        read_dicom(io.BytesIO((TEST_FILES / "CT_small.dcm").read_bytes()))
    with pytest.raises(DicomRefused, match=r"Modality '\(none\)'"):
        read_dicom(TEST_FILES / "GDCMJ2K_TextGBR.dcm")  # no Modality element


def test_the_conversion_takes_a_dataset():
    """`dicom_to_image` on a pydicom Dataset (what a caller already holds) is `read_dicom` on its bytes, and
    refuses the same things."""
    from radalign.data.dicom import dicom_to_image

    data = dicom_bytes(list(_arrays())[1], photometric="MONOCHROME1", compression="rle")
    img, info = dicom_to_image(pydicom.dcmread(io.BytesIO(data)), name="held")
    assert np.array_equal(np.asarray(img), np.asarray(read_dicom(data)[0])) and info.photometric == "MONOCHROME1"
    voi, _ = dicom_to_image(pydicom.dcmread(io.BytesIO(data)), transform="voi-lut")
    assert np.array_equal(np.asarray(voi), np.asarray(read_dicom(data, transform="voi-lut")[0]))
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    with pytest.raises(DicomRefused, match="^held: Modality 'CT'"):
        dicom_to_image(ct, name="held")
    ct.Modality = "DX"
    ct.file_meta.TransferSyntaxUID = pydicom.uid.UID("1.2.840.10008.1.2.1.99")
    with pytest.raises(DicomRefused, match="^held: transfer syntax 1.2.840.10008.1.2.1.99 .Deflated.") as e:
        dicom_to_image(ct, name="held")
    assert e.value.reason == "unsupported_transfer_syntax"


@pytest.mark.parametrize("change,reason,words", [
    ({"SamplesPerPixel": 3}, "unsupported_pixel_format", "'MONOCHROME2' with 3 sample(s)"),
    ({"BitsAllocated": 12}, "unsupported_pixel_format", "12 bits allocated; expected 8, 16 or 32"),
    ({"BitsStored": None}, "unsupported_pixel_format", "image header without BitsStored"),
    ({"PixelData": None, "FloatPixelData": b"\0" * 16}, "no_pixel_data", "no (integer) Pixel Data"),
    ({"PixelData": None}, "truncated_dicom", "an image header but no Pixel Data"),
])
def test_malformed_image_headers_are_named(change, reason, words):
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((4, 4), np.uint16))))
    for key, value in change.items():
        if value is None:
            del ds[key]
        else:
            setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(DicomRefused) as e:
        read_dicom(buf.getvalue(), name="x")
    assert e.value.reason == reason and str(e.value).startswith(f"x: {words}")


def _pixel_value_offset(data: bytes) -> int:
    tag = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data, explicit VR little endian: 12-byte header
    assert tag > 0
    return tag + 12


@pytest.mark.parametrize("compression", ["none", "rle", "j2k"])
def test_every_truncation_is_refused(compression):
    """Cut at every byte: never read, never a traceback; inside the Pixel Data always truncated_dicom; in the
    header truncated_dicom except where the cut falls exactly between two elements (then the file is a valid
    but incomplete data set: not_xray_modality or no_pixel_data)."""
    stored = np.random.default_rng(1).integers(0, 4096, (40, 48)).astype(np.uint16)
    data = dicom_bytes(stored, compression=compression, header={"PatientName": PLANTED, "ImageComments": "x" * 99})
    start = _pixel_value_offset(data)
    reasons = {}
    # Every byte of the header; inside the Pixel Data every 5th, and the last 16 (the sequence delimiter).
    cuts = [*range(start + 1), *range(start + 1, len(data) - 16, 5), *range(len(data) - 16, len(data))]
    for cut in cuts:
        with pytest.raises(DicomRefused) as e:
            read_dicom(data[:cut], name=f"cut at {cut}")
        assert str(e.value).startswith(f"cut at {cut}: ")
        reasons[cut] = e.value.reason
    assert {reasons[c] for c in range(132)} == {"unreadable_image"}  # no 'DICM' yet
    assert {reasons[c] for c in cuts if c > start} == {"truncated_dicom"}
    header = [reasons[c] for c in range(132, start + 1)]  # `start`: the Pixel Data header whole, no value byte
    assert set(header) <= {"truncated_dicom", "not_xray_modality", "no_pixel_data"}
    assert header.count("truncated_dicom") >= 0.95 * len(header)


@pytest.mark.parametrize("compression", ["none", "j2k"])
def test_a_60000_square_header_is_refused_before_decoding(compression):
    data = dicom_bytes(np.zeros((32, 32), np.uint16), compression=compression)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows = ds.Columns = 60_000
    buf = io.BytesIO()
    ds.save_as(buf)
    tracemalloc.start()
    try:
        with pytest.raises(DicomRefused) as e:
            read_dicom(buf.getvalue())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.reason == "oversized_image" and isinstance(e.value, OversizedImageError)
    assert "3,600,000,000 pixels" in str(e.value)
    assert peak < 8_000_000  # a decode would need 7.2 GB
    if compression == "none":  # above a raised limit the missing bytes still stop it before any decode
        with pytest.raises(DicomRefused) as e:
            read_dicom(buf.getvalue(), max_pixels=4_000_000_000)
        assert e.value.reason == "truncated_dicom"


def test_multi_frame_pixel_count_includes_frames():
    stored = np.zeros((100, 100), np.uint16)
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(stored)))
    ds.NumberOfFrames = 3
    ds.PixelData = np.zeros((3, 100, 100), np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(DicomRefused, match="30,000 pixels") as e:
        read_dicom(buf.getvalue(), max_pixels=20_000)
    assert e.value.reason == "oversized_image"
    img, info = read_dicom(buf.getvalue(), max_pixels=30_000)
    assert info.frames == 3 and img.size == (100, 100)


def test_one_row_images_read_and_empty_ones_are_refused():
    data = dicom_bytes(np.arange(5, dtype=np.uint16).reshape(1, 5) * 1000)
    img, info = read_dicom(data)
    with open_dicom(data) as d:
        assert np.array_equal(d.pixels(), [[0, 64, 128, 191, 255]])
    assert (info.rows, info.columns) == (1, 5)
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(ref_jpeg95_bytes(
        np.array([[0, 64, 128, 191, 255]], np.uint8))))))
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((1, 5), np.uint16))))
    ds.Rows = 0
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(DicomRefused, match="0 x 5 x 1 frame") as e:
        read_dicom(buf.getvalue())
    assert e.value.reason == "unsupported_pixel_format"


def test_modalities_option_accepts_dr():
    data = dicom_bytes(list(_arrays())[0], modality="DR")
    with pytest.raises(DicomRefused) as e:
        read_dicom(data)
    assert e.value.reason == "not_xray_modality" and "'DR'" in str(e.value)
    assert read_dicom(data, modalities=["CR", "DX", "DR"])[1].modality == "DR"


def test_only_whitelisted_fields_are_read():
    data = dicom_bytes(list(_arrays())[0], header={
        "PatientName": PLANTED, "InstitutionName": "Planted General", "PatientID": "10000032",
        "StudyID": "50414267", "ViewPosition": "AP", "StudyDate": "21800506", "StudyTime": "080556.875"})
    with open_dicom(data) as d:
        keywords = {e.keyword for e in d.ds}
        assert "PatientName" not in keywords and "InstitutionName" not in keywords
        info = d.info
    assert (info.patient_id, info.study_id, info.view, info.study_datetime) == \
        ("10000032", "50414267", "AP", "2180-05-06T08:05:56.875")
    assert PLANTED not in repr(info)


# ----------------------------------------------------------------------------------------------------------
# The generator's DICOM mode and prepare-dicom on it.


@pytest.fixture(scope="module")
def dicom_synth(tmp_path_factory):
    """The conftest set (40 patients, seed 0, 64 px) again, with DICOMs."""
    from radalign.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth_dicom")
    synthesize(out, patients=40, seed=0, image_size=64, workers=1, progress=False, with_dicom=True)
    return out


def _prepare_both(root: Path, tmp: Path, **kw) -> tuple[Path, Path]:
    jpg, dcm = tmp / "from_jpg", tmp / "from_dicom"
    base = {"image_size": 64, "shard_size": 16, "reports": str(root / "mimic-cxr-reports"), **kw}
    prepare(load_config(PrepareConfig, {**base, "out": str(jpg), "mimic_cxr": str(root / "mimic-cxr-jpg")}),
            progress=False)
    prepare(load_config(PrepareConfig, {**base, "out": str(dcm), "mimic_cxr": str(root / "mimic-cxr"),
                                        "tables": str(root / "mimic-cxr-jpg"), "dicom": True}), progress=False)
    return jpg, dcm


@pytest.fixture(scope="module")
def both(dicom_synth, tmp_path_factory):
    return _prepare_both(dicom_synth, tmp_path_factory.mktemp("both"), jpeg_quality=95)


def read_samples(out: Path) -> dict[str, dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    samples = {}
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            with tarfile.open(out / shard["path"]) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_generator_writes_mimic_like_dicoms(dicom_synth, synth_root):
    """CR and DX, 12 bits stored, both photometric interpretations, uncompressed, RLE and JPEG 2000, in
    MIMIC-CXR's layout; the same drawing as the JPG-only mode (whose tables are unchanged)."""
    files = sorted((dicom_synth / "mimic-cxr" / "files").rglob("*.dcm"))
    jpgs = sorted((dicom_synth / "mimic-cxr-jpg" / "files").rglob("*.jpg"))
    assert len(files) == len(jpgs) > 100
    seen = set()
    for path in files:
        rel = path.relative_to(dicom_synth / "mimic-cxr" / "files")
        assert re.fullmatch(r"p1\d/p1\d{7}/s5\d{7}/[0-9a-f-]{44}\.dcm", rel.as_posix())
        ds = pydicom.dcmread(path)
        assert ds.PatientID == rel.parts[1][1:] and ds.StudyID == rel.parts[2][1:]
        assert (ds.BitsAllocated, ds.BitsStored, ds.SamplesPerPixel) == (16, 12, 1) and ds.pixel_array.max() < 4096
        seen.add((ds.Modality, ds.PhotometricInterpretation, ds.file_meta.TransferSyntaxUID.name))
        old = np.asarray(Image.open(synth_root / "mimic-cxr-jpg" / "files" / rel.with_suffix(".jpg")), float)
        drawn = ds.pixel_array.astype(float) * 255 / 4095
        if ds.PhotometricInterpretation == "MONOCHROME1":
            drawn = 255 - drawn
        assert np.abs(drawn - old).mean() < 2.5, rel  # the JPG-only mode's q95 JPEG of the same drawing
    assert {m for m, _, _ in seen} == {"CR", "DX"} and {p for _, p, _ in seen} == {"MONOCHROME1", "MONOCHROME2"}
    assert {t for _, _, t in seen} == {"Explicit VR Little Endian", "RLE Lossless",
                                       "JPEG 2000 Image Compression (Lossless Only)"}
    for rel in ("mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-reports", "mimic-iv/hosp/labevents.csv.gz"):
        a, b = dicom_synth / rel, synth_root / rel
        pairs = [(a, b)] if a.is_file() else [(p, b / p.relative_to(a)) for p in a.rglob("*.txt")]
        assert pairs and all(x.read_bytes() == y.read_bytes() for x, y in pairs), rel


def test_generator_jpg_is_the_mimic_conversion_of_its_dicom(dicom_synth):
    """Each JPG beside a DICOM is dcm2img's file for that DICOM, byte for byte (the independent reference on
    pydicom's own decoding), as MIMIC-CXR-JPG was made."""
    for path in sorted((dicom_synth / "mimic-cxr" / "files").rglob("*.dcm"))[:40]:
        ds = pydicom.dcmread(path)
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        expected = ref_jpeg95_bytes(ref_mimic(ds.pixel_array, slope, intercept,
                                              ds.PhotometricInterpretation == "MONOCHROME1"))
        jpg = dicom_synth / "mimic-cxr-jpg" / path.relative_to(dicom_synth / "mimic-cxr").with_suffix(".jpg")
        assert jpg.read_bytes() == expected, path.name


def test_default_mode_writes_the_same_bytes_as_before_dicom(tmp_path):
    """JPGs and reports of the JPG-only mode are byte-identical to the generator before the DICOM mode
    (hash of that version's output for these arguments; a new Pillow/libjpeg encoder would also move it)."""
    from radalign.data.synth import synthesize

    synthesize(tmp_path, patients=8, seed=3, image_size=48, workers=1, progress=False)
    h = hashlib.sha256()
    for p in sorted(tmp_path.rglob("*")):
        if p.suffix in (".jpg", ".txt") and p.is_file():
            h.update(p.relative_to(tmp_path).as_posix().encode() + b"\0" + p.read_bytes())
    assert h.hexdigest() == "67f6e37e9edd65e8fbbca6370d08b5000a5de0d5483b39ecb9c9c8ba575fc63a"
    assert not (tmp_path / "mimic-cxr").exists()
    assert "dicom" not in json.loads((tmp_path / "synth.json").read_text())["args"]


def _shard_mads(jpg: Path, dcm: Path) -> tuple[dict, dict, list[float]]:
    """Both routes' samples and the mean absolute difference of each image pair (decoded shard JPEGs)."""
    a, b = read_samples(jpg), read_samples(dcm)
    assert set(a) == set(b)
    mads = [float(np.abs(np.asarray(Image.open(io.BytesIO(a[k]["jpg"])), float)
                         - np.asarray(Image.open(io.BytesIO(b[k]["jpg"])), float)).mean()) for k in sorted(a)]
    return a, b, mads


def test_prepare_dicom_equals_prepare_on_the_generators_jpgs(both):
    """Same samples, same JSON and text, the same images (64 px films stored unresized at q95)."""
    jpg, dcm = both
    a, b, mads = _shard_mads(jpg, dcm)
    assert len(a) > 50 and max(mads) == 0.0
    for key in a:
        assert json.loads(a[key]["json"]) == json.loads(b[key]["json"]) and a[key]["txt"] == b[key]["txt"]
        assert a[key]["jpg"] == b[key]["jpg"]
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in both)
    assert mb["source"] == "mimic-cxr-dicom" and ma["source"] == "mimic-cxr"
    assert {k: mb["skipped"][k] for k in SKIP_REASONS} == ma["skipped"]
    assert all(mb["skipped"][k] == 0 for k in DICOM_SKIP_REASONS)
    assert "dicom" not in ma["options"] and mb["options"]["dicom_transform"] == "mimic"


@pytest.mark.parametrize("film,shards", [(160, 128), (256, 48), (256, 32)])
def test_prepare_dicom_equals_prepare_at_demo_sizes(film, shards, tmp_path_factory):
    """Issue 21's acceptance: images within 1 grey level (mean absolute difference of the decoded shard JPEGs),
    at the demo's sizes (160 px films, 128 px shards, default jpeg_quality 90) and at shrinks where `prepare`
    decodes the JPG at a reduced DCT scale (256 -> 48 via 1/4, 256 -> 32 via 1/8). Both routes decode the
    same MIMIC-CXR-JPG bytes (dcm2img's quality-95 write) the same way, so the shards are identical; without
    that write the demo sizes are 2.3 grey levels apart (bench/dicom.py)."""
    from radalign.data.synth import synthesize

    root = tmp_path_factory.mktemp(f"synth{film}")
    synthesize(root, patients=10, seed=5, image_size=film, workers=1, progress=False, with_dicom=True)
    a, b, mads = _shard_mads(*_prepare_both(root, tmp_path_factory.mktemp(f"both{film}"), image_size=shards))
    assert len(a) >= 15 and max(mads) <= 1.0
    assert all(a[k]["jpg"] == b[k]["jpg"] for k in a)
    assert Image.open(io.BytesIO(a[next(iter(a))]["jpg"])).size == (shards, shards)


def test_prepare_dicom_without_tables_reads_views_and_dates_from_headers(dicom_synth, both, tmp_path):
    root = tmp_path / "mimic-cxr"
    root.mkdir()
    (root / "files").symlink_to(dicom_synth / "mimic-cxr" / "files")
    out = tmp_path / "shards"
    m = prepare(load_config(PrepareConfig, {"out": str(out), "mimic_cxr": str(root), "dicom": True,
                                            "reports": str(dicom_synth / "mimic-cxr-reports"), "image_size": 64}),
                progress=False)
    with gzip.open(dicom_synth / "mimic-cxr-jpg" / "mimic-cxr-2.0.0-metadata.csv.gz", "rt") as f:
        meta = {r["dicom_id"]: r for r in __import__("csv").DictReader(f)}
    samples = read_samples(out)
    frontal = {d for d, r in meta.items() if r["ViewPosition"] in ("PA", "AP")}
    assert set(samples) == frontal - _missing_report_ids(both)
    from radalign.data.mimic import parse_study_datetime

    for key, s in samples.items():
        j = json.loads(s["json"])
        assert j["view"] == meta[key]["ViewPosition"]
        assert j["study_datetime"] == parse_study_datetime(meta[key]["StudyDate"], meta[key]["StudyTime"])
        assert all(v is None for v in j["labels"].values())
    assert m["skipped"]["filtered_view"] == len(meta) - len(frontal)
    assert m["notes"]["views_from_headers"] == len(meta) and m["notes"]["split_by_patient_hash"] == len(meta)


def _missing_report_ids(both) -> set[str]:
    rows = (both[0] / "skipped.csv").read_text().splitlines()[1:]
    return {r.split(",")[1] for r in rows if not r.startswith("filtered_view")}


def test_prepare_dicom_resumes_and_refuses_other_options(both, dicom_synth, tmp_path, monkeypatch):
    _, dcm = both
    shas = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in dcm.rglob("*.tar")}
    cfg = json.loads((dcm / "manifest.json").read_text())["options"]
    again = prepare(load_config(PrepareConfig, {**{k: cfg[k] for k in ("mimic_cxr", "reports", "tables",
                                                                       "image_size", "shard_size", "jpeg_quality")},
                                                "dicom": True, "out": str(dcm)}), progress=False)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in dcm.rglob("*.tar")} == shas
    assert again["splits"] == json.loads((dcm / "manifest.json").read_text())["splits"]
    with pytest.raises(RadalignError, match="dicom_transform: 'mimic' -> 'voi-lut'"):
        prepare(load_config(PrepareConfig, {**{k: cfg[k] for k in ("mimic_cxr", "reports", "tables", "image_size",
                                                                   "shard_size", "jpeg_quality")},
                                            "dicom": True, "out": str(dcm), "dicom_transform": "voi-lut"}),
                progress=False)
    # A folder half-written by an older conversion (same options, other pixels) is refused, not mixed in.
    monkeypatch.setattr("radalign.data.dicom.CONVERSION_VERSION", 1)
    with pytest.raises(RadalignError, match="dicom_conversion: 2 -> 1"):
        prepare(load_config(PrepareConfig, {**{k: cfg[k] for k in ("mimic_cxr", "reports", "tables", "image_size",
                                                                   "shard_size", "jpeg_quality")},
                                            "dicom": True, "out": str(dcm)}), progress=False)


# ----------------------------------------------------------------------------------------------------------
# Skips by reason and privacy, on a hand-made MIMIC-CXR DICOM layout.

REPORT = "FINAL REPORT\n FINDINGS: Clear lungs.\n\n IMPRESSION: No acute process.\n"


def _good(view: str = "PA", seed: int = 0, **header) -> bytes:
    stored = (np.random.default_rng(seed).beta(2, 8, (48, 40)) * 4095).astype(np.uint16)  # skewed, like a film
    return dicom_bytes(stored, header={"ViewPosition": view, "StudyDate": "21800506", "StudyTime": "101010",
                                       "PatientName": PLANTED, "InstitutionName": "Planted General",
                                       "ImageComments": "planted comment", **header})


def _hostile_layout(tmp: Path) -> tuple[Path, Path, dict[str, str | None]]:
    """MIMIC-CXR layout with one study per item: id -> expected skip reason (None: a sample)."""
    big = pydicom.dcmread(io.BytesIO(_good()))
    big.Rows = big.Columns = 60_000
    buf = io.BytesIO()
    big.save_as(buf)
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ct.PatientName = PLANTED
    ct_buf = io.BytesIO()
    ct.save_as(ct_buf)
    good = _good()
    items = {
        "ok-pa": (good, None), "ok-ap": (_good("AP", 1, PatientName="Other^" + PLANTED), None),
        "lateral": (_good("LL", 2), "filtered_view"), "ct": (ct_buf.getvalue(), "not_xray_modality"),
        "cut": (good[:len(good) - 100], "truncated_dicom"), "rtplan": (_as_dx("rtplan.dcm"), "no_pixel_data"),
        "deflated": ((TEST_FILES / "image_dfl.dcm").read_bytes(), "unsupported_transfer_syntax"),
        "rgb": (_as_dx("SC_rgb_rle.dcm"), "unsupported_pixel_format"), "big": (buf.getvalue(), "oversized_image"),
        "garbage": (b"not a DICOM file at all\n" * 20, "unreadable_image"),
        "no-report": (_good(seed=3), "missing_report"),
    }
    root, reports = tmp / "mimic-cxr", tmp / "reports"
    for i, (key, (data, _)) in enumerate(items.items()):
        subject, study = 10000001 + i, 50000001 + i
        folder = root / "files" / "p10" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True)
        (folder / f"{key}.dcm").write_bytes(data)
        if key != "no-report":
            report = reports / "files" / "p10" / f"p{subject}" / f"s{study}.txt"
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(REPORT)
    return root, reports, {k: reason for k, (_, reason) in items.items()}


@pytest.fixture
def all_logs(monkeypatch):
    """Every record of radalign's and pydicom's loggers down to DEBUG (prepare's get_logger, which would set
    INFO and stop propagation, hands back the plain logger)."""
    monkeypatch.setattr("radalign.data.prepare.get_logger", logging.getLogger)
    got: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    names = ("", "data", "radalign.data.prepare", "radalign.data.dicom", "pydicom")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    keep = Keep(logging.DEBUG)
    for logger, _ in saved:
        logger.addHandler(keep)
        logger.setLevel(logging.DEBUG)
    yield got
    for logger, level in saved:
        logger.removeHandler(keep)
        logger.setLevel(level)


def test_prepare_dicom_counts_every_skip_by_reason_and_leaks_no_header_text(tmp_path, all_logs, capfd):
    root, reports, expected = _hostile_layout(tmp_path)
    out = tmp_path / "shards"
    assert main(["data", "prepare-dicom", "--mimic-cxr", str(root), "--reports", str(reports), "--out", str(out),
                 "--image-size", "32", "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    counts = {r: 0 for r in (*SKIP_REASONS, *DICOM_SKIP_REASONS)}
    for reason in expected.values():
        if reason:
            counts[reason] += 1
    assert m["skipped"] == counts
    assert set(read_samples(out)) == {k for k, r in expected.items() if r is None}
    listed = dict(line.split(",")[::-1] for line in (out / "skipped.csv").read_text().splitlines()[1:])
    assert listed == {k: r for k, r in expected.items() if r}
    logged = "\n".join(all_logs) + "".join(capfd.readouterr())
    assert any(m.startswith("ct: Modality 'CT'") for m in all_logs)  # the debug lines were captured
    for key, reason in expected.items():
        if reason and reason != "filtered_view":
            assert f"skipped {reason}: {key}" in logged
    # Privacy: no planted header text anywhere, in any file written or any line logged.
    for text in (PLANTED, "Planted General", "planted comment"):
        assert text not in logged
        for path in out.rglob("*"):
            if path.is_file():
                assert text.encode() not in path.read_bytes(), path
                if path.suffix == ".tar":
                    with tarfile.open(path) as tar:
                        assert all(text.encode() not in tar.extractfile(x).read() for x in tar.getmembers())


def test_generated_patient_names_never_reach_the_shards(both):
    _, dcm = both
    for path in dcm.rglob("*"):
        if path.is_file():
            assert b"SYNTHETIC^PATIENT" not in path.read_bytes()
            if path.suffix == ".tar":
                with tarfile.open(path) as tar:
                    assert all(b"SYNTHETIC" not in tar.extractfile(x).read() for x in tar.getmembers())


def test_prepare_dicom_from_a_csv_of_texts(tmp_path):
    """A folder of .dcm files and a CSV of texts: ids from the CSV, view and study time from each header."""
    folder = tmp_path / "dicoms"
    folder.mkdir()
    rows = ["file,report,patient"]
    for i, view in enumerate(["PA", "AP", "LL", "PA"]):
        (folder / f"img{i}.dcm").write_bytes(_good(view, i, StudyDate=f"2180050{i + 1}"))
        rows.append(f"img{i}.dcm,Finding number {i}.,pt{i % 2}")
    shutil.copy(TEST_FILES / "CT_small.dcm", folder / "ct.dcm")
    rows.append("ct.dcm,A CT.,pt9")
    (folder / "texts.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "shards"
    assert main(["data", "prepare-dicom", "--csv", str(folder / "texts.csv"), "--image-col", "file",
                 "--text-col", "report", "--patient-col", "patient", "--out", str(out), "--no-progress",
                 "--views", "all"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"] == "csv-dicom" and m["skipped"]["not_xray_modality"] == 1
    samples = {json.loads(s["json"])["dicom_id"]: (json.loads(s["json"]), s["txt"].decode())
               for s in read_samples(out).values()}
    assert len(samples) == 4
    for key, (j, txt) in samples.items():
        i = int(key[1:8])
        assert (j["view"], j["study_datetime"], txt) == \
            (["PA", "AP", "LL", "PA"][i], f"2180-05-0{i + 1}T10:10:10", f"Finding number {i}.")
        assert j["subject_id"] == f"pt{i % 2}"


def test_voi_lut_option_through_the_cli(tmp_path):
    root, reports, _ = _hostile_layout(tmp_path)
    outs = {}
    for transform in ("mimic", "voi-lut"):
        outs[transform] = tmp_path / transform
        assert main(["data", "prepare-dicom", "--mimic-cxr", str(root), "--reports", str(reports), "--out",
                     str(outs[transform]), "--image-size", "48", "--no-progress", "--dicom-transform", transform,
                     "--modalities", "DX, CR"]) == 0
    a, b = read_samples(outs["mimic"]), read_samples(outs["voi-lut"])
    img, _ = read_dicom(_good(), transform="voi-lut")
    assert set(a) == set(b) == {"ok-pa", "ok-ap"}
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)  # 40 x 48 is below --image-size 48: stored as converted
    assert b["ok-pa"]["jpg"] == buf.getvalue()
    shard = np.asarray(Image.open(io.BytesIO(b["ok-pa"]["jpg"])), float)
    assert np.abs(shard - np.asarray(Image.open(io.BytesIO(a["ok-pa"]["jpg"])), float)).mean() > 10
    opts = json.loads((outs["voi-lut"] / "manifest.json").read_text())["options"]
    assert (opts["dicom_transform"], opts["modalities"]) == ("voi-lut", ["DX", "CR"])


def test_bad_dicom_options_are_one_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(PrepareConfig, {"out": str(tmp_path), "csv": "x.csv", "image_col": "a", "text_col": ["b"],
                                    "dicom": True, "dicom_transform": "window", "modalities": [""],
                                    "tables": str(tmp_path)})
    for word in ("dicom_transform: 'window'", "modalities:", "tables:"):
        assert word in str(e.value)
    with pytest.raises(ConfigError, match="tables: only for prepare-dicom"):
        load_config(PrepareConfig, {"out": str(tmp_path), "mimic_cxr": "a", "reports": "b", "tables": "c"})


def test_an_empty_dicom_tree_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "root" / "files" / "p10").mkdir(parents=True)
    (tmp_path / "reports" / "files" / "p10").mkdir(parents=True)
    assert main(["data", "prepare-dicom", "--mimic-cxr", str(tmp_path / "root"), "--reports",
                 str(tmp_path / "reports"), "--out", str(tmp_path / "out"), "--no-progress"]) != 0
    assert "no .dcm files" in capsys.readouterr().err

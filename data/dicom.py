"""DICOM in: one safe reader and one conversion, the way MIMIC-CXR-JPG was made from MIMIC-CXR's DICOMs.

    from radalign.data.dicom import read_dicom
    img, info = read_dicom(path_or_bytes)        # PIL "L" and DicomInfo (whitelisted header fields only)

Used by `radalign data prepare-dicom` (data/prepare.py), the generator's `--dicom` mode and any reader of a
DICOM query, so a DICOM film lands in the distribution the encoders were trained on (docs/data.md, "DICOM").

Conversion, `transform="mimic"` (default). MIT-LCP's `dcm2img` (github.com/MIT-LCP/mimic-cxr/issues/16, the
function that made MIMIC-CXR-JPG; Johnson et al. 2019, arXiv:1901.07042):
1. decode the stored values (pydicom + pylibjpeg: native, RLE, JPEG, JPEG-LS, JPEG 2000; unused high bits
   masked); multi-frame objects give their first frame;
2. modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence). MIMIC's code used the stored values;
   the result is the same whenever the slope is positive (step 3 is blind to a positive affine map);
3. min-max to 8 bits, truncating: floor((v - min) / (max - min) * 255); a constant image becomes 0;
4. MONOCHROME1 inverted after the scaling (255 - v, OpenCV's bitwise_not): low values are white there;
5. histogram equalisation with OpenCV's `equalizeHist` lookup table, in numpy (`equalize_hist`);
6. the JPEG file dcm2img wrote (`cv2.imwrite` with no parameters: OpenCV's default quality, 95; libjpeg via
   PIL at quality 95 writes the same bytes), decoded as `data.images.open_image` decodes MIMIC-CXR-JPG's files
   (`short_side`: at the same reduced DCT scale as `prepare` on a JPG). So a DICOM gives the pixels its
   MIMIC-CXR-JPG file gives, JPEG artefacts included (`DicomFile.pixels()` is steps 1-5 alone).
`transform="voi-lut"`: 1, 2, then the header's VOI LUT or window (pydicom's `apply_voi_lut`), 4 and 3 in
the order of the Kaggle/VinDr-CXR readers (invert, then min-max), no equalisation.

Safe reading (`open_dicom`); each refusal is a `DicomRefused` whose `.reason` is a prepare skip reason:
- `unreadable_image`: not a DICOM file (no `DICM` at byte 128), or the decoder failed on a damaged codestream;
- `unsupported_transfer_syntax`: no transfer syntax, Deflated (a zip bomb pydicom would inflate whole), or no
  installed decoder (checked from the file meta, before the data set is parsed);
- `not_xray_modality`: Modality not in `modalities` (CR, DX; DR where a site writes it);
- `no_pixel_data`: no Pixel Data element (SR, RT plan, presentation states), or float pixel data;
- `unsupported_pixel_format`: not one sample of MONOCHROME1/2, or a missing Rows/Columns/Bits element;
- `oversized_image`: Rows x Columns x frames above `max_pixels`, from the header, before any decoding;
- `truncated_dicom`: the file ends inside an element (a read that returns part of what was asked, a seek
  past the end over a deferred value), Pixel Data missing after the image header, or fewer pixel bytes
  than Rows x Columns x frames x Bits Allocated.
Pixel Data is read only after those checks (pydicom's `defer_size`), so a 60,000 x 60,000 header costs no
allocation. Privacy: only the tags in `WHITELIST` and `TECHNICAL` are parsed at all (pydicom's
`specific_tags`): a Patient Name is never read, so it cannot reach a shard, a log line or an error message.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from radalign.data.images import DEFAULT_MAX_PIXELS, OversizedImageError, open_image

from radalign import RadalignError

DICOM_TRANSFORMS = ("mimic", "voi-lut")
# The conversion's version, recorded in prepare-dicom's options so a resume never mixes shards of two versions.
# 2: step 6 (the JPEG write at MIMIC_JPEG_QUALITY, decoded as prepare decodes a JPG) added.
CONVERSION_VERSION = 2
MIMIC_JPEG_QUALITY = 95  # dcm2img's cv2.imwrite without parameters: OpenCV's default IMWRITE_JPEG_QUALITY
XRAY_MODALITIES = ("CR", "DX")
# The reasons a DICOM is refused beyond those every prepare source has (oversized_image, unreadable_image).
DICOM_SKIP_REASONS = ("not_xray_modality", "unsupported_transfer_syntax", "unsupported_pixel_format",
                      "no_pixel_data", "truncated_dicom")
# Header fields that may leave this module (DicomInfo -> shards, logs, a service's answers): ids, view, date.
WHITELIST = ("PatientID", "StudyID", "StudyInstanceUID", "SOPInstanceUID", "ViewPosition", "StudyDate",
             "StudyTime")
# Read only to refuse and to decode; of these, only Modality, the photometric interpretation, the transfer
# syntax and the image size appear in refusal messages.
TECHNICAL = ("Modality", "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "NumberOfFrames",
             "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration",
             "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "WindowCenter",
             "WindowWidth", "VOILUTFunction", "VOILUTSequence", "PixelData", "FloatPixelData",
             "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths")
NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")  # implicit/explicit LE, BE
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")
_DEFER = 64 * 1024            # values above this are read when used (Pixel Data: after the checks)
_SCAN_CHUNK = 8 * 1024        # pydicom scans undefined-length values in chunks of this size (may end short)
_ROWS_PER_BLOCK = 256


class DicomRefused(RadalignError):
    """A DICOM that is not read, with the prepare skip reason (`.reason`) it counts under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class OversizedDicomError(DicomRefused, OversizedImageError):
    """Rows x Columns x frames above the pixel limit (also an `OversizedImageError`, as for other images)."""


@dataclass(frozen=True)
class DicomInfo:
    """What a read DICOM may tell the rest of radalign: the whitelisted fields and the decoding facts."""

    patient_id: str | None        # PatientID
    study_id: str | None          # StudyID
    study_uid: str | None         # StudyInstanceUID
    sop_uid: str | None           # SOPInstanceUID
    view: str | None              # ViewPosition ("PA", "AP", "LL", ...), None when blank
    study_datetime: str | None    # StudyDate + StudyTime as ISO-8601 (data.mimic.parse_study_datetime)
    modality: str
    rows: int
    columns: int
    frames: int
    photometric: str              # MONOCHROME1 | MONOCHROME2
    transfer_syntax: str          # UID


# ----------------------------------------------------------------------------------------------------------
# The conversion (numpy; the reference tests check each step against an independent computation).


def minmax_uint8(values: np.ndarray) -> np.ndarray:
    """floor((v - min) / (max - min) * 255) as uint8 (MIMIC-CXR-JPG's truncating scale); constant -> 0.
    In row blocks: the peak is one float64 block beside the image, not a float64 copy of all of it."""
    lo, hi = float(np.min(values)), float(np.max(values))
    out = np.zeros(values.shape, dtype=np.uint8)  # [H, W]
    if hi > lo:
        for r in range(0, values.shape[0], _ROWS_PER_BLOCK):
            block = (values[r:r + _ROWS_PER_BLOCK].astype(np.float64) - lo) / (hi - lo) * 255.0
            out[r:r + _ROWS_PER_BLOCK] = np.floor(block).astype(np.uint8)  # in [0, 255]: lo is the minimum
    return out


def equalize_hist(img: np.ndarray) -> np.ndarray:
    """OpenCV's `equalizeHist` on uint8: lut[v] = round(255 (cdf(v) - n_min) / (N - n_min)), n_min the count of
    the smallest value present (it maps to 0); a constant image is returned unchanged. In exact integers,
    rounding half to even (OpenCV's float32 product can differ by one grey level on an exact tie)."""
    hist = np.bincount(img.ravel(), minlength=256).astype(np.int64)  # [256]
    first = int(np.flatnonzero(hist)[0])
    span = int(img.size - hist[first])
    if span == 0:
        return img.copy()
    num = np.clip(np.cumsum(hist) - hist[first], 0, None) * 255  # [256] 255 x pixels in (first, v]
    q, r = np.divmod(num, span)
    lut = q + ((2 * r > span) | ((2 * r == span) & (q % 2 == 1)))  # round half to even
    return lut.astype(np.uint8)[img]


def convert_pixels(ds, stored: np.ndarray, transform: str) -> np.ndarray:
    """Stored values of one frame [H, W] -> uint8 [H, W] by `transform` (module docstring)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if transform not in DICOM_TRANSFORMS:
        raise RadalignError(f"dicom_transform: {transform!r}; valid: {', '.join(DICOM_TRANSFORMS)}")
    values = apply_modality_lut(stored, ds)
    monochrome1 = str(ds.PhotometricInterpretation).strip() == "MONOCHROME1"
    if transform == "voi-lut":
        values = apply_voi_lut(values, ds)
        if monochrome1:
            values = np.max(values) - values
        return minmax_uint8(values)
    out = minmax_uint8(values)
    if monochrome1:
        out = 255 - out
    return equalize_hist(out)


def mimic_jpeg(pixels: np.ndarray) -> bytes:
    """Step 6: converted uint8 pixels [H, W] as the JPEG file MIMIC-CXR-JPG holds (quality 95)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=MIMIC_JPEG_QUALITY)
    return buf.getvalue()


def to_image(pixels: np.ndarray, transform: str, short_side: int | None = None):
    """Converted pixels -> PIL "L": for `mimic`, through its JPEG file, decoded as `prepare` decodes a JPG
    (`short_side`: the smallest reduced DCT scale still that large); `voi-lut` as they are."""
    from PIL import Image

    if transform != "mimic":
        return Image.fromarray(pixels, mode="L")
    return open_image(io.BytesIO(mimic_jpeg(pixels)), max_pixels=None, short_side=short_side)


def dicom_to_image(ds, *, transform: str = "mimic", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                   modalities=XRAY_MODALITIES, name: str = "DICOM", short_side: int | None = None):
    """The conversion: a pydicom Dataset -> (8-bit grayscale PIL image, DicomInfo). Refuses (DicomRefused)
    what `check_header` refuses; `read_dicom` is the safe way to get a Dataset from a file or an upload."""
    info = check_header(ds, max_pixels=max_pixels, modalities=modalities, name=name)
    return to_image(_decode(ds, info, transform, name), transform, short_side), info


# ----------------------------------------------------------------------------------------------------------
# Header checks (no pixel is decoded before these pass).


def check_header(ds, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, modalities=XRAY_MODALITIES,
                 name: str = "DICOM") -> DicomInfo:
    """The refusals that need only the header, in a fixed order; returns the DicomInfo of an accepted one."""
    syntax = _transfer_syntax(ds, name)
    modality = str(ds.get("Modality") or "").strip().upper()
    accepted = [m.upper() for m in modalities]
    if modality not in accepted:
        raise DicomRefused("not_xray_modality",
                           f"{name}: Modality {modality[:16] or '(none)'!r} is not an accepted X-ray modality "
                           f"({', '.join(accepted)}); radalign reads chest radiographs only (CR, DX; add DR with "
                           f"modalities=[CR,DX,DR] where a site writes it)")
    if "PixelData" not in ds:
        if "Rows" in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise DicomRefused("truncated_dicom", f"{name}: an image header but no Pixel Data; the file was "
                                                  f"cut short (copy it again)")
        raise DicomRefused("no_pixel_data", f"{name}: no (integer) Pixel Data element; nothing to read")
    rows, columns, frames, photometric = _geometry(ds, name)
    pixels = rows * columns * frames
    if max_pixels is not None and pixels > max_pixels:
        raise OversizedDicomError("oversized_image",
                                  f"{name}: {rows} x {columns} x {frames} frame(s) = {pixels:,} pixels, above the "
                                  f"limit of {max_pixels:,}; raise max_pixels if the file is a genuine image")
    if syntax in NATIVE_SYNTAXES:
        expected = pixels * int(ds.BitsAllocated) // 8
        if len(ds.PixelData) < expected:
            raise DicomRefused("truncated_dicom", f"{name}: {len(ds.PixelData):,} bytes of Pixel Data, "
                                                  f"{expected:,} expected; the file was cut short (copy it again)")
    return DicomInfo(
        patient_id=_text(ds, "PatientID"), study_id=_text(ds, "StudyID"), study_uid=_text(ds, "StudyInstanceUID"),
        sop_uid=_text(ds, "SOPInstanceUID"), view=_text(ds, "ViewPosition"),
        study_datetime=_study_datetime(ds), modality=modality, rows=rows, columns=columns, frames=frames,
        photometric=photometric, transfer_syntax=syntax)


def _transfer_syntax(ds, name: str) -> str:
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "") if meta is not None else "").strip()
    check_transfer_syntax(syntax, name)
    return syntax


def check_transfer_syntax(syntax: str, name: str = "DICOM") -> None:
    """Refuse (unsupported_transfer_syntax) what this install cannot decode safely."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    if not syntax:
        raise DicomRefused("unsupported_transfer_syntax", f"{name}: no Transfer Syntax UID in the file meta")
    if syntax in DEFLATED:
        raise DicomRefused("unsupported_transfer_syntax",
                           f"{name}: transfer syntax {syntax} (Deflated) is not read: it would be inflated whole "
                           f"before any check; re-export the image uncompressed or JPEG/JPEG 2000/RLE compressed")
    if syntax in NATIVE_SYNTAXES:
        return
    uid = UID(syntax)
    try:
        available = get_decoder(uid).is_available
    except (NotImplementedError, ValueError):
        available = False
    if not available:
        label = uid.name if uid.is_transfer_syntax else "unknown"
        raise DicomRefused("unsupported_transfer_syntax",
                           f"{name}: transfer syntax {syntax} ({label}) has no decoder installed; install the "
                           f"pylibjpeg plugins (pip install radalign) or re-export the image uncompressed")


def _geometry(ds, name: str) -> tuple[int, int, int, str]:
    """(rows, columns, frames, photometric) of a one-sample MONOCHROME1/2 image; unsupported_pixel_format else."""
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation",
                           "PhotometricInterpretation") if ds.get(k) in (None, "")]
    if missing:
        raise DicomRefused("unsupported_pixel_format", f"{name}: image header without {', '.join(missing)}")
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    samples = int(ds.get("SamplesPerPixel") or 1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples != 1:
        raise DicomRefused("unsupported_pixel_format",
                           f"{name}: {photometric[:16]!r} with {samples} sample(s) per pixel; a radiograph is "
                           f"one sample of MONOCHROME1 or MONOCHROME2")
    if int(ds.BitsAllocated) not in (8, 16, 32):
        raise DicomRefused("unsupported_pixel_format",
                           f"{name}: {int(ds.BitsAllocated)} bits allocated; expected 8, 16 or 32")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows < 1 or columns < 1 or frames < 1:
        raise DicomRefused("unsupported_pixel_format", f"{name}: {rows} x {columns} x {frames} frame(s)")
    return rows, columns, frames, photometric


def _text(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = "" if value is None else str(value).strip()
    return text or None


def _study_datetime(ds) -> str | None:
    from radalign.data.mimic import parse_study_datetime

    return parse_study_datetime(_text(ds, "StudyDate"), _text(ds, "StudyTime"))


def _decode(ds, info: DicomInfo, transform: str, name: str) -> np.ndarray:
    """First frame -> converted uint8 [H, W] (steps 1-5). A decoder failure is unreadable_image: a cut file is
    refused before (its Pixel Data is short, or pydicom stops inside it), so what fails here is a damaged
    codestream."""
    from pydicom.pixels import get_decoder

    try:
        stored = get_decoder(info.transfer_syntax).as_array(ds, index=0)[0]  # [H, W], first frame
    except Exception as e:  # noqa: BLE001 - decoders raise ValueError, RuntimeError, KeyError, struct.error, ...
        raise DicomRefused("unreadable_image", f"{name}: pixel data could not be decoded ({type(e).__name__})") \
            from None
    return convert_pixels(ds, stored, transform)


# ----------------------------------------------------------------------------------------------------------
# Safe reading.


class _Watch:
    """A read-only file wrapper that notices a cut-off file: a read returning part of what was asked, or a
    seek past the end (pydicom seeks over deferred values). pydicom scans undefined-length values in
    `_SCAN_CHUNK` reads, whose last one is short at the end of a complete file: those are not counted."""

    def __init__(self, f: BinaryIO, size: int):
        self._f, self.size, self.cut = f, size, False

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if n is not None and 0 < len(data) < n and n != _SCAN_CHUNK:
            self.cut = True
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = self._f.seek(offset, whence)
        if pos > self.size:
            self.cut = True
        return pos

    def tell(self) -> int:
        return self._f.tell()


class DicomFile:
    """A DICOM whose header passed every check; `image()` decodes and converts it. From `open_dicom`."""

    def __init__(self, ds, info: DicomInfo, watch: _Watch, closer, name: str):
        self.ds, self.info, self._watch, self._closer, self.name = ds, info, watch, closer, name

    def pixels(self, transform: str = "mimic") -> np.ndarray:
        """Steps 1-5 of `transform` (no JPEG): uint8 [H, W] (reads the deferred Pixel Data now)."""
        out = _decode(self.ds, self.info, transform, self.name)
        if self._watch.cut:
            raise DicomRefused("truncated_dicom", f"{self.name}: the file ends inside its Pixel Data; copy it again")
        return out

    def jpeg(self) -> bytes:
        """This film's MIMIC-CXR-JPG file: steps 1-6 (what the generator writes beside its DICOMs)."""
        return mimic_jpeg(self.pixels("mimic"))

    def image(self, transform: str = "mimic", short_side: int | None = None):
        """The converted 8-bit grayscale PIL image (module docstring; `short_side` as `data.images.open_image`)."""
        return to_image(self.pixels(transform), transform, short_side)

    def close(self) -> None:
        if self._closer is not None:
            self._closer.close()
            self._closer = None

    def __enter__(self) -> DicomFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_dicom(source: str | os.PathLike | bytes | BinaryIO, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               modalities=XRAY_MODALITIES, name: str | None = None) -> DicomFile:
    """Read and check the header of a path, bytes or binary file object; Pixel Data stays on disk until
    `.image()`. Raises DicomRefused (every reason in the module docstring), never a pydicom exception."""
    f, closer, label = _binary(source, name)
    try:
        size = _size(f)
        watch = _Watch(f, size)
        check_transfer_syntax(_peek_transfer_syntax(watch, label), label)
        ds = _parse(watch, label)
        # pydicom rewinds and ends the data set when the file ends inside an undefined-length value (the
        # compressed Pixel Data): a parse that stopped before the end is a cut file too.
        if watch.cut or watch.tell() < size:
            raise DicomRefused("truncated_dicom", f"{label}: the file ends inside an element; copy it again")
        info = check_header(ds, max_pixels=max_pixels, modalities=modalities, name=label)
    except BaseException:
        if closer is not None:
            closer.close()
        raise
    return DicomFile(ds, info, watch, closer, label)


def read_dicom(source: str | os.PathLike | bytes | BinaryIO, *, transform: str = "mimic",
               max_pixels: int | None = DEFAULT_MAX_PIXELS, modalities=XRAY_MODALITIES, name: str | None = None,
               short_side: int | None = None):
    """(PIL "L" image, DicomInfo) of a DICOM file, bytes or file object: `open_dicom` then the conversion."""
    with open_dicom(source, max_pixels=max_pixels, modalities=modalities, name=name) as d:
        return d.image(transform, short_side), d.info


def _binary(source, name: str | None) -> tuple[Any, Any, str]:
    """(file object, what to close or None, label for messages)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), None, name or "uploaded DICOM"
    if isinstance(source, (str, os.PathLike)):
        try:
            f = open(source, "rb")  # noqa: SIM115 - closed by DicomFile.close (Pixel Data is read later)
        except OSError as e:
            raise DicomRefused("unreadable_image", f"{name or source}: cannot open ({e.strerror or e})") from None
        return f, f, name or str(source)
    return source, None, name or getattr(source, "name", None) or "DICOM stream"


def _size(f) -> int:
    pos = f.tell()
    end = f.seek(0, os.SEEK_END)
    f.seek(pos)
    return end


def _peek_transfer_syntax(watch: _Watch, label: str) -> str:
    """The Transfer Syntax UID from the file meta, before pydicom parses (or inflates) the data set."""
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import _read_file_meta_info, read_preamble

    watch.seek(0)
    try:
        read_preamble(watch, False)
    except InvalidDicomError:
        raise DicomRefused("unreadable_image", f"{label}: not a DICOM file (no 'DICM' at byte 128)") from None
    try:
        meta = _read_file_meta_info(watch)  # the group 0002 reader dcmread itself uses
    except Exception as e:  # noqa: BLE001 - a damaged meta group raises anything from struct.error to KeyError
        raise _damaged(watch, f"{label}: unreadable file meta information ({type(e).__name__})") from None
    if watch.cut or watch.tell() >= watch.size:
        raise DicomRefused("truncated_dicom", f"{label}: the file ends in its meta information; copy it again")
    watch.seek(0)
    return str(meta.get("TransferSyntaxUID", "") or "").strip()


def _parse(watch: _Watch, label: str):
    """dcmread of the whitelisted and technical tags only, Pixel Data deferred."""
    import pydicom

    try:
        return pydicom.dcmread(watch, defer_size=_DEFER, specific_tags=list(WHITELIST + TECHNICAL))
    except Exception as e:  # noqa: BLE001 - pydicom raises EOFError, ValueError, struct.error, ... on damage
        raise _damaged(watch, f"{label}: unreadable DICOM data set ({type(e).__name__})") from None


def _damaged(watch: _Watch, message: str) -> DicomRefused:
    """A parse error at the end of the file is a cut file (truncated_dicom); elsewhere, damage (unreadable)."""
    if watch.cut or watch.tell() >= watch.size:
        return DicomRefused("truncated_dicom", message + "; the file was cut short (copy it again)")
    return DicomRefused("unreadable_image", message)


# ----------------------------------------------------------------------------------------------------------
# Writing (the generator's `--dicom` mode and the tests).

SOP_CLASSES = {"CR": "1.2.840.10008.5.1.4.1.1.1",        # Computed Radiography Image Storage
               "DX": "1.2.840.10008.5.1.4.1.1.1.1"}      # Digital X-Ray Image Storage - For Presentation
COMPRESSIONS = {"none": "1.2.840.10008.1.2.1",             # Explicit VR Little Endian
                "rle": "1.2.840.10008.1.2.5",              # RLE Lossless (pydicom's encoder)
                "j2k": "1.2.840.10008.1.2.4.90"}           # JPEG 2000 Lossless (pylibjpeg-openjpeg)


def dicom_bytes(stored: np.ndarray, *, modality: str = "DX", photometric: str = "MONOCHROME2",
                compression: str = "none", bits_stored: int = 12, header: dict | None = None,
                rescale: tuple[float, float] | None = None) -> bytes:
    """A single-frame radiograph as DICOM Part 10 bytes: uint16 stored values [H, W] (< 2**bits_stored),
    `header` keywords (PatientID, ViewPosition, StudyDate, ...) as given, `rescale` = (slope, intercept)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    if compression not in COMPRESSIONS:
        raise RadalignError(f"compression {compression!r}; valid: {', '.join(COMPRESSIONS)}")
    stored = np.ascontiguousarray(stored, dtype=np.uint16)  # [H, W]
    header = dict(header or {})
    sop_uid = header.pop("SOPInstanceUID", None) or generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(SOP_CLASSES.get(modality, SOP_CLASSES["DX"]))
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, UID(sop_uid)
    ds.Modality = modality
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = f"{rescale[0]:g}", f"{rescale[1]:g}"
    ds.PixelData = stored.tobytes()
    if compression != "none":
        # pydicom would give a compressed copy a new random SOP Instance UID: keep the given one (the file meta
        # says it too) so the generator writes the same files on every run.
        ds.compress(UID(COMPRESSIONS[compression]), stored, generate_instance_uid=False)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write_dicom(path: str | os.PathLike, stored: np.ndarray, **kwargs) -> None:
    """`dicom_bytes` written to `path` through a temporary file and a rename (a crash leaves no partial file;
    no fsync: the generator writes thousands)."""
    from radalign.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(dicom_bytes(stored, **kwargs))


__all__ = ["read_dicom", "open_dicom", "dicom_to_image", "check_header", "convert_pixels", "equalize_hist",
           "minmax_uint8", "mimic_jpeg", "to_image", "dicom_bytes", "write_dicom", "DicomInfo", "DicomFile",
           "DicomRefused", "OversizedDicomError", "DICOM_TRANSFORMS", "MIMIC_JPEG_QUALITY", "CONVERSION_VERSION", "DICOM_SKIP_REASONS",
           "XRAY_MODALITIES", "WHITELIST", "TECHNICAL"]

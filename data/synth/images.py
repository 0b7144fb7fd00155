"""Procedural chest radiographs for the synthetic MIMIC stand-in (`radalign.data.synth`).

Everything is drawn with vectorised numpy at the target size (no per-pixel Python loops), so one
256 px image costs a few milliseconds. Conventions:

* Frontal views use radiological display: the patient's RIGHT is on the image LEFT. A left pleural
  effusion therefore brightens the base on the right half of the image. Nothing downstream flips images.
* Coordinates: `x` runs -1 (image left) .. +1 (image right), `y` runs 0 (top) .. 1 (bottom).
* Intensities are in [0, 1] while drawing: air dark, soft tissue grey, bone/fluid/metal bright.
* `strength = 1 - 0.75 * difficulty` scales the contrast and size of every finding's correlate:
  difficulty 0 is blatant, 1 is subtle but still present.

Why hand-rolled: no maintained library renders labelled synthetic chest radiographs; the drawing
primitives that exist (PIL ImageDraw) are used for the thin device lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FRONTAL_VIEWS = ("PA", "AP")


@dataclass
class ImageSpec:
    """What one image shows: the study's ground truth plus how it was taken."""

    view: str                                   # "PA" | "AP" | "LATERAL" (LL renders as LATERAL)
    findings: dict[str, int]                    # 14 CheXpert names -> 0/1 (ground truth)
    sides: dict[str, str] = field(default_factory=dict)      # finding -> "left" | "right" | "bilateral"
    severity: dict[str, int] = field(default_factory=dict)   # finding -> 1 (mild) .. 3 (severe)
    devices: tuple[str, ...] = ()               # "ett", "ng", "cvc", "picc", "pacemaker", "sternal"


def _sig(v: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * v)  # the logistic function, without exp overflow warnings


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise in [-1, 1]-ish: a `cells`x`cells` random grid upsampled bicubically."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)  # [S, S]


def _superellipse(x, y, cx, cy, ax, ay, p=2.5):
    """<1 inside the superellipse centred (cx, cy) with half-axes (ax, ay), >1 outside."""
    return np.abs((x - cx) / ax) ** p + np.abs((y - cy) / ay) ** p


class _Canvas:
    """Shared geometry for one image: coordinate grids (with a per-image pose jitter) and a pixel scale."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size = size
        s = np.float32(size)
        scale = rng.uniform(0.93, 1.04)
        cx, cy = rng.uniform(-0.04, 0.04), rng.uniform(-0.03, 0.03)
        xs = ((np.arange(size, dtype=np.float32) + 0.5) / s * 2 - 1 - cx) / scale
        ys = ((np.arange(size, dtype=np.float32) + 0.5) / s - 0.5 - cy) / scale + 0.5
        self.x = xs[None, :]                    # [1, S]
        self.y = ys[:, None]                    # [S, 1]
        self.scale, self.cx, self.cy = scale, cx, cy
        self.px = 2.0 / (size * scale)          # one pixel in x units

    def to_pixels(self, x: float, y: float) -> tuple[float, float]:
        """Anatomical (x, y) -> pixel (col, row), for PIL drawing."""
        col = ((x * self.scale + self.cx) + 1) / 2 * self.size
        row = ((y - 0.5) * self.scale + 0.5 + self.cy) * self.size
        return col, row


def render(spec: ImageSpec, size: int, difficulty: float, rng: np.random.Generator) -> np.ndarray:
    """Draw one radiograph; returns uint8 [size, size]."""
    return quantize(render_float(spec, size, difficulty, rng), 8)


def quantize(img: np.ndarray, bits: int) -> np.ndarray:
    """[0, 1] float -> rounded integers 0 .. 2**bits - 1 (uint8 up to 8 bits, else uint16: 12-bit DICOM)."""
    return (img * float(2**bits - 1) + 0.5).astype(np.uint8 if bits <= 8 else np.uint16)


def render_float(spec: ImageSpec, size: int, difficulty: float, rng: np.random.Generator) -> np.ndarray:
    """Draw one radiograph; returns float32 [size, size] in [0, 1] (`render` and the DICOM writer quantise it)."""
    strength = float(1.0 - 0.75 * np.clip(difficulty, 0.0, 1.0))
    canvas = _Canvas(size, rng)
    if spec.view in FRONTAL_VIEWS:
        img = _frontal(spec, canvas, strength, rng)
    else:
        img = _lateral(spec, canvas, strength, rng)
    img = _devices(img, spec, canvas, strength, rng)
    # Acquisition variation: exposure, contrast, gamma and quantum noise.
    img = img * rng.uniform(0.9, 1.08) + rng.uniform(-0.04, 0.04)
    img = np.clip(img, 0.0, 1.0) ** np.float32(rng.uniform(0.85, 1.2))
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(0.015, 0.03))
    return np.clip(img, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# Frontal (PA / AP)


def _side_sign(side: str) -> list[float]:
    """Patient side -> image x sign(s): patient's right is image left (x < 0)."""
    return {"right": [-1.0], "left": [1.0], "bilateral": [-1.0, 1.0]}.get(side, [1.0])


def _frontal(spec: ImageSpec, c: _Canvas, k: float, rng: np.random.Generator) -> np.ndarray:
    f, sev = spec.findings, spec.severity
    x, y = c.x, c.y
    ax = np.abs(x)                                                         # [1, S] distance from midline
    right_half = (x < 0).astype(np.float32)                                # patient's right lung
    ap = spec.view == "AP"

    body = _sig((0.93 - ax) / 0.02) * _sig((y + 0.02) / 0.02)               # [S, S]
    img = 0.06 + 0.40 * body

    # Lungs: a boxy superellipse per side, cut below by a domed hemidiaphragm. The right dome sits higher.
    dome_base = rng.uniform(0.77, 0.82) - (0.05 if ap else 0.0)
    vol_loss = 0.03 if f.get("Atelectasis") else 0.0
    dome_r, dome_l = dome_base - 0.02, dome_base + 0.01
    dome_side = dome_r * right_half + dome_l * (1 - right_half)            # [1, S]
    dome = dome_side - 0.09 * np.clip(1 - ((ax - 0.45) / 0.42) ** 2, 0, 1) - vol_loss
    shape = _superellipse(ax, y, 0.46, 0.52, 0.37, 0.44)                   # [S, S]
    lung = _sig((1 - shape) / 0.04) * _sig((dome - y) / 0.006)              # [S, S] 1 inside either lung

    # Vascular markings: band-limited noise, strongest near the hila, fading laterally.
    markings = _smooth_noise(rng, c.size, 28) * np.exp(-((ax - 0.15) / 0.45) ** 2) * 0.045
    if f.get("Edema"):
        markings = markings * (1.0 + 1.2 * k)                              # interstitial prominence
    ptx = _pneumothorax_region(spec, c, ax, y, k) if f.get("Pneumothorax") else None
    if ptx is not None:
        markings = markings * (1 - ptx)                                    # no lung markings beyond the edge
    img = img - lung * (0.27 - markings)

    # Ribs (posterior arcs as one periodic pattern) and clavicles; bone shows over the lungs.
    phase = (y - 0.10 * ax + 0.32 * ax**2) / 0.085
    if f.get("Fracture"):
        phase = phase + _fracture_shift(spec, c, x, y, k, rng)
    ribs = np.clip(np.cos(2 * np.pi * phase), 0, 1) ** 3 * _sig((0.88 - ax) / 0.03) * (y < dome + 0.02)
    if f.get("Fracture"):
        ribs = ribs * _fracture_gap(spec, c, x, y, k)
        fx, fy = _fracture_centre(spec, c)                                  # callus / overlapping fragments
        img = img + (0.25 * (0.4 + 0.6 * k)) * np.exp(-(((x - fx) / 0.045) ** 2 + ((y - fy) / 0.028) ** 2))
    img = img + 0.10 * ribs * body
    img = img + 0.14 * np.exp(-((y - (0.11 + 0.10 * ax)) / 0.016) ** 2) * (ax < 0.62) * (ax > 0.04)

    # Mediastinum, spine and hila.
    med_w = 0.13 + (0.07 + 0.05 * k) * sev.get("Enlarged Cardiomediastinum", 2) / 2 * f.get(
        "Enlarged Cardiomediastinum", 0)
    upper = _sig((0.58 - y) / 0.03) * _sig((y - 0.03) / 0.02)
    img = img + 0.26 * _sig((med_w - ax) / 0.015) * upper
    img = img + 0.10 * _sig((0.05 - ax) / 0.01) * body
    img = img + 0.10 * np.exp(-(((ax - 0.17) / 0.05) ** 2 + ((y - 0.46) / 0.06) ** 2))

    # Heart: ellipse offset to the patient's left (image right); AP magnifies it a little.
    hw = rng.normal(0.30, 0.012) * (1.06 if ap else 1.0)
    if f.get("Cardiomegaly"):
        hw += (0.06 + 0.08 * k) * (0.7 + 0.15 * sev.get("Cardiomegaly", 2))
    heart = _sig((1 - _superellipse(x, y, 0.08 + 0.4 * (hw - 0.30), 0.665, hw, 0.16, 2.3)) / 0.05)
    img = img * (1 - 0.85 * heart) + 0.74 * 0.85 * heart

    # Below the diaphragm: liver / stomach soft tissue, with a gastric bubble under the left dome.
    abdomen = _sig((y - dome) / 0.01) * body * (1 - heart)
    img = img + 0.12 * abdomen
    bubble = np.exp(-(((x - 0.42) / 0.08) ** 2 + ((y - dome_l - 0.05) / 0.03) ** 2))
    img = img - 0.15 * bubble * abdomen

    img = _frontal_findings(img, spec, c, lung * (1 - heart), right_half, dome, shape, k, rng)
    if ptx is not None:
        img = img - (0.14 * (0.5 + 0.5 * k)) * ptx * lung + _pleural_line(spec, c, ax, y, k) * lung
    return img


def _frontal_findings(img, spec, c, lung, right_half, dome, shape, k, rng):
    f, sides, sev = spec.findings, spec.sides, spec.severity
    x, y = c.x, c.y
    ax = np.abs(x)

    def side_mask(side: str) -> np.ndarray:
        if side == "bilateral":
            return np.ones_like(right_half)
        return right_half if side == "right" else 1 - right_half

    if f.get("Pleural Effusion"):
        # Fluid rises higher laterally (meniscus) and blunts the costophrenic angle.
        h = (0.07 + 0.05 * sev.get("Pleural Effusion", 2)) * (0.55 + 0.45 * k)
        level = dome - h * (0.7 + 1.0 * np.clip((ax - 0.1) / 0.7, 0, 1) ** 2)
        fluid = _sig((y - level) / 0.012) * side_mask(sides.get("Pleural Effusion", "bilateral"))
        img = img + (0.36 * (0.45 + 0.55 * k)) * fluid * lung
    if f.get("Edema"):
        # Bilateral perihilar ("bat-wing") haze.
        haze = np.exp(-(((ax - 0.24) / 0.20) ** 2 + ((y - 0.48) / 0.17) ** 2))
        img = img + (0.24 * (0.4 + 0.6 * k)) * haze * lung
    if f.get("Consolidation") or f.get("Pneumonia"):
        img = img + _airspace(spec, c, lung, side_mask, k, rng)
    if f.get("Lung Opacity") and not any(f.get(n) for n in ("Consolidation", "Pneumonia", "Edema", "Atelectasis")):
        cx = rng.uniform(0.3, 0.6) * (-1 if rng.random() < 0.5 else 1)
        cy = rng.uniform(0.35, 0.65)
        blob = np.exp(-(((x - cx) / 0.13) ** 2 + ((y - cy) / 0.10) ** 2))
        patch = 0.6 + 0.4 * _smooth_noise(rng, c.size, 10)
        img = img + (0.20 * (0.4 + 0.6 * k)) * blob * patch * lung
    if f.get("Atelectasis"):
        for s in _side_sign(sides.get("Atelectasis", "bilateral")):
            u0 = rng.uniform(0.30, 0.50)
            ya = dome_at(dome, c, s * u0) - rng.uniform(0.05, 0.10)
            tilt = rng.uniform(-0.12, 0.12)
            band = np.exp(-((y - ya - tilt * (ax - u0)) / (0.016 * (0.7 + 0.3 * k))) ** 2)
            window = np.exp(-((x - s * u0) / 0.17) ** 4)
            img = img + (0.30 * (0.45 + 0.55 * k)) * band * window * lung
    if f.get("Lung Lesion"):
        # Lesion burden: severity 1..3 nodules (the same count in every view of a study); 3 = one is a mass.
        count = sev.get("Lung Lesion") or 1 + int(rng.random() < 0.3) + int(rng.random() < 0.15)
        for i in range(count):
            s = -1 if rng.random() < 0.5 else 1
            cx, cy = s * rng.uniform(0.3, 0.62), rng.uniform(0.25, 0.62)
            r = rng.uniform(0.03, 0.05) * (0.6 + 0.4 * k) * (1.8 if count == 3 and i == 0 else 1.0)
            d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
            img = img + (0.30 * (0.45 + 0.55 * k)) * _sig((r - d) / (0.2 * r)) * lung
    if f.get("Pleural Other"):
        for s in _side_sign(sides.get("Pleural Other", "right")):
            rim = np.exp(-((shape - 0.93) / 0.12) ** 2) * _sig((0.45 - y) / 0.03) * (x * s > 0)
            img = img + (0.36 * (0.4 + 0.6 * k)) * rim * lung
    return img


def dome_at(dome: np.ndarray, c: _Canvas, x_anat: float) -> float:
    """Height of the hemidiaphragm at anatomical x (dome is [1, S] over image columns)."""
    col = int(np.clip(c.to_pixels(x_anat, 0.5)[0], 0, c.size - 1))
    return float(dome[0, col])


def _airspace(spec, c, lung, side_mask, k, rng):
    """Consolidation = dense lobar opacity; pneumonia alone = patchy multifocal opacity."""
    f, side = spec.findings, spec.sides.get("Consolidation", spec.sides.get("Pneumonia", "right"))
    y = c.y
    lobe_y = rng.choice([0.62, 0.62, 0.45, 0.32])                           # lower lobes most often
    region = np.exp(-(((y - lobe_y) / 0.13) ** 4)) * side_mask(side)
    patch = np.clip(0.55 + 0.6 * _smooth_noise(rng, c.size, 12), 0, 1.2)
    dense = 0.30 if f.get("Consolidation") else 0.22
    out = (dense * (0.45 + 0.55 * k)) * region * patch * lung
    if f.get("Consolidation"):
        out = out + (0.10 * k) * region * lung                            # homogeneous lobar density
    return out


def _pneumothorax_region(spec, c, ax, y, k):
    """Apical-lateral crescent between the chest wall and the collapsed lung's edge, on one side."""
    side = spec.sides.get("Pneumothorax", "right")
    d = (0.05 + 0.035 * spec.severity.get("Pneumothorax", 2)) * (0.55 + 0.45 * k)
    collapsed = _superellipse(ax, y, 0.46 - d * 0.6, 0.52 + d * 0.9, 0.37 - d * 0.6, 0.44 - d * 0.9)
    outside = _sig((collapsed - 1) / 0.03) * _sig((0.62 - y) / 0.04)
    signs = _side_sign(side)
    mask = sum((c.x * s > 0).astype(np.float32) for s in signs)
    return outside * mask


def _pleural_line(spec, c, ax, y, k):
    """The visceral pleural edge: a thin bright line along the collapsed lung."""
    side = spec.sides.get("Pneumothorax", "right")
    d = (0.05 + 0.035 * spec.severity.get("Pneumothorax", 2)) * (0.55 + 0.45 * k)
    collapsed = _superellipse(ax, y, 0.46 - d * 0.6, 0.52 + d * 0.9, 0.37 - d * 0.6, 0.44 - d * 0.9)
    line = np.exp(-((collapsed - 1) / 0.035) ** 2) * _sig((0.55 - y) / 0.04)
    mask = sum((c.x * s > 0).astype(np.float32) for s in _side_sign(side))
    return (0.16 * (0.5 + 0.5 * k)) * line * mask


def _fracture_centre(spec, c):
    """Break position: fixed by the study's truth (not the image rng) so all frontal images agree."""
    s = _side_sign(spec.sides.get("Fracture", "right"))[0]
    return s * 0.6, 0.38 + 0.04 * spec.severity.get("Fracture", 2)


def _fracture_shift(spec, c, x, y, k, rng):
    """Phase step in the rib pattern lateral to the break: the rib ends do not line up."""
    fx, fy = _fracture_centre(spec, c)
    s = np.sign(fx)
    window = np.exp(-((y - fy) / 0.12) ** 2) * _sig((s * (x - fx)) / 0.004) * np.exp(-((x - fx) / 0.3) ** 2)
    return (0.22 + 0.25 * k) * window


def _fracture_gap(spec, c, x, y, k):
    fx, fy = _fracture_centre(spec, c)
    gap = np.exp(-((x - fx) / (0.008 + 0.008 * k)) ** 2) * np.exp(-((y - fy) / 0.12) ** 2)
    return 1 - 0.9 * gap


# ----------------------------------------------------------------------------------------------------
# Lateral


def _lateral(spec: ImageSpec, c: _Canvas, k: float, rng: np.random.Generator) -> np.ndarray:
    """Lateral view: anterior (sternum) on the image left, spine on the right; no laterality visible."""
    f, sev = spec.findings, spec.severity
    x, y = c.x, c.y
    body = _sig((1 - _superellipse(x, y, 0.02, 0.55, 0.86, 0.62, 3.0)) / 0.03)
    img = 0.06 + 0.42 * body
    dome = rng.uniform(0.78, 0.83) - 0.06 * np.clip(1 - ((x - 0.05) / 0.7) ** 2, 0, 1)
    lung = _sig((1 - _superellipse(x, y, 0.06, 0.47, 0.62, 0.40)) / 0.04) * _sig((dome - y) / 0.006)
    markings = _smooth_noise(rng, c.size, 28) * 0.035
    img = img - lung * (0.24 - markings)
    spine = _sig((0.12 - np.abs(x - 0.70)) / 0.01) * body
    img = img + spine * (0.22 + 0.06 * np.cos(2 * np.pi * y / 0.07))
    img = img + 0.12 * _sig((0.05 - np.abs(x + 0.72)) / 0.01) * (y > 0.2) * (y < 0.75)   # sternum

    hw = rng.normal(0.25, 0.012)
    if f.get("Cardiomegaly"):
        hw += (0.07 + 0.06 * k) * (0.7 + 0.15 * sev.get("Cardiomegaly", 2))
    heart = _sig((1 - _superellipse(x, y, -0.30 + 0.3 * (hw - 0.25), 0.62, hw, 0.17, 2.2)) / 0.05)
    img = img * (1 - 0.8 * heart) + 0.70 * 0.8 * heart
    if f.get("Enlarged Cardiomediastinum"):
        img = img + (0.14 * (0.4 + 0.6 * k)) * np.exp(-(((x + 0.45) / 0.12) ** 2 + ((y - 0.35) / 0.12) ** 2)) * lung
    img = img + 0.12 * _sig((y - dome) / 0.01) * body * (1 - heart)

    if f.get("Pleural Effusion"):
        h = (0.05 + 0.045 * sev.get("Pleural Effusion", 2)) * (0.55 + 0.45 * k)
        level = dome - h * (0.5 + 1.2 * np.clip((x - 0.1) / 0.5, 0, 1) ** 2)  # posterior sulcus fills first
        img = img + (0.30 * (0.45 + 0.55 * k)) * _sig((y - level) / 0.012) * (x > -0.1) * lung
    if f.get("Edema"):
        img = img + (0.20 * (0.4 + 0.6 * k)) * np.exp(-(((x - 0.1) / 0.3) ** 2 + ((y - 0.47) / 0.18) ** 2)) * lung
    if f.get("Consolidation") or f.get("Pneumonia"):
        patch = np.clip(0.55 + 0.6 * _smooth_noise(rng, c.size, 12), 0, 1.2)
        blob = np.exp(-(((x - 0.30) / 0.22) ** 2 + ((y - 0.62) / 0.13) ** 2))
        img = img + (0.26 * (0.45 + 0.55 * k)) * blob * patch * lung
    if f.get("Atelectasis"):
        band = np.exp(-((y - (0.66 + 0.1 * x)) / 0.016) ** 2) * np.exp(-((x - 0.2) / 0.3) ** 4)
        img = img + (0.25 * (0.45 + 0.55 * k)) * band * lung
    if f.get("Lung Lesion"):
        cx, cy = rng.uniform(-0.1, 0.4), rng.uniform(0.25, 0.6)
        r = rng.uniform(0.03, 0.05) * (0.6 + 0.4 * k) * (1.8 if sev.get("Lung Lesion") == 3 else 1.0)
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        img = img + (0.28 * (0.45 + 0.55 * k)) * _sig((r - d) / (0.2 * r)) * lung
    return img


# ----------------------------------------------------------------------------------------------------
# Support devices (both views): thin bright lines drawn with PIL, lightly blurred.


def _devices(img: np.ndarray, spec: ImageSpec, c: _Canvas, k: float, rng: np.random.Generator) -> np.ndarray:
    if not spec.devices:
        return img
    layer = Image.new("L", (c.size, c.size), 0)
    draw = ImageDraw.Draw(layer)
    width = max(1, round(c.size / 110 * (0.7 + 0.5 * k)))
    lateral = spec.view not in FRONTAL_VIEWS
    jit = lambda: rng.uniform(-0.02, 0.02)  # noqa: E731 - tiny local helper

    def line(points, w=width):
        draw.line([c.to_pixels(px + jit(), py) for px, py in points], fill=255, width=w, joint="curve")

    for dev in spec.devices:
        if dev == "ett":
            line([(-0.45, 0.0), (-0.47, 0.15), (-0.50, 0.28)] if lateral else [(0.0, 0.0), (0.01, 0.15), (0.0, 0.30)])
        elif dev == "ng":
            line([(-0.2, 0.0), (0.1, 0.4), (0.2, 0.9)] if lateral else
                 [(0.02, 0.0), (0.03, 0.4), (0.06, 0.75), (0.25, 0.88), (0.35, 0.86)])
        elif dev == "cvc":
            line([(-0.3, 0.02), (-0.32, 0.3)] if lateral else [(-0.30, 0.02), (-0.18, 0.20), (-0.07, 0.40)])
        elif dev == "picc":
            line([(0.2, 0.2), (-0.3, 0.3)] if lateral else [(0.95, 0.25), (0.55, 0.16), (0.12, 0.20), (-0.05, 0.38)])
        elif dev == "pacemaker":
            px, py = (-0.6, 0.2) if lateral else (0.55, 0.16)
            x0, y0 = c.to_pixels(px - 0.08, py - 0.05)
            x1, y1 = c.to_pixels(px + 0.08, py + 0.05)
            draw.rounded_rectangle([x0, y0, x1, y1], radius=max(1, c.size // 80), fill=255)
            line([(px, py), (0.2, 0.35), (0.05, 0.55), (0.15, 0.70)] if not lateral else
                 [(px, py), (-0.4, 0.5), (-0.3, 0.7)])
        elif dev == "sternal":
            for i in range(5):
                sx, sy = (-0.72, 0.3 + 0.08 * i) if lateral else (0.0, 0.30 + 0.07 * i)
                x0, y0 = c.to_pixels(sx - 0.03, sy - 0.012)
                x1, y1 = c.to_pixels(sx + 0.03, sy + 0.012)
                draw.ellipse([x0, y0, x1, y1], outline=255, width=max(1, width - 1))
    layer = layer.filter(ImageFilter.GaussianBlur(radius=max(0.5, c.size / 400)))
    dev = np.asarray(layer, dtype=np.float32) / 255.0                       # [S, S] in [0, 1]
    return img + (0.45 + 0.25 * k) * dev

"""Sub-pixel registration of the crop to the grid's border line (preprocessing version 3).

The crop box (`crop.detect_grid_box`) is found in whole pixels of a working image, so a page and its
half-resolution copy can disagree by one working pixel at an edge: 2 px of a 2213 px original, a quarter of a
model input pixel at [128, 256]. On the 32 full-resolution dev originals that alone took the mean absolute
difference of the model inputs of five pages and their twins from ~1 to 2.5-3.9 (of 255); those five pages
flipped their label most often between the two resolutions.

`aligned_crop` takes the box with a margin of `ALIGN_MARGIN_MM`, resamples it to the canonical pixels per
millimetre (`scale.to_canonical`), and places each edge of the content box at the centre of the border line,
found from the line's own redness profile (a centroid over its half-maximum run, so sub-pixel and independent of
scan resolution), plus `ALIGN_PAD_MM` outside it. The final resize then reads exactly that float box, so the
border lands on the same spot of the model input at any resolution. An edge without a clear line keeps the
integer box's position. Fallback boxes (no line found by the crop) are not aligned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ecg_inception.data.crop import CropBox, redness
from ecg_inception.data.scale import CANONICAL_PX_PER_MM, GridPitch, measure_pitch, to_canonical

ALIGN_MARGIN_MM = 1.5  # taken around the box, so the whole border line is in view at any resolution
ALIGN_WINDOW_MM = 0.75  # the line centre is searched this far either side of the box edge (minor lines: 1 mm)
ALIGN_PAD_MM = 0.5  # the content box reaches this far beyond the line centre
#: A border line must rise this far (mean redness, 0-255) above its profile's median; the dev pages' border
#: lines rise 19-35 at canonical scale, the dotted 1 mm lines at most 5.
MIN_LINE_RISE = 3.0

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class AlignedCrop:
    """A page's crop at the canonical scale, and where in it the model input's content box lies.

    Attributes:
        image: The crop with its margin, resampled to `scale.CANONICAL_PX_PER_MM`.
        box: (left, top, right, bottom) of the content in `image` pixels, continuous coordinates.
        page_box: The same box in the page's own pixels (for mapping heat maps back onto the page).
        aligned: Per edge (left, top, right, bottom), whether a border line placed it.
    """

    image: Image.Image
    box: Box
    page_box: Box
    aligned: tuple[bool, bool, bool, bool]


def line_centre(profile: np.ndarray, expected: float, window: float) -> float | None:
    """Centre of the strongest line of a mean-redness profile within `expected` ± `window` pixels.

    The centre is the centroid (continuous coordinates: pixel k spans [k, k + 1)) of the line's run of entries at
    or above half its rise over the profile's median, weighted by their height above that half level.

    Args:
        profile: Mean redness per row or column.
        expected: Where the line should be (continuous coordinate).
        window: Search half-width in pixels.

    Returns:
        The centre, or None when nothing in the window rises `MIN_LINE_RISE` above the median.
    """
    n = profile.size
    lo, hi = max(0, math.floor(expected - window)), min(n, math.ceil(expected + window) + 1)
    if hi - lo < 1:
        return None
    base = float(np.median(profile))
    k = lo + int(np.argmax(profile[lo:hi]))
    rise = float(profile[k]) - base
    if rise < MIN_LINE_RISE:
        return None
    half = base + 0.5 * rise
    a, b = k, k
    while a > 0 and profile[a - 1] >= half:
        a -= 1
    while b + 1 < n and profile[b + 1] >= half:
        b += 1
    weight = profile[a : b + 1].astype(np.float64) - half
    if float(weight.sum()) <= 0.0:
        return k + 0.5
    return float(((np.arange(a, b + 1) + 0.5) * weight).sum() / weight.sum())


def aligned_crop(img: Image.Image, box: CropBox, pitch: GridPitch | None = None) -> AlignedCrop:
    """Crop `img` around `box` at the canonical scale with the content box on the border line's centre.

    Args:
        img: The page (RGB).
        box: Its grid box in page pixels (not a fallback box: there is no line to align to).
        pitch: The crop's grid pitch (None: measured on the box, as `transforms.preprocess` does).

    Returns:
        The `AlignedCrop`.

    Raises:
        ValueError: The box leaves nothing of the page.
    """
    left, top = max(0, box.left), max(0, box.top)
    right, bottom = min(img.width, box.right), min(img.height, box.bottom)
    if right - left < 2 or bottom - top < 2:
        raise ValueError(f"crop box {box} leaves nothing of a {img.width}x{img.height} image")
    if pitch is None:
        pitch = measure_pitch(img.crop((left, top, right, bottom)))
    margin = math.ceil(ALIGN_MARGIN_MM * pitch.px_per_mm)
    outer = (max(0, left - margin), max(0, top - margin), min(img.width, right + margin),
             min(img.height, bottom + margin))  # fmt: skip
    source = img.crop(outer)
    image = to_canonical(source, pitch)
    fx, fy = image.width / source.width, image.height / source.height
    expected = (
        (left - outer[0]) * fx,
        (top - outer[1]) * fy,
        (right - outer[0]) * fx,
        (bottom - outer[1]) * fy,
    )
    red = redness(image).astype(np.float32)
    el, et, er, eb = expected
    columns = red[max(0, int(et)) : max(int(et) + 1, int(eb))].mean(axis=0)  # one value per column
    rows = red[:, max(0, int(el)) : max(int(el) + 1, int(er))].mean(axis=1)  # one value per row
    window = ALIGN_WINDOW_MM * CANONICAL_PX_PER_MM
    pad = ALIGN_PAD_MM * CANONICAL_PX_PER_MM
    # The box spans the line's pixels: its first line pixel centre is at edge + 0.5, its last at edge - 0.5.
    found = (line_centre(columns, el + 0.5, window), line_centre(rows, et + 0.5, window),
             line_centre(columns, er - 0.5, window), line_centre(rows, eb - 0.5, window))  # fmt: skip
    content = tuple(
        edge if centre is None else centre + (pad if side >= 2 else -pad)
        for side, (edge, centre) in enumerate(zip(expected, found, strict=True))
    )
    cl, ct, cr, cb = (float(v) for v in content)
    cl, ct = max(0.0, cl), max(0.0, ct)
    cr, cb = min(float(image.width), cr), min(float(image.height), cb)
    page_box = (outer[0] + cl / fx, outer[1] + ct / fy, outer[0] + cr / fx, outer[1] + cb / fy)
    return AlignedCrop(image, (cl, ct, cr, cb), page_box, tuple(c is not None for c in found))  # type: ignore[arg-type]

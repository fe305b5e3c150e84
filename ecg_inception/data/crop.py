"""Grid-box detection: crop the printed header and footer away, keep the ECG grid.

The printouts carry a pink/red grid inside a pink border line; the header (patient ID, age, ...)
sits above it and a footer line (filters, heart rate, date) below it, both in black. A model that
sees header or footer can learn them instead of the waveforms, so every later stage crops to the
grid box found here.

Detection works on a "grid colour" map (R - max(G, B) on light pixels) of the image, downscaled so
that its long side is at most `WORK_SIDE` pixels. Its row and column means form profiles in which
the border (or outermost grid line) stands out; a line is an entry well above the paper level,
with a threshold relative to the strongest line so that faint, re-encoded or rescaled borders are
still found. The box is spanned by the outermost lines, measured rows -> columns -> rows (each
pass restricted to the previous span). It is sanity-checked (area, aspect, an interior of thin
lines rather than a solid colour) and replaced by a fallback when a check fails: the fixed `fallback_box` on
a page with the printer's header (`has_header`), the whole page on a page without one (already cropped).

Measured: the 290 distinct dev images all give (34, 141, 1088, 759..760) in 3-8 ms; 2x upscaled
copies give twice that within 2 px; copies re-encoded at quality 40-95 and rescaled 0.5-2x stay
within 2 px (7 px at 0.5x quality <= 75, where JPEG chroma blocks smear the border).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops

# Long side of the working image. The dev copies (1106 px wide) are used at full size; originals
# (2213 px) are reduced by 2, which keeps a 3-4 px border line at 1-2 px.
WORK_SIDE = 1400
# Redness is R - max(G, B) (0-255): pink border pixels 40-60, paper, black ink and grey text < 8.
# Row (column) profiles average it along the row. Dev set, quality 90: border rows 19-35, dotted
# interior rows <= 5, paper ~1; re-encoded at quality 40 and halved: border 4-10, paper 0.3.
PAPER_PERCENTILE = 5  # profile percentile taken as the paper level
MIN_LINE_REDNESS = 2.0  # the strongest line must rise this far above the paper level
LINE_CONTRAST = 0.3  # a line rises above the paper level by at least this share of the strongest rise
# Fallback box as fractions of width/height: the measured dev-set border (34, 141, 1088, 759) of a
# 1106 x 786 page, which is where the same printer puts the grid on every page.
FALLBACK_FRACTIONS = (0.031, 0.179, 0.984, 0.966)
# Sanity limits for an accepted box.
MIN_AREA_FRACTION = 0.2
MAX_AREA_FRACTION = 1.0  # a page already cropped to its grid is fine
MIN_ASPECT = 0.5  # width / height
MAX_ASPECT = 4.0
MIN_GRID_RED = 150  # grid pixels are light: pink/red ink blended with paper; ink and antialiased text are not
MAX_INTERIOR_RATIO = 0.5  # interior mean redness / border-line redness; a solid block is ~1
# Header test for the fallback: the printer's header ends in a double rule across ~94 % of the page width in
# the top 18 %. A row counts as a rule when this share of it is dark ink (max(R, G, B) < RULE_DARK; the grid
# is light in its strongest channel). Dev pages: >= 0.94; the same pages cropped to their grid: <= 0.68.
HEADER_ZONE = 0.3  # top share of the page searched for the rule
RULE_COVERAGE = 0.85
RULE_DARK = 160


_BRIGHT_LUT = [255 if v >= MIN_GRID_RED else 0 for v in range(256)]


@dataclass(frozen=True)
class CropBox:
    """A box in pixels of the original file; `fallback` is True when detection failed.

    `right` and `bottom` are exclusive (PIL's `Image.crop` convention), so the border line itself
    is inside the box.
    """

    left: int
    top: int
    right: int
    bottom: int
    fallback: bool = False

    def as_list(self) -> list[int]:
        """The box as `[left, top, right, bottom]`."""
        return [self.left, self.top, self.right, self.bottom]

    @property
    def width(self) -> int:
        """Box width in pixels."""
        return self.right - self.left

    @property
    def height(self) -> int:
        """Box height in pixels."""
        return self.bottom - self.top

    def scaled(self, sx: float, sy: float | None = None) -> CropBox:
        """The same box for the image resized by `sx` (and `sy`, default `sx`)."""
        sy = sx if sy is None else sy
        return CropBox(
            round(self.left * sx),
            round(self.top * sy),
            round(self.right * sx),
            round(self.bottom * sy),
            self.fallback,
        )

    def crop(self, img: Image.Image) -> Image.Image:
        """Crop `img` (the original file's pixels) to this box."""
        return img.crop((self.left, self.top, self.right, self.bottom))


def has_header(img: Image.Image) -> bool:
    """True when the top `HEADER_ZONE` of the page holds a rule of dark ink across `RULE_COVERAGE` of its width.

    A page that is only the grid (a user's crop) has none, so the fallback keeps it whole instead of cutting
    the fixed header band off its top. A rotated page can hide its rule from this single-row test.
    """
    img = img if img.mode == "RGB" else img.convert("RGB")
    r, g, b = img.split()
    value = np.asarray(ImageChops.lighter(ImageChops.lighter(r, g), b))
    zone = value[: max(1, int(HEADER_ZONE * value.shape[0]))]
    return bool(zone.size) and float((zone < RULE_DARK).mean(axis=1).max()) >= RULE_COVERAGE


def fallback_for(img: Image.Image) -> CropBox:
    """The box when no grid is found: `fallback_box` under a header, else the whole page; both flagged."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if has_header(img):
        return fallback_box(width, height)
    return CropBox(0, 0, width, height, fallback=True)


def fallback_box(width: int, height: int) -> CropBox:
    """The fixed fractional box of a page with the printer's header, with `fallback=True`."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    fl, ft, fr, fb = FALLBACK_FRACTIONS
    left, top = math.floor(fl * width), math.floor(ft * height)
    right, bottom = math.ceil(fr * width), math.ceil(fb * height)
    return CropBox(left, top, max(right, left + 1), max(bottom, top + 1), fallback=True)


def redness(img: Image.Image) -> np.ndarray:
    """Per-pixel grid colour strength (uint8): R - max(G, B) where R >= MIN_GRID_RED, else 0.

    High on a pink/red/orange grid; ~0 on paper, grey text and dark ink, including ink with a red tint
    (its red channel is low).
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    r, g, b = img.split()
    red = ImageChops.subtract(r, ImageChops.lighter(g, b))  # saturating R - max(G, B)
    bright = r.point(_BRIGHT_LUT)
    return np.asarray(ImageChops.darker(red, bright))


def _line_extent(profile: np.ndarray) -> tuple[int, int] | None:
    """First and last index of a line in a mean-redness profile, or None when there are not two lines.

    A line is an entry that rises above the paper level (a low percentile: header and margins) by
    LINE_CONTRAST of the strongest entry's rise; the threshold is relative so that faint
    (re-encoded, downscaled) borders count.
    """
    base = float(np.percentile(profile, PAPER_PERCENTILE))
    peak = float(profile.max())
    if peak - base < MIN_LINE_REDNESS:
        return None
    idx = np.flatnonzero(profile >= base + LINE_CONTRAST * (peak - base))
    if idx.size < 2 or idx[-1] - idx[0] < 2:
        return None
    return int(idx[0]), int(idx[-1])


def _find_box(red: np.ndarray) -> tuple[int, int, int, int] | None:
    """Outermost grid lines of a redness map as an exclusive (left, top, right, bottom) box, or None."""
    rows = _line_extent(red.mean(axis=1))
    if rows is None:
        return None
    top, bottom = rows
    cols = _line_extent(red[top : bottom + 1].mean(axis=0))
    if cols is None:
        return None
    left, right = cols
    # Re-measure rows inside the columns: lines shorter than the page width still count.
    rows = _line_extent(red[:, left : right + 1].mean(axis=1))
    if rows is None:
        return None
    top, bottom = rows
    return left, top, right + 1, bottom + 1


def _plausible(red: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    """Sanity checks on a candidate box in working-image coordinates."""
    h, w = red.shape
    left, top, right, bottom = box
    bw, bh = right - left, bottom - top
    area = bw * bh / float(w * h)
    if not MIN_AREA_FRACTION <= area <= MAX_AREA_FRACTION:
        return False
    if not MIN_ASPECT <= bw / bh <= MAX_ASPECT:
        return False
    # A grid is thin lines on paper: the interior is far less red than the strongest line.
    margin = max(2, min(bw, bh) // 50)
    inner = red[top + margin : bottom - margin, left + margin : right - margin]
    if inner.size == 0:
        return False
    strongest = float(red[top:bottom, left:right].mean(axis=1).max())
    return float(inner.mean()) <= MAX_INTERIOR_RATIO * strongest


def detect_grid_box(img: Image.Image) -> CropBox:
    """Find the outer border of the ECG grid in `img`; fall back to `fallback_for` when not found."""
    width, height = img.size
    if width < 16 or height < 16:
        return fallback_for(img)
    work = img if img.mode == "RGB" else img.convert("RGB")
    factor = max(1, math.ceil(max(width, height) / WORK_SIDE))
    if factor > 1:
        work = work.reduce(factor)
    red = redness(work)
    box = _find_box(red)
    if box is None or not _plausible(red, box):
        return fallback_for(img)
    # Back to original pixels (Image.reduce maps each factor x factor block to one pixel).
    left, top, right, bottom = (v * factor for v in box)
    return CropBox(left, top, min(width, right), min(height, bottom), fallback=False)

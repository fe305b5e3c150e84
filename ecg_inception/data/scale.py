"""Physical scale of a printout: grid pitch measurement and resampling to a canonical pixels-per-millimetre.

An ECG grid has 1 mm minor and 5 mm major squares (25 mm/s, 10 mm/mV), so the grid itself says how many
pixels a millimetre is on a page, whatever the scanner's resolution. `measure_pitch` finds it from the
periodicity of the grid colour (`crop.redness`) inside the crop box: the row and column means of the
redness map are periodic with the 5 mm major pitch and its harmonics (the dotted 1 mm lines are the 5th).
Their spectra (zero-padded, both axes summed) give the strongest grid frequency; a ladder of sub-harmonics
(5, 4, 3, 2) climbs to the 5 mm fundamental, and the strongest harmonic up to the 5th refines it.

`to_canonical` resamples the cropped page to `CANONICAL_PX_PER_MM` before any ink or threshold step, so
that a page scanned at 200 dpi and its half-resolution copy reach the ink step as (nearly) the same image.
When no grid period is found (no grid, a grey grid, a page too small), the scale falls back to the box
size: the box is taken to be `NOMINAL_BOX_MM` wide, and the result is flagged, as the crop's fallback is.

Measured on the dev set and the full-resolution sample: see docs/protocols.md ("Physical scale").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ecg_inception.data.crop import CropBox, redness

#: Pixels per millimetre every page is resampled to before the ink step (about the dev copies' 3.98).
CANONICAL_PX_PER_MM = 4.0
MAJOR_MM = 5.0  # a major grid square
#: Width of the Mendeley printer's grid box in mm (2110 px at 7.96 px/mm): the fallback scale's reference.
NOMINAL_BOX_MM = 265.0
# Search range for the scale: 0.8-30 px/mm (20-760 dpi), i.e. a major period of 4-150 px.
MIN_PX_PER_MM = 0.8
MAX_PX_PER_MM = 30.0
MIN_PERIODS = 8  # the box must hold at least this many major periods along its longer side
PEAK_PROMINENCE = 6.0  # the strongest grid peak over the spectrum's median in the search range
# A sub-harmonic f/m counts as the fundamental when this strong against the peak: f/5 (dotted 1 mm lines
# -> 5 mm major lines, which a half-size page renders 1 px wide) may be weak, f/2..f/4 must not be noise.
SUBHARMONIC_SHARE = {5: 0.1, 4: 0.4, 3: 0.4, 2: 0.4}
MAX_HARMONIC = 5  # the strongest peak is at most the 5th harmonic of the 5 mm period (the 1 mm dots)
# A measured scale must make the box a plausible grid box in mm (a grid-only crop of a part is fine).
MIN_BOX_MM = 60.0
MAX_BOX_MM = 450.0
_PAD = 8  # zero-padding factor of the profile FFTs: sub-bin precision of the peak


@dataclass(frozen=True)
class GridPitch:
    """Pixels per millimetre of a page, and whether it is the box-size fallback rather than measured."""

    px_per_mm: float
    fallback: bool = False

    def as_dict(self) -> dict[str, float | bool]:
        """Plain values for JSON and CSV: {"px_per_mm": ..., "fallback": ...}."""
        return {"px_per_mm": round(float(self.px_per_mm), 4), "fallback": bool(self.fallback)}


def fallback_pitch(box_width: int) -> GridPitch:
    """The scale when no grid period is found: the box is `NOMINAL_BOX_MM` wide (flagged as a fallback)."""
    if box_width <= 0:
        raise ValueError(f"box width must be positive, got {box_width}")
    return GridPitch(box_width / NOMINAL_BOX_MM, fallback=True)


def _spectrum(profile: np.ndarray, n_fft: int) -> np.ndarray:
    """Magnitude spectrum of a profile with its slow trend removed (a 3-period moving mean) and a Hann window."""
    p = profile.astype(np.float64)
    k = max(3, int(3 * MAX_PX_PER_MM * MAJOR_MM) | 1)
    if p.size > k:
        trend = np.convolve(np.pad(p, k // 2, mode="edge"), np.ones(k) / k, mode="valid")
        p = p - trend
    else:
        p = p - p.mean()
    return np.abs(np.fft.rfft(p * np.hanning(p.size), n_fft))


def _peak_near(spec: np.ndarray, index: float, tol: float) -> tuple[float, float]:
    """Largest value of `spec` within `index` ± `tol` bins, refined by a parabola: (index, value)."""
    lo, hi = max(1, int(math.floor(index - tol))), min(spec.size - 2, int(math.ceil(index + tol)))
    if hi < lo:
        return index, 0.0
    i = lo + int(np.argmax(spec[lo : hi + 1]))
    a, b, c = spec[i - 1], spec[i], spec[i + 1]
    denom = a - 2 * b + c
    shift = 0.5 * (a - c) / denom if denom < 0 else 0.0
    return i + float(np.clip(shift, -0.5, 0.5)), float(b)


def measure_pitch(img: Image.Image, box: CropBox | None = None) -> GridPitch:
    """Pixels per millimetre of `img` from its grid inside `box` (None: the whole image).

    Returns the box-size fallback (`fallback=True`) when the redness profiles show no clear grid period
    or the period makes the box implausibly small or large in millimetres.
    """
    img = img if img.mode == "RGB" else img.convert("RGB")
    if box is not None:
        img = img.crop((max(0, box.left), max(0, box.top), min(img.width, box.right), min(img.height, box.bottom)))
    width, height = img.size
    if min(width, height) < 16:
        return fallback_pitch(max(1, width))
    red = redness(img).astype(np.float32)
    n = max(width, height)
    n_fft = 1 << int(math.ceil(math.log2(n * _PAD)))
    spec = _spectrum(red.mean(axis=0), n_fft) / width + _spectrum(red.mean(axis=1), n_fft) / height
    # Frequencies in cycles per pixel are bin / n_fft; the search covers the major periods allowed.
    longest = min(MAX_PX_PER_MM * MAJOR_MM, n / MIN_PERIODS)
    lo_bin = n_fft / longest
    hi_bin = n_fft / 2.0  # up to the Nyquist frequency: the minor dots' harmonics may sit anywhere above
    lo, hi = int(math.ceil(lo_bin)), int(math.floor(min(hi_bin, spec.size - 2)))
    if hi - lo < 4:
        return fallback_pitch(width)
    band = spec[lo : hi + 1]
    peak_bin = lo + int(np.argmax(band))
    peak = float(spec[peak_bin])
    if peak <= 0 or peak < PEAK_PROMINENCE * float(np.median(band)):
        return fallback_pitch(width)
    tol = _PAD * 1.5
    fundamental, _ = _peak_near(spec, peak_bin, 1.0)
    floor = PEAK_PROMINENCE * float(np.median(band))
    ladder = [fundamental]  # the peak, then each sub-harmonic climbed to
    climbed, product = True, 1
    while climbed:
        climbed = False
        for m in (5, 4, 3, 2):
            target = ladder[-1] / m
            if target < lo_bin or product * m > MAX_HARMONIC:
                continue
            where, value = _peak_near(spec, target, tol / m + 1)
            if value >= SUBHARMONIC_SHARE[m] * peak and value >= floor:
                ladder.append(where)
                climbed, product = True, product * m
                break
    # The highest rung that makes the box a plausible grid box in mm: a weak f/5 can be the ECG itself
    # (beats 25 mm apart, 2.5 s columns), which makes the box a few cm wide.
    for fundamental in reversed(ladder):
        px_per_mm = _refined_period(spec, fundamental, tol) / MAJOR_MM
        if MIN_PX_PER_MM <= px_per_mm <= MAX_PX_PER_MM and MIN_BOX_MM <= width / px_per_mm <= MAX_BOX_MM:
            return GridPitch(px_per_mm, fallback=False)
    return fallback_pitch(width)


def _refined_period(spec: np.ndarray, fundamental: float, tol: float) -> float:
    """The period (in pixels) of `fundamental` (a bin), refined with the strongest of its first five
    harmonics: a peak at h x f0 pins f0 h times finer."""
    n_fft = 2 * (spec.size - 1)
    best_h, best_where, best_value = 1, fundamental, 0.0
    for h in range(1, 6):
        if h * fundamental > spec.size - 2:
            break
        where, value = _peak_near(spec, h * fundamental, tol)
        if value > best_value:
            best_h, best_where, best_value = h, where, value
    return best_h * n_fft / best_where


def canonical_size(width: int, height: int, pitch: GridPitch) -> tuple[int, int]:
    """Size (width, height) of a width x height crop resampled to `CANONICAL_PX_PER_MM`."""
    factor = CANONICAL_PX_PER_MM / pitch.px_per_mm
    return max(2, round(width * factor)), max(2, round(height * factor))


def to_canonical(img: Image.Image, pitch: GridPitch) -> Image.Image:
    """Resample a cropped page to `CANONICAL_PX_PER_MM` (antialiased Lanczos); unchanged within 2 %."""
    size = canonical_size(img.width, img.height, pitch)
    if abs(size[0] - img.width) <= 0.02 * img.width and abs(size[1] - img.height) <= 0.02 * img.height:
        return img
    return img.resize(size, Image.Resampling.LANCZOS)

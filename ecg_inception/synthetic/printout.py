"""Render a synthetic 12-lead ECG report page with PIL, laid out like the Mendeley printouts.

Geometry is the original scan's (2213 x 1572 px at 200 dpi) times `scale`: a header (title, patient lines, a
double rule, diagnosis and signature fields) over the top ~18 % of the page, a grid box with a darker border
(1 mm dotted minor / 5 mm major lines, 25 mm/s, 10 mm/mV), 3 rows x 4 columns of 2.5 s lead segments plus a 10 s
lead-II rhythm strip, 1 mV calibration pulses, lead labels, column separators and a footer line. The grid is a
cached numpy level map coloured per page, so a page costs a few tens of milliseconds.

Signals come from either source: `render_page(label, ...)` draws the parametric beat model
(`waveforms.synthesize_ecg`), `render_signals(array, fs, ...)` a given 12 x T recording in mV at any rate
(`signals.record_from_signals`, e.g. PTB-XL); both go through `render_record`, which maps sample times to pixel
columns at 25 mm/s exactly and thins samples to about two per pixel column, keeping each chunk's extreme.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ecg_inception.synthetic.waveforms import EcgRecord, synthesize_ecg

DPI = 200
PAGE_SIZE = (2213, 1572)  # width, height of the original scans at scale 1
PX_PER_MM = DPI / 25.4
GRID_BOX = (68, 282, 2174, 1516)  # left, top, right (exclusive), bottom (exclusive) at scale 1
LAYOUT: tuple[tuple[str, ...], ...] = (
    ("I", "aVR", "V1", "V4"),
    ("II", "aVL", "V2", "V5"),
    ("III", "aVF", "V3", "V6"),
)
RHYTHM_LEAD = "II"
SPEED_MM_S = 25.0
GAIN_MM_MV = 10.0
SEGMENT_S = 2.5

_ROW0_MM = 23.4  # first baseline below the grid top
_ROW_STEP_MM = 38.1
_TRACE_X0_MM = 10.7  # trace start right of the grid's left edge
_CAL_X0_MM = 3.6
_HUES = {  # grid ink at full strength; pages blend it with paper white
    "pink": (226, 92, 118),
    "red": (214, 52, 52),
    "orange": (232, 124, 52),
}


@dataclass(frozen=True)
class Printout:
    """A rendered page and what it shows."""

    image: Image.Image
    record: EcgRecord
    grid_box: tuple[int, int, int, int]  # left, top, right, bottom before the page rotation
    angle: float  # page rotation in degrees, counter-clockwise


def nominal_grid_box(scale: float = 1.0) -> tuple[int, int, int, int]:
    """The grid box of an unshifted page at `scale` (left, top, right, bottom; right/bottom exclusive)."""
    left, top, right, bottom = (round(v * scale) for v in GRID_BOX)
    return left, top, right, bottom


def page_size(scale: float = 1.0) -> tuple[int, int]:
    """Width and height in pixels of a page at `scale` (0.5 gives the dev copy's 1106 x 786)."""
    return int(PAGE_SIZE[0] * scale), int(PAGE_SIZE[1] * scale)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A serif font like the printer's where the system has one, else Pillow's bundled font."""
    try:
        return ImageFont.truetype("DejaVuSerif.ttf", size)
    except OSError:
        try:
            return ImageFont.load_default(size)
        except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
            return ImageFont.load_default()


def _has_heart(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> bool:
    return "DejaVu" in str(getattr(font, "path", ""))


@lru_cache(maxsize=8)
def _grid_levels(width: int, height: int, scale: float) -> np.ndarray:
    """Grid box as levels: 0 paper, 1 minor dot, 2 major line, 3 border (uint8, height x width)."""
    mm = PX_PER_MM * scale
    xs = np.round(np.arange(0, width / mm + 1) * mm).astype(int)
    ys = np.round(np.arange(0, height / mm + 1) * mm).astype(int)
    major_w = max(1, round(1.5 * scale))
    period = max(2, round(0.5 * mm))

    def lines(n: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        minor = np.zeros(n, bool)
        major = np.zeros(n, bool)
        minor[pos[pos < n]] = True
        for k in range(major_w):
            p = pos[::5] + k
            major[p[p < n]] = True
        return minor, major

    minor_x, major_x = lines(width, xs)
    minor_y, major_y = lines(height, ys)
    dot_x = (np.arange(width) % period) < max(1, period // 2)
    dot_y = (np.arange(height) % period) < max(1, period // 2)
    level = np.zeros((height, width), np.uint8)
    level[(minor_x[None, :] & dot_y[:, None]) | (minor_y[:, None] & dot_x[None, :])] = 1
    level[major_x[None, :] | major_y[:, None]] = 2
    border = max(2, round(4 * scale))
    level[:border, :] = 3
    level[-border:, :] = 3
    level[:, :border] = 3
    level[:, -border:] = 3
    return level


def _palette(rng: np.random.Generator, paper: np.ndarray) -> np.ndarray:
    """Colours of the four grid levels for one page: a hue from pink/red/orange at random strengths."""
    ink = np.array(_HUES[str(rng.choice(list(_HUES)))], float) + rng.uniform(-12, 12, 3)
    strength = np.array([rng.uniform(0.0, 0.03), rng.uniform(0.1, 0.2), rng.uniform(0.18, 0.3), 0.0])
    strength[3] = rng.uniform(0.55, 0.8)
    colours = paper[None, :] * (1 - strength[:, None]) + ink[None, :] * strength[:, None]
    return np.clip(np.round(colours), 0, 255).astype(np.uint8)


def _header_lines(record: EcgRecord, rng: np.random.Generator) -> tuple[list[tuple[int, int, str]], str, str]:
    """Positioned header strings at scale 1 (x, baseline y, text), the footer's left text and its date."""
    age = "" if rng.random() < 0.4 else str(int(rng.integers(22, 88)))
    sex = str(rng.choice(["Male", "Female"]))
    height = "" if rng.random() < 0.7 else str(int(rng.integers(150, 192)))
    weight = "" if rng.random() < 0.7 else str(int(rng.integers(48, 105)))
    bp = (
        ("", "")
        if rng.random() < 0.7
        else (str(int(rng.integers(100, 160))), str(int(rng.integers(60, 100))))
    )
    race = "Race:Unknown" if rng.random() < 0.85 else "Race:Asian"
    items = [
        (68, 92, f"ID : {int(rng.integers(100000, 999999))}"),
        (262, 92, age),
        (320, 92, "Years"),
        (448, 92, sex),
        (560, 92, height),
        (616, 92, "cm"),
        (700, 92, weight),
        (766, 92, "kg"),
        (880 if bp[0] else 932, 92, f"{bp[0]} / {bp[1]}" if bp[0] else "/"),
        (1004 if bp[0] else 960, 92, "mmHg"),
        (1096, 92, race),
        (1336, 92, "Room No.:"),
        (1520, 92, "Department:"),
        (68, 124, "Exam.Room:"),
        (280, 124, "Medication:"),
        (68, 168, "Diagnosis Information:"),
        (1556, 202, "Technician :"),
        (1556, 234, "Ref-Phys. :"),
        (1556, 268, "Report Confirmed by:"),
    ]
    when = dt.datetime(2019, 1, 1) + dt.timedelta(seconds=int(rng.integers(0, 3 * 365 * 86400)))
    date = when.strftime("%Y-%m-%d   %I:%M:%S %p")
    low = str(rng.choice(["0.67", "0.05", "0.5"]))
    high = str(rng.choice(["25", "35", "40"]))
    mains = str(rng.choice(["AC50", "AC60"]))
    heart = "\u2665" if _has_heart(_font(21)) else "HR "
    footer = f"{low}~{high}Hz  {mains}  25mm/s  10mm/mV  4*2.5s+1r  {heart}{record.heart_rate}   SE-3  V1.0  SEMIP  V1.7"
    return items, footer, date


def _trace_points(
    signal: np.ndarray,
    fs: float,
    t0: float,
    t1: float,
    x0: float,
    y0: float,
    mm: float,
    clip: tuple[int, int],
) -> list[tuple[float, float]]:
    """Pixel polyline of signal[t0:t1] starting at (x0, baseline y0), about two points per pixel column."""
    i0, i1 = int(round(t0 * fs)), min(len(signal), int(round(t1 * fs)))
    px_per_s = SPEED_MM_S * mm
    step = max(1, int(fs / (2 * px_per_s)))
    seg = signal[i0:i1]
    n = len(seg) // step * step
    chunks = seg[:n].reshape(-1, step)
    # keep each chunk's extreme so that narrow R and S peaks survive the thinning
    pick = np.abs(chunks - chunks.mean(axis=1, keepdims=True)).argmax(axis=1)
    values = chunks[np.arange(len(chunks)), pick]
    times = (np.arange(len(chunks)) * step + pick) / fs  # seconds from the segment start
    xs = x0 + times * px_per_s
    ys = np.clip(y0 - values * GAIN_MM_MV * mm, clip[0], clip[1])
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def render_page(label: str, rng: np.random.Generator, scale: float = 1.0) -> Printout:
    """Draw one report page of class `label` from the beat model; deterministic for the generator's state."""
    _check_scale(scale)
    record = synthesize_ecg(label, rng, duration=4 * SEGMENT_S)
    return render_record(record, rng, scale)


def render_signals(
    signals: np.ndarray,
    fs: float,
    rng: np.random.Generator,
    scale: float = 1.0,
    label: str = "",
    heart_rate: int | None = None,
    rotate: bool = True,
) -> Printout:
    """Draw a given 12-lead recording (e.g. a PTB-XL record) on a report page with a random look.

    The signal source besides the beat model (`synthetic.signals.record_from_signals`): any sampling rate of
    at least 50 Hz, time mapped to pixels at 25 mm/s and the page's pixels per mm (`scale`), amplitude at
    10 mm/mV. The first 10 s are shown (3 x 4 segments of 2.5 s and the lead-II rhythm strip); a shorter
    record leaves the rest of its rows empty.

    Args:
        signals: (12, T) in mV, leads I, II, III, aVR, aVL, aVF, V1-V6.
        fs: sampling rate in Hz.
        rng: draws the look (grid colour, line width, offset, rotation, header text).
        scale: page scale, 1.0 = 2213 x 1572 px (200 dpi); 0.5 is the dev copy's size.
        label: free text kept in `Printout.record.label`.
        heart_rate: the footer's rate; None: estimated from the signals.
        rotate: allow the small random rotation (False: `angle` is always 0, for tests that need exact columns).

    Returns:
        The page and its ground truth (grid box, angle, the centred record).

    Raises:
        ValueError: a bad array shape or rate (see `record_from_signals`), or a scale outside (0.1, 4].
    """
    from ecg_inception.synthetic.signals import record_from_signals

    _check_scale(scale)
    record = record_from_signals(signals, fs, label=label, heart_rate=heart_rate)
    return render_record(record, rng, scale, rotate=rotate)


def _check_scale(scale: float) -> None:
    if not 0.1 < scale <= 4.0:
        raise ValueError(f"scale must be in (0.1, 4], got {scale}")


def render_record(record: EcgRecord, rng: np.random.Generator, scale: float = 1.0, rotate: bool = True) -> Printout:
    """Draw `record` (any source: the beat model or real signals) on a page whose look `rng` draws.

    Args:
        record: the 12-lead signals (mV) and the heart rate the footer prints.
        rng: draws grid colour and strength, paper tint, ink colour, line width, page offset, header text
            and the small rotation.
        scale: page scale in (0.1, 4].
        rotate: allow the random rotation (its draw is made either way, so the look is the same otherwise).

    Returns:
        The page and its ground truth.
    """
    _check_scale(scale)
    width, height = page_size(scale)
    mm = PX_PER_MM * scale
    paper = np.array([255.0, 255.0, 255.0]) - rng.uniform(0, 5, 3)
    palette = _palette(rng, paper)
    dx, dy = (int(round(v)) for v in rng.uniform(-8 * scale, 8 * scale, 2))
    left, top, right, bottom = (round(v * scale) for v in GRID_BOX)
    left, top, right, bottom = left + dx, top + dy, right + dx, bottom + dy
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = np.round(paper).astype(np.uint8)
    canvas[top:bottom, left:right] = palette[_grid_levels(right - left, bottom - top, scale)]
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    ink = tuple(int(v) for v in rng.integers(0, 45, 3))

    def s(v: float) -> int:
        return int(round(v * scale))

    items, footer, date = _header_lines(record, rng)
    draw.text((s(1134) + dx, s(60) + dy), "ECG REPORT", fill=ink, font=_font(s(42)), anchor="ms")
    for x, y, text in items:
        if text:
            draw.text((s(x) + dx, s(y) + dy), text, fill=ink, font=_font(s(26)), anchor="ls")
    rule_w = max(1, s(4))
    for y in (137, 143):
        draw.line([(s(68) + dx, s(y) + dy), (s(2154) + dx, s(y) + dy)], fill=ink, width=rule_w)
    draw.text((left, bottom + s(38)), footer, fill=ink, font=_font(s(21)), anchor="ls")
    draw.text((s(1794) + dx, bottom + s(38)), date, fill=ink, font=_font(s(21)), anchor="ls")

    trace_w = max(1, int(round(rng.uniform(3.4, 4.8) * scale)))
    clip = (top + trace_w, bottom - trace_w)
    x_start = left + _TRACE_X0_MM * mm
    col_w = SEGMENT_S * SPEED_MM_S * mm
    baselines = [top + (_ROW0_MM + r * _ROW_STEP_MM) * mm for r in range(4)]
    label_font = _font(s(28))
    for r, y0 in enumerate(baselines):
        cx = left + _CAL_X0_MM * mm
        pulse = [(cx, y0), (cx + mm, y0), (cx + mm, y0 - 10 * mm), (cx + 3.2 * mm, y0 - 10 * mm)]
        pulse += [(cx + 3.2 * mm, y0), (cx + 4.2 * mm, y0)]
        draw.line(pulse, fill=ink, width=trace_w)
        leads = LAYOUT[r] if r < 3 else (RHYTHM_LEAD,)
        for c, lead in enumerate(leads):
            t0, t1 = (c * SEGMENT_S, (c + 1) * SEGMENT_S) if r < 3 else (0.0, 4 * SEGMENT_S)
            x0 = x_start + c * col_w
            pts = _trace_points(record.lead(lead), record.fs, t0, t1, x0, y0, mm, clip)
            if len(pts) > 1:  # a record shorter than the page leaves the rest of its rows empty
                draw.line(pts, fill=ink, width=trace_w, joint="curve")
            draw.text((x0 + 0.4 * mm, y0 - 1.2 * mm), lead, fill=ink, font=label_font, anchor="ls")
    for c in range(1, 4):
        x = x_start + c * col_w
        draw.line([(x, baselines[0] - 6 * mm), (x, baselines[2] + 6 * mm)], fill=ink, width=max(1, s(4)))

    angle = float(rng.uniform(-0.4, 0.4)) if rng.random() < 0.5 else 0.0
    angle = angle if rotate else 0.0
    if angle:
        fill = tuple(int(v) for v in np.round(paper))
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=fill)
    return Printout(image=image, record=record, grid_box=(left, top, right, bottom), angle=angle)


def render_printout(label: str, rng: np.random.Generator, scale: float = 1.0) -> Image.Image:
    """Draw one report page of class `label` as an RGB image (see `render_page` for its ground truth)."""
    return render_page(label, rng, scale).image

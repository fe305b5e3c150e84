"""The renderer draws given 12-lead signals: R peaks at the columns 25 mm/s predicts, flat signals flat."""

from __future__ import annotations

import numpy as np
import pytest

from ecg_inception.synthetic.printout import (
    _ROW0_MM,
    _ROW_STEP_MM,
    _TRACE_X0_MM,
    PX_PER_MM,
    SPEED_MM_S,
    render_signals,
)
from ecg_inception.synthetic.signals import estimate_heart_rate, record_from_signals
from ecg_inception.synthetic.waveforms import LEADS

PEAKS_S = (0.35, 1.15, 2.2, 2.9, 3.6, 4.45, 5.3, 6.05, 6.8, 7.7, 8.5, 9.4)
II = LEADS.index("II")


def spikes(fs: float, amplitude: float = 2.0, sigma: float = 0.008) -> np.ndarray:
    """Zero everywhere except narrow Gaussian R waves of `amplitude` mV in lead II at PEAKS_S."""
    t = np.arange(int(10 * fs)) / fs
    x = np.zeros((12, len(t)))
    for p in PEAKS_S:
        x[II] += amplitude * np.exp(-0.5 * ((t - p) / sigma) ** 2)
    return x


def ink_mask(page) -> np.ndarray:
    return np.asarray(page.image).min(axis=2) < 110


def geometry(page, scale: float) -> tuple[float, float, list[float]]:
    left, top, _, _ = page.grid_box
    mm = PX_PER_MM * scale
    x_start = left + _TRACE_X0_MM * mm
    baselines = [top + (_ROW0_MM + r * _ROW_STEP_MM) * mm for r in range(4)]
    return mm, x_start, baselines


def peak_columns(mask: np.ndarray, y_lo: float, y_hi: float, x_lo: float, x_hi: float) -> list[float]:
    """Centres of the runs of columns that have ink between rows y_lo and y_hi."""
    band = mask[int(round(y_lo)) : int(round(y_hi)), int(round(x_lo)) : int(round(x_hi))].any(axis=0)
    cols = np.flatnonzero(band)
    runs = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1) if len(cols) else []
    return [float(r.mean()) + int(round(x_lo)) for r in runs]


@pytest.mark.parametrize(("fs", "scale"), [(250.0, 0.5), (500.0, 0.5), (250.0, 1.0), (500.0, 1.5)])
def test_r_peaks_land_where_the_paper_speed_puts_them(fs: float, scale: float) -> None:
    page = render_signals(spikes(fs), fs, np.random.default_rng(0), scale, rotate=False)
    assert page.angle == 0.0
    mm, x_start, baselines = geometry(page, scale)
    mask = ink_mask(page)
    predicted = [x_start + t * SPEED_MM_S * mm for t in PEAKS_S]
    # rhythm strip (row 4, lead II, 0-10 s): every R wave; band 12-19 mm above the baseline (1.2-1.9 mV)
    y0 = baselines[3]
    found = peak_columns(mask, y0 - 19 * mm, y0 - 12 * mm, x_start, page.grid_box[2] - 2)
    assert len(found) == len(PEAKS_S)
    assert np.abs(np.array(found) - predicted).max() <= 1.5
    # row 2 shows lead II in its first column only (0-2.5 s), at the same columns
    y1 = baselines[1]
    col_w = 2.5 * SPEED_MM_S * mm
    found = peak_columns(mask, y1 - 19 * mm, y1 - 12 * mm, x_start, x_start + col_w - 1.5 * mm)
    expected = [x for x, t in zip(predicted, PEAKS_S, strict=True) if t < 2.5]
    assert len(found) == len(expected)
    assert np.abs(np.array(found) - expected).max() <= 1.5


@pytest.mark.parametrize("offset", [0.0, 0.7])
def test_flat_signals_give_flat_traces(offset: float) -> None:
    scale, fs = 0.5, 250.0
    page = render_signals(np.full((12, 2500), offset), fs, np.random.default_rng(1), scale, rotate=False)
    mm, x_start, baselines = geometry(page, scale)
    mask = ink_mask(page)
    col_w = 2.5 * SPEED_MM_S * mm
    half_width = 4.8 * scale / 2 + 1.5  # the widest trace line, plus rounding
    for r, y0 in enumerate(baselines):
        segments = range(4) if r < 3 else range(1)
        for c in segments:
            x0 = x_start + c * col_w
            x1 = x0 + (col_w if r < 3 else 4 * col_w)
            # skip the lead label (first 8 mm) and the column separator at the segment's end
            cols = range(int(x0 + 8 * mm), int(x1 - 1.5 * mm))
            window = mask[int(y0 - 15 * mm) : int(y0 + 15 * mm), cols]
            rows = np.flatnonzero(window.any(axis=1)) + int(y0 - 15 * mm)
            assert window.any(axis=0).all(), f"row {r} col {c}: trace missing in some columns"
            assert rows.min() >= y0 - half_width and rows.max() <= y0 + half_width, (r, c, rows.min(), rows.max())


def test_heart_rate_and_checks() -> None:
    assert estimate_heart_rate(spikes(500.0), 500.0) == pytest.approx(60 / np.median(np.diff(PEAKS_S)), abs=1)
    assert estimate_heart_rate(np.zeros((12, 2500)), 250.0) == 0
    record = record_from_signals(np.full((12, 100), np.nan), 250.0)
    assert np.isfinite(record.signals).all()
    with pytest.raises(ValueError, match=r"\(12, T\)"):
        record_from_signals(np.zeros((8, 100)), 250.0)
    with pytest.raises(ValueError, match="fs"):
        record_from_signals(np.zeros((12, 100)), 20.0)


def test_short_record_and_seeded_look_are_deterministic() -> None:
    short = spikes(250.0)[:, :300]  # 1.2 s: the later segments stay empty
    a = render_signals(short, 250.0, np.random.default_rng(5), 0.5).image
    b = render_signals(short, 250.0, np.random.default_rng(5), 0.5).image
    assert a.tobytes() == b.tobytes()
    c = render_signals(short, 250.0, np.random.default_rng(6), 0.5).image
    assert a.tobytes() != c.tobytes()

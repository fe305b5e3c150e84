"""The lead layout: regions tile the grid box, sit where the renderer draws each lead, and shares add up."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ecg_inception.inference.leads import (
    COLUMN_EDGES,
    GRID_ROWS,
    LEAD_NAMES,
    MARGIN,
    REGIONS,
    lead_shares,
    region_index_map,
    region_of,
    region_slices,
    uniform_shares,
)
from ecg_inception.synthetic import printout as pr

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_thirteen_leads_and_a_margin() -> None:
    assert [g.name for g in REGIONS] == [*LEAD_NAMES, MARGIN]
    assert len(set(LEAD_NAMES)) == 13 and LEAD_NAMES[-1] == "II_rhythm"


@pytest.mark.parametrize("shape", [(7, 13), (64, 128), (618, 1054), (1236, 2108), (1, 1)])
def test_regions_tile_the_box_without_gaps_or_overlaps(shape: tuple[int, int]) -> None:
    h, w = shape
    cover = np.zeros(shape, int)
    for rows, cols in region_slices(h, w).values():
        cover[rows, cols] += 1
    assert (cover == 1).all()  # every pixel in exactly one region
    assert (region_index_map(h, w) >= 0).all()


def test_region_rectangles_tile_the_unit_square() -> None:
    assert sum((g.right - g.left) * (g.bottom - g.top) for g in REGIONS) == pytest.approx(1.0, abs=1e-12)
    for a, b in itertools.combinations(REGIONS, 2):
        overlap_w = min(a.right, b.right) - max(a.left, b.left)
        overlap_h = min(a.bottom, b.bottom) - max(a.top, b.top)
        assert overlap_w <= 1e-12 or overlap_h <= 1e-12, (a, b)


def _renderer_frame(scale: float = 0.5) -> tuple[tuple[int, int, int, int], float]:
    """The renderer's nominal grid box and pixels per mm at `scale` (its layout constants are in mm)."""
    return pr.nominal_grid_box(scale), pr.PX_PER_MM * scale


def _frac(box: tuple[int, int, int, int], x: float, y: float) -> tuple[float, float]:
    left, top, right, bottom = box
    return (x - left) / (right - left), (y - top) / (bottom - top)


def test_every_rendered_lead_segment_lies_in_its_own_region() -> None:
    # Ground truth from the renderer's own constants, independent of the measured table.
    box, mm = _renderer_frame()
    x_start = box[0] + pr._TRACE_X0_MM * mm
    col_w = pr.SEGMENT_S * pr.SPEED_MM_S * mm
    for r in range(4):
        y0 = box[1] + (pr._ROW0_MM + r * pr._ROW_STEP_MM) * mm
        leads = pr.LAYOUT[r] if r < 3 else ("II_rhythm",)
        for c, lead in enumerate(leads):
            x0 = x_start + c * col_w
            x1 = x0 + (col_w if r < 3 else 4 * col_w)
            for x in np.linspace(x0 + 2 * mm, x1 - 2 * mm, 7):
                for y in (y0 - 10 * mm, y0, y0 + 5 * mm):  # 1 mV up, the baseline, 0.5 mV down
                    assert region_of(*_frac(box, x, y)) == lead, (lead, x, y)


def test_calibration_pulses_fall_in_the_margin_outside_the_shares() -> None:
    box, mm = _renderer_frame()
    for r in range(4):
        y0 = box[1] + (pr._ROW0_MM + r * pr._ROW_STEP_MM) * mm
        cx = box[0] + pr._CAL_X0_MM * mm
        for x, y in itertools.product((cx, cx + 2 * mm, cx + 4.2 * mm), (y0, y0 - 10 * mm)):
            assert region_of(*_frac(box, x, y)) == MARGIN
    # a map only on the margin gives it the whole box share and no lead any share
    m = np.zeros((618, 1054))
    m[:, : int(COLUMN_EDGES[0] * 1054) - 1] = 1.0
    shares = lead_shares(m)
    assert shares.margin_share == pytest.approx(1.0) and sum(shares.shares.values()) == 0.0
    assert shares.top_lead is None


def test_shares_sum_to_one_and_follow_the_mass() -> None:
    rng = np.random.default_rng(0)
    m = rng.normal(size=(300, 500))  # negative values count as zero
    shares = lead_shares(m)
    assert sum(shares.shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert set(shares.shares) == set(LEAD_NAMES)
    one = np.zeros((618, 1054))
    rows, cols = region_slices(618, 1054)["V2"]
    one[rows, cols] = 3.0
    assert lead_shares(one).shares["V2"] == pytest.approx(1.0) and lead_shares(one).top_lead == "V2"
    flat = lead_shares(np.ones((618, 1054))).shares
    for lead, share in uniform_shares().items():
        assert flat[lead] == pytest.approx(share, abs=2e-3)
    assert uniform_shares()["II_rhythm"] > 3.5 * uniform_shares()["V2"]  # the strip is four columns wide
    with pytest.raises(ValueError, match="NaN"):
        lead_shares(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="2-D"):
        lead_shares(np.ones(5))


def test_grid_rows_match_the_renderer_layout() -> None:
    assert tuple(tuple(row) for row in pr.LAYOUT) == GRID_ROWS


def test_the_measurement_script_agrees_with_the_table_on_rendered_pages() -> None:
    job = subprocess.run([sys.executable, str(EXAMPLES / "measure_lead_layout.py"), "--synthetic", "6"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert job.returncode == 0, job.stderr[-2000:]
    lines = {line.split("(")[0].strip(): line for line in job.stdout.splitlines()}
    for i in range(3):
        median = float(lines[f"separator {i + 1}"].split(")")[1].split()[0])
        assert abs(median - COLUMN_EDGES[i + 1]) < 0.003, lines[f"separator {i + 1}"]
    start = float(lines["trace_start"].split(")")[1].split()[0])
    assert abs(start - COLUMN_EDGES[0]) < 0.003
    assert "measured: 6" in job.stdout

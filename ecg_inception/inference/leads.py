"""The printout's lead layout inside the grid box, and the share of a heat map's positive mass per lead.

The Mendeley printer (and `synthetic.printout`, which copies it) draws 3 rows x 4 columns of 2.5 s segments
(I II III / aVR aVL aVF / V1 V2 V3 / V4 V5 V6, one column each) above a 10 s rhythm strip, with a 1 mV
calibration pulse at the left of every row. The fractions below are measured on the 290 distinct dev pages
by `examples/measure_lead_layout.py` (medians; page-to-page standard deviation at most 0.003 of the box); the
32 full-size scans of the fullres sample agree within 0.001 on the columns and 0.003 on the row boundaries, the
synthetic renderer's pages within 0.002 and 0.015 (docs/explain.md).

- Columns: the trace start (0.0398), the three black separator lines, the right edge of the box.
- Rows: the least-inked row between two baselines (averaged over the pages; QRS complexes reach further up
  than down, so these sit a little above the midpoints between baselines).
- `margin`: the strip left of the trace start, over the whole box height: the calibration pulses and the
  border. It is a 14th region outside the lead shares: a pulse is the same 1 mV step on every page, so mass
  on it says nothing about any lead. Its share of the box's mass is reported separately (`margin_share`).
- The rhythm strip is `II_rhythm` as the printer's layout names it; on 71 of the 290 dev pages it repeats
  lead III instead (the example script measures which row it matches).

All 14 regions are axis-aligned rectangles that tile the grid box: no gaps, no overlaps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

#: The 13 lead regions in report order.
LEAD_NAMES: tuple[str, ...] = (
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6", "II_rhythm",
)  # fmt: skip
MARGIN = "margin"
#: The short leads by row (top to bottom) and column (left to right), as printed.
GRID_ROWS: tuple[tuple[str, str, str, str], ...] = (
    ("I", "aVR", "V1", "V4"),
    ("II", "aVL", "V2", "V5"),
    ("III", "aVF", "V3", "V6"),
)
#: Fractions of the grid box width: trace start, the three separators, the right edge.
COLUMN_EDGES: tuple[float, ...] = (0.0398, 0.2728, 0.5062, 0.7396, 1.0)
#: Fractions of the grid box height: top, the three row boundaries, the bottom.
ROW_EDGES: tuple[float, ...] = (0.0, 0.2630, 0.5040, 0.7495, 1.0)


@dataclass(frozen=True)
class Region:
    """A rectangle of the grid box in fractions of its width and height (right and bottom exclusive)."""

    name: str
    left: float
    top: float
    right: float
    bottom: float

    def contains(self, fx: float, fy: float) -> bool:
        """Whether the point (fx, fy), in fractions of the box, lies in this region."""
        return self.left <= fx < self.right and self.top <= fy < self.bottom


def _build_regions() -> tuple[Region, ...]:
    regions = []
    for r, row in enumerate(GRID_ROWS):
        for c, lead in enumerate(row):
            regions.append(Region(lead, COLUMN_EDGES[c], ROW_EDGES[r], COLUMN_EDGES[c + 1], ROW_EDGES[r + 1]))
    regions.append(Region("II_rhythm", COLUMN_EDGES[0], ROW_EDGES[3], COLUMN_EDGES[-1], ROW_EDGES[4]))
    regions.sort(key=lambda g: LEAD_NAMES.index(g.name))
    regions.append(Region(MARGIN, 0.0, 0.0, COLUMN_EDGES[0], 1.0))
    return tuple(regions)


#: The 13 lead regions in `LEAD_NAMES` order, then `margin`.
REGIONS: tuple[Region, ...] = _build_regions()


def region_of(fx: float, fy: float) -> str:
    """The region name at (fx, fy), fractions of the grid box in [0, 1).

    Raises:
        ValueError: The point lies outside the box.
    """
    for region in REGIONS:
        if region.contains(fx, fy):
            return region.name
    raise ValueError(f"point ({fx}, {fy}) lies outside the grid box [0, 1) x [0, 1)")


def _edges_px(edges: tuple[float, ...], n: int) -> np.ndarray:
    """Pixel index where each fractional edge starts: pixel k (centre (k + 0.5) / n) is at or right of it."""
    return np.clip(np.ceil(np.asarray(edges) * n - 0.5), 0, n).astype(int)


def region_slices(height: int, width: int) -> dict[str, tuple[slice, slice]]:
    """(rows, columns) slices of every region in a `height` x `width` pixel grid covering the box.

    A pixel belongs to the region holding its centre, so the slices tile the grid exactly.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"box must have a positive size, got {width}x{height}")
    out = {}
    for g in REGIONS:
        y0, y1 = _edges_px((g.top, g.bottom), height)
        x0, x1 = _edges_px((g.left, g.right), width)
        out[g.name] = (slice(int(y0), int(y1)), slice(int(x0), int(x1)))
    return out


def region_index_map(height: int, width: int) -> np.ndarray:
    """int8 map (height x width) of region indices into `REGIONS` (13 = margin); -1 where none (never)."""
    index = np.full((height, width), -1, np.int8)
    slices = region_slices(height, width)
    for i, region in enumerate(REGIONS):
        rows, cols = slices[region.name]
        index[rows, cols] = i
    return index


@dataclass(frozen=True)
class LeadShares:
    """Share of positive heat-map mass per lead (13 keys, summing to 1) and the margin's share of the box."""

    shares: dict[str, float]
    margin_share: float
    total_mass: float

    @property
    def top_lead(self) -> str | None:
        """The lead with the largest share (None when the map has no positive mass on any lead)."""
        if self.total_mass <= 0:
            return None
        return max(self.shares, key=lambda k: self.shares[k])


def lead_shares(box_map: np.ndarray) -> LeadShares:
    """Shares of a heat map over the grid box: positive mass per lead region / positive mass on all leads.

    Args:
        box_map: A 2-D map whose pixels cover the grid box exactly (any resolution; negative values count 0).

    Returns:
        `LeadShares`; when no lead region holds positive mass every share is 0.0 (and `total_mass` is 0).

    Raises:
        ValueError: The map is not 2-D or holds non-finite values.
    """
    m = np.asarray(box_map, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"expected a non-empty 2-D map over the grid box, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("the heat map holds NaN or infinite values")
    m = np.maximum(m, 0.0)
    mass = {name: float(m[rows, cols].sum()) for name, (rows, cols) in region_slices(*m.shape).items()}
    lead_total = sum(mass[name] for name in LEAD_NAMES)
    box_total = lead_total + mass[MARGIN]
    shares = {name: (mass[name] / lead_total if lead_total > 0 else 0.0) for name in LEAD_NAMES}
    return LeadShares(shares, mass[MARGIN] / box_total if box_total > 0 else 0.0, lead_total)


def uniform_shares() -> dict[str, float]:
    """The shares of a flat map: each lead's area over the 13 leads' area (the rhythm strip is 4 columns wide).

    The reference a per-class chart is read against: a model that looks everywhere alike gets these.
    """
    area = {g.name: (g.right - g.left) * (g.bottom - g.top) for g in REGIONS if g.name != MARGIN}
    total = sum(area.values())
    return {name: area[name] / total for name in LEAD_NAMES}


def mean_shares(rows: list[Mapping[str, float]]) -> dict[str, float]:
    """Per-lead mean of several `shares` dicts (an empty list gives zeros)."""
    if not rows:
        return {name: 0.0 for name in LEAD_NAMES}
    return {name: float(np.mean([r[name] for r in rows])) for name in LEAD_NAMES}

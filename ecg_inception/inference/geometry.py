"""Where a page's pixels go in the model input, and a feature-map heat map back onto the page.

Preprocessing (`data.transforms.preprocess`) crops the page to its grid box, optionally resamples the crop (the
resolution issue's canonical pixels per millimetre: both axes by one factor, so only the crop's pixel size
changes), and resizes it: `squash` stretches it over the whole input, `letterbox` keeps the aspect ratio and
centres it between white bars. In every case the crop's continuous extent [0, w) x [0, h) lands on one
rectangle of the input, the *content* rectangle, so a point is carried by its fractions of the crop box:

    page (x, y) -> box fractions (fx, fy) -> input (u, v) = content origin + (fx, fy) x content size

Coordinates are continuous, pixel k spanning [k, k + 1) (its centre at k + 0.5), as PIL resizes. Preprocessing
version 3 resizes a slightly different region than the integer box, the box with its edges moved onto the border
line's centre (`data.align.aligned_crop`); that region (`source`) is what maps onto the content rectangle.

A feature map's cell (i, j) sits at input (offset_y + i * stride_y, offset_x + j * stride_x) (`FeatureGrid`;
`cam.trace_feature_grid` derives it from the network's convolutions and pools). Grad-CAM implementations
usually stretch the map over the input instead; for inception_v3's unpadded convolutions that puts the outer
cells of Mixed_6e at 128 x 256 11-17 px too far out (the last row at 117.3 instead of 101.5: half a lead row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ecg_inception.data.crop import CropBox
from ecg_inception.data.transforms import RESIZE_MODES, parse_image_size


@dataclass(frozen=True)
class InputGeometry:
    """How one page reaches the model input.

    Attributes:
        page_size: (width, height) of the original page in pixels.
        box: (left, top, right, bottom) of the crop in page pixels, clipped to the page (the whole page when
            crop is off); right and bottom exclusive.
        input_size: (height, width) of the model input.
        content: (left, top, width, height) of the crop's image inside the input, in input pixels.
        source: (left, top, right, bottom) of the page region, continuous page pixels, that fills `content`
            (None: `box`).
    """

    page_size: tuple[int, int]
    box: tuple[int, int, int, int]
    input_size: tuple[int, int]
    content: tuple[float, float, float, float]
    source: tuple[float, float, float, float] | None = None

    @property
    def region(self) -> tuple[float, float, float, float]:
        """The page region that fills `content`: `source`, else `box`."""
        return self.source if self.source is not None else tuple(float(v) for v in self.box)  # type: ignore[return-value]

    def page_to_input(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Continuous page coordinates -> continuous input coordinates."""
        left, top, right, bottom = self.region
        cl, ct, cw, ch = self.content
        fx = (np.asarray(x, np.float64) - left) / (right - left)
        fy = (np.asarray(y, np.float64) - top) / (bottom - top)
        return cl + fx * cw, ct + fy * ch

    def input_to_page(self, u: np.ndarray | float, v: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Continuous input coordinates -> continuous page coordinates (the inverse of `page_to_input`)."""
        left, top, right, bottom = self.region
        cl, ct, cw, ch = self.content
        fx = (np.asarray(u, np.float64) - cl) / cw
        fy = (np.asarray(v, np.float64) - ct) / ch
        return left + fx * (right - left), top + fy * (bottom - top)


def input_geometry(
    page_size: tuple[int, int],
    box: CropBox | None,
    size: int | Sequence[int],
    resize: str = "squash",
    source_size: tuple[float, float] | None = None,
    source_box: Sequence[float] | None = None,
) -> InputGeometry:
    """The geometry `preprocess(page, box, size, resize)` applies, with its clipping and rounding.

    Args:
        page_size: (width, height) of the page.
        box: The crop box (None: crop off, the whole page).
        size: The model input size (an int or [height, width]).
        resize: `squash` or `letterbox`.
        source_size: (width, height) of the image entering the final resize when the crop is resampled first
            (the canonical scale); None: the clipped crop itself.
        source_box: The continuous page region the final resize reads when it is not the clipped box
            (preprocessing version 3: `data.align.AlignedCrop.page_box`); None: the clipped box.

    Returns:
        The `InputGeometry`.

    Raises:
        ValueError: An unknown resize mode, or a box that leaves nothing of the page.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; expected one of {', '.join(RESIZE_MODES)}")
    width, height = page_size
    out_h, out_w = parse_image_size(size)
    if box is None:
        clipped = (0, 0, width, height)
    else:
        clipped = (max(0, box.left), max(0, box.top), min(width, box.right), min(height, box.bottom))
        if clipped[2] - clipped[0] < 2 or clipped[3] - clipped[1] < 2:
            raise ValueError(f"crop box {box} leaves nothing of a {width}x{height} page")
    src_w, src_h = source_size or (clipped[2] - clipped[0], clipped[3] - clipped[1])
    if resize == "squash":
        content = (0.0, 0.0, float(out_w), float(out_h))
    else:  # the arithmetic of transforms.preprocess's letterbox branch
        scale = min(out_w / src_w, out_h / src_h)
        w = min(out_w, max(1, round(src_w * scale)))
        h = min(out_h, max(1, round(src_h * scale)))
        content = (float((out_w - w) // 2), float((out_h - h) // 2), float(w), float(h))
    source = None if source_box is None else tuple(float(v) for v in source_box)
    if source is not None and (len(source) != 4 or source[2] <= source[0] or source[3] <= source[1]):
        raise ValueError(f"source box {source_box} is not a (left, top, right, bottom) region")
    return InputGeometry((int(width), int(height)), clipped, (out_h, out_w), content, source)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FeatureGrid:
    """Where the cells of a feature map sit in the model input (continuous input pixels).

    Attributes:
        shape: (height, width) of the feature map.
        offset: (y, x) of the centre of cell (0, 0).
        stride: (y, x) distance between neighbouring cell centres.
    """

    shape: tuple[int, int]
    offset: tuple[float, float]
    stride: tuple[float, float]

    @classmethod
    def stretched(cls, shape: tuple[int, int], input_size: tuple[int, int]) -> FeatureGrid:
        """The grid a plain resize of the map over the input assumes (what grad-cam's own output does)."""
        sy, sx = input_size[0] / shape[0], input_size[1] / shape[1]
        return cls(tuple(shape), (sy / 2, sx / 2), (sy, sx))  # type: ignore[arg-type]

    def cell_centre(self, i: float, j: float) -> tuple[float, float]:
        """(v, u) input coordinates of the centre of cell (i, j)."""
        return self.offset[0] + i * self.stride[0], self.offset[1] + j * self.stride[1]


def interpolation_matrix(cells: np.ndarray, n: int) -> np.ndarray:
    """Linear-interpolation weights (len(cells) x n) at fractional cell indices, clamped to the first/last cell."""
    pos = np.clip(np.asarray(cells, np.float64), 0.0, n - 1.0)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    frac = pos - lo
    weights = np.zeros((pos.size, n))
    rows = np.arange(pos.size)
    np.add.at(weights, (rows, lo), 1.0 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights


def sample_map(cam: np.ndarray, grid: FeatureGrid, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The feature map `cam` (grid.shape), linearly interpolated at input rows `v` x columns `u` (separable)."""
    cam = np.asarray(cam, np.float64)
    if cam.shape != tuple(grid.shape):
        raise ValueError(f"map of shape {cam.shape} does not fit the feature grid {grid.shape}")
    wy = interpolation_matrix((np.asarray(v) - grid.offset[0]) / grid.stride[0], cam.shape[0])
    wx = interpolation_matrix((np.asarray(u) - grid.offset[1]) / grid.stride[1], cam.shape[1])
    return wy @ cam @ wx.T


def map_to_box(
    cam: np.ndarray, grid: FeatureGrid, geometry: InputGeometry, shape: tuple[int, int] | None = None
) -> np.ndarray:
    """The heat map over the crop box: (height, width) pixels covering it (default: its page pixels).

    Pixel (r, c) of the result samples the box at fractions ((c + 0.5) / width, (r + 0.5) / height), carried to
    the input by `InputGeometry.page_to_input`.
    """
    left, top, right, bottom = geometry.box
    h, w = shape or (bottom - top, right - left)
    x = left + (np.arange(w) + 0.5) * (right - left) / w
    y = top + (np.arange(h) + 0.5) * (bottom - top) / h
    u, _ = geometry.page_to_input(x, np.zeros_like(x))
    _, v = geometry.page_to_input(np.zeros_like(y), y)
    return sample_map(cam, grid, v, u).astype(np.float32)


def map_to_page(cam: np.ndarray, grid: FeatureGrid, geometry: InputGeometry) -> np.ndarray:
    """The heat map in page pixels (height x width of the page): the box's pixels filled, zero outside it."""
    width, height = geometry.page_size
    left, top, right, bottom = geometry.box
    page = np.zeros((height, width), np.float32)
    page[top:bottom, left:right] = map_to_box(cam, grid, geometry)
    return page

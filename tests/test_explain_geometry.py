"""Geometry: the content rectangle is where preprocess puts the crop, and a blob's heat-map peak maps back onto it."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageDraw
from torch import nn

from ecg_inception.data.crop import CropBox, detect_grid_box
from ecg_inception.data.transforms import preprocess
from ecg_inception.inference.cam import choose_target_layer
from ecg_inception.inference.explain import explain_pages
from ecg_inception.inference.geometry import FeatureGrid, input_geometry, interpolation_matrix, map_to_page


@pytest.mark.parametrize("resize", ["squash", "letterbox"])
@pytest.mark.parametrize("size", [(64, 160), (128, 96), (128, 256)])
def test_content_rectangle_is_where_preprocess_puts_the_crop(resize: str, size: tuple[int, int]) -> None:
    page = Image.new("RGB", (500, 300), (255, 255, 255))
    box = CropBox(40, 30, 460, 280)
    ImageDraw.Draw(page).rectangle([box.left, box.top, box.right - 1, box.bottom - 1], fill=(0, 0, 0))
    out = preprocess(page, box, list(size), resize, "nearest").numpy()[0]
    rows, cols = np.nonzero(out < 128)
    g = input_geometry(page.size, box, list(size), resize)
    left, top, width, height = g.content
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (left, top, left + width, top + height)
    # page <-> input round trip
    u, v = g.page_to_input(np.array([40.0, 460.0, 250.0]), np.array([30.0, 280.0, 155.0]))
    np.testing.assert_allclose(u[:2], [left, left + width]) and np.testing.assert_allclose(v[:2], [top, top + height])
    x, y = g.input_to_page(u, v)
    np.testing.assert_allclose(x, [40, 460, 250]) and np.testing.assert_allclose(y, [30, 280, 155])


def test_geometry_clips_the_box_and_refuses_an_empty_one() -> None:
    g = input_geometry((100, 80), CropBox(-5, -3, 120, 90), 32)
    assert g.box == (0, 0, 100, 80)
    with pytest.raises(ValueError, match="leaves nothing"):
        input_geometry((100, 80), CropBox(99, 0, 150, 80), 32)
    with pytest.raises(ValueError, match="resize mode"):
        input_geometry((100, 80), None, 32, "crop")


def test_interpolation_weights_sum_to_one_and_clamp() -> None:
    w = interpolation_matrix(np.array([-3.0, 0.0, 0.25, 2.0, 9.0]), 3)
    np.testing.assert_allclose(w.sum(1), 1.0)
    np.testing.assert_allclose(w[0], [1, 0, 0]) and np.testing.assert_allclose(w[2], [0.75, 0.25, 0])
    np.testing.assert_allclose(w[-1], [0, 0, 1])


def test_map_to_page_fills_the_box_only() -> None:
    g = input_geometry((200, 100), CropBox(20, 10, 180, 90), (16, 32))
    grid = FeatureGrid.stretched((2, 4), (16, 32))
    page = map_to_page(np.ones((2, 4)), grid, g)
    assert page.shape == (100, 200)
    assert page[10:90, 20:180].min() == 1.0 and page.sum() == 160 * 80


def _localise(model: nn.Module) -> nn.Module:
    """Delta kernels (each conv passes its centre tap, averaged over input channels), BatchNorm passing its input
    plus 0.01 (every ReLU open, so gradients reach every cell), a uniform head: every feature cell then reads the input only near its geometric centre (widened by the pools'
    small windows), so a bright blob on black lights the cells centred nearest to it. (Uniform kernels would
    not do: zero padding cuts their broad responses at the image borders and pulls the peak inwards.)"""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                kh, kw = m.weight.shape[-2:]
                m.weight[:, :, kh // 2, kw // 2] = 1.0 / m.weight.shape[1]
            elif isinstance(m, nn.Linear):
                m.weight.fill_(1.0 / m.weight.shape[1])
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0), m.bias.fill_(0.01), m.running_mean.zero_(), m.running_var.fill_(1.0)
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.zero_()
    return model.eval()


class _Classifier(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.labels = ["blob", "other"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


@pytest.mark.parametrize(("arch", "size", "resize", "layer"), [
    ("inception_v3", [128, 256], "squash", "Mixed_6e"),
    ("inception_v3", [160, 160], "letterbox", "Mixed_6e"),
    ("resnet18", [128, 256], "squash", "layer3"),
])  # fmt: skip
def test_blob_peak_maps_back_inside_the_blob(one_thread: None, arch: str, size: list[int], resize: str,
                                             layer: str) -> None:
    torch.manual_seed(0)
    model = _Classifier(_localise(timm.create_model(arch, pretrained=False, num_classes=2)))
    w, h = 1106, 786
    # a page without a grid or a header: the crop falls back to the whole page (crop.fallback_for)
    box = detect_grid_box(Image.new("RGB", (w, h), (255, 255, 255)))
    g = input_geometry((w, h), box, size, resize)
    tl = choose_target_layer(model, tuple(size), layer)
    # the blob sits on the cell second from the bottom-right corner, where a plain stretch of the map over the
    # input misplaces cells most for unpadded convolutions (inception_v3)
    inside = [r for r in range(tl.grid.shape[0]) if g.content[1] < tl.grid.cell_centre(r, 0)[0]
              < g.content[1] + g.content[3]]  # rows centred on the page, not on a letterbox bar
    i, j = inside[-1], tl.grid.shape[1] - 2
    v, u = tl.grid.cell_centre(i, j)
    # to page pixels without the geometry under test: where preprocess puts a black crop, then the box
    dark = preprocess(Image.new("RGB", (w, h), (0, 0, 0)), box, size, resize, "nearest").numpy()[0] < 128
    rows, cols = np.nonzero(dark)
    cl, ct, cw, ch = cols.min(), rows.min(), cols.max() + 1 - cols.min(), rows.max() + 1 - rows.min()
    cx, cy = box.left + (u - cl) / cw * box.width, box.top + (v - ct) / ch * box.height
    radius = 0.5 * min(tl.grid.stride) * box.height / ch  # half a cell, in page pixels
    page = Image.new("RGB", (w, h), (255, 255, 255))
    ImageDraw.Draw(page).ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(0, 0, 0))
    # mean 1, std -1: ink -> 1, paper and letterbox bars -> 0, so the dark blob is the only signal
    prep = {"size": size, "mean": [1.0] * 3, "std": [-1.0] * 3, "interpolation": "bicubic", "resize": resize,
            "crop": True, "ink": False}  # fmt: skip
    (rec,) = explain_pages(model, prep, [page], target="blob")
    assert rec.error is None and rec.crop_fallback and rec.cam_layer == layer
    assert rec.cam.shape == (h, w)
    py, px = np.unravel_index(np.argmax(rec.cam), rec.cam.shape)
    assert np.hypot(px + 0.5 - cx, py + 0.5 - cy) <= 3, (px, py, cx, cy, radius)
    # the same cell placed by a plain stretch of the map over the input lands outside the blob
    cells = np.zeros(tl.grid.shape)
    cells[i, j] = 1.0
    stretched = map_to_page(cells, FeatureGrid.stretched(tl.grid.shape, tuple(size)), g)
    sy, sx = np.unravel_index(np.argmax(stretched), (h, w))
    if arch == "inception_v3":
        assert np.hypot(sx + 0.5 - cx, sy + 0.5 - cy) > radius

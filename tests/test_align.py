"""Preprocessing version 3: the crop registered to the border line's centre (data/align.py), and version 2 kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SCALE_SIZE, scale_agreement
from PIL import Image, ImageDraw

from ecg_inception.data.align import ALIGN_PAD_MM, aligned_crop, line_centre
from ecg_inception.data.crop import CropBox, detect_grid_box
from ecg_inception.data.pages import prepare_page, preprocess_page
from ecg_inception.data.scale import CANONICAL_PX_PER_MM, measure_pitch
from ecg_inception.data.transforms import PREPROCESS_VERSION, SUPPORTED_PREPROCESS_VERSIONS, preprocess
from ecg_inception.synthetic.printout import render_page

# A box edge one or two page pixels off (what detection at another resolution gives), measured on a synthetic
# page at [128, 256]: version 2 moves the input by 1.4-2.6 (mean abs diff, 0-255), version 3 by 0.05-0.51.
MAX_SHIFTED_BOX_DIFF = 1.0


@pytest.fixture(scope="module")
def synthetic_page() -> Image.Image:
    return render_page("history_of_mi", np.random.default_rng(1), 1.0).image


def test_line_centre_is_sub_pixel_and_needs_a_line() -> None:
    x = np.arange(60) + 0.5
    for centre in (20.0, 20.3, 20.75):
        profile = 1.0 + 30.0 * np.exp(-0.5 * ((x - centre) / 0.8) ** 2) + 4.0 * np.exp(-0.5 * ((x - centre - 4) / 0.5) ** 2)
        assert line_centre(profile, 20.0, 3.0) == pytest.approx(centre, abs=0.05)
    assert line_centre(np.ones(60), 20.0, 3.0) is None  # flat: no line
    profile = np.ones(60)
    profile[40] = 30.0
    assert line_centre(profile, 20.0, 3.0) is None  # a line outside the window is not taken


def test_box_a_pixel_off_gives_the_same_input_in_version_3_only(synthetic_page: Image.Image) -> None:
    """The bug: an edge of the integer box 1-2 px off moved the whole input (v2); v3 registers it to the line."""
    box = detect_grid_box(synthetic_page)
    assert not box.fallback
    diffs: dict[int, list[float]] = {2: [], 3: []}
    for version in (2, 3):
        ref = preprocess(synthetic_page, box, SCALE_SIZE, ink=True, version=version).float()
        for d in ((0, 0, 2, 2), (0, 0, -2, -2), (1, 1, 0, 0), (-2, -1, 1, 2)):
            moved = CropBox(box.left + d[0], box.top + d[1], box.right + d[2], box.bottom + d[3])
            out = preprocess(synthetic_page, moved, SCALE_SIZE, ink=True, version=version).float()
            diffs[version].append(scale_agreement(out, ref)[0])
    assert max(diffs[3]) <= MAX_SHIFTED_BOX_DIFF, diffs
    assert min(diffs[2]) > MAX_SHIFTED_BOX_DIFF, diffs  # what version 2 still does (old checkpoints)


@pytest.mark.parametrize("scale", [0.5, 1.5])
def test_aligned_box_is_the_same_in_millimetres_at_any_scale(scale: float) -> None:
    ref_page = render_page("normal", np.random.default_rng(3), 1.0).image
    page = render_page("normal", np.random.default_rng(3), scale).image
    boxes = []
    for img in (ref_page, page):
        crop = aligned_crop(img, detect_grid_box(img))
        assert all(crop.aligned)
        px_per_mm = measure_pitch(img, detect_grid_box(img)).px_per_mm
        boxes.append(np.array(crop.page_box) / px_per_mm)
    np.testing.assert_allclose(boxes[1], boxes[0], atol=0.15)  # millimetres


def test_content_box_sits_pad_outside_the_border_line(synthetic_page: Image.Image) -> None:
    crop = aligned_crop(synthetic_page, detect_grid_box(synthetic_page))
    left, top, right, bottom = crop.box
    red = np.asarray(crop.image, np.float32)
    redness = np.clip(red[..., 0] - np.maximum(red[..., 1], red[..., 2]), 0, None)
    pad = ALIGN_PAD_MM * CANONICAL_PX_PER_MM
    column = int(left + pad)  # the border line's centre pixel
    assert redness[int(top) + 10 : int(bottom) - 10, column].mean() > 3 * redness[int(top) + 10 : int(bottom) - 10].mean()


def test_versions_and_fallback_boxes(synthetic_page: Image.Image) -> None:
    assert PREPROCESS_VERSION == 3 and SUPPORTED_PREPROCESS_VERSIONS == (2, 3)
    fallback = CropBox(60, 270, 2180, 1515, fallback=True)  # a fixed box: no line to align to
    a = preprocess(synthetic_page, fallback, SCALE_SIZE, ink=True, version=2)
    b = preprocess(synthetic_page, fallback, SCALE_SIZE, ink=True, version=3)
    assert bool((a == b).all()) and int(a.min()) < 100
    assert bool((preprocess(synthetic_page, None, 64, version=2) == preprocess(synthetic_page, None, 64)).all())
    with pytest.raises(ValueError, match="unknown preprocessing version 1"):
        preprocess(synthetic_page, None, 64, version=1)


@pytest.mark.parametrize("resize", ["squash", "letterbox"])
def test_version_3_on_a_page_without_a_border_line_keeps_the_box(resize: str) -> None:
    """No red line in reach: every edge stays where the integer box put it (a black frame, as in the geometry test)."""
    page = Image.new("RGB", (500, 300), (255, 255, 255))
    box = CropBox(40, 30, 460, 280)
    draw = ImageDraw.Draw(page)
    draw.rectangle([box.left, box.top, box.right - 1, box.bottom - 1], outline=(0, 0, 0), width=3)
    draw.line([(60, 50), (440, 260)], fill=(20, 20, 20), width=2)
    crop = aligned_crop(page, box)
    assert crop.aligned == (False, False, False, False)
    np.testing.assert_allclose(crop.page_box, box.as_list(), atol=1e-6)
    a = preprocess(page, box, [64, 96], resize, version=2).float()
    b = preprocess(page, box, [64, 96], resize, version=3).float()
    # Same framing; only the outermost pixels differ (v3 resamples the crop with its margin, v2 without): 1.0
    # squash, 0.96 letterbox measured. A one-pixel shift of the frame would be several times that.
    assert float(a.min()) < 100 and float((a - b).abs().mean()) <= 1.5


def test_page_preprocessing_follows_the_records_version(synthetic_page: Image.Image) -> None:
    """The Predictor's path (`preprocess_page`) applies the checkpoint's version, not the library's newest."""
    prep = {"size": SCALE_SIZE, "ink": True, "crop": True, "resize": "squash", "interpolation": "bicubic"}
    box = detect_grid_box(synthetic_page)
    moved = CropBox(box.left, box.top, box.right + 2, box.bottom + 2)
    outputs = {}
    for version in (2, 3):
        outputs[version], used = preprocess_page(synthetic_page, {**prep, "version": version}, moved)
        assert used == moved
        assert torch.equal(outputs[version], preprocess(synthetic_page, moved, SCALE_SIZE, ink=True, version=version))
    assert not torch.equal(outputs[2], outputs[3])


@pytest.mark.parametrize("resize", ["squash", "letterbox"])
def test_explain_geometry_follows_the_aligned_box(synthetic_page: Image.Image, resize: str) -> None:
    """The heat-map geometry of a version-3 input maps the border line's centre where preprocess drew it."""
    from ecg_inception.inference.geometry import input_geometry

    box = detect_grid_box(synthetic_page)
    crop = aligned_crop(synthetic_page, box)
    size = [128, 256]
    prep = {"size": size, "ink": False, "crop": True, "resize": resize, "interpolation": "bicubic"}
    prepared, used = prepare_page(synthetic_page, prep, box)
    assert used == box and prepared.page_region == crop.page_box
    assert prepared.content_size == (crop.box[2] - crop.box[0], crop.box[3] - crop.box[1])
    g = input_geometry(synthetic_page.size, box, size, resize, prepared.content_size, prepared.page_region)
    out = preprocess(synthetic_page, box, size, resize).numpy().astype(np.float32)
    assert torch.equal(prepared.image, torch.from_numpy(out.astype(np.uint8)))
    redness = np.clip(out[0] - np.maximum(out[1], out[2]), 0, None)
    left, top, width, height = g.content
    # The border line's centre sits ALIGN_PAD_MM inside the content's left edge, in page and in input.
    pad_page = ALIGN_PAD_MM * measure_pitch(synthetic_page, box).px_per_mm
    u, _ = g.page_to_input(np.array([crop.page_box[0] + pad_page]), np.array([crop.page_box[1]]))
    rows = slice(int(top) + 4, int(top + height) - 4)
    column_red = redness[rows].mean(axis=0)
    peak = int(np.argmax(column_red[int(left) : int(left) + 4])) + int(left)
    assert abs(float(u[0]) - (peak + 0.5)) <= 0.75
    x, _ = g.input_to_page(np.array([left, left + width]), np.array([top, top]))
    np.testing.assert_allclose(x, [crop.page_box[0], crop.page_box[2]], atol=1e-6)


def test_version_2_region_is_the_clipped_box_at_the_canonical_scale(synthetic_page: Image.Image) -> None:
    """Version 2 (and any fallback box) reads the clipped integer box, resampled to the canonical scale."""
    box = detect_grid_box(synthetic_page)
    wide = CropBox(box.left - 5000, box.top, box.right, box.bottom)  # clipped to the page's left edge
    prep = {"size": [64, 128], "ink": False, "crop": True, "resize": "letterbox", "interpolation": "bicubic",
            "version": 2}  # fmt: skip
    prepared, _ = prepare_page(synthetic_page, prep, wide)
    assert prepared.page_region == (0.0, float(box.top), float(box.right), float(box.bottom))
    px_per_mm = measure_pitch(synthetic_page.crop((0, box.top, box.right, box.bottom))).px_per_mm
    width, height = prepared.content_size
    assert width == pytest.approx(box.right * CANONICAL_PX_PER_MM / px_per_mm, rel=0.01)
    assert height == pytest.approx((box.bottom - box.top) * CANONICAL_PX_PER_MM / px_per_mm, rel=0.01)
    no_crop, used = prepare_page(synthetic_page, {**prep, "crop": False})
    assert used is None and no_crop.page_region == (0.0, 0.0, *map(float, synthetic_page.size))

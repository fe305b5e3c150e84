"""Grid-box detection on real dev pages, upscaled copies, synthetic pages and non-ECG images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ecg_inception.data.crop import (
    FALLBACK_FRACTIONS,
    CropBox,
    detect_grid_box,
    fallback_box,
    has_header,
    redness,
)
from ecg_inception.data.labels import CANONICAL_LABELS

DEV_BOX = (34, 141, 1088, 759)  # measured outer border of the dev copies (right/bottom exclusive)
DEV_SAMPLES = ("MI(101).jpg", "PMI(1).jpg", "HB(49).jpg", "Normal(1).jpg", "Normal(230).jpg")


def dev_image(dev_root: Path, name: str) -> Image.Image:
    (path,) = dev_root.glob(f"*/{name}")
    with Image.open(path) as img:
        return img.convert("RGB")


def assert_close(box: CropBox, expected: tuple[int, int, int, int], tol: float) -> None:
    diff = [abs(a - b) for a, b in zip(box.as_list(), expected, strict=True)]
    assert max(diff) <= tol, f"{box} vs {expected}"


# --- fallback --------------------------------------------------------------------------------------


def test_fallback_box_is_fractional_and_flagged() -> None:
    box = fallback_box(1106, 786)
    assert box.fallback
    assert_close(box, DEV_BOX, 2)
    big = fallback_box(2213, 1572)
    assert_close(
        big, tuple(round(f * s) for f, s in zip(FALLBACK_FRACTIONS, (2213, 1572, 2213, 1572), strict=True)), 1
    )
    with pytest.raises(ValueError):
        fallback_box(0, 10)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("RGB", (1106, 786), "white"),
        lambda: Image.new("RGB", (1106, 786), (220, 60, 60)),  # solid red: no grid lines
        lambda: Image.fromarray(np.random.default_rng(0).integers(0, 256, (786, 1106, 3), dtype=np.uint8)),
        lambda: Image.new("RGB", (8, 8), "white"),
    ],
    ids=["blank", "solid-red", "noise", "tiny"],
)
def test_non_ecg_images_fall_back(make) -> None:
    img = make()
    box = detect_grid_box(img)
    assert box.fallback
    assert box == CropBox(0, 0, *img.size, fallback=True)  # no header found: the whole image


def test_a_single_red_line_is_not_a_grid() -> None:
    img = Image.new("RGB", (1106, 786), "white")
    img.paste((230, 150, 150), (30, 400, 1080, 403))
    assert detect_grid_box(img).fallback


def test_drawn_border_is_found_in_any_mode() -> None:
    img = Image.new("RGB", (800, 600), "white")
    for x0, y0, x1, y1 in (
        (50, 100, 750, 102),
        (50, 548, 750, 550),
        (50, 100, 52, 550),
        (748, 100, 750, 550),
    ):
        img.paste((235, 160, 170), (x0, y0, x1, y1))
    assert detect_grid_box(img) == CropBox(50, 100, 750, 550, fallback=False)
    assert detect_grid_box(img.convert("RGBA")) == CropBox(50, 100, 750, 550, fallback=False)


def test_cropbox_helpers() -> None:
    box = CropBox(10, 20, 110, 70)
    assert (box.width, box.height, box.fallback) == (100, 50, False)
    assert box.scaled(2).as_list() == [20, 40, 220, 140]
    assert box.crop(Image.new("RGB", (200, 100))).size == (100, 50)


# --- synthetic pages (printout renderer of this package) -----------------------------------------


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_synthetic_pages(scale: float) -> None:
    from ecg_inception.synthetic.generate import image_rng
    from ecg_inception.synthetic.printout import render_page

    for k, label in enumerate(CANONICAL_LABELS):
        page = render_page(label, image_rng(7, label, k), scale)
        box = detect_grid_box(page.image)
        assert not box.fallback
        # a rotated page's grid spans a few more rows/columns than the unrotated box
        drift = abs(np.tan(np.radians(page.angle))) * page.image.width / 2
        assert_close(box, page.grid_box, 3 * scale + drift + 1)


# --- the real dev set ----------------------------------------------------------------------------


@pytest.mark.devset
@pytest.mark.parametrize("name", DEV_SAMPLES)
def test_dev_pages_crop_to_the_outer_border(dev_root: Path, name: str) -> None:
    img = dev_image(dev_root, name)
    box = detect_grid_box(img)
    assert not box.fallback
    assert_close(box, DEV_BOX, 2)
    crop = np.asarray(box.crop(img))
    grey = np.asarray(box.crop(img).convert("L"))
    header = np.asarray(img.convert("L"))[: box.top]
    assert (header < 100).mean() > 0.02  # the header above holds black text ...
    assert (grey[:12] < 100).mean() < 0.01  # ... the crop's top rows do not
    assert redness(Image.fromarray(crop[:3])).mean() > 15  # they are the pink border
    assert (np.asarray(img.convert("L"))[box.bottom :] < 100).mean() > 0.005  # footer text cut off


@pytest.mark.devset
@pytest.mark.parametrize("name", DEV_SAMPLES[:3])
def test_dev_pages_upscaled_2x(dev_root: Path, name: str) -> None:
    img = dev_image(dev_root, name)
    small = detect_grid_box(img)
    big = detect_grid_box(img.resize((img.width * 2, img.height * 2), Image.Resampling.BICUBIC))
    assert not big.fallback
    assert_close(big, tuple(2 * v for v in small.as_list()), 3)


@pytest.mark.devset
def test_dev_page_reencoded_and_rescaled(dev_root: Path) -> None:
    img = dev_image(dev_root, DEV_SAMPLES[1])
    for scale, quality in ((0.7, 60), (1.5, 60), (1.0, 40)):
        resized = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        resized.save(buf, "JPEG", quality=quality)
        with Image.open(buf) as copy:
            box = detect_grid_box(copy.convert("RGB"))
        assert not box.fallback
        assert_close(box, tuple(scale * v for v in DEV_BOX), 3)


@pytest.mark.devset
def test_dev_page_already_cropped_to_its_grid(dev_root: Path) -> None:
    img = dev_image(dev_root, DEV_SAMPLES[0]).crop((30, 135, 1092, 765))  # the border plus a few px
    box = detect_grid_box(img)
    assert not box.fallback
    assert_close(box, (4, 6, 1058, 624), 2)
    assert detect_grid_box(img.convert("L")).fallback  # no colour, no grid: a fallback


@pytest.mark.devset
def test_fallback_keeps_a_grid_only_page_whole(dev_root: Path) -> None:
    """Issue 10 item 10: no grid found on a page that is only the grid must not cut its top off."""
    page = dev_image(dev_root, DEV_SAMPLES[0])
    grid_only = page.crop(DEV_BOX).convert("L")  # a user's crop, and no colour: detection fails
    box = detect_grid_box(grid_only)
    assert box.fallback and not has_header(grid_only)
    assert box == CropBox(0, 0, *grid_only.size, fallback=True)
    # with the printer's header still on the page, the fixed box cuts the header off as before
    whole = detect_grid_box(page.convert("L"))
    assert has_header(page) and whole == fallback_box(*page.size)
    assert_close(whole, DEV_BOX, 2)

"""Page-level scanner augmentation: draws, the crop box carried along, config checks, and the training split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ecg_inception.data.crop import CropBox, detect_grid_box
from ecg_inception.data.datamodule import EcgDataModule
from ecg_inception.data.page_augment import PageAugment
from ecg_inception.data.pages import preprocess_page
from ecg_inception.errors import ConfigValueError

SIZE = 75


def _page(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8), "RGB")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_rescale_carries_the_box_and_keeps_it_inside_the_page() -> None:
    page, box = _page(), CropBox(10, 20, 190, 110)
    half, half_box = PageAugment(scale=(0.5, 0.5), jpeg_p=0.0)(page, box, _gen(0))
    assert half.size == (100, 60) and half.mode == "RGB" and half_box == CropBox(5, 10, 95, 55)
    double, double_box = PageAugment(scale=(2.0, 2.0), jpeg_p=0.0)(page, CropBox(0, 0, 200, 120, True), _gen(0))
    assert double.size == (400, 240) and double_box == CropBox(0, 0, 400, 240, True)  # fallback kept
    same, same_box = PageAugment(scale=(1.0, 1.0), jpeg_p=0.0)(page, None, _gen(0))
    assert same_box is None and np.array_equal(np.asarray(same), np.asarray(page))
    for seed in range(20):  # rounding never pushes the box past the page
        out, moved = PageAugment(scale=(0.1, 4.0), jpeg_p=0.0)(page, CropBox(3, 3, 200, 120), _gen(seed))
        assert 0 <= moved.left < moved.right <= out.width and 0 <= moved.top < moved.bottom <= out.height


def test_jpeg_reencoding_and_repeatable_draws() -> None:
    page = _page()
    jpeg, _ = PageAugment(scale=(1.0, 1.0), jpeg_quality=(10, 10), jpeg_p=1.0)(page, None, _gen(0))
    assert jpeg.size == page.size and jpeg.mode == "RGB"
    assert not np.array_equal(np.asarray(jpeg), np.asarray(page))
    aug = PageAugment()
    a, b = aug(page, None, _gen(7)), aug(page, None, _gen(7))
    assert a[0].size == b[0].size and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert len({aug(page, None, _gen(seed))[0].size for seed in range(8)}) > 1  # the scale is drawn
    torch.manual_seed(3)
    first = aug(page)[0]
    torch.manual_seed(3)
    assert np.array_equal(np.asarray(aug(page)[0]), np.asarray(first))  # torch's global RNG by default


@pytest.mark.parametrize(("value", "match"), [
    ({"scale": [1.5, 0.5]}, "page_augment.scale"),
    ({"scale": [0.01, 1.0]}, "page_augment.scale"),
    ({"scale": 2}, "page_augment.scale"),
    ({"jpeg_quality": [0, 90]}, "page_augment.jpeg_quality"),
    ({"jpeg_p": 1.5}, "page_augment.jpeg_p"),
    ({"rotate": 5}, "unknown key"),
    ("yes", "expected null or a mapping"),
])  # fmt: skip
def test_bad_settings_are_refused_by_name(value: object, match: str) -> None:
    with pytest.raises(ConfigValueError, match=match):
        PageAugment.from_config(value)


def test_config_round_trip() -> None:
    assert PageAugment.from_config(None) is None
    aug = PageAugment.from_config({"scale": [0.7, 1.2]})
    assert aug == PageAugment(scale=(0.7, 1.2)) and PageAugment.from_config(aug) is aug
    assert PageAugment.from_config(aug.as_dict()) == aug


def test_an_augmented_synthetic_page_meets_the_model_at_the_same_size(synthetic_root: Path) -> None:
    """Preprocessing resamples by the grid pitch, so a rescaled, re-encoded page keeps its crop and size."""
    path = sorted(synthetic_root.rglob("*.jpg"))[0]
    page = Image.open(path).convert("RGB")
    prep = {"crop": True, "size": [64, 128], "resize": "squash", "interpolation": "bicubic", "ink": True}
    plain, _ = preprocess_page(page, prep, detect_grid_box(page))
    for seed in range(3):
        drawn, box = PageAugment()(page, detect_grid_box(page), _gen(seed))
        out, _ = preprocess_page(drawn, prep, box)
        assert out.shape == plain.shape == (3, 64, 128) and out.dtype == torch.uint8
        # Measured: 0.9-4.8 for draws (the low end of the scale blurs most), 20.7 for another page, 44.7 for a
        # box moved by 40 x 30 px.
        assert (out.float() - plain.float()).abs().mean() < 10


def test_the_training_split_is_redrawn_and_the_others_are_not(synthetic_root: Path, tmp_path: Path) -> None:
    common = dict(root=str(synthetic_root), image_size=SIZE, batch_size=4, num_workers=0, cache_dir=str(tmp_path),
                  augment_kind="none")
    dm = EcgDataModule(**common, page_augment={"scale": [0.5, 1.5], "jpeg_p": 1.0})
    dm.setup("fit")
    train, val = dm.dataset("train"), dm.dataset("val")
    assert isinstance(train.page_augment, PageAugment) and val.page_augment is None and dm.dataset("test").page_augment is None
    torch.manual_seed(0)
    draws = [train[0][0] for _ in range(3)]
    assert all(d.shape == (3, SIZE, SIZE) for d in draws)
    assert not all(torch.equal(draws[0], d) for d in draws[1:])  # a new draw per fetch, not a cached tensor
    assert torch.equal(val[0][0], val[0][0])
    # Warming the decoded cache (distributed fits) skips the training split, which never reads from it.
    caches = {split: dm.dataset(split).cache for split in ("train", "val", "test")}  # one per split
    before = {split: c.stats().lookups for split, c in caches.items()}
    assert dm.warm_decoded_cache() == len(val) + len(dm.dataset("test"))
    after = {split: c.stats().lookups for split, c in caches.items()}
    assert after["train"] == before["train"] == 0
    assert after["val"] - before["val"] == len(val) and after["test"] - before["test"] == len(dm.dataset("test"))
    off = EcgDataModule(**common, augment=False, page_augment={"scale": [0.5, 1.5]})
    off.setup("fit")
    assert off.dataset("train").page_augment is None  # augment=false turns every augmentation off
    with pytest.raises(ConfigValueError, match="page_augment.jpeg_p"):
        EcgDataModule(**common, page_augment={"jpeg_p": -1})

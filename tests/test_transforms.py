"""timm data config, crop/resize preprocessing, ECG-safe augmentation and normalisation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from ecg_inception.data.crop import CropBox
from ecg_inception.data.transforms import (
    JpegNoise,
    Normalize,
    RandomShift,
    build_train_augment,
    ink_image,
    ink_thickening,
    normalize,
    parse_image_size,
    preprocess,
    resolve_data_config,
    size_value,
)


def _walk(t: object) -> list[object]:
    """Every transform inside Compose / RandomApply containers."""
    inner = getattr(t, "transforms", None)
    if inner is None:
        return [t]
    return [t] + [x for child in inner for x in _walk(child)]


def test_inception_v3_config() -> None:
    cfg = resolve_data_config("inception_v3")
    assert (cfg.size, cfg.interpolation) == ((299, 299), "bicubic")
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5)
    assert resolve_data_config("inception_v3", image_size=96).size == (96, 96)
    wide = resolve_data_config("inception_v3", image_size=[128, 256])
    assert wide.size == (128, 256) and (wide.height, wide.width) == (128, 256)
    assert resolve_data_config("resnet18").mean[0] == pytest.approx(0.485)
    with pytest.raises(ValueError, match="no pretrained config"):
        resolve_data_config("no_such_model_xyz")


@pytest.mark.parametrize(
    ("value", "expected"), [(96, (96, 96)), ([128, 256], (128, 256)), ((75, 80), (75, 80))]
)
def test_parse_image_size(value: object, expected: tuple[int, int]) -> None:
    assert parse_image_size(value) == expected  # type: ignore[arg-type]
    assert size_value(expected) == (expected[0] if expected[0] == expected[1] else list(expected))


@pytest.mark.parametrize("bad", [[128], [128, 256, 3], "128x256", 0, [0, 128], [128.0, 256], True, None])
def test_parse_image_size_rejects_bad_values(bad: object) -> None:
    with pytest.raises(ValueError, match="image_size") as err:
        parse_image_size(bad)  # type: ignore[arg-type]
    assert repr(bad) in str(err.value)
    with pytest.raises(ValueError, match="at least 8 pixels"):
        resolve_data_config("inception_v3", image_size=[4, 128])


def _page(w: int = 200, h: int = 100) -> Image.Image:
    """A gray page with a black block in the top-left corner."""
    img = Image.new("RGB", (w, h), (128, 128, 128))
    img.paste((0, 0, 0), (0, 0, 50, 25))
    return img


def test_preprocess_squash_crop_and_dtype() -> None:
    out = preprocess(_page(), None, 64)
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
    # squash: the block (a quarter of the width, a quarter of the height) keeps those fractions
    assert out[:, :14, :14].max() < 20 and out[:, 20:, 20:].min() > 100
    cropped = preprocess(_page(), CropBox(50, 25, 200, 100), 32)  # the black block cropped away
    assert cropped.min() > 100


def test_preprocess_non_square_is_height_by_width() -> None:
    out = preprocess(_page(200, 100), None, [32, 64])
    assert out.shape == (3, 32, 64)
    # the page's aspect (2:1) matches the target: the black block is 16 x 8 px, nothing stretched
    assert out[:, :6, :14].max() < 20 and out[:, 10:, 18:].min() > 100
    bars = preprocess(_page(200, 100), None, [64, 64], resize="letterbox")
    exact = preprocess(_page(200, 100), None, [32, 64], resize="letterbox")
    assert (bars[:, :15] == 255).all() and not (exact[:, :2] == 255).all()  # same aspect: no white bars
    assert torch.equal(exact, out)


def test_letterbox_keeps_aspect_with_white_bars() -> None:
    out = preprocess(_page(200, 100), None, 64, resize="letterbox")
    assert out.shape == (3, 64, 64)
    assert (out[:, :15, :] == 255).all() and (out[:, -15:, :] == 255).all()  # white bars top and bottom
    middle = out[:, 17:47, :]
    assert (middle[:, :, 30:] - 128).abs().max() < 8  # the gray page fills the full width
    assert middle[:, :6, :12].max() < 20  # black block: 1/4 of the width, 1/4 of the height
    tall = preprocess(_page(50, 100), None, 40, resize="letterbox")
    assert (tall[:, :, :8] == 255).all() and (tall[:, :, -8:] == 255).all()


def _grid_page(w: int = 400, h: int = 200) -> Image.Image:
    """White paper, a pink grid line every 20 px, one thin black trace line across the middle."""
    img = Image.new("RGB", (w, h), (255, 255, 255))
    for x in range(0, w, 20):
        img.paste((240, 170, 180), (x, 0, x + 2, h))
    for y in range(0, h, 20):
        img.paste((240, 170, 180), (0, y, w, y + 2))
    img.paste((20, 20, 20), (0, h // 2 + 5, w, h // 2 + 6))
    return img


def test_ink_removes_the_grid_and_keeps_the_trace() -> None:
    page = _grid_page()
    ink = ink_image(page)
    assert ink.mode == "RGB" and ink.size == page.size
    assert ink.getpixel((10, 10)) == (255, 255, 255)  # paper stays white
    assert ink.getpixel((0, 10)) == (255, 255, 255)  # pink grid turns white
    r, g, b = ink.getpixel((10, 105))
    assert r == g == b < 40  # the black trace stays dark, grey on all channels
    thick = ink_image(page, thicken=3)
    # one pixel wider on each side
    assert thick.getpixel((10, 104))[0] < 40 and thick.getpixel((10, 106))[0] < 40
    with pytest.raises(ValueError, match="odd"):
        ink_image(page, thicken=2)
    assert ink_thickening(1100, 780, 160) == 3 and ink_thickening(200, 100, 160) == 1
    # non-square: the smaller downscale of the two axes decides (1054/256 = 4.1 beats 618/128 = 4.8)
    assert ink_thickening(1054, 618, [128, 256]) == 3 and ink_thickening(2108, 1236, [128, 256]) == 5
    assert ink_thickening(1054, 618, [128, 256], resize="letterbox") == 3


def test_preprocess_ink_option() -> None:
    page = _grid_page()
    plain, ink = preprocess(page, None, 40), preprocess(page, None, 40, ink=True)
    assert ink.shape == plain.shape == (3, 40, 40) and ink.dtype == torch.uint8
    assert torch.equal(ink[0], ink[1]) and torch.equal(ink[1], ink[2])
    assert not torch.equal(plain[0], plain[1])  # without ink the grid keeps its colour
    # the trace row is darker with ink (grid gone, line thickened before the 10x downscale)
    assert ink[0, 20].float().mean() < plain[0, 20].float().mean()
    assert ink[0, :15].float().mean() > 250  # grid-only rows are white


def test_preprocess_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="resize"):
        preprocess(_page(), None, 32, resize="crop")
    with pytest.raises(ValueError, match="leaves nothing"):
        preprocess(_page(), CropBox(300, 0, 400, 50), 32)


def _half_dark(size: int = 64) -> torch.Tensor:
    img = torch.full((3, size, size), 230, dtype=torch.uint8)
    img[:, :, : size // 2] = 0
    return img


@pytest.mark.parametrize("kind", ["ecg", "shift", "paper"])
def test_augmentation_never_flips(kind: str) -> None:
    augment = build_train_augment(kind)
    assert not any(isinstance(t, v2.RandomHorizontalFlip | v2.RandomVerticalFlip) for t in _walk(augment))
    torch.manual_seed(0)
    img = _half_dark()
    for _ in range(25):
        out = augment(img)
        assert out.shape == img.shape and out.dtype == torch.uint8
        left, right = out[:, :, :32].float().mean(), out[:, :, 32:].float().mean()
        assert left + 10 < right


def test_augmentation_changes_the_image_and_none_is_identity() -> None:
    img = _half_dark()
    torch.manual_seed(1)
    assert any(not torch.equal(build_train_augment("ecg")(img), img) for _ in range(5))
    assert torch.equal(build_train_augment("none")(img), img)
    with pytest.raises(ValueError, match="augment kind"):
        build_train_augment("flip")


def test_paper_augmentation_rotates_up_to_20_degrees_and_shifts_20_percent() -> None:
    affines = [t for t in _walk(build_train_augment("paper")) if isinstance(t, v2.RandomAffine)]
    assert len(affines) == 1
    assert list(affines[0].degrees) == [-20.0, 20.0] and tuple(affines[0].translate) == (0.2, 0.2)
    ecg = [t for t in _walk(build_train_augment("ecg")) if isinstance(t, v2.RandomAffine)]
    assert list(ecg[0].degrees) == [-3.0, 3.0]
    assert any(isinstance(t, JpegNoise) for t in _walk(build_train_augment("ecg")))
    # fill is white: a blank white page stays white under any affine move
    torch.manual_seed(2)
    white = torch.full((3, 48, 48), 255, dtype=torch.uint8)
    assert torch.equal(build_train_augment("paper")(white), white)


def test_jpeg_noise_keeps_shape_and_adds_artefacts() -> None:
    torch.manual_seed(3)
    img = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    out = JpegNoise((10, 20))(img)
    assert out.shape == img.shape and out.dtype == torch.uint8 and not torch.equal(out, img)
    assert (out.float() - img.float()).abs().mean() < 100
    with pytest.raises(ValueError):
        JpegNoise((0, 200))


def test_normalize_rescales_then_standardises() -> None:
    img = torch.tensor([0, 255, 51], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2).contiguous()
    out = normalize(img, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert out.dtype == torch.float32
    assert out[:, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 51 / 255 * 2 - 1])
    batch = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(img.unsqueeze(0))
    assert batch.shape == (1, 3, 2, 2)
    with pytest.raises(TypeError):
        normalize(img.float(), (0.5,) * 3, (0.5,) * 3)


def test_shift_moves_whole_pixels_only_with_white_fill() -> None:
    torch.manual_seed(0)
    img = torch.randint(0, 200, (3, 50, 50), dtype=torch.uint8)  # no pure white: the fill is recognisable
    shift = build_train_augment("shift")
    moved = 0
    for _ in range(20):
        out = shift(img)
        rows = (out != 255).any(dim=0).any(dim=1).nonzero().flatten()
        cols = (out != 255).any(dim=0).any(dim=0).nonzero().flatten()
        top, left = int(rows[0]), int(cols[0])
        dy = top if top > 0 else -(50 - 1 - int(rows[-1]))
        dx = left if left > 0 else -(50 - 1 - int(cols[-1]))
        assert abs(dy) <= 2 and abs(dx) <= 2  # 4 % of 50 px
        expected = torch.full_like(img, 255)
        expected[:, max(dy, 0):50 + min(dy, 0), max(dx, 0):50 + min(dx, 0)] = img[
            :, max(-dy, 0):50 + min(-dy, 0), max(-dx, 0):50 + min(-dx, 0)
        ]
        assert torch.equal(out, expected)  # every pixel is a copy or white: nothing resampled
        moved += (dy, dx) != (0, 0)
    assert moved > 10
    with pytest.raises(ValueError, match="fraction"):
        RandomShift(0.6)


def test_shift_with_its_own_generator_repeats_and_leaves_the_global_rng() -> None:
    img = torch.randint(0, 200, (3, 50, 50), dtype=torch.uint8)
    runs = []
    for _ in range(2):
        shift = RandomShift(0.1, generator=torch.Generator().manual_seed(3))
        before = torch.get_rng_state()
        runs.append([shift(img) for _ in range(5)])
        assert torch.equal(before, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    assert len({tuple(out.flatten()[:200].tolist()) for out in runs[0]}) > 1  # it does move

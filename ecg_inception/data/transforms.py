"""Preprocessing (crop, resize) and train augmentation for ECG printouts, on uint8 tensors.

The model's input size, interpolation and normalisation come from timm's pretrained config so that
training, evaluation and prediction all see what the backbone was pretrained on. Augmentations never
flip: a horizontal flip reverses time and a vertical one inverts the waveforms.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from ecg_inception.data.crop import CropBox

RESIZE_MODES = ("squash", "letterbox")
AUGMENT_KINDS = ("ecg", "shift", "paper", "none")
WHITE = 255  # the paper background: fill for letterbox bars and affine borders
# Ink: the red channel keeps the black trace dark and the pink/red grid light (R >= 217 on the dev set);
# levels below this cutoff are ink, the same cutoff as the duplicate hash (data/duplicates.py).
INK_CUTOFF = 200
_INK_LUT = [min(WHITE, round(v * WHITE / INK_CUTOFF)) for v in range(256)]

_PIL_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
INTERPOLATIONS = tuple(_PIL_INTERPOLATION)  # the names `preprocess` accepts


MIN_IMAGE_SIZE = 8  # smallest model input side resolve_data_config accepts
#: An input size: one int (square) or [height, width], as `data.image_size` takes it.
SizeSpec = int | Sequence[int]


def parse_image_size(value: SizeSpec, minimum: int = 1) -> tuple[int, int]:
    """`data.image_size` -> (height, width): an int is a square, a pair is [height, width] (timm's order).

    A non-square size keeps more of the 10 s time axis than a square squash of the same pixel count.
    Both sides must be at least `minimum` pixels.
    """
    if isinstance(value, bool):
        raise ValueError(f"image_size must be an int or [height, width], got {value!r}")
    if isinstance(value, (int, np.integer)):
        pair: list[Any] = [value, value]
    elif isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"image_size must be an int or [height, width], got {value!r}")
    else:
        pair = list(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"image_size must be an int or [height, width] of two ints, got {value!r}")
    height, width = int(pair[0]), int(pair[1])
    if min(height, width) < minimum:
        raise ValueError(f"image_size must be at least {minimum} pixels on each side, got {value!r}")
    return height, width


def size_value(size: tuple[int, int]) -> int | list[int]:
    """(height, width) -> the plain value configs and checkpoints store: an int when square, else [h, w]."""
    height, width = size
    return height if height == width else [height, width]


@dataclass(frozen=True)
class DataConfig:
    """Input size as (height, width), normalisation and resize interpolation of a timm model."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    @property
    def height(self) -> int:
        return self.size[0]

    @property
    def width(self) -> int:
        return self.size[1]


def resolve_data_config(
    model_name: str = "inception_v3", image_size: SizeSpec | None = None
) -> DataConfig:
    """Read a timm model's data config from its pretrained cfg (no weights built); `image_size` overrides size."""
    import timm
    import timm.data

    cfg = timm.get_pretrained_cfg(model_name)
    if cfg is None:
        raise ValueError(f"timm has no pretrained config for model {model_name!r}")
    resolved = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())
    default = [int(v) for v in resolved["input_size"][-2:]]
    size = parse_image_size(image_size if image_size is not None else default, minimum=MIN_IMAGE_SIZE)
    interpolation = str(resolved.get("interpolation") or "bicubic")
    if interpolation not in _PIL_INTERPOLATION:
        interpolation = "bicubic"
    mean = tuple(float(m) for m in resolved["mean"])
    std = tuple(float(s) for s in resolved["std"])
    return DataConfig(size, mean, std, interpolation)  # type: ignore[arg-type]


def ink_image(img: Image.Image, thicken: int = 1) -> Image.Image:
    """Drop the pink/red grid and keep the trace: grey = min(255, R * 255 / INK_CUTOFF), on all 3 channels.

    Black ink stays dark, the grid (R >= INK_CUTOFF) turns paper-white, antialiased edges scale linearly.
    `thicken` (odd) widens the ink with a `thicken` x `thicken` minimum filter, so that a thin trace keeps
    its contrast through a large downscale instead of averaging out to a faint grey line.
    """
    if thicken < 1 or thicken % 2 == 0:
        raise ValueError(f"thicken must be a positive odd number, got {thicken}")
    img = img.convert("RGB") if img.mode != "RGB" else img
    grey = img.getchannel("R").point(_INK_LUT)
    if thicken > 1:
        grey = grey.filter(ImageFilter.MinFilter(thicken))
    return Image.merge("RGB", (grey, grey, grey))


def ink_thickening(width: int, height: int, size: SizeSpec, resize: str = "squash") -> int:
    """Minimum-filter size for `ink_image` before resizing a width x height image to `size`: about half the
    downscale factor (the smaller of the two axes' for squash, the letterbox scale otherwise), odd, 1 (none)
    below a factor of 2."""
    out_h, out_w = parse_image_size(size)
    ratios = (width / out_w, height / out_h)
    factor = min(ratios) if resize == "squash" else max(ratios)
    return max(1, int(factor / 2)) | 1


def preprocess(
    img: Image.Image,
    box: CropBox | None,
    size: SizeSpec,
    resize: str = "squash",
    interpolation: str = "bicubic",
    ink: bool = False,
) -> torch.Tensor:
    """Crop to `box` (None: whole page), optionally map to ink (`ink_image`, trace thickened by about half the
    downscale factor), resize to uint8 [3, height, width] (`size`: an int for a square, or [height, width]).

    `squash` stretches to the target shape as the paper did; `letterbox` keeps the aspect ratio and pads with
    white.
    """
    out_h, out_w = parse_image_size(size)
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; expected one of {', '.join(RESIZE_MODES)}")
    if interpolation not in _PIL_INTERPOLATION:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; expected one of {', '.join(_PIL_INTERPOLATION)}"
        )
    img = img.convert("RGB") if img.mode != "RGB" else img
    if box is not None:
        left, top = max(0, box.left), max(0, box.top)
        right, bottom = min(img.width, box.right), min(img.height, box.bottom)
        if right - left < 2 or bottom - top < 2:
            raise ValueError(f"crop box {box} leaves nothing of a {img.width}x{img.height} image")
        img = img.crop((left, top, right, bottom))
    if ink:
        img = ink_image(img, ink_thickening(img.width, img.height, (out_h, out_w), resize))
    method = _PIL_INTERPOLATION[interpolation]
    if resize == "squash":
        out = img.resize((out_w, out_h), method)
    else:
        scale = min(out_w / img.width, out_h / img.height)
        w = min(out_w, max(1, round(img.width * scale)))
        h = min(out_h, max(1, round(img.height * scale)))
        out = Image.new("RGB", (out_w, out_h), (WHITE, WHITE, WHITE))
        out.paste(img.resize((w, h), method), ((out_w - w) // 2, (out_h - h) // 2))
    return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class JpegNoise(torch.nn.Module):
    """Re-encode a uint8 [3, H, W] image as JPEG at a random quality: scanner and compression noise.

    Uses Pillow rather than `v2.JPEG`, whose torchvision.io codec is deprecated since torchvision 0.29.
    """

    def __init__(self, quality: tuple[int, int] = (50, 95)) -> None:
        super().__init__()
        if not 1 <= quality[0] <= quality[1] <= 100:
            raise ValueError(f"JPEG quality range must lie in 1..100, got {quality}")
        self.quality = (int(quality[0]), int(quality[1]))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        q = int(torch.randint(self.quality[0], self.quality[1] + 1, ()).item())
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=q)
        buf.seek(0)
        with Image.open(buf) as dec:
            out = np.asarray(dec.convert("RGB"), dtype=np.uint8).copy()
        return torch.from_numpy(out).permute(2, 0, 1).contiguous()


class RandomShift(torch.nn.Module):
    """Move a uint8 [3, H, W] image by a whole number of pixels (up to `fraction` of each side), white fill.

    Whole-pixel moves resample nothing: at small input sizes a 1-2 px trace stays as sharp as in evaluation,
    where a rotation or sub-pixel shift would blur it. `generator`: the random stream to draw from (None: the
    global one, as every other augmentation here).
    """

    def __init__(self, fraction: float = 0.04, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 0.0 <= fraction < 0.5:
            raise ValueError(f"shift fraction must lie in [0, 0.5), got {fraction}")
        self.fraction = float(fraction)
        self.generator = generator

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        my, mx = int(h * self.fraction), int(w * self.fraction)
        dy = int(torch.randint(-my, my + 1, (), generator=self.generator).item()) if my else 0
        dx = int(torch.randint(-mx, mx + 1, (), generator=self.generator).item()) if mx else 0
        out = torch.full_like(img, WHITE)
        out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[
            ..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)
        ]
        return out


def build_train_augment(kind: str = "ecg") -> Callable[[torch.Tensor], torch.Tensor]:
    """Random train augmentation on uint8 [3, H, W] tensors; nothing here ever flips.

    - `ecg`: ECG-safe: rotation up to 3 degrees, shift up to 4 %, scale 0.95-1.05, slight perspective,
      brightness/contrast, occasional Gaussian blur and JPEG re-encoding (scanner and compression noise).
    - `shift`: whole-pixel moves up to 4 % only (`RandomShift`): nothing is resampled, so thin traces stay
      sharp at small sizes (from scratch at 160 px, `ecg` kept the model from fitting at all).
    - `paper`: the seed code's augmentation (rotation up to 20 degrees, width/height shift up to 0.2)
      WITHOUT its horizontal flip, which would reverse time on an ECG.
    - `none`: identity.
    Borders uncovered by affine moves are filled with white, like paper.
    """
    if kind == "none":
        return v2.Identity()
    if kind == "shift":
        return RandomShift(0.04)
    if kind == "paper":
        return v2.Compose([v2.RandomAffine(degrees=20, translate=(0.2, 0.2), fill=WHITE)])
    if kind == "ecg":
        return v2.Compose(
            [
                v2.RandomAffine(
                    degrees=3,
                    translate=(0.04, 0.04),
                    scale=(0.95, 1.05),
                    interpolation=InterpolationMode.BILINEAR,
                    fill=WHITE,
                ),
                v2.RandomPerspective(distortion_scale=0.05, p=0.3, fill=WHITE),
                v2.ColorJitter(brightness=0.15, contrast=0.15),
                v2.RandomApply([v2.GaussianBlur(kernel_size=3, sigma=(0.1, 0.8))], p=0.2),
                v2.RandomApply([JpegNoise((50, 95))], p=0.3),
            ]
        )
    raise ValueError(f"unknown augment kind {kind!r}; expected one of {', '.join(AUGMENT_KINDS)}")


class Normalize:
    """uint8 [3, H, W] -> float: rescale by 1/255 (as the seed code did), then (x - mean) / std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(3, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 image tensor, got {img.dtype}")
        return (img.float() / 255.0 - self.mean) / self.std


def normalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalise one uint8 image tensor to float with the model's mean and std."""
    return Normalize(mean, std)(img)

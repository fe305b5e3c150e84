"""Preprocessing (crop, resize) and train augmentation for ECG printouts, on uint8 tensors.

The model's input size, interpolation and normalisation come from timm's pretrained config so that
training, evaluation and prediction all see what the backbone was pretrained on. Augmentations never
flip: a horizontal flip reverses time and a vertical one inverts the waveforms.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class DataConfig:
    """Input size (square), normalisation and resize interpolation of a timm model."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


def resolve_data_config(model_name: str = "inception_v3", image_size: int | None = None) -> DataConfig:
    """Read a timm model's data config from its pretrained cfg (no weights built); `image_size` overrides size."""
    import timm
    import timm.data

    cfg = timm.get_pretrained_cfg(model_name)
    if cfg is None:
        raise ValueError(f"timm has no pretrained config for model {model_name!r}")
    resolved = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())
    size = int(image_size) if image_size is not None else int(resolved["input_size"][-1])
    if size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {size}")
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


def ink_thickening(width: int, height: int, size: int, resize: str = "squash") -> int:
    """Minimum-filter size for `ink_image` before resizing a width x height image to `size`: about half the
    downscale factor, odd, 1 (none) below a factor of 2."""
    fit = min(width, height) if resize == "squash" else max(width, height)
    return max(1, int(fit / size / 2)) | 1


def preprocess(
    img: Image.Image,
    box: CropBox | None,
    size: int,
    resize: str = "squash",
    interpolation: str = "bicubic",
    ink: bool = False,
) -> torch.Tensor:
    """Crop to `box` (None: whole page), optionally map to ink (`ink_image`, trace thickened by about half the
    downscale factor), resize to uint8 [3, size, size].

    `squash` stretches to a square as the paper did; `letterbox` keeps the aspect ratio and pads with white.
    """
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
        img = ink_image(img, ink_thickening(img.width, img.height, size, resize))
    method = _PIL_INTERPOLATION[interpolation]
    if resize == "squash":
        out = img.resize((size, size), method)
    else:
        scale = size / max(img.width, img.height)
        w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        out = Image.new("RGB", (size, size), (WHITE, WHITE, WHITE))
        out.paste(img.resize((w, h), method), ((size - w) // 2, (size - h) // 2))
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
    where a rotation or sub-pixel shift would blur it.
    """

    def __init__(self, fraction: float = 0.04) -> None:
        super().__init__()
        if not 0.0 <= fraction < 0.5:
            raise ValueError(f"shift fraction must lie in [0, 0.5), got {fraction}")
        self.fraction = float(fraction)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        my, mx = int(h * self.fraction), int(w * self.fraction)
        dy = int(torch.randint(-my, my + 1, ()).item()) if my else 0
        dx = int(torch.randint(-mx, mx + 1, ()).item()) if mx else 0
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

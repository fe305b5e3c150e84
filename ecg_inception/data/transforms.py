"""Preprocessing (crop, resize) and train augmentation for ECG printouts, on uint8 tensors.

The model's input size, interpolation and normalisation come from timm's pretrained config so that
training, evaluation and prediction all see what the backbone was pretrained on. Augmentations never
flip: a horizontal flip reverses time and a vertical one inverts the waveforms.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec

import numpy as np
import torch
from PIL import Image, ImageChops, ImageFilter
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from ecg_inception.core.sizes import SizeSpec, parse_image_size, size_value  # noqa: F401 - re-exported
from ecg_inception.data.align import Box, aligned_crop
from ecg_inception.data.crop import CropBox
from ecg_inception.data.scale import CANONICAL_PX_PER_MM, GridPitch, measure_pitch, to_canonical
from ecg_inception.errors import ConfigValueError

P = ParamSpec("P")
RESIZE_MODES = ("squash", "letterbox")
AUGMENT_KINDS = ("ecg", "shift", "paper", "none")
WHITE = 255  # the paper background: fill for letterbox bars and affine borders
#: Version of what `preprocess` does; checkpoints store it (see `check_preprocessing_version`).
#: 1: crop, ink from the red channel at a fixed cutoff, kernels in output pixels (up to 0.1.x).
#: 2: crop, grid pitch -> resample to CANONICAL_PX_PER_MM, ink by colour with a per-page Otsu cutoff.
#: 3: as 2, with the content box on the border line's centre to a fraction of a pixel (`align.aligned_crop`).
PREPROCESS_VERSION = 3
#: Versions `preprocess` reproduces: a checkpoint of either is preprocessed its own way.
SUPPORTED_PREPROCESS_VERSIONS = (2, 3)
CANONICAL_MM_TEXT = f"{CANONICAL_PX_PER_MM:g} px/mm"
# Ink: value = max(R, G, B) keeps the dark, unsaturated trace dark and any light or saturated grid colour
# (pink, red, orange: max channel >= ~215) light. The cutoff between them is Otsu's threshold of the page's
# own value histogram (real pages 144-148, synthetic pages 149-160 at canonical scale), kept in this range
# so that a page with no trace at all cannot turn its grid into ink.
INK_CUTOFF_RANGE = (96, 208)

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


def otsu_threshold(levels: np.ndarray) -> int:
    """Otsu's threshold of a uint8 array: the level t that best separates values < t from values >= t."""
    hist = np.bincount(np.asarray(levels, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        raise ValueError("cannot threshold an empty image")
    p = hist / total
    omega = np.cumsum(p)[:-1]  # share of values <= k, for a split between k and k + 1
    mu = np.cumsum(p * np.arange(256))[:-1]
    between = np.zeros_like(omega)
    valid = (omega > 0) & (omega < 1)
    mean_all = float((p * np.arange(256)).sum())
    between[valid] = (mean_all * omega[valid] - mu[valid]) ** 2 / (omega[valid] * (1 - omega[valid]))
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    # Where the histogram has a gap the criterion is flat across it: take the middle of the gap.
    return int(round((best[0] + best[-1]) / 2)) + 1


def ink_cutoff(img: Image.Image) -> int:
    """Per-page ink cutoff: Otsu's threshold of max(R, G, B), clipped to `INK_CUTOFF_RANGE`."""
    value = np.asarray(_value_channel(img))
    lo, hi = INK_CUTOFF_RANGE  # the same as ink_image(cutoff=None)
    return int(np.clip(otsu_threshold(value), lo, hi))


def _value_channel(img: Image.Image) -> Image.Image:
    """max(R, G, B) of an RGB image as an "L" image: dark only where every channel is dark."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    r, g, b = img.split()
    return ImageChops.lighter(ImageChops.lighter(r, g), b)


def ink_image(img: Image.Image, thicken: int = 1, cutoff: int | None = None) -> Image.Image:
    """Drop the grid by colour and keep the trace: grey = min(255, V * 255 / cutoff) with V = max(R, G, B).

    The dark, unsaturated trace stays dark; the pink/red/orange grid, light everywhere in its strongest
    channel, turns paper-white; antialiased edges scale linearly. `cutoff` None: the page's own
    `ink_cutoff` (Otsu). `thicken` (odd) widens the ink with a `thicken` x `thicken` minimum filter, so that a
    thin trace keeps its contrast through a large downscale instead of averaging out to a faint grey line.
    """
    if thicken < 1 or thicken % 2 == 0:
        raise ValueError(f"thicken must be a positive odd number, got {thicken}")
    value = _value_channel(img)
    if cutoff is None:
        lo, hi = INK_CUTOFF_RANGE
        cutoff = int(np.clip(otsu_threshold(np.asarray(value)), lo, hi))  # = ink_cutoff(img)
    if not 1 <= cutoff <= WHITE:
        raise ValueError(f"ink cutoff must lie in 1..255, got {cutoff}")
    grey = value.point([min(WHITE, round(v * WHITE / cutoff)) for v in range(256)])
    if thicken > 1:
        grey = grey.filter(ImageFilter.MinFilter(thicken))
    return Image.merge("RGB", (grey, grey, grey))


def ink_thickening(width: int, height: int, size: SizeSpec, resize: str = "squash") -> int:
    """Minimum-filter size for `ink_image` before resizing a width x height image to `size`: about half the
    downscale factor (the smaller of the two axes' for squash, the letterbox scale otherwise), odd, 1 (none)
    below a factor of 2.

    `preprocess` applies it at `scale.CANONICAL_PX_PER_MM`, so the kernel is a width in millimetres (3 px =
    0.75 mm for the Mendeley grid box at [128, 256]) and the same for a page at any scan resolution.
    """
    out_h, out_w = parse_image_size(size)
    ratios = (width / out_w, height / out_h)
    factor = min(ratios) if resize == "squash" else max(ratios)
    return max(1, int(factor / 2)) | 1


@dataclass(frozen=True)
class ModelInput:
    """One page's model input and the page region it was read from.

    Attributes:
        image: The uint8 input [3, height, width].
        page_region: (left, top, right, bottom) in page pixels, continuous coordinates, of what the final resize
            read: the border-registered box (version 3) or the clipped crop box (version 2, the whole page
            without a box). A heat map of `image` maps back onto this region.
        content_size: (width, height) of that region at the canonical scale, as the final resize saw it.
    """

    image: torch.Tensor
    page_region: Box
    content_size: tuple[float, float]


def preprocess_input(
    img: Image.Image,
    box: CropBox | None,
    size: SizeSpec,
    resize: str = "squash",
    interpolation: str = "bicubic",
    ink: bool = False,
    pitch: GridPitch | None = None,
    version: int = PREPROCESS_VERSION,
) -> ModelInput:
    """The model input of one page, with the page region it was read from.

    1. Crop to `box` (None: the whole page).
    2. Resample the crop to `scale.CANONICAL_PX_PER_MM` from its grid pitch (`pitch`, None: measured here with
       `scale.measure_pitch`, falling back to the box size), so every later step sees millimetres, not pixels.
       Version 3 (a box that is not a fallback) takes a margin around the box and places the content box on
       the border line's centre (`align.aligned_crop`), so the border lands on the same spot at any resolution.
    3. With `ink`, remove the grid by colour with a per-page cutoff and thicken the trace (`ink_image`,
       `ink_thickening`).
    4. Resize the content box to `size` (an int for a square, or [height, width]): `squash` stretches to the
       target shape as the paper did; `letterbox` keeps the aspect ratio and pads with white.

    Args:
        img: The decoded page.
        box: Its grid box in page pixels (None: no crop).
        size: The model input size.
        resize: `squash` or `letterbox`.
        interpolation: The final resize's filter (one of `INTERPOLATIONS`).
        ink: Remove the grid and thicken the trace.
        pitch: The crop's grid pitch (None: measured).
        version: The preprocessing version to reproduce (one of `SUPPORTED_PREPROCESS_VERSIONS`).

    Returns:
        The `ModelInput`: the uint8 tensor, the page region read and its size at the canonical scale.

    Raises:
        ValueError: An unknown resize mode, interpolation or version, or a box that leaves nothing of the page.
    """
    out_h, out_w = parse_image_size(size)
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; expected one of {', '.join(RESIZE_MODES)}")
    if interpolation not in _PIL_INTERPOLATION:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; expected one of {', '.join(_PIL_INTERPOLATION)}"
        )
    if version not in SUPPORTED_PREPROCESS_VERSIONS:
        raise ValueError(f"unknown preprocessing version {version!r}; expected one of {SUPPORTED_PREPROCESS_VERSIONS}")
    img = img.convert("RGB") if img.mode != "RGB" else img
    if version >= 3 and box is not None and not box.fallback:
        aligned = aligned_crop(img, box, pitch)
        img, content, region = aligned.image, aligned.box, aligned.page_box
    else:
        left, top, right, bottom = 0, 0, img.width, img.height
        if box is not None:
            left, top = max(0, box.left), max(0, box.top)
            right, bottom = min(img.width, box.right), min(img.height, box.bottom)
            if right - left < 2 or bottom - top < 2:
                raise ValueError(f"crop box {box} leaves nothing of a {img.width}x{img.height} image")
            img = img.crop((left, top, right, bottom))
        region = (float(left), float(top), float(right), float(bottom))
        img = to_canonical(img, pitch if pitch is not None else measure_pitch(img))
        content = (0.0, 0.0, float(img.width), float(img.height))
    src_w, src_h = content[2] - content[0], content[3] - content[1]
    if ink:
        img = ink_image(img, ink_thickening(round(src_w), round(src_h), (out_h, out_w), resize))
    method = _PIL_INTERPOLATION[interpolation]
    if resize == "squash":
        out = img.resize((out_w, out_h), method, box=content)
    else:
        scale = min(out_w / src_w, out_h / src_h)
        w = min(out_w, max(1, round(src_w * scale)))
        h = min(out_h, max(1, round(src_h * scale)))
        out = Image.new("RGB", (out_w, out_h), (WHITE, WHITE, WHITE))
        out.paste(img.resize((w, h), method, box=content), ((out_w - w) // 2, (out_h - h) // 2))
    image = torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    return ModelInput(image, region, (src_w, src_h))


def _image_only(fn: Callable[P, ModelInput]) -> Callable[P, torch.Tensor]:
    """`fn` with the same (typed) arguments, returning only the `image` of its `ModelInput`."""

    @functools.wraps(fn)
    def image_only(*args: P.args, **kwargs: P.kwargs) -> torch.Tensor:
        return fn(*args, **kwargs).image

    return image_only


#: The model input of one page, uint8 [3, height, width]: `preprocess_input(...).image`, with its arguments.
preprocess = _image_only(preprocess_input)
preprocess.__name__ = preprocess.__qualname__ = "preprocess"
preprocess.__doc__ = "The model input of one page, uint8 [3, height, width]: `preprocess_input(...).image`."


_RECORD_KEYS = frozenset({"resize", "crop", "ink", "interpolation"})  # what every datamodule record has


def check_preprocessing_version(preprocessing: dict[str, Any] | None, source: str) -> None:
    """Refuse a checkpoint whose stored preprocessing is not one of `SUPPORTED_PREPROCESS_VERSIONS`.

    Args:
        preprocessing: the checkpoint's `hyper_parameters.preprocessing` (None: nothing stored, accepted).
        source: what it came from (a checkpoint path), named in the error.

    Raises:
        ConfigValueError: the version differs, or is missing from a full record (a checkpoint made before
            versioning, i.e. version 1).
    """
    if not preprocessing:
        return
    if "version" not in preprocessing and not set(preprocessing) & _RECORD_KEYS:
        return  # a partial dict (a size only, say) is not a record of how a run preprocessed
    version = preprocessing.get("version", 1)
    if version not in SUPPORTED_PREPROCESS_VERSIONS:
        raise ConfigValueError(
            f"{source}: trained with preprocessing version {version!r}, this library reproduces versions "
            f"{', '.join(map(str, SUPPORTED_PREPROCESS_VERSIONS))} (grid pitch -> {CANONICAL_MM_TEXT}, ink by "
            "colour). Its predictions would not mean what they say: retrain it, or use the ecg_inception release "
            "that trained it."
        )


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

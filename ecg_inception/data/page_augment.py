"""Scanner augmentation of the whole page for training: random rescaling and JPEG re-encoding of the decoded file,
before preprocessing (crop, grid pitch -> canonical px/mm, ink, resize).

A printout reaches users at whatever resolution and compression their scanner chose. Since preprocessing
version 2 every page is resampled to a canonical pixels-per-millimetre from its own grid pitch, so a rescaled
page meets the model at the same size; what changes is what resampling and compression leave behind (blur,
ringing, 8 x 8 blocks). Drawing them during training teaches the model to ignore them. Nothing here flips,
rotates or shifts: the page's geometry is untouched, and the crop box is carried to the new size.

The draws come from torch's RNG (or a given generator), so Lightning's seeding makes them repeatable. A page
drawn this way cannot come from the decoded cache, which holds one tensor per file: the training split is
decoded and preprocessed again every epoch, and the trunk cache does not apply (`models.trunk.plan_trunk_cache`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from PIL import Image

from ecg_inception.data.crop import CropBox
from ecg_inception.errors import ConfigValueError

#: The widest rescaling accepted: beyond it a page is either a thumbnail or mostly interpolation.
SCALE_LIMITS = (0.1, 4.0)


@dataclass(frozen=True)
class PageAugment:
    """Random rescale (always) and JPEG re-encoding (with probability `jpeg_p`) of a decoded page.

    Args:
        scale: (low, high): the page is resized by a factor drawn uniformly from it (Lanczos when shrinking,
            bicubic when enlarging, as a scanner's driver would).
        jpeg_quality: (low, high), inclusive: the JPEG quality drawn when the page is re-encoded.
        jpeg_p: probability that the rescaled page is re-encoded as JPEG.

    Raises:
        ConfigValueError: a range out of order or outside its limits, or a probability outside [0, 1].
    """

    scale: tuple[float, float] = (0.5, 1.5)
    jpeg_quality: tuple[int, int] = (40, 95)
    jpeg_p: float = 0.5

    def __post_init__(self) -> None:
        scale = _pair(self.scale, "page_augment.scale", float)
        quality = _pair(self.jpeg_quality, "page_augment.jpeg_quality", int)
        if not SCALE_LIMITS[0] <= scale[0] <= scale[1] <= SCALE_LIMITS[1]:
            raise ConfigValueError(f"page_augment.scale={list(scale)}: expected low <= high within {list(SCALE_LIMITS)}")
        if not 1 <= quality[0] <= quality[1] <= 100:
            raise ConfigValueError(f"page_augment.jpeg_quality={list(quality)}: expected 1 <= low <= high <= 100")
        if not 0.0 <= float(self.jpeg_p) <= 1.0:
            raise ConfigValueError(f"page_augment.jpeg_p={self.jpeg_p}: expected a probability in [0, 1]")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "jpeg_quality", quality)
        object.__setattr__(self, "jpeg_p", float(self.jpeg_p))

    @classmethod
    def from_config(cls, value: Mapping[str, Any] | PageAugment | None) -> PageAugment | None:
        """`data.page_augment` -> a PageAugment (None stays None; missing keys take the defaults).

        Raises:
            ConfigValueError: an unknown key or a bad value (named).
        """
        if value is None or isinstance(value, PageAugment):
            return value
        if not isinstance(value, Mapping):
            raise ConfigValueError(f"page_augment={value!r}: expected null or a mapping of "
                                   f"{[f.name for f in fields(cls)]}")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(value) - known):
            raise ConfigValueError(f"page_augment: unknown key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**dict(value))

    def as_dict(self) -> dict[str, Any]:
        """The config mapping `{scale, jpeg_quality, jpeg_p}` that `from_config` reads back."""
        return {"scale": list(self.scale), "jpeg_quality": list(self.jpeg_quality), "jpeg_p": self.jpeg_p}

    def __call__(self, page: Image.Image, box: CropBox | None = None,
                 generator: torch.Generator | None = None) -> tuple[Image.Image, CropBox | None]:
        """One draw: the rescaled (and maybe re-encoded) RGB page and `box` carried to its pixels.

        Args:
            page: The decoded page.
            box: Its crop box in the page's pixels (None: no crop).
            generator: The random source (None: torch's global RNG).

        Returns:
            The new page and its crop box (clamped to the new page).
        """
        u = torch.rand(3, generator=generator).tolist()
        factor = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        out = rescale_page(page, factor)
        width, height = out.size
        if u[1] < self.jpeg_p:
            low, high = self.jpeg_quality
            quality = low + min(high - low, int(u[2] * (high - low + 1)))
            buffer = io.BytesIO()
            out.save(buffer, format="JPEG", quality=quality)
            buffer.seek(0)
            with Image.open(buffer) as reread:
                out = reread.convert("RGB")
        if box is None:
            return out, None
        moved = box.scaled(width / page.width, height / page.height)
        clamped = CropBox(max(0, moved.left), max(0, moved.top), min(width, max(moved.right, moved.left + 1)),
                          min(height, max(moved.bottom, moved.top + 1)), moved.fallback)
        return out, clamped


def rescale_page(page: Image.Image, factor: float) -> Image.Image:
    """The RGB page resized by `factor` (each side rounded, at least 1 px): Lanczos down, bicubic up.

    Args:
        page: The decoded page.
        factor: The scale; a page whose rounded size does not change is returned as it is (in RGB).

    Returns:
        The rescaled RGB page.
    """
    width, height = max(1, round(page.width * factor)), max(1, round(page.height * factor))
    out = page if page.mode == "RGB" else page.convert("RGB")
    if (width, height) == out.size:
        return out
    return out.resize((width, height), Image.Resampling.LANCZOS if factor < 1 else Image.Resampling.BICUBIC)


def _pair(value: Any, name: str, kind: type) -> tuple[Any, Any]:
    try:
        low, high = value
        return kind(low), kind(high)
    except (TypeError, ValueError):
        raise ConfigValueError(f"{name}={value!r}: expected [low, high]") from None

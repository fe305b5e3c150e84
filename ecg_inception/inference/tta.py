"""Test-time augmentation: a few ECG-safe views of a preprocessed page, made by whole-pixel shifts only.

The centre view is the preprocessed page itself, untouched; the others move it by `TTA_SHIFT` of its shorter
side (at least 1 px) left, right, up and down, filling with paper white, as `data.transforms.RandomShift`
does in training. Nothing is flipped (a flip reverses time or inverts the waveforms) and nothing is
resampled, so a thin trace stays as sharp as in the centre view.
"""

from __future__ import annotations

import torch

from ecg_inception.data.transforms import WHITE

TTA_SHIFT = 0.02  # share of the shorter side


def shift_image(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`img` ([..., H, W], uint8) moved by (dy, dx) whole pixels; uncovered borders are white."""
    h, w = img.shape[-2:]
    out = torch.full_like(img, WHITE)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[
        ..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)
    ]
    return out


def tta_offsets(height: int, width: int, fraction: float = TTA_SHIFT) -> list[tuple[int, int]]:
    """(dy, dx) of the views: (0, 0) first (the centre view), then right, left, down, up."""
    d = max(1, round(fraction * min(height, width)))
    return [(0, 0), (0, d), (0, -d), (d, 0), (-d, 0)]


def tta_views(images: torch.Tensor, fraction: float = TTA_SHIFT) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> [V, N, 3, H, W]; view 0 is `images` itself, bit for bit."""
    h, w = images.shape[-2:]
    return torch.stack([images if (dy, dx) == (0, 0) else shift_image(images, dy, dx)
                        for dy, dx in tta_offsets(h, w, fraction)])

"""Model input sizes: `data.image_size` values (an int or [height, width]) <-> (height, width)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

#: An input size: one int (square) or [height, width], as `data.image_size` takes it.
SizeSpec = int | Sequence[int]


def parse_image_size(value: SizeSpec, minimum: int = 1) -> tuple[int, int]:
    """`data.image_size` -> (height, width): an int is a square, a pair is [height, width] (timm's order).

    A non-square size keeps more of the 10 s time axis than a square squash of the same pixel count.
    Both sides must be at least `minimum` pixels.

    Raises:
        ValueError: not an int or a pair of ints, or a side below `minimum` (the value is named).
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

"""Grid-box detection: crop the printed header and footer away, keep the ECG grid."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CropBox:
    """A box in pixels of the original file; `fallback` is True when detection failed."""

    left: int
    top: int
    right: int
    bottom: int
    fallback: bool = False

    def as_list(self) -> list[int]:
        return [self.left, self.top, self.right, self.bottom]

# CONTRACT (filled in by the data-audit helper): detect_grid_box(img: PIL.Image.Image) -> CropBox

"""EXIF orientation: the shared decode step turns phone photos upright, for the audit, datasets and prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ecg_inception.data.audit import inspect_image
from ecg_inception.data.scan import EXIF_ORIENTATION, open_rgb


def _tagged(tmp_path: Path, orientation: int) -> tuple[Path, Image.Image]:
    """A 60 x 40 JPEG whose left third is black, stored with the given EXIF orientation."""
    arr = np.full((40, 60, 3), 255, np.uint8)
    arr[:, :20] = 0
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    img.save(path, quality=95, exif=exif)
    return path, img


def test_open_rgb_applies_exif_orientation(tmp_path: Path) -> None:
    path, _ = _tagged(tmp_path, 6)  # 6: the stored image must be turned 90 degrees clockwise
    img = open_rgb(path)
    assert img.size == (40, 60)
    arr = np.asarray(img).mean(axis=2)
    assert arr[:18].mean() < 40 and arr[22:].mean() > 215  # the black band is now at the top
    assert inspect_image(str(path))[1][:2] == (40, 60)  # the audit sees the same upright page


def test_upright_files_are_unchanged(tmp_path: Path) -> None:
    path, original = _tagged(tmp_path, 1)
    img = open_rgb(path)
    assert img.size == original.size
    assert np.abs(np.asarray(img, np.int16) - np.asarray(original, np.int16)).max() < 20

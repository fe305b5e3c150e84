"""One page -> the model's uint8 input: the step `EcgImageDataset` applies to every file of a split, shared with
prediction, which meets pages outside any manifest (and so detects their crop box itself).

The version of that preprocessing, which checkpoints and export sidecars carry, is
`transforms.PREPROCESS_VERSION`; `check_preprocessing` refuses any the code cannot reproduce
(`transforms.SUPPORTED_PREPROCESS_VERSIONS`), and a checkpoint's own version is the one applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ecg_inception.core.plain import from_omegaconf
from ecg_inception.data.cache import PreprocessSettings
from ecg_inception.data.crop import CropBox, detect_grid_box
from ecg_inception.data.transforms import (
    PREPROCESS_VERSION,
    ModelInput,
    check_preprocessing_version,
    preprocess_input,
)
from ecg_inception.errors import ConfigValueError

#: Keys a checkpoint's `preprocessing` dict must hold for prediction outside the training data.
PREPROCESSING_KEYS = ("size", "mean", "std", "interpolation", "resize", "crop")


def check_preprocessing(preprocessing: Mapping[str, Any] | None, source: str | Path) -> dict[str, Any]:
    """A checkpoint's (or export sidecar's) `preprocessing` dict, checked: every key present, a known version.

    Args:
        preprocessing: The stored dict (None when the file has none).
        source: The file it came from, named in errors.

    Returns:
        A plain copy of the dict.

    Raises:
        ConfigValueError: A key is missing or the version is not one this code can reproduce.
    """
    prep = dict(from_omegaconf(preprocessing) or {})
    missing = [k for k in PREPROCESSING_KEYS if k not in prep]
    if missing:
        raise ConfigValueError(f"{source}: the stored preprocessing lacks {missing} (has {sorted(prep)})")
    check_preprocessing_version(prep, source)
    return prep


def preprocess_with(img: Image.Image, settings: PreprocessSettings) -> torch.Tensor:
    """One decoded page -> uint8 [3, H, W] under `settings`: the single step training, eval and prediction share."""
    return preprocess_input_with(img, settings).image


def preprocess_input_with(img: Image.Image, settings: PreprocessSettings) -> ModelInput:
    """`preprocess_with`, keeping the page region the input was read from (for mapping heat maps back)."""
    s = settings
    return preprocess_input(img, s.box, s.size, s.resize, s.interpolation, s.ink, version=s.version)


def prepare_page(
    img: Image.Image, preprocessing: Mapping[str, Any], box: CropBox | None = None
) -> tuple[ModelInput, CropBox | None]:
    """A page outside any manifest (prediction) -> (its `ModelInput`, the crop box used or None).

    With crop on and no `box`, the box is detected as the audit detects it for the training split
    (`detect_grid_box` on the decoded page); then the page goes through `preprocess_input_with`, as
    `EcgImageDataset` sends every file of a split.

    Args:
        img: The decoded page (`data.scan.open_rgb` or any PIL image).
        preprocessing: A checkpoint's `preprocessing` dict (see `check_preprocessing`).
        box: A known crop box (None: detect it).

    Returns:
        The model input with the page region it was read from, and the crop box (None when crop is off).
    """
    crop = bool(preprocessing["crop"])
    if crop and box is None:
        box = detect_grid_box(img if img.mode == "RGB" else img.convert("RGB"))
    settings = PreprocessSettings(
        preprocessing["size"], str(preprocessing["resize"]), str(preprocessing["interpolation"]), crop,
        box if crop else None, bool(preprocessing.get("ink", False)),
        int(preprocessing.get("version", PREPROCESS_VERSION)),
    )  # fmt: skip
    return preprocess_input_with(img, settings), (box if crop else None)


def preprocess_page(
    img: Image.Image, preprocessing: Mapping[str, Any], box: CropBox | None = None
) -> tuple[torch.Tensor, CropBox | None]:
    """`prepare_page` without the region: (uint8 [3, H, W], the crop box used or None).

    Args:
        img: The decoded page (`data.scan.open_rgb` or any PIL image).
        preprocessing: A checkpoint's `preprocessing` dict (see `check_preprocessing`).
        box: A known crop box (None: detect it).

    Returns:
        The preprocessed uint8 image and the crop box (None when crop is off).
    """
    prepared, used = prepare_page(img, preprocessing, box)
    return prepared.image, used

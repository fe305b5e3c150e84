"""Write a synthetic dataset laid out exactly like the Mendeley one, planted duplicates included.

The output has only the class folders, named as in Mendeley, holding ``MI(1).jpg``-style files, so the code path
that reads the real data reads this too. Every image draws from its own generator seeded by (seed, class, index):
the same seed gives byte-identical files, and image k of a class is the same whatever `per_class` is. Planted
duplicates are byte copies of originals under new names, like the real set's ``MI(k) == MI(k+30)``.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ecg_inception.data.labels import CANONICAL_LABELS, MENDELEY_FOLDERS, MENDELEY_PREFIXES
from ecg_inception.synthetic.printout import render_printout

_IMAGE_STREAM = 0
_DUPLICATE_STREAM = 1


def image_rng(seed: int, label: str, index: int) -> np.random.Generator:
    """The generator of image `index` (0-based) of class `label`; independent of every other image."""
    return np.random.default_rng([seed, CANONICAL_LABELS.index(label), _IMAGE_STREAM, index])


def encode_jpeg(label: str, rng: np.random.Generator, scale: float, quality: int) -> bytes:
    """Render one page and encode it as baseline JPEG (deterministic bytes for a given generator state)."""
    buffer = io.BytesIO()
    render_printout(label, rng, scale).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _check_args(
    per_class: int, seed: int, duplicates: int, scale: float, labels: Sequence[str], quality: int
) -> None:
    def is_int(v: object) -> bool:
        return isinstance(v, int | np.integer) and not isinstance(v, bool)

    if not is_int(per_class) or per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1, got {per_class!r}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not is_int(duplicates) or not 0 <= duplicates <= per_class:
        raise ValueError(
            f"duplicates must be an integer in [0, per_class={per_class}] (copies of distinct originals), "
            f"got {duplicates!r}"
        )
    if not isinstance(scale, int | float) or not 0.1 < scale <= 4.0:
        raise ValueError(f"scale must be a number in (0.1, 4], got {scale!r}")
    if not is_int(quality) or not 1 <= quality <= 95:
        raise ValueError(f"quality must be an integer JPEG quality in [1, 95], got {quality!r}")
    if isinstance(labels, str):
        raise ValueError(f"labels must be a sequence of labels, not the string {labels!r}")
    unknown = [label for label in labels if label not in CANONICAL_LABELS]
    if unknown:
        raise ValueError(f"unknown label(s) {unknown}; expected some of {', '.join(CANONICAL_LABELS)}")
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be non-empty and without repeats, got {list(labels)}")


def generate_dataset(
    out_dir: str | Path,
    per_class: int,
    seed: int = 0,
    duplicates: int = 0,
    scale: float = 1.0,
    labels: Sequence[str] | None = None,
    quality: int = 90,
) -> list[Path]:
    """Write `per_class` printouts plus `duplicates` byte-identical copies per class.

    Files go to ``out_dir/<Mendeley folder>/<prefix>(<n>).jpg``: originals are numbered 1..per_class, copies
    per_class+1..per_class+duplicates (each copies a different, randomly chosen original of its class).

    Args:
        out_dir: the output folder (created if needed); its class folders must be empty or absent.
        per_class: originals per class (>= 1).
        seed: seeds every page and the choice of the copied originals; same seed, same bytes.
        duplicates: byte-identical copies per class (<= per_class).
        scale: page scale, 1.0 = 2213 x 1572 px like the Mendeley scans (in (0.1, 4]).
        labels: the classes to write; None: the four Mendeley classes.
        quality: JPEG quality (1-95).

    Returns:
        The written paths, originals and copies, class by class.

    Raises:
        ValueError: an argument out of range or an unknown label.
        FileExistsError: a class folder already holds files (stale images are refused, not mixed in).
    """
    chosen = list(CANONICAL_LABELS) if labels is None else list(labels)
    _check_args(per_class, seed, duplicates, scale, chosen, quality)
    root = Path(out_dir)
    for label in chosen:
        folder = root / MENDELEY_FOLDERS[label]
        if folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} already holds files; pick an empty output directory")
    written: list[Path] = []
    for label in chosen:
        folder = root / MENDELEY_FOLDERS[label]
        folder.mkdir(parents=True, exist_ok=True)
        prefix = MENDELEY_PREFIXES[label]
        originals = []
        for index in range(per_class):
            path = folder / f"{prefix}({index + 1}).jpg"
            path.write_bytes(encode_jpeg(label, image_rng(seed, label, index), scale, quality))
            originals.append(path)
        written.extend(originals)
        if duplicates:
            pick_rng = np.random.default_rng(
                [seed, CANONICAL_LABELS.index(label), _DUPLICATE_STREAM, per_class]
            )
            sources = pick_rng.choice(per_class, size=duplicates, replace=False)
            for k, source in enumerate(sources):
                copy = folder / f"{prefix}({per_class + k + 1}).jpg"
                shutil.copyfile(originals[int(source)], copy)
                written.append(copy)
    return written

"""EcgImageDataset: the files of one split -> (normalised float tensor [3, H, W], class index).

Each item is decoded, cropped, scaled and resized by `data.pages.preprocess_with` (the step prediction shares),
optionally through the decoded cache, then augmented (train only) and normalised. With a `PageAugment` (train
only) the decoded page is rescaled and re-encoded before preprocessing, on every fetch, never from the cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, get_worker_info

from ecg_inception.core.cpus import torch_threads
from ecg_inception.core.hashing import file_sha256
from ecg_inception.data.cache import DecodedCache, PreprocessSettings
from ecg_inception.data.manifest import ManifestRow
from ecg_inception.data.page_augment import PageAugment
from ecg_inception.data.pages import preprocess_with
from ecg_inception.data.transforms import PREPROCESS_VERSION, DataConfig, Normalize
from ecg_inception.errors import ManifestError


class EcgImageDataset(Dataset):
    """The files of one split -> (normalised float tensor [3, H, W], class index).

    Args:
        root: The folder the manifest's paths are relative to.
        rows: The split's manifest rows.
        labels: Class names; a row's label gives its index.
        config: Size, mean, std and interpolation.
        resize: `squash` or `letterbox`.
        crop: Crop to each row's grid box.
        augment: Tensor augmentation of the preprocessed uint8 image (train only).
        cache: The decoded cache (None: preprocess on every fetch).
        ink: Grid removal before resizing.
        page_augment: Scanner augmentation of the decoded page before preprocessing (train only; bypasses
            `cache`).
        version: The preprocessing version to apply (`transforms.SUPPORTED_PREPROCESS_VERSIONS`).

    Raises:
        ManifestError: A row's label is not in `labels`, or crop is on and a row has no box.
    """

    def __init__(
        self,
        root: str | Path,
        rows: Sequence[ManifestRow],
        labels: Sequence[str],
        config: DataConfig,
        resize: str = "squash",
        crop: bool = True,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: DecodedCache | None = None,
        ink: bool = False,
        page_augment: PageAugment | None = None,
        version: int = PREPROCESS_VERSION,
    ) -> None:
        self.root = Path(root)
        self.rows = list(rows)
        self.index = {label: i for i, label in enumerate(labels)}
        self.settings: list[PreprocessSettings] = []
        for r in self.rows:
            if r.label not in self.index:
                raise ManifestError(f"{r.path}: label {r.label!r} is not one of {list(labels)}")
            if crop and r.box is None:
                raise ManifestError(f"{r.path}: crop is on but the manifest has no crop box for this file")
            box = r.box if crop else None
            settings = PreprocessSettings(config.size, resize, config.interpolation, crop, box, bool(ink), version)
            self.settings.append(settings)
        self.augment = augment
        self.page_augment = page_augment
        self.cache = cache
        self.normalize = Normalize(config.mean, config.std)

    def __len__(self) -> int:
        return len(self.rows)

    def targets(self) -> list[int]:
        """Class index of every item, in order."""
        return [self.index[r.label] for r in self.rows]

    def load_uint8(self, i: int) -> torch.Tensor:
        """Preprocessed (cropped, resized), not augmented uint8 [3, H, W] image of item `i`."""
        from ecg_inception.data.scan import open_rgb

        path, settings = self._checked_path(i), self.settings[i]

        def build() -> torch.Tensor:
            return preprocess_with(open_rgb(path), settings)

        return self.cache.get(path, settings, build) if self.cache is not None else build()

    def load_page_augmented(self, i: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Item `i` preprocessed from one `page_augment` draw of its decoded page (uint8 [3, H, W]).

        Raises:
            ValueError: The dataset has no `page_augment`.
        """
        from ecg_inception.data.scan import open_rgb

        if self.page_augment is None:
            raise ValueError("this dataset has no page_augment")
        path, settings = self._checked_path(i), self.settings[i]
        page, box = self.page_augment(open_rgb(path), settings.box if settings.crop else None, generator)
        return preprocess_with(page, dataclasses.replace(settings, box=box))

    def _checked_path(self, i: int) -> Path:
        row = self.rows[i]
        path = self.root / row.path
        if row.sha256 and file_sha256(path) != row.sha256:
            raise ManifestError(
                f"{path}: file content differs from the manifest's sha256; re-split the folder"
            )
        return path

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if get_worker_info() is not None:
            return self._item(i)
        # In the main process (num_workers=0) run on one intra-op thread, as DataLoader workers do: the
        # small per-image ops gain nothing from the pool and, on a busy machine, lose 10-50x to it. The count is
        # scoped to this item: the model's steps between items keep the process's own setting.
        with torch_threads(1):
            return self._item(i)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """A batch of items (DataLoader's batched fetch): one thread-count switch per batch, not per item."""
        if get_worker_info() is not None:
            return [self._item(i) for i in indices]
        with torch_threads(1):
            return [self._item(i) for i in indices]

    def _item(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.load_page_augmented(i) if self.page_augment is not None else self.load_uint8(i)
        if self.augment is not None:
            img = self.augment(img)
        return self.normalize(img), self.index[self.rows[i].label]

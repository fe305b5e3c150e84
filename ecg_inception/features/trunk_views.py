"""Deterministic augmented views: view v of an image is drawn with its own seed, and epoch e serves view e % V.

A trunk cache built from augmented training images can only hold a fixed number of views; these helpers make
those views reproducible (without touching any global RNG) and let the uncached path train on exactly the same
pictures in exactly the same order, for comparison. `mirror_loader` copies a loader's batching and shuffling
onto another dataset; `DelegatingDataModule` wraps an EcgDataModule and serves such loaders instead of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler


def view_seed(seed: int, view: int, content: str) -> int:
    """The generator seed of augmented view `view` of the image with content hash `content`."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{view}|{content}".encode()).digest()[:7], "little")


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without consuming torch's (CPU and CUDA), numpy's or Python's global RNG."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def draw_view(augment: Callable[[torch.Tensor], torch.Tensor], img: torch.Tensor, seed: int) -> torch.Tensor:
    """Apply a (torch-RNG driven) augmentation with its own seed, leaving the global RNG untouched."""
    with preserved_rng():
        torch.manual_seed(seed)
        return augment(img)


# ---------------------------------------------------------------------------------------------- datasets
class ViewDataset(Dataset):
    """Item `v * N + i` = view `v` of image `i` of an EcgImageDataset-like split: (normalised image, label).

    With `views` set and the split augmented, view v is the augmentation drawn with `view_seed(seed, v, sha)`:
    the same pictures the trunk cache was built from, so the uncached path can train on them for comparison.
    Without augmentation every view is the plain image.
    """

    def __init__(self, images: Any, views: int = 1, seed: int = 0) -> None:
        self.images, self.views, self.seed, self.n = images, int(views), int(seed), len(images)
        self.contents = [r.sha256 or r.path for r in images.rows]
        self.targets = images.targets()

    def __len__(self) -> int:
        return self.views * self.n

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        view, i = divmod(int(k), self.n)
        img = self.images.load_uint8(i)
        if self.images.augment is not None:
            img = draw_view(self.images.augment, img, view_seed(self.seed, view, self.contents[i]))
        return self.images.normalize(img), self.targets[i]


class EpochViewSampler(Sampler[int]):
    """Wrap the split's own sampler: index i becomes `(epoch % views) * n + i`; Lightning calls set_epoch."""

    def __init__(self, base: Sampler[int], n: int, views: int = 1) -> None:
        self.base, self.n, self.views, self.epoch = base, int(n), int(views), 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch (also forwarded to the wrapped sampler)."""
        self.epoch = int(epoch)
        if callable(getattr(self.base, "set_epoch", None)):
            self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        offset = (self.epoch % self.views) * self.n
        return (offset + int(i) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]


def mirror_loader(inner: DataLoader, dataset: Dataset, views: int = 1, **overrides: Any) -> DataLoader:
    """A DataLoader over `dataset` with the batch size, drop_last, sampler (hence shuffle order) and generator
    of `inner`; view `epoch % views` of every item is served. A dataset's own `collate` wins over inner's."""
    batches = inner.batch_sampler
    if type(batches) is not BatchSampler:
        raise ValueError(f"cannot mirror a loader with a custom batch sampler ({type(batches).__name__})")
    kwargs: dict[str, Any] = dict(num_workers=inner.num_workers, pin_memory=inner.pin_memory,
                                  persistent_workers=inner.persistent_workers,
                                  collate_fn=getattr(dataset, "collate", inner.collate_fn))
    kwargs.update(overrides)
    sampler: Sampler[int] = batches.sampler
    if views > 1 or not isinstance(sampler, DistributedSampler):  # a rank's own part stays recognisable as such
        sampler = EpochViewSampler(batches.sampler, len(inner.dataset), views)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batches.batch_size, drop_last=batches.drop_last, sampler=sampler,
                      generator=inner.generator, **kwargs)


# ------------------------------------------------------------------------------------------- datamodules
class DelegatingDataModule(L.LightningDataModule):
    """Serve other loaders for an EcgDataModule; everything else (labels, manifest, ...) is the wrapped one's."""

    def __init__(self, datamodule: Any) -> None:
        super().__init__()
        self.datamodule = datamodule

    def __getattr__(self, name: str) -> Any:
        if name == "datamodule" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.datamodule, name)

    def prepare_data(self) -> None:
        """The wrapped module's."""
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """The wrapped module's (idempotent there)."""
        self.datamodule.setup(stage)

    def teardown(self, stage: str | None = None) -> None:
        """The wrapped module's."""
        self.datamodule.teardown(stage)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped module's (what checkpoints store)."""
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The wrapped module's."""
        self.datamodule.load_state_dict(state_dict)

    def _split_of(self, inner: DataLoader) -> str:
        for name in ("train", "val", "test"):
            if self.datamodule.dataset(name) is inner.dataset:
                return name
        raise ValueError("the wrapped datamodule's loader serves none of its train/val/test datasets")

    def _serve(self, inner: DataLoader) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        """The wrapped train loader, served by `_serve`."""
        return self._serve(self.datamodule.train_dataloader())

    def val_dataloader(self) -> DataLoader:
        """The wrapped val loader, served by `_serve`."""
        return self._serve(self.datamodule.val_dataloader())

    def test_dataloader(self) -> DataLoader:
        """The wrapped test loader, served by `_serve`."""
        return self._serve(self.datamodule.test_dataloader())

    def predict_dataloader(self) -> DataLoader:
        """The wrapped predict loader, served by `_serve`."""
        return self._serve(self.datamodule.predict_dataloader())


class PredrawnViewsDataModule(DelegatingDataModule):
    """The uncached path on the cache's pre-drawn views: epoch e trains on view e % views of every image."""

    def __init__(self, datamodule: Any, views: int, seed: int | None = None) -> None:
        super().__init__(datamodule)
        self.views, self.seed = int(views), datamodule.seed if seed is None else int(seed)

    def _serve(self, inner: DataLoader) -> DataLoader:
        if self._split_of(inner) != "train":
            return inner
        return mirror_loader(inner, ViewDataset(inner.dataset, self.views, self.seed), self.views)

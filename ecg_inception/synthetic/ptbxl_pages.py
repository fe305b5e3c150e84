"""PTB-XL records rendered into printouts on the fly: the pretraining data (`experiment=pretrain_ptbxl`).

Every training item is one record drawn on a page with a fresh look (grid colour and strength, line width,
offset, rotation, header text, page scale in `scale_range`, JPEG quality in `jpeg_quality`), then put through
exactly the fine-tuning preprocessing (`data.pages.preprocess_page`: grid-box detection as the audit does it,
ink, resize) and normalised. That is the ECG-safe augmentation: the trace is redrawn, never resampled. Val and
test pages have one fixed look per record (seeded by `ecg_id`) and are rendered once, into
`cache_dir/ptbxl_pages/<key>.pt`, where `key` hashes the records, the preprocessing and the look settings.

Sits above `data/` (it uses the PTB-XL readers and the page preprocessing) beside the renderer it drives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ecg_inception.core.cpus import torch_threads
from ecg_inception.core.plain import from_omegaconf
from ecg_inception.data.datamodule import default_num_workers
from ecg_inception.data.pages import preprocess_page
from ecg_inception.data.ptbxl import PtbxlData, fold_split, read_ptbxl
from ecg_inception.data.ptbxl_labels import DEFAULT_MIN_LIKELIHOOD, label_names, multi_hot
from ecg_inception.data.scale import CANONICAL_PX_PER_MM
from ecg_inception.data.transforms import (
    MIN_IMAGE_SIZE,
    PREPROCESS_VERSION,
    RESIZE_MODES,
    DataConfig,
    Normalize,
    parse_image_size,
    resolve_data_config,
    size_value,
)
from ecg_inception.errors import DatasetError
from ecg_inception.synthetic.printout import render_signals

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: Bumped when rendering or preprocessing changes what a cached val/test page holds.
RENDER_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Look:
    """The ranges a page's look is drawn from (besides what `render_signals` draws itself)."""

    scale_range: tuple[float, float] = (0.5, 1.0)
    jpeg_quality: tuple[int, int] = (60, 95)


def render_item(
    signals: np.ndarray, fs: float, rng: np.random.Generator, look: Look, preprocessing: Mapping[str, Any]
) -> torch.Tensor:
    """One record -> page with a look from `rng` -> JPEG round trip -> the model's uint8 [3, H, W] input."""
    scale = float(rng.uniform(*look.scale_range))
    quality = int(rng.integers(look.jpeg_quality[0], look.jpeg_quality[1] + 1))
    image = render_signals(signals, fs, rng, scale).image
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    page = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return preprocess_page(page, preprocessing)[0]


class PtbxlPageDataset(Dataset):
    """Records of one split -> (normalised float [3, H, W], float multi-hot targets).

    `fixed=True` (val/test): the look of record `i` depends only on (seed, ecg_id). `fixed=False` (train): a
    new look at every access, drawn from the worker's torch seed (new every epoch), the item and a counter.
    """

    def __init__(
        self, data: PtbxlData, indices: Sequence[int], targets: np.ndarray, preprocessing: Mapping[str, Any],
        config: DataConfig, look: Look, seed: int, fixed: bool,
    ) -> None:  # fmt: skip
        self.data, self.indices, self.targets = data, list(indices), torch.from_numpy(targets)
        self.preprocessing, self.look, self.seed, self.fixed = dict(preprocessing), look, int(seed), fixed
        self.normalize = Normalize(config.mean, config.std)
        self.images: torch.Tensor | None = None  # pre-rendered uint8 pages of a fixed split
        self._draws = 0

    def __len__(self) -> int:
        return len(self.indices)

    def rng(self, i: int) -> np.random.Generator:
        ecg_id = self.data.records[self.indices[i]].ecg_id
        if self.fixed:
            return np.random.default_rng([self.seed, 1, ecg_id])
        self._draws += 1
        return np.random.default_rng([self.seed, 0, torch.initial_seed() % 2**63, ecg_id, self._draws])

    def load_uint8(self, i: int) -> torch.Tensor:
        """The preprocessed, not normalised page of item `i` (pre-rendered when the split is cached)."""
        if self.images is not None:
            return self.images[i]
        with torch_threads(1):  # small per-image ops: one thread, as in DataLoader workers
            return render_item(self.data.signals(self.indices[i]), self.data.fs, self.rng(i), self.look,
                               self.preprocessing)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.normalize(self.load_uint8(i)), self.targets[i]


class _Uint8(Dataset):
    def __init__(self, dataset: PtbxlPageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset.load_uint8(i)


class PtbxlDataModule(L.LightningDataModule):
    """PTB-XL (compact or WFDB form) as printouts: strat_fold splits, multi-label superclass targets.

    Args:
        root: the PTB-XL folder (`signals.npy` + `records.csv`, or the PhysioNet release); read only.
        rate: 500 or 100 Hz for the WFDB release (the compact form says its own).
        folds: split -> strat_folds (default 1-8 train, 9 val, 10 test).
        min_likelihood: the likelihood rule for diagnostic statements (data.ptbxl_labels).
        target_head: add the four target-like outputs (`target:myocardial_infarction`, ...) to the five superclasses.
        limit: at most this many records per split (the first by table order; None: all), for smoke runs.
        seed: seeds the looks.
        batch_size: the loaders' batch size.
        num_workers: rendering workers (None: min(4, CPUs - 1)); training workers are not persistent, so that
            every epoch draws new looks.
        pin_memory: the loaders' (None: when CUDA is available).
        model_name: the timm model whose config gives the default size, mean, std and interpolation.
        image_size: the model input, an int or [height, width]; fine-tuning must use the same (it is checked).
        mean: normalisation mean (None: the timm config's).
        std: normalisation std (None: the timm config's).
        interpolation: resize interpolation (None: the timm config's).
        resize: squash or letterbox, as `EcgDataModule`.
        crop: crop to the detected grid box, as the leak-free protocol does.
        ink: map the page to ink before resizing (`data.ink`).
        scale_range: page scales drawn per page (1.0 = 2213 x 1572 px; 0.5 the dev copy's size).
        jpeg_quality: JPEG qualities drawn per page (inclusive).
        cache_dir: where the fixed val/test pages are cached (None: not cached, rendered every epoch).
        drop_last: drop the last incomplete training batch.

    Raises:
        ValueError: a bad size, resize mode or range.
        DatasetError: no root, or PTB-XL files that cannot be read.
    """

    def __init__(
        self,
        root: str | None = None,
        rate: int = 500,
        folds: Mapping[str, Sequence[int]] | None = None,
        min_likelihood: float = DEFAULT_MIN_LIKELIHOOD,
        target_head: bool = False,
        limit: int | None = None,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        model_name: str = "inception_v3",
        image_size: int | Sequence[int] | None = (128, 256),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        resize: str = "squash",
        crop: bool = True,
        ink: bool = True,
        scale_range: Sequence[float] = (0.5, 1.0),
        jpeg_quality: Sequence[int] = (60, 95),
        cache_dir: str | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if root is None:
            raise DatasetError("PTB-XL pretraining needs data.root=/path/to/ptbxl (compact or PhysioNet form)")
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize {resize!r}; expected one of {', '.join(RESIZE_MODES)}")
        lo, hi = (float(v) for v in from_omegaconf(scale_range))
        qlo, qhi = (int(v) for v in from_omegaconf(jpeg_quality))
        if not 0.1 < lo <= hi <= 4.0 or not 1 <= qlo <= qhi <= 95:
            raise ValueError(f"need 0.1 < scale_range <= 4 and 1 <= jpeg_quality <= 95, got {scale_range}, "
                             f"{jpeg_quality}")
        image_size = from_omegaconf(image_size)
        if image_size is not None:
            parse_image_size(image_size, minimum=MIN_IMAGE_SIZE)
        self.root, self.rate, self.folds = str(root), int(rate), from_omegaconf(folds)
        self.min_likelihood, self.target_head = float(min_likelihood), bool(target_head)
        self.limit = None if limit is None else int(limit)
        self.seed, self.batch_size = int(seed), int(batch_size)
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.model_name, self.image_size, self.resize = model_name, image_size, resize
        self.crop, self.ink = bool(crop), bool(ink)
        self.normalisation = {k: v for k, v in (("mean", from_omegaconf(mean)), ("std", from_omegaconf(std)),
                                                ("interpolation", interpolation)) if v is not None}
        self.look = Look((lo, hi), (qlo, qhi))
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self.drop_last = bool(drop_last)
        self._data: PtbxlData | None = None
        self._splits: dict[str, list[int]] = {}
        self._datasets: dict[str, PtbxlPageDataset] = {}

    # -- what the model and the reports need -------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        """Output names: NORM, MI, STTC, CD, HYP (+ the target head's four)."""
        return label_names(self.target_head)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def data_config(self) -> DataConfig:
        """Size, mean, std and interpolation: the timm config of `model_name`, explicit values win."""
        config = resolve_data_config(self.model_name, self.image_size)
        norm = self.normalisation
        return dataclasses.replace(
            config, mean=tuple(float(v) for v in norm.get("mean", config.mean)),
            std=tuple(float(v) for v in norm.get("std", config.std)),
            interpolation=str(norm.get("interpolation", config.interpolation)),
        )  # fmt: skip

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The plain dict the checkpoint stores (same keys and meaning as `EcgDataModule.preprocessing`)."""
        cfg = self.data_config
        return {"model_name": self.model_name, "size": size_value(cfg.size), "mean": list(cfg.mean),
                "std": list(cfg.std), "interpolation": cfg.interpolation, "resize": self.resize, "crop": self.crop,
                "ink": self.ink, "version": PREPROCESS_VERSION, "px_per_mm": CANONICAL_PX_PER_MM}

    def describe(self) -> dict[str, Any]:
        """Records per split and label counts (positives per label), for metrics.json."""
        self.setup()
        assert self._data is not None
        out: dict[str, Any] = {"root": self.root, "fs": self._data.fs, "labels": self.labels}
        for split, idx in self._splits.items():
            targets = self._datasets[split].targets
            out[split] = {"records": len(idx), "positives": dict(zip(self.labels, targets.sum(0).int().tolist(),
                                                                     strict=True))}
        return out

    # -- setup ------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Read the table, split by fold (patients checked), build the datasets; render the fixed splits once."""
        if self._datasets:
            return
        self._data = data = read_ptbxl(self.root, self.rate)
        splits = fold_split(data.records, self.folds)
        if self.limit is not None:
            splits = {k: v[: self.limit] for k, v in splits.items()}
        self._splits = splits
        config, prep = self.data_config, self.preprocessing
        for split, idx in splits.items():
            if not idx:
                raise DatasetError(f"{self.root}: no records in the {split} folds {self.folds or 'default'}")
            targets = multi_hot([data.records[i] for i in idx], self.target_head, self.min_likelihood)
            self._datasets[split] = PtbxlPageDataset(data, idx, targets, prep, config, self.look, self.seed,
                                                     fixed=split != "train")
        for split in ("val", "test"):
            if split in self._datasets:
                self._datasets[split].images = self._fixed_pages(split)

    def _cache_key(self, split: str) -> str:
        assert self._data is not None
        ds = self._datasets[split]
        ids = [self._data.records[i].ecg_id for i in ds.indices]
        blob = json.dumps([RENDER_VERSION, self._data.source, self._data.fs, ids, self.preprocessing,
                           dataclasses.asdict(self.look), self.seed], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _fixed_pages(self, split: str) -> torch.Tensor:
        """All pages of a fixed-look split as one uint8 tensor: from the cache, else rendered (in workers)."""
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / "ptbxl_pages" / f"{split}-{self._cache_key(split)}.pt"
            if path.is_file():
                try:
                    images = torch.load(path, map_location="cpu", weights_only=True)
                    if isinstance(images, torch.Tensor) and len(images) == len(self._datasets[split]):
                        return images
                except Exception as exc:  # noqa: BLE001 - a bad cache file is rebuilt
                    log.warning("%s: unreadable cached pages (%s); rendering again", path, exc)
        loader = DataLoader(_Uint8(self._datasets[split]), batch_size=16, num_workers=self.num_workers)
        images = torch.cat(list(loader))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save(images, tmp)
            os.replace(tmp, path)
        log.info("PTB-XL %s: %d fixed-look pages rendered%s", split, len(images), f" into {path}" if path else "")
        return images

    # -- loaders ----------------------------------------------------------------------------------
    def dataset(self, split: str) -> PtbxlPageDataset:
        """The dataset of one split (after `setup`)."""
        self.setup()
        return self._datasets[split]

    def _loader(self, split: str, train: bool) -> DataLoader:
        generator = torch.Generator()
        generator.manual_seed(self.seed + SPLITS.index(split))
        workers = self.num_workers if self._datasets.get(split) is None or self.dataset(split).images is None else 0
        return DataLoader(
            self.dataset(split), batch_size=self.batch_size, shuffle=train, generator=generator,
            num_workers=workers, pin_memory=self.pin_memory,
            persistent_workers=False, drop_last=self.drop_last if train else False,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

"""EcgDataModule: audit + split (or a given manifest) -> cached, preprocessed, augmented DataLoaders.

Constructor values are plain (Hydra instantiates it from `conf/data/*.yaml`; OmegaConf containers are
accepted too). With `split_manifest` the module reads that split and never re-audits: the manifest
carries labels, groups and crop boxes, so every job of a sweep trains on exactly the same files.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from ecg_inception.core.cpus import usable_cpus
from ecg_inception.core.hashing import file_sha256
from ecg_inception.core.moved import forward_moved
from ecg_inception.core.plain import from_omegaconf
from ecg_inception.data.cache import (
    CacheStats,
    DecodedCache,
    default_cache_dir,
    distributed_rank,
    distributed_world_size,
    log_rebuilt,
    warm_decoded_cache,
)
from ecg_inception.data.dataset import EcgImageDataset
from ecg_inception.data.manifest import SPLITS, Manifest
from ecg_inception.data.page_augment import PageAugment
from ecg_inception.data.protocols import protocol_defaults
from ecg_inception.data.scale import CANONICAL_PX_PER_MM
from ecg_inception.data.split import check_fractions, make_split
from ecg_inception.data.transforms import (
    AUGMENT_KINDS,
    MIN_IMAGE_SIZE,
    PREPROCESS_VERSION,
    RESIZE_MODES,
    SUPPORTED_PREPROCESS_VERSIONS,
    DataConfig,
    build_train_augment,
    parse_image_size,
    resolve_data_config,
    size_value,
)
from ecg_inception.errors import (
    CheckpointError,
    ConfigValueError,
    DatasetError,
    EcgInceptionError,
    ManifestError,
)

log = logging.getLogger(__name__)


def _config_checked(check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`check(*args, **kwargs)`, with a plain ValueError (a shared check's) raised as ConfigValueError, same message."""
    try:
        return check(*args, **kwargs)
    except EcgInceptionError:
        raise
    except ValueError as exc:
        raise ConfigValueError(str(exc)) from exc


def default_num_workers() -> int:
    """DataLoader workers when none are given: min(4, usable CPUs - 1), at least 0."""
    return max(0, min(4, usable_cpus() - 1))


class EcgDataModule(L.LightningDataModule):
    """12-lead ECG printouts -> train/val/test/predict DataLoaders (predict serves the test split).

    `setup` audits and splits `root` by `protocol` (or reads `split_manifest`); the loaders crop, optionally
    map to ink, resize, augment (train only) and normalise as docs/protocols.md describes.

    Args:
        root: the image folder, one sub-folder per class; None: the folder `make_default_root` makes.
        protocol: `leakfree` or `paper` (leaky); also picks the defaults of balance, stage and crop.
        split_manifest: a `splits.csv` to reuse exactly, without auditing or splitting.
        seed: the split seed, the synthetic set's seed and the loaders' shuffle seed.
        fractions: train, val and test fractions (per class).
        balance: `undersample`, `class_weights` or `none`; None: the protocol's default.
        balance_stage: `before_split` or `train`; None: the protocol's default.
        batch_size: batch size of every loader (>= 1).
        num_workers: DataLoader workers; None: `default_num_workers()`.
        pin_memory: None: on when CUDA is available.
        persistent_workers: None: on when num_workers > 0.
        model_name: the timm model whose pretrained config gives size, mean, std and interpolation (it may
            name a tag: `inception_v3.gluon_in1k`).
        image_size: an int (square) or [height, width]; None: the model's pretrained input size.
        resize: `squash` (stretch, the paper's) or `letterbox` (keep aspect, white bars).
        crop: crop to the grid box; None: the protocol's default (on for leakfree, off for paper).
        augment: train-time augmentation on or off.
        augment_kind: `ecg`, `shift`, `paper` or `none`; None: `paper` for the paper protocol, else `ecg`.
        page_augment: scanner augmentation of the decoded training page before preprocessing (a
            `PageAugment` or its mapping `{scale, jpeg_quality, jpeg_p}`; None: off); applies when `augment`
            is on, whatever `augment_kind` says, and makes the training split bypass the decoded cache.
        drop_last: drop the last incomplete train batch (BatchNorm in inception_v3's aux head needs it).
        cache_dir: root of the caches; None: `$ECG_INCEPTION_CACHE` or `~/.cache/ecg_inception` (decoded
            images under `decoded/`, synthetic sets under `synthetic/`).
        decoded_cache: keep preprocessed images on disk and in memory between epochs and runs.
        manifest_out: also write the manifest (and its `.excluded.csv` sidecar) here.
        synthetic_per_class: printouts per class of the synthetic default set (root None).
        make_default_root: with root None, `make_default_root(cache_dir / "synthetic", synthetic_per_class, seed)`
            gives the folder (the shipped config passes `synthetic.default_set.ensure_synthetic_dataset`).
        ink: remove the pink grid and thicken the trace before resizing (`transforms.ink_image`).
        mean: normalisation mean per channel; None: the timm config of `model_name`.
        std: normalisation std per channel; None: the timm config of `model_name`.
        interpolation: resize interpolation; None: the timm config of `model_name`.
        preprocess_version: the preprocessing version (`transforms.SUPPORTED_PREPROCESS_VERSIONS`); None: the
            current `transforms.PREPROCESS_VERSION` (3: the crop aligned to the border line to a fraction of a
            pixel; 2: the integer grid box, as checkpoints made before it).

    Raises:
        ConfigValueError: an unknown protocol, resize or augment_kind, a batch size below 1, bad fractions, a bad
            image size or bad normalisation (named in the message; a ValueError too, and the CLIs print it alone
            and exit 2).
        DatasetError: `root` does not exist or is unusable, or is None without `make_default_root` (at `setup`).
        ManifestError: `split_manifest` does not fit the data (at `setup`).
    """

    def __init__(
        self,
        root: str | None = None,
        protocol: str = "leakfree",
        split_manifest: str | None = None,
        seed: int = 0,
        fractions: Sequence[float] = (0.7, 0.15, 0.15),
        balance: str | None = None,
        balance_stage: str | None = None,
        batch_size: int = 32,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        model_name: str = "inception_v3",
        image_size: int | Sequence[int] | None = None,
        resize: str = "squash",
        crop: bool | None = None,
        augment: bool = True,
        augment_kind: str | None = None,
        drop_last: bool = False,
        cache_dir: str | None = None,
        decoded_cache: bool = True,
        manifest_out: str | None = None,
        synthetic_per_class: int = 40,
        make_default_root: Callable[[Path, int, int], Path] | None = None,
        ink: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        page_augment: Mapping[str, Any] | PageAugment | None = None,
        preprocess_version: int | None = None,
    ) -> None:
        super().__init__()
        crop_default = self._configure_split(
            root, protocol, split_manifest, seed, fractions, balance, balance_stage, manifest_out
        )
        self._configure_loaders(batch_size, num_workers, pin_memory, persistent_workers, drop_last)
        self._configure_preprocessing(
            model_name, image_size, resize, crop_default if crop is None else crop, ink, mean, std, interpolation,
            preprocess_version,
        )
        self._configure_augmentation(augment, augment_kind, page_augment)
        self._configure_sources(cache_dir, decoded_cache, synthetic_per_class, make_default_root)
        self._validate()
        self._init_state()

    # -- construction steps (each sets the attributes of one concern; `_validate` checks them together) ---------

    def _configure_split(
        self, root: str | None, protocol: str, split_manifest: str | None, seed: int, fractions: Sequence[float],
        balance: str | None, balance_stage: str | None, manifest_out: str | None,
    ) -> bool:  # fmt: skip
        """Where the images are and how they are split.

        Args:
            root: the image folder; None: the folder `make_default_root` makes (see `_configure_sources`).
            protocol: `leakfree` or `paper`.
            split_manifest: a `splits.csv` to reuse exactly.
            seed: the split seed (also the synthetic set's and the loaders' seed).
            fractions: train, val and test fractions.
            balance: `undersample`, `class_weights`, `none` or None (the protocol's default).
            balance_stage: `before_split`, `train` or None (the protocol's default).
            manifest_out: where to write the manifest too.

        Returns:
            The protocol's default for `crop`.

        Raises:
            ConfigValueError: an unknown protocol or bad fractions.
        """
        defaults = _config_checked(protocol_defaults, protocol)  # an unknown protocol fails here
        self.root = None if root is None else str(root)
        self.protocol = protocol
        self.split_manifest = None if split_manifest is None else str(split_manifest)
        self.seed = int(seed)
        self.fractions = _config_checked(check_fractions, from_omegaconf(fractions))
        self.balance, self.balance_stage = balance, balance_stage
        self.manifest_out = None if manifest_out is None else str(manifest_out)
        return defaults.crop

    def _configure_loaders(
        self, batch_size: int, num_workers: int | None, pin_memory: bool | None, persistent_workers: bool | None,
        drop_last: bool,
    ) -> None:  # fmt: skip
        """How the DataLoaders batch and load.

        Args:
            batch_size: batch size of every loader (checked by `_validate`).
            num_workers: DataLoader workers; None: `default_num_workers()`.
            pin_memory: None: on when CUDA is available.
            persistent_workers: None: on when there are workers.
            drop_last: drop the last incomplete train batch.
        """
        self.batch_size = int(batch_size)
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = (
            self.num_workers > 0 if persistent_workers is None else bool(persistent_workers)
        )
        self.drop_last = bool(drop_last)

    def _configure_preprocessing(
        self, model_name: str, image_size: int | Sequence[int] | None, resize: str, crop: bool, ink: bool,
        mean: Sequence[float] | None, std: Sequence[float] | None, interpolation: str | None,
        preprocess_version: int | None = None,
    ) -> None:  # fmt: skip
        """What every split does to a page before the model sees it (what `preprocessing` records).

        Args:
            model_name: the timm model whose pretrained config gives the defaults below.
            image_size: an int, [height, width] or None (checked by `_validate`).
            resize: `squash` or `letterbox` (checked by `_validate`).
            crop: crop to the grid box (the protocol's default already applied).
            ink: remove the grid and thicken the trace before resizing.
            mean: normalisation mean, or None for the timm config's.
            std: normalisation std, or None for the timm config's.
            interpolation: resize interpolation, or None for the timm config's.
            preprocess_version: the preprocessing version to apply, or None for `transforms.PREPROCESS_VERSION`
                (a checkpoint's stored version when eval or fine-tuning reproduces it).
        """
        self.model_name, self.image_size, self.resize = model_name, from_omegaconf(image_size), resize
        self.preprocess_version = PREPROCESS_VERSION if preprocess_version is None else preprocess_version
        self.crop = bool(crop)
        self.ink = bool(ink)
        # Normalisation given explicitly (a checkpoint's stored values) wins over the timm config's.
        self.normalisation = {
            k: v for k, v in (("mean", from_omegaconf(mean)), ("std", from_omegaconf(std)),
                              ("interpolation", interpolation))
            if v is not None
        }  # fmt: skip

    def _configure_augmentation(
        self, augment: bool, augment_kind: str | None, page_augment: Mapping[str, Any] | PageAugment | None = None
    ) -> None:
        """Train-time augmentation.

        Args:
            augment: on or off.
            augment_kind: `ecg`, `shift`, `paper` or `none`; None: `paper` for the paper protocol, else `ecg`
                (checked by `_validate`).
            page_augment: page-level scanner augmentation (None: off).

        Raises:
            ConfigValueError: a bad `page_augment` (named).
        """
        self.augment = bool(augment)
        self.page_augment = PageAugment.from_config(from_omegaconf(page_augment))
        self.augment_kind = (
            augment_kind if augment_kind is not None else ("paper" if self.protocol == "paper" else "ecg")
        )

    def _configure_sources(
        self, cache_dir: str | None, decoded_cache: bool, synthetic_per_class: int,
        make_default_root: Callable[[Path, int, int], Path] | None,
    ) -> None:  # fmt: skip
        """Where caches live and where the default set comes from.

        Args:
            cache_dir: root of the caches; None: `default_cache_dir()`.
            decoded_cache: keep preprocessed images between epochs and runs.
            synthetic_per_class: printouts per class of the synthetic default set.
            make_default_root: the maker of the default folder when `root` is None.
        """
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.decoded_cache = bool(decoded_cache)
        self.synthetic_per_class = int(synthetic_per_class)
        self.make_default_root = make_default_root

    def _validate(self) -> None:
        """Refuse unknown modes, a batch size below 1, a bad image size or bad normalisation, naming the value.

        Raises:
            ConfigValueError: the first value that is not allowed (a ValueError too).
        """
        if self.resize not in RESIZE_MODES:
            raise ConfigValueError(f"unknown resize {self.resize!r}; expected one of {', '.join(RESIZE_MODES)}")
        if self.augment_kind not in AUGMENT_KINDS:
            raise ConfigValueError(
                f"unknown augment_kind {self.augment_kind!r}; expected one of {', '.join(AUGMENT_KINDS)}"
            )
        if self.batch_size < 1:
            raise ConfigValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.preprocess_version not in SUPPORTED_PREPROCESS_VERSIONS:
            raise ConfigValueError(
                f"unknown preprocess_version {self.preprocess_version!r}; expected one of "
                f"{', '.join(map(str, SUPPORTED_PREPROCESS_VERSIONS))}"
            )
        if self.image_size is not None:  # a bad size fails here, naming the value
            _config_checked(parse_image_size, self.image_size, minimum=MIN_IMAGE_SIZE)
        for key in ("mean", "std"):
            value = self.normalisation.get(key)
            if value is not None and (len(value) != 3 or (key == "std" and min(value) <= 0)):
                raise ConfigValueError(f"{key} must be 3 numbers (std > 0), got {value}")

    def _init_state(self) -> None:
        """What `setup` and the loaders fill in later: nothing is read or built in the constructor."""
        self._root: Path | None = None
        self._manifest: Manifest | None = None
        # The train loader's shuffle generator, kept in checkpoints (state_dict) for an exact resume.
        self._train_generator: torch.Generator | None = None
        self._train_generator_state: torch.Tensor | None = None
        self._config: DataConfig | None = None
        self._datasets: dict[str, EcgImageDataset] = {}
        self._corrupt_logged = 0  # corrupt decoded-cache entries already reported by `teardown`

    # -- data preparation -------------------------------------------------------------------------

    def dataset_root(self) -> Path:
        """The image folder: `root`, or the one `make_default_root` makes (the synthetic default, on first use)."""
        if self._root is None:
            if self.root is None:
                if self.make_default_root is None:
                    raise DatasetError(
                        "root is None and no make_default_root was given: pass a folder, or "
                        "make_default_root=ecg_inception.synthetic.default_set.ensure_synthetic_dataset"
                    )
                self._root = Path(self.make_default_root(
                    self.cache_root / "synthetic", self.synthetic_per_class, self.seed
                ))
            else:
                self._root = Path(self.root).expanduser()
                if not self._root.is_dir():
                    raise DatasetError(f"{self._root}: dataset folder not found")
        return self._root

    def prepare_data(self) -> None:
        """Make the default set if no root is given (once per machine, reused after).

        In a distributed fit (Lightning calls this on local rank 0 while the other ranks wait at a barrier) the
        decoded cache is filled here too, so that every image is decoded once and the other ranks only read it.
        """
        self.dataset_root()
        if self.decoded_cache and distributed_world_size() > 1:
            self.warm_decoded_cache()

    def warm_decoded_cache(self) -> int:
        """Decode into the decoded cache every image a split reads from it (a no-op for entries already there).

        Returns:
            The number of images visited.
        """
        self.setup()
        # A split drawn by data.page_augment is preprocessed afresh every fetch and never read from the cache.
        readers = [self._datasets[split] for split in SPLITS if self._datasets[split].page_augment is None]
        total = warm_decoded_cache(readers, self.num_workers)
        log.info("decoded cache warmed: %d images", total)
        return total

    def _ensure_manifest(self) -> Manifest:
        if self._manifest is None:
            root = self.dataset_root()
            if self.split_manifest is not None:
                manifest = Manifest.read_csv(
                    self.split_manifest, self.protocol, root=root, balance=self.balance,
                    balance_stage=self.balance_stage,
                )  # fmt: skip
                changed = [
                    r.path for r in manifest.rows if r.sha256 and file_sha256(root / r.path) != r.sha256
                ]
                if changed:
                    raise ManifestError(
                        f"{self.split_manifest}: {len(changed)} file(s) under {root} differ from the manifest's "
                        f"sha256 (first: {changed[0]}); is root the folder this split was made from?"
                    )
            else:
                from ecg_inception.data.audit import audit_folder

                manifest = make_split(
                    audit_folder(root),
                    self.protocol,
                    self.seed,
                    self.fractions,
                    self.balance,
                    self.balance_stage,
                )
            if self.manifest_out is not None:
                manifest.write_csv(self.manifest_out)
            crossing = manifest.crossing_groups()
            if manifest.leaky:
                log.warning(
                    "protocol %r is leaky: copies of one ECG sit in more than one split (%d groups cross splits)",
                    manifest.protocol, len(crossing),
                )  # fmt: skip
            no_pitch = [r.path for r in manifest.rows if r.pitch_fallback]
            if no_pitch:
                log.warning(
                    "%d file(s) show no measurable grid pitch and are scaled by their box size instead (first: %s; "
                    "pitch_fallback in the manifest)", len(no_pitch), no_pitch[0],
                )  # fmt: skip
            log.info("split of %s: %s", root, manifest.counts())
            self._manifest = manifest
        return self._manifest

    def setup(self, stage: str | None = None) -> None:
        """Audit and split the folder (or read `split_manifest`) and build the datasets of every split."""
        manifest = self._ensure_manifest()
        if self._datasets:
            return
        augment = (
            build_train_augment(self.augment_kind) if self.augment and self.augment_kind != "none" else None
        )
        for split in SPLITS:
            cache = DecodedCache(self.cache_root / "decoded") if self.decoded_cache else None
            self._datasets[split] = EcgImageDataset(
                self.dataset_root(), manifest.split_rows(split), manifest.labels, self.data_config,
                resize=self.resize, crop=self.crop, augment=augment if split == "train" else None, cache=cache,
                ink=self.ink, page_augment=self.page_augment if split == "train" and self.augment else None,
                version=self.preprocess_version,
            )  # fmt: skip

    # -- loaders ----------------------------------------------------------------------------------

    def dataset(self, split: str) -> EcgImageDataset:
        """The dataset of one split (after `setup`)."""
        if not self._datasets:
            self.setup()
        return self._datasets[split]

    def _loader(self, split: str, train: bool) -> DataLoader:
        # A private generator drives the shuffle order and the workers' base seed, so loading is
        # reproducible from `seed` and never draws from the global RNG (eval loaders included).
        generator = torch.Generator()
        generator.manual_seed(self.seed + SPLITS.index(split))
        if train:
            if self._train_generator_state is not None:  # resuming: continue the checkpointed shuffle sequence
                generator.set_state(self._train_generator_state)
                self._train_generator_state = None
            self._train_generator = generator
        sampler = None
        if not train and distributed_world_size() > 1:
            # Every rank scores its own part and torchmetrics sums over ranks: each image counts once (Lightning's
            # default sampler would pad the split with repeated images to equal lengths).
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(
                self.dataset(split), num_replicas=distributed_world_size(), rank=distributed_rank(), shuffle=False
            )
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=train,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=self.drop_last if train else False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the module: the train loader's generator state (shuffle order, workers' seeds).

        The generator is seeded from `seed` when the loader is built and advances once per epoch; without its
        state a resumed run would replay epoch 0's order (docs/configuration.md, "Resuming").
        """
        if self._train_generator is None:
            return {}
        return {"train_generator": self._train_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore `state_dict()`: the next train loader continues the checkpointed generator.

        Raises:
            CheckpointError: the stored state is not a generator state (a uint8 tensor).
        """
        state = state_dict.get("train_generator")
        if state is None:
            return
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
            raise CheckpointError("checkpoint", f"EcgDataModule.train_generator is not a generator state: {state!r}")
        self._train_generator_state = state.clone()

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    # -- what the model and the reports need ------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        """The split in use (audits and splits on first access if `setup` has not run)."""
        return self._ensure_manifest()

    @property
    def labels(self) -> list[str]:
        """Class names in class-index order."""
        return list(self.manifest.labels)

    @property
    def num_classes(self) -> int:
        return len(self.manifest.labels)

    @property
    def class_weights(self) -> list[float] | None:
        """Loss weights (inverse train-class frequency, mean 1) when balance is class_weights, else None."""
        manifest = self.manifest
        return manifest.class_weights() if manifest.balance == "class_weights" else None

    @property
    def data_config(self) -> DataConfig:
        """Input size, mean, std and interpolation from the timm model's pretrained config (`model_name` may name
        a tag, e.g. inception_v3.gluon_in1k); explicit mean/std/interpolation win."""
        if self._config is None:
            config = resolve_data_config(self.model_name, self.image_size)
            norm = self.normalisation
            self._config = dataclasses.replace(
                config,
                mean=tuple(float(v) for v in norm.get("mean", config.mean)),
                std=tuple(float(v) for v in norm.get("std", config.std)),
                interpolation=str(norm.get("interpolation", config.interpolation)),
            )
        return self._config

    @property
    def preprocessing(self) -> dict[str, Any]:
        """Plain dict the model stores in its checkpoint so eval and predict preprocess like training.

        `version` is the preprocessing version applied (`preprocess_version`; a checkpoint with one this code
        cannot reproduce is refused when loaded) and `px_per_mm` the canonical scale every page is resampled to
        before the ink step.
        """
        cfg = self.data_config
        return {
            "model_name": self.model_name,
            "size": size_value(cfg.size),
            "mean": list(cfg.mean),
            "std": list(cfg.std),
            "interpolation": cfg.interpolation,
            "resize": self.resize,
            "crop": self.crop,
            "ink": self.ink,
            "version": self.preprocess_version,
            "px_per_mm": CANONICAL_PX_PER_MM,
        }

    def teardown(self, stage: str | None = None) -> None:
        """End of a fit/validate/test: log how many corrupt decoded-cache entries were rebuilt since the last one."""
        directory, done = self.cache_root / "decoded", self._corrupt_logged
        self._corrupt_logged = log_rebuilt(self.cache_stats(), directory, stage, done)

    def cache_stats(self) -> CacheStats | None:
        """Decoded-cache hits and misses over all splits and workers (None with the cache off)."""
        caches = [d.cache for d in self._datasets.values() if d.cache is not None]
        if not caches:
            return None
        stats = [c.stats() for c in caches]
        return CacheStats(
            *(sum(getattr(s, f) for s in stats) for f in ("hits", "misses", "memory_hits", "corrupt"))
        )


#: Moved to ecg_inception.synthetic.default_set (synthetic sits above data); forwarded with a warning.
__getattr__ = forward_moved(__name__, "ecg_inception.synthetic.default_set",
                            {"ensure_synthetic_dataset", "SYNTHETIC_VERSION", "SYNTHETIC_SCALE"})

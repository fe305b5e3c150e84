"""Disk cache of frozen-trunk activations, and loaders that train the tail on them.

One entry per split holds `features` (views, N, ...) and, where needed, `aux_input` as fp16 .npy files
(memory-mapped when read), `labels`, and `meta.json` with the key, sizes, stamps and a CRC32 of every array. The key
covers the images (manifest sha256), the preprocessing, the frozen prefix (its cut and a hash of its weights),
the labels and, for augmented training views, the augmentation kind, seed and view count; another key is
another entry. Builders take a file lock and rename a finished temporary folder into place, so concurrent
sweep jobs build an entry once and nobody reads half of one; a corrupt or partial entry is rebuilt.
Building never draws from the global RNGs (augmented views use per-image generators under `fork_rng`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ecg_inception.core.locks import file_lock
from ecg_inception.data.cache import file_sha256
from ecg_inception.errors import ManifestError
from ecg_inception.features.trunk_views import DelegatingDataModule, ViewDataset, mirror_loader, preserved_rng
from ecg_inception.models.trunk import TrunkFeatures, TrunkSplit, parse_verify, plan_trunk_cache

log = logging.getLogger(__name__)

CACHE_FORMAT = 3  # bump when the entry layout or the meaning of a key field changes (2: preprocessing v2; 3: v3)
ARRAYS = ("features", "aux_input", "labels")
#: Keys of the model config that configure the trunk cache (EcgClassifier validates them, train() acts on them).
TRUNK_CACHE_KEYS = ("trunk_cache", "trunk_cache_views", "trunk_cache_verify")
_META = "meta.json"
_CHUNK = 1 << 22
#: (process id, entry folder) -> the (inode, size, mtime) stamps of its arrays when this process last checked
#: their CRC32 (or built them). Per process: every job verifies each entry it uses fully once.
_VERIFIED: dict[tuple[int, str], tuple[tuple[int, int, int], ...]] = {}


def _stable_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- datasets
class CachedFeatureDataset(Dataset):
    """Item `v * N + i` = (cached prefix output of view v of image i, aux-head input or None, label)."""

    def __init__(self, arrays: CachedArrays, start: str) -> None:
        self.arrays, self.start = arrays, start
        self.views, self.n = arrays.features.shape[:2]

    def __len__(self) -> int:
        return self.views * self.n

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        view, i = divmod(int(k), self.n)
        aux = self.arrays.aux_input
        return (torch.from_numpy(np.array(self.arrays.features[view, i])),
                None if aux is None else torch.from_numpy(np.array(aux[view, i])), int(self.arrays.labels[i]))

    def __getitems__(self, keys: Sequence[int]) -> tuple[TrunkFeatures, torch.Tensor]:
        """A whole batch with one fancy-indexed read per array (DataLoader's batched fetch)."""
        view, i = np.divmod(np.asarray(keys, dtype=np.int64), self.n)
        aux = self.arrays.aux_input
        feats = TrunkFeatures(torch.from_numpy(self.arrays.features[view, i]),
                              None if aux is None else torch.from_numpy(aux[view, i]), self.start)
        return feats, torch.from_numpy(self.arrays.labels[i].astype(np.int64))

    def collate(self, items: Any) -> tuple[TrunkFeatures, torch.Tensor]:
        """Batch items (or pass through what `__getitems__` already batched)."""
        if isinstance(items, tuple) and isinstance(items[0], TrunkFeatures):
            return items
        feats = torch.stack([f for f, _, _ in items])
        aux = None if items[0][1] is None else torch.stack([a for _, a, _ in items])
        return TrunkFeatures(feats, aux, self.start), torch.tensor([y for _, _, y in items], dtype=torch.int64)


# ------------------------------------------------------------------------------------------------- store
@dataclass
class CachedArrays:
    """A loaded entry: memory-mapped arrays plus its metadata."""

    path: Path
    features: np.ndarray
    aux_input: np.ndarray | None
    labels: np.ndarray
    meta: dict[str, Any]


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


class TrunkCacheStore:
    """Entries under `root` (e.g. `<paths.cache_dir>/trunk`), named `<name>-<key prefix>`.

    Validation checks sizes, shapes and dtypes, and the CRC32 of every array. `verify` says how often:
    `stat` (the default): in full the first time a process uses an entry (building it counts), then again only
    when an array's (inode, size, mtime) differs from the stamp this process verified (any rewrite, truncation,
    copy or touch); `full`: on every load. What `stat` cannot catch is a change made while the process runs
    that keeps inode, size and mtime (an in-place write with the mtime put back, silent media corruption);
    docs/performance.md has the details.
    """

    def __init__(self, root: str | Path, full_check: bool = False, verify: str | None = None) -> None:
        self.root = Path(root).expanduser()
        self.verify = parse_verify(verify if verify is not None else ("full" if full_check else "stat"))

    @property
    def full_check(self) -> bool:
        """True when every load recomputes every CRC32 (`verify="full"`)."""
        return self.verify == "full"

    def entry_dir(self, name: str, key: str) -> Path:
        """The folder of entry `name` under `key`."""
        return self.root / f"{name}-{key[:32]}"

    def load(self, path: Path, key: str) -> CachedArrays | None:
        """The entry at `path` if complete, of this key and intact, else None (the reason is logged)."""
        if not (path / _META).is_file():
            if path.exists():
                log.warning("Trunk cache entry %s has no meta.json (a partial build?): rebuilding it", path)
            return None
        try:
            meta = json.loads((path / _META).read_text(encoding="utf-8"))
            if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
                raise ValueError("another key or format")
            stamps, arrays = [], {}
            for name, spec in meta["arrays"].items():
                file = path / f"{name}.npy"
                st = file.stat()
                if st.st_size != spec["bytes"]:
                    raise ValueError(f"{file.name} has {st.st_size} bytes, expected {spec['bytes']}")
                stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
                arrays[name] = (file, spec)
            seen = _VERIFIED.get((os.getpid(), str(path)), ())
            for stamp, (file, spec) in zip(stamps, arrays.values(), strict=True):
                if (self.full_check or stamp not in seen) and _crc32(file) != spec["crc32"]:
                    raise ValueError(f"{file.name}: CRC32 mismatch")
            loaded = {n: np.load(f, mmap_mode="r") for n, (f, _) in arrays.items()}
            for name, (_, spec) in arrays.items():
                if list(loaded[name].shape) != spec["shape"] or str(loaded[name].dtype) != spec["dtype"]:
                    raise ValueError(f"{name}: shape/dtype differ from meta.json")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("Trunk cache entry %s is unusable (%s): rebuilding it", path, exc)
            return None
        _VERIFIED[(os.getpid(), str(path))] = tuple(stamps)
        return CachedArrays(path, loaded["features"], loaded.get("aux_input"), np.asarray(loaded["labels"]), meta)

    def get_or_build(
        self, name: str, key: str, fields: dict[str, Any], build: Callable[[Path], None]
    ) -> tuple[CachedArrays, bool]:
        """(entry, whether this call built it): a valid entry is read; else built once under a file lock."""
        final = self.entry_dir(name, key)
        arrays = self.load(final, key)
        if arrays is not None:
            return arrays, False
        with file_lock(final.with_name(f".{final.name}.lock")):
            arrays = self.load(final, key)  # another job may have built it while we waited
            if arrays is not None:
                return arrays, False
            tmp = self.root / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                tmp.mkdir()
                build(tmp)
                _finish_entry(tmp, key, fields)
                if final.exists():  # invalid: move it aside (readers may still map it), then drop it
                    stale = tmp.with_suffix(".stale")
                    os.rename(final, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                os.rename(tmp, final)
                _mark_built(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        arrays = self.load(final, key)
        if arrays is None:
            raise RuntimeError(f"trunk cache entry {final} is invalid right after it was built")
        return arrays, True


def _mark_built(entry: Path) -> None:
    """This process just computed the CRC32s of `entry` from its files: their stamps count as verified."""
    meta = json.loads((entry / _META).read_text(encoding="utf-8"))
    stamps = [tuple(spec["stamp"]) for spec in meta["arrays"].values()]
    _VERIFIED[(os.getpid(), str(entry))] = tuple(stamps)  # type: ignore[arg-type]


def _finish_entry(tmp: Path, key: str, fields: dict[str, Any]) -> None:
    """Checksum every array of a freshly built entry and write meta.json last (its presence = complete)."""
    arrays = {}
    for name in ARRAYS:
        file = tmp / f"{name}.npy"
        if file.exists():
            arr = np.load(file, mmap_mode="r")
            st = file.stat()  # renaming the folder keeps inode and mtime: later jobs compare against this stamp
            arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "bytes": st.st_size,
                            "crc32": _crc32(file), "stamp": [st.st_ino, st.st_size, st.st_mtime_ns]}
            del arr
    meta = {"format": CACHE_FORMAT, "key": key, "fields": fields, "arrays": arrays, "created": time.time()}
    (tmp / _META).write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")


def _prefix_batches(
    split: TrunkSplit, images: Dataset, batch_size: int, num_workers: int
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(first row, {array name: float32 CPU tensor}) per batch of the prefix over `images`, in order."""
    device = next(split.model.parameters()).device
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    done = 0
    for x, _ in loader:
        feats = split.prefix(x.to(device))
        yield done, {name: value.float().cpu() for name, value in (("features", feats.features),
                                                                    ("aux_input", feats.aux_input))
                     if value is not None}
        done += len(x)


class _EntryArrays:
    """The `.npy` arrays of an entry being built, written row block by row block in one dtype."""

    def __init__(self, out: Path, images: ViewDataset, dtype: str) -> None:
        self.out, self.views, self.n = out, images.views, images.n
        self.dtype = str(np.dtype(dtype))
        self.arrays: dict[str, np.ndarray] = {}

    def fits(self, outputs: dict[str, torch.Tensor]) -> bool:
        """Whether every value is within this dtype's range (NaN passes, as it is stored as it is)."""
        limit = float(np.finfo(self.dtype).max)
        return all(value.abs().max().item() <= limit for value in outputs.values() if value.numel())

    def restart(self, dtype: str) -> None:
        """Drop what was written and start over in `dtype`."""
        for arr in self.arrays.values():
            arr.flush()  # type: ignore[attr-defined]
        self.arrays.clear()
        for file in self.out.glob("*.npy"):
            if file.name != "labels.npy":
                file.unlink()
        self.dtype = str(np.dtype(dtype))

    def write(self, start: int, outputs: dict[str, torch.Tensor]) -> None:
        """Store rows `start ...` (flat index over views x images; a block may straddle two views)."""
        for name, value in outputs.items():
            if name not in self.arrays:
                shape = (self.views, self.n, *value.shape[1:])
                self.arrays[name] = np.lib.format.open_memmap(self.out / f"{name}.npy", "w+", self.dtype, shape)
            view, i = divmod(start, self.n)
            rows = value.numpy().astype(self.dtype)
            while len(rows):
                take = min(len(rows), self.n - i)
                self.arrays[name][view, i : i + take] = rows[:take]
                rows, view, i = rows[take:], view + 1, 0

    def close(self) -> None:
        """Flush and release the arrays."""
        for arr in self.arrays.values():
            arr.flush()  # type: ignore[attr-defined]
        self.arrays.clear()


def build_entry(
    out: Path, split: TrunkSplit, images: ViewDataset, dtype: str = "float16", batch_size: int = 32,
    num_workers: int = 0,
) -> str:
    """Run the prefix over every view of every image (eval mode, no grad, global RNG untouched) into `out`.

    When a batch exceeds the range of `dtype` (fp16 from an uncalibrated random trunk), the entry is stored as
    float32: the batches before it are computed again and written in float32, the batch that overflowed and
    the later ones are written as they come. The arrays equal those of a float32 build from the start (the same
    batches in the same order); nothing is computed twice beyond the batches before the overflow.

    Returns:
        The dtype stored: `dtype`, or float32.

    Raises:
        OverflowError: the activations exceed even the float32 range.
    """
    model = split.model
    np.save(out / "labels.npy", np.asarray(images.targets, dtype=np.int64))
    arrays = _EntryArrays(out, images, dtype)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with preserved_rng(), torch.no_grad():
            for start, outputs in _prefix_batches(split, images, batch_size, num_workers):
                if not arrays.fits(outputs):
                    if arrays.dtype == "float32":
                        raise OverflowError("trunk activations exceed the float32 range")
                    log.warning("trunk activations exceed the %s range: storing this entry as float32 instead "
                                "(%d earlier images computed again)", arrays.dtype, start)
                    arrays.restart("float32")
                    earlier = Subset(images, range(start))  # the same batches as before: batch size divides start
                    for again, block in _prefix_batches(split, earlier, batch_size, num_workers):
                        arrays.write(again, block)  # they fitted the narrower dtype
                arrays.write(start, outputs)
    finally:
        for module, mode in modes.items():
            module.training = mode
        arrays.close()
    return arrays.dtype


# ------------------------------------------------------------------------------------------- datamodules
class TrunkCachedDataModule(DelegatingDataModule):
    """Loaders of cached prefix outputs with the wrapped loaders' batch size, shuffle order and drop_last.

    Entries are looked up (or built, on the model's current device) when a loader is asked for, so a weight
    change in the prefix (e.g. a checkpoint restored by the Trainer) is noticed and rebuilt, never misused.
    """

    def __init__(self, datamodule: Any, split: TrunkSplit, views: int = 1, seed: int | None = None,
                 root: str | Path | None = None, dtype: str = "float16", build_batch_size: int = 32,
                 verify: str = "stat") -> None:
        super().__init__(datamodule)
        self.split, self.views, self.dtype = split, int(views), str(np.dtype(dtype))
        self.seed = datamodule.seed if seed is None else int(seed)
        self.store = TrunkCacheStore(root if root is not None else Path(datamodule.cache_root) / "trunk",
                                     verify=verify)
        self.build_batch_size = int(build_batch_size)
        self.built: dict[str, bool] = {}
        self.stored: dict[str, str] = {}  # dtype on disk per split (float32 where fp16 would overflow)
        self.timings: dict[str, float] = {}

    def key_fields(self, name: str) -> dict[str, Any]:
        """Everything the cached tensors of split `name` depend on."""
        images = self.datamodule.dataset(name)
        augmented = name == "train" and images.augment is not None
        items = [(r.path, r.sha256 or file_sha256(images.root / r.path), r.label) for r in images.rows]
        return {
            "format": CACHE_FORMAT, "split": name, "trunk": self.split.describe(),
            "weights": self.split.prefix_state_hash(), "preprocessing": self.datamodule.preprocessing,
            "settings": _stable_hash([s.fingerprint() for s in images.settings]), "items": _stable_hash(items),
            "labels": list(self.datamodule.labels), "dtype": self.dtype,
            "augment": {"kind": self.datamodule.augment_kind, "seed": self.seed, "views": self.views}
            if augmented else None,
        }

    def entry(self, name: str) -> CachedArrays:
        """The valid cache entry of split `name`, built now if missing, stale or corrupt."""
        started = time.perf_counter()
        images = self.datamodule.dataset(name)
        fields = self.key_fields(name)
        views = self.views if fields["augment"] else 1
        data = ViewDataset(images, views, self.seed)

        def build(out: Path) -> None:
            log.info("Building the trunk cache of %s (%d images x %d views) in %s", name, data.n, views, out)
            workers = min(2, int(getattr(self.datamodule, "num_workers", 0) or 0))
            build_entry(out, self.split, data, self.dtype, self.build_batch_size, workers)
            stats = [os.stat(images.root / r.path) for r in images.rows]
            (out / "files.json").write_text(json.dumps([[s.st_size, s.st_mtime_ns] for s in stats]))

        arrays, built = self.store.get_or_build(name, _stable_hash(fields), fields, build)
        _check_files(arrays.path, images)
        self.built[name] = self.built.get(name, False) or built  # whether this wrapper built it, at any call
        self.timings[name] = time.perf_counter() - started
        self.stored[name] = str(arrays.features.dtype)
        log.info("Trunk cache %s %s: %s in %.2f s", name, "built" if built else "hit", arrays.path, self.timings[name])
        return arrays

    def summary(self) -> dict[str, Any]:
        """Plain facts for metrics.json: where the cut is, views, and per split whether it was built and how long."""
        return {"boundary": self.split.boundary, "tail_starts_at": self.split.start, "views": self.views,
                "dtype": self.dtype, "stored": dict(self.stored), "built": dict(self.built),
                "seconds": {k: round(v, 3) for k, v in self.timings.items()}}

    def _serve(self, inner: DataLoader) -> DataLoader:
        name = self._split_of(inner)
        dataset = CachedFeatureDataset(self.entry(name), self.split.start)
        views = dataset.views
        if views > 1 and getattr(getattr(self, "trainer", None), "world_size", 1) > 1:
            raise ValueError("pre-drawn views are served by an epoch-aware sampler that distributed training "
                             "would replace: use trunk_cache_views=null/trunk_cache=off with several devices")
        return mirror_loader(inner, dataset, views, num_workers=0, persistent_workers=False)


def _check_files(entry: Path, images: Any) -> None:
    """Files changed since the build must still have the manifest's content, as the uncached loader demands."""
    try:
        stats = json.loads((entry / "files.json").read_text())
    except (OSError, ValueError):
        stats = [None] * len(images.rows)
    for row, recorded in zip(images.rows, stats, strict=False):
        path = images.root / row.path
        st = os.stat(path)
        if recorded != [st.st_size, st.st_mtime_ns] and row.sha256 and file_sha256(path) != row.sha256:
            raise ManifestError(f"{path}: file content differs from the manifest's sha256; re-split the folder")


def use_trunk_cache(
    model: Any,
    datamodule: Any,
    mode: bool | str | None = "auto",
    views: int | None = None,
    verify: str | None = None,
    cache_dir: str | Path | None = None,
    dtype: str = "float16",
) -> Any:
    """`datamodule`, or a TrunkCachedDataModule around it when `mode` (auto|on|off) says so.

    The decision reads plain values only (`training.train` passes the model's own `trunk_cache*`
    hyper-parameters); the reason is logged (a warning when augmented views are cached), and
    `TrunkCachedDataModule.summary()` is what metrics.json records.

    Args:
        model: the EcgClassifier (its backbone is cut; `model.trunk_split` is set when the cache is used).
        datamodule: the EcgDataModule whose loaders the cache wraps.
        mode: `auto`, `on` or `off` (`model.trunk_cache`).
        views: pre-drawn augmented views per training image (`model.trunk_cache_views`); None: 1 or refused.
        verify: `stat` or `full` (see `TrunkCacheStore`); None: the model's `trunk_cache_verify`.
        cache_dir: where entries go; None: `<datamodule.cache_root>/trunk`.
        dtype: the stored dtype of the features.

    Returns:
        `datamodule` itself, or the TrunkCachedDataModule that serves cached features.

    Raises:
        TypeError: the cache applies but `model` has no `trunk_split` hook.
    """
    hparams = getattr(model, "hparams", {}) or {}
    train_set = datamodule.dataset("train")
    plan = plan_trunk_cache(model.backbone, mode, views, augment=train_set.augment is not None,
                            gradual_unfreeze=hparams.get("gradual_unfreeze"),
                            page_augment=getattr(train_set, "page_augment", None) is not None)
    (log.warning if plan.augmented else log.info)(plan.reason)
    if plan.split is None:
        return datamodule
    if not hasattr(model, "trunk_split"):
        raise TypeError(f"{type(model).__name__} has no `trunk_split` hook: it cannot train on cached features")
    model.trunk_split = plan.split
    root = cache_dir or Path(datamodule.cache_root) / "trunk"
    verify = parse_verify(hparams.get("trunk_cache_verify") if verify is None else verify)
    return TrunkCachedDataModule(datamodule, plan.split, plan.views, root=root, dtype=dtype, verify=verify)


def maybe_use_trunk_cache(
    cfg: Any, model: Any, datamodule: Any, cache_dir: str | Path | None = None, dtype: str = "float16"
) -> Any:
    """Deprecated: `use_trunk_cache` with `cfg.model.trunk_cache`, `trunk_cache_views` and `trunk_cache_verify`."""
    import warnings

    warnings.warn("maybe_use_trunk_cache(cfg, ...) is deprecated; call use_trunk_cache(model, datamodule, mode, "
                  "views, verify) with plain values", DeprecationWarning, stacklevel=2)
    mcfg = cfg.get("model") or {}
    return use_trunk_cache(model, datamodule, mcfg.get("trunk_cache", "auto"), mcfg.get("trunk_cache_views"),
                           mcfg.get("trunk_cache_verify"), cache_dir, dtype)

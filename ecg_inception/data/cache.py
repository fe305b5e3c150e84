"""Decoded-image cache: preprocessed uint8 tensors on disk, keyed by file content and preprocessing settings.

Decoding a full-size printout and cropping/resizing it costs tens of milliseconds per image and per
epoch; a cached tensor loads in well under one. Entries live on disk so DataLoader workers and
concurrent jobs share them; writes are atomic (temp file + os.replace) and every entry carries a
CRC32, so a partial or corrupt file is detected and rebuilt, never trusted. A small per-process
memory layer sits on top.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import PIL
import torch
from torch.utils.data import get_worker_info

from ecg_inception.core.hashing import file_sha256  # noqa: F401 - re-exported (tests, trunk cache)
from ecg_inception.core.locks import file_lock
from ecg_inception.core.sizes import parse_image_size, size_value
from ecg_inception.data.crop import CropBox
from ecg_inception.data.transforms import PREPROCESS_VERSION

CACHE_VERSION = 4  # bump when preprocessing changes in a way the settings do not show (2: EXIF orientation; 3: physical scale, ink by colour; 4: preprocessing version in the settings)
_MAGIC = b"ECGU8\x00"
_HEADER = struct.Struct("<6sHHIII")  # magic, version, channels, height, width, crc32 of the payload
_SLOTS = 64  # counter rows: the main process, then one per DataLoader worker id (two loaders' workers share one)

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$ECG_INCEPTION_CACHE`, else `~/.cache/ecg_inception`: the root of every cache this library keeps."""
    env = os.environ.get("ECG_INCEPTION_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ecg_inception"


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything besides file content that decides a preprocessed tensor; part of the cache key.

    `size` is (height, width); an int (a square) is accepted and stored as a pair.
    """

    size: tuple[int, int]
    resize: str = "squash"
    interpolation: str = "bicubic"
    crop: bool = False
    box: CropBox | None = None  # used only when `crop` is True
    ink: bool = False  # grid removed before resizing (transforms.ink_image)
    version: int = PREPROCESS_VERSION  # the preprocessing version reproduced (transforms.preprocess)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", parse_image_size(self.size))

    def fingerprint(self) -> str:
        """A stable text of the settings, the cache format version and the Pillow version that resizes."""
        fields = asdict(self)
        fields["size"] = size_value(self.size)  # a square stays an int: keys made before [h, w] stay valid
        fields["box"] = self.box.as_list() + [bool(self.box.fallback)] if (self.crop and self.box) else None
        if not self.ink:  # keys made before the ink option stay valid
            del fields["ink"]
        fields.update(version=CACHE_VERSION, pillow=PIL.__version__)
        return json.dumps(fields, sort_keys=True)


@dataclass(frozen=True)
class CacheStats:
    """Lookups since the cache was made (or reset), summed over the main process and its workers."""

    hits: int
    misses: int
    memory_hits: int
    corrupt: int

    @property
    def lookups(self) -> int:
        return self.hits + self.misses


def log_rebuilt(stats: CacheStats | None, directory: Path, stage: str | None, reported: int) -> int:
    """Warn once about the corrupt entries rebuilt since `reported` of them were last reported.

    Args:
        stats: the cache counters (None: cache off, nothing to say).
        directory: the cache folder, for the message.
        stage: what just ended (fit, validate, test), for the message.
        reported: how many corrupt entries earlier calls reported.

    Returns:
        The number reported so far, to pass as `reported` next time.
    """
    if stats is None or stats.corrupt <= reported:
        return reported
    new = stats.corrupt - reported
    log.warning(
        "decoded cache %s: %d corrupt %s found and rebuilt (%s; %d lookups so far)",
        directory, new, "entry" if new == 1 else "entries", stage or "run", stats.lookups,
    )  # fmt: skip
    return stats.corrupt


class DecodedCache:
    """Disk cache of preprocessed uint8 [3, size, size] tensors under `<directory>`.

    `directory` defaults to `default_cache_dir() / "decoded"`; `memory_mb` bounds the per-process
    memory layer (0 turns it off). Counters live in shared memory, so hit/miss counts made inside
    DataLoader workers are visible from the main process.
    """

    def __init__(self, directory: str | Path | None = None, memory_mb: float = 64.0) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir() / "decoded"
        self.memory_bytes = int(memory_mb * 2**20)
        self._counts = torch.zeros((_SLOTS, 4), dtype=torch.int64).share_memory_()
        # Processes that add to one row (the workers of the train and val loaders, which run at once while the
        # train loader prefetches; any forked child) hold this file's lock (`core.locks.file_lock`): `row +=
        # delta` is a read and a write, and two processes doing it at once lose a count.
        self._counts_lock_path: str | None = None
        try:
            fd, self._counts_lock_path = tempfile.mkstemp(prefix="ecg_inception-cache-counts-", suffix=".lock")
            os.close(fd)
            weakref.finalize(self, _remove_lock_file, self._counts_lock_path, os.getpid())
        except OSError as err:  # no writable temp folder: counts made at the same instant may be lost
            log.debug("decoded cache: no lock file for the hit counters (%s)", err)
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._memory_used = 0
        self._lock = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_memory=OrderedDict(), _memory_used=0, _lock=None)  # each process keeps its own layer
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def key(self, content_sha256: str, settings: PreprocessSettings) -> str:
        """Cache key of one file content under one set of preprocessing settings."""
        return hashlib.sha256(f"{content_sha256}\n{settings.fingerprint()}".encode()).hexdigest()

    def entry_path(self, key: str) -> Path:
        """Where the entry of `key` lives on disk."""
        return self.directory / key[:2] / f"{key}.u8"

    def get(
        self, path: str | Path, settings: PreprocessSettings, build: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """The preprocessed tensor of `path`: from memory, from disk, or `build()` and store it."""
        key = self.key(file_sha256(path), settings)
        with self._lock:
            cached = self._memory.get(key)
            if cached is not None:
                self._memory.move_to_end(key)
                self._count(hits=1, memory_hits=1)
                return cached.clone()
        entry = self.entry_path(key)
        expected = (3, *settings.size)
        tensor, found = _read_entry(entry, expected)
        if tensor is not None:
            self._count(hits=1)
        else:
            self._count(misses=1, corrupt=int(found))
            if found:  # counted in stats(); EcgDataModule.teardown logs the total per fit/validate/test
                log.debug("%s: decoded-cache entry %s is corrupt or stale: rebuilding it", path, entry)
            tensor = build()
            if tensor.dtype != torch.uint8 or tuple(tensor.shape) != expected:
                raise ValueError(
                    f"{path}: built {tuple(tensor.shape)} {tensor.dtype}, expected {expected} uint8"
                )
            _write_entry(entry, tensor)
        self._remember(key, tensor)
        return tensor

    def stats(self) -> CacheStats:
        """Hit, miss, memory-hit and corrupt-entry counts over every process that used this cache."""
        hits, misses, memory_hits, corrupt = (int(v) for v in self._counts.sum(dim=0).tolist())
        return CacheStats(hits, misses, memory_hits, corrupt)

    def reset_stats(self) -> None:
        """Zero the counters (for example between epochs)."""
        self._counts.zero_()

    def _count(self, hits: int = 0, misses: int = 0, memory_hits: int = 0, corrupt: int = 0) -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (_SLOTS - 1)
        delta = torch.tensor([hits, misses, memory_hits, corrupt], dtype=torch.int64)
        with self._lock, self._counts_locked():
            row = self._counts[slot]
            row += delta

    @contextlib.contextmanager
    def _counts_locked(self) -> Iterator[None]:
        """Hold the counters' file lock (inside `self._lock`, which serialises this process's threads)."""
        path = self._counts_lock_path
        with contextlib.ExitStack() as stack:
            # no lock file (none could be made, or the cache that made it is gone; never re-create it): count
            # without; opening only an existing file leaves no window in which a removed one comes back
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    stack.enter_context(file_lock(path, create=False))
            yield

    def _remember(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel()
        if size > self.memory_bytes:
            return
        with self._lock:
            if key in self._memory:
                return
            self._memory[key] = tensor.clone()
            self._memory_used += size
            while self._memory_used > self.memory_bytes:
                _, old = self._memory.popitem(last=False)
                self._memory_used -= old.numel()


def _remove_lock_file(path: str, owner_pid: int) -> None:
    """Delete a cache's counter lock file, from the process that created it only."""
    if os.getpid() == owner_pid:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _read_entry(entry: Path, expected: tuple[int, int, int]) -> tuple[torch.Tensor | None, bool]:
    """Load and verify one entry: (tensor or None when missing or invalid, whether a file was there)."""
    try:
        data = entry.read_bytes()
    except FileNotFoundError:
        return None, False
    except OSError:
        return None, True
    if len(data) < _HEADER.size:
        return None, True
    magic, version, c, h, w, crc = _HEADER.unpack_from(data)
    payload = memoryview(data)[_HEADER.size :]
    if magic != _MAGIC or version != CACHE_VERSION or (c, h, w) != expected or len(payload) != c * h * w:
        return None, True
    if zlib.crc32(payload) != crc:
        return None, True
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(c, h, w), True


def _write_entry(entry: Path, tensor: torch.Tensor) -> None:
    """Write atomically: a temp file in the same folder, then os.replace (readers never see half a file)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    payload = tensor.contiguous().numpy().tobytes()
    header = _HEADER.pack(_MAGIC, CACHE_VERSION, *tensor.shape, zlib.crc32(payload))
    fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(header)
            fh.write(payload)
        os.replace(tmp, entry)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def distributed_world_size() -> int:
    """The number of ranks of the initialised torch.distributed process group, 1 without one."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def distributed_rank() -> int:
    """This process's rank in the initialised torch.distributed process group, 0 without one."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _DecodeItem(torch.utils.data.Dataset):
    """Item i = 0, after image i of a split (anything with `load_uint8(i)`) is in the decoded cache."""

    def __init__(self, images: Any) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> int:
        self.images.load_uint8(i)
        return 0


def warm_decoded_cache(datasets: list[Any], num_workers: int = 0) -> int:
    """Put every image of `datasets` (EcgImageDataset-like) into their decoded caches, with DataLoader workers.

    Args:
        datasets: Datasets with `__len__` and `load_uint8(i)` (which reads through the cache).
        num_workers: DataLoader workers for the pass.

    Returns:
        The number of images visited.
    """
    total = 0
    for images in datasets:
        if len(images) == 0:
            continue
        for _ in torch.utils.data.DataLoader(_DecodeItem(images), batch_size=16, num_workers=num_workers):
            pass
        total += len(images)
    return total

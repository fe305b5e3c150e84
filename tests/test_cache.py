"""Decoded-image cache: keys, invalidation, corruption, concurrency and shared hit counts."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ecg_inception.data.cache import DecodedCache, PreprocessSettings, default_cache_dir, file_sha256
from ecg_inception.data.crop import CropBox

SETTINGS = PreprocessSettings(
    size=8, resize="squash", interpolation="bicubic", crop=True, box=CropBox(0, 0, 5, 5)
)

BIG = PreprocessSettings(size=128)


def _image(value: int, size: int | tuple[int, int] = 8) -> torch.Tensor:
    height, width = (size, size) if isinstance(size, int) else size
    return torch.full((3, height, width), value, dtype=torch.uint8)


class Builder:
    """A build function that counts its calls."""

    def __init__(self, value: int = 7, size: int | tuple[int, int] = 8) -> None:
        self.calls = 0
        self.value, self.size = value, size

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return _image(self.value, self.size)


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    path = tmp_path / "ecg.jpg"
    path.write_bytes(b"first version of the file")
    return path


def test_default_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ECG_INCEPTION_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert DecodedCache().directory == tmp_path / "c" / "decoded"
    monkeypatch.delenv("ECG_INCEPTION_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "ecg_inception"


def test_miss_then_memory_and_disk_hits(tmp_path: Path, src: Path) -> None:
    cache, build = DecodedCache(tmp_path / "cache"), Builder()
    assert torch.equal(cache.get(src, SETTINGS, build), _image(7))
    assert torch.equal(cache.get(src, SETTINGS, build), _image(7))
    assert build.calls == 1
    assert cache.stats().misses == 1 and cache.stats().hits == 1 and cache.stats().memory_hits == 1
    fresh = DecodedCache(tmp_path / "cache", memory_mb=0)  # another process: disk only
    assert torch.equal(fresh.get(src, SETTINGS, build), _image(7)) and build.calls == 1
    assert (fresh.stats().hits, fresh.stats().memory_hits, fresh.stats().misses) == (1, 0, 0)
    fresh.reset_stats()
    assert fresh.stats().lookups == 0


def test_returned_tensor_is_private(tmp_path: Path, src: Path) -> None:
    cache = DecodedCache(tmp_path)
    cache.get(src, SETTINGS, Builder()).zero_()
    assert torch.equal(cache.get(src, SETTINGS, Builder()), _image(7))


def test_content_change_invalidates(tmp_path: Path, src: Path) -> None:
    cache, build = DecodedCache(tmp_path / "cache"), Builder()
    cache.get(src, SETTINGS, build)
    sha = file_sha256(src)
    src.write_bytes(b"second version, other bytes")
    os.utime(src, ns=(1_000_000_000, 1_000_000_000))
    assert file_sha256(src) != sha
    assert torch.equal(cache.get(src, SETTINGS, Builder(9)), _image(9))
    assert cache.stats().misses == 2


@pytest.mark.parametrize(
    "changed",
    [
        PreprocessSettings(size=8, resize="letterbox", crop=True, box=CropBox(0, 0, 5, 5)),
        PreprocessSettings(size=8, interpolation="bilinear", crop=True, box=CropBox(0, 0, 5, 5)),
        PreprocessSettings(size=8, crop=True, box=CropBox(0, 0, 5, 6)),
        PreprocessSettings(size=8, crop=False, box=CropBox(0, 0, 5, 5)),
    ],
)
def test_settings_change_invalidates(tmp_path: Path, src: Path, changed: PreprocessSettings) -> None:
    cache = DecodedCache(tmp_path)
    cache.get(src, SETTINGS, Builder(7))
    assert torch.equal(cache.get(src, changed, Builder(3)), _image(3))
    assert cache.stats().misses == 2


def test_size_change_and_wrong_build_rejected(tmp_path: Path, src: Path) -> None:
    cache = DecodedCache(tmp_path)
    assert cache.get(src, PreprocessSettings(size=4), Builder(1, size=4)).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="expected"):
        cache.get(src, PreprocessSettings(size=6), Builder(1, size=4))
    wide = PreprocessSettings(size=[4, 8])
    assert wide.size == (4, 8) and PreprocessSettings(size=4).size == (4, 4)
    assert cache.get(src, wide, Builder(2, size=(4, 8))).shape == (3, 4, 8)
    assert torch.equal(DecodedCache(tmp_path, memory_mb=0).get(src, wide, Builder(0)), _image(2, (4, 8)))  # disk hit
    with pytest.raises(ValueError, match=r"expected \(3, 8, 4\)"):
        cache.get(src, PreprocessSettings(size=[8, 4]), Builder(1, size=(4, 8)))


def test_square_fingerprint_unchanged_by_pair_sizes() -> None:
    """A square size keys the cache as the int it always was, so entries made before [h, w] sizes stay valid."""
    assert '"size": 8' in PreprocessSettings(size=8).fingerprint()
    assert PreprocessSettings(size=8).fingerprint() == PreprocessSettings(size=(8, 8)).fingerprint()
    assert '"size": [4, 8]' in PreprocessSettings(size=[4, 8]).fingerprint()


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_corrupt_entry_is_rebuilt(tmp_path: Path, src: Path, damage: str) -> None:
    DecodedCache(tmp_path).get(src, SETTINGS, Builder())
    entry = DecodedCache(tmp_path).entry_path(DecodedCache(tmp_path).key(file_sha256(src), SETTINGS))
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 10]
    elif damage == "flip":
        data[-1] ^= 0xFF
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"not a cache file at all" * 20)
    entry.write_bytes(bytes(data))
    cache, build = DecodedCache(tmp_path, memory_mb=0), Builder()
    assert torch.equal(cache.get(src, SETTINGS, build), _image(7))
    assert build.calls == 1 and cache.stats().corrupt == 1
    assert torch.equal(cache.get(src, SETTINGS, build), _image(7)) and build.calls == 1  # rewritten, valid


def _hammer(cache: DecodedCache, src: str, rounds: int, errors: mp.Queue) -> None:
    key = cache.key(file_sha256(src), BIG)
    for i in range(rounds):
        if i % 2:
            cache.entry_path(key).unlink(missing_ok=True)  # force fresh writes racing with reads
        got = cache.get(src, BIG, Builder(7, size=BIG.size))
        if not torch.equal(got, _image(7, size=BIG.size)):
            errors.put(f"wrong tensor in round {i}")


def _child(cache: DecodedCache, src: str, rounds: int, errors: mp.Queue) -> None:
    torch.set_num_threads(1)  # like a DataLoader worker: a forked child must not use the parent's thread pool
    _hammer(cache, src, rounds, errors)


def test_concurrent_processes_and_threads_are_safe(tmp_path: Path, src: Path) -> None:
    cache = DecodedCache(tmp_path, memory_mb=0)
    ctx = mp.get_context("fork")
    errors: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(cache, str(src), 60, errors)) for _ in range(3)]
    threads = [threading.Thread(target=_hammer, args=(cache, str(src), 60, errors)) for _ in range(2)]
    for w in procs + threads:
        w.start()
    for w in procs + threads:
        w.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs)
    assert errors.empty()
    stats = cache.stats()  # counts from the child processes arrive through shared memory
    assert stats.lookups == 5 * 60 and stats.corrupt == 0
    assert not list(tmp_path.rglob("*.tmp"))


def _memory_hits(cache: DecodedCache, src: str, rounds: int) -> None:
    torch.set_num_threads(1)
    for _ in range(rounds):
        cache.get(src, SETTINGS, Builder())


def _count_hits(cache: DecodedCache, rounds: int) -> None:
    torch.set_num_threads(1)
    for _ in range(rounds):
        cache._count(hits=1)  # the counting step alone, so that the race window is not diluted by hashing


def test_counts_of_processes_sharing_a_row_are_never_lost(tmp_path: Path, src: Path) -> None:
    # Forked children outside a DataLoader, like the main process, count in row 0; so do the workers with the same
    # id of two loaders running at once. Without a lock across processes, concurrent `row += 1` lost counts (CI:
    # 299 of 300 lookups).
    cache = DecodedCache(tmp_path)
    cache.get(src, SETTINGS, Builder())  # the one miss; every later lookup is a memory hit
    rounds = 3000
    procs = [mp.get_context("fork").Process(target=_memory_hits, args=(cache, str(src), rounds)) for _ in range(4)]
    for p in procs:
        p.start()
    _memory_hits(cache, str(src), rounds)
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 4
    stats = cache.stats()
    assert (stats.misses, stats.hits, stats.memory_hits) == (1, 5 * rounds, 5 * rounds)
    cache.reset_stats()
    rounds = 20000
    procs = [mp.get_context("fork").Process(target=_count_hits, args=(cache, rounds)) for _ in range(3)]
    for p in procs:
        p.start()
    _count_hits(cache, rounds)
    for p in procs:
        p.join(timeout=120)
    assert cache.stats().hits == 4 * rounds


def test_counter_lock_file_is_removed_with_its_cache(tmp_path: Path, src: Path) -> None:
    cache = DecodedCache(tmp_path)
    cache.get(src, SETTINGS, Builder())
    lock = Path(cache._counts_lock_path)
    clone = pickle.loads(pickle.dumps(cache))  # a worker's copy shares the lock file but does not own it
    del clone
    assert lock.is_file()
    del cache
    assert not lock.exists()


def test_counting_never_recreates_a_removed_lock_file(tmp_path: Path, src: Path, monkeypatch) -> None:
    """The lock file removed between the old `exists` check and `file_lock`'s open: it used to come back as a
    stray empty file in the temp folder. `os.path.exists` answering True plays that interleaving."""
    cache = DecodedCache(tmp_path)
    lock = Path(cache._counts_lock_path)
    lock.unlink()  # its owner removed it (a cache being collected while a clone still counts)
    monkeypatch.setattr("ecg_inception.data.cache.os.path.exists", lambda path: True)
    cache.get(src, SETTINGS, Builder())
    assert not lock.exists()
    assert cache.stats().misses == 1  # still counted, without the lock


def test_file_lock_without_create_refuses_a_missing_file(tmp_path: Path) -> None:
    from ecg_inception.core.locks import file_lock

    missing = tmp_path / "sub" / "x.lock"
    with pytest.raises(FileNotFoundError), file_lock(missing, create=False):
        pass
    assert not missing.parent.exists()
    with file_lock(missing):
        pass
    with file_lock(missing, create=False):
        assert missing.is_file()


class _Files(Dataset):
    def __init__(self, cache: DecodedCache, paths: list[Path]) -> None:
        self.cache, self.paths = cache, paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.cache.get(self.paths[i], SETTINGS, Builder(i))


def test_worker_hits_are_counted_in_main_process(tmp_path: Path) -> None:
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"f{i}.jpg")
        paths[-1].write_bytes(f"file {i}".encode())
    cache = DecodedCache(tmp_path / "cache", memory_mb=0)
    loader = DataLoader(_Files(cache, paths), batch_size=2, num_workers=1)
    for _ in range(2):
        batches = [b for b in loader]
        assert torch.equal(batches[1][1], _image(3))
    assert (cache.stats().misses, cache.stats().hits) == (4, 4)
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.directory == cache.directory and clone.stats().hits == 4

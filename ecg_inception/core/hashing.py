"""SHA-256 of bytes and of files: the content identity of every image (exact duplicates, manifests, caches)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

_SHA_MEMO: dict[tuple[str, int, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of a file's bytes: the identity of exact duplicates."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, memoised per process by (path, inode, size, mtime_ns)."""
    path = str(path)
    st = os.stat(path)
    memo_key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if memo_key in _SHA_MEMO:
            return _SHA_MEMO[memo_key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _SHA_LOCK:
        _SHA_MEMO[memo_key] = value
    return value


def clear_sha_memo() -> None:
    """Forget every memoised file hash, as a fresh process starts (benchmarks that time the first epoch)."""
    with _SHA_LOCK:
        _SHA_MEMO.clear()

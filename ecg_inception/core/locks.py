"""An exclusive advisory file lock between processes (and between the threads of one process).

Each acquisition opens the lock file itself: a forked child that inherited an open descriptor would share its
parent's open file description, and `flock` on a shared description does not exclude the other holder. The lock
is released when its holder exits, so a process killed while holding it blocks nobody.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: str | Path, create: bool = True) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` for the `with` block.

    Args:
        path: The lock file.
        create: Create the file (and its folder) when missing. False: lock only a file that exists, in one
            step (no check-then-open race that could re-create a file its owner has just removed).

    Raises:
        FileNotFoundError: `create` is False and the file does not exist (nothing is created).
        OSError: The lock file cannot be created or opened.
    """
    path = Path(path)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+" if create else "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

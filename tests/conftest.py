"""Shared fixtures: synthetic printouts made by the library's own generator, and the dev set when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEV_ROOT = Path(os.environ.get("ECG_DEV_DATA", REPO_ROOT.parent / "shared" / "data" / "mendeley-ecg-dev"))


@pytest.fixture(scope="session")
def dev_root() -> Path:
    """The real dev subset (read-only); tests using it skip cleanly where it is absent."""
    if not DEV_ROOT.is_dir():
        pytest.skip(f"dev set not found at {DEV_ROOT} (set ECG_DEV_DATA to use it)")
    return DEV_ROOT


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic printout set: 6 per class, 2 planted byte-identical copies per class, dev-copy size."""
    from ecg_inception.synthetic.generate import generate_dataset

    out = tmp_path_factory.mktemp("synthetic")
    generate_dataset(out, per_class=6, seed=0, duplicates=2, scale=0.5)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads run ~5x slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

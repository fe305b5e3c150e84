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


def tiny_overrides(root: Path, tmp: Path, out: str = "run") -> list[str]:
    """Overrides for a tiny CPU run: 75 px, batch 4, random init, everything trains, 2 epochs, quiet."""
    return [
        f"data.root={root}",
        "data.image_size=75",
        "data.batch_size=4",
        "data.num_workers=0",
        f"paths.cache_dir={tmp / 'cache'}",
        f"paths.log_dir={tmp / 'logs'}",
        f"paths.output_dir={tmp / out}",
        "model.pretrained=false",
        "model.aux_logits=false",
        "model/unfreeze=all",
        "trainer.max_epochs=2",
        "callbacks.rich_progress_bar=null",
        "+trainer.enable_model_summary=false",
        "+trainer.enable_progress_bar=false",
    ]


def compose_cfg(name: str, overrides: list[str]):
    """Compose a shipped config (train or eval) with the compose API (`ecg_inception.core.compose`)."""
    from ecg_inception.core.compose import compose_config

    return compose_config(name, overrides)


@pytest.fixture(scope="session")
def trained(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One tiny 2-epoch run on the synthetic set, shared by the training, evaluation and resume tests."""
    from ecg_inception.training import train

    tmp = tmp_path_factory.mktemp("train")
    cfg = compose_cfg("train", tiny_overrides(synthetic_root, tmp))
    metrics, objects = train(cfg)
    return tmp, cfg, metrics, objects


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads run ~5x slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny model trained by `train()` on the synthetic set (75 px, batch 2, 2 epochs, one thread), calibrated.

    Returns a dict: `ckpt` (best checkpoint path), `run` (run dir), `metrics`, `objects` (of `train`).
    """
    import torch
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from ecg_inception.training import train

    tmp = tmp_path_factory.mktemp("tiny_run")
    overrides = [
        f"data.root={synthetic_root}", "data.image_size=75", "data.batch_size=2", "data.num_workers=0",
        f"paths.cache_dir={tmp / 'cache'}", f"paths.log_dir={tmp / 'logs'}", f"paths.output_dir={tmp / 'run'}",
        "model.pretrained=false", "model.aux_logits=false", "model/unfreeze=all", "trainer.max_epochs=2",
        "callbacks.rich_progress_bar=null", "+trainer.enable_model_summary=false",
        "+trainer.enable_progress_bar=false",
        # Best by val loss: with BatchNorm statistics still moving, the later epoch has far saner logits.
        "callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=min",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="ecg_inception.conf", version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        metrics, objects = train(cfg)
    finally:
        torch.set_num_threads(threads)
        GlobalHydra.instance().clear()
    return {"ckpt": Path(metrics["best_checkpoint"]), "run": tmp / "run", "metrics": metrics, "objects": objects}


def load_checkpoint_file(path: Path) -> dict:
    """A checkpoint file as torch reads it (weights_only), for tests that compare raw states."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b, where: str) -> None:
    """Nested checkpoint states equal exactly: tensors by value and dtype, containers by keys and length."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"

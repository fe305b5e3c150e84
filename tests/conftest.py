"""Shared fixtures and helpers: synthetic printouts made by the library's own generator, the dev set when
present, tiny training configs (`tiny_overrides`, `compose_cfg`, the `cfg_train` fixture) and runs (`trained`,
`tiny_run`), the training CLI (`run_cli`, `tiny_sweep_args`), the benchmark scripts (`run_benchmark`), checkpoint comparisons, the scale tests' bound.

Test modules import the helpers with `from conftest import ...`, never from one another."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

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


def tiny_overrides(root: Path, tmp: Path, out: str = "run", debug: str | None = None) -> list[str]:
    """Overrides for a tiny CPU run: 75 px, batch 4, random init, everything trains, 2 epochs, quiet.

    Paths go under `tmp` (run dir `tmp / out`). With `debug` (a `conf/debug/` name: default, limit, overfit,
    profiler) the epochs, callbacks (none) and batch limits are that config's instead: a command-line
    `trainer.max_epochs` or `callbacks.*` would win over it, or fail where it removed the callbacks.
    """
    overrides = [
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
        # Neither key is in conf/trainer: Lightning's defaults (on) otherwise.
        "+trainer.enable_model_summary=false",
        "+trainer.enable_progress_bar=false",
    ]
    if debug is not None:
        return [*overrides, f"debug={debug}"]
    # The rich bar is a callback: it must go too, or Lightning refuses enable_progress_bar=false.
    return [*overrides, "trainer.max_epochs=2", "callbacks.rich_progress_bar=null"]


def compose_cfg(name: str, overrides: list[str], return_hydra_config: bool = False):
    """Compose a shipped config (train or eval) with the compose API (`ecg_inception.core.compose`)."""
    from ecg_inception.core.compose import compose_config

    return compose_config(name, overrides, return_hydra_config=return_hydra_config)


@pytest.fixture
def cfg_train(synthetic_root: Path, tmp_path: Path) -> DictConfig:
    """lightning-hydra-template's `cfg_train`: the composed train config of a tiny CPU run (`tiny_overrides`)
    on the session's synthetic set, every path under this test's `tmp_path` (run dir `tmp_path / "run"`).

    A test sets values in place (`cfg_train.trainer.max_epochs = 1`; `open_dict` for a key the config lacks);
    a group choice (`model/unfreeze=head`, `debug=default`) needs
    `compose_cfg("train", tiny_overrides(...) + [...])`.
    """
    return compose_cfg("train", tiny_overrides(synthetic_root, tmp_path))


def tiny_sweep_args(root: Path, tmp: Path) -> list[str]:
    """A very small training job (test_convnext, no BatchNorm, 64 px, 1 epoch), as CLI overrides.

    Run dirs are left to Hydra (under `tmp / "logs"`).
    """
    return [
        f"data.root={root}",
        "data.image_size=64",
        "data.batch_size=4",
        "data.num_workers=0",
        f"paths.cache_dir={tmp / 'cache'}",
        f"paths.log_dir={tmp / 'logs'}",
        "model.model_name=test_convnext",
        "model.pretrained=false",
        "model.aux_logits=false",
        "model/unfreeze=all",
        "trainer.max_epochs=1",
        "callbacks.rich_progress_bar=null",
        "+trainer.enable_model_summary=false",
        "+trainer.enable_progress_bar=false",
        "plots=false",
    ]


def run_cli(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m ecg_inception.cli.train *args` in `cwd`: full Hydra errors, one OpenMP thread."""
    env = dict(os.environ, HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "ecg_inception.cli.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def run_benchmark(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python benchmarks/<name>.py *args` on one OpenMP thread; stdout and stderr captured.

    Each runs in its own process: a benchmark sets torch's threads, warning filters and log levels for the whole
    process (`_common.quiet_warnings`), which must not leak into the tests that follow.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / f"{name}.py"), *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


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
    from ecg_inception.core.cpus import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny model trained by `train()` on the synthetic set (75 px, batch 2, 2 epochs, one thread), calibrated.

    Returns a dict: `ckpt` (best checkpoint path), `run` (run dir), `metrics`, `objects` (of `train`).
    """
    from ecg_inception.core.cpus import torch_threads
    from ecg_inception.training import train

    tmp = tmp_path_factory.mktemp("tiny_run")
    overrides = [
        *tiny_overrides(synthetic_root, tmp),
        "data.batch_size=2",  # the later value wins
        # Best by val loss: with BatchNorm statistics still moving, the later epoch has far saner logits.
        "callbacks.model_checkpoint.monitor=val/loss",
        "callbacks.model_checkpoint.mode=min",
    ]
    with torch_threads(1):
        metrics, objects = train(compose_cfg("train", overrides))
    best = Path(metrics["best_checkpoint"])
    return {"ckpt": best, "run": tmp / "run", "metrics": metrics, "objects": objects}


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """A script of examples/ imported as a module (examples/ on sys.path, for the scripts' own imports)."""
    import importlib.util

    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


# Agreement of two model inputs of one page (ink, [128, 256]), the same bound for synthetic pages at any scale
# (test_scale.py) and for the real originals vs their half-resolution twins (test_scale_invariance.py).
# Measured (new preprocessing): synthetic 0.5x / 1.5x vs 1x, 8 pages: mean abs diff <= 3.0 / 1.8, trace IoU
# >= 0.77 / 0.85; real pairs: <= 3.9, >= 0.74. The old preprocessing gave the real pairs 50-54.
SCALE_SIZE = [128, 256]
SCALE_MAX_ABS_DIFF = 5.0
SCALE_MIN_TRACE_IOU = 0.7


def scale_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean absolute difference of two uint8-range inputs, and the IoU of their traces (pixels below 128)."""
    ta, tb = a < 128, b < 128
    return float((a - b).abs().mean()), float((ta & tb).sum() / (ta | tb).sum())

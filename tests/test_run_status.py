"""Bad input as a user meets it: a diverging loss, an impossible input size, files a split leaves out, and the
console scripts' exit codes (library errors: the message alone and 2; a diverged run: 1)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import compose_cfg, tiny_overrides
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ecg_inception.errors import ConfigValueError
from ecg_inception.training import setup_datamodule, train


class BlowsUp(pl.LightningModule):
    """A linear model whose loss is NaN from the third step on."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.head(x), y)
        return loss * float("nan") if self.global_step >= 2 else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.25)


def test_the_first_non_finite_loss_stops_the_fit_naming_step_and_learning_rate(tmp_path) -> None:
    from ecg_inception.callbacks import FiniteLoss
    from ecg_inception.errors import TrainingDivergedError

    data = TensorDataset(torch.randn(32, 3), torch.randint(0, 2, (32,)))
    trainer = pl.Trainer(max_epochs=3, callbacks=[FiniteLoss()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 3 \(epoch 0\).*learning rate.*0\.25"):
        trainer.fit(BlowsUp(), DataLoader(data, batch_size=4))
    assert trainer.global_step == 3


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | env
    return subprocess.run([sys.executable, "-m", "ecg_inception.cli.train", *args], capture_output=True, text=True,
                          cwd=cwd, env=environ, timeout=600)


def test_a_diverging_run_writes_status_diverged_and_exits_1(synthetic_root: Path, tmp_path: Path) -> None:
    """Before the fix lr=1e9 crashed in EarlyStopping ("val/loss not available") and wrote no metrics.json."""
    args = tiny_overrides(synthetic_root, tmp_path) + ["model.optimizer.lr=1e9", "trainer.max_epochs=1", "plots=false"]
    proc = _cli(args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "ecg-inception-train: run diverged: TrainingDivergedError: training diverged" in proc.stderr
    assert "learning rate" in proc.stderr.splitlines()[-1]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["status"] == "diverged" and "learning rate" in saved["error"] and saved["step"] >= 1
    assert saved["test"] is None and saved["val"] is None


def test_a_run_that_fails_records_status_failed(cfg_train, tmp_path: Path, monkeypatch) -> None:
    from ecg_inception.models.module import EcgClassifier

    def broken(self, batch, batch_idx):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(EcgClassifier, "training_step", broken)
    cfg_train.plots = False
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(cfg_train)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["status"] == "failed" and saved["error"] == "RuntimeError: disk on fire"


def test_image_size_10_is_refused_before_any_data(cfg_train, tmp_path: Path) -> None:
    cfg_train.data.image_size = 10
    with pytest.raises(ConfigValueError, match=r"data.image_size=10: inception_v3 needs .* at least 75 px"):
        train(cfg_train)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "splits.csv").exists()


def test_files_left_out_get_a_one_line_summary(cfg_train, synthetic_root: Path, tmp_path: Path, caplog) -> None:
    """Before the fix only splits.excluded.csv listed them; neither the console nor train.log said so."""
    (tmp_path / "data").mkdir()
    root = tmp_path / "data" / "set"
    import shutil

    shutil.copytree(synthetic_root, root)
    (next(root.iterdir()) / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    cfg_train.data.root = str(root)
    (tmp_path / "run").mkdir()
    with caplog.at_level(logging.WARNING, logger="ecg_inception.run_setup"):
        setup_datamodule(cfg_train, tmp_path / "run", None)
    lines = [r.getMessage() for r in caplog.records if "left out of the split" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("9 files left out of the split (8 exact copy, 1 unreadable); list: ")
    assert lines[0].endswith(str(tmp_path / "run" / "splits.excluded.csv"))


def test_cli_prints_a_library_error_alone_and_exits_2(synthetic_root: Path, tmp_path: Path) -> None:
    """Before the fix Hydra printed a traceback and exited 1 for the library's own errors."""
    args = tiny_overrides(synthetic_root, tmp_path) + ["data.image_size=10"]
    proc = _cli(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("ecg-inception-train: error: data.image_size=10")
    assert "Traceback" not in proc.stderr
    full = _cli(args, tmp_path, HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigValueError" in full.stderr


def test_a_missing_ckpt_path_is_a_library_error_alone_with_exit_2(tmp_path: Path) -> None:
    """Before the fix `resolve_ckpt_path` raised a plain FileNotFoundError: a Hydra traceback and exit 1."""
    missing = tmp_path / "nope.ckpt"
    args = tiny_overrides(tmp_path / "no_data", tmp_path) + [f"ckpt_path={missing}"]
    proc = _cli(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"ecg-inception-train: error: ckpt_path={missing}: no such checkpoint file"
    assert "Traceback" not in proc.stderr


def test_a_missing_checkpoint_and_a_group_entry_without_target_are_library_errors(tmp_path: Path) -> None:
    """Eval's missing checkpoint and a callbacks/logger entry that is not a config were plain builtin errors."""
    from omegaconf import OmegaConf

    from ecg_inception.errors import CheckpointError, EcgInceptionError
    from ecg_inception.training import evaluate, instantiate_named

    missing = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError, match="no such checkpoint file") as info:
        evaluate(compose_cfg("eval", [f"ckpt_path={missing}", f"paths.output_dir={tmp_path / 'e'}"]))
    assert isinstance(info.value, FileNotFoundError)  # still what it was for code that catches the builtin
    with pytest.raises(ConfigValueError, match="callbacks.bad: expected a config with _target_") as info:
        instantiate_named("callbacks", OmegaConf.create({"bad": 3}))
    assert isinstance(info.value, EcgInceptionError)

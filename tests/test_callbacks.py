"""BestWeights keeps the best epoch's weights in memory and restores them when fitting ends; EmaWeights tests
the averaged weights its checkpoints hold."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ecg_inception.callbacks import BestWeights, EmaWeights

SCORES = [0.5, 0.9, 0.7]


class Scripted(pl.LightningModule):
    """A linear model with a frozen layer, logging a scripted validation score per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.bn(self.head(self.frozen(x))), y)

    def validation_step(self, batch, _):
        self.log("val/acc", SCORES[self.current_epoch])

    def on_validation_epoch_end(self) -> None:
        self.snapshots.append({k: v.clone() for k, v in self.state_dict().items()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.5)


def test_best_epoch_is_restored_and_saved(tmp_path) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 3), torch.randint(0, 2, (16,)))
    loader = DataLoader(data, batch_size=8)
    model = Scripted()
    cb = BestWeights(monitor="val/acc", mode="max", save_path=str(tmp_path / "best.ckpt"))
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, loader, loader)
    assert cb.best_epoch == 1 and abs(cb.best_score - 0.9) < 1e-6
    restored = model.state_dict()
    best = model.snapshots[1]
    assert not torch.equal(model.snapshots[2]["head.weight"], best["head.weight"])
    for key, value in best.items():
        assert torch.equal(restored[key], value), key
    saved = torch.load(tmp_path / "best.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(saved["head.weight"], best["head.weight"])
    assert "optimizer_states" not in torch.load(tmp_path / "best.ckpt", weights_only=True)


def test_only_changing_tensors_are_copied() -> None:
    keys = BestWeights._changing_keys(Scripted())
    assert set(keys) == {
        "head.weight",
        "head.bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }


class Averaged(pl.LightningModule):
    """A linear model that records the weights it validates and tests with."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)
        self.seen: dict[str, torch.Tensor] = {}

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.head(x), y)

    def validation_step(self, batch, _):
        self.seen["val"] = self.head.weight.detach().clone()
        self.log("val/loss", float(self.current_epoch))

    def test_step(self, batch, _):
        self.seen["test"] = self.head.weight.detach().clone()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_ema_weights_are_validated_checkpointed_and_tested(tmp_path) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 3), torch.randint(0, 2, (32,)))
    loader = DataLoader(data, batch_size=8)
    model = Averaged()
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/loss", mode="min", save_top_k=1)
    trainer = pl.Trainer(max_epochs=2, callbacks=[EmaWeights(decay=0.5), ckpt], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, loader, loader)
    saved = torch.load(ckpt.best_model_path, weights_only=True)
    averaged, raw = saved["state_dict"]["head.weight"], saved["current_model_state"]["head.weight"]
    assert not torch.allclose(averaged, raw)  # lr 1.0 and decay 0.5: the average lags the raw weights
    trainer.test(model, loader, ckpt_path=ckpt.best_model_path, verbose=False)
    assert torch.equal(model.seen["test"], averaged)
    trainer.validate(model, loader, ckpt_path=ckpt.best_model_path, verbose=False)
    assert torch.equal(model.seen["val"], averaged)


def test_ema_before_start_epoch_leaves_the_current_weights(tmp_path) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 3), torch.randint(0, 2, (32,)))
    loader = DataLoader(data, batch_size=8)
    model = Averaged()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(max_epochs=2, callbacks=[EmaWeights(decay=0.5, start_epoch=5), ckpt], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, loader, loader)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert "current_model_state" not in saved
    assert torch.equal(saved["state_dict"]["head.weight"], model.head.weight)
    assert torch.equal(model.seen["val"], model.head.weight)


def test_ema_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="decay"):
        EmaWeights(decay=1.5)
    with pytest.raises(ValueError, match="start_epoch"):
        EmaWeights(start_epoch=-1)

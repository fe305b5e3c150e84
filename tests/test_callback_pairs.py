"""Every pair of weight-touching callbacks (EmaWeights, BestWeights, ModelCheckpoint, GradualUnfreeze): the weights
that validation scored at the best epoch are the weights that are kept, saved and tested."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ecg_inception.callbacks import BestWeights, EmaWeights
from ecg_inception.models.freezing import GradualUnfreeze

#: val/acc per epoch: the best epoch is 1 (EMA tests) or 0 (gradual unfreezing, before the unfreeze).
SCORES = [0.5, 0.9, 0.7, 0.6]


class TinyTrunk(nn.Module):
    """Two conv blocks and an `fc` head: `backbone_blocks` finds b1 and b2, GradualUnfreeze can open them."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.b2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b2(self.b1(x)).mean(dim=(2, 3)))


class Recorder(pl.LightningModule):
    """Logs a scripted val/acc and records the full state that each validation epoch ran with."""

    def __init__(self, scores: list[float], frozen_trunk: bool = False) -> None:
        super().__init__()
        self.scores = scores
        self.backbone = TinyTrunk()
        if frozen_trunk:
            self.backbone.b1.requires_grad_(False)
            self.backbone.b2.requires_grad_(False)
        self.validated: list[dict[str, torch.Tensor]] = []
        self.tested: dict[str, torch.Tensor] | None = None

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.backbone(x), y)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.validated.append(self._snapshot())
        self.log("val/acc", self.scores[self.current_epoch])

    def test_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.tested = self._snapshot()

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 2, (16,), generator=g))
    return DataLoader(data, batch_size=4)


def _fit(model: Recorder, callbacks: list[pl.Callback], epochs: int, tmp_path) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, default_root_dir=tmp_path,
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, _loader(), _loader())
    return trainer


def _assert_same(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    for key, value in expected.items():
        assert torch.equal(state[key], value), f"{what}: {key} is not what validation scored at the best epoch"


def test_ema_and_best_weights_keep_the_averaged_weights_that_won(tmp_path) -> None:
    """Before the fix BestWeights copied the raw weights (EMA had already swapped them back)."""
    model = Recorder(SCORES[:3])
    best = BestWeights(monitor="val/acc", mode="max", save_path=str(tmp_path / "best.ckpt"))
    trainer = _fit(model, [EmaWeights(decay=0.5), best], 3, tmp_path)
    assert best.best_epoch == 1
    won = model.validated[1]
    _assert_same(model.state_dict(), won, "restored model")
    _assert_same(torch.load(tmp_path / "best.ckpt", weights_only=True)["state_dict"], won, "best.ckpt")
    trainer.test(model, _loader(), verbose=False)
    _assert_same(model.tested, won, "test")


def test_ema_best_weights_and_model_checkpoint_agree(tmp_path) -> None:
    model = Recorder(SCORES[:3])
    best = BestWeights(monitor="val/acc", mode="max")
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", save_top_k=1)
    trainer = _fit(model, [EmaWeights(decay=0.5), best, ckpt], 3, tmp_path)
    won = model.validated[1]
    _assert_same(torch.load(ckpt.best_model_path, weights_only=True)["state_dict"], won, "ModelCheckpoint")
    _assert_same(model.state_dict(), won, "BestWeights")
    trainer.test(model, _loader(), ckpt_path=ckpt.best_model_path, verbose=False)
    _assert_same(model.tested, won, "test of the best checkpoint")


def test_best_weights_and_model_checkpoint_agree_without_ema(tmp_path) -> None:
    model = Recorder(SCORES[:3])
    best = BestWeights(monitor="val/acc", mode="max")
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", save_top_k=1)
    _fit(model, [best, ckpt], 3, tmp_path)
    won = model.validated[1]
    _assert_same(torch.load(ckpt.best_model_path, weights_only=True)["state_dict"], won, "ModelCheckpoint")
    _assert_same(model.state_dict(), won, "BestWeights")


def test_best_weights_before_a_gradual_unfreeze_restore_the_whole_best_state(tmp_path) -> None:
    """Best epoch 0 (trunk frozen), trunk opened at epoch 1: before the fix the opened blocks kept their later
    weights, so the restored model was a mix that validation never scored."""
    model = Recorder([0.9, 0.5, 0.6], frozen_trunk=True)
    best = BestWeights(monitor="val/acc", mode="max", save_path=str(tmp_path / "best.ckpt"))
    _fit(model, [GradualUnfreeze({1: "all"}, lr_factor=1.0), best], 3, tmp_path)
    won = model.validated[0]
    assert not torch.equal(model.validated[2]["backbone.b1.0.weight"], won["backbone.b1.0.weight"])
    _assert_same(model.state_dict(), won, "restored model")
    _assert_same(torch.load(tmp_path / "best.ckpt", weights_only=True)["state_dict"], won, "best.ckpt")


def test_ema_and_gradual_unfreeze_validate_and_checkpoint_the_average(tmp_path) -> None:
    """The blocks opened mid-run are averaged too: the best checkpoint holds what validation scored."""
    model = Recorder([0.5, 0.6, 0.9, 0.7], frozen_trunk=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", save_top_k=1)
    _fit(model, [GradualUnfreeze({1: "all"}, lr_factor=1.0), EmaWeights(decay=0.5), ckpt], 4, tmp_path)
    saved = torch.load(ckpt.best_model_path, weights_only=True)
    won = model.validated[2]
    _assert_same(saved["state_dict"], won, "ModelCheckpoint")
    key = "backbone.b1.0.weight"
    assert not torch.equal(saved["current_model_state"][key], won[key])  # averaged, not raw, for opened blocks
    assert not torch.equal(model.validated[0][key], won[key])  # and they did train


def test_gradual_unfreeze_and_model_checkpoint_restore_the_best_epoch(tmp_path) -> None:
    model = Recorder([0.5, 0.9, 0.6], frozen_trunk=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", save_top_k=1)
    trainer = _fit(model, [GradualUnfreeze({1: "all"}, lr_factor=1.0), ckpt], 3, tmp_path)
    trainer.test(model, _loader(), ckpt_path=ckpt.best_model_path, verbose=False)
    _assert_same(model.tested, model.validated[1], "test of the best checkpoint")


def test_the_shipped_checkpoints_keep_the_best_epoch_and_the_last_one(tmp_path) -> None:
    """callbacks=default: the best file holds the best epoch and last.ckpt the last epoch. Before the fix
    `save_last: true` (Lightning 2.6) wrote last.ckpt only in improving epochs, so `ckpt_path=last` resumed from
    the best epoch and trained the later epochs again."""
    from conftest import compose_cfg

    from ecg_inception.training import instantiate_callbacks

    cfg = compose_cfg("train", [f"paths.output_dir={tmp_path}", "callbacks.early_stopping=null",
                                "callbacks.rich_progress_bar=null", "callbacks.lr_monitor=null"])
    model = Recorder([0.9, 0.5, 0.6])
    _fit(model, instantiate_callbacks(cfg.callbacks), 3, tmp_path)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 12
    best = [p for p in (tmp_path / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    assert len(best) == 1 and torch.load(best[0], weights_only=True)["epoch"] == 0

"""Training callbacks of our own: keep the best weights in memory instead of writing a checkpoint per epoch."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)


class BestWeights(pl.Callback):
    """Track the best epoch by `monitor` and restore its weights when fitting ends.

    A sweep job trains only a small tail; writing a full inception_v3 checkpoint (about 100 MB) every epoch
    would cost more than the training itself. This callback copies only the tensors that can change (the
    trainable parameters and the buffers of modules that own them) whenever the monitored value improves,
    puts them back at the end of `fit`, and writes one weights-only checkpoint to `save_path` if given.
    """

    def __init__(self, monitor: str = "val/acc", mode: str = "max", save_path: str | None = None) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"BestWeights: mode must be 'min' or 'max', got {mode!r}")
        self.monitor = monitor
        self.mode = mode
        self.save_path = save_path
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_model_path: str = ""
        self._state: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _changing_keys(module: torch.nn.Module) -> list[str]:
        keys: list[str] = []
        for name, sub in module.named_modules():
            own = list(sub.named_parameters(recurse=False))
            if not any(p.requires_grad for _, p in own):
                continue
            prefix = f"{name}." if name else ""
            keys += [prefix + n for n, _ in own]
            keys += [prefix + n for n, b in sub.named_buffers(recurse=False) if b is not None]
        return keys

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_score is None:
            return True
        return value > self.best_score if self.mode == "max" else value < self.best_score

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if not self._improved(value):
            return
        self.best_score, self.best_epoch = value, trainer.current_epoch
        state = pl_module.state_dict()
        self._state = {k: state[k].detach().clone() for k in self._changing_keys(pl_module) if k in state}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._state is None:
            log.warning("BestWeights: %s was never logged; keeping the last weights", self.monitor)
            return
        pl_module.load_state_dict(self._state, strict=False)
        log.info("BestWeights: restored epoch %s (%s=%.4f)", self.best_epoch, self.monitor, self.best_score)
        if self.save_path:
            path = Path(self.save_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(path, weights_only=True)
            self.best_model_path = str(path)

"""Training callbacks of our own: best weights kept in memory for sweeps; a run-long weight average (EMA); a stop at
the first non-finite loss."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging

from ecg_inception.errors import TrainingDivergedError

log = logging.getLogger(__name__)


class FiniteLoss(pl.Callback):
    """Stop a fit at the first NaN or infinite training loss with `TrainingDivergedError` (step, epoch, lr).

    Without it a diverged run goes on to validate NaN weights, picks a "best" checkpoint among them and reports
    chance accuracy as if it were a result.
    """

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor) or bool(torch.isfinite(loss.detach()).all()):
            return
        lr = None
        if trainer.optimizers:
            lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        value = float(loss.detach().float().reshape(-1)[0])
        raise TrainingDivergedError(step=trainer.global_step, epoch=trainer.current_epoch, value=value, lr=lr)


class BestWeights(pl.Callback):
    """Track the best epoch by `monitor` and restore its weights when fitting ends.

    A sweep job trains only a small tail; writing a full inception_v3 checkpoint (about 100 MB) every epoch
    would cost more than the training itself. This callback copies only the tensors that can change (the
    trainable parameters and the buffers of modules that own them) whenever the monitored value improves,
    puts them back at the end of `fit`, and writes one weights-only checkpoint to `save_path` if given.

    The copy is of the weights that validation scored: with a weight average (`EmaWeights`) those are the averaged
    weights, which the average swaps out again before `on_validation_end`. Blocks that a later `GradualUnfreeze`
    opens were frozen at the best epoch; their values are added to the copy just before they first train.
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

    @staticmethod
    def _validated_module(trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.nn.Module:
        """The module whose weights the last validation ran with: a running weight average's, else `pl_module`."""
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, EmaWeights):
                if cb.averaging():
                    return cb.averaged_module()
            elif isinstance(cb, WeightAveraging) and cb._average_model is not None:
                return cb._average_model.module
        return pl_module

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if not self._improved(value):
            return
        self.best_score, self.best_epoch = value, trainer.current_epoch
        state = self._validated_module(trainer, pl_module).state_dict()
        self._state = {k: state[k].detach().clone() for k in self._changing_keys(pl_module) if k in state}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # GradualUnfreeze opens blocks in on_train_epoch_start; before their first step they still hold the
        # (frozen) values they had at the best epoch, so those values complete the best state.
        if batch_idx != 0 or self._state is None:
            return
        fresh = [k for k in self._changing_keys(pl_module) if k not in self._state]
        if fresh:
            state = self._validated_module(trainer, pl_module).state_dict()
            self._state.update({k: state[k].detach().clone() for k in fresh if k in state})

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


class EmaWeights(EMAWeightAveraging):
    """Exponential moving average of the weights (Lightning's `EMAWeightAveraging`), starting at `start_epoch`.

    Once the average has started, validation, checkpoints and therefore best-checkpoint selection see the
    averaged weights, as in the parent; before that they see the current weights. Starting late matters from
    scratch: a random network's first BatchNorm statistics are huge (losses ~1e6), and an average that includes
    them needs thousands of steps to forget them. The parent also keeps its averaged model after `fit`, so a later
    `trainer.test(ckpt_path=...)` would test the checkpoint's raw weights; here the average is dropped when fitting
    ends, so validate/test/predict load the checkpoint's `state_dict`, which holds the averaged weights.
    """

    def __init__(self, decay: float = 0.999, start_epoch: int = 0, **kwargs: Any) -> None:
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"EmaWeights: decay must lie in (0, 1), got {decay}")
        if int(start_epoch) < 0:
            raise ValueError(f"EmaWeights: start_epoch must be >= 0, got {start_epoch}")
        super().__init__(decay=float(decay), **kwargs)
        self.start_epoch = int(start_epoch)

    def _started(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def averaging(self) -> bool:
        """True while fitting once the average has started: validation then runs with the averaged weights."""
        return self._started()

    def averaged_module(self) -> torch.nn.Module:
        """The averaged copy of the module (between validations it holds the averaged weights).

        Raises:
            RuntimeError: outside `fit`, where there is no average.
        """
        if self._average_model is None:
            raise RuntimeError("EmaWeights: there is no averaged model outside fit")
        return self._average_model.module

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch >= self.start_epoch:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._started():
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._started():
            super().on_validation_epoch_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is None or self._started():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._started():
            super().on_train_end(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit":
            self._average_model = None

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is None:
            return  # outside fit: the checkpoint's state_dict already holds the averaged weights
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

"""Exceptions with messages that name the offending file or value."""

from __future__ import annotations

from pathlib import Path


class EcgInceptionError(Exception):
    """Base class of every error this library raises on purpose."""


class DatasetError(EcgInceptionError, ValueError):
    """The image folder cannot be used as a dataset (missing, empty class, single class, ...)."""


class UnreadableImageError(EcgInceptionError, OSError):
    """One file cannot be decoded as an image; `reason` says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ManifestError(EcgInceptionError, ValueError):
    """A split manifest is malformed or does not match the files it names."""


class PretrainedWeightsError(EcgInceptionError, RuntimeError):
    """Pretrained weights cannot be obtained or do not fit the model."""


class CheckpointError(EcgInceptionError, ValueError):
    """A file is not a valid ecg_inception checkpoint (unreadable, wrong format, unsafe or mismatched content)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: not a valid ecg_inception checkpoint ({reason})")


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """`ckpt_path` names no file, or `ckpt_path=last` finds no `last.ckpt` in this run's folder.

    Also a `FileNotFoundError`, as it was before it was a library error; `message` is the whole text.
    """

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        self.reason = "no such file"
        EcgInceptionError.__init__(self, message)


class EnsembleError(EcgInceptionError, ValueError):
    """Checkpoints that cannot be averaged as one model: no members, or labels or preprocessing that differ."""


class ConfigValueError(EcgInceptionError, ValueError):
    """A configuration value (from a config, a checkpoint or a run folder) is missing, mistyped or not allowed."""


class TrainingDivergedError(EcgInceptionError, ArithmeticError):
    """The training loss became NaN or infinite; `step` and `epoch` say where, `value` what it was."""

    def __init__(self, step: int, epoch: int, value: float, lr: float | None = None) -> None:
        self.step, self.epoch, self.value, self.lr = int(step), int(epoch), float(value), lr
        rate = f" (learning rate {lr:.3g})" if lr is not None else ""
        super().__init__(
            f"training diverged: the loss is {value} at step {self.step} (epoch {self.epoch}); the likely cause is a "
            f"learning rate that is too high{rate}: lower model.optimizer.lr and check the inputs"
        )


class OutputDirError(EcgInceptionError, OSError):
    """The run's output folder cannot take what the run must write (read-only, full, or a checkpoint write failed)."""

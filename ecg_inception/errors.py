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


class ConfigValueError(EcgInceptionError, ValueError):
    """A configuration value (from a config, a checkpoint or a run folder) is missing, mistyped or not allowed."""

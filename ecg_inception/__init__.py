"""ecg_inception: leak-free transfer learning on 12-lead ECG printout images."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["EcgClassifier", "EcgDataModule", "Predictor", "__version__", "train"]

if TYPE_CHECKING:
    from ecg_inception.data.datamodule import EcgDataModule
    from ecg_inception.inference.predictor import Predictor
    from ecg_inception.models.module import EcgClassifier
    from ecg_inception.training import train

_LAZY = {
    "EcgDataModule": "ecg_inception.data.datamodule",
    "EcgClassifier": "ecg_inception.models.module",
    "Predictor": "ecg_inception.inference.predictor",
    "train": "ecg_inception.training",
}


def __getattr__(name: str) -> Any:
    """Import the heavy public objects (torch, Lightning) only when they are used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ecg_inception' has no attribute {name!r}")

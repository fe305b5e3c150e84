"""The inference room: Predictor (checkpoint -> records), exports (ONNX, torch.export) and their loader,
explanations (Grad-CAM on the page, lead shares).

Layering: this package sits above `data` and `models` and below `training`/`cli`; nothing below imports it.
Heavy modules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Explanation", "Prediction", "Predictor", "explain_pages", "export_model", "load_exported"]

if TYPE_CHECKING:
    from ecg_inception.inference.explain import Explanation, explain_pages
    from ecg_inception.inference.export import export_model, load_exported
    from ecg_inception.inference.predictor import Predictor
    from ecg_inception.inference.records import Prediction

_LAZY = {
    "Explanation": "ecg_inception.inference.explain",
    "explain_pages": "ecg_inception.inference.explain",
    "Predictor": "ecg_inception.inference.predictor",
    "Prediction": "ecg_inception.inference.records",
    "export_model": "ecg_inception.inference.export",
    "load_exported": "ecg_inception.inference.export",
}


def __getattr__(name: str) -> Any:
    """Import the public objects only when they are used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ecg_inception.inference' has no attribute {name!r}")

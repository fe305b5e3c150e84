"""Fine-tuning from an ecg_inception checkpoint (e.g. PTB-XL pretraining) given as `model.pretrained_file`.

The weights themselves load through `models.backbone.load_pretrained_file` like any local file (heads of
another shape re-initialised). What this adds for an ecg_inception checkpoint:

- `check_finetune_preprocessing`: the run's preprocessing must be the one the checkpoint was trained with
  (size, resize, crop, ink, mean, std, interpolation); otherwise a `ConfigValueError` names every differing
  key as the `data.` override that would fix it. (`run_setup.data_overrides_for_weights` already fills
  mean, std, interpolation and, when `data.image_size` is null, the size from the checkpoint.)
- `reinit_heads`: heads are re-initialised whenever the checkpoint's labels are not the run's, also when the
  class counts happen to be equal (a 4-output pretraining head must not pass for the target classes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecg_inception.errors import ConfigValueError
from ecg_inception.models.backbone import head_names
from ecg_inception.models.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

#: checkpoint preprocessing key -> the data config key that sets it
COMPARED_KEYS: dict[str, str] = {
    "size": "image_size", "resize": "resize", "crop": "crop", "ink": "ink", "mean": "mean", "std": "std",
    "interpolation": "interpolation", "version": "preprocess_version",
}


def stored_training(path: str | Path) -> dict[str, Any] | None:
    """Labels and preprocessing of an ecg_inception checkpoint; None for any other weight file (timm, torchvision).

    Raises:
        CheckpointError: an ecg_inception (Lightning) checkpoint that fails the checked loader.
    """
    path = Path(path).expanduser()
    if path.suffix == ".safetensors" or not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not ours to judge: the weight loader reports unreadable files
        return None
    hparams = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    if not isinstance(hparams, dict) or "preprocessing" not in hparams:
        return None
    checked = load_checkpoint(path)["hyper_parameters"]
    return {"labels": list(checked.get("labels") or []), "preprocessing": dict(checked.get("preprocessing") or {})}


def _as_size(value: Any) -> Any:
    """A square size given as one int -> [n, n] (how configs and checkpoints may store the same size)."""
    return [value, value] if isinstance(value, int) and not isinstance(value, bool) else value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b, abs_tol=1e-6)
    return a == b


def check_finetune_preprocessing(path: str | Path, stored: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse a fine-tuning run whose preprocessing differs from the checkpoint's.

    Args:
        path: the checkpoint (named in the error).
        stored: its `preprocessing` dict.
        current: the run's (`datamodule.preprocessing`).

    Raises:
        ConfigValueError: naming each differing key, both values and the override that matches the checkpoint.
    """
    def value(prep: Mapping[str, Any], key: str) -> Any:
        return _as_size(prep.get(key)) if key == "size" else prep.get(key)

    diffs = [(k, stored[k], current.get(k)) for k in COMPARED_KEYS if k in stored
             and not _same(value(stored, k), value(current, k))]
    if not diffs:
        return
    detail = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, a, b in diffs)
    fix = " ".join(f"data.{COMPARED_KEYS[k]}={_override(a)}" for k, a, _ in diffs)
    raise ConfigValueError(
        f"model.pretrained_file={path} was trained with another preprocessing than this run ({detail}). The backbone "
        f"learned its input; fine-tune with the same preprocessing: {fix}"
    )


def _override(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(_override(v) for v in value) + "]"
    return str(value)


def reinit_heads(backbone: nn.Module, stored_labels: Sequence[str], labels: Sequence[str]) -> list[str]:
    """Re-initialise the classifier heads when the checkpoint's labels are not `labels`; returns the heads reset."""
    if list(stored_labels) == list(labels):
        return []
    reset = []
    for name in head_names(backbone):
        module = backbone.get_submodule(name)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
            reset.append(name)
    if reset:
        log.info("Fine-tuning: heads %s re-initialised (checkpoint labels %s, this run %s)", reset,
                 list(stored_labels), list(labels))
    return reset

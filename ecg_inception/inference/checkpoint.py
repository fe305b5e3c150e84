"""Load a trained EcgClassifier for prediction: offline, `weights_only=True`, every failure a CheckpointError.

This is the one place the inference room opens checkpoints, so that a shared loader elsewhere in the library
can replace its body without touching the Predictor or the exports.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from ecg_inception.data.pages import check_preprocessing
from ecg_inception.errors import CheckpointError, ConfigValueError, PretrainedWeightsError
from ecg_inception.models.module import EcgClassifier


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> EcgClassifier:
    """The EcgClassifier of a checkpoint, in eval mode, with its labels, preprocessing and temperature checked.

    Args:
        path: A `.ckpt` written by `ecg-inception-train`.
        map_location: Where the weights go.

    Returns:
        The model (eval mode).

    Raises:
        CheckpointError: The file is missing, not a checkpoint, unsafe to unpickle, or its labels, class count,
            preprocessing or temperature do not fit together; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's advice on eval-mode / unused hparams
            model = EcgClassifier.from_checkpoint(str(path), map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        raise CheckpointError(path, f"refused by torch.load(weights_only=True): {_first_line(exc)}") from exc
    except (PretrainedWeightsError, ConfigValueError) as exc:
        raise CheckpointError(path, _first_line(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - any failure to read an arbitrary file means: not a checkpoint
        raise CheckpointError(path, f"{type(exc).__name__}: {_first_line(exc)}") from exc
    hparams: dict[str, Any] = dict(model.hparams)
    labels = list(hparams.get("labels") or [])
    if not labels:
        raise CheckpointError(path, "no labels stored (hyper_parameters.labels)")
    if len(labels) != int(hparams.get("num_classes", -1)):
        raise CheckpointError(path, f"{len(labels)} labels {labels} for num_classes={hparams.get('num_classes')}")
    try:
        check_preprocessing(hparams.get("preprocessing"), path)
    except ConfigValueError as exc:
        raise CheckpointError(path, str(exc).removeprefix(f"{path}: ")) from exc
    return model.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""The one way this library reads a checkpoint: `load_checkpoint(path) -> dict`, safe and checked.

A checkpoint is data. It is read with `torch.load(weights_only=True)` (tensors, containers and plain
values only: no object of the file's choosing is ever built), and its `hyper_parameters` are checked
against a schema before anything uses them: plain values only, a timm model name, a preprocessing dict
of allowed values (`data.settings.check_preprocessing`), safe `compile` options, optimizer/scheduler
descriptions that are names (resolved later through an allow-list of torch classes, never imported); the
top-level `temperature` must be a finite number > 0.
Whatever is wrong (unreadable, empty, not a checkpoint, not ours, unsafe content) becomes one
`CheckpointError("<path>: not a valid ecg_inception checkpoint (<reason>)")`; torch's advice to retry
with `weights_only=False` never reaches the user.

`EcgClassifier.from_checkpoint` builds the model from what this returns; eval and the predictor call that.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ecg_inception.data.settings import MODEL_NAME, check_preprocessing
from ecg_inception.errors import CheckpointError, ConfigValueError
from ecg_inception.models.calibration import check_temperature

HPARAMS_KEY = "hyper_parameters"
#: The top-level entry holding the fitted temperature (beside `hyper_parameters`, not in it).
TEMPERATURE_KEY = "temperature"
_PLAIN = (bool, int, float, str, type(None))
#: torch.compile keyword arguments a checkpoint may carry, with their allowed values (no `options`:
#: inductor options name compilers and paths; no custom backends).
COMPILE_OPTIONS: dict[str, tuple[Any, ...]] = {
    "mode": (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "fullgraph": (True, False),
    "dynamic": (None, True, False),
    "backend": ("inductor", "eager", "aot_eager", "cudagraphs"),
}


def _first_non_plain(value: Any, where: str) -> str | None:
    """Where the first value that is not a plain bool/int/float/str/None/list/dict sits, or None."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where}[{key!r}] (a non-string key)"
            found = _first_non_plain(item, f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        return next((f for i, v in enumerate(value) if (f := _first_non_plain(v, f"{where}[{i}]"))), None)
    return None if isinstance(value, _PLAIN) else f"{where} (a {type(value).__name__})"


def _load_reason(exc: BaseException) -> str:
    """What went wrong in torch.load, in words that never suggest loading the file unsafely."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            return f"it holds an object of type {found.group(1)}, which is not plain data; it was not loaded"
        return "not a torch checkpoint: its pickle data is not tensors and plain values"
    if isinstance(exc, EOFError):
        return "the file ends early (truncated or not a torch file)"
    if "weights_only" in text or not text.strip():
        return f"not a torch checkpoint ({type(exc).__name__})"
    line = text.strip().splitlines()[0]
    line = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", line)
    return f"not a torch checkpoint ({type(exc).__name__}: {line[:200]})"


def _check_compile(value: Any) -> None:
    if isinstance(value, bool):
        return
    if not isinstance(value, Mapping):
        raise ValueError(f"compile={value!r}: expected true, false or a dict of torch.compile options")
    for key, item in value.items():
        allowed = COMPILE_OPTIONS.get(key)
        if allowed is None or item not in allowed:
            raise ValueError(
                f"compile option {key}={item!r} is not allowed in a checkpoint (allowed: "
                + "; ".join(f"{k} in {list(v)}" for k, v in COMPILE_OPTIONS.items()) + ")"
            )


def _check_spec(value: Any, what: str) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
        raise ValueError(f"{what}={value!r}: expected null or a dict with a 'name'")
    if "_target_" in value:
        raise ValueError(f"{what} has a '_target_': stored values are never instantiated")


def check_hparams(hparams: Any, path: str | Path) -> dict[str, Any]:
    """The checked `hyper_parameters` of a checkpoint (a new dict; `preprocessing` normalised to plain values).

    Args:
        hparams: `checkpoint["hyper_parameters"]` as loaded.
        path: the checkpoint, for the error message.

    Returns:
        The hyper-parameters, every value plain.

    Raises:
        CheckpointError: a value is not plain, or not allowed.
    """
    if not isinstance(hparams, Mapping):
        raise CheckpointError(path, f"{HPARAMS_KEY} is a {type(hparams).__name__}, not a dict")
    found = _first_non_plain(hparams, HPARAMS_KEY)
    if found:
        raise CheckpointError(path, f"{found} is not a plain value")
    out = dict(hparams)
    try:
        name = out.get("model_name", "inception_v3")
        if not isinstance(name, str) or not MODEL_NAME.match(name):
            raise ValueError(f"model_name={name!r} is not a timm model name")
        if out.get("preprocessing") is not None:
            out["preprocessing"] = check_preprocessing(out["preprocessing"], f"{HPARAMS_KEY}.preprocessing")
        _check_compile(out.get("compile", False))
        for what in ("optimizer", "scheduler"):
            _check_spec(out.get(what), what)
        labels = out.get("labels")
        if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            raise ValueError(f"labels={labels!r}: expected a list of strings")
    except (ValueError, ConfigValueError) as exc:
        raise CheckpointError(path, str(exc)) from None
    return out


def stored_temperature(checkpoint: Mapping[str, Any], path: str | Path) -> float:
    """The checkpoint's top-level `temperature` entry (written by `training.store_temperature`), checked.

    Args:
        checkpoint: the checkpoint dict.
        path: the checkpoint, for the error message.

    Returns:
        The temperature; 1.0 (unscaled) when the checkpoint has none.

    Raises:
        CheckpointError: the value is not a finite number > 0 (a string or a bool is not a number here).
    """
    value, source = checkpoint.get(TEMPERATURE_KEY, 1.0), f"the stored {TEMPERATURE_KEY}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(path, f"{source}: temperature must be a number, got {value!r}")
    try:
        return check_temperature(value, source)
    except ValueError as exc:
        raise CheckpointError(path, str(exc)) from None


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read and check an ecg_inception (Lightning) checkpoint without running any code from it.

    Args:
        path: the `.ckpt` file.
        map_location: passed to `torch.load` (default: everything on the CPU).

    Returns:
        The checkpoint dict; `state_dict` maps names to tensors, `hyper_parameters` has passed
        `check_hparams` (its checked copy replaces the loaded one) and a top-level `temperature`
        `stored_temperature`.

    Raises:
        CheckpointError: the file is missing, empty, unreadable, not a checkpoint, not an EcgClassifier
            checkpoint, or holds anything but tensors and plain values.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # torch's note on foreign pickle protocols: the reason below says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for foreign bytes; all mean the same here
        raise CheckpointError(path, _load_reason(exc)) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(path, f"it holds a {type(checkpoint).__name__}, not a checkpoint dict")
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping) or not state:
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            raise CheckpointError(path, "a bare state dict: no hyper_parameters to rebuild the model from")
        raise CheckpointError(path, "no 'state_dict' of model weights: not saved by Lightning")
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(path, f"state_dict entry {bad!r} is not a tensor")
    if HPARAMS_KEY not in checkpoint:
        raise CheckpointError(path, f"no {HPARAMS_KEY}: not saved by an EcgClassifier")
    checkpoint[HPARAMS_KEY] = check_hparams(checkpoint[HPARAMS_KEY], path)
    if TEMPERATURE_KEY in checkpoint:
        checkpoint[TEMPERATURE_KEY] = stored_temperature(checkpoint, path)
    return checkpoint

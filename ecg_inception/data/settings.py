"""Schemas for data settings read back from a checkpoint or a run folder: checked plain values, never configs.

A checkpoint's `hyper_parameters.preprocessing` and a run's `config.yaml` come from disk and may have been
crafted. Nothing read from them is ever passed to `hydra.utils.instantiate` or resolved as an OmegaConf
interpolation: each value is checked against its type and allowed values here and returned as a plain
Python value, or refused with a `ConfigValueError` naming the file, the key and the value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from ecg_inception.data.protocols import BALANCE_STAGES, BALANCES, PROTOCOLS
from ecg_inception.data.transforms import INTERPOLATIONS, MIN_IMAGE_SIZE, RESIZE_MODES
from ecg_inception.errors import ConfigValueError

#: A timm model name: letters, digits, `_`, `.` and `-` only (no `hf-hub:` prefixes, no paths).
MODEL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
#: The data settings eval takes from a run's config.yaml (everything else comes from the eval config).
RUN_DATA_KEYS = ("root", "protocol", "synthetic_per_class", "seed", "fractions", "balance", "balance_stage")

Check = Callable[[Any], Any]  # returns the plain value or raises ValueError(what was expected)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a string")
    if "${" in value:
        raise ValueError("a literal string (interpolations are not resolved in stored values)")
    return value


def _choice(choices: tuple[str, ...], optional: bool = False) -> Check:
    def check(value: Any) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, str) or value not in choices:
            raise ValueError(("null or " if optional else "") + "one of " + ", ".join(choices))
        return value

    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _int(minimum: int | None = None) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            raise ValueError("an integer" + ("" if minimum is None else f" >= {minimum}"))
        return int(value)

    return check


def _floats(n: int, positive: bool = False) -> Check:
    def check(value: Any) -> list[float]:
        ok = isinstance(value, (list, tuple)) and len(value) == n and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
            for v in value
        )
        if not ok:
            raise ValueError(f"a list of {n} finite{' positive' if positive else ''} numbers")
        return [float(v) for v in value]

    return check


def _size(value: Any) -> int | list[int]:
    side = _int(MIN_IMAGE_SIZE)
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"an integer >= {MIN_IMAGE_SIZE} or [height, width]")
        return [side(v) for v in value]
    return side(value)


def _model_name(value: Any) -> str:
    if not isinstance(value, str) or not MODEL_NAME.match(value):
        raise ValueError("a timm model name (letters, digits, '_', '.', '-')")
    return value


def _root(value: Any) -> str | None:
    return None if value is None else _text(value)


PREPROCESSING_SCHEMA: dict[str, Check] = {
    "model_name": _model_name,
    "size": _size,
    "mean": _floats(3),
    "std": _floats(3, positive=True),
    "interpolation": _choice(INTERPOLATIONS),
    "resize": _choice(RESIZE_MODES),
    "crop": _bool,
    "ink": _bool,
}
RUN_DATA_SCHEMA: dict[str, Check] = {
    "root": _root,
    "protocol": _choice(PROTOCOLS),
    "synthetic_per_class": _int(1),
    "seed": _int(),
    "fractions": _floats(3),
    "balance": _choice(BALANCES, optional=True),
    "balance_stage": _choice(BALANCE_STAGES, optional=True),
}


def check_settings(
    value: Any, schema: Mapping[str, Check], source: str, *, keep_unknown_scalars: bool = False
) -> dict[str, Any]:
    """Check a mapping of settings against `schema`; returns plain values for the keys it has.

    Args:
        value: the mapping read from disk.
        schema: key -> check; keys absent from `value` are absent from the result.
        source: what to name in errors (e.g. "/run/checkpoints/last.ckpt: preprocessing").
        keep_unknown_scalars: keep keys outside the schema when their value is a plain scalar (a newer
            writer's extra field, e.g. a version number); otherwise they are refused.

    Returns:
        A new dict of plain values.

    Raises:
        ConfigValueError: `value` is not a mapping, or a key has a value of the wrong type or not allowed.
    """
    if not isinstance(value, Mapping):
        raise ConfigValueError(f"{source}: expected a mapping of settings, got {_short(value)}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        check = schema.get(key) if isinstance(key, str) else None
        if check is None:
            scalar = isinstance(item, (str, int, float, bool)) or item is None
            if keep_unknown_scalars and isinstance(key, str) and scalar and not str(item).startswith("${"):
                out[key] = item
                continue
            raise ConfigValueError(f"{source}: unexpected setting {key!r}={_short(item)}")
        try:
            out[key] = check(item)
        except ValueError as exc:
            raise ConfigValueError(f"{source}: {key}={_short(item)} is not allowed: expected {exc}") from None
    return out


def check_preprocessing(value: Any, source: str = "preprocessing") -> dict[str, Any]:
    """A stored preprocessing dict (`EcgDataModule.preprocessing`), checked: see `check_settings`."""
    return check_settings(value, PREPROCESSING_SCHEMA, source, keep_unknown_scalars=True)


def check_run_data(value: Any, source: str) -> dict[str, Any]:
    """The `RUN_DATA_KEYS` of a run's `data` config, checked; other keys of that config are not read."""
    if not isinstance(value, Mapping):
        raise ConfigValueError(f"{source}: expected a mapping of settings, got {_short(value)}")
    return check_settings({k: value[k] for k in RUN_DATA_KEYS if k in value}, RUN_DATA_SCHEMA, source)

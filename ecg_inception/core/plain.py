"""Plain Python values from config containers, tensors and arrays: three helpers, three meanings.

- `from_omegaconf`: an OmegaConf container -> its plain dict/list; anything else unchanged (shallow; tuples stay).
- `to_plain`: recursively dicts, lists and Python scalars (tuples -> lists, tensors/arrays -> lists/scalars): what a
  checkpoint's hyper-parameters hold.
- `json_ready`: recursively JSON-ready (string keys, tensors -> lists, NaN/inf -> None): what metrics.json holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

_PLAIN = (bool, int, float, str, type(None))


def from_omegaconf(value: Any) -> Any:
    """OmegaConf containers -> plain Python values (resolved); anything else unchanged.

    Args:
        value: any value; a `DictConfig`/`ListConfig` is converted, nothing else is touched.

    Returns:
        The plain container, or `value` itself.
    """
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def to_plain(value: Any) -> Any:
    """OmegaConf containers, tuples, tensors and arrays -> dicts, lists and Python scalars (recursively).

    Args:
        value: a config value, a tensor or array, or a nesting of them.

    Returns:
        The same value made of dicts, lists and Python scalars only.
    """
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # omegaconf is a dependency, but plain use must not need it
        pass
    if hasattr(value, "tolist") and not isinstance(value, _PLAIN):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def is_plain(value: Any) -> bool:
    """True when `value` is made of dicts (str/int keys), lists, tuples and Python scalars only."""
    if isinstance(value, Mapping):
        return all(isinstance(k, (str, int)) and is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def json_ready(value: Any) -> Any:
    """Make a value JSON-ready; NaN and inf become None so the file stays valid JSON.

    Args:
        value: metrics: mappings, sequences, tensors (anything with `tolist`) and scalars.

    Returns:
        Nested dicts (string keys), lists and scalars, with every non-finite float replaced by None.
    """
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, _PLAIN):  # a tensor or an array
        return json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

"""Deprecation shims for moved names: a module-level `__getattr__` (PEP 562) that forwards and warns."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Collection
from typing import Any


def forward_moved(old: str, new: str, names: Collection[str] | None = None) -> Callable[[str], Any]:
    """A module `__getattr__` for `old` that returns `new`'s attribute with a DeprecationWarning.

    The target is imported by name on first use, so a shim is no import of a higher floor.

    Args:
        old: the module that kept the old path (the shim).
        new: the module the names moved to.
        names: only these names moved (None: every name but dunders).

    Returns:
        The function to assign to the shim's `__getattr__`.
    """

    def __getattr__(name: str) -> Any:
        if name.startswith("__") or (names is not None and name not in names):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} moved to {new}.{name}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)

    return __getattr__

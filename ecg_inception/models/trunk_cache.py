"""Deprecated: moved to `ecg_inception.features.trunk_cache` (the trunk-feature room sits above models/, docs/design.md).

Every name is forwarded, with a DeprecationWarning, for one release.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_TARGET = "ecg_inception.features.trunk_cache"


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    warnings.warn(f"ecg_inception.models.trunk_cache is deprecated; import {name} from {_TARGET}", DeprecationWarning,
                  stacklevel=2)
    return getattr(importlib.import_module(_TARGET), name)

"""Deprecated: moved to `ecg_inception.features.trunk_cache` (the trunk-feature room sits above models/, docs/design.md).

Every name is forwarded, with a DeprecationWarning, for one release.
"""

from ecg_inception.core.moved import forward_moved

__getattr__ = forward_moved(__name__, "ecg_inception.features.trunk_cache")

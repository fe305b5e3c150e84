"""Compose a shipped Hydra config (`ecg_inception.conf`) without a command line: tests, benchmarks, examples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def compose_config(name: str = "train", overrides: Sequence[str] = (), return_hydra_config: bool = False) -> Any:
    """The composed `train` or `eval` config with `overrides`, as `ecg-inception-train` would see it.

    Clears Hydra's global state first, so it can be called again in the same process.

    Args:
        name: the config name (`train` or `eval`).
        overrides: Hydra override strings, e.g. `["trainer.max_epochs=1", "experiment=demo"]`.
        return_hydra_config: also fill the `hydra` node (launcher, sweep dir, runtime choices).

    Returns:
        The composed `DictConfig`.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="ecg_inception.conf", version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides), return_hydra_config=return_hydra_config)

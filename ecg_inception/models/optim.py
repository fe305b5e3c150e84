"""Optimizer and LR-scheduler specs as plain values: describe a factory, resolve a name (allow-list only).

A name resolves to a torch class by a short alias (`adam`, `step`, ...), by a torch class path
(`torch.optim.SGD`, `torch.optim.adam.Adam`: every public `torch.optim` optimizer and
`torch.optim.lr_scheduler` scheduler), or by a name registered with `register_optimizer` /
`register_scheduler`. Nothing is ever imported from a name, so a crafted config or checkpoint cannot run
code while a model is built.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ecg_inception.core.plain import is_plain, to_plain  # noqa: F401 - to_plain re-exported
from ecg_inception.errors import ConfigValueError

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop,
}
SCHEDULERS: dict[str, Callable[..., Any]] = {
    "step": torch.optim.lr_scheduler.StepLR, "multistep": torch.optim.lr_scheduler.MultiStepLR,
    "cosine": torch.optim.lr_scheduler.CosineAnnealingLR, "exponential": torch.optim.lr_scheduler.ExponentialLR,
    "plateau": torch.optim.lr_scheduler.ReduceLROnPlateau, "onecycle": torch.optim.lr_scheduler.OneCycleLR,
}
DEFAULT_OPTIMIZER: dict[str, Any] = {"name": "adam", "lr": 1e-3}


def _torch_classes(module: Any, bases: tuple[type, ...], exclude: tuple[type, ...]) -> dict[str, type]:
    """Public classes of a torch module deriving from `bases`, by `torch.optim.X` and by their defining path."""
    table: dict[str, type] = {}
    for attr in dir(module):
        obj = getattr(module, attr)
        if attr.startswith("_") or not isinstance(obj, type) or not issubclass(obj, bases) or obj in exclude:
            continue
        table[f"{module.__name__}.{attr}"] = obj
        table[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return table


_sched = torch.optim.lr_scheduler
#: Full class paths an optimizer/scheduler name may give (besides the short names above and registered ones).
ALLOWED_OPTIMIZERS: dict[str, Callable[..., Any]] = _torch_classes(
    torch.optim, (torch.optim.Optimizer,), (torch.optim.Optimizer,)
)
ALLOWED_SCHEDULERS: dict[str, Callable[..., Any]] = _torch_classes(
    _sched, (_sched.LRScheduler, _sched.ReduceLROnPlateau), (_sched.LRScheduler,)
)


def _register(table: dict[str, Callable[..., Any]], factory: Callable[..., Any], name: str | None) -> str:
    key = name or f"{factory.__module__}.{factory.__qualname__}"
    table[key] = factory
    return key


def register_optimizer(factory: Callable[..., torch.optim.Optimizer], name: str | None = None) -> str:
    """Allow a non-torch optimizer class to be named in a config or a checkpoint (the explicit opt-in).

    Names are never imported from a checkpoint: call this (in your own code, before loading) for each
    optimizer class you trust.

    Args:
        factory: the class (or any callable taking the parameters and keyword arguments).
        name: the name to accept; default `module.QualName` of `factory`, which is what a checkpoint of a
            run trained with it (Hydra `_target_` + `_partial_`) stores.

    Returns:
        The name now accepted.
    """
    return _register(ALLOWED_OPTIMIZERS, factory, name)


def register_scheduler(factory: Callable[..., Any], name: str | None = None) -> str:
    """Allow a non-torch LR scheduler class to be named in a config or a checkpoint; see `register_optimizer`.

    Args:
        factory: the class (or any callable taking the optimizer and keyword arguments).
        name: the name to accept; default `module.QualName` of `factory`.

    Returns:
        The name now accepted.
    """
    return _register(ALLOWED_SCHEDULERS, factory, name)


def describe_callable(factory: Callable[..., Any]) -> dict[str, Any]:
    """A plain, re-buildable description of a factory (e.g. a Hydra `_partial_` object): name + keywords."""
    func, keywords, args = factory, {}, ()
    if isinstance(factory, functools.partial):
        func, keywords, args = factory.func, dict(factory.keywords), factory.args
    name = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}".lstrip(".")
    keywords = to_plain(keywords)
    if args or not is_plain(keywords):
        return {"name": name, "repr": repr(factory), "rebuildable": False}
    return {"name": name, **keywords}


def _resolve(
    name: str, table: Mapping[str, Callable[..., Any]], allowed: Mapping[str, Callable[..., Any]], what: str
) -> Callable[..., Any]:
    """A short name or an allowed class path -> the class; nothing is ever imported."""
    if name.lower() in table:
        return table[name.lower()]
    if name in allowed:
        return allowed[name]
    raise ConfigValueError(
        f"unknown {what} {name!r}: use one of {sorted(table)} or a torch class path such as "
        f"{'torch.optim.SGD' if what == 'optimizer' else 'torch.optim.lr_scheduler.StepLR'}; a dotted path from a "
        f"config or a checkpoint is never imported: for your own class call "
        f"ecg_inception.models.module.register_{what}(YourClass) before building or loading the model"
    )


def split_spec(spec: Mapping[str, Any], what: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    spec = dict(spec)
    spec.pop("_partial_", None)
    name = spec.pop("name", None) or spec.pop("_target_", None)
    if not name:
        raise ValueError(f"{what} spec {spec!r} needs a 'name' (e.g. 'adam') or '_target_'")
    if spec.pop("rebuildable", True) is False:
        raise ValueError(f"{what} {spec.get('repr', name)} was stored as a description only; pass it again")
    if what == "optimizer":
        return _resolve(str(name), OPTIMIZERS, ALLOWED_OPTIMIZERS, what), spec
    return _resolve(str(name), SCHEDULERS, ALLOWED_SCHEDULERS, what), spec

"""Which part of the backbone trains: the last N blocks or the last N parameterised layers, heads always.

Frozen BatchNorm layers stay in inference mode for the whole fit (Keras `trainable=False` semantics), so their
running statistics never move; `set_frozen_bn_eval` re-applies that after every `train()` call. The Keras seed's
"unfrozen layers -10 / -3" are mapped onto these knobs in `KERAS_EQUIVALENTS` (see docs/freezing.md).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ecg_inception.models.backbone import classifier_names, head_names

log = logging.getLogger(__name__)

#: Top-level head modules that timm's metadata does not name (the classifier itself comes from
#: `pretrained_cfg['classifier']` and `get_classifier()`, see `head_modules`): the parameter-free pool and dropout
#: before the classifier, ViT's `fc_norm` (a LayerNorm with `global_pool="avg"`) and VGG's `pre_logits` (a conv
#: MLP). timm runs all four in `forward_head`, but neither `pretrained_cfg` nor `get_classifier()` names them, and
#: `group_matcher` is no help: parameter-free modules have no parameters to group, and the modules it leaves
#: unmatched differ by family (MobileNetV3's `conv_head`, Swin's `norm` belong to the trunk here).
UNDESCRIBED_HEAD_MODULES = ("global_pool", "head_drop", "fc_norm", "pre_logits")
#: Auxiliary heads: they train whenever they exist and never count as trunk blocks or layers.
AUX_MODULES = ("AuxLogits",)
FROZEN_RANDOM_MESSAGE = (
    "The backbone trunk is (partly) frozen but has no pretrained weights (pretrained=false, no "
    "model.pretrained_file): this trains a head on a frozen random network; it is never what anyone wants outside "
    "tests; use unfreeze.blocks=all or give model.pretrained_file"
)


def _has_params(module: nn.Module, recurse: bool = True) -> bool:
    return next(iter(module.parameters(recurse=recurse)), None) is not None


def head_modules(model: nn.Module) -> list[str]:
    """Top-level names of the classifier head and aux heads (always trainable, never part of the trunk).

    The top-level modules holding what timm's metadata names (`pretrained_cfg['classifier']`, the modules
    `get_classifier()` returns, the aux head `AuxLogits`) and those of `UNDESCRIBED_HEAD_MODULES`, in
    registration order, then an aux head that is not a direct child.
    """
    described = head_names(model) + classifier_names(model)
    tops = {name.split(".", 1)[0] for name in described}
    names = [n for n, m in model.named_children() if (n in UNDESCRIBED_HEAD_MODULES or n in tops) and m is not None]
    return names + [n for n in AUX_MODULES if getattr(model, n, None) is not None and n not in names]


@contextmanager
def tracing(model: nn.Module) -> Iterator[torch.Tensor]:
    """Eval mode, no grad and a small dummy input; every module's mode is restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    aux = getattr(model, "aux_logits", None)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans, height, width = cfg.get("input_size") or (3, 224, 224)
    if isinstance(aux, bool) and hasattr(model, "layer_names"):  # timm InceptionV3: aux needs 299 px, trunk 75
        model.aux_logits = False
        height = width = 75
    param = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            yield torch.zeros(1, chans, height, width, dtype=param.dtype, device=param.device)
    finally:
        if isinstance(aux, bool):
            model.aux_logits = aux
        for module, mode in modes.items():
            module.training = mode


def call_order(model: nn.Module) -> list[str]:
    """Module names in the order of their first call during a forward pass on a dummy input."""
    order: list[str] = []
    seen: set[str] = set()

    def hook_for(name: str):
        def hook(_module: nn.Module, _args: object) -> None:
            if name not in seen:
                seen.add(name)
                order.append(name)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in model.named_modules() if n]
    try:
        with tracing(model) as dummy:
            model(dummy)
    finally:
        for handle in handles:
            handle.remove()
    return order


def backbone_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The trunk's top-level feature blocks in forward order (no parameter-free pools, no heads, no aux)."""
    skip = set(head_modules(model))
    if hasattr(model, "layer_names"):  # timm InceptionV3 lists its feature layers in forward order
        names = [n for n in model.layer_names if n not in skip]
        return [(n, model.get_submodule(n)) for n in names if _has_params(model.get_submodule(n))]
    candidates: dict[str, nn.Module] = {}
    for name, child in model.named_children():
        if name in skip or child is None or not _has_params(child):
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and not _has_params(child, recurse=False):
            candidates.update({f"{name}.{n}": m for n, m in child.named_children() if _has_params(m)})
        else:
            candidates[name] = child
    return [(n, candidates[n]) for n in call_order(model) if n in candidates]


def leaf_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Parameterised layers (conv, batch norm, linear, ...) in forward order, heads and aux excluded."""
    prefixes = tuple(f"{n}." for n in head_modules(model))
    owners = {n: m for n, m in model.named_modules()
              if n and _has_params(m, recurse=False) and not f"{n}.".startswith(prefixes)}
    if hasattr(model, "layer_names"):
        # timm InceptionV3 registers every layer in the order its forward runs them (tests check this against
        # `call_order`), so the costly trace is skipped; the blocks come in forward order from `layer_names`.
        order = [f"{b}.{n}" if n else b for b, block in backbone_blocks(model) for n, _ in block.named_modules()]
    else:
        order = call_order(model)
    return [(n, owners[n]) for n in order if n in owners]


@dataclass
class FreezePlan:
    """The outcome of an unfreeze request: what trains, what is frozen, where the boundary lies."""

    unfreeze: dict[str, int | str | None]
    blocks: list[str]
    trainable_blocks: list[str]
    first_trainable_block: int
    freeze_boundary: str | None
    trainable_modules: list[str] = field(default_factory=list)
    frozen_modules: list[str] = field(default_factory=list)
    trainable_params: int = 0
    frozen_params: int = 0

    @property
    def trunk_frozen(self) -> bool:
        """True when any parameter is frozen (the heads always train)."""
        return self.frozen_params > 0

    def summary(self) -> str:
        """One line for the log."""
        total = self.trainable_params + self.frozen_params
        return (f"unfreeze={self.unfreeze}: {self.trainable_params:,}/{total:,} parameters train; trainable blocks "
                f"{self.trainable_blocks or 'none'}; last frozen block {self.freeze_boundary}")


def describe_freeze(model: nn.Module, unfreeze: Mapping[str, int | str | None] | None = None) -> FreezePlan:
    """A FreezePlan for the model's current `requires_grad` flags."""
    blocks = [n for n, _ in backbone_blocks(model)]
    trainable_blocks = [n for n in blocks if any(p.requires_grad for p in model.get_submodule(n).parameters())]
    first = blocks.index(trainable_blocks[0]) if trainable_blocks else len(blocks)
    plan = FreezePlan(dict(unfreeze or {}), blocks, trainable_blocks, first, blocks[first - 1] if first else None)
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if params:
            target = plan.trainable_modules if all(p.requires_grad for p in params) else plan.frozen_modules
            target.append(name)
    for p in model.parameters():
        if p.requires_grad:
            plan.trainable_params += p.numel()
        else:
            plan.frozen_params += p.numel()
    return plan


def frozen_batchnorms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """BatchNorm layers whose parameters are all frozen (BatchNorm without parameters is left alone)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                found.append((name, module))
    return found


def set_frozen_bn_eval(model: nn.Module) -> list[str]:
    """Put every frozen BatchNorm into eval mode so its running statistics never move; returns their names."""
    frozen = frozen_batchnorms(model)
    for _, module in frozen:
        module.eval()
    return [name for name, _ in frozen]


def _count(value: object, what: str, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ValueError(f"unfreeze.{what} must be an integer in [0, {limit}] (or blocks: all), got {value!r}")
    return value


def apply_unfreeze(model: nn.Module, blocks: int | str | None = None, layers: int | None = None) -> FreezePlan:
    """Freeze the trunk except the last `blocks` blocks or the last `layers` leaf layers; heads always train.

    `blocks="all"` trains everything; both None means heads only. Frozen BatchNorm layers go to eval mode.
    """
    if blocks is not None and layers is not None:
        raise ValueError(f"give unfreeze.blocks or unfreeze.layers, not both (blocks={blocks!r}, layers={layers!r})")
    model.requires_grad_(False)
    if isinstance(blocks, str):
        if blocks.strip().lower() != "all":
            raise ValueError(f"unfreeze.blocks must be an integer or 'all', got {blocks!r}")
        model.requires_grad_(True)
    elif layers is not None:
        leaves = leaf_layers(model)
        for _, module in leaves[len(leaves) - _count(layers, "layers", len(leaves)):]:
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
    else:
        trunk = backbone_blocks(model)
        for _, module in trunk[len(trunk) - _count(blocks or 0, "blocks", len(trunk)):]:
            module.requires_grad_(True)
    for name in head_modules(model):
        model.get_submodule(name).requires_grad_(True)
    model.train(model.training)
    set_frozen_bn_eval(model)
    plan = describe_freeze(model, {"blocks": blocks, "layers": layers})
    log.info("Freezing: %s", plan.summary())
    return plan


def warn_frozen_random(plan: FreezePlan, pretrained: bool | str | None, pretrained_file: str | None) -> bool:
    """Warn loudly (warnings + log) when a frozen trunk has no pretrained weights; True when it warned."""
    if plan.trunk_frozen and not pretrained and not pretrained_file:
        warnings.warn(FROZEN_RANDOM_MESSAGE, UserWarning, stacklevel=2)
        log.warning(FROZEN_RANDOM_MESSAGE)
        return True
    return False


@dataclass(frozen=True)
class KerasEquivalent:
    """One Keras freezing rule of the seed and the settings that reproduce it here."""

    keras_rule: str
    keras_trainable: tuple[str, ...]  # base.layers[offset:], in Keras' order
    unfreeze_layers: int  # exact: trains the conv/bn layers that carry the Keras trainable weights
    unfreeze_blocks: int  # the smallest `blocks` value that trains at least those layers
    note: str


#: Keras InceptionV3 (fresh-session auto names) -> timm module, for the last block (Keras mixed10 = Mixed_7c).
#: Keras creates the conv2d_bn units of the block in the same order as timm's forward pass runs them.
KERAS_MIXED10: dict[str, str] = {
    f"{kind}_{85 + i}": f"Mixed_7c.{branch}.{part}"
    for i, branch in enumerate(("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
                                "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"))
    for kind, part in (("conv2d", "conv"), ("batch_normalization", "bn"))
}

KERAS_EQUIVALENTS: dict[int, KerasEquivalent] = {
    -10: KerasEquivalent(
        "for layer in base.layers[:-10]: layer.trainable = False",
        ("activation_87", "activation_88", "activation_91", "activation_92", "batch_normalization_93",
         "activation_85", "mixed9_1", "concatenate_1", "activation_93", "mixed10"),
        unfreeze_layers=1,
        unfreeze_blocks=1,
        note="only batch_normalization_93 (branch_pool BN of mixed10, beta only: scale=False) has weights",
    ),
    -3: KerasEquivalent(
        "for layer in base.layers[:-3]: layer.trainable = False",
        ("concatenate_1", "activation_93", "mixed10"),
        unfreeze_layers=0,
        unfreeze_blocks=0,
        note="no weights among the last three layers: the base is fully frozen, only the new head trains",
    ),
}


class GradualUnfreeze(BaseFinetuning):
    """At given epochs, train more trailing blocks as a new param group with lr = base lr x `lr_factor`.

    `schedule` maps epoch -> the total number of trailing blocks that train from then on (or "all"). Newly
    trainable BatchNorm layers leave inference mode. Resuming re-applies the stage of the current epoch.
    """

    def __init__(self, schedule: Mapping[int | str, int | str], lr_factor: float = 0.1,
                 backbone_attr: str = "backbone") -> None:
        super().__init__()
        self.schedule: dict[int, int | str] = {}
        for epoch, value in schedule.items():
            if not str(epoch).isdigit():
                raise ValueError(f"gradual_unfreeze.schedule: epochs must be integers >= 0, got {epoch!r}")
            if not (value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)):
                raise ValueError(f"gradual_unfreeze.schedule[{epoch}] must be a block count or 'all', got {value!r}")
            self.schedule[int(epoch)] = value
        if lr_factor <= 0:
            raise ValueError(f"gradual_unfreeze.lr_factor must be > 0, got {lr_factor}")
        self.lr_factor = float(lr_factor)
        self.backbone_attr = backbone_attr
        self._trainer: pl.Trainer | None = None

    # Lightning's helpers are used where they do the same thing as this callback, and only there
    # (tests/test_gradual_unfreeze.py runs both side by side and checks each point below):
    # - same: BaseFinetuning.make_trainable (requires_grad on every parameter of the blocks) and
    #   BaseFinetuning.filter_params (the blocks' parameters, in the order Module.parameters() gives them).
    #   make_trainable also sets BatchNorm's track_running_stats=True: a no-op here, since freezing never turns it off.
    # - different, so custom:
    #   - freezing happens in EcgClassifier's constructor (apply_unfreeze), so freeze_before_training has nothing
    #     left to do;
    #   - newly trainable BatchNorm leaves inference mode (train(True)), the Keras trainable=True semantics that
    #     frozen BatchNorm mirrors (docs/freezing.md); Lightning's helper leaves the module's mode alone (it toggles
    #     track_running_stats instead), so an unfrozen BatchNorm would keep normalising with frozen statistics;
    #   - unfreeze_and_add_param_group's default lr is the *current* lr of the first group / 10; here it is the
    #     *initial* lr x lr_factor, so a schedule that has already decayed the first group does not decay the new
    #     one twice (with lr=... or initial_denom_lr=1/lr_factor it matches only while no scheduler has moved it);
    #   - it neither sets the group's initial_lr nor extends the schedulers' base_lrs, which the LR schedulers need
    #     to go on stepping every group;
    #   - filter_on_optimizer detects parameters already in the optimizer by value (torch.equal), which drops
    #     distinct parameters that merely hold equal values (zero-initialised BatchNorm biases of a random network);
    #     here by identity.
    def freeze_before_training(self, pl_module: nn.Module) -> None:
        """Nothing to do: the module froze its trunk when it was constructed."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the trainer at hand so that new param groups reach the LR schedulers too."""
        self._trainer = trainer
        super().on_train_epoch_start(trainer, pl_module)

    def stage(self, epoch: int) -> int | str | None:
        """The block count in force at `epoch` (the latest scheduled epoch <= `epoch`), None before any."""
        due = [e for e in self.schedule if e <= epoch]
        return self.schedule[max(due)] if due else None

    def finetune_function(self, pl_module: nn.Module, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        """Unfreeze the blocks due at `epoch` and add their new parameters as one param group."""
        target = self.stage(epoch)
        if target is None:
            return
        backbone = getattr(pl_module, self.backbone_attr, pl_module)
        trunk = [m for _, m in backbone_blocks(backbone)]
        modules = [backbone] if target == "all" else trunk[len(trunk) - min(int(target), len(trunk)):]
        self.make_trainable(modules)
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        fresh = list({id(p): p for p in self.filter_params(modules) if id(p) not in known}.values())
        for module in modules:
            for sub in module.modules():
                if isinstance(sub, _BatchNorm):
                    sub.train(backbone.training)
        if not fresh:
            return
        first = optimizer.param_groups[0]
        lr = float(first.get("initial_lr", first["lr"])) * self.lr_factor
        optimizer.add_param_group({"params": fresh, "lr": lr, "initial_lr": lr})
        for config in getattr(self._trainer, "lr_scheduler_configs", []) or []:
            scheduler = config.scheduler
            if getattr(scheduler, "optimizer", None) is optimizer:
                for attr, value in (("base_lrs", lr), ("min_lrs", None), ("_last_lr", lr)):
                    values = getattr(scheduler, attr, None)
                    if isinstance(values, list) and len(values) < len(optimizer.param_groups):
                        values.append(values[-1] if value is None else value)
        if hasattr(pl_module, "freeze_plan"):
            pl_module.freeze_plan = describe_freeze(backbone, {"blocks": target, "layers": None})
        log.info("Epoch %d: %s more parameters train (blocks=%s) at lr %.3g", epoch, sum(p.numel() for p in fresh),
                 target, lr)

"""GradualUnfreeze beside Lightning's BaseFinetuning.unfreeze_and_add_param_group, on the same block.

Where the two do the same thing (which parameters become trainable, which ones join the optimizer, in which order,
at which lr when no scheduler has moved it), GradualUnfreeze calls Lightning's helpers (`make_trainable`,
`filter_params`) and the results are identical. Where they differ (BatchNorm mode, initial lr vs current lr,
`initial_lr` and the schedulers' `base_lrs`, duplicates by identity vs by value), the custom steps stay: the
comment above `GradualUnfreeze.freeze_before_training` says why, and each difference is asserted here.
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import timm
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ecg_inception.models.freezing import GradualUnfreeze, apply_unfreeze, backbone_blocks, set_frozen_bn_eval

LR, FACTOR = 0.1, 0.5  # FACTOR = 1 / initial_denom_lr; both lrs are exact in binary, so == compares them


class Holder(nn.Module):
    """What GradualUnfreeze sees of an EcgClassifier: a module with a `backbone`."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone


@pytest.fixture(scope="module")
def frozen() -> Holder:
    """timm's test_resnet (BatchNorm in every block), head-only trainable, in training mode as during a fit.

    Every parameter holds distinct random values, so that Lightning's by-value duplicate check and the by-identity
    one agree (the last test shows where they do not).
    """
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    with torch.no_grad():
        for p in backbone.parameters():
            p.normal_()
    apply_unfreeze(backbone, blocks=0)
    backbone.train()
    set_frozen_bn_eval(backbone)
    return Holder(backbone)


def _optimizer(model: Holder, *extra: nn.Parameter) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad] + list(extra), lr=LR)


def _last_block(model: Holder) -> tuple[str, nn.Module]:
    return backbone_blocks(model.backbone)[-1]


def _names(model: Holder, params: list[torch.Tensor]) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def _side_by_side(frozen: Holder) -> tuple[Holder, torch.optim.Optimizer, Holder, torch.optim.Optimizer, str]:
    ours, theirs = copy.deepcopy(frozen), copy.deepcopy(frozen)
    opt_ours, opt_theirs = _optimizer(ours), _optimizer(theirs)
    name, _ = _last_block(frozen)
    GradualUnfreeze({1: 1}, lr_factor=FACTOR).finetune_function(ours, 1, opt_ours)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "already exist within another group": nothing is filtered by value
        BaseFinetuning.unfreeze_and_add_param_group(
            theirs.backbone.get_submodule(name), opt_theirs, initial_denom_lr=1 / FACTOR
        )
    return ours, opt_ours, theirs, opt_theirs, name


def test_same_param_group_lr_and_trainable_set_as_lightnings_helper(frozen: Holder) -> None:
    ours, opt_ours, theirs, opt_theirs, name = _side_by_side(frozen)
    assert len(opt_ours.param_groups) == len(opt_theirs.param_groups) == 2
    added_ours, added_theirs = opt_ours.param_groups[-1], opt_theirs.param_groups[-1]
    # the same parameters (by identity within each copy, compared by name across the copies), in the same order
    block = list(ours.backbone.get_submodule(name).parameters())
    assert [id(p) for p in added_ours["params"]] == [id(p) for p in block]
    names = _names(ours, added_ours["params"])
    assert names == _names(theirs, added_theirs["params"]) and all(n.startswith(f"backbone.{name}.") for n in names)
    assert len({id(p) for p in added_ours["params"]}) == len(names)  # each parameter once
    # the same lr: the first group's lr x lr_factor == its lr / initial_denom_lr while no scheduler moved it
    assert added_ours["lr"] == added_theirs["lr"] == LR * FACTOR
    # the same requires_grad set: the block's parameters and the head
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert trainable == {f"backbone.{n}" for n in ("fc.weight", "fc.bias")} | set(names)
    # the same BatchNorm track_running_stats (on everywhere: make_trainable's setting changes nothing here)
    bns = [(n, m) for n, m in ours.named_modules() if isinstance(m, _BatchNorm)]
    assert all(m.track_running_stats for _, m in bns)
    assert [m.track_running_stats for _, m in bns] == [
        m.track_running_stats for _, m in theirs.named_modules() if isinstance(m, _BatchNorm)
    ]


def test_documented_difference_batchnorm_leaves_inference_mode_only_here(frozen: Holder) -> None:
    """Lightning's helper leaves the newly trainable BatchNorm layers in eval mode, so they keep normalising with
    the frozen running statistics and never update them; GradualUnfreeze puts them in training mode (Keras
    trainable=True), and the still-frozen ones stay in inference mode in both."""
    ours, _, theirs, _, name = _side_by_side(frozen)

    def modes(model: Holder) -> dict[str, bool]:
        return {n: m.training for n, m in model.backbone.named_modules() if isinstance(m, _BatchNorm)}

    inside = {n for n in modes(ours) if n.startswith(f"{name}.")}
    assert inside and all(modes(ours)[n] for n in inside) and not any(modes(theirs)[n] for n in inside)
    assert {n: v for n, v in modes(ours).items() if n not in inside} == {
        n: v for n, v in modes(theirs).items() if n not in inside
    } and not any(v for n, v in modes(ours).items() if n not in inside)
    bn = f"{name}.bn1"
    before = ours.backbone.get_submodule(bn).running_mean.clone()
    assert torch.equal(before, theirs.backbone.get_submodule(bn).running_mean)
    x = torch.randn(2, 3, 32, 32)
    ours.backbone(x), theirs.backbone(x)
    assert not torch.equal(ours.backbone.get_submodule(bn).running_mean, before)  # trains its statistics
    assert torch.equal(theirs.backbone.get_submodule(bn).running_mean, before)  # still frozen statistics


def test_documented_difference_initial_lr_and_scheduler_base_lrs(frozen: Holder) -> None:
    """After a scheduler has decayed the first group, GradualUnfreeze starts the new group at the *initial* lr x
    lr_factor and gives it `initial_lr` and a `base_lrs` entry; Lightning's default is the *current* lr / 10,
    without either, so the scheduler would not know the new group."""
    ours, theirs = copy.deepcopy(frozen), copy.deepcopy(frozen)
    optimizers, schedulers = [], []
    for model in (ours, theirs):
        optimizer = _optimizer(model)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        optimizer.step()
        scheduler.step()  # the first group's lr is now 0.05, its initial_lr still 0.1
        optimizers.append(optimizer)
        schedulers.append(scheduler)
    name, _ = _last_block(frozen)
    callback = GradualUnfreeze({1: 1}, lr_factor=FACTOR)
    callback._trainer = SimpleNamespace(lr_scheduler_configs=[SimpleNamespace(scheduler=schedulers[0])])
    callback.finetune_function(ours, 1, optimizers[0])
    BaseFinetuning.unfreeze_and_add_param_group(theirs.backbone.get_submodule(name), optimizers[1])
    added_ours, added_theirs = optimizers[0].param_groups[-1], optimizers[1].param_groups[-1]
    assert added_ours["lr"] == added_ours["initial_lr"] == LR * FACTOR  # initial 0.1 x 0.5
    assert added_theirs["lr"] == pytest.approx(LR * 0.5 / 10) and "initial_lr" not in added_theirs  # current / 10
    assert schedulers[0].base_lrs == [LR, LR * FACTOR] and len(schedulers[0].get_last_lr()) == 2
    assert schedulers[1].base_lrs == [LR]  # the new group is unknown to the scheduler


def test_documented_difference_duplicates_by_identity_not_by_value(frozen: Holder) -> None:
    """A distinct parameter that merely holds the same values as one already in the optimizer is skipped by
    Lightning's `filter_on_optimizer` (torch.equal); GradualUnfreeze adds it (by identity)."""
    ours, theirs = copy.deepcopy(frozen), copy.deepcopy(frozen)
    name, _ = _last_block(frozen)
    twins = [nn.Parameter(m.get_submodule(f"{name}.bn1").bias.detach().clone()) for m in (ours.backbone,
                                                                                          theirs.backbone)]
    opt_ours, opt_theirs = _optimizer(ours, twins[0]), _optimizer(theirs, twins[1])
    GradualUnfreeze({1: 1}, lr_factor=FACTOR).finetune_function(ours, 1, opt_ours)
    with pytest.warns(UserWarning, match="already exist within another group"):
        BaseFinetuning.unfreeze_and_add_param_group(
            theirs.backbone.get_submodule(name), opt_theirs, initial_denom_lr=1 / FACTOR
        )
    added_ours = _names(ours, opt_ours.param_groups[-1]["params"])
    added_theirs = _names(theirs, opt_theirs.param_groups[-1]["params"])
    assert f"backbone.{name}.bn1.bias" in added_ours
    assert set(added_ours) - set(added_theirs) == {f"backbone.{name}.bn1.bias"}

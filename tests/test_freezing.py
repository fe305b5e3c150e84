"""Freezing: block and leaf-layer lists, unfreeze plans, frozen BatchNorm, the Keras mapping, gradual unfreezing."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from ecg_inception.models.freezing import (
    FROZEN_RANDOM_MESSAGE,
    KERAS_EQUIVALENTS,
    KERAS_MIXED10,
    GradualUnfreeze,
    apply_unfreeze,
    backbone_blocks,
    call_order,
    leaf_layers,
    set_frozen_bn_eval,
)
from ecg_inception.models.module import EcgClassifier

BLOCKS = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "Mixed_5b",
          "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a",
          "Mixed_7b", "Mixed_7c"]
# Keras' mixed10 block as written in keras.applications.inception_v3: conv2d_bn(filters, rows, cols) in creation
# order, conv2d_85 ... conv2d_93.
KERAS_MIXED10_CONVS = [(320, 1, 1), (384, 1, 1), (384, 1, 3), (384, 3, 1), (448, 1, 1), (384, 3, 3), (384, 1, 3),
                       (384, 3, 1), (192, 1, 1)]


@pytest.fixture(scope="module")
def aux_model() -> torch.nn.Module:
    return timm.create_model("inception_v3", pretrained=False, num_classes=4, aux_logits=True)


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules()
            if list(m.parameters(recurse=False)) and all(p.requires_grad for p in m.parameters(recurse=False))}


def test_blocks_are_the_feature_blocks_in_forward_order(aux_model) -> None:
    assert [n for n, _ in backbone_blocks(aux_model)] == BLOCKS
    traced = [n for n in call_order(aux_model) if n in BLOCKS]
    assert traced == BLOCKS


def test_leaf_layers_follow_the_forward_pass(aux_model) -> None:
    leaves = [n for n, _ in leaf_layers(aux_model)]
    assert len(leaves) == 94 * 2  # 94 conv + 94 batch norm; no fc, no AuxLogits
    assert leaves[0] == "Conv2d_1a_3x3.conv" and leaves[-1] == "Mixed_7c.branch_pool.bn"
    assert not [n for n in leaves if n.startswith(("AuxLogits", "fc"))]
    assert leaves == [n for n in call_order(aux_model) if n in set(leaves)]  # module order == forward order


def test_apply_unfreeze_plans(aux_model) -> None:
    heads = {"fc", "AuxLogits.conv0.conv", "AuxLogits.conv0.bn", "AuxLogits.conv1.conv", "AuxLogits.conv1.bn",
             "AuxLogits.fc"}
    plan = apply_unfreeze(aux_model, blocks=2)
    assert plan.trainable_blocks == ["Mixed_7b", "Mixed_7c"] and plan.freeze_boundary == "Mixed_7a"
    assert plan.first_trainable_block == 14
    assert {n.split(".")[0] for n in _trainable(aux_model)} == {"Mixed_7b", "Mixed_7c", "fc", "AuxLogits"}
    assert plan.trainable_params + plan.frozen_params == sum(p.numel() for p in aux_model.parameters())

    plan = apply_unfreeze(aux_model)  # head only
    assert _trainable(aux_model) == heads and plan.trainable_blocks == [] and plan.freeze_boundary == "Mixed_7c"

    plan = apply_unfreeze(aux_model, layers=3)
    assert _trainable(aux_model) == heads | {"Mixed_7c.branch3x3dbl_3b.bn", "Mixed_7c.branch_pool.conv",
                                             "Mixed_7c.branch_pool.bn"}
    assert plan.freeze_boundary == "Mixed_7b" and set(plan.trainable_modules) == _trainable(aux_model)

    plan = apply_unfreeze(aux_model, blocks="all")
    assert plan.frozen_params == 0 and plan.freeze_boundary is None and plan.first_trainable_block == 0
    for bad in ({"blocks": 1, "layers": 1}, {"blocks": 17}, {"blocks": -1}, {"layers": 189}, {"blocks": "most"}):
        with pytest.raises(ValueError, match="unfreeze"):
            apply_unfreeze(aux_model, **bad)


def test_frozen_batchnorm_stays_in_inference_mode(aux_model) -> None:
    apply_unfreeze(aux_model, blocks=1)
    aux_model.train()
    frozen = set(set_frozen_bn_eval(aux_model))
    bns = {n: m for n, m in aux_model.named_modules() if isinstance(m, _BatchNorm)}
    assert frozen == {n for n in bns if not n.startswith(("Mixed_7c", "AuxLogits"))}
    assert all(not bns[n].training for n in frozen)
    assert all(m.training for n, m in bns.items() if n not in frozen)


def test_keras_table_matches_the_code(aux_model) -> None:
    # The mapping itself: Keras conv2d_85..93 are created in the order timm runs Mixed_7c's convs, same shapes.
    convs = [n for n, _ in leaf_layers(aux_model) if n.startswith("Mixed_7c.") and n.endswith(".conv")]
    assert convs == [KERAS_MIXED10[f"conv2d_{85 + i}"] for i in range(9)]
    for i, (filters, rows, cols) in enumerate(KERAS_MIXED10_CONVS):
        conv = aux_model.get_submodule(KERAS_MIXED10[f"conv2d_{85 + i}"])
        assert (conv.out_channels, *conv.kernel_size) == (filters, rows, cols)
    heads = {"fc"} | {n for n in _trainable(aux_model) if n.startswith("AuxLogits")}
    for offset, entry in KERAS_EQUIVALENTS.items():
        assert len(entry.keras_trainable) == -offset and entry.keras_trainable[-1] == "mixed10"
        weighted = {KERAS_MIXED10[k] for k in entry.keras_trainable if k in KERAS_MIXED10}
        apply_unfreeze(aux_model, layers=entry.unfreeze_layers)
        assert _trainable(aux_model) - heads - {n for n in _trainable(aux_model) if n.startswith("AuxLogits")} \
            == weighted
        # blocks: the smallest count that trains at least the Keras weights.
        apply_unfreeze(aux_model, blocks=entry.unfreeze_blocks)
        assert weighted <= _trainable(aux_model)
        if entry.unfreeze_blocks:
            apply_unfreeze(aux_model, blocks=entry.unfreeze_blocks - 1)
            assert not weighted <= _trainable(aux_model)
    assert {KERAS_MIXED10[k] for k in KERAS_EQUIVALENTS[-10].keras_trainable if k in KERAS_MIXED10} == {
        "Mixed_7c.branch_pool.bn"}


KERAS_FIXTURE = Path(__file__).parent / "fixtures" / "keras_inception_v3_last10.json"


def test_keras_last_ten_layers_fixture_maps_to_the_layers_the_code_trains(aux_model) -> None:
    """The record of Keras' base.layers[-10:] as Keras printed it (tests/fixtures, with the Keras version, backend
    and the command, examples/print_keras_layers.py) against the code: every Keras layer with weights in the tail
    maps to a timm module that trains, and nothing else in the trunk trains; the same for the seed's -3."""
    record = json.loads(KERAS_FIXTURE.read_text(encoding="utf-8"))
    assert record["keras_version"] and record["backend"] and record["sources"]
    assert "examples/print_keras_layers.py" in record["printed_by"]
    tail = record["layers"]
    assert [entry["position"] for entry in tail] == list(range(-10, 0))
    names = [entry["name"] for entry in tail]
    heads = {"fc"} | {n for n in _trainable(aux_model) if n.startswith("AuxLogits")}
    for offset, entry in KERAS_EQUIVALENTS.items():
        keras_tail = tail[len(tail) + offset:]
        assert tuple(e["name"] for e in keras_tail) == entry.keras_trainable, offset
        weighted = [e["name"] for e in keras_tail if e["weights"]]
        assert all(e["class"] in ("Activation", "Concatenate") for e in keras_tail if not e["weights"])
        expected = {KERAS_MIXED10[name] for name in weighted}
        apply_unfreeze(aux_model, layers=entry.unfreeze_layers)
        assert _trainable(aux_model) - heads == expected, offset
    assert [e["name"] for e in tail if e["weights"]] == ["batch_normalization_93"] and names[-1] == "mixed10"
    bn = aux_model.get_submodule(KERAS_MIXED10["batch_normalization_93"])
    assert bn.num_features == tail[4]["channels"] == 192
    # Had the freeze loop counted the seed's 3-layer head (GAP, Dropout, Dense), -10 would reach the last 7 base
    # layers, and batch_normalization_93 would still be the only one with weights (docs/freezing.md).
    with_head = [entry.split(" ")[0] for entry in record["with_head"]["layers"]]
    assert with_head[:7] == names[-7:] and "batch_normalization_93" in with_head


def test_gradual_unfreeze_schedule_validation() -> None:
    cb = GradualUnfreeze({"2": 1, 5: "all"}, lr_factor=0.5)
    assert [cb.stage(e) for e in (0, 1, 2, 4, 5, 9)] == [None, None, 1, 1, "all", "all"]
    for bad in ({-1: 1}, {1: -2}, {1: "most"}):
        with pytest.raises(ValueError, match="gradual_unfreeze"):
            GradualUnfreeze(bad)


def _loader(n: int, size: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g))
    return DataLoader(data, batch_size=4)


def test_fit_keeps_frozen_weights_and_statistics(tmp_path) -> None:
    """2 epochs, validation after each; epoch 1 unfreezes Mixed_7b at lr x 0.1; nothing before it may move."""
    torch.manual_seed(0)
    model = EcgClassifier(pretrained=False, aux_logits=False, drop_rate=0.0, unfreeze={"blocks": 1},
                          gradual_unfreeze={"schedule": {1: 2}, "lr_factor": 0.1},
                          optimizer={"name": "sgd", "lr": 0.05})
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="frozen random network"):
        trainer.fit(model, _loader(8, 75, 1), _loader(4, 75, 2))
    after = model.backbone.state_dict()
    frozen = [k for k in before if k.split(".")[0] in BLOCKS[:14]]
    assert any("running_mean" in k for k in frozen) and any(k.endswith(".weight") for k in frozen)
    changed = [k for k in frozen if not torch.equal(before[k], after[k])]
    assert changed == [], changed[:5]
    for block in ("Mixed_7b", "Mixed_7c"):
        assert not torch.equal(before[f"{block}.branch1x1.conv.weight"], after[f"{block}.branch1x1.conv.weight"])
        assert not torch.equal(before[f"{block}.branch1x1.bn.running_var"], after[f"{block}.branch1x1.bn.running_var"])
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(0.005)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.backbone.Mixed_7b.parameters()}
    assert model.freeze_plan.trainable_blocks == ["Mixed_7b", "Mixed_7c"]
    assert FROZEN_RANDOM_MESSAGE.startswith("The backbone trunk")


def test_no_warning_when_everything_trains() -> None:
    model = EcgClassifier(pretrained=False, aux_logits=False, unfreeze={"blocks": "all"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.on_fit_start()
    assert not model.freeze_plan.trunk_frozen


def test_gradual_unfreeze_adds_by_identity_where_lightnings_helper_drops_by_value() -> None:
    """Why GradualUnfreeze keeps its own param-group step: BaseFinetuning.filter_on_optimizer compares values.

    On a random network many BatchNorm biases are equal (zeros), so Lightning's helper would skip parameters of the
    newly unfrozen block that are not in the optimizer at all; GradualUnfreeze adds every one of them, once, at the
    initial lr x lr_factor, and puts the block's BatchNorm layers in training mode.
    """
    from lightning.pytorch.callbacks import BaseFinetuning

    from ecg_inception.models.module import EcgClassifier

    model = EcgClassifier(pretrained=False, aux_logits=False, unfreeze={"blocks": 1})
    model.backbone.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for group in optimizer.param_groups:
        group["initial_lr"] = 0.2  # a scheduler has already moved the current lr away from the initial one
    block = model.backbone.Mixed_7b
    fresh = [p for p in block.parameters() if not p.requires_grad]
    assert fresh
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "params ... already exist within another group"
        kept_by_lightning = BaseFinetuning.filter_on_optimizer(optimizer, fresh)
    assert len(kept_by_lightning) < len(fresh)
    GradualUnfreeze({1: 2}, lr_factor=0.5).finetune_function(model, 1, optimizer)
    added = optimizer.param_groups[-1]
    assert len(optimizer.param_groups) == 2 and {id(p) for p in added["params"]} == {id(p) for p in fresh}
    assert added["lr"] == added["initial_lr"] == pytest.approx(0.1)  # 0.2 x 0.5, not the current 0.1 / 10
    assert all(m.training for m in block.modules() if isinstance(m, _BatchNorm))

"""TrunkSplit: prefix + tail == the full forward at every cut, boundaries from the freezing, the cache plan."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from ecg_inception.models.freezing import apply_unfreeze
from ecg_inception.models.trunk import (
    DEFAULT_VIEWS,
    HEAD,
    POOLED,
    TrunkFeatures,
    TrunkSplit,
    frozen_boundary,
    parse_trunk_cache,
    parse_views,
    plan_trunk_cache,
    trunk_stages,
)

SIZE = 75  # the smallest input inception_v3 takes (aux off); aux on needs 299


# One intra-op thread for this module (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("inception_v3", pretrained=False, num_classes=4).eval()


def frozen(net: torch.nn.Module, **unfreeze) -> torch.nn.Module:
    model = copy.deepcopy(net)
    apply_unfreeze(model, **unfreeze)
    return model.eval()


@pytest.mark.parametrize("boundary", ["Conv2d_1a_3x3", "Pool1", "Pool2", "Mixed_6e", "Mixed_7b", "Mixed_7c", HEAD])
def test_prefix_plus_tail_is_the_full_forward_aux_off(net: torch.nn.Module, boundary: str) -> None:
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    split = TrunkSplit(net, boundary)
    with torch.no_grad():
        feats = split.prefix(x)
        torch.testing.assert_close(split.tail(feats), net(x), rtol=1e-5, atol=1e-5)
    assert split.pooled == (boundary == HEAD) and feats.aux_input is None
    if boundary == HEAD:
        assert feats.features.shape == (2, 2048) and split.start == POOLED
    assert split.start == feats.start != boundary


def test_prefix_plus_tail_is_the_full_forward_aux_on_299() -> None:
    torch.manual_seed(0)
    model = timm.create_model("inception_v3", pretrained=False, num_classes=4, aux_logits=True).eval()
    x = torch.randn(1, 3, 299, 299, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, aux = model(x)
        for boundary, cached_aux in (("Mixed_5d", False), ("Mixed_6e", False), ("Mixed_7b", True), (HEAD, True)):
            split = TrunkSplit(model, boundary)
            feats = split.prefix(x)
            assert (feats.aux_input is not None) == cached_aux == split.caches_aux, boundary
            if cached_aux:
                assert feats.aux_input.shape == (1, 768, 17, 17)
            ours, ours_aux = split.tail(feats)
            torch.testing.assert_close(ours, logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours_aux, aux, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="aux"):
            split.tail(TrunkFeatures(feats.features, None, split.start))


def test_boundary_follows_the_freezing(net: torch.nn.Module) -> None:
    stages = trunk_stages(net)
    assert stages[3] == "Pool1" and stages[6] == "Pool2" and "AuxLogits" not in stages and "fc" not in stages
    assert frozen_boundary(frozen(net, blocks=0)) == HEAD
    assert frozen_boundary(frozen(net, blocks=1)) == "Mixed_7b"
    assert frozen_boundary(frozen(net, layers=1)) == "Mixed_7b"  # the Keras -10 rule: one BN of Mixed_7c
    assert frozen_boundary(frozen(net, blocks=3)) == "Mixed_6e"
    assert frozen_boundary(frozen(net, blocks=11)) == "Pool2"  # the pool before Mixed_5b is in the prefix
    assert frozen_boundary(frozen(net, blocks="all")) is None
    split = TrunkSplit(net, "Mixed_7b")
    with pytest.raises(ValueError, match="starts at 'Mixed_7c'"):
        split.tail(TrunkFeatures(torch.zeros(1, 768, 3, 3), None, "Mixed_7a"))
    with pytest.raises(ValueError, match="not a stage"):
        TrunkSplit(net, "AuxLogits")


def test_generic_timm_model_and_nondeterministic_prefix() -> None:
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    for boundary in ("maxpool", "layer2.1", HEAD):  # the constructor also verifies on a dummy input
        split = TrunkSplit(resnet, boundary)
        with torch.no_grad():
            torch.testing.assert_close(split.tail(split.prefix(x)), resnet(x), rtol=1e-5, atol=1e-5)
    apply_unfreeze(resnet, blocks=0)
    assert TrunkSplit(resnet, "layer4.1").nondeterminism() == []
    dropping = timm.create_model("resnet18", pretrained=False, num_classes=4, drop_path_rate=0.2)
    apply_unfreeze(dropping, blocks=0)
    assert any("drop_prob" in r for r in TrunkSplit(dropping, HEAD).nondeterminism())
    assert plan_trunk_cache(dropping, "auto").split is None
    with pytest.raises(ValueError, match="not deterministic"):
        plan_trunk_cache(dropping, "on")


@pytest.mark.parametrize(("value", "mode"), [
    (True, "on"), (False, "off"), (None, "auto"), ("on", "on"), ("off", "off"), ("auto", "auto"), ("ON", "on"),
    ("true", "on"), ("False", "off"), (" Auto ", "auto"),
])  # fmt: skip
def test_flag_parsing(value: object, mode: str) -> None:
    assert parse_trunk_cache(value) == mode


def test_flag_parsing_refuses_other_values() -> None:
    for bad in ("sometimes", 2, 1.0):
        with pytest.raises(ValueError, match="trunk_cache"):
            parse_trunk_cache(bad)
    assert parse_views(None) is None and parse_views("null") is None and parse_views(4) == parse_views("4") == 4
    for bad in (0, -1, True, "four", 2.5):
        with pytest.raises(ValueError, match="trunk_cache_views"):
            parse_views(bad)


def test_plan_augmentation_views_and_gradual_unfreezing(net: torch.nn.Module) -> None:
    head_only = frozen(net, blocks=0)
    plan = plan_trunk_cache(head_only, "auto", None, augment=True)
    assert plan.split is None and "trunk_cache_views" in plan.reason  # never silently unaugmented
    plan = plan_trunk_cache(head_only, "on", None, augment=True)
    assert plan.split is not None and plan.views == DEFAULT_VIEWS and "PRE-DRAWN" in plan.reason
    plan = plan_trunk_cache(head_only, "auto", 2, augment=True)
    assert plan.views == 2 and plan.augmented and "view e % 2" in plan.reason
    plan = plan_trunk_cache(head_only, True, 3, augment=False)
    assert plan.views == 1 and not plan.augmented and "ignored" in plan.reason
    plan = plan_trunk_cache(head_only, "auto", 4, augment=True, page_augment=True)  # no views of a whole page
    assert plan.split is None and "page_augment" in plan.reason
    with pytest.raises(ValueError, match="page_augment"):
        plan_trunk_cache(head_only, "on", None, page_augment=True)
    assert plan_trunk_cache(head_only, "off").split is None
    gradual = plan_trunk_cache(head_only, "auto", gradual_unfreeze={"schedule": {2: 1, 4: 3}})
    assert gradual.split is not None and gradual.split.boundary == "Mixed_6e"
    assert plan_trunk_cache(head_only, "auto", gradual_unfreeze={"schedule": {1: "all"}}).split is None
    everything = frozen(net, blocks="all")
    assert plan_trunk_cache(everything, "auto").split is None
    with pytest.raises(ValueError, match="first stage"):
        plan_trunk_cache(everything, "on")



"""Grad-CAM: the layer chosen by resolution, maps equal to grad-cam's own, and lead attribution that follows the
pixels a model actually reads."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageDraw
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from ecg_inception.data.align import aligned_crop
from ecg_inception.data.crop import detect_grid_box
from ecg_inception.data.transforms import preprocess
from ecg_inception.inference.cam import choose_target_layer, compute_cam
from ecg_inception.inference.explain import explain_pages
from ecg_inception.inference.leads import LEAD_NAMES
from ecg_inception.synthetic import printout as pr


@pytest.mark.parametrize(("arch", "size", "layer", "cells"), [
    ("inception_v3", (128, 256), "Mixed_6e", (6, 14)),  # Mixed_7c would be 2 x 6: under 1 cell per lead
    ("inception_v3", (299, 299), "Mixed_7c", (8, 8)),
    ("resnet18", (128, 256), "layer3", (8, 16)),
    ("resnet18", (256, 512), "layer4", (8, 16)),  # timm's last feature stage once it is fine enough
])  # fmt: skip
def test_default_target_layer_is_chosen_by_resolution(one_thread: None, arch: str, size: tuple[int, int],
                                                      layer: str, cells: tuple[int, int]) -> None:
    model = timm.create_model(arch, pretrained=False, num_classes=4)
    chosen = choose_target_layer(model, size)
    assert (chosen.name, chosen.grid.shape) == (layer, cells)
    with pytest.raises(ValueError, match="no module"):
        choose_target_layer(model, size, "no_such_layer")


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
@pytest.mark.parametrize(("arch", "layer"), [("inception_v3", "Mixed_6e"), ("resnet18", "layer3")])
def test_maps_are_grad_cams_own(one_thread: None, arch: str, layer: str, method: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=3).eval()
    x = torch.randn(2, 3, 128, 256)
    ours = compute_cam(model, x, layer, [2, 0], method)
    assert ours.maps.shape[1:] == choose_target_layer(model, (128, 256), layer).grid.shape
    cls = GradCAM if method == "gradcam" else GradCAMPlusPlus
    with cls(model=model, target_layers=[model.get_submodule(layer)]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(2), ClassifierOutputTarget(0)])
    # grad-cam min-max scales each layer's map, resizes it, and scales the (one-layer) mean again
    np.testing.assert_allclose(scale_cam_image(scale_cam_image(ours.maps, (256, 128))), theirs, atol=2e-4)
    assert ours.targets == [2, 0] and all(p.requires_grad for p in model.parameters())  # restored
    with pytest.raises(ValueError, match="method"):
        compute_cam(model, x, layer, None, "scorecam")
    with pytest.raises(ValueError, match="targets"):
        compute_cam(model, x, layer, [1], method)


class MaskedModel(nn.Module):
    """The logit of class 0 reads only the input pixels under a fixed mask: mask -> conv -> ReLU -> mean -> linear."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask[None, None].float())
        self.backbone = nn.Sequential(OrderedDict(features=nn.Conv2d(3, 4, 4, stride=4, bias=False), act=nn.ReLU()))
        self.head = nn.Linear(4, 2, bias=False)
        self.labels = ["lead", "other"]
        with torch.no_grad():
            self.backbone.features.weight.fill_(1.0 / 48)
            self.head.weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x * self.mask).mean((2, 3)))


@pytest.fixture(scope="module")
def rendered_page() -> pr.Printout:
    rng = np.random.default_rng(3)
    while True:
        page = pr.render_page("normal", rng, scale=0.5)
        if page.angle == 0.0:
            return page


def _truth_rect(page: pr.Printout, name: str) -> tuple[float, float, float, float]:
    """Page-pixel rectangle of a lead's trace (or the first calibration pulse, `margin`) from the renderer's
    own constants: independent of the measured lead table."""
    left, top, _, _ = page.grid_box
    mm = pr.PX_PER_MM * 0.5
    x_start, col_w = left + pr._TRACE_X0_MM * mm, pr.SEGMENT_S * pr.SPEED_MM_S * mm
    if name == "margin":
        cx, y0 = left + pr._CAL_X0_MM * mm, top + pr._ROW0_MM * mm
        return cx - 0.3 * mm, y0 - 11 * mm, cx + 4.5 * mm, y0 + 1 * mm
    if name == "II_rhythm":
        r, c, span = 3, 0, 4 * col_w
    else:
        r = next(i for i, row in enumerate(pr.LAYOUT) if name in row)
        c, span = pr.LAYOUT[r].index(name), col_w
    y0 = top + (pr._ROW0_MM + r * pr._ROW_STEP_MM) * mm
    x0 = x_start + c * col_w
    return x0 + 1 * mm, y0 - 10 * mm, x0 + span - 1 * mm, y0 + 6 * mm


@pytest.mark.parametrize(("size", "resize"), [([128, 256], "squash"), ([160, 160], "letterbox")])
def test_a_model_reading_one_lead_gives_that_lead_most_of_the_share(
    one_thread: None, rendered_page: pr.Printout, size: list[int], resize: str
) -> None:
    page = rendered_page.image
    box = detect_grid_box(page)
    prep = {"size": size, "mean": [0.0] * 3, "std": [1.0] * 3, "interpolation": "bilinear", "resize": resize,
            "crop": True, "ink": True}  # fmt: skip
    for name in [*LEAD_NAMES, "margin"]:
        # the mask goes through the real preprocessing: black rectangle on white, cropped and resized as the page
        drawn = Image.new("RGB", page.size, (255, 255, 255))
        ImageDraw.Draw(drawn).rectangle(_truth_rect(rendered_page, name), fill=(0, 0, 0))
        mask = preprocess(drawn, box, size, resize, "bilinear")[0] < 128
        assert mask.any()
        (rec,) = explain_pages(MaskedModel(mask), prep, [page], target="lead", layer="features")
        assert rec.error is None and not rec.crop_fallback
        if name == "margin":  # calibration pulses: the 14th region, outside the shares
            assert rec.margin_share > 0.5, rec.margin_share
            assert sum(rec.lead_shares.values()) in (0.0, pytest.approx(1.0, abs=1e-6))
        else:
            assert sum(rec.lead_shares.values()) == pytest.approx(1.0, abs=1e-6)
            top = max(rec.lead_shares, key=rec.lead_shares.get)
            # the issue asks for more than half; the map's spill over the cell edge leaves >= 0.96 here
            assert rec.lead_shares[name] > 0.9, (name, top, rec.lead_shares[top], rec.lead_shares[name])
            assert rec.margin_share < 0.05


def test_unreadable_inputs_and_bad_targets(tmp_path, one_thread: None) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    model = MaskedModel(torch.ones(64, 128, dtype=torch.bool))
    prep = {"size": [64, 128], "mean": [0.0] * 3, "std": [1.0] * 3, "interpolation": "bilinear",
            "resize": "squash", "crop": True, "ink": False}  # fmt: skip
    white = Image.new("RGB", (300, 200), (255, 255, 255))
    recs = explain_pages(model, prep, [bad, white, tmp_path / "missing.png"], layer="features")
    assert [r.error is None for r in recs] == [False, True, False]
    assert recs[1].cam.shape == (200, 300) and recs[1].path == "#1" and recs[1].crop_fallback
    assert recs[1].to_dict()["cam_size"] == [16, 32] and "cam" not in recs[1].to_dict()
    with pytest.raises(ValueError, match="neither 'predicted' nor one of the labels"):
        explain_pages(model, prep, [white], target="normal", layer="features")
    with pytest.raises(ValueError, match="out of range"):
        explain_pages(model, prep, [white], target=5, layer="features")


def test_an_explained_page_is_registered_once(one_thread: None, rendered_page: pr.Printout, monkeypatch) -> None:
    """Explain maps the region preprocessing read (`prepare_page`) instead of registering the crop a second time."""
    from ecg_inception.data import transforms
    from ecg_inception.inference import explain

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return aligned_crop(*args, **kwargs)

    monkeypatch.setattr(transforms, "aligned_crop", counting)
    monkeypatch.setattr(explain, "aligned_crop", counting, raising=False)
    prep = {"size": [64, 128], "mean": [0.0] * 3, "std": [1.0] * 3, "interpolation": "bilinear",
            "resize": "squash", "crop": True, "ink": True, "version": 3}  # fmt: skip
    (rec,) = explain_pages(MaskedModel(torch.ones(64, 128, dtype=torch.bool)), prep, [rendered_page.image],
                           layer="features")  # fmt: skip
    assert rec.error is None and not rec.crop_fallback
    assert len(calls) == 1

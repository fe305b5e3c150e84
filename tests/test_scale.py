"""Physical scale (grid pitch, canonical resampling), ink by colour, and the preprocessing version."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import SCALE_MAX_ABS_DIFF, SCALE_MIN_TRACE_IOU, SCALE_SIZE, scale_agreement
from PIL import Image

from ecg_inception.data.crop import CropBox, detect_grid_box
from ecg_inception.data.scale import (
    CANONICAL_PX_PER_MM,
    NOMINAL_BOX_MM,
    GridPitch,
    canonical_size,
    measure_pitch,
    to_canonical,
)
from ecg_inception.data.transforms import (
    INK_CUTOFF_RANGE,
    PREPROCESS_VERSION,
    check_preprocessing_version,
    ink_cutoff,
    ink_image,
    otsu_threshold,
    preprocess,
)
from ecg_inception.synthetic import printout
from ecg_inception.synthetic.printout import PX_PER_MM, render_page

LABELS = ("myocardial_infarction", "history_of_mi", "abnormal_heartbeat", "normal")


def page(seed: int, scale: float, hue: str | None = None, monkeypatch: pytest.MonkeyPatch | None = None) -> Image.Image:
    if hue is not None and monkeypatch is not None:
        monkeypatch.setattr(printout, "_HUES", {hue: printout._HUES[hue]})
    return render_page(LABELS[seed % 4], np.random.default_rng(seed), scale).image


def model_input(img: Image.Image) -> torch.Tensor:
    return preprocess(img, detect_grid_box(img), SCALE_SIZE, ink=True)[0].float()


@pytest.mark.parametrize("scale", [0.35, 0.5, 1.0, 1.5, 2.0])
def test_pitch_of_synthetic_pages(scale: float) -> None:
    for seed in range(3):
        img = page(seed, scale)
        pitch = measure_pitch(img, detect_grid_box(img))
        assert not pitch.fallback
        assert pitch.px_per_mm == pytest.approx(PX_PER_MM * scale, rel=0.005)


@pytest.mark.parametrize("hue", ["pink", "red", "orange"])
def test_pitch_and_ink_hold_for_every_grid_hue(hue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    img = page(1, 1.0, hue, monkeypatch)
    box = detect_grid_box(img)
    assert measure_pitch(img, box).px_per_mm == pytest.approx(PX_PER_MM, rel=0.005)
    x = model_input(img)
    # the grid is gone: nearly all of the input is paper-white, the trace (a few %) is dark
    assert float((x > 230).float().mean()) > 0.85 and 0.01 < float((x < 128).float().mean()) < 0.15


def test_faded_grid_and_jpeg_keep_the_input(monkeypatch: pytest.MonkeyPatch) -> None:
    img = page(2, 1.0)
    ref = model_input(img)
    arr = np.asarray(img).astype(np.float32)
    light = arr.max(axis=2, keepdims=True) >= 180  # paper and grid; the trace and text are darker
    for keep in (0.3, 1.6):  # a faded grid (30 % of its colour) and a stronger one
        faded = np.where(light, 255 - (255 - arr) * keep, arr)
        variant = Image.fromarray(np.clip(faded, 0, 255).astype(np.uint8))
        mad, iou = scale_agreement(model_input(variant), ref)
        assert mad <= SCALE_MAX_ABS_DIFF and iou >= SCALE_MIN_TRACE_IOU, keep
    for quality in (30, 60, 90):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as dec:
            mad, iou = scale_agreement(model_input(dec.convert("RGB")), ref)
        assert mad <= SCALE_MAX_ABS_DIFF and iou >= SCALE_MIN_TRACE_IOU, quality


def test_synthetic_page_at_three_scales_gives_the_same_input() -> None:
    """Issue 9: the same page rendered at scale 0.5, 1.0 and 1.5 -> preprocessed inputs within the bound."""
    for seed in range(4):
        inputs = {s: model_input(page(seed, s)) for s in (0.5, 1.0, 1.5)}
        for s in (0.5, 1.5):
            mad, iou = scale_agreement(inputs[s], inputs[1.0])
            assert mad <= SCALE_MAX_ABS_DIFF and iou >= SCALE_MIN_TRACE_IOU, (seed, s, mad, iou)


def test_no_grid_falls_back_to_the_box_size() -> None:
    blank = Image.new("RGB", (1060, 620), "white")
    pitch = measure_pitch(blank)
    assert pitch.fallback and pitch.px_per_mm == pytest.approx(1060 / NOMINAL_BOX_MM)
    grey = page(0, 1.0).convert("L").convert("RGB")  # a grey grid has no colour: not measured, flagged
    assert measure_pitch(grey, detect_grid_box(grey)).fallback
    assert GridPitch(3.97123, True).as_dict() == {"px_per_mm": 3.9712, "fallback": True}


def test_canonical_resampling() -> None:
    img = Image.new("RGB", (2110, 1236), "white")
    assert canonical_size(2110, 1236, GridPitch(7.96)) == (1060, 621)
    assert to_canonical(img, GridPitch(7.96)).size == (1060, 621)
    same = Image.new("RGB", (1054, 618), "white")
    assert to_canonical(same, GridPitch(CANONICAL_PX_PER_MM * 0.985)) is same  # within 2 %: untouched


def test_ink_cutoff_is_per_page_otsu() -> None:
    levels = np.array([20] * 10 + [240] * 50 + [255] * 100, dtype=np.uint8)
    t = otsu_threshold(levels)
    assert 20 < t <= 240  # between the trace and the grid, in the middle of the gap
    img = Image.new("RGB", (100, 100), (240, 170, 180))
    img.paste((20, 20, 20), (0, 50, 100, 53))
    assert INK_CUTOFF_RANGE[0] <= ink_cutoff(img) <= INK_CUTOFF_RANGE[1]
    out = ink_image(img)
    assert out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((5, 51))[0] < 60
    # the same picture as a red grid and as an orange one: the grid goes, the trace stays
    for colour in ((214, 52, 52), (232, 124, 52)):
        other = Image.new("RGB", (100, 100), colour)
        other.paste((20, 20, 20), (0, 50, 100, 53))
        assert ink_image(other).getpixel((5, 5))[0] == 255 and ink_image(other).getpixel((5, 51))[0] < 60
    with pytest.raises(ValueError, match="cutoff"):
        ink_image(img, cutoff=0)


def test_preprocess_with_a_given_pitch_equals_the_measured_one() -> None:
    img = page(3, 1.0)
    box = detect_grid_box(img)
    crop = img.crop((box.left, box.top, box.right, box.bottom))
    measured = measure_pitch(crop)
    given = preprocess(img, box, SCALE_SIZE, ink=True, pitch=measured)
    assert torch.equal(preprocess(img, box, SCALE_SIZE, ink=True), given)
    assert box == CropBox(*box.as_list(), fallback=False)


def test_checkpoint_preprocessing_version_is_checked() -> None:
    record = {"model_name": "inception_v3", "size": 75, "resize": "squash", "crop": True, "ink": True}
    with pytest.raises(ValueError, match="preprocessing version 1, .*versions 2, 3"):
        check_preprocessing_version(record, "old.ckpt")  # made before versioning: version 1
    with pytest.raises(ValueError, match="old.ckpt: trained with preprocessing version 7"):
        check_preprocessing_version({**record, "version": 7}, "old.ckpt")
    check_preprocessing_version({**record, "version": PREPROCESS_VERSION}, "new.ckpt")
    check_preprocessing_version({**record, "version": 2}, "v2.ckpt")  # the integer-box version: still reproduced
    check_preprocessing_version({"size": 160}, "partial")  # a size alone is not a record
    check_preprocessing_version(None, "none")


def test_old_checkpoint_is_refused_when_loaded(tmp_path) -> None:
    from ecg_inception.models.module import EcgClassifier

    prep = {"model_name": "inception_v3", "size": 75, "resize": "squash", "crop": True, "ink": False,
            "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "version": PREPROCESS_VERSION}  # fmt: skip
    model = EcgClassifier(pretrained=False, aux_logits=False, num_classes=4, preprocessing=prep)
    path = tmp_path / "m.ckpt"
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": "2.6.6"}  # fmt: skip
    torch.save(ckpt, path)
    EcgClassifier.load_from_checkpoint(path, map_location="cpu")
    old = dict(prep)
    del old["version"]
    ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"], "preprocessing": old}
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="preprocessing version 1"):
        EcgClassifier.load_from_checkpoint(path, map_location="cpu")

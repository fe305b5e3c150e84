"""Temperature scaling: fitted on val, lowers the ECE of an over-confident model, keeps accuracy; stored and read."""

from __future__ import annotations

import json

import pytest
import torch

from ecg_inception.models.calibration import (
    calibration_report,
    check_temperature,
    expected_calibration_error,
    fit_temperature,
    separable,
)


def _calibrated_logits(n: int = 2000, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is calibrated by construction: labels are drawn from softmax(logits)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 1.5
    targets = torch.multinomial(logits.softmax(dim=1), 1, generator=g).squeeze(1)
    return logits, targets


def test_scaling_lowers_the_ece_of_an_overconfident_model_and_keeps_accuracy() -> None:
    logits, targets = _calibrated_logits()
    over = logits * 10  # deliberately over-confident
    t = fit_temperature(over[:1000], targets[:1000])  # fit on a "val" half
    assert 7 < t < 14
    report = calibration_report(over[1000:], targets[1000:], t)  # judge on the "test" half
    assert report["ece_after"] < report["ece_before"] / 3
    assert report["nll_after"] < report["nll_before"]
    scaled = (over[1000:] / t).softmax(dim=1)
    assert torch.equal(scaled.argmax(dim=1), over[1000:].argmax(dim=1))  # accuracy unchanged
    assert expected_calibration_error(scaled, targets[1000:]) == pytest.approx(report["ece_after"])
    bins = report["reliability"]["after"]
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 1000


def test_an_underconfident_model_gets_a_temperature_below_one() -> None:
    logits, targets = _calibrated_logits(seed=1)
    assert fit_temperature(logits / 4, targets) < 0.5


def test_a_split_classified_without_error_keeps_temperature_one() -> None:
    """The bug: a 40-page val split, all right, gave T = 0.038 (a fit on a NLL that falls for ever as T -> 0)."""
    logits, targets = _calibrated_logits(n=40, seed=2)
    right = logits.clone()
    right[torch.arange(40), targets] = logits.max(dim=1).values + 0.5  # every target now strictly on top
    assert separable(right, targets) and not separable(logits, targets)
    assert fit_temperature(right, targets) == 1.0
    one_wrong = right.clone()
    one_wrong[0, targets[0]] = one_wrong[0].min() - 1.0
    assert not separable(one_wrong, targets)
    assert fit_temperature(one_wrong, targets) != 1.0  # one error: an interior minimum, fitted as before
    tie = right.clone()
    tie[0] = 0.0  # a tie for the top is not a right answer
    assert not separable(tie, targets)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "x", None, True])
def test_bad_temperatures_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="temperature"):
        check_temperature(bad, "somewhere.ckpt")


def test_training_stores_the_temperature_and_reports_calibration(tiny_run: dict) -> None:
    model = tiny_run["objects"]["model"]
    raw = torch.load(tiny_run["ckpt"], map_location="cpu", weights_only=True)
    assert raw["temperature"] == pytest.approx(model.temperature) and model.temperature != 1.0
    saved = json.loads((tiny_run["run"] / "metrics.json").read_text())
    for split in ("val", "test"):
        cal = saved[split]["calibration"]
        assert {"temperature", "ece_before", "ece_after", "nll_before", "nll_after"} <= set(cal), split
        assert cal["temperature"] == pytest.approx(model.temperature)
        assert cal["accuracy"] == pytest.approx(saved[split]["accuracy"])
    # Fitted on val, the NLL after scaling cannot be worse than before there.
    assert saved["val"]["calibration"]["nll_after"] <= saved["val"]["calibration"]["nll_before"] + 1e-6
    assert (tiny_run["run"] / "reliability.png").stat().st_size > 0


def test_calibrate_false_keeps_temperature_one(cfg_train, one_thread) -> None:
    from ecg_inception.training import train

    cfg_train.model.calibrate = False
    cfg_train.trainer.max_epochs = 1
    cfg_train.test = False
    cfg_train.plots = False
    metrics, objects = train(cfg_train)
    assert objects["model"].temperature == 1.0
    raw = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    assert raw["temperature"] == 1.0
    assert metrics["val"]["calibration"]["ece_after"] == pytest.approx(metrics["val"]["calibration"]["ece_before"])

"""Temperature scaling: one scalar T fitted on validation logits (LBFGS on the NLL), and what it changes.

`softmax(logits / T)` keeps every argmax (accuracy is unchanged) and moves the confidences towards the observed
accuracy. This module sits beside the model so that `training.py` can fit T after `fit` and the inference room
can apply it, each importing downwards only. Calibration is measured as the 15-bin expected calibration error
(torchmetrics' `MulticlassCalibrationError`, L1 norm) and the NLL, before and after scaling.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

ECE_BINS = 15
#: Fitted temperatures are kept within these bounds (a degenerate validation split cannot send T to 0 or inf).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 1e4


def check_temperature(value: Any, source: str = "temperature") -> float:
    """A temperature as a finite float > 0.

    Args:
        value: The stored value.
        source: What held it, named in the error.

    Returns:
        The temperature.

    Raises:
        ValueError: Not a finite positive number.
    """
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: temperature must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"{source}: temperature must be a finite number > 0, got {value!r}")
    return t


def separable(logits: torch.Tensor, targets: torch.Tensor) -> bool:
    """Whether every row's target has the strictly largest logit: then NLL(softmax(logits / T)) falls without
    end as T -> 0, and no temperature can be fitted (see `fit_temperature`)."""
    top2 = logits.topk(min(2, logits.shape[1]), dim=1).values
    right = logits.gather(1, targets.long()[:, None]).squeeze(1) == top2[:, 0]
    strict = top2[:, 0] > top2[:, -1] if logits.shape[1] > 1 else torch.ones_like(right)
    return bool((right & strict).all())


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T minimising NLL(softmax(logits / T), targets), by LBFGS on log T from T = 1.

    A split the model classifies without a single error (`separable`) has no minimum: its NLL falls for ever as
    T -> 0, and a fit would stop at some small T that makes every later prediction near-certain (a 40-page
    validation split did: T = 0.038, test NLL 1.46). Such a split says nothing about over-confidence, so T
    stays 1.

    Args:
        logits: (N, C) raw logits of a held-out split (validation).
        targets: (N,) class indices.
        max_iter: LBFGS iterations.

    Returns:
        T, clamped to [MIN_TEMPERATURE, MAX_TEMPERATURE]; 1.0 for a separable split.

    Raises:
        ValueError: Empty or mis-shaped inputs.
    """
    if logits.ndim != 2 or targets.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(f"expected logits (N, C) and targets (N,), N > 0; got {tuple(logits.shape)}, "
                         f"{tuple(targets.shape)}")
    if separable(logits, targets):
        return 1.0
    z = logits.detach().clone().double()  # a normal tensor: logits from inference_mode cannot enter autograd
    y = targets.detach().clone().long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    return min(MAX_TEMPERATURE, max(MIN_TEMPERATURE, t))


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """The `n_bins`-bin expected calibration error (top-label confidence, L1) of (N, C) probabilities."""
    return float(multiclass_calibration_error(probs.float(), targets.long(), num_classes=probs.shape[1],
                                              n_bins=n_bins, norm="l1"))


def reliability_bins(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Per confidence bin (equal width on [0, 1]): count, mean confidence and accuracy (None when empty)."""
    conf, pred = probs.float().max(dim=1)
    correct = (pred == targets.long()).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    index = torch.bucketize(conf, edges[1:-1], right=False)  # bin i holds (edge_i, edge_i+1]
    bins = []
    for i in range(n_bins):
        mask = index == i
        n = int(mask.sum())
        bins.append({
            "lower": float(edges[i]), "upper": float(edges[i + 1]), "count": n,
            "confidence": float(conf[mask].mean()) if n else None,
            "accuracy": float(correct[mask].mean()) if n else None,
        })  # fmt: skip
    return bins


def calibration_report(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> dict[str, Any]:
    """ECE and NLL of one split before (T = 1) and after scaling by `temperature`, plus reliability bins.

    Args:
        logits: (N, C) raw logits.
        targets: (N,) class indices.
        temperature: The fitted (or stored) T.

    Returns:
        `{"temperature", "ece_before", "ece_after", "nll_before", "nll_after", "accuracy",
        "reliability": {"before": bins, "after": bins}}` (plain values, for metrics.json).
    """
    z, y = logits.detach().float(), targets.detach().long()
    before, after = z.softmax(dim=1), (z / temperature).softmax(dim=1)
    return {
        "temperature": float(temperature),
        "n_bins": ECE_BINS,
        "ece_before": expected_calibration_error(before, y),
        "ece_after": expected_calibration_error(after, y),
        "nll_before": float(F.cross_entropy(z, y)),
        "nll_after": float(F.cross_entropy(z / temperature, y)),
        "accuracy": float((z.argmax(dim=1) == y).float().mean()),
        "reliability": {"before": reliability_bins(before, y), "after": reliability_bins(after, y)},
    }

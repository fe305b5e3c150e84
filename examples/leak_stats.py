"""Scores, bootstrap intervals and byte-copy counts for `leak_study.py` (numpy only, no training).

The three scores follow the library's `models.metrics.report_from_predictions` exactly (tests/test_leak_study.py
checks it), in plain numpy so that a 2000-resample bootstrap takes a second instead of minutes:

- accuracy: share of argmax predictions equal to the target;
- macro-F1: mean over the classes that occur among the targets or the predictions of 2 TP / (2 TP + FP + FN);
- macro AUROC: one-vs-rest AUROC (ties count one half) averaged over the classes that have both positives and
  negatives; None when no class has both.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("accuracy", "f1_macro", "auroc_macro")


def accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    """Share of rows whose highest probability is the target class."""
    return float(np.mean(np.argmax(probs, axis=1) == targets))


def macro_f1(probs: np.ndarray, targets: np.ndarray) -> float:
    """Macro-F1 over the classes with at least one target or prediction (torchmetrics' macro rule)."""
    n = probs.shape[1]
    pred = np.argmax(probs, axis=1)
    tp = np.bincount(targets[pred == targets], minlength=n).astype(float)
    fp = np.bincount(pred, minlength=n) - tp
    fn = np.bincount(targets, minlength=n) - tp
    seen = (tp + fp + fn) > 0
    return float(np.mean(2 * tp[seen] / (2 * tp[seen] + fp[seen] + fn[seen])))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    order = np.argsort(values, kind="mergesort")
    _, inverse, counts = np.unique(values[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = np.empty(len(values))
    ranks[order] = ((ends - counts + 1 + ends) / 2.0)[inverse]
    return ranks


def macro_auroc(probs: np.ndarray, targets: np.ndarray) -> float | None:
    """One-vs-rest AUROC (Mann-Whitney, ties one half) averaged over classes with positives and negatives."""
    scores = []
    for c in range(probs.shape[1]):
        positive = targets == c
        n_pos = int(positive.sum())
        n_neg = len(targets) - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = _average_ranks(probs[:, c])
        scores.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(scores)) if scores else None


def score(probs: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
    """{accuracy, f1_macro, auroc_macro} of (N, C) probabilities and (N,) integer targets (None when N is 0)."""
    if len(targets) == 0:
        return dict.fromkeys(METRICS)
    return {"accuracy": accuracy(probs, targets), "f1_macro": macro_f1(probs, targets),
            "auroc_macro": macro_auroc(probs, targets)}


def bootstrap_ci(
    probs: np.ndarray, targets: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, dict[str, Any]]:
    """Percentile bootstrap intervals of the three scores, resampling rows with replacement.

    Args:
        probs: (N, C) class probabilities (the pooled test predictions of every seed).
        targets: (N,) integer targets.
        n_boot: number of resamples.
        seed: seed of the resampling generator (the same inputs and seed give the same intervals).
        level: coverage of the interval.

    Returns:
        {metric: {"point", "low", "high", "undefined"}}: the score on all rows, the interval bounds (None when
        undefined) and how many resamples had no value (macro AUROC when no class had positives and negatives).
    """
    probs, targets = np.asarray(probs, dtype=float), np.asarray(targets, dtype=int)
    point = score(probs, targets)
    if len(targets) == 0:
        return {m: {"point": None, "low": None, "high": None, "undefined": n_boot} for m in METRICS}
    rng = np.random.default_rng(seed)
    draws = {m: [] for m in METRICS}
    for _ in range(n_boot):
        idx = rng.integers(0, len(targets), len(targets))
        for m, v in score(probs[idx], targets[idx]).items():
            draws[m].append(math.nan if v is None else v)
    tail = (1 - level) / 2 * 100
    out: dict[str, dict[str, Any]] = {}
    for m in METRICS:
        values = np.asarray(draws[m])
        defined = values[~np.isnan(values)]
        low, high = (np.percentile(defined, [tail, 100 - tail]) if len(defined) else (None, None))
        out[m] = {"point": point[m], "low": None if low is None else float(low),
                  "high": None if high is None else float(high), "undefined": int(len(values) - len(defined))}
    return out


def mean_sd(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean and sample sd (n - 1) of the values that are not None, and how many there were."""
    vals = [float(v) for v in values if v is not None]
    return {"mean": statistics.fmean(vals) if vals else None,
            "sd": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def read_manifest_records(path: str | Path) -> list[dict[str, str]]:
    """The rows of a run's splits.csv as dicts (the `# ecg_inception manifest` comment line skipped)."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(line for line in fh if not line.startswith("#")))


def train_copy_flags(records: Sequence[Mapping[str, str]], split: str = "test") -> dict[str, bool]:
    """{path: True when a file with the same sha256 sits in the train split} for every row of `split`.

    Args:
        records: manifest rows with at least `path`, `split` and `sha256`.
        split: the split whose files are checked (test, or val).

    Raises:
        ValueError: a row of `split` or `train` has no sha256 (byte copies cannot be counted then).
    """
    if any(not r.get("sha256") for r in records if r["split"] in ("train", split)):
        raise ValueError("a manifest row has no sha256: byte-identical copies cannot be counted")
    train = {r["sha256"] for r in records if r["split"] == "train"}
    return {r["path"]: r["sha256"] in train for r in records if r["split"] == split}

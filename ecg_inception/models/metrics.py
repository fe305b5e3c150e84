"""Multiclass evaluation metrics (torchmetrics) and their plain-Python report for metrics.json.

`compute_report` returns only built-in types (floats, ints, lists, dicts) so the report can be written as JSON
and compared across runs. Macro AUROC averages over the classes that have both positives and negatives in the
evaluated split; it is None when no class qualifies.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

REPORT_KEYS = ("accuracy", "precision_micro", "recall_micro", "f1_micro", "precision_macro", "recall_macro",
               "f1_macro", "auroc_macro", "loss", "per_class", "confusion_matrix")


def build_metrics(num_classes: int) -> MetricCollection:
    """Accuracy, micro/macro/per-class precision, recall and F1, per-class AUROC and the confusion matrix.

    Every metric takes class probabilities of shape (N, C) and integer targets of shape (N,).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    metrics: dict[str, Any] = {"accuracy": MulticlassAccuracy(num_classes, average="micro")}
    for average, suffix in (("micro", "micro"), ("macro", "macro"), (None, "per_class")):
        metrics[f"precision_{suffix}"] = MulticlassPrecision(num_classes, average=average)
        metrics[f"recall_{suffix}"] = MulticlassRecall(num_classes, average=average)
        metrics[f"f1_{suffix}"] = MulticlassF1Score(num_classes, average=average)
    metrics["auroc_per_class"] = MulticlassAUROC(num_classes, average=None)
    metrics["confusion_matrix"] = MulticlassConfusionMatrix(num_classes)
    return MetricCollection(metrics)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def compute_report(collection: MetricCollection, labels: Sequence[str], loss: float | None = None) -> dict[str, Any]:
    """The collection's values as plain Python: the REPORT_KEYS, per_class by label, confusion rows = true labels."""
    if not collection["confusion_matrix"].update_called:
        raise ValueError("compute_report: the metrics have seen no predictions")
    with warnings.catch_warnings():  # absent classes are handled below, not warned about per call
        warnings.filterwarnings("ignore", message=".*(positive|negative) samples.*")
        values = collection.compute()
    matrix = values["confusion_matrix"].long().tolist()
    if len(labels) != len(matrix):
        raise ValueError(f"compute_report: {len(labels)} labels for a {len(matrix)}-class confusion matrix")
    support = [sum(row) for row in matrix]
    total = sum(support)
    aurocs = values["auroc_per_class"].tolist()
    valid = [aurocs[i] for i in range(len(labels)) if 0 < support[i] < total]
    report: dict[str, Any] = {
        key: float(values[key])
        for key in ("accuracy", "precision_micro", "recall_micro", "f1_micro", "precision_macro", "recall_macro",
                    "f1_macro")
    }
    report["auroc_macro"] = _finite(float(sum(valid) / len(valid))) if valid else None
    report["loss"] = None if loss is None else _finite(float(loss))
    report["per_class"] = {
        label: {
            "precision": float(values["precision_per_class"][i]),
            "recall": float(values["recall_per_class"][i]),
            "f1": float(values["f1_per_class"][i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    report["confusion_matrix"] = matrix
    return report


def report_from_predictions(
    probs: torch.Tensor, target: torch.Tensor, labels: Sequence[str], loss: float | None = None
) -> dict[str, Any]:
    """One-shot report for (N, C) probabilities and (N,) targets."""
    collection = build_metrics(len(labels))
    collection.update(probs.float(), target.long())
    return compute_report(collection, labels, loss)


#: The report keys logged as `<stage>/<name>` scalars at the end of a val/test epoch (report key -> name).
LOGGED_KEYS = {"loss": "loss", "accuracy": "acc", "f1_macro": "f1_macro", "precision_macro": "precision_macro",
               "recall_macro": "recall_macro", "auroc_macro": "auroc_macro"}


def finish_stage(collection: MetricCollection, loss: MeanMetric, labels: Sequence[str],
                 stage: str) -> tuple[dict[str, Any], dict[str, float]] | None:
    """The report of one val/test epoch from its accumulated metrics and loss, which are then reset.

    Args:
        collection: The stage's `build_metrics` collection.
        loss: The stage's mean loss.
        labels: Class names in output order.
        stage: "val" or "test" (the prefix of the logged names).

    Returns:
        `(report, scalars)`: the `compute_report` dict and the `<stage>/<name>` scalars to log (`LOGGED_KEYS`,
        those that are not None); None when the epoch saw no predictions.
    """
    if not collection["confusion_matrix"].update_called:
        return None
    report = compute_report(collection, labels, float(loss.compute()))
    collection.reset()
    loss.reset()
    scalars = {f"{stage}/{name}": float(report[key]) for key, name in LOGGED_KEYS.items() if report[key] is not None}
    return report, scalars

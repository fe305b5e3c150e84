"""Run reports: metrics.json, a confusion-matrix plot, a reliability diagram and training curves."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from ecg_inception.core.plain import json_ready

METRICS_FILE = "metrics.json"
CONFUSION_FILE = "confusion_matrix.png"
CURVES_FILE = "training_curves.png"
RELIABILITY_FILE = "reliability.png"


class MetricsHistory(pl.Callback):
    """Collect epoch-level logged scalars (train/*, val/*) so curves can be drawn without a logger."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs validation inside the training epoch, so both stages' epoch values are here now.
        row: dict[str, float] = {"epoch": float(trainer.current_epoch)}
        for key, value in trainer.callback_metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                row[key.removesuffix("_epoch")] = float(value)
        self.rows.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Resuming restores the earlier epochs; loading the best checkpoint for testing after a fit (which
        # restores callback states too) must not cut the history back to that epoch.
        if not self.rows:
            self.rows = list(state_dict.get("rows", []))


def _save(fig: Any, path: str | Path) -> Path:
    """Lay out, write and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_metrics(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write `metrics` as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_ready(metrics), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Draw a confusion matrix (rows = true labels) with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * n, 1.2 + 1.1 * n), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            colour = "white" if peak and count > peak / 2 else "black"
            ax.text(j, i, str(int(count)), ha="center", va="center", color=colour)
    short = [label.replace("_", "\n") for label in labels]
    ax.set_xticks(range(n), short, fontsize=8)
    ax.set_yticks(range(n), short, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_curves(rows: Sequence[Mapping[str, float]], path: str | Path) -> Path | None:
    """Draw loss and accuracy per epoch; returns None when there is nothing to draw."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for ax, metric in zip(axes, ("loss", "acc"), strict=True):
        for stage in ("train", "val"):
            key = f"{stage}/{metric}"
            points = [(r["epoch"], r[key]) for r in rows if key in r]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=stage)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_reliability(calibration: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Reliability diagram: accuracy against mean confidence per bin, before and after temperature scaling.

    `calibration` is a split's `calibration` entry of metrics.json (models.calibration.calibration_report).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    t = calibration.get("temperature", 1.0)
    for key, name in (("before", "T = 1"), ("after", f"T = {t:.2f}")):
        bins = [b for b in calibration["reliability"][key] if b["count"]]
        ece = calibration.get(f"ece_{key}")
        label = f"{name} (ECE {ece:.3f})" if ece is not None else name
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", markersize=4,
                label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def write_report(
    out_dir: str | Path,
    metrics: Mapping[str, Any],
    history: Sequence[Mapping[str, float]] = (),
    plots: bool = True,
) -> dict[str, Path]:
    """Write metrics.json and, with `plots`, the confusion matrix and reliability diagram (test, else val) and
    training curves.

    metrics.json gains a `software` block (`core.provenance.software`: versions, the package's source digest
    and git commit) unless `metrics` has one: which code made the figures.
    """
    from ecg_inception.core.provenance import software

    out_dir = Path(out_dir)
    metrics = {**metrics, "software": metrics.get("software") or software()}
    written = {"metrics": write_metrics(out_dir / METRICS_FILE, metrics)}
    if not plots:
        return written
    labels = metrics.get("labels", [])
    for stage in ("test", "val"):
        stage_metrics = metrics.get(stage)
        if stage_metrics and stage_metrics.get("confusion_matrix"):
            title = f"{stage} ({metrics.get('protocol', '?')}{', LEAKY' if metrics.get('leaky') else ''})"
            written["confusion_matrix"] = plot_confusion_matrix(
                stage_metrics["confusion_matrix"], labels, out_dir / CONFUSION_FILE, title=title
            )
            break
    for stage in ("test", "val"):
        calibration = (metrics.get(stage) or {}).get("calibration")
        if calibration:
            written["reliability"] = plot_reliability(
                calibration, out_dir / RELIABILITY_FILE, title=f"{stage}: reliability (15 bins)"
            )
            break
    curves = plot_curves(history, out_dir / CURVES_FILE)
    if curves is not None:
        written["curves"] = curves
    return written

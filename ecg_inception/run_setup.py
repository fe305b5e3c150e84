"""What `train` settles around the fit: the input-size check, where the normalisation comes from, the one-line summary
of the files a split left out, and the report of a fit that did not finish."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from ecg_inception.data.datamodule import EcgDataModule
from ecg_inception.data.split import Manifest, excluded_path
from ecg_inception.errors import CheckpointError
from ecg_inception.models.backbone import split_name
from ecg_inception.models.module import check_image_size, to_plain
from ecg_inception.report import MetricsHistory, write_report

log = logging.getLogger(__name__)

NORMALISATION_KEYS = ("mean", "std", "interpolation")


def check_train_config(cfg: DictConfig) -> None:
    """Checks of values that would otherwise fail only at the first step, deep in torch.

    Raises:
        ConfigValueError: `data.image_size` below the model's minimum (75 px for inception_v3, 299 with aux).
    """
    check_image_size(cfg.data.get("image_size"), str(cfg.model.model_name), bool(cfg.model.get("aux_logits")))


def checkpoint_preprocessing(path: str | Path) -> dict[str, Any] | None:
    """The stored preprocessing of an ecg_inception checkpoint, None for any other weight file.

    Raises:
        CheckpointError: a Lightning checkpoint whose preprocessing is not a plain dict of values.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not ours to judge here: the weight loader reports unreadable files
        return None
    hparams = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    if not isinstance(hparams, dict) or "preprocessing" not in hparams:
        return None
    prep = hparams["preprocessing"]
    if not isinstance(prep, dict):
        raise CheckpointError(path, f"hyper_parameters.preprocessing is a {type(prep).__name__}, not a dict")
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        value = prep.get(key)
        if value is not None:
            if not (isinstance(value, (list, tuple)) and len(value) == 3
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise CheckpointError(path, f"preprocessing.{key} must be 3 numbers, got {value!r}")
            out[key] = [float(v) for v in value]
    interpolation = prep.get("interpolation")
    if interpolation is not None:
        if not isinstance(interpolation, str):
            raise CheckpointError(path, f"preprocessing.interpolation must be a string, got {interpolation!r}")
        out["interpolation"] = interpolation
    if "size" in prep:
        out["size"] = to_plain(prep["size"])
    return out


def data_overrides_for_weights(cfg: DictConfig) -> dict[str, Any]:
    """Normalisation that follows the weights actually loaded, as datamodule overrides.

    A hub tag (`model.pretrained=gluon_in1k`, or true for the default tag) selects that tag's timm data config. A
    `model.pretrained_file` that is an ecg_inception checkpoint (fine-tuning) brings its stored mean, std and
    interpolation, and its input size when `data.image_size` is null. Values set explicitly in `data` win.
    """
    data, model = cfg.data, cfg.model
    overrides: dict[str, Any] = {}
    pretrained_file = model.get("pretrained_file")
    stored = checkpoint_preprocessing(pretrained_file) if pretrained_file else None
    if stored is not None:
        for key in NORMALISATION_KEYS:
            if key in stored and data.get(key) is None:
                overrides[key] = stored[key]
        if data.get("image_size") is None and stored.get("size") is not None:
            overrides["image_size"] = stored["size"]
        log.info("Fine-tuning from %s: its stored preprocessing is used (%s)", pretrained_file, overrides)
        return overrides
    pretrained = model.get("pretrained")
    if pretrained is not None and pretrained is not False:
        arch, tag = split_name(str(model.model_name), to_plain(pretrained))
        if tag:
            overrides["model_name"] = f"{arch}.{tag}"
    return overrides


def report_excluded(manifest: Manifest, manifest_path: str | Path) -> str | None:
    """Log one line with the number of files the split left out and where the list is; returns the line."""
    if not manifest.excluded:
        return None
    reasons: dict[str, int] = {}
    for _, why in manifest.excluded:
        kind = why.split(":", 1)[0].split(" (", 1)[0]
        kind = "undersampled" if kind.startswith("undersampled") else kind
        kind = "exact copy" if kind.startswith("exact copy") else kind
        kind = "label conflict" if kind.startswith("label conflict") else kind
        reasons[kind] = reasons.get(kind, 0) + 1
    detail = ", ".join(f"{n} {kind}" for kind, n in sorted(reasons.items()))
    line = f"{len(manifest.excluded)} files left out of the split ({detail}); list: {excluded_path(manifest_path)}"
    log.warning(line)
    return line


def stopped_report(
    output_dir: Path, status: str, err: BaseException, datamodule: EcgDataModule, trainer: pl.Trainer,
    history: MetricsHistory, started: float,
) -> dict[str, Any]:
    """Write metrics.json of a fit that did not finish (status, error, where it stopped; no scores); returns it."""
    manifest = datamodule.manifest
    metrics: dict[str, Any] = {
        "status": status,
        "error": f"{type(err).__name__}: {err}",
        "labels": list(datamodule.labels),
        "protocol": manifest.protocol,
        "leaky": bool(manifest.leaky),
        "counts": manifest.counts(),
        "epochs": int(trainer.current_epoch),
        "step": int(getattr(err, "step", trainer.global_step)),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "val": None,
        "test": None,
        "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
    }
    write_report(output_dir, metrics, history.rows, plots=False)
    return metrics

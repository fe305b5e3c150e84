"""What `train` settles around the fit: the input-size check, where the normalisation comes from, the one-line summary
of the files a split left out, and the status and report of a fit that did not finish (`fit_with_status`, shared
with `pretraining.pretrain`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from ecg_inception.data.datamodule import EcgDataModule
from ecg_inception.data.manifest import Manifest, excluded_path
from ecg_inception.data.settings import check_preprocessing
from ecg_inception.distributed import is_rank_zero
from ecg_inception.errors import CheckpointError, ConfigValueError, TrainingDivergedError
from ecg_inception.models.backbone import split_name
from ecg_inception.models.module import check_image_size, to_plain
from ecg_inception.report import MetricsHistory, write_report
from ecg_inception.resume import SIGTERM_EXIT, preempted_message

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
    try:  # the same schema every stored preprocessing passes (data.settings): plain, allowed values only
        prep = check_preprocessing(hparams["preprocessing"], "hyper_parameters.preprocessing")
    except ConfigValueError as exc:
        raise CheckpointError(path, str(exc)) from None
    return {k: prep[k] for k in (*NORMALISATION_KEYS, "size", "version") if k in prep}


def data_overrides_for_weights(cfg: DictConfig) -> dict[str, Any]:
    """Normalisation that follows the weights actually loaded, as datamodule overrides.

    A hub tag (`model.pretrained=gluon_in1k`, or true for the default tag) selects that tag's timm data config. A
    `model.pretrained_file` that is an ecg_inception checkpoint (fine-tuning) brings its stored mean, std and
    interpolation, its input size when `data.image_size` is null and its preprocessing version when
    `data.preprocess_version` is null. Values set explicitly in `data` win.
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
        if data.get("preprocess_version") is None and stored.get("version") is not None:
            overrides["preprocess_version"] = stored["version"]
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


def split_description(datamodule: EcgDataModule) -> dict[str, Any]:
    """What metrics.json says about a run's split: labels, protocol, leaky and counts (of its manifest)."""
    manifest = datamodule.manifest
    return {
        "labels": list(datamodule.labels),
        "protocol": manifest.protocol,
        "leaky": bool(manifest.leaky),
        "counts": manifest.counts(),
    }


def stopped_report(
    output_dir: Path, status: str, err: BaseException, described: dict[str, Any], trainer: pl.Trainer,
    history: MetricsHistory, started: float,
) -> dict[str, Any]:
    """Write metrics.json of a fit that did not finish (status, error, where it stopped; no scores); returns it.

    Args:
        output_dir: the run folder.
        status: `diverged` or `failed`.
        err: what stopped the fit.
        described: what the report says about the run's data (`split_description`, or the pretraining set's).
        trainer: the trainer of the fit (epoch, step, logged scalars).
        history: the per-epoch rows logged so far.
        started: `time.perf_counter()` at the start of the run.

    Returns:
        The metrics written.
    """
    metrics: dict[str, Any] = {
        "status": status,
        "error": f"{type(err).__name__}: {err}",
        **described,
        "epochs": int(trainer.current_epoch),
        "step": int(getattr(err, "step", trainer.global_step)),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "val": None,
        "test": None,
        "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
    }
    if is_rank_zero():  # a distributed run's files are written once, by rank 0
        write_report(output_dir, metrics, history.rows, plots=False)
    return metrics


def fit_with_status(
    fit: Callable[[], Any], output_dir: Path, described: dict[str, Any], trainer: pl.Trainer,
    history: MetricsHistory, started: float,
) -> dict[str, Any] | None:
    """Run `fit` (a `trainer.fit` call); a fit that does not finish still leaves a metrics.json with its status.

    Args:
        fit: runs the fit.
        output_dir: the run folder.
        described: what the report says about the run's data (see `stopped_report`).
        trainer: the trainer `fit` uses.
        history: the per-epoch rows (a callback of that trainer).
        started: `time.perf_counter()` at the start of the run.

    Returns:
        None when the fit finished; the metrics of `status: diverged` when the loss became non-finite.

    Raises:
        SystemExit: `SIGTERM_EXIT` after SIGTERM (metrics.json: `failed`, naming where a resume starts).
        Exception: any other error of the fit, re-raised once metrics.json says `failed`.
    """
    try:
        fit()
    except SIGTERMException:  # Lightning stops at the end of the batch that was running when SIGTERM came
        err = RuntimeError(preempted_message(trainer, output_dir))
        log.error("%s", err)
        stopped_report(output_dir, "failed", err, described, trainer, history, started)
        raise SystemExit(SIGTERM_EXIT) from None
    except TrainingDivergedError as err:
        log.error("%s", err)
        return stopped_report(output_dir, "diverged", err, described, trainer, history, started)
    except Exception as err:
        try:
            stopped_report(output_dir, "failed", err, described, trainer, history, started)
        except OSError as report_err:  # a full disk: the run's own error is what matters
            log.error("could not write the stopped run's metrics.json (%s)", report_err)
        raise
    return None

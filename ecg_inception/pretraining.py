"""Domain pretraining: a multi-label backbone on printouts of real 12-lead signals (`experiment=pretrain_ptbxl`).

`pretrain(cfg)` is what `training.train` runs when `cfg.pretraining` is true: the same config groups, callbacks,
trainer, loggers, `ckpt_path=last` resume and run directory as a fine-tuning run, with `cfg.data` a
`synthetic.ptbxl_pages.PtbxlDataModule` and `cfg.model` a `models.multilabel.MultiLabelClassifier`. It reports
val (fold 9) and test (fold 10) macro AUROC over the superclasses in `metrics.json`. Its best checkpoint is what
`model.pretrained_file=` of a fine-tuning experiment takes (docs/pretraining.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from ecg_inception.core.provenance import software
from ecg_inception.distributed import is_rank_zero
from ecg_inception.errors import ConfigValueError
from ecg_inception.models.backbone import check_pretrained_available
from ecg_inception.models.multilabel import MultiLabelClassifier
from ecg_inception.report import write_report
from ecg_inception.run_setup import check_train_config, data_overrides_for_weights, fit_with_status
from ecg_inception.training import (
    _best_checkpoint,
    _scalar_metrics,
    build_trainer,
    plots_enabled,
    resolve_ckpt_path,
    resume_step_of,
)

log = logging.getLogger(__name__)


def _report(model: MultiLabelClassifier, split: str) -> dict[str, Any] | None:
    return model.last_reports.get(split)


def pretrain(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit the multi-label model on rendered PTB-XL printouts, validate and test its best checkpoint, report.

    Args:
        cfg: a composed `train.yaml` config with `experiment=pretrain_ptbxl` (or any config whose `pretraining`
            is true, `data` a PtbxlDataModule and `model` a MultiLabelClassifier).

    Returns:
        `(metrics, objects)` as `training.train` returns them; `metrics["test"]["auroc_macro"]` is the fold-10
        macro AUROC of the best-by-`val/auroc_macro` checkpoint. A fit whose loss became non-finite returns
        `status: diverged` (no scores); any other error of the fit is raised after metrics.json says
        `status: failed` (`run_setup.fit_with_status`).

    Raises:
        ConfigValueError: the model is not multi-label.
        DatasetError: `data.root` missing or not a PTB-XL folder; a patient spanning folds.
        CheckpointNotFoundError: `ckpt_path` names no checkpoint (or `last` finds none).
    """
    started = time.perf_counter()
    software()  # the code as this run starts (cached for metrics.json)
    output_dir = Path(str(cfg.paths.output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    if is_rank_zero():
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    pl.seed_everything(int(cfg.seed), workers=True)
    check_pretrained_available(
        str(cfg.model.model_name), cfg.model.get("pretrained"), cfg.model.get("pretrained_file")
    )
    check_train_config(cfg)
    ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir, Path(str(cfg.paths.log_dir)), str(cfg.task_name))
    resume_step = resume_step_of(ckpt)  # a corrupt or unsafe file fails here, before any rendering
    # ImageNet -> PTB-XL: a hub tag or an ImageNet file selects its normalisation, as in fine-tuning
    datamodule = instantiate(cfg.data, _partial_=True)(
        drop_last=bool(cfg.model.get("aux_logits", False)), **data_overrides_for_weights(cfg)
    )
    datamodule.setup("fit")
    model = instantiate(
        cfg.model, num_classes=datamodule.num_classes, labels=list(datamodule.labels),
        preprocessing=datamodule.preprocessing,
    )  # fmt: skip
    if not isinstance(model, MultiLabelClassifier):
        raise ConfigValueError(
            f"pretraining needs model._target_=ecg_inception.models.multilabel.MultiLabelClassifier, got "
            f"{type(model).__name__}"
        )
    trainer, history = build_trainer(cfg, model, output_dir, resume_step)
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer, "history": history}
    base: dict[str, Any] = {"task": "multilabel", "pretraining": "ptbxl", "labels": list(datamodule.labels),
                            "seed": int(cfg.seed), "data": datamodule.describe()}
    # A fit that does not finish leaves metrics.json with status diverged or failed, as in `training.train`.
    stopped = fit_with_status(
        lambda: trainer.fit(model=model, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None,
                            weights_only=True),
        output_dir, base, trainer, history, started,
    )
    if stopped is not None:
        return stopped, objects
    logged = _scalar_metrics(trainer)
    best, eval_ckpt = _best_checkpoint(trainer.callbacks)
    trainer.validate(model=model, datamodule=datamodule, ckpt_path=eval_ckpt, verbose=False, weights_only=True)
    if cfg.get("test", True):
        trainer.test(model=model, datamodule=datamodule, ckpt_path=eval_ckpt, verbose=False, weights_only=True)
    logged.update({k: v for k, v in _scalar_metrics(trainer).items() if k.startswith(("test/", "val/"))})
    last = next((c.last_model_path or c.best_model_path for c in trainer.callbacks
                 if isinstance(c, ModelCheckpoint) and not c.monitor), None)
    metrics: dict[str, Any] = {
        "status": "ok", **base,
        "best_checkpoint": best, "last_checkpoint": last or None,
        "epochs": int(trainer.current_epoch),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "val": _report(model, "val"), "test": _report(model, "test"), "logged": logged,
    }  # fmt: skip
    if is_rank_zero():
        write_report(output_dir, metrics, history.rows, plots=plots_enabled(cfg))
        test = metrics["test"] or {}
        log.info("Pretraining report written to %s (test macro AUROC %s)", output_dir, test.get("auroc_macro"))
    return metrics, objects

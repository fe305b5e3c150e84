"""`ecg-inception-train [overrides]`: a thin Hydra wrapper around `ecg_inception.training.train`."""

from __future__ import annotations

import math
import shlex
from typing import Any

import hydra
from omegaconf import DictConfig

from ecg_inception.cli._errors import finish_run, library_errors
from ecg_inception.sweep_summary import sweep_job
from ecg_inception.training import get_metric_value, train

PROG = "ecg-inception-train"


@hydra.main(version_base="1.3", config_path="pkg://ecg_inception.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train, test and report; returns `optimized_metric` for sweepers.

    Prints where the report is, the test accuracy and macro-F1, and one `ecg-inception-predict` line to try
    next. Exits 2 with the message alone on a
    library error (a bad value, folder or checkpoint), 1 when the run diverged or failed. A sweep job returns
    NaN instead and the sweep goes on: a job that raised records its error in its own folder
    (`ecg_inception.sweep_summary.sweep_job`, inside `library_errors` so that it sees the error itself), and the
    sweep summary counts it; the block also keeps the DDP ranks of one sweep job apart from the next
    (`ecg_inception.distributed`).
    """
    with library_errors(PROG), sweep_job() as job:
        metrics, objects = train(cfg)
        print(f"Report: {cfg.paths.output_dir}/metrics.json")
        test = metrics.get("test") or {}
        if test and metrics.get("task") == "multilabel":  # pretraining: AUROC is what it is judged by
            auroc, f1 = test.get("auroc_macro"), test.get("f1_macro")
            print(f"Test macro AUROC {_fmt(auroc)}, macro-F1 {_fmt(f1)}")
        elif test:
            leaky = " (LEAKY: paper protocol)" if metrics.get("leaky") else ""
            print(f"Test accuracy {test['accuracy']:.3f}, macro-F1 {test['f1_macro']:.3f}{leaky}")
        hint = predict_hint(metrics, objects)
        if hint:
            print(hint)
        status = str(metrics.get("status", "ok"))
        finish_run(PROG, status, metrics.get("error"))
        if status != "ok":
            return math.nan  # a sweep job: Optuna records a NaN objective as a failed trial and goes on
        return get_metric_value(metrics, cfg.get("optimized_metric"))
    return job.value


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def predict_hint(metrics: dict[str, Any], objects: dict[str, Any]) -> str | None:
    """One `ecg-inception-predict` command on the run's best checkpoint and a page of its test split.

    For a multi-label pretraining run (`experiment=pretrain_ptbxl`), whose checkpoint is meant for
    `model.pretrained_file`, the fine-tuning command instead.

    Args:
        metrics: What `train` returned (its `best_checkpoint`).
        objects: What `train` returned beside it (its `datamodule`).

    Returns:
        The line to print, or None when the run has no best checkpoint or no test page.
    """
    best, datamodule = metrics.get("best_checkpoint"), objects.get("datamodule")
    if not best or datamodule is None:
        return None
    if metrics.get("task") == "multilabel":  # a pretraining checkpoint is a starting point, not a predictor
        return (f"Fine-tune next: ecg-inception-train experiment=finetune_cpu data.root=<your printouts> "
                f"model.pretrained_file={shlex.quote(str(best))}")
    rows = datamodule.manifest.split_rows("test")
    if not rows:
        return None
    page = datamodule.dataset_root() / rows[0].path
    return f"Try next: ecg-inception-predict {shlex.quote(str(best))} {shlex.quote(str(page))}"


if __name__ == "__main__":
    main()

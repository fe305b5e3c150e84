"""`ecg-inception-train [overrides]`: a thin Hydra wrapper around `ecg_inception.training.train`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ecg_inception.sweep_summary import sweep_job
from ecg_inception.training import get_metric_value, train


@hydra.main(version_base="1.3", config_path="pkg://ecg_inception.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train, test and report; returns `optimized_metric` for sweepers (NaN for a failed sweep job)."""
    # A failing multirun job records its error in its folder and the sweep goes on (ecg_inception.sweep_summary);
    # the block also keeps DDP ranks of one sweep job apart from the next (ecg_inception.distributed).
    with sweep_job() as job:
        metrics, _ = train(cfg)
        print(f"Report: {cfg.paths.output_dir}/metrics.json")
        return get_metric_value(metrics, cfg.get("optimized_metric"))
    return job.value


if __name__ == "__main__":
    main()

"""`ecg-inception-eval ckpt_path=... [overrides]`: a thin Hydra wrapper around `ecg_inception.training.evaluate`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ecg_inception.training import evaluate


@hydra.main(version_base="1.3", config_path="pkg://ecg_inception.conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Evaluate a checkpoint on its run's split and write metrics.json."""
    evaluate(cfg)
    print(f"Report: {cfg.paths.output_dir}/metrics.json")


if __name__ == "__main__":
    main()

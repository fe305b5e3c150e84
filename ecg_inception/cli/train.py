"""`ecg-inception-train [overrides]`: a thin Hydra wrapper around `ecg_inception.training.train`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ecg_inception.training import get_metric_value, train


@hydra.main(version_base="1.3", config_path="pkg://ecg_inception.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train, test and report; returns `optimized_metric` for sweepers."""
    metrics, _ = train(cfg)
    print(f"Report: {cfg.paths.output_dir}/metrics.json")
    test = metrics.get("test") or {}
    if test:
        leaky = " (LEAKY: paper protocol)" if metrics.get("leaky") else ""
        print(f"Test accuracy {test['accuracy']:.3f}, macro-F1 {test['f1_macro']:.3f}{leaky}")
    return get_metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()

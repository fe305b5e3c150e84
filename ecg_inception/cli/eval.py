"""`ecg-inception-eval ckpt_path=... [members=[...]] [overrides]`: a thin Hydra wrapper around
`ecg_inception.training.evaluate`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ecg_inception.cli._errors import library_errors
from ecg_inception.training import evaluate

PROG = "ecg-inception-eval"


@hydra.main(version_base="1.3", config_path="pkg://ecg_inception.conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Evaluate a checkpoint (or it and `members` as a seed ensemble) on its run's split (or a whole folder:
    eval_all=true) and write metrics.json.

    Exits 2 with the message alone on a library error (a bad value, folder or checkpoint).
    """
    with library_errors(PROG):
        evaluate(cfg)
    print(f"Report: {cfg.paths.output_dir}/metrics.json")


if __name__ == "__main__":
    main()

"""Train and test from Python with the Hydra compose API, no command line involved.

What it shows:

- composing the shipped config (`ecg_inception.conf`) with `initialize_config_module` + `compose` (wrapped by
  `ecg_inception.core.compose.compose_config`), the same way the console scripts do, and overriding keys as a list of strings;
- `paths.output_dir` must be set by hand under the compose API (its default, `${hydra:runtime.output_dir}`,
  only resolves inside a running Hydra app);
- `data.root=null`: a synthetic printout set is generated on first use into `paths.cache_dir`;
- `train(cfg)` (from `ecg_inception.training`) returning `(metrics, objects)`: the metrics are what `metrics.json` holds,
  the objects are the live datamodule, model and trainer;
- `hydra.utils.instantiate(cfg.data)` for a datamodule on its own (here: to print the split it builds).

It trains the demo experiment (a from-scratch inception_v3, aux head off, whole network trainable) at a tiny
size: 8 synthetic printouts per class, 75 px inputs, 2 epochs, no DataLoader workers. On 2 busy CPU cores
this takes one to two minutes. At this size the scores are chance level: the example shows the mechanics,
not a result. Everything goes into a temporary directory that is deleted afterwards unless `--keep` is given.

Run from anywhere, with the package installed (`pip install -e .`):

    python examples/python_api.py
    python examples/python_api.py --keep --epochs 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from hydra.utils import instantiate

from ecg_inception.core.compose import compose_config as compose_shipped
from ecg_inception.training import train


def compose_config(workdir: Path, epochs: int, per_class: int, seed: int):
    """The `train` config with the demo experiment, shrunk to a smoke-test budget."""
    overrides = [
        "experiment=demo",
        f"seed={seed}",
        # No data.root: generate a synthetic set into the cache dir (reused by later runs with the same settings).
        "data.root=null",
        f"data.synthetic_per_class={per_class}",
        "data.image_size=75",  # inception_v3's smallest input
        "data.batch_size=8",
        "data.num_workers=0",
        f"paths.cache_dir={workdir / 'cache'}",
        f"paths.log_dir={workdir / 'logs'}",
        f"paths.output_dir={workdir / 'run'}",
        "model.aux_logits=false",
        f"trainer.max_epochs={epochs}",
        "callbacks.rich_progress_bar=null",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "plots=true",
    ]
    # initialize_config_module(config_module="ecg_inception.conf") + compose, after clearing Hydra's global state
    # so that it can be called again in the same process.
    return compose_shipped("train", overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=8, help="synthetic printouts per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ecg_inception_api_"))
    try:
        cfg = compose_config(workdir, args.epochs, args.per_class, args.seed)

        # The datamodule on its own: instantiate(cfg.data) gives an EcgDataModule; setup() generates the
        # synthetic set if needed, audits the folder and splits it by cfg.data.protocol.
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("fit")
        print(f"data: {dm.dataset_root()}")
        print(f"protocol {dm.manifest.protocol} (leaky: {dm.manifest.leaky}), labels {dm.labels}")
        for split, per_label in dm.manifest.counts().items():
            print(f"  {split:5s} {sum(per_label.values()):3d} files  {per_label}")

        # The whole job: fit, test the best checkpoint, write the run report into paths.output_dir.
        metrics, objects = train(cfg)

        run = Path(cfg.paths.output_dir)
        test = metrics["test"]
        print(f"\ntrained {metrics['epochs']} epochs in {metrics['wall_time_s']} s")
        print(
            f"test accuracy {test['accuracy']:.3f}, macro F1 {test['f1_macro']:.3f}, loss {test['loss']:.3f}"
        )
        print("test confusion matrix (rows = true labels):")
        for label, row in zip(metrics["labels"], test["confusion_matrix"], strict=True):
            print(f"  {label:22s} {row}")
        print(f"best checkpoint: {metrics['best_checkpoint']}")
        on_disk = json.loads((run / "metrics.json").read_text())
        assert on_disk["test"]["accuracy"] == test["accuracy"]
        print(f"run directory {run}: {sorted(p.name for p in run.iterdir())}")
        print(f"trainer stopped at epoch {objects['trainer'].current_epoch}")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

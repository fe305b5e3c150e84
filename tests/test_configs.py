"""Every shipped config composes, and the data/model groups instantiate on their own."""

from __future__ import annotations

from importlib.resources import files

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ecg_inception.core.compose import compose_config
from ecg_inception.training import instantiate_callbacks

CONF = files("ecg_inception.conf")
EXPERIMENTS = sorted(p.name[:-5] for p in CONF.joinpath("experiment").iterdir() if p.name.endswith(".yaml"))
SEARCHES = sorted(p.name[:-5] for p in CONF.joinpath("hparams_search").iterdir() if p.name.endswith(".yaml"))
UNFREEZE = sorted(
    p.name[:-5] for p in CONF.joinpath("model", "unfreeze").iterdir() if p.name.endswith(".yaml")
)


def _compose(config_name: str = "train", overrides: list[str] | None = None, hydra_cfg: bool = False):
    return compose_config(config_name, overrides or [], return_hydra_config=hydra_cfg)


def test_shipped_groups_are_found() -> None:
    assert {"demo", "paper", "leakfree", "scratch_cpu"} <= set(EXPERIMENTS)
    assert {"paper_grid", "optuna"} <= set(SEARCHES)
    assert {"keras_minus10", "keras_minus3", "blocks1", "blocks3", "all", "head"} <= set(UNFREEZE)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str, tmp_path) -> None:
    cfg = _compose(overrides=[f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    # Everything outside the hydra node resolves without a running Hydra app.
    OmegaConf.to_container(cfg, resolve=True)
    for key in (
        "seed",
        "data.root",
        "data.protocol",
        "data.batch_size",
        "data.split_manifest",
        "model.pretrained",
        "model.pretrained_file",
        "model.aux_logits",
        "model.drop_rate",
        "model.unfreeze.blocks",
        "model.unfreeze.layers",
        "model.optimizer.lr",
        "trainer.max_epochs",
        "trainer.accelerator",
        "trainer.devices",
        "callbacks.early_stopping.patience",
        "paths.output_dir",
    ):
        OmegaConf.select(cfg, key, throw_on_missing=True)
    callbacks = instantiate_callbacks(cfg.callbacks)  # every callback entry builds
    assert len(callbacks) == sum(v is not None for v in cfg.callbacks.values())


def test_paper_experiment_is_the_seed_setup() -> None:
    cfg = _compose(overrides=["experiment=paper", "paths.output_dir=x"])
    assert cfg.data.protocol == "paper"
    assert cfg.trainer.max_epochs == 200
    assert cfg.data.batch_size == 32
    assert cfg.model.optimizer.lr == 0.01
    assert cfg.model.drop_rate == 0.5
    assert cfg.callbacks.early_stopping.patience == 10
    assert cfg.callbacks.early_stopping.monitor == "val/loss"
    assert cfg.callbacks.model_checkpoint.monitor == "val/acc"
    assert cfg.callbacks.last_checkpoint.filename == "last" and cfg.callbacks.last_checkpoint.monitor is None
    leak = _compose(overrides=["experiment=leakfree", "paths.output_dir=x"])
    assert leak.data.protocol == "leakfree"
    assert OmegaConf.to_container(leak.model) == OmegaConf.to_container(cfg.model)


def test_scratch_cpu_is_the_measured_recipe() -> None:
    """The settings docs/scratch_cpu.md measured; change them only with new measurements."""
    cfg = _compose(overrides=["experiment=scratch_cpu", "paths.output_dir=x"])
    assert (cfg.data.protocol, cfg.data.balance, list(cfg.data.image_size)) == ("leakfree", "none", [128, 256])
    assert cfg.data.ink is True and cfg.data.batch_size == 16
    assert cfg.data.augment is True and cfg.data.augment_kind == "none"  # page augmentation only (version 3)
    assert OmegaConf.to_container(cfg.data.page_augment) == {"scale": [0.5, 1.5], "jpeg_quality": [40, 95],
                                                             "jpeg_p": 0.5}
    assert cfg.model.pretrained is False and cfg.model.aux_logits is False and cfg.model.unfreeze.blocks == "all"
    assert cfg.model.optimizer._target_ == "torch.optim.Adam" and cfg.model.optimizer.lr == 0.001
    assert cfg.model.scheduler is None and cfg.model.label_smoothing == 0.0 and cfg.model.drop_rate == 0.0
    assert cfg.trainer.max_epochs == 30 and cfg.callbacks.early_stopping.patience == 30
    assert (cfg.callbacks.ema.decay, cfg.callbacks.ema.start_epoch) == (0.98, 5)
    assert cfg.callbacks.model_checkpoint.monitor == "val/acc"


@pytest.mark.parametrize("search", SEARCHES)
def test_every_search_composes(search: str, tmp_path) -> None:
    if search == "optuna":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _compose(overrides=["experiment=paper", f"hparams_search={search}"], hydra_cfg=True)
    params = cfg.hydra.sweeper.params
    assert "model/unfreeze" in params
    assert cfg.optimized_metric == "val/acc_best"


def test_paper_grid_is_the_seeds_grid() -> None:
    cfg = _compose(overrides=["experiment=paper", "hparams_search=paper_grid"], hydra_cfg=True)
    params = cfg.hydra.sweeper.params
    assert params["data.batch_size"] == "16,32,64"
    assert params["model.optimizer.lr"] == "0.001,0.01,0.1"
    assert params["model.drop_rate"] == "0.3,0.5"
    assert set(params["model/unfreeze"].split(",")) == {"keras_minus3", "keras_minus10", "blocks1"}


def test_data_and_model_instantiate_alone(tmp_path) -> None:
    from ecg_inception import EcgClassifier, EcgDataModule

    cfg = _compose(
        overrides=[
            "model.pretrained=false",
            "model.aux_logits=false",
            "model/unfreeze=all",
            f"paths.cache_dir={tmp_path}",
        ]
    )
    dm = instantiate(cfg.data)
    assert isinstance(dm, EcgDataModule)
    model = instantiate(cfg.model)
    assert isinstance(model, EcgClassifier)
    # Hyperparameters stay plain values (checkpoints load with weights_only=True).
    assert "optimizer" not in model.hparams or not callable(model.hparams["optimizer"])


@pytest.mark.parametrize("debug", ["default", "limit", "overfit", "profiler"])
def test_debug_configs_compose_and_extend_the_default(debug: str) -> None:
    cfg = _compose(overrides=[f"debug={debug}", "experiment=demo"])
    assert cfg.task_name == "debug" and cfg.trainer.accelerator == "cpu" and cfg.trainer.detect_anomaly is True
    assert cfg.data.num_workers == 0 and not cfg.get("callbacks")  # applied after the experiment
    expected = {"default": {"max_epochs": 1}, "limit": {"max_epochs": 3, "limit_train_batches": 3},
                "overfit": {"max_epochs": 20, "overfit_batches": 3}, "profiler": {"max_epochs": 1, "profiler": "simple"}}
    assert {k: cfg.trainer.get(k) for k in expected[debug]} == expected[debug]
    assert instantiate_callbacks(cfg.get("callbacks")) == []


def test_without_debug_or_local_nothing_changes() -> None:
    cfg = _compose()
    assert cfg.task_name == "train" and "detect_anomaly" not in cfg.trainer

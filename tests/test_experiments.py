"""One behaviour test per shipped experiment (test_configs pins the values; these check what the values do)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate

from ecg_inception.callbacks import EmaWeights
from ecg_inception.models.module import EcgClassifier
from ecg_inception.training import instantiate_callbacks, train


def _data(experiment: str, root: Path, tmp: Path, *extra: str):
    cfg = compose_cfg("train", [f"experiment={experiment}", f"data.root={root}", "data.num_workers=0",
                                f"paths.cache_dir={tmp / 'cache'}", f"paths.output_dir={tmp / 'run'}", *extra])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return cfg, dm


def _model(cfg, dm, **overrides) -> EcgClassifier:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return instantiate(cfg.model, num_classes=dm.num_classes, labels=dm.labels, preprocessing=dm.preprocessing,
                           **overrides)


def test_paper_is_leaky_keeps_every_copy_and_trains_only_the_keras_tail(synthetic_root: Path, tmp_path: Path) -> None:
    cfg, dm = _data("paper", synthetic_root, tmp_path)
    manifest = dm.manifest
    assert manifest.leaky and manifest.crossing_groups()  # planted byte copies land in different splits
    assert len(manifest.rows) == 32 and not manifest.excluded  # every file, copies included, 8 per class
    assert dm.crop is False and dm.augment_kind == "paper"
    x, _ = dm.dataset("test")[0]
    assert x.shape == (3, 299, 299)
    model = _model(cfg, dm, pretrained=False)  # the tv_in1k weights cannot be downloaded here
    trunk = {n for n, p in model.backbone.named_parameters() if p.requires_grad
             and not n.startswith(("fc.", "AuxLogits."))}
    assert trunk == {"Mixed_7c.branch_pool.bn.weight", "Mixed_7c.branch_pool.bn.bias"}  # Keras -10
    assert model.backbone.aux_logits and model.hparams.aux_logits


def test_leakfree_drops_copies_crops_and_never_crosses_splits(synthetic_root: Path, tmp_path: Path) -> None:
    cfg, dm = _data("leakfree", synthetic_root, tmp_path)
    manifest = dm.manifest
    assert not manifest.leaky and manifest.crossing_groups() == []
    assert len(manifest.rows) == 24 and sum("exact copy" in why for _, why in manifest.excluded) == 8
    assert dm.crop is True and dm.augment_kind == "ecg"
    shas = {}
    for row in manifest.rows:
        assert shas.setdefault(row.sha256, row.split) == row.split


def test_scratch_cpu_feeds_wide_ink_and_averages_the_weights(synthetic_root: Path, tmp_path: Path) -> None:
    cfg, dm = _data("scratch_cpu", synthetic_root, tmp_path)
    x, _ = dm.dataset("train")[0]
    assert x.shape == (3, 128, 256)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # ink: grid removed, grey trace on all channels
    assert dm.augment is True and dm.augment_kind == "none" and dm.page_augment is not None  # page-level only
    assert dm.dataset("train").augment is None  # no tensor augmentation after preprocessing
    assert dm.dataset("val")[0][0].equal(dm.dataset("val")[0][0])  # evaluation: the same tensor every time
    emas = [c for c in instantiate_callbacks(cfg.callbacks) if isinstance(c, EmaWeights)]
    assert len(emas) == 1 and emas[0].start_epoch == 5
    model = _model(cfg, dm)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_demo_trains_from_scratch_offline_and_reports(synthetic_root: Path, tmp_path: Path) -> None:
    overrides = ["experiment=demo", f"data.root={synthetic_root}", "data.num_workers=0", "trainer.max_epochs=1",
                 f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'run'}",
                 f"paths.log_dir={tmp_path / 'logs'}", "callbacks.rich_progress_bar=null", "plots=false",
                 "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]  # fmt: skip
    metrics, objects = train(compose_cfg("train", overrides))
    assert metrics["status"] == "ok" and metrics["epochs"] == 1
    model = objects["model"]
    assert model.hparams.pretrained is False and all(p.requires_grad for p in model.parameters())
    assert metrics["test"]["confusion_matrix"] and sum(map(sum, metrics["test"]["confusion_matrix"])) > 0
    assert objects["datamodule"].data_config.size == (128, 256)  # the demo's wide ink input

"""Normalisation follows the weights actually loaded: a hub tag's timm config, or the stored values of an
ecg_inception checkpoint (eval and fine-tuning never look them up again)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import timm
import torch
from conftest import compose_cfg, tiny_overrides

from ecg_inception.training import evaluate, train

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
STORED = ([0.1, 0.2, 0.3], [0.9, 0.8, 0.7])


@pytest.fixture(scope="module")
def gluon_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """A one-batch fit with model.pretrained=gluon_in1k from a local (random) 1000-class file: no network."""
    tmp = tmp_path_factory.mktemp("gluon")
    weights = tmp / "inception_v3_random1000.pth"
    torch.save(timm.create_model("inception_v3", pretrained=False).state_dict(), weights)
    overrides = [o for o in tiny_overrides(synthetic_root, tmp) if not o.startswith("model.pretrained=")] + [
        "model.pretrained=gluon_in1k", f"model.pretrained_file={weights}", "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1", "test=false", "plots=false",
    ]  # fmt: skip
    metrics, objects = train(compose_cfg("train", overrides))
    yield tmp, objects
    shutil.rmtree(tmp, ignore_errors=True)  # checkpoints are hundreds of MiB: free the disk for the next module


def test_a_hub_tag_sets_its_own_normalisation(gluon_run) -> None:
    """Before the fix gluon_in1k was normalised with the default tag's 0.5/0.5."""
    _, objects = gluon_run
    config = objects["datamodule"].data_config
    assert config.mean == pytest.approx(IMAGENET[0]) and config.std == pytest.approx(IMAGENET[1])
    prep = objects["model"].hparams.preprocessing
    assert prep["mean"] == pytest.approx(IMAGENET[0]) and prep["std"] == pytest.approx(IMAGENET[1])


def _with_stored_normalisation(run: Path, dest: Path) -> Path:
    """A copy of the run dir whose last.ckpt stores mean/std that no timm config has, and preprocessing version 2."""
    shutil.copytree(run, dest)
    path = dest / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["preprocessing"].update(mean=STORED[0], std=STORED[1], version=2)
    torch.save(ckpt, path)
    return path


def test_eval_uses_the_checkpoints_stored_mean_and_std(gluon_run, tmp_path: Path) -> None:
    """Before the fix evaluate() looked mean/std up again from the model name."""
    tmp, _ = gluon_run
    ckpt = _with_stored_normalisation(tmp / "run", tmp_path / "run")
    overrides = [f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'eval'}", f"paths.cache_dir={tmp / 'cache'}",
                 "data.num_workers=0", "plots=false", "splits=[val]", "+trainer.enable_progress_bar=false",
                 "+trainer.limit_val_batches=1"]  # fmt: skip
    _, objects = evaluate(compose_cfg("eval", overrides))
    config = objects["datamodule"].data_config
    assert list(config.mean) == pytest.approx(STORED[0]) and list(config.std) == pytest.approx(STORED[1])
    # ... and its preprocessing version: a version-2 checkpoint is scored on version-2 inputs (integer crop box)
    dm = objects["datamodule"]
    assert dm.preprocessing["version"] == 2 and {s.version for s in dm.dataset("val").settings} == {2}


def test_fine_tuning_from_an_ecg_inception_checkpoint_keeps_its_preprocessing(gluon_run, tmp_path: Path) -> None:
    from ecg_inception.run_setup import data_overrides_for_weights

    tmp, _ = gluon_run
    ckpt = _with_stored_normalisation(tmp / "run", tmp_path / "run")
    cfg = compose_cfg("train", ["model.pretrained=false", f"model.pretrained_file={ckpt}"])
    overrides = data_overrides_for_weights(cfg)
    assert overrides["mean"] == pytest.approx(STORED[0]) and overrides["std"] == pytest.approx(STORED[1])
    assert overrides["image_size"] == 75  # data.image_size is null: the checkpoint's size
    assert overrides["preprocess_version"] == 2  # data.preprocess_version is null: the checkpoint's version
    tagged = compose_cfg("train", ["model.pretrained=gluon_in1k"])
    assert data_overrides_for_weights(tagged) == {"model_name": "inception_v3.gluon_in1k"}
    explicit = compose_cfg("train", ["model.pretrained=false", f"model.pretrained_file={ckpt}", "data.mean=[0,0,0]"])
    assert "mean" not in data_overrides_for_weights(explicit) and "std" in data_overrides_for_weights(explicit)

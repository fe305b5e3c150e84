"""End-to-end training, evaluation, resume and sweeps on tiny synthetic data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_same_state, compose_cfg, load_checkpoint_file, tiny_overrides

from ecg_inception.training import evaluate, train

METRIC_KEYS = {
    "accuracy",
    "precision_micro",
    "recall_micro",
    "f1_micro",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "auroc_macro",
    "loss",
    "per_class",
    "confusion_matrix",
}


def test_run_dir_holds_the_full_report(trained) -> None:
    tmp, cfg, metrics, objects = trained
    run = Path(cfg.paths.output_dir)
    for name in ("config.yaml", "splits.csv", "metrics.json", "confusion_matrix.png", "training_curves.png"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert any(p.name != "last.ckpt" for p in (run / "checkpoints").glob("*.ckpt"))
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["labels"] == ["myocardial_infarction", "history_of_mi", "abnormal_heartbeat", "normal"]
    assert saved["protocol"] == "leakfree" and saved["leaky"] is False
    for split in ("val", "test"):
        assert set(saved[split]) >= METRIC_KEYS, split
        assert set(saved[split]["per_class"]) == set(saved["labels"])
        for stats in saved[split]["per_class"].values():
            assert {"precision", "recall", "f1", "support"} <= set(stats)
        cm = saved[split]["confusion_matrix"]
        assert len(cm) == 4 and all(len(row) == 4 for row in cm)
        assert sum(map(sum, cm)) == sum(saved[split]["per_class"][k]["support"] for k in saved["labels"])
    assert "val/acc_best" in saved["logged"]
    # The curves cover every epoch, not just the epochs up to the best checkpoint loaded for testing.
    history = objects["history"].rows
    assert [row["epoch"] for row in history] == [0.0, 1.0]
    assert all("train/loss" in row and "val/loss" in row for row in history)


@pytest.mark.slow
def test_same_seed_gives_identical_metrics(trained, synthetic_root: Path, tmp_path: Path) -> None:
    _, _, first, _ = trained
    cfg = compose_cfg("train", tiny_overrides(synthetic_root, tmp_path, out="again"))
    second, _ = train(cfg)
    assert second["val"] == first["val"]
    assert second["test"] == first["test"]


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(trained, synthetic_root: Path, tmp_path: Path) -> None:
    """2 epochs + resume to 3 against 3 epochs in one go: same weights, optimiser state and metrics at the resume
    point, and `val/acc_best` (a MaxMetric) covers the epochs before the resume (before the fix it was not in the
    checkpoint, so after `ckpt_path=last` it covered only the epochs after it)."""
    _, cfg, _, _ = trained
    every = tmp_path / "every_epoch"
    straight = tiny_overrides(synthetic_root, tmp_path, out="straight") + [
        "trainer.max_epochs=3",
        f"+callbacks.every_epoch={{_target_:lightning.pytorch.callbacks.ModelCheckpoint,dirpath:{every},"
        "save_top_k:-1,every_n_epochs:1,mode:max}",
    ]
    _, straight_objs = train(compose_cfg("train", straight))
    interrupted = load_checkpoint_file(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    at_epoch_1 = load_checkpoint_file(next(every.glob("epoch=1-*.ckpt")))
    assert_same_state(interrupted["state_dict"], at_epoch_1["state_dict"], "state_dict")
    assert_same_state(interrupted["optimizer_states"], at_epoch_1["optimizer_states"], "optimizer_states")
    accs = [row["val/acc"] for row in straight_objs["history"].rows]
    assert float(interrupted["val_acc_best"]) == pytest.approx(max(accs[:2]))

    shutil.copytree(Path(cfg.paths.output_dir), tmp_path / "run")  # the shared run stays as it was
    overrides = tiny_overrides(synthetic_root, tmp_path) + ["ckpt_path=last", "trainer.max_epochs=3"]
    resumed, objs = train(compose_cfg("train", overrides))
    assert objs["trainer"].current_epoch == 3 and resumed["epochs"] == 3
    rows = objs["history"].rows
    assert [row["epoch"] for row in rows] == [0.0, 1.0, 2.0]
    for before, again in zip(straight_objs["history"].rows[:2], rows[:2], strict=True):
        assert before == pytest.approx(again)
    assert resumed["logged"]["val/acc_best"] == pytest.approx(max(row["val/acc"] for row in rows))
    # The resumed epoch itself (before, only the epochs restored from the checkpoint were compared): the same
    # weights and optimiser state as epoch 2 of the uninterrupted run. Test metrics are not compared here: this run
    # folder was copied elsewhere, and Lightning then reloads the best checkpoint's path but not its score, so the
    # best epoch can differ (tests/test_resume.py resumes in place and compares them).
    final, straight_final = (load_checkpoint_file(p / "checkpoints" / "last.ckpt") for p in (tmp_path / "run", tmp_path / "straight"))
    assert_same_state(final["state_dict"], straight_final["state_dict"], "state_dict")
    assert_same_state(final["optimizer_states"], straight_final["optimizer_states"], "optimizer_states")


def test_evaluate_uses_checkpoint_preprocessing(trained, tmp_path: Path) -> None:
    _, cfg, metrics, _ = trained
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    ev_cfg = compose_cfg(
        "eval",
        [
            f"ckpt_path={ckpt}",
            f"paths.output_dir={tmp_path / 'eval'}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "data.num_workers=0",
            "+trainer.enable_progress_bar=false",
        ],
    )
    result, objects = evaluate(ev_cfg)
    assert objects["datamodule"].data_config.size == (75, 75)
    assert set(result["test"]) >= METRIC_KEYS
    assert (tmp_path / "eval" / "metrics.json").is_file()


def test_non_square_input_trains_and_evaluates_at_its_shape(cfg_train, tmp_path: Path) -> None:
    """data.image_size=[h, w] reaches the model, the checkpoint and eval (which must not fall back to a square)."""
    cfg_train.data.image_size = [75, 112]
    cfg_train.data.ink = True
    cfg_train.trainer.max_epochs = 1
    cfg_train.plots = False
    _, objects = train(cfg_train)
    assert objects["model"].hparams.preprocessing["size"] == [75, 112]
    x, _ = next(iter(objects["datamodule"].test_dataloader()))
    assert x.shape[1:] == (3, 75, 112)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ev_cfg = compose_cfg(
        "eval",
        [f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'eval'}", f"paths.cache_dir={tmp_path / 'cache'}",
         "data.num_workers=0", "plots=false", "+trainer.enable_progress_bar=false"],
    )  # fmt: skip
    _, ev = evaluate(ev_cfg)
    assert ev["datamodule"].data_config.size == (75, 112) and ev["datamodule"].ink is True


def test_offline_pretrained_fails_fast_before_any_data(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = tiny_overrides(tmp_path / "never-made", tmp_path)
    overrides = [o for o in overrides if not o.startswith("model.pretrained=")] + ["model.pretrained=true"]
    started = time.perf_counter()
    with pytest.raises(Exception, match="model.pretrained_file"):
        train(compose_cfg("train", overrides))
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_multirun_grid_writes_one_report_per_job(synthetic_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [a for a in tiny_overrides(synthetic_root, tmp_path) if not a.startswith("paths.output_dir")]
    args = [a.replace("trainer.max_epochs=2", "trainer.max_epochs=1") for a in args]
    cmd = [
        sys.executable,
        "-m",
        "ecg_inception.cli.train",
        "-m",
        *args,
        "model.drop_rate=0.3,0.5",
        "data.batch_size=4,8",
        f"hydra.sweep.dir={sweep}",
        "+shared_split_manifest=${hydra:sweep.dir}/splits.csv",
    ]
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(runs) == 4
    manifests = set()
    for run in runs:
        assert json.loads((run / "metrics.json").read_text())["test"]["accuracy"] is not None
        manifests.add((run / "splits.csv").read_text())
    assert len(manifests) == 1, "every job of a sweep must use the same split"

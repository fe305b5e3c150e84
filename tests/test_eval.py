"""Evaluation honesty: eval and `train=false` reproduce a run's own test metrics exactly; a whole labelled folder
is scored with its overlap with training counted; splits and classes that cannot be scored are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import compose_cfg, tiny_overrides

from ecg_inception.data.labels import MENDELEY_FOLDERS
from ecg_inception.errors import ConfigValueError, DatasetError
from ecg_inception.training import evaluate, train


def eval_overrides(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [f"ckpt_path={ckpt}", f"paths.output_dir={out}", f"paths.cache_dir={out.parent / 'cache'}",
            "data.num_workers=0", "plots=false", "+trainer.enable_progress_bar=false", *extra]  # fmt: skip


def test_eval_reproduces_the_runs_own_test_metrics_exactly(trained, tmp_path: Path) -> None:
    """The README's "cannot drift" claim: the run tested its best checkpoint; eval of that file gives the same."""
    _, cfg, metrics, _ = trained
    best = Path(metrics["best_checkpoint"])
    result, _ = evaluate(compose_cfg("eval", eval_overrides(best, tmp_path / "eval")))
    assert result["status"] == "ok"
    assert result["test"] == metrics["test"]
    assert result["val"] == metrics["val"]
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["test"] == json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["test"]


def test_train_false_tests_the_given_checkpoint_like_eval(trained, synthetic_root: Path, tmp_path: Path) -> None:
    """Before the fix train=false tested a freshly built network and then died on optimized_metric."""
    _, cfg, metrics, _ = trained
    best = Path(metrics["best_checkpoint"])
    overrides = tiny_overrides(synthetic_root, tmp_path, out="no_fit") + ["train=false", f"ckpt_path={best}"]
    result, objects = train(compose_cfg("train", overrides))
    assert result["status"] == "ok"
    assert result["test"] == metrics["test"] and result["val"] == metrics["val"]
    assert result["logged"]["val/acc_best"] == pytest.approx(metrics["logged"]["val/acc_best"])
    assert objects["trainer"].current_epoch == 0  # nothing was fitted
    from ecg_inception.training import get_metric_value

    assert get_metric_value(result, "val/acc_best") == pytest.approx(metrics["logged"]["val/acc_best"])
    without = tiny_overrides(synthetic_root, tmp_path, out="no_ckpt") + ["train=false"]
    with pytest.raises(ConfigValueError, match="train=false needs ckpt_path"):
        train(compose_cfg("train", without))


def test_eval_all_scores_the_whole_folder_and_counts_training_copies(trained, synthetic_root: Path,
                                                                     tmp_path: Path) -> None:
    _, cfg, metrics, _ = trained
    best = Path(metrics["best_checkpoint"])
    out = tmp_path / "all"
    result, objects = evaluate(compose_cfg("eval", eval_overrides(best, out, f"data.root={synthetic_root}",
                                                                  "eval_all=true")))
    files = sorted(p for p in synthetic_root.rglob("*.jpg"))
    assert sum(result["counts"]["test"].values()) == len(files) == 32
    assert sum(result["counts"]["train"].values()) == sum(result["counts"]["val"].values()) == 0
    assert sum(map(sum, result["test"]["confusion_matrix"])) == len(files)
    import hashlib

    from ecg_inception.data.manifest import Manifest

    manifest = Manifest.read_csv(Path(cfg.paths.output_dir) / "splits.csv")
    train_hashes = {r.sha256 for r in manifest.split_rows("train")}
    expected = sum(1 for p in files if hashlib.sha256(p.read_bytes()).hexdigest() in train_hashes)
    copies = result["training_copies"]
    assert copies["in_train"] == expected > 0 and copies["files"] == len(files)
    assert json.loads((out / "metrics.json").read_text())["training_copies"]["in_train"] == expected
    assert set(result["test"]) >= {"accuracy", "f1_macro", "auroc_macro", "per_class", "confusion_matrix"}


def test_a_folder_with_other_classes_is_refused(trained, synthetic_root: Path, tmp_path: Path) -> None:
    """A 4-class checkpoint on a 3-class folder (and a folder with a class it never saw) says so, with or without
    eval_all; before the fix the run's old split was applied and the odd folder silently ignored."""
    _, _, metrics, _ = trained
    best = Path(metrics["best_checkpoint"])
    three = tmp_path / "three"
    shutil.copytree(synthetic_root, three)
    shutil.rmtree(three / MENDELEY_FOLDERS["normal"])
    with pytest.raises(DatasetError, match=r"no folder for the checkpoint's classes \['normal'\]"):
        evaluate(compose_cfg("eval", eval_overrides(best, tmp_path / "e3", f"data.root={three}", "eval_all=true")))
    five = tmp_path / "five"
    shutil.copytree(synthetic_root, five)
    (five / "Atrial fibrillation").mkdir()
    shutil.copyfile(next((five / MENDELEY_FOLDERS["normal"]).glob("*.jpg")), five / "Atrial fibrillation" / "a.jpg")
    with pytest.raises(DatasetError, match="class folders the checkpoint was not trained on"):
        evaluate(compose_cfg("eval", eval_overrides(best, tmp_path / "e5", f"data.root={five}")))


def test_splits_train_is_a_clear_error(trained, tmp_path: Path) -> None:
    """Before the fix `splits=[train]` wrote `train: null` and exited 0."""
    _, _, metrics, _ = trained
    best = Path(metrics["best_checkpoint"])
    with pytest.raises(ConfigValueError, match=r"splits=\['train'\]"):
        evaluate(compose_cfg("eval", eval_overrides(best, tmp_path / "e", "splits=[train]")))
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_eval_cli_prints_the_error_alone_and_exits_2(trained, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    _, _, metrics, _ = trained
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(
        [sys.executable, "-m", "ecg_inception.cli.eval", f"ckpt_path={metrics['best_checkpoint']}", "splits=[train]",
         f"paths.output_dir={tmp_path / 'e'}", f"paths.log_dir={tmp_path / 'logs'}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("ecg-inception-eval: error: splits=['train']")
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def paper_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory, one_thread) -> dict:
    """A tiny 1-epoch run under the paper protocol (its config.yaml says protocol: paper)."""
    tmp = tmp_path_factory.mktemp("paper_run")
    overrides = tiny_overrides(synthetic_root, tmp) + ["data.protocol=paper", "trainer.max_epochs=1"]
    metrics, _ = train(compose_cfg("train", overrides))
    assert metrics["status"] == "ok" and metrics["protocol"] == "paper"
    yield {"ckpt": Path(metrics["best_checkpoint"]), "run": tmp / "run", "metrics": metrics}
    shutil.rmtree(tmp, ignore_errors=True)  # checkpoints are hundreds of MiB: free the disk for the next module


def test_eval_all_on_a_paper_run_uses_the_runs_protocol(paper_run: dict, synthetic_root: Path,
                                                         tmp_path: Path) -> None:
    """Before the fix whole_folder.csv was written under eval.yaml's default protocol (leakfree) and loaded under
    the run's (paper): `ManifestError: made under protocol 'leakfree', loaded under 'paper'`."""
    out = tmp_path / "all"
    result, objects = evaluate(compose_cfg("eval", eval_overrides(paper_run["ckpt"], out, f"data.root={synthetic_root}",
                                                                  "eval_all=true")))
    assert result["status"] == "ok" and result["protocol"] == "paper"
    assert objects["datamodule"].manifest.protocol == "paper"
    files = sorted(synthetic_root.rglob("*.jpg"))
    assert sum(result["counts"]["test"].values()) == len(files)
    assert sum(map(sum, result["test"]["confusion_matrix"])) == len(files)
    assert '"protocol": "paper"' in (out / "whole_folder.csv").read_text().splitlines()[0]


def test_a_protocol_given_on_the_command_line_wins_over_the_runs(paper_run: dict, tmp_path: Path) -> None:
    """The run's protocol is used unless the command line names data.protocol (then that one, even the default)."""
    from hydra.core.hydra_config import HydraConfig

    from ecg_inception.core.compose import compose_config
    from ecg_inception.training import _run_data_settings

    ckpt = paper_run["ckpt"]
    assert _run_data_settings(compose_cfg("eval", eval_overrides(ckpt, tmp_path / "a")), ckpt)["protocol"] == "paper"
    given = compose_config("eval", eval_overrides(ckpt, tmp_path / "b", "data.protocol=leakfree"),
                           return_hydra_config=True)
    HydraConfig.instance().set_config(given)
    try:
        assert "protocol" not in _run_data_settings(given, ckpt)
    finally:
        HydraConfig.instance().cfg = None

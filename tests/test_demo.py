"""`ecg-inception-train experiment=demo` learns: the README's first command, end to end.

The demo's own synthetic set (generated into a fresh cache) and its own recipe and budget, through the console
script's entry point, so that the lines it prints at the end are checked too. Measured (docs/results.md, "The
demo"): test accuracy 0.648, 0.705 and 0.648 for seeds 42, 0 and 1 on 88 test pages. MIN_TEST_ACCURACY (40 of 88
pages) is 4.4 standard deviations above what a model that learned nothing scores on 4 balanced classes (22 of
88, sd 4.1 pages), and 17 pages below the lowest measured run (57 of 88).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

MIN_TEST_ACCURACY = 0.45


@pytest.mark.slow
def test_demo_learns(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "ecg_inception.cli.train", "experiment=demo",
        f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}", f"paths.log_dir={tmp_path / 'logs'}",
        "callbacks.rich_progress_bar=null", "+trainer.enable_progress_bar=false",
    ]  # fmt: skip
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["leaky"] is False and metrics["protocol"] == "leakfree"
    test = metrics["test"]
    assert sum(metrics["counts"]["test"].values()) >= 20
    # What the command prints last: where the report is, then the test accuracy and macro-F1.
    assert f"Report: {run_dir}/metrics.json" in proc.stdout
    printed = re.search(r"Test accuracy (\d\.\d{3}), macro-F1 (\d\.\d{3})", proc.stdout)
    assert printed, proc.stdout[-2000:]
    assert "Try next: ecg-inception-predict " in proc.stdout, proc.stdout[-2000:]
    assert float(printed.group(1)) == pytest.approx(test["accuracy"], abs=5e-4)
    assert float(printed.group(2)) == pytest.approx(test["f1_macro"], abs=5e-4)
    assert test["accuracy"] >= MIN_TEST_ACCURACY, f"demo test accuracy {test['accuracy']:.3f}: did not learn"


@pytest.mark.parametrize("leaky", [False, True])
def test_the_cli_prints_the_report_path_accuracy_and_macro_f1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], leaky: bool
) -> None:
    """What `ecg-inception-train` prints after `train` returns (train itself replaced: no training here)."""
    import ecg_inception.cli.train as cli

    metrics = {
        "leaky": leaky,
        "test": {"accuracy": 0.91666, "f1_macro": 0.9123},
        "logged": {"val/acc_best": 0.9},
    }
    page = tmp_path / "data" / "normal" / "a page.jpg"
    manifest = SimpleNamespace(split_rows=lambda split: [SimpleNamespace(path="normal/a page.jpg")])
    datamodule = SimpleNamespace(manifest=manifest, dataset_root=lambda: tmp_path / "data")
    metrics["best_checkpoint"] = str(tmp_path / "checkpoints" / "epoch_001-acc_0.9000.ckpt")
    monkeypatch.setattr(cli, "train", lambda cfg: (metrics, {"datamodule": datamodule}))
    monkeypatch.setattr(
        sys, "argv",
        # `none`, not `disabled`: Hydra's `disabled` sets disable_existing_loggers, which silenced the library's
        # loggers for every later test in the session (caplog then saw nothing in test_run_status and
        # test_trunk_cache).
        ["ecg-inception-train", f"hydra.run.dir={tmp_path}", "hydra/job_logging=none", "hydra/hydra_logging=none"],
    )
    cli.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3] == f"Report: {tmp_path}/metrics.json"
    expected = "Test accuracy 0.917, macro-F1 0.912" + (" (LEAKY: paper protocol)" if leaky else "")
    assert lines[-2] == expected
    assert lines[-1] == f"Try next: ecg-inception-predict {metrics['best_checkpoint']} '{page}'"


def test_a_pretraining_run_prints_auroc_and_the_fine_tuning_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`experiment=pretrain_ptbxl` through the CLI: its data module has no manifest and its checkpoint is not a
    predictor. Before the fix the hint read `datamodule.manifest` and the finished run crashed with
    AttributeError (exit 1) after writing its report."""
    import ecg_inception.cli.train as cli

    best = str(tmp_path / "checkpoints" / "epoch_004-auroc_0.8324.ckpt")
    metrics = {"task": "multilabel", "best_checkpoint": best, "logged": {"val/auroc_macro_best": 0.83},
               "test": {"accuracy": 0.34, "f1_macro": 0.36, "auroc_macro": 0.79}}
    monkeypatch.setattr(cli, "train", lambda cfg: (metrics, {"datamodule": SimpleNamespace(labels=["NORM"])}))
    monkeypatch.setattr(sys, "argv", ["ecg-inception-train", "optimized_metric=val/auroc_macro_best",
                                      f"hydra.run.dir={tmp_path}", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    cli.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == "Test macro AUROC 0.790, macro-F1 0.360"
    assert lines[-1] == ("Fine-tune next: ecg-inception-train experiment=finetune_cpu data.root=<your printouts> "
                         f"model.pretrained_file={best}")

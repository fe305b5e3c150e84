"""Sweep summary and failing sweep jobs: a failed job is recorded in its own folder and the others go on."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import run_cli, tiny_sweep_args
from omegaconf import OmegaConf

from ecg_inception.sweep_summary import (
    ERROR_FILE,
    SUMMARY_CSV,
    SUMMARY_JSON,
    SweepSummary,
    error_line,
    job_dirs,
    metric_direction,
    record_job_error,
    summarize_sweep,
)


def _job(sweep: Path, num: int, overrides: list[str], metrics: dict | None = None, error: Exception | None = None):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        try:
            raise error
        except Exception as exc:  # a real traceback, as the job wrapper records it
            record_job_error(job, exc, wall_time_s=1.5)
    return job


def _metrics(acc: float, status: str | None = None, **extra) -> dict:
    logged = {"val/acc_best": acc, "val/acc": acc, "val/loss": 1.0 - acc, "test/acc": acc / 2, "train/loss": 9.0}
    out = {"logged": logged, "wall_time_s": 3.25, "best_checkpoint": f"/ckpt/{acc}.ckpt", **extra}
    if status is not None:
        out["status"] = status
    return out


def test_summary_rows_sorted_by_metric_with_failures_last(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _job(sweep, 0, ["lr=0.1", "seed=1"], _metrics(0.5))
    _job(sweep, 1, ["lr=1e9", "seed=1"], _metrics(0.25, status="diverged", error="loss is nan at step 3"))
    _job(sweep, 2, ["lr=bad", "seed=1"], error=ValueError("model.optimizer.lr: 'bad' is not a number\nsecond line"))
    _job(sweep, 3, ["lr=0.01", "seed=1"], _metrics(0.75, status="ok"))
    _job(sweep, 10, ["lr=0.02", "seed=1"])  # killed: no metrics.json, no error.json
    (sweep / ".submitit").mkdir()  # launcher folders are not jobs
    summary = summarize_sweep(sweep, "val/acc_best")
    rows = summary["rows"]
    assert [r["job"] for r in rows] == ["3", "0", "1", "2", "10"]
    assert [r["status"] for r in rows] == ["ok", "ok", "diverged", "failed", "failed"]
    assert summary["counts"] == {"ok": 2, "diverged": 1, "failed": 2}
    assert rows[0]["value"] == 0.75 and rows[0]["best_checkpoint"] == "/ckpt/0.75.ckpt"
    assert rows[0]["scalars"] == {"test/acc": 0.375, "val/acc": 0.75, "val/acc_best": 0.75, "val/loss": 0.25}
    assert rows[2]["value"] is None and rows[2]["error"] == "loss is nan at step 3"
    assert rows[3]["error"] == "ValueError: second line" and rows[3]["wall_time_s"] == 1.5
    assert "no metrics.json" in rows[4]["error"]
    with open(sweep / SUMMARY_CSV, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [t["job"] for t in table] == ["3", "0", "1", "2", "10"]
    assert table[0]["lr"] == "0.01" and "seed" not in table[0]  # only what the sweep varied gets a column
    assert table[0]["value"] == "0.75" and table[0]["test/acc"] == "0.375"
    saved = json.loads((sweep / SUMMARY_JSON).read_text())
    assert saved["rows"][0]["overrides"] == ["lr=0.01", "seed=1"]
    assert "lr" in summary["table"].splitlines()[0]


def test_error_line_names_the_root_cause() -> None:
    try:
        try:
            raise ValueError("batch_size must be >= 1, got 0")
        except ValueError as inner:
            raise RuntimeError("Error in call to target 'EcgDataModule':\nfull_key: data") from inner
    except RuntimeError as exc:
        assert error_line(exc) == "ValueError: batch_size must be >= 1, got 0"
    assert error_line(KeyError()) == "KeyError"


def test_losses_are_minimised_and_a_sweepers_direction_wins() -> None:
    assert metric_direction("val/loss") == "minimize"
    assert metric_direction("val/acc_best") == "maximize"
    assert metric_direction("val/loss", "maximize") == "maximize"


def test_callback_exits_1_with_the_count_on_stderr(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    _job(sweep, 0, ["lr=0.1"], _metrics(0.5))
    _job(sweep, 1, ["lr=bad"], error=RuntimeError("boom"))
    config = OmegaConf.create({"optimized_metric": "val/acc_best", "hydra": {"sweep": {"dir": str(sweep)}}})
    with pytest.raises(SystemExit) as exit_info:
        SweepSummary().on_multirun_end(config)
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert "1 of 2 sweep jobs did not finish ok (0 diverged, 1 failed)" in err
    assert "RuntimeError: boom" in out
    _job(sweep, 2, ["lr=0.2"], _metrics(0.6))
    (sweep / "1" / ERROR_FILE).unlink()
    (sweep / "1" / "metrics.json").write_text(json.dumps(_metrics(0.1)))
    SweepSummary().on_multirun_end(config)  # all ok: no exit
    assert [p.name for p in job_dirs(sweep)] == ["0", "1", "2"]


def test_a_failing_job_does_not_stop_the_sweep(synthetic_root: Path, tmp_path: Path) -> None:
    """3 jobs, the middle one with a bad batch size: the others finish, the sweep exits 1 and says why."""
    sweep = tmp_path / "sweep"
    args = [a for a in tiny_sweep_args(synthetic_root, tmp_path) if not a.startswith("data.batch_size")]
    proc = run_cli(["-m", *args, "data.batch_size=4,0,8", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 of 3 sweep jobs did not finish ok (0 diverged, 1 failed)" in proc.stderr
    for ok in ("0", "2"):
        assert json.loads((sweep / ok / "metrics.json").read_text())["test"]["accuracy"] is not None
        assert not (sweep / ok / ERROR_FILE).exists()
    error = json.loads((sweep / "1" / ERROR_FILE).read_text())
    assert error["status"] == "failed" and "batch_size must be >= 1, got 0" in error["error"], error
    assert "Traceback" in error["traceback"]
    assert "failed; the sweep goes on" in (sweep / "1" / "train.log").read_text()  # the job's own log says it too
    summary = json.loads((sweep / SUMMARY_JSON).read_text())
    assert {r["job"]: r["status"] for r in summary["rows"]} == {"0": "ok", "1": "failed", "2": "ok"}
    assert summary["rows"][-1]["job"] == "1" and "batch_size" in summary["rows"][-1]["error"]
    ok_rows = summary["rows"][:2]
    assert all(r["value"] is not None and r["wall_time_s"] > 0 for r in ok_rows)
    assert ok_rows[0]["value"] >= ok_rows[1]["value"]
    assert (sweep / SUMMARY_CSV).read_text().count("\n") == 4
    assert "Sweep summary (3 jobs" in proc.stdout


def test_a_diverged_and_two_failed_jobs_are_all_reported(synthetic_root: Path, tmp_path: Path) -> None:
    """Before: only the first failure was printed and a second failed job was never mentioned. 2 x 2 jobs: a
    learning rate that overflows the weights (NaN loss: diverged) crossed with a bad batch size (failed)."""
    sweep = tmp_path / "sweep"
    args = [a for a in tiny_sweep_args(synthetic_root, tmp_path) if not a.startswith("data.batch_size")]
    proc = run_cli(["-m", *args, "model.optimizer.lr=0.001,1e30", "data.batch_size=4,0",
                    f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 of 4 sweep jobs did not finish ok (1 diverged, 2 failed)" in proc.stderr
    summary = json.loads((sweep / SUMMARY_JSON).read_text())
    statuses = {r["job"]: r["status"] for r in summary["rows"]}
    assert statuses == {"0": "ok", "1": "failed", "2": "diverged", "3": "failed"}
    assert summary["rows"][0]["job"] == "0"  # the only job with a value comes first
    for job in ("1", "3"):  # each failed job's own folder records its error
        assert "batch_size must be >= 1" in json.loads((sweep / job / ERROR_FILE).read_text())["error"]
    diverged = json.loads((sweep / "2" / "metrics.json").read_text())
    assert diverged["status"] == "diverged" and "step" in diverged
    table = proc.stdout[proc.stdout.index("Sweep summary (4 jobs"):].splitlines()[3:]  # title, header, rule
    # every job is in the printed table with its status (columns: job, status, ...)
    assert sorted(tuple(line.split()[:2]) for line in table[:4]) == [
        ("0", "ok"), ("1", "failed"), ("2", "diverged"), ("3", "failed")]

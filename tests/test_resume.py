"""Faults: exact resume after kill -9 / SIGTERM / SIGUSR1, the resume contract, appending logs, full or read-only disks."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_state, compose_cfg, load_checkpoint_file, tiny_overrides

from ecg_inception import resume
from ecg_inception.errors import OutputDirError
from ecg_inception.resume import AtomicCheckpointIO, CSVLogger, check_output_dir, resolve_ckpt_path

#: A run that takes seconds and uses every piece of state a resume must bring back: shuffling, dropout and
#: augmentation (global RNG, workers=0), Adam with a cosine schedule, EMA from epoch 1, early stopping with a
#: counter, val/acc_best.
EXACT_ARGS = [
    "data.image_size=64", "data.batch_size=4", "data.num_workers=0", "data.augment=true",
    "model.model_name=test_convnext", "model.pretrained=false", "model.aux_logits=false", "model/unfreeze=all",
    "model.drop_rate=0.3", "+model.scheduler.name=cosine", "+callbacks.ema._target_=ecg_inception.callbacks.EmaWeights",
    "+callbacks.ema.decay=0.9", "+callbacks.ema.start_epoch=1", "callbacks.early_stopping.patience=2",
    "callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=min",
    "callbacks.rich_progress_bar=null", "+trainer.enable_model_summary=false", "+trainer.enable_progress_bar=false",
    "trainer.max_epochs=3", "plots=false",
]  # fmt: skip


def _cmd(root: Path, tmp: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ecg_inception.cli.train", f"data.root={root}", *EXACT_ARGS,
            f"paths.cache_dir={tmp.parent / 'cache'}", f"paths.log_dir={tmp / 'logs'}", f"hydra.run.dir={run}",
            *extra]  # fmt: skip


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=900,
                          env=dict(os.environ, HYDRA_FULL_ERROR="1"))


@pytest.fixture(scope="module")
def straight(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every resumed one must reproduce bit for bit."""
    tmp = tmp_path_factory.mktemp("straight")
    proc = _run(_cmd(synthetic_root, tmp, tmp / "run"), tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield tmp / "run"
    shutil.rmtree(tmp, ignore_errors=True)  # checkpoints are hundreds of MiB: free the disk for the next module


def _epoch_0_finished(metrics_csv: Path) -> bool:
    """Whether the CSV already holds epoch 0's train-mean row (logged just after epoch 0's last.ckpt)."""
    if not metrics_csv.is_file():
        return False
    with open(metrics_csv, newline="") as handle:
        return any(row.get("train/loss_epoch") for row in csv.DictReader(handle))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1], ids=["kill9", "sigterm", "sigusr1"])
def test_a_killed_run_resumes_bit_identically(straight: Path, synthetic_root: Path, tmp_path: Path, sig) -> None:
    """Killed in epoch 1 after epoch 0's last.ckpt, then `ckpt_path=last`: the final weights, optimiser, scheduler,
    EMA, early-stopping, val/acc_best and RNG states, the metrics and metrics.csv equal the uninterrupted run's.
    Before the fix the resumed run drew epoch 0's shuffle order and fresh dropout/augmentation again (every weight
    differed) and metrics.csv lost its epoch-0 rows."""
    run = tmp_path / "run"
    cmd = _cmd(synthetic_root, tmp_path, run)
    with open(tmp_path / "killed.log", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            while proc.poll() is None and not _epoch_0_finished(run / "csv" / "metrics.csv"):
                time.sleep(0.02)
            proc.send_signal(sig)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    log = (tmp_path / "killed.log").read_text()
    assert rc == (128 + signal.SIGTERM if sig == signal.SIGTERM else -sig), f"rc {rc}: {log[-3000:]}"
    assert load_checkpoint_file(run / "checkpoints" / "last.ckpt")["epoch"] in (0, 1)
    if sig == signal.SIGTERM:  # Lightning stopped at the end of the batch; the run says where a resume starts
        stopped = json.loads((run / "metrics.json").read_text())
        assert stopped["status"] == "failed" and "SIGTERM" in stopped["error"] and "ckpt_path=last" in stopped["error"]

    proc = _run([*cmd, "ckpt_path=last"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, theirs = load_checkpoint_file(run / "checkpoints" / "last.ckpt"), load_checkpoint_file(straight / "checkpoints" / "last.ckpt")
    for key in ("epoch", "global_step", "state_dict", "current_model_state", "averaging_state", "optimizer_states",
                "lr_schedulers", "val_acc_best"):
        assert_same_state(ours[key], theirs[key], key)
    for name, state in theirs["callbacks"].items():
        if not name.startswith("ModelCheckpoint"):  # those hold paths, which differ between the two runs
            assert_same_state(ours["callbacks"][name], state, name)
    assert any(name.startswith("EarlyStopping") for name in theirs["callbacks"])
    mine, other = json.loads((run / "metrics.json").read_text()), json.loads((straight / "metrics.json").read_text())
    for key in ("status", "epochs", "val", "test", "logged"):
        assert mine[key] == other[key], key
    assert (run / "csv" / "metrics.csv").read_text() == (straight / "csv" / "metrics.csv").read_text()


@pytest.mark.slow
def test_a_killed_sweep_resumes_in_its_own_sweep_dir(straight: Path, synthetic_root: Path, tmp_path: Path) -> None:
    """A 2-job sweep with ckpt_path=auto killed in job 1, then the same command: job 0 is not run again, job 1
    resumes from its own last.ckpt and ends bit-identical to the uninterrupted single run with its settings.
    Before the fix a re-run sweep trained every job again from scratch."""
    sweep = tmp_path / "sweep"
    cmd = [a for a in _cmd(synthetic_root, tmp_path, tmp_path / "x") if not a.startswith(("hydra.run.dir=",
                                                                                          "trainer.max_epochs="))]
    cmd[3:3] = ["-m"]
    cmd += ["trainer.max_epochs=2,3", f"hydra.sweep.dir={sweep}", "ckpt_path=auto"]  # job 1 = the straight run
    with open(tmp_path / "killed.log", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            while proc.poll() is None and not _epoch_0_finished(sweep / "1" / "csv" / "metrics.csv"):
                time.sleep(0.02)
            proc.kill()
            assert proc.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    first = (sweep / "0" / "metrics.json").read_text()
    assert json.loads(first)["status"] == "ok" and not (sweep / "1" / "metrics.json").exists()

    again = _run(cmd, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (sweep / "0" / "metrics.json").read_text() == first  # not trained again
    assert "already finished with this config" in again.stdout + again.stderr
    ours, theirs = load_checkpoint_file(sweep / "1" / "checkpoints" / "last.ckpt"), load_checkpoint_file(straight / "checkpoints" / "last.ckpt")
    for key in ("global_step", "state_dict", "optimizer_states", "val_acc_best"):
        assert_same_state(ours[key], theirs[key], key)
    mine, other = json.loads((sweep / "1" / "metrics.json").read_text()), json.loads((straight / "metrics.json").read_text())
    assert mine["test"] == other["test"]
    assert json.loads((sweep / "sweep_summary.json").read_text())["counts"]["ok"] == 2


# ------------------------------------------------------------------------------------------ the contract
def test_last_refuses_a_folder_hydra_made_up_and_never_takes_another_runs(synthetic_root: Path,
                                                                         tmp_path: Path) -> None:
    """`ckpt_path=last` without hydra.run.dir: exit 2 naming the fix and the candidates. Before the fix it took the
    newest last.ckpt under logs/train/, here another experiment's."""
    other = tmp_path / "logs" / "train" / "runs" / "other-experiment" / "checkpoints"
    other.mkdir(parents=True)
    (other / "last.ckpt").write_bytes(b"not this run's")
    cmd = [a for a in _cmd(synthetic_root, tmp_path, tmp_path / "x") if not a.startswith("hydra.run.dir=")]
    proc = subprocess.run([*cmd, "ckpt_path=last"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "ckpt_path=last" in proc.stderr and "hydra.run.dir=" in proc.stderr
    assert str(other.parent) in proc.stderr  # listed as a candidate, not used
    assert "not a valid ecg_inception checkpoint" not in proc.stderr


def test_resolve_ckpt_path_looks_only_in_this_run(tmp_path: Path) -> None:
    run, logs = tmp_path / "run", tmp_path / "logs"
    (logs / "train" / "runs" / "other" / "checkpoints").mkdir(parents=True)
    (logs / "train" / "runs" / "other" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_ckpt_path("last", run, logs, "train", explicit_dir=True)
    assert resolve_ckpt_path("auto", run, logs, "train", explicit_dir=True) is None  # first start of a job
    with pytest.raises(Exception, match="hydra.run.dir") as refused:
        resolve_ckpt_path("auto", run, logs, "train", explicit_dir=False)
    assert "other" in str(refused.value)
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    for value in ("last", "auto"):
        assert resolve_ckpt_path(value, run, logs, "train", explicit_dir=True) == run / "checkpoints" / "last.ckpt"
    assert resolve_ckpt_path(None, run, logs, "train") is None
    assert resume.explicit_run_dir()  # outside Hydra (compose API) the caller names the folder


# ------------------------------------------------------------------------------------------ CSV
def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_logger_appends_on_resume(tmp_path: Path) -> None:
    """Lightning's CSVLogger deleted metrics.csv when its folder existed: a resumed run lost the earlier rows."""
    folder = tmp_path / "csv"
    folder.mkdir()
    with open(folder / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["epoch", "step", "val/acc"])
        writer.writeheader()
        writer.writerows([{"epoch": 0, "step": 3, "val/acc": 0.5}, {"epoch": 1, "step": 5, "val/acc": 0.7}])
    logger = CSVLogger(str(tmp_path), name="csv", version="")
    logger.resume_from(4)  # the checkpoint's step: the row at step 5 came after it and is logged again
    logger.log_metrics({"epoch": 1, "val/acc": 0.75, "train/loss": 1.0}, step=5)
    rows = _rows(folder / "metrics.csv")  # written at once, not after 100 steps
    assert [(r["step"], r["val/acc"], r["train/loss"]) for r in rows] == [("3", "0.5", ""), ("5", "0.75", "1.0")]

    fresh = CSVLogger(str(tmp_path), name="csv", version="")  # not resuming: a new run's file, as in Lightning
    fresh.log_metrics({"val/acc": 0.1}, step=0)
    assert [r["step"] for r in _rows(folder / "metrics.csv")] == ["0"]


# ------------------------------------------------------------------------------------------ disk
def test_a_failed_checkpoint_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.arange(4)}, path)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OutputDirError, match="No space left on device") as err:
        io.save_checkpoint({"w": torch.zeros(4)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert str(path) in str(err.value) and "left as it was" in str(err.value)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_enospc_during_training_stops_with_a_clear_error(synthetic_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while epoch 1's last.ckpt is written: OutputDirError, epoch 0's last.ckpt intact, metrics.json
    says failed. Before the fix the save went through Lightning's writer (no clear error, no such guarantee)."""
    from ecg_inception.training import train

    real_save, writes = torch.save, []

    def fill_on_second_last(obj, f, *args, **kwargs):
        if "last.ckpt" in str(getattr(f, "name", "")):
            writes.append(f.name)
            if len(writes) == 2:
                f.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fill_on_second_last)
    overrides = tiny_overrides(synthetic_root, tmp_path) + [
        "model.model_name=test_convnext", "data.image_size=64", "plots=false", "callbacks.early_stopping=null",
    ]  # fmt: skip
    with pytest.raises(OutputDirError, match="could not write the checkpoint") as err:
        train(compose_cfg("train", overrides))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert str(last) in str(err.value) and "No space left on device" in str(err.value)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint_file(last)["epoch"] == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_read_only_or_full_output_dir_is_refused_before_training(synthetic_root: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from ecg_inception.cli._errors import library_errors
    from ecg_inception.training import train

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(resume, "open", read_only, raising=False)
        with pytest.raises(OutputDirError, match="Read-only file system") as err:
            check_output_dir(tmp_path / "ro")
    assert str(tmp_path / "ro") in str(err.value)

    usage = type("usage", (), {"free": 100 * 2**20})
    monkeypatch.setattr(resume.shutil, "disk_usage", lambda path: usage)
    check_output_dir(tmp_path / "small")  # 100 MiB: room for the run folder itself
    # inception_v3 (~90 MB of weights, ~350 MB per full checkpoint) does not fit twice: exit 2 before any epoch.
    overrides = tiny_overrides(synthetic_root, tmp_path) + ["plots=false"]
    with pytest.raises(SystemExit) as exit_info, library_errors("ecg-inception-train"):
        train(compose_cfg("train", overrides))
    assert exit_info.value.code == 2
    err_line = capsys.readouterr().err
    assert str(tmp_path / "run" / "checkpoints") in err_line and "MiB free" in err_line
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize("every", [None, 2], ids=["epoch-ends", "every-2-steps"])
def test_last_ckpt_every_n_train_steps_writes_mid_epoch(synthetic_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, every) -> None:
    """`callbacks.last_checkpoint.every_n_train_steps=N` adds last.ckpt saves inside an epoch (every N optimizer
    steps, not on an epoch's last batch); the epoch-end save stays, and the file after each epoch is its end."""
    from ecg_inception.training import train

    saves: list[tuple[str, int, int]] = []
    real = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        saves.append((Path(path).name, int(checkpoint["global_step"]), int(checkpoint["epoch"])))
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    overrides = [*tiny_overrides(synthetic_root, tmp_path, out="run", debug=None), "plots=false",
                 "model.model_name=test_convnext", "data.image_size=64", "callbacks.model_checkpoint=null",
                 f"callbacks.last_checkpoint.every_n_train_steps={'null' if every is None else every}"]
    metrics, objects = train(compose_cfg("train", overrides))
    steps_per_epoch = objects["trainer"].num_training_batches
    assert steps_per_epoch >= 3 and metrics["epochs"] == 2
    last = [(step, epoch) for name, step, epoch in saves if name == "last.ckpt"]
    ends = [(steps_per_epoch * (e + 1), e) for e in range(2)]
    inside = [] if every is None else [(s, (s - 1) // steps_per_epoch) for s in range(every, 2 * steps_per_epoch, every)
                                       if s % steps_per_epoch]
    assert last == sorted(ends + inside)
    final = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 2 * steps_per_epoch and final["epoch"] == 1


@pytest.mark.parametrize("bad", [0, -3, True, 2.5])
def test_last_checkpoint_refuses_a_bad_step_interval(tmp_path: Path, bad) -> None:
    from ecg_inception.errors import ConfigValueError

    with pytest.raises(ConfigValueError, match="every_n_train_steps"):
        resume.LastCheckpoint(dirpath=tmp_path, filename="last", monitor=None, every_n_train_steps=bad)
    with pytest.raises(ConfigValueError, match="every_n_epochs"):
        resume.LastCheckpoint(dirpath=tmp_path, filename="last", monitor=None, every_n_epochs=2)

"""What lets a run survive faults: the resume contract, exact-resume state, appending logs, safe checkpoint writes.

- `resolve_ckpt_path`: `ckpt_path=last` is the `last.ckpt` of *this* run's folder, never another run's.
- `RngState`: the global RNG states (torch, CUDA, numpy, random) ride in every checkpoint and are restored when
  a fit resumes, so that dropout and in-process augmentation continue as in an uninterrupted run (the train
  loader's own generator is kept by `EcgDataModule.state_dict`).
- `CSVLogger`: appends to `csv/metrics.csv` on resume instead of deleting it.
- `AtomicCheckpointIO`: a checkpoint is written beside its target and renamed over it, so a full disk or a kill
  during the write leaves the previous file intact; `check_output_dir` refuses a read-only or full output folder
  before any training.
- `LastCheckpoint`: `last.ckpt` at the end of every epoch and, optionally, every N optimizer steps inside one.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from ecg_inception.errors import CheckpointError, CheckpointNotFoundError, ConfigValueError, OutputDirError

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"
#: Exit status of a run stopped by SIGTERM (128 + the signal number, as a shell reports it).
SIGTERM_EXIT = 128 + signal.SIGTERM
#: Hydra's own output dirs end with a time stamp (conf/hydra/default.yaml); such a dir is never a resume target.
_RUN_DIR_KEYS = {"RUN": "hydra.run.dir", "MULTIRUN": "hydra.sweep.dir"}


# ------------------------------------------------------------------------------------------ the contract
def explicit_run_dir() -> bool:
    """Whether this run's folder was named by the user rather than made up by Hydra from the clock.

    True outside Hydra (the compose API: the caller sets `paths.output_dir`), or when the command line gave
    `hydra.run.dir` (single run), `hydra.sweep.dir` (a sweep job: `<sweep.dir>/<job number>`) or
    `paths.output_dir`.
    """
    given = command_line_keys()
    if given is None:
        return True
    from hydra.core.hydra_config import HydraConfig

    mode = HydraConfig.get().mode
    key = _RUN_DIR_KEYS.get(str(getattr(mode, "name", mode)), "hydra.run.dir")
    return key in given or "paths.output_dir" in given


def command_line_keys() -> set[str] | None:
    """The config keys this run's command line set (Hydra's task and hydra overrides, without `+`/`~`/`++`).

    Returns:
        The keys, e.g. `{"data.protocol", "hydra.run.dir"}`; None outside Hydra (the compose API), where
        nothing tells a value the caller gave from a default.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None
    if not HydraConfig.initialized():
        return None
    overrides = HydraConfig.get().overrides
    return {str(o).split("=", 1)[0].lstrip("+~") for o in (*overrides.hydra, *overrides.task)}


def last_checkpoint_runs(log_dir: Path, task_name: str) -> list[Path]:
    """Run folders under `<log_dir>/<task_name>/` holding a `checkpoints/last.ckpt`, newest first."""
    found = sorted((log_dir / task_name).glob(f"**/checkpoints/{LAST_CHECKPOINT}"),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.parent.parent for p in found]


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path, log_dir: Path, task_name: str,
                      explicit_dir: bool | None = None) -> Path | None:
    """The checkpoint a run resumes from: a path, `last` = `<output_dir>/checkpoints/last.ckpt`, or `auto`.

    `last` never looks outside this run's folder: under Hydra's clock-stamped default folder it is refused,
    because the newest `last.ckpt` under `<log_dir>/<task_name>/` may be another experiment's. The
    message lists the candidates so that the user can name the run. `auto` is `last` when this run's folder
    has one and a fresh start when it has none: the value for a job that may be requeued or a sweep that may
    be run again (the same command works the first time and every time after).

    Args:
        ckpt_path: None/"" (no resume), `last`, `auto`, or a checkpoint file.
        output_dir: this run's folder.
        log_dir: `paths.log_dir` (only to list candidates in the error message).
        task_name: `task_name` (likewise).
        explicit_dir: whether `output_dir` was named by the user; None: `explicit_run_dir()`.

    Returns:
        The checkpoint file, or None when not resuming.

    Raises:
        ConfigValueError: `last` or `auto` in a folder Hydra made up (no `hydra.run.dir` / `hydra.sweep.dir`).
        CheckpointNotFoundError: the named file, or with `last` this run's `last.ckpt`, does not exist (a
            `FileNotFoundError` too).
    """
    if ckpt_path in (None, ""):
        return None
    if ckpt_path in ("last", "auto"):
        own = output_dir / "checkpoints" / LAST_CHECKPOINT
        if not (explicit_run_dir() if explicit_dir is None else explicit_dir):
            listed = "; ".join(str(p) for p in last_checkpoint_runs(log_dir, task_name)[:5]) or "none"
            raise ConfigValueError(
                f"ckpt_path={ckpt_path} resumes the run whose folder you name, and this run's folder is a new one that "
                f"Hydra made up ({output_dir}): give hydra.run.dir=<the run's folder> (a sweep: the same "
                f"hydra.sweep.dir), or ckpt_path=/path/to/last.ckpt. Runs with a last.ckpt under "
                f"{log_dir / task_name}, newest first: {listed}"
            )
        if not own.is_file() and ckpt_path == "auto":
            log.info("ckpt_path=auto: no %s yet, starting from scratch", own)
            return None
        if not own.is_file():
            raise CheckpointNotFoundError(
                own, f"ckpt_path=last: {own} does not exist (has this run written a checkpoint?)")
        return own
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise CheckpointNotFoundError(path, f"ckpt_path={ckpt_path}: no such checkpoint file")
    return path


def finished_run(output_dir: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The metrics of a run that already finished in `output_dir` with this config, else None.

    A run is finished when its `metrics.json` says `ok` and its `config.yaml` equals `cfg` (resolved; `ckpt_path`
    left out). With `ckpt_path=auto`, `train` returns those metrics instead of training again, so a sweep run
    again in the same `hydra.sweep.dir` skips the jobs that finished and resumes the one that was running.
    """
    metrics_file, config_file = output_dir / "metrics.json", output_dir / "config.yaml"
    if not (metrics_file.is_file() and config_file.is_file()):
        return None
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        stored = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError, UnicodeDecodeError):
        return None
    current = yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))
    if not isinstance(metrics, dict) or metrics.get("status") != "ok" or not isinstance(stored, dict):
        return None
    for config in (stored, current):
        config.pop("ckpt_path", None)
    return metrics if stored == current else None


def resumed_step(checkpoint: dict[str, Any]) -> int:
    """The logging step a resumed fit continues from (Lightning's `_batches_that_stepped`, else `global_step`)."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"])
    except (KeyError, TypeError):
        return int(checkpoint.get("global_step", 0))


def preempted_message(trainer: pl.Trainer, output_dir: Path) -> str:
    """What a run stopped by SIGTERM says: where it stopped and where a resume starts again."""
    last = output_dir / "checkpoints" / LAST_CHECKPOINT
    if last.is_file():
        where = (f"ckpt_path=last (with the same hydra.run.dir) resumes from {last}, the end of the last finished "
                 "epoch, and runs the interrupted epoch again from its start")
    else:
        where = "no epoch had finished, so there is no last.ckpt: run it again from the start"
    return (f"stopped by SIGTERM at epoch {trainer.current_epoch}, step {trainer.global_step}: {where}")


# ------------------------------------------------------------------------------------------ RNG state
def collect_rng_states() -> dict[str, Any]:
    """The global RNG states as tensors and plain numbers (so that `torch.load(weights_only=True)` reads them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `collect_rng_states` returned.

    Raises:
        CheckpointError: the states are not what `collect_rng_states` writes.
    """
    try:
        torch.set_rng_state(states["torch"])
        npy = states["numpy"]
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["gauss"]))
        py = states["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError("checkpoint", f"RngState is not a set of RNG states ({exc})") from None
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RngState(pl.Callback):
    """Keep the global RNG states in every checkpoint and restore them when a fit resumes from one.

    Dropout and augmentation in the main process (`data.num_workers=0`) draw from them; DataLoader workers are
    seeded from the train loader's generator, which `EcgDataModule.state_dict` keeps. A checkpoint written at
    the end of epoch `e` holds the states epoch `e + 1` starts with, so the resumed run continues bit-identically
    (on CPU). Loading a checkpoint to validate or test leaves the RNGs alone.
    """

    def __init__(self) -> None:
        self._fitting = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fitting = stage == "fit"

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fitting = False

    def state_dict(self) -> dict[str, Any]:
        return collect_rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after `setup` and before the train loader's first batch is drawn.
        if self._fitting and state_dict:
            set_rng_states(state_dict)


def check_exact_resume(cfg: DictConfig) -> None:
    """Warn when a resumed run cannot continue bit-identically: augmenting persistent DataLoader workers carry
    their RNG streams across epochs, and a resume starts new ones."""
    data = cfg.data
    workers = data.get("num_workers")
    persistent = data.get("persistent_workers")
    if data.get("augment", True) and workers != 0 and persistent is not False:
        log.warning(
            "Resuming with augmentation in persistent DataLoader workers (data.num_workers=%s): the resumed epochs "
            "draw other augmentations than an uninterrupted run would. For a bit-identical resume train with "
            "data.persistent_workers=false (or data.num_workers=0)", workers)


# ------------------------------------------------------------------------------------------ CSV logger
class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is kept (and cut at `keep_below`)."""

    keep_below: int | None = None

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self.keep_below is None or not path.is_file():
            super()._check_log_dir_exists()  # a fresh run in a used folder: the old file goes, as in Lightning
            return
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            keys, rows = list(reader.fieldnames or []), list(reader)
        # Rows from before the checkpoint stay; the ones the killed run logged after it are logged again.
        kept = [r for r in rows if r.get("step") in (None, "") or int(float(r["step"])) < self.keep_below]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(kept)
        self.metrics_keys = keys
        log.info("Resuming: appending to %s (%d earlier rows kept, %d after the checkpoint dropped)",
                 path, len(kept), len(rows) - len(kept))


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger that appends on resume and writes each row when it is logged.

    Lightning's own deletes `metrics.csv` when its folder exists and buffers 100 steps: a resumed run lost the
    rows before the resume, and a killed one the rows since the last flush. `resume_from(step)` (called by
    `train` when resuming) keeps the rows logged before `step` and drops later ones, which the resumed run
    logs again.
    """

    def __init__(self, *args: Any, flush_logs_every_n_steps: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)
        self._keep_below: int | None = None

    def resume_from(self, step: int) -> None:
        """Append to the existing metrics.csv, keeping its rows with a step below `step`."""
        self._keep_below = int(step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            _AppendingWriter.keep_below = self._keep_below
            try:
                self._experiment = _AppendingWriter(log_dir=self.log_dir)
            finally:
                _AppendingWriter.keep_below = None
        return self._experiment

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.save()


# ------------------------------------------------------------------------------------------ disk
class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a temporary file beside the target, fsync it, then `os.replace` it over the target.

    A full disk (ENOSPC), a read-only folder or a kill during the write leaves the previous file as it was; the
    error names the file and the reason (`OutputDirError`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint does not take storage_options")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            kept = f"; the previous {path.name} is left as it was" if path.is_file() else ""
            raise OutputDirError(
                f"{path}: could not write the checkpoint ({exc.strerror or exc}){kept}. Free space or make "
                f"{path.parent} writable, then resume with ckpt_path=last"
            ) from exc


class LastCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint for `last.ckpt`: written at the end of every epoch and, with
    `every_n_train_steps`, also every N optimizer steps inside an epoch (conf/callbacks/last_checkpoint.yaml).

    Lightning allows one trigger per ModelCheckpoint; this one keeps the epoch trigger (the state a resume
    continues from bit-identically) and adds the step trigger. The step save is skipped on an epoch's last batch,
    so that the file written then is the end of the epoch (after validation, early stopping and the history). A
    resume from a mid-epoch `last.ckpt` is Lightning's own mid-epoch restart: the train loader cannot continue
    where it stopped (Lightning warns "resuming from a checkpoint that ended before the epoch ended"), so it is not
    bit-identical to an uninterrupted run; it loses at most N steps instead of the epoch.

    Args:
        every_n_train_steps: also save every this many optimizer steps; None: at epoch ends only.
        **kwargs: ModelCheckpoint's (`dirpath`, `filename`, `monitor: null`, ...); its own step and time triggers
            are not taken.

    Raises:
        ConfigValueError: `every_n_train_steps` is not None or an integer >= 1, or a ModelCheckpoint trigger was given.
    """

    def __init__(self, *args: Any, every_n_train_steps: int | None = None, **kwargs: Any) -> None:
        taken = sorted({"every_n_epochs", "train_time_interval"} & {k for k, v in kwargs.items() if v is not None})
        if taken:
            raise ConfigValueError(f"callbacks.last_checkpoint: {taken} not supported (last.ckpt is written every "
                                   "epoch; every_n_train_steps adds saves inside an epoch)")
        steps = every_n_train_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ConfigValueError(f"callbacks.last_checkpoint.every_n_train_steps must be null or an integer >= 1, "
                                   f"got {steps!r}")
        super().__init__(*args, **kwargs)
        self.every_n_steps = steps

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's own key (plus the step interval when set): a `last.ckpt` written by a plain
        ModelCheckpoint restores into this callback, and checks that tell checkpoint callbacks by their
        "ModelCheckpoint" prefix still do."""
        key = "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)
        return key if not self.every_n_steps else f"{key}[every_n_train_steps={self.every_n_steps}]"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self.every_n_steps
        if not n or trainer.global_step % n or self._should_skip_saving_checkpoint(trainer):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # the epoch-end save follows
            return
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def state_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


#: A full checkpoint holds the weights, two Adam moments and an EMA copy: about 4x the weights, plus room.
CHECKPOINT_FACTOR = 4
MIN_FREE_BYTES = 16 * 2**20


def check_output_dir(path: Path, checkpoint_bytes: int = 0, copies: int = 2) -> None:
    """Refuse an output folder that cannot be written or lacks room for `copies` checkpoints, before training.

    Args:
        path: the folder (created if missing).
        checkpoint_bytes: the expected size of one checkpoint (`CHECKPOINT_FACTOR x state_bytes(model)`).
        copies: checkpoints that must fit at once (the best one and last.ckpt, or last.ckpt and its
            replacement being written).

    Raises:
        OutputDirError: the folder cannot be created or written, or has too little free space.
    """
    probe = path / f".write-test.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise OutputDirError(f"{path}: the output folder is not writable ({exc.strerror or exc}); give "
                             "hydra.run.dir (or paths.output_dir) a writable folder") from None
    finally:
        probe.unlink(missing_ok=True)
    need = copies * checkpoint_bytes + MIN_FREE_BYTES
    free = shutil.disk_usage(path).free
    if free < need:
        raise OutputDirError(
            f"{path}: {free / 2**20:.0f} MiB free, but {copies} checkpoints of about "
            f"{checkpoint_bytes / 2**20:.0f} MiB each need {need / 2**20:.0f} MiB: free space or give "
            "hydra.run.dir (or paths.output_dir) another folder"
        )

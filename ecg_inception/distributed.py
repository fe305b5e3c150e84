"""Distributed runs under Hydra: which rank this process is, and what a sweep job must reset for the next one.

Lightning's DDP strategy (`trainer=ddp`, `trainer=ddp_cpu`) starts ranks 1..N-1 of a single node by running the
command line again (`_SubprocessScriptLauncher`), with `hydra.run.dir=<HydraConfig run.dir>`,
`hydra.output_subdir=null` and `hydra.job.name=train_ddp_process_<rank>` appended. That is right for a single run
but not inside `-m`: the re-run command still holds `-m` and the sweep's comma lists, so every rank would start a
sweep of its own (nested multirun dirs, jobs pairing with the wrong ranks), and `run.dir` holds `${now:...}`, a
new folder. `pin_relaunch_to_job` rewrites what Lightning reads so that a re-launched rank runs exactly this
job's overrides as a single run in this job's own folder. Between jobs, `job_environment` removes the
`MASTER_PORT`, `LOCAL_RANK`, `WORLD_SIZE`, ... that Lightning's launcher put into `os.environ` (with `LOCAL_RANK`
left set, the next job's Trainer would believe its ranks were started externally and wait for them forever),
and destroys the process group, which Lightning leaves initialised.

Under SLURM (`hydra/launcher=slurm`) srun starts every rank and Lightning's SLURMEnvironment reads the ranks, so
nothing is re-launched. `ddp_spawn` is the fallback that needs none of this, at the price of pickling the model
and data module into fresh processes for every fit, validate and test call (see docs/cluster.md).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

#: Environment variables Lightning's subprocess launcher sets in the launching process.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
#: Hydra overrides of the sweep that must not reach a re-launched rank (it is a single run in a fixed dir).
_DROPPED_HYDRA_OVERRIDES = ("hydra.mode", "hydra.run.dir", "hydra.sweep.", "hydra.job.name", "hydra.output_subdir")


def global_rank() -> int:
    """This process's global rank: Lightning's view (set from RANK, LOCAL_RANK or SLURM_PROCID before a fit).

    Returns:
        The rank; 0 in a single-process run.
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_rank_zero() -> bool:
    """Whether this process writes the run's files (metrics.json, plots, splits.csv, config.yaml).

    Returns:
        True on rank 0 and in single-process runs.
    """
    return global_rank() == 0


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def relaunch_argv(argv0: str, task_overrides: list[str], hydra_overrides: list[str], sweep_dir: str) -> list[str]:
    """The command line a re-launched rank of one sweep job must see: this job's values, as a single run.

    Args:
        argv0: The script path (`sys.argv[0]`).
        task_overrides: The job's own overrides (`hydra.overrides.task`: the sweep's values already chosen).
        hydra_overrides: The sweep's `hydra.*` overrides; those about modes and folders are dropped.
        sweep_dir: The sweep folder, pinned so that `${hydra:sweep.dir}` (e.g. a shared split manifest) resolves
            to the same path on every rank.

    Returns:
        The new `sys.argv`.
    """
    kept = [o for o in hydra_overrides if not o.lstrip("+~").startswith(_DROPPED_HYDRA_OVERRIDES)]
    return [argv0, *task_overrides, *kept, f"hydra.sweep.dir={_quote(sweep_dir)}", "hydra.mode=RUN"]


def pin_relaunch_to_job() -> None:
    """Make Lightning's DDP re-launch of this Hydra job run this job, in this job's folder (see module doc).

    Sets the Hydra config's `run.dir` to this job's output folder and, in a multirun job, `sys.argv` to the
    job's own overrides. A no-op outside a Hydra app.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    output_dir = str(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sys.argv = relaunch_argv(
            sys.argv[0],
            [str(o) for o in hydra_cfg.overrides.task],
            [str(o) for o in hydra_cfg.overrides.hydra],
            os.path.abspath(str(hydra_cfg.sweep.dir)),
        )
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = output_dir


def teardown_process_group() -> None:
    """Destroy torch.distributed's default process group if one is up (Lightning leaves it for the process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def job_environment() -> Iterator[None]:
    """Run one (sweep) job so that the next job in this process starts clean.

    Pins Lightning's re-launch to the job on entry; on exit destroys the process group and puts back the
    launcher's environment variables (`LAUNCHER_ENV`) as they were before the job.
    """
    saved = {key: os.environ.get(key) for key in LAUNCHER_ENV}
    pin_relaunch_to_job()
    try:
        yield
    finally:
        teardown_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

"""SLURM through hydra-submitit-launcher: the sbatch script our `slurm` launcher config makes, and a real
2-job sweep through submitit's local executor (no SLURM needed)."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
from conftest import run_cli, tiny_sweep_args
from hydra.utils import instantiate

from ecg_inception.core.compose import compose_config

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the `cluster` extra")


def _compose(overrides: list[str]):
    return compose_config("train", overrides, return_hydra_config=True)


def _sbatch_script(cfg) -> str:
    """What the plugin's SlurmLauncher would submit for one job of `cfg` (sbatch itself is not called)."""
    import submitit
    import submitit.slurm.slurm as slurm

    launcher = instantiate(cfg.hydra.launcher)
    launcher.config, launcher.task_function, launcher.hydra_context = cfg, None, None
    captured = {}

    def fake_map_array(executor, *args):
        captured["executor"] = executor
        return []

    with mock.patch.object(slurm.shutil, "which", lambda name: f"/usr/bin/{name}"), \
            mock.patch.object(submitit.AutoExecutor, "map_array", fake_map_array):  # fmt: skip
        assert launcher.launch([["seed=1"]], initial_job_idx=0) == []
    return captured["executor"]._executor._make_submission_file_text("python -m job", "uid")


def test_slurm_launcher_ties_tasks_to_devices_and_takes_user_keys(tmp_path: Path) -> None:
    cfg = _compose([
        "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu", "hydra.launcher.account=lab", "hydra.launcher.cpus_per_task=9",
        "hydra.launcher.mem_gb=64", "hydra.launcher.timeout_min=30", f"hydra.sweep.dir={tmp_path}",
        "hydra.job.name=train", "paths.output_dir=/tmp/unused",
    ])  # fmt: skip
    script = _sbatch_script(cfg)
    for line in ("--ntasks-per-node=4", "--gpus-per-node=4", "--nodes=2", "--partition=gpu", "--account=lab",
                 "--cpus-per-task=9", "--mem=64GB", "--time=30", "--signal=USR2@120"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script, line
    assert cfg.hydra.launcher.max_num_timeout == 0  # no requeue on timeout unless asked for
    (plugin,) = instantiate(cfg.trainer.plugins)
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    assert isinstance(plugin, SLURMEnvironment) and plugin.auto_requeue is False  # submitit owns requeue


def test_slurm_launcher_on_cpu_asks_for_no_gpus(tmp_path: Path) -> None:
    cfg = _compose(["hydra/launcher=slurm", "trainer=ddp_cpu", f"hydra.sweep.dir={tmp_path}", "hydra.job.name=t",
                    "paths.output_dir=/tmp/unused"])  # fmt: skip
    script = _sbatch_script(cfg)
    assert "#SBATCH --ntasks-per-node=2\n" in script and "gpus" not in script


@pytest.mark.slow
def test_two_job_sweep_through_submitit_local(synthetic_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [*tiny_sweep_args(synthetic_root, tmp_path), "hydra/launcher=slurm_local", "seed=1,2",
            f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = run_cli(["-m", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (sweep / ".submitit").iterdir())  # the jobs really ran through submitit
    seeds = []
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["test"]["accuracy"] is not None and (sweep / job / "checkpoints" / "last.ckpt").is_file()
        seeds.append(metrics["seed"])
    assert seeds == [1, 2]
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["counts"]["ok"] == 2 and len(summary["rows"]) == 2

"""Sweeps that survive failing jobs, and one summary of all jobs at the end.

Two parts, both registered by the shipped configs:

- `sweep_job()` wraps a Hydra job (the `ecg-inception-train` task function). In a multirun job it catches the
  job's exception, logs it to the job's own `train.log`, writes `error.json` into the job's folder and lets the
  sweep go on (Hydra's sweepers re-raise the first failed job's exception once the batch is done and never run
  their end-of-sweep callbacks). In a single run the exception propagates unchanged.
- `SweepSummary`, a Hydra callback (`conf/hydra/default.yaml`): at the end of a multirun it reads every job
  folder of the sweep dir (`metrics.json`, `error.json`, `.hydra/overrides.yaml`), writes `sweep_summary.csv`
  and `sweep_summary.json` there, sorted by `optimized_metric`, prints the table and, when any job diverged or
  failed, prints their count on stderr and exits 1.

A job's status is `metrics.json`'s `status` when it has one (`ok`, `diverged`, `failed`), else `failed` when the
job left an `error.json` or no `metrics.json`, else `ok`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

ERROR_FILE = "error.json"
METRICS_FILE = "metrics.json"  # report.METRICS_FILE; not imported, to keep this module light for the callback
SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_JSON = "sweep_summary.json"
STATUSES = ("ok", "diverged", "failed")


@dataclass
class JobOutcome:
    """Set by `sweep_job` when the wrapped job failed: the value the task function should return."""

    failed: bool = False
    error: str | None = None
    value: float = field(default=math.nan)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def error_line(exc: BaseException) -> str:
    """One line naming a failure: the last line of the root cause (`raise ... from`), e.g. the ValueError inside
    Hydra's InstantiationException, whose own last line is only `full_key: data`.

    Args:
        exc: The exception a job raised.

    Returns:
        `<type>: <last line of its message>` of the innermost cause.
    """
    root, seen = exc, {id(exc)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    return f"{type(root).__name__}: {_last_line(str(root))}".rstrip(": ")


def record_job_error(output_dir: str | Path, exc: BaseException, wall_time_s: float | None = None) -> Path:
    """Write `error.json` (type, message, last line, traceback, wall time) into a job's folder.

    Args:
        output_dir: The job's run folder.
        exc: The exception the job raised.
        wall_time_s: Seconds the job ran before it failed.

    Returns:
        The path of the written file.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    record = {
        "status": "failed",
        "error_type": type(exc).__name__,
        "error": error_line(exc),
        "message": str(exc),
        "traceback": text,
        "wall_time_s": None if wall_time_s is None else round(float(wall_time_s), 2),
    }
    path = out / ERROR_FILE
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (False under the compose API and in single runs)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextlib.contextmanager
def sweep_job() -> Iterator[JobOutcome]:
    """Run one Hydra job; in a multirun a failure is recorded in its folder and does not stop the sweep.

    Yields:
        A `JobOutcome`; after the block, `failed` says whether the job failed (multirun only) and `value` is
        NaN, what a sweeper (Optuna included) takes as a failed trial.

    Raises:
        Whatever the job raised, outside a multirun (single runs keep their exit status and traceback).
    """
    from hydra.core.hydra_config import HydraConfig

    from ecg_inception.distributed import is_rank_zero, job_environment

    outcome = JobOutcome()
    started = time.perf_counter()
    multirun = in_multirun()
    with job_environment():
        try:
            yield outcome
        except (Exception, SystemExit) as exc:
            if not multirun or (isinstance(exc, SystemExit) and exc.code in (0, None)):
                raise
            output_dir = HydraConfig.get().runtime.output_dir
            log.error("Job %s failed; the sweep goes on", output_dir, exc_info=exc)
            if is_rank_zero():
                record_job_error(output_dir, exc, time.perf_counter() - started)
            outcome.failed, outcome.error = True, error_line(exc)


# ------------------------------------------------------------------------------------------------ summary
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _job_number(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (sys.maxsize, path.name)


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    """The job folders of a sweep dir (those with Hydra's `.hydra/overrides.yaml`), in job order.

    Args:
        sweep_dir: The sweep folder (`hydra.sweep.dir`).

    Returns:
        The folders, job 0 first.
    """
    root = Path(sweep_dir)
    found = {p.parent.parent for p in root.glob("**/.hydra/overrides.yaml")}
    return sorted(found, key=lambda p: (_job_number(p), str(p)))


def job_row(job_dir: Path, metric: str | None) -> dict[str, Any]:
    """One job's summary row: overrides, status, error, the optimised metric, val/test scalars, time, checkpoint.

    Args:
        job_dir: A job folder of the sweep.
        metric: The optimised metric's name (e.g. `val/acc_best`), or None.

    Returns:
        A plain dict (JSON-ready).
    """
    overrides = [str(o) for o in (OmegaConf.load(job_dir / ".hydra" / "overrides.yaml") or [])]
    metrics = _read_json(job_dir / METRICS_FILE)
    error = _read_json(job_dir / ERROR_FILE)
    status = str((metrics or {}).get("status") or "")
    if status not in STATUSES:
        status = "failed" if error is not None or metrics is None else "ok"
    message = None
    if error is not None:
        message = error.get("error")
    elif metrics is not None and status != "ok":
        message = metrics.get("error") or metrics.get("message")
    elif metrics is None:
        message = f"no {METRICS_FILE} and no {ERROR_FILE}: the job was killed or is still running"
    logged = dict((metrics or {}).get("logged") or {})
    scalars = {k: logged[k] for k in sorted(logged) if k.startswith(("val/", "test/"))}
    value = logged.get(metric) if metric else None
    wall = (metrics or {}).get("wall_time_s")
    if wall is None and error is not None:
        wall = error.get("wall_time_s")
    return {
        "job": job_dir.name,
        "status": status,
        "overrides": overrides,
        "metric": metric,
        "value": value if status == "ok" else None,
        "scalars": scalars,
        "wall_time_s": wall,
        "best_checkpoint": (metrics or {}).get("best_checkpoint"),
        "error": message,
        "dir": str(job_dir),
    }


def metric_direction(metric: str | None, direction: Any = None) -> str:
    """`maximize` or `minimize`: a sweeper's own direction when it has one, else `minimize` for losses.

    Args:
        metric: The optimised metric's name.
        direction: `hydra.sweeper.direction` (Optuna) if set.

    Returns:
        The direction.
    """
    if isinstance(direction, str) and direction.lower() in ("maximize", "minimize"):
        return direction.lower()
    return "minimize" if metric and "loss" in metric else "maximize"


def sort_rows(rows: Sequence[dict[str, Any]], direction: str) -> list[dict[str, Any]]:
    """Best first by `value`; jobs without a value (diverged, failed) last, in job order.

    Args:
        rows: Rows from `job_row`.
        direction: `maximize` or `minimize`.

    Returns:
        The sorted rows.
    """
    sign = -1.0 if direction == "maximize" else 1.0

    def key(row: dict[str, Any]) -> tuple[int, float]:
        value = row.get("value")
        if value is None or not math.isfinite(float(value)):
            return (1, 0.0)
        return (0, sign * float(value))

    return sorted(rows, key=key)  # stable: ties and the failed keep job order


def _override_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The override keys whose values differ between jobs (what the sweep varied)."""
    values: dict[str, set[str]] = {}
    for row in rows:
        for item in row["overrides"]:
            key, _, value = item.partition("=")
            values.setdefault(key, set()).add(value)
    return [k for k, v in values.items() if len(v) > 1]


def table_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Flat header and cells (strings) for the CSV and the printed table.

    Args:
        rows: Sorted rows from `job_row`.

    Returns:
        (header, cells).
    """
    swept = _override_columns(rows)
    scalar_keys = sorted({k for row in rows for k in row["scalars"]})
    header = ["job", "status", *swept, "value", *scalar_keys, "wall_time_s", "best_checkpoint", "error"]
    cells = []
    for row in rows:
        given = dict(item.partition("=")[::2] for item in row["overrides"])
        cell = [row["job"], row["status"], *(given.get(k, "") for k in swept), _fmt(row["value"])]
        cell += [_fmt(row["scalars"].get(k)) for k in scalar_keys]
        cell += [_fmt(row["wall_time_s"]), row["best_checkpoint"] or "", row["error"] or ""]
        cells.append(cell)
    return header, cells


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_table(header: Sequence[str], cells: Sequence[Sequence[str]], width: int = 48) -> str:
    """A fixed-width text table; cells longer than `width` are cut with an ellipsis."""
    cut = [[c if len(c) <= width else c[: width - 1] + "~" for c in row] for row in [list(header), *cells]]
    widths = [max(len(row[i]) for row in cut) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cut]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summarize_sweep(sweep_dir: str | Path, metric: str | None, direction: Any = None) -> dict[str, Any]:
    """Read every job folder of a sweep and write `sweep_summary.csv` and `.json` into the sweep dir.

    Args:
        sweep_dir: The sweep folder.
        metric: The optimised metric (`optimized_metric`).
        direction: The sweeper's direction, if it has one.

    Returns:
        The summary: metric, direction, counts per status, rows (sorted), and the file paths.
    """
    root = Path(sweep_dir)
    direction = metric_direction(metric, direction)
    rows = sort_rows([job_row(d, metric) for d in job_dirs(root)], direction)
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in STATUSES}
    header, cells = table_rows(rows)
    with open(root / SUMMARY_CSV, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(cells)
    summary = {"sweep_dir": str(root), "metric": metric, "direction": direction, "jobs": len(rows),
               "counts": counts, "rows": rows}  # fmt: skip
    (root / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, allow_nan=False, default=str) + "\n",
                                     encoding="utf-8")  # fmt: skip
    summary["table"] = format_table(header, cells)
    return summary


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, summarise its jobs and exit 1 if any diverged or failed.

    Args:
        exit_on_failure: Exit with status 1 (count on stderr) when a job diverged or failed.
    """

    def __init__(self, exit_on_failure: bool = True) -> None:
        self.exit_on_failure = bool(exit_on_failure)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write and print the summary of the sweep in `hydra.sweep.dir`."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        metric = config.get("optimized_metric")
        direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
        summary = summarize_sweep(sweep_dir, None if metric is None else str(metric), direction)
        print(f"\nSweep summary ({summary['jobs']} jobs, best {summary['metric']} first): {sweep_dir / SUMMARY_CSV}")
        print(summary["table"], flush=True)
        bad = summary["counts"]["diverged"] + summary["counts"]["failed"]
        if bad and self.exit_on_failure:
            print(f"{bad} of {summary['jobs']} sweep jobs did not finish ok "
                  f"({summary['counts']['diverged']} diverged, {summary['counts']['failed']} failed); "
                  f"see {sweep_dir / SUMMARY_CSV}", file=sys.stderr, flush=True)  # fmt: skip
            raise SystemExit(1)

"""The short sweep of issue 14 through the real CLI: `ecg-inception-train -m` with the trunk cache on vs off.

The issue's command, as it states it (4 jobs: lr 0.01, 0.001 x dropout 0.3, 0.5; 3 epochs; augmentation off;
no ImageNet weights), on 48 synthetic full-size pages (12 per class, `ecg-inception-synth`'s defaults, seed 0):

    ecg-inception-train -m experiment=paper data.root=<48 pages> model.pretrained=false trainer.max_epochs=3 \\
        model.optimizer.lr=0.01,0.001 model.drop_rate=0.3,0.5 data.augment=false model.trunk_cache=on|off

Each sweep is one subprocess (Hydra's basic launcher runs its jobs one after the other in that process), with a
fresh cache folder (`ECG_INCEPTION_CACHE`) of its own, so both modes decode the pages and audit the folder once,
and only the cached one builds the trunk cache. Only `hydra.sweep.dir` and `paths.log_dir` are added, to keep the
outputs apart. Variants:

- `exact`: the command above. `experiment=paper` is NOT head-only: its `model/unfreeze=keras_minus10` trains
  `Mixed_7c.branch_pool.bn`, so the cut is after `Mixed_7b` and every cached job still runs `Mixed_7c` (forward,
  and backward into that BatchNorm) besides the heads;
- `head`: the same plus `model/unfreeze=keras_minus3` (the seed's "-3": only the new heads train), the head-only
  job the issue has in mind.

Prints per sweep the wall time of every job (`metrics.json` `wall_time_s`: `train()` itself) and of the whole
command (imports, Hydra, the jobs), the trunk-cache build time (the entries job 0 built), the ratio uncached /
cached (target >= 5x), the later jobs' mean wall cached and uncached, what each sweep spends outside its
jobs, the ceiling (uncached / the cached sweep less its later jobs: the speed-up if they cost nothing; the
once-per-sweep costs bound the ratio at this size) and the test losses of both modes side by side (they must agree: the same data, seeds and
split; an fp16 cache rounds the cached activations, an uncalibrated random trunk overflows fp16 and is cached
as float32, exactly).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Check,
    add_json_arg,
    add_threads_arg,
    load_average,
    print_checks,
    print_table,
    save_json,
    start_cpu_benchmark,
)

VARIANTS = {"exact": [], "head": ["model/unfreeze=keras_minus3"]}
#: |test loss cached - uncached| / |uncached| allowed: the fp16 cache's rounding (float32 entries agree exactly).
LOSS_RTOL = 1e-3


def make_pages(root: Path, per_class: int) -> None:
    """`ecg-inception-synth root --per-class N --seed 0`, then every file dated an hour back (a dataset on disk)."""
    from ecg_inception.synthetic.generate import generate_dataset

    generate_dataset(root, per_class=per_class, seed=0)
    past = time.time() - 3600
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (past, past))


def sweep_command(args: argparse.Namespace, root: Path, mode: str, variant: str, work: Path) -> list[str]:
    """The issue's command line (plus where its outputs go) for one mode and variant."""
    return [
        sys.executable, "-m", "ecg_inception.cli.train", "-m", "experiment=paper", f"data.root={root}",
        "model.pretrained=false", f"trainer.max_epochs={args.epochs}", f"model.optimizer.lr={args.lrs}",
        f"model.drop_rate={args.drop_rates}", "data.augment=false", f"model.trunk_cache={mode}",
        *VARIANTS[variant], *args.extra, f"hydra.sweep.dir={work / 'sweep'}", f"paths.log_dir={work / 'logs'}",
    ]


def run_sweep(args: argparse.Namespace, root: Path, mode: str, variant: str, work: Path) -> dict[str, Any]:
    """Run one sweep in a subprocess; its wall time, exit status and one record per job (by job number)."""
    env = dict(os.environ, ECG_INCEPTION_CACHE=str(work / "cache"), HYDRA_FULL_ERROR="1")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = sweep_command(args, root, mode, variant, work)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    (work / "sweep.log").write_text(done.stdout + done.stderr)
    jobs = []
    for job_dir in sorted((work / "sweep").glob("[0-9]*"), key=lambda p: int(p.name)):
        metrics = json.loads((job_dir / "metrics.json").read_text()) if (job_dir / "metrics.json").is_file() else {}
        tc = metrics.get("trunk_cache") or {}
        built = tc.get("built", {})
        jobs.append({
            "job": int(job_dir.name), "status": metrics.get("status", "failed"),
            "wall_s": metrics.get("wall_time_s"), "test_loss": (metrics.get("test") or {}).get("loss"),
            "cached": bool(tc), "build_s": sum(s for k, s in tc.get("seconds", {}).items() if built.get(k)),
            "boundary": tc.get("boundary"), "stored": tc.get("stored"),
        })
    if done.returncode != 0:
        print(f"WARNING : {' '.join(cmd)} exited {done.returncode}; last lines of {work / 'sweep.log'}:\n"
              + "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:]))
    return {"mode": mode, "variant": variant, "wall_s": wall, "returncode": done.returncode, "jobs": jobs,
            "command": " ".join(cmd[2:]), "load": load_average()}


def report_variant(variant: str, runs: list[dict[str, Any]], expected_jobs: int) -> tuple[list[Check], dict]:
    """Per-job table and checks of one variant (medians over rounds where there are several)."""
    on = [r for r in runs if r["mode"] == "on"]
    off = [r for r in runs if r["mode"] == "off"]
    print(f"\n== variant {variant}: wall time per job (train(), metrics.json) and test loss, round 1")
    rows = []
    losses = []
    for a, b in itertools.zip_longest(on[0]["jobs"], off[0]["jobs"], fillvalue={}):
        la, lb = a.get("test_loss"), b.get("test_loss")
        rel = abs(la - lb) / max(abs(lb), 1e-12) if la is not None and lb is not None else None
        losses.append(rel)
        rows.append((a.get("job", b.get("job")), f"{a.get('wall_s')}", f"{b.get('wall_s')}",
                     f"{a.get('build_s', 0):.2f}", f"{la}", f"{lb}", "-" if rel is None else f"{rel:.1e}"))
    print_table(rows, ("job", "cached s", "uncached s", "build s", "test loss cached", "test loss uncached",
                       "rel diff"))
    wall_on = sorted(r["wall_s"] for r in on)[len(on) // 2]
    wall_off = sorted(r["wall_s"] for r in off)[len(off) // 2]
    job0 = on[0]["jobs"][0] if on[0]["jobs"] else {}
    later = [j["wall_s"] for r in on for j in r["jobs"][1:] if j.get("wall_s") is not None]
    ok = all(r["returncode"] == 0 and len(r["jobs"]) == expected_jobs and all(j["status"] == "ok" for j in r["jobs"])
             and all(j["cached"] == (r["mode"] == "on") for j in r["jobs"]) for r in runs)
    totals = {m: ", ".join(f"{r['wall_s']:.1f}" for r in rs) for m, rs in (("on", on), ("off", off))}
    print(f"cut: {job0.get('boundary')} (stored {job0.get('stored')}); sweep totals cached {totals['on']} s, "
          f"uncached {totals['off']} s")
    worst = max((x for x in losses if x is not None), default=None)
    later_off = [j["wall_s"] for r in off for j in r["jobs"][1:] if j.get("wall_s") is not None]
    job_on = sum(later) / len(later) if later else None
    job_off = sum(later_off) / len(later_off) if later_off else None
    # What both sweeps pay outside the jobs (interpreter, imports, Hydra), and the cached sweep's cost with its
    # jobs after the first taken away (job 0 builds the trunk cache and audits and decodes the pages): no work
    # on the later jobs can bring the ratio above uncached / that.
    outside = {m: sorted(r["wall_s"] - sum(j["wall_s"] or 0 for j in r["jobs"]) for r in rs)[len(rs) // 2]
               for m, rs in (("on", on), ("off", off))}
    fixed_on = wall_on - (expected_jobs - 1) * job_on if job_on is not None else None
    checks = [
        Check(f"{variant}: uncached sweep (whole command)", wall_off, unit=" s"),
        Check(f"{variant}: cached sweep (whole command)", wall_on, unit=" s"),
        Check(f"{variant}: speed-up uncached / cached", wall_off / wall_on, 5.0, "x"),
        Check(f"{variant}: trunk-cache build (job 0)", job0.get("build_s"), unit=" s", note="entries job 0 built"),
        Check(f"{variant}: cached job wall, jobs 2..N (mean)", job_on, 2.0 if variant == "head" else None,
              " s", higher_is_better=False, note="train() only; issue: 'a second or two' (head only)"),
        Check(f"{variant}: uncached job wall, jobs 2..N (mean)", job_off, unit=" s", note="train() only"),
        Check(f"{variant}: per job, uncached / cached (jobs 2..N)", job_off / job_on if job_on else None, unit="x",
              note="what each further job gains"),
        Check(f"{variant}: outside the jobs, cached / uncached sweep", outside["on"], unit=" s",
              note=f"uncached {outside['off']:.1f} s: interpreter, imports, Hydra"),
        Check(f"{variant}: ceiling, uncached / (cached less jobs 2..N)",
              wall_off / fixed_on if fixed_on else None, unit="x",
              note="the speed-up if cached jobs after the first cost nothing"),
        Check(f"{variant}: max rel |test loss cached - uncached|", worst, LOSS_RTOL, higher_is_better=False),
        Check(f"{variant}: every job ok, cached as asked (1 = yes)", float(ok), 1.0),
    ]
    return checks, {"wall_on_s": wall_on, "wall_off_s": wall_off}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None,
                        help="page folder (read-only; default: 12 synthetic full-size pages per class, seed 0)")
    parser.add_argument("--per-class", type=int, default=12, help="synthetic pages per class (default 12: 48)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lrs", default="0.01,0.001", help="model.optimizer.lr sweep (default the issue's)")
    parser.add_argument("--drop-rates", default="0.3,0.5", help="model.drop_rate sweep (default the issue's)")
    parser.add_argument("--variants", default="exact,head", help="exact (the issue's command), head (+ keras_minus3)")
    parser.add_argument("--rounds", type=int, default=1, help="alternated rounds (fresh caches every sweep)")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every sweep (checks only)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per sweep")
    parser.add_argument("--keep", type=Path, default=None, help="keep the sweeps' folders here")
    add_threads_arg(parser)
    add_json_arg(parser)
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    info = start_cpu_benchmark(args, "short sweep (issue 14): ecg-inception-train -m, trunk cache on vs off")
    n_jobs = len(args.lrs.split(",")) * len(args.drop_rates.split(","))
    print(f"sweep   : {n_jobs} jobs (lr {args.lrs} x drop {args.drop_rates}), {args.epochs} epochs, variants "
          f"{variants}, {args.rounds} round(s), threads {args.threads or 'torch default'}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_short_sweep_") as tmp:
        base = args.keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        root = args.root
        if root is None:
            root = base / "pages"
            start = time.perf_counter()
            make_pages(root, args.per_class)
            print(f"data    : {root}: {4 * args.per_class} synthetic pages in {time.perf_counter() - start:.1f} s")
        runs: list[dict[str, Any]] = []
        for r, variant, mode in itertools.product(range(args.rounds), variants, ("on", "off")):
            work = base / f"r{r}-{variant}-{mode}"
            work.mkdir(parents=True)
            result = run_sweep(args, root, mode, variant, work)
            runs.append(result)
            walls = ", ".join(f"{j['wall_s']}" for j in result["jobs"])
            print(f"  round {r + 1}/{args.rounds} {variant:<5s} trunk_cache={mode:<3s} {result['wall_s']:7.1f} s "
                  f"(exit {result['returncode']}; jobs {walls} s)   (load {result['load']})", flush=True)

    checks: list[Check] = []
    figures: dict[str, Any] = {"runs": runs}
    for variant in variants:
        more, summary = report_variant(variant, [r for r in runs if r["variant"] == variant], n_jobs)
        checks += more
        figures[variant] = summary
    print_checks(checks)
    save_json(args.json, "bench_short_sweep", info, args, figures, checks)


if __name__ == "__main__":
    main()

"""Paper-grid sweep with the trunk cache on vs off: wall time, speed-up, overhead and equal test metrics.

Runs a grid of jobs (batch size x lr x dropout at ONE unfrozen depth, default `model/unfreeze=keras_minus3`,
head only) in-process through `ecg_inception.training.train` on composed configs, as Hydra's basic launcher
does sequentially, all on one shared split manifest made first, twice: `model.trunk_cache=on` and `=off`,
everything else equal (`data.augment=false`, 299 px with aux logits on, `callbacks=sweep`, `plots=false`,
weights from `--weights`, else a random trunk with BatchNorm statistics calibrated on the training images: the
same compute as ImageNet weights and realistic activation scales, so the fp16 cache is exercised). Each mode
gets a fresh cache dir. The default workload (12 jobs, 96 synthetic pages, 20 epochs) is still small next to a
real paper-budget sweep (up to 200 epochs, early stopping at patience 10). Prints per-mode wall time, the
speed-up (target >= 20x), cached total vs one trunk pass + tail work (target <= 1.5x), per-job overhead, and
the test metrics of both modes side by side.

An uncached job at 299 px runs at ~1-2 img/s on 2 loaded cores, so by default only the first
`--uncached-jobs` jobs run uncached and the uncached total is EXTRAPOLATED (mean job time x all jobs);
`--uncached-jobs 0` runs every job in both modes.
"""

from __future__ import annotations

import argparse
import itertools
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


def compose_cfg(overrides: list[str]):
    from ecg_inception.core.compose import compose_config

    return compose_config("train", overrides)


def base_overrides(args: argparse.Namespace, root: Path, work: Path) -> list[str]:
    return [
        f"data.root={root}",
        f"data.image_size={args.size}",
        "data.augment=false",
        "data.num_workers=0",
        "model.pretrained=false",
        "model.aux_logits=true",
        f"model/unfreeze={args.unfreeze}",
        "callbacks=sweep",
        "plots=false",
        "logger=csv",
        f"trainer.max_epochs={args.epochs}",
        "+trainer.enable_model_summary=false",
        "+trainer.enable_progress_bar=false",
        f"paths.log_dir={work / 'logs'}",
    ]


def make_manifest(args: argparse.Namespace, root: Path, work: Path) -> Path:
    """One split for every job of both modes (what hparams_search=paper_grid's shared_split_manifest does)."""
    from hydra.utils import instantiate

    out = work / "splits.csv"
    cfg = compose_cfg([*base_overrides(args, root, work), f"paths.cache_dir={work / 'cache-split'}",
                       f"paths.output_dir={work / 'split'}"])
    dm = instantiate(cfg.data, manifest_out=str(out))
    dm.prepare_data()
    dm.setup("fit")
    return out


def calibrated_weights(args: argparse.Namespace, root: Path, manifest: Path, work: Path) -> Path:
    """A stand-in for ImageNet weights: random inception_v3 (1000 classes + aux) whose BatchNorm running
    statistics are estimated on the benchmark's own training images.

    A random trunk with untouched BatchNorm statistics (mean 0, var 1) blows activations up layer by layer
    (test losses ~1e12, fp16 overflow), which says nothing about a real sweep. Calibrated statistics keep every
    layer's output near unit scale, as trained weights do; the compute per image is the same.
    """
    import timm
    import torch
    from hydra.utils import instantiate

    cfg = compose_cfg([*base_overrides(args, root, work), f"data.split_manifest={manifest}",
                       f"paths.cache_dir={work / 'cache-calibrate'}", f"paths.output_dir={work / 'calibrate'}"])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    ds = dm.dataset("train")
    n = min(len(ds), args.calibration_images)
    batch = torch.stack([ds[i][0] for i in range(n)])
    model = timm.create_model("inception_v3", pretrained=False, num_classes=1000, aux_logits=True)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for chunk in batch.split(16):
            if len(chunk) > 1:
                model(chunk)
    path = work / "calibrated_inception_v3.pth"
    torch.save(model.state_dict(), path)
    return path


class LoopTimer:
    """Seconds spent inside Trainer.fit/validate/test (the training/eval loops, trunk-cache build included)."""

    def __init__(self) -> None:
        import lightning.pytorch as pl

        self.seconds = 0.0
        self._orig = {}
        for name in ("fit", "validate", "test"):
            orig = getattr(pl.Trainer, name)
            self._orig[name] = orig

            def wrapped(trainer, *a, _orig=orig, **kw):
                start = time.perf_counter()
                try:
                    return _orig(trainer, *a, **kw)
                finally:
                    self.seconds += time.perf_counter() - start

            setattr(pl.Trainer, name, wrapped)


def run_job(overrides: list[str], timer: LoopTimer) -> dict[str, Any]:
    from ecg_inception.training import train

    start = time.perf_counter()
    loop_before = timer.seconds
    cfg = compose_cfg(overrides)
    metrics, _ = train(cfg)
    wall = time.perf_counter() - start
    tc = metrics.get("trunk_cache") or {}
    built = tc.get("built", {})
    build_s = sum(s for k, s in tc.get("seconds", {}).items() if built.get(k))
    test = metrics["test"] or {}
    return {"wall_s": wall, "loop_s": timer.seconds - loop_before, "build_s": build_s,
            "test_loss": test.get("loss"), "test_acc": test.get("accuracy"),
            "trunk_cache": bool(tc), "stored": tc.get("stored"), "load": load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None,
                        help="image folder (read-only; default: synthetic set generated into a temp dir)")
    parser.add_argument("--per-class", type=int, default=24, help="synthetic images per class (default 24)")
    parser.add_argument("--unfreeze", default="keras_minus3",
                        help="model/unfreeze preset: keras_minus3 (head only, default), keras_minus10, blocks1")
    parser.add_argument("--batch-sizes", default="16,32")
    parser.add_argument("--lrs", default="0.001,0.01,0.1")
    parser.add_argument("--drop-rates", default="0.3,0.5")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--size", type=int, default=299, help="input size (>= 299 keeps aux logits on)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="ImageNet inception_v3 checkpoint (model.pretrained_file); default: a random trunk "
                             "with BatchNorm statistics calibrated on the training images")
    parser.add_argument("--calibration-images", type=int, default=48)
    parser.add_argument("--uncached-jobs", type=int, default=2,
                        help="run only the first N jobs uncached and extrapolate (0 = all jobs; default 2)")
    add_threads_arg(parser)
    add_json_arg(parser)
    args = parser.parse_args()
    info = start_cpu_benchmark(args, "trunk-cache sweep: paper grid with model.trunk_cache=on vs off")
    grid = list(itertools.product(args.batch_sizes.split(","), args.lrs.split(","), args.drop_rates.split(",")))
    n_unc = len(grid) if args.uncached_jobs <= 0 else min(args.uncached_jobs, len(grid))
    print(f"grid    : {len(grid)} jobs (batch {args.batch_sizes} x lr {args.lrs} x drop {args.drop_rates}), "
          f"model/unfreeze={args.unfreeze}, {args.epochs} epochs, {args.size} px, augment off; "
          f"uncached: {n_unc} job(s){' (rest extrapolated)' if n_unc < len(grid) else ''}")

    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        work = Path(tmp)
        if args.root is None:
            from ecg_inception.synthetic.generate import generate_dataset

            root = work / "data"
            generate_dataset(root, per_class=args.per_class, seed=0, scale=0.5)
        else:
            root = args.root
        manifest = make_manifest(args, root, work)
        weights = args.weights or calibrated_weights(args, root, manifest, work)
        print(f"weights : {weights if args.weights else 'random trunk, BatchNorm calibrated on the train images'}")
        print(f"data    : {root} | split manifest {manifest} ({len(manifest.read_text().splitlines()) - 1} rows)",
              flush=True)
        timer = LoopTimer()
        results: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
        wall: dict[str, float] = {}
        for mode, jobs in (("on", grid), ("off", grid[:n_unc])):
            start = time.perf_counter()
            for i, (bs, lr, dr) in enumerate(jobs):
                overrides = [*base_overrides(args, root, work), f"data.split_manifest={manifest}",
                             f"model.trunk_cache={mode}", f"paths.cache_dir={work / f'cache-{mode}'}",
                             f"paths.output_dir={work / f'run-{mode}' / str(i)}", f"data.batch_size={bs}",
                             f"model.optimizer.lr={lr}", f"model.drop_rate={dr}",
                             f"model.pretrained_file={weights}"]
                r = run_job(overrides, timer)
                r.update(batch_size=int(bs), lr=float(lr), drop_rate=float(dr))
                results[mode].append(r)
                print(f"  trunk_cache={mode:<3s} job {i + 1:2d}/{len(jobs)} bs={bs} lr={lr} drop={dr}: "
                      f"{r['wall_s']:7.2f} s (loops {r['loop_s']:.2f} s, build {r['build_s']:.2f} s) "
                      f"test loss {r['test_loss']:.4f} acc {r['test_acc']:.3f}   (load {r['load']})", flush=True)
            wall[mode] = time.perf_counter() - start

    on, off = results["on"], results["off"]
    if any(not r["trunk_cache"] for r in on) or any(r["trunk_cache"] for r in off):
        print("WARNING : trunk_cache on/off did not take effect as asked")
    print(f"cache   : stored dtypes {on[0]['stored']} (float32 = the fp16 build overflowed and was redone)")
    wall_on = wall["on"]
    mean_off = wall["off"] / len(off)
    wall_off = mean_off * len(grid)
    extrapolated = len(off) < len(grid)
    build_s = sum(r["build_s"] for r in on)
    tail_s = sum(r["loop_s"] for r in on) - build_s
    overhead = [r["wall_s"] - r["loop_s"] for r in on]
    overhead_off = [r["wall_s"] - r["loop_s"] for r in off]
    per_job_cached_after_first = [r["wall_s"] for r in on[1:]]

    print()
    print("== test metrics, jobs run in both modes")
    rows = []
    dloss, same_acc = [], True
    for i, (a, b) in enumerate(zip(on, off, strict=False)):
        d = abs(a["test_loss"] - b["test_loss"])
        dloss.append(d)
        same_acc &= a["test_acc"] == b["test_acc"]
        rows.append((i + 1, a["batch_size"], a["lr"], a["drop_rate"], f"{a['test_loss']:.5f}", f"{b['test_loss']:.5f}",
                     f"{d:.2e}", f"{a['test_acc']:.4f}", f"{b['test_acc']:.4f}"))
    print_table(rows, ("job", "bs", "lr", "drop", "loss on", "loss off", "|diff|", "acc on", "acc off"))

    tag = " (EXTRAPOLATED)" if extrapolated else ""
    checks = [
        Check(f"uncached total, {len(grid)} jobs{tag}", wall_off, unit=" s",
              note=f"{len(off)} job(s) measured, mean {mean_off:.1f} s/job" + (" x jobs" if extrapolated else "")),
        Check(f"cached total, {len(grid)} jobs", wall_on, unit=" s", note="measured"),
        Check(f"speed-up uncached / cached{tag}", wall_off / wall_on, 20.0, "x"),
        Check("one trunk pass (cache build, job 1)", build_s, unit=" s", note="train+val+test splits"),
        Check("tail work (loops of all cached jobs - build)", tail_s, unit=" s"),
        Check("cached total / (trunk pass + tail work)", wall_on / (build_s + tail_s), 1.5, "x",
              higher_is_better=False),
        Check("per-job overhead, cached (wall - loops)", sum(overhead) / len(overhead), unit=" s",
              note=f"min..max {min(overhead):.2f}..{max(overhead):.2f}"),
        Check("per-job overhead, uncached (wall - loops)", sum(overhead_off) / len(overhead_off), unit=" s"),
        Check("cached job wall, jobs 2..N (mean)",
              sum(per_job_cached_after_first) / max(1, len(per_job_cached_after_first)), unit=" s"),
        Check("max |test loss on - off|", max(dloss) if dloss else None, unit="", note="fp16 cache tolerance"),
        Check("test accuracies equal (1 = yes)", float(same_acc) if dloss else None, 1.0),
    ]
    print_checks(checks)
    save_json(args.json, "bench_sweep", info, args,
              {"results": results, "wall_s": wall, "uncached_total_s": wall_off, "extrapolated": extrapolated,
               "build_s": build_s, "tail_s": tail_s}, checks)


if __name__ == "__main__":
    main()

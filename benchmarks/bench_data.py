"""Data loading: epoch 1 vs epoch 2 of EcgDataModule's train loader, with the decoded cache and without it.

The loader is iterated without a model. Each configuration gets its own DataModule and its own empty cache
folder, so its epoch 1 is cold: it decodes, crops and resizes every image (and, with the cache, writes the
entries); epoch 2 then shows what the cache saves. Without the cache (`decoded_cache=False`) every epoch
decodes again. One more line opens a new DataModule on an already filled cache folder: the first epoch of the
next job of a sweep (disk entries, empty memory layer). Augmentation is off for the main comparison (its cost
is not decoding) and on for a second line. The split is made once (audit + split) before any timing, and all
configurations read that manifest. Per-process memo of file hashes is cleared before every configuration, as
in a fresh process. Repeats alternate the configurations; medians are reported.

Default data: a synthetic set at --scale 1.0 (the original 2213x1572 pages, where decoding costs most) in a
temporary folder. --root takes any class-folder tree (read-only; caches and the manifest go to a temp folder):

    python benchmarks/bench_data.py
    python benchmarks/bench_data.py --root /work/shared/data/mendeley-ecg-dev --repeats 2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import (
    Check,
    add_json_arg,
    add_threads_arg,
    median,
    print_checks,
    print_table,
    save_json,
    spread,
    start_cpu_benchmark,
)

from ecg_inception.core.hashing import clear_sha_memo
from ecg_inception.data.datamodule import EcgDataModule

TARGET_SPEEDUP = 10.0

# name -> (decoded_cache, augment, reuse the filled cache folder of this configuration)
CONFIGS: dict[str, tuple[bool, bool, str | None]] = {
    "cache on,  augment off": (True, False, None),
    "cache off, augment off": (False, False, None),
    "cache on,  new job (warm disk cache)": (True, False, "cache on,  augment off"),
    "cache on,  augment on": (True, True, None),
    "cache off, augment on": (False, True, None),
}


def time_epoch(loader) -> tuple[float, int]:  # noqa: ANN001
    """Seconds to iterate one epoch of `loader` and the number of images it gave."""
    start = time.perf_counter()
    n = 0
    for images, _ in loader:
        n += len(images)
    return time.perf_counter() - start, n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", default=None, help="class-folder tree to read (default: generate a synthetic set)")
    parser.add_argument("--split-manifest", default=None, help="a splits.csv for --root (skips the audit)")
    parser.add_argument("--per-class", type=int, default=20, help="synthetic images per class")
    parser.add_argument("--scale", type=float, default=1.0, help="synthetic page scale (1.0 = 2213x1572)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--protocol", default="leakfree")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0,
                        help="DataLoader workers (0: everything in this process, the cleanest figure)")
    parser.add_argument("--image-size", type=int, default=None, help="model input size (default: timm's, 299)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all configurations (medians)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (data, caches, manifest)")
    add_threads_arg(parser)
    add_json_arg(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.per_class < 1:
        parser.error("--repeats and --per-class must be >= 1")
    if args.split_manifest and not args.root:
        parser.error("--split-manifest needs --root")

    info = start_cpu_benchmark(args, "bench_data: EcgDataModule train loader, epoch 1 vs epoch 2, decoded cache on/off")
    tmp = Path(tempfile.mkdtemp(prefix="ecg_bench_data_"))
    figures: dict[str, object] = {}
    try:
        if args.root:
            root = Path(args.root)
            print(f"data    : {root} (read-only; caches under {tmp})")
        else:
            from ecg_inception.synthetic.generate import generate_dataset

            root = tmp / "data"
            start = time.perf_counter()
            generate_dataset(root, per_class=args.per_class, seed=args.seed, scale=args.scale)
            figures["generate_s"] = time.perf_counter() - start
            print(f"data    : synthetic, {args.per_class} per class at scale {args.scale}, generated in "
                  f"{figures['generate_s']:.1f} s into {root}")
        manifest = args.split_manifest
        if manifest is None:
            manifest = str(tmp / "splits.csv")
            start = time.perf_counter()
            splitter = EcgDataModule(root=str(root), protocol=args.protocol, seed=args.seed,
                                     cache_dir=str(tmp / "unused"), decoded_cache=False, manifest_out=manifest)
            counts = {split: sum(n.values()) for split, n in splitter.manifest.counts().items()}
            figures["audit_split_s"] = time.perf_counter() - start
            print(f"split   : audit + split in {figures['audit_split_s']:.1f} s -> {manifest} (not timed below): {counts}")

        def run(name: str, repeat: int) -> tuple[float, float | None, int]:
            cached, augment, reuse = CONFIGS[name]
            cache_dir = tmp / f"cache-r{repeat}-{(reuse or name).replace(' ', '').replace(',', '-')}"
            dm = EcgDataModule(
                root=str(root), protocol=args.protocol, split_manifest=manifest, seed=args.seed,
                batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=False,
                image_size=args.image_size, augment=augment, cache_dir=str(cache_dir), decoded_cache=cached,
            )  # fmt: skip
            dm.setup("fit")
            loader = dm.train_dataloader()
            clear_sha_memo()  # a fresh process hashes every file once
            e1, n = time_epoch(loader)
            e2 = None if reuse else time_epoch(loader)[0]
            del loader
            return e1, e2, n

        # Process warm-up (untimed): first use of the decode, resize, augment and normalise code paths.
        warm = EcgDataModule(root=str(root), protocol=args.protocol, split_manifest=manifest, seed=args.seed,
                             batch_size=args.batch_size, num_workers=0, pin_memory=False, image_size=args.image_size,
                             augment=True, cache_dir=str(tmp / "cache-warmup"), decoded_cache=True)
        warm.setup("fit")
        for _ in range(2):  # decode + write, then the cached path
            next(iter(warm.train_dataloader()))
        del warm

        epochs: dict[str, dict[str, list[float]]] = {n: {"epoch1": [], "epoch2": []} for n in CONFIGS}
        n_images = 0
        print(f"loader  : batch {args.batch_size}, num_workers {args.num_workers}, {args.repeats} repeats")
        for r in range(args.repeats):
            for name in CONFIGS:
                e1, e2, n_images = run(name, r)
                epochs[name]["epoch1"].append(e1)
                if e2 is not None:
                    epochs[name]["epoch2"].append(e2)
                second = f"epoch 2 {e2:7.3f} s" if e2 is not None else ""
                print(f"  repeat {r + 1}/{args.repeats} {name:<38s} epoch 1 {e1:7.3f} s  {second}", flush=True)
        print(f"train images per epoch: {n_images}")

        def med(name: str, key: str) -> float:
            return median(epochs[name][key])

        def per_repeat(name: str) -> str:
            e = epochs[name]
            return ", ".join(f"{a / b:.1f}x" for a, b in zip(e["epoch1"], e["epoch2"], strict=True))

        rows = []
        for name in CONFIGS:
            e1 = epochs[name]["epoch1"]
            e2 = epochs[name]["epoch2"]
            rows.append((name, f"{median(e1):.3f} ({spread(e1)})",
                         f"{median(e2):.3f} ({spread(e2)})" if e2 else "-",
                         f"{1000 * median(e2 or e1) / n_images:.1f}",
                         f"{median(e1) / median(e2):.1f}x" if e2 else "-"))
        print()
        print("seconds per epoch, median (min..max):")
        print_table(rows, ("configuration", "epoch 1 s", "epoch 2 s", "ms/image (last epoch)", "epoch 1 -> 2"))

        on, off = "cache on,  augment off", "cache off, augment off"
        on_aug, off_aug, job = "cache on,  augment on", "cache off, augment on", "cache on,  new job (warm disk cache)"
        checks = [
            Check("speed-up epoch 1 -> 2 with cache, augment off", med(on, "epoch1") / med(on, "epoch2"),
                  TARGET_SPEEDUP, unit="x",
                  note=f"{med(on, 'epoch1'):.2f} s -> {med(on, 'epoch2'):.3f} s for {n_images} images; "
                       f"per repeat {per_repeat(on)}"),
            Check("speed-up epoch 1 -> 2 with cache, augment on", med(on_aug, "epoch1") / med(on_aug, "epoch2"),
                  unit="x", note=f"{med(on_aug, 'epoch1'):.2f} s -> {med(on_aug, 'epoch2'):.3f} s; per repeat "
                                 f"{per_repeat(on_aug)} (augmentation runs every epoch)"),
            Check("epoch 2: no cache / cache, augment off", med(off, "epoch2") / med(on, "epoch2"), unit="x",
                  note=f"{med(off, 'epoch2'):.2f} s vs {med(on, 'epoch2'):.3f} s"),
            Check("epoch 2: no cache / cache, augment on", med(off_aug, "epoch2") / med(on_aug, "epoch2"), unit="x",
                  note=f"{med(off_aug, 'epoch2'):.2f} s vs {med(on_aug, 'epoch2'):.3f} s"),
            Check("new job on a filled cache: no-cache epoch / its epoch 1", med(off, "epoch1") / med(job, "epoch1"),
                  unit="x", note=f"{med(off, 'epoch1'):.2f} s vs {med(job, 'epoch1'):.3f} s (disk entries only)"),
            Check("cold epoch, cache on / cache off (write cost)", med(on, "epoch1") / med(off, "epoch1"),
                  unit="x", note=f"{med(on, 'epoch1'):.2f} s vs {med(off, 'epoch1'):.2f} s: what writing the "
                                 "entries adds to the first epoch"),
        ]  # fmt: skip
        print_checks(checks, "bench_data")
        figures.update(epochs=epochs, train_images=n_images)
        save_json(args.json, "bench_data", info, args, figures, checks)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

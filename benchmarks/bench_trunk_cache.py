"""Trunk cache: train-step throughput with and without cached frozen-trunk features, build and validation cost.

For each freeze boundary (Mixed_6e: unfreeze.blocks=3, Mixed_7b: blocks=1, head-only: blocks=0) one optimizer step
(Adam, CE + 0.4 x CE(aux) unless --no-aux, frozen BatchNorm in inference mode) is timed on a batch of images (the frozen trunk
is recomputed) and on the same batch's cached fp16 features (only the tail runs); the fully trainable network
is timed as the reference. Then the cache of a synthetic split is built at 299 px (prefix forward + fp16 write
+ CRC32), and a 600-image entry is validated by a fresh store, as a new sweep job would (sizes + CRC32 +
prefix weight hash). Variants alternate; medians are printed.

    python benchmarks/bench_trunk_cache.py                     # 299 px, aux on, batch 16
    python benchmarks/bench_trunk_cache.py --steps 3 --rounds 3 --threads 1 --n-validate 600
    python benchmarks/bench_trunk_cache.py --no-aux      # the head-only tail is then dropout + fc only
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import timm
import torch
import torch.nn.functional as F
from _common import (
    add_threads_arg,
    alternate,
    median,
    spread,
    start_cpu_benchmark,
)

from ecg_inception.features.trunk_cache import TrunkCacheStore, build_entry
from ecg_inception.features.trunk_views import ViewDataset
from ecg_inception.models.freezing import apply_unfreeze, set_frozen_bn_eval
from ecg_inception.models.trunk import HEAD, TrunkSplit, frozen_boundary

BOUNDARIES = {"Mixed_6e": 3, "Mixed_7b": 1, HEAD: 0}


class RandomImages:
    """What build_entry reads from an EcgImageDataset (rows, uint8 images, normalise), made of noise."""

    def __init__(self, n: int, size: int) -> None:
        gen = torch.Generator().manual_seed(1)
        self.data = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
        self.rows = [SimpleNamespace(sha256=f"{i:064x}", path=f"{i}.png") for i in range(n)]
        self.augment = None

    def __len__(self) -> int:
        return len(self.data)

    def targets(self) -> list[int]:
        return [0] * len(self.data)

    def load_uint8(self, i: int) -> torch.Tensor:
        return self.data[i]

    def normalize(self, img: torch.Tensor) -> torch.Tensor:
        return img.float() / 127.5 - 1.0


def calibrate(model: torch.nn.Module, size: int) -> None:
    """BatchNorm statistics from one noise batch, so that random-init activations fit fp16 (as trained ones do)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = None
        bn.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def step_timer(model: torch.nn.Module, batch: object, tail: TrunkSplit | None, y: torch.Tensor, steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)

    def one() -> None:
        out = tail.tail(batch) if tail is not None else model(batch)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        loss = F.cross_entropy(logits, y)
        if aux is not None:
            loss = loss + 0.4 * F.cross_entropy(aux, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def run() -> float:
        one()  # warm-up
        started = time.perf_counter()
        for _ in range(steps):
            one()
        return steps * len(y) / (time.perf_counter() - started)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n-build", type=int, default=32, help="images whose features are built per boundary")
    parser.add_argument("--n-validate", type=int, default=600, help="images in the entry a new job validates")
    parser.add_argument("--no-aux", action="store_true", help="aux logits off (then any --size >= 75 works)")
    parser.add_argument("--parts", default="steps,build,validate", help="comma-separated subset to run")
    add_threads_arg(parser)
    args = parser.parse_args()
    start_cpu_benchmark(args, "trunk cache: tail steps on cached features vs recomputing the frozen trunk")
    torch.manual_seed(0)
    base = timm.create_model("inception_v3", pretrained=False, num_classes=4, aux_logits=not args.no_aux)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 4, (args.batch,), generator=gen)

    calibrate(base, args.size)
    parts = set(args.parts.split(","))
    variants, splits = {}, {}
    if "steps" in parts:
        full = copy.deepcopy(base)
        apply_unfreeze(full, blocks="all")
        full.train()
        variants["full network trains"] = step_timer(full, x, None, y, args.steps)
    for boundary, blocks in BOUNDARIES.items():
        model = copy.deepcopy(base)
        apply_unfreeze(model, blocks=blocks)
        model.train()
        set_frozen_bn_eval(model)
        assert frozen_boundary(model) == boundary, (frozen_boundary(model), boundary)
        splits[boundary] = split = TrunkSplit(model, boundary)
        if "steps" not in parts:
            continue
        with torch.no_grad():
            feats = split.prefix(x)
        feats.features = feats.features.half()
        feats.aux_input = None if feats.aux_input is None else feats.aux_input.half()
        variants[f"{boundary}: frozen trunk recomputed"] = step_timer(model, x, None, y, args.steps)
        variants[f"{boundary}: tail on cached features"] = step_timer(model, feats, split, y, args.steps)
    if variants:
        results = alternate(variants, args.rounds)
        print("\n== train step throughput (img/s, median of rounds)")
        for name, values in results.items():
            print(f"  {name:<40s} {median(values):8.2f} img/s  {spread(values)}")

    if "build" in parts:
        print(f"\n== cache build (build_entry): {args.n_build} images, prefix forward (batch {args.batch}) + fp16 "
              "memmap write + CRC32 + meta.json")
        images = RandomImages(args.n_build, args.size)
        with tempfile.TemporaryDirectory() as tmp:
            store = TrunkCacheStore(tmp)
            for boundary, split in splits.items():
                def build(out: Path, split: TrunkSplit = split) -> None:
                    build_entry(out, split, ViewDataset(images), "float16", args.batch)

                started = time.perf_counter()
                arrays, _ = store.get_or_build(f"build-{boundary}", boundary * 8, {}, build)
                took = time.perf_counter() - started
                mb = sum((arrays.path / f"{n}.npy").stat().st_size for n in arrays.meta["arrays"]) / 2**20
                print(f"  {boundary:<10s} {took:7.2f} s = {args.n_build / took:6.2f} img/s   entry {mb:7.1f} MiB "
                      f"({mb / args.n_build * args.n_validate:7.1f} MiB for {args.n_validate} images)")

    if "validate" not in parts:
        return
    print(f"\n== per-job overhead: a fresh store validates a {args.n_validate}-image entry (page cache warm)")
    with tempfile.TemporaryDirectory() as tmp:
        for boundary, split in splits.items():
            shapes = {"features": None, "aux_input": None}
            with torch.no_grad():
                feats = split.prefix(x[:1])
            shapes["features"] = feats.features.shape[1:]
            shapes["aux_input"] = None if feats.aux_input is None else feats.aux_input.shape[1:]

            def fake(out: Path, shapes: dict = shapes) -> None:
                for name, shape in shapes.items():
                    if shape is not None:
                        arr = np.lib.format.open_memmap(out / f"{name}.npy", "w+", "float16",
                                                        (1, args.n_validate, *shape))
                        arr[:] = 1.0
                        arr.flush()
                np.save(out / "labels.npy", np.zeros(args.n_validate, dtype=np.int64))

            key = boundary * 8
            path = TrunkCacheStore(tmp).get_or_build(boundary, key, {}, fake)[0].path
            times = []
            for _ in range(3):
                fresh = TrunkSplit(split.model, split.boundary)
                started = time.perf_counter()
                fresh.prefix_state_hash()
                hashed = time.perf_counter()
                assert TrunkCacheStore(tmp).load(path, key) is not None
                stats = time.perf_counter()
                assert TrunkCacheStore(tmp, full_check=True).load(path, key) is not None
                times.append((hashed - started, stats - hashed, time.perf_counter() - stats))
            mb = sum(f.stat().st_size for f in path.glob("*.npy")) / 2**20
            h, v, c = (median([t[i] for t in times]) for i in range(3))
            print(f"  {boundary:<10s} entry {mb:7.1f} MiB: prefix hash (once per job) {h:.3f} s; entry untouched "
                  f"since built (sizes + stamps) {v:.4f} s; full CRC32 check {c:.3f} s")


if __name__ == "__main__":
    main()

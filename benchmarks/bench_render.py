"""Render speed of real 12-lead signals on printout pages: pages/s on one core, per stage.

Stages, each timed on the same records in turn (round-robin, medians over rounds):

- `render`: `render_signals` (grid, header, 13 traces, footer, rotation) to a PIL page;
- `render + jpeg`: plus a JPEG encode/decode round trip at a random quality (the look of a scan);
- `pretrain item`: plus what the pretraining dataset does next, grid-box detection, ink, squash to the model
  input (default 128 x 256), i.e. one training item of `experiment=pretrain_ptbxl`.

Pages at the dev copy's size (`--scale 0.5`, 1106 x 786) and at a random scale in `--scale-range`. Signals
come from the PTB-XL subset when `--signals` points at its `signals.npy` (int16 microvolts, 250 Hz),
else from the beat model (500 Hz). The target is the synthetic generator's bar: >= 10 pages/s on one core.

    python benchmarks/bench_render.py --signals ../shared/data/ptbxl-subset/signals.npy
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
from _common import Check, add_json_arg, median, print_checks, save_json, spread, start_cpu_benchmark
from PIL import Image

from ecg_inception.data.pages import preprocess_page
from ecg_inception.synthetic.printout import render_signals
from ecg_inception.synthetic.waveforms import synthesize_ecg

TARGET_PAGES_S = 10.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--signals", default=None, help="signals.npy of the PTB-XL subset (default: beat model)")
    parser.add_argument("--pages", type=int, default=40, help="pages per stage and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=0.5, help="fixed page scale (0.5 = the dev copy's size)")
    parser.add_argument("--scale-range", type=float, nargs=2, default=(0.5, 1.5))
    parser.add_argument("--size", type=int, nargs=2, default=(128, 256), help="model input (height, width)")
    add_json_arg(parser)
    args = parser.parse_args(argv)
    args.threads = 1
    info = start_cpu_benchmark(args, "render real signals on printouts (one core)")
    torch.set_num_threads(1)

    rng = np.random.default_rng(0)
    if args.signals and Path(args.signals).is_file():
        data = np.load(args.signals, mmap_mode="r")
        records = [(np.asarray(data[i], np.float32) / 1000.0, 250.0) for i in range(args.pages)]
        source = f"PTB-XL subset ({args.signals}), 250 Hz"
    else:
        labels = ["normal", "myocardial_infarction", "history_of_mi", "abnormal_heartbeat"]
        records = [(synthesize_ecg(labels[i % 4], rng).signals, 500.0) for i in range(args.pages)]
        source = "beat model, 500 Hz"
    print(f"signals: {source}; {args.pages} pages per stage and round, {args.rounds} rounds")
    prep = {"size": list(args.size), "resize": "squash", "interpolation": "bicubic", "crop": True, "ink": True,
            "mean": [0.5] * 3, "std": [0.5] * 3}

    def page(i: int, scale: float, stage: str) -> None:
        look = np.random.default_rng([1, i])
        image = render_signals(records[i][0], records[i][1], look, scale).image
        if stage == "render":
            return
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(look.integers(60, 96)))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        if stage == "render + jpeg":
            return
        preprocess_page(image, prep)

    stages = ("render", "render + jpeg", "pretrain item")
    figures: dict[str, list[float]] = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up (fonts, grid caches)
        for stage in stages:
            for label, scale_of in ((f"scale {args.scale:g}", lambda i: args.scale),
                                    (f"scale U{tuple(args.scale_range)}",
                                     lambda i: float(np.random.default_rng([2, i]).uniform(*args.scale_range)))):
                start = time.perf_counter()
                for i in range(args.pages):
                    page(i, scale_of(i), stage)
                rate = args.pages / (time.perf_counter() - start)
                if round_:
                    figures.setdefault(f"{stage}, {label}", []).append(rate)
    checks = []
    for name, rates in figures.items():
        target = TARGET_PAGES_S if name.startswith("pretrain item") else None
        checks.append(Check(f"pages/s: {name}", median(rates), target, " /s", note=spread(rates)))
    print_checks(checks)
    save_json(args.json, "bench_render", info, args, figures, checks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cost of an explanation: one page end to end through `Predictor.explain` vs `Predictor.predict`, batch 1, CPU.

Both run on the same Predictor (same model, threads, decode, crop and preprocessing, no DataLoader workers), page
by page from image files, alternating predict / explain per page. Explain is one forward pass plus the backward
pass from the logits down to the Grad-CAM layer, then the map in page pixels and the lead shares. Writing the
overlay PNG (render over the full page + PNG encode) is timed separately, as the CLI's `--cam` adds it. Figures
are medians over all pages and rounds; the target is explain / predict <= 3.

Pages: by default synthetic printouts at the original scans' size (2213 x 1572, JPEG), or `--root` (the first
`--pages` images found there, e.g. the dev set's 1106 x 786 copies). Model: an untrained EcgClassifier with the
preprocessing of `experiment=scratch_cpu` (inception_v3, ink, 128 x 256, Grad-CAM at Mixed_6e 6 x 14), or
`--checkpoint`.

    python benchmarks/bench_explain.py --threads 1
    python benchmarks/bench_explain.py --root /work/shared/data/mendeley-ecg-dev --pages 8 --threads 1
    python benchmarks/bench_explain.py --size 299 299 --threads 2 --json explain.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    Check,
    add_json_arg,
    add_threads_arg,
    load_average,
    median,
    print_checks,
    save_json,
    spread,
    start_cpu_benchmark,
)
from PIL import Image

from ecg_inception.data.scan import is_image_candidate
from ecg_inception.inference.overlay import write_overlay
from ecg_inception.inference.predictor import Predictor

TARGET_RATIO = 3.0  # explain / predict per page, end to end


def build_predictor(args: argparse.Namespace) -> Predictor:
    """A batch-1, no-worker Predictor around a checkpoint or an untrained scratch_cpu-shaped classifier."""
    if args.checkpoint:
        return Predictor.from_checkpoint(args.checkpoint, device="cpu", batch_size=1, num_workers=0)
    from ecg_inception.data.scale import CANONICAL_PX_PER_MM
    from ecg_inception.data.transforms import PREPROCESS_VERSION, resolve_data_config
    from ecg_inception.models.module import EcgClassifier

    cfg = resolve_data_config("inception_v3", list(args.size))
    prep = {"model_name": "inception_v3", "size": list(args.size), "mean": list(cfg.mean), "std": list(cfg.std),
            "interpolation": cfg.interpolation, "resize": "squash", "crop": True, "ink": True,
            "version": PREPROCESS_VERSION, "px_per_mm": CANONICAL_PX_PER_MM}  # fmt: skip
    torch.manual_seed(0)
    model = EcgClassifier(pretrained=False, num_classes=4, aux_logits=False, preprocessing=prep).eval()
    predictor = Predictor(lambda x: model.calibrated_probabilities(model(x)), [str(i) for i in range(4)], prep,
                          device="cpu", batch_size=1, num_workers=0)  # fmt: skip
    predictor.model = model
    return predictor


def page_files(args: argparse.Namespace, tmp: Path) -> list[Path]:
    """The pages to time: files under --root, or synthetic full-size printouts written as JPEG."""
    if args.root:
        files = sorted(p for p in Path(args.root).rglob("*") if p.is_file() and is_image_candidate(p.name))
        return files[: args.pages]
    from ecg_inception.synthetic.printout import render_printout

    rng = np.random.default_rng(0)
    files = []
    for i in range(args.pages):
        path = tmp / f"page{i}.jpg"
        render_printout(("normal", "abnormal_heartbeat")[i % 2], rng, scale=1.0).save(path, quality=90)
        files.append(path)
    return files


def time_explain(predictor: Predictor, files: list[Path], rounds: int, tmp: Path) -> tuple[dict[str, list[float]], Any]:
    """Per page, alternating: `predict`, `explain` (batch 1, end to end from the file) and the overlay PNG apart.

    Returns:
        ({"predict", "explain", "overlay_png": seconds per page and round}, the last explanation record).
    """
    times: dict[str, list[float]] = {"predict": [], "explain": [], "overlay_png": []}
    with Image.open(files[0]) as first:
        print(f"pages   : {len(files)} x {rounds} rounds, first {first.width}x{first.height}; "
              f"model input {predictor.preprocessing['size']}")
    predictor.predict(files[:1]), predictor.explain(files[:1])  # warm-up (and the layer choice's trace)
    taken: set[str] = set()
    record = None
    for r in range(rounds):
        for path in files:
            start = time.perf_counter()
            predictor.predict([path])
            times["predict"].append(time.perf_counter() - start)
            start = time.perf_counter()
            (record,) = predictor.explain([path])
            times["explain"].append(time.perf_counter() - start)
            with Image.open(path) as page:
                page.load()
                start = time.perf_counter()
                write_overlay(record, page, tmp / "cams", taken)
                times["overlay_png"].append(time.perf_counter() - start)
        print(f"  round {r + 1}/{rounds} predict {median(times['predict'][-len(files):]) * 1e3:7.1f} ms  "
              f"explain {median(times['explain'][-len(files):]) * 1e3:7.1f} ms  "
              f"overlay png {median(times['overlay_png'][-len(files):]) * 1e3:7.1f} ms   (load {load_average()})",
              flush=True)
    return times, record


def explain_checks(times: dict[str, list[float]]) -> list[Check]:
    """The figures of `time_explain`: medians per page and the paired explain / predict ratio (target <= 3)."""
    ratios = [e / p for e, p in zip(times["explain"], times["predict"], strict=True)]
    ms = {k: median(v) * 1e3 for k, v in times.items()}
    return [
        Check("predict per page (ms)", ms["predict"], note=f"spread {spread([t * 1e3 for t in times['predict']])}"),
        Check("explain per page (ms)", ms["explain"], note=f"spread {spread([t * 1e3 for t in times['explain']])}"),
        Check("explain / predict", median(ratios), TARGET_RATIO, "x", higher_is_better=False,
              note=f"paired per page, spread {spread(ratios)}"),
        Check("overlay PNG per page (ms)", ms["overlay_png"], note="render over the page + PNG encode, apart"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help="time these image files instead of synthetic pages")
    parser.add_argument("--pages", type=int, default=6, help="pages per round (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the pages (default 3)")
    parser.add_argument("--size", type=int, nargs=2, default=[128, 256], metavar=("H", "W"),
                        help="model input size without --checkpoint (default 128 256, scratch_cpu's)")
    parser.add_argument("--checkpoint", default=None, help="time this checkpoint instead of an untrained model")
    add_threads_arg(parser)
    add_json_arg(parser)
    args = parser.parse_args()
    info = start_cpu_benchmark(args, "bench_explain: Predictor.explain vs predict per page, batch 1")
    predictor = build_predictor(args)
    with tempfile.TemporaryDirectory() as tmp_dir:
        files = page_files(args, Path(tmp_dir))
        times, record = time_explain(predictor, files, args.rounds, Path(tmp_dir))
    print(f"layer   : {record.cam_layer} {record.cam_size[0]}x{record.cam_size[1]}")
    checks = explain_checks(times)
    print_checks(checks)
    save_json(args.json, "bench_explain", info, args, {k: v for k, v in times.items()}, checks)


if __name__ == "__main__":
    main()

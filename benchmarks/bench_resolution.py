"""Resolution invariance: the same ECG at its original resolution and as its half-resolution dev twin.

`mendeley-ecg-fullres-sample` holds 32 dev ECGs as published (2213 x 1572); `mendeley-ecg-dev` holds each of
them under the same folder and file name, downscaled by 2 and re-encoded. Three subcommands:

- `inputs`: the preprocessed model inputs of every original and its twin: mean absolute difference (0-255)
  and the share of trace pixels that match (intersection over union of the pixels darker than 128), side by
  side for each preprocessing version in `--versions` (default: 2, the integer crop box, and 3, the crop
  registered to the border line).
- `leave-out`: a copy of the dev folder without the 32 ECGs, removed by content: the whole exact and
  near-duplicate group (the audit's split groups) of every twin goes, not only the file of that name.
- `score`: a checkpoint's predictions on the 32 originals and their 32 twins, with the checkpoint's own
  stored preprocessing: label agreement (same label for a page and its twin) and macro-F1 on each side.
- `rescale`: how a checkpoint's labels move when a page is rescaled before preprocessing (`--factors`; Lanczos
  down, bicubic up, as `data.page_augment` draws), for the 32 originals and the 32 twins apart: per factor the
  accuracy and how many labels stay those of the page as it is. Preprocessing resamples every page to the
  same pixels per mm, so a model that only saw the scan's own pixels should not care; when the twins' labels
  move and the originals' do not, a rescaled half-resolution page is not a look the model knows.

    python benchmarks/bench_resolution.py inputs
    python benchmarks/bench_resolution.py leave-out --out /tmp/dev-minus32
    python benchmarks/bench_resolution.py score --ckpt logs/train/runs/<run>/checkpoints/best.ckpt
    python benchmarks/bench_resolution.py rescale --ckpt logs/train/runs/<run>/checkpoints/best.ckpt

Nothing here is timed, and nothing is asserted: tests/test_scale_invariance.py holds the bounds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import Check, add_json_arg, print_checks, print_table, save_json, start_cpu_benchmark

from ecg_inception.data.labels import label_for_folder
from ecg_inception.data.page_augment import rescale_page
from ecg_inception.data.pages import preprocess_page
from ecg_inception.data.scan import open_rgb
from ecg_inception.data.transforms import SUPPORTED_PREPROCESS_VERSIONS

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TRACE_LEVEL = 128  # a pixel darker than this in the ink input counts as trace


def pairs(fullres: Path, dev: Path) -> list[tuple[Path, Path]]:
    """(original, half-resolution twin) for every image under `fullres` whose twin exists under `dev`."""
    out = []
    for original in sorted(p for p in fullres.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"}):
        twin = dev / original.relative_to(fullres)
        if twin.is_file():
            out.append((original, twin))
    if not out:
        raise SystemExit(f"no original under {fullres} has a twin under {dev}")
    return out


def model_input(path: Path, prep: dict[str, Any]) -> torch.Tensor:
    """uint8 [3, H, W] input of one file with the given preprocessing record (the checkpoint's keys)."""
    return preprocess_page(open_rgb(path), prep)[0]


def input_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean absolute difference 0-255, trace IoU) of two uint8 inputs of the same shape."""
    x, y = a.float(), b.float()
    mad = float((x - y).abs().mean())
    ta, tb = x[0] < TRACE_LEVEL, y[0] < TRACE_LEVEL
    union = int((ta | tb).sum())
    return mad, (int((ta & tb).sum()) / union if union else 1.0)


def cmd_inputs(args: argparse.Namespace) -> tuple[dict[str, Any], list[Check]]:
    items = pairs(args.fullres, args.dev)[: args.limit]
    rows: list[list[str]] = [[str(o.relative_to(args.fullres))] for o, _ in items]
    figures: dict[str, Any] = {}
    checks: list[Check] = []
    for version in args.versions:
        prep = {"size": args.size, "ink": not args.rgb, "crop": True, "resize": "squash",
                "interpolation": "bicubic", "version": version}  # fmt: skip
        mads, ious = [], []
        for row, (original, twin) in zip(rows, items, strict=True):
            mad, iou = input_agreement(model_input(original, prep), model_input(twin, prep))
            mads.append(mad)
            ious.append(iou)
            row += [f"{mad:.2f}", f"{iou:.3f}"]
        figures[f"v{version}"] = {"mad": mads, "trace_iou": ious}
        checks += [
            Check(f"v{version} mean abs diff, mean", float(np.mean(mads)), None),
            Check(f"v{version} mean abs diff, worst", float(np.max(mads)), None),
            Check(f"v{version} trace IoU, mean", float(np.mean(ious)), None),
            Check(f"v{version} trace IoU, worst", float(np.min(ious)), None),
        ]
    header = ["file"] + [f"v{v} {what}" for v in args.versions for what in ("mean abs diff", "trace IoU")]
    print_table([tuple(r) for r in rows], tuple(header))
    return figures, checks


def cmd_leave_out(args: argparse.Namespace) -> tuple[dict[str, Any], list[Check]]:
    from ecg_inception.data.audit import audit_folder

    report = audit_folder(args.dev)
    groups = report.group_ids()
    twins = [twin.relative_to(args.dev).as_posix() for _, twin in pairs(args.fullres, args.dev)]
    gone = {groups[t] for t in twins}
    removed = sorted(p for p, g in groups.items() if g in gone)
    kept = [p for p, g in groups.items() if g not in gone]
    out: Path = args.out
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new folder")
    for rel in kept:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(args.dev / rel, out / rel)
    (out.parent / f"{out.name}.removed.json").write_text(json.dumps({"twins": twins, "removed": removed}, indent=1))
    print(f"{len(twins)} twins -> {len(gone)} groups -> {len(removed)} files removed; {len(kept)} files copied to {out}")
    figures = {"twins": len(twins), "groups": len(gone), "removed": len(removed), "kept": len(kept)}
    return figures, [Check(k, float(v), None) for k, v in figures.items()]


def checkpoint_and_pairs(args: argparse.Namespace) -> tuple[Any, list[str], list[tuple[Path, Path]], torch.Tensor]:
    """(Predictor of `--ckpt`, its labels, the first `--limit` pairs, their true label indices)."""
    from ecg_inception.inference import Predictor

    # The Predictor: the checkpoint's own preprocessing through the one code path training used.
    predictor = Predictor.from_checkpoint(args.ckpt, device="cpu", num_workers=0)
    labels = list(predictor.labels)
    items = pairs(args.fullres, args.dev)[: args.limit]
    target = torch.tensor([labels.index(label_for_folder(o.parent.name)) for o, _ in items])
    return predictor, labels, items, target


def cmd_score(args: argparse.Namespace) -> tuple[dict[str, Any], list[Check]]:
    from ecg_inception.models.metrics import report_from_predictions

    predictor, labels, items, target = checkpoint_and_pairs(args)
    probs: dict[str, torch.Tensor] = {}
    for side, paths in (("original", [o for o, _ in items]), ("twin", [t for _, t in items])):
        records = predictor.predict(paths)
        failed = [r.path for r in records if r.error]
        if failed:
            raise SystemExit(f"could not read {failed}")
        probs[side] = torch.tensor([[r.probabilities[label] for label in labels] for r in records])
    pred = {k: v.argmax(-1) for k, v in probs.items()}
    agree = int((pred["original"] == pred["twin"]).sum())
    reports = {k: report_from_predictions(v, target, labels) for k, v in probs.items()}
    rows = [(str(o.relative_to(args.fullres)), labels[int(t)], labels[int(a)], labels[int(b)])
            for (o, _), t, a, b in zip(items, target, pred["original"], pred["twin"], strict=True)]  # fmt: skip
    print_table(rows, ("file", "true", "original", "twin"))
    f1o, f1t = reports["original"]["f1_macro"], reports["twin"]["f1_macro"]
    n = len(items)
    checks = [
        Check(f"label agreement (of {n})", float(agree), float(n - 1)),
        Check("macro-F1, originals", f1o, None),
        Check("macro-F1, twins", f1t, None),
        Check("|F1 originals - F1 twins|", abs(f1o - f1t), 0.05, higher_is_better=False),
        Check("accuracy, originals", reports["original"]["accuracy"], None),
        Check("accuracy, twins", reports["twin"]["accuracy"], None),
    ]
    figures = {"checkpoint": str(args.ckpt), "agreement": agree, "n": n, "reports": reports,
               "predictions": [list(r) for r in rows]}  # fmt: skip
    return figures, checks


def cmd_rescale(args: argparse.Namespace) -> tuple[dict[str, Any], list[Check]]:
    predictor, _, items, target = checkpoint_and_pairs(args)
    factors = [1.0, *[f for f in args.factors if f != 1.0]]
    figures: dict[str, Any] = {"checkpoint": str(args.ckpt), "n": len(items), "factors": factors}
    rows, checks = [], []
    for side, index in (("original", 0), ("twin", 1)):
        views = []
        for pair in items:
            page = open_rgb(pair[index])
            views.append(torch.stack([preprocess_page(rescale_page(page, f), predictor.preprocessing)[0]
                                      for f in factors]))
        batch = torch.stack(views)  # [N, F, 3, H, W]
        n, k = batch.shape[:2]
        pred = predictor.probabilities(batch.flatten(0, 1)).view(n, k, -1).argmax(-1)
        acc = [(pred[:, j] == target).float().mean().item() for j in range(k)]
        kept = [int((pred[:, j] == pred[:, 0]).sum()) for j in range(k)]
        figures[side] = {"accuracy": acc, "same_label_as_unscaled": kept}
        rows += [(side, f"{f:g}", f"{a:.3f}", f"{c} / {n}") for f, a, c in zip(factors, acc, kept, strict=True)]
        checks.append(Check(f"{side}s: labels kept over all rescales (of {n * (k - 1)})", float(sum(kept[1:]))))
    print_table(rows, ("pages", "factor", "accuracy", "same label as unscaled"))
    return figures, checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("inputs", "leave-out", "score", "rescale"))
    parser.add_argument("--fullres", type=Path, default=DATA / "mendeley-ecg-fullres-sample")
    parser.add_argument("--dev", type=Path, default=DATA / "mendeley-ecg-dev")
    parser.add_argument("--size", type=int, nargs=2, default=[128, 256], help="inputs: height width")
    parser.add_argument("--rgb", action="store_true", help="inputs: without the ink step")
    parser.add_argument("--versions", type=int, nargs="+", default=list(SUPPORTED_PREPROCESS_VERSIONS),
                        help="inputs: preprocessing versions to compare")
    parser.add_argument("--out", type=Path, help="leave-out: the new folder")
    parser.add_argument("--ckpt", type=Path, help="score, rescale: an ecg_inception checkpoint")
    parser.add_argument("--limit", type=int, default=None, help="inputs, score, rescale: only the first N pairs")
    parser.add_argument("--factors", type=float, nargs="+", default=[0.7, 0.85, 1.2, 1.4],
                        help="rescale: page scale factors besides 1")
    add_json_arg(parser)
    args = parser.parse_args(argv)
    args.fullres, args.dev = args.fullres.resolve(), args.dev.resolve()
    if args.command == "leave-out" and args.out is None:
        parser.error("leave-out needs --out")
    if args.command in ("score", "rescale") and args.ckpt is None:
        parser.error(f"{args.command} needs --ckpt")
    torch.set_num_threads(1)
    info = start_cpu_benchmark(argparse.Namespace(threads=1), f"resolution invariance: {args.command}")
    command = {"inputs": cmd_inputs, "leave-out": cmd_leave_out, "score": cmd_score,
               "rescale": cmd_rescale}[args.command]
    figures, checks = command(args)
    print_checks(checks)
    save_json(args.json, f"resolution-{args.command}", info, args, figures, checks)
    return 0


if __name__ == "__main__":
    sys.exit(main())

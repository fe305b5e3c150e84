"""`ecg-inception-predict CKPT INPUT... [--out preds.csv|preds.json]`: classify printouts with a trained model.

CKPT is a checkpoint from `ecg-inception-train`, or a model from `ecg-inception-export` (`.onnx` / `.pt2` with
its sidecar); `--member CKPT` (repeatable) averages further checkpoints' probabilities with it (a seed ensemble,
`inference.ensemble`). Every file named explicitly gets a row; folders are walked with the scan's image filter. An
unreadable file gets a row with its error and the others are still predicted; the exit status is 1 when any
file failed (2 when the model cannot be loaded). A summary goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ecg_inception.inference.predictor import Predictor

PROGRESS_MIN_ITEMS = 32  # a progress bar on stderr from this many inputs on (when stderr is a terminal)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so docs and tests can inspect it)."""
    from ecg_inception.inference.records import DEFAULT_LOW_CONFIDENCE

    parser = argparse.ArgumentParser(
        prog="ecg-inception-predict",
        description="Classify ECG printout images with a trained checkpoint or an exported model.",
    )
    parser.add_argument("model", help="checkpoint (.ckpt) or exported model (.onnx / .pt2 with its .json sidecar)")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders (walked recursively)")
    parser.add_argument("--member", action="append", default=[], metavar="CKPT",
                        help="average this checkpoint's probabilities with the model's (repeat for more; same "
                             "labels and preprocessing; checkpoints only): a seed ensemble")
    parser.add_argument("--out", default=None,
                        help="write the records here: .json (records + summary) or CSV (any other name); "
                             "default: CSV on stdout")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="processes that decode and preprocess while the model runs (default: none on the "
                             "CPU, where --prep-threads preprocess each batch; by CPUs on a GPU)")
    parser.add_argument("--prep-threads", type=int, default=None,
                        help="with --num-workers 0: threads that preprocess each batch (default: the CPUs)")
    parser.add_argument("--low-confidence", type=float, default=DEFAULT_LOW_CONFIDENCE,
                        help="flag a record whose top probability is below this")
    parser.add_argument("--tta", action="store_true",
                        help="average over whole-pixel shifted views (centre view unchanged; no flips)")
    parser.add_argument("--cam", metavar="DIR", default=None,
                        help="also explain (checkpoints only): a Grad-CAM overlay PNG per input in DIR and "
                             "share_<lead> columns (docs/explain.md); no TTA")
    parser.add_argument("--cam-method", choices=("gradcam", "gradcam++"), default="gradcam")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help=f"progress bar on stderr (default: from {PROGRESS_MIN_ITEMS} inputs on a terminal)")
    return parser


def load_predictor(args: argparse.Namespace) -> Predictor:
    """A Predictor for a checkpoint or an exported model, as the arguments say."""
    from ecg_inception.inference.export import load_exported
    from ecg_inception.inference.predictor import Predictor as _Predictor

    kwargs = dict(device=args.device, batch_size=args.batch_size, num_workers=args.num_workers,
                  low_confidence=args.low_confidence, tta=args.tta, prep_threads=args.prep_threads)
    exported = [m for m in (args.model, *args.member) if Path(m).suffix.lower() in (".onnx", ".pt2")]
    if args.member:
        if exported:
            raise ValueError(f"--member averages checkpoints; {exported[0]} is an exported model")
        return _Predictor.from_checkpoints([args.model, *args.member], **kwargs)
    if exported:
        return load_exported(args.model, **kwargs)
    return _Predictor.from_checkpoint(args.model, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """Predict every input, write the records, print the summary; returns the exit code."""
    from ecg_inception.errors import EcgInceptionError
    from ecg_inception.inference.inputs import expand_inputs
    from ecg_inception.inference.records import summarize, to_csv, write_records

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0.0 <= args.low_confidence <= 1.0:
        parser.error(f"--low-confidence must lie in [0, 1], got {args.low_confidence}")
    try:
        predictor = load_predictor(args)
    except (EcgInceptionError, FileNotFoundError, ValueError) as err:
        print(f"ecg-inception-predict: error: {err}", file=sys.stderr)
        return 2
    expanded = expand_inputs(args.inputs)
    if args.cam and predictor.ensemble is not None:
        print(f"ecg-inception-predict: error: --cam explains one checkpoint, not an ensemble of "
              f"{len(predictor.ensemble.members)}: drop --member", file=sys.stderr)  # fmt: skip
        return 2
    if args.cam and predictor.model is None:
        print(f"ecg-inception-predict: error: --cam needs a checkpoint, not an exported model ({args.model})",
              file=sys.stderr)
        return 2
    if args.cam:
        from ecg_inception.cli.explain import explained_records

        stream = explained_records(predictor, expanded, args.cam, args.cam_method)
    else:
        stream = predictor.iter_predict(expanded)
    show = args.progress if args.progress is not None else (
        len(expanded.items) >= PROGRESS_MIN_ITEMS and sys.stderr.isatty())
    records = []
    if show:
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("predicting", total=len(expanded.items))
            for record in stream:
                records.append(record)
                bar.advance(task)
    else:
        records = list(stream)
    summary = summarize(records, skipped=len(expanded.skipped))
    if args.out:
        try:
            write_records(args.out, records, predictor.labels, summary)
        except OSError as err:
            print(f"ecg-inception-predict: error: cannot write {args.out}: {err.strerror or err}", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(to_csv(records, predictor.labels))
    for r in records:
        if r.error:
            print(f"failed: {r.path}: {r.error}", file=sys.stderr)
    print(f"predicted {summary['ok']} ok, {summary['failed']} failed, {summary['crop_fallback']} with crop "
          f"fallback (no ECG grid found), {summary['low_confidence']} low confidence "
          f"(< {predictor.low_confidence:g}); {summary['skipped']} folder entries skipped (not images)"
          + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

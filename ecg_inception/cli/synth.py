"""`ecg-inception-synth`: write a synthetic printout dataset in the Mendeley folder layout."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence

from ecg_inception.data.labels import CANONICAL_LABELS, MENDELEY_FOLDERS


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so docs and tests can inspect it)."""
    parser = argparse.ArgumentParser(
        prog="ecg-inception-synth",
        description="Render synthetic 12-lead ECG printouts into Mendeley-named class folders.",
    )
    parser.add_argument("out", help="output directory (created; its class folders must be empty)")
    parser.add_argument("--per-class", type=int, required=True, help="original images per class")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical files)")
    parser.add_argument("--duplicates", type=int, default=0, help="byte-identical copies planted per class")
    parser.add_argument("--scale", type=float, default=1.0, help="page scale; 1.0 = 2213x1572 at 200 dpi")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (1-95)")
    parser.add_argument(
        "--labels",
        nargs="+",
        choices=CANONICAL_LABELS,
        default=None,
        help="classes to write (default: all four)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the generator and print what it wrote; returns the process exit code."""
    from ecg_inception.synthetic.generate import generate_dataset

    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        paths = generate_dataset(
            args.out,
            per_class=args.per_class,
            seed=args.seed,
            duplicates=args.duplicates,
            scale=args.scale,
            labels=args.labels,
            quality=args.quality,
        )
    except (ValueError, FileExistsError) as err:
        print(f"ecg-inception-synth: error: {err}", file=sys.stderr)
        return 2
    elapsed = max(time.perf_counter() - start, 1e-9)
    counts = Counter(path.parent.name for path in paths)
    print(f"wrote {len(paths)} images to {args.out}")
    for label in args.labels or CANONICAL_LABELS:
        folder = MENDELEY_FOLDERS[label]
        print(f"  {counts[folder]:6d}  {folder}")
    rendered = len(paths) - args.duplicates * len(counts)
    print(f"{rendered} rendered in {elapsed:.1f} s ({rendered / elapsed:.1f} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`ecg-inception-export CKPT --format onnx|torch-export --out PATH`: an exported model plus its JSON sidecar."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PARITY_BOUND = 1e-4  # max absolute probability difference to eager PyTorch that the export must meet


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so docs and tests can inspect it)."""
    parser = argparse.ArgumentParser(
        prog="ecg-inception-export",
        description="Export a checkpoint: normalised batch (dynamic size) -> probabilities (temperature applied), "
                    "with PATH.json holding labels and preprocessing.",
    )
    parser.add_argument("checkpoint", help="a checkpoint from ecg-inception-train")
    parser.add_argument("--format", choices=("onnx", "torch-export"), default=None,
                        help="default: from the suffix of --out (.onnx, .pt2)")
    parser.add_argument("--out", required=True, help="the model file to write (.onnx or .pt2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Export, check parity on a random batch, print where it went; returns the exit code."""
    from ecg_inception.errors import EcgInceptionError
    from ecg_inception.inference.export import export_model

    args = build_parser().parse_args(argv)
    try:
        result = export_model(args.checkpoint, args.out, args.format)
    except (EcgInceptionError, ValueError, OSError) as err:
        print(f"ecg-inception-export: error: {err}", file=sys.stderr)
        return 2
    ok = result.max_abs_diff < PARITY_BOUND
    print(f"wrote {result.path} and {result.sidecar}; max |p - p_eager| on a random batch of 3: "
          f"{result.max_abs_diff:.2e} ({'ok' if ok else f'ABOVE {PARITY_BOUND:g}'})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

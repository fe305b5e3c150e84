"""`ecg-inception-split`: audit a folder, split it by a protocol and write the manifest CSV."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ecg_inception.data.manifest import SPLITS, Manifest
from ecg_inception.data.protocols import BALANCE_STAGES, BALANCES, PROTOCOLS
from ecg_inception.data.split import make_split
from ecg_inception.errors import EcgInceptionError

UNREADABLE_SHOWN = 10  # unreadable files named on the console (all are in the sidecar)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; defaults follow `make_split`."""
    p = argparse.ArgumentParser(
        prog="ecg-inception-split",
        description="Split an ECG image folder into train/val/test and write the split manifest.",
    )
    p.add_argument("root", help="dataset root holding one folder per class")
    p.add_argument(
        "--out", default="splits.csv", help="manifest path (a <stem>.excluded.csv sidecar goes next to it)"
    )
    p.add_argument(
        "--protocol", choices=PROTOCOLS, default="leakfree", help="leakfree (default) or paper (leaky)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fractions", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST")
    )
    p.add_argument("--balance", choices=BALANCES, default=None, help="default: the protocol's")
    p.add_argument("--balance-stage", choices=BALANCE_STAGES, default=None, help="default: the protocol's")
    p.add_argument(
        "--no-near-duplicates",
        action="store_true",
        help="group byte-identical copies only (skip perceptual hashing)",
    )
    return p


def summary(manifest: Manifest) -> list[str]:
    """Human-readable lines: files per split and label, exclusions, and the leak warning if any."""
    counts = manifest.counts()
    width = max(len(label) for label in manifest.labels + ["label"])
    lines = [
        f"protocol {manifest.protocol}, seed {manifest.seed}, balance {manifest.balance} ({manifest.balance_stage})"
    ]
    lines.append(f"{'label':<{width}} " + " ".join(f"{s:>6}" for s in SPLITS))
    for label in manifest.labels:
        lines.append(f"{label:<{width}} " + " ".join(f"{counts[s][label]:>6}" for s in SPLITS))
    lines.append(f"{'total':<{width}} " + " ".join(f"{sum(counts[s].values()):>6}" for s in SPLITS))
    lines.append(f"excluded: {len(manifest.excluded)} files (see the .excluded.csv sidecar for reasons)")
    unreadable = [(p, why) for p, why in manifest.excluded if why.startswith("unreadable")]
    lines += [f"  {path}: {why}" for path, why in unreadable[:UNREADABLE_SHOWN]]
    if len(unreadable) > UNREADABLE_SHOWN:
        lines.append(f"  ... and {len(unreadable) - UNREADABLE_SHOWN} more unreadable files")
    if manifest.balance == "class_weights":
        weights = ", ".join(f"{w:.3f}" for w in manifest.class_weights())
        lines.append(f"class weights (train inverse frequency, mean 1): {weights}")
    if manifest.leaky:
        lines.append(
            f"WARNING: leaky split: copies of one ECG sit in more than one split "
            f"({len(manifest.crossing_groups())} duplicate groups cross splits); "
            "test scores will overstate accuracy on unseen ECGs"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (2 on a dataset or manifest error)."""
    args = build_parser().parse_args(argv)
    from ecg_inception.data.audit import audit_folder

    try:
        report = audit_folder(args.root, near_duplicates=not args.no_near_duplicates)
        manifest = make_split(
            report, args.protocol, args.seed, args.fractions, args.balance, args.balance_stage
        )
        path = manifest.write_csv(args.out)
    except (EcgInceptionError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in summary(manifest):
        print(line, file=sys.stderr if line.startswith("WARNING") else sys.stdout)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

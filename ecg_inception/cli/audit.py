"""`ecg-inception-audit`: account for every file of an image folder; duplicates, conflicts, crop boxes."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so docs and tests can inspect it)."""
    parser = argparse.ArgumentParser(
        prog="ecg-inception-audit",
        description=(
            "Audit a class-folder image dataset: readable/unreadable/ignored files, exact and near "
            "duplicates, label conflicts and the ECG grid crop box of every image."
        ),
    )
    parser.add_argument("root", help="dataset root: one sub-folder per class")
    parser.add_argument("--json", metavar="OUT", default=None, help="write the full report as JSON here")
    parser.add_argument(
        "--no-near-duplicates",
        action="store_true",
        help="skip the perceptual-hash search for re-encoded/rescaled copies",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: by image count and CPUs)"
    )
    parser.add_argument("--progress", action="store_true", help="print decoding progress to stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the audit, print the per-class table and totals, write the JSON; returns the exit code."""
    from ecg_inception.data.audit import audit_folder, format_table, write_json_atomic
    from ecg_inception.errors import DatasetError

    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        report = audit_folder(
            args.root,
            near_duplicates=not args.no_near_duplicates,
            progress=args.progress,
            workers=args.workers,
        )
    except DatasetError as err:
        print(f"ecg-inception-audit: error: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start

    scan = report.scan
    print(f"audited {scan.root} in {elapsed:.1f} s")
    print(format_table(report.per_class_table()))
    dup = report.duplicate_groups()
    extra = sum(len(g) - 1 for g in dup)
    print(f"exact duplicate groups: {len(dup)} ({extra} redundant copies)")
    if report.near_threshold is None:
        print("near duplicates: not searched")
    else:
        merged = sum(len(g) for g in report.near_groups)
        print(
            f"near-duplicate groups: {len(report.near_groups)} ({merged} distinct images, "
            f"threshold {report.near_threshold} bits of 1024)"
        )
    print(f"splitting groups: {len(set(report.group_ids().values()))}")
    for path, reason in scan.unreadable.items():
        print(f"unreadable: {path}: {reason}")
    for group in report.conflicts:
        print(f"label conflict: {', '.join(group)}")
    if scan.symlinks:
        print(f"symbolic links followed: {len(scan.symlinks)}")

    if args.json:
        out = Path(args.json)
        try:
            write_json_atomic(out, report.to_json())
        except OSError as err:
            print(f"ecg-inception-audit: error: cannot write {out}: {err.strerror or err}", file=sys.stderr)
            return 2
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`ecg-inception-explain CKPT FOLDER --out DIR`: Grad-CAM lead shares over a folder, averaged per class.

Every page of FOLDER (walked as `ecg-inception-predict` walks folders) is predicted and explained
(`Predictor.explain`). DIR receives `explanations.csv` (predict's columns plus `share_<lead>`),
`lead_shares_by_class.png` (leads on the x axis, one panel per class: the class's mean share per lead),
`summary.json` (the means, page counts, grouping, Grad-CAM layer and map size) and, with `--overlays`, one overlay
PNG per page under `overlays/`. A page whose map has no positive mass on any lead is left out of its class's
mean and counted under `empty_maps`. Pages are grouped by their true class (the class folder a page sits in, named
as the training folders are) when every page sits in a folder of one of the checkpoint's labels, else by the
predicted class (`--by` chooses). Exit status 1 when any page failed, 2 when the checkpoint cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ecg_inception.inference.explain import Explanation
    from ecg_inception.inference.inputs import ExpandedInputs
    from ecg_inception.inference.predictor import Predictor


def explained_records(predictor: Predictor, expanded: ExpandedInputs, overlay_dir: str | Path | None,
                      method: str = "gradcam") -> Iterator[Explanation]:
    """Explain `expanded` with the predictor's checkpoint model; write an overlay PNG per page into `overlay_dir`.

    Raises:
        ValueError: The predictor runs an exported model.
    """
    from ecg_inception.inference.explain import iter_explain
    from ecg_inception.inference.overlay import write_overlay

    if predictor.model is None:
        raise ValueError(f"{predictor.source}: explaining needs the checkpoint's model, not an exported one")
    taken: set[str] = set()
    for record, page in iter_explain(
        predictor.model, predictor.preprocessing, expanded, labels=predictor.labels, method=method,
        batch_size=predictor.batch_size, probabilities=predictor.model.calibrated_probabilities,
        low_confidence=predictor.low_confidence,
    ):  # fmt: skip
        if overlay_dir is not None and page is not None:
            write_overlay(record, page, overlay_dir, taken, method)
        yield record


def true_label(path: str, folder: Path, labels: Sequence[str]) -> str | None:
    """The checkpoint label of the class folder (directly under `folder`) holding `path`, or None."""
    import os

    from ecg_inception.data.labels import label_for_folder

    try:  # absolute, not resolved: a folder of symbolic links to the files keeps its class folders
        rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(folder))
    except ValueError:
        return None
    if len(rel.parts) < 2:
        return None
    label = label_for_folder(rel.parts[0])
    return label if label in labels else None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    parser = argparse.ArgumentParser(prog="ecg-inception-explain", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint (.ckpt) from ecg-inception-train")
    parser.add_argument("folder", type=Path, help="a folder of printouts (class sub-folders give the true class)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the CSV, chart, summary and overlays")
    parser.add_argument("--by", choices=("auto", "true", "predicted"), default="auto",
                        help="group pages by true class (their class folder) or by predicted class")
    parser.add_argument("--method", choices=("gradcam", "gradcam++"), default="gradcam")
    parser.add_argument("--overlays", action="store_true", help="also write one overlay PNG per page")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Explain a folder, write the per-class chart, the CSV and the summary; returns the exit code."""
    from ecg_inception.errors import EcgInceptionError
    from ecg_inception.inference.inputs import expand_inputs
    from ecg_inception.inference.leads import mean_shares, uniform_shares
    from ecg_inception.inference.overlay import lead_share_chart
    from ecg_inception.inference.predictor import Predictor
    from ecg_inception.inference.records import summarize, write_records

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"not a folder: {args.folder}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch_size)
    except (EcgInceptionError, FileNotFoundError, ValueError) as err:
        print(f"ecg-inception-explain: error: {err}", file=sys.stderr)
        return 2
    expanded = expand_inputs([args.folder])
    overlays = args.out / "overlays" if args.overlays else None
    records = list(explained_records(predictor, expanded, overlays, args.method))
    ok = [r for r in records if r.error is None]
    truth = {r.path: true_label(r.path, args.folder, predictor.labels) for r in ok}
    by = args.by
    if by == "auto":
        by = "true" if ok and all(truth.values()) else "predicted"
    groups: dict[str, list[dict[str, float]]] = {label: [] for label in predictor.labels}
    empty: dict[str, int] = {label: 0 for label in predictor.labels}
    for r in ok:
        key = truth[r.path] if by == "true" else r.label
        if key is None:
            continue
        if sum(r.lead_shares.values()) > 0:
            groups[key].append(r.lead_shares)
        else:  # no positive map on any lead (the gradient pointed away everywhere): no shares to average
            empty[key] += 1
    groups = {k: v for k, v in groups.items() if v}
    summary = summarize(records, skipped=len(expanded.skipped))
    args.out.mkdir(parents=True, exist_ok=True)
    write_records(args.out / "explanations.csv", records, predictor.labels, summary)
    means = {k: mean_shares(v) for k, v in groups.items()}
    payload = {
        "checkpoint": str(args.checkpoint), "folder": str(args.folder), "grouped_by": by, "method": args.method,
        "cam_layer": ok[0].cam_layer if ok else None, "cam_size": list(ok[0].cam_size) if ok else None,
        "counts": {k: len(v) for k, v in groups.items()}, "empty_maps": {k: n for k, n in empty.items() if n},
        "mean_lead_shares": means,
        "flat_map_shares": uniform_shares(), "summary": summary,
    }  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if means:
        lead_share_chart(means, payload["counts"], args.out / "lead_shares_by_class.png",
                         title=f"Mean Grad-CAM share per lead, by {by} class")  # fmt: skip
    for r in records:
        if r.error:
            print(f"failed: {r.path}: {r.error}", file=sys.stderr)
    print(f"explained {summary['ok']} ok, {summary['failed']} failed; grouped by {by} class "
          f"({', '.join(f'{k} {len(v)}' for k, v in groups.items())}; {sum(empty.values())} with an empty map); "
          f"wrote {args.out}", file=sys.stderr)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Score a checkpoint on a whole labelled folder: every readable file in the test role, and an honest count of the
files whose bytes also sit in the training split of the checkpoint's run."""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ecg_inception.data.audit import AuditReport
from ecg_inception.data.manifest import Manifest, ManifestRow
from ecg_inception.data.scan import list_folder
from ecg_inception.errors import DatasetError, ManifestError

log = logging.getLogger(__name__)


def whole_folder_manifest(report: AuditReport, protocol: str, labels: Sequence[str]) -> Manifest:
    """Every readable file of the audited folder in the test split, with its crop box and splitting group.

    `labels` (the checkpoint's, in its class-index order) must be exactly the folder's classes: a model can only be
    scored on the classes it predicts, and a class index must mean the same class for the model and the data.

    Args:
        report: the audit of the folder.
        protocol: the run's protocol (recorded in the manifest; it selects the crop default).
        labels: the checkpoint's labels in class-index order.

    Returns:
        A manifest with no train and no val rows; the unreadable files are listed as excluded.

    Raises:
        DatasetError: when the folder's classes differ from `labels`, or it has no readable image.
    """
    check_folder_classes(report.scan.root, report.scan.labels, labels)
    if not report.scan.images:
        raise DatasetError(f"{report.scan.root}: no readable image to evaluate")
    group_of = report.group_ids()
    rows = []
    for image in report.scan.images:
        box = report.crops.get(image.rel_path)
        rows.append(ManifestRow(
            path=image.rel_path, label=image.label, group=group_of.get(image.rel_path, image.rel_path), split="test",
            sha256=image.sha256, crop_left=None if box is None else box.left, crop_top=None if box is None else box.top,
            crop_right=None if box is None else box.right, crop_bottom=None if box is None else box.bottom,
            crop_fallback=bool(box is not None and box.fallback),
        ))  # fmt: skip
    excluded = [(p, f"unreadable: {why}") for p, why in sorted(report.scan.unreadable.items())]
    return Manifest(rows=rows, labels=list(labels), protocol=protocol, seed=None, excluded=excluded)


def check_folder_classes(root: str | Path, found: Iterable[str], labels: Sequence[str]) -> None:
    """Refuse a folder whose class folders are not exactly the checkpoint's labels.

    Raises:
        DatasetError: naming the classes the checkpoint does not know and those the folder lacks.
    """
    found = list(found)
    extra = [label for label in found if label not in labels]
    missing = [label for label in labels if label not in found]
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"class folders the checkpoint was not trained on: {extra}")
        if missing:
            parts.append(f"no folder for the checkpoint's classes {missing}")
        raise DatasetError(
            f"{root}: {'; '.join(parts)}. The checkpoint predicts {list(labels)}; evaluate a folder with exactly "
            "these classes"
        )


def write_whole_folder_manifest(root: str | Path, protocol: str, labels: Sequence[str], out: str | Path) -> Path:
    """Audit `root` and write the manifest of `whole_folder_manifest` to `out`; returns its path.

    Raises:
        DatasetError: see `whole_folder_manifest` (and an unusable folder).
    """
    from ecg_inception.data.audit import audit_folder

    return whole_folder_manifest(audit_folder(root), protocol, labels).write_csv(out)


def check_folder(root: str | Path, labels: Sequence[str], manifest: Manifest) -> None:
    """A folder given for evaluation with the run's manifest: refuse other classes, warn about unlisted files.

    Raises:
        DatasetError: when the folder's class folders are not exactly `labels`.
    """
    listing = list_folder(root)
    check_folder_classes(root, list(listing.folders), labels)
    listed = {r.path for r in manifest.rows} | {p for p, _ in manifest.excluded}
    outside = [rel for rel, _, _ in listing.candidates if rel not in listed]
    if outside:
        log.warning(
            "%s: %d files under this folder are not in the split manifest and are not scored (first: %s); "
            "to score every file of a folder, use eval_all=true", root, len(outside), outside[0],
        )  # fmt: skip


def training_copies(sha256s: Iterable[str], run_manifest: str | Path | None) -> dict[str, Any]:
    """How many of the evaluated files are byte copies of a file in the run's training split.

    Args:
        sha256s: the content hashes of the evaluated files.
        run_manifest: the splits.csv of the checkpoint's run, or None when it is not known.

    Returns:
        {"files": evaluated count, "in_train": count or None, "manifest": path or None, "note": text}.

    Raises:
        ManifestError: when the run's manifest cannot be read.
    """
    hashes = list(sha256s)
    out: dict[str, Any] = {"files": len(hashes), "in_train": None, "manifest": None}
    if run_manifest is None or not Path(run_manifest).is_file():
        out["note"] = "the checkpoint's run manifest (splits.csv) was not found: overlap with training unknown"
        return out
    train, _ = _training_split(Path(run_manifest))
    out["manifest"] = str(run_manifest)
    out["in_train"] = sum(1 for h in hashes if h in train)
    out["note"] = f"{out['in_train']} of {len(hashes)} evaluated files are byte copies of training files"
    return out


def trained_on(rows: Iterable[ManifestRow], run_manifest: str | Path) -> list[str] | None:
    """The evaluated rows another run trained on: same bytes, or the same duplicate group, in its training split.

    Args:
        rows: the rows being scored.
        run_manifest: the splits.csv of the other run (e.g. an ensemble member's).

    Returns:
        The paths of those rows (empty when none), or None when `run_manifest` does not exist.

    Raises:
        ManifestError: when the run's manifest cannot be read.
    """
    path = Path(run_manifest)
    if not path.is_file():
        return None
    shas, groups = _training_split(path)
    return [r.path for r in rows if (r.sha256 and r.sha256 in shas) or (r.group and r.group in groups)]


def _training_split(path: Path) -> tuple[set[str], set[str]]:
    """The sha256s and the duplicate groups of the training split of the run manifest at `path`."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            records = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{path}: cannot read the run's split manifest ({exc})") from exc
    if records and not {"split", "sha256"} <= set(records[0]):
        raise ManifestError(f"{path}: the run's split manifest has no split/sha256 columns")
    train = [r for r in records if r.get("split") == "train"]
    return {r["sha256"] for r in train if r.get("sha256")}, {r["group"] for r in train if r.get("group")}

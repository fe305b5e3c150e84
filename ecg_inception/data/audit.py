"""Audit a dataset folder: files, duplicates, crops, conflicts."""

from __future__ import annotations

from dataclasses import dataclass, field

from ecg_inception.data.crop import CropBox
from ecg_inception.data.scan import ScanResult


@dataclass
class AuditReport:
    """Everything later stages need to know about a folder."""

    scan: ScanResult
    exact_groups: list[list[str]]  # every readable file in exactly one group (singletons included), rel paths
    near_groups: list[list[str]]  # groups of exact-group representatives merged by perceptual hash (size >= 2 only)
    conflicts: list[list[str]]  # exact groups whose files carry different labels
    crops: dict[str, CropBox] = field(default_factory=dict)  # rel_path -> box, one entry per readable file

# CONTRACT (filled in by the data-audit helper): audit_folder(root, *, near_duplicates=True) -> AuditReport;
# AuditReport.to_json() -> dict; group ids for splitting: AuditReport.group_ids() -> dict[rel_path, str]

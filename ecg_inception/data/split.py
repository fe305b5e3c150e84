"""Split protocols and balancing: an audited folder -> train/val/test by stratified whole-group assignment.

The `Manifest` it returns (rows, CSV, the checks on reading) lives in `data.manifest`, the protocol names and
defaults in `data.protocols`; both are importable from here too.

`leakfree` (default) keeps one file per byte-identical group, keeps near-duplicate groups together and
splits whole groups, stratified by class, so no ECG is ever seen in two splits. `paper` reproduces the
published protocol: every file including copies, undersampled to the smallest class before a random
stratified split by file; copies of one ECG then sit in several splits, so it is labelled leaky.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ecg_inception.data.crop import CropBox
from ecg_inception.data.duplicates import hash_to_hex
from ecg_inception.data.labels import order_labels
from ecg_inception.data.manifest import (
    COLUMNS,
    MANIFEST_FORMAT,
    META_PREFIX,
    REQUIRED_COLUMNS,
    SPLITS,
    Manifest,
    ManifestRow,
    excluded_path,
)
from ecg_inception.data.protocols import (
    BALANCE_STAGES,
    BALANCES,
    PROTOCOL_DEFAULTS,
    PROTOCOLS,
    ProtocolDefaults,
    protocol_defaults,
    resolve_balance,
)
from ecg_inception.data.scale import GridPitch
from ecg_inception.errors import DatasetError

if TYPE_CHECKING:
    from ecg_inception.data.audit import AuditReport

#: This module's own names and those that moved to `data.manifest` and `data.protocols` (importable from either).
__all__ = [
    "BALANCES", "BALANCE_STAGES", "COLUMNS", "DEFAULT_FRACTIONS", "MANIFEST_FORMAT", "META_PREFIX", "PROTOCOLS",
    "PROTOCOL_DEFAULTS", "REQUIRED_COLUMNS", "SPLITS", "Manifest", "ManifestRow", "ProtocolDefaults",
    "check_fractions", "excluded_path", "make_split", "protocol_defaults", "resolve_balance",
]  # fmt: skip

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate train/val/test fractions: three non-negative numbers summing to 1 with train > 0."""
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6 or fr[0] <= 0:
        raise ValueError(f"fractions must be 3 numbers >= 0 summing to 1 with train > 0, got {fractions}")
    return fr[0], fr[1], fr[2]


def _box_fields(box: CropBox | None) -> tuple[int | None, int | None, int | None, int | None, bool]:
    if box is None:
        return None, None, None, None, False
    return box.left, box.top, box.right, box.bottom, bool(box.fallback)


def _pitch_fields(pitch: GridPitch | None) -> tuple[float | None, bool]:
    return (None, False) if pitch is None else (round(float(pitch.px_per_mm), 4), bool(pitch.fallback))


@dataclass(frozen=True)
class _Unit:
    """What the splitter moves as a whole: a duplicate group (leakfree) or one file (paper)."""

    key: str
    label: str
    paths: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.paths)


def _units(
    report: AuditReport, protocol: str, group_of: dict[str, str], excluded: list[tuple[str, str]]
) -> list[_Unit]:
    """What moves as a whole: every file (paper), or each duplicate group's first copies (leakfree).

    Leakfree drops extra exact copies and whole groups whose files carry different labels into `excluded`.
    """
    labels = {im.rel_path: im.label for im in report.scan.images}
    if protocol == "paper":
        return [_Unit(p, labels[p], (p,)) for p in sorted(labels)]
    members: dict[str, list[str]] = defaultdict(list)
    for p in sorted(labels):
        members[group_of.get(p, p)].append(p)
    first = {p: min(g) for g in report.exact_groups for p in g}
    units = []
    for gid, paths in sorted(members.items()):
        found = sorted({labels[p] for p in paths})
        if len(found) > 1:
            excluded += [(p, f"label conflict in duplicate group {gid}: {', '.join(found)}") for p in paths]
        else:
            excluded += [(p, f"exact copy of {first[p]}") for p in paths if first.get(p, p) != p]
            units.append(_Unit(gid, found[0], tuple(p for p in paths if first.get(p, p) == p)))
    return units


def _rng(seed: int, purpose: str, label: str) -> random.Random:
    # One independent, reproducible stream per class and purpose (str seeds hash with SHA-512).
    return random.Random(f"{seed}/{purpose}/{label}")


def _dropped(units: list[_Unit], reason: str) -> list[tuple[str, str]]:
    return [(p, reason) for u in units for p in u.paths]


def _undersample(units: list[_Unit], target: int, rng: random.Random) -> tuple[list[_Unit], list[_Unit]]:
    """Keep randomly chosen whole units until `target` files; returns (kept, dropped)."""
    order = sorted(units, key=lambda u: u.key)
    rng.shuffle(order)
    kept, dropped, total = [], [], 0
    for u in order:
        if total + u.size <= target:
            kept.append(u)
            total += u.size
        else:
            dropped.append(u)
    return kept, dropped


def _assign(
    units: list[_Unit], fractions: tuple[float, float, float], rng: random.Random
) -> dict[str, list[_Unit]]:
    """Assign whole units of one class to splits so file counts approach the fractions.

    With >= 3 units every split with a positive fraction gets at least one (the smallest ones first);
    the rest go largest first to the split furthest below its target.
    """
    order = sorted(units, key=lambda u: u.key)
    rng.shuffle(order)
    targets = [f * sum(u.size for u in order) for f in fractions]
    counts = [0, 0, 0]
    out: dict[str, list[_Unit]] = {s: [] for s in SPLITS}
    active = [i for i, f in enumerate(fractions) if f > 0]

    def put(i: int, u: _Unit) -> None:
        out[SPLITS[i]].append(u)
        counts[i] += u.size

    if len(order) >= 3:
        for i in sorted(active, key=lambda i: (i == 0, i)):  # val and test first, then train
            smallest = min(order, key=lambda u: u.size)  # first of the smallest in shuffled order
            order.remove(smallest)
            put(i, smallest)
    for u in sorted(order, key=lambda u: -u.size):  # stable: ties keep the shuffled order
        put(max(active, key=lambda i: (targets[i] - counts[i], -i)), u)
    return out


def make_split(
    report: AuditReport,
    protocol: str = "leakfree",
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    balance: str | None = None,
    balance_stage: str | None = None,
) -> Manifest:
    """Split an audited folder into train/val/test by `protocol` (see docs/protocols.md).

    Args:
        report: the folder's `audit_folder` report (files, exact and near-duplicate groups, crop boxes).
        protocol: `leakfree` (one file per exact group, whole groups per split) or `paper` (every file,
            split by file: leaky).
        seed: seeds the undersampling and the assignment, per label; same inputs and seed, same manifest.
        fractions: train, val and test fractions (per class), summing to 1 with train > 0.
        balance: `undersample`, `class_weights` or `none`; None: the protocol's default.
        balance_stage: `before_split` or `train` (where undersampling happens); None: the protocol's default.

    Returns:
        The manifest: one row per used file (label, group, split, sha256, crop box) plus the excluded files
        with the reason for each.

    Raises:
        ValueError: an unknown protocol, balance or stage, or bad fractions.
        DatasetError: no file is left to split.
    """
    balance, stage = resolve_balance(protocol, balance, balance_stage)
    fracs = check_fractions(fractions)
    images = {im.rel_path: im for im in report.scan.images}
    group_of = report.group_ids()
    excluded = [(p, f"unreadable: {why}") for p, why in sorted(report.scan.unreadable.items())]

    units = _units(report, protocol, group_of, excluded)
    by_label: dict[str, list[_Unit]] = defaultdict(list)
    for u in units:
        by_label[u.label].append(u)
    labels = order_labels(list(report.scan.labels) + list(by_label))

    if balance == "undersample" and stage == "before_split" and by_label:
        target = min(sum(u.size for u in us) for us in by_label.values())
        for lab in sorted(by_label):
            by_label[lab], dropped = _undersample(by_label[lab], target, _rng(seed, "undersample", lab))
            excluded += _dropped(dropped, f"undersampled to {target} files per class (before_split)")

    assigned = {lab: _assign(by_label[lab], fracs, _rng(seed, "split", lab)) for lab in sorted(by_label)}

    if balance == "undersample" and stage == "train" and assigned:
        target = min(sum(u.size for u in parts["train"]) for parts in assigned.values())
        for lab, parts in sorted(assigned.items()):
            parts["train"], dropped = _undersample(
                parts["train"], target, _rng(seed, "undersample/train", lab)
            )
            excluded += _dropped(dropped, f"undersampled to {target} train files per class (train)")

    rep_of = {p: g[0] for g in report.exact_groups for p in g}
    hex_of = {rep: hash_to_hex(h) for rep, h in report.grid_hashes.items()}
    rows = [
        ManifestRow(
            p, u.label, group_of.get(p, p), split, images[p].sha256, *_box_fields(report.crops.get(p)),
            *_pitch_fields(report.pitches.get(p)), hex_of.get(rep_of.get(p, p), ""),
        )  # fmt: skip
        for parts in assigned.values()
        for split, us in parts.items()
        for u in us
        for p in u.paths
    ]
    if not rows:
        raise DatasetError(f"{report.scan.root}: no files left to split under protocol {protocol!r}")
    return Manifest(
        rows=sorted(rows, key=lambda r: r.path), labels=labels, protocol=protocol, seed=seed,
        excluded=sorted(excluded), balance=balance, balance_stage=stage, near_threshold=report.near_threshold,
    )  # fmt: skip

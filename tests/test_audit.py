"""audit_folder, AuditReport (JSON, group ids, per-class table) and the ecg-inception-audit CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest

from ecg_inception.cli.audit import main
from ecg_inception.data.audit import AuditReport, audit_folder, format_table
from ecg_inception.data.crop import CropBox
from ecg_inception.data.duplicates import NEAR_DUPLICATE_THRESHOLD, min_distances
from ecg_inception.data.labels import CANONICAL_LABELS, MENDELEY_FOLDERS
from ecg_inception.data.scan import ImageFile, ScanResult
from ecg_inception.errors import DatasetError

JSON_KEYS = {
    "root", "labels", "folders", "classes", "distinct", "duplicate_groups", "conflicts", "near_duplicate_threshold",
    "near_duplicate_groups", "unreadable", "ignored", "symlinks", "crops", "groups", "grid_hashes", "images",
    "pitches",
}  # fmt: skip


@pytest.fixture(scope="module")
def synthetic_report(synthetic_root: Path) -> AuditReport:
    return audit_folder(synthetic_root, workers=1)


@pytest.fixture(scope="module")
def dev_report(dev_root: Path) -> tuple[AuditReport, float]:
    """The dev-set audit, computed once for this module (and timed)."""
    start = time.perf_counter()
    report = audit_folder(dev_root)
    return report, time.perf_counter() - start


def small_tree(synthetic_root: Path, dest: Path) -> Path:
    """Three synthetic pages per class for two classes, a conflict copy, an unreadable and ignored files."""
    for label in ("myocardial_infarction", "normal"):
        folder = MENDELEY_FOLDERS[label]
        (dest / folder).mkdir(parents=True)
        for path in sorted((synthetic_root / folder).glob("*.jpg"))[:3]:
            shutil.copyfile(path, dest / folder / path.name)
    mi, normal = MENDELEY_FOLDERS["myocardial_infarction"], MENDELEY_FOLDERS["normal"]
    shutil.copyfile(dest / mi / "MI(1).jpg", dest / normal / "copy of MI(1).jpg")  # same bytes, other label
    (dest / normal / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    (dest / normal / "Thumbs.db").write_bytes(b"\x00")
    (dest / "notes.txt").write_text("root file")
    return dest


# --- synthetic -----------------------------------------------------------------------------------


def test_synthetic_audit(synthetic_report: AuditReport) -> None:
    scan = synthetic_report.scan
    assert scan.labels == list(CANONICAL_LABELS)
    assert len(scan.images) == 32 and len(synthetic_report.exact_groups) == 24
    assert len(synthetic_report.duplicate_groups()) == 8
    assert synthetic_report.near_groups == [] and synthetic_report.conflicts == []
    assert synthetic_report.near_threshold == NEAR_DUPLICATE_THRESHOLD
    assert set(synthetic_report.crops) == {im.rel_path for im in scan.images}
    assert not any(box.fallback for box in synthetic_report.crops.values())
    assert min(min_distances(list(synthetic_report.grid_hashes.values()))) > NEAR_DUPLICATE_THRESHOLD
    ids = synthetic_report.group_ids()
    for group in synthetic_report.exact_groups:
        sha = next(im.sha256 for im in scan.images if im.rel_path == group[0])
        assert {ids[p] for p in group} == {"g" + sha[:12]}
    assert len(set(ids.values())) == 24


def test_json_roundtrip(synthetic_report: AuditReport) -> None:
    data = synthetic_report.to_json()
    assert set(data) == JSON_KEYS
    text = json.dumps(data)
    assert data["classes"] == dict.fromkeys(CANONICAL_LABELS, 8)
    assert data["distinct"] == dict.fromkeys(CANONICAL_LABELS, 6)
    assert len(data["crops"]) == 32
    some = next(iter(data["crops"].values()))
    assert set(some) == {"box", "fallback"} and len(some["box"]) == 4
    # the grid pitch of every file: the synthetic set is rendered at scale 0.5 of 200 dpi (3.94 px/mm)
    assert len(data["pitches"]) == 32
    assert all(abs(p["px_per_mm"] - 0.5 * 200 / 25.4) < 0.05 and not p["fallback"] for p in data["pitches"].values())
    again = AuditReport.from_json(json.loads(text))
    assert again.to_json() == data
    assert again.group_ids() == synthetic_report.group_ids()
    with pytest.raises(DatasetError, match="not an audit report"):
        AuditReport.from_json({"root": "x"})


def test_process_pool_gives_the_same_report(
    synthetic_root: Path, synthetic_report: AuditReport, capsys
) -> None:
    pooled = audit_folder(synthetic_root, workers=2, progress=True)
    assert pooled.to_json() == synthetic_report.to_json()
    assert "audit: decoded 24/24 distinct images" in capsys.readouterr().err


def test_conflicts_unreadable_and_ignored_are_counted_per_class(synthetic_root: Path, tmp_path: Path) -> None:
    root = small_tree(synthetic_root, tmp_path / "small")
    report = audit_folder(root, near_duplicates=False)
    mi, normal = MENDELEY_FOLDERS["myocardial_infarction"], MENDELEY_FOLDERS["normal"]
    assert report.conflicts == [[f"{mi}/MI(1).jpg", f"{normal}/copy of MI(1).jpg"]]
    assert report.near_groups == [] and report.near_threshold is None and report.grid_hashes == {}
    assert list(report.scan.unreadable) == [f"{normal}/broken.jpg"]
    rows = {r.label: r for r in report.per_class_table()}
    assert (rows["myocardial_infarction"].files, rows["myocardial_infarction"].distinct) == (3, 3)
    assert (rows["normal"].files, rows["normal"].distinct) == (4, 4)
    assert rows["myocardial_infarction"].conflicts == rows["normal"].conflicts == 1
    assert (rows["normal"].unreadable, rows["normal"].ignored) == (1, 1)
    total = rows["total"]
    assert (total.files, total.distinct, total.unreadable, total.ignored, total.conflicts) == (7, 6, 1, 2, 1)
    ids = report.group_ids()
    assert ids[f"{mi}/MI(1).jpg"] == ids[f"{normal}/copy of MI(1).jpg"]
    table = format_table(report.per_class_table())
    assert table.splitlines()[0].split()[:3] == ["label", "files", "distinct"]
    assert table.splitlines()[-1].split() == ["total", "7", "6", "1", "2", "0", "1"]


def test_conflicts_inside_near_duplicate_groups_match_what_the_split_excludes(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """A re-encoded copy filed under another class is a label conflict too: the leak-free split drops both files,
    so the audit must count it (before the fix it counted exact-copy conflicts only)."""
    from PIL import Image

    from ecg_inception.data.split import make_split

    root = small_tree(synthetic_root, tmp_path / "near")
    mi, normal = MENDELEY_FOLDERS["myocardial_infarction"], MENDELEY_FOLDERS["normal"]
    with Image.open(root / mi / "MI(2).jpg") as img:
        img.convert("RGB").save(root / normal / "recoded MI(2).jpg", quality=70)
    report = audit_folder(root, workers=1)
    assert [f"{mi}/MI(2).jpg", f"{normal}/recoded MI(2).jpg"] in report.conflicts
    assert len(report.conflicts) == 2
    total = {r.label: r for r in report.per_class_table()}["total"]
    assert total.conflicts == 2
    split = make_split(report, "leakfree", seed=0)
    dropped = sorted(p for p, why in split.excluded if why.startswith("label conflict"))
    assert dropped == sorted(p for group in report.conflicts for p in group)
    assert report.to_json()["conflicts"] == [list(g) for g in report.conflicts]


def test_group_ids_merge_near_duplicate_groups() -> None:
    shas = {p: hashlib.sha256(p.encode()).hexdigest() for p in ("a/1.jpg", "a/2.jpg", "b/3.jpg", "b/4.jpg")}
    shas["b/4.jpg"] = shas["a/1.jpg"]  # exact copy
    images = [ImageFile(p, p[0], s, 10, 10, "RGB") for p, s in sorted(shas.items())]
    scan = ScanResult(Path("r"), ["a", "b"], {"a": "a", "b": "b"}, images)
    report = AuditReport(
        scan=scan,
        exact_groups=[["a/1.jpg", "b/4.jpg"], ["a/2.jpg"], ["b/3.jpg"]],
        near_groups=[["a/2.jpg", "b/3.jpg"]],
        conflicts=[["a/1.jpg", "b/4.jpg"]],
        crops={p: CropBox(0, 0, 10, 10) for p in shas},
    )
    g1, g2 = "g" + shas["a/1.jpg"][:12], "g" + shas["a/2.jpg"][:12]
    assert report.group_ids() == {"a/1.jpg": g1, "a/2.jpg": g2, "b/3.jpg": g2, "b/4.jpg": g1}


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_prints_table_and_writes_json(synthetic_root: Path, tmp_path: Path, capsys) -> None:
    root = small_tree(synthetic_root, tmp_path / "small")
    out = tmp_path / "reports" / "audit.json"
    assert main([str(root), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "myocardial_infarction" in text and "label conflicts" in text and "total" in text
    assert "unreadable: Normal Person ECG Images (284x12=3408)/broken.jpg" in text
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["labels"] == ["myocardial_infarction", "normal"]
    assert data["near_duplicate_threshold"] == NEAR_DUPLICATE_THRESHOLD
    assert main([str(root), "--no-near-duplicates", "--json", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["near_duplicate_threshold"] is None


def test_cli_dataset_error_exits_2_without_traceback(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ecg-inception-audit: error:") and "does not exist" in err
    assert "Traceback" not in err


def test_cli_entry_point_is_declared() -> None:
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "ecg-inception-audit"]
    assert ep.value == "ecg_inception.cli.audit:main"
    assert ep.load() is main


# --- the real dev set ----------------------------------------------------------------------------

DEV_COUNTS = {  # files, distinct (README of the dev set)
    "myocardial_infarction": (105, 22),
    "history_of_mi": (125, 64),
    "abnormal_heartbeat": (98, 98),
    "normal": (212, 106),
}


@pytest.mark.devset
def test_dev_audit_counts(dev_report: tuple[AuditReport, float]) -> None:
    report, seconds = dev_report
    assert seconds < 60, f"dev audit took {seconds:.1f} s"
    scan = report.scan
    assert scan.labels == list(CANONICAL_LABELS)
    assert len(scan.images) == 540 and len(report.exact_groups) == 290
    assert scan.unreadable == {} and scan.ignored == ["README.md"]
    rows = {r.label: r for r in report.per_class_table()}
    assert {label: (rows[label].files, rows[label].distinct) for label in CANONICAL_LABELS} == DEV_COUNTS
    assert report.conflicts == []
    assert sum(len(g) - 1 for g in report.duplicate_groups()) == 540 - 290  # redundant copies
    assert len(set(report.group_ids().values())) == 290


@pytest.mark.devset
def test_dev_no_near_duplicate_merges_across_distinct_ecgs(dev_report: tuple[AuditReport, float]) -> None:
    report, _ = dev_report
    assert report.near_groups == []
    nearest = min_distances(list(report.grid_hashes.values()))
    assert len(nearest) == 290
    assert nearest.min() >= NEAR_DUPLICATE_THRESHOLD + 20  # measured: 94 bits


@pytest.mark.devset
def test_dev_crops(dev_report: tuple[AuditReport, float]) -> None:
    report, _ = dev_report
    assert len(report.crops) == 540
    boxes = np.array([box.as_list() for box in report.crops.values()])
    assert not any(box.fallback for box in report.crops.values())
    assert np.abs(boxes - np.array([34, 141, 1088, 759])).max() <= 2

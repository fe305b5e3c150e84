"""Manifest format 2: a reused manifest cannot leak without being called leaky (issue 10 item 4)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from ecg_inception.data.duplicates import NEAR_DUPLICATE_THRESHOLD, hash_to_hex
from ecg_inception.data.manifest import MANIFEST_FORMAT, META_PREFIX, Manifest, ManifestRow
from ecg_inception.errors import ManifestError

SHA = [f"{i:064x}" for i in range(1, 9)]
RNG = np.random.default_rng(0)
HASHES = [RNG.integers(0, 256, 128, dtype=np.uint8) for _ in range(8)]  # ~512 bits apart


def rows(**changes: ManifestRow) -> list[ManifestRow]:
    """Eight distinct ECGs, 4 train / 2 val / 2 test, each in its own group; `changes` replaces rows by path."""
    splits = ["train"] * 4 + ["val"] * 2 + ["test"] * 2
    out = [
        ManifestRow(f"normal/n{i}.png", "normal", f"g{i}", splits[i], SHA[i], 1, 2, 90, 60, False, 3.97, False,
                    hash_to_hex(HASHES[i]))  # fmt: skip
        for i in range(8)
    ]
    by_path = {r.path: r for r in out}
    by_path.update(changes)
    return sorted(by_path.values(), key=lambda r: r.path)


def write(tmp_path: Path, rs: list[ManifestRow], protocol: str = "leakfree", near: int | None = 64) -> Path:
    manifest = Manifest(rs, ["normal"], protocol, 0, near_threshold=near)
    return manifest.write_csv(tmp_path / "splits.csv")


def test_clean_manifest_round_trips_with_its_metadata(tmp_path: Path) -> None:
    path = write(tmp_path, rows())
    first = path.read_text().splitlines()[0]
    assert first.startswith(META_PREFIX) and f'"format": {MANIFEST_FORMAT}' in first
    assert '"threshold": 64' in first and '"protocol": "leakfree"' in first
    back = Manifest.read_csv(path, "leakfree")
    assert back.rows == rows() and not back.leaky and back.near_threshold == 64 and back.format == 2
    assert back.rows[0].px_per_mm == pytest.approx(3.97) and back.rows[0].grid_hash == hash_to_hex(HASHES[0])


def test_same_content_in_train_and_test_under_other_groups_is_refused(tmp_path: Path) -> None:
    """Before: leak detection trusted the group column (`crossing: [] leaky: False`)."""
    copy = dataclasses.replace(rows()[0], path="normal/copy.png", group="g-other", split="test")
    path = write(tmp_path, [*rows(), copy])
    with pytest.raises(ManifestError, match=r"leaky under protocol 'leakfree'.*normal/copy.png \(test\)"):
        Manifest.read_csv(path, "leakfree")
    # under the paper protocol it is read, and called leaky, with the copy in the train file's group
    paper = write(tmp_path, [*rows(), copy], protocol="paper")
    m = Manifest.read_csv(paper, "paper")
    assert m.leaky and m.crossing_groups() == ["g-other"]


def test_near_duplicate_in_two_splits_is_refused(tmp_path: Path) -> None:
    near = HASHES[0].copy()
    near[:4] ^= 0xFF  # 32 bits flipped: a re-encoded copy, within the threshold
    twin = dataclasses.replace(rows()[0], path="normal/rescan.png", group="g-rescan", split="val",
                               sha256="f" * 64, grid_hash=hash_to_hex(near))  # fmt: skip
    path = write(tmp_path, [*rows(), twin])
    with pytest.raises(ManifestError, match="normal/rescan.png"):
        Manifest.read_csv(path, "leakfree")
    far = near.copy()
    far[4 : 4 + NEAR_DUPLICATE_THRESHOLD // 8 + 4] ^= 0xFF  # well beyond the threshold: another ECG
    other = dataclasses.replace(twin, grid_hash=hash_to_hex(far))
    assert not Manifest.read_csv(write(tmp_path, [*rows(), other]), "leakfree").leaky


def test_manifest_made_under_paper_is_refused_under_leakfree(tmp_path: Path) -> None:
    """Before: a paper manifest loaded under leakfree was labelled leak-free."""
    path = write(tmp_path, rows(), protocol="paper")
    with pytest.raises(ManifestError, match="made under protocol 'paper', loaded under 'leakfree'"):
        Manifest.read_csv(path, "leakfree")
    assert Manifest.read_csv(path, "paper").leaky


def test_format_1_manifest_is_read_with_groups_from_sha256(tmp_path: Path) -> None:
    header = "path,label,group,split,sha256,crop_left,crop_top,crop_right,crop_bottom,crop_fallback\n"
    clean = header + "".join(f"normal/n{i}.png,normal,g{i},{s},{SHA[i]},1,2,90,60,0\n"
                             for i, s in enumerate(["train", "train", "val", "test"]))  # fmt: skip
    (tmp_path / "old.csv").write_text(clean)
    old = Manifest.read_csv(tmp_path / "old.csv", "leakfree")
    assert old.format == 1 and not old.leaky and old.rows[0].px_per_mm is None and old.near_threshold is None
    leaky = clean + f"normal/copy.png,normal,g9,test,{SHA[0]},1,2,90,60,0\n"
    (tmp_path / "old-leaky.csv").write_text(leaky)
    with pytest.raises(ManifestError, match=r"normal/copy.png \(test\)"):
        Manifest.read_csv(tmp_path / "old-leaky.csv", "leakfree")


def test_newer_or_broken_metadata_is_refused(tmp_path: Path) -> None:
    body = write(tmp_path, rows()).read_text().split("\n", 1)[1]
    newer = tmp_path / "newer.csv"
    newer.write_text(META_PREFIX + '{"format": 3, "protocol": "leakfree"}\n' + body)
    with pytest.raises(ManifestError, match="format 3 is newer"):
        Manifest.read_csv(newer, "leakfree")
    broken = tmp_path / "broken.csv"
    broken.write_text(META_PREFIX + "{not json\n" + body)
    with pytest.raises(ManifestError, match=r"broken.csv:1: the manifest metadata is not valid JSON"):
        Manifest.read_csv(broken, "leakfree")
    stranger = tmp_path / "comment.csv"
    stranger.write_text("# hello\n" + body)
    with pytest.raises(ManifestError, match="unknown comment line"):
        Manifest.read_csv(stranger, "leakfree")


def test_split_of_an_audit_records_pitch_hash_and_settings(synthetic_root: Path, tmp_path: Path) -> None:
    from ecg_inception.data.audit import audit_folder
    from ecg_inception.data.split import make_split

    manifest = make_split(audit_folder(synthetic_root, workers=1), "leakfree", seed=0)
    assert manifest.near_threshold == NEAR_DUPLICATE_THRESHOLD
    assert all(r.px_per_mm == pytest.approx(0.5 * 200 / 25.4, rel=0.005) and not r.pitch_fallback
               for r in manifest.rows)  # fmt: skip
    assert all(len(r.grid_hash) == 256 for r in manifest.rows)
    back = Manifest.read_csv(manifest.write_csv(tmp_path / "splits.csv"), "leakfree", root=synthetic_root)
    assert back.rows == manifest.rows and back.near_threshold == NEAR_DUPLICATE_THRESHOLD and back.seed == 0

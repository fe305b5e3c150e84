"""Exact groups, label conflicts, the grid hash and near-duplicate grouping."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ecg_inception.data.audit import audit_folder
from ecg_inception.data.duplicates import (
    HASH_BYTES,
    NEAR_DUPLICATE_THRESHOLD,
    UnionFind,
    exact_groups,
    grid_hash,
    hamming,
    hamming_matrix,
    hash_from_hex,
    hash_to_hex,
    label_conflicts,
    min_distances,
    near_duplicate_groups,
)
from ecg_inception.data.scan import ImageFile, scan_folder


def image_file(rel: str, sha: str, label: str = "a") -> ImageFile:
    return ImageFile(rel, label, sha, 10, 10, "RGB")


def flipped(h: np.ndarray, bits: list[int]) -> np.ndarray:
    unpacked = np.unpackbits(h)
    unpacked[bits] ^= 1
    return np.packbits(unpacked)


# --- exact groups and conflicts -------------------------------------------------------------------


def test_exact_groups_include_singletons_and_are_sorted() -> None:
    files = [
        image_file("b/2.jpg", "x"),
        image_file("a/9.jpg", "y"),
        image_file("a/1.jpg", "x"),
        image_file("c.jpg", "z"),
    ]
    assert exact_groups(reversed(files)) == [["a/1.jpg", "b/2.jpg"], ["a/9.jpg"], ["c.jpg"]]
    assert exact_groups([]) == []


def test_label_conflicts() -> None:
    groups = [["a/1.jpg", "b/1.jpg"], ["a/2.jpg", "a/3.jpg"], ["b/4.jpg"]]
    labels = {"a/1.jpg": "a", "b/1.jpg": "b", "a/2.jpg": "a", "a/3.jpg": "a", "b/4.jpg": "b"}
    assert label_conflicts(groups, labels) == [["a/1.jpg", "b/1.jpg"]]


# --- hashing and grouping ---------------------------------------------------------------------------


def test_hamming_and_hex_roundtrip() -> None:
    rng = np.random.default_rng(0)
    h = rng.integers(0, 256, HASH_BYTES, dtype=np.uint8)
    assert hamming(h, h) == 0
    assert hamming(h, flipped(h, [0, 5, 1023])) == 3
    assert np.array_equal(hash_from_hex(hash_to_hex(h)), h)
    assert len(hash_to_hex(h)) == 256


def test_hamming_matrix_matches_pairwise_in_chunks() -> None:
    rng = np.random.default_rng(1)
    hs = rng.integers(0, 256, (5, HASH_BYTES), dtype=np.uint8)
    expected = np.array([[hamming(a, b) for b in hs] for a in hs])
    assert np.array_equal(hamming_matrix(hs, chunk=2), expected)
    assert np.array_equal(min_distances(hs), np.where(np.eye(5, dtype=bool), 10**9, expected).min(axis=1))


def test_union_find() -> None:
    uf = UnionFind(5)
    uf.union(3, 1)
    uf.union(1, 4)
    assert uf.groups() == [[0], [1, 3, 4], [2]]


def test_near_duplicate_groups_are_transitive_and_thresholded() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, HASH_BYTES, dtype=np.uint8)
    b = flipped(a, list(range(0, 20)))  # 20 bits from a
    c = flipped(b, list(range(100, 120)))  # 20 from b, 40 from a
    d = rng.integers(0, 256, HASH_BYTES, dtype=np.uint8)  # ~512 from everything
    reps = ["z/c.jpg", "x/a.jpg", "w/d.jpg", "y/b.jpg"]
    groups = near_duplicate_groups(reps, [c, a, d, b], threshold=20)
    assert groups == [["x/a.jpg", "y/b.jpg", "z/c.jpg"]]
    assert near_duplicate_groups(reps, [c, a, d, b], threshold=19) == []
    assert near_duplicate_groups(["x"], [a]) == []
    with pytest.raises(ValueError):
        near_duplicate_groups(reps, [a, b])


def test_grid_hash_is_1024_bits_and_deterministic() -> None:
    blank = Image.new("RGB", (400, 300), "white")
    assert grid_hash(blank).shape == (HASH_BYTES,) and not grid_hash(blank).any()
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    assert np.array_equal(grid_hash(img), grid_hash(img.copy()))
    assert np.array_equal(grid_hash(img.convert("L")), grid_hash(img.convert("L").convert("RGB")))


# --- planted duplicates ---------------------------------------------------------------------------


def test_planted_duplicates_are_all_found(synthetic_root: Path) -> None:
    scan = scan_folder(synthetic_root)
    groups = [g for g in exact_groups(scan.images) if len(g) > 1]
    # per_class=6, duplicates=2: files (7) and (8) of every class copy two different originals
    copies = sorted(im.rel_path for im in scan.images if im.rel_path.endswith(("(7).jpg", "(8).jpg")))
    assert len(groups) == 8 and all(len(g) == 2 for g in groups)
    assert sorted(g[1] if g[1].endswith(("(7).jpg", "(8).jpg")) else g[0] for g in groups) == copies
    for group in groups:
        first, second = (synthetic_root / p for p in group)
        assert first.read_bytes() == second.read_bytes()
        assert first.parent == second.parent


# --- near duplicates of a real page ---------------------------------------------------------------


def _save_variant(src: Path, dest: Path, scale: float, quality: int) -> None:
    with Image.open(src) as img:
        rgb = img.convert("RGB")
    if scale != 1.0:
        rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=quality)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(buf.getvalue())


@pytest.mark.devset
def test_reencoded_and_rescaled_copies_are_grouped_distinct_pages_are_not(
    dev_root: Path, tmp_path: Path
) -> None:
    def dev(name: str) -> Path:
        (path,) = dev_root.glob(f"*/{name}")
        return path

    root = tmp_path / "set"
    (root / "a").mkdir(parents=True)
    shutil.copyfile(dev("HB(49).jpg"), root / "a" / "HB(49).jpg")
    _save_variant(dev("HB(49).jpg"), root / "a" / "HB(49) q60.jpg", 1.0, 60)
    _save_variant(dev("HB(49).jpg"), root / "b" / "HB(49) 0.7x q60.jpg", 0.7, 60)
    _save_variant(dev("HB(49).jpg"), root / "b" / "HB(49) 1.5x.jpg", 1.5, 90)
    # the two closest distinct dev pages (94 bits apart) and two more
    for name in ("Normal(201).jpg", "Normal(230).jpg", "Normal(123).jpg", "PMI(112).jpg"):
        shutil.copyfile(dev(name), root / "b" / name)

    report = audit_folder(root, workers=1)

    variants = ["a/HB(49) q60.jpg", "a/HB(49).jpg", "b/HB(49) 0.7x q60.jpg", "b/HB(49) 1.5x.jpg"]
    assert report.near_groups == [variants]
    ids = report.group_ids()
    assert len({ids[p] for p in variants}) == 1
    assert len(set(ids.values())) == 5  # the other four pages keep their own groups
    hashes = report.grid_hashes
    original = hashes["a/HB(49).jpg"]
    assert max(hamming(original, hashes[p]) for p in variants) <= NEAR_DUPLICATE_THRESHOLD
    assert hamming(hashes["b/Normal(201).jpg"], hashes["b/Normal(230).jpg"]) > NEAR_DUPLICATE_THRESHOLD

"""Exact duplicates (sha256 of the bytes) and near duplicates (a 1024-bit difference hash of the grid).

Exact copies of one ECG in train and test leak; so do re-encoded or rescaled copies, which a byte
hash misses. Near duplicates are found with `grid_hash`, a 32 x 32 difference hash (dHash) of the
*grid area* only (header and footer differ between copies and would hide them), computed on an ink
map so that the pink grid, which every page shares, does not count:

1. crop to the detected grid box, keep the red channel (black ink is dark in it, the pink grid is
   not) and map it to ink = max(0, INK_CUTOFF - R);
2. resize the ink map to 33 x 32 with an antialiasing bicubic filter in float (a line near a cell
   border spreads smoothly over both cells, so a 1-2 px shift of the crop changes values a little
   instead of moving the line from one cell to the next);
3. bit (row, col) = ink[row, col + 1] - ink[row, col] > HASH_MARGIN * mean(ink): comparisons of two
   near-equal cells (paper next to paper, baseline next to baseline) give a stable 0 instead of a
   coin toss decided by JPEG noise.

A plain 64-bit pHash of the page puts distinct ECGs 2 bits apart; a plain greyscale 32 x 32 dHash
of the grid area keeps them >= 45 bits apart but also puts a quality-60 re-encode of the same page
up to 141 bits away (the flat paper cells flip at random). See NEAR_DUPLICATE_THRESHOLD for what
this hash measures on the dev set.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from ecg_inception.data.crop import CropBox, detect_grid_box
from ecg_inception.data.scan import ImageFile

HASH_SIZE = 32  # 32 rows x 32 horizontal differences = 1024 bits
HASH_BYTES = HASH_SIZE * HASH_SIZE // 8
INK_CUTOFF = 200  # red-channel level below which a pixel counts as ink (pink grid: R >= 217)
HASH_MARGIN = 0.05  # share of the mean cell ink a difference must exceed to set a bit
# Near duplicates: Hamming distance <= this many bits of 1024. Measured with this hash on the dev
# set (290 distinct images, 1106 x 786, JPEG quality 90):
#   distinct exact groups: nearest other image >= 94 bits (1st percentile 97, median 159);
#   the same page re-encoded at quality 60 / 30: <= 37 / 43 bits (median 16 / 11);
#   rescaled 0.7x: <= 36 bits, then re-encoded at quality 90 / 60: <= 38 / 57 bits;
#   rescaled 1.5x: <= 28 bits, re-encoded at quality 90 / 60: <= 25 / 27 bits;
#   rescaled 0.5x / 2x and re-encoded at quality 90: <= 46 / 27 bits.
#   synthetic pages (24 distinct, scale 0.5): nearest other page >= 178 bits.
# 64 (1/16 of the bits) is above every copy measured and 30 bits below the closest distinct pair,
# so grouping does not merge distinct ECGs (tests/test_duplicates.py and tests/test_audit.py
# re-check both on the dev set).
NEAR_DUPLICATE_THRESHOLD = 64

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_INK_LUT = [max(0, INK_CUTOFF - v) for v in range(256)]


def grid_hash(img: Image.Image, box: CropBox | None = None) -> np.ndarray:
    """1024-bit difference hash of the grid area of an RGB image, packed into 128 uint8 bytes."""
    if box is None:
        box = detect_grid_box(img)
    area = box.crop(img) if img.mode == "RGB" else box.crop(img.convert("RGB"))
    ink = area.getchannel("R").point(_INK_LUT).convert("F")
    cells = np.asarray(ink.resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.BICUBIC), dtype=np.float32)
    bits = np.diff(cells, axis=1) > HASH_MARGIN * float(cells.mean())
    return np.packbits(bits.ravel())


def hash_to_hex(h: np.ndarray) -> str:
    """A packed hash as a 256-character hex string (for JSON)."""
    return bytes(np.asarray(h, dtype=np.uint8)).hex()


def hash_from_hex(text: str) -> np.ndarray:
    """Inverse of `hash_to_hex`."""
    return np.frombuffer(bytes.fromhex(text), dtype=np.uint8).copy()


def hamming(a: np.ndarray, b: np.ndarray) -> int:
    """Number of differing bits between two packed hashes."""
    return int(_POPCOUNT[np.bitwise_xor(a, b)].sum())


def hamming_matrix(hashes: Sequence[np.ndarray] | np.ndarray, chunk: int = 256) -> np.ndarray:
    """All pairwise Hamming distances (n x n, int32), computed in row chunks to bound memory."""
    h = np.asarray(hashes, dtype=np.uint8).reshape(len(hashes), -1)
    n = h.shape[0]
    out = np.empty((n, n), dtype=np.int32)
    for start in range(0, n, chunk):
        block = np.bitwise_xor(h[start : start + chunk, None, :], h[None, :, :])
        out[start : start + chunk] = _POPCOUNT[block].sum(axis=2, dtype=np.int32)
    return out


def exact_groups(images: Iterable[ImageFile]) -> list[list[str]]:
    """Group rel paths by sha256: every file in one group (singletons too), groups sorted by first path."""
    by_sha: dict[str, list[str]] = defaultdict(list)
    for im in images:
        by_sha[im.sha256].append(im.rel_path)
    return sorted((sorted(paths) for paths in by_sha.values()), key=lambda g: g[0])


def label_conflicts(groups: Iterable[Sequence[str]], labels: Mapping[str, str]) -> list[list[str]]:
    """The groups whose files carry more than one label (the same bytes filed under two classes)."""
    return [list(g) for g in groups if len({labels[p] for p in g}) > 1]


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, i: int) -> int:
        """The representative of i's set."""
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        """Merge the sets of i and j."""
        ri, rj = self.find(i), self.find(j)
        if ri == rj:
            return
        if self.size[ri] < self.size[rj]:
            ri, rj = rj, ri
        self.parent[rj] = ri
        self.size[ri] += self.size[rj]

    def groups(self) -> list[list[int]]:
        """All sets as sorted index lists, ordered by their smallest member."""
        out: dict[int, list[int]] = defaultdict(list)
        for i in range(len(self.parent)):
            out[self.find(i)].append(i)
        return sorted(out.values(), key=lambda g: g[0])


def near_duplicate_groups(
    reps: Sequence[str],
    hashes: Sequence[np.ndarray] | np.ndarray,
    threshold: int = NEAR_DUPLICATE_THRESHOLD,
) -> list[list[str]]:
    """Merge representatives whose hashes are within `threshold` bits (transitively); groups of >= 2 only.

    `reps` are exact-group representatives (one path per distinct content), `hashes` their grid hashes.
    """
    if len(reps) != len(hashes):
        raise ValueError(f"{len(reps)} representatives but {len(hashes)} hashes")
    if len(reps) < 2:
        return []
    dist = hamming_matrix(hashes)
    uf = UnionFind(len(reps))
    for i, j in zip(*np.nonzero(np.triu(dist <= threshold, k=1)), strict=True):
        uf.union(int(i), int(j))
    groups = [sorted(reps[i] for i in g) for g in uf.groups() if len(g) > 1]
    return sorted(groups, key=lambda g: g[0])


def min_distances(hashes: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """For each hash, the distance to its nearest other hash (to calibrate or check the threshold)."""
    dist = hamming_matrix(hashes)
    np.fill_diagonal(dist, np.iinfo(np.int32).max)
    return dist.min(axis=1)

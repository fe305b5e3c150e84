"""Measure the 12-lead layout inside the grid box, as fractions of the box, on real or synthetic printouts.

Where `ecg_inception.inference.leads.LEAD_LAYOUT` comes from. For every page: the grid box
(`data.crop.detect_grid_box`; fallback boxes are skipped), then an ink mask of the box (red channel below
`INK_LEVEL` and not red: the black trace, the separators and the labels; the pink grid has R >= 217 on the dev
copies, and the full-size scans' dark red grid dots are left out by their redness), without the box's border
line. In it:

- column separators: the three vertical black lines over the three short rows (columns with one unbroken
  inked run over at least half of the rows 10-70 % down the box: a tall QRS does not span rows);
- baselines: the four rows with the most ink (a flat trace at its baseline), at least a tenth of the box
  apart;
- row boundaries: the least-inked row between two baselines, from the ink profile averaged over all pages;
- calibration pulse and trace start: in a band from 10 % of the box height above each baseline to 2 % below
  it, the first inked run of columns from the left is the 1 mV pulse; the trace starts at the first inked column after a gap of at least 2 px;
- trace end: the last inked column of the rhythm row;
- rhythm lead: which of rows 1-3 (I / II / III) the rhythm strip's first 2.5 s repeat: correlation of the
  per-column ink centroid of the strip with those of the first column's segments (all start at t = 0).

It prints the median, the 5th-95th percentile range and the standard deviation of each fraction.

    python examples/measure_lead_layout.py /work/shared/data/mendeley-ecg-dev
    python examples/measure_lead_layout.py --synthetic 40          # rendered pages at the dev copies' scale 0.5
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ecg_inception.data.crop import detect_grid_box
from ecg_inception.data.scan import is_image_candidate, open_rgb

INK_LEVEL = 128  # red channel below this is ink...
INK_MAX_REDNESS = 30  # ... unless it is this much redder than green and blue (a dark grid dot)
SEPARATOR_FILL = 0.5  # a separator column's longest inked run covers this share of the short rows' band
BORDER_FRACTION = 0.004  # of the box width: left out at every edge of the box (the border is 2-4 px at 1106 px)
PROFILE_BINS = 1000  # resolution of the averaged row profile (fractions of the box height)


def ink_mask(box_img: Image.Image) -> np.ndarray:
    """Boolean ink mask (height x width) of a cropped grid box: dark and grey, not dark red (the full-size scans'
    major grid dots reach R < 128 but stay red: R - max(G, B) > INK_MAX_REDNESS)."""
    rgb = np.asarray(box_img.convert("RGB")).astype(np.int16)
    redness = rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2])
    return (rgb[..., 0] < INK_LEVEL) & (redness <= INK_MAX_REDNESS)


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(start, end exclusive) of the True runs of a 1-D boolean array."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def centroid(ink: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Mean inked row per column of ink[y0:y1, x0:x1] (NaN where a column has no ink)."""
    band = ink[y0:y1, x0:x1]
    rows = np.arange(y0, y1)[:, None]
    count = band.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (band * rows).sum(0) / count, np.nan)


def measure_page(img: Image.Image) -> dict[str, object] | None:
    """Layout of one page as fractions of its grid box (None: fallback crop or an unexpected layout)."""
    box = detect_grid_box(img)
    if box.fallback:
        return None
    ink = ink_mask(box.crop(img))
    h, w = ink.shape
    edge = max(2, round(BORDER_FRACTION * w))  # the box's own border line (dark red on the full-size scans)
    ink[:edge], ink[-edge:], ink[:, :edge], ink[:, -edge:] = False, False, False, False
    band = ink[int(0.1 * h) : int(0.7 * h)]
    longest = np.array([max((b - a for a, b in runs(col)), default=0) for col in band.T])
    seps = [(a + b - 1) / 2 for a, b in runs(longest >= SEPARATOR_FILL * band.shape[0])]
    seps = [s for s in seps if 0.1 * w < s < 0.95 * w]
    if len(seps) != 3:
        return None
    no_sep = ink.copy()
    for s in seps:
        no_sep[:, int(s) - 3 : int(s) + 4] = False
    profile = no_sep.mean(1)
    baselines: list[int] = []
    masked = profile.copy()
    for _ in range(4):
        y = int(np.argmax(masked))
        baselines.append(y)
        masked[max(0, y - h // 10) : y + h // 10] = -1
    baselines.sort()
    above, below = max(2, round(0.1 * h)), max(2, round(0.02 * h))  # the 10 mm pulse stands above its baseline
    starts, pulses, ends = [], [], []
    for y in baselines:
        cols = ink[max(0, y - above) : y + below].any(0)
        found = [r for r in runs(cols) if r[1] - r[0] >= 1]
        if len(found) < 2:
            return None
        pulse = found[0]
        after = [r for r in found[1:] if r[0] - pulse[1] >= 2]
        if not after:
            return None
        pulses.append(pulse)
        starts.append(after[0][0])
        ends.append(found[-1][1])
    # rhythm lead: the strip's first 2.5 s against the first column's three segments
    x0, x1 = starts[3] + 4, int(seps[0]) - 4
    gaps = np.diff(baselines)
    strip = centroid(ink, baselines[3] - int(0.4 * gaps[2]), baselines[3] + int(0.4 * gaps[2]), x0, x1)
    corr = []
    for r in range(3):
        g = int(0.4 * (gaps[r] if r < 3 else gaps[2]))
        seg = centroid(ink, baselines[r] - g, baselines[r] + g, x0, x1) - baselines[r]
        both = ~np.isnan(seg) & ~np.isnan(strip)
        a, b = seg[both], strip[both] - baselines[3]
        corr.append(float(np.corrcoef(a, b)[0, 1]) if both.sum() > 10 and a.std() > 0 and b.std() > 0 else -1.0)
    resampled = np.interp(np.linspace(0, h - 1, PROFILE_BINS), np.arange(h), profile)
    return {
        "separators": [s / w for s in seps],
        "baselines": [y / h for y in baselines],
        "pulse_left": min(p[0] for p in pulses) / w,
        "pulse_right": max(p[1] for p in pulses) / w,
        "trace_start": float(np.median(starts)) / w,
        "trace_end": ends[3] / w,
        "rhythm_row": int(np.argmax(corr)),
        "rhythm_corr": max(corr),
        "rhythm_margin": max(corr) - sorted(corr)[-2],
        "profile": resampled / max(resampled.max(), 1e-9),
        "box": box,
        "size": img.size,
    }


def iter_dev_pages(root: Path) -> list[tuple[str, Image.Image]]:
    """Distinct images (by content) under `root`, as (relative path, RGB image)."""
    seen: set[str] = set()
    pages = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not is_image_candidate(path.name):
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        pages.append((str(path.relative_to(root)), open_rgb(path)))
    return pages


def iter_synthetic_pages(n: int, scale: float) -> list[tuple[str, Image.Image]]:
    """`n` rendered pages (classes in turn) at `scale`."""
    from ecg_inception.data.labels import CANONICAL_LABELS
    from ecg_inception.synthetic.printout import render_printout

    rng = np.random.default_rng(0)
    return [(f"synthetic-{i}", render_printout(CANONICAL_LABELS[i % 4], rng, scale)) for i in range(n)]


def summarise(name: str, values: list[float]) -> str:
    v = np.asarray(values)
    p5, p50, p95 = np.percentile(v, [5, 50, 95])
    return f"{name:<22} {p50:.4f}   [{p5:.4f}, {p95:.4f}]   sd {v.std():.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", type=Path, help="a folder of printouts (distinct images are used)")
    parser.add_argument("--synthetic", type=int, default=0, help="measure N rendered pages instead")
    parser.add_argument("--scale", type=float, default=0.5, help="scale of the rendered pages (default 0.5)")
    args = parser.parse_args(argv)
    if args.synthetic:
        pages = iter_synthetic_pages(args.synthetic, args.scale)
    elif args.root is not None:
        if not args.root.is_dir():
            parser.error(f"not a folder: {args.root}")
        pages = iter_dev_pages(args.root)
    else:
        parser.error("give a folder or --synthetic N")
    results, skipped = [], []
    for name, img in pages:
        m = measure_page(img)
        (skipped.append(name) if m is None else results.append(m))
    print(f"pages: {len(pages)} measured: {len(results)} skipped: {len(skipped)} {skipped[:5]}")
    if not results:
        return 1
    boxes = {(m["box"].width, m["box"].height) for m in results}  # type: ignore[union-attr]
    print(f"grid box sizes (w x h px): {sorted(boxes)[:6]}{' ...' if len(boxes) > 6 else ''}")
    print("fraction of the grid box   median   [p5, p95]   sd")
    for i in range(3):
        print(summarise(f"separator {i + 1} (x)", [m["separators"][i] for m in results]))  # type: ignore[index]
    for i in range(4):
        print(summarise(f"baseline {i + 1} (y)", [m["baselines"][i] for m in results]))  # type: ignore[index]
    for key in ("pulse_left", "pulse_right", "trace_start", "trace_end"):
        print(summarise(f"{key} (x)", [m[key] for m in results]))  # type: ignore[misc]
    mean_profile = np.mean([m["profile"] for m in results], axis=0)
    med_base = [float(np.median([m["baselines"][i] for m in results])) for i in range(4)]  # type: ignore[index]
    for i in range(3):
        lo, hi = int(med_base[i] * PROFILE_BINS), int(med_base[i + 1] * PROFILE_BINS)
        # the least-inked stretch: the middle of the rows within 5 % of the minimum
        seg = mean_profile[lo:hi]
        low = np.flatnonzero(seg <= seg.min() + 0.05 * (seg.max() - seg.min()))
        y = (lo + (low[0] + low[-1]) / 2) / PROFILE_BINS
        mid = (med_base[i] + med_base[i + 1]) / 2
        print(f"row boundary {i + 1}/{i + 2} (y)   least ink {y:.4f}   (midpoint of baselines {mid:.4f})")
    names = ("I", "II", "III")
    counts = np.bincount([m["rhythm_row"] for m in results], minlength=3)  # type: ignore[misc]
    corr = np.median([m["rhythm_corr"] for m in results])  # type: ignore[misc]
    clear = np.bincount([m["rhythm_row"] for m in results if m["rhythm_margin"] > 0.1],  # type: ignore[operator]
                        minlength=3)
    print("rhythm strip repeats: " + ", ".join(f"{names[i]} {counts[i]}" for i in range(3))
          + f" (median correlation {corr:.2f}); where the best leads the next by > 0.1: "
          + ", ".join(f"{names[i]} {clear[i]}" for i in range(3)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

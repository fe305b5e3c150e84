"""Regenerate the pictures of the docs site (docs/figures/) from the library's own code.

    python examples/docs_figures.py --dev ../shared/data/mendeley-ecg-dev --run logs/train/runs/<demo run>

- `synthetic_vs_real.png`: a synthetic printout (`render_printout`, the demo's data) beside a real page of the
  dev subset (Mendeley "ECG Images dataset of Cardiac Patients", CC BY 4.0).
- `preprocessing.png`: one real page through the steps the datamodule applies: the grid box found by
  `detect_grid_box`, the crop, `ink_image` (grid removed, trace thickened), and `preprocess` to the model's
  inputs (scratch_cpu's `[128, 256]` and the demo's `[96, 192]`, both with `ink`, and the plain RGB squash).
- `confusion_matrix.png`, `training_curves.png`: copied from a run directory (`--run`), as `train` wrote them.

The preprocessing panels call `detect_grid_box`, `ink_thickening`, `ink_image` and `preprocess`, so re-running
this script after a change to the preprocessing redraws them with the new code. Without `--dev` the real-page
pictures are skipped; without `--run` the report pictures are left as they are.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ecg_inception.data.crop import detect_grid_box  # noqa: E402
from ecg_inception.data.labels import MENDELEY_FOLDERS  # noqa: E402
from ecg_inception.data.transforms import ink_image, ink_thickening, preprocess  # noqa: E402
from ecg_inception.synthetic.generate import image_rng  # noqa: E402
from ecg_inception.synthetic.printout import render_printout  # noqa: E402

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"
SCRATCH_SIZE = (128, 256)  # experiment=scratch_cpu: [height, width]
DEMO_SIZE = (96, 192)  # experiment=demo
DEV_PAGE = ("normal", "Normal(1).jpg")  # label, file name in its Mendeley folder
SYNTHETIC_PAGE = ("normal", 0)  # label, index: the first normal page of a set made with seed 0
SOURCE_NOTE = 'Real page: Mendeley "ECG Images dataset of Cardiac Patients" (Khan & Hussain, CC BY 4.0)'


def real_page(dev_root: Path) -> tuple[Image.Image, Path]:
    """The dev subset's page `DEV_PAGE`, as RGB, with its path.

    Raises:
        FileNotFoundError: the page is not under `dev_root`.
    """
    label, name = DEV_PAGE
    path = dev_root / MENDELEY_FOLDERS[label] / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; --dev must be the dev subset's root folder")
    with Image.open(path) as img:
        return img.convert("RGB"), path


def synthetic_page(scale: float = 0.5) -> Image.Image:
    """A synthetic printout at the demo's scale (`generate_dataset` renders pages at 0.5 for the demo)."""
    label, index = SYNTHETIC_PAGE
    return render_printout(label, image_rng(0, label, index), scale)


def _show(ax: plt.Axes, img: Image.Image | np.ndarray, title: str) -> None:
    ax.imshow(img)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def plot_synthetic_vs_real(synthetic: Image.Image, real: Image.Image | None, out: Path) -> Path:
    """Write the two pages side by side (only the synthetic one when `real` is None); returns `out`."""
    pages = [(synthetic, f"synthetic (ecg-inception-synth), {synthetic.width}x{synthetic.height}")]
    if real is not None:
        pages.append((real, f"real dev page, {real.width}x{real.height}"))
    fig, axes = plt.subplots(1, len(pages), figsize=(6.2 * len(pages), 4.8), squeeze=False)
    for ax, (img, title) in zip(axes[0], pages, strict=True):
        _show(ax, img, title)
    if real is not None:
        fig.text(0.5, 0.01, SOURCE_NOTE, ha="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_preprocessing(page: Image.Image, out: Path, note: str = "") -> Path:
    """Write `page` through crop, ink and resize, as the datamodule does it; returns `out`."""
    box = detect_grid_box(page)
    boxed = np.asarray(page).copy()
    left, top, right, bottom = box.left, box.top, box.right - 1, box.bottom - 1
    width = max(2, page.width // 300)
    for y0, y1, x0, x1 in ((top, top + width, left, right), (bottom - width, bottom, left, right),
                           (top, bottom, left, left + width), (top, bottom, right - width, right)):  # fmt: skip
        boxed[max(0, y0) : y1 + 1, max(0, x0) : x1 + 1] = (0, 90, 255)
    cropped = box.crop(page)
    inked = ink_image(cropped, ink_thickening(cropped.width, cropped.height, SCRATCH_SIZE))

    def model_input(size: tuple[int, int], ink: bool) -> np.ndarray:
        return preprocess(page, box, size, ink=ink).permute(1, 2, 0).numpy()

    status = "fallback box" if box.fallback else "detected"
    (h, w), (dh, dw) = SCRATCH_SIZE, DEMO_SIZE
    panels = [
        (boxed, f"1. page {page.width}x{page.height}, grid box ({status})"),
        (cropped, f"2. crop to the grid box: {cropped.width}x{cropped.height}, header gone"),
        (inked, "3. ink: grid removed, trace thickened"),
        (model_input(SCRATCH_SIZE, True), f"4. model input {h}x{w}, ink (experiment=scratch_cpu)"),
        (model_input(DEMO_SIZE, True), f"model input {dh}x{dw}, ink (experiment=demo)"),
        (model_input(SCRATCH_SIZE, False), f"for comparison: {h}x{w} without ink"),
    ]
    fig, axes = plt.subplots(3, 2, figsize=(12, 9.6), gridspec_kw={"height_ratios": [1.25, 1.0, 1.0]})
    for ax, (img, title) in zip(axes.flat, panels, strict=True):
        _show(ax, img, title)
    if note:
        fig.text(0.5, 0.01, note, ha="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def copy_report_figures(run_dir: Path, out_dir: Path) -> list[Path]:
    """Copy a run's `confusion_matrix.png` and `training_curves.png` into `out_dir`.

    Raises:
        FileNotFoundError: the run directory lacks one of them (a run with `plots=false`, or not a run dir).
    """
    copied = []
    for name in ("confusion_matrix.png", "training_curves.png"):
        source = run_dir / name
        if not source.is_file():
            raise FileNotFoundError(f"{source}: not found; --run must be a finished run directory")
        copied.append(Path(shutil.copyfile(source, out_dir / name)))
    return copied


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", type=Path, help="root of the real dev subset (mendeley-ecg-dev)")
    parser.add_argument("--run", type=Path, help="a demo run directory whose report pictures to copy")
    parser.add_argument("--out", type=Path, default=FIGURES, help="output folder (default: docs/figures)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    real = path = None
    if args.dev is not None:
        real, path = real_page(args.dev)
    written = [plot_synthetic_vs_real(synthetic_page(), real, args.out / "synthetic_vs_real.png")]
    page, note = (
        (real, f"{path.name}. {SOURCE_NOTE}") if real is not None else (synthetic_page(), "synthetic page")
    )
    written.append(plot_preprocessing(page, args.out / "preprocessing.png", note=note))
    if args.run is not None:
        written.extend(copy_report_figures(args.run, args.out))
    for p in written:
        print(p)


if __name__ == "__main__":
    main()

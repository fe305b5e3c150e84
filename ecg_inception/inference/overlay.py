"""Pictures of explanations: the heat map over the full printout, and per-class mean lead shares as bars."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ecg_inception.inference.leads import LEAD_NAMES, uniform_shares

OVERLAY_ALPHA = 0.55  # opacity of the colour at the map's maximum; it fades with the map value
BOX_COLOUR = (0, 90, 255)
PNG_COMPRESSION = 3  # zlib level of the overlay PNGs: level 6 (Pillow's default) doubles the encode time


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        try:
            return ImageFont.load_default(size)
        except TypeError:  # Pillow < 10.1
            return ImageFont.load_default()


def render_overlay(
    page: Image.Image,
    cam: np.ndarray,
    box: Sequence[int] | None = None,
    caption: str = "",
    alpha: float = OVERLAY_ALPHA,
) -> Image.Image:
    """The page with the heat map blended over it (jet colours, opacity rising with the map), the grid box
    drawn, and `caption` in the top-left corner on a white plate.

    Args:
        page: The original printout.
        cam: Map of the page's size (height x width), >= 0; it is scaled by its maximum.
        box: [left, top, right, bottom] of the grid box in page pixels, or None.
        caption: Text for the corner (e.g. the predicted label and its probability).
        alpha: Opacity of the colour where the map is at its maximum.

    Returns:
        An RGB image of the page's size.

    Raises:
        ValueError: The map's shape is not the page's.
    """
    from matplotlib import colormaps

    rgb = page.convert("RGB") if page.mode != "RGB" else page
    m = np.asarray(cam, np.float32)
    if m.shape != (rgb.height, rgb.width):
        raise ValueError(f"map of shape {m.shape} for a page of {rgb.width}x{rgb.height} (needs height x width)")
    peak = float(m.max())
    level = np.round(np.clip(m / peak, 0.0, 1.0) * 255).astype(np.uint8) if peak > 0 else np.zeros(m.shape, np.uint8)
    lut = (colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.float32)
    weight = (alpha / 255.0) * level[..., None].astype(np.float32)
    blended = np.asarray(rgb, np.float32) * (1.0 - weight) + lut[level] * weight
    out = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    line = max(2, round(out.width / 500))
    if box is not None:
        left, top, right, bottom = (int(v) for v in box)
        draw.rectangle([left, top, right - 1, bottom - 1], outline=BOX_COLOUR, width=line)
    if caption:
        font = _font(max(12, round(out.height / 40)))
        x0, y0 = 2 * line, 2 * line
        bbox = draw.multiline_textbbox((x0, y0), caption, font=font)
        pad = line * 2
        draw.rectangle([bbox[0] - pad, bbox[1] - pad, bbox[2] + pad, bbox[3] + pad], fill=(255, 255, 255),
                       outline=(0, 0, 0))  # fmt: skip
        draw.multiline_text((x0, y0), caption, fill=(0, 0, 0), font=font)
    return out


def caption_for(label: str | None, probability: float | None, target: str | None, method: str, layer: str | None,
                cam_size: Sequence[int] | None) -> str:
    """The overlay's corner text: predicted label and probability, and what the map shows."""
    lines = [f"{label}  p={probability:.2f}" if label is not None and probability is not None else "unreadable"]
    if target is not None:
        size = f" {cam_size[0]}x{cam_size[1]}" if cam_size else ""
        lines.append(f"{'Grad-CAM++' if method == 'gradcam++' else 'Grad-CAM'} for {target} at {layer}{size}")
    return "\n".join(lines)


def lead_share_chart(
    per_class: Mapping[str, Mapping[str, float]],
    counts: Mapping[str, int],
    path: str | Path,
    title: str = "Mean Grad-CAM share per lead",
) -> Path:
    """A bar chart PNG: one panel per class, the 13 leads on the x axis, the class's mean share as bars.

    Args:
        per_class: class -> lead -> mean share.
        counts: class -> number of pages averaged.
        path: The PNG to write (parent folders are created).
        title: The figure title.

    Returns:
        The written path.

    Raises:
        ValueError: No class to draw.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    classes = list(per_class)
    if not classes:
        raise ValueError("no class to draw: every page failed or the folder is empty")
    fig, axes = plt.subplots(len(classes), 1, figsize=(8, 1.9 * len(classes) + 0.8), sharex=True, squeeze=False)
    x = np.arange(len(LEAD_NAMES))
    flat = [uniform_shares()[lead] for lead in LEAD_NAMES]
    top = max(0.05, max(max(per_class[c].values(), default=0.0) for c in classes) * 1.15, max(flat) * 1.15)
    for ax, cls in zip(axes[:, 0], classes, strict=True):
        values = [per_class[cls].get(lead, 0.0) for lead in LEAD_NAMES]
        ax.bar(x, values, color=["#4c72b0"] * 12 + ["#dd8452"])
        ax.scatter(x, flat, marker="_", s=300, color="black", linewidths=1.2, zorder=3)
        ax.set_ylim(0, top)
        ax.set_ylabel("share")
        ax.set_title(f"{cls} (n={counts.get(cls, 0)})", fontsize=10, loc="left")
    axes[-1, 0].set_xticks(x, [lead.replace("_rhythm", "\nrhythm") for lead in LEAD_NAMES])
    fig.suptitle(f"{title} (black ticks: a flat map's shares, i.e. the regions' areas)", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def overlay_name(path: str, taken: set[str]) -> str:
    """`<stem>_cam.png` for a record's path (`page<index>_cam.png` in memory), unique within `taken`."""
    stem = Path(path).stem if not path.startswith("#") else "page" + path[1:].replace(".", "_")
    name, n = f"{stem}_cam.png", 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}_cam.png"
    taken.add(name)
    return name


def write_overlay(record: Any, page: Image.Image, folder: str | Path, taken: set[str], method: str = "gradcam"
                  ) -> Path:
    """Write one explained record's overlay PNG into `folder` (created) and return its path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    prob = record.probabilities.get(record.label) if record.label is not None else None
    caption = caption_for(record.label, prob, record.target, method, record.cam_layer, record.cam_size)
    path = out / overlay_name(record.path, taken)
    render_overlay(page, record.cam, record.crop_box, caption).save(path, compress_level=PNG_COMPRESSION)
    return path

"""Explain predictions on the printout: Grad-CAM in page pixels and the share of it on each lead.

`explain_pages(model, preprocessing, inputs)` is the whole pipeline for any classifier and its checkpoint's
`preprocessing` dict: decode, crop-box detection and preprocessing as prediction does them, one forward and
backward pass per batch (`cam.compute_cam`), the map carried back onto the page (`geometry`), lead shares
(`leads`). `Predictor.explain` calls it with the Predictor's own model, preprocessing and temperature.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ecg_inception.data.crop import CropBox, detect_grid_box
from ecg_inception.data.scan import open_rgb
from ecg_inception.data.transforms import Normalize, parse_image_size, preprocess
from ecg_inception.errors import UnreadableImageError
from ecg_inception.inference.cam import choose_target_layer, compute_cam
from ecg_inception.inference.geometry import InputGeometry, input_geometry, map_to_box, map_to_page
from ecg_inception.inference.leads import LEAD_NAMES, lead_shares

PageInput = str | Path | Image.Image


@dataclass
class Explanation:
    """One page's prediction and its explanation.

    Attributes:
        path: The file, or `#<index>` for an image passed in memory.
        label: The predicted label (None when the page could not be read).
        probabilities: label -> probability, in the model's label order.
        crop_box: [left, top, right, bottom] in page pixels (None with crop off or on error).
        crop_fallback: True when no ECG grid was found (the fixed fractional box was used).
        error: None, or why the page could not be read.
        target: The label the map explains (the predicted one unless asked otherwise).
        cam: Grad-CAM in page pixels (page height x width, 0 outside the crop box), scaled to a maximum of 1.
        lead_shares: lead -> share of the positive map mass on the 13 lead regions (sums to 1; all 0 when the
            map is zero on every lead).
        margin_share: Share of the box's map mass left of the traces (calibration pulses, border).
        cam_layer: The backbone module the map was taken at.
        cam_size: (height, width) of the map at that layer, in feature cells.
    """

    path: str
    label: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    crop_box: list[int] | None = None
    crop_fallback: bool = False
    error: str | None = None
    target: str | None = None
    cam: np.ndarray | None = None
    lead_shares: dict[str, float] = field(default_factory=dict)
    margin_share: float = 0.0
    cam_layer: str | None = None
    cam_size: tuple[int, int] | None = None

    def to_dict(self, with_cam: bool = False) -> dict[str, Any]:
        """Plain values for JSON (the page-sized `cam` array only when asked)."""
        out = {k: v for k, v in self.__dict__.items() if k != "cam"}
        out["cam_size"] = list(self.cam_size) if self.cam_size else None
        if with_cam:
            out["cam"] = None if self.cam is None else self.cam.tolist()
        return out


def _name(item: PageInput, index: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"#{index}"


def _decode(item: PageInput) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB") if item.mode != "RGB" else item
    return open_rgb(item)


def _resolve_target(target: str | int, labels: Sequence[str]) -> int | None:
    """None for "predicted", else the class index of a label name or index."""
    if target == "predicted":
        return None
    if isinstance(target, int) and not isinstance(target, bool):
        if not 0 <= target < len(labels):
            raise ValueError(f"target class index {target} is out of range for {len(labels)} classes")
        return target
    if target in labels:
        return list(labels).index(str(target))
    raise ValueError(f"target {target!r} is neither 'predicted' nor one of the labels {list(labels)}")


@dataclass
class _Page:
    index: int
    record: Explanation
    image: torch.Tensor
    geometry: InputGeometry


def _prepare(item: PageInput, index: int, preprocessing: Mapping[str, Any]) -> _Page | Explanation:
    """Decode, crop and preprocess one page as prediction does; an `Explanation` with the error if it fails."""
    record = Explanation(path=_name(item, index))
    try:
        img = _decode(item)
    except UnreadableImageError as exc:
        record.error = exc.reason
        return record
    except OSError as exc:
        record.error = f"cannot read: {exc}"
        return record
    box: CropBox | None = detect_grid_box(img) if preprocessing.get("crop", True) else None
    size, resize = preprocessing["size"], str(preprocessing.get("resize", "squash"))
    image = preprocess(img, box, size, resize, str(preprocessing.get("interpolation", "bicubic")),
                       bool(preprocessing.get("ink", False)))  # fmt: skip
    if box is not None:
        record.crop_box, record.crop_fallback = box.as_list(), bool(box.fallback)
    return _Page(index, record, image, input_geometry(img.size, box, size, resize))


def explain_pages(
    model: nn.Module,
    preprocessing: Mapping[str, Any],
    inputs: PageInput | Iterable[PageInput],
    *,
    labels: Sequence[str] | None = None,
    target: str | int = "predicted",
    method: str = "gradcam",
    layer: str | None = None,
    batch_size: int = 8,
    temperature: float = 1.0,
) -> list[Explanation]:
    """Predict and explain every input: probabilities, Grad-CAM in page pixels and lead shares.

    Args:
        model: A classifier returning logits (an `EcgClassifier`); it is put in eval mode.
        preprocessing: The checkpoint's `preprocessing` dict (size, mean, std, interpolation, resize, crop, ink).
        inputs: File paths or PIL images (one or an iterable).
        labels: Class names in the model's order (default: `model.labels`, else "0", "1", ...).
        target: "predicted" (each page's top class), a label name or a class index.
        method: "gradcam" or "gradcam++".
        layer: Backbone module to take the map at (default: chosen by resolution, `cam.choose_target_layer`).
        batch_size: Pages per forward/backward pass.
        temperature: Logits are divided by it before the softmax (the checkpoint's calibration).

    Returns:
        One `Explanation` per input, in order; unreadable pages carry their `error`.

    Raises:
        ValueError: An unknown target, method or layer.
    """
    items = [inputs] if isinstance(inputs, (str, Path, Image.Image)) else list(inputs)
    labels = list(labels if labels is not None else getattr(model, "labels", None) or [])
    size = parse_image_size(preprocessing["size"])
    normalize = Normalize(preprocessing["mean"], preprocessing["std"])
    model.eval()
    if not labels:
        with torch.no_grad():
            param = next(model.parameters())
            labels = [str(i) for i in range(model(torch.zeros(1, 3, *size, dtype=param.dtype)).shape[1])]
    wanted = _resolve_target(target, labels)
    records: list[Explanation] = []
    pending: list[_Page] = []
    chosen: dict[tuple[float, float], Any] = {}

    def flush() -> None:
        if not pending:
            return
        content = pending[0].geometry.content[3], pending[0].geometry.content[2]
        key = (round(content[0]), round(content[1]))
        if key not in chosen:
            chosen[key] = choose_target_layer(model, size, layer, content)
        tl = chosen[key]
        batch = torch.stack([normalize(p.image) for p in pending])
        out = compute_cam(model, batch, tl.name, None if wanted is None else [wanted] * len(pending), method)
        probs = torch.softmax(out.logits.float() / temperature, dim=1).cpu().numpy()
        for p, raw, prob, t in zip(pending, out.maps, probs, out.targets, strict=True):
            r = p.record
            r.probabilities = {lab: float(v) for lab, v in zip(labels, prob, strict=True)}
            r.label, r.target = labels[int(np.argmax(prob))], labels[t]
            shares = lead_shares(map_to_box(raw, tl.grid, p.geometry))
            r.lead_shares, r.margin_share = shares.shares, shares.margin_share
            page_map = map_to_page(raw, tl.grid, p.geometry)
            peak = float(page_map.max())
            r.cam = page_map / peak if peak > 0 else page_map
            r.cam_layer, r.cam_size = tl.name, tuple(tl.grid.shape)
        pending.clear()

    for i, item in enumerate(items):
        prepared = _prepare(item, i, preprocessing)
        if isinstance(prepared, Explanation):
            records.append(prepared)
            continue
        records.append(prepared.record)
        if pending and pending[0].geometry.content != prepared.geometry.content:
            flush()  # one target layer per batch: letterboxed pages of other shapes go in their own batch
        pending.append(prepared)
        if len(pending) >= batch_size:
            flush()
    flush()
    return records


def share_columns() -> list[str]:
    """CSV column names of the lead shares: `share_<lead>` in `LEAD_NAMES` order, then `share_margin`."""
    return [f"share_{name}" for name in LEAD_NAMES] + ["share_margin"]


def share_row(record: Explanation) -> list[str]:
    """CSV cells of `share_columns()` for one record (empty cells for a page that could not be read)."""
    if record.error is not None or not record.lead_shares:
        return [""] * (len(LEAD_NAMES) + 1)
    return [f"{record.lead_shares[name]:.6f}" for name in LEAD_NAMES] + [f"{record.margin_share:.6f}"]

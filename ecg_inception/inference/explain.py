"""Explain predictions on the printout: Grad-CAM in page pixels and the share of it on each lead.

`explain_pages(model, preprocessing, inputs)` is the whole pipeline for any classifier and its checkpoint's
`preprocessing` dict: the Predictor's input handling (`inputs.expand_inputs`, `decode_item`) and the training
datasets' preprocessing (`data.pages.prepare_page`, which also gives the page region the input was read from),
one forward and backward pass per batch (`cam.compute_cam`), the map carried back onto the page (`geometry`),
lead shares (`leads`).
`Predictor.explain` calls it with the Predictor's model, preprocessing, temperature and threshold. Explanations
never use TTA: the map is of the one centre view the probabilities come from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ecg_inception.data.pages import prepare_page
from ecg_inception.data.transforms import Normalize, parse_image_size
from ecg_inception.errors import UnreadableImageError
from ecg_inception.inference.cam import TargetLayer, choose_target_layer, compute_cam
from ecg_inception.inference.geometry import InputGeometry, input_geometry, map_to_box, map_to_page
from ecg_inception.inference.inputs import ExpandedInputs, InputItem, InputLike, decode_item, expand_inputs
from ecg_inception.inference.leads import lead_shares
from ecg_inception.inference.records import DEFAULT_LOW_CONFIDENCE, Prediction


@dataclass
class Explanation(Prediction):
    """A `Prediction` record and its explanation.

    Attributes:
        target: The label the map explains (the predicted one unless asked otherwise).
        cam: Grad-CAM in page pixels (page height x width, 0 outside the crop box), scaled to a maximum of 1
            (all 0 when the map has no positive value).
        lead_shares: lead -> share of the positive map mass on the 13 lead regions (sums to 1; all 0 when the
            map is zero on every lead).
        margin_share: Share of the box's map mass left of the traces (calibration pulses, border).
        cam_layer: The backbone module the map was taken at.
        cam_size: (height, width) of the map at that layer, in feature cells.
    """

    target: str | None = None
    cam: np.ndarray | None = field(default=None, repr=False)
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
    record: Explanation
    page: Image.Image
    image: torch.Tensor
    geometry: InputGeometry


def _prepare(item: InputItem, preprocessing: Mapping[str, Any]) -> _Page | Explanation:
    """Decode and preprocess one page as the Predictor's `PageDataset` does; a record with the error if it fails."""
    try:
        page = decode_item(item)
        prepared, crop = prepare_page(page, preprocessing)
    except UnreadableImageError as exc:
        return Explanation(path=item.name, error=exc.reason)
    except (ValueError, OSError, MemoryError) as exc:
        return Explanation(path=item.name, error=f"cannot preprocess: {type(exc).__name__}: {exc}")
    record = Explanation(path=item.name)
    if crop is not None:
        record.crop_box, record.crop_fallback = crop.as_list(), bool(crop.fallback)
    geometry = input_geometry(page.size, crop, preprocessing["size"], str(preprocessing["resize"]),
                              prepared.content_size, prepared.page_region)  # fmt: skip
    return _Page(record, page, prepared.image, geometry)


def iter_explain(
    model: nn.Module,
    preprocessing: Mapping[str, Any],
    inputs: InputLike | Iterable[InputLike] | ExpandedInputs,
    *,
    labels: Sequence[str] | None = None,
    target: str | int = "predicted",
    method: str = "gradcam",
    layer: str | None = None,
    batch_size: int = 8,
    probabilities: Callable[[torch.Tensor], torch.Tensor] | None = None,
    low_confidence: float = DEFAULT_LOW_CONFIDENCE,
) -> Iterator[tuple[Explanation, Image.Image | None]]:
    """Like `explain_pages` (same arguments; `inputs` may also be already expanded), one (record, decoded page
    or None on error) at a time, in input order, as soon as its batch is done."""
    items = (inputs if isinstance(inputs, ExpandedInputs) else expand_inputs(inputs)).items
    labels = list(labels if labels is not None else getattr(model, "labels", None) or [])
    size = parse_image_size(preprocessing["size"])
    normalize = Normalize(preprocessing["mean"], preprocessing["std"])
    to_probs = probabilities or (lambda logits: logits.softmax(dim=1))
    model.eval()
    if not labels:
        with torch.no_grad():
            param = next(model.parameters())
            labels = [str(i) for i in range(model(torch.zeros(1, 3, *size, dtype=param.dtype)).shape[1])]
    wanted = _resolve_target(target, labels)
    layers: dict[tuple[float, float], TargetLayer] = {}
    device = next(model.parameters()).device

    def run(pending: list[_Page]) -> None:
        content = pending[0].geometry.content[3], pending[0].geometry.content[2]
        if content not in layers:
            layers[content] = choose_target_layer(model, size, layer, content)
        tl = layers[content]
        batch = torch.stack([normalize(p.image) for p in pending]).to(device)
        out = compute_cam(model, batch, tl.name, None if wanted is None else [wanted] * len(pending), method)
        with torch.no_grad():
            probs = to_probs(out.logits).float().cpu().numpy()
        for p, raw, prob, t in zip(pending, out.maps, probs, out.targets, strict=True):
            r = p.record
            top = int(np.argmax(prob))
            r.probabilities = {lab: float(v) for lab, v in zip(labels, prob, strict=True)}
            r.label, r.target, r.low_confidence = labels[top], labels[t], float(prob[top]) < low_confidence
            shares = lead_shares(map_to_box(raw, tl.grid, p.geometry))
            r.lead_shares, r.margin_share = shares.shares, shares.margin_share
            page_map = map_to_page(raw, tl.grid, p.geometry)
            peak = float(page_map.max())
            r.cam = page_map / peak if peak > 0 else page_map
            r.cam_layer, r.cam_size = tl.name, tuple(tl.grid.shape)

    pending: list[_Page] = []
    done: list[tuple[Explanation, Image.Image | None]] = []
    for item in items:
        prepared = _prepare(item, preprocessing)
        if isinstance(prepared, Explanation):
            done.append((prepared, None))
        else:
            if pending and pending[0].geometry.content != prepared.geometry.content:
                run(pending)  # one target layer per batch: letterboxed pages of other shapes get their own
                pending = []
            pending.append(prepared)
            done.append((prepared.record, prepared.page))
            if len(pending) < batch_size:
                continue
            run(pending)
            pending = []
        if not pending:
            yield from done
            done = []
    if pending:
        run(pending)
    yield from done


def explain_pages(
    model: nn.Module,
    preprocessing: Mapping[str, Any],
    inputs: InputLike | Iterable[InputLike],
    *,
    labels: Sequence[str] | None = None,
    target: str | int = "predicted",
    method: str = "gradcam",
    layer: str | None = None,
    batch_size: int = 8,
    probabilities: Callable[[torch.Tensor], torch.Tensor] | None = None,
    low_confidence: float = DEFAULT_LOW_CONFIDENCE,
) -> list[Explanation]:
    """Predict and explain every input: probabilities, Grad-CAM in page pixels and lead shares.

    Args:
        model: A classifier returning logits (an `EcgClassifier`); it is put in eval mode.
        preprocessing: The checkpoint's `preprocessing` dict (size, mean, std, interpolation, resize, crop, ink).
        inputs: What `Predictor.predict` takes: file paths, folders, PIL images, uint8 tensors.
        labels: Class names in the model's order (default: `model.labels`, else "0", "1", ...).
        target: "predicted" (each page's top class), a label name or a class index.
        method: "gradcam" or "gradcam++".
        layer: Backbone module to take the map at (default: chosen by resolution, `cam.choose_target_layer`).
        batch_size: Pages per forward/backward pass.
        probabilities: Logits -> probabilities (default softmax; the Predictor passes its temperature's).
        low_confidence: Top-probability threshold of the `low_confidence` flag.

    Returns:
        One `Explanation` per page, in order; unreadable pages carry their `error`.

    Raises:
        ValueError: An unknown target, method or layer.
    """
    return [record for record, _ in iter_explain(
        model, preprocessing, inputs, labels=labels, target=target, method=method, layer=layer,
        batch_size=batch_size, probabilities=probabilities, low_confidence=low_confidence,
    )]  # fmt: skip

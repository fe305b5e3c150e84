"""Grad-CAM / Grad-CAM++ (the `grad-cam` package) at a target layer chosen by resolution, with its geometry.

The target layer is one of the backbone's feature stages (timm's `feature_info`): the deepest stage whose map
still gives every lead region of the grid box at least `MIN_CELLS_PER_REGION` cells (and one cell along each
axis), so that four rows of leads stay apart. inception_v3 at 128 x 256: Mixed_7c is 2 x 6 (1.8 cells per
lead region, 0.96 along its height), Mixed_6e 6 x 14 (7.2 cells), so Mixed_6e; at 299 x 299 Mixed_7c (8 x 8,
4.9 cells) qualifies. Cells are counted at the traced stride (`trace_feature_grids`).

The weights and the map come from grad-cam's own classes (`get_cam_weights`/`get_cam_image`), kept at the
feature map's resolution (ReLU, no min-max scaling), so that lead shares are shares of the map itself and the
map goes back to the page by the traced `FeatureGrid` rather than by stretching. Gradients flow only from the
logits down to the target layer: parameters are frozen and the layer's output is cut from the graph below it,
which keeps an explanation near one forward pass plus the tail's backward pass.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ecg_inception.inference.geometry import FeatureGrid
from ecg_inception.inference.leads import COLUMN_EDGES, ROW_EDGES

log = logging.getLogger(__name__)

CAM_METHODS = ("gradcam", "gradcam++")
MIN_CELLS_PER_REGION = 2.0  # feature cells over the smallest lead region (area)
MIN_CELLS_PER_AXIS = 1.0  # ... and along each of its axes
_SMALLEST_REGION = (min(np.diff(ROW_EDGES[:4])), min(np.diff(COLUMN_EDGES)))  # (height, width) fractions


def backbone_of(model: nn.Module) -> nn.Module:
    """The timm model inside an `EcgClassifier` (its `backbone`), or the model itself."""
    inner = getattr(model, "backbone", None)
    return inner if isinstance(inner, nn.Module) else model


def feature_stages(model: nn.Module) -> list[str]:
    """Module names (relative to the backbone) of timm's `feature_info` stages, shallow to deep.

    Raises:
        ValueError: The backbone has no `feature_info` (then name the layer explicitly).
    """
    info = getattr(backbone_of(model), "feature_info", None)
    if not info:
        raise ValueError(f"{type(backbone_of(model)).__name__} has no timm feature_info: pass the target layer name")
    return [str(stage["module"]) for stage in info]


def _pair(value: int | str | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _padding(module: nn.Module, axis: int) -> float:
    """Leading padding of a conv/pool along `axis` (0: height, 1: width); 'same' pads (k-1)*d // 2 first."""
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            return 0.0
        k, d = _pair(module.kernel_size)[axis], _pair(getattr(module, "dilation", 1))[axis]
        return float(d * (k - 1) // 2)
    return float(_pair(padding)[axis])


def trace_feature_grids(model: nn.Module, input_size: tuple[int, int], names: Sequence[str]) -> dict[str, FeatureGrid]:
    """Where the cells of each named module's output sit in the input, from one forward pass of zeros.

    Every Conv2d / MaxPool2d / AvgPool2d moves cell centres by its kernel, stride, padding and dilation
    (centre_out(j) = centre_in(j * stride - padding + dilation * (kernel - 1) / 2)). Branches that are
    concatenated share one spatial size and geometry, so the geometry is kept per spatial size.

    Args:
        model: The classifier (or a timm model); names are relative to its backbone.
        input_size: (height, width) of the model input.
        names: The modules whose output grids are wanted.

    Returns:
        name -> `FeatureGrid`; a module whose output size no traced layer produced gets the stretched grid
        (logged).
    """
    backbone = backbone_of(model)
    geo: dict[tuple[int, int], tuple[tuple[float, float], tuple[float, float]]] = {
        tuple(input_size): ((0.5, 0.5), (1.0, 1.0))  # type: ignore[dict-item]
    }
    shapes: dict[str, tuple[int, int]] = {}

    def layer_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        src = geo.get(tuple(args[0].shape[-2:]))  # type: ignore[arg-type]
        if src is None:
            return
        (oy, ox), (sy, sx) = src
        offsets, strides = [], []
        for axis, (o, s) in enumerate(((oy, sy), (ox, sx))):
            k, st = _pair(module.kernel_size)[axis], _pair(module.stride or module.kernel_size)[axis]
            d = _pair(getattr(module, "dilation", 1))[axis]
            offsets.append(o + s * (d * (k - 1) / 2 - _padding(module, axis)))
            strides.append(s * st)
        geo.setdefault(tuple(output.shape[-2:]), (tuple(offsets), tuple(strides)))  # type: ignore[arg-type]

    def stage_hook(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            shapes[name] = tuple(output.shape[-2:])  # type: ignore[assignment]
        return hook

    handles = [m.register_forward_hook(layer_hook) for m in backbone.modules()
               if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]
    handles += [backbone.get_submodule(n).register_forward_hook(stage_hook(n)) for n in names]
    param = next(backbone.parameters())
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(torch.zeros(1, 3, *input_size, dtype=param.dtype, device=param.device))
    finally:
        backbone.train(was_training)
        for h in handles:
            h.remove()
    grids = {}
    for name in names:
        shape = shapes[name]
        if shape in geo:
            grids[name] = FeatureGrid(shape, *geo[shape])  # type: ignore[arg-type]
        else:
            log.warning("no traced layer yields the %s map of %s: stretching it over the input", shape, name)
            grids[name] = FeatureGrid.stretched(shape, input_size)
    return grids


def cells_per_region(grid: FeatureGrid, content_size: tuple[float, float]) -> tuple[float, float, float]:
    """(cells along the height, along the width, area in cells) of the smallest lead region.

    Args:
        grid: The feature grid.
        content_size: (height, width) in input pixels of the crop's image (the whole input when squashed).
    """
    rows = _SMALLEST_REGION[0] * content_size[0] / grid.stride[0]
    cols = _SMALLEST_REGION[1] * content_size[1] / grid.stride[1]
    return rows, cols, rows * cols


@dataclass(frozen=True)
class TargetLayer:
    """The chosen layer: its name (relative to the backbone) and its feature grid."""

    name: str
    grid: FeatureGrid


def choose_target_layer(
    model: nn.Module,
    input_size: tuple[int, int],
    layer: str | None = None,
    content_size: tuple[float, float] | None = None,
) -> TargetLayer:
    """The target layer: `layer` when given, else the deepest feature stage fine enough for the lead regions.

    Args:
        model: The classifier (or a timm model).
        input_size: (height, width) of the model input.
        layer: A module name of the backbone (optionally with a leading "backbone.").
        content_size: (height, width) of the crop's image in the input (letterbox); None: the whole input.

    Returns:
        The `TargetLayer` (the finest stage, logged, when none is fine enough).

    Raises:
        ValueError: `layer` names no module of the backbone.
    """
    backbone = backbone_of(model)
    if layer is not None:
        name = layer.removeprefix("backbone.")
        try:
            backbone.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"the backbone has no module {layer!r} to take Grad-CAM at") from exc
        return TargetLayer(name, trace_feature_grids(model, input_size, [name])[name])
    stages = feature_stages(model)
    grids = trace_feature_grids(model, input_size, stages)
    content = content_size or (float(input_size[0]), float(input_size[1]))
    for name in reversed(stages):
        rows, cols, area = cells_per_region(grids[name], content)
        if area >= MIN_CELLS_PER_REGION and min(rows, cols) >= MIN_CELLS_PER_AXIS:
            return TargetLayer(name, grids[name])
    log.warning("no feature stage gives %.0f cells per lead region at %s: using %s", MIN_CELLS_PER_REGION,
                input_size, stages[0])
    return TargetLayer(stages[0], grids[stages[0]])


@contextlib.contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No parameter gradients inside (restored after): CAM needs gradients of activations only."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass(frozen=True)
class CamOutput:
    """Raw maps (batch x grid shape, >= 0) at the target layer, the logits, and the explained class indices."""

    maps: np.ndarray
    logits: torch.Tensor
    targets: list[int]


def compute_cam(
    model: nn.Module, images: torch.Tensor, layer: str, targets: Sequence[int] | None = None, method: str = "gradcam"
) -> CamOutput:
    """Grad-CAM (or Grad-CAM++) maps of `images` at `layer`, for `targets` (None: each image's top class).

    Args:
        model: Returns logits (batch x classes) in eval mode (an `EcgClassifier` or a timm model).
        images: The normalised batch (batch x 3 x H x W).
        layer: Module name relative to the backbone.
        targets: One class index per image, or None for the argmax.
        method: `gradcam` or `gradcam++`.

    Returns:
        `CamOutput` with maps of the layer's spatial size.

    Raises:
        ValueError: An unknown method, or a target count that does not match the batch.
        ImportError: grad-cam is not installed (`pip install ecg_inception[explain]`).
    """
    try:
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise ImportError("Grad-CAM needs the grad-cam package: pip install 'ecg_inception[explain]'") from exc
    classes = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}
    if method not in classes:
        raise ValueError(f"unknown CAM method {method!r}; expected one of {', '.join(CAM_METHODS)}")
    if targets is not None and len(targets) != images.shape[0]:
        raise ValueError(f"{len(targets)} targets for a batch of {images.shape[0]} images")
    target_module = backbone_of(model).get_submodule(layer)

    def cut_below(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    was_training = model.training
    handle = target_module.register_forward_hook(cut_below)  # before grad-cam's hooks, which see its output
    try:
        with _frozen_parameters(model), torch.enable_grad():
            cam = classes[method](model, [target_module])
            try:
                logits = cam.activations_and_grads(images)
                chosen = [int(t) for t in (targets if targets is not None else logits.argmax(1).tolist())]
                cam_targets = [ClassifierOutputTarget(t) for t in chosen]
                loss = sum(t(out) for t, out in zip(cam_targets, logits, strict=True))
                loss.backward()  # type: ignore[union-attr]
                acts = cam.activations_and_grads.activations[0].float().numpy()
                grads = cam.activations_and_grads.gradients[0].float().numpy()
                raw = cam.get_cam_image(images, target_module, cam_targets, acts, grads, eigen_smooth=False)
            finally:
                cam.activations_and_grads.release()
    finally:
        handle.remove()
        model.train(was_training)
    return CamOutput(np.maximum(raw, 0.0).astype(np.float32), logits.detach(), chosen)

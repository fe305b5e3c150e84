"""Export a checkpoint to ONNX or torch.export (`.pt2`), with a JSON sidecar, and load either back as a Predictor.

The exported graph takes the normalised batch `Predictor.preprocess` makes ([N, 3, H, W] float32, N dynamic)
and returns probabilities with the checkpoint's temperature applied. The sidecar `PATH.json` holds what is
needed to feed it exactly what training saw: labels, the `preprocessing` dict (with its version), input and
output names and the library version; `load_exported` reads it and preprocesses with the library's own code.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecg_inception.data.pages import check_preprocessing
from ecg_inception.data.transforms import PREPROCESS_VERSION, parse_image_size
from ecg_inception.errors import ConfigValueError
from ecg_inception.inference.records import DEFAULT_LOW_CONFIDENCE
from ecg_inception.models.module import EcgClassifier

EXPORT_FORMATS = ("onnx", "torch-export")
SIDECAR_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "input", "probabilities"
EXAMPLE_BATCH = 2  # torch.export specialises a batch of 1, so the example batch is 2


class ProbabilityModel(nn.Module):
    """softmax(model(x) / temperature): the graph that is exported."""

    def __init__(self, model: EcgClassifier) -> None:
        super().__init__()
        self.model = model.eval()
        self.register_buffer("temperature", torch.tensor(float(model.temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x) / self.temperature, dim=1)


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and how far it is from eager PyTorch on a random batch of 3."""

    path: Path
    sidecar: Path
    max_abs_diff: float


def sidecar_path(path: str | Path) -> Path:
    """`model.onnx` -> `model.onnx.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt is None:
        fmt = {".onnx": "onnx", ".pt2": "torch-export"}.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"{path}: give the format (onnx or torch-export); the suffix is not .onnx or .pt2")
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    return fmt


def export_model(checkpoint: str | Path, out: str | Path, fmt: str | None = None) -> ExportResult:
    """Export the checkpoint's model with a dynamic batch size and write its sidecar; check parity.

    Args:
        checkpoint: A checkpoint written by `ecg-inception-train`.
        out: The file to write (`.onnx` or `.pt2`).
        fmt: "onnx" or "torch-export" (None: from the suffix).

    Returns:
        The paths and the max absolute probability difference to eager PyTorch on a random batch of 3.

    Raises:
        CheckpointError: The checkpoint is not usable.
        ValueError: Unknown format.
    """
    from ecg_inception import __version__
    from ecg_inception.inference.checkpoint import load_classifier

    out = Path(out)
    fmt = _format_of(out, fmt)
    model = load_classifier(checkpoint)
    prep = check_preprocessing(model.hparams["preprocessing"], checkpoint)
    prep.setdefault("version", PREPROCESS_VERSION)
    height, width = parse_image_size(prep["size"])
    wrapper = ProbabilityModel(model).eval()
    example = torch.randn(EXAMPLE_BATCH, 3, height, width, generator=torch.Generator().manual_seed(0))
    dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=65536)}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            torch.onnx.export(wrapper, (example,), str(out), dynamo=True, dynamic_shapes=dynamic,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], external_data=False,
                              verbose=False)  # fmt: skip
        else:
            torch.export.save(torch.export.export(wrapper, (example,), dynamic_shapes=dynamic), str(out))
    sidecar = {
        "sidecar_version": SIDECAR_VERSION,
        "format": fmt,
        "file": out.name,
        "labels": list(model.labels),
        "preprocessing": prep,
        "temperature": float(model.temperature),
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, height, width], "dtype": "float32",
                  "what": "Predictor.preprocess(...): cropped, resized, (x / 255 - mean) / std"},
        "output": {"name": OUTPUT_NAME, "what": "softmax(logits / temperature), labels order"},
        "ecg_inception_version": __version__,
        "torch_version": torch.__version__,
        "checkpoint": str(checkpoint),
    }
    check = torch.randn(3, 3, height, width, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        eager = wrapper(check)
    exported = _forward_fn(out, fmt, torch.device("cpu"))(check)
    diff = float((exported - eager).abs().max())
    sidecar["parity_max_abs_diff"] = diff
    side = sidecar_path(out)
    side.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return ExportResult(out, side, diff)


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The sidecar of an exported model, checked (labels, preprocessing version, format).

    Raises:
        ConfigValueError: Missing, unreadable or not a sidecar this version can use (naming the file).
    """
    side = sidecar_path(path)
    if not side.is_file():
        raise ConfigValueError(f"{side}: no sidecar beside {path} (export with ecg-inception-export)")
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigValueError(f"{side}: not a readable sidecar ({exc})") from exc
    if not isinstance(data, dict) or data.get("sidecar_version") != SIDECAR_VERSION:
        raise ConfigValueError(f"{side}: sidecar_version {data.get('sidecar_version') if isinstance(data, dict) else None!r}"
                               f" is not {SIDECAR_VERSION}")
    if data.get("format") not in EXPORT_FORMATS:
        raise ConfigValueError(f"{side}: unknown format {data.get('format')!r}")
    labels = data.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(v, str) for v in labels):
        raise ConfigValueError(f"{side}: labels must be a non-empty list of names, got {labels!r}")
    data["preprocessing"] = check_preprocessing(data.get("preprocessing"), side)
    return data


def _forward_fn(path: Path, fmt: str, device: torch.device) -> Any:
    if fmt == "onnx":
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else [
            "CPUExecutionProvider"]
        session = ort.InferenceSession(str(path), providers=providers)

        def run_onnx(x: torch.Tensor) -> torch.Tensor:
            arr = x.detach().float().cpu().contiguous().numpy()
            return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: arr})[0])

        return run_onnx
    module = torch.export.load(str(path)).module().to(device)

    def run_exported(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x.float().contiguous())

    return run_exported


def load_exported(
    path: str | Path,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    num_workers: int | None = None,
    low_confidence: float = DEFAULT_LOW_CONFIDENCE,
    tta: bool = False,
    prep_threads: int | None = None,
) -> Any:
    """A Predictor running an exported model (ONNX through onnxruntime, or a `.pt2`) with the library's own
    preprocessing, as its sidecar describes it.

    Args:
        path: The `.onnx` or `.pt2` file (its sidecar `PATH.json` beside it).
        device: "cpu", "cuda" or "auto".
        batch_size: Pages per forward pass.
        num_workers: DataLoader workers (see `Predictor`).
        low_confidence: Top-probability threshold of the `low_confidence` flag.
        tta: Shifted-view test-time augmentation by default.
        prep_threads: Threads that preprocess a batch when no worker does (see `Predictor`).

    Returns:
        An `inference.Predictor`.

    Raises:
        ConfigValueError: The sidecar is missing or unusable.
        FileNotFoundError: The model file is missing.
    """
    from ecg_inception.inference.predictor import Predictor, resolve_device

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such exported model")
    side = read_sidecar(path)
    dev = resolve_device(device)
    return Predictor(_forward_fn(path, side["format"], dev), side["labels"], side["preprocessing"], device=dev,
                     batch_size=batch_size, num_workers=num_workers, low_confidence=low_confidence, tta=tta,
                     temperature=float(side.get("temperature", 1.0)), source=str(path),
                     prep_threads=prep_threads)  # fmt: skip

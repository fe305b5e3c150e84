"""Predictor: a trained checkpoint (or an exported model) meets new printouts.

Everything about the input comes from what training stored: labels, the `preprocessing` dict (crop, size,
resize, interpolation, ink, mean and std) and the temperature. Pages are decoded, cropped and resized
(`inputs.PageDataset`) in DataLoader workers while the model runs on the previous batch, or, with no worker,
a batch at a time on `prep_threads` threads between forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from ecg_inception.core.cpus import usable_cpus
from ecg_inception.data.datamodule import default_num_workers
from ecg_inception.data.pages import check_preprocessing
from ecg_inception.data.transforms import Normalize
from ecg_inception.errors import UnreadableImageError
from ecg_inception.inference.inputs import (
    ExpandedInputs,
    InputLike,
    PageDataset,
    collate_pages,
    expand_inputs,
)
from ecg_inception.inference.records import DEFAULT_LOW_CONFIDENCE, Prediction
from ecg_inception.inference.tta import tta_views

if TYPE_CHECKING:
    from ecg_inception.inference.explain import Explanation

#: A model as the Predictor runs it: normalised float batch [N, 3, H, W] -> probabilities [N, C].
ProbabilityFn = Callable[[torch.Tensor], torch.Tensor]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else as torch reads it.

    Raises:
        ValueError: cuda was asked for but is not available.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use device='cpu' or 'auto'")
    return dev


class Predictor:
    """Classify ECG printouts with the preprocessing, labels and temperature of a trained model.

    Build it with `Predictor.from_checkpoint` (eager PyTorch) or `inference.load_exported` (ONNX Runtime or
    torch.export); both give the same API.

    Args:
        forward: Normalised batch (on `device`) -> probabilities, temperature applied.
        labels: Class names in the model's output order.
        preprocessing: The checkpoint's `preprocessing` dict.
        device: Where batches go.
        batch_size: Pages per forward pass.
        num_workers: DataLoader workers that decode and preprocess (None: none on the CPU, where each batch
            is preprocessed on `prep_threads` threads instead; `default_num_workers()` on an accelerator, and
            none for inputs that fit in one batch).
        low_confidence: A record whose top probability is below this is flagged `low_confidence`.
        tta: Average the probabilities over whole-pixel shifted views (`inference.tta`) by default.
        temperature: The temperature `forward` applies (for information; `forward` applies it; NaN for an
            ensemble of several, whose members apply their own).
        source: The file the model came from.
        model_threads: torch intra-op threads while predicting on the CPU (None: leave torch's setting). On 2
            cores, 2 model threads beside 1-2 decode workers were faster than giving the model only the cores
            the workers leave (docs/performance.md).
        prep_threads: Threads that preprocess the pages of a batch at once when no DataLoader worker does
            (None: the usable CPUs). Workers preprocess one page at a time each.

    Raises:
        ValueError: A count or threshold out of range.
    """

    def __init__(
        self,
        forward: ProbabilityFn,
        labels: Sequence[str],
        preprocessing: Mapping[str, Any],
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        num_workers: int | None = None,
        low_confidence: float = DEFAULT_LOW_CONFIDENCE,
        tta: bool = False,
        temperature: float = 1.0,
        source: str = "",
        model_threads: int | None = None,
        prep_threads: int | None = None,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= float(low_confidence) <= 1.0:
            raise ValueError(f"low_confidence must lie in [0, 1], got {low_confidence}")
        if num_workers is not None and int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if model_threads is not None and int(model_threads) < 1:
            raise ValueError(f"model_threads must be >= 1, got {model_threads}")
        if prep_threads is not None and int(prep_threads) < 1:
            raise ValueError(f"prep_threads must be >= 1, got {prep_threads}")
        self.forward = forward
        self.labels = list(labels)
        self.preprocessing = check_preprocessing(preprocessing, source or "preprocessing")
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.num_workers = num_workers
        self.low_confidence = float(low_confidence)
        self.tta = bool(tta)
        self.temperature = float(temperature)
        self.source = source
        self.model_threads = None if model_threads is None else int(model_threads)
        self.prep_threads = usable_cpus() if prep_threads is None else int(prep_threads)
        self.normalize = Normalize(self.preprocessing["mean"], self.preprocessing["std"])
        #: The EcgClassifier behind `forward` (None for an exported model or an ensemble).
        self.model: Any = None
        #: The `CheckpointEnsemble` behind `forward` (`from_checkpoints`; None otherwise).
        self.ensemble: Any = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        batch_size: int = 16,
        num_workers: int | None = None,
        low_confidence: float = DEFAULT_LOW_CONFIDENCE,
        tta: bool = False,
        model_threads: int | None = None,
        prep_threads: int | None = None,
    ) -> Predictor:
        """A Predictor around the EcgClassifier of a checkpoint (offline, `weights_only=True`).

        Args:
            path: A checkpoint written by `ecg-inception-train`.
            device: "cpu", "cuda" or "auto" (cuda when available).
            batch_size: Pages per forward pass.
            num_workers: DataLoader workers (see the class).
            low_confidence: Top-probability threshold of the `low_confidence` flag.
            tta: Shifted-view test-time augmentation by default.
            model_threads: torch intra-op threads while predicting on the CPU (None: torch's setting).
            prep_threads: Threads that preprocess a batch when no worker does (None: the usable CPUs).

        Returns:
            The Predictor.

        Raises:
            CheckpointError: The file is not a usable checkpoint (the message names it).
        """
        from ecg_inception.inference.checkpoint import load_classifier

        dev = resolve_device(device)
        model = load_classifier(path, map_location=dev)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return model.calibrated_probabilities(model(x))

        predictor = cls(forward, model.labels, model.hparams["preprocessing"], device=dev, batch_size=batch_size,
                        num_workers=num_workers, low_confidence=low_confidence, tta=tta,
                        temperature=model.temperature, source=str(path), model_threads=model_threads,
                        prep_threads=prep_threads)  # fmt: skip
        predictor.model = model
        return predictor

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | Path], device: str | torch.device = "auto",
                         **options: Any) -> Predictor:
        """A Predictor that averages the calibrated probabilities of several checkpoints (`inference.ensemble`).

        The members must share their labels and preprocessing; each page is preprocessed once and each member
        applies its own temperature. One path gives the same probabilities as `from_checkpoint`.

        Args:
            paths: Checkpoints written by `ecg-inception-train` (for example one recipe trained with several
                seeds on one split).
            device: "cpu", "cuda" or "auto" (cuda when available).
            **options: What `from_checkpoint` takes besides the path and device (`batch_size`, `num_workers`,
                `low_confidence`, applied to the averaged probabilities, `tta`, `model_threads`, `prep_threads`).

        Returns:
            The Predictor; `ensemble` holds the members, `model` is None (explanations need one checkpoint).

        Raises:
            EnsembleError: No paths, a path given twice, or members whose labels or preprocessing differ.
            CheckpointError: A file is not a usable checkpoint (the message names it).
        """
        from ecg_inception.inference.ensemble import load_ensemble

        dev = resolve_device(device)
        ensemble = load_ensemble(paths, map_location=dev)
        temperatures = ensemble.temperatures
        predictor = cls(ensemble, ensemble.labels, ensemble.preprocessing, device=dev,
                        temperature=temperatures[0] if len(temperatures) == 1 else math.nan,
                        source=" + ".join(ensemble.sources), **options)  # fmt: skip
        predictor.ensemble = ensemble
        return predictor

    # ------------------------------------------------------------------------------------------ batches
    def loader(self, expanded: ExpandedInputs) -> DataLoader:
        """The DataLoader that decodes and preprocesses `expanded.items` in order."""
        n_batches = math.ceil(len(expanded.items) / self.batch_size)
        if self.num_workers is None:
            # On the CPU the model's threads already fill the cores: a worker only competes with them, and a
            # batch preprocessed on prep_threads threads between forward passes was faster (docs/performance.md).
            # On an accelerator workers overlap decoding with the forward pass; a single batch has nothing to
            # overlap with.
            workers = default_num_workers() if n_batches > 1 and self.device.type != "cpu" else 0
        else:
            workers = int(self.num_workers)
        workers = min(workers, n_batches)
        return DataLoader(
            PageDataset(expanded.items, self.preprocessing, threads=self.prep_threads), batch_size=self.batch_size,
            shuffle=False,
            num_workers=workers, collate_fn=collate_pages, pin_memory=self.device.type == "cuda",
        )  # fmt: skip

    def preprocess(self, inputs: InputLike | Iterable[InputLike]) -> torch.Tensor:
        """The normalised float batch [N, 3, H, W] that the model (and every exported model) takes.

        Raises:
            UnreadableImageError: An input cannot be read or preprocessed (naming it).
        """
        expanded = expand_inputs(inputs)
        chunks = []
        for batch in self.loader(expanded):
            for meta in batch["items"]:
                if meta["error"] is not None:
                    raise UnreadableImageError(expanded.items[meta["index"]].name, meta["error"])
            chunks.append(self.normalize(batch["images"]))
        if not chunks:
            raise ValueError("no inputs to preprocess")
        return torch.cat(chunks)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """Probabilities [N, C] of preprocessed uint8 pages [N, 3, H, W] (averaged over TTA views with `tta`)."""
        if not tta:
            return self.forward(self.normalize(images).to(self.device, non_blocking=True)).float().cpu()
        views = tta_views(images)
        v, n = views.shape[:2]
        x = self.normalize(views.flatten(0, 1)).to(self.device, non_blocking=True)
        return self.forward(x).float().cpu().view(v, n, -1).mean(dim=0)

    # --------------------------------------------------------------------------------------- prediction
    def iter_predict(self, expanded: ExpandedInputs, tta: bool | None = None) -> Iterator[Prediction]:
        """One record per item of `expanded`, in order, as soon as its batch is done.

        With `model_threads` set (CPU only), torch's intra-op threads are set to it while the records are
        produced and restored when the iteration ends.
        """
        use_tta = self.tta if tta is None else bool(tta)
        loader = self.loader(expanded)
        threads, previous = self.model_threads, torch.get_num_threads()
        if threads is not None and self.device.type == "cpu" and threads != previous:
            torch.set_num_threads(threads)
        try:
            yield from self._records(loader, expanded, use_tta)
        finally:
            torch.set_num_threads(previous)

    def _records(self, loader: DataLoader, expanded: ExpandedInputs, use_tta: bool) -> Iterator[Prediction]:
        for batch in loader:
            probs = self.probabilities(batch["images"], use_tta) if batch["images"] is not None else None
            row = {index: k for k, index in enumerate(batch["ok"])}
            for meta in batch["items"]:
                name = expanded.items[meta["index"]].name
                if meta["error"] is not None:
                    yield Prediction(path=name, error=meta["error"])
                    continue
                p = probs[row[meta["index"]]]
                top = int(p.argmax())
                yield Prediction(
                    path=name,
                    label=self.labels[top],
                    probabilities={label: float(v) for label, v in zip(self.labels, p.tolist(), strict=True)},
                    crop_box=meta["box"],
                    crop_fallback=meta["fallback"],
                    low_confidence=float(p[top]) < self.low_confidence,
                )

    def predict(self, inputs: InputLike | Iterable[InputLike], tta: bool | None = None) -> list[Prediction]:
        """One record per input page (see `records.Prediction`); unreadable inputs get a record with `error`.

        Args:
            inputs: File paths, folders (walked recursively with the scan's image filter), PIL images or
                uint8 tensors, alone or in a sequence.
            tta: Shifted-view averaging (None: the Predictor's default).

        Returns:
            The records, in input order (a folder's images sorted by path).
        """
        return list(self.iter_predict(expand_inputs(inputs), tta))

    def explain(self, inputs: InputLike | Iterable[InputLike], target: str | int = "predicted",
                method: str = "gradcam", layer: str | None = None) -> list[Explanation]:
        """`predict`'s records plus Grad-CAM in page pixels (`cam`) and `lead_shares` (see `inference.explain`).

        Args:
            inputs: As `predict` takes them.
            target: "predicted", a label or a class index: the class whose evidence the map shows.
            method: "gradcam" or "gradcam++".
            layer: Backbone module for the map (default: chosen by resolution, `cam.choose_target_layer`).

        Raises:
            ValueError: The Predictor runs an exported model (Grad-CAM needs the checkpoint's), or an unknown
                target, method or layer.
        """
        from ecg_inception.inference.explain import explain_pages

        if self.ensemble is not None:
            raise ValueError(f"{self.source}: explain needs one checkpoint, not an ensemble of "
                             f"{len(self.ensemble.members)}; explain a member's checkpoint")  # fmt: skip
        if self.model is None:
            raise ValueError(f"{self.source}: explain needs the checkpoint's model, not an exported one")
        return explain_pages(self.model, self.preprocessing, inputs, labels=self.labels, target=target,
                             method=method, layer=layer, batch_size=self.batch_size,
                             probabilities=self.model.calibrated_probabilities,
                             low_confidence=self.low_confidence)  # fmt: skip

    def __repr__(self) -> str:
        return (f"Predictor(source={self.source!r}, labels={self.labels}, device={self.device}, "
                f"temperature={self.temperature:.4f}, low_confidence={self.low_confidence})")

"""Several checkpoints as one model: the mean of their calibrated probabilities.

A from-scratch network trained on a few hundred ECGs decides pages near a class boundary differently from one
training seed to the next; the average of a few seeds' probabilities is a steadier model (docs/scratch_cpu.md,
"Seed ensembles"). Members must share their labels (in order) and their whole `preprocessing` dict, so every page
is decoded and preprocessed once and each member sees exactly the input it was trained on; each member keeps its
own temperature. Build one with `Predictor.from_checkpoints` or `ecg-inception-predict A.ckpt --member B.ckpt`;
`EnsembleEvaluation` scores one on a run's split under a Lightning Trainer (`ecg-inception-eval members=[...]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from ecg_inception.errors import EnsembleError
from ecg_inception.inference.checkpoint import load_classifier
from ecg_inception.models.metrics import build_metrics, finish_stage
from ecg_inception.models.module import EcgClassifier


class CheckpointEnsemble(nn.Module):
    """Loaded members and their averaged calibrated probabilities.

    Args:
        members: The classifiers (eval mode), all with the same labels and preprocessing.
        sources: The file each came from, in the same order (named in errors and records).

    Raises:
        EnsembleError: No members, a `sources` of another length, or labels or preprocessing that differ
            (the message names the two files and the first difference).
    """

    def __init__(self, members: Sequence[EcgClassifier], sources: Sequence[str]) -> None:
        super().__init__()
        if not members:
            raise EnsembleError("an ensemble needs at least one checkpoint")
        if len(members) != len(sources):
            raise EnsembleError(f"{len(members)} members but {len(sources)} sources")
        self.members = nn.ModuleList(members)
        self.sources = [str(s) for s in sources]
        first, first_prep = members[0], dict(members[0].hparams["preprocessing"])
        for member, source in zip(members[1:], self.sources[1:], strict=True):
            if list(member.labels) != list(first.labels):
                raise EnsembleError(f"{source}: labels {list(member.labels)} differ from {self.sources[0]}'s "
                                    f"{list(first.labels)}; ensemble members must share their labels in order")  # fmt: skip
            difference = _first_difference(first_prep, dict(member.hparams["preprocessing"]))
            if difference is not None:
                key, a, b = difference
                raise EnsembleError(f"{source}: preprocessing {key}={b!r} differs from {self.sources[0]}'s "
                                    f"{key}={a!r}; ensemble members must be preprocessed alike")  # fmt: skip

    @property
    def labels(self) -> list[str]:
        """The members' shared class names, in output order."""
        return list(self.members[0].labels)

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The members' shared `preprocessing` dict."""
        return dict(self.members[0].hparams["preprocessing"])

    @property
    def temperatures(self) -> list[float]:
        """Each member's temperature, in member order."""
        return [float(m.temperature) for m in self.members]

    def member_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised batch [N, 3, H, W] -> each member's calibrated probabilities [members, N, C]."""
        return torch.stack([m.calibrated_probabilities(m(x)) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised batch [N, 3, H, W] -> the mean of the members' calibrated probabilities [N, C]."""
        return self.member_probabilities(x).mean(dim=0)


def load_ensemble(paths: Sequence[str | Path], map_location: str | torch.device = "cpu") -> CheckpointEnsemble:
    """The checkpoints at `paths` as one `CheckpointEnsemble` (offline, each checked by `load_classifier`).

    Args:
        paths: Checkpoints written by `ecg-inception-train`; one path is an ensemble of one.
        map_location: Where the weights go.

    Returns:
        The ensemble, in eval mode.

    Raises:
        EnsembleError: No paths, a path given twice, or members that differ in labels or preprocessing.
        CheckpointError: A file is not a usable checkpoint (the message names it).
    """
    paths = [Path(p) for p in paths]
    seen: dict[Path, Path] = {}
    for path in paths:
        key = path.resolve()
        if key in seen:
            raise EnsembleError(f"{path}: given twice (as {seen[key]}); each member counts once in the mean")
        seen[key] = path
    members = [load_classifier(p, map_location=map_location) for p in paths]
    return CheckpointEnsemble(members, [str(p) for p in paths]).eval()


class EnsembleEvaluation(pl.LightningModule):
    """A `CheckpointEnsemble` under `Trainer.validate` / `Trainer.test`, reporting as `EcgClassifier` does.

    Each val/test batch gives the ensemble's probabilities (each member with its own temperature, then the
    mean); the report holds the same metrics as a single model's (`models.metrics.compute_report`), its loss is the
    NLL of those probabilities, and `last_logits` keeps their logarithms with `temperature` 1, so that a
    calibration report of them measures the ensemble's probabilities as they are.

    Args:
        ensemble: The loaded members.
    """

    def __init__(self, ensemble: CheckpointEnsemble) -> None:
        super().__init__()
        self.ensemble = ensemble.eval()
        self.labels = ensemble.labels
        self.temperature = 1.0
        self.eval_metrics = nn.ModuleDict({s: build_metrics(len(self.labels)) for s in ("val", "test")})
        self.eval_loss = nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})
        self.last_reports: dict[str, dict[str, Any]] = {}
        self.last_logits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._collected: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}

    def _step(self, batch: Any, stage: str) -> None:
        x, y = EcgClassifier._unpack(batch)
        if y is None:
            raise ValueError(f"{stage} batch without labels: an ensemble is evaluated on labelled pages only")
        log_probs = self.ensemble(x).float().clamp_min(1e-12).log()
        self.eval_loss[stage].update(F.nll_loss(log_probs, y), weight=len(y))
        self.eval_metrics[stage].update(log_probs.exp(), y)
        self._collected[stage].append((log_probs.detach().cpu(), y.detach().cpu()))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulate the ensemble's validation metrics."""
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulate the ensemble's test metrics."""
        self._step(batch, "test")

    def _finish(self, stage: str) -> None:
        collected, self._collected[stage] = self._collected[stage], []
        if collected:
            self.last_logits[stage] = (torch.cat([z for z, _ in collected]), torch.cat([t for _, t in collected]))
        finished = finish_stage(self.eval_metrics[stage], self.eval_loss[stage], self.labels, stage)
        if finished is not None:
            self.last_reports[stage], scalars = finished
            self.log_dict(scalars, sync_dist=True)  # the single model's scalars, under the same names

    def on_validation_epoch_end(self) -> None:
        """Keep the validation report in `last_reports['val']`."""
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        """Keep the test report in `last_reports['test']`."""
        self._finish("test")


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, Any, Any] | None:
    for key in sorted(set(a) | set(b)):
        if _plain(a.get(key)) != _plain(b.get(key)):
            return key, a.get(key), b.get(key)
    return None


def _plain(value: Any) -> Any:
    """Lists and tuples compare alike ([128, 256] stored as a list in one checkpoint, a tuple in another)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

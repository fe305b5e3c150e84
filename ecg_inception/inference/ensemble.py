"""Several checkpoints as one model: the mean of their calibrated probabilities.

A from-scratch network trained on a few hundred ECGs decides pages near a class boundary differently from one
training seed to the next; the average of a few seeds' probabilities is a steadier model (docs/scratch_cpu.md,
"Seed ensembles"). Members must share their labels (in order) and their whole `preprocessing` dict, so every page
is decoded and preprocessed once and each member sees exactly the input it was trained on; each member keeps its
own temperature. Build one with `Predictor.from_checkpoints` or `ecg-inception-predict A.ckpt --member B.ckpt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecg_inception.errors import EnsembleError
from ecg_inception.inference.checkpoint import load_classifier
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

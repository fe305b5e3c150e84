"""Multi-label mode of `EcgClassifier`: sigmoid outputs, BCE loss, macro AUROC as the monitor (PTB-XL pretraining).

`MultiLabelClassifier` has the same plain-valued constructor, backbone, freezing, optimiser and checkpoint
format as `EcgClassifier` (its checkpoint is a valid ecg_inception checkpoint, and `model.pretrained_file=`
of any experiment accepts it: the state dict holds only `backbone.*` weights). What changes:

- targets are multi-hot float vectors (N, num_classes); the loss is `binary_cross_entropy_with_logits` on the
  main head (+ `aux_weight` x the aux head's);
- val/test log `loss` (BCE), `auroc_macro` (mean over labels that have both a positive and a negative),
  `f1_macro` (threshold 0.5), `acc` (exact match of the thresholded set) and `auroc_macro_best` (val);
- `val/auroc_macro_best` lives where `val/acc_best` lives for the multiclass model (the checkpoint key
  `val_acc_best`), so resuming keeps it; the temperature stays 1 (no calibration fit).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc, multilabel_f1_score

from ecg_inception.models.module import EcgClassifier

MONITOR = "val/auroc_macro"


def multilabel_report(logits: torch.Tensor, targets: torch.Tensor, labels: list[str]) -> dict[str, Any]:
    """Plain-valued report of one split: BCE loss, per-label and macro AUROC, macro F1 at 0.5, exact-match accuracy.

    Labels without both classes in `targets` get AUROC None and are left out of the macro mean (None when no
    label qualifies). A label counts as predicted when its probability is above 0.5, for F1 and accuracy alike
    (torchmetrics' rule), so a probability of exactly 0.5 is "not predicted" in both.
    """
    logits, targets = logits.float(), targets.float()
    t = targets.round().int()
    probs = logits.sigmoid()
    per_label: dict[str, dict[str, Any]] = {}
    aurocs = []
    for k, name in enumerate(labels):
        pos = int(t[:, k].sum())
        value = None
        if 0 < pos < len(t):
            value = float(binary_auroc(probs[:, k], t[:, k]))
            aurocs.append(value)
        per_label[name] = {"positives": pos, "auroc": value}
    n = len(labels)
    f1 = multilabel_f1_score(probs, t, num_labels=n, average="none", threshold=0.5) if len(t) else None
    if f1 is not None:
        for k, name in enumerate(labels):
            per_label[name]["f1"] = float(f1[k])
    return {
        "task": "multilabel",
        "n": int(len(t)),
        "loss": float(F.binary_cross_entropy_with_logits(logits, targets)) if len(t) else None,
        "auroc_macro": float(sum(aurocs) / len(aurocs)) if aurocs else None,
        "f1_macro": float(f1.mean()) if f1 is not None else None,
        "accuracy": float(((probs > 0.5).int() == t).all(dim=1).float().mean()) if len(t) else None,
        "per_label": per_label,
    }


class MultiLabelClassifier(EcgClassifier):
    """`EcgClassifier` for multi-label targets (sigmoid + BCE), monitored by `val/auroc_macro`.

    Arguments: exactly `EcgClassifier`'s (`labels` are the output names, e.g. the PTB-XL superclasses;
    `class_weights`, if given, weight the positive term of each label: BCE's `pos_weight`).
    """

    def compute_loss(self, logits: torch.Tensor, aux: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        """BCE(main) + aux_weight x BCE(aux) on multi-hot float targets."""
        target = target.float()

        def bce(z: torch.Tensor) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(z, target, pos_weight=self.class_weight)

        loss = bce(logits)
        if aux is not None and self.hparams.aux_weight:
            loss = loss + self.hparams.aux_weight * bce(aux)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """One optimisation step on (images, multi-hot targets)."""
        x, y = self._unpack(batch)
        out = self.run_backbone(x)
        logits, aux = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
        loss = self.compute_loss(logits, aux, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = self._unpack(batch)
        logits = self(x)
        self._epoch_logits[stage].append((logits.detach().float().cpu(), y.detach().float().cpu()))

    def _finish(self, stage: str) -> dict[str, Any] | None:
        collected, self._epoch_logits[stage] = self._epoch_logits[stage], []
        if not collected:
            return None
        logits, targets = torch.cat([z for z, _ in collected]), torch.cat([t for _, t in collected])
        self.last_logits[stage] = (logits, targets)
        report = multilabel_report(logits, targets, self.labels)
        logged = {k: report[k] for k in ("loss", "auroc_macro", "f1_macro", "accuracy") if report[k] is not None}
        logged["acc"] = logged.pop("accuracy", 0.0)
        if "auroc_macro" not in logged:  # a monitor must exist every epoch: 0.5 is chance
            logged["auroc_macro"] = 0.5
        self.log_dict({f"{stage}/{k}": float(v) for k, v in logged.items()}, sync_dist=True)
        return report

    def on_validation_epoch_end(self) -> None:
        """Log the val scalars and the best macro AUROC so far; keep the report in `last_reports['val']`."""
        report = self._finish("val")
        if report is None or self.trainer.sanity_checking:
            return
        self.val_acc_best(report["auroc_macro"] if report["auroc_macro"] is not None else 0.5)
        self.log("val/auroc_macro_best", self.val_acc_best.compute(), sync_dist=True)
        self.last_reports["val"] = report

    def calibrated_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Independent per-label probabilities sigmoid(logits / temperature)."""
        return (logits / self.temperature).sigmoid()

"""EcgClassifier: a timm backbone with aux loss, partial freezing and metrics, built from plain values only.

Every constructor argument is a plain value (Hydra `_partial_` optimizer/scheduler callables are replaced by a
plain description before `save_hyperparameters`), so checkpoints load with torch's `weights_only=True` and
`load_from_checkpoint(path, pretrained=False, pretrained_file=None)` works offline.
"""

from __future__ import annotations

import functools
import importlib
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ecg_inception.data.transforms import check_preprocessing_version, parse_image_size
from ecg_inception.errors import PretrainedWeightsError
from ecg_inception.models.backbone import create_backbone, head_names
from ecg_inception.models.freezing import (
    GradualUnfreeze,
    apply_unfreeze,
    frozen_batchnorms,
    set_frozen_bn_eval,
    warn_frozen_random,
)
from ecg_inception.models.metrics import build_metrics, compute_report
from ecg_inception.models.trunk import TrunkFeatures, TrunkSplit, parse_trunk_cache, parse_views

log = logging.getLogger(__name__)

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop,
}
SCHEDULERS: dict[str, Callable[..., Any]] = {
    "step": torch.optim.lr_scheduler.StepLR, "multistep": torch.optim.lr_scheduler.MultiStepLR,
    "cosine": torch.optim.lr_scheduler.CosineAnnealingLR, "exponential": torch.optim.lr_scheduler.ExponentialLR,
    "plateau": torch.optim.lr_scheduler.ReduceLROnPlateau, "onecycle": torch.optim.lr_scheduler.OneCycleLR,
}
DEFAULT_OPTIMIZER: dict[str, Any] = {"name": "adam", "lr": 1e-3}
AUX_MIN_SIZE = 299  # timm's inception_v3 aux head fails on smaller inputs
_LIGHTNING_KEYS = ("interval", "frequency", "monitor")
_PLAIN = (bool, int, float, str, type(None))


def to_plain(value: Any) -> Any:
    """OmegaConf containers, tuples, tensors and arrays -> dicts, lists and Python scalars (recursively)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # omegaconf is a dependency, but plain use must not need it
        pass
    if hasattr(value, "tolist") and not isinstance(value, _PLAIN):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def _is_plain(value: Any) -> bool:
    if isinstance(value, Mapping):
        return all(isinstance(k, (str, int)) and _is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def describe_callable(factory: Callable[..., Any]) -> dict[str, Any]:
    """A plain, re-buildable description of a factory (e.g. a Hydra `_partial_` object): name + keywords."""
    func, keywords, args = factory, {}, ()
    if isinstance(factory, functools.partial):
        func, keywords, args = factory.func, dict(factory.keywords), factory.args
    name = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}".lstrip(".")
    keywords = to_plain(keywords)
    if args or not _is_plain(keywords):
        return {"name": name, "repr": repr(factory), "rebuildable": False}
    return {"name": name, **keywords}


def _resolve(name: str, table: Mapping[str, Callable[..., Any]], what: str) -> Callable[..., Any]:
    if name.lower() in table:
        return table[name.lower()]
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"unknown {what} {name!r}: use one of {sorted(table)} or a dotted import path") from exc


def _split_spec(spec: Mapping[str, Any], what: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    spec = dict(spec)
    spec.pop("_partial_", None)
    name = spec.pop("name", None) or spec.pop("_target_", None)
    if not name:
        raise ValueError(f"{what} spec {spec!r} needs a 'name' (e.g. 'adam') or '_target_'")
    if spec.pop("rebuildable", True) is False:
        raise ValueError(f"{what} {spec.get('repr', name)} was stored as a description only; pass it again")
    return _resolve(str(name), OPTIMIZERS if what == "optimizer" else SCHEDULERS, what), spec


class EcgClassifier(pl.LightningModule):
    """ECG printout classifier: timm backbone (aux logits optional), partial freezing, full val/test reports.

    `unfreeze`: {"blocks": N | "all"} or {"layers": N} (see docs/freezing.md); `gradual_unfreeze`:
    {"schedule": {epoch: blocks}, "lr_factor": 0.1}. `optimizer`/`scheduler`: a callable taking params /
    the optimizer (Hydra `_partial_: true`), or a plain dict {"name": "sgd", "lr": 0.01, ...}; scheduler dicts
    may add "interval", "frequency" and "monitor". `preprocessing` and `labels` ride along in the checkpoint.
    """

    def __init__(
        self,
        model_name: str = "inception_v3",
        num_classes: int = 4,
        labels: list[str] | None = None,
        pretrained: bool | str | None = "tv_in1k",
        pretrained_file: str | None = None,
        aux_logits: bool = True,
        aux_weight: float = 0.4,
        drop_rate: float = 0.5,
        unfreeze: dict[str, Any] | None = None,
        gradual_unfreeze: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        class_weights: list[float] | None = None,
        optimizer: dict[str, Any] | Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: dict[str, Any] | Callable[..., Any] | None = None,
        preprocessing: dict[str, Any] | None = None,
        channels_last: bool = True,
        compile: bool | dict[str, Any] = False,
        trunk_cache: bool | str | None = "auto",
        trunk_cache_views: int | None = None,
    ) -> None:
        super().__init__()
        labels, unfreeze, gradual_unfreeze = to_plain(labels), to_plain(unfreeze), to_plain(gradual_unfreeze)
        class_weights, preprocessing = to_plain(class_weights), to_plain(preprocessing)
        self._optimizer_factory = optimizer if callable(optimizer) else None
        self._scheduler_factory = scheduler if callable(scheduler) else None
        optimizer = describe_callable(optimizer) if callable(optimizer) else to_plain(optimizer)
        scheduler = describe_callable(scheduler) if callable(scheduler) else to_plain(scheduler)
        num_classes = int(num_classes)
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"num_classes={num_classes} but {len(labels)} labels were given: {labels}")
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(class_weights)} entries for num_classes={num_classes}")
        unknown = set(unfreeze or {}) - {"blocks", "layers"}
        if unknown:
            raise ValueError(f"unfreeze accepts 'blocks' and 'layers', got {sorted(unknown)}")
        for spec, factory, what in ((optimizer, self._optimizer_factory, "optimizer"),
                                    (scheduler, self._scheduler_factory, "scheduler")):
            if spec and factory is None:
                _split_spec(spec, what)  # unknown names fail now, not after the first epoch
        if gradual_unfreeze:
            GradualUnfreeze(**gradual_unfreeze)  # likewise for a malformed schedule
        check_preprocessing_version(preprocessing, "model.preprocessing (the checkpoint's hyper_parameters)")
        size = (preprocessing or {}).get("size")
        if aux_logits and size is not None and min(parse_image_size(size)) < AUX_MIN_SIZE:
            raise ValueError(
                f"aux_logits=True needs inputs of at least {AUX_MIN_SIZE} px on each side (the aux head's 5x5 "
                f"conv), but the data is resized to {size} px: set model.aux_logits=false or "
                f"data.image_size>={AUX_MIN_SIZE}"
            )
        parse_trunk_cache(trunk_cache), parse_views(trunk_cache_views)  # fail fast; train() acts on them
        self.save_hyperparameters()

        self.backbone = create_backbone(model_name, num_classes, aux_logits, drop_rate, pretrained, pretrained_file)
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if compile:
            # In place (nn.Module.compile): state_dict keys stay the same, so checkpoints load either way. The
            # trunk cache calls the backbone's blocks one by one and so runs them uncompiled.
            self.backbone.compile(**(compile if isinstance(compile, dict) else {}))
        self.freeze_plan = apply_unfreeze(self.backbone, **(unfreeze or {}))
        self.labels = list(labels) if labels else [str(i) for i in range(num_classes)]
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weight", weight, persistent=False)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.eval_metrics = nn.ModuleDict({s: build_metrics(num_classes) for s in ("val", "test")})
        self.eval_loss = nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})
        self.val_acc_best = MaxMetric()
        self.last_reports: dict[str, dict[str, Any]] = {}
        self._weights_from_checkpoint = False
        #: Set by models.trunk_cache.maybe_use_trunk_cache: batches may then be cached trunk features.
        self.trunk_split: TrunkSplit | None = None

    @classmethod
    def from_checkpoint(cls, path: str, map_location: Any = "cpu", **overrides: Any) -> EcgClassifier:
        """load_from_checkpoint without any weight download (pretrained=False, pretrained_file=None)."""
        overrides = {"pretrained": False, "pretrained_file": None, **overrides}
        return cls.load_from_checkpoint(path, map_location=map_location, **overrides)

    # ----------------------------------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> EcgClassifier:
        """Switch modes, keeping frozen BatchNorm layers in inference mode (their statistics never move)."""
        super().train(mode)
        if mode:
            set_frozen_bn_eval(self.backbone)
        return self

    # --------------------------------------------------------------------------------------------- forward
    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    def run_backbone(self, x: torch.Tensor | TrunkFeatures) -> Any:
        """The backbone's raw output on images, or only its tail on cached trunk features (models.trunk_cache)."""
        if isinstance(x, TrunkFeatures):
            if self.trunk_split is None:
                raise RuntimeError("cached trunk features need model.trunk_split (see models.trunk_cache)")
            return self.trunk_split.tail(x)
        return self.backbone(self._prep(x))

    def forward(self, x: torch.Tensor | TrunkFeatures) -> torch.Tensor:
        """Main-head logits (N, num_classes); the aux head's output is dropped."""
        out = self.run_backbone(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    @staticmethod
    def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(batch, torch.Tensor):
            return batch, None
        if isinstance(batch, Mapping):
            x = next((batch[k] for k in ("image", "x", "input") if k in batch), None)
            if x is None:
                raise KeyError(f"batch dict needs an 'image' (or 'x'/'input') entry, has {sorted(batch)}")
            return x, next((batch[k] for k in ("label", "y", "target") if k in batch), None)
        return batch[0], (batch[1] if len(batch) > 1 else None)

    def compute_loss(self, logits: torch.Tensor, aux: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        """CE(main) + aux_weight x CE(aux), with the configured label smoothing and class weights."""
        def ce(z: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(z, target, weight=self.class_weight, label_smoothing=self.hparams.label_smoothing)

        loss = ce(logits)
        if aux is not None and self.hparams.aux_weight:
            loss = loss + self.hparams.aux_weight * ce(aux)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """One optimisation step on (images, labels)."""
        x, y = self._unpack(batch)
        out = self.run_backbone(x)
        logits, aux = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
        loss = self.compute_loss(logits, aux, y)
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = self._unpack(batch)
        logits = self(x)
        # The plain (unsmoothed, unweighted) NLL, comparable across runs whatever the training objective.
        self.eval_loss[stage].update(F.cross_entropy(logits, y), weight=len(y))
        self.eval_metrics[stage].update(logits.softmax(dim=1), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulate validation metrics on the main logits."""
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulate test metrics on the main logits."""
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities (N, num_classes)."""
        x, _ = self._unpack(batch)
        return self(x).softmax(dim=1)

    def _finish(self, stage: str) -> dict[str, Any] | None:
        metrics, loss = self.eval_metrics[stage], self.eval_loss[stage]
        if not metrics["confusion_matrix"].update_called:
            return None
        report = compute_report(metrics, self.labels, float(loss.compute()))
        metrics.reset()
        loss.reset()
        logged = {"loss": report["loss"], "acc": report["accuracy"]}
        for key in ("f1_macro", "precision_macro", "recall_macro", "auroc_macro"):
            logged[key] = report[key]
        # Already reduced over ranks by torchmetrics; sync_dist only silences Lightning's DDP advice.
        self.log_dict({f"{stage}/{k}": float(v) for k, v in logged.items() if v is not None}, sync_dist=True)
        return report

    def on_validation_epoch_end(self) -> None:
        """Log the val scalars and keep the full report in `last_reports['val']`."""
        report = self._finish("val")
        if report is None or self.trainer.sanity_checking:
            return
        self.val_acc_best(report["accuracy"])
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)
        self.last_reports["val"] = report

    def on_test_epoch_end(self) -> None:
        """Log the test scalars and keep the full report in `last_reports['test']`."""
        report = self._finish("test")
        if report is not None:
            self.last_reports["test"] = report

    # ------------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        """The optimizer over trainable parameters only, plus the optional LR scheduler."""
        params = [p for p in self.parameters() if p.requires_grad]
        if self._optimizer_factory is not None:
            optimizer = self._optimizer_factory(params)
        else:
            factory, kwargs = _split_spec(self.hparams.optimizer or DEFAULT_OPTIMIZER, "optimizer")
            optimizer = factory(params, **kwargs)
        spec = self.hparams.scheduler
        if self._scheduler_factory is None and not spec:
            return optimizer
        config: dict[str, Any] = {"interval": "epoch", "frequency": 1, "monitor": "val/loss"}
        if self._scheduler_factory is not None:
            scheduler = self._scheduler_factory(optimizer)
        else:
            factory, kwargs = _split_spec(spec, "scheduler")
            config.update({k: kwargs.pop(k) for k in _LIGHTNING_KEYS if k in kwargs})
            if factory is torch.optim.lr_scheduler.OneCycleLR:
                config["interval"] = "step" if "interval" not in spec else config["interval"]
                kwargs.setdefault("max_lr", [g["lr"] for g in optimizer.param_groups])
                kwargs.setdefault("total_steps", int(self.trainer.estimated_stepping_batches))
            if factory is torch.optim.lr_scheduler.CosineAnnealingLR and "T_max" not in kwargs:
                steps = config["interval"] == "step"
                kwargs["T_max"] = int(self.trainer.estimated_stepping_batches if steps else self.trainer.max_epochs)
            scheduler = factory(optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, **config}}

    def configure_callbacks(self) -> list[pl.Callback]:
        """The gradual-unfreezing callback when `gradual_unfreeze` is set."""
        spec = self.hparams.gradual_unfreeze
        return [GradualUnfreeze(**spec)] if spec else []

    def on_fit_start(self) -> None:
        """Warn loudly when a frozen trunk has neither ImageNet weights nor checkpoint weights."""
        if not self._weights_from_checkpoint:
            warn_frozen_random(self.freeze_plan, self.hparams.pretrained, self.hparams.pretrained_file)
        log.info("Freezing: %s", self.freeze_plan.summary())
        frozen = [m for _, m in frozen_batchnorms(self.backbone)]
        if frozen:  # Lightning warns about eval-mode modules; these (and only exactly these) are intentional
            count = sum(1 for bn in frozen for _ in bn.modules())
            warnings.filterwarnings("ignore", message=rf"Found {count} module\(s\) in eval mode at the start")
            log.info("%d frozen BatchNorm layers stay in inference mode (Keras trainable=False)", len(frozen))

    # -------------------------------------------------------------------------------------- checkpoints
    def _check_class_count(self, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
        for head in head_names(self.backbone):
            key = f"backbone.{head}.weight"
            theirs, ours = state_dict.get(key), getattr(self.backbone.get_submodule(head), "weight", None)
            if theirs is not None and ours is not None and theirs.shape[0] != ours.shape[0]:
                raise PretrainedWeightsError(
                    f"{source} holds a {theirs.shape[0]}-class model ({key}) but this EcgClassifier was built for "
                    f"num_classes={ours.shape[0]}; use a checkpoint trained on the same {ours.shape[0]} labels, or "
                    f"build the model with num_classes={theirs.shape[0]}"
                )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint for another class count before any weights are copied."""
        self._check_class_count(checkpoint.get("state_dict", {}), "the checkpoint")
        self._weights_from_checkpoint = True

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """torch's load_state_dict with a clear error for another class count."""
        self._check_class_count(state_dict, "the state dict")
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._weights_from_checkpoint = True
        return result

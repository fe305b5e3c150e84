"""EcgClassifier: a timm backbone with aux loss, partial freezing and metrics, built from plain values only.

Every constructor argument is a plain value (Hydra `_partial_` optimizer/scheduler callables are replaced by a
plain description before `save_hyperparameters`), so checkpoints load with torch's `weights_only=True`.
`from_checkpoint(path)` (and `load_from_checkpoint`, routed through it) reads them with `models.checkpoint`'s
checked loader and works offline. Optimizer and scheduler names resolve through an allow-list of torch classes
only; a dotted path from a config or a checkpoint is never imported (`register_optimizer` is the opt-in).
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ecg_inception.data.settings import check_preprocessing
from ecg_inception.data.transforms import check_preprocessing_version, parse_image_size
from ecg_inception.errors import CheckpointError, ConfigValueError, EcgInceptionError, PretrainedWeightsError
from ecg_inception.models.backbone import create_backbone, head_names
from ecg_inception.models.checkpoint import load_checkpoint, stored_temperature
from ecg_inception.models.freezing import (
    GradualUnfreeze,
    apply_unfreeze,
    frozen_batchnorms,
    set_frozen_bn_eval,
    warn_frozen_random,
)
from ecg_inception.models.metrics import build_metrics, finish_stage
from ecg_inception.models.optim import (  # noqa: F401 - re-exported: the names users know from this module
    ALLOWED_OPTIMIZERS,
    ALLOWED_SCHEDULERS,
    DEFAULT_OPTIMIZER,
    OPTIMIZERS,
    SCHEDULERS,
    describe_callable,
    register_optimizer,
    register_scheduler,
    split_spec,
    to_plain,
)
from ecg_inception.models.trunk import TrunkFeatures, TrunkSplit, parse_trunk_cache, parse_verify, parse_views

log = logging.getLogger(__name__)

#: Checkpoint key of the best validation accuracy so far (a float), restored on load and resume.
VAL_ACC_BEST_KEY = "val_acc_best"
AUX_MIN_SIZE = 299  # timm's inception_v3 aux head fails on smaller inputs
#: Smallest input side each architecture's trunk accepts (inception_v3: 74 px fails in Mixed_7a's stride-2 convs).
TRUNK_MIN_SIZE: dict[str, int] = {"inception_v3": 75}
_LIGHTNING_KEYS = ("interval", "frequency", "monitor")


def min_input_size(model_name: str, aux_logits: bool) -> int | None:
    """The smallest input side the model accepts: 299 with inception's aux head, its trunk's minimum else (None when
    the architecture is not known here)."""
    arch = model_name.split(".", 1)[0]
    if aux_logits and arch == "inception_v3":
        return AUX_MIN_SIZE
    return TRUNK_MIN_SIZE.get(arch)


def check_image_size(image_size: Any, model_name: str, aux_logits: bool) -> None:
    """Refuse a `data.image_size` below the model's real minimum, naming the value and the minimum.

    Raises:
        ConfigValueError: when either side is below the minimum.
    """
    minimum = min_input_size(model_name, aux_logits)
    image_size = to_plain(image_size)
    if image_size is None or minimum is None:
        return
    sides = parse_image_size(image_size)
    if min(sides) < minimum:
        why = "with model.aux_logits=true (the aux head's 5x5 conv)" if aux_logits else "for its trunk"
        fix = "set model.aux_logits=false or " if aux_logits and minimum == AUX_MIN_SIZE else ""
        raise ConfigValueError(
            f"data.image_size={image_size}: {model_name} needs inputs of at least {minimum} px on each side {why}; "
            f"{fix}use data.image_size>={minimum}"
        )


class EcgClassifier(pl.LightningModule):
    """ECG printout classifier: timm backbone (aux logits optional), partial freezing, full val/test reports.

    `preprocessing` and `labels` ride along in the checkpoint, so evaluation and prediction use what
    training used. Load a trained model offline with `EcgClassifier.from_checkpoint(path)` (Lightning's
    `load_from_checkpoint` is routed through it).

    Args:
        model_name: the timm architecture.
        num_classes: number of output classes (the datamodule's, filled in by `train`).
        labels: class names in output order; stored in the checkpoint.
        pretrained: False/None: random init; True: the default tag; a string: that timm tag.
        pretrained_file: a local 1000-class timm or torchvision checkpoint; wins over `pretrained`.
        aux_logits: use inception_v3's auxiliary classifier (needs inputs of at least 299 px).
        aux_weight: weight of the aux loss during training.
        drop_rate: dropout before the final classifier.
        unfreeze: `{"blocks": N | "all"}` or `{"layers": N}`: what trains (docs/freezing.md).
        gradual_unfreeze: `{"schedule": {epoch: blocks}, "lr_factor": 0.1}`: unfreeze more during training.
        label_smoothing: cross-entropy label smoothing.
        class_weights: per-class loss weights (the datamodule's, with `balance: class_weights`).
        optimizer: a callable taking the trainable parameters (Hydra `_partial_: true`), or a plain dict
            such as `{"name": "sgd", "lr": 0.01}`; None: Adam.
        scheduler: a callable taking the optimizer, or a dict such as `{"name": "cosine"}` (may add
            "interval", "frequency" and "monitor"); None: no schedule.
        preprocessing: the datamodule's preprocessing (size, resize, crop, ink, ...); stored in the checkpoint.
        channels_last: NHWC weights and inputs.
        compile: `torch.compile` the backbone: True or a dict of its options.
        trunk_cache: train the tail on cached frozen-trunk activations: `auto`, `on` or `off`.
        trunk_cache_views: pre-drawn augmented views per image in the trunk cache.
        trunk_cache_verify: how often cached trunk entries are checked against their CRC32: `stat` or `full`.
        calibrate: fit a temperature on the validation split after fit (`training.train`;
            models/calibration.py); stored in the best checkpoint.

    Raises:
        ValueError: labels or class weights that do not match `num_classes`, unknown `unfreeze` keys, an
            unknown optimizer or scheduler name, a malformed `gradual_unfreeze`, or aux logits on inputs
            below 299 px.
        PretrainedWeightsError: the requested weights cannot be had.
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
        trunk_cache_verify: str = "stat",
        calibrate: bool = True,
    ) -> None:
        super().__init__()
        # Plain values first: save_hyperparameters() stores these locals as they are after this block.
        labels, unfreeze, gradual_unfreeze = to_plain(labels), to_plain(unfreeze), to_plain(gradual_unfreeze)
        class_weights, preprocessing = to_plain(class_weights), to_plain(preprocessing)
        if preprocessing is not None:
            preprocessing = check_preprocessing(preprocessing)
        self._optimizer_factory = optimizer if callable(optimizer) else None
        self._scheduler_factory = scheduler if callable(scheduler) else None
        optimizer = describe_callable(optimizer) if callable(optimizer) else to_plain(optimizer)
        scheduler = describe_callable(scheduler) if callable(scheduler) else to_plain(scheduler)
        num_classes = int(num_classes)
        self._validate(model_name, num_classes, labels, class_weights, unfreeze, gradual_unfreeze, optimizer,
                       scheduler, preprocessing, aux_logits, trunk_cache, trunk_cache_views, trunk_cache_verify)
        self.save_hyperparameters()
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()
        self.labels = list(labels) if labels else [str(i) for i in range(num_classes)]
        self.last_reports: dict[str, dict[str, Any]] = {}
        #: Temperature T of `calibrated_probabilities` (softmax(logits / T)); fitted on val after fit (see
        #: models.calibration) and saved in checkpoints as their top-level "temperature" entry; 1.0 = unscaled.
        self.temperature = 1.0
        #: (logits, targets) of the last val/test epoch on this rank, for calibration.
        self.last_logits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._epoch_logits: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}
        self._weights_from_checkpoint = False
        #: Set by features.trunk_cache.use_trunk_cache: batches may then be cached trunk features.
        self.trunk_split: TrunkSplit | None = None

    def _validate(
        self, model_name: str, num_classes: int, labels: list[str] | None, class_weights: list[float] | None,
        unfreeze: dict[str, Any] | None, gradual_unfreeze: dict[str, Any] | None, optimizer: Any, scheduler: Any,
        preprocessing: dict[str, Any] | None, aux_logits: bool, trunk_cache: Any, trunk_cache_views: Any,
        trunk_cache_verify: str,
    ) -> None:
        """Refuse inconsistent arguments before anything is built (the errors of the class docstring's Raises)."""
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
                split_spec(spec, what)  # unknown names fail now, not after the first epoch
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
        if size is not None:
            check_image_size(size, model_name, False)  # the trunk's own minimum (75 px for inception_v3)
        parse_trunk_cache(trunk_cache), parse_views(trunk_cache_views)  # fail fast; train() acts on them
        parse_verify(trunk_cache_verify)

    def configure_models(self) -> None:
        """The timm backbone (weights, head for `num_classes`), its memory format, compilation and freezing."""
        hp = self.hparams
        self.backbone = create_backbone(hp.model_name, hp.num_classes, hp.aux_logits, hp.drop_rate, hp.pretrained,
                                        hp.pretrained_file)
        if hp.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if hp.compile:
            # In place (nn.Module.compile): state_dict keys stay the same, so checkpoints load either way. The
            # trunk cache calls the backbone's blocks one by one and so runs them uncompiled.
            self.backbone.compile(**(hp.compile if isinstance(hp.compile, dict) else {}))
        self.freeze_plan = apply_unfreeze(self.backbone, **(hp.unfreeze or {}))

    def configure_losses(self) -> None:
        """The class weights of the cross-entropy (a non-persistent buffer: they ride in the hyper-parameters)."""
        class_weights = self.hparams.class_weights
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weight", weight, persistent=False)

    def configure_metrics(self) -> None:
        """Train accuracy, the val/test metric collections and losses, and the best val accuracy so far."""
        num_classes = self.hparams.num_classes
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.eval_metrics = nn.ModuleDict({s: build_metrics(num_classes) for s in ("val", "test")})
        self.eval_loss = nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})
        # Saved as checkpoint["val_acc_best"] (on_save_checkpoint), so that a resume keeps the best so far.
        self.val_acc_best = MaxMetric()

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, map_location: Any = "cpu", strict: bool = True, **overrides: Any
    ) -> EcgClassifier:
        """Build the model a checkpoint describes and load its weights; never runs code from the file.

        The file is read by `models.checkpoint.load_checkpoint` (weights_only, checked hyper-parameters); no
        weights are downloaded (pretrained=False, pretrained_file=None unless overridden). This is the one
        entry point eval, the predictor and user code share.

        Args:
            path: the `.ckpt` file.
            map_location: where the tensors go (torch.load's map_location; default the CPU).
            strict: require the state dict to match the model exactly.
            **overrides: constructor arguments that replace the stored ones.

        Returns:
            The model, with the checkpoint's weights, on the device of its tensors.

        Raises:
            CheckpointError: the file is not a valid ecg_inception checkpoint (corrupt, unsafe values, names
                outside the allow-lists, weights that do not fit the model it describes).
            PretrainedWeightsError: `num_classes` was overridden to another class count than the weights have.
        """
        checkpoint = load_checkpoint(path, map_location)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        hparams = checkpoint["hyper_parameters"]
        ignored = sorted(set(hparams) - accepted)
        if ignored:
            log.warning("%s: ignoring hyper-parameters this version does not know: %s", path, ignored)
        kwargs = {k: v for k, v in hparams.items() if k in accepted}
        kwargs.update({"pretrained": False, "pretrained_file": None, **overrides})
        try:
            model = cls(**kwargs)
            model.on_load_checkpoint(checkpoint)
            model.load_state_dict(checkpoint["state_dict"], strict=strict)
        except EcgInceptionError as exc:
            if isinstance(exc, CheckpointError):
                raise CheckpointError(path, exc.reason) from None
            if isinstance(exc, ConfigValueError):
                raise CheckpointError(path, str(exc)) from None
            raise
        except (ValueError, TypeError, RuntimeError) as exc:
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(path, line) from None
        tensor = next(iter(checkpoint["state_dict"].values()))
        return model.to(tensor.device)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> EcgClassifier:
        """Lightning's entry point, routed through `from_checkpoint` (safe load, checked values, no download).

        Args:
            checkpoint_path: the `.ckpt` file.
            map_location: where the tensors go (default the CPU).
            hparams_file: not supported (the checkpoint's own hyper-parameters are used); must be None.
            strict: require the state dict to match the model exactly (default True).
            weights_only: must be None or True: checkpoints are always read as data.
            **kwargs: constructor arguments that replace the stored ones.

        Returns:
            The model with the checkpoint's weights.

        Raises:
            CheckpointError: see `from_checkpoint`.
            ValueError: `hparams_file` or `weights_only=False` was given.
        """
        if hparams_file is not None:
            raise ValueError("EcgClassifier.load_from_checkpoint: hparams_file is not supported; pass overrides")
        if weights_only is False:
            raise ValueError("EcgClassifier checkpoints are plain data; weights_only=False is never needed")
        return cls.from_checkpoint(
            checkpoint_path, map_location=map_location or "cpu", strict=True if strict is None else strict, **kwargs
        )

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
        """The backbone's raw output on images, or only its tail on cached trunk features (features.trunk_cache)."""
        if isinstance(x, TrunkFeatures):
            if self.trunk_split is None:
                raise RuntimeError("cached trunk features need model.trunk_split (see features.trunk_cache)")
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
        # sync_dist: the epoch mean over all ranks' batches (a no-op in one process); train/acc syncs by itself.
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = self._unpack(batch)
        logits = self(x)
        # The plain (unsmoothed, unweighted) NLL, comparable across runs whatever the training objective.
        self.eval_loss[stage].update(F.cross_entropy(logits, y), weight=len(y))
        self.eval_metrics[stage].update(logits.softmax(dim=1), y)
        self._epoch_logits[stage].append((logits.detach().float().cpu(), y.detach().cpu()))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulate validation metrics on the main logits."""
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulate test metrics on the main logits."""
        self._eval_step(batch, "test")

    def calibrated_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits / temperature): the probabilities prediction and export report."""
        return (logits / self.temperature).softmax(dim=1)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities (N, num_classes), temperature-scaled."""
        x, _ = self._unpack(batch)
        return self.calibrated_probabilities(self(x))

    def _finish(self, stage: str) -> dict[str, Any] | None:
        collected, self._epoch_logits[stage] = self._epoch_logits[stage], []
        if collected:
            self.last_logits[stage] = (torch.cat([z for z, _ in collected]), torch.cat([t for _, t in collected]))
        finished = finish_stage(self.eval_metrics[stage], self.eval_loss[stage], self.labels, stage)
        if finished is None:
            return None
        report, scalars = finished
        # Already reduced over ranks by torchmetrics; sync_dist only silences Lightning's DDP advice.
        self.log_dict(scalars, sync_dist=True)
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
            factory, kwargs = split_spec(self.hparams.optimizer or DEFAULT_OPTIMIZER, "optimizer")
            optimizer = factory(params, **kwargs)
        spec = self.hparams.scheduler
        if self._scheduler_factory is None and not spec:
            return optimizer
        config: dict[str, Any] = {"interval": "epoch", "frequency": 1, "monitor": "val/loss"}
        if self._scheduler_factory is not None:
            scheduler = self._scheduler_factory(optimizer)
        else:
            factory, kwargs = split_spec(spec, "scheduler")
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
            # Lightning warns once, in the fit loop's start, between this hook and on_train_start: the filter lives
            # only that long (a catch_warnings scope closed by on_train_start, or teardown if the fit fails first).
            self._end_warning_scope()
            scope = warnings.catch_warnings()
            scope.__enter__()
            self._warning_scope = scope
            warnings.filterwarnings("ignore", message=rf"Found {count} module\(s\) in eval mode at the start")
            log.info("%d frozen BatchNorm layers stay in inference mode (Keras trainable=False)", len(frozen))

    def on_train_start(self) -> None:
        """Close the warning filter `on_fit_start` opened (Lightning's eval-mode warning has been issued)."""
        self._end_warning_scope()

    def teardown(self, stage: str) -> None:
        """Close the warning filter of a fit that stopped before `on_train_start`."""
        self._end_warning_scope()

    def _end_warning_scope(self) -> None:
        scope, self._warning_scope = getattr(self, "_warning_scope", None), None
        if scope is not None:
            scope.__exit__(None, None, None)

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
        """Refuse a checkpoint for another class count before any weights are copied; restore `val_acc_best`
        and the temperature (missing: 1.0).

        The best validation accuracy so far (`val/acc_best`, what sweeps optimise) lives outside the state dict,
        so that the state dict holds weights only (fine-tuning loads it as `pretrained_file`). A checkpoint
        without it (older, or weights-only) leaves the metric empty.
        """
        self._check_class_count(checkpoint.get("state_dict", {}), "the checkpoint")
        best = checkpoint.get(VAL_ACC_BEST_KEY)
        self.val_acc_best.reset()
        if best is not None:
            if isinstance(best, bool) or not isinstance(best, (int, float)) or not math.isfinite(best):
                raise CheckpointError("checkpoint", f"{VAL_ACC_BEST_KEY} is not a finite number: {best!r}")
            self.val_acc_best.update(torch.tensor(float(best)))
        # Checked here too: trainer.fit(ckpt_path=...) reads the file without load_checkpoint.
        self.temperature = stored_temperature(checkpoint, "checkpoint")
        self._weights_from_checkpoint = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the best validation accuracy so far as a plain float (None before any validation epoch), and the
        temperature."""
        metric = self.val_acc_best
        checkpoint[VAL_ACC_BEST_KEY] = float(metric.max_value) if metric.update_called else None
        checkpoint["temperature"] = float(self.temperature)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """torch's load_state_dict with a clear error for another class count."""
        self._check_class_count(state_dict, "the state dict")
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._weights_from_checkpoint = True
        return result

"""Training and evaluation as pure functions of a composed Hydra config.

`train(cfg) -> (metrics, objects)` and `evaluate(cfg) -> (metrics, objects)` do all the work; the console scripts
in `ecg_inception.cli` only wrap them with `@hydra.main`. Tests call them with configs from the compose API.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
import yaml
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from ecg_inception.callbacks import BestWeights, FiniteLoss
from ecg_inception.core.locks import file_lock
from ecg_inception.core.provenance import software
from ecg_inception.data.datamodule import EcgDataModule
from ecg_inception.data.manifest import Manifest
from ecg_inception.data.settings import check_run_data
from ecg_inception.data.whole_folder import (
    check_folder,
    trained_on,
    training_copies,
    write_whole_folder_manifest,
)
from ecg_inception.distributed import is_rank_zero
from ecg_inception.errors import ConfigValueError, DatasetError, EnsembleError
from ecg_inception.features.trunk_cache import TrunkCachedDataModule, use_trunk_cache
from ecg_inception.inference.ensemble import EnsembleEvaluation, load_ensemble
from ecg_inception.models.backbone import check_pretrained_available
from ecg_inception.models.calibration import calibration_report, fit_temperature, separable
from ecg_inception.models.checkpoint import load_checkpoint
from ecg_inception.models.module import EcgClassifier
from ecg_inception.models.pretrained import check_finetune_preprocessing, reinit_heads, stored_training
from ecg_inception.report import MetricsHistory, write_report
from ecg_inception.resume import (
    CHECKPOINT_FACTOR,
    AtomicCheckpointIO,
    CSVLogger,
    RngState,
    check_exact_resume,
    check_output_dir,
    command_line_keys,
    explicit_run_dir,
    finished_run,
    last_checkpoint_runs,
    resolve_ckpt_path,
    resumed_step,
    state_bytes,
)
from ecg_inception.run_setup import (
    check_train_config,
    data_overrides_for_weights,
    fit_with_status,
    report_excluded,
    split_description,
)
from ecg_inception.sweep_summary import in_multirun

log = logging.getLogger(__name__)

SPLITS_FILE = "splits.csv"
#: metrics.json `status`: the run finished, its loss became non-finite, or it stopped on another error.
STATUSES = ("ok", "diverged", "failed")
EVAL_SPLITS = ("val", "test")


def instantiate_named(group: str, group_cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a named-config group (callbacks, logger); entries set to null are skipped.

    Raises:
        ConfigValueError: an entry that is not a config with `_target_`.
    """
    objects: list[Any] = []
    for name, conf in (group_cfg or {}).items():
        if conf is None:
            continue
        if not isinstance(conf, DictConfig) or "_target_" not in conf:
            raise ConfigValueError(f"{group}.{name}: expected a config with _target_, got {conf!r}")
        objects.append(instantiate(conf))
    return objects


def instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list[Callback]:
    """The Lightning callbacks of `cfg.callbacks`."""
    return instantiate_named("callbacks", callbacks_cfg)


def instantiate_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    """The Lightning loggers of `cfg.logger`."""
    return instantiate_named("logger", logger_cfg)


def _split_manifest_for(cfg: DictConfig, ckpt: Path | None) -> str | None:
    """The manifest this run must reuse: data.split_manifest, else the resumed run's splits.csv."""
    if cfg.data.get("split_manifest"):
        return str(cfg.data.split_manifest)
    if ckpt is not None:
        candidate = ckpt.parent.parent / SPLITS_FILE
        if candidate.is_file():
            log.info("Resuming: reusing the split manifest %s", candidate)
            return str(candidate)
    return None


def setup_datamodule(
    cfg: DictConfig, output_dir: Path, split_manifest: str | None, **overrides: Any
) -> EcgDataModule:
    """Instantiate cfg.data, prepare and set it up; the manifest it used is written to the run dir.

    A sweep config may set `shared_split_manifest`: the first job creates that file (under a lock) and every
    job reuses it, so all grid points see exactly the same split. `overrides` (values read back from a
    checkpoint or a run folder, already checked) go to the constructor as they are: Hydra never sees them.
    Only rank 0 of a distributed run writes the run dir's copy; the other ranks make (or read) the same split
    without writing it.
    """
    shared = cfg.get("shared_split_manifest")
    own_copy = str(output_dir / SPLITS_FILE) if is_rank_zero() else None
    if split_manifest is None and shared:
        shared_path = Path(str(shared))
        with file_lock(shared_path.with_name(shared_path.name + ".lock")):
            if not shared_path.is_file():
                dm = instantiate(cfg.data, _partial_=True)(manifest_out=str(shared_path), **overrides)
                dm.prepare_data()
                dm.setup("fit")
                if own_copy is not None:
                    shutil.copyfile(shared_path, own_copy)
                report_excluded(dm.manifest, shared_path)
                return dm
        split_manifest = str(shared_path)
    dm = instantiate(cfg.data, _partial_=True)(split_manifest=split_manifest, manifest_out=own_copy, **overrides)
    dm.prepare_data()
    dm.setup("fit")
    report_excluded(dm.manifest, output_dir / SPLITS_FILE)
    return dm


def _writes_checkpoints(callbacks: list[Callback], cfg: DictConfig) -> bool:
    """Whether the fit writes checkpoints into the run folder (ModelCheckpoint, or BestWeights' one file)."""
    if cfg.trainer.get("enable_checkpointing") is False:
        return False
    return any(isinstance(c, ModelCheckpoint) or (isinstance(c, BestWeights) and c.save_path) for c in callbacks)


def _best_checkpoint(callbacks: list[Callback]) -> tuple[str | None, str | None]:
    """(path of the best checkpoint, what to pass as ckpt_path to validate/test).

    With ModelCheckpoint the best file is loaded for testing; BestWeights has already put the best weights
    back into the model, so testing uses the model as it is.
    """
    for cb in callbacks:  # a checkpoint without a monitor (last.ckpt) is the latest, not the best
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path:
            return cb.best_model_path, cb.best_model_path
    for cb in callbacks:
        if isinstance(cb, BestWeights):
            return cb.best_model_path or None, None
    return None, None


def _scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 0)() == 1}


def store_temperature(path: str | Path, temperature: float) -> None:
    """Write `temperature` into the checkpoint at `path` as its top-level "temperature" entry, atomically.

    The file is rewritten beside itself and renamed over the original, so a reader never sees half a file. It is
    read memory-mapped (still `weights_only`): the tensors go from the mapped file straight into the new one.
    """
    path = Path(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    checkpoint["temperature"] = float(temperature)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def calibrate_model(model: EcgClassifier, best_checkpoint: str | None) -> float:
    """Fit the temperature on the val logits of the last validation (the best weights) and keep it.

    It is set on `model` and written into the best checkpoint (`store_temperature`), which ModelCheckpoint wrote
    before any temperature existed; `Predictor` and the exports read it from there.
    """
    if "val" not in model.last_logits:
        log.warning("no validation logits: the temperature stays %.3f", model.temperature)
        return model.temperature
    model.temperature = fit_temperature(*model.last_logits["val"])
    if separable(*model.last_logits["val"]):
        log.warning("Temperature scaling: the model classifies every val page right, so no temperature minimises "
                    "the val NLL; T stays 1")  # fmt: skip
    else:
        log.info("Temperature scaling: T = %.4f (fitted on val)", model.temperature)
    if best_checkpoint and Path(best_checkpoint).is_file():
        try:
            store_temperature(best_checkpoint, model.temperature)
        except Exception as exc:  # noqa: BLE001 - a finished fit must not be lost over the temperature
            log.error("could not write the temperature into %s (%s: %s): predictions from that file use T = 1",
                      best_checkpoint, type(exc).__name__, exc)
    return model.temperature


def _eval_members(cfg: DictConfig) -> list[Path]:
    """`cfg.members` (absent, null or a list of checkpoint paths) as paths; anything else is refused."""
    members = cfg.get("members")
    if members is None:
        return []
    if isinstance(members, (str, bytes)) or not OmegaConf.is_list(members):
        raise ConfigValueError(f"members={members!r}: give a list of checkpoint files, e.g. members=[b.ckpt,c.ckpt]")
    return [Path(str(m)) for m in members]


def _members_trained_on(members: list[Path], manifest: Manifest, splits: list[str],
                        eval_all: bool) -> dict[str, int | None]:
    """Per ensemble member, how many scored pages its run trained on (same bytes or duplicate group; None: its
    run's splits.csv is not beside it, which is logged). On a run split any such page is refused: an ensemble
    is scored on pages none of its members saw, as a single model is; with eval_all it is counted, as for the
    checkpoint itself.

    Raises:
        EnsembleError: a member whose run trained on a page of the split being scored.
    """
    rows = [r for r in manifest.rows if r.split in splits]
    out: dict[str, int | None] = {}
    for member in members:
        run_manifest = member.parent.parent / SPLITS_FILE
        seen = trained_on(rows, run_manifest)
        out[str(member)] = None if seen is None else len(seen)
        if seen is None:
            log.warning("%s: no %s beside it (%s): cannot check that its run never trained on the pages scored here",
                        member, SPLITS_FILE, run_manifest)
        elif seen and not eval_all:
            raise EnsembleError(
                f"{member}: its run trained on {len(seen)} of the {len(rows)} pages scored here (same file or "
                f"duplicate group in the training split of {run_manifest}; e.g. {seen[0]}): ensemble members must "
                f"share the checkpoint's split (the same data.root and data.seed, other training seeds)"
            )
    return out


def _with_calibration(model: EcgClassifier | EnsembleEvaluation, split: str) -> dict[str, Any] | None:
    """The split's report plus ECE/NLL before and after temperature scaling (`calibration`; an ensemble's
    probabilities as they are: its log-probabilities with T = 1)."""
    report = model.last_reports.get(split)
    if report is None or split not in model.last_logits:
        return report
    return {**report, "calibration": calibration_report(*model.last_logits[split], model.temperature)}


def plots_enabled(cfg: DictConfig) -> bool:
    """`cfg.plots`: true or false as given; `auto` draws in a single run and not in the jobs of a multirun.

    A sweep's jobs are compared in `sweep_summary.csv`; their figures (~0.5 s of matplotlib per job) are drawn
    only on request (`plots=true`).

    Raises:
        ConfigValueError: any other value.
    """
    value = cfg.get("plots", True)
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() == "auto":
        return not in_multirun()
    raise ConfigValueError(f"plots={value!r}: expected true, false or auto")


def get_metric_value(metrics: dict[str, Any], name: str | None) -> float | None:
    """The value a sweeper optimises, from the logged scalars of a run.

    Raises:
        ConfigValueError: when `name` was not logged.
    """
    if not name:
        return None
    logged = metrics.get("logged", {})
    if name not in logged:
        raise ConfigValueError(f"optimized_metric={name!r} was not logged; logged: {sorted(logged)}")
    return float(logged[name])


def resume_step_of(ckpt: Path | None) -> int | None:
    """The global step of the checkpoint a run resumes from (None: a fresh fit), read before any data work.

    Raises:
        CheckpointError: a corrupt or unsafe checkpoint (named).
    """
    if ckpt is None:
        return None
    step = resumed_step(load_checkpoint(ckpt))
    log.info("Resuming from %s (step %d)", ckpt, step)
    return step


def build_trainer(
    cfg: DictConfig, model: pl.LightningModule, output_dir: Path, resume_step: int | None
) -> tuple[pl.Trainer, MetricsHistory]:
    """The run's Trainer and its metrics history, as `train` and `pretraining.pretrain` both need them.

    The callbacks are the configured ones plus the run's own: the `MetricsHistory` returned, `FiniteLoss`
    (a non-finite loss stops the fit) and `RngState` (exact resume). Checks that the run folder has room for
    the checkpoints, appends to `metrics.csv` when resuming (never truncates the rows logged before the
    checkpoint), turns off Lightning's own per-epoch checkpoint when no ModelCheckpoint is configured, and
    writes checkpoints atomically (a failed save keeps the previous file).

    Args:
        cfg: the composed config (`callbacks`, `trainer`, `logger`).
        model: the module to fit (its size sets the room the checkpoints need).
        output_dir: the run folder.
        resume_step: the global step of the checkpoint being resumed (`resume_step_of`), or None.

    Returns:
        The instantiated Trainer and the history callback it holds.

    Raises:
        OutputDirError: the checkpoint folder is not writable or has no room for two checkpoints.
    """
    history = MetricsHistory()
    callbacks: list[Callback] = [*instantiate_callbacks(cfg.get("callbacks")), history, FiniteLoss(), RngState()]
    if is_rank_zero() and _writes_checkpoints(callbacks, cfg):
        check_output_dir(output_dir / "checkpoints", CHECKPOINT_FACTOR * state_bytes(model))
    loggers = instantiate_loggers(cfg.get("logger"))
    for logger in loggers:
        if resume_step is not None and isinstance(logger, CSVLogger):
            logger.resume_from(resume_step)  # append to metrics.csv, never truncate the earlier rows
    extra: dict[str, Any] = {}
    if "enable_checkpointing" not in cfg.trainer and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        # No ModelCheckpoint configured (callbacks=sweep/none): Lightning would otherwise add its own and
        # write a full checkpoint every epoch, which costs more than a cached tail epoch.
        extra["enable_checkpointing"] = False
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra)
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # temp file + os.replace: a failed save keeps
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # the previous last.ckpt
    return trainer, history


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit on the training split, test the best checkpoint, write the run report (`ecg-inception-train`).

    Args:
        cfg: a composed `train.yaml` config (Hydra's compose API or `@hydra.main`); `cfg.paths.output_dir`
            must resolve to the run directory, which is created if needed.

    Returns:
        `(metrics, objects)`: `metrics` is what `metrics.json` holds (labels, protocol, leaky, seed, counts,
        best checkpoint, epochs, wall time, the val and test reports of the best checkpoint, every logged
        scalar); `objects` holds the live `cfg`, `datamodule`, `model`, `trainer` and `history`.

    Raises:
        PretrainedWeightsError: ImageNet weights were asked for and cannot be had (before any data work).
        CheckpointNotFoundError: `ckpt_path` names no checkpoint (or `last` finds none).
        DatasetError: `data.root` is missing or unusable.
        ManifestError: `data.split_manifest` does not fit the data.
        ConfigValueError: a config value is invalid (bad image size, a group entry without `_target_`, ...).
        ValueError: a value the data module refuses (unknown protocol, ...).
    """
    if cfg.get("pretraining"):  # experiment=pretrain_ptbxl: multi-label printouts of real signals
        from ecg_inception.pretraining import pretrain

        return pretrain(cfg)
    started = time.perf_counter()
    software()  # the code as this run starts, not as it is when metrics.json is written (cached for it)
    output_dir = Path(str(cfg.paths.output_dir))
    check_output_dir(output_dir)  # writable (room for the checkpoints is checked once the model is built)
    if cfg.get("ckpt_path") == "auto" and explicit_run_dir():
        done = finished_run(output_dir, cfg)
        if done is not None:  # a sweep run again in its own sweep dir: this job is done
            log.info("ckpt_path=auto: %s already finished with this config (metrics.json: ok); not run again",
                     output_dir)
            return done, {"cfg": cfg, "skipped": True}
    if is_rank_zero():  # a distributed run's files are written once, by rank 0
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    pl.seed_everything(int(cfg.seed), workers=True)

    # Fail fast (before any data is generated) when ImageNet weights cannot be had.
    check_pretrained_available(
        str(cfg.model.model_name), cfg.model.get("pretrained"), cfg.model.get("pretrained_file")
    )
    check_train_config(cfg)
    ckpt = resolve_ckpt_path(
        cfg.get("ckpt_path"), output_dir, Path(str(cfg.paths.log_dir)), str(cfg.task_name)
    )
    if not cfg.get("train", True):
        return _test_checkpoint(cfg, ckpt)
    resume_step = resume_step_of(ckpt)  # a corrupt or unsafe file fails here, before any data work
    if ckpt is not None:
        check_exact_resume(cfg)
    datamodule = setup_datamodule(
        cfg, output_dir, _split_manifest_for(cfg, ckpt), drop_last=bool(cfg.model.get("aux_logits", False)),
        **data_overrides_for_weights(cfg),
    )
    # Fine-tuning from an ecg_inception checkpoint (e.g. pretrain_ptbxl): same preprocessing, or a clear error.
    stored = stored_training(cfg.model.pretrained_file) if cfg.model.get("pretrained_file") else None
    if stored is not None:
        check_finetune_preprocessing(cfg.model.pretrained_file, stored["preprocessing"], datamodule.preprocessing)
    model: EcgClassifier = instantiate(
        cfg.model,
        num_classes=datamodule.num_classes,
        labels=list(datamodule.labels),
        class_weights=datamodule.class_weights,
        preprocessing=datamodule.preprocessing,
    )
    if stored is not None:
        reinit_heads(model.backbone, stored["labels"], datamodule.labels)
    # Frozen trunk: train the tail on cached activations when model.trunk_cache (auto|on|off) allows it; the
    # decision reads the model's own (plain) hyper-parameters, not the config.
    hp = model.hparams
    loaders = use_trunk_cache(model, datamodule, hp.get("trunk_cache", "auto"), hp.get("trunk_cache_views"),
                              hp.get("trunk_cache_verify"))
    trainer, history = build_trainer(cfg, model, output_dir, resume_step)

    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer, "history": history}
    stopped = fit_with_status(
        lambda: trainer.fit(model=model, datamodule=loaders, ckpt_path=str(ckpt) if ckpt else None,
                            weights_only=True),
        output_dir, split_description(datamodule), trainer, history, started,
    )
    if stopped is not None:
        return stopped, objects
    logged = _scalar_metrics(trainer)
    best, eval_ckpt = _best_checkpoint(trainer.callbacks)
    trainer.validate(model=model, datamodule=loaders, ckpt_path=eval_ckpt, verbose=False, weights_only=True)
    for key, value in _scalar_metrics(trainer).items():  # a resumed fit that had already finished logs nothing
        logged.setdefault(key, value)
    if model.hparams.get("calibrate", True):
        calibrate_model(model, best)
    if cfg.get("test", True):
        trainer.test(model=model, datamodule=loaders, ckpt_path=eval_ckpt, verbose=False, weights_only=True)
    logged.update({k: v for k, v in _scalar_metrics(trainer).items() if k.startswith("test/")})

    manifest = datamodule.manifest
    metrics: dict[str, Any] = {
        "status": "ok",
        "labels": list(datamodule.labels),
        "protocol": manifest.protocol,
        "leaky": bool(manifest.leaky),
        "seed": int(cfg.seed),
        "counts": manifest.counts(),
        "best_checkpoint": best,
        "epochs": int(trainer.current_epoch),
        "world_size": int(trainer.world_size),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "val": _with_calibration(model, "val"),
        "test": _with_calibration(model, "test"),
        "logged": logged,
        "trunk_cache": loaders.summary() if isinstance(loaders, TrunkCachedDataModule) else None,
    }
    if is_rank_zero():
        write_report(output_dir, metrics, history.rows, plots=plots_enabled(cfg))
        log.info("Report written to %s", output_dir)
    return metrics, objects


def _test_checkpoint(cfg: DictConfig, ckpt: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """`train=false`: score the given checkpoint exactly as `ecg-inception-eval` does (same function)."""
    if ckpt is None:
        raise ConfigValueError(
            "train=false needs ckpt_path=/path/to/model.ckpt (or ckpt_path=last): without training there is no "
            "model to test"
        )
    ev = cfg.copy()
    OmegaConf.set_struct(ev, False)
    ev.ckpt_path = str(ckpt)
    ev.splits = ["val", "test"] if cfg.get("test", True) else ["val"]
    return evaluate(ev)


def _run_data_settings(cfg: DictConfig, ckpt: Path) -> dict[str, Any]:
    """Data settings of the run a checkpoint came from (its config.yaml), so eval sees the same data.

    A non-null `data.root` given to eval wins; so does a `data.protocol` given on the command line
    (`command_line_keys`); otherwise the protocol, and always the seed and balancing, follow the run. The
    file is read as plain YAML (no interpolation) and only its `RUN_DATA_KEYS` are used, each checked
    against `data.settings.RUN_DATA_SCHEMA`: a run folder is data, never a config to instantiate.
    """
    run_config = ckpt.parent.parent / "config.yaml"
    if not run_config.is_file():
        return {}
    try:
        loaded = yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigValueError(f"{run_config}: not a readable YAML run config ({exc})") from None
    run_data = loaded.get("data", {}) if isinstance(loaded, dict) else None
    settings = check_run_data(run_data, f"{run_config}: data")
    if cfg.data.get("root") is not None:
        settings.pop("root", None)
    if "data.protocol" in (command_line_keys() or ()):
        settings.pop("protocol", None)
    return settings


def _eval_splits(cfg: DictConfig) -> list[str]:
    """The splits eval scores: val and/or test (with eval_all, test only: the whole folder is the test role)."""
    if cfg.get("eval_all", False):
        return ["test"]
    splits = [str(s) for s in (cfg.get("splits") or [])]
    bad = [s for s in splits if s not in EVAL_SPLITS]
    if bad or not splits:
        raise ConfigValueError(
            f"splits={splits}: eval scores {list(EVAL_SPLITS)} (one or both); the train split is what the model "
            "was fitted on and is not scored. To score other files, use data.root=/folder eval_all=true"
        )
    return splits


def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate a checkpoint with the preprocessing, labels and split of its run (`ecg-inception-eval`).

    With `eval_all=true` and `data.root=/folder`, every file of that folder is scored (test role), and the report
    says how many of them are byte copies of the run's training files. With `members=[b.ckpt, ...]` the
    checkpoint and those members are scored as one seed ensemble (`inference.ensemble`: the mean of their
    calibrated probabilities) on the checkpoint's run split; the members must share its labels and preprocessing.

    Args:
        cfg: a composed `eval.yaml` config; `cfg.ckpt_path` names the checkpoint (a path or `last`),
            `cfg.splits` the splits to evaluate, `cfg.paths.output_dir` the run directory to write.

    Returns:
        `(metrics, objects)`: `metrics` is what the run's `metrics.json` holds (labels, protocol, leaky,
        checkpoint, split manifest, counts and one report per evaluated split); `objects` holds the live
        `cfg`, `datamodule`, `model` and `trainer`.

    Raises:
        ConfigValueError: splits other than val/test, eval_all without data.root, or `members` not a list.
        DatasetError: a folder whose classes (or labels) are not the checkpoint's.
        EnsembleError: members that differ from the checkpoint in labels or preprocessing, or one given twice.
        CheckpointNotFoundError: `ckpt_path` names no checkpoint.
        ManifestError: the split manifest does not fit the data.
    """
    software()  # the code as this run starts (cached for metrics.json)
    output_dir = Path(str(cfg.paths.output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True)
    splits = _eval_splits(cfg)
    if str(cfg.ckpt_path) in ("last", "auto"):  # eval writes a folder of its own: no "this run" to take it from
        runs = last_checkpoint_runs(Path(str(cfg.paths.log_dir)), "train")
        raise ConfigValueError(
            f"ckpt_path={cfg.ckpt_path}: eval does not guess which run to score; give ckpt_path=<run dir>/checkpoints/last.ckpt"
            f" (runs with a last.ckpt, newest first: {'; '.join(map(str, runs[:5])) or 'none'})"
        )
    ckpt = resolve_ckpt_path(str(cfg.ckpt_path), output_dir, Path(str(cfg.paths.log_dir)), "train")
    assert ckpt is not None
    members = _eval_members(cfg)
    scored: EcgClassifier | EnsembleEvaluation
    if members:  # checked (labels, preprocessing, files) before any data is touched
        scored = EnsembleEvaluation(load_ensemble([ckpt, *members]))
        model = cast(EcgClassifier, scored.ensemble.members[0])  # ckpt's own: it sets up the data, as below
    else:
        model = scored = EcgClassifier.from_checkpoint(ckpt)
    prep = dict(model.hparams.get("preprocessing") or {})  # checked by load_checkpoint: plain, allowed values
    overrides: dict[str, Any] = _run_data_settings(cfg, ckpt)
    for key_ckpt, key_data in (
        ("model_name", "model_name"),
        ("size", "image_size"),
        ("resize", "resize"),
        ("crop", "crop"),
        ("ink", "ink"),
        ("mean", "mean"),
        ("std", "std"),
        ("interpolation", "interpolation"),
        ("version", "preprocess_version"),
    ):
        if key_ckpt in prep:
            overrides[key_data] = prep[key_ckpt]
    labels = list(model.hparams.get("labels") or [])
    run_manifest = ckpt.parent.parent / SPLITS_FILE
    if cfg.get("eval_all", False):
        if cfg.data.get("root") is None:
            raise ConfigValueError("eval_all=true needs data.root=/path/to/labelled/folder")
        # The manifest is made under the protocol the data module loads it with: the run's, unless given.
        protocol = str(overrides.get("protocol", cfg.data.get("protocol", "leakfree")))
        split_manifest: str | None = str(write_whole_folder_manifest(
            cfg.data.root, protocol, labels, output_dir / "whole_folder.csv"))
    else:
        split_manifest = _split_manifest_for(cfg, ckpt)
    if split_manifest is None:
        log.warning(
            "%s: no splits.csv beside this checkpoint and no data.split_manifest given: the data is "
            "split again with the run's seed and protocol",
            ckpt,
        )
    datamodule = setup_datamodule(cfg, output_dir, split_manifest, **overrides)
    if labels and labels != list(datamodule.labels):
        raise DatasetError(
            f"{ckpt}: the checkpoint was trained on labels {labels}, the data has {list(datamodule.labels)}"
        )
    if cfg.data.get("root") is not None:  # a folder given to eval: its classes must be the checkpoint's
        check_folder(datamodule.dataset_root(), labels or list(datamodule.labels), datamodule.manifest)
    members_trained_on = _members_trained_on(members, datamodule.manifest, splits, bool(cfg.get("eval_all", False)))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False)
    logged: dict[str, float] = {}
    if "val" in splits:
        trainer.validate(model=scored, datamodule=datamodule, verbose=False)
        logged.update(_scalar_metrics(trainer))
    if "test" in splits:
        trainer.test(model=scored, datamodule=datamodule, verbose=False)
        logged.update(_scalar_metrics(trainer))
    manifest = datamodule.manifest
    metrics: dict[str, Any] = {
        "status": "ok",
        "labels": list(datamodule.labels),
        "protocol": manifest.protocol,
        "leaky": bool(manifest.leaky),
        "checkpoint": str(ckpt),
        "split_manifest": split_manifest or "re-split (no manifest found)",
        "counts": manifest.counts(),
    }
    if isinstance(scored, EnsembleEvaluation):
        metrics["ensemble"] = {"members": [str(ckpt), *map(str, members)],
                               "temperatures": scored.ensemble.temperatures,
                               "members_trained_on": members_trained_on}  # fmt: skip
    for split in splits:
        metrics[split] = _with_calibration(scored, split)
    if cfg.get("eval_all", False):
        metrics["eval_all"] = True
        metrics["training_copies"] = training_copies((r.sha256 for r in manifest.rows), run_manifest)
        log.info("eval_all: %s", metrics["training_copies"]["note"])
    metrics["logged"] = logged
    if is_rank_zero():
        write_report(output_dir, metrics, plots=plots_enabled(cfg))
    log.info("Report written to %s", output_dir)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": scored, "trainer": trainer}

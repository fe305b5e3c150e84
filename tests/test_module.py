"""EcgClassifier: fit, aux loss, optimizer/scheduler specs, checkpoints (weights_only), metrics report."""

from __future__ import annotations

import functools
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from ecg_inception.data.transforms import PREPROCESS_VERSION
from ecg_inception.errors import PretrainedWeightsError
from ecg_inception.models.metrics import REPORT_KEYS, build_metrics, compute_report, report_from_predictions
from ecg_inception.models.module import EcgClassifier, describe_callable

LABELS = ["myocardial_infarction", "history_of_mi", "abnormal_heartbeat", "normal"]
PREP = {"model_name": "inception_v3", "size": 75, "resize": "squash", "crop": True, "mean": [0.5] * 3,
        "std": [0.5] * 3, "interpolation": "bicubic", "version": PREPROCESS_VERSION}


def _loader(n: int, size: int, seed: int, batch_size: int = 2) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size)


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, default_root_dir=tmp_path)
    return pl.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def aux_module() -> EcgClassifier:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EcgClassifier(pretrained=False, aux_logits=True, drop_rate=0.0, unfreeze={"layers": 1})


def test_training_loss_includes_the_aux_term(aux_module: EcgClassifier) -> None:
    """Runs before the fit below: `training_step` outside a Trainer (after one, `self.log` refuses)."""
    x, y = torch.randn(2, 3, 299, 299, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 3])
    aux_module.train()
    with torch.no_grad():
        logits, aux = aux_module.backbone(x)
        expected = F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(aux, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log outside a Trainer
            loss = aux_module.training_step((x, y), 0)
    assert F.cross_entropy(aux, y) > 0 and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    aux_module.eval()
    with torch.no_grad():
        assert aux_module(x).shape == (2, 4)  # forward drops the aux head
        probs = aux_module.predict_step(x, 0)
    assert torch.allclose(probs.sum(dim=1), torch.ones(2)) and (probs >= 0).all()


def test_one_step_fit_with_aux_at_299(aux_module: EcgClassifier, tmp_path) -> None:
    before = aux_module.backbone.Mixed_7c.branch_pool.bn.weight.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path).fit(aux_module, _loader(2, 299, 0), _loader(2, 299, 1))
    assert not torch.equal(before, aux_module.backbone.Mixed_7c.branch_pool.bn.weight)
    report = aux_module.last_reports["val"]
    assert set(report) == set(REPORT_KEYS) and sum(map(sum, report["confusion_matrix"])) == 2


def test_only_trainable_parameters_are_optimised(aux_module: EcgClassifier) -> None:
    optimizer = aux_module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 1e-3
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in aux_module.parameters() if p.requires_grad}
    assert in_opt == trainable and len(trainable) < len(list(aux_module.parameters())) / 10
    assert id(aux_module.backbone.Mixed_7c.branch_pool.conv.weight) not in in_opt


def test_loss_options_and_optimizer_specs() -> None:
    sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    assert describe_callable(sgd) == {"name": "torch.optim.sgd.SGD", "lr": 0.05, "momentum": 0.9}
    model = EcgClassifier(pretrained=False, aux_logits=False, unfreeze=OmegaConf.create({"blocks": "all"}),
                          labels=OmegaConf.create(LABELS), class_weights=torch.tensor([1.0, 2.0, 1.0, 0.5]),
                          label_smoothing=0.1, optimizer=sgd,
                          scheduler={"name": "step", "step_size": 2, "interval": "epoch"})
    assert model.hparams.unfreeze == {"blocks": "all"} and type(model.hparams.labels) is list
    assert model.hparams.optimizer["name"] == "torch.optim.sgd.SGD"
    logits, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1])
    expected = F.cross_entropy(logits, y, weight=torch.tensor([1.0, 2.0, 1.0, 0.5]), label_smoothing=0.1)
    assert model.compute_loss(logits, None, y).item() == pytest.approx(expected.item())
    config = model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD) and config["optimizer"].defaults["momentum"] == 0.9
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert config["lr_scheduler"]["interval"] == "epoch"
    # The stored description rebuilds the same optimizer without the callable.
    model._optimizer_factory = None
    assert isinstance(model.configure_optimizers()["optimizer"], torch.optim.SGD)
    with pytest.raises(ValueError, match="unknown optimizer"):
        EcgClassifier(pretrained=False, aux_logits=False, optimizer={"name": "nope"})
    with pytest.raises(ValueError, match="needs a 'name'"):
        EcgClassifier(pretrained=False, aux_logits=False, scheduler={"step_size": 2})


def test_checkpoint_round_trip_offline_and_class_count_errors(tmp_path) -> None:
    torch.manual_seed(0)
    model = EcgClassifier(pretrained=False, aux_logits=False, labels=LABELS, preprocessing=PREP,
                          unfreeze={"blocks": "all"}, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    trainer = _trainer(tmp_path)
    trainer.fit(model, _loader(4, 75, 0), _loader(2, 75, 1))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["hyper_parameters"]["preprocessing"] == PREP and raw["hyper_parameters"]["labels"] == LABELS
    assert raw["hyper_parameters"]["optimizer"] == {"name": "torch.optim.adamw.AdamW", "lr": 1e-3}

    loaded = EcgClassifier.load_from_checkpoint(path, pretrained=False)
    x = torch.randn(2, 3, 75, 75)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.labels == LABELS and loaded.hparams.preprocessing == PREP

    with pytest.raises(ValueError, match=r"num_classes=3 but 4 labels"):
        EcgClassifier.load_from_checkpoint(path, pretrained=False, num_classes=3)
    with pytest.raises(PretrainedWeightsError, match=r"4-class model .*num_classes=3"):
        EcgClassifier.load_from_checkpoint(path, pretrained=False, num_classes=3, labels=None)
    three_class = {k: v[:3] if k.startswith("backbone.fc.") else v for k, v in raw["state_dict"].items()}
    with pytest.raises(PretrainedWeightsError, match=r"3-class model .*num_classes=4"):
        loaded.load_state_dict(three_class)


def test_report_keys_and_a_known_confusion_matrix() -> None:
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    predicted = torch.tensor([0, 0, 1, 1, 1, 2, 0, 3, 3, 2])
    probs = F.one_hot(predicted, 4).float() * 0.7 + 0.075
    report = report_from_predictions(probs, target, LABELS, loss=0.5)
    assert list(report) == list(REPORT_KEYS)
    assert report["confusion_matrix"] == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 1, 2]]
    assert report["accuracy"] == pytest.approx(0.7) and report["f1_micro"] == pytest.approx(0.7)
    mi = report["per_class"]["myocardial_infarction"]
    assert mi == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert report["per_class"]["history_of_mi"]["precision"] == pytest.approx(2 / 3)
    assert report["recall_macro"] == pytest.approx((2 / 3 + 1 + 0.5 + 2 / 3) / 4)
    assert report["loss"] == 0.5  # AUROC: test_auroc_matches_sklearn
    assert all(type(v) is float for k, v in report.items() if k not in ("per_class", "confusion_matrix"))
    # A class absent from the targets has no AUROC: the macro mean skips it.
    absent = report_from_predictions(probs[:7], target[:7], LABELS)
    assert absent["per_class"]["normal"]["support"] == 0
    with pytest.raises(ValueError, match="no predictions"):
        compute_report(build_metrics(4), LABELS)


def test_aux_logits_below_299_px_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"aux_logits=True needs inputs of at least 299 px.*data.image_size"):
        EcgClassifier(pretrained=False, aux_logits=True, preprocessing={"size": 160})
    with pytest.raises(ValueError, match=r"at least 299 px on each side.*\[299, 160\]"):
        EcgClassifier(pretrained=False, aux_logits=True, preprocessing={"size": [299, 160]})


def test_compile_is_in_place_and_keeps_checkpoint_keys() -> None:
    torch.manual_seed(0)
    plain = EcgClassifier(pretrained=False, aux_logits=False, drop_rate=0.0, unfreeze={"blocks": "all"})
    compiled = EcgClassifier(pretrained=False, aux_logits=False, drop_rate=0.0, unfreeze={"blocks": "all"},
                             compile={"dynamic": False})
    assert getattr(plain.backbone, "_compiled_call_impl", None) is None
    assert compiled.backbone._compiled_call_impl is not None  # torch.compile is lazy: nothing built yet
    assert list(compiled.state_dict()) == list(plain.state_dict())
    compiled.load_state_dict(plain.state_dict())  # checkpoints move between compiled and eager modules
    assert compiled.hparams.compile == {"dynamic": False}


def test_val_acc_best_survives_a_checkpoint_round_trip() -> None:
    """Before the fix the MaxMetric's state was in no checkpoint: a resume started `val/acc_best` afresh."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = EcgClassifier(pretrained=False, aux_logits=False, unfreeze={"blocks": "all"})
        module.val_acc_best(torch.tensor(0.75))
        module.val_acc_best(torch.tensor(0.5))
        checkpoint: dict = {"state_dict": module.state_dict()}
        module.on_save_checkpoint(checkpoint)
        assert checkpoint["val_acc_best"] == pytest.approx(0.75)
        assert not any(k.startswith("val_acc_best") for k in checkpoint["state_dict"])  # weights only
        fresh = EcgClassifier(pretrained=False, aux_logits=False, unfreeze={"blocks": "all"})
        fresh.on_load_checkpoint(checkpoint)
        fresh.val_acc_best(torch.tensor(0.6))
        assert float(fresh.val_acc_best.compute()) == pytest.approx(0.75)
        fresh.on_load_checkpoint({"state_dict": {}})  # an older checkpoint: the metric starts empty
        assert not fresh.val_acc_best.update_called


@pytest.mark.parametrize("bad", [float("nan"), -1.0, 0.0, "2", True])
def test_a_bad_stored_temperature_is_a_checkpoint_error_checked_once(bad, tmp_path) -> None:
    """Before the fix on_load_checkpoint checked the temperature twice, the first time outside its try block: a
    bad value raised a plain ValueError on the trainer.fit(ckpt_path=...) resume path, not a CheckpointError."""
    from ecg_inception.errors import CheckpointError

    class Counted(float):
        """A stored temperature that counts how often it is read as a float (once per check)."""

        reads = 0

        def __float__(self) -> float:
            Counted.reads += 1
            return float.__float__(self)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = EcgClassifier(pretrained=False, aux_logits=False, unfreeze={"blocks": "all"})
        module.on_load_checkpoint({"state_dict": {}, "temperature": Counted(1.5)})
        assert module.temperature == 1.5 and Counted.reads == 1
        with pytest.raises(CheckpointError, match="the stored temperature: temperature must be a"):
            module.on_load_checkpoint({"state_dict": {}, "temperature": bad})
        if bad != bad:  # nan: the resume path itself, through Lightning, once (the fit is the slow part)
            trainer = _trainer(tmp_path, limit_train_batches=0, limit_val_batches=0)  # no step: only a checkpoint
            trainer.fit(module, _loader(2, 75, 0))
            path = tmp_path / "last.ckpt"
            trainer.save_checkpoint(path)
            torch.save({**torch.load(path, map_location="cpu", weights_only=True), "temperature": bad}, path)
            resumed = EcgClassifier(pretrained=False, aux_logits=False, unfreeze={"blocks": "all"})
            with pytest.raises(CheckpointError, match="temperature must be a finite number > 0, got nan"):
                _trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(resumed, _loader(2, 75, 0), ckpt_path=path,
                                                                          weights_only=True)

def test_image_size_below_the_trunk_minimum_names_image_size() -> None:
    """Before the fix 10 px passed every check and crashed in a convolution at the first step."""
    from ecg_inception.errors import ConfigValueError
    from ecg_inception.models.module import check_image_size

    with pytest.raises(ConfigValueError, match=r"data.image_size=10: .*at least 75 px"):
        check_image_size(10, "inception_v3", False)
    with pytest.raises(ConfigValueError, match=r"data.image_size=\[75, 200\]: .*at least 299 px.*aux_logits"):
        check_image_size([75, 200], "inception_v3", True)
    check_image_size(75, "inception_v3", False)
    check_image_size([299, 400], "inception_v3", True)
    with pytest.raises(ConfigValueError, match="data.image_size=74"):
        EcgClassifier(pretrained=False, aux_logits=False, preprocessing={"size": 74})


def test_auroc_matches_sklearn() -> None:
    """Macro AUROC = the mean of sklearn's one-vs-rest AUROC over the classes present (and absent ones skipped)."""
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(7)
    target = torch.randint(0, 4, (60,), generator=g)
    logits = torch.randn(60, 4, generator=g) + 1.5 * F.one_hot(target, 4)
    probs = logits.softmax(dim=1)
    report = report_from_predictions(probs, target, LABELS)
    per_class = [roc_auc_score((target == c).numpy(), probs[:, c].numpy()) for c in range(4)]
    assert report["auroc_macro"] == pytest.approx(sum(per_class) / 4, abs=1e-6)
    assert report["auroc_macro"] == pytest.approx(
        roc_auc_score(target.numpy(), probs.numpy(), multi_class="ovr", average="macro"), abs=1e-6
    )
    keep = target != 3  # class 3 absent: its AUROC is undefined and left out of the mean
    present = [roc_auc_score((target[keep] == c).numpy(), probs[keep][:, c].numpy()) for c in range(3)]
    absent = report_from_predictions(probs[keep], target[keep], LABELS)
    assert absent["auroc_macro"] == pytest.approx(sum(present) / 3, abs=1e-6)


def test_the_eval_mode_warning_filter_is_scoped_to_the_fit_start() -> None:
    """on_fit_start silences Lightning's eval-mode warning for frozen BatchNorm only until on_train_start."""
    model = EcgClassifier(pretrained=False, aux_logits=False, unfreeze={"blocks": 1})
    model._weights_from_checkpoint = True  # no frozen-random-trunk warning: only the scoped filter is looked at
    before = list(warnings.filters)
    model.on_fit_start()
    assert len(warnings.filters) == len(before) + 1
    assert "in eval mode at the start" in warnings.filters[0][1].pattern
    model.on_train_start()
    assert warnings.filters == before
    model.on_fit_start()
    model.teardown("fit")  # a fit that failed before on_train_start
    assert warnings.filters == before

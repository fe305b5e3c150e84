"""Domain pretraining end to end on tiny data: pretrain_ptbxl -> resume with ckpt_path=last -> finetune_cpu from
its checkpoint (heads re-initialised), and the preprocessing-mismatch error."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg

from ecg_inception.data.ptbxl_labels import SUPERCLASSES
from ecg_inception.data.scale import CANONICAL_PX_PER_MM
from ecg_inception.data.transforms import PREPROCESS_VERSION
from ecg_inception.errors import ConfigValueError
from ecg_inception.models.multilabel import MultiLabelClassifier, multilabel_report
from ecg_inception.synthetic.ptbxl_pages import PtbxlDataModule
from ecg_inception.synthetic.waveforms import synthesize_ecg
from ecg_inception.training import train

SIZE = "[80,160]"
CODES = ["{'NORM': 100.0, 'SR': 0.0}", "{'IMI': 100.0, 'SR': 0.0}", "{'LVH': 100.0, 'ISC_': 100.0}",
         "{'CLBBB': 100.0, 'PVC': 100.0}"]
LABELS = ["normal", "history_of_mi", "myocardial_infarction", "abnormal_heartbeat"]


@pytest.fixture(scope="module")
def ptbxl_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compact PTB-XL folder: 40 beat-model records (250 Hz, int16 microvolts), 4 per strat_fold."""
    root = tmp_path_factory.mktemp("ptbxl")
    signals, rows = [], []
    for i in range(40):
        kind = i % 4
        record = synthesize_ecg(LABELS[kind], np.random.default_rng(i), fs=250.0)
        signals.append(np.round(record.signals * 1000).astype(np.int16))
        rows.append({"index": i, "ecg_id": 100 + i, "patient_id": f"{500 + i}.0", "scp_codes": CODES[kind],
                     "infarction_stadium1": "Stadium III" if kind == 1 else "", "infarction_stadium2": "",
                     "strat_fold": i // 4 + 1})
    np.save(root / "signals.npy", np.stack(signals))
    with (root / "records.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def quiet(tmp: Path, out: str) -> list[str]:
    return [f"paths.cache_dir={tmp / 'cache'}", f"paths.log_dir={tmp / 'logs'}", f"paths.output_dir={tmp / out}",
            "callbacks.rich_progress_bar=null", "+trainer.enable_model_summary=false",
            "+trainer.enable_progress_bar=false", "plots=false"]


def test_multilabel_report_skips_labels_without_both_classes() -> None:
    logits = torch.tensor([[3.0, -2.0], [-3.0, -1.0], [2.0, -3.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    report = multilabel_report(logits, targets, ["a", "b"])
    assert report["auroc_macro"] == 1.0 and report["per_label"]["b"]["auroc"] is None
    assert report["accuracy"] == 1.0



def test_multilabel_report_matches_sklearn_on_a_random_case() -> None:
    """AUROC (per label and macro), macro F1 and exact-match accuracy against sklearn on noisy scores with ties,
    unequal prevalences and one label without positives (left out of the macro mean, as the report says)."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    rng = np.random.default_rng(7)
    n, labels = 64, ["a", "b", "c", "d", "e"]
    targets = (rng.random((n, len(labels))) < [0.5, 0.2, 0.7, 0.1, 0.0]).astype(np.float32)
    scores = targets * [1.0, 1.5, 0.8, 1.2, 1.0] + rng.normal(0.0, 1.0, targets.shape)
    # Quarter steps: many tied scores within each label (exactly 0 is tested on its own below).
    logits = np.round(scores * 4) / 4 + 0.125
    report = multilabel_report(torch.tensor(logits), torch.tensor(targets), labels)
    qualifying = [k for k in range(len(labels)) if 0 < targets[:, k].sum() < n]
    assert qualifying == [0, 1, 2, 3]
    expected = {labels[k]: roc_auc_score(targets[:, k], logits[:, k]) for k in qualifying}
    assert min(expected.values()) > 0.55 and max(expected.values()) < 0.95  # not a trivial case
    for name, value in expected.items():
        assert report["per_label"][name]["auroc"] == pytest.approx(value, abs=1e-6), name
    assert report["per_label"]["e"]["auroc"] is None
    assert report["auroc_macro"] == pytest.approx(
        roc_auc_score(targets[:, qualifying], logits[:, qualifying], average="macro"), abs=1e-6)
    predicted = (logits > 0).astype(int)  # sigmoid(z) > 0.5
    assert report["f1_macro"] == pytest.approx(
        f1_score(targets.astype(int), predicted, average="macro", zero_division=0), abs=1e-6)
    assert report["accuracy"] == pytest.approx(accuracy_score(targets.astype(int), predicted), abs=1e-9)
    assert report["n"] == n and [report["per_label"][x]["positives"] for x in labels] == targets.sum(0).tolist()


def test_a_probability_of_exactly_one_half_is_not_predicted_for_f1_and_accuracy_alike() -> None:
    """Logit 0 (p = 0.5) is "not predicted" for F1 (torchmetrics: p > threshold) and so for accuracy too (was p >= 0.5,
    which scored the same page as predicted there: accuracy 0 where F1 saw no prediction)."""
    logits = torch.tensor([[0.0, -1.0], [0.0, 2.0], [1.0, 0.0]])
    targets = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    report = multilabel_report(logits, targets, ["a", "b"])
    assert report["f1_macro"] == 1.0  # every positive found, nothing predicted that is not there
    assert report["accuracy"] == 1.0


def test_pages_are_redrawn_for_training_and_fixed_for_evaluation(ptbxl_root: Path, tmp_path: Path) -> None:
    dm = PtbxlDataModule(str(ptbxl_root), image_size=[80, 160], num_workers=0, cache_dir=str(tmp_path))
    dm.setup()
    assert dm.labels == list(SUPERCLASSES) and len(dm.dataset("train")) == 32
    train_ds, val_ds = dm.dataset("train"), dm.dataset("val")
    assert not torch.equal(train_ds.load_uint8(0), train_ds.load_uint8(0))  # a new look every access
    assert val_ds.images is not None and tuple(val_ds.images.shape) == (4, 3, 80, 160)
    again = PtbxlDataModule(str(ptbxl_root), image_size=[80, 160], num_workers=0, cache_dir=str(tmp_path))
    again.setup()
    assert torch.equal(again.dataset("val").images, val_ds.images)  # read back from the cache
    assert list(tmp_path.joinpath("ptbxl_pages").glob("val-*.pt"))
    x, y = train_ds[1]
    assert x.dtype == torch.float32 and y.tolist() == [0, 1, 0, 0, 0]


@pytest.mark.slow
def test_pretrain_resume_then_finetune_and_mismatch(ptbxl_root: Path, synthetic_root: Path, tmp_path: Path,
                                                    one_thread: None) -> None:
    base = ["experiment=pretrain_ptbxl", f"data.root={ptbxl_root}", f"data.image_size={SIZE}", "data.batch_size=8",
            "data.num_workers=0"]
    metrics, objects = train(compose_cfg("train", [*base, "trainer.max_epochs=1", *quiet(tmp_path, "pre")]))
    assert metrics["status"] == "ok" and metrics["task"] == "multilabel"
    assert isinstance(objects["model"], MultiLabelClassifier)
    assert metrics["data"]["test"]["records"] == 4
    assert metrics["test"]["auroc_macro"] is not None and 0.0 <= metrics["test"]["auroc_macro"] <= 1.0
    assert json.loads((tmp_path / "pre" / "metrics.json").read_text())["labels"] == list(SUPERCLASSES)
    last = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    log_file = tmp_path / "pre" / "csv" / "metrics.csv"
    first_rows = log_file.read_text().splitlines()[1:]
    assert any(row.startswith("0,") for row in first_rows)

    # resume the same run for one more epoch (ckpt_path=last: this run dir's checkpoints/last.ckpt)
    resumed, _ = train(compose_cfg("train", [*base, "trainer.max_epochs=2", "ckpt_path=last",
                                             *quiet(tmp_path, "pre")]))
    assert resumed["epochs"] == 2 and resumed["status"] == "ok"
    # the resumed run appends to metrics.csv (before the fix pretraining deleted it: epoch 0's rows were gone)
    resumed_rows = [dict(zip(header, row.split(","), strict=False)) for header in
                    [log_file.read_text().splitlines()[0].split(",")] for row in log_file.read_text().splitlines()[1:]]
    assert {r["epoch"] for r in resumed_rows} >= {"0", "1"}
    assert sum(r["epoch"] == "0" for r in resumed_rows) == len([r for r in first_rows if r.startswith("0,")])
    best = resumed["best_checkpoint"]
    assert best and Path(best).is_file()

    # fine-tune on printouts from that checkpoint: 4 new classes, heads re-initialised, trunk weights kept
    fine = ["experiment=finetune_cpu", f"data.root={synthetic_root}", f"data.image_size={SIZE}", "data.batch_size=4",
            "data.num_workers=0", f"model.pretrained_file={best}", "trainer.max_epochs=1"]
    metrics, objects = train(compose_cfg("train", [*fine, *quiet(tmp_path, "fine")]))
    assert metrics["status"] == "ok" and len(metrics["labels"]) == 4
    pre_sd = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert objects["model"].backbone.fc.out_features == 4
    assert metrics["test"]["accuracy"] is not None

    # the same checkpoint with another preprocessing: a clear error before any training
    with pytest.raises(ConfigValueError, match=r"another preprocessing.*ink: checkpoint True, this run False.*data\.ink=true"):
        train(compose_cfg("train", [*fine, "data.ink=false", *quiet(tmp_path, "bad")]))
    with pytest.raises(ConfigValueError, match=r"size: checkpoint \[80, 160\].*data\.image_size=\[80,160\]"):
        train(compose_cfg("train", [*fine, "data.image_size=[96,192]", *quiet(tmp_path, "bad2")]))
    assert "backbone.Conv2d_1a_3x3.conv.weight" in pre_sd


def test_a_pretraining_fit_that_stops_records_its_status(ptbxl_root: Path, tmp_path: Path, one_thread: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Any error in the fit leaves metrics.json with status failed (then is raised), a non-finite loss status
    diverged, as in `train`. Before the fix only TrainingDivergedError was caught: a failed fit wrote nothing."""
    base = ["experiment=pretrain_ptbxl", f"data.root={ptbxl_root}", f"data.image_size={SIZE}", "data.batch_size=8",
            "data.num_workers=0", "trainer.max_epochs=1"]

    def broken(self, batch, batch_idx):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(MultiLabelClassifier, "training_step", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(compose_cfg("train", [*base, *quiet(tmp_path, "failed")]))
    saved = json.loads((tmp_path / "failed" / "metrics.json").read_text())
    assert saved["status"] == "failed" and saved["error"] == "RuntimeError: disk on fire"
    assert saved["task"] == "multilabel" and saved["labels"] == list(SUPERCLASSES)
    assert saved["val"] is None and saved["test"] is None

    monkeypatch.undo()
    monkeypatch.setattr(MultiLabelClassifier, "compute_loss", lambda self, logits, aux, target: logits.sum() * np.nan)
    metrics, _ = train(compose_cfg("train", [*base, *quiet(tmp_path, "diverged")]))
    saved = json.loads((tmp_path / "diverged" / "metrics.json").read_text())
    assert metrics["status"] == saved["status"] == "diverged"
    assert saved["error"].startswith("TrainingDivergedError: training diverged") and saved["step"] == 1

def test_finetune_loads_the_trunk_and_resets_heads(ptbxl_root: Path, tmp_path: Path) -> None:
    """The weight path alone (no training): a pretraining-shaped checkpoint into a 4-class model."""
    from ecg_inception.models.module import EcgClassifier
    from ecg_inception.models.pretrained import reinit_heads

    prep = {"model_name": "inception_v3", "size": [80, 160], "mean": [0.5] * 3, "std": [0.5] * 3,
            "interpolation": "bicubic", "resize": "squash", "crop": True, "ink": True,
            "version": PREPROCESS_VERSION, "px_per_mm": CANONICAL_PX_PER_MM}
    pre = MultiLabelClassifier(num_classes=5, labels=list(SUPERCLASSES), pretrained=False, aux_logits=False,
                               drop_rate=0.0, preprocessing=prep)
    path = tmp_path / "pre.ckpt"
    torch.save({"state_dict": pre.state_dict(), "hyper_parameters": dict(pre.hparams),
                "pytorch-lightning_version": "2.6.0"}, path)
    fine = EcgClassifier(num_classes=5, labels=["a", "b", "c", "d", "e"], pretrained=False, pretrained_file=str(path),
                         aux_logits=False, drop_rate=0.0, preprocessing=prep)
    conv = "Conv2d_1a_3x3.conv.weight"
    assert torch.equal(fine.backbone.state_dict()[conv], pre.backbone.state_dict()[conv])
    assert torch.equal(fine.backbone.fc.weight, pre.backbone.fc.weight)  # same shape: loaded ...
    assert reinit_heads(fine.backbone, list(SUPERCLASSES), ["a", "b", "c", "d", "e"]) == ["fc"]
    assert not torch.equal(fine.backbone.fc.weight, pre.backbone.fc.weight)  # ... then reset: other labels


def test_preprocessing_mismatch_error_names_each_key_and_its_fix() -> None:
    from ecg_inception.models.pretrained import check_finetune_preprocessing

    stored = {"model_name": "inception_v3", "size": [128, 256], "mean": [0.5] * 3, "std": [0.5] * 3,
              "interpolation": "bicubic", "resize": "squash", "crop": True, "ink": True}
    check_finetune_preprocessing("p.ckpt", stored, {**stored, "model_name": "inception_v3.tv_in1k"})
    check_finetune_preprocessing("p.ckpt", {**stored, "size": 96}, {**stored, "size": [96, 96]})
    with pytest.raises(ConfigValueError) as err:
        check_finetune_preprocessing("p.ckpt", stored, {**stored, "crop": False, "mean": [0.485, 0.456, 0.406]})
    message = str(err.value)
    assert "model.pretrained_file=p.ckpt" in message and "data.crop=true" in message
    assert "data.mean=[0.5,0.5,0.5]" in message and "ink" not in message
    with pytest.raises(ConfigValueError, match=r"version: checkpoint 2, this run 3.*data.preprocess_version=2"):
        check_finetune_preprocessing("p.ckpt", {**stored, "version": 2}, {**stored, "version": 3})

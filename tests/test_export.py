"""Exports: ONNX (onnxruntime) and torch.export (.pt2) match eager within 1e-4, dynamic batch, sidecar, loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ecg_inception.cli.export import main as export_main
from ecg_inception.cli.predict import main as predict_main
from ecg_inception.data.transforms import PREPROCESS_VERSION
from ecg_inception.errors import ConfigValueError
from ecg_inception.inference import Predictor, load_exported
from ecg_inception.inference.export import read_sidecar, sidecar_path

PARITY = 1e-4


@pytest.fixture(scope="module")
def exported(tiny_run: dict, tmp_path_factory: pytest.TempPathFactory, one_thread) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export")
    paths = {"onnx": out / "model.onnx", "torch-export": out / "model.pt2"}
    for fmt, path in paths.items():
        assert export_main([str(tiny_run["ckpt"]), "--format", fmt, "--out", str(path)]) == 0
    yield paths
    shutil.rmtree(out, ignore_errors=True)


def _files(tiny_run: dict) -> list[Path]:
    dm = tiny_run["objects"]["datamodule"]
    return [dm.dataset_root() / r.path for r in dm.manifest.rows]


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_export_matches_eager_on_real_pages_with_any_batch(tiny_run: dict, exported: dict, fmt: str) -> None:
    eager = Predictor.from_checkpoint(tiny_run["ckpt"], device="cpu", batch_size=3, num_workers=0)
    loaded = load_exported(exported[fmt], batch_size=3, num_workers=0)
    files = _files(tiny_run)[:5]  # batches of 3 and 2: the batch dimension is dynamic
    x = eager.preprocess(files)
    with torch.inference_mode():
        reference = eager.forward(x)
    for n in (1, 5):
        out = loaded.forward(x[:n])
        assert out.shape == (n, len(eager.labels))
        assert float((out - reference[:n]).abs().max()) < PARITY
    a, b = eager.predict(files), loaded.predict(files)
    assert [r.label for r in a] == [r.label for r in b] and [r.crop_box for r in a] == [r.crop_box for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert max(abs(ra.probabilities[k] - rb.probabilities[k]) for k in ra.probabilities) < PARITY
    assert loaded.temperature == eager.temperature


def test_sidecar_holds_what_preprocessing_needs(tiny_run: dict, exported: dict) -> None:
    side = json.loads(sidecar_path(exported["onnx"]).read_text())
    prep = tiny_run["objects"]["model"].hparams.preprocessing
    assert side["labels"] == tiny_run["metrics"]["labels"] and side["format"] == "onnx"
    for key in ("size", "mean", "std", "interpolation", "resize", "crop", "ink"):
        assert side["preprocessing"][key] == prep[key], key
    assert side["preprocessing"]["version"] == PREPROCESS_VERSION and side["ecg_inception_version"]
    assert side["temperature"] == pytest.approx(tiny_run["objects"]["model"].temperature)
    assert side["parity_max_abs_diff"] < PARITY and side["input"]["shape"] == ["batch", 3, 75, 75]


def test_predict_cli_runs_the_onnx_file(tiny_run: dict, exported: dict, tmp_path: Path) -> None:
    out = tmp_path / "preds.json"
    assert predict_main([str(exported["onnx"]), *map(str, _files(tiny_run)[:2]), "--out", str(out),
                         "--num-workers", "0"]) == 0
    data = json.loads(out.read_text())
    assert data["summary"]["ok"] == 2 and len(data["predictions"]) == 2


def test_a_bad_sidecar_is_refused(exported: dict, tmp_path: Path) -> None:
    copy = tmp_path / "m.onnx"
    copy.write_bytes(exported["onnx"].read_bytes())
    with pytest.raises(ConfigValueError, match="no sidecar"):
        load_exported(copy)
    side = json.loads(sidecar_path(exported["onnx"]).read_text())
    side["preprocessing"]["version"] = 7
    sidecar_path(copy).write_text(json.dumps(side))
    with pytest.raises(ConfigValueError, match="m.onnx.json.*preprocessing version 7"):
        read_sidecar(copy)
    sidecar_path(copy).write_text("{not json")
    with pytest.raises(ConfigValueError, match="not a readable sidecar"):
        read_sidecar(copy)

"""Predictor.explain, `ecg-inception-predict --cam`, `ecg-inception-explain`, and real pages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ecg_inception.cli.explain import main as explain_main
from ecg_inception.cli.predict import main as predict_main
from ecg_inception.inference.explain import explain_pages
from ecg_inception.inference.leads import LEAD_NAMES
from ecg_inception.inference.overlay import write_overlay
from ecg_inception.inference.predictor import Predictor


@pytest.fixture(scope="module")
def predictor(tiny_run: dict, one_thread) -> Predictor:
    return Predictor.from_checkpoint(tiny_run["ckpt"], device="cpu", batch_size=2, num_workers=0)


def _pages(tiny_run: dict, n: int) -> list[Path]:
    dm = tiny_run["objects"]["datamodule"]
    return [dm.dataset_root() / r.path for r in dm.manifest.rows[:n]]


def test_explain_returns_predicts_records_plus_cam_and_shares(tiny_run: dict, predictor: Predictor) -> None:
    pages = _pages(tiny_run, 3)
    predicted = predictor.predict(pages)
    explained = predictor.explain(pages)
    for p, e, path in zip(predicted, explained, pages, strict=True):
        assert (e.path, e.label, e.crop_box, e.crop_fallback, e.low_confidence, e.error) == (
            p.path, p.label, p.crop_box, p.crop_fallback, p.low_confidence, p.error)
        np.testing.assert_allclose(list(e.probabilities.values()), list(p.probabilities.values()), atol=1e-5)
        with Image.open(path) as img:
            assert e.cam.shape == (img.height, img.width)
        assert e.target == e.label and list(e.lead_shares) == list(LEAD_NAMES)
        assert sum(e.lead_shares.values()) == pytest.approx(1.0, abs=1e-6)
        assert e.cam_layer and len(e.cam_size) == 2 and e.cam.min() >= 0.0 and e.cam.max() <= 1.0
    other = predictor.labels[-1]
    assert {e.target for e in predictor.explain(pages[:1], target=other, method="gradcam++")} == {other}


def test_predict_cam_writes_overlays_and_share_columns(tiny_run: dict, tmp_path: Path, capsys,
                                                       one_thread) -> None:
    pages = _pages(tiny_run, 2)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    cams = tmp_path / "cams"
    out = tmp_path / "preds.csv"
    status = predict_main([str(tiny_run["ckpt"]), *map(str, pages), str(bad), "--out", str(out), "--cam",
                           str(cams), "--device", "cpu", "--num-workers", "0"])  # fmt: skip
    assert status == 1  # the broken file
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [*map(str, pages), str(bad)]
    for row in rows[:2]:
        shares = [float(row[f"share_{lead}"]) for lead in LEAD_NAMES]
        assert sum(shares) == pytest.approx(1.0, abs=1e-5) and 0.0 <= float(row["share_margin"]) <= 1.0
    assert rows[2]["share_I"] == "" and rows[2]["error"]
    written = sorted(cams.glob("*.png"))
    assert [p.name for p in written] == sorted(f"{p.stem}_cam.png" for p in pages)
    for png, page in zip(written, sorted(pages, key=lambda p: p.stem), strict=True):
        with Image.open(png) as a, Image.open(page) as b:
            assert a.size == b.size
    js = tmp_path / "preds.json"
    predict_main([str(tiny_run["ckpt"]), str(pages[0]), "--out", str(js), "--cam", str(cams), "--device", "cpu"])
    (record,) = json.loads(js.read_text())["predictions"]
    assert list(record["lead_shares"]) == list(LEAD_NAMES) and record["cam_size"] and "cam" not in record


def test_explain_cli_charts_mean_shares_per_true_class(tiny_run: dict, synthetic_root: Path, tmp_path: Path,
                                                       one_thread) -> None:
    out = tmp_path / "explain"
    status = explain_main([str(tiny_run["ckpt"]), str(synthetic_root), "--out", str(out), "--device", "cpu",
                           "--batch-size", "4"])  # fmt: skip
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    n_files = sum(1 for p in synthetic_root.rglob("*") if p.suffix in (".png", ".jpg"))
    n_empty = sum(summary["empty_maps"].values())
    assert summary["grouped_by"] == "true" and sum(summary["counts"].values()) + n_empty == n_files
    for means in summary["mean_lead_shares"].values():
        assert sum(means.values()) == pytest.approx(1.0, abs=1e-6)
    with Image.open(out / "lead_shares_by_class.png") as chart:
        assert chart.width > 400 and chart.height > 100 * len(summary["counts"])
    assert len(list(csv.DictReader((out / "explanations.csv").open()))) == n_files
    assert not (out / "overlays").exists()
    status = explain_main([str(tiny_run["ckpt"]), str(synthetic_root), "--out", str(out), "--by", "predicted",
                           "--device", "cpu"])  # fmt: skip
    assert json.loads((out / "summary.json").read_text())["grouped_by"] == "predicted"
    assert explain_main([str(tmp_path / "missing.ckpt"), str(synthetic_root), "--out", str(out)]) == 2
    # a folder of symbolic links (e.g. one split's files) keeps its class folders
    links = tmp_path / "links"
    for folder in sorted(p for p in synthetic_root.iterdir() if p.is_dir())[:2]:
        (links / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:2]:
            (links / folder.name / f.name).symlink_to(f)
    assert explain_main([str(tiny_run["ckpt"]), str(links), "--out", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grouped_by"] == "true"
    assert sum(summary["counts"].values()) + sum(summary["empty_maps"].values()) == 4


def test_pages_with_an_empty_map_stay_out_of_the_class_means(tiny_run: dict, synthetic_root: Path,
                                                             tmp_path: Path, monkeypatch, one_thread) -> None:
    import ecg_inception.inference.explain as explain_module
    from ecg_inception.inference.leads import LeadShares

    real, calls = explain_module.lead_shares, []

    def first_empty(box_map: np.ndarray) -> LeadShares:  # the first page's map is zero on every lead
        calls.append(1)
        return LeadShares(dict.fromkeys(LEAD_NAMES, 0.0), 0.0, 0.0) if len(calls) == 1 else real(box_map)

    monkeypatch.setattr(explain_module, "lead_shares", first_empty)
    folder = tmp_path / "two"
    for cls in sorted(p for p in synthetic_root.iterdir() if p.is_dir())[:2]:
        (folder / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:2]:
            (folder / cls.name / f.name).symlink_to(f)
    out = tmp_path / "out"
    assert explain_main([str(tiny_run["ckpt"]), str(folder), "--out", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["empty_maps"].values()) == 1 and sum(summary["counts"].values()) == 3
    for means in summary["mean_lead_shares"].values():
        assert sum(means.values()) == pytest.approx(1.0, abs=1e-6)


def test_overlay_draws_the_box_the_heat_and_leaves_cold_pixels() -> None:
    from ecg_inception.inference.overlay import BOX_COLOUR, render_overlay

    page = Image.new("RGB", (200, 120), (255, 255, 255))
    cam = np.zeros((120, 200), np.float32)
    cam[60:70, 150:160] = 2.0
    out = np.asarray(render_overlay(page, cam, [20, 30, 180, 110], caption="normal  p=0.91"))
    assert tuple(out[70, 20]) == BOX_COLOUR and tuple(out[100, 100]) == (255, 255, 255)
    hot = out[65, 155].astype(int)
    assert hot[0] > 100 and hot[1] < 200 and hot[2] < 200  # jet's top end is red
    assert (out[2:15, 2:60] < 128).any()  # caption text in the corner
    with pytest.raises(ValueError, match="height x width"):
        render_overlay(page, cam.T)


def test_real_pages_overlays_have_the_page_size_and_shares_sum_to_one(dev_root: Path, tmp_path: Path,
                                                                      one_thread) -> None:
    from ecg_inception.models.module import EcgClassifier

    torch.manual_seed(0)
    model = EcgClassifier(pretrained=False, num_classes=4, aux_logits=False)
    prep = {"size": [128, 256], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
            "resize": "squash", "crop": True, "ink": True}  # fmt: skip
    pages = [sorted(d.glob("*.jpg"))[0] for d in sorted(dev_root.iterdir()) if d.is_dir()]
    taken: set[str] = set()
    for record, path in zip(explain_pages(model, prep, pages), pages, strict=True):
        assert record.error is None and not record.crop_fallback
        assert record.cam_layer == "Mixed_6e" and record.cam_size == (6, 14)
        assert sum(record.lead_shares.values()) == pytest.approx(1.0, abs=1e-6)
        with Image.open(path) as page:
            png = write_overlay(record, page, tmp_path, taken)
            with Image.open(png) as written:
                assert written.size == page.size

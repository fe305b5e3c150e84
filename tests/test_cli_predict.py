"""`ecg-inception-predict`: files and folders mixed, error rows, exit status, summary, CSV/JSON columns."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from ecg_inception.cli.predict import main


@pytest.fixture()
def mixed_inputs(tiny_run: dict, tmp_path: Path) -> tuple[list[str], list[Path]]:
    dm = tiny_run["objects"]["datamodule"]
    pages = [dm.dataset_root() / r.path for r in dm.manifest.rows[:3]]
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(pages[1].read_bytes())
    (folder / "sub" / "b.png").write_bytes(pages[2].read_bytes())
    (folder / "sub" / "notes.txt").write_text("skipped inside a folder")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(pages[0].read_bytes()[:400])
    text = tmp_path / "named.txt"
    text.write_text("named explicitly, so it gets a row")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (900, 640), "white").save(blank)
    return [str(pages[0]), str(folder), str(corrupt), str(text), str(blank)], pages


def test_mixed_inputs_give_one_row_each_errors_and_a_nonzero_exit(tiny_run: dict, mixed_inputs, tmp_path: Path,
                                                                  capsys, one_thread) -> None:
    inputs, pages = mixed_inputs
    out = tmp_path / "preds.csv"
    status = main([str(tiny_run["ckpt"]), *inputs, "--out", str(out), "--batch-size", "2", "--num-workers", "1",
                   "--device", "cpu"])
    assert status == 1
    rows = list(csv.DictReader(out.open()))
    labels = tiny_run["metrics"]["labels"]
    assert list(rows[0]) == ["path", "label", *(f"prob_{k}" for k in labels), "crop_fallback", "low_confidence",
                             "error"]
    names = [Path(r["path"]).name for r in rows]
    assert names == [pages[0].name, "a.jpg", "b.png", "corrupt.jpg", "named.txt", "blank.png"]
    by_name = dict(zip(names, rows, strict=True))
    for name in (pages[0].name, "a.jpg", "b.png", "blank.png"):
        r = by_name[name]
        assert r["error"] == "" and r["label"] in labels
        assert sum(float(r[f"prob_{k}"]) for k in labels) == pytest.approx(1.0, abs=1e-4)
    assert by_name["blank.png"]["crop_fallback"] == "true" and by_name["a.jpg"]["crop_fallback"] == "false"
    assert by_name["corrupt.jpg"]["error"] and by_name["corrupt.jpg"]["label"] == ""
    assert "not an image" in by_name["named.txt"]["error"]
    err = capsys.readouterr().err
    assert "4 ok, 2 failed, 1 with crop fallback" in err and "1 folder entries skipped" in err
    assert "failed: " in err and "corrupt.jpg" in err


def test_json_output_and_a_clean_run_exits_zero(tiny_run: dict, mixed_inputs, tmp_path: Path, one_thread) -> None:
    inputs, _ = mixed_inputs
    out = tmp_path / "preds.json"
    assert main([str(tiny_run["ckpt"]), inputs[0], inputs[1], "--out", str(out), "--num-workers", "0",
                 "--prep-threads", "2", "--low-confidence", "1.0", "--tta"]) == 0
    data = json.loads(out.read_text())
    assert data["summary"] == {"ok": 3, "failed": 0, "crop_fallback": 0, "low_confidence": 3, "skipped": 1}
    record = data["predictions"][0]
    assert set(record) == {"path", "label", "probabilities", "crop_box", "crop_fallback", "low_confidence", "error"}
    assert list(record["probabilities"]) == tiny_run["metrics"]["labels"]


def test_an_unusable_checkpoint_exits_two(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_text("nope")
    assert main([str(bad), str(tmp_path)]) == 2
    assert "bad.ckpt" in capsys.readouterr().err


def test_a_bad_thread_count_exits_two_naming_it(tiny_run: dict, tmp_path: Path, capsys) -> None:
    assert main([str(tiny_run["ckpt"]), str(tmp_path), "--prep-threads", "0"]) == 2
    assert "prep_threads must be >= 1, got 0" in capsys.readouterr().err

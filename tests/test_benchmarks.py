"""Benchmarks run end to end at toy sizes, so a library change cannot silently break them (figures meaningless).

Each runs in its own process: a benchmark sets torch's threads, warning filters and log levels for the whole
process (`_common.quiet_warnings`), which must not leak into the tests that follow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_benchmark


def test_bench_inference_folder_rows_run_and_name_the_predictor_default(tmp_path: Path) -> None:
    """The folder rows build a Predictor from a preprocessing dict as a checkpoint stores it: before the fix
    the dict lacked `version` and every folder row died on the preprocessing-version check."""
    out = tmp_path / "inference.json"
    proc = run_benchmark("bench_inference", "--size", "75", "--no-aux", "--batch-size", "2", "--rounds", "1",
                         "--warmup", "0", "--train-rounds", "0", "--no-onnx", "--folder-pages", "4",
                         "--folder-rounds", "1", "--folder-scale", "0.25", "--folder-batch-size", "2",
                         "--explain-pages", "0", "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = json.loads(out.read_text())["figures"]["folder"]
    assert folder["pages"] == 4 and folder["bound_img_s"] > 0
    names = set(folder["img_s"])
    assert {n for n in names if n.startswith("0 worker(s)")} == {
        n for n in names if n.endswith(("prep threads 1", f"prep threads {folder['cores']}"))}
    assert folder["default_setup"] in names
    assert all(rate > 0 for rate in folder["img_s"].values())


@pytest.mark.slow  # ~50 s: four CLI processes
def test_bench_short_sweep_runs_both_modes_and_reports_its_ceiling(tmp_path: Path) -> None:
    """Two 1-epoch head-only jobs on 16 synthetic pages, cache on and off: both sweeps finish with equal test
    losses, and the ceiling row (uncached / the cached sweep without its later jobs) bounds the speed-up."""
    out = tmp_path / "short.json"
    proc = run_benchmark("bench_short_sweep", "--per-class", "4", "--epochs", "1", "--lrs", "0.01",
                         "--drop-rates", "0.3,0.5", "--variants", "head", "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["head: every job ok, cached as asked (1 = yes)"]["status"] == "PASS"
    assert checks["head: max rel |test loss cached - uncached|"]["status"] == "PASS"
    speedup = checks["head: speed-up uncached / cached"]["value"]
    ceiling = checks["head: ceiling, uncached / (cached less jobs 2..N)"]["value"]
    assert 0 < speedup <= ceiling
    assert checks["head: cached job wall, jobs 2..N (mean)"]["value"] > 0


def test_bench_data_runs_every_configuration(tmp_path: Path) -> None:
    """Before the fix the script died at its first timed epoch: it cleared a per-process hash memo that had moved
    to `core.hashing` (now cleared through `clear_sha_memo`)."""
    out = tmp_path / "data.json"
    proc = run_benchmark("bench_data", "--per-class", "4", "--scale", "0.25", "--repeats", "1", "--batch-size", "2",
                         "--image-size", "75", "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    epochs = report["figures"]["epochs"]
    assert report["figures"]["train_images"] > 0
    assert all(len(e["epoch1"]) == 1 and e["epoch1"][0] > 0 for e in epochs.values())
    assert {c["name"] for c in report["checks"]} >= {"speed-up epoch 1 -> 2 with cache, augment off"}


def test_clear_sha_memo_makes_the_next_hash_read_the_file(tmp_path: Path) -> None:
    from ecg_inception.core import hashing

    page = tmp_path / "page.jpg"
    page.write_bytes(b"one")
    first = hashing.file_sha256(page)
    assert len(hashing._SHA_MEMO) >= 1
    hashing.clear_sha_memo()
    assert not hashing._SHA_MEMO and hashing.file_sha256(page) == first

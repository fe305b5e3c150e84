"""The examples run: `examples/recipe_ablation.py` end to end on a small synthetic set."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_ablation(root: Path, cache: Path, out: Path) -> dict:
    cmd = [sys.executable, str(EXAMPLES / "recipe_ablation.py"), str(root), "--split-seed", "1",
           "--size", "80", "96", "--ink", "--epochs", "2", "--batch-size", "4", "--class-weights",
           "--label-smoothing", "0.1", "--shift", "0.05", "--ema", "0.9", "--ema-start", "1",
           "--cache", str(cache), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "best val acc at epoch" in job.stdout
    return json.loads(out.read_text())


def test_recipe_ablation_records_every_epoch_and_reuses_its_cache(synthetic_root: Path, tmp_path: Path) -> None:
    first = run_ablation(synthetic_root, tmp_path / "cache", tmp_path / "a.json")
    assert first["labels"] and first["args"]["size"] == [80, 96]
    history = first["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    for h in history:
        for split in ("val", "test"):
            assert 0.0 <= h[split]["f1"] <= 1.0 and 0.0 <= h[split]["acc"] <= 1.0
            assert math.isfinite(h[split]["loss"])
    (cached,) = (tmp_path / "cache").glob("*.pt")  # decoded once...
    written = cached.stat().st_mtime_ns
    second = run_ablation(synthetic_root, tmp_path / "cache", tmp_path / "b.json")
    assert list((tmp_path / "cache").glob("*.pt")) == [cached] and cached.stat().st_mtime_ns == written  # ...read back
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in second["history"]]

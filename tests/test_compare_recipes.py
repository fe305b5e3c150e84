"""examples/compare_recipes.py: paired per-split differences and the paired bootstrap on hand-made predictions."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import load_example

compare = load_example("compare_recipes")


def write_run(study: Path, seed: int, paths: list[str], targets: list[int], probs: np.ndarray) -> None:
    run = study / "runs" / f"leakfree-seed{seed}"
    run.mkdir(parents=True)
    with (run / "test_predictions.csv").open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "sha256", "label", "target", "copy_in_train", "prob_a", "prob_b", "prob_c"])
        for p, t, row in zip(paths, targets, probs, strict=True):
            out.writerow([p, "x", "l", t, 0, *row])


def two_studies(tmp_path: Path, seeds=(0, 1)) -> tuple[Path, Path, dict[int, np.ndarray]]:
    rng = np.random.default_rng(0)
    a, b = tmp_path / "a", tmp_path / "b"
    targets = {}
    for seed in seeds:
        t = rng.integers(0, 3, 30)
        targets[seed] = t
        paths = [f"s{seed}/{i}.jpg" for i in range(30)]
        noisy = rng.dirichlet(np.ones(3), 30)
        perfect = np.eye(3)[t] * 0.9 + 0.1 / 3
        write_run(a, seed, paths, t.tolist(), noisy)
        write_run(b, seed, paths, t.tolist(), perfect)
    return a, b, targets


def test_a_recipe_against_itself_differs_by_exactly_nothing(tmp_path: Path) -> None:
    a, _, _ = two_studies(tmp_path)
    result = compare.compare(a, a, [0, 1], n_boot=200)
    for m in ("accuracy", "f1_macro", "auroc_macro"):
        d = result["pooled"]["diff"][m]
        assert d["point"] == 0.0 and d["low"] == 0.0 and d["high"] == 0.0 and d["share_b_better"] == 0.0
        assert all(r["diff"][m] == 0.0 for r in result["per_split"])


def test_a_perfect_recipe_is_better_in_every_split_and_in_the_paired_interval(tmp_path: Path) -> None:
    a, b, targets = two_studies(tmp_path)
    result = compare.compare(a, b, [0, 1], n_boot=300, boot_seed=3)
    assert [r["b"]["accuracy"] for r in result["per_split"]] == [1.0, 1.0]
    pooled = result["pooled"]
    assert pooled["n"] == 60 and pooled["b"]["f1_macro"] == 1.0
    d = pooled["diff"]["f1_macro"]
    assert d["point"] == pytest.approx(1.0 - pooled["a"]["f1_macro"])
    assert 0.0 < d["low"] <= d["point"] <= d["high"] and d["share_b_better"] == 1.0
    assert result["mean_sd"]["diff"]["accuracy"]["n"] == 2
    # the same inputs and bootstrap seed give the same interval
    assert compare.compare(a, b, [0, 1], n_boot=300, boot_seed=3)["pooled"]["diff"] == pooled["diff"]
    table = compare.markdown(result, ("noisy", "perfect"))
    assert "| pooled | 60 |" in table and "perfect F1" in table


def test_runs_on_other_test_files_or_a_missing_seed_are_refused(tmp_path: Path) -> None:
    a, b, targets = two_studies(tmp_path, seeds=(0,))
    with pytest.raises(SystemExit, match="seed 1: no predictions"):
        compare.compare(a, b, [0, 1], n_boot=10)
    other = tmp_path / "other"
    write_run(other, 0, [f"elsewhere/{i}.jpg" for i in range(30)], targets[0].tolist(), np.full((30, 3), 1 / 3))
    with pytest.raises(SystemExit, match="did not test the same files"):
        compare.compare(a, other, [0], n_boot=10)


def test_the_cli_writes_json_and_markdown(tmp_path: Path) -> None:
    a, b, _ = two_studies(tmp_path)
    assert compare.main(["--a", str(a), "--b", str(b), "--seeds", "0", "1", "--bootstrap", "50",
                         "--names", "x", "y", "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp.json").is_file() and "| x F1 | y F1 |" in (tmp_path / "cmp.md").read_text()

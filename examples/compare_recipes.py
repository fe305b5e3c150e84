"""Two recipes on the same leak-free splits, compared pair by pair: per-split differences and a paired bootstrap.

Each study folder is what `leak_study.py --protocols leakfree` writes (`runs/leakfree-seed<S>/test_predictions.csv`,
the per-image test probabilities of each run). Both recipes must have been trained on the same root with the same
split seeds, so each split's test images are the same files on both sides (checked by path and target). Per
split: accuracy, macro-F1 and macro AUROC of each recipe and their difference (B - A). Pooled over the splits:
both scores and a paired percentile bootstrap 95 % CI of the difference, resampling images (the same resample for
both recipes, so split-to-split and image-to-image variation common to both cancels).

    python examples/compare_recipes.py --a scratch_study --b finetune_study --names scratch_cpu finetune_cpu \
        --out comparison
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from leak_stats import METRICS, mean_sd, score  # noqa: E402

PREDICTIONS = "test_predictions.csv"


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(paths, (N, C) probabilities, (N,) targets) of one run's test_predictions.csv."""
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise SystemExit(f"{path}: no predictions")
    prob_keys = [k for k in rows[0] if k.startswith("prob_")]
    probs = np.array([[float(r[k]) for k in prob_keys] for r in rows])
    return [r["path"] for r in rows], probs, np.array([int(r["target"]) for r in rows])


def paired_splits(study_a: Path, study_b: Path, seeds: list[int]) -> list[dict[str, Any]]:
    """Per seed: both runs' predictions, checked to be the same test files in the same order with the same targets."""
    out = []
    for seed in seeds:
        files = [study / "runs" / f"leakfree-seed{seed}" / PREDICTIONS for study in (study_a, study_b)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise SystemExit(f"seed {seed}: no predictions at {', '.join(missing)}")
        (paths_a, probs_a, t_a), (paths_b, probs_b, t_b) = (read_predictions(f) for f in files)
        if paths_a != paths_b or not np.array_equal(t_a, t_b):
            raise SystemExit(f"seed {seed}: the two runs did not test the same files (another root or split?)")
        out.append({"seed": seed, "paths": paths_a, "targets": t_a, "a": probs_a, "b": probs_b})
    return out


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, targets: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, dict[str, Any]]:
    """Percentile bootstrap of score(b) - score(a), each resample the same images for both recipes.

    Args:
        a: (N, C) probabilities of recipe A on the pooled test images.
        b: (N, C) probabilities of recipe B on the same images, same order.
        targets: (N,) integer targets.
        n_boot: number of resamples.
        seed: seed of the resampling generator.
        level: coverage of the interval.

    Returns:
        {metric: {"point", "low", "high", "share_b_better", "undefined"}}: the difference on all images, its
        interval, the share of resamples in which B scored higher, and how many resamples had no value.
    """
    point_a, point_b = score(a, targets), score(b, targets)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(n_boot):
        idx = rng.integers(0, len(targets), len(targets))
        sa, sb = score(a[idx], targets[idx]), score(b[idx], targets[idx])
        for m in METRICS:
            draws[m].append(math.nan if sa[m] is None or sb[m] is None else sb[m] - sa[m])
    tail = (1 - level) / 2 * 100
    out: dict[str, dict[str, Any]] = {}
    for m in METRICS:
        values = np.asarray(draws[m])
        defined = values[~np.isnan(values)]
        low, high = np.percentile(defined, [tail, 100 - tail]) if len(defined) else (math.nan, math.nan)
        point = None if point_a[m] is None or point_b[m] is None else point_b[m] - point_a[m]
        out[m] = {"point": point, "low": float(low), "high": float(high),
                  "share_b_better": float(np.mean(defined > 0)) if len(defined) else None,
                  "undefined": int(len(values) - len(defined))}
    return out


def compare(study_a: Path, study_b: Path, seeds: list[int], n_boot: int = 2000, boot_seed: int = 0) -> dict[str, Any]:
    """Per-split scores and differences, their mean ± sd, and the pooled scores with the paired bootstrap CI."""
    splits = paired_splits(study_a, study_b, seeds)
    per_split = []
    for s in splits:
        sa, sb = score(s["a"], s["targets"]), score(s["b"], s["targets"])
        diff = {m: None if sa[m] is None or sb[m] is None else sb[m] - sa[m] for m in METRICS}
        per_split.append({"seed": s["seed"], "n": len(s["targets"]), "a": sa, "b": sb, "diff": diff})
    targets = np.concatenate([s["targets"] for s in splits])
    a, b = np.concatenate([s["a"] for s in splits]), np.concatenate([s["b"] for s in splits])
    return {
        "seeds": seeds,
        "per_split": per_split,
        "mean_sd": {side: {m: mean_sd(r[side][m] for r in per_split) for m in METRICS} for side in ("a", "b", "diff")},
        "pooled": {"n": int(len(targets)), "a": score(a, targets), "b": score(b, targets),
                   "diff": paired_bootstrap(a, b, targets, n_boot, boot_seed)},
    }


def markdown(result: dict[str, Any], names: tuple[str, str]) -> str:
    """The comparison as a markdown table (rows: per split, mean ± sd, pooled with the CI of the difference)."""
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [f"| split seed | n | {names[0]} F1 | {names[1]} F1 | diff F1 | {names[0]} acc | {names[1]} acc | "
             f"diff acc | {names[0]} AUROC | {names[1]} AUROC | diff AUROC |", "|" + "---|" * 11]
    for r in result["per_split"]:
        cells = [str(r["seed"]), str(r["n"])]
        for m in ("f1_macro", "accuracy", "auroc_macro"):
            cells += [f(r["a"][m]), f(r["b"][m]), f(r["diff"][m])]
        lines.append("| " + " | ".join(cells) + " |")
    ms = result["mean_sd"]
    cells = ["mean ± sd", ""]
    for m in ("f1_macro", "accuracy", "auroc_macro"):
        cells += [f"{f(ms[side][m]['mean'])} ± {f(ms[side][m]['sd'])}" for side in ("a", "b", "diff")]
    lines.append("| " + " | ".join(cells) + " |")
    p = result["pooled"]
    cells = ["pooled", str(p["n"])]
    for m in ("f1_macro", "accuracy", "auroc_macro"):
        d = p["diff"][m]
        cells += [f(p["a"][m]), f(p["b"][m]), f"{f(d['point'])} [{f(d['low'])}, {f(d['high'])}]"]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", type=Path, required=True, help="study folder of recipe A (the reference)")
    p.add_argument("--b", type=Path, required=True, help="study folder of recipe B (differences are B - A)")
    p.add_argument("--names", nargs=2, default=("A", "B"), help="names of the two recipes in the table")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    result = compare(args.a, args.b, args.seeds, args.bootstrap, args.bootstrap_seed)
    result["names"] = list(args.names)
    table = markdown(result, tuple(args.names))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    args.out.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The leak study: one recipe trained under the paper's protocol and leak-free over N split seeds.

Every run goes through the library's own `ecg_inception.training.train(cfg)` on a composed config:

    paper     data.protocol=paper data.balance=undersample data.balance_stage=before_split   (LEAKY)
    leakfree  data.protocol=leakfree                        (the recipe's own balancing)

with `seed=S` (the split seed and the initialisation seed) for S in --seeds, and any Hydra overrides given after
the root (e.g. `experiment=scratch_cpu trainer.max_epochs=10`) for both. Each run has its own folder
`OUT/runs/<protocol>-seed<S>/` (config.yaml, splits.csv, metrics.json, checkpoints, ...) plus
`test_predictions.csv`: the per-image softmax probabilities of the test pass that metrics.json reports, with the
path, sha256, target and whether a byte-identical copy of the file sits in that run's train split.

Resumable: a run whose metrics.json says `"status": "ok"` and whose test_predictions.csv exists is skipped; any
other run folder is deleted and the run starts again. A run being trained by another invocation (its lock is
held) is skipped, so two invocations with the same arguments share the work.

The report (`OUT/leak_study.json`, `.md`, `.png`), per protocol: accuracy, macro-F1 and macro AUROC as mean ± sd
over seeds and as the pooled score of every seed's test predictions with a percentile bootstrap 95 % CI (fixed
--bootstrap-seed); test images with a byte-identical copy in train; and the paper protocol's scores on its own
test images next to its scores on the test images that no training copy reached.

    python examples/leak_study.py ../shared/data/mendeley-ecg-dev --out leak_study experiment=scratch_cpu
    python examples/leak_study.py ROOT --out DIR --report-only       # summarise the finished runs only
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from leak_stats import (  # noqa: E402
    METRICS,
    bootstrap_ci,
    mean_sd,
    read_manifest_records,
    score,
    train_copy_flags,
)

PROTOCOLS = {
    "paper": ["data.protocol=paper", "data.balance=undersample", "data.balance_stage=before_split"],
    "leakfree": ["data.protocol=leakfree"],
}
#: Keys the study sets itself; giving them as extra overrides would be silently overwritten, so it is refused.
CONTROLLED = ("seed", "data.seed", "data.root", "data.protocol", "data.balance", "data.balance_stage",
              "data.split_manifest", "paths.output_dir", "ckpt_path", "train", "test")
PREDICTIONS = "test_predictions.csv"
STUDY_FILE = "study_run.json"
ROWS = (("paper", "all", "paper (LEAKY), own test"), ("paper", "no_copy", "paper, test images without a train copy"),
        ("leakfree", "all", "leak-free"))
NAMES = {"accuracy": "accuracy", "f1_macro": "macro-F1", "auroc_macro": "macro AUROC"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", help="image folder with one sub-folder per class (data.root)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. experiment=scratch_cpu")
    p.add_argument("--out", required=True, help="study folder: runs/ and the report")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="split seeds (default 0-4)")
    p.add_argument("--protocols", nargs="+", choices=list(PROTOCOLS), default=list(PROTOCOLS))
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--report-only", action="store_true", help="train nothing; summarise the finished runs")
    args = p.parse_intermixed_args(argv)
    bad = [o for o in args.overrides if o.lstrip("+~").split("=", 1)[0] in CONTROLLED]
    if bad:
        p.error(f"the study sets these itself: {bad} (the protocol, seed, root and run folder of every run)")
    return args


def run_overrides(args: argparse.Namespace, protocol: str, seed: int, run_dir: Path) -> list[str]:
    """Study defaults, then the user's overrides, then what the study controls (the last value wins)."""
    out = Path(args.out).resolve()
    return [f"paths.log_dir={out / 'logs'}", *args.overrides, *PROTOCOLS[protocol], f"seed={seed}",
            f"data.root={Path(args.root).resolve()}", f"paths.output_dir={run_dir}"]


def is_finished(run_dir: Path) -> bool:
    """metrics.json with status ok and the study's test predictions beside it."""
    metrics = run_dir / "metrics.json"
    if not (metrics.is_file() and (run_dir / PREDICTIONS).is_file()):
        return False
    try:
        return json.loads(metrics.read_text(encoding="utf-8")).get("status") == "ok"
    except (OSError, ValueError):
        return False


def write_predictions(run_dir: Path, metrics: dict[str, Any], objects: dict[str, Any]) -> Path:
    """The test pass's per-image probabilities (softmax of its logits, as metrics.json's test report) as CSV."""
    if metrics.get("world_size", 1) != 1:
        raise RuntimeError("the leak study needs single-process runs (each rank holds only its part of the test)")
    logits, targets = objects["model"].last_logits["test"]
    rows = objects["datamodule"].dataset("test").rows
    labels = list(metrics["labels"])
    expected = [labels.index(r.label) for r in rows]
    if targets.tolist() != expected:
        raise RuntimeError(f"{run_dir}: the test logits are not in the order of the test split's rows")
    copies = train_copy_flags(read_manifest_records(run_dir / "splits.csv"))
    probs = logits.float().softmax(dim=1).tolist()
    tmp = run_dir / f".{PREDICTIONS}.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(["path", "sha256", "label", "target", "copy_in_train", *(f"prob_{lab}" for lab in labels)])
        for r, t, p in zip(rows, expected, probs, strict=True):
            out.writerow([r.path, r.sha256, r.label, t, int(copies[r.path]), *(repr(float(v)) for v in p)])
    return tmp.replace(run_dir / PREDICTIONS)


def train_one(args: argparse.Namespace, protocol: str, seed: int, run_dir: Path) -> str:
    """Train one run unless it is finished or locked by another invocation; returns what happened."""
    from ecg_inception.core.compose import compose_config
    from ecg_inception.training import train

    overrides = run_overrides(args, protocol, seed, run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_name(run_dir.name + ".lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "running elsewhere"
        if is_finished(run_dir):
            study_file = run_dir / STUDY_FILE
            stored = json.loads(study_file.read_text(encoding="utf-8"))["overrides"] if study_file.is_file() else None
            if stored != overrides:
                raise SystemExit(f"{run_dir} was trained with other overrides:\n  {stored}\nnot\n  {overrides}\n"
                                 "use another --out for another recipe")
            return "finished earlier, skipped"
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished run starts again from nothing
        run_dir.mkdir()
        (run_dir / STUDY_FILE).write_text(json.dumps({"overrides": overrides}, indent=2) + "\n", encoding="utf-8")
        metrics, objects = train(compose_config("train", overrides))
        if metrics.get("status") != "ok":
            return f"stopped: {metrics.get('status')}"
        write_predictions(run_dir, metrics, objects)
        return f"trained in {metrics['wall_time_s']:.0f} s"


def load_run(run_dir: Path) -> dict[str, Any]:
    """A finished run's test predictions (probabilities, targets, copy flags) and its metrics.json."""
    with (run_dir / PREDICTIONS).open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    columns = [f"prob_{lab}" for lab in metrics["labels"]]
    probs = np.array([[float(r[c]) for c in columns] for r in rows], dtype=float).reshape(len(rows), len(columns))
    return {"probs": probs, "targets": np.array([int(r["target"]) for r in rows], dtype=int),
            "copy": np.array([r["copy_in_train"] == "1" for r in rows], dtype=bool), "metrics": metrics}


def summarise(runs: dict[str, dict[int, dict[str, Any]]], n_boot: int, boot_seed: int) -> dict[str, Any]:
    """Per protocol and subset (all test images / those without a train copy): per-seed and pooled scores."""
    out: dict[str, Any] = {}
    for protocol, by_seed in runs.items():
        seeds = sorted(by_seed)
        entry: dict[str, Any] = {"seeds": seeds, "copies": {}, "subsets": {}}
        for s in seeds:
            r = by_seed[s]
            entry["copies"][str(s)] = {"test_images": len(r["targets"]), "with_copy_in_train": int(r["copy"].sum())}
        for subset in ("all", "no_copy"):
            per_seed, probs, targets = {}, [], []
            for s in seeds:
                r = by_seed[s]
                keep = np.ones(len(r["targets"]), bool) if subset == "all" else ~r["copy"]
                per_seed[str(s)] = {"test_images": int(keep.sum()), **score(r["probs"][keep], r["targets"][keep])}
                probs.append(r["probs"][keep])
                targets.append(r["targets"][keep])
            pooled_p, pooled_t = np.concatenate(probs), np.concatenate(targets)
            entry["subsets"][subset] = {
                "per_seed": per_seed,
                "mean_sd": {m: mean_sd(v[m] for v in per_seed.values()) for m in METRICS},
                "pooled": {"test_images": len(pooled_t), **bootstrap_ci(pooled_p, pooled_t, n_boot, boot_seed)},
            }
        entry["copies"]["total"] = {k: sum(c[k] for c in entry["copies"].values())
                                    for k in ("test_images", "with_copy_in_train")}
        out[protocol] = entry
    return out


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown(summary: dict[str, Any], command: str, n_boot: int, boot_seed: int) -> str:
    """The study's tables: scores (mean ± sd over seeds; pooled with its 95 % CI) and the byte-copy counts."""
    head = ["protocol", "seeds", "test images (pooled)"]
    for m in METRICS:
        head += [f"{NAMES[m]} mean ± sd", f"{NAMES[m]} pooled [95 % CI]"]
    lines = [f"`{command}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for protocol, subset, name in ROWS:
        if protocol not in summary:
            continue
        sub = summary[protocol]["subsets"][subset]
        cells = [name, ", ".join(map(str, summary[protocol]["seeds"])), str(sub["pooled"]["test_images"])]
        for m in METRICS:
            ms, pooled = sub["mean_sd"][m], sub["pooled"][m]
            cells.append(f"{_f(ms['mean'])} ± {_f(ms['sd'])}" + (f" (n={ms['n']})" if ms["n"] < len(
                summary[protocol]["seeds"]) else ""))
            cells.append(f"{_f(pooled['point'])} [{_f(pooled['low'])}, {_f(pooled['high'])}]")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Pooled: every seed's test predictions together; percentile bootstrap over those images "
              f"({n_boot} resamples, seed {boot_seed}). The sd is over seeds (n - 1).", "",
              "| protocol | seed | test images | with a byte-identical copy in train |", "|---|---|---|---|"]
    for protocol in summary:
        for seed, c in summary[protocol]["copies"].items():
            lines.append(f"| {protocol} | {seed} | {c['test_images']} | {c['with_copy_in_train']} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> Path:
    """One panel per score: each seed a dot, the pooled score a marker with its bootstrap 95 % CI as a bar."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ticks = {"paper (LEAKY), own test": "paper (LEAKY)\nown test", "leak-free": "leak-free",
             "paper, test images without a train copy": "paper, test images\nwithout a train copy"}
    rows = [(p, s, ticks[n]) for p, s, n in ROWS if p in summary]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.8), dpi=100)
    for ax, m in zip(axes, METRICS, strict=True):
        for x, (protocol, subset, _) in enumerate(rows):
            sub = summary[protocol]["subsets"][subset]
            seeds = [v[m] for v in sub["per_seed"].values() if v[m] is not None]
            offsets = np.linspace(-0.15, 0.15, len(seeds)) if len(seeds) > 1 else [0.0] * len(seeds)
            ax.scatter([x + o for o in offsets], seeds, s=18, color="grey", zorder=3,
                       label="one seed" if x == 0 else None)
            pooled = sub["pooled"][m]
            if pooled["point"] is not None and pooled["low"] is not None:
                ax.errorbar([x + 0.3], [pooled["point"]], color="black", capsize=4, fmt="s", markersize=5,
                            yerr=[[pooled["point"] - pooled["low"]], [pooled["high"] - pooled["point"]]],
                            label="pooled, 95 % CI" if x == 0 else None)
        ax.set_xticks(range(len(rows)), [n for _, _, n in rows], fontsize=7)
        ax.set_xlim(-0.5, len(rows) - 0.3)
        ax.set_title(NAMES[m], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    missing = []
    if not args.report_only:
        for seed in args.seeds:
            for protocol in args.protocols:
                run_dir = out / "runs" / f"{protocol}-seed{seed}"
                print(f"[leak study] {protocol} seed {seed}: {train_one(args, protocol, seed, run_dir)}", flush=True)
    # Read every run after the loop: a run that another invocation was training when this one passed it has
    # often finished since (it was reported missing when its state was read right after "running elsewhere").
    for seed in args.seeds:
        for protocol in args.protocols:
            run_dir = out / "runs" / f"{protocol}-seed{seed}"
            if is_finished(run_dir):
                runs.setdefault(protocol, {})[seed] = load_run(run_dir)
            else:
                missing.append(run_dir.name)
    command = " ".join(["python", "examples/leak_study.py", *(argv if argv is not None else sys.argv[1:])])
    summary = summarise(runs, args.bootstrap, args.bootstrap_seed)
    result = {"command": command, "root": str(Path(args.root).resolve()), "overrides": args.overrides,
              "bootstrap": {"resamples": args.bootstrap, "seed": args.bootstrap_seed, "level": 0.95},
              "missing_runs": missing, "protocols": summary}
    (out / "leak_study.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    text = markdown(summary, command, args.bootstrap, args.bootstrap_seed)
    if missing:
        text += f"\nNot finished yet (not in the figures): {', '.join(missing)}\n"
    (out / "leak_study.md").write_text(text, encoding="utf-8")
    if summary:
        plot(summary, out / "leak_study.png")
    print(text + f"\nwrote {out / 'leak_study.json'}, leak_study.md" + (", leak_study.png" if summary else ""))
    return result


if __name__ == "__main__":
    main()

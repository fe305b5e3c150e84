"""Seed ensembles against their members, side by side: split figures and resolution agreement.

Several checkpoints trained on one split (one recipe, different training seeds: `data.seed` fixed, `seed`
varied) are averaged by `Predictor.from_checkpoints` (`inference.ensemble`). For each member and for the
ensemble this prints, from one preprocessing pass per page:

- the macro-F1, accuracy and NLL (of the calibrated probabilities) on each split of `--manifest` named in `--splits` (default val and test; choose
  by val, the test only reports);
- with `--fullres` and `--dev` present (the 32 originals and their half-resolution twins, as
  `bench_resolution.py score` reads them): how many of the 32 get the same label on both sides, the
  macro-F1 on each side, and how far the probabilities move between a page and its twin (per page the
  largest change of one class's probability; its mean and maximum over the pairs). The count only sees the
  pages whose label flips; the shift says how close the others came.

    python benchmarks/bench_ensemble.py --root /data/dev32 --manifest RUN0/splits.csv \\
        --ckpt RUN0/checkpoints/best.ckpt RUN1/checkpoints/best.ckpt RUN2/checkpoints/best.ckpt

Nothing here is timed or asserted; tests/test_ensemble.py holds the arithmetic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from _common import Check, add_json_arg, print_checks, print_table, save_json, start_cpu_benchmark
from bench_resolution import DATA, pairs

from ecg_inception.data.labels import label_for_folder
from ecg_inception.data.manifest import Manifest
from ecg_inception.models.metrics import report_from_predictions


def member_and_ensemble_probs(predictor: Any, paths: list[Path]) -> list[torch.Tensor]:
    """[member 1, ..., member k, ensemble] probabilities [N, C] of `paths`, preprocessed once, each member run once
    (the ensemble's output is the mean of these, as its `forward` takes it)."""
    x = predictor.preprocess(paths).to(predictor.device)
    with torch.inference_mode():
        each = predictor.ensemble.member_probabilities(x).float().cpu()
    return [*each, each.mean(dim=0)]


def probability_shift(originals: torch.Tensor, twins: torch.Tensor) -> torch.Tensor:
    """Per pair, the largest change of one class's probability between a page and its twin ([N] in [0, 1])."""
    return (originals - twins).abs().amax(dim=-1)


def nll(probs: torch.Tensor, target: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class (the calibrated probabilities clamped at 1e-12)."""
    return float(-probs.gather(1, target[:, None]).clamp_min(1e-12).log().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, nargs="+", required=True, help="the members (one split, one recipe)")
    parser.add_argument("--manifest", type=Path, help="the members' split manifest (a run's splits.csv)")
    parser.add_argument("--root", type=Path, help="the data folder the manifest's paths are relative to")
    parser.add_argument("--protocol", default="leakfree", help="the manifest's protocol")
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--fullres", type=Path, default=DATA / "mendeley-ecg-fullres-sample")
    parser.add_argument("--dev", type=Path, default=DATA / "mendeley-ecg-dev")
    parser.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    add_json_arg(parser)
    args = parser.parse_args(argv)
    if (args.manifest is None) != (args.root is None):
        parser.error("--manifest and --root go together")
    torch.set_num_threads(1)
    info = start_cpu_benchmark(argparse.Namespace(threads=1), f"seed ensemble of {len(args.ckpt)}")
    from ecg_inception.inference import Predictor

    predictor = Predictor.from_checkpoints(args.ckpt, device="cpu", num_workers=0)
    labels = list(predictor.labels)
    names = [f"member {i + 1}" for i in range(len(args.ckpt))] + ["ensemble"]
    figures: dict[str, Any] = {"checkpoints": [str(c) for c in args.ckpt], "models": names}
    columns: dict[str, list[str]] = {}
    checks: list[Check] = []
    if args.manifest is not None:
        manifest = Manifest.read_csv(args.manifest, args.protocol, root=args.root, labels=labels)
        for split in args.splits:
            rows = manifest.split_rows(split)
            if not rows:
                parser.error(f"{args.manifest}: no {split!r} rows")
            target = torch.tensor([labels.index(r.label) for r in rows])
            probs = member_and_ensemble_probs(predictor, [args.root / r.path for r in rows])
            reports = [report_from_predictions(p, target, labels, nll(p, target)) for p in probs]
            figures[split] = reports
            columns[f"{split} macro-F1"] = [f"{r['f1_macro']:.3f}" for r in reports]
            columns[f"{split} accuracy"] = [f"{r['accuracy']:.3f}" for r in reports]
            columns[f"{split} NLL"] = [f"{r['loss']:.3f}" for r in reports]
            checks.append(Check(f"{split} macro-F1, ensemble", reports[-1]["f1_macro"], None))
            checks.append(Check(f"{split} macro-F1, members' mean",
                                sum(r["f1_macro"] for r in reports[:-1]) / (len(reports) - 1), None))  # fmt: skip
    fullres, dev = args.fullres.resolve(), args.dev.resolve()
    if fullres.is_dir() and dev.is_dir():
        items = pairs(fullres, dev)[: args.limit]
        target = torch.tensor([labels.index(label_for_folder(o.parent.name)) for o, _ in items])
        originals = member_and_ensemble_probs(predictor, [o for o, _ in items])
        twins = member_and_ensemble_probs(predictor, [t for _, t in items])
        agree = [int((o.argmax(-1) == t.argmax(-1)).sum()) for o, t in zip(originals, twins, strict=True)]
        f1o = [report_from_predictions(p, target, labels)["f1_macro"] for p in originals]
        f1t = [report_from_predictions(p, target, labels)["f1_macro"] for p in twins]
        n = len(items)
        flips = [[f"{o.parent.name}/{o.name}: {labels[int(a)]} / {labels[int(b)]}"
                  for (o, _), a, b in zip(items, po.argmax(-1), pt.argmax(-1), strict=True) if a != b]
                 for po, pt in zip(originals, twins, strict=True)]  # fmt: skip
        shifts = [probability_shift(o, t) for o, t in zip(originals, twins, strict=True)]
        figures["pairs"] = {"n": n, "agreement": agree, "f1_originals": f1o, "f1_twins": f1t, "flips": flips,
                            "shift_mean": [float(s.mean()) for s in shifts],
                            "shift_max": [float(s.max()) for s in shifts]}  # fmt: skip
        for name, pages in zip(names, flips, strict=True):
            print(f"{name}: label differs (original / twin) on {'; '.join(pages) if pages else 'no page'}")
        columns[f"same label (of {n})"] = [str(a) for a in agree]
        columns["macro-F1 originals"] = [f"{v:.3f}" for v in f1o]
        columns["macro-F1 twins"] = [f"{v:.3f}" for v in f1t]
        columns["prob. shift mean / max"] = [f"{s.mean():.3f} / {s.max():.3f}" for s in shifts]
        checks.append(Check(f"originals vs twins same label, ensemble (of {n})", float(agree[-1]), float(n - 1)))
        checks.append(Check("probability shift, ensemble (mean over pairs)", float(shifts[-1].mean()), None))
        checks.append(Check("probability shift, members' mean", float(sum(s.mean() for s in shifts[:-1]))
                            / (len(shifts) - 1), None))  # fmt: skip
        checks.append(Check(f"members at >= {n - 1} of {n}", float(sum(a >= n - 1 for a in agree[:-1])), None))
        checks.append(Check("|F1 originals - F1 twins|, ensemble", abs(f1o[-1] - f1t[-1]), 0.05,
                            higher_is_better=False))  # fmt: skip
    else:
        print(f"no pairs: {fullres} or {dev} is missing")
    if not columns:
        parser.error("nothing to measure: give --manifest and --root, or have the pair folders")
    print_table([(name, *(col[i] for col in columns.values())) for i, name in enumerate(names)],
                ("model", *columns))  # fmt: skip
    print_checks(checks)
    save_json(args.json, "ensemble", info, args, figures, checks)
    return 0


if __name__ == "__main__":
    sys.exit(main())

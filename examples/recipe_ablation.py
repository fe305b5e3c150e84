"""Compare from-scratch recipes by their whole curves: val AND test macro-F1 after every epoch, one JSON per run.

The library tests a run once, on the checkpoint that validation picked. To study a recipe on a 43-image test split
that is one noisy draw, so this script trains a plain inception_v3 loop on pre-decoded tensors (the library's
audit, leak-free split, crop, ink, resize, normalisation, shifts and metrics; no Lightning) and records every
epoch. Choose by the validation curve; the test curve shows how much one split's test score moves from epoch to
epoch (every look at it spends that split), and `best val acc -> test` below is the figure a real run reports.

How `conf/experiment/scratch_cpu.yaml` was chosen (docs/scratch_cpu.md), e.g. on the dev subset:

    python examples/recipe_ablation.py DEV --split-seed 0 --size 160 160 --out base.json             # baseline
    python examples/recipe_ablation.py DEV --split-seed 0 --size 128 256 --ink --ema 0.98 --ema-start 5 \\
        --out recipe.json

Decoded tensors are kept in --cache (default: a temporary folder) so repeated runs skip the decoding.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from ecg_inception.data.audit import audit_folder
from ecg_inception.data.scan import open_rgb
from ecg_inception.data.split import make_split
from ecg_inception.data.transforms import (
    PREPROCESS_VERSION,
    Normalize,
    RandomShift,
    preprocess,
    resolve_data_config,
)
from ecg_inception.models.metrics import report_from_predictions


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", help="image folder (e.g. the Mendeley folder as downloaded)")
    p.add_argument("--split-seed", type=int, default=0, help="leak-free split seed (ecg-inception-split --seed)")
    p.add_argument("--size", type=int, nargs=2, default=[160, 160], metavar=("H", "W"))
    p.add_argument("--ink", action="store_true", help="grid removed and trace thickened before resizing")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--opt", choices=("adam", "adamw", "sgd"), default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.0, help="weight decay")
    p.add_argument("--sched", choices=("none", "cosine"), default="none")
    p.add_argument("--warmup", type=int, default=0, help="epochs of linear LR warm-up")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--class-weights", action="store_true", help="inverse train-class frequency in the loss")
    p.add_argument("--shift", type=float, default=0.0, help="whole-pixel random shift, fraction of each side")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay per step (0: off)")
    p.add_argument("--ema-start", type=int, default=0, help="first epoch the EMA averages")
    p.add_argument("--drop", type=float, default=0.0, help="dropout before the classifier")
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=None, help="folder for decoded tensors (default: a temporary one)")
    p.add_argument("--out", required=True, help="JSON file: arguments and per-epoch history")
    return p.parse_args()


DATA_CONFIG = resolve_data_config("inception_v3")  # mean, std and interpolation of timm's inception_v3
NORMALIZE = Normalize(DATA_CONFIG.mean, DATA_CONFIG.std)


def load_splits(args: argparse.Namespace) -> tuple[list[str], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Labels and {split: (uint8 images [N, 3, H, W], targets)} of one leak-free split, decoded once."""
    root = Path(args.root)
    manifest = make_split(audit_folder(root), "leakfree", args.split_seed, balance="none")
    fields = [str(root.resolve()), args.split_seed, args.size, args.ink, PREPROCESS_VERSION]  # no stale tensors
    key = hashlib.sha256(json.dumps(fields).encode())
    cache = Path(args.cache or tempfile.mkdtemp(prefix="ecg_ablation_")) / f"{key.hexdigest()[:16]}.pt"
    if cache.is_file():
        images = torch.load(cache, weights_only=True)  # a dict of uint8 tensors: plain data
    else:
        images = {
            r.path: preprocess(open_rgb(root / r.path), r.box, tuple(args.size), "squash", DATA_CONFIG.interpolation, args.ink)
            for r in manifest.rows
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(images, cache)
    labels = list(manifest.labels)
    splits = {}
    for split in ("train", "val", "test"):
        rows = manifest.split_rows(split)
        x = torch.stack([images[r.path] for r in rows])
        splits[split] = (x, torch.tensor([labels.index(r.label) for r in rows]))
    return labels, splits


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 batch -> the library's normalisation, channels_last as the library's default."""
    return NORMALIZE(x).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, labels: list[str]) -> dict[str, float]:
    """Macro-F1, accuracy and loss of one split, computed as the library's reports compute them."""
    model.eval()
    logits = torch.cat([model(normalise(x[i : i + 32])) for i in range(0, len(x), 32)])
    loss = float(F.cross_entropy(logits, y))
    report = report_from_predictions(logits.softmax(1), y, labels, loss)
    return {"f1": report["f1_macro"], "acc": report["accuracy"], "loss": loss}


def shift_batch(x: torch.Tensor, shift: RandomShift) -> torch.Tensor:
    """`transforms.RandomShift` (whole-pixel moves, white fill), one draw per image."""
    return torch.stack([shift(img) for img in x])


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, over parameters and BatchNorm statistics alike."""
    with torch.no_grad():
        for e, m in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                e.mul_(decay).add_(m, alpha=1 - decay)
            else:
                e.copy_(m)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    labels, data = load_splits(args)
    torch.manual_seed(args.seed)
    k = len(labels)
    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["val"], data["test"]
    model = timm.create_model("inception_v3", pretrained=False, num_classes=k, aux_logits=False,
                              drop_rate=args.drop).to(memory_format=torch.channels_last)  # fmt: skip
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[args.opt]
    extra = {"momentum": 0.9, "nesterov": True} if args.opt == "sgd" else {}
    opt = opt_cls(model.parameters(), args.lr, weight_decay=args.wd, **extra)
    steps = len(xtr) // args.batch_size  # the last partial batch is dropped
    total, warm = steps * args.epochs, args.warmup * steps

    def lr_factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))) if args.sched == "cosine" else 1.0

    counts = torch.bincount(ytr, minlength=k).float()
    weight = counts.sum() / (k * counts) if args.class_weights else None
    gen = torch.Generator().manual_seed(args.seed)
    shift = RandomShift(args.shift, generator=gen) if args.shift > 0 else None
    ema, history, step, started = None, [], 0, time.time()
    for epoch in range(args.epochs):
        model.train()
        perm, losses, correct = torch.randperm(len(xtr), generator=gen), [], 0
        for b in range(steps):
            idx = perm[b * args.batch_size : (b + 1) * args.batch_size]
            x = shift_batch(xtr[idx], shift) if shift is not None else xtr[idx]
            for group in opt.param_groups:
                group["lr"] = args.lr * lr_factor(step)
            logits = model(normalise(x))
            loss = F.cross_entropy(logits, ytr[idx], weight=weight, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            correct += int((logits.argmax(1) == ytr[idx]).sum())
            if args.ema > 0 and epoch >= args.ema_start:
                if ema is None:
                    ema = copy.deepcopy(model)
                else:
                    ema_update(ema, model, args.ema)
        scored = ema if ema is not None else model
        val, test = evaluate(scored, xva, yva, labels), evaluate(scored, xte, yte, labels)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)),
                        "train_acc": correct / (steps * args.batch_size), "val": val, "test": test,
                        "seconds": time.time() - started})  # fmt: skip
        print(f"epoch {epoch:2d} train loss {np.mean(losses):.3f} | val F1 {val['f1']:.3f} acc {val['acc']:.3f} "
              f"loss {val['loss']:.3f} | test F1 {test['f1']:.3f} acc {test['acc']:.3f}", flush=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "labels": labels, "history": history}))
    best = max(range(len(history)), key=lambda i: (history[i]["val"]["acc"], -i))  # first best, as ModelCheckpoint
    last = history[-10:]
    print(f"best val acc at epoch {best} -> test macro-F1 {history[best]['test']['f1']:.3f} "
          f"acc {history[best]['test']['acc']:.3f}; last {len(last)} epochs: mean val F1 "
          f"{np.mean([h['val']['f1'] for h in last]):.3f}, mean test F1 {np.mean([h['test']['f1'] for h in last]):.3f}")


if __name__ == "__main__":
    main()

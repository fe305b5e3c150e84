"""Framework overhead: EcgClassifier under the Lightning Trainer vs a hand-written timm + PyTorch loop.

Both sides train the same timm inception_v3 (same config, same initial weights, same frozen/trainable
parameters and frozen-BatchNorm handling, Adam with the same lr, CE + aux_weight x CE(aux)) on the same
pre-made tensors through one DataLoader (num_workers=0), for the same number of steps. The clock is read at the
end of every step (after the optimizer step) on both sides: on the Trainer side by a Callback's
`on_train_batch_end`, in the plain loop right after `optimizer.step()`. Throughput is taken over the window
from the end of the last warm-up step to the end of the last step, so data fetching, hooks, logging and
everything else between two steps counts on both sides alike; nothing is subtracted. Runs alternate
(Trainer, plain, Trainer, plain, ...) and the medians are compared.

    python benchmarks/bench_framework.py                  # 299 px, aux on, batch 8, all blocks train
    python benchmarks/bench_framework.py --unfreeze 3 --steps 8 --rounds 3 --json fw.json
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F
from _common import (
    Check,
    add_json_arg,
    add_threads_arg,
    alternate,
    check_aux_size,
    median,
    parse_unfreeze,
    print_checks,
    save_json,
    spread,
    start_cpu_benchmark,
)
from lightning.pytorch import Callback, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ecg_inception.models.module import EcgClassifier

TARGET_RATIO = 0.95
NUM_CLASSES = 4


class StepClock(Callback):
    """perf_counter() at the end of every training batch (after backward and the optimizer step)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.ends.append(time.perf_counter())


def window_rate(ends: list[float], warmup: int, steps: int, batch_size: int) -> float:
    """Images/s from the end of warm-up step `warmup` to the end of the last step."""
    if len(ends) != warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} step ends, got {len(ends)}")
    return steps * batch_size / (ends[-1] - ends[warmup - 1])


def step_durations(ends: list[float], warmup: int) -> list[float]:
    """Seconds of each timed step: end of the step minus end of the step before (nothing left out)."""
    return [b - a for a, b in zip(ends[warmup - 1:-1], ends[warmup:], strict=True)]


def set_frozen_bn_eval_plain(model: nn.Module) -> None:
    """Plain-PyTorch equivalent of the module's rule: a BatchNorm whose parameters are all frozen runs in eval."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters())
            if params and not any(p.requires_grad for p in params):
                m.eval()


def build_pair(args: argparse.Namespace) -> tuple[EcgClassifier, nn.Module]:
    """The Lightning module and a plain timm model with the same config, weights and trainable set."""
    module = EcgClassifier(
        model_name="inception_v3", num_classes=NUM_CLASSES, pretrained=False, aux_logits=args.aux,
        aux_weight=args.aux_weight, drop_rate=args.drop_rate, unfreeze=parse_unfreeze(args.unfreeze),
        optimizer={"name": "adam", "lr": args.lr}, channels_last=args.channels_last,
    )  # fmt: skip
    kwargs = {"num_classes": NUM_CLASSES, "drop_rate": args.drop_rate}
    if args.aux:
        kwargs["aux_logits"] = True
    plain = timm.create_model("inception_v3", pretrained=False, **kwargs)
    plain.load_state_dict(module.backbone.state_dict())
    if args.channels_last:  # the same layout as the module: weights once, every batch on the way in
        plain.to(memory_format=torch.channels_last)
    trainable = {n for n, p in module.backbone.named_parameters() if p.requires_grad}
    for name, p in plain.named_parameters():
        p.requires_grad_(name in trainable)
    module.train()
    plain.train()
    set_frozen_bn_eval_plain(plain)
    eval_a = {n for n, m in module.backbone.named_modules() if not m.training}
    eval_b = {n for n, m in plain.named_modules() if not m.training}
    if eval_a != eval_b:
        raise RuntimeError(f"frozen-BN handling differs: {sorted(eval_a ^ eval_b)[:5]}")
    return module, plain


def make_loader(args: argparse.Namespace) -> DataLoader:
    n = args.batch_size * (args.warmup + args.steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=False, num_workers=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", type=int, default=299, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (after the warm-up steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every run (>= 1)")
    parser.add_argument("--process-warmup", type=int, default=2,
                        help="untimed plain steps once before any run (first steps in a process are slow)")
    parser.add_argument("--rounds", type=int, default=2, help="Trainer/plain pairs, alternated (A B A B)")
    parser.add_argument("--unfreeze", default="all", help="all | N (trailing blocks) | layers:N")
    parser.add_argument("--aux", action=argparse.BooleanOptionalAction, default=True, help="aux logits + aux loss")
    parser.add_argument("--aux-weight", type=float, default=0.4)
    parser.add_argument("--drop-rate", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="NHWC layout in both variants (EcgClassifier's default)")
    add_threads_arg(parser)
    add_json_arg(parser)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be >= 1")
    parse_unfreeze(args.unfreeze)
    check_aux_size(parser, args.aux, args.size)

    info = start_cpu_benchmark(args, "bench_framework: Lightning Trainer vs plain timm + PyTorch loop (training step)")
    module, plain = build_pair(args)

    def layout(x: torch.Tensor) -> torch.Tensor:
        """The plain loop's input layout, as EcgClassifier converts its batches."""
        return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x

    n_train = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in plain.parameters())
    print(f"model   : inception_v3, {args.size} px, aux {'on' if args.aux else 'off'}, unfreeze {args.unfreeze} "
          f"({n_train:,} of {n_all:,} parameters train), batch {args.batch_size}, Adam lr {args.lr}")
    print(f"schedule: {args.rounds} rounds x (Trainer, plain), each {args.warmup} warm-up + {args.steps} timed steps")
    loader = make_loader(args)
    wall: dict[str, list[float]] = {"trainer": [], "plain": []}
    durations: dict[str, list[float]] = {"trainer": [], "plain": []}

    def trainer_run() -> float:
        clock = StepClock()
        trainer = Trainer(
            accelerator="cpu", devices=1, precision="32-true", max_epochs=1, max_steps=args.warmup + args.steps,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock],
        )  # fmt: skip
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        wall["trainer"].append(time.perf_counter() - start)
        durations["trainer"] += step_durations(clock.ends, args.warmup)
        return window_rate(clock.ends, args.warmup, args.steps, args.batch_size)

    def plain_run() -> float:
        start = time.perf_counter()
        optimizer = torch.optim.Adam([p for p in plain.parameters() if p.requires_grad], lr=args.lr)
        plain.train()
        set_frozen_bn_eval_plain(plain)
        ends: list[float] = []
        for x, y in loader:
            out = plain(layout(x))
            logits, aux = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
            loss = F.cross_entropy(logits, y)
            if aux is not None and args.aux_weight:
                loss = loss + args.aux_weight * F.cross_entropy(aux, y)
            optimizer.zero_grad(set_to_none=True)  # after the forward, before backward: Lightning's order
            loss.backward()
            optimizer.step()
            ends.append(time.perf_counter())
        wall["plain"].append(time.perf_counter() - start)
        durations["plain"] += step_durations(ends, args.warmup)
        return window_rate(ends, args.warmup, args.steps, args.batch_size)

    # Process warm-up (untimed, once): the first steps in a fresh process build oneDNN primitives and take
    # several times longer than later ones; run them before either side is measured.
    print(f"process warm-up: {args.process_warmup} plain steps (untimed)", flush=True)
    warm_opt = torch.optim.Adam([p for p in plain.parameters() if p.requires_grad], lr=args.lr)
    for i, (x, y) in enumerate(loader):
        if i == args.process_warmup:
            break
        out = plain(layout(x))
        loss = F.cross_entropy(out[0] if isinstance(out, (tuple, list)) else out, y)
        warm_opt.zero_grad(set_to_none=True)
        loss.backward()
        warm_opt.step()
    del warm_opt

    print("images/s per run (window from the end of the warm-up to the end of the last step):")
    rates = alternate({"Trainer (EcgClassifier)": trainer_run, "plain timm + PyTorch loop": plain_run}, args.rounds)
    trainer_rates, plain_rates = rates["Trainer (EcgClassifier)"], rates["plain timm + PyTorch loop"]
    run_ratios = [t / p for t, p in zip(trainer_rates, plain_rates, strict=True)]
    # Primary figure: the median step time over all timed steps of all runs. A shared machine stalls a step
    # now and then (other jobs take the cores); the median ignores those bursts, a window mean does not.
    step_t, step_p = median(durations["trainer"]), median(durations["plain"])
    rate_t, rate_p = args.batch_size / step_t, args.batch_size / step_p
    ratio = rate_t / rate_p
    window_ratio = median(trainer_rates) / median(plain_rates)
    wall_ratio = median(wall["plain"]) / median(wall["trainer"])
    n_steps = len(durations["trainer"])
    checks = [
        Check("Trainer images/s (median step)", rate_t, unit=" img/s",
              note=f"{n_steps} steps, {step_t:.3f} s/step (steps {spread(durations['trainer'])} s)"),
        Check("plain loop images/s (median step)", rate_p, unit=" img/s",
              note=f"{n_steps} steps, {step_p:.3f} s/step (steps {spread(durations['plain'])} s)"),
        Check("ratio Trainer / plain (median steps)", ratio, TARGET_RATIO),
        Check("ratio Trainer / plain (median run windows)", window_ratio,
              note=f"Trainer runs {spread(trainer_rates)} img/s, plain {spread(plain_rates)} img/s; "
                   f"per-round {', '.join(f'{r:.3f}' for r in run_ratios)}"),
        Check("whole run incl. start-up: plain s / Trainer s", wall_ratio,
              note=f"Trainer {median(wall['trainer']):.1f} s, plain {median(wall['plain']):.1f} s for "
                   f"{args.warmup + args.steps} steps (fit set-up + warm-up steps included)"),
    ]  # fmt: skip
    print_checks(checks, "bench_framework")
    figures = {"trainer_img_s_per_run": trainer_rates, "plain_img_s_per_run": plain_rates,
               "trainer_step_s": durations["trainer"], "plain_step_s": durations["plain"],
               "ratio_median_steps": ratio, "ratio_median_windows": window_ratio, "wall_s": wall,
               "trainable_params": n_train}
    save_json(args.json, "bench_framework", info, args, figures, checks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GPU full fine-tune throughput: fp32 eager vs bf16-mixed autocast + channels_last (+ torch.compile).

Every variant trains the same EcgClassifier (timm inception_v3, 299 px, aux on, all blocks train, Adam,
CE + 0.4 x aux CE) on the same GPU from the same initial weights, on pre-made random batches already on the
device (this measures the model, not data loading). Timing uses CUDA events around a fixed number of steps
after warm-up steps, then a synchronize; variants alternate (A B C A B C) and medians are compared.
cudnn.benchmark is on for every variant (as in conf/trainer/gpu.yaml) unless --no-cudnn-benchmark; the TF32
flags are PyTorch's defaults and are printed. Where no CUDA device exists the script prints
"no CUDA device: skipped" and exits 0. `--dry-run-cpu` runs the same code paths on the CPU at a tiny size to
check the script on a machine without a GPU; its figures mean nothing.

    python benchmarks/bench_gpu.py                          # batch 128, fp32 vs bf16-mixed + channels_last
    python benchmarks/bench_gpu.py --compile --json gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _common import (
    Check,
    add_json_arg,
    check_aux_size,
    load_average,
    machine_info,
    median,
    parse_unfreeze,
    print_checks,
    print_machine,
    quiet_warnings,
    save_json,
    spread,
)
from torch import nn

from ecg_inception.models.module import EcgClassifier

TARGET_SPEEDUP = 2.0
TARGET_IMG_S = 3000.0  # on one H100
NUM_CLASSES = 4
N_BATCHES = 4  # distinct pre-made batches, cycled


@dataclass
class Variant:
    name: str
    channels_last: bool
    bf16: bool
    compile: bool


def variants_for(args: argparse.Namespace, bf16_ok: bool) -> list[Variant]:
    out = [Variant("fp32 eager (NCHW)", False, False, False)]
    if bf16_ok:
        out.append(Variant("bf16-mixed + channels_last", True, True, False))
        if args.compile:
            out.append(Variant("bf16-mixed + channels_last + compile", True, True, True))
    elif args.compile:
        out.append(Variant("fp32 channels_last + compile", True, False, True))
    return out


class Runner:
    """One variant: its own model copy and optimizer, and a `steps(n)` that runs n training steps."""

    def __init__(self, variant: Variant, state: dict[str, torch.Tensor], args: argparse.Namespace,
                 device: torch.device, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.variant = variant
        self.device = device
        module = EcgClassifier(pretrained=False, num_classes=NUM_CLASSES, aux_logits=args.aux,
                               unfreeze=parse_unfreeze(args.unfreeze), channels_last=variant.channels_last,
                               optimizer={"name": "adam", "lr": args.lr})
        module.load_state_dict(state)
        module.to(device)
        if variant.channels_last:
            module.backbone.to(memory_format=torch.channels_last)
        module.train()
        self.module = module
        self.net: Callable[[torch.Tensor], object] = (
            torch.compile(module.backbone, mode=args.compile_mode) if variant.compile else module.backbone
        )
        self.optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=args.lr)
        self.batches = [
            (x.contiguous(memory_format=torch.channels_last) if variant.channels_last else x, y) for x, y in batches
        ]
        self.i = 0
        self.last_loss = float("nan")

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.variant.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def steps(self, n: int) -> torch.Tensor:
        loss = None
        for _ in range(n):
            x, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            with self.autocast():
                out = self.net(x)
                logits, aux = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
                loss = self.module.compute_loss(logits, aux, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return loss


def timed(runner: Runner, steps: int, cuda: bool) -> float:
    """Seconds for `steps` training steps: CUDA events on a GPU (then synchronize), perf_counter on a CPU."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        loss = runner.steps(steps)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000.0
    else:
        begin = time.perf_counter()
        loss = runner.steps(steps)
        seconds = time.perf_counter() - begin
    runner.last_loss = float(loss.detach().float())
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed steps before the first timed round of a variant (compile happens here)")
    parser.add_argument("--rewarm", type=int, default=2, help="untimed steps before each later round")
    parser.add_argument("--rounds", type=int, default=3, help="variants alternate within each round")
    parser.add_argument("--compile", action="store_true", help="add bf16-mixed + channels_last + torch.compile")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default, max-autotune, ...)")
    parser.add_argument("--unfreeze", default="all", help="all | N (trailing blocks) | layers:N")
    parser.add_argument("--aux", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda", help="CUDA device, e.g. cuda:1")
    parser.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="run the code paths on the CPU at a tiny size (no aux, 96 px, batch 2); figures mean "
                             "nothing")
    add_json_arg(parser)
    args = parser.parse_args(argv)
    if min(args.size, args.batch_size, args.steps, args.rounds) < 1 or args.warmup < 0 or args.rewarm < 0:
        parser.error("--size, --batch-size, --steps and --rounds must be >= 1; warm-ups >= 0")
    parse_unfreeze(args.unfreeze)
    if args.dry_run_cpu:
        args.aux, args.size, args.batch_size = False, 96, 2
        args.steps, args.warmup, args.rewarm, args.rounds = 2, 1, 0, 1
    check_aux_size(parser, args.aux, args.size)

    quiet_warnings()
    title = "bench_gpu: full fine-tune, fp32 eager vs bf16-mixed + channels_last (+ torch.compile)"
    cuda = torch.cuda.is_available() and not args.dry_run_cpu
    if not cuda and not args.dry_run_cpu:
        info = machine_info("cpu")
        print_machine(info, title)
        print("no CUDA device: skipped")
        checks = [Check("GPU throughput", None, note="no CUDA device: skipped")]
        save_json(args.json, "bench_gpu", info, args, {"skipped": "no CUDA device"}, checks)
        return 0

    device = torch.device(args.device if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    info = machine_info(str(device))
    print_machine(info, title + (" [DRY RUN ON CPU: figures mean nothing]" if not cuda else ""))
    bf16_ok = torch.cuda.is_bf16_supported() if cuda else True
    if not bf16_ok:
        print("this GPU has no bf16: bf16 variants skipped")
    if cuda:
        print(f"flags   : cudnn.benchmark={torch.backends.cudnn.benchmark}, "
              f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
              f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32} (PyTorch defaults)")
    print(f"model   : inception_v3, {args.size} px, aux {'on' if args.aux else 'off'}, unfreeze {args.unfreeze}, "
          f"batch {args.batch_size}, Adam lr {args.lr}")

    torch.manual_seed(0)
    reference: nn.Module = EcgClassifier(pretrained=False, num_classes=NUM_CLASSES, aux_logits=args.aux,
                                         unfreeze=parse_unfreeze(args.unfreeze))
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    del reference
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.size, args.size, generator=gen).to(device),
                torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=gen).to(device))
               for _ in range(N_BATCHES)]
    runners = [Runner(v, state, args, device, batches) for v in variants_for(args, bf16_ok)]
    peak: dict[str, float] = {}
    seconds: dict[str, list[float]] = {r.variant.name: [] for r in runners}
    print(f"schedule: {args.rounds} rounds x {len(runners)} variants, {args.steps} timed steps each "
          f"({args.warmup} warm-up steps before a variant's first round, {args.rewarm} before later ones)")
    for rnd in range(args.rounds):
        for runner in runners:
            name = runner.variant.name
            warm = args.warmup if rnd == 0 else args.rewarm
            if warm:
                begin = time.perf_counter()
                runner.steps(warm)
                if cuda:
                    torch.cuda.synchronize()
                if rnd == 0:
                    print(f"  warm-up {name:<40s} {warm} steps in {time.perf_counter() - begin:.1f} s", flush=True)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            s = timed(runner, args.steps, cuda)
            seconds[name].append(s)
            if cuda:
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
            rate = args.steps * args.batch_size / s
            print(f"  round {rnd + 1}/{args.rounds} {name:<40s} {rate:9.1f} img/s  loss {runner.last_loss:.3f}  "
                  f"(load {load_average()})", flush=True)

    rates = {name: [args.steps * args.batch_size / s for s in secs] for name, secs in seconds.items()}
    med = {name: median(r) for name, r in rates.items()}
    base_name = runners[0].variant.name
    gpu = info.get("gpu", "cpu (dry run)")
    on_h100 = "H100" in str(gpu)
    checks = [Check(f"{name} images/s", med[name], unit=" img/s",
                    note=f"rounds {spread(rates[name])}" + (f"; peak {peak[name]:.1f} GiB" if name in peak else ""))
              for name in med]
    if len(runners) > 1 and runners[1].variant.bf16:
        fast = runners[1].variant.name
        checks.append(Check("speed-up bf16-mixed + channels_last / fp32", med[fast] / med[base_name],
                            TARGET_SPEEDUP, unit="x"))
    if any(r.variant.compile for r in runners):
        comp = next(r.variant.name for r in runners if r.variant.compile)
        checks.append(Check("speed-up with torch.compile / fp32", med[comp] / med[base_name], unit="x"))
    best_name = max(med, key=med.get)
    checks.append(Check("best images/s (target on one H100)", med[best_name], TARGET_IMG_S, unit=" img/s",
                        note=best_name + ("" if on_h100 else f"; this is {gpu}, not an H100: target not comparable")))
    print_checks(checks, "bench_gpu" + ("" if cuda else " [DRY RUN ON CPU: figures mean nothing]"))
    figures = {"img_s_per_round": rates, "seconds_per_round": seconds, "peak_memory_gib": peak,
               "dry_run_cpu": not cuda}
    save_json(args.json, "bench_gpu", info, args, figures, checks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

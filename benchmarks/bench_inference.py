"""CPU inference (and one training step): eager fp32 NCHW vs channels_last, EcgClassifier around inception_v3.

Inference: images/s at 299 px, batch 16, eval mode, aux on (forward returns the main logits), for four
variants: NCHW or channels_last (`EcgClassifier(channels_last=True)`: the weights and every input batch in
channels_last), each under `torch.no_grad()` and `torch.inference_mode()`. All four models carry the same
weights; their outputs are compared before timing. Training: one full fine-tune step (all blocks train,
Adam, CE + 0.4 x aux CE) at batch 8, NCHW vs channels_last, so the CPU default for training can follow the
figure. Variants alternate within each round; figures are the median batch (step) time over all rounds.
ONNX Runtime is not measured: the library has no ONNX export yet. `--cpu-bf16` adds a bf16-autocast
inference variant, to check what bf16 costs on a CPU without native bf16.

    python benchmarks/bench_inference.py
    python benchmarks/bench_inference.py --rounds 5 --iters 2 --train-rounds 4 --json inference.json
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch
from _common import (
    Check,
    add_json_arg,
    add_threads_arg,
    check_aux_size,
    load_average,
    median,
    paired_ratios,
    print_checks,
    print_table,
    save_json,
    spread,
    start_cpu_benchmark,
)

from ecg_inception.models.module import EcgClassifier

TARGET_SPEEDUP = 1.4  # channels_last vs eager fp32 NCHW, inference (8.5 vs 12.4 img/s measured here before)
NUM_CLASSES = 4


def build(channels_last: bool, args: argparse.Namespace, unfreeze: dict | None = None) -> EcgClassifier:
    return EcgClassifier(pretrained=False, num_classes=NUM_CLASSES, aux_logits=args.aux, unfreeze=unfreeze,
                         channels_last=channels_last, optimizer={"name": "adam", "lr": 1e-3})


def run_alternating(variants: dict[str, Callable[[], None]], rounds: int, iters: int, images: int
                    ) -> dict[str, list[float]]:
    """Seconds per call of every variant, alternating variants within each round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, fn in variants.items():
            for _ in range(iters):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            rate = images / median(times[name][-iters:])
            print(f"  round {r + 1}/{rounds} {name:<36s} {rate:8.2f} img/s   (load {load_average()})", flush=True)
    return times


def round_rates(times: dict[str, list[float]], name: str, args: argparse.Namespace, train: bool = False
                ) -> list[float]:
    """Images/s of each round of one variant (median over that round's batches)."""
    iters = args.train_iters if train else args.iters
    batch = args.train_batch_size if train else args.batch_size
    t = times[name]
    return [batch / median(t[i:i + iters]) for i in range(0, len(t), iters)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--batch-size", type=int, default=16, help="inference batch")
    parser.add_argument("--warmup", type=int, default=1, help="untimed inference batches per variant")
    parser.add_argument("--rounds", type=int, default=3, help="inference rounds (variants alternate in each)")
    parser.add_argument("--iters", type=int, default=1, help="timed batches per variant and round")
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--train-warmup", type=int, default=2, help="untimed training steps per variant")
    parser.add_argument("--train-rounds", type=int, default=3, help="0 skips the training comparison")
    parser.add_argument("--train-iters", type=int, default=1, help="timed steps per variant and round")
    parser.add_argument("--aux", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="add a bf16-autocast inference variant (very slow on CPUs without native bf16)")
    add_threads_arg(parser)
    add_json_arg(parser)
    args = parser.parse_args(argv)
    if min(args.rounds, args.iters, args.batch_size, args.train_batch_size) < 1 or args.train_rounds < 0:
        parser.error("sizes, --rounds and --iters must be >= 1 (--train-rounds >= 0)")
    check_aux_size(parser, args.aux, args.size)

    info = start_cpu_benchmark(args, "bench_inference: eager fp32 NCHW vs channels_last on CPU (inference and training step)")
    torch.manual_seed(0)
    figures: dict[str, object] = {}

    # ---------------------------------------------------------------------------------------- inference
    nchw = build(False, args).eval()
    cl = build(True, args).eval()
    cl.load_state_dict(nchw.state_dict())
    x = torch.randn(args.batch_size, 3, args.size, args.size)
    with torch.inference_mode():
        ref = nchw(x)
        diff = ((ref - cl(x)).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    # Random init in eval mode gives huge logits (BatchNorm running stats are 0/1), hence the relative figure.
    print(f"model   : inception_v3 (EcgClassifier, aux {'on' if args.aux else 'off'}), {args.size} px, eval, "
          f"batch {args.batch_size}; NCHW vs channels_last logits: max rel. difference {diff:.1e}")

    def infer(model: EcgClassifier, mode: Callable[[], object]) -> Callable[[], None]:
        def call() -> None:
            with mode():
                model(x)
        return call

    variants = {
        "fp32 NCHW, no_grad (eager baseline)": infer(nchw, torch.no_grad),
        "channels_last, no_grad": infer(cl, torch.no_grad),
        "channels_last, inference_mode": infer(cl, torch.inference_mode),
        "fp32 NCHW, inference_mode": infer(nchw, torch.inference_mode),
    }
    if args.cpu_bf16:
        def bf16_inference() -> contextlib.AbstractContextManager:
            stack = contextlib.ExitStack()
            stack.enter_context(torch.inference_mode())
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            return stack

        variants["bf16 autocast, channels_last, inference_mode"] = infer(cl, bf16_inference)
    print(f"warm-up : {args.warmup} batch(es) per variant (untimed)", flush=True)
    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    print(f"inference, {args.rounds} rounds x {args.iters} batch(es) per variant:")
    times = run_alternating(variants, args.rounds, args.iters, args.batch_size)
    rates = {name: args.batch_size / median(t) for name, t in times.items()}
    base = rates["fp32 NCHW, no_grad (eager baseline)"]
    print()
    print_table([(name, f"{rates[name]:.2f}", f"{median(t):.3f} ({spread(t)})", f"{rates[name] / base:.2f}x")
                 for name, t in times.items()],
                ("inference variant", "img/s", "s/batch median (min..max)", "vs baseline"))
    figures["inference_s_per_batch"] = times
    figures["inference_img_s"] = rates
    del nchw, cl

    # ----------------------------------------------------------------------------------------- training
    train_rates: dict[str, float] = {}
    ttimes: dict[str, list[float]] = {}
    if args.train_rounds:
        all_blocks = {"blocks": "all"}
        t_nchw = build(False, args, all_blocks)
        t_cl = build(True, args, all_blocks)
        t_cl.load_state_dict(t_nchw.state_dict())
        gen = torch.Generator().manual_seed(1)
        xt = torch.randn(args.train_batch_size, 3, args.size, args.size, generator=gen)
        yt = torch.randint(0, NUM_CLASSES, (args.train_batch_size,), generator=gen)

        def stepper(model: EcgClassifier) -> Callable[[], None]:
            model.train()
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

            def step() -> None:
                out = model.backbone(model._prep(xt))
                logits, aux = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
                loss = model.compute_loss(logits, aux, yt)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return step

        steps = {"train step, fp32 NCHW": stepper(t_nchw), "train step, channels_last": stepper(t_cl)}
        print()
        print(f"training: all blocks train, Adam, aux loss, batch {args.train_batch_size}; "
              f"{args.train_warmup} warm-up step(s) per variant (untimed)", flush=True)
        for fn in steps.values():
            for _ in range(args.train_warmup):
                fn()
        ttimes = run_alternating(steps, args.train_rounds, args.train_iters, args.train_batch_size)
        train_rates = {name: args.train_batch_size / median(t) for name, t in ttimes.items()}
        figures["train_s_per_step"] = ttimes
        figures["train_img_s"] = train_rates

    cl_speedup = rates["channels_last, no_grad"] / base
    checks = [
        Check("eager fp32 NCHW, no_grad", base, unit=" img/s"),
        Check("channels_last, no_grad", rates["channels_last, no_grad"], unit=" img/s"),
        Check("channels_last, inference_mode", rates["channels_last, inference_mode"], unit=" img/s"),
        Check("fp32 NCHW, inference_mode", rates["fp32 NCHW, inference_mode"], unit=" img/s"),
        Check("speed-up channels_last / eager (no_grad)", cl_speedup, TARGET_SPEEDUP, unit="x",
              note="per round " + paired_ratios(round_rates(times, "channels_last, no_grad", args),
                                                round_rates(times, "fp32 NCHW, no_grad (eager baseline)", args))),
        Check("speed-up channels_last + inference_mode / eager", rates["channels_last, inference_mode"] / base,
              unit="x"),
        Check("ONNX Runtime", None, note="n/a (no export yet)"),
    ]
    bf16_name = "bf16 autocast, channels_last, inference_mode"
    if bf16_name in rates:
        native = "native bf16" if info["cpu_native_bf16"] else "NO native bf16 on this CPU"
        checks.append(Check("bf16 autocast / fp32 channels_last (inference_mode)",
                            rates[bf16_name] / rates["channels_last, inference_mode"], unit="x", note=native))
    if train_rates:
        t_base, t_cl_rate = train_rates["train step, fp32 NCHW"], train_rates["train step, channels_last"]
        checks += [
            Check("train step fp32 NCHW", t_base, unit=" img/s"),
            Check("train step channels_last", t_cl_rate, unit=" img/s"),
            Check("train speed-up channels_last / NCHW", t_cl_rate / t_base, unit="x",
                  note="per round " + paired_ratios(
                      round_rates(ttimes, "train step, channels_last", args, train=True),
                      round_rates(ttimes, "train step, fp32 NCHW", args, train=True))),
        ]
    print_checks(checks, "bench_inference")
    figures["max_rel_logit_diff"] = diff
    save_json(args.json, "bench_inference", info, args, figures, checks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

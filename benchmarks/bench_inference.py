"""CPU inference (and one training step): eager fp32 NCHW vs channels_last vs ONNX Runtime, inception_v3.

Inference: images/s at 299 px, batch 16, eval mode, aux on (forward returns the main logits), for four
eager variants: NCHW or channels_last (`EcgClassifier(channels_last=True)`: the weights and every input batch
in channels_last), each under `torch.no_grad()` and `torch.inference_mode()`, and ONNX Runtime (CPU provider,
as many intra-op threads as torch) running the model exported by `inference.export` (softmax with T = 1 on
top). All models carry the same weights; their outputs are compared before timing. Training: one full
fine-tune step (all blocks train, Adam, CE + 0.4 x aux CE) at batch 8, NCHW vs channels_last, so the CPU
default for training can follow the figure. Variants alternate within each round; figures are the median
batch (step) time over all rounds. `--cpu-bf16` adds a bf16-autocast inference variant, to check what bf16
costs on a CPU without native bf16.

Folder level (`--folder-pages N`, 0 skips it): N synthetic full-size pages (`--folder-scale`, 1.0 = the
original 2213 x 1572) are predicted by a `Predictor` with 0 workers (pages of a batch preprocessed by one
thread or by one thread per core, `prep_threads`) and with 1 and 2 DataLoader workers, the model on torch's
threads or on the cores the workers leave (`model_threads`), alternating over rounds. The two stage costs
are measured in the same run: t_prep (decode, crop detection, resize of one page, one thread) and t_model
(1 / the channels_last inference_mode rate); with both stages sharing the cores the bound is
cores / (t_prep + cores x t_model), and the goal is 0.8 of it.

Explanations (`--explain-pages N`, 0 skips it): `Predictor.explain` against `Predictor.predict` per page at batch
1, end to end from N synthetic full-size page files, with the overlay PNG timed apart (`bench_explain.py`'s
measurement, on an untrained model of `--explain-size`, scratch_cpu's 128 x 256 by default); the goal is
explain / predict <= 3.

    python benchmarks/bench_inference.py
    python benchmarks/bench_inference.py --rounds 5 --iters 2 --train-rounds 4 --json inference.json
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    usable_cores,
)
from bench_explain import build_predictor, explain_checks, page_files, time_explain

from ecg_inception.models.module import EcgClassifier

TARGET_SPEEDUP = 1.4  # channels_last vs eager fp32 NCHW, inference (8.5 vs 12.4 img/s measured here before)
TARGET_ORT = 1.2  # ONNX Runtime vs channels_last eager (no_grad)
TARGET_FOLDER = 0.8  # folder throughput / two-stage bound
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
    parser.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                        help="export to ONNX and time onnxruntime beside the eager variants")
    parser.add_argument("--folder-pages", type=int, default=48, help="folder-level pages (0: skip that part)")
    parser.add_argument("--folder-rounds", type=int, default=2, help="folder-level rounds (setups alternate)")
    parser.add_argument("--folder-scale", type=float, default=1.0, help="synthetic page scale (1.0: full size)")
    parser.add_argument("--folder-batch-size", type=int, default=8)
    parser.add_argument("--explain-pages", type=int, default=6, help="explain vs predict pages (0: skip)")
    parser.add_argument("--explain-size", type=int, nargs=2, default=[128, 256], metavar=("H", "W"),
                        help="model input for the explain rows (default scratch_cpu's 128 256)")
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
    ort_diff = None
    if args.onnx:
        ort_call, ort_diff = onnx_variant(cl, x, args)
        variants["onnxruntime (CPU EP)"] = ort_call
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
    folder = folder_throughput(cl, args, rates["channels_last, inference_mode"]) if args.folder_pages else None
    explain_times = explain_rows(args) if args.explain_pages else None
    if explain_times:
        figures["explain_s_per_page"] = explain_times
    figures["folder"] = folder
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
    ]
    ort_name = "onnxruntime (CPU EP)"
    if ort_name in rates:
        checks += [
            Check("ONNX Runtime", rates[ort_name], unit=" img/s", note=f"max |p - p_eager| {ort_diff:.1e}"),
            Check("speed-up ONNX Runtime / channels_last (no_grad)", rates[ort_name] / rates["channels_last, no_grad"],
                  TARGET_ORT, unit="x", note="per round " + paired_ratios(
                      round_rates(times, ort_name, args), round_rates(times, "channels_last, no_grad", args))),
        ]
    if folder:
        checks += [
            Check("t_prep (decode + crop + resize, 1 page)", folder["t_prep_s"] * 1000, unit=" ms",
                  note=f"{folder['page_size']} px pages"),
            Check("t_model (channels_last, inference_mode)", folder["t_model_s"] * 1000, unit=" ms"),
            Check("two-stage bound", folder["bound_img_s"], unit=" img/s",
                  note=f"{folder['cores']} / (t_prep + {folder['cores']} t_model)"),
        ]
        for name, rate in folder["img_s"].items():
            checks.append(Check(f"folder, {name}", rate, unit=" img/s",
                                note="rounds " + ", ".join(f"{v:.2f}" for v in folder["runs_img_s"][name])))
        default = folder["default_setup"]
        checks.append(Check("folder Predictor default / bound", folder["img_s"][default] / folder["bound_img_s"],
                            TARGET_FOLDER, unit="x", note=default))
        best = max(folder["img_s"], key=folder["img_s"].get)
        checks.append(Check("folder best / bound", folder["img_s"][best] / folder["bound_img_s"], TARGET_FOLDER,
                            unit="x", note=best))
    if explain_times:
        checks += explain_checks(explain_times)
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


def onnx_variant(model: EcgClassifier, x: torch.Tensor, args: argparse.Namespace
                 ) -> tuple[Callable[[], None], float]:
    """Export `model` (softmax, T = 1) with the library's exporter code path; a timed call and its parity."""
    import tempfile
    import warnings

    import onnxruntime as ort

    from ecg_inception.inference.export import INPUT_NAME, OUTPUT_NAME, ProbabilityModel

    wrapper = ProbabilityModel(model).eval()
    path = Path(tempfile.mkdtemp(prefix="bench_onnx_")) / "model.onnx"
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (x[:2],), str(path), dynamo=True, verbose=False, external_data=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    arr = x.numpy()
    with torch.inference_mode():
        diff = float(abs(session.run([OUTPUT_NAME], {INPUT_NAME: arr})[0] - wrapper(x).numpy()).max())
    print(f"onnx    : exported in {time.perf_counter() - start:.1f} s; onnxruntime {ort.__version__}, "
          f"{options.intra_op_num_threads} intra-op threads; max |p_ort - p_eager| {diff:.1e}", flush=True)

    def call() -> None:
        session.run([OUTPUT_NAME], {INPUT_NAME: arr})
    return call, diff


def folder_throughput(model: EcgClassifier, args: argparse.Namespace, model_rate: float) -> dict[str, Any]:
    """Predictor over a folder of synthetic pages with 0/1/2 workers, against the two-stage bound."""
    import tempfile

    from ecg_inception.data.scale import CANONICAL_PX_PER_MM
    from ecg_inception.data.transforms import PREPROCESS_VERSION, resolve_data_config
    from ecg_inception.inference.inputs import PageDataset, expand_inputs
    from ecg_inception.inference.predictor import Predictor
    from ecg_inception.synthetic.generate import generate_dataset

    root = Path(tempfile.mkdtemp(prefix="bench_folder_"))
    per_class = max(1, -(-args.folder_pages // 4))
    generate_dataset(root, per_class=per_class, seed=0, duplicates=0, scale=args.folder_scale)
    cfg = resolve_data_config("inception_v3", args.size)
    prep = {"model_name": "inception_v3", "size": args.size, "mean": list(cfg.mean), "std": list(cfg.std),
            "interpolation": cfg.interpolation, "resize": "squash", "crop": True, "ink": False,
            "version": PREPROCESS_VERSION, "px_per_mm": CANONICAL_PX_PER_MM}  # as a checkpoint stores it
    items = expand_inputs(root).items[:args.folder_pages]
    pages = PageDataset(items, prep)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    prep_times = [time_one(lambda i=i: pages._item(i)) for i in range(len(items))]
    torch.set_num_threads(threads)
    t_prep, t_model = median(prep_times), 1.0 / model_rate
    cores = usable_cores()
    bound = cores / (t_prep + cores * t_model)
    from PIL import Image

    with Image.open(items[0].source) as im:
        page_size = f"{im.width}x{im.height}"
    print(f"folder  : {len(items)} pages of {page_size} px; t_prep {t_prep * 1000:.0f} ms/page "
          f"(min..max {spread([t * 1000 for t in prep_times])} ms), t_model {t_model * 1000:.0f} ms/img; "
          f"bound {bound:.2f} img/s", flush=True)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return model.calibrated_probabilities(model(batch))

    # (workers, model threads, prep threads): no worker with one or `cores` preprocessing threads, workers
    # beside torch's threads, and the model on the cores the workers leave.
    setups = [(0, None, 1), (0, None, cores), (1, None, 1), (2, None, 1), (1, max(1, cores - 1), 1),
              (2, max(1, cores - 2), 1)]
    runs: dict[str, list[float]] = {}
    for r in range(args.folder_rounds):
        for workers, threads, prep_threads in setups:
            name = folder_setup_name(workers, threads, prep_threads)
            predictor = Predictor(forward, [str(i) for i in range(NUM_CLASSES)], prep,
                                  batch_size=args.folder_batch_size, num_workers=workers, model_threads=threads,
                                  prep_threads=prep_threads)
            start = time.perf_counter()
            records = predictor.predict([item.source for item in items])
            runs.setdefault(name, []).append(len(items) / (time.perf_counter() - start))
            assert all(rec.ok for rec in records)
            print(f"  round {r + 1}/{args.folder_rounds} folder, {name}: {runs[name][-1]:.2f} img/s "
                  f"(load {load_average()})", flush=True)
    rates = {name: median(v) for name, v in runs.items()}
    # What a Predictor built with no options does with this folder on this machine (one of the setups).
    plain = Predictor(forward, [str(i) for i in range(NUM_CLASSES)], prep, batch_size=args.folder_batch_size)
    default_setup = folder_setup_name(plain.loader(expand_inputs(root)).num_workers, None, plain.prep_threads)
    return {"pages": len(items), "page_size": page_size, "t_prep_s": t_prep, "t_model_s": t_model, "cores": cores,
            "bound_img_s": bound, "img_s": rates, "runs_img_s": runs, "prep_times_s": prep_times,
            "default_setup": default_setup}


def folder_setup_name(workers: int, model_threads: int | None, prep_threads: int) -> str:
    """The row name of one folder-level setup."""
    name = f"{workers} worker(s), model threads " + (str(model_threads) if model_threads else
                                                     f"torch's {threads_default()}")
    return name + (f", prep threads {prep_threads}" if workers == 0 else "")


def explain_rows(args: argparse.Namespace) -> dict[str, list[float]]:
    """`bench_explain`'s per-page explain / predict / overlay timings, in this run, on the same threads."""
    with tempfile.TemporaryDirectory() as tmp_dir:
        sub = argparse.Namespace(checkpoint=None, size=args.explain_size, root=None, pages=args.explain_pages)
        files = page_files(sub, Path(tmp_dir))
        times, _ = time_explain(build_predictor(sub), files, args.rounds, Path(tmp_dir))
    return times


def threads_default() -> int:
    return torch.get_num_threads()


def time_one(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    raise SystemExit(main())

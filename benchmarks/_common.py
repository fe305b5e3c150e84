"""Shared helpers of the benchmark scripts: machine description, timing, verdicts, tables and JSON output.

Every script prints the machine it ran on and the load average, measures the variants it compares in the same
process and alternates them (A B A B ...), and ends with one table of figures, targets and PASS/MISS. Nothing
here is a test: figures are printed and optionally saved with `--json OUT`, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() as a fallback)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty when unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def usable_cores() -> int:
    """CPUs this process may run on (the affinity mask), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> str:
    """The 1/5/15-minute load average as printed by `uptime` ('n/a' where the OS has none)."""
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def busy_warning(cores: int) -> str | None:
    """A warning line when other processes already keep more than the usable cores busy."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        return None
    if load1 <= cores:
        return None
    return (f"WARNING : 1-min load {load1:.1f} > {cores} cores: other processes compete for the CPU and figures "
            "are noisy; multi-threaded ops stall when a thread is descheduled (try --threads 1, more rounds)")


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What a figure depends on: CPU, cores, threads, native bf16, library versions and the device."""
    import lightning
    import timm

    flags = cpu_flags()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores_usable": usable_cores(),
        "cores_total": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
        "device": device,
        "cuda_available": torch.cuda.is_available(),
        "load_average_start": load_average(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def print_machine(info: dict[str, Any], title: str) -> None:
    """The header every script prints before measuring."""
    print(f"== {title}")
    print(f"machine : {info['cpu']} | {info['cores_usable']} usable cores ({info['cores_total']} total) | "
          f"torch threads {info['torch_threads']} | native CPU bf16: {'yes' if info['cpu_native_bf16'] else 'no'}")
    print(f"software: python {info['python']} | torch {info['torch']} | timm {info['timm']} | "
          f"lightning {info['lightning']}")
    device = info["device"]
    if "gpu" in info:
        device += f" ({info['gpu']}, {info['gpu_memory_gib']} GiB, CUDA {info['cuda']}, cuDNN {info['cudnn']})"
    print(f"device  : {device}")
    print(f"load avg: {info['load_average_start']} (1/5/15 min, at start)")
    busy = busy_warning(info["cores_usable"])
    if busy:
        print(busy)
    print(f"command : {command_line()}")
    sys.stdout.flush()


def command_line() -> str:
    """How this script was started, to paste into docs/performance.md."""
    return " ".join(["python", *sys.argv])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """'min..max' of a list of figures, to show the noise next to a median."""
    return f"{min(values):.2f}..{max(values):.2f}" if values else "-"


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> str:
    """Round-by-round ratios of two alternated series of rates, e.g. '1.05, 0.98, 1.10'."""
    return ", ".join(f"{a / b:.2f}" for a, b in zip(numerator, denominator, strict=True))


def time_repeats(fn: Callable[[], Any], warmup: int, repeats: int,
                 sync: Callable[[], None] | None = None) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` after `warmup` untimed calls (sync after each, if given)."""
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return times


def alternate(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call each variant once per round in turn (A B A B ...) and collect what each returns, per variant.

    Interleaving spreads slow phases of a shared machine over all variants instead of blaming one.
    """
    results: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, fn in variants.items():
            value = fn()
            results[name].append(value)
            print(f"  round {r + 1}/{rounds} {name:<34s} {value:10.3f}   (load {load_average()})", flush=True)
    return results


@dataclass
class Check:
    """One figure with its target: PASS/MISS when a target applies, 'info' when none, 'n/a' when unmeasured."""

    name: str
    value: float | None
    target: float | None = None
    unit: str = ""
    higher_is_better: bool = True
    note: str = ""
    status: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if self.value is None:
            self.status = "n/a"
        elif self.target is None:
            self.status = "info"
        else:
            ok = self.value >= self.target if self.higher_is_better else self.value <= self.target
            self.status = "PASS" if ok else "MISS"

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        return f"{'>=' if self.higher_is_better else '<='} {format_value(self.target)}{self.unit}"


def format_value(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3f}"


def print_table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> None:
    """A plain left-aligned text table."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print(line)


def print_checks(checks: Sequence[Check], title: str = "result") -> None:
    """The final table: figure, value, target and PASS/MISS (plus the load average at the end)."""
    print()
    print(f"== {title} (load avg at end: {load_average()})")
    print_table(
        [(c.name, f"{format_value(c.value)}{c.unit if c.value is not None else ''}", c.target_text(), c.status,
          c.note) for c in checks],
        ("figure", "value", "target", "status", "note"),
    )
    sys.stdout.flush()


def save_json(path: str | None, name: str, info: dict[str, Any], args: argparse.Namespace,
              figures: dict[str, Any], checks: Sequence[Check]) -> None:
    """Write machine, arguments, raw figures and checks to `path` (nothing when path is None)."""
    if not path:
        return
    info = {**info, "load_average_end": load_average()}
    payload = {
        "benchmark": name,
        "command": command_line(),
        "machine": info,
        "args": vars(args),
        "figures": figures,
        "checks": [asdict(c) for c in checks],
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"figures saved to {out}")


#: timm's inception_v3 aux head (avg-pool 5/3, then a 5x5 conv on the 17x17 Mixed_6e map) needs >= 299 px input.
AUX_MIN_SIZE = 299


def check_aux_size(parser: argparse.ArgumentParser, aux: bool, size: int) -> None:
    """Refuse sizes the aux head cannot take (it fails deep inside timm otherwise); use --no-aux below 299."""
    if aux and size < AUX_MIN_SIZE:
        parser.error(f"the aux head of inception_v3 needs --size >= {AUX_MIN_SIZE}; add --no-aux for {size} px")


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="OUT", default=None, help="save machine, args and figures to this file")


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice, usually the core count)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's intra-op thread count when --threads is given (before machine_info reads it)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))


def start_cpu_benchmark(args: argparse.Namespace, title: str) -> dict[str, Any]:
    """What every CPU script does before measuring: apply --threads, silence known warnings, describe the
    machine and print that header. Returns the machine description (for the JSON output)."""
    apply_threads(args)
    quiet_warnings()
    info = machine_info("cpu")
    print_machine(info, title)
    return info


def parse_unfreeze(text: str) -> dict[str, Any]:
    """'all' | 'N' (trailing blocks) | 'layers:N' (trailing leaf layers) -> EcgClassifier's `unfreeze` dict."""
    text = str(text).strip()
    if text == "all":
        return {"blocks": "all"}
    if text.startswith("layers:"):
        return {"layers": int(text.split(":", 1)[1])}
    if text.startswith("blocks:"):
        text = text.split(":", 1)[1]
        if text == "all":
            return {"blocks": "all"}
    try:
        return {"blocks": int(text)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--unfreeze takes all, N, blocks:N or layers:N, not {text!r}") from None


def quiet_warnings() -> None:
    """Silence the warnings a benchmark triggers on purpose (random frozen trunk, num_workers=0 advice)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*frozen random network.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "ecg_inception"):
        logging.getLogger(name).setLevel(logging.ERROR)

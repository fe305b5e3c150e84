"""The shipped Hydra configs (`pkg://ecg_inception.conf`), and the OmegaConf resolvers they use.

Importing this package (Hydra does, to read the configs) registers `ecg.on_gpu`:
`${ecg.on_gpu:${trainer.accelerator},A,B}` is A when the accelerator is a CUDA GPU (`gpu`, `cuda`, or `auto` with
CUDA available) and B otherwise. `trainer=ddp` uses it so that one preset serves GPUs (SyncBatchNorm, bf16) and
CPUs (plain BatchNorm, fp32: torch refuses SyncBatchNorm on CPU, and bf16 autocast is 8-20x slower there).
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def on_gpu(accelerator: Any, gpu_value: Any, cpu_value: Any) -> Any:
    """`gpu_value` when `accelerator` means a CUDA GPU, else `cpu_value`.

    Args:
        accelerator: A Lightning accelerator name (`gpu`, `cuda`, `cpu`, `mps`, `auto`, ...).
        gpu_value: The value for a CUDA GPU.
        cpu_value: The value for anything else.

    Returns:
        One of the two values.
    """
    name = str(accelerator).lower()
    if name == "auto":
        import torch

        gpu = torch.cuda.is_available()
    else:
        gpu = name in ("gpu", "cuda")
    return gpu_value if gpu else cpu_value


OmegaConf.register_new_resolver("ecg.on_gpu", on_gpu, replace=True)

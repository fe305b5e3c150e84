"""The synthetic default set: what `EcgDataModule` trains on when no `root` is given.

`conf/data/default.yaml` hands `ensure_synthetic_dataset` to the datamodule as its `make_default_root`, so the
data room never imports the synthetic one (synthetic sits above data: docs/design.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from ecg_inception.synthetic import generate

log = logging.getLogger(__name__)

SYNTHETIC_VERSION = 1  # part of the synthetic folder name; bump when the generated set should change
SYNTHETIC_SCALE = 0.5  # half the original page size, like the dev subset


def ensure_synthetic_dataset(base: str | Path, per_class: int, seed: int) -> Path:
    """Generate the synthetic default set under `base` once and reuse it; safe for concurrent jobs.

    Each caller generates into a private temporary folder and renames it into place; the first rename
    wins and the others discard their copy, so nobody ever reads a half-written set.

    Args:
        base: the folder the set goes under (`<cache_dir>/synthetic`).
        per_class: printouts per class; `max(1, per_class // 10)` byte-identical copies per class are planted.
        seed: the generator's seed.

    Returns:
        `base/v<version>-per<N>-dup<K>-scale<scale>-seed<seed>`, complete.
    """
    duplicates = max(1, per_class // 10)
    name = f"v{SYNTHETIC_VERSION}-per{per_class}-dup{duplicates}-scale{SYNTHETIC_SCALE}-seed{seed}"
    final = Path(base) / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        log.info("generating the synthetic dataset into %s", final)
        generate.generate_dataset(tmp, per_class=per_class, seed=seed, duplicates=duplicates, scale=SYNTHETIC_SCALE)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final

"""What `Predictor.predict` accepts (files, folders, PIL images, uint8 tensors) -> a Dataset of preprocessed pages.

Folders are walked recursively with the scan's image filter (`data.scan.is_image_candidate`; hidden folders are
skipped) and what the filter leaves out is counted as skipped. A file named explicitly is always an input,
whatever its extension: if it is not an image, its record says so. Every page goes through
`data.pages.preprocess_page`, the step the training datasets apply.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from ecg_inception.core.cpus import torch_threads
from ecg_inception.data.pages import preprocess_page
from ecg_inception.data.scan import is_image_candidate, open_rgb, to_rgb, upright
from ecg_inception.errors import UnreadableImageError

#: One input: a path (file or folder), a PIL image, or a uint8 tensor [3, H, W] / [1, H, W] (or [N, 3, H, W]).
InputLike = str | os.PathLike | Image.Image | torch.Tensor


@dataclass(frozen=True)
class InputItem:
    """One page to predict: `name` is the record's `path` (the file path, or `#<index>` in memory)."""

    name: str
    source: Any  # Path | PIL.Image.Image | torch.Tensor


@dataclass
class ExpandedInputs:
    """The pages of a `predict` call, in order, and the folder entries the image filter skipped."""

    items: list[InputItem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def expand_inputs(inputs: InputLike | Iterable[InputLike]) -> ExpandedInputs:
    """Files, folders (recursively), PIL images and uint8 tensors -> one `InputItem` per page.

    Args:
        inputs: One input or a sequence of them.

    Returns:
        The items (a folder's images sorted by path) and the skipped folder entries.

    Raises:
        TypeError: An input of another type.
    """
    if isinstance(inputs, (str, os.PathLike, Image.Image, torch.Tensor)):
        inputs = [inputs]
    out = ExpandedInputs()
    for i, obj in enumerate(inputs):
        if isinstance(obj, (str, os.PathLike)):
            path = Path(obj)
            if path.is_dir():
                _walk(path, out, {os.path.realpath(path)})
            else:
                out.items.append(InputItem(str(path), path))
        elif isinstance(obj, Image.Image):
            out.items.append(InputItem(f"#{i}", obj))
        elif isinstance(obj, torch.Tensor):
            if obj.ndim == 4:
                out.items.extend(InputItem(f"#{i}.{j}", t) for j, t in enumerate(obj))
            else:
                out.items.append(InputItem(f"#{i}", obj))
        else:
            raise TypeError(f"input #{i}: expected a path, a PIL image or a uint8 tensor, got {type(obj).__name__}")
    return out


def _walk(folder: Path, out: ExpandedInputs, ancestors: set[str]) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        out.items.append(InputItem(str(folder), folder))  # its record carries the error
        return
    for entry in entries:
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if is_dir:
            real = os.path.realpath(path)
            if entry.name.startswith(".") or real in ancestors:
                out.skipped.append(str(path) + "/")
            else:
                _walk(path, out, ancestors | {real})
        elif is_image_candidate(entry.name):
            out.items.append(InputItem(str(path), path))
        else:
            out.skipped.append(str(path))


def tensor_to_image(t: torch.Tensor, name: str = "tensor") -> Image.Image:
    """A uint8 [3, H, W] or [1, H, W] tensor -> RGB PIL image.

    Raises:
        UnreadableImageError: Another dtype or shape.
    """
    if t.dtype != torch.uint8:
        raise UnreadableImageError(name, f"expected a uint8 image tensor, got {t.dtype}")
    if t.ndim != 3 or t.shape[0] not in (1, 3) or min(t.shape[1:]) < 1:
        raise UnreadableImageError(name, f"expected a [3, H, W] or [1, H, W] tensor, got {list(t.shape)}")
    arr = t.detach().cpu().expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(np.asarray(arr, dtype=np.uint8), "RGB")


def decode_item(item: InputItem) -> Image.Image:
    """The page of one item as an upright RGB PIL image.

    Raises:
        UnreadableImageError: The file is missing, a folder that cannot be listed, not an image, or corrupt.
    """
    src = item.source
    if isinstance(src, Path):
        if src.is_dir():
            raise UnreadableImageError(src, "a folder that cannot be listed")
        if not src.exists() and not src.is_symlink():
            raise UnreadableImageError(src, "no such file")
        return open_rgb(src)
    if isinstance(src, Image.Image):
        return to_rgb(upright(src))
    return tensor_to_image(src, item.name)


class PageDataset(Dataset):
    """Items -> `{"index", "image" (uint8 [3, H, W] or None), "box", "fallback", "error"}`, never raising.

    Args:
        items: The pages, in order.
        preprocessing: A checkpoint's `preprocessing` dict.
        threads: Pages of one batch decoded and preprocessed at once by this many threads when the batch is
            fetched in the main process (`__getitems__`, which a DataLoader with 0 workers calls). Decoding,
            grid detection and resizing run in Pillow and numpy with the GIL released, so on a CPU-only
            machine, where the model already uses every core, preprocessing then uses them too between
            forward passes (2 threads: 1.18-1.23x the folder throughput of one on 2 cores,
            docs/performance.md). Inside a DataLoader worker pages go one by one.

    Raises:
        ValueError: `threads` < 1.
    """

    def __init__(self, items: list[InputItem], preprocessing: Mapping[str, Any], threads: int = 1) -> None:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.items = list(items)
        self.preprocessing = dict(preprocessing)
        self.threads = int(threads)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if get_worker_info() is not None:
            return self._item(i)
        with torch_threads(1):  # as EcgImageDataset: per-image ops lose to a busy thread pool
            return self._item(i)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch of items, in `indices` order: on `threads` threads in the main process, else one by one."""
        if get_worker_info() is not None:
            return [self._item(i) for i in indices]
        n = min(self.threads, len(indices))
        # torch's thread count is process-wide: set it once per batch here, never from the pool's threads.
        with torch_threads(1):
            if n < 2:
                return [self._item(i) for i in indices]
            with ThreadPoolExecutor(max_workers=n, thread_name_prefix="ecg-prep") as pool:
                return list(pool.map(self._item, indices))

    def _item(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        try:
            page = decode_item(item)
            image, box = preprocess_page(page, self.preprocessing)
        except UnreadableImageError as exc:
            return {"index": i, "image": None, "box": None, "fallback": False, "error": exc.reason}
        except (ValueError, OSError, MemoryError) as exc:
            return {"index": i, "image": None, "box": None, "fallback": False,
                    "error": f"cannot preprocess: {type(exc).__name__}: {exc}"}
        return {"index": i, "image": image, "box": None if box is None else box.as_list(),
                "fallback": bool(box is not None and box.fallback), "error": None}


def collate_pages(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """A list of `PageDataset` items -> the readable images stacked (`images`, or None) and per-item lists."""
    ok = [b for b in batch if b["image"] is not None]
    return {
        "items": [{k: v for k, v in b.items() if k != "image"} for b in batch],
        "ok": [b["index"] for b in ok],
        "images": torch.stack([b["image"] for b in ok]) if ok else None,
    }

"""Walk a class-folder tree and open images safely."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ImageFile:
    """One readable image; `rel_path` is POSIX, relative to the dataset root."""

    rel_path: str
    label: str
    sha256: str
    width: int
    height: int
    mode: str


@dataclass
class ScanResult:
    """Every file under the root, accounted for."""

    root: Path
    labels: list[str]  # fixed order (data.labels.order_labels)
    folders: dict[str, str]  # label -> folder name as found on disk
    images: list[ImageFile]  # sorted by rel_path
    unreadable: dict[str, str] = field(default_factory=dict)  # rel_path -> reason
    ignored: list[str] = field(default_factory=list)  # rel paths of non-image files

# CONTRACT (filled in by the data-audit helper): open_rgb(path) -> PIL.Image.Image; scan_folder(root) -> ScanResult

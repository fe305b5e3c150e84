"""Walk a class-folder tree and open images safely: every file ends up readable, unreadable or ignored.

Layout: ``root/<class folder>/**/<image>``. Each non-hidden directory directly under the root is a
class (its label from `labels.label_for_folder`); images in its subfolders belong to it too. Files
directly in the root, non-image files (decided by extension) and hidden files are *ignored*; hidden
directories are skipped and listed as ignored with a trailing ``/``. An image candidate that cannot
be decoded is *unreadable*, with the reason. Symbolic links are followed (cycles are cut) and listed
in `ScanResult.symlinks`. A name that is not valid UTF-8 (bytes such as ``caf\\xe9.jpg`` on a Latin-1
file system) cannot be written to a manifest or a report: such a file is *unreadable*, listed under
`printable_name` (undecodable bytes shown as ``\\xNN``), and a class folder with such a name is an error.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL import ImageFile as PilImageFile

from ecg_inception.core.hashing import sha256_hex  # noqa: F401 - re-exported
from ecg_inception.data.labels import label_for_folder, order_labels
from ecg_inception.errors import DatasetError, UnreadableImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})

_TRUNCATION_LOCK = threading.Lock()
BAD_NAME = "file name is not valid UTF-8 (rename the file to use it)"


def printable_name(name: str) -> str:
    """`name` as text any writer accepts: bytes that are not UTF-8 (surrogate escapes) shown as ``\\xNN``."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file system produced
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def is_utf8_name(name: str) -> bool:
    """True when `name` (as os.listdir returns it) is valid UTF-8, so it can be written out as it is."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
EXIF_ORIENTATION = 0x0112  # the EXIF tag of the orientation (1 = upright)


@dataclass(frozen=True)
class ImageFile:
    """One readable image; `rel_path` is POSIX, relative to the dataset root."""

    rel_path: str
    label: str
    sha256: str
    width: int
    height: int
    mode: str  # mode of the file as decoded (e.g. "RGB", "L", "CMYK"), before conversion to RGB


@dataclass
class ScanResult:
    """Every file under the root, accounted for."""

    root: Path
    labels: list[str]  # fixed order (data.labels.order_labels)
    folders: dict[str, str]  # label -> folder name as found on disk
    images: list[ImageFile]  # sorted by rel_path
    unreadable: dict[str, str] = field(default_factory=dict)  # rel_path -> reason
    ignored: list[str] = field(default_factory=list)  # rel paths of non-image files; hidden dirs end in "/"
    symlinks: list[str] = field(default_factory=list)  # rel paths that are symbolic links (followed)

    def label_of(self, rel_path: str) -> str | None:
        """The label of the class folder holding `rel_path`, or None for a file in the root."""
        folder = rel_path.split("/", 1)[0]
        if folder == rel_path:
            return None
        return {name: label for label, name in self.folders.items()}.get(folder)


@dataclass
class FolderListing:
    """What is on disk before any file is decoded: image candidates per class, and the rest."""

    root: Path
    folders: dict[str, str]  # label -> folder name
    candidates: list[tuple[str, str, Path]]  # (rel_path, label, absolute path), sorted by rel_path
    ignored: list[str] = field(default_factory=list)
    symlinks: list[str] = field(default_factory=list)
    bad_names: dict[str, str] = field(default_factory=dict)  # printable rel path -> reason (name not UTF-8)


def is_image_candidate(name: str) -> bool:
    """True when a file name has an image extension (case-insensitive) and is not hidden."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_folder(root: str | Path) -> FolderListing:
    """List class folders, image candidates and ignored entries under `root` without decoding anything."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a directory")
    listing = FolderListing(root=root, folders={}, candidates=[])
    ancestors = frozenset({os.path.realpath(root)})
    for entry in _sorted_entries(root):
        rel = printable_name(entry.name)
        if entry.is_symlink():
            listing.symlinks.append(rel)
        if _is_dir(entry):
            if entry.name.startswith("."):
                listing.ignored.append(rel + "/")
                continue
            if not is_utf8_name(entry.name):
                raise DatasetError(f'{root}: class folder "{rel}": the folder name is not valid UTF-8; rename it')
            label = label_for_folder(entry.name)
            if label in listing.folders:
                raise DatasetError(
                    f"{root}: folders {listing.folders[label]!r} and {entry.name!r} both map to label {label!r}"
                )
            listing.folders[label] = entry.name
            _walk_class(Path(entry.path), rel, label, listing, ancestors)
        else:
            listing.ignored.append(rel)  # files directly in the root belong to no class
    listing.candidates.sort(key=lambda c: c[0])
    listing.ignored.sort()
    listing.symlinks.sort()
    if not listing.folders:
        raise DatasetError(f"{root}: no class folders (expected one sub-folder per class)")
    return listing


def _sorted_entries(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise DatasetError(f"cannot list {path}: {exc.strerror or exc}") from exc


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _walk_class(path: Path, rel: str, label: str, listing: FolderListing, ancestors: frozenset[str]) -> None:
    """Add everything below the class folder `path` (rel path `rel`) to `listing`."""
    real = os.path.realpath(path)
    if real in ancestors:
        listing.ignored.append(rel + "/")  # a symbolic link back to a folder above it: a cycle
        return
    ancestors = ancestors | {real}
    for entry in _sorted_entries(path):
        child = f"{rel}/{printable_name(entry.name)}"
        if entry.is_symlink():
            listing.symlinks.append(child)
        if not is_utf8_name(entry.name) and not entry.name.startswith("."):
            if _is_dir(entry):
                listing.bad_names[child + "/"] = "folder name is not valid UTF-8 (its files are left out)"
            elif is_image_candidate(entry.name):
                listing.bad_names[child] = BAD_NAME
            else:
                listing.ignored.append(child)
            continue
        if _is_dir(entry):
            if entry.name.startswith("."):
                listing.ignored.append(child + "/")
            else:
                _walk_class(Path(entry.path), child, label, listing, ancestors)
        elif is_image_candidate(entry.name):
            listing.candidates.append((child, label, Path(entry.path)))
        else:
            listing.ignored.append(child)


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes, or UnreadableImageError naming why they cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        reason = "broken symbolic link" if os.path.islink(path) else "file vanished"
        raise UnreadableImageError(path, reason) from exc
    except OSError as exc:
        raise UnreadableImageError(path, f"cannot read file: {exc.strerror or exc}") from exc


def decode_rgb(data: bytes, path: str | Path = "<bytes>") -> tuple[Image.Image, str]:
    """Decode image bytes fully; return (RGB image, the file's own mode) or raise UnreadableImageError.

    Truncated data fails on the full `load()`; a decompression-bomb warning counts as an error
    (the warning filter is process-wide, so decode in processes, not threads, when in parallel).
    """
    if not data:
        raise UnreadableImageError(path, "empty file (0 bytes)")
    try:
        with _strict_loading(), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                mode = img.mode
                rgb = to_rgb(upright(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImageError(path, f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UnreadableImageError(path, "not an image (format not recognised)") from exc
    except OSError as exc:
        text = str(exc)
        if "truncated" in text.lower():
            raise UnreadableImageError(path, f"truncated image data ({text})") from exc
        raise UnreadableImageError(path, f"cannot decode: {text}") from exc
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, MemoryError) as exc:
        raise UnreadableImageError(path, f"cannot decode: {type(exc).__name__}: {exc}") from exc
    return rgb, mode


@contextmanager
def _strict_loading() -> Iterator[None]:
    """Keep PIL's LOAD_TRUNCATED_IMAGES off while decoding, even where a caller switched it on."""
    if not PilImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _TRUNCATION_LOCK:
        PilImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            PilImageFile.LOAD_TRUNCATED_IMAGES = True


def upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF orientation tag says (phone photos of printouts carry one); unchanged without it.

    Applied in `decode_rgb`, the one decode step of the audit, the datasets and prediction, so that crop
    boxes, sizes and model inputs all refer to the upright page.
    """
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, ValueError, TypeError, SyntaxError):  # unparsable EXIF: keep the pixels as stored
        return img
    if orientation in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def open_rgb(path: str | Path) -> Image.Image:
    """Open `path` as a fully loaded RGB image, or raise UnreadableImageError with the reason."""
    return decode_rgb(read_bytes(path), path)[0]


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: transparency is composited on white, 16-bit grey scaled to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _wide_grey_to_rgb(img)
    if mode == "PA" or (mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _wide_grey_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit RGB (16-bit range scaled, floats in [0, 1] stretched)."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        arr = arr * 255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else arr
    elif img.mode.startswith("I;16") or (arr.size and float(arr.max()) > 255):
        arr = arr / 257.0  # 65535 -> 255
    grey = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def build_scan_result(
    listing: FolderListing, images: Iterable[ImageFile], unreadable: Mapping[str, str]
) -> ScanResult:
    """Assemble a ScanResult and enforce what makes a dataset usable (raises DatasetError)."""
    images = sorted(images, key=lambda im: im.rel_path)
    root = listing.root
    if not images:
        folders = ", ".join(repr(f) for f in listing.folders.values())
        raise DatasetError(f"{root}: no readable images in any class folder ({folders})")
    present = {im.label for im in images}
    empty = [folder for label, folder in listing.folders.items() if label not in present]
    if empty:
        names = ", ".join(repr(f) for f in sorted(empty))
        raise DatasetError(f"{root}: class folder(s) without a readable image: {names}")
    if len(present) < 2:
        (folder,) = listing.folders.values()
        raise DatasetError(f"{root}: only one class folder ({folder!r}); a classifier needs at least two")
    return ScanResult(
        root=root,
        labels=order_labels(present),
        folders=dict(listing.folders),
        images=images,
        unreadable=dict(sorted({**unreadable, **listing.bad_names}.items())),
        ignored=list(listing.ignored),
        symlinks=list(listing.symlinks),
    )


def scan_folder(root: str | Path) -> ScanResult:
    """Scan `root`: hash and fully decode every image candidate (once per distinct content)."""
    listing = list_folder(root)
    decoded: dict[str, tuple[int, int, str] | str] = {}  # sha256 -> (w, h, mode) or the failure reason
    images: list[ImageFile] = []
    unreadable: dict[str, str] = {}
    for rel, label, path in listing.candidates:
        try:
            data = read_bytes(path)
        except UnreadableImageError as exc:
            unreadable[rel] = exc.reason
            continue
        sha = sha256_hex(data)
        if sha not in decoded:
            try:
                rgb, mode = decode_rgb(data, path)
                decoded[sha] = (rgb.width, rgb.height, mode)
            except UnreadableImageError as exc:
                decoded[sha] = exc.reason
        info = decoded[sha]
        if isinstance(info, str):
            unreadable[rel] = info
        else:
            images.append(ImageFile(rel, label, sha, *info))
    return build_scan_result(listing, images, unreadable)

"""Scanning a class-folder tree: every file readable, unreadable (with the reason) or ignored."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from ecg_inception.data.scan import decode_rgb, is_image_candidate, open_rgb, scan_folder, to_rgb
from ecg_inception.errors import DatasetError, UnreadableImageError


def jpeg_bytes(size: tuple[int, int] = (64, 48), seed: int = 0, quality: int = 90) -> bytes:
    """A small noisy JPEG (noise keeps the entropy-coded data long enough to truncate meaningfully)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def two_class_tree(root: Path) -> Path:
    write(root / "alpha" / "a1.jpg", jpeg_bytes(seed=1))
    write(root / "alpha" / "a2.jpg", jpeg_bytes(seed=2))
    write(root / "beta" / "b1.jpg", jpeg_bytes(seed=3))
    return root


# --- open_rgb: bad inputs -------------------------------------------------------------------------


def test_empty_file_is_unreadable(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.jpg", b"")
    with pytest.raises(UnreadableImageError, match="empty file") as info:
        open_rgb(path)
    assert info.value.path == str(path)


def test_truncated_jpeg_is_unreadable(tmp_path: Path) -> None:
    data = jpeg_bytes((128, 96))
    path = write(tmp_path / "cut.jpg", data[: len(data) * 6 // 10])
    with Image.open(path) as img:  # the header alone looks fine: only a full load finds the damage
        assert img.size == (128, 96)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(UnreadableImageError, match="truncated"):
        open_rgb(path)


def test_truncated_jpeg_fails_even_if_caller_allows_truncation(tmp_path: Path, monkeypatch) -> None:
    data = jpeg_bytes((128, 96))
    path = write(tmp_path / "cut.jpg", data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(UnreadableImageError, match="truncated"):
        open_rgb(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_text_renamed_jpg_is_not_an_image(tmp_path: Path) -> None:
    path = write(tmp_path / "notes.jpg", b"patient list\nthis is not a JPEG\n")
    with pytest.raises(UnreadableImageError, match="not an image"):
        open_rgb(path)


@pytest.mark.parametrize("limit", [100, 300])  # 400 px: > 2x limit raises, > limit only warns in PIL
def test_decompression_bomb_is_unreadable(tmp_path: Path, monkeypatch, limit: int) -> None:
    path = tmp_path / "bomb.png"
    Image.new("RGB", (20, 20), (10, 20, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(UnreadableImageError, match="decompression bomb"):
        open_rgb(path)


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImageError):
        open_rgb(tmp_path / "nope.jpg")


# --- open_rgb: mode conversion --------------------------------------------------------------------


def roundtrip(img: Image.Image, fmt: str) -> tuple[Image.Image, str]:
    buf = io.BytesIO()
    img.save(buf, fmt)
    rgb, mode = decode_rgb(buf.getvalue())
    assert rgb.mode == "RGB" and rgb.size == img.size
    return rgb, mode


def test_grey_modes_convert_to_rgb() -> None:
    rgb, mode = roundtrip(Image.new("L", (4, 3), 77), "PNG")
    assert mode == "L" and rgb.getpixel((0, 0)) == (77, 77, 77)
    rgb, mode = roundtrip(Image.new("1", (4, 3), 1), "PNG")
    assert mode == "1" and rgb.getpixel((1, 1)) == (255, 255, 255)
    la = Image.new("LA", (4, 3), (0, 0))  # black but fully transparent -> white paper
    la.putpixel((0, 0), (50, 255))
    rgb, mode = roundtrip(la, "PNG")
    assert mode == "LA" and rgb.getpixel((1, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (50, 50, 50)


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    rgb, mode = roundtrip(img, "PNG")
    assert mode == "I;16"
    assert [rgb.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_palette_with_transparency_composites_on_white() -> None:
    pal = Image.new("P", (4, 3), 1)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    pal.putpixel((0, 0), 0)
    pal.info["transparency"] = 1  # index 1 (blue) is transparent
    rgb, mode = roundtrip(pal, "PNG")
    assert mode == "P"
    assert rgb.getpixel((0, 0)) == (255, 0, 0)
    assert rgb.getpixel((2, 2)) == (255, 255, 255)


def test_rgba_composites_on_white() -> None:
    img = Image.new("RGBA", (4, 3), (0, 0, 0, 0))
    img.putpixel((0, 0), (200, 10, 10, 255))
    img.putpixel((1, 0), (0, 0, 0, 128))
    rgb, mode = roundtrip(img, "PNG")
    assert mode == "RGBA"
    assert rgb.getpixel((0, 0)) == (200, 10, 10)
    assert rgb.getpixel((3, 2)) == (255, 255, 255)
    assert 120 <= rgb.getpixel((1, 0))[0] <= 135


def test_cmyk_converts_to_rgb() -> None:
    rgb, mode = roundtrip(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")  # no cyan/black: red
    assert mode == "CMYK"
    r, g, b = rgb.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_to_rgb_copies_rgb() -> None:
    img = Image.new("RGB", (2, 2), (1, 2, 3))
    out = to_rgb(img)
    assert out is not img and out.tobytes() == img.tobytes()


def test_candidates_are_decided_by_extension() -> None:
    for name in ("a.jpg", "b.JPEG", "c.png", "d.bmp", "e.tif", "f.TIFF", "g.webp", "h.gif"):
        assert is_image_candidate(name)
    for name in ("notes.txt", "Thumbs.db", ".DS_Store", "._a.jpg", "jpg", "a.jpg.bak"):
        assert not is_image_candidate(name)


# --- scan_folder ----------------------------------------------------------------------------------


def test_scan_accounts_for_every_file(tmp_path: Path) -> None:
    root = two_class_tree(tmp_path / "data")
    write(root / "alpha" / "notes.txt", b"hello")
    write(root / "alpha" / "Thumbs.db", b"\x00\x01")
    write(root / "beta" / ".DS_Store", b"\x00")
    write(root / "README.md", b"# data")
    write(root / "beta" / "broken.jpg", b"not a jpeg at all")
    write(root / "beta" / "empty.png", b"")
    write(root / ".cache" / "x.jpg", jpeg_bytes(seed=9))
    write(root / "alpha" / ".thumbs" / "y.jpg", jpeg_bytes(seed=8))
    write(root / "alpha" / "sub" / "a3.png", _png_bytes())

    result = scan_folder(root)

    assert result.root == root
    assert result.labels == ["alpha", "beta"]
    assert result.folders == {"alpha": "alpha", "beta": "beta"}
    assert [im.rel_path for im in result.images] == [
        "alpha/a1.jpg",
        "alpha/a2.jpg",
        "alpha/sub/a3.png",
        "beta/b1.jpg",
    ]
    assert result.unreadable == {
        "beta/broken.jpg": "not an image (format not recognised)",
        "beta/empty.png": "empty file (0 bytes)",
    }
    assert result.ignored == [
        ".cache/",
        "README.md",
        "alpha/.thumbs/",
        "alpha/Thumbs.db",
        "alpha/notes.txt",
        "beta/.DS_Store",
    ]
    a1 = result.images[0]
    assert a1.sha256 == hashlib.sha256((root / "alpha" / "a1.jpg").read_bytes()).hexdigest()
    assert (a1.label, a1.width, a1.height, a1.mode) == ("alpha", 64, 48, "RGB")
    assert result.label_of("alpha/sub/a3.png") == "alpha" and result.label_of("README.md") is None


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (10, 10), 128).save(buf, "PNG")
    return buf.getvalue()


def test_unicode_spaces_and_parentheses_in_paths(tmp_path: Path) -> None:
    root = tmp_path / "données (v2) ü"
    write(root / "Normal Person ECG Images (284x12=3408)" / "Normal(1) é.jpg", jpeg_bytes(seed=1))
    write(
        root / "ECG Images of Patient that have History of MI (172x12=2064)" / "PMI (ß) 2.jpg",
        jpeg_bytes(seed=2),
    )
    result = scan_folder(root)
    assert result.labels == ["history_of_mi", "normal"]
    assert [im.rel_path for im in result.images] == [
        "ECG Images of Patient that have History of MI (172x12=2064)/PMI (ß) 2.jpg",
        "Normal Person ECG Images (284x12=3408)/Normal(1) é.jpg",
    ]
    assert open_rgb(root / result.images[1].rel_path).size == (64, 48)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlinks_are_followed_and_noted(tmp_path: Path) -> None:
    root = two_class_tree(tmp_path / "data")
    outside = write(tmp_path / "elsewhere" / "c.jpg", jpeg_bytes(seed=5))
    os.symlink(outside, root / "beta" / "link.jpg")
    os.symlink(root / "beta", root / "beta" / "loop")  # a cycle: cut, listed as ignored
    os.symlink(tmp_path / "missing.jpg", root / "alpha" / "dangling.jpg")
    result = scan_folder(root)
    assert "beta/link.jpg" in [im.rel_path for im in result.images]
    assert result.symlinks == ["alpha/dangling.jpg", "beta/link.jpg", "beta/loop"]
    assert "beta/loop/" in result.ignored
    assert result.unreadable == {"alpha/dangling.jpg": "broken symbolic link"}


def test_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(tmp_path / "absent")
    write(tmp_path / "file.txt", b"x")
    with pytest.raises(DatasetError, match="not a directory"):
        scan_folder(tmp_path / "file.txt")


def test_no_class_folders_raises(tmp_path: Path) -> None:
    write(tmp_path / "a.jpg", jpeg_bytes())
    with pytest.raises(DatasetError, match="no class folders"):
        scan_folder(tmp_path)


def test_no_images_raises(tmp_path: Path) -> None:
    write(tmp_path / "alpha" / "notes.txt", b"x")
    write(tmp_path / "beta" / "bad.jpg", b"")
    with pytest.raises(DatasetError, match="no readable images.*'alpha'.*'beta'"):
        scan_folder(tmp_path)


def test_empty_class_folder_raises_naming_it(tmp_path: Path) -> None:
    two_class_tree(tmp_path)
    (tmp_path / "gamma (empty)").mkdir()
    write(tmp_path / "delta" / "bad.jpg", b"plain text")  # only an unreadable file: no usable image either
    with pytest.raises(DatasetError, match=r"without a readable image: 'delta', 'gamma \(empty\)'"):
        scan_folder(tmp_path)


def test_single_class_raises(tmp_path: Path) -> None:
    write(tmp_path / "only" / "a.jpg", jpeg_bytes())
    with pytest.raises(DatasetError, match="only one class folder.*'only'"):
        scan_folder(tmp_path)


def test_two_folders_with_one_label_raise(tmp_path: Path) -> None:
    write(tmp_path / "normal" / "a.jpg", jpeg_bytes(seed=1))
    write(tmp_path / "Normal Person ECG Images (284x12=3408)" / "b.jpg", jpeg_bytes(seed=2))
    with pytest.raises(DatasetError, match="both map to label 'normal'"):
        scan_folder(tmp_path)


def test_identical_bytes_are_decoded_once_and_share_the_hash(tmp_path: Path) -> None:
    root = two_class_tree(tmp_path)
    write(root / "beta" / "copy.jpg", (root / "alpha" / "a1.jpg").read_bytes())
    result = scan_folder(root)
    by_path = {im.rel_path: im for im in result.images}
    assert by_path["beta/copy.jpg"].sha256 == by_path["alpha/a1.jpg"].sha256
    assert by_path["beta/copy.jpg"].label == "beta"

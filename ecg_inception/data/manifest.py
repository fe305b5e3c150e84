"""The split manifest: one CSV that every job of an experiment shares, and its `.excluded.csv` sidecar.

Manifest format 2 (this version) starts with one comment line, `# ecg_inception manifest {json}`, that records
the format, the protocol, the seed, the balance and the near-duplicate settings; the rows carry each file's
sha256, crop box, measured grid pitch and grid hash. Reading one recomputes the duplicate groups from the
content hashes (equal sha256, grid hashes within the recorded threshold) instead of trusting the `group`
column, and under `leakfree` refuses a manifest whose groups cross splits, naming the files. Format 1 files
(no comment line, written before 0.2) are read with groups recomputed from sha256 alone; a newer format is
refused.

`split.make_split` makes a manifest; this module holds what is about the file: its rows, the CSV it is written
as, and the checks that redo, on reading, what the splitter promises.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from ecg_inception.data import duplicates
from ecg_inception.data.crop import CropBox
from ecg_inception.data.duplicates import UnionFind, hash_from_hex, near_duplicate_groups
from ecg_inception.data.labels import order_labels
from ecg_inception.data.protocols import resolve_balance
from ecg_inception.errors import ManifestError

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("path", "label", "group", "split")
COLUMNS = REQUIRED_COLUMNS + (
    "sha256", "crop_left", "crop_top", "crop_right", "crop_bottom", "crop_fallback",
    "px_per_mm", "pitch_fallback", "grid_hash",
)  # fmt: skip
MANIFEST_FORMAT = 2  # 1: no comment line, no pitch or grid hash; 2: the `# ecg_inception manifest` line
META_PREFIX = "# ecg_inception manifest "


@dataclass(frozen=True)
class ManifestRow:
    """One file of the split; the crop box is in pixels of the original file (None when unknown)."""

    path: str
    label: str
    group: str
    split: str
    sha256: str = ""
    crop_left: int | None = None
    crop_top: int | None = None
    crop_right: int | None = None
    crop_bottom: int | None = None
    crop_fallback: bool = False
    px_per_mm: float | None = None  # measured grid pitch (scale.measure_pitch); None when unknown
    pitch_fallback: bool = False
    grid_hash: str = ""  # hex of the near-duplicate hash of this file's content (duplicates.grid_hash)

    @property
    def box(self) -> CropBox | None:
        """The crop box, or None when the manifest carries none for this file."""
        coords = (self.crop_left, self.crop_top, self.crop_right, self.crop_bottom)
        if any(c is None for c in coords):
            return None
        left, top, right, bottom = (int(c) for c in coords)  # type: ignore[arg-type]
        return CropBox(left, top, right, bottom, self.crop_fallback)


@dataclass
class Manifest:
    """The split every job of an experiment shares: rows, excluded files and how they were chosen."""

    rows: list[ManifestRow]
    labels: list[str]
    protocol: str
    seed: int | None
    excluded: list[tuple[str, str]] = field(default_factory=list)
    balance: str = "none"
    balance_stage: str = "train"
    near_threshold: int | None = None  # Hamming threshold the groups were made with (None: not searched)
    format: int = MANIFEST_FORMAT  # the format it was read from (written files are always MANIFEST_FORMAT)

    @property
    def leaky(self) -> bool:
        """True for the paper protocol and for any split where a duplicate group crosses splits."""
        return self.protocol == "paper" or bool(self.crossing_groups())

    def split_rows(self, split: str) -> list[ManifestRow]:
        """Rows of one split, in path order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return [r for r in self.rows if r.split == split]

    def counts(self) -> dict[str, dict[str, int]]:
        """Files per split and label: {split: {label: n}} with every split and label present."""
        out = {s: dict.fromkeys(self.labels, 0) for s in SPLITS}
        for r in self.rows:
            out[r.split][r.label] = out[r.split].get(r.label, 0) + 1
        return out

    def crossing_groups(self) -> list[str]:
        """Duplicate groups whose files sit in more than one split (empty for a leak-free split)."""
        splits: dict[str, set[str]] = defaultdict(set)
        for r in self.rows:
            splits[r.group].add(r.split)
        return sorted(g for g, s in splits.items() if len(s) > 1)

    def class_weights(self) -> list[float]:
        """Inverse class frequency of the train split, normalised to mean 1 (label order).

        A class without training files gets weight 0 and the mean is taken over the other classes.
        """
        train = self.counts()["train"]
        inv = [1.0 / train[lab] if train[lab] else 0.0 for lab in self.labels]
        present = [w for w in inv if w > 0]
        if not present:
            raise ManifestError("the manifest has no training files; class weights are undefined")
        mean = sum(present) / len(present)
        return [w / mean for w in inv]

    def metadata(self) -> dict[str, object]:
        """What the comment line records: format, protocol, seed, balance and the near-duplicate settings."""
        near = None
        if self.near_threshold is not None:
            near = {"threshold": int(self.near_threshold), "hash": "grid dHash", "hash_size": duplicates.HASH_SIZE,
                    "ink_cutoff": duplicates.INK_CUTOFF, "margin": duplicates.HASH_MARGIN}  # fmt: skip
        return {"format": MANIFEST_FORMAT, "protocol": self.protocol, "seed": self.seed, "balance": self.balance,
                "balance_stage": self.balance_stage, "near_duplicates": near}  # fmt: skip

    def to_csv_text(self) -> str:
        """The manifest as text: the metadata comment line, then CSV rows sorted by path ('\\n' line ends)."""
        meta = META_PREFIX + json.dumps(self.metadata(), sort_keys=True) + "\n"
        return meta + _csv_text(COLUMNS, [_row_fields(r) for r in sorted(self.rows, key=lambda r: r.path)])

    def write_csv(self, path: str | Path) -> Path:
        """Write the manifest and its `<stem>.excluded.csv` sidecar atomically; returns the manifest path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(path, self.to_csv_text())
        _atomic_write_text(excluded_path(path), _csv_text(("path", "reason"), sorted(self.excluded)))
        return path

    @classmethod
    def read_csv(
        cls,
        path: str | Path,
        protocol: str = "leakfree",
        *,
        root: str | Path | None = None,
        labels: Iterable[str] | None = None,
        balance: str | None = None,
        balance_stage: str | None = None,
    ) -> Manifest:
        """Read and validate a manifest; errors name the file and line.

        With `root`, every listed file must exist under it; with `labels`, every label must be one of them.
        The groups are recomputed from the content hashes (see the module docstring).

        Raises:
            ManifestError: a malformed file; a format newer than `MANIFEST_FORMAT`; a manifest made under
                another protocol than `protocol`; under `leakfree`, copies of one ECG in two splits (the error
                names the crossing files).
        """
        path = Path(path)
        if not path.is_file():
            raise ManifestError(f"{path}: manifest not found")
        meta = _read_metadata(path)
        stored = meta.get("protocol")
        if stored is not None and stored != protocol:
            raise ManifestError(
                f"{path}: made under protocol {stored!r}, loaded under {protocol!r}; set data.protocol={stored} "
                "or make a new split"
            )
        balance, balance_stage = resolve_balance(protocol, balance, balance_stage)
        near = meta.get("near_duplicates") or {}
        threshold = near.get("threshold") if isinstance(near, dict) else None
        allowed = list(labels) if labels is not None else None
        rows = _regroup(_parse_rows(path, Path(root) if root is not None else None, allowed), threshold)
        excluded: list[tuple[str, str]] = []
        side = excluded_path(path)
        if side.is_file():
            with side.open(newline="", encoding="utf-8") as fh:
                excluded = [(rec["path"], rec["reason"]) for rec in csv.DictReader(fh)]
        manifest = cls(
            rows=rows,
            labels=order_labels(allowed if allowed is not None else (r.label for r in rows)),
            protocol=protocol,
            seed=meta["seed"] if isinstance(meta.get("seed"), int) else None,
            excluded=excluded,
            balance=balance,
            balance_stage=balance_stage,
            near_threshold=None if threshold is None else int(threshold),
            format=int(meta.get("format", 1)),
        )
        crossing = manifest.crossing_groups()
        if protocol == "leakfree" and crossing:
            members = [f"{r.path} ({r.split})" for r in manifest.rows if r.group in set(crossing)]
            raise ManifestError(
                f"{path}: leaky under protocol 'leakfree': {len(crossing)} group(s) of copies or near duplicates "
                f"sit in more than one split: {', '.join(members[:12])}{' ...' if len(members) > 12 else ''}"
            )
        return manifest


def _read_metadata(path: Path) -> dict[str, object]:
    """The comment line's JSON ({} for a format-1 file); a newer format or a broken line raises."""
    with path.open(encoding="utf-8") as fh:
        first = fh.readline()
    if not first.startswith("#"):
        return {}
    if not first.startswith(META_PREFIX):
        raise ManifestError(f"{path}:1: unknown comment line; expected {META_PREFIX.strip()!r} and JSON")
    try:
        meta = json.loads(first[len(META_PREFIX):])
    except ValueError as err:
        raise ManifestError(f"{path}:1: the manifest metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
        raise ManifestError(f"{path}:1: the manifest metadata has no integer 'format'")
    if meta["format"] > MANIFEST_FORMAT:
        raise ManifestError(
            f"{path}: manifest format {meta['format']} is newer than this library's ({MANIFEST_FORMAT}); upgrade "
            "ecg_inception or make a new split"
        )
    return meta


def _regroup(rows: list[ManifestRow], threshold: int | None) -> list[ManifestRow]:
    """Rows with groups recomputed from content: equal sha256, grid hashes within `threshold`, or equal group.

    Each merged group keeps the smallest of its written group ids, so a consistent manifest reads back
    unchanged.
    """
    uf = UnionFind(len(rows))
    first: dict[tuple[str, str], int] = {}
    for i, r in enumerate(rows):
        for key in (("group", r.group), ("sha", r.sha256)):
            if key[1]:
                j = first.setdefault(key, i)
                if j != i:
                    uf.union(i, j)
    hashed = [i for i, r in enumerate(rows) if r.grid_hash]
    if threshold is not None and len(hashed) > 1:
        names = [str(i) for i in hashed]
        for near in near_duplicate_groups(names, [hash_from_hex(rows[i].grid_hash) for i in hashed], threshold):
            for other in near[1:]:
                uf.union(int(near[0]), int(other))
    out = list(rows)
    for members in uf.groups():
        gid = min(rows[i].group for i in members)
        for i in members:
            if rows[i].group != gid:
                out[i] = replace(rows[i], group=gid)
    return out


def excluded_path(manifest_path: str | Path) -> Path:
    """Sidecar of a manifest that lists the files the protocol left out: `<stem>.excluded.csv`."""
    p = Path(manifest_path)
    return p.with_name(f"{p.stem}.excluded.csv")


def _row_fields(r: ManifestRow) -> list[str]:
    crop = ["" if v is None else str(v) for v in (r.crop_left, r.crop_top, r.crop_right, r.crop_bottom)]
    pitch = "" if r.px_per_mm is None else f"{r.px_per_mm:.4f}"
    return [r.path, r.label, r.group, r.split, r.sha256, *crop, "1" if r.crop_fallback else "0", pitch,
            "1" if r.pitch_fallback else "0", r.grid_hash]  # fmt: skip


def _csv_text(header: Sequence[str], records: Iterable[Sequence[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(records)
    return buf.getvalue()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parse_int(text: str, where: str, column: str) -> int | None:
    if text.strip() == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ManifestError(f"{where}: {column} {text!r} is not an integer") from None


def _parse_float(text: str, where: str, column: str) -> float | None:
    if text.strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ManifestError(f"{where}: {column} {text!r} is not a number") from None
    if not value > 0:
        raise ManifestError(f"{where}: {column} {text!r} must be positive")
    return value


def _parse_rows(path: Path, root: Path | None, labels: list[str] | None) -> list[ManifestRow]:
    rows: list[ManifestRow] = []
    seen: set[str] = set()
    with path.open(newline="", encoding="utf-8") as fh:
        offset = 0
        if fh.readline().startswith("#"):
            offset = 1  # the metadata line (format 2): line numbers below count it
        else:
            fh.seek(0)
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ManifestError(f"{path}:{1 + offset}: empty file, expected a header with columns {','.join(COLUMNS)}")
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ManifestError(
                f"{path}:{1 + offset}: missing column(s) {', '.join(missing)} (header: {','.join(header)})"
            )
        col = {name: i for i, name in enumerate(header)}
        for rec in reader:
            where = f"{path}:{reader.line_num + offset}"
            if not any(v.strip() for v in rec):
                continue
            if len(rec) != len(header):
                raise ManifestError(f"{where}: {len(rec)} fields, the header has {len(header)}")
            get = {name: rec[i] for name, i in col.items()}
            rel, label, split = get["path"], get["label"], get["split"]
            if split not in SPLITS:
                raise ManifestError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
            if not label or (labels is not None and label not in labels):
                raise ManifestError(f"{where}: unknown label {label!r}")
            pure = PurePosixPath(rel)
            if not rel or pure.is_absolute() or ".." in pure.parts:
                raise ManifestError(f"{where}: path {rel!r} must be relative to the dataset root")
            if rel in seen:
                raise ManifestError(f"{where}: file {rel!r} is listed twice")
            seen.add(rel)
            if root is not None and not (root / rel).is_file():
                raise ManifestError(f"{where}: unknown file {rel!r} (not found under {root})")
            fallback = get.get("crop_fallback", "").strip().lower()
            if fallback not in ("", "0", "1", "true", "false"):
                raise ManifestError(f"{where}: crop_fallback {fallback!r} is not 0/1")
            crops = [_parse_int(get.get(c, ""), where, c) for c in COLUMNS[5:9]]
            group, sha = get["group"] or rel, get.get("sha256", "")
            pitch = _parse_float(get.get("px_per_mm", ""), where, "px_per_mm")
            grid = get.get("grid_hash", "").strip().lower()
            if grid and (len(grid) % 2 or any(c not in "0123456789abcdef" for c in grid)):
                raise ManifestError(f"{where}: grid_hash is not hexadecimal")
            rows.append(ManifestRow(rel, label, group, split, sha, *crops, fallback in ("1", "true"), pitch,
                                    get.get("pitch_fallback", "").strip() in ("1", "true"), grid))  # fmt: skip
    if not rows:
        raise ManifestError(f"{path}: the manifest lists no files")
    return sorted(rows, key=lambda r: r.path)

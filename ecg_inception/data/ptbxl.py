"""PTB-XL readers: the compact `.npy` + `.csv` form and the full WFDB release; labels and the strat_fold split.

PTB-XL: P. Wagner, N. Strodthoff, R.-D. Bousseljot, D. Kreiseler, F. I. Lunze, W. Samek, T. Schaeffter,
"PTB-XL, a large publicly available electrocardiography dataset", Scientific Data 7, 154 (2020); PhysioNet,
v1.0.3, CC BY 4.0. Cite it with any result on it.

- Compact form (`read_compact(root)`): `signals.npy` int16 microvolts (N, 12, T), `records.csv` with an `index`
  column (the row in `signals.npy`) and PTB-XL's `ptbxl_database.csv` columns; 250 Hz unless told otherwise.
- Full release (`read_wfdb(root)`, needs the `wfdb` package: `pip install "ecg_inception[ptbxl]"`):
  `ptbxl_database.csv` (index `ecg_id`, `filename_lr`/`filename_hr`) and `records100/`, `records500/` WFDB
  records, read one at a time (21,799 records at 500 Hz do not fit in memory).

Labels (`data.ptbxl_labels`): PTB-XL's five diagnostic superclasses from `scp_codes` with a likelihood rule on
diagnostic statements only, plus an optional target-like task close to the Mendeley classes. The split is
PTB-XL's own: folds 1-8 train, 9 val, 10 test; `check_patient_folds` refuses a table where a patient spans folds.
"""

from __future__ import annotations

import ast
import csv
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecg_inception.errors import DatasetError

#: PTB-XL's lead order, which the renderer's `LEADS` also uses (WFDB writes aVR etc. as AVR).
PTBXL_LEADS = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
#: PTB-XL's recommended split (Wagner et al. 2020; Strodthoff et al. 2021).
DEFAULT_FOLDS: dict[str, tuple[int, ...]] = {"train": (1, 2, 3, 4, 5, 6, 7, 8), "val": (9,), "test": (10,)}
COMPACT_FS = 250.0


@dataclass(frozen=True)
class PtbxlRecord:
    """One row of the record table (the columns the labels and the split need)."""

    ecg_id: int
    patient_id: int
    strat_fold: int
    scp_codes: dict[str, float]
    infarction_stadium1: str = ""
    infarction_stadium2: str = ""
    filename_lr: str = ""
    filename_hr: str = ""
    row: int = -1  # row in signals.npy (compact form), -1 for WFDB


@dataclass
class PtbxlData:
    """Records and a way to read each one's signals: `signals(i)` -> float32 (12, T) in mV, leads I..V6."""

    records: list[PtbxlRecord]
    fs: float
    reader: Callable[[PtbxlRecord], np.ndarray] = field(repr=False)
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def signals(self, i: int) -> np.ndarray:
        """The (12, T) signals of record `i` in millivolts."""
        return self.reader(self.records[i])


def parse_scp_codes(text: str, source: str = "scp_codes") -> dict[str, float]:
    """`"{'NORM': 100.0, 'SR': 0.0}"` -> {'NORM': 100.0, 'SR': 0.0} (a literal only; nothing is evaluated).

    Raises:
        DatasetError: not a dict literal of code -> number.
    """
    try:
        value = ast.literal_eval(text.strip()) if text.strip() else {}
    except (ValueError, SyntaxError) as exc:
        raise DatasetError(f"{source}: not a dict literal: {text!r} ({exc})") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) for k, v in value.items()
    ):
        raise DatasetError(f"{source}: expected {{code: likelihood}}, got {text!r}")
    return {k: float(v) for k, v in value.items()}


def _int(value: str, column: str, where: str) -> int:
    try:
        return int(float(value))
    except ValueError:
        raise DatasetError(f"{where}: column {column} is not a number: {value!r}") from None


def read_table(path: str | Path) -> list[PtbxlRecord]:
    """`records.csv` (compact) or `ptbxl_database.csv` (full release) -> records, in file order.

    Raises:
        DatasetError: the file is missing or lacks ecg_id, patient_id, scp_codes or strat_fold.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such PTB-XL record table")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"ecg_id", "patient_id", "scp_codes", "strat_fold"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{path}: missing columns {sorted(missing)} (has {reader.fieldnames})")
        records = []
        for n, row in enumerate(reader, start=2):
            where = f"{path}:{n}"
            records.append(PtbxlRecord(
                ecg_id=_int(row["ecg_id"], "ecg_id", where),
                patient_id=_int(row["patient_id"], "patient_id", where),
                strat_fold=_int(row["strat_fold"], "strat_fold", where),
                scp_codes=parse_scp_codes(row["scp_codes"], where),
                infarction_stadium1=(row.get("infarction_stadium1") or "").strip(),
                infarction_stadium2=(row.get("infarction_stadium2") or "").strip(),
                filename_lr=(row.get("filename_lr") or "").strip(),
                filename_hr=(row.get("filename_hr") or "").strip(),
                row=_int(row["index"], "index", where) if row.get("index") not in (None, "") else -1,
            ))  # fmt: skip
    return records


def read_compact(root: str | Path, fs: float = COMPACT_FS) -> PtbxlData:
    """The compact form: `root/signals.npy` (int16 microvolts, memory-mapped) and `root/records.csv`.

    Args:
        root: the folder (read only; nothing is written there).
        fs: the sampling rate of signals.npy (the shared subset: 250 Hz).

    Returns:
        The records; `signals(i)` reads row `records[i].row` and divides by 1000.

    Raises:
        DatasetError: a file is missing, signals.npy is not (N, 12, T), or an index points outside it.
    """
    root = Path(root)
    npy = root / "signals.npy"
    if not npy.is_file():
        raise DatasetError(f"{root}: no signals.npy (the compact PTB-XL form: signals.npy + records.csv)")
    array = np.load(npy, mmap_mode="r")
    if array.ndim != 3 or array.shape[1] != 12:
        raise DatasetError(f"{npy}: expected (N, 12, T) signals, got shape {array.shape}")
    records = read_table(root / "records.csv")
    records = [r if r.row >= 0 else _with_row(r, i) for i, r in enumerate(records)]
    bad = [r.ecg_id for r in records if not 0 <= r.row < array.shape[0]]
    if bad:
        raise DatasetError(f"{root}: records {bad[:5]} point outside signals.npy ({array.shape[0]} rows)")

    def reader(record: PtbxlRecord) -> np.ndarray:
        return np.asarray(array[record.row], dtype=np.float32) / 1000.0

    return PtbxlData(records, float(fs), reader, source=str(root))


def _with_row(record: PtbxlRecord, row: int) -> PtbxlRecord:
    from dataclasses import replace

    return replace(record, row=row)


def lead_order(names: Sequence[str], source: str) -> list[int]:
    """Column of each PTB-XL lead (I, II, III, aVR, aVL, aVF, V1-V6) in a record's `sig_name`, case-insensitive.

    Raises:
        DatasetError: a lead is missing.
    """
    upper = [str(n).strip().upper() for n in names]
    missing = [lead for lead in PTBXL_LEADS if lead not in upper]
    if missing:
        raise DatasetError(f"{source}: leads {missing} missing (has {list(names)})")
    return [upper.index(lead) for lead in PTBXL_LEADS]


def read_wfdb_record(path: str | Path) -> tuple[np.ndarray, float]:
    """One WFDB record (`path` without extension) -> (float32 (12, T) in mV in PTB-XL lead order, fs).

    Raises:
        DatasetError: the record cannot be read or lacks a lead.
        ImportError: the `wfdb` package is not installed (`pip install "ecg_inception[ptbxl]"`).
    """
    try:
        import wfdb
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise ImportError('reading WFDB records needs the wfdb package: pip install "ecg_inception[ptbxl]"') from exc
    try:
        signal, fields = wfdb.rdsamp(str(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure names the record
        raise DatasetError(f"{path}: cannot read the WFDB record ({type(exc).__name__}: {exc})") from None
    units = [str(u).lower() for u in fields.get("units") or []]
    scale = np.array([1e-3 if u in ("uv", "µv") else 1.0 for u in units] or [1.0] * signal.shape[1])
    order = lead_order(fields["sig_name"], str(path))
    x = (np.asarray(signal, dtype=np.float64) * scale[None, :])[:, order].T
    return x.astype(np.float32), float(fields["fs"])


def read_wfdb(root: str | Path, rate: int = 500) -> PtbxlData:
    """The full PTB-XL release: `root/ptbxl_database.csv` and its `records500/` (or `records100/`) WFDB files.

    Args:
        root: the unpacked release (read only).
        rate: 500 (`filename_hr`) or 100 (`filename_lr`).

    Returns:
        The records; `signals(i)` reads one WFDB record (lazily, every call).

    Raises:
        DatasetError: the table is missing, a record lacks its filename, or a record's rate is not `rate`.
        ValueError: `rate` is not 100 or 500.
    """
    if rate not in (100, 500):
        raise ValueError(f"rate must be 100 or 500 Hz (PTB-XL's records100/records500), got {rate}")
    root = Path(root)
    records = read_table(root / "ptbxl_database.csv")
    column = "filename_hr" if rate == 500 else "filename_lr"
    unnamed = [r.ecg_id for r in records if not getattr(r, column)]
    if unnamed:
        raise DatasetError(f"{root}: records {unnamed[:5]} have no {column}")

    def reader(record: PtbxlRecord) -> np.ndarray:
        x, fs = read_wfdb_record(root / getattr(record, column))
        if abs(fs - rate) > 1e-6:
            raise DatasetError(f"{root / getattr(record, column)}: {fs:g} Hz, expected {rate} Hz")
        return x

    return PtbxlData(records, float(rate), reader, source=str(root))


def read_ptbxl(root: str | Path, rate: int = 500) -> PtbxlData:
    """Either form, by what the folder holds: `signals.npy` -> compact, `ptbxl_database.csv` -> WFDB."""
    root = Path(root)
    if (root / "signals.npy").is_file():
        return read_compact(root)
    if (root / "ptbxl_database.csv").is_file():
        return read_wfdb(root, rate)
    raise DatasetError(
        f"{root}: neither a compact PTB-XL folder (signals.npy + records.csv) nor the PhysioNet release "
        "(ptbxl_database.csv + records500/)"
    )


def check_patient_folds(records: Sequence[PtbxlRecord]) -> dict[int, set[int]]:
    """Folds of each patient; refuses a table where one patient has records in two folds (a leak).

    Raises:
        DatasetError: naming up to five patients and their folds.
    """
    folds: dict[int, set[int]] = {}
    for r in records:
        folds.setdefault(r.patient_id, set()).add(r.strat_fold)
    spanning = {p: sorted(f) for p, f in folds.items() if len(f) > 1}
    if spanning:
        shown = dict(list(spanning.items())[:5])
        raise DatasetError(f"{len(spanning)} patients have records in more than one strat_fold: {shown}")
    return folds


def fold_split(
    records: Sequence[PtbxlRecord], folds: Mapping[str, Sequence[int]] | None = None
) -> dict[str, list[int]]:
    """Record indices per split by `strat_fold` (default: 1-8 train, 9 val, 10 test), after the patient check.

    Raises:
        DatasetError: a patient spans folds, or a fold is in two splits.
        ValueError: unknown split names (only train, val, test).
    """
    folds = dict(DEFAULT_FOLDS if folds is None else {k: tuple(int(f) for f in v) for k, v in folds.items()})
    unknown = set(folds) - set(DEFAULT_FOLDS)
    if unknown:
        raise ValueError(f"fold splits are train, val and test, got {sorted(unknown)}")
    seen: dict[int, str] = {}
    for split, numbers in folds.items():
        for f in numbers:
            if f in seen:
                raise DatasetError(f"strat_fold {f} is in both {seen[f]} and {split}")
            seen[f] = split
    check_patient_folds(records)
    out: dict[str, list[int]] = {split: [] for split in folds}
    for i, r in enumerate(records):
        split = seen.get(r.strat_fold)
        if split is not None:
            out[split].append(i)
    return out


def describe(data: PtbxlData) -> dict[str, Any]:
    """Counts for a report: records, patients, records per fold."""
    folds: dict[int, int] = {}
    for r in data.records:
        folds[r.strat_fold] = folds.get(r.strat_fold, 0) + 1
    return {"records": len(data), "patients": len({r.patient_id for r in data.records}), "fs": data.fs,
            "per_fold": dict(sorted(folds.items())), "source": data.source}

"""One prediction record per input, and the CSV / JSON files and the summary the CLI writes from them."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ecg_inception.inference.leads import LEAD_NAMES

#: Default `low_confidence` threshold: a record whose top probability is below it is flagged.
DEFAULT_LOW_CONFIDENCE = 0.5


@dataclass
class Prediction:
    """What the Predictor says about one input.

    Attributes:
        path: The file path, or `"#<index>"` for an in-memory image.
        label: The most probable label (None when the input could not be read).
        probabilities: Label -> probability, in the checkpoint's label order (empty on error).
        crop_box: [left, top, right, bottom] in pixels of the (upright) page, None when crop is off or on error.
        crop_fallback: True when no ECG grid was found and the fixed fallback box was used (out of distribution).
        low_confidence: True when the top probability is below the Predictor's threshold.
        error: None, or why the input could not be read.
    """

    path: str
    label: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    crop_box: list[int] | None = None
    crop_fallback: bool = False
    low_confidence: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the input was predicted."""
        return self.error is None

    @property
    def confidence(self) -> float | None:
        """The top probability (None on error)."""
        return max(self.probabilities.values()) if self.probabilities else None

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for JSON."""
        return asdict(self)


def csv_columns(labels: Sequence[str], shares: bool = False) -> list[str]:
    """`path,label,prob_<label>...,crop_fallback,low_confidence,error` (+ `share_<lead>...,share_margin` for
    explained records, `inference.explain`)."""
    columns = ["path", "label", *(f"prob_{label}" for label in labels), "crop_fallback", "low_confidence", "error"]
    return (columns + [f"share_{lead}" for lead in (*LEAD_NAMES, "margin")]) if shares else columns


def _share_cells(r: Prediction) -> list[str]:
    shares = getattr(r, "lead_shares", None)
    if not shares:
        return [""] * (len(LEAD_NAMES) + 1)
    return [f"{shares[lead]:.6f}" for lead in LEAD_NAMES] + [f"{getattr(r, 'margin_share', 0.0):.6f}"]


def to_csv(records: Sequence[Prediction], labels: Sequence[str]) -> str:
    """The records as CSV text, one row per input."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    shares = any(hasattr(r, "lead_shares") for r in records)
    writer.writerow(csv_columns(labels, shares))
    for r in records:
        probs = [f"{r.probabilities[label]:.6f}" if r.probabilities else "" for label in labels]
        writer.writerow([r.path, r.label or "", *probs, str(r.crop_fallback).lower(),
                         str(r.low_confidence).lower(), r.error or "", *(_share_cells(r) if shares else [])])
    return buf.getvalue()


def to_json(records: Sequence[Prediction], labels: Sequence[str], summary: dict[str, int]) -> str:
    """The records as JSON: `{"labels", "summary", "predictions": [record, ...]}`."""
    payload = {"labels": list(labels), "summary": summary, "predictions": [r.to_dict() for r in records]}
    return json.dumps(payload, indent=2, ensure_ascii=False) + "\n"


def summarize(records: Sequence[Prediction], skipped: int = 0) -> dict[str, int]:
    """Counts for the summary line: ok, failed, crop fallback, low confidence, skipped folder entries."""
    return {
        "ok": sum(r.ok for r in records),
        "failed": sum(not r.ok for r in records),
        "crop_fallback": sum(r.ok and r.crop_fallback for r in records),
        "low_confidence": sum(r.ok and r.low_confidence for r in records),
        "skipped": int(skipped),
    }


def write_records(path: str | Path, records: Sequence[Prediction], labels: Sequence[str],
                  summary: dict[str, int]) -> Path:
    """Write `.json` (records and summary) or any other name as CSV.

    Raises:
        OSError: The file cannot be written.
    """
    path = Path(path)
    text = to_json(records, labels, summary) if path.suffix.lower() == ".json" else to_csv(records, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path

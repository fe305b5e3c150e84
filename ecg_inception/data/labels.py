"""Canonical class labels in a fixed order, and the Mendeley folder names that map onto them.

The label order decides the class index of every model output, so it must not depend on how the
file system lists folders: canonical labels come first in `CANONICAL_LABELS` order, any other
folder name follows, sorted.
"""

from __future__ import annotations

from collections.abc import Iterable

CANONICAL_LABELS: tuple[str, ...] = (
    "myocardial_infarction",
    "history_of_mi",
    "abnormal_heartbeat",
    "normal",
)

# canonical label -> exact folder name in the Mendeley "ECG Images dataset of Cardiac Patients"
MENDELEY_FOLDERS: dict[str, str] = {
    "myocardial_infarction": "ECG Images of Myocardial Infarction Patients (240x12=2880)",
    "history_of_mi": "ECG Images of Patient that have History of MI (172x12=2064)",
    "abnormal_heartbeat": "ECG Images of Patient that have abnormal heartbeat (233x12=2796)",
    "normal": "Normal Person ECG Images (284x12=3408)",
}

# canonical label -> file-name prefix used in the Mendeley folders, e.g. "MI(12).jpg"
MENDELEY_PREFIXES: dict[str, str] = {
    "myocardial_infarction": "MI",
    "history_of_mi": "PMI",
    "abnormal_heartbeat": "HB",
    "normal": "Normal",
}

_FOLDER_TO_LABEL: dict[str, str] = {folder: label for label, folder in MENDELEY_FOLDERS.items()}


def label_for_folder(name: str) -> str:
    """Return the canonical label of a Mendeley folder name; any other folder name is its own label."""
    return _FOLDER_TO_LABEL.get(name, name)


def order_labels(labels: Iterable[str]) -> list[str]:
    """Deduplicate and order labels: canonical ones in canonical order, then the others sorted."""
    present = set(labels)
    canonical = [label for label in CANONICAL_LABELS if label in present]
    others = sorted(present.difference(CANONICAL_LABELS))
    return canonical + others

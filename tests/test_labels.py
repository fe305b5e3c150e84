"""Canonical labels: Mendeley folder names, fixed order."""

from __future__ import annotations

from ecg_inception.data.labels import (
    CANONICAL_LABELS,
    MENDELEY_FOLDERS,
    MENDELEY_PREFIXES,
    label_for_folder,
    order_labels,
)

MENDELEY = {
    "ECG Images of Myocardial Infarction Patients (240x12=2880)": "myocardial_infarction",
    "ECG Images of Patient that have History of MI (172x12=2064)": "history_of_mi",
    "ECG Images of Patient that have abnormal heartbeat (233x12=2796)": "abnormal_heartbeat",
    "Normal Person ECG Images (284x12=3408)": "normal",
}


def test_canonical_order_is_fixed() -> None:
    assert CANONICAL_LABELS == ("myocardial_infarction", "history_of_mi", "abnormal_heartbeat", "normal")
    assert list(MENDELEY_FOLDERS) == list(CANONICAL_LABELS)
    assert set(MENDELEY_PREFIXES) == set(CANONICAL_LABELS)


def test_mendeley_folder_names_map_to_canonical_labels() -> None:
    for folder, label in MENDELEY.items():
        assert label_for_folder(folder) == label
        assert MENDELEY_FOLDERS[label] == folder


def test_other_folder_names_are_their_own_label() -> None:
    assert label_for_folder("cats") == "cats"
    assert label_for_folder("Normal Person ECG Images") == "Normal Person ECG Images"  # not the exact name
    assert label_for_folder("normal") == "normal"


def test_order_labels_canonical_first_then_sorted_others() -> None:
    got = order_labels(["zebra", "normal", "apple", "myocardial_infarction", "normal", "history_of_mi"])
    assert got == ["myocardial_infarction", "history_of_mi", "normal", "apple", "zebra"]
    assert order_labels(reversed(CANONICAL_LABELS)) == list(CANONICAL_LABELS)
    assert order_labels(["b", "a"]) == ["a", "b"]
    assert order_labels([]) == []

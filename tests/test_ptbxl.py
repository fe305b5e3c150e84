"""PTB-XL readers (compact and WFDB), superclass and target labels, the strat_fold split."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from ecg_inception.data.ptbxl import (
    check_patient_folds,
    fold_split,
    parse_scp_codes,
    read_compact,
    read_ptbxl,
    read_wfdb,
)
from ecg_inception.data.ptbxl_labels import (
    SCP_SUPERCLASS,
    label_names,
    multi_hot,
    superclasses,
    target_labels,
)
from ecg_inception.errors import DatasetError

SUBSET = Path(os.environ.get("ECG_PTBXL_DATA", Path(__file__).resolve().parents[2] / "shared/data/ptbxl-subset"))
COLUMNS = ["index", "ecg_id", "patient_id", "scp_codes", "infarction_stadium1", "infarction_stadium2", "strat_fold"]


def write_table(path: Path, rows: list[dict], extra: tuple[str, ...] = ()) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*COLUMNS, *extra])
        writer.writeheader()
        writer.writerows(rows)


def row(i: int, patient: int, fold: int, codes: str = "{'NORM': 100.0, 'SR': 0.0}", **kw: str) -> dict:
    return {"index": i, "ecg_id": i + 1, "patient_id": f"{patient}.0", "scp_codes": codes,
            "infarction_stadium1": kw.get("s1", ""), "infarction_stadium2": kw.get("s2", ""), "strat_fold": fold,
            **{k: v for k, v in kw.items() if k not in ("s1", "s2")}}


def test_superclass_table_is_ptbxl_s_44_diagnostic_statements() -> None:
    assert len(SCP_SUPERCLASS) == 44
    counts = {c: sum(v == c for v in SCP_SUPERCLASS.values()) for c in ("NORM", "MI", "STTC", "CD", "HYP")}
    assert counts == {"NORM": 1, "MI": 14, "STTC": 13, "CD": 11, "HYP": 5}
    assert "SR" not in SCP_SUPERCLASS and "AFIB" not in SCP_SUPERCLASS and "ABQRS" not in SCP_SUPERCLASS


def test_likelihood_rule_applies_to_diagnostic_statements_only() -> None:
    assert superclasses({"NORM": 100.0, "SR": 0.0}) == ["NORM"]
    assert superclasses({"IMI": 15.0, "ABQRS": 0.0, "SR": 0.0}) == []  # IMI below 50
    assert superclasses({"ASMI": 100.0, "IMI": 50.0, "IRBBB": 100.0, "NST_": 0.0, "AFIB": 0.0}) == ["MI", "CD"]
    assert superclasses({"IMI": 15.0}, min_likelihood=0) == ["MI"]
    assert target_labels({"AFLT": 100.0}) == ["abnormal_heartbeat"]
    assert target_labels({"NORM": 80.0, "PAC": 0.0, "SR": 0.0}) == ["abnormal_heartbeat"]  # rhythm codes: any p
    assert target_labels({"IMI": 100.0, "CRBBB": 100.0}, "Stadium III") == ["history_of_mi"]
    assert target_labels({"AMI": 100.0}, "Stadium I", "Stadium III") == ["myocardial_infarction", "history_of_mi"]
    assert target_labels({"AMI": 100.0}, "unknown") == []  # MI of unknown age: neither target label
    assert target_labels({"NORM": 100.0, "IRBBB": 100.0}) == []  # normal needs NORM alone


def test_scp_codes_are_parsed_as_literals_only() -> None:
    assert parse_scp_codes("{'NORM': 100.0, 'SR': 0}") == {"NORM": 100.0, "SR": 0.0}
    for bad in ("__import__('os')", "[1, 2]", "{'NORM': 'high'}"):
        with pytest.raises(DatasetError):
            parse_scp_codes(bad)


def test_compact_form_and_fold_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "signals.npy", rng.integers(-2000, 2000, (6, 12, 500)).astype(np.int16))
    rows = [row(i, patient=100 + i // 2, fold=f) for i, f in enumerate((1, 1, 9, 9, 10, 10))]
    rows[3]["scp_codes"] = "{'IMI': 100.0, 'LVH': 50.0}"
    write_table(tmp_path / "records.csv", rows)
    data = read_ptbxl(tmp_path)
    assert len(data) == 6 and data.fs == 250.0
    np.testing.assert_allclose(data.signals(2), np.load(tmp_path / "signals.npy")[2] / 1000.0, rtol=1e-6)
    assert fold_split(data.records) == {"train": [0, 1], "val": [2, 3], "test": [4, 5]}
    assert multi_hot(data.records)[3].tolist() == [0, 1, 0, 0, 1]
    assert multi_hot(data.records, target_head=True).shape == (6, len(label_names(True))) == (6, 9)


def test_a_patient_spanning_folds_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "signals.npy", np.zeros((3, 12, 10), np.int16))
    write_table(tmp_path / "records.csv", [row(0, 7, 1), row(1, 7, 10), row(2, 8, 9)])
    data = read_compact(tmp_path)
    with pytest.raises(DatasetError, match="1 patients have records in more than one strat_fold"):
        fold_split(data.records)
    with pytest.raises(DatasetError, match="in both"):
        fold_split(data.records[2:], {"train": (1, 9), "val": (9,)})


def test_wfdb_record_written_with_wrsamp_is_read_back(tmp_path: Path) -> None:
    import wfdb  # the `ptbxl` extra, also in `dev` (what .ci/run installs): no skip

    fs, n = 500, 5000
    t = np.arange(n) / fs
    leads = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    signal = np.stack([0.1 * (k + 1) * np.sin(2 * np.pi * 1.2 * t + k) for k in range(12)], axis=1)
    folder = tmp_path / "records500" / "00000"
    folder.mkdir(parents=True)
    # stored in another lead order than PTB-XL's: the reader reorders by name
    order = [6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5]
    wfdb.wrsamp("00001_hr", fs=fs, units=["mV"] * 12, sig_name=[leads[k] for k in order],
                p_signal=signal[:, order], fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12,
                write_dir=str(folder))
    rows = [row(0, 5, 10, filename_hr="records500/00000/00001_hr", filename_lr="records100/00000/00001_lr")]
    for r in rows:
        r.pop("index")
    with (tmp_path / "ptbxl_database.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    data = read_ptbxl(tmp_path)
    assert data.fs == 500.0 and data.records[0].row == -1
    x = data.signals(0)
    assert x.shape == (12, n)
    np.testing.assert_allclose(x, signal.T, atol=1e-3)  # 16-bit at 1000 adu/mV: 1 uV steps
    with pytest.raises(ValueError, match="100 or 500"):
        read_wfdb(tmp_path, rate=250)


@pytest.mark.skipif(not (SUBSET / "records.csv").is_file(), reason=f"PTB-XL subset not at {SUBSET}")
def test_subset_labels_of_hand_checked_records_and_no_patient_spans_folds() -> None:
    data = read_compact(SUBSET)
    by_id = {r.ecg_id: r for r in data.records}
    expected = {  # checked by hand against each record's scp_codes and infarction stadia in records.csv
        9: (["NORM"], ["normal"]),  # {'NORM': 100, 'SR': 0}
        34: ([], ["abnormal_heartbeat"]),  # {'AFLT': 100}: a rhythm statement, no diagnostic class
        173: (["STTC", "HYP"], []),  # LVH 100, ISC_ 100
        175: ([], []),  # IMI at likelihood 15 only
        269: (["MI", "CD"], ["history_of_mi", "abnormal_heartbeat"]),  # IMI 100, CRBBB 100, PAC 0, Stadium III
        478: (["NORM", "CD"], []),  # NORM 80, IRBBB 100, SARRH 0
        482: (["MI", "CD"], ["abnormal_heartbeat"]),  # ASMI 100, IMI 50, IRBBB, LAFB; NST_ 0; AFIB 0; unknown
    }
    for ecg_id, (classes, targets) in expected.items():
        r = by_id[ecg_id]
        assert superclasses(r.scp_codes) == classes, ecg_id
        assert target_labels(r.scp_codes, r.infarction_stadium1, r.infarction_stadium2) == targets, ecg_id
    folds = check_patient_folds(data.records)
    assert all(len(f) == 1 for f in folds.values())
    split = fold_split(data.records)
    assert {k: len(v) for k, v in split.items()} == {"train": 2010, "val": 267, "test": 273}
    patients = {k: {data.records[i].patient_id for i in v} for k, v in split.items()}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    assert data.signals(0).shape == (12, 2500) and data.signals(0).dtype == np.float32

"""PTB-XL labels: SCP-ECG statements -> the five diagnostic superclasses, and a task close to the Mendeley classes.

`SCP_SUPERCLASS` is the `diagnostic_class` column of PTB-XL's `scp_statements.csv` (v1.0.3) for its 44
diagnostic statements (Wagner et al., Scientific Data 7, 154, 2020; PhysioNet, CC BY 4.0). Form and rhythm
statements (ABQRS, QWAVE, STD_, SR, AFIB, PVC, ...) have no diagnostic class there and none here. The table is
shipped because `scp_statements.csv` is not in the compact subset.

Rules (docs/pretraining.md explains them):

- superclasses: a diagnostic statement counts when its likelihood is at least `min_likelihood` (default 50).
  Rhythm statements carry likelihood 0 in PTB-XL (SR 1,927 times at 0 in the subset), so the rule is only for
  diagnostic statements.
- the target task (`TARGET_LABELS`, the Mendeley classes' names): `myocardial_infarction` = MI superclass with
  an infarction stadium I, I-II or II in `infarction_stadium1`/`2` (acute/recent); `history_of_mi` = MI with
  stadium II-III or III (old); MI with stadium `unknown` or empty is neither; `abnormal_heartbeat` = any
  arrhythmia or extra-beat statement in `ARRHYTHMIA_CODES` at any likelihood; `normal` = NORM and no other
  superclass and no arrhythmia.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

SUPERCLASSES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")

_BY_CLASS: dict[str, tuple[str, ...]] = {
    "NORM": ("NORM",),
    "MI": ("IMI", "ASMI", "ILMI", "AMI", "ALMI", "INJAS", "LMI", "INJAL", "IPLMI", "IPMI", "INJIN", "INJLA", "PMI",
           "INJIL"),
    "STTC": ("NDT", "NST_", "DIG", "LNGQT", "ISC_", "ISCAL", "ISCIN", "ISCIL", "ISCAS", "ISCLA", "ANEUR", "EL",
             "ISCAN"),
    "CD": ("LAFB", "IRBBB", "1AVB", "IVCD", "CRBBB", "CLBBB", "LPFB", "WPW", "ILBBB", "3AVB", "2AVB"),
    "HYP": ("LVH", "LAO/LAE", "RVH", "RAO/RAE", "SEHYP"),
}
#: Diagnostic statement -> superclass (44 statements), from PTB-XL's scp_statements.csv.
SCP_SUPERCLASS: dict[str, str] = {code: cls for cls, codes in _BY_CLASS.items() for code in codes}

#: Rhythm and extra-beat statements that make a record `abnormal_heartbeat` (sinus rhythm and its rate variants
#: SR, STACH, SBRAD, SARRH are not arrhythmias of the Mendeley kind; PACE is a pacemaker, not a rhythm disorder).
ARRHYTHMIA_CODES: tuple[str, ...] = ("AFIB", "AFLT", "SVARR", "SVTAC", "PSVT", "BIGU", "TRIGU", "PVC", "PAC")
ACUTE_STADIA = ("Stadium I", "Stadium I-II", "Stadium II")
OLD_STADIA = ("Stadium II-III", "Stadium III")
TARGET_LABELS: tuple[str, ...] = ("myocardial_infarction", "history_of_mi", "abnormal_heartbeat", "normal")
DEFAULT_MIN_LIKELIHOOD = 50.0


def superclasses(scp_codes: Mapping[str, float], min_likelihood: float = DEFAULT_MIN_LIKELIHOOD) -> list[str]:
    """The superclasses of one record, in `SUPERCLASSES` order (may be empty).

    Args:
        scp_codes: statement -> likelihood in % (`data.ptbxl.parse_scp_codes`).
        min_likelihood: diagnostic statements below this do not count.
    """
    found = {SCP_SUPERCLASS[c] for c, p in scp_codes.items() if c in SCP_SUPERCLASS and p >= min_likelihood}
    return [s for s in SUPERCLASSES if s in found]


def target_labels(
    scp_codes: Mapping[str, float],
    stadium1: str = "",
    stadium2: str = "",
    min_likelihood: float = DEFAULT_MIN_LIKELIHOOD,
) -> list[str]:
    """The target-like labels of one record (module docstring), in `TARGET_LABELS` order (may be empty)."""
    classes = superclasses(scp_codes, min_likelihood)
    stadia = {stadium1.strip(), stadium2.strip()}
    out = set()
    if "MI" in classes:
        if stadia & set(ACUTE_STADIA):
            out.add("myocardial_infarction")
        if stadia & set(OLD_STADIA):
            out.add("history_of_mi")
    arrhythmia = any(c in scp_codes for c in ARRHYTHMIA_CODES)
    if arrhythmia:
        out.add("abnormal_heartbeat")
    if classes == ["NORM"] and not arrhythmia:
        out.add("normal")
    return [t for t in TARGET_LABELS if t in out]


def label_names(target_head: bool = False) -> list[str]:
    """Output names of the pretraining model: the five superclasses, plus `target:<label>` with the target head."""
    return list(SUPERCLASSES) + ([f"target:{t}" for t in TARGET_LABELS] if target_head else [])


def multi_hot(
    records: Sequence, target_head: bool = False, min_likelihood: float = DEFAULT_MIN_LIKELIHOOD
) -> np.ndarray:
    """float32 (N, 5 or 9) targets of `data.ptbxl.PtbxlRecord`s in `label_names(target_head)` order."""
    names = label_names(target_head)
    index = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(records), len(names)), np.float32)
    for i, r in enumerate(records):
        for s in superclasses(r.scp_codes, min_likelihood):
            out[i, index[s]] = 1.0
        if target_head:
            for t in target_labels(r.scp_codes, r.infarction_stadium1, r.infarction_stadium2, min_likelihood):
                out[i, index[f"target:{t}"]] = 1.0
    return out

"""Synthetic printouts: layout and determinism of the dataset, and class morphology measured on the signals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ecg_inception.cli.synth import main as synth_main
from ecg_inception.synthetic.generate import generate_dataset
from ecg_inception.synthetic.printout import render_page, render_printout
from ecg_inception.synthetic.waveforms import LEADS, TERRITORIES, EcgRecord, rr_cv, synthesize_ecg

EXPECTED_FOLDERS = {
    "ECG Images of Myocardial Infarction Patients (240x12=2880)": "MI",
    "ECG Images of Patient that have History of MI (172x12=2064)": "PMI",
    "ECG Images of Patient that have abnormal heartbeat (233x12=2796)": "HB",
    "Normal Person ECG Images (284x12=3408)": "Normal",
}
SEEDS = range(10)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- dataset layout (conftest: 6 per class, 2 copies)


def test_only_mendeley_folders_with_mendeley_file_names(synthetic_root: Path) -> None:
    assert {p.name for p in synthetic_root.iterdir()} == set(EXPECTED_FOLDERS)
    for folder, prefix in EXPECTED_FOLDERS.items():
        names = {p.name for p in (synthetic_root / folder).iterdir()}
        assert names == {f"{prefix}({i}).jpg" for i in range(1, 9)}, folder


def test_images_are_dev_copy_sized_rgb_jpegs(synthetic_root: Path) -> None:
    for path in synthetic_root.glob("*/*.jpg"):
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (1106, 786)), path


def test_planted_duplicates_copy_distinct_originals_of_their_class(synthetic_root: Path) -> None:
    for folder, prefix in EXPECTED_FOLDERS.items():
        originals = {_sha(synthetic_root / folder / f"{prefix}({i}).jpg"): i for i in range(1, 7)}
        assert len(originals) == 6, f"originals of {folder} must all differ"
        copied = [originals.get(_sha(synthetic_root / folder / f"{prefix}({i}).jpg")) for i in (7, 8)]
        assert None not in copied, f"a planted copy in {folder} matches no original of its class"
        assert copied[0] != copied[1]


def test_same_seed_is_byte_identical_and_independent_of_per_class(
    synthetic_root: Path, tmp_path: Path
) -> None:
    again = generate_dataset(tmp_path / "again", per_class=2, seed=0, scale=0.5, labels=["history_of_mi"])
    assert [p.name for p in again] == ["PMI(1).jpg", "PMI(2).jpg"]
    for path in again:
        assert path.read_bytes() == (synthetic_root / path.parent.name / path.name).read_bytes()
    other = generate_dataset(tmp_path / "other", per_class=2, seed=1, scale=0.5, labels=["history_of_mi"])
    for a, b in zip(again, other, strict=True):
        assert a.read_bytes() != b.read_bytes()


def test_full_scale_page_has_the_original_geometry() -> None:
    img = render_printout("normal", np.random.default_rng(3), scale=1.0)
    assert img.size == (2213, 1572) and img.mode == "RGB"


def test_grid_box_matches_the_real_layout_and_has_a_dark_border() -> None:
    page = next(
        p for p in (render_page("normal", np.random.default_rng(s), 0.5) for s in range(20)) if not p.angle
    )
    left, top, right, bottom = page.grid_box
    for got, real in zip(page.grid_box, (34, 141, 1087, 758), strict=True):
        assert abs(got - real) <= 8
    grey = np.asarray(page.image.convert("L"), float)
    rows = slice(top + 40, top + 70)  # above the first trace, below the top border
    border = grey[rows, left : left + 2].mean()
    inside = grey[rows, left + 3 : left + 60].mean()
    outside = grey[rows, left - 12 : left - 2].mean()
    assert border < inside - 20 and border < outside - 20
    header = grey[: top - 5].mean(axis=1)
    assert header.min() < 150, "the header must carry printed text above the grid"


# ---------------------------------------------------------------- arguments and CLI


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"per_class": 0}, "per_class"),
        ({"per_class": 2, "duplicates": -1}, "duplicates"),
        ({"per_class": 2, "duplicates": 3}, "duplicates"),
        ({"per_class": 1, "scale": 0.1}, "scale"),
        ({"per_class": 1, "scale": 4.5}, "scale"),
        ({"per_class": 1, "labels": ["sinus_tachycardia"]}, "unknown label"),
        ({"per_class": 1, "labels": ["normal", "normal"]}, "repeats"),
        ({"per_class": 1, "quality": 0}, "quality"),
        ({"per_class": 1, "seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir()), "nothing may be written before the arguments are checked"


def test_unknown_label_is_refused_by_the_renderer() -> None:
    with pytest.raises(ValueError, match="unknown label"):
        render_printout("tachycardia", np.random.default_rng(0), 0.5)


def test_refuses_to_mix_with_existing_files(tmp_path: Path) -> None:
    stale = tmp_path / "Normal Person ECG Images (284x12=3408)" / "Normal(9).jpg"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        generate_dataset(tmp_path, per_class=1, scale=0.5, labels=["normal"])


def test_cli_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    argv = [str(out), "--per-class", "1", "--duplicates", "1", "--scale", "0.5", "--quality", "80"]
    assert synth_main([*argv, "--seed", "4", "--labels", "normal", "abnormal_heartbeat"]) == 0
    text = capsys.readouterr().out
    assert "wrote 4 images" in text and "images/s" in text and str(out) in text
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "ECG Images of Patient that have abnormal heartbeat (233x12=2796)",
            "Normal Person ECG Images (284x12=3408)",
        ]
    )
    assert (out / "Normal Person ECG Images (284x12=3408)" / "Normal(2).jpg").is_file()
    assert synth_main([str(tmp_path / "bad"), "--per-class", "1", "--duplicates", "2"]) == 2
    assert "duplicates" in capsys.readouterr().err


# ---------------------------------------------------------------- waveform morphology, measured on the signals


def _beat_features(rec: EcgRecord, lead: str) -> dict[str, float]:
    """Median over sinus beats of ST level, Q depth, R height, P height and T minimum, all vs the PR baseline."""
    sig, fs = rec.lead(lead), rec.fs
    rows = []
    for r, kind in zip(rec.beat_times, rec.beat_kinds, strict=True):
        if kind != "N" or not 0.3 < r < rec.duration - 0.6:
            continue

        def win(a: float, b: float, r: float = r) -> np.ndarray:
            return sig[int(round((r + a) * fs)) : int(round((r + b) * fs)) + 1]

        base = win(-0.08, -0.07).mean()
        rows.append(
            [
                win(0.095, 0.105).mean() - base,
                win(-0.06, -0.005).min() - base,
                win(-0.015, 0.015).max() - base,
                win(-0.22, -0.11).max() - base,
                win(0.16, 0.45).min() - base,
            ]
        )
    assert rows, "no measurable sinus beat"
    st, q, r_height, p, t_min = np.median(np.array(rows), axis=0)
    return {"st": st, "q": q, "r": r_height, "p": p, "t_min": t_min}


def test_same_generator_state_gives_the_same_signals() -> None:
    a = synthesize_ecg("abnormal_heartbeat", np.random.default_rng(5))
    b = synthesize_ecg("abnormal_heartbeat", np.random.default_rng(5))
    c = synthesize_ecg("abnormal_heartbeat", np.random.default_rng(6))
    assert a.signals.shape == (12, 5000) and np.array_equal(a.signals, b.signals)
    assert not np.allclose(a.signals, c.signals)


@pytest.mark.parametrize("seed", SEEDS)
def test_normal_has_p_waves_and_flat_st(seed: int) -> None:
    rec = synthesize_ecg("normal", np.random.default_rng(seed))
    assert _beat_features(rec, "II")["p"] > 0.05
    assert max(abs(_beat_features(rec, lead)["st"]) for lead in LEADS) < 0.06
    assert 45 <= rec.heart_rate <= 110 and rec.territory is None


@pytest.mark.parametrize("seed", SEEDS)
def test_acute_mi_raises_st_in_its_territory_with_reciprocal_depression(seed: int) -> None:
    rec = synthesize_ecg("myocardial_infarction", np.random.default_rng(seed))
    assert rec.territory in TERRITORIES
    for lead in TERRITORIES[rec.territory]:
        assert _beat_features(rec, lead)["st"] >= 0.1, (rec.territory, lead)
    assert min(_beat_features(rec, lead)["st"] for lead in LEADS) <= -0.04, "no reciprocal ST depression"


@pytest.mark.parametrize("seed", SEEDS)
def test_history_of_mi_has_pathological_q_and_inverted_t_without_st_elevation(seed: int) -> None:
    rec = synthesize_ecg("history_of_mi", np.random.default_rng(seed))
    for lead in TERRITORIES[rec.territory]:
        f = _beat_features(rec, lead)
        assert -f["q"] > 0.25 * f["r"], (rec.territory, lead, f)
        assert f["t_min"] < -0.1, (rec.territory, lead, f)
    assert max(_beat_features(rec, lead)["st"] for lead in LEADS) < 0.06


def test_mi_territories_all_occur() -> None:
    seen = {synthesize_ecg("myocardial_infarction", np.random.default_rng(s)).territory for s in range(30)}
    assert seen == set(TERRITORIES)


def test_abnormal_heartbeat_rr_is_far_more_irregular_than_sinus() -> None:
    normal = [rr_cv(synthesize_ecg("normal", np.random.default_rng(s)).beat_times, 0, 10) for s in SEEDS]
    abnormal = [synthesize_ecg("abnormal_heartbeat", np.random.default_rng(s)) for s in SEEDS]
    abnormal_cv = [rr_cv(rec.beat_times, 0, 10) for rec in abnormal]
    assert max(normal) < 0.06
    assert min(abnormal_cv) > 2 * max(normal)
    assert all(set(rec.beat_kinds) & {"V", "F"} for rec in abnormal)


def test_premature_ventricular_beats_are_wide() -> None:
    recs = [synthesize_ecg("abnormal_heartbeat", np.random.default_rng(s)) for s in range(20)]
    widths: dict[str, list[float]] = {"N": [], "V": []}
    for rec in recs:
        for r, kind in zip(rec.beat_times, rec.beat_kinds, strict=True):
            if kind not in widths or not 0.3 < r < rec.duration - 0.5:
                continue
            i = int(round(r * rec.fs))
            window = rec.signals[:, i - 60 : i + 61]  # +-120 ms
            base = rec.signals[:, i - 60 : i - 50].mean(axis=1, keepdims=True)
            lead = np.abs(window - base).max(axis=1).argmax()
            dev = np.abs(window[lead] - base[lead, 0])
            widths[kind].append((dev > 0.5 * dev.max()).sum() / rec.fs)
    assert widths["V"], "no premature ventricular beat in 20 abnormal records"
    assert np.median(widths["V"]) > 2 * np.median(widths["N"])

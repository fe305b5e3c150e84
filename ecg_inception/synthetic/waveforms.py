"""Parametric 12-lead ECG signals (mV) with class-specific morphology and rhythm.

Each beat is a sum of Gaussian waves (P, Q, R, S, T) plus a smooth ST plateau; every wave has one timing shared
by all leads and one amplitude per lead, so a record is a (leads x waves) amplitude matrix times a (waves x time)
basis. Limb-lead amplitudes are projections of frontal-plane axes onto the hexaxial lead angles; precordial
amplitudes follow the usual R-wave progression. Class changes are applied per territory:

- ``normal``: sinus rhythm with mild respiratory variation.
- ``myocardial_infarction``: ST elevation and hyperacute T in one territory, reciprocal ST depression.
- ``history_of_mi``: pathological Q waves, reduced R and inverted T in one territory, no ST elevation.
- ``abnormal_heartbeat``: atrial-fibrillation-like episodes (irregular RR, no P, fibrillatory waves) and/or
  premature ventricular beats (wide bizarre QRS, no P, discordant T, compensatory pause).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ecg_inception.data.labels import CANONICAL_LABELS

LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
TERRITORIES: dict[str, tuple[str, ...]] = {
    "anterior": ("V1", "V2", "V3", "V4"),
    "inferior": ("II", "III", "aVF"),
    "lateral": ("I", "aVL", "V5", "V6"),
}
RECIPROCAL: dict[str, tuple[str, ...]] = {
    "anterior": ("II", "III", "aVF"),
    "inferior": ("I", "aVL"),
    "lateral": ("III", "aVF"),
}
DEFAULT_FS = 500.0

_IDX = {name: i for i, name in enumerate(LEADS)}
_LIMB_ANGLES = np.deg2rad(np.array([0.0, 60.0, 120.0, -150.0, -30.0, 90.0]))
_V_R = np.array([0.2, 0.45, 0.75, 1.1, 1.25, 1.05])
_V_S = np.array([0.95, 1.4, 1.05, 0.65, 0.3, 0.12])
_V_Q = np.array([0.0, 0.0, 0.0, 0.03, 0.08, 0.1])
_V_P = np.array([0.06, 0.08, 0.1, 0.1, 0.1, 0.09])
_V_T = np.array([0.05, 0.4, 0.5, 0.45, 0.35, 0.25])
_MIN_IRREGULAR_CV = 0.12  # abnormal_heartbeat records always have at least this RR coefficient of variation
_MAX_SINUS_CV = 0.06  # sinus records stay below this


@dataclass(frozen=True)
class EcgRecord:
    """A simultaneous 12-lead recording and the ground truth that produced it."""

    label: str
    fs: float
    signals: np.ndarray  # (12, n) in mV, rows in LEADS order
    beat_times: np.ndarray  # R-peak (or PVC) times in seconds, may extend slightly outside the record
    beat_kinds: tuple[str, ...]  # "N" sinus, "F" fibrillation-conducted (no P), "V" premature ventricular
    heart_rate: int  # mean ventricular rate in beats per minute
    territory: str | None  # MI territory for the two MI classes, else None

    def lead(self, name: str) -> np.ndarray:
        """The signal of one lead by its name (e.g. ``"aVF"``)."""
        return self.signals[_IDX[name]]

    @property
    def duration(self) -> float:
        """Length of the record in seconds."""
        return self.signals.shape[1] / self.fs


@dataclass
class _Morphology:
    """Per-lead amplitudes (mV) of each wave of a conducted beat."""

    p: np.ndarray
    q: np.ndarray
    q_wide: np.ndarray
    r: np.ndarray
    s: np.ndarray
    st: np.ndarray
    t: np.ndarray
    pr: float


def _limb(mag: float, axis_deg: float) -> np.ndarray:
    """Projection of a frontal-plane vector on the six limb leads."""
    return mag * np.cos(np.deg2rad(axis_deg) - _LIMB_ANGLES)


def _normal_morphology(rng: np.random.Generator) -> _Morphology:
    """A healthy adult's wave amplitudes with per-record variation."""
    axis = rng.uniform(-10.0, 80.0)
    c = np.cos(np.deg2rad(axis) - _LIMB_ANGLES)
    r_mag = rng.uniform(0.8, 1.5)
    r_limb = r_mag * np.clip(c, 0.0, None) + rng.uniform(0.06, 0.15, 6)
    s_limb = -(0.8 * r_mag * np.clip(-c, 0.0, None) + rng.uniform(0.04, 0.15, 6))
    q_limb = np.where(c > 0.3, -0.08 * r_limb, -0.01)
    v_gain = rng.uniform(0.7, 1.3)
    jitter = rng.uniform(0.85, 1.15, (4, 6))
    r = np.concatenate([r_limb, v_gain * _V_R * jitter[0]])
    s = np.concatenate([s_limb, -v_gain * _V_S * jitter[1]])
    q = np.concatenate([q_limb, -_V_Q * jitter[2]])
    p = np.concatenate([_limb(rng.uniform(0.1, 0.2), rng.uniform(35.0, 70.0)), _V_P * jitter[3]])
    t_limb = _limb(rng.uniform(0.25, 0.5), axis + rng.uniform(-15.0, 15.0))
    t_v = _V_T * rng.uniform(0.7, 1.3, 6)
    t_v[0] = rng.uniform(-0.1, 0.12)
    t = np.concatenate([t_limb, t_v])
    return _Morphology(
        p=p,
        q=q,
        q_wide=np.zeros(12),
        r=r,
        s=s,
        st=rng.uniform(-0.02, 0.02, 12),
        t=t,
        pr=rng.uniform(0.13, 0.19),
    )


def _apply_acute_mi(m: _Morphology, territory: str, rng: np.random.Generator) -> None:
    """ST elevation with hyperacute T in the territory, reciprocal ST depression elsewhere."""
    for name in TERRITORIES[territory]:
        i = _IDX[name]
        boost = 1.3 if name in ("V2", "V3") else 1.0
        elevation = boost * rng.uniform(0.15, 0.4)
        m.st[i] = elevation
        m.t[i] = abs(m.t[i]) + rng.uniform(0.5, 1.0) * elevation + 0.1
    for name in RECIPROCAL[territory]:
        i = _IDX[name]
        m.st[i] = -rng.uniform(0.06, 0.18)
        m.t[i] = min(m.t[i], rng.uniform(-0.1, 0.1))


def _apply_old_mi(m: _Morphology, territory: str, rng: np.random.Generator) -> None:
    """Pathological Q waves, loss of R and inverted T in the territory; the ST segment is not raised."""
    for name in TERRITORIES[territory]:
        i = _IDX[name]
        m.r[i] *= rng.uniform(0.3, 0.7)
        m.q[i] = 0.0
        m.q_wide[i] = -(rng.uniform(0.45, 0.9) * m.r[i] + rng.uniform(0.08, 0.2))
        m.t[i] = -(rng.uniform(0.12, 0.3) + 0.5 * abs(m.t[i]))
        m.st[i] = -rng.uniform(0.0, 0.04)


def _pvc_amplitudes(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Main and terminal deflections of a wide ventricular complex (origin-dependent polarity)."""
    axis = rng.uniform(-180.0, 180.0)
    main_limb = _limb(rng.uniform(1.0, 2.0), axis)
    sign = 1.0 if rng.random() < 0.5 else -1.0  # left- vs right-bundle-like precordial pattern
    main_v = sign * np.linspace(-1.0, 1.0, 6) * rng.uniform(1.0, 2.0) + rng.uniform(-0.3, 0.3, 6)
    main = np.concatenate([main_limb, main_v])
    return main, -0.3 * main


def _sinus_rr(rng: np.random.Generator, hr: float, n: int) -> np.ndarray:
    """Sinus intervals with respiratory modulation and a little jitter."""
    rr0 = 60.0 / hr
    phase = rng.uniform(0, 2 * np.pi)
    breaths = rng.uniform(3.0, 5.0)  # beats per breath
    k = np.arange(n)
    rr = rr0 * (1.0 + rng.uniform(0.005, 0.03) * np.sin(2 * np.pi * k / breaths + phase))
    return rr * (1.0 + rng.normal(0.0, 0.008, n))


def _af_rr(rng: np.random.Generator, hr: float, n: int) -> np.ndarray:
    """Irregularly irregular ventricular response."""
    rr = (60.0 / hr) * rng.lognormal(0.0, rng.uniform(0.2, 0.32), n)
    return np.clip(rr, 0.33, 1.8)


def _rhythm(label: str, rng: np.random.Generator, duration: float) -> tuple[np.ndarray, list[str]]:
    """Beat times (s) and kinds covering [-1, duration + 1]."""
    n = int((duration + 2.0) / 0.3) + 4  # more intervals than any rate can use
    if label != "abnormal_heartbeat":
        hr = rng.uniform(60.0, 105.0) if label == "myocardial_infarction" else rng.uniform(55.0, 95.0)
        rr = _sinus_rr(rng, hr, n)
        kinds = ["N"] * n
    else:
        mode = rng.choice(["af", "pvc", "mixed"])
        hr = rng.uniform(60.0, 110.0)
        rr = _sinus_rr(rng, hr, n)
        kinds = ["N"] * n
        if mode in ("af", "mixed"):
            start = 0 if mode == "af" or rng.random() < 0.5 else int(rng.integers(3, 8))
            stop = n if mode == "af" or start > 0 else int(rng.integers(8, 14))
            rr[start:stop] = _af_rr(rng, rng.uniform(70.0, 130.0), stop - start)
            kinds[start:stop] = ["F"] * (stop - start)
        if mode in ("pvc", "mixed"):
            every = int(rng.choice([2, 3, 0, 0]))  # bigeminy, trigeminy or scattered
            beats = (
                range(3, n - 1, every) if every else sorted(rng.choice(np.arange(3, 16), 4, replace=False))
            )
            for j in beats:  # rr[j - 1] ends at beat j: shorten it (premature), lengthen rr[j] (pause)
                if kinds[j - 1] == "V" or kinds[j + 1] == "V":
                    continue
                total = rr[j - 1] + rr[j]
                rr[j - 1] *= rng.uniform(0.5, 0.7)
                rr[j] = total - rr[j - 1] if kinds[j] == "N" else rr[j] * rng.uniform(1.1, 1.5)
                kinds[j] = "V"
    times = -1.0 + rng.uniform(0.0, 0.8) + np.concatenate([[0.0], np.cumsum(rr[:-1])])
    keep = times < duration + 1.0
    return times[keep], [k for k, ok in zip(kinds, keep, strict=True) if ok]


def rr_cv(beat_times: np.ndarray, start: float = 0.0, stop: float = np.inf) -> float:
    """Coefficient of variation of the RR intervals between beats inside [start, stop]."""
    t = beat_times[(beat_times >= start) & (beat_times <= stop)]
    rr = np.diff(t)
    return float(rr.std() / rr.mean()) if len(rr) >= 2 else 0.0


def _gauss(t: np.ndarray, centre: float, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * ((t - centre) / sigma) ** 2)


def _plateau(t: np.ndarray, start: float, stop: float) -> np.ndarray:
    """A flat-topped bump from `start` to `stop` (the ST segment running into the T wave)."""
    centre, half = 0.5 * (start + stop), 0.5 * (stop - start)
    return np.exp(-(((t - centre) / half) ** 6))


def _beats_to_signal(
    t: np.ndarray, times: np.ndarray, kinds: list[str], m: _Morphology, rng: np.random.Generator
) -> np.ndarray:
    """Sum every beat's waves: amplitudes (12 x W) @ basis (W x n)."""
    pvc_main, pvc_term = _pvc_amplitudes(rng)
    pvc_t = -0.45 * (pvc_main + pvc_term) + rng.uniform(-0.05, 0.05, 12)
    columns: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    prev = times[0] - (times[1] - times[0])
    for tb, kind in zip(times, kinds, strict=True):
        rr = float(np.clip(tb - prev, 0.3, 2.0))
        prev = tb
        window = (t > tb - 0.45) & (t < tb + 0.75)
        if not window.any():
            continue
        tw = t[window]
        q = float(np.sqrt(np.clip(rr, 0.45, 1.5)))
        t_peak, t_sigma = 0.3 * q, 0.05 * q

        def add(amps: np.ndarray, shape: np.ndarray, window: np.ndarray = window) -> None:
            full = np.zeros_like(t)
            full[window] = shape
            columns.append(amps)
            rows.append(full)

        if kind == "V":
            add(pvc_main, _gauss(tw, tb, 0.032))
            add(pvc_term, _gauss(tw, tb + 0.07, 0.03))
            add(pvc_t, _gauss(tw, tb + 0.34 * q, 0.065 * q))
            continue
        if kind == "N":
            add(m.p, _gauss(tw, tb - m.pr, 0.022))
        add(m.q, _gauss(tw, tb - 0.028, 0.009))
        add(m.q_wide, _gauss(tw, tb - 0.032, 0.012))
        add(m.r, _gauss(tw, tb, 0.0105))
        add(m.s, _gauss(tw, tb + 0.03, 0.0105))
        add(m.st, _plateau(tw, tb + 0.045, tb + t_peak))
        add(m.t, _gauss(tw, tb + t_peak, t_sigma))
    return np.stack(columns, axis=1) @ np.stack(rows, axis=0)


def _fibrillatory_waves(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small 4-8 Hz oscillations replacing P waves during AF, strongest in V1 and the inferior leads."""
    gain = np.full(12, 0.4)
    gain[[_IDX["II"], _IDX["III"], _IDX["aVF"], _IDX["V1"], _IDX["V2"]]] = 1.0
    amp = rng.uniform(0.02, 0.06)
    wave = np.zeros_like(t)
    for _ in range(3):
        wave += np.sin(2 * np.pi * rng.uniform(4.0, 8.0) * t + rng.uniform(0, 2 * np.pi))
    return amp / 2.0 * gain[:, None] * wave[None, :] * rng.uniform(0.6, 1.2, (12, 1))


def _noise(t: np.ndarray, fs: float, rng: np.random.Generator) -> np.ndarray:
    """Baseline wander plus band-limited muscle noise, independent per lead."""
    n = len(t)
    wander = np.zeros((12, n))
    for _ in range(2):
        freq = rng.uniform(0.05, 0.45, (12, 1))
        wander += rng.uniform(0.0, 0.06, (12, 1)) * np.sin(
            2 * np.pi * freq * t + rng.uniform(0, 6.3, (12, 1))
        )
    white = rng.normal(0.0, 1.0, (12, n)) * rng.uniform(0.004, 0.02)
    k = max(1, int(round(fs / 40.0)))
    kernel = np.ones(k) / k
    smooth = np.stack([np.convolve(row, kernel, mode="same") for row in white])
    return wander + smooth * np.sqrt(k)


def synthesize_ecg(
    label: str, rng: np.random.Generator, duration: float = 10.0, fs: float = DEFAULT_FS
) -> EcgRecord:
    """Draw one 12-lead record of a class; deterministic for the generator's state."""
    if label not in CANONICAL_LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {', '.join(CANONICAL_LABELS)}")
    if duration <= 0 or fs < 100:
        raise ValueError(f"need duration > 0 and fs >= 100 Hz, got duration={duration}, fs={fs}")
    t = np.arange(int(round(duration * fs))) / fs
    m = _normal_morphology(rng)
    territory = None
    if label in ("myocardial_infarction", "history_of_mi"):
        territory = str(rng.choice(list(TERRITORIES)))
        (_apply_acute_mi if label == "myocardial_infarction" else _apply_old_mi)(m, territory, rng)
    for _ in range(50):
        times, kinds = _rhythm(label, rng, duration)
        cv = rr_cv(times, 0.0, duration)
        irregular = label == "abnormal_heartbeat"
        if (cv >= _MIN_IRREGULAR_CV) if irregular else (cv <= _MAX_SINUS_CV):
            break
    signals = _beats_to_signal(t, times, kinds, m, rng)
    if "F" in kinds:
        f_times = times[[k == "F" for k in kinds]]
        inside = (t >= f_times.min() - 0.5) & (t <= f_times.max() + 0.3)
        signals += _fibrillatory_waves(t, rng) * inside[None, :]
    signals += _noise(t, fs, rng)
    visible = times[(times >= 0) & (times < duration)]
    rate = 60.0 / float(np.diff(visible).mean()) if len(visible) >= 2 else 60.0
    return EcgRecord(
        label=label,
        fs=float(fs),
        signals=signals,
        beat_times=times,
        beat_kinds=tuple(kinds),
        heart_rate=int(round(rate)),
        territory=territory,
    )

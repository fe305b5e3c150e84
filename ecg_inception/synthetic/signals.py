"""Real 12-lead signals as a source for the printout renderer: checked, centred records from a (12, T) array.

The parametric beat model (`waveforms.synthesize_ecg`) is one source of `EcgRecord`s; `record_from_signals` is the
other: any 12 x T array in millivolts at any sampling rate of at least 50 Hz (PTB-XL's 100 and 500 Hz, the
compact subset's 250 Hz), leads in `waveforms.LEADS` order (I, II, III, aVR, aVL, aVF, V1-V6, PTB-XL's order).
The renderer maps time to pixels itself (`printout._trace_points`), so no resampling happens here.
"""

from __future__ import annotations

import numpy as np

from ecg_inception.synthetic.waveforms import LEADS, EcgRecord

MIN_FS = 50.0
#: Seconds a page shows (4 columns of 2.5 s and the 10 s rhythm strip).
PAGE_SECONDS = 10.0


def estimate_heart_rate(signals: np.ndarray, fs: float) -> int:
    """Mean ventricular rate (beats per minute) for the footer text, from a simple QRS detector.

    The absolute slope summed over leads, smoothed over 40 ms, has one peak per QRS; peaks above 40 % of its
    99th percentile and at least 250 ms apart count as beats. Returns 0 when fewer than two beats are found
    (a flat or very short record).

    Args:
        signals: (12, T) in mV.
        fs: sampling rate in Hz.

    Returns:
        The rate rounded to an integer, 0 when it cannot be estimated.
    """
    x = np.asarray(signals, dtype=np.float64)
    if x.shape[-1] < 3:
        return 0
    slope = np.abs(np.diff(x, axis=-1)).sum(axis=0)
    k = max(1, int(round(0.04 * fs)))
    energy = np.convolve(slope, np.ones(k) / k, mode="same")
    level = np.percentile(energy, 99)
    if not np.isfinite(level) or level <= 1e-9:
        return 0
    gap = max(1, int(round(0.25 * fs)))
    candidates = np.flatnonzero(energy > 0.4 * level)
    beats: list[int] = []
    for i in candidates:  # keep the highest sample of each run of candidates closer than `gap`
        if beats and i - beats[-1] < gap:
            if energy[i] > energy[beats[-1]]:
                beats[-1] = int(i)
            continue
        beats.append(int(i))
    if len(beats) < 2:
        return 0
    rr = np.diff(beats) / fs
    return int(round(60.0 / float(np.median(rr))))


def record_from_signals(
    signals: np.ndarray,
    fs: float,
    label: str = "",
    heart_rate: int | None = None,
    center: bool = True,
) -> EcgRecord:
    """Wrap a real (12, T) recording in millivolts as an `EcgRecord` the renderer draws.

    Args:
        signals: (12, T) array in mV, rows in I, II, III, aVR, aVL, aVF, V1-V6 order (PTB-XL's); any float or
            integer dtype (integers are taken as mV too: divide microvolts by 1000 first). Non-finite samples
            (gaps in a WFDB record) are drawn at the baseline.
        fs: sampling rate in Hz (>= 50).
        label: what the record shows (free text, e.g. the PTB-XL superclasses); kept in the record only.
        heart_rate: the footer's rate; None: estimated (`estimate_heart_rate`).
        center: subtract each lead's median, as an ECG machine's high-pass puts the baseline at 0 mV.

    Returns:
        The record (float64 signals; no beat ground truth: `beat_times` is empty).

    Raises:
        ValueError: not 12 leads, no samples, or fs below 50 Hz.
    """
    x = np.asarray(signals, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(LEADS):
        raise ValueError(f"signals must be (12, T) in {', '.join(LEADS)} order, got shape {x.shape}")
    if x.shape[1] < 2:
        raise ValueError(f"signals need at least 2 samples per lead, got {x.shape[1]}")
    if not np.isfinite(fs) or fs < MIN_FS:
        raise ValueError(f"fs must be at least {MIN_FS:g} Hz, got {fs}")
    x = np.where(np.isfinite(x), x, np.nan)
    if center:
        med = np.nanmedian(x, axis=1, keepdims=True) if np.isfinite(x).any() else np.zeros((len(LEADS), 1))
        x = x - np.nan_to_num(med)
    x = np.nan_to_num(x, nan=0.0)
    rate = estimate_heart_rate(x, fs) if heart_rate is None else int(heart_rate)
    return EcgRecord(
        label=label, fs=float(fs), signals=x, beat_times=np.empty(0), beat_kinds=(), heart_rate=rate, territory=None
    )

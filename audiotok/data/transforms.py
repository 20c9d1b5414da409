"""Excerpt selection and level/phase processing of training audio (all on ``[C, T]`` float arrays).

The training recipe (DAC): a salient excerpt (loudness above -40 LUFS, up to 8 tries), mono,
resampled to the model rate, loudness normalized to -16 LUFS, random global phase shift,
peak-limited. :func:`process_excerpt` chains these; resampling and downmixing are
:func:`audiotok.audio.resample` and :func:`audiotok.audio.downmix`.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from ..audio import downmix, resample

#: BS.1770 gating block (seconds).
GATE_BLOCK = 0.4
#: BS.1770 absolute gate (LUFS): quieter material counts as silence.
ABSOLUTE_GATE = -70.0


class Clip(Protocol):
    """Audio that can be read by frame range without decoding all of it.

    ``read(start, frames)`` returns float32 ``[C, frames]`` (fewer frames past the end); ``key``
    names the clip in messages.
    """

    key: str
    sample_rate: int
    num_frames: int

    def read(self, start: int, frames: int) -> np.ndarray: ...


class ArrayClip:
    """In-memory ``[C, T]`` (or ``[T]``) audio as a :class:`Clip`; ``key`` names it in messages."""

    def __init__(self, audio: np.ndarray, sample_rate: int, key: str = ""):
        self.key = key
        self.audio = np.atleast_2d(audio)
        self.sample_rate = sample_rate
        self.num_frames = self.audio.shape[-1]

    def read(self, start: int, frames: int) -> np.ndarray:
        return self.audio[:, start : start + frames]


def loudness(audio: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness (ITU-R BS.1770-4, LUFS) of ``[C, T]`` or ``[T]`` audio, via pyloudnorm.

    Clips shorter than the 400 ms gating block are extended periodically (tiled) to one block, so
    the measure is the clip's own mean K-weighted power rather than that power diluted by padding
    silence (audiotools zero-pads to 0.5 s, which reads about 1.2 dB low for a 0.38 s excerpt).
    More than 5 channels are downmixed first (BS.1770 defines weights for 5). Empty or silent
    audio gives ``-inf``.
    """
    import pyloudnorm

    x = np.atleast_2d(np.asarray(audio, dtype=np.float64))
    if x.shape[0] > 5:
        x = downmix(x)
    if x.shape[-1] == 0 or not np.any(x):
        return -math.inf
    block = math.ceil(GATE_BLOCK * sample_rate)
    if x.shape[-1] < block:
        x = np.tile(x, (1, math.ceil(block / x.shape[-1])))[:, :block]
    return float(pyloudnorm.Meter(sample_rate).integrated_loudness(x.T))


def salient_excerpt(
    audio: np.ndarray | Clip,
    sample_rate: int,
    duration: float,
    rng: np.random.Generator,
    min_loudness: float = -40.0,
    tries: int = 8,
) -> np.ndarray:
    """A random ``[C, N]`` excerpt, ``N = round(duration * sample_rate)``, louder than ``min_loudness``.

    ``audio`` is ``[C, T]`` or a :class:`Clip` (only the excerpts tried are read). Up to ``tries``
    uniformly drawn offsets are tried; the first excerpt above the threshold is returned, else the
    last one tried. Audio no longer than ``N`` is returned whole, zero-padded at the end.
    """
    n = round(duration * sample_rate)
    if n <= 0:
        raise ValueError(f"duration {duration} s is less than one sample at {sample_rate} Hz")
    if isinstance(audio, np.ndarray):
        audio = ArrayClip(audio, sample_rate)
    total = audio.num_frames
    if total <= n:
        return fix_length(audio.read(0, total), n)
    for _ in range(max(1, tries)):
        x = audio.read(int(rng.integers(0, total - n + 1)), n)
        if loudness(x, sample_rate) > min_loudness:
            break
    return fix_length(x, n)


def fix_length(audio: np.ndarray, length: int) -> np.ndarray:
    """Trim or zero-pad ``[C, T]`` at the end to ``[C, length]``."""
    if audio.shape[-1] >= length:
        return audio[..., :length]
    return np.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(0, length - audio.shape[-1])])


def normalize_loudness(audio: np.ndarray, sample_rate: int, target: float = -16.0) -> np.ndarray:
    """Scale ``[C, T]`` audio to ``target`` LUFS. Silence is returned unchanged; loudness below
    the -70 LUFS absolute gate counts as -70 (at most +54 dB of gain for a -16 target). Peaks may
    exceed 1 afterwards: follow with :func:`peak_limit`."""
    measured = loudness(audio, sample_rate)
    if measured == -math.inf:
        return audio
    gain = 10.0 ** ((target - max(measured, ABSOLUTE_GATE)) / 20.0)
    return (audio * gain).astype(np.float32)


def peak_limit(audio: np.ndarray, peak: float = 1.0) -> np.ndarray:
    """Scale the whole clip down (one gain, no distortion) so that ``max|x| <= peak``; quieter
    clips are returned unchanged. Like audiotools' ``ensure_max_of_audio`` used by DAC."""
    top = float(np.max(np.abs(audio))) if audio.size else 0.0
    return audio if top <= peak else (audio * (peak / top)).astype(np.float32)


def random_phase_shift(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate the phase of every frequency by one random angle ``phi ~ U(-pi, pi)``.

    ``y = x cos(phi) - H(x) sin(phi)`` with ``H`` the Hilbert transform (``scipy.signal.hilbert``,
    FFT-based), i.e. the real part of the analytic signal times ``e^{i phi}``: the magnitude
    spectrum, hence the loudness, is kept; ``phi = pi`` is a polarity flip. The FFT treats the
    excerpt as periodic, so the first and last few samples carry a small wrap-around error.
    DAC applies the same global rotation to STFT phases (audiotools ``ShiftPhase``).
    """
    from scipy.signal import hilbert

    phi = rng.uniform(-math.pi, math.pi)
    analytic = hilbert(audio, axis=-1)
    return (analytic.real * math.cos(phi) - analytic.imag * math.sin(phi)).astype(np.float32)


def process_excerpt(
    audio: np.ndarray | Clip,
    sample_rate: int,
    target_rate: int,
    duration: float,
    rng: np.random.Generator,
    min_loudness: float = -40.0,
    tries: int = 8,
    loudness_target: float = -16.0,
    phase_shift: bool = True,
) -> np.ndarray:
    """The training recipe: ``[C, T]`` at ``sample_rate`` -> mono ``[1, N]`` float32 at ``target_rate``,
    ``N = round(duration * target_rate)``.

    Salient excerpt at the source rate (``duration`` seconds), downmix, resample, trim/pad to
    ``N``, loudness normalization, optional random phase shift, then peak limiting last so the
    output always satisfies ``max|x| <= 1``.
    """
    x = salient_excerpt(audio, sample_rate, duration, rng, min_loudness, tries)
    x = fix_length(resample(downmix(x), sample_rate, target_rate), round(duration * target_rate))
    x = normalize_loudness(x, target_rate, loudness_target)
    if phase_shift:
        x = random_phase_shift(x, rng)
    return np.ascontiguousarray(peak_limit(x), dtype=np.float32)

"""Quality metrics: codebook utilization, spectral distances, SI-SDR and the optional ViSQOL / PESQ /
STOI wrappers (skipped when their packages are not installed)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from audiotok import metrics


def speech_like(seconds: float = 3.0, sr: int = 16000) -> np.ndarray:
    """Voiced 'syllables' at 2.5 Hz with pauses: a gliding 120 Hz pulse train through three formant
    resonators. PESQ's voice activity detection and ViSQOL's speech mode accept it."""
    from scipy.signal import lfilter

    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * np.cumsum(120 + 20 * np.sin(2 * np.pi * 0.7 * t)) / sr
    y = sum(np.sin(k * phase) / k for k in range(1, 30))
    for fc, bw in [(700, 130), (1220, 70), (2600, 160)]:
        r, th = np.exp(-np.pi * bw / sr), 2 * np.pi * fc / sr
        y = lfilter([1 - r], [1, -2 * r * np.cos(th), r * r], y)
    y = y * np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None) ** 0.5
    return (0.3 * y / np.abs(y).max()).astype(np.float32)


def music_like(seconds: float = 2.0, sr: int = 44100) -> np.ndarray:
    """A slowly modulated chord plus a little noise."""
    t = np.arange(int(seconds * sr)) / sr
    freqs = [220, 277, 330, 440, 554, 660, 880]
    x = sum(np.sin(2 * np.pi * f * t) * (0.6 + 0.4 * np.sin(np.pi * (k + 1) * t)) for k, f in enumerate(freqs))
    x = x + 0.005 * np.random.default_rng(0).standard_normal(len(t))
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def add_noise(x: np.ndarray, level: float = 0.02, seed: int = 1) -> np.ndarray:
    return (x + level * np.random.default_rng(seed).standard_normal(x.shape)).astype(np.float32)


# -- codebook utilization ----------------------------------------------------------------------


def test_utilization_uniform_is_one_and_constant_is_zero():
    size = 8
    uniform = np.tile(np.arange(size), 3)[None]  # [K=1, F=24], every code 3 times
    constant = np.full((1, 24), 5)
    assert metrics.codebook_utilization(uniform, size).overall == pytest.approx(1.0)
    assert metrics.codebook_utilization(constant, size) == ([0.0], 0.0)
    # One uniform and one constant codebook: the overall value is the mean.
    per, overall = metrics.codebook_utilization(torch.from_numpy(np.concatenate([uniform, constant]))[None], size)
    assert per == pytest.approx([1.0, 0.0]) and overall == pytest.approx(0.5)


def test_utilization_two_symbol_distribution():
    # p = (3/4, 1/4): H = 0.8113 bits; normalized by log2(4) = 2.
    codes = np.array([[0, 0, 0, 1, 0, 0, 0, 1]])
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    per, overall = metrics.codebook_utilization(codes, 4)
    assert per == pytest.approx([h / 2]) and overall == pytest.approx(h / 2)


def test_perplexity_counts_equally_used_codes():
    # 2 ** H: uniform use of all 8 codes -> 8, one code -> 1, four codes used equally -> 4, p = (3/4, 1/4) -> 2 ** H
    codes = np.stack([np.tile(np.arange(8), 2), np.full(16, 5), np.tile(np.arange(4), 4), np.array([0, 0, 0, 1] * 4)])
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert metrics.codebook_utilization(codes, 8).perplexity(8) == pytest.approx([8.0, 1.0, 4.0, 2**h])


def test_utilization_list_and_lengths():
    a = np.array([[0, 1], [2, 2]])
    b = np.array([[2, 3, 3], [2, 2, 2]])
    joined = metrics.codebook_utilization(np.concatenate([a, b], axis=1), 4)
    assert metrics.codebook_utilization([a, torch.from_numpy(b)], 4) == joined
    # Padding past ``lengths`` is left out.
    padded = np.zeros((2, 2, 3), dtype=np.int64)
    padded[0, :, :2], padded[1] = a, b
    assert metrics.codebook_utilization(padded, 4, lengths=[2, 3]) == joined
    assert metrics.codebook_utilization(padded, 4) != joined


@pytest.mark.parametrize(
    "codes, size",
    [(np.array([[0, 4]]), 4), (np.array([[-1, 0]]), 4), (np.zeros((1, 2)), 4), (np.zeros((1, 0), int), 4),
     (np.zeros((1, 2), int), 1), (np.zeros(3, int), 4)],
)
def test_utilization_rejects_bad_input(codes, size):
    with pytest.raises(ValueError):
        metrics.codebook_utilization(codes, size)


# -- spectral distances and SI-SDR -------------------------------------------------------------


def test_spectral_distances():
    sr = 16000
    x = music_like(0.5, sr)
    y = add_noise(x, 0.05)
    assert metrics.mel_distance(x, x, sr) == 0.0
    assert metrics.stft_distance(x, x, sr) == 0.0
    mel, stft = metrics.mel_distance(y, x, sr), metrics.stft_distance(y, x, sr)
    assert mel > 0.1 and stft > 0.1
    # Tensors and batches: a batch of equal-length items gives the mean of their values.
    batch = torch.from_numpy(np.stack([[y], [x]]))
    ref = torch.from_numpy(np.stack([[x], [x]]))
    assert metrics.mel_distance(batch, ref, sr) == pytest.approx(mel / 2, rel=1e-5)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.mel_distance(x[:-1], x, sr)


def test_si_sdr():
    x = music_like(0.25, 16000)
    assert metrics.si_sdr(0.5 * x, x) > 60  # scale-invariant
    noisy = add_noise(x, 0.05)
    expected = 10 * np.log10(np.sum(x**2) / np.sum((noisy - x) ** 2))
    assert metrics.si_sdr(noisy, x) == pytest.approx(expected, abs=0.2)


# -- optional perceptual metrics ---------------------------------------------------------------


def test_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "pystoi", None)  # makes ``import pystoi`` fail
    x = speech_like(0.5)
    with pytest.raises(ImportError, match=r"pip install pystoi.*audiotok\[eval\]"):
        metrics.stoi_score(x, x, 16000)


def test_visqol_audio_mode():
    pytest.importorskip("visqol", reason="visqol-python not installed")
    x = music_like(2.0, 44100)
    same = metrics.visqol(x, x, 44100)
    noisy = metrics.visqol(add_noise(x, 0.02), x, 44100)
    assert same > 4.5  # the audio-mode SVR tops out near 4.73 for identical clips
    assert noisy < same - 1.0


def test_visqol_speech_mode():
    pytest.importorskip("visqol", reason="visqol-python not installed")
    x = speech_like(3.0, 16000)
    same = metrics.visqol(x, x, 16000, mode="speech")
    noisy = metrics.visqol(add_noise(x, 0.02), x, 16000, mode="speech")
    assert same > 4.0 and noisy < same - 1.0
    assert metrics.visqol_speech_mapper() in ("lattice", "polynomial")


def test_pesq():
    pytest.importorskip("pesq", reason="pesq not installed")
    x = speech_like(3.0, 16000)
    same = metrics.pesq_score(x, x, 16000)
    assert same > 4.5  # wide-band PESQ maximum is 4.64
    assert metrics.pesq_score(add_noise(x, 0.02), x, 16000) < same - 1.0
    # Other rates are resampled (to 16 kHz here).
    x48 = speech_like(3.0, 48000)
    assert metrics.pesq_score(x48, x48, 48000) > 4.5


def test_stoi():
    pytest.importorskip("pystoi", reason="pystoi not installed")
    x = speech_like(3.0, 16000)
    assert metrics.stoi_score(x, x, 16000) == pytest.approx(1.0, abs=1e-6)
    assert metrics.stoi_score(add_noise(x, 0.05), x, 16000) < 0.9

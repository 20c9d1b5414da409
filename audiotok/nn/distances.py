"""Spectral distances and SI-SDR: the Improved RVQGAN's multi-scale mel and STFT distances (training
losses and evaluation metrics alike), a multi-resolution power-law compressed complex STFT loss that
sees phase, and scale-invariant SDR.

Used by training (:mod:`audiotok.train`) and evaluation (:mod:`audiotok.metrics`); needs
``transformers`` for the mel filters. Spectral distances compute in float32 with autocast switched
off, so they give the same values inside a bf16/fp16 autocast region. Audio is ``[B, C, T]`` (C = 1
for the codec); ``x`` is the estimate and ``y`` the reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.audio_utils import mel_filter_bank


class Spectrogram(nn.Module):
    """Magnitude STFT: hann window, hop = window / 4, centered with reflect padding.
    ``[B, C, T]`` -> float32 ``[B, C, window // 2 + 1, 1 + T // hop]``."""

    def __init__(self, window_length: int):
        super().__init__()
        self.window_length = window_length
        self.hop_length = window_length // 4
        self.window: torch.Tensor
        self.register_buffer("window", torch.hann_window(window_length), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        with torch.autocast(audio.device.type, enabled=False):
            spec = torch.stft(
                audio.float().reshape(-1, audio.shape[-1]),
                n_fft=self.window_length,
                hop_length=self.hop_length,
                window=self.window,
                center=True,
                pad_mode="reflect",
                return_complex=True,
            )
        return spec.abs().unflatten(0, audio.shape[:-1])


def slaney_mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """Slaney mel filter bank from 0 Hz to ``sample_rate / 2`` with Slaney area normalization (as
    ``librosa.filters.mel``'s defaults). Returns ``[n_mels, n_fft // 2 + 1]`` float32.

    Narrow windows with many mels give a few all-zero filters, exactly as in the reference loss.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
        filters = mel_filter_bank(
            num_frequency_bins=n_fft // 2 + 1,
            num_mel_filters=n_mels,
            min_frequency=0.0,
            max_frequency=sample_rate / 2,
            sampling_rate=sample_rate,
            norm="slaney",
            mel_scale="slaney",
        )  # float64 (transformers 5 has no dtype argument)
    return torch.from_numpy(np.ascontiguousarray(filters.T, dtype=np.float32))


class MelSpectrogram(nn.Module):
    """Mel spectrogram of the magnitude (power 1) STFT of :class:`Spectrogram`.
    ``[B, C, T]`` -> float32 ``[B, C, n_mels, 1 + T // hop]``."""

    def __init__(self, sample_rate: int, window_length: int, n_mels: int):
        super().__init__()
        self.spectrogram = Spectrogram(window_length)
        self.register_buffer("filters", slaney_mel_filters(sample_rate, window_length, n_mels), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        magnitude = self.spectrogram(audio)
        with torch.autocast(audio.device.type, enabled=False):
            return self.filters @ magnitude


def spectral_distance(
    x: torch.Tensor, y: torch.Tensor, clamp_eps: float, pow: float, log_weight: float, mag_weight: float
) -> torch.Tensor:
    """``log_weight * L1(log10(clamp(x)^pow), log10(clamp(y)^pow)) + mag_weight * L1(x, y)`` on
    non-negative spectrograms."""
    log_x = x.clamp(min=clamp_eps).pow(pow).log10()
    log_y = y.clamp(min=clamp_eps).pow(pow).log10()
    return log_weight * F.l1_loss(log_x, log_y) + mag_weight * F.l1_loss(x, y)


class _MultiScaleDistance(nn.Module):
    """:func:`spectral_distance` between the transforms of ``x`` and ``y``, summed over transforms."""

    def __init__(self, transforms: Sequence[nn.Module], clamp_eps: float, pow: float, log_weight: float,
                 mag_weight: float):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)
        self.clamp_eps, self.pow = clamp_eps, pow
        self.log_weight, self.mag_weight = log_weight, mag_weight

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Estimate ``x`` and reference ``y``, both ``[B, C, T]`` -> scalar."""
        terms = [
            spectral_distance(t(x), t(y), self.clamp_eps, self.pow, self.log_weight, self.mag_weight)
            for t in self.transforms
        ]
        return torch.stack(terms).sum()


class MelSpectrogramLoss(_MultiScaleDistance):
    """Multi-scale mel distance: :func:`spectral_distance` of mel spectrograms, summed over scales.

    Defaults are the final 44 kHz recipe: 7 scales (windows 32 to 2048, 5 to 320 mels), log-mel L1.
    """

    def __init__(
        self,
        sample_rate: int,
        window_lengths: Sequence[int] = (32, 64, 128, 256, 512, 1024, 2048),
        n_mels: Sequence[int] = (5, 10, 20, 40, 80, 160, 320),
        clamp_eps: float = 1e-5,
        pow: float = 1.0,
        log_weight: float = 1.0,
        mag_weight: float = 0.0,
    ):
        if len(window_lengths) != len(n_mels):
            raise ValueError(f"{len(window_lengths)} window lengths but {len(n_mels)} mel sizes")
        mels = [MelSpectrogram(sample_rate, w, n) for w, n in zip(window_lengths, n_mels)]
        super().__init__(mels, clamp_eps, pow, log_weight, mag_weight)

    @property
    def mels(self) -> nn.ModuleList:
        return self.transforms


class MultiScaleSTFTLoss(_MultiScaleDistance):
    """Multi-scale STFT distance: :func:`spectral_distance` of magnitude STFTs (log of the squared
    magnitude plus linear magnitude), summed over scales. Logged in training; the "STFT distance"
    metric of the paper."""

    def __init__(
        self,
        window_lengths: Sequence[int] = (2048, 512),
        clamp_eps: float = 1e-5,
        pow: float = 2.0,
        log_weight: float = 1.0,
        mag_weight: float = 1.0,
    ):
        super().__init__([Spectrogram(w) for w in window_lengths], clamp_eps, pow, log_weight, mag_weight)


class ComplexSTFTLoss(nn.Module):
    """Multi-resolution power-law compressed complex STFT loss (Wilson et al. 2018, as the efficient
    speech codec uses it): a loss that sees phase, which the mel and magnitude distances do not.

    For each window length ``w`` (hann, hop ``w / 4``, centered), the STFT ``S`` is scaled by the
    window's sum (a full-scale sinusoid has magnitude about 0.5 whatever ``w``) and compressed with its
    phase kept: ``C = |S|^pow * S / |S|``. Per resolution, ``mag_weight * MSE(|C_x|, |C_y|) + MSE(C_x, C_y)``
    (the complex MSE over real and imaginary parts); the mean over resolutions is returned, so the
    weight in a config does not depend on how many there are. ``eps`` keeps the compression's
    gradient finite at zero magnitude. Computed in float32 with autocast off.
    """

    def __init__(self, window_lengths: Sequence[int] = (2048, 512, 128), pow: float = 0.3, mag_weight: float = 1.0,
                 eps: float = 1e-8):
        super().__init__()
        if not window_lengths or min(window_lengths) < 4:
            raise ValueError(f"complex STFT loss: window lengths must be at least 4, got {list(window_lengths)}")
        if not 0 < pow <= 1:
            raise ValueError(f"complex STFT loss: pow must be in (0, 1], got {pow}")
        self.window_lengths = [int(w) for w in window_lengths]
        self.pow, self.mag_weight, self.eps = float(pow), float(mag_weight), float(eps)
        for w in self.window_lengths:
            self.register_buffer(f"window_{w}", torch.hann_window(w), persistent=False)

    def compressed(self, audio: torch.Tensor, window_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, T]`` -> (compressed complex STFT, its magnitude), ``[B * C, w // 2 + 1, 1 + T // (w // 4)]``
        (complex64, float32)."""
        window = getattr(self, f"window_{window_length}")
        spec = torch.stft(audio.float().reshape(-1, audio.shape[-1]), n_fft=window_length,
                          hop_length=window_length // 4, window=window, center=True, pad_mode="reflect",
                          return_complex=True) / window.sum()
        power = spec.real.square() + spec.imag.square() + self.eps
        return spec * power.pow((self.pow - 1) / 2), power.pow(self.pow / 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Estimate ``x`` and reference ``y``, both ``[B, C, T]`` -> scalar."""
        terms = []
        with torch.autocast(x.device.type, enabled=False):
            for w in self.window_lengths:
                (cx, mx), (cy, my) = self.compressed(x, w), self.compressed(y, w)
                complex_mse = F.mse_loss(torch.view_as_real(cx), torch.view_as_real(cy)) * 2  # |a - b|^2 per bin
                terms.append(self.mag_weight * F.mse_loss(mx, my) + complex_mse)
        return torch.stack(terms).mean()


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant SDR in dB per item, after removing each item's mean. ``[B, ...]`` -> ``[B]``.

    ``eps`` keeps silence and exact matches finite (an exact match gives about ``10 log10(energy / eps)``).
    """
    with torch.autocast(estimate.device.type, enabled=False):
        est = estimate.float().flatten(1)
        ref = reference.float().flatten(1)
        est = est - est.mean(dim=-1, keepdim=True)
        ref = ref - ref.mean(dim=-1, keepdim=True)
        scale = (est * ref).sum(dim=-1, keepdim=True) / (ref.pow(2).sum(dim=-1, keepdim=True) + eps)
        target = scale * ref
        residual = est - target
        return 10 * torch.log10((target.pow(2).sum(dim=-1) + eps) / (residual.pow(2).sum(dim=-1) + eps))

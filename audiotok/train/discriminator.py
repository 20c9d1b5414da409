"""The Improved RVQGAN discriminator: multi-period (MPD), multi-scale waveform (MSD) and multi-band
multi-resolution complex STFT (MRD) sub-discriminators behind one shared input normalization.

Every sub-discriminator returns its feature maps: the output of each layer, the last one being the
logit map that the least-squares GAN losses score. Module names (``convs``, ``band_convs``,
``conv_post``) and the order of the sub-discriminators follow the reference (descript ``dac``).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

FeatureMaps = list[torch.Tensor]
Bands = Sequence[Sequence[float]]  # (low, high) fractions of the STFT bins

#: MRD frequency bands as fractions of the STFT bins (final models).
BANDS: tuple[tuple[float, float], ...] = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))

LRELU_SLOPE = 0.1

#: The paper's MPD conv widths (the reference's); the last is also the post conv's input.
MPD_CHANNELS: tuple[int, ...] = (32, 128, 512, 1024, 1024)
#: The paper's MRD conv width (every band conv).
MRD_CHANNELS = 32


def _wn(conv: nn.Module) -> nn.Module:
    """Weight norm (dim 0) on a conv with PyTorch's default init, as in the reference discriminator."""
    return weight_norm(conv, dim=0)


def _stack(convs: nn.ModuleList, conv_post: nn.Module, x: torch.Tensor) -> FeatureMaps:
    """Conv + LeakyReLU for each of ``convs``, then ``conv_post``; returns every layer's output."""
    fmaps = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        fmaps.append(x)
    fmaps.append(conv_post(x))
    return fmaps


def preprocess(audio: torch.Tensor) -> torch.Tensor:
    """Remove the DC offset and peak-normalize each item to 0.8. ``[B, C, T]`` -> ``[B, C, T]``."""
    audio = audio - audio.mean(dim=-1, keepdim=True)
    return 0.8 * audio / (audio.abs().amax(dim=-1, keepdim=True) + 1e-9)


class MPD(nn.Module):
    """Period discriminator: the waveform folded into ``[B, 1, T/p, p]`` (p = period), then 2-D convs
    with ``(k, 1)`` kernels that see every p-th sample. Input ``[B, 1, T]``."""

    def __init__(self, period: int, channels: Sequence[int] = MPD_CHANNELS):
        super().__init__()
        self.period = period
        widths = [1, *channels]
        strides = [3] * (len(channels) - 1) + [1]  # the last conv keeps the time resolution
        self.convs = nn.ModuleList(
            _wn(nn.Conv2d(c_in, c_out, (5, 1), (s, 1), padding=(2, 0)))
            for c_in, c_out, s in zip(widths, widths[1:], strides)
        )
        self.conv_post = _wn(nn.Conv2d(widths[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, audio: torch.Tensor) -> FeatureMaps:
        """``[B, 1, T]`` -> feature maps ``[B, C, ~T/p/3^k, p]``; logits ``[B, 1, ~T/p/81, p]``.

        Reflect-pads by ``p - T % p`` (a whole period when ``p`` divides ``T``, as the reference does).
        """
        x = F.pad(audio, (0, self.period - audio.shape[-1] % self.period), mode="reflect")
        x = x.unflatten(-1, (-1, self.period))  # [B, 1, T // p + 1, p]
        return _stack(self.convs, self.conv_post, x)


class SincResample(nn.Module):
    """Band-limited resampling by a windowed-sinc FIR (Julius O. Smith's method, same kernels and
    edge handling as ``julius.resample_frac``, which the reference MSD uses). ``[..., T]`` ->
    ``[..., floor(T * new_sr / old_sr)]``."""

    def __init__(self, old_sr: int, new_sr: int, zeros: int = 24, rolloff: float = 0.945):
        super().__init__()
        gcd = math.gcd(old_sr, new_sr)
        self.old_sr, self.new_sr = old_sr // gcd, new_sr // gcd
        cutoff = min(self.old_sr, self.new_sr) * rolloff
        self.width = math.ceil(zeros * self.old_sr / cutoff)
        idx = torch.arange(-self.width, self.width + self.old_sr, dtype=torch.float32)
        phase = torch.arange(self.new_sr, dtype=torch.float32)[:, None] / self.new_sr
        t = ((idx / self.old_sr - phase) * cutoff).clamp(-zeros, zeros) * math.pi
        kernel = torch.sinc(t / math.pi) * torch.cos(t / zeros / 2) ** 2
        kernel = kernel / kernel.sum(dim=-1, keepdim=True)  # a constant stays constant
        self.kernel: torch.Tensor
        self.register_buffer("kernel", kernel[:, None, :], persistent=False)  # [new_sr, 1, K]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        y = F.pad(x.reshape(-1, 1, length), (self.width, self.width + self.old_sr), mode="replicate")
        y = F.conv1d(y, self.kernel, stride=self.old_sr)  # [N, new_sr, T/old_sr]
        y = y.transpose(1, 2).reshape(*x.shape[:-1], -1)
        return y[..., : self.new_sr * length // self.old_sr]


class MSD(nn.Module):
    """Waveform discriminator (MelGAN / HiFi-GAN scale discriminator) on audio resampled from
    ``sample_rate`` to ``sample_rate // rate`` (rate 1: the waveform as is). Input ``[B, 1, T]``."""

    def __init__(self, rate: int = 1, sample_rate: int = 44100):
        super().__init__()
        self.rate = rate
        self.resample = SincResample(sample_rate, sample_rate // rate) if rate != 1 else nn.Identity()
        self.convs = nn.ModuleList(
            [
                _wn(nn.Conv1d(1, 16, 15, 1, padding=7)),
                _wn(nn.Conv1d(16, 64, 41, 4, groups=4, padding=20)),
                _wn(nn.Conv1d(64, 256, 41, 4, groups=16, padding=20)),
                _wn(nn.Conv1d(256, 1024, 41, 4, groups=64, padding=20)),
                _wn(nn.Conv1d(1024, 1024, 41, 4, groups=256, padding=20)),
                _wn(nn.Conv1d(1024, 1024, 5, 1, padding=2)),
            ]
        )
        self.conv_post = _wn(nn.Conv1d(1024, 1, 3, 1, padding=1))

    def forward(self, audio: torch.Tensor) -> FeatureMaps:
        """``[B, 1, T]`` -> feature maps ``[B, C, ~T/rate/4^k]``; logits ``[B, 1, ~T/rate/256]``."""
        return _stack(self.convs, self.conv_post, self.resample(audio))


def _band_convs(channels: int = MRD_CHANNELS) -> nn.ModuleList:
    """One MRD band's convs on ``[B, 2, frames, bins]``: frequency strided by 8 in all, time kept."""
    return nn.ModuleList(
        [
            _wn(nn.Conv2d(2, channels, (3, 9), (1, 1), padding=(1, 4))),
            _wn(nn.Conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4))),
            _wn(nn.Conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4))),
            _wn(nn.Conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4))),
            _wn(nn.Conv2d(channels, channels, (3, 3), (1, 1), padding=(1, 1))),
        ]
    )


class MRD(nn.Module):
    """Multi-band complex STFT discriminator for one window length (hann, hop = window / 4).

    The spectrogram is ``[B, 2, frames, bins]`` (real and imaginary parts as channels), with exactly
    ``ceil(T / hop)`` frames (the reference's ``match_stride`` framing). Its frequency axis is cut
    into ``bands`` (fractions of the ``window // 2 + 1`` bins, truncated to ints); each band has its
    own convs; their outputs are concatenated along frequency for a shared post conv.
    """

    def __init__(self, window_length: int, bands: Bands = BANDS, channels: int = MRD_CHANNELS):
        super().__init__()
        self.window_length = window_length
        self.hop_length = window_length // 4
        n_bins = window_length // 2 + 1
        self.bands = [(int(lo * n_bins), int(hi * n_bins)) for lo, hi in bands]
        self.window: torch.Tensor
        self.register_buffer("window", torch.hann_window(window_length), persistent=False)
        self.band_convs = nn.ModuleList(_band_convs(channels) for _ in self.bands)
        self.conv_post = _wn(nn.Conv2d(channels, 1, (3, 3), (1, 1), padding=(1, 1)))

    def spectrogram(self, audio: torch.Tensor) -> torch.Tensor:
        """``[B, 1, T]`` -> complex STFT as float32 ``[B, 2, ceil(T / hop), window // 2 + 1]``.

        Reflect-pads by ``(window - hop) / 2`` each side (plus up to a multiple of hop on the
        right), runs a centered STFT and drops its two outer frames on each side.
        """
        length = audio.shape[-1]
        pad = (self.window_length - self.hop_length) // 2
        with torch.autocast(audio.device.type, enabled=False):
            x = F.pad(audio.float(), (pad, pad + (-length % self.hop_length)), mode="reflect")
            spec = torch.stft(
                x.flatten(0, 1),
                n_fft=self.window_length,
                hop_length=self.hop_length,
                window=self.window,
                center=True,
                return_complex=True,
            )  # [B, bins, frames + 4]
        return torch.view_as_real(spec[..., 2:-2]).permute(0, 3, 2, 1)

    def forward(self, audio: torch.Tensor) -> FeatureMaps:
        """``[B, 1, T]`` -> feature maps ``[B, channels, frames, band_bins / 8^k]``, band after band;
        logits ``[B, 1, frames, sum of the bands' strided widths]``."""
        spec = self.spectrogram(audio)
        fmaps, outputs = [], []
        for (lo, hi), convs in zip(self.bands, self.band_convs):
            x = spec[..., lo:hi]
            for conv in typing.cast(nn.ModuleList, convs):
                x = F.leaky_relu(conv(x), LRELU_SLOPE)
                fmaps.append(x)
            outputs.append(x)
        fmaps.append(self.conv_post(torch.cat(outputs, dim=-1)))
        return fmaps


class Discriminator(nn.Module):
    """All sub-discriminators in one ``ModuleList``: MPD per period, MSD per rate, MRD per window.

    Any family may be empty (paper ablations: ``periods=(), msd_rates=(1,)`` for no-mpd;
    ``periods=()`` for no-mpd-msd; ``bands=((0.0, 1.0),)`` for no-mb). ``mpd_channels`` and
    ``mrd_channels`` set the MPD and MRD conv widths (the paper's by default; narrower ones make a
    CPU-affordable GAN stage, ``recipes/configs/default-cpu-gan.yml``).
    """

    def __init__(
        self,
        sample_rate: int,
        periods: Sequence[int] = (2, 3, 5, 7, 11),
        fft_sizes: Sequence[int] = (2048, 1024, 512),
        bands: Bands = BANDS,
        msd_rates: Sequence[int] = (),
        mpd_channels: Sequence[int] = MPD_CHANNELS,
        mrd_channels: int = MRD_CHANNELS,
    ):
        super().__init__()
        self.sample_rate = sample_rate
        self.discriminators = nn.ModuleList(
            [MPD(p, mpd_channels) for p in periods]
            + [MSD(r, sample_rate) for r in msd_rates]
            + [MRD(w, bands, mrd_channels) for w in fft_sizes]
        )

    def forward(self, audio: torch.Tensor) -> list[FeatureMaps]:
        """``[B, 1, T]`` -> feature maps of each sub-discriminator (in ``self.discriminators`` order)."""
        audio = preprocess(audio)
        return [disc(audio) for disc in self.discriminators]

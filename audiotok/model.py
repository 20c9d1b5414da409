"""The Improved RVQGAN generator: convolutional encoder, residual VQ, convolutional decoder.

Module names follow ``transformers.DacModel`` so that folded weights load either way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import DACConfig
from .layers import Snake1d, fold_weight_norm, has_weight_norm, wn_conv1d, wn_conv_transpose1d
from .quantize import QuantizerOutput, ResidualVectorQuantize


class ResidualUnit(nn.Module):
    """Snake, dilated conv k7, Snake, conv k1, plus the input. ``[B, C, T]`` -> ``[B, C, T]``."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.snake1 = Snake1d(channels)
        self.conv1 = wn_conv1d(channels, channels, kernel_size=7, dilation=dilation, padding=3 * dilation)
        self.snake2 = Snake1d(channels)
        self.conv2 = wn_conv1d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.snake2(self.conv1(self.snake1(x))))
        crop = (x.shape[-1] - y.shape[-1]) // 2
        if crop > 0:
            x = x[..., crop:-crop]
        return x + y


class EncoderBlock(nn.Module):
    """Residual units at ``dim // 2`` channels, then a strided conv to ``dim``.

    ``[B, dim/2, T]`` -> ``[B, dim, T / stride]``.
    """

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.res_unit1 = ResidualUnit(dim // 2, 1)
        self.res_unit2 = ResidualUnit(dim // 2, 3)
        self.res_unit3 = ResidualUnit(dim // 2, 9)
        self.snake1 = Snake1d(dim // 2)
        self.conv1 = wn_conv1d(dim // 2, dim, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res_unit3(self.res_unit2(self.res_unit1(x)))
        return self.conv1(self.snake1(x))


class Encoder(nn.Module):
    """Waveform ``[B, 1, T]`` (T a multiple of the hop) -> latents ``[B, latent_dim, T / hop]``."""

    def __init__(self, dim: int, rates: list[int], latent_dim: int):
        super().__init__()
        self.conv1 = wn_conv1d(1, dim, kernel_size=7, padding=3)
        blocks = []
        for stride in rates:
            dim *= 2
            blocks.append(EncoderBlock(dim, stride))
        self.block = nn.ModuleList(blocks)
        self.snake1 = Snake1d(dim)
        self.conv2 = wn_conv1d(dim, latent_dim, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.block:
            x = block(x)
        return self.conv2(self.snake1(x))


class DecoderBlock(nn.Module):
    """Snake, transposed conv upsampling by ``stride``, residual units.

    ``[B, in_dim, F]`` -> ``[B, out_dim, F * stride]``. ``output_padding = stride % 2`` makes the
    length exact for odd strides (the reference loses one sample per odd stage).
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int):
        super().__init__()
        self.snake1 = Snake1d(in_dim)
        self.conv_t1 = wn_conv_transpose1d(
            in_dim, out_dim, kernel_size=2 * stride, stride=stride,
            padding=math.ceil(stride / 2), output_padding=stride % 2,
        )
        self.res_unit1 = ResidualUnit(out_dim, 1)
        self.res_unit2 = ResidualUnit(out_dim, 3)
        self.res_unit3 = ResidualUnit(out_dim, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_t1(self.snake1(x))
        return self.res_unit3(self.res_unit2(self.res_unit1(x)))


class Decoder(nn.Module):
    """Latents ``[B, latent_dim, F]`` -> waveform ``[B, 1, F * hop]`` in (-1, 1)."""

    def __init__(self, latent_dim: int, dim: int, rates: list[int]):
        super().__init__()
        self.conv1 = wn_conv1d(latent_dim, dim, kernel_size=7, padding=3)
        blocks = []
        for stride in rates:
            blocks.append(DecoderBlock(dim, dim // 2, stride))
            dim //= 2
        self.block = nn.ModuleList(blocks)
        self.snake1 = Snake1d(dim)
        self.conv2 = wn_conv1d(dim, 1, kernel_size=7, padding=3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)
        for block in self.block:
            x = block(x)
        return torch.tanh(self.conv2(self.snake1(x)))


class DAC(nn.Module):
    """The Improved RVQGAN generator.

    Built with trainable weight-norm parametrizations; call :meth:`fold_weight_norm` for inference.
    """

    def __init__(self, config: DACConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder_dim, config.encoder_rates, config.latent_dim)
        self.quantizer = ResidualVectorQuantize(
            config.latent_dim, config.n_codebooks, config.codebook_size, config.codebook_dim,
            config.quantizer_dropout,
        )
        self.decoder = Decoder(config.latent_dim, config.decoder_dim, config.decoder_rates)

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def is_folded(self) -> bool:
        """True when weights are plain tensors (inference form), False while weight norm is trainable."""
        return not has_weight_norm(self)

    def fold_weight_norm(self) -> DAC:
        """Fold every weight-norm parametrization into a plain weight, in place."""
        fold_weight_norm(self)
        return self

    def pad(self, audio: torch.Tensor) -> torch.Tensor:
        """Right-pad ``[B, 1, T]`` with zeros to a multiple of the hop length."""
        return F.pad(audio, (0, -audio.shape[-1] % self.hop_length))

    def encode(self, audio: torch.Tensor, n_quantizers: int | None = None) -> QuantizerOutput:
        """audio ``[B, 1, T]`` -> quantizer output with codes ``[B, K, ceil(T / hop)]``."""
        return self.quantizer(self.encoder(self.pad(audio)), n_quantizers)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Quantized latents ``[B, D, F]`` -> audio ``[B, 1, F * hop]``."""
        return self.decoder(z)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[B, K, F]`` (first K codebooks) -> audio ``[B, 1, F * hop]``."""
        return self.decoder(self.quantizer.from_codes(codes))

    def forward(self, audio: torch.Tensor, n_quantizers: int | None = None) -> tuple[torch.Tensor, QuantizerOutput]:
        """Reconstruct ``[B, 1, T]`` -> (audio ``[B, 1, T]``, quantizer output)."""
        q = self.encode(audio, n_quantizers)
        return self.decode(q.z)[..., : audio.shape[-1]], q

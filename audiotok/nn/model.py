"""The Improved RVQGAN generator: convolutional encoder, residual VQ, convolutional decoder.

Module names follow ``transformers.DacModel`` so that folded weights load either way.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import DACConfig
from .layers import Snake1d, fold_weight_norm, has_weight_norm, pointwise_conv, wn_conv1d, wn_conv_transpose1d
from .quantize import QuantizerOutput, ResidualVectorQuantize

Lengths = list[int] | None


def zero_tail(x: torch.Tensor, lengths: Lengths) -> torch.Tensor:
    """Zero ``x[b, :, lengths[b]:]`` for every item: activations past an item's end stay zero, so a
    padded batch computes exactly what each item computes alone (where convs pad with zeros)."""
    if lengths is None:
        return x
    if x.requires_grad:
        mask = torch.arange(x.shape[-1], device=x.device) < torch.tensor(lengths, device=x.device)[:, None]
        return x * mask[:, None, :]
    for b, n in enumerate(lengths):
        if n < x.shape[-1]:
            x[b, :, n:] = 0
    return x


def _scale(lengths: Lengths, num: int, den: int = 1) -> Lengths:
    return None if lengths is None else [n * num // den for n in lengths]


class ResidualUnit(nn.Module):
    """Snake, dilated conv k7, Snake, conv k1, plus the input. ``[B, C, T]`` -> ``[B, C, T]``.

    With ``lengths`` (valid samples per item), activations past each item's end are kept at zero.
    """

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.snake1 = Snake1d(channels)
        self.conv1 = wn_conv1d(channels, channels, kernel_size=7, dilation=dilation, padding=3 * dilation)
        self.snake2 = Snake1d(channels)
        self.conv2 = wn_conv1d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, lengths: Lengths = None) -> torch.Tensor:
        h = self.snake1(x)
        y = zero_tail(self.conv1(h), lengths)
        # Without autograd (or autocast) the second half writes into the spent buffers h and y: on
        # CPU, fresh memory costs a page fault per 4 KiB (the same values; 4 to 6% of the time).
        spent = not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
        h = self.snake2(y, out=h if spent else None)
        y = zero_tail(pointwise_conv(self.conv2, h, out=y if spent else None), lengths)
        return y.add_(x)  # y is this unit's own buffer; x + y would take fresh memory


class EncoderBlock(nn.Module):
    """Residual units at ``dim // 2`` channels, then a strided conv to ``dim``.

    ``[B, dim/2, T]`` -> ``[B, dim, T / stride]``.
    """

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.stride = stride
        self.res_unit1 = ResidualUnit(dim // 2, 1)
        self.res_unit2 = ResidualUnit(dim // 2, 3)
        self.res_unit3 = ResidualUnit(dim // 2, 9)
        self.snake1 = Snake1d(dim // 2)
        self.conv1 = wn_conv1d(dim // 2, dim, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2))

    def forward(self, x: torch.Tensor, lengths: Lengths = None) -> torch.Tensor:
        for unit in (self.res_unit1, self.res_unit2, self.res_unit3):
            x = unit(x, lengths)
        return zero_tail(self.conv1(self.snake1(x)), _scale(lengths, 1, self.stride))


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
        self.strides = list(rates)
        self.snake1 = Snake1d(dim)
        self.conv2 = wn_conv1d(dim, latent_dim, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, lengths: Lengths = None) -> torch.Tensor:
        """``lengths``: valid samples per item (multiples of the hop); padding stays out of every item."""
        x = zero_tail(self.conv1(x), lengths)
        for block, stride in zip(self.block, self.strides):
            x = block(x, lengths)
            lengths = _scale(lengths, 1, stride)
        return zero_tail(self.conv2(self.snake1(x)), lengths)


class DecoderBlock(nn.Module):
    """Snake, transposed conv upsampling by ``stride``, residual units.

    ``[B, in_dim, F]`` -> ``[B, out_dim, F * stride]``. The reference loses one sample per odd-stride
    stage; ``output_padding = 1`` makes the length exact for odd strides above 1, and for stride 1
    (where output_padding is not allowed) one zero input frame does the same.
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extend = stride == 1
        self.snake1 = Snake1d(in_dim)
        self.conv_t1 = wn_conv_transpose1d(
            in_dim, out_dim, kernel_size=2 * stride, stride=stride,
            padding=math.ceil(stride / 2), output_padding=int(stride > 1 and stride % 2 == 1),
        )
        self.res_unit1 = ResidualUnit(out_dim, 1)
        self.res_unit2 = ResidualUnit(out_dim, 3)
        self.res_unit3 = ResidualUnit(out_dim, 9)

    def forward(self, x: torch.Tensor, lengths: Lengths = None) -> torch.Tensor:
        """``lengths``: valid input positions per item."""
        lengths = _scale(lengths, self.stride)
        x = self.snake1(x)
        if self.extend:
            x = F.pad(x, (0, 1))
        x = zero_tail(self.conv_t1(x), lengths)
        for unit in (self.res_unit1, self.res_unit2, self.res_unit3):
            x = unit(x, lengths)
        return x


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
        self.strides = list(rates)
        self.snake1 = Snake1d(dim)
        self.conv2 = wn_conv1d(dim, 1, kernel_size=7, padding=3)

    def float32_tail(self) -> list[nn.Module]:
        """The modules that always compute in float32: the last (highest-rate) block and the output.

        With bf16 there, rounding adds a noise floor to the waveform (about -50 dB under the
        signal) that the mel loss sees in every quiet band: on the default model, bf16 everywhere
        gives mel distance 2.36 against float32's 1.65; a float32 tail gives 1.69 for ~15% of
        the decoder's FLOPs.
        """
        return [self.block[-1], self.snake1, self.conv2]

    def forward(self, z: torch.Tensor, lengths: Lengths = None) -> torch.Tensor:
        """``lengths``: valid frames per item; padding frames never reach an item's samples. Under
        autocast or with a half-precision decoder, the :meth:`float32_tail` stays in float32 (the
        caller keeps its weights float32)."""
        x = zero_tail(self.conv1(zero_tail(z, lengths)), lengths)
        *body, last = self.block
        for block, stride in zip(body, self.strides):
            x = block(x, lengths)
            lengths = _scale(lengths, stride)
        with torch.autocast(x.device.type, enabled=False):
            x = last(x.to(next(self.conv2.parameters()).dtype), lengths)
            return torch.tanh(self.conv2(self.snake1(x)))


class DAC(nn.Module):
    """The Improved RVQGAN generator.

    Built with trainable weight-norm parametrizations; call :meth:`fold_weight_norm` for inference.
    """

    def __init__(self, config: DACConfig):
        super().__init__()
        self.config = config
        assert config.latent_dim is not None  # DACConfig fills it in
        self.encoder = Encoder(config.encoder_dim, config.encoder_rates, config.latent_dim)
        self.quantizer = ResidualVectorQuantize(
            config.latent_dim, config.n_codebooks, config.codebook_size, config.codebook_dim,
            config.quantizer_dropout,
        )
        self.decoder = Decoder(config.latent_dim, config.decoder_dim, config.decoder_rates)

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @functools.cached_property
    def context_frames(self) -> dict[str, tuple[int, int]]:
        """Frames of context (left, right) that the encoder and decoder need around a span of frames
        for its codes / samples to equal those of the whole signal (read from the built convolutions
        once: a built model's geometry does not change)."""
        hop = self.hop_length
        lo, hi = input_span(self.encoder, 0, 0)  # samples feeding frame 0
        encoder = (-(lo // hop), -(-(hi - hop + 1) // hop))
        lo, hi = input_span(self.decoder, 0, hop - 1)  # frames feeding frame 0's samples
        return {"encoder": encoder, "decoder": (max(0, -lo), max(0, hi))}

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

    def encode(self, audio: torch.Tensor, n_quantizers: int | None = None, lengths: Lengths = None) -> QuantizerOutput:
        """audio ``[B, 1, T]`` -> quantizer output with codes ``[B, K, ceil(T / hop)]``.

        ``lengths``: valid samples per item of a padded batch; each item then gets the codes it gets
        alone (frames past ``ceil(lengths[b] / hop)`` are padding).
        """
        if lengths is not None:  # each item is padded to whole frames, as it is when encoded alone
            lengths = [-(-n // self.hop_length) * self.hop_length for n in lengths]
        return self.quantizer(self.encoder(self.pad(audio), lengths), n_quantizers)

    def decode(self, z: torch.Tensor, lengths: Lengths = None) -> torch.Tensor:
        """Quantized latents ``[B, D, F]`` -> audio ``[B, 1, F * hop]``; ``lengths``: valid frames per item.

        ``z`` is cast to the decoder's dtype, which may differ from the encoder's (codes depend on the
        encoder and quantizer only)."""
        return self.decoder(z.to(self.decoder.conv1.weight.dtype), lengths)

    def decode_codes(self, codes: torch.Tensor, lengths: Lengths = None) -> torch.Tensor:
        """codes ``[B, K, F]`` (first K codebooks) -> audio ``[B, 1, F * hop]``; ``lengths``: valid frames."""
        return self.decode(self.quantizer.from_codes(codes), lengths)

    def forward(self, audio: torch.Tensor, n_quantizers: int | None = None) -> tuple[torch.Tensor, QuantizerOutput]:
        """Reconstruct ``[B, 1, T]`` -> (audio ``[B, 1, T]``, quantizer output)."""
        q = self.encode(audio, n_quantizers)
        return self.decode(q.z)[..., : audio.shape[-1]], q


# ---------------------------------------------------------------------------------------------
# Receptive fields, for exact chunked encoding and decoding, read from the built convolutions


def input_span(stack: nn.Module, lo: int, hi: int) -> tuple[int, int]:
    """Input positions that outputs ``lo..hi`` of a conv stack (:class:`Encoder`, :class:`Decoder`)
    depend on. The stack's convolutions apply in the order they are registered; residual paths are
    covered, as each unit's conv path spans its identity path."""
    convs = [m for m in stack.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]
    for conv in reversed(convs):
        assert not isinstance(conv.padding, str)  # built with integer padding
        (k,), (s,), (d,), (p,) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
        if isinstance(conv, nn.ConvTranspose1d):  # output o receives input i when o = i * s - p + j * d, 0 <= j < k
            lo, hi = -((-(lo + p - (k - 1) * d)) // s), (hi + p) // s
        else:
            lo, hi = lo * s - p, hi * s - p + (k - 1) * d
    return lo, hi

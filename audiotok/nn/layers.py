"""Building blocks: Snake activation and weight-normalized convolutions."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

logger = logging.getLogger(__name__)


def snake(x: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x + 1/(alpha + 1e-9) * sin(alpha * x)**2``; x ``[B, C, T]``, alpha ``[1, C, 1]``.

    Same operation order as the reference implementations, so eager results match them bit for bit.
    Without autograd (inference), the same operations run in place on one buffer: bit-identical, and
    about 1.4x faster on CPU, where Snake's passes over memory are half the encoder's time. That
    buffer is ``out`` when given (a spent tensor of x's shape, overwritten), else a new one in the
    layout of ``x``: on CPU, fresh memory costs a page fault per 4 KiB written.
    """
    if torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad):
        return _snake_expression(x, alpha)
    out = torch.mul(alpha, x, out=out)
    return out.sin_().pow_(2).mul_((alpha + 1e-9).reciprocal()).add_(x)


def _snake_expression(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)


@functools.cache
def fused_snake() -> Callable[..., torch.Tensor]:
    """:func:`snake` compiled by Inductor into one pointwise kernel (one read, one write) for any
    shape: ``(x, alpha, out=None)``, writing into ``out`` when given (not with autograd). Eager Snake
    makes five passes over memory; it is about half the encoder's CPU time."""

    def fused(x: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = _snake_expression(x, alpha)
        return y if out is None else out.copy_(y)

    return torch.compile(fused, dynamic=True)


FUSED_SNAKE_MIN_ELEMENTS = 1 << 18
"""Activations smaller than this stay eager under :func:`use_fused_snake`: a compiled call has a fixed
cost (Dynamo's guards and Inductor's wrapper, about 0.1 ms on a 2-core Xeon) that fusing saves back
only from about 150,000 elements on (eager 0.11 ms and compiled 0.17 ms at 35,000 elements, 1.56 and
1.09 ms at 706,000). Fusing every Snake made ``compile=True`` slower than eager for the ``tiny-*``
presets; the 44.1 kHz model's activations are all larger at 10 s clips."""


class Snake1d(nn.Module):
    """Snake activation with one alpha per channel. Input and output: ``[B, C, T]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))
        self.fused = False

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out``: a spent tensor of x's shape that inference may overwrite with the result (see :func:`snake`)."""
        if self.fused and x.numel() >= FUSED_SNAKE_MIN_ELEMENTS:
            # Inference writes into ``out``, or fresh memory of x's layout, as eager Snake does: the
            # kernel then takes no more fresh buffers than eager mode (a fresh buffer per Snake gave
            # the 44.1 kHz decoder 32% more page faults, 5% of its time with two threads), and one
            # compiled graph serves every inference call of a layout.
            if out is None and not torch.is_grad_enabled():
                out = torch.empty_like(x)
            # A view, not the Parameter itself: Dynamo keeps parameter shapes static, which would
            # recompile the kernel for every channel count.
            return fused_snake()(x, self.alpha.view(self.alpha.shape), out)
        return snake(x, self.alpha, out)


def use_fused_snake(module: nn.Module, enabled: bool = True) -> None:
    """Switch every Snake below ``module`` to the compiled kernel for activations of at least
    :data:`FUSED_SNAKE_MIN_ELEMENTS` (needs a C++ compiler on CPU, Triton on CUDA; results then differ
    from eager in the last float bits)."""
    for sub in module.modules():
        if isinstance(sub, Snake1d):
            sub.fused = enabled


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512, or Arm's bf16 instructions)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def warn_if_cpu_bf16_is_slow(what: str, instead: str) -> None:
    """Warn (once per ``what``) that bf16 on this CPU is slow, and what to do ``instead``: without
    AVX-512 (or Arm's bf16), oneDNN has no bf16 kernels and convolutions fall back to a reference path,
    about 20x slower than fp32 for a ``[4, 64, 16000]`` kernel-7 Conv1d on one thread of a Zen 3 EPYC
    (``benchmarks/bench_cpu_bf16.py``: 20.7x and 22.3x in two runs)."""
    if not cpu_has_bf16_kernels():
        logger.warning("%s: bf16 on this CPU runs convolutions without native kernels (no AVX-512), about "
                       "20x slower than fp32; %s", what, instead)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """The values of ``x`` ``[B, C, T]``, stored as ``[B, T, C]`` (no copy when they already are)."""
    return x.mT.contiguous().mT


class Conv1d(nn.Conv1d):
    """``nn.Conv1d`` with a channels-last mode (:func:`use_channels_last`): input and output stored
    as ``[B, T, C]``, run as a 2-D convolution on ``[B, C, 1, T]`` in NHWC, oneDNN's native layout
    on CPU. That saves reordering the activations into and out of oneDNN's blocked layout (1.4 to
    1.5x faster for the 44.1 kHz decoder's 96 to 384 channel layers on a 2-core Xeon; slower below
    about 16 channels). Values equal the channels-first ones within float rounding, not bit for bit.
    Zero padding only.
    """

    channels_last = False

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.channels_last:
            return super()._conv_forward(input, weight, bias)
        return F.conv2d(to_channels_last(input).unsqueeze(2), weight.unsqueeze(2), bias, (1, self.stride[0]),
                        (0, cast(tuple[int], self.padding)[0]), (1, self.dilation[0]), self.groups).squeeze(2)


class ConvTranspose1d(nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with the channels-last mode of :class:`Conv1d` (1.2 to 3x faster for
    the 44.1 kHz decoder's upsampling layers on CPU)."""

    channels_last = False

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if not self.channels_last or output_size is not None:
            return super().forward(input, output_size)
        padding = cast(tuple[int], self.padding)[0]
        return F.conv_transpose2d(to_channels_last(input).unsqueeze(2), self.weight.unsqueeze(2), self.bias,
                                  (1, self.stride[0]), (0, padding), (0, self.output_padding[0]), self.groups,
                                  (1, self.dilation[0])).squeeze(2)


def use_channels_last(module: nn.Module, enabled: bool = True) -> None:
    """Switch every :class:`Conv1d` and :class:`ConvTranspose1d` below ``module`` to channels-last.

    Snake and the residual additions keep their input's layout, so a whole stack of these
    convolutions then runs channels-last, with one copy at its input."""
    for sub in module.modules():
        if isinstance(sub, (Conv1d, ConvTranspose1d)):
            sub.channels_last = enabled


def wn_conv1d(*args, **kwargs) -> Conv1d:
    """A ``Conv1d`` with a trainable weight-norm parametrization (g, v) on its weight.

    Initialised as the reference trains: PyTorch's default weights and a zero bias. (The reference
    calls ``trunc_normal_(std=0.02)`` after applying weight norm, which writes to a weight that the
    next forward recomputes from g and v, so it has no effect. Applying that init for real shrinks
    the encoder's output ~1000x at 32 channels; Adam then moves the biases past the signal within
    a few hundred steps and every codebook collapses to one code.)
    """
    conv = Conv1d(*args, **kwargs)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return weight_norm(conv, dim=0)


def wn_conv_transpose1d(*args, **kwargs) -> ConvTranspose1d:
    """A ``ConvTranspose1d`` with a trainable weight-norm parametrization on its weight; PyTorch's
    default init, bias included, as in the reference (its init touches ``Conv1d`` only)."""
    return weight_norm(ConvTranspose1d(*args, **kwargs), dim=0)


def pointwise_conv(conv: Conv1d, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A kernel-size-1 ``conv`` applied as one batched GEMM with the bias fused:
    ``[B, C, T]`` -> ``[B, O, T]``, written to ``out`` when given (not with autograd). On CPUs this is
    1.3 to 2.6x faster than the channels-first convolution path; as fast as the convolution in
    channels-last mode, whose layout it keeps."""
    if conv.bias is None:
        raise ValueError("pointwise_conv needs a convolution with a bias")
    weight = conv.weight[:, :, 0].expand(x.shape[0], -1, -1)
    if conv.channels_last:  # [B, T, C] @ [C, O] -> [B, T, O]
        out_t = None if out is None else out.mT
        return torch.baddbmm(conv.bias.to(x.dtype), to_channels_last(x).mT, weight.mT, out=out_t).mT
    return torch.baddbmm(conv.bias[None, :, None].to(x.dtype), weight, x, out=out)


def fold_weight_norm(module: nn.Module) -> nn.Module:
    """Replace every weight-norm parametrization below ``module`` by the plain weight it computes.

    After folding the state dict holds ``*.weight`` keys and the forward pass does no norm work.
    """
    for sub in module.modules():
        if parametrize.is_parametrized(sub, "weight"):
            parametrize.remove_parametrizations(sub, "weight", leave_parametrized=True)
    return module


def has_weight_norm(module: nn.Module) -> bool:
    return any(parametrize.is_parametrized(sub, "weight") for sub in module.modules())

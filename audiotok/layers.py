"""Building blocks: Snake activation and weight-normalized convolutions."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm


def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``x + 1/(alpha + 1e-9) * sin(alpha * x)**2``; x ``[B, C, T]``, alpha ``[1, C, 1]``.

    Same operation order as the reference implementations, so eager results match them bit for bit.
    Without autograd (inference), the same operations run in place on one buffer: bit-identical, and
    about 1.4x faster on CPU, where Snake's passes over memory are half the encoder's time.
    """
    if torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad):
        return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)
    out = torch.sin(alpha * x)
    return out.pow_(2).mul_((alpha + 1e-9).reciprocal()).add_(x)


@functools.cache
def fused_snake() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """:func:`snake` compiled by Inductor into one pointwise kernel (one read, one write) for any
    shape. Eager Snake makes five passes over memory; it is about half the encoder's CPU time."""
    return torch.compile(snake, dynamic=True)


class Snake1d(nn.Module):
    """Snake activation with one alpha per channel. Input and output: ``[B, C, T]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            # A view, not the Parameter itself: Dynamo keeps parameter shapes static, which would
            # recompile the kernel for every channel count.
            return fused_snake()(x, self.alpha.view(self.alpha.shape))
        return snake(x, self.alpha)


def use_fused_snake(module: nn.Module, enabled: bool = True) -> None:
    """Switch every Snake below ``module`` to the compiled kernel (needs a C++ compiler on CPU, Triton
    on CUDA; results then differ from eager in the last float bits)."""
    for sub in module.modules():
        if isinstance(sub, Snake1d):
            sub.fused = enabled


def wn_conv1d(*args, **kwargs) -> nn.Conv1d:
    """A ``Conv1d`` with a trainable weight-norm parametrization (g, v) on its weight.

    Initialised as the reference trains: PyTorch's default weights and a zero bias. (The reference
    calls ``trunc_normal_(std=0.02)`` after applying weight norm, which writes to a weight that the
    next forward recomputes from g and v, so it has no effect. Applying that init for real shrinks
    the encoder's output ~1000x at 32 channels; Adam then moves the biases past the signal within
    a few hundred steps and every codebook collapses to one code.)
    """
    conv = nn.Conv1d(*args, **kwargs)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return weight_norm(conv, dim=0)


def wn_conv_transpose1d(*args, **kwargs) -> nn.ConvTranspose1d:
    """A ``ConvTranspose1d`` with a trainable weight-norm parametrization on its weight; PyTorch's
    default init, bias included, as in the reference (its init touches ``Conv1d`` only)."""
    return weight_norm(nn.ConvTranspose1d(*args, **kwargs), dim=0)


def pointwise_conv(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-size-1 ``conv`` applied as one batched GEMM with the bias fused:
    ``[B, C, T]`` -> ``[B, O, T]``. On CPUs this is 1.3 to 2.6x faster than the convolution path."""
    if conv.bias is None:
        raise ValueError("pointwise_conv needs a convolution with a bias")
    weight = conv.weight[:, :, 0]
    return torch.baddbmm(conv.bias[None, :, None].to(x.dtype), weight.expand(x.shape[0], -1, -1), x)


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

"""Building blocks: Snake activation and weight-normalized convolutions."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm


class Snake1d(nn.Module):
    """Snake activation ``x + 1/(alpha + 1e-9) * sin(alpha * x)**2`` with one alpha per channel.

    Input and output: ``[B, C, T]``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same operation order as the reference implementations, so results match bit for bit.
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


def _init(conv: nn.Module) -> nn.Module:
    nn.init.trunc_normal_(conv.weight, std=0.02)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return weight_norm(conv, dim=0)


def wn_conv1d(*args, **kwargs) -> nn.Conv1d:
    """A ``Conv1d`` with a trainable weight-norm parametrization (g, v) on its weight."""
    return _init(nn.Conv1d(*args, **kwargs))


def wn_conv_transpose1d(*args, **kwargs) -> nn.ConvTranspose1d:
    """A ``ConvTranspose1d`` with a trainable weight-norm parametrization on its weight."""
    return _init(nn.ConvTranspose1d(*args, **kwargs))


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

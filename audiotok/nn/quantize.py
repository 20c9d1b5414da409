"""Residual vector quantizer with factorized, L2-normalized codes (Improved RVQGAN)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..codes import check_n_quantizers
from .layers import wn_conv1d


@dataclass
class QuantizerOutput:
    """Result of quantizing a latent sequence.

    Attributes:
        z: quantized latents after the output projections, ``[B, D, F]``.
        codes: code indices, ``[B, K, F]`` (K = stages run).
        latents: projected (pre-quantization) latents of every stage run, ``[B, K * codebook_dim, F]``.
        commitment_loss: scalar, averaged over the batch (dropped stages count as zero).
        codebook_loss: scalar, likewise.
    """

    z: torch.Tensor
    codes: torch.Tensor
    latents: torch.Tensor
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor


class VectorQuantize(nn.Module):
    """One stage: project to ``codebook_dim``, look up the nearest normalized code, project back."""

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.in_proj = wn_conv1d(input_dim, codebook_dim, kernel_size=1)
        self.out_proj = wn_conv1d(codebook_dim, input_dim, kernel_size=1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def lookup(self, latents: torch.Tensor) -> torch.Tensor:
        """Nearest code by euclidean distance between L2-normalized vectors.

        latents ``[B, d, F]`` -> codes ``[B, F]`` (int64).
        """
        b, d, f = latents.shape
        enc = F.normalize(latents.transpose(1, 2).reshape(b * f, d).float())
        cb = F.normalize(self.codebook.weight.float())
        # Written as in transformers.DacModel so that ties break identically.
        dist = -(enc.pow(2).sum(1, keepdim=True) - 2 * enc @ cb.t()) + cb.pow(2).sum(1, keepdim=True).t()
        return dist.max(1)[1].reshape(b, f)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[B, F]`` -> raw codebook vectors ``[B, codebook_dim, F]``."""
        return self.codebook(codes).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``[B, D, F]`` -> (out ``[B, D, F]``, codes ``[B, F]``, latents ``[B, d, F]``,
        commitment ``[B]``, codebook ``[B]``)."""
        latents = self.in_proj(x)
        codes = self.lookup(latents)
        quantized = self.embed(codes).to(latents.dtype)
        commitment = F.mse_loss(latents, quantized.detach(), reduction="none").mean([1, 2])
        codebook = F.mse_loss(quantized, latents.detach(), reduction="none").mean([1, 2])
        quantized = latents + (quantized - latents).detach()  # straight-through
        return self.out_proj(quantized), codes, latents, commitment, codebook


class ResidualVectorQuantize(nn.Module):
    """A stack of ``n_codebooks`` quantizers, each coding the residual of the ones before.

    In training, a fraction ``quantizer_dropout`` of the batch items is coded with a random
    depth in ``1..n`` (n = ``n_quantizers`` if given, else all codebooks); the others use n.
    In eval mode every item uses n and only the first n stages run.
    """

    def __init__(self, input_dim: int, n_codebooks: int, codebook_size: int, codebook_dim: int,
                 quantizer_dropout: float = 0.0):
        super().__init__()
        self.n_codebooks = n_codebooks
        self.quantizer_dropout = quantizer_dropout
        self.quantizers = nn.ModuleList(
            VectorQuantize(input_dim, codebook_size, codebook_dim) for _ in range(n_codebooks)
        )

    def _check_depth(self, n_quantizers: int | None) -> int:
        return check_n_quantizers(n_quantizers, self.n_codebooks)

    def forward(self, x: torch.Tensor, n_quantizers: int | None = None) -> QuantizerOutput:
        """x ``[B, D, F]`` -> :class:`QuantizerOutput`."""
        n = self._check_depth(n_quantizers)
        batch = x.shape[0]
        depth = None
        if self.training and self.quantizer_dropout > 0:
            depth = torch.full((batch,), n, device=x.device)
            n_drop = int(batch * self.quantizer_dropout)
            depth[:n_drop] = torch.randint(1, n + 1, (n_drop,), device=x.device)

        z = torch.zeros_like(x)
        residual = x
        codes, latents = [], []
        commitment = x.new_zeros(batch)
        codebook = x.new_zeros(batch)
        for i in range(n):
            out, codes_i, latents_i, commitment_i, codebook_i = self.quantizers[i](residual)
            if depth is None:
                z = z + out
            else:
                mask = (i < depth).to(out.dtype)
                z = z + out * mask[:, None, None]
                commitment_i = commitment_i * mask
                codebook_i = codebook_i * mask
            residual = residual - out
            commitment = commitment + commitment_i
            codebook = codebook + codebook_i
            codes.append(codes_i)
            latents.append(latents_i)
        return QuantizerOutput(
            z=z,
            codes=torch.stack(codes, dim=1),
            latents=torch.cat(latents, dim=1),
            commitment_loss=commitment.mean(),
            codebook_loss=codebook.mean(),
        )

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[B, K, F]`` (K <= n_codebooks) -> quantized latents ``[B, D, F]``."""
        z = torch.zeros(())  # a 0-dim zero: adds like the scalar 0.0 on any device and dtype
        for i in range(codes.shape[1]):
            quantizer = cast(VectorQuantize, self.quantizers[i])
            z = z + quantizer.out_proj(quantizer.embed(codes[:, i]))
        return z

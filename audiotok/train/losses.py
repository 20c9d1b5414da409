"""The least-squares GAN losses of the Improved RVQGAN (the spectral losses are in :mod:`audiotok.nn.distances`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .discriminator import FeatureMaps


def discriminator_loss(d_fake: list[FeatureMaps], d_real: list[FeatureMaps]) -> torch.Tensor:
    """Least-squares D loss: sum over sub-discriminators of ``mean(D(fake)^2) + mean((1 - D(real))^2)``
    on their logits (last feature map). Pass ``d_fake`` computed from detached generator output."""
    terms = [
        fake[-1].float().pow(2).mean() + (1 - real[-1].float()).pow(2).mean() for fake, real in zip(d_fake, d_real)
    ]
    return torch.stack(terms).sum()


def generator_adversarial_loss(d_fake: list[FeatureMaps]) -> torch.Tensor:
    """Least-squares G loss: sum over sub-discriminators of ``mean((1 - D(fake))^2)``."""
    return torch.stack([(1 - fake[-1].float()).pow(2).mean() for fake in d_fake]).sum()


def feature_matching_loss(d_fake: list[FeatureMaps], d_real: list[FeatureMaps]) -> torch.Tensor:
    """Sum of ``L1(fake, real)`` over sub-discriminators and all their feature maps but the logits;
    real features are detached."""
    terms = [
        F.l1_loss(f.float(), r.detach().float())
        for fake, real in zip(d_fake, d_real)
        for f, r in zip(fake[:-1], real[:-1])
    ]
    return torch.stack(terms).sum()

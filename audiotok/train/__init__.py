"""Training components: the Improved RVQGAN discriminator and the training losses (the spectral
ones, shared with evaluation, live in :mod:`audiotok.nn.distances` and are re-exported here)."""

from ..nn.distances import (
    ComplexSTFTLoss,
    MelSpectrogram,
    MelSpectrogramLoss,
    MultiScaleSTFTLoss,
    Spectrogram,
    si_sdr,
    slaney_mel_filters,
    spectral_distance,
)
from .discriminator import BANDS, MPD, MRD, MSD, Discriminator, FeatureMaps, SincResample, preprocess
from .losses import discriminator_loss, feature_matching_loss, generator_adversarial_loss

__all__ = [
    "BANDS",
    "Discriminator",
    "FeatureMaps",
    "MPD",
    "MRD",
    "MSD",
    "MelSpectrogram",
    "MelSpectrogramLoss",
    "ComplexSTFTLoss",
    "MultiScaleSTFTLoss",
    "SincResample",
    "Spectrogram",
    "discriminator_loss",
    "feature_matching_loss",
    "generator_adversarial_loss",
    "preprocess",
    "si_sdr",
    "slaney_mel_filters",
    "spectral_distance",
]

"""Training components: the Improved RVQGAN discriminator and the training losses and metrics."""

from .discriminator import BANDS, MPD, MRD, MSD, Discriminator, FeatureMaps, SincResample, preprocess
from .losses import (
    MelSpectrogram,
    MelSpectrogramLoss,
    MultiScaleSTFTLoss,
    Spectrogram,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    si_sdr,
    slaney_mel_filters,
    spectral_distance,
)

__all__ = [
    "BANDS",
    "Discriminator",
    "FeatureMaps",
    "MPD",
    "MRD",
    "MSD",
    "MelSpectrogram",
    "MelSpectrogramLoss",
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

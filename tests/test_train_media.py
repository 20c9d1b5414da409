"""What training shows: colour maps, spectrogram images, console lines, sample lengths that fit a prior."""

import numpy as np
import pytest
import torch
from test_prior import PATTERNS, tiny_prior

from audiotok.lm import Sampler
from audiotok.lm.sampling import max_frames_for
from audiotok.train.media import MelImage, colourize, count, duration, train_line, validation_line


def test_colour_map_runs_from_dark_blue_to_yellow():
    rgb = colourize(np.array([[-1.0, 0.0, 0.5, 1.0, 2.0, np.nan]]))
    assert rgb.shape == (1, 6, 3) and rgb.dtype == np.uint8
    assert rgb[0, 1].tolist() == [68, 1, 84] and rgb[0, 3].tolist() == [253, 231, 37]  # viridis' ends
    assert rgb[0, 0].tolist() == rgb[0, 1].tolist() == rgb[0, 5].tolist() and rgb[0, 4].tolist() == rgb[0, 3].tolist()
    brightness = colourize(np.linspace(0, 1, 50)).astype(int).sum(-1)
    assert (np.diff(brightness) >= 0).all()


def test_mel_image_puts_input_and_reconstruction_side_by_side_on_one_scale():
    rate = 16000
    t = torch.arange(rate) / rate
    tone, quiet = torch.sin(2 * torch.pi * 300 * t)[None], 1e-3 * torch.sin(2 * torch.pi * 300 * t)[None]
    image = MelImage(rate, n_mels=40, scale=2)(tone, quiet[:, : rate // 2])  # window 1024, hop 256
    assert image.shape == (80, (1 + rate // 256) + 1 + (1 + rate // 512), 3) and image.dtype == np.uint8
    left, right = image[:, : 1 + rate // 256].astype(int), image[:, 2 + rate // 256:].astype(int)
    assert left.sum(-1).max() > right.sum(-1).max() + 100  # 60 dB quieter: darker on the shared scale
    rows = left.sum(-1).mean(1)
    assert rows[-20:].max() > rows[:20].max()  # 300 Hz is near the bottom: low frequencies are drawn at the bottom


def test_console_line_formats():
    assert [duration(s) for s in (0.4, 42, 750, 3 * 3600)] == ["0.4 s", "42 s", "12.5 min", "3.00 h"]
    assert [count(n) for n in (950, 12_300, 4_560_000, 7.89e9)] == ["950", "12.3k", "4.56M", "7.89G"]
    assert train_line(120, 1000, {"loss": 12.34, "mel": 1.234}, 1e-4, 2.0, "1.2 h audio") == \
        "step 120/1000 | loss 12.34 mel 1.234 | lr 1.00e-04 | 2.00 steps/s eta 7.3 min | 1.2 h audio"
    formats = {"mel_distance": "{:.4f}", "si_sdr": "{:.2f} dB", "absent": "{}"}
    metrics = {"si_sdr": 5.4321, "mel_distance": 1.23456, "other": 1.0}
    assert validation_line(500, metrics, formats, "mel_distance", True) == \
        "step 500 validation | mel_distance 1.2346 (best) | si_sdr 5.43 dB"
    assert validation_line(500, metrics, formats, "mel_distance", False) == \
        "step 500 validation | mel_distance 1.2346 | si_sdr 5.43 dB"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_max_frames_for_is_the_longest_sample_a_prior_takes(pattern):
    prior = tiny_prior(pattern)  # 512 positions
    frames = max_frames_for(prior)
    assert frames == {"flatten": (512 - 2) // 4, "delay": 512 - 5, "parallel": 510}[pattern]
    Sampler(prior, max_frames=frames)
    with pytest.raises(ValueError, match="positions"):
        Sampler(prior, max_frames=frames + 1)

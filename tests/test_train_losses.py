"""Discriminator and training losses (audiotok.train): shapes, weight norm, values checked against
independent computations (numpy STFTs, the Slaney mel formula, hand-computed GAN losses)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from audiotok.train import (
    BANDS,
    MPD,
    MRD,
    MSD,
    ComplexSTFTLoss,
    Discriminator,
    MelSpectrogram,
    MelSpectrogramLoss,
    MultiScaleSTFTLoss,
    SincResample,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    preprocess,
    si_sdr,
    slaney_mel_filters,
)

SR = 16000
T = 1600  # 0.1 s


def _audio(batch: int = 2, length: int = T, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / SR
    return 0.3 * torch.sin(2 * math.pi * 440 * t) + 0.1 * torch.randn(batch, 1, length, generator=g)


def _conv_out(n: int, kernel: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - kernel) // stride + 1


@pytest.fixture(scope="module")
def disc() -> Discriminator:
    torch.manual_seed(0)
    return Discriminator(SR)


# ---------------------------------------------------------------------------------------------
# Discriminator


def test_default_discriminator_structure_and_shapes(disc):
    x = _audio()
    with torch.no_grad():
        out = disc(x)
    assert len(out) == len(disc.discriminators) == 8
    for period, fmaps in zip((2, 3, 5, 7, 11), out[:5]):
        assert len(fmaps) == 6
        h = T // period + 1  # the reference pads p - T % p
        expected = []
        for ch, stride in zip((32, 128, 512, 1024, 1024), (3, 3, 3, 3, 1)):
            h = _conv_out(h, 5, stride, 2)
            expected.append((2, ch, h, period))
        expected.append((2, 1, h, period))
        assert [tuple(f.shape) for f in fmaps] == expected
    for window, fmaps in zip((2048, 1024, 512), out[5:]):
        hop, n_bins = window // 4, window // 2 + 1
        frames = math.ceil(T / hop)
        assert len(fmaps) == 5 * len(BANDS) + 1
        total = 0
        for b, (lo, hi) in enumerate(BANDS):
            w = int(hi * n_bins) - int(lo * n_bins)
            widths = [w]  # (3, 9) stride 1 keeps the width
            for _ in range(3):  # (3, 9) stride (1, 2)
                widths.append(_conv_out(widths[-1], 9, 2, 4))
            widths.append(widths[-1])  # (3, 3) stride 1
            assert [tuple(f.shape) for f in fmaps[5 * b : 5 * b + 5]] == [(2, 32, frames, w) for w in widths]
            total += widths[-1]
        assert tuple(fmaps[-1].shape) == (2, 1, frames, total)


@pytest.mark.parametrize("period", [2, 3, 5])
def test_mpd_folds_by_period_and_pads_a_whole_period(period):
    mpd = MPD(period)
    length = 300 * period  # divisible: the reference pads one more period, 301 rows -> 101 after a stride 3
    x = _audio(1, length)
    with torch.no_grad():
        first = mpd(x)[0]
        assert first.shape[2:] == (101, period)
        y = x.clone()
        y[..., 7 * period + 1] += 1.0  # one sample in column 1 of the fold
        changed = (mpd(y)[0] - first).abs().amax(dim=(0, 1, 2)) > 0
    assert changed.tolist() == [j == 1 for j in range(period)]


@pytest.mark.parametrize(
    "bands", [((0.0, 1.0),), ((0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0)), ((0.0, 0.5), (0.5, 1.0))]
)
def test_mrd_band_ablations(bands):
    mrd = MRD(512, bands)
    n_bins = 257
    edges = [(int(lo * n_bins), int(hi * n_bins)) for lo, hi in bands]
    assert mrd.bands == edges and edges[-1][1] == n_bins
    assert len(mrd.band_convs) == len(bands)
    with torch.no_grad():
        fmaps = mrd(_audio(1))
    assert len(fmaps) == 5 * len(bands) + 1
    assert [f.shape[-1] for f in fmaps[0:-1:5]] == [hi - lo for lo, hi in edges]  # first convs keep widths


def test_ablation_families():
    no_mpd = Discriminator(SR, periods=(), msd_rates=(1,), fft_sizes=(512,))
    assert [type(d) for d in no_mpd.discriminators] == [MSD, MRD]
    with torch.no_grad():
        msd_maps = no_mpd(_audio())[0]
    lengths = [T]
    for stride in (1, 4, 4, 4, 4, 1, 1):
        lengths.append(math.ceil(lengths[-1] / stride))
    assert [tuple(f.shape) for f in msd_maps] == [
        (2, c, n) for c, n in zip((16, 64, 256, 1024, 1024, 1024, 1), lengths[1:])
    ]
    only_mrd = Discriminator(SR, periods=())
    assert all(isinstance(d, MRD) for d in only_mrd.discriminators) and len(only_mrd.discriminators) == 3
    assert len(Discriminator(SR, periods=(2,), fft_sizes=()).discriminators) == 1


def test_msd_rate_resamples():
    msd = MSD(rate=2, sample_rate=SR)
    with torch.no_grad():
        assert msd(_audio())[0].shape[-1] == T // 2
    assert isinstance(MSD(rate=1).resample, nn.Identity)


def test_sinc_resample_keeps_passband_and_removes_aliases():
    t = torch.arange(SR, dtype=torch.float64) / SR
    low = torch.sin(2 * math.pi * 1000 * t).float()
    high = torch.sin(2 * math.pi * 6000 * t).float()  # above the 4 kHz Nyquist of SR / 2
    down = SincResample(SR, SR // 2)
    assert down(low).shape[-1] == SR // 2
    mid = slice(500, -500)  # away from the edges
    t2 = torch.arange(SR // 2, dtype=torch.float64) * 2 / SR
    torch.testing.assert_close(down(low)[mid], torch.sin(2 * math.pi * 1000 * t2)[mid].float(), atol=1e-4, rtol=0)
    assert down(high)[mid].abs().max() < 1e-3
    assert torch.allclose(down(torch.full((3, 500), 0.7)), torch.tensor(0.7), atol=1e-6)


def test_discriminator_is_gain_and_dc_invariant(disc):
    x = _audio(1)
    assert torch.allclose(preprocess(x).mean(-1), torch.zeros(1, 1), atol=1e-6)
    assert torch.allclose(preprocess(x).abs().amax(-1), torch.tensor(0.8))
    with torch.no_grad():
        a, b = disc(x), disc(3.0 * x + 0.5)
    for fa, fb in zip(a, b):
        assert torch.allclose(fa[-1], fb[-1], rtol=1e-3, atol=1e-4)


def test_gradients_flow(disc):
    x = _audio().requires_grad_(True)
    disc.zero_grad()
    loss = generator_adversarial_loss(disc(x))
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in disc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    disc.zero_grad()


def test_weight_norm_on_every_conv():
    d = Discriminator(SR, periods=(2,), msd_rates=(1,), fft_sizes=(512,))
    convs = [m for m in d.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert len(convs) == 6 + 7 + 5 * len(BANDS) + 1
    for conv in convs:
        assert parametrize.is_parametrized(conv, "weight")
        g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
        norm = v.flatten(1).norm(dim=1).view_as(g)
        assert torch.allclose(conv.weight, g * v / norm, atol=1e-6)


def test_mrd_spectrogram_matches_numpy_frames():
    window, hop = 512, 128
    x = _audio(2, 3000)
    spec = MRD(window).spectrogram(x)
    assert tuple(spec.shape) == (2, 2, math.ceil(3000 / hop), window // 2 + 1)
    # Frame j covers samples [j * hop - 3 * window / 8, + window): it is centered on hop block j.
    w = np.hanning(window + 1)[:-1]  # periodic hann
    xn = x.numpy()[:, 0].astype(np.float64)
    checked = 0
    for j in range(spec.shape[2]):
        start = j * hop - 3 * window // 8
        if start < 0 or start + window > xn.shape[-1]:
            continue
        ref = np.fft.rfft(xn[:, start : start + window] * w, axis=-1)
        np.testing.assert_allclose(spec[:, 0, j].numpy(), ref.real, atol=2e-4)
        np.testing.assert_allclose(spec[:, 1, j].numpy(), ref.imag, atol=2e-4)
        checked += 1
    assert checked >= 15


def test_discriminator_under_bf16_autocast(disc):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = disc(_audio())
        assert disc.discriminators[-1].spectrogram(_audio()).dtype == torch.float32
    assert all(torch.isfinite(f.float()).all() for fmaps in out for f in fmaps)


# ---------------------------------------------------------------------------------------------
# Spectral losses


def _slaney_hz_to_mel(f):
    f = np.asarray(f, dtype=np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep)


def _slaney_mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp(logstep * (m - 15.0)))


def _reference_filters(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney mel triangles in Hz with area normalization, written from the definition."""
    edges = _slaney_mel_to_hz(np.linspace(0.0, _slaney_hz_to_mel(sr / 2), n_mels + 2))
    freqs = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    out = np.zeros((n_mels, len(freqs)))
    for i in range(n_mels):
        lo, c, hi = edges[i : i + 3]
        rising = (freqs - lo) / (c - lo)
        falling = (hi - freqs) / (hi - c)
        out[i] = np.maximum(0.0, np.minimum(rising, falling)) * 2.0 / (hi - lo)
    return out


@pytest.mark.parametrize("sr,n_fft,n_mels", [(16000, 512, 40), (44100, 2048, 320), (44100, 32, 5)])
def test_mel_filters_match_slaney_definition(sr, n_fft, n_mels):
    filters = slaney_mel_filters(sr, n_fft, n_mels)
    assert filters.dtype == torch.float32 and tuple(filters.shape) == (n_mels, n_fft // 2 + 1)
    ref = _reference_filters(sr, n_fft, n_mels)
    np.testing.assert_allclose(filters.numpy(), ref, rtol=1e-4, atol=1e-9)


def test_mel_filters_have_unit_area_and_stop_at_nyquist():
    sr, n_fft, n_mels = 16000, 2048, 40  # filters much wider than a bin
    filters = slaney_mel_filters(sr, n_fft, n_mels).double()
    bin_hz = sr / n_fft
    np.testing.assert_allclose((filters.sum(-1) * bin_hz).numpy(), 1.0, rtol=0.02)
    assert filters[:, -1].abs().max() < 1e-9  # the last triangle ends at sr / 2
    assert (filters[-1] > 0).nonzero().max() == n_fft // 2 - 1


def test_mel_spectrogram_matches_numpy_stft():
    window, n_mels = 256, 40
    x = _audio(2, 2000)
    mel = MelSpectrogram(SR, window, n_mels)(x)
    hop = window // 4
    xn = np.pad(x.numpy()[:, 0].astype(np.float64), ((0, 0), (window // 2, window // 2)), mode="reflect")
    n_frames = 1 + 2000 // hop
    frames = np.stack([xn[:, j * hop : j * hop + window] for j in range(n_frames)], axis=1)
    mag = np.abs(np.fft.rfft(frames * np.hanning(window + 1)[:-1], axis=-1))  # [B, frames, bins]
    ref = np.einsum("mf,btf->bmt", _reference_filters(SR, window, n_mels), mag)
    assert tuple(mel.shape) == (2, 1, n_mels, n_frames)
    np.testing.assert_allclose(mel[:, 0].numpy(), ref, rtol=1e-3, atol=1e-5)


def test_mel_loss_zero_for_identical_and_monotone_in_noise():
    loss = MelSpectrogramLoss(SR)
    x = _audio(2, 4000)
    assert loss(x, x).item() == 0.0
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    values = [loss(x + level * noise, x).item() for level in (0.3, 0.1, 0.03, 0.01, 0.001)]
    assert values[-1] > 0
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_mel_loss_no_warnings_and_no_state():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = MelSpectrogramLoss(44100)  # 320 mels on 1025 bins: some filters are empty
    assert len(loss.mels) == 7 and loss.state_dict() == {}


def test_mel_loss_is_log_l1_per_scale():
    # With one scale, y = 10 * x moves every (unclamped) log10 mel value by exactly 1.
    loss = MelSpectrogramLoss(SR, window_lengths=(256,), n_mels=(20,))
    x = _audio(1, 2000)
    assert loss(10 * x, x).item() == pytest.approx(1.0, abs=1e-4)
    mag = MelSpectrogramLoss(SR, window_lengths=(256,), n_mels=(20,), log_weight=0.0, mag_weight=1.0)
    assert mag(2 * x, x).item() == pytest.approx(loss.mels[0](x).mean().item(), rel=1e-5)


def test_stft_loss_values():
    loss = MultiScaleSTFTLoss()
    x = _audio(2, 4000)
    assert loss(x, x).item() == 0.0
    # y = 2x: log10(|2X|^2) - log10(|X|^2) = 2 log10 2 per scale, plus the mean magnitude of X.
    expected = 0.0
    for window in (2048, 512):
        hop = window // 4
        xn = np.pad(x.numpy()[:, 0].astype(np.float64), ((0, 0), (window // 2, window // 2)), mode="reflect")
        frames = np.stack([xn[:, j * hop : j * hop + window] for j in range(1 + 4000 // hop)], axis=1)
        expected += 2 * math.log10(2) + np.abs(np.fft.rfft(frames * np.hanning(window + 1)[:-1], axis=-1)).mean()
    assert loss(2 * x, x).item() == pytest.approx(expected, rel=1e-4)


def _compressed_numpy(x: np.ndarray, window: int, pow: float) -> np.ndarray:
    """Power-law compressed complex STFT of ``[B, T]`` (hann, hop window / 4, centered, reflect), scaled
    by the window's sum: an independent numpy version of ComplexSTFTLoss.compressed."""
    hop = window // 4
    xn = np.pad(x.astype(np.float64), ((0, 0), (window // 2, window // 2)), mode="reflect")
    frames = np.stack([xn[:, j * hop : j * hop + window] for j in range(1 + x.shape[1] // hop)], axis=1)
    w = np.hanning(window + 1)[:-1]
    spec = np.fft.rfft(frames * w, axis=-1) / w.sum()
    return spec * np.abs(spec) ** (pow - 1)


def test_complex_stft_loss_values():
    x, y = _audio(2, 4000, seed=0)[:, 0].numpy(), _audio(2, 4000, seed=1)[:, 0].numpy()
    loss = ComplexSTFTLoss((512, 128), pow=0.3, mag_weight=0.5)
    assert loss(torch.from_numpy(x)[:, None], torch.from_numpy(x)[:, None]).item() == 0.0
    expected = np.mean([
        0.5 * np.mean((np.abs(cx) - np.abs(cy)) ** 2) + np.mean(np.abs(cx - cy) ** 2)
        for cx, cy in ((_compressed_numpy(x, w, 0.3), _compressed_numpy(y, w, 0.3)) for w in (512, 128))
    ])
    got = loss(torch.from_numpy(x)[:, None], torch.from_numpy(y)[:, None]).item()
    assert got == pytest.approx(expected, rel=1e-3)


def test_complex_stft_loss_sees_phase_where_mel_does_not():
    x = _audio(2, 4000)
    mel, complex_loss = MelSpectrogramLoss(SR), ComplexSTFTLoss()
    assert mel(-x, x).item() == pytest.approx(0.0, abs=1e-6)  # the same magnitudes: invisible to mel
    # -x has the opposite phase everywhere: |C - (-C)|^2 = 4 |C|^2 per bin, the magnitudes agree.
    energy = np.mean([np.mean(np.abs(_compressed_numpy(x[:, 0].numpy(), w, 0.3)) ** 2) for w in (2048, 512, 128)])
    assert complex_loss(-x, x).item() == pytest.approx(4 * energy, rel=1e-3)
    # a circular shift by a few samples keeps the spectrogram nearly unchanged but moves every phase
    shifted = torch.roll(x, 3, dims=-1)
    assert complex_loss(shifted, x).item() > 20 * complex_loss(x + 1e-3 * torch.randn_like(x), x).item()


def test_complex_stft_loss_gradient_is_finite_on_silence():
    estimate = torch.zeros(1, 1, 2048, requires_grad=True)
    ComplexSTFTLoss()(estimate, _audio(1, 2048)).backward()
    assert torch.isfinite(estimate.grad).all() and estimate.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pow"):
        ComplexSTFTLoss(pow=0.0)
    with pytest.raises(ValueError, match="window"):
        ComplexSTFTLoss(window_lengths=())


def test_complex_stft_loss_optimization_recovers_the_waveform():
    """The complex loss drives a waveform to the target's phase: SI-SDR ends high, where the mel loss
    alone cannot say which phase is right."""
    torch.manual_seed(0)
    target = _audio(1, 2048)
    wave = nn.Parameter(0.1 * torch.randn(1, 1, 2048))
    loss_fn = ComplexSTFTLoss()
    opt = torch.optim.Adam([wave], lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss_fn(wave, target).backward()
        opt.step()
    assert si_sdr(wave.detach(), target).item() > 10


def test_spectral_losses_ignore_bf16_autocast():
    x, y = _audio(2, 4000, seed=0), _audio(2, 4000, seed=1)
    mel, stft, complex_loss = MelSpectrogramLoss(SR), MultiScaleSTFTLoss(), ComplexSTFTLoss()
    ref_mel, ref_stft, ref_complex = mel(x, y), stft(x, y), complex_loss(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mel(x, y).dtype == torch.float32
        assert torch.allclose(mel(x, y), ref_mel, rtol=1e-6)
        assert torch.allclose(stft(x, y), ref_stft, rtol=1e-6)
        assert torch.allclose(complex_loss(x, y), ref_complex, rtol=1e-6)
        # bf16 inputs are computed in float32 too
        assert torch.allclose(mel(x.bfloat16(), y.bfloat16()), mel(x.bfloat16().float(), y.bfloat16().float()))


def test_mel_loss_optimization_reduces_loss():
    torch.manual_seed(0)
    target = _audio(1, 2048)
    wave = nn.Parameter(0.1 * torch.randn(1, 1, 2048))
    loss_fn = MelSpectrogramLoss(SR)
    opt = torch.optim.Adam([wave], lr=1e-2)
    first = None
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(wave, target)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss_fn(wave, target).item() < 0.8 * first


# ---------------------------------------------------------------------------------------------
# SI-SDR


def test_si_sdr_identical_scaled_and_known_value():
    ref = _audio(3, 4000)
    assert si_sdr(ref, ref).shape == (3,)
    assert (si_sdr(ref, ref) > 80).all()
    g = torch.Generator().manual_seed(2)
    r = ref.flatten(1).double()
    r = r - r.mean(-1, keepdim=True)
    noise = torch.randn(r.shape, generator=g, dtype=torch.float64)
    noise = noise - noise.mean(-1, keepdim=True)
    noise = noise - (noise * r).sum(-1, keepdim=True) / (r * r).sum(-1, keepdim=True) * r  # orthogonal to r
    snr_db = torch.tensor([0.0, 10.0, 25.0], dtype=torch.float64)
    energy = (r * r).sum(-1) / 10 ** (snr_db / 10)
    noise = noise * (energy / (noise * noise).sum(-1)).sqrt()[:, None]
    est = (r + noise).float().view_as(ref)
    torch.testing.assert_close(si_sdr(est, ref), snr_db.float(), atol=1e-3, rtol=0)
    # Scale and offset of the estimate do not matter.
    torch.testing.assert_close(si_sdr(3.0 * est + 0.2, ref), snr_db.float(), atol=1e-3, rtol=0)
    torch.testing.assert_close(si_sdr(-est, ref), snr_db.float(), atol=1e-3, rtol=0)
    # Not symmetric in its role of reference: noise is measured against the reference's projection.
    assert not torch.allclose(si_sdr(ref, est), si_sdr(3.0 * est, ref) + 1.0)


def test_si_sdr_is_finite_for_silence():
    silence = torch.zeros(2, 1, 100)
    assert torch.isfinite(si_sdr(silence, silence)).all()
    assert torch.isfinite(si_sdr(_audio(2, 100), silence)).all()


# ---------------------------------------------------------------------------------------------
# GAN losses


def _fmaps(*maps):
    return [torch.tensor(m, dtype=torch.float32) for m in maps]


def test_gan_losses_by_hand():
    # Two sub-discriminators, each with one hidden feature map and a logit map.
    d_fake = [_fmaps([1.0, 2.0], [0.5, -0.5]), _fmaps([[0.0, 4.0]], [[2.0, 0.0, 1.0]])]
    d_real = [_fmaps([1.0, 0.0], [1.0, 0.0]), _fmaps([[3.0, 4.0]], [[1.0, 1.0, 4.0]])]
    # D: mean(fake^2) + mean((1 - real)^2) per sub-discriminator
    #   first: (0.25 + 0.25) / 2 + (0 + 1) / 2 = 0.75; second: (4 + 0 + 1) / 3 + (0 + 0 + 9) / 3 = 14 / 3
    assert discriminator_loss(d_fake, d_real).item() == pytest.approx(0.75 + 14 / 3)
    # G: mean((1 - fake)^2): first (0.25 + 2.25) / 2 = 1.25; second (1 + 1 + 0) / 3 = 2 / 3
    assert generator_adversarial_loss(d_fake).item() == pytest.approx(1.25 + 2 / 3)
    # Features (logits excluded): first |[0, 2]| mean 1.0; second |[-3, 0]| mean 1.5
    assert feature_matching_loss(d_fake, d_real).item() == pytest.approx(2.5)
    # Perfect discriminator outputs give zero D loss; a fooled D gives zero G loss.
    assert discriminator_loss([_fmaps([0.0, 0.0])], [_fmaps([1.0, 1.0])]).item() == 0.0
    assert generator_adversarial_loss([_fmaps([1.0, 1.0])]).item() == 0.0


def test_feature_matching_detaches_real_features():
    fake = [torch.randn(2, 3, requires_grad=True), torch.randn(2, 1, requires_grad=True)]
    real = [torch.randn(2, 3, requires_grad=True), torch.randn(2, 1, requires_grad=True)]
    feature_matching_loss([fake], [real]).backward()
    assert fake[0].grad is not None and fake[0].grad.abs().sum() > 0
    assert real[0].grad is None and fake[1].grad is None  # logits are not matched


def test_gan_losses_under_bf16():
    fake = [[torch.randn(2, 3).bfloat16(), torch.randn(2, 1).bfloat16()]]
    real = [[torch.randn(2, 3).bfloat16(), torch.randn(2, 1).bfloat16()]]
    for value in (discriminator_loss(fake, real), generator_adversarial_loss(fake), feature_matching_loss(fake, real)):
        assert value.dtype == torch.float32 and torch.isfinite(value)


def test_discriminator_widths_are_configurable():
    """Narrow MPD/MRD convs (the CPU GAN stage) keep every feature map's layout but the channels."""
    from audiotok.train.config import DiscriminatorConfig

    paper = DiscriminatorConfig().build(SR)
    narrow = DiscriminatorConfig(mpd_channels=[8, 16, 32, 64, 64], mrd_channels=8).build(SR)
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in paper.parameters()) / 50
    x = _audio(1)
    with torch.no_grad():
        wide_maps, narrow_maps = paper(x), narrow(x)
    for wide, thin in zip(wide_maps, narrow_maps):
        assert len(wide) == len(thin)
        for a, b in zip(wide, thin):
            assert a.shape[2:] == b.shape[2:] and a.shape[0] == b.shape[0]
    assert [f.shape[1] for f in narrow_maps[0]] == [8, 16, 32, 64, 64, 1]
    assert {f.shape[1] for f in narrow_maps[-1][:-1]} == {8}
    with pytest.raises(ValueError, match="channel widths"):
        DiscriminatorConfig(mrd_channels=0)

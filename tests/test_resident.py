"""Resident training data (audiotok.data.resident): audio decoded once onto the device, batches cut there."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from test_train import tiny_config

import audiotok.data.resident as resident
from audiotok.audio import downmix, resample
from audiotok.data import (
    AudioFileSource,
    AudioFolderSource,
    AudioSource,
    DataConfig,
    ExcerptDataset,
    ResidentAudio,
    ResidentBatches,
    SourceGroup,
    decode_file,
    loudness,
    mixture,
    random_phase_shift,
)
from audiotok.train.state import load_train_state
from audiotok.train.trainer import train

SPEECH = Path(__file__).resolve().parents[1] / "examples" / "speech.flac"


def _noise(seconds: float, sr: int, seed: int, level: float = 0.2) -> np.ndarray:
    return (level * np.random.default_rng(seed).standard_normal(int(seconds * sr))).astype(np.float32)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    """Tones and noise at mixed rates (one stereo file), a corrupt file and an empty one."""
    root = tmp_path_factory.mktemp("audio")
    for i, sr in enumerate([44100, 22050, 48000, 44100]):
        t = np.arange(int(sr * 1.5)) / sr
        x = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + _noise(1.5, sr, i, 0.05)
        sf.write(root / f"clip{i}.wav", np.stack([x, 0.5 * x], 1) if i == 3 else x.astype(np.float32), sr)
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00not audio at all" * 10)
    sf.write(root / "empty.wav", np.zeros(0, np.float32), 44100)
    return root


def _files(folder: Path, lengths: list[float], sr: int = 8000) -> AudioFileSource:
    folder.mkdir(parents=True)
    for i, seconds in enumerate(lengths):
        sf.write(folder / f"{i}.wav", _noise(seconds, sr, i), sr)
    return AudioFolderSource(folder)


def _one_group(source: AudioSource) -> dict[str, SourceGroup]:
    return {"all": SourceGroup(1.0, [source])}


def test_records_are_kept_as_int16_at_the_model_rate(audio_dir):
    source = AudioFolderSource(audio_dir)
    audio = ResidentAudio.load(_one_group(source), 44100, workers=1)
    assert audio.audio.dtype == torch.int16 and audio.audio.ndim == 1 and len(audio) == 4
    assert (audio.offsets.dtype, audio.lengths.dtype, audio.scales.dtype) == (torch.int64, torch.int64, torch.float32)
    assert audio.nbytes == 2 * audio.audio.numel() + 28 * len(audio) + 20  # 2 bytes a sample: 303 MiB/h at 44.1 kHz
    for r, name in enumerate(["clip0.wav", "clip1.wav", "clip2.wav", "clip3.wav"]):
        record = decode_file(name, audio_dir / name)
        expected = resample(downmix(record.audio), record.sample_rate, 44100)[0]
        a, n = int(audio.offsets[r]), int(audio.lengths[r])
        assert n == expected.size
        got = audio.audio[a:a + n].float().numpy() * float(audio.scales[r])
        assert np.abs(got - expected).max() <= 0.51 * float(audio.scales[r])  # rounding to the record's scale
        assert float(audio.scales[r]) == pytest.approx(np.abs(expected).max() / 32767)
    batches = ResidentBatches(audio, 3, 0.2)
    x = batches.batch(0)
    assert x.shape == (3, 1, round(0.2 * 44100)) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.abs().max() <= 1.0 and x.abs().max() > 0.01
    loud = ResidentBatches(audio, 3, 0.2, loudness_target=0.0).batch(0)
    assert torch.allclose(loud.abs().amax(dim=-1), torch.ones(3, 1))  # peak limited


def test_unreadable_files_are_skipped_and_counted_by_the_pool_too(audio_dir, monkeypatch):
    one = AudioFolderSource(audio_dir)
    audio = ResidentAudio.load(_one_group(one), 44100, workers=1)
    monkeypatch.setattr(resident, "CHUNK", 2)  # three tasks: decoded by two spawned processes
    pooled = AudioFolderSource(audio_dir)
    by_pool = ResidentAudio.load(_one_group(pooled), 44100, workers=2)
    for source in (one, pooled):
        assert dict(source.skipped.counts) == {"decode": 1, "empty": 1}
    assert torch.equal(audio.audio, by_pool.audio) and torch.equal(audio.offsets, by_pool.offsets)
    assert torch.equal(audio.scales, by_pool.scales)


def test_streaming_sources_and_empty_groups_are_clear_errors(audio_dir, tmp_path):
    class Stream(AudioSource):
        random_access = False

    with pytest.raises(ValueError, match="none of the sources is random-access"):
        ResidentAudio.load(_one_group(Stream("stream")), 44100)
    good = _files(tmp_path / "good", [0.5])
    with pytest.raises(ValueError, match=r"\['stream'\] are not random-access"):
        ResidentAudio.load({"a": SourceGroup(1, [good]), "b": SourceGroup(1, [Stream("stream")])}, 16000, workers=1)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.wav").write_bytes(b"RIFF not audio")
    sf.write(bad / "empty.wav", np.zeros(0, np.float32), 8000)
    with pytest.raises(ValueError, match=r"groups \['bad'\] have no usable records"):
        ResidentAudio.load({"good": SourceGroup(1, [good]), "bad": SourceGroup(1, [AudioFolderSource(bad)])}, 16000,
                          workers=1)
    # A source without usable records next to others in its group is left out, the group kept.
    audio = ResidentAudio.load({"good": SourceGroup(1, [good, AudioFolderSource(bad)])}, 16000, workers=1)
    assert len(audio) == 1 and [src.name for _, src in audio.entries] == ["good"]


def test_groups_and_records_are_drawn_as_the_host_mixture(tmp_path):
    groups = {"speech": SourceGroup(3.0, [_files(tmp_path / "s1", [0.1] * 2), _files(tmp_path / "s2", [0.1] * 5)]),
              "music": SourceGroup(1.0, [_files(tmp_path / "m", [0.1] * 3)])}
    audio = ResidentAudio.load(groups, 8000, workers=1)
    _, probs = mixture(groups)
    assert np.allclose(audio.probs.numpy(), probs) and np.allclose(probs, [0.375, 0.375, 0.25])
    n = 200_000
    records = audio.draw_records(n, torch.Generator().manual_seed(0))
    counts = torch.bincount(records, minlength=len(audio)).numpy()
    expected = np.repeat(probs / [2, 5, 3], [2, 5, 3]) * n  # a source by the mixture, a record uniform in it
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
    group = audio.groups[records].numpy()
    assert audio.group_names == ["speech", "music"]
    assert abs(np.mean(group == 0) - 0.75) < 5 * np.sqrt(0.75 * 0.25 / n)


def test_a_batch_is_a_function_of_seed_rank_and_step(audio_dir):
    audio = ResidentAudio.load(_one_group(AudioFolderSource(audio_dir)), 44100)
    batches = ResidentBatches(audio, 4, 0.2, seed=3)
    first = [next(iter(batches)) for _ in range(3)]  # steps 0, 1, 2
    assert torch.equal(first[2], ResidentBatches(audio, 4, 0.2, seed=3).batch(2))
    assert not torch.equal(first[1], first[2])
    assert not torch.equal(first[2], ResidentBatches(audio, 4, 0.2, seed=4).batch(2))
    assert not torch.equal(first[2], ResidentBatches(audio, 4, 0.2, seed=3, rank=1).batch(2))
    state = batches.state_dict()
    assert state == {"step": 3, "seed": 3, "batch_size": 4} == batches.state_dict(consumed=12)
    resumed = ResidentBatches(audio, 4, 0.2, seed=3)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed)), batches.batch(3))
    with pytest.raises(ValueError, match="batch_size=4"):
        ResidentBatches(audio, 2, 0.2, seed=3).load_state_dict(state)
    # Either data path continues the other's run at the same step.
    host = ExcerptDataset(_one_group(AudioFolderSource(audio_dir)), 44100, 0.2, seed=3, block_size=4)
    host.load_state_dict(state)
    assert host.state_dict()["position"] == 12
    resumed.load_state_dict(host.state_dict())
    assert resumed.step == 3


def test_salient_excerpts_avoid_silence(tmp_path):
    folder = tmp_path / "half"
    folder.mkdir()
    sf.write(folder / "half.wav", np.concatenate([np.zeros(16000, np.float32), _noise(1.0, 16000, 0)]), 16000)
    audio = ResidentAudio.load(_one_group(AudioFolderSource(folder)), 16000)

    def silent(**settings) -> float:
        x = ResidentBatches(audio, 256, 0.2, **settings).batch(0)
        return float((x.abs().amax(dim=-1) == 0).float().mean())

    assert silent(salient_tries=1) > 0.3  # a single offset lands in the silent half 4 times in 9
    assert silent(salient_tries=8, min_loudness=100.0) > 0.3  # no candidate passes: the last is kept
    assert silent(salient_tries=8) < 0.01
    x = ResidentBatches(audio, 256, 0.2).batch(0)[:, 0]
    unlimited = x[x.abs().amax(dim=-1) < 0.999]  # the others were scaled down to peak 1
    assert len(unlimited) > 0.9 * len(x)
    assert all(loudness(e.numpy(), 16000) == pytest.approx(-16.0, abs=0.1) for e in unlimited)  # the kept one's


def test_a_short_record_is_taken_whole_and_zero_padded(tmp_path):
    folder = tmp_path / "short"
    folder.mkdir()
    sf.write(folder / "short.wav", _noise(0.1, 16000, 1), 16000)
    audio = ResidentAudio.load(_one_group(AudioFolderSource(folder)), 16000)
    x = ResidentBatches(audio, 2, 0.2, phase_shift=False).batch(0)[:, 0]
    record = audio.audio.float() * audio.scales[0]
    assert torch.all(x[:, 1600:] == 0)
    gain = x[0, :1600] / record
    assert torch.allclose(gain, gain[0]) and torch.allclose(x[0], x[1])


def _speech_excerpts(n: int, sr: int = 44100) -> list[np.ndarray]:
    record = decode_file("speech", SPEECH)
    speech = resample(record.audio, record.sample_rate, sr)[0]
    starts = np.linspace(0, speech.size - n, 12).astype(int)
    return [x for x in (speech[s:s + n] for s in starts) if loudness(x, sr) > -40]


@pytest.mark.parametrize("n", [16758, 16759])  # 0.38 s at 44.1 kHz; an odd length
def test_device_loudness_is_pyloudnorm_on_the_periodic_excerpt(n):
    """Real speech excerpts: the device measure is within 0.5 dB of pyloudnorm's BS.1770 (which starts
    its K-filters from rest and tiles a short excerpt to 0.4 s), and equals the K-weighted power of
    the excerpt taken as periodic (pyloudnorm's filters run over repeats of it) to 0.01 dB."""
    import pyloudnorm

    sr = 44100
    weights = resident.loudness_weights(n, sr)
    filters = pyloudnorm.Meter(sr)._filters.values()
    excerpts = _speech_excerpts(n)
    assert len(excerpts) >= 8
    for x in excerpts:
        on_device = float(resident.spectral_loudness(torch.fft.rfft(torch.from_numpy(x)), weights))
        assert on_device == pytest.approx(loudness(x, sr), abs=0.5)
        periodic = np.tile(x.astype(np.float64), 4)
        for stage in filters:
            periodic = stage.apply_filter(periodic)
        steady = -0.691 + 10 * math.log10(np.mean(periodic[2 * n:3 * n] ** 2))
        assert on_device == pytest.approx(steady, abs=0.01)


def test_batches_are_normalized_to_the_target_loudness(tmp_path):
    folder = tmp_path / "speech"
    folder.mkdir()
    (folder / "speech.flac").symlink_to(SPEECH)
    audio = ResidentAudio.load(_one_group(AudioFolderSource(folder)), 44100)
    for phase_shift in (False, True):
        x = ResidentBatches(audio, 16, 0.38, loudness_target=-30.0, phase_shift=phase_shift).batch(0)[:, 0]
        assert x.abs().max() < 1  # no peak limiting at this target
        error = np.abs([loudness(e.numpy(), 44100) + 30.0 for e in x])  # pyloudnorm's measure of the output
        assert np.median(error) < 0.3 and error.max() < 1.5, error  # its filters' start-up: up to ~1.2 dB


@pytest.mark.parametrize("n", [64, 65])
def test_phase_rotation_is_the_host_paths(n):
    x = np.random.default_rng(0).standard_normal((3, n)).astype(np.float32)
    phi = torch.tensor([np.random.default_rng(seed).uniform(-math.pi, math.pi) for seed in range(3)])
    spectra = torch.fft.rfft(torch.from_numpy(x))
    rotated = torch.fft.irfft(resident.rotate_phase(spectra, phi), n=n)
    for row, seed in enumerate(range(3)):
        expected = random_phase_shift(x[row], np.random.default_rng(seed))
        assert np.allclose(rotated[row].numpy(), expected, atol=1e-5)
    flipped = torch.fft.irfft(resident.rotate_phase(spectra, torch.full((3,), math.pi)), n=n)
    assert torch.allclose(flipped, -torch.from_numpy(x), atol=1e-5)  # phi = pi: a polarity flip


def test_the_resident_switch_is_checked():
    assert DataConfig.from_dict({"resident": True}).resident
    with pytest.raises(ValueError, match="resident must be true or false"):
        DataConfig.from_dict({"resident": "yes"})


def test_a_resumed_resident_run_equals_an_uninterrupted_one(audio_dir, tmp_path):
    config = tiny_config(audio_dir, "data.resident=true", "data.duration=0.1", "loss.adversarial=0", "loss.feature=0",
                         "train.valid_every=1000", "train.save_every=2")
    train(config, tmp_path / "straight", max_steps=3, device="cpu")
    train(config, tmp_path / "resumed", max_steps=2, device="cpu")
    assert load_train_state(tmp_path / "resumed" / "latest")["data"] == {"step": 2, "seed": 0, "batch_size": 2}
    train(config, tmp_path / "resumed", max_steps=3, device="cpu")
    a, b = (load_file(tmp_path / run / "latest" / "model.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda run: [json.loads(s)["loss"] for s in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert len(rows("straight")) == 3 and rows("straight") == rows("resumed")

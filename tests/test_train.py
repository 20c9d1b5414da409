"""Training recipe: configs, a few CPU steps, exact resume, DDP on gloo, bad data, fine-tuning."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from audiotok import AudioTokenizer
from audiotok.data.dataset import Excerpt
from audiotok.distances import MelSpectrogramLoss, MultiScaleSTFTLoss
from audiotok.model import DAC
from audiotok.train.config import load_config
from audiotok.train.trainer import train, validate

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "configs" / "tiny.yml"
CONFIGS = sorted(p for p in (REPO / "recipes" / "configs").rglob("*.yml") if p.parent.name != "prior")  # codec configs


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    """A few seconds of tones and noise at mixed rates, plus files that cannot be trained on."""
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    for i, sr in enumerate([44100, 22050, 48000, 44100]):
        t = np.arange(int(sr * 1.5)) / sr
        tone = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) * (1 + np.sin(2 * np.pi * 3 * t))
        x = tone + 0.05 * rng.standard_normal(t.size)
        sf.write(root / f"clip{i}.wav", x.astype(np.float32), sr)
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00not audio at all" * 10)
    sf.write(root / "empty.wav", np.zeros(0, np.float32), 44100)
    return root


def tiny_config(audio_dir, *overrides):
    source = f"[{{type: folder, root: {audio_dir}}}]"
    return load_config(TINY, [f"data.groups={{all: {{weight: 1, sources: {source}}}}}",
                              f"data.val_groups={{all: {{weight: 1, sources: {source}}}}}",
                              "discriminator.periods=[2]", "discriminator.fft_sizes=[256]", *overrides])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "recipes" / "configs")))
def test_every_config_loads(path):
    config = load_config(path)
    bands = config.discriminator.bands
    assert all(0 <= a < b <= 1 for a, b in bands) and bands == sorted(bands)
    if path.parent.name in ("ablations", "final"):
        assert config.data["groups"] and config.data["val_groups"]  # every recipe says what it trains on
    if path.name.startswith("downsampling"):
        assert 6.5 < config.model.bitrate() / 1000 < 8.5  # the sweep holds the bitrate near 8 kbps


def test_configs_follow_the_paper():
    configs = REPO / "recipes" / "configs"
    base = load_config(configs / "ablations" / "baseline.yml")
    assert (base.train.batch_size, base.train.num_iters, base.model.quantizer_dropout) == (12, 250_000, 1.0)
    final = load_config(configs / "final" / "44khz.yml")
    assert (final.train.batch_size, final.train.num_iters, final.model.quantizer_dropout) == (72, 400_000, 0.5)
    assert load_config(configs / "final" / "24khz.yml").model.n_codebooks == 32
    assert load_config(configs / "ablations" / "no-mpd.yml").discriminator.msd_rates == [1]
    assert not load_config(configs / "ablations" / "no-adv.yml").loss.gan
    speech = load_config(configs / "ablations" / "only-speech.yml")
    assert list(speech.data["groups"]) == ["speech"] and list(speech.data["val_groups"]) == ["speech"]
    d = load_config(configs / "ablations" / "downsampling-1536x.yml").model
    assert (d.hop_length, len(d.decoder_rates), d.encoder_dim) == (1536, 6, 96)
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(configs / "tiny.yml", ["train.batch_sise=3"])


def test_override_values_are_typed():
    tiny = REPO / "recipes" / "configs" / "tiny.yml"
    config = load_config(tiny, ["optim.lr=5e-4", "loss.adversarial=0", "loss.feature=0", "train.bf16=true"])
    assert config.optim.lr == 5e-4 and isinstance(config.optim.lr, float)  # YAML 1.1 reads 5e-4 as a string
    assert config.loss.adversarial == 0.0 and not config.loss.gan and config.train.bf16 is True
    for bad in ["optim.lr=fast", "train.batch_size=4.5", "train.batch_size=true", "train.bf16=1"]:
        with pytest.raises(ValueError, match="expected"):
            load_config(tiny, [bad])


def test_mel_loss_goes_down(audio_dir, tmp_path):
    config = tiny_config(audio_dir, "optim.lr=0.002", "train.valid_every=1000", "train.save_every=1000")
    train(config, tmp_path / "run", max_steps=24, device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mel = [r["mel"] for r in rows if r["split"] == "train"]
    assert len(mel) == 24
    assert np.mean(mel[-6:]) < 0.85 * np.mean(mel[:6])
    tok = AudioTokenizer.from_pretrained(tmp_path / "run")  # a run folder loads its latest generator
    assert tok.model.is_folded and tok.sample_rate == 44100


def test_phase_aware_loss_set_without_gan(audio_dir, tmp_path):
    config = tiny_config(audio_dir, "loss.adversarial=0", "loss.feature=0", "loss.waveform=2",
                         "loss.complex_stft=300", "loss.complex_stft_window_lengths=[256, 64]",
                         "train.valid_every=1000", "train.save_every=1000")
    train(config, tmp_path / "run", max_steps=3, device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert "disc" not in row and "adversarial" not in row
        weighted = (15 * row["mel"] + 2 * row["waveform"] + 300 * row["complex_stft"]
                    + 0.25 * row["commitment"] + row["codebook"])
        assert row["loss"] == pytest.approx(weighted, rel=1e-5)
    off = tiny_config(audio_dir, "train.valid_every=1000", "train.save_every=1000")
    train(off, tmp_path / "off", max_steps=1, device="cpu")
    assert "complex_stft" not in json.loads((tmp_path / "off" / "metrics.jsonl").read_text().splitlines()[0])


def test_validation_reports_mel_distance_per_group():
    config = load_config(TINY)
    w, sr = config.loss, config.model.sample_rate
    mel = MelSpectrogramLoss(sr, w.mel_window_lengths, w.mel_n_mels, clamp_eps=w.mel_clamp_eps, pow=w.mel_pow,
                             mag_weight=w.mel_mag_weight)
    torch.manual_seed(0)
    generator = DAC(config.model)
    t = torch.arange(8 * config.model.hop_length) / sr
    audio = {"noise": [0.1 * torch.randn(1, t.numel()) for _ in range(5)],
             "tone": [0.3 * torch.sin(2 * torch.pi * f * t)[None] for f in (220, 330, 440)]}
    excerpts = [Excerpt(g, f"{g}{i}", x) for g, xs in audio.items() for i, x in enumerate(xs)]
    val = validate(generator, excerpts[::-1], mel, MultiScaleSTFTLoss(w.stft_window_lengths), torch.device("cpu"),
                   batch_size=2)
    assert generator.training  # validation puts the generator back in training mode
    with torch.no_grad():
        expected = {g: mel(generator.eval()(torch.stack(xs))[0], torch.stack(xs)).item() for g, xs in audio.items()}
    assert val["mel_distance/noise"] == pytest.approx(expected["noise"], rel=1e-4)
    assert val["mel_distance/tone"] == pytest.approx(expected["tone"], rel=1e-4)
    assert val["mel_distance"] == pytest.approx((5 * expected["noise"] + 3 * expected["tone"]) / 8, rel=1e-4)


def _final_weights(run):
    return load_file(run / "latest" / "model.safetensors")


def test_a_run_killed_while_saving_resumes_exactly(audio_dir, tmp_path, monkeypatch):
    import audiotok.train.state as state_mod

    class Kill(BaseException):
        pass

    def dies_at_step_4(state, path):
        if state["step"] == 4:
            raise Kill  # half-way through the save: step 4's checkpoint is not complete
        torch.save(state, path)

    config = tiny_config(audio_dir, "train.valid_every=1000", "train.save_every=2")
    train(config, tmp_path / "straight", max_steps=6, device="cpu")
    with monkeypatch.context() as m:
        m.setattr(state_mod, "_save_state", dies_at_step_4)
        with pytest.raises(Kill):
            train(config, tmp_path / "resumed", max_steps=6, device="cpu")
    rows = lambda run: [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["step"] for r in rows(tmp_path / "resumed")] == [1, 2, 3, 4]
    train(config, tmp_path / "resumed", max_steps=6, device="cpu")  # from step 2, the newest complete one
    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert rows(tmp_path / "straight") != [] and [r["step"] for r in rows(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows(tmp_path / "straight")] == [r["loss"] for r in rows(tmp_path / "resumed")]
    # A run folder of the earlier layout (real latest/ and best/ folders, as runs started before
    # checkpoints/ existed have) resumes exactly too.
    legacy = tmp_path / "legacy"
    train(config, legacy, max_steps=2, device="cpu")
    target = (legacy / "latest").resolve()
    (legacy / "latest").unlink()
    shutil.copytree(target, legacy / "latest")
    shutil.rmtree(legacy / "checkpoints")
    train(config, legacy, max_steps=6, device="cpu")
    assert (legacy / "latest").is_symlink() and (legacy / "checkpoints" / "step_6").is_dir()
    c = _final_weights(legacy)
    assert all(torch.equal(a[key], c[key]) for key in a)
    changed = tiny_config(audio_dir, "model.n_codebooks=3")
    with pytest.raises(ValueError, match="model.n_codebooks: 4 in the run, 3 now"):
        train(changed, tmp_path / "resumed", max_steps=8, device="cpu")


def test_a_gan_stage_continues_a_run_trained_without_one(audio_dir, tmp_path):
    from audiotok.train.state import load_train_state

    run = tmp_path / "run"
    no_gan = tiny_config(audio_dir, "loss.adversarial=0", "loss.feature=0", "train.save_every=2",
                         "train.valid_every=2")
    train(no_gan, run, max_steps=2, device="cpu")
    state = load_train_state(run / "latest")
    assert "discriminator" not in state and "opt_d" not in state  # none was built
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert "disc" not in rows[0] and 0 <= rows[-1]["codebook_utilization"] <= 1
    train(tiny_config(audio_dir, "train.save_every=2", "train.valid_every=1000"), run, max_steps=4, device="cpu")
    state = load_train_state(run / "latest")
    assert state["step"] == 4 and "discriminator" in state
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "disc" in r] == [3, 4]


def test_bad_files_are_skipped(audio_dir, tmp_path):
    from audiotok.data import DataConfig

    config = tiny_config(audio_dir)
    dataset = DataConfig.from_dict({**config.data, "sample_rate": 44100}).train_dataset()
    stream = iter(dataset)
    batch = [next(stream) for _ in range(40)]
    assert all(x.shape == (1, round(0.2 * 44100)) and torch.isfinite(x).all() for x in batch)
    (source,) = {src for _, src in dataset.entries}
    assert source.skipped.counts.get("decode", 0) >= 1 and source.skipped.counts.get("empty", 0) >= 1


def test_finetune_from_a_pretrained_model(audio_dir, tmp_path):
    from conftest import random_tokenizer

    from audiotok.config import DACConfig

    source = random_tokenizer(DACConfig.preset("tiny-44khz"), seed=5)
    source.export_transformers(tmp_path / "hf")
    config = tiny_config(audio_dir, "train.valid_every=1000", "optim.lr=0.0")
    train(config, tmp_path / "ft", max_steps=1, init_from=str(tmp_path / "hf"), device="cpu")
    tuned = AudioTokenizer.from_pretrained(tmp_path / "ft")
    x = np.random.default_rng(1).standard_normal(8000).astype(np.float32) * 0.1
    # lr 0: the generator is still the source model (weight norm re-derived from its plain weights)
    torch.testing.assert_close(tuned.decode(tuned.encode(x, 44100)), source.decode(source.encode(x, 44100)),
                               rtol=0, atol=1e-4)


def test_frozen_parts_keep_their_weights_and_codes(audio_dir, tmp_path):
    from conftest import random_tokenizer

    from audiotok.config import DACConfig

    source = random_tokenizer(DACConfig.preset("tiny-44khz"), seed=5)
    source.save_pretrained(tmp_path / "src")
    config = tiny_config(audio_dir, "train.valid_every=1000", "optim.lr=0.01", "loss.adversarial=0",
                         "loss.feature=0", "train.freeze=[encoder, quantizer]")
    train(config, tmp_path / "ft", max_steps=2, init_from=str(tmp_path / "src"), device="cpu")
    tuned = AudioTokenizer.from_pretrained(tmp_path / "ft")
    before, after = source.model.state_dict(), tuned.model.state_dict()
    for name in before:
        if name.startswith("decoder."):
            continue
        assert torch.equal(after[name], before[name]), name  # bit for bit through trainable weight norm
    assert any(not torch.allclose(after[n], before[n]) for n in before if n.startswith("decoder."))
    x = np.random.default_rng(1).standard_normal(8000).astype(np.float32) * 0.1
    assert torch.equal(tuned.encode(x, 44100).codes, source.encode(x, 44100).codes)


@pytest.mark.parametrize("freeze", ["[encoder, codebooks]", "[encoder, quantizer, decoder]"])
def test_freeze_names_are_checked(freeze):
    with pytest.raises(ValueError, match="train.freeze"):
        load_config(TINY, [f"train.freeze={freeze}"])


def test_two_process_gloo_run(audio_dir, tmp_path):
    source = f"[{{type: folder, root: {audio_dir}}}]"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "recipes" / "train.py"), "--config", str(TINY), "--save-path", str(tmp_path / "ddp"),
           "--max-steps", "3", "--device", "cpu", f"data.groups={{all: {{weight: 1, sources: {source}}}}}",
           "data.val_groups={}", "discriminator.periods=[2]", "discriminator.fft_sizes=[256]", "train.save_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(s) for s in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one writer: rank 0
    assert AudioTokenizer.from_pretrained(tmp_path / "ddp").sample_rate == 44100


@pytest.mark.parametrize("fused", [False, True])
def test_fused_snake_option_reaches_every_snake(audio_dir, tmp_path, monkeypatch, fused):
    import audiotok.layers

    calls = []

    def counting(x, alpha):  # stands in for the compiled kernel (tested in test_model.py)
        calls.append(x.shape[1])
        return audiotok.layers.snake(x, alpha)

    monkeypatch.setattr(audiotok.layers, "fused_snake", lambda: counting)
    config = tiny_config(audio_dir, f"train.fused_snake={str(fused).lower()}", "loss.adversarial=0", "loss.feature=0",
                         "train.valid_every=1000", "train.save_every=1000")
    train(config, tmp_path / "run", max_steps=1, device="cpu")
    n_snakes = sum(isinstance(m, audiotok.layers.Snake1d) for m in audiotok.DAC(config.model).modules())
    assert len(calls) == (n_snakes if fused else 0)


def test_one_discriminator_pass_scores_fake_and_real_as_two_would():
    from audiotok.train.discriminator import Discriminator
    from audiotok.train.trainer import discriminate

    torch.manual_seed(0)
    disc = Discriminator(44100, periods=(2, 3), fft_sizes=(256,))
    fake, real = 0.1 * torch.randn(2, 1, 4000), 0.1 * torch.randn(2, 1, 4000)
    with torch.no_grad():
        together = discriminate(disc, fake, real)
        apart = disc(fake), disc(real)
    for joint, single in zip(together, apart):
        assert len(joint) == len(single) == 3
        for maps_joint, maps_single in zip(joint, single):
            for a, b in zip(maps_joint, maps_single):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

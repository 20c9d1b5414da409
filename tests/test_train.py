"""Training recipe: configs, a few CPU steps, exact resume, DDP on gloo, bad data, fine-tuning."""

import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from audiotok import AudioTokenizer
from audiotok.data.dataset import Excerpt
from audiotok.nn.distances import MelSpectrogramLoss, MultiScaleSTFTLoss
from audiotok.nn.model import DAC
from audiotok.train.config import load_config
from audiotok.train.state import EXPORT_KEY
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


def tiny_overrides(audio_dir, *overrides) -> list[str]:
    """The overrides that make tiny.yml train on ``audio_dir`` with a small discriminator, then ``overrides``."""
    source = f"[{{type: folder, root: {audio_dir}}}]"
    return [f"data.groups={{all: {{weight: 1, sources: {source}}}}}",
            f"data.val_groups={{all: {{weight: 1, sources: {source}}}}}",
            "discriminator.periods=[2]", "discriminator.fft_sizes=[256]", *overrides]


def tiny_config(audio_dir, *overrides):
    return load_config(TINY, tiny_overrides(audio_dir, *overrides))


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


def _events(run, **size_guidance):
    """The TensorBoard events of ``run`` (every audio clip and image kept unless ``size_guidance`` says)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"audio": 0, "images": 0, **size_guidance})
    events.Reload()
    return events


def test_validation_writes_audio_mel_images_perplexity_and_console_lines(audio_dir, tmp_path, caplog):
    pytest.importorskip("tensorboard")
    from PIL import Image

    from audiotok.data import DataConfig

    source = f"[{{type: folder, root: {audio_dir}}}]"
    config = tiny_config(audio_dir, "loss.adversarial=0", "loss.feature=0", "train.valid_every=2",
                         "train.save_every=1000", "train.num_iters=4",
                         f"data.val_groups={{speech: {{weight: 1, sources: {source}}}, "
                         f"music: {{weight: 1, sources: {source}}}}}")
    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="audiotok.train"):
        train(config, run, device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "audiotok.train"]
    assert [line.split(" |")[0] for line in lines if line.startswith("step ")] == [
        "step 1/4", "step 2/4", "step 2 validation", "step 3/4", "step 4/4", "step 4 validation"]
    assert "| loss " in lines[1] and " mel " in lines[1] and "lr 1.00e-04" in lines[1]
    assert lines[1].endswith("| 0.4 s audio")  # 1 step x batch 2 x 0.2 s
    assert lines[-3].endswith("| 1.6 s audio")
    assert lines[-1].startswith("training stopped at step 4 (reached num_iters 4): 4 steps this launch in ")
    assert "1.6 s audio seen; best validation mel_distance" in lines[-1]
    assert str((run / "best").resolve()) in lines[-1]

    events, size = _events(run), config.model.codebook_size
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["split"] == "val"]
    for k in range(config.model.n_codebooks):
        scalars = events.Scalars(f"val/perplexity/q{k}")
        assert [(e.step, e.value) for e in scalars] == [(r["step"], pytest.approx(r[f"perplexity/q{k}"]))
                                                        for r in val]
        assert all(1 <= e.value <= size for e in scalars)
    for r in val:  # the perplexities are the utilization's entropies, as 2 ** H
        per_codebook = [np.log(r[f"perplexity/q{k}"]) / np.log(size) for k in range(config.model.n_codebooks)]
        assert np.mean(per_codebook) == pytest.approx(r["codebook_utilization"])

    excerpts = DataConfig.from_dict({**config.data, "sample_rate": 44100}).validation_set()
    rate, n = 44100, round(0.5 * 44100)
    assert sorted(events.Tags()["audio"]) == sorted(f"val_audio/{g}/0/{kind}" for g in ("music", "speech")
                                                    for kind in ("input", "reconstruction"))
    assert sorted(events.Tags()["images"]) == ["val_mel/music/0", "val_mel/speech/0"]
    for group in ("speech", "music"):
        inputs = events.Audio(f"val_audio/{group}/0/input")
        assert [e.step for e in inputs] == [2]  # written once, at the first validation
        written, written_rate = sf.read(io.BytesIO(inputs[0].encoded_audio_string), dtype="float32")
        first = next(e for e in excerpts if e.group == group).audio[0].numpy()
        assert written_rate == rate and np.abs(written - first).max() < 1e-4  # the group's first excerpt
        outputs = events.Audio(f"val_audio/{group}/0/reconstruction")
        assert [(e.step, e.sample_rate, e.length_frames) for e in outputs] == [(2, rate, n), (4, rate, n)]
        assert outputs[0].encoded_audio_string != outputs[1].encoded_audio_string  # the generator trained
        images = events.Images(f"val_mel/{group}/0")
        frames = 1 + n // 512  # window 2048 at 44.1 kHz, hop 512
        assert [(e.step, e.height, e.width) for e in images] == [(2, 160, 2 * frames + 1), (4, 160, 2 * frames + 1)]
        picture = np.asarray(Image.open(io.BytesIO(images[0].encoded_image_string)).convert("RGB"))
        assert (picture[:, frames] == 255).all()  # the white column between input and reconstruction
        assert not np.array_equal(picture[:, :frames], picture[:, frames + 1:])


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

    from audiotok.nn.config import DACConfig

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

    from audiotok.nn.config import DACConfig

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
    import audiotok.nn.layers

    calls = []

    def counting(x, alpha, out=None):  # stands in for the compiled kernel (tested in test_model.py)
        calls.append(x.shape[1])
        return audiotok.nn.layers.snake(x, alpha, out)

    monkeypatch.setattr(audiotok.nn.layers, "fused_snake", lambda: counting)
    monkeypatch.setattr(audiotok.nn.layers, "FUSED_SNAKE_MIN_ELEMENTS", 0)  # every Snake, small ones included
    config = tiny_config(audio_dir, f"train.fused_snake={str(fused).lower()}", "loss.adversarial=0", "loss.feature=0",
                         "train.valid_every=1000", "train.save_every=1000")
    train(config, tmp_path / "run", max_steps=1, device="cpu")
    n_snakes = sum(isinstance(m, audiotok.nn.layers.Snake1d) for m in audiotok.DAC(config.model).modules())
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


# -- time limits, signals and moving a run: each ends as the uninterrupted run does ----------------------

RESUME = ("loss.adversarial=0", "loss.feature=0", "train.valid_every=3", "train.save_every=1000",
          "train.milestones=[2]")  # validation and a best checkpoint at step 3, step 2 kept
STEPS = 4


@pytest.fixture(scope="module")
def straight(audio_dir, tmp_path_factory):
    """An uninterrupted run of STEPS steps."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(tiny_config(audio_dir, *RESUME), run, max_steps=STEPS, device="cpu")
    return run


def _rows(run):
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_end(run, straight):
    """``run`` ended bit for bit as ``straight``: weights (with weight norm), optimizer, data position, logs."""
    from audiotok.train.state import load_train_state

    a, b = load_train_state(straight / "latest"), load_train_state(run / "latest")
    assert a["step"] == b["step"] == STEPS and a["data"] == b["data"] and a["best"] == b["best"]
    for key in a["generator"]:
        assert torch.equal(a["generator"][key], b["generator"][key]), key
    for index, entry in a["opt_g"]["state"].items():
        assert all(torch.equal(entry[k], b["opt_g"]["state"][index][k]) for k in entry), index
    assert a["sched_g"] == b["sched_g"]
    assert _rows(run) == [{**r, "steps_per_s": r2["steps_per_s"]} if "steps_per_s" in r else r
                          for r, r2 in zip(_rows(straight), _rows(run))]


def test_a_run_stopped_by_its_time_limit_resumes_exactly(audio_dir, straight, tmp_path, monkeypatch, caplog):
    import audiotok.train.stopping as stopping

    readings = []

    def clock():  # a second passes at every reading: the rule sees steps, validations and saves of 1-3 s
        readings.append(float(len(readings)))
        return readings[-1]

    config, run = tiny_config(audio_dir, *RESUME), tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(stopping, "monotonic", clock)
        with caplog.at_level("INFO", logger="audiotok.train"):
            train(config, run, max_steps=STEPS, device="cpu", time_limit="9s")  # returns normally
    stopped = [r["step"] for r in _rows(run)][-1]
    assert 1 <= stopped < STEPS and (run / "checkpoints" / f"step_{stopped}").is_dir()
    assert f"training stopped at step {stopped} (time limit 9 s): {stopped} steps this launch" in caplog.text
    assert readings[-1] <= 9  # the last reading: the end of the final save
    train(config, run, max_steps=STEPS, device="cpu")
    _assert_same_end(run, straight)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Wait until ``path`` exists and is not empty (``proc`` must still run)."""
    import time

    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size):
        assert proc.poll() is None, "the run ended before it logged a step"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def test_sigterm_to_the_process_group_stops_a_run_with_a_checkpoint_and_it_resumes_exactly(audio_dir, straight,
                                                                                           tmp_path):
    """SIGTERM to the whole process group, as schedulers and ``timeout`` send it: the DataLoader worker
    ignores it, the trainer finishes its step, saves and exits 143."""
    from audiotok.train.state import load_train_state

    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    cmd = [sys.executable, str(REPO / "recipes" / "train.py"), "--config", str(TINY), "--save-path", str(run),
           "--max-steps", str(STEPS), "--device", "cpu", *tiny_overrides(audio_dir, *RESUME, "train.num_workers=1")]
    with open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, cwd=tmp_path, start_new_session=True)
        try:
            _wait_for(run / "metrics.jsonl", proc)  # stepping: step 1 is logged
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=600) == 128 + signal.SIGTERM, err.read_text()[-3000:]
        finally:
            proc.kill()
    state = load_train_state(run / "latest")
    stopped = state["step"]
    assert 1 <= stopped < STEPS and [r["step"] for r in _rows(run)][-1] == stopped
    # the layout of a codec checkpoint is the one earlier versions wrote and read
    assert set(state) == {"generator", "opt_g", "sched_g", "data", "step", "best", "config"}
    assert set(state["data"]) == {"position", "seed", "world_size", "block_size"}
    assert f"train: SIGTERM: training stopped at step {stopped}" in err.read_text()
    assert f"training stopped at step {stopped} (signal SIGTERM): {stopped} steps this launch" in err.read_text()
    train(tiny_config(audio_dir, *RESUME), run, max_steps=STEPS, device="cpu")
    _assert_same_end(run, straight)


def test_a_run_moved_through_a_state_export_continues(audio_dir, straight, tmp_path, caplog):
    from audiotok.train.state import export_state, load_train_state
    from audiotok.train.trainer import import_state

    config = tiny_config(audio_dir, *RESUME)
    source = load_train_state(straight / "step_2")
    exported = export_state(straight / "step_2", tmp_path / "state.safetensors")
    moved = tmp_path / "moved"
    seeded = load_train_state(import_state(exported, moved, config))
    assert (seeded["step"], seeded["data"], seeded["best"], seeded["sched_g"]) == \
           (2, source["data"], source["best"], source["sched_g"])
    assert seeded["opt_g"]["param_groups"][0]["lr"] == source["opt_g"]["param_groups"][0]["lr"]
    for index, entry in source["opt_g"]["state"].items():  # the optimizer continues: its moments, rounded
        assert torch.equal(seeded["opt_g"]["state"][index]["step"], entry["step"])
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(seeded["opt_g"]["state"][index][name], entry[name].bfloat16().float())
    with caplog.at_level("INFO", logger="audiotok.train"):  # a restarted job: the run it started is resumed
        train(config, moved, max_steps=STEPS, device="cpu", resume_from=exported)
    assert "already holds a run" in caplog.text
    a, b = load_train_state(straight / "latest"), load_train_state(moved / "latest")
    assert (b["step"], b["data"], b["sched_g"]) == (a["step"], a["data"], a["sched_g"])  # exactly
    assert [(r["step"], r.get("lr")) for r in _rows(moved)] == [(r["step"], r.get("lr")) for r in _rows(straight)
                                                                 if r["step"] > 2]
    # the rounding to float16 and bfloat16 is all that differs: each weight is within its float16 rounding
    # (2^-11 of it) plus a quarter of the learning rate per step since (measured: at most 0.09)
    lr = config.optim.lr
    for key, value in a["generator"].items():
        assert ((b["generator"][key] - value).abs() <= 2**-11 * value.abs() + 0.25 * lr * (STEPS - 2)).all(), key
    assert any(not torch.equal(b["generator"][key], value) for key, value in a["generator"].items())
    for r, r2 in zip(_rows(moved), [r for r in _rows(straight) if r["step"] > 2]):
        key = "mel" if r["split"] == "train" else "mel_distance"
        assert r[key] == pytest.approx(r2[key], rel=1e-3)
    # without moments the optimizers restart, and say so; the schedule continues
    light = export_state(straight / "step_2", tmp_path / "light.safetensors", moments=False)
    with caplog.at_level("INFO", logger="audiotok.train"):
        restarted = load_train_state(import_state(light, tmp_path / "light", config))
    assert "no optimizer moments: the optimizers restart" in caplog.text
    assert restarted["opt_g"]["state"] == {} and restarted["sched_g"] == source["sched_g"]
    assert light.stat().st_size < exported.stat().st_size / 2


def test_the_weight_average_is_validated_saved_resumed_and_moved(audio_dir, straight, tmp_path, caplog):
    """train.ema: after each step, average = decay * average + (1 - decay) * generator; the checkpoints'
    model files are the average's, a resume continues it exactly, an export carries it only with moments."""
    from audiotok.train.state import export_state, load_train_state
    from audiotok.weights.checkpoint import fold_state_dict

    config = tiny_config(audio_dir, *RESUME, "train.ema=0.75")
    run = tmp_path / "ema"
    train(config, run, max_steps=2, device="cpu")
    train(config, run, max_steps=STEPS, device="cpu")  # resumed at step 2
    states = {step: load_train_state(run / name) for step, name in ((2, "step_2"), (3, "best"), (4, "latest"))}
    plain = load_train_state(straight / "latest")  # the same run without the average: the same generator
    for key, value in plain["generator"].items():
        assert torch.equal(states[4]["generator"][key], value), key
    for step in (3, 4):
        before, now = states[step - 1]["ema"], states[step]
        for key, value in now["ema"].items():
            expected = 0.75 * before[key] + 0.25 * now["generator"][key]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=key)
        assert any(not torch.equal(now["ema"][k], now["generator"][k]) for k in now["ema"])
        files = load_file(run / ("best" if step == 3 else "latest") / "model.safetensors")
        for key, value in fold_state_dict(now["ema"]).items():
            torch.testing.assert_close(files[key], value, rtol=1e-5, atol=1e-6, msg=key)
    straight_ema = tmp_path / "straight-ema"
    train(config, straight_ema, max_steps=STEPS, device="cpu")
    for key, value in load_train_state(straight_ema / "latest")["ema"].items():
        assert torch.equal(states[4]["ema"][key], value), key

    # moved with moments, the average continues (rounded to float16); without, it restarts from the generator
    full = export_state(run / "step_2", tmp_path / "full.safetensors")
    train(config, tmp_path / "moved", max_steps=2, device="cpu", resume_from=full)  # loads it; no step left
    moved = load_train_state(tmp_path / "moved" / "latest")
    for key, value in states[2]["ema"].items():
        assert torch.equal(moved["ema"][key], value.half().float()), key
    light = export_state(run / "step_2", tmp_path / "light.safetensors", moments=False)
    assert any(k.startswith("ema/") for k in load_file(full))
    assert not any(k.startswith("ema/") for k in load_file(light))
    with caplog.at_level("INFO", logger="audiotok.train"):
        train(config, tmp_path / "light", max_steps=3, device="cpu", resume_from=light)
    assert "the weight average (train.ema=0.75) starts at step 2" in caplog.text
    restarted = load_train_state(tmp_path / "light" / "latest")
    for key, value in restarted["ema"].items():  # one step from the generator's weights at step 2
        expected = 0.75 * states[2]["generator"][key].half().float() + 0.25 * restarted["generator"][key]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=key)
    with pytest.raises(ValueError, match=r"train\.ema: the average's decay must be in \[0, 1\)"):
        tiny_config(audio_dir, "train.ema=1.0")


def test_a_gan_run_exports_its_discriminator(audio_dir, tmp_path):
    from audiotok.train.state import export_state, load_train_state

    config = tiny_config(audio_dir, "train.valid_every=1000", "data.val_groups={}")
    train(config, tmp_path / "gan", max_steps=1, device="cpu")
    exported = export_state(tmp_path / "gan", tmp_path / "gan.safetensors")
    train(config, tmp_path / "moved", max_steps=1, device="cpu", resume_from=exported)  # loads it; no step left
    a, b = load_train_state(tmp_path / "gan" / "latest"), load_train_state(tmp_path / "moved" / "latest")
    assert b["step"] == 1 and b["sched_d"] == a["sched_d"]
    for key, value in a["discriminator"].items():
        assert torch.equal(b["discriminator"][key], value.half().float()), key
    for index, entry in a["opt_d"]["state"].items():
        assert torch.equal(b["opt_d"]["state"][index]["exp_avg_sq"], entry["exp_avg_sq"].bfloat16().float())


def _rewrite(good: Path, out: Path, edit) -> Path:
    """A copy of the export ``good`` with ``edit(tensors, meta)`` applied (tensors and metadata as stored)."""
    from safetensors.torch import save_file

    with safe_open(str(good), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[EXPORT_KEY])
    edit(tensors, meta)
    save_file(tensors, out, metadata={EXPORT_KEY: json.dumps(meta)})
    return out


def _reshape(tensors, meta, name, shape):
    tensors[name] = torch.zeros(shape, dtype=tensors[name].dtype)
    meta["tensors"][name][1] = list(shape)


def test_bad_state_exports_are_clear_errors(audio_dir, straight, tmp_path):
    from safetensors.torch import save_file

    from audiotok.train.state import export_state, read_state_export
    from audiotok.train.trainer import import_state

    config = tiny_config(audio_dir, *RESUME)
    good = export_state(straight, tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:-1000])
    (tmp_path / "text.safetensors").write_bytes(b"not a safetensors file at all")
    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    bias = "generator/encoder.conv1.bias"
    codebook = next(k for k in json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
                    if k.startswith("generator/quantizer.") and "codebook" in k)
    cases = {
        "truncated": ("truncated or not safetensors", None),
        "text": ("truncated or not safetensors", None),
        "other": ("without 'audiotok.train_state' metadata", None),
        "missing": (f"missing tensors {bias}", lambda t, m: t.pop(bias)),
        "reshaped": (rf"tensor {bias} has shape \[3\], its metadata says \[",
                     lambda t, m: t.update({bias: t[bias][:3]})),
        "architecture": (rf"generator: does not fit the model its config describes: {codebook[10:]} has shape",
                         lambda t, m: m["values"]["config"]["model"].update(codebook_size=8)),
        "moments": (r"opt_g: state 0 exp_avg has shape \[5\], its parameter",
                    lambda t, m: _reshape(t, m, "opt_g/state/0/exp_avg", (5,))),
        "no schedule": ("the export has no sched_g", lambda t, m: m["values"].pop("sched_g")),
    }
    for name, (message, edit) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        if edit is not None:
            _rewrite(good, path, edit)
        with pytest.raises(ValueError, match=message) as e:
            import_state(path, tmp_path / name, config)
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value), name
        assert not (tmp_path / name).exists(), name  # nothing written
    with pytest.raises(ValueError, match="truncated"):
        read_state_export(tmp_path / "truncated.safetensors")
    with pytest.raises(ValueError, match="truncated"):  # before any training
        train(config, tmp_path / "run", max_steps=STEPS, device="cpu", resume_from=tmp_path / "truncated.safetensors")
    other = tiny_config(audio_dir, *RESUME, "model.n_codebooks=3")  # resumes must keep the architecture
    with pytest.raises(ValueError, match=f"{good}: the run was trained with another configuration.*n_codebooks"):
        import_state(good, tmp_path / "other-run", other)


def test_the_recipe_stops_in_time_exports_and_reports_bad_files(audio_dir, tmp_path):
    run = tmp_path / "run"
    recipe = [sys.executable, str(REPO / "recipes" / "train.py")]
    training = [*recipe, "--config", str(TINY), "--device", "cpu",
                *tiny_overrides(audio_dir, *RESUME, "data.val_groups={}")]

    def call(*args):
        return subprocess.run([*training, *args], capture_output=True, text=True, timeout=600, cwd=tmp_path)

    limited = call("--save-path", str(run), "--max-steps", str(STEPS), "--time-limit", "0.01s")
    assert limited.returncode == 0, limited.stderr[-3000:]
    assert [r["step"] for r in _rows(run)] == [1]  # the first step is always taken; then there is no time left
    assert "time limit 0.01 s: stopping at step 1" in limited.stderr
    out = tmp_path / "moved.safetensors"
    exported = subprocess.run([*recipe, "--save-path", str(run), "--export-state", str(out), "--no-moments"],
                              capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0 and out.stat().st_size > 0, exported.stderr[-3000:]
    with safe_open(str(out), "pt") as f:  # before the first validation: JSON has no infinity
        assert json.loads(f.metadata()[EXPORT_KEY])["values"]["best"] is None
    (tmp_path / "cut.safetensors").write_bytes(out.read_bytes()[:-10])
    for args, message in [(["--resume-from", str(tmp_path / "cut.safetensors")], "truncated or not safetensors"),
                          (["--time-limit", "soon"], "argument --time-limit: invalid duration 'soon'")]:
        bad = call("--save-path", str(tmp_path / "bad"), *args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-3000:]


def _train_recipe():
    spec = importlib.util.spec_from_file_location("train_recipe", REPO / "recipes" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_refusal_of_the_recipe_is_one_line(audio_dir, straight, tmp_path, capsys):
    recipe = _train_recipe()
    run = tmp_path / "run"
    shutil.copytree(straight, run, symlinks=True)
    (tmp_path / "bad.yml").write_text("model: [1\n")
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "a.wav").write_bytes(b"RIFF not audio")
    unreadable = f"data.groups={{u: {{sources: [{{type: folder, root: {tmp_path / 'unreadable'}}}]}}}}"
    tiny = ["--config", str(TINY), "--device", "cpu", "--max-steps", str(STEPS + 1)]
    cases = [
        ([*tiny, "--save-path", str(run), *tiny_overrides(audio_dir, *RESUME, "model.n_codebooks=3")],
         "the run was trained with another configuration, so its state cannot be resumed: model.n_codebooks"),
        ([*tiny, "--save-path", str(run), *tiny_overrides(audio_dir, *RESUME, "train.batch_size=[1")],
         "override 'train.batch_size=[1': the value is not YAML: expected ',' or ']'"),
        (["--config", str(tmp_path / "bad.yml"), "--save-path", str(tmp_path / "new")], "bad.yml: not a YAML config"),
        ([*tiny, "--save-path", str(tmp_path / "new"), *tiny_overrides(audio_dir, *RESUME, "train.num_workers=1",
                                                                       unreadable)],
         "no usable audio in 32 draws"),  # raised in a DataLoader worker
        (["--save-path", str(tmp_path / "new"), "--export-state", str(tmp_path / "x.safetensors")],
         "no complete checkpoint to export"),
    ]
    for argv, message in cases:
        assert recipe.main(argv) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("train: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "new" / "checkpoints").exists()
    with pytest.raises(SystemExit) as stop:  # a fine-tune or a moved run, not both
        recipe.main([*tiny, "--save-path", str(tmp_path / "new"), "--init-from", "default", "--resume-from", "x"])
    assert stop.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_remote_train_script_trains_in_time_and_hands_the_state_on_in_pieces(audio_dir, tmp_path):
    """recipes/remote_train.sh: a timed run from scratch writes its export in pieces; a second call joins
    them, resumes at that step and trains on."""
    from audiotok.train.state import read_state_export

    script = REPO / "recipes" / "remote_train.sh"
    overrides = tiny_overrides(audio_dir, *RESUME, "data.val_groups={}", "train.num_iters=100000")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def call(state: str, out: Path, run: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script), str(TINY), state, "6s", str(out), "train.log_every=1", *overrides],
                              capture_output=True, text=True, timeout=600, env={**env, "RUN": str(run)})

    first = call("none", tmp_path / "out1", tmp_path / "run1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    pieces = sorted((tmp_path / "out1").glob("state.safetensors.part-*"))
    assert pieces and all(p.stat().st_size <= 15 * 2**20 for p in pieces)
    joined = tmp_path / "joined.safetensors"
    joined.write_bytes(b"".join(p.read_bytes() for p in pieces))
    step = read_state_export(joined)["step"]
    assert step >= 1 and [r["step"] for r in _rows(tmp_path / "out1")][-1] == step
    second = call(str(tmp_path / "out1" / "state.safetensors"), tmp_path / "out2", tmp_path / "run2")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    steps = [r["step"] for r in _rows(tmp_path / "out2")]
    assert steps[0] == step + 1 and steps[-1] > step


def _workers(pid: int) -> dict[int, int]:
    """{rank: pid} of the torchrun workers under the launcher process ``pid`` (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
        except OSError:
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers in /proc")
def test_two_process_run_stops_at_one_step_when_one_rank_gets_sigterm(audio_dir, tmp_path):
    import re

    from audiotok.train.state import load_train_state

    run, err = tmp_path / "ddp", tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "recipes" / "train.py"), "--config", str(TINY), "--save-path", str(run), "--max-steps", "50",
           "--device", "cpu", *tiny_overrides(audio_dir, "data.val_groups={}", "loss.adversarial=0", "loss.feature=0",
                                              "train.save_every=1000")]
    with open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, cwd=tmp_path,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            _wait_for(run / "metrics.jsonl", proc)
            workers = _workers(proc.pid)
            assert sorted(workers) == [0, 1]
            os.kill(workers[1], signal.SIGTERM)  # rank 1 only: rank 0 learns of it at the next step's end
            proc.wait(timeout=600)
        finally:
            proc.kill()
    text = err.read_text()
    stops = dict((int(r), int(s)) for r, s in re.findall(r"SIGTERM: rank (\d) of 2 stops at step (\d+)", text))
    assert stops.keys() == {0, 1} and stops[0] == stops[1] < 50, text[-3000:]
    assert load_train_state(run / "latest")["step"] == stops[0]  # rank 0 saved the step they stopped at
    assert "exitcode: 143" in text  # a worker's status: 128 + SIGTERM (torchrun's own is 1)

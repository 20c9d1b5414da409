"""Checkpoint formats: transformers DAC folders, original descript .pth files, our folders, the hub."""

import json
import logging
import math
import os
import pickle
import warnings

import pytest
import torch
from conftest import make_audio, random_tokenizer, randomize_

from audiotok import AudioTokenizer, DACConfig
from audiotok.weights.checkpoint import build_model, load_checkpoint, to_original_keys
from audiotok.weights.hub import DEFAULT_MODEL_ID, SAME_CODES_AS

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

# Our decoder returns the exact length F * hop; the reference loses one sample per odd-stride stage
# and its last samples are computed next to that missing sample. Away from the end both agree.
TAIL = 500


def hf_load(folder):
    model, info = transformers.DacModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


def compare_with_transformers(tok, hf, frames=40, batch=2):
    x = torch.from_numpy(make_audio(tok.hop_length * frames, batch=batch))
    with torch.no_grad():
        ref_codes = hf.encode(x).audio_codes
        ref_audio = hf.decode(audio_codes=ref_codes).audio_values
    enc = tok.encode(x, tok.sample_rate)
    assert torch.equal(enc.codes, ref_codes)
    audio = tok.decode(enc.codes)[:, 0]
    assert audio.shape[-1] == frames * tok.hop_length
    n = ref_audio.shape[-1]
    if n == audio.shape[-1]:
        torch.testing.assert_close(audio, ref_audio, rtol=0, atol=1e-4)
    else:
        rates = tok.config.decoder_rates  # the reference loses one sample per odd-stride stage
        assert audio.shape[-1] - n == sum(math.prod(rates[i + 1:]) for i, r in enumerate(rates) if r % 2)
        torch.testing.assert_close(audio[:, : n - TAIL], ref_audio[:, : n - TAIL], rtol=0, atol=1e-4)
    assert audio.abs().mean() > 0.05  # the comparison is not between near-silent signals
    return enc.codes


@pytest.mark.parametrize("preset", ["tiny-44khz", "tiny-24khz", "tiny-16khz"])
def test_export_transformers_matches_reference(tmp_path, preset):
    tok = random_tokenizer(preset)
    tok.export_transformers(tmp_path / "hf")
    compare_with_transformers(tok, hf_load(tmp_path / "hf"))


@pytest.mark.parametrize("preset", ["44khz", "24khz", "16khz"])
def test_full_size_architectures_match_reference(tmp_path, preset):
    tok = random_tokenizer(preset)
    tok.export_transformers(tmp_path / "hf")
    hf = hf_load(tmp_path / "hf")
    codes = compare_with_transformers(tok, hf, frames=30, batch=1)
    assert codes.shape[1] == tok.n_codebooks
    # The original .pth form of the same weights gives the same codes.
    tok.export_original(tmp_path / "model.pth")
    x = torch.from_numpy(make_audio(tok.hop_length * 30, batch=1))
    assert torch.equal(AudioTokenizer.from_pretrained(tmp_path / "model.pth").encode(x, tok.sample_rate).codes, codes)


@pytest.mark.parametrize("preset", ["tiny-44khz", "tiny-24khz", "tiny-16khz"])
def test_loads_folder_written_by_transformers(tmp_path, preset):
    c = DACConfig.preset(preset)
    hf_config = transformers.DacConfig(
        encoder_hidden_size=c.encoder_dim, downsampling_ratios=c.encoder_rates, decoder_hidden_size=c.decoder_dim,
        n_codebooks=c.n_codebooks, codebook_size=c.codebook_size, codebook_dim=c.codebook_dim,
        sampling_rate=c.sample_rate)
    hf = randomize_(transformers.DacModel(hf_config).eval(), seed=3)
    hf.save_pretrained(tmp_path / "hf")
    tok = AudioTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.config == c
    compare_with_transformers(tok, hf)


def test_transformers_config_quirks(tmp_path):
    # Published 16 kHz / 24 kHz configs carry hop_length 512 and early ones quantizer_dropout false.
    tok = random_tokenizer("tiny-16khz")
    tok.export_transformers(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(hop_length=512, quantizer_dropout=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = AudioTokenizer.from_pretrained(tmp_path)
    assert loaded.hop_length == 320 and loaded.config.quantizer_dropout == 0.0


def test_original_pth_keys_follow_the_reference_layout():
    model = build_model(random_tokenizer("44khz").checkpoint(), folded=False)
    keys = to_original_keys(model.state_dict(), model.config)
    assert len(keys) == 301
    for key in ["encoder.block.0.weight_v", "encoder.block.1.block.0.block.0.alpha",
                "encoder.block.1.block.2.block.3.weight_g", "encoder.block.4.block.3.alpha",
                "encoder.block.4.block.4.weight_v", "encoder.block.5.alpha", "encoder.block.6.bias",
                "quantizer.quantizers.8.in_proj.weight_g", "quantizer.quantizers.0.codebook.weight",
                "decoder.model.0.weight_v", "decoder.model.1.block.0.alpha", "decoder.model.1.block.1.weight_g",
                "decoder.model.4.block.4.block.3.bias", "decoder.model.5.alpha", "decoder.model.6.weight_v"]:
        assert key in keys, key


def test_original_pth_round_trip_and_old_metadata(tmp_path):
    tok = random_tokenizer("tiny-44khz")
    path = tmp_path / "weights.pth"
    tok.export_original(path)
    blob = torch.load(path, weights_only=True)
    assert any(k.endswith("weight_g") for k in blob["state_dict"])
    blob["metadata"]["kwargs"]["latent_dim"] = None  # as in the first published 44 kHz file
    blob["metadata"]["kwargs"]["quantizer_dropout"] = False
    torch.save(blob, path)
    loaded = AudioTokenizer.from_pretrained(path)
    assert loaded.config.latent_dim == tok.config.latent_dim
    x = make_audio(8000)
    assert torch.equal(loaded.encode(x, 44100).codes, tok.encode(x, 44100).codes)
    torch.testing.assert_close(loaded.decode(loaded.encode(x, 44100)), tok.decode(tok.encode(x, 44100)))


def test_save_pretrained_round_trip_has_plain_weights(tmp_path):
    from safetensors.torch import load_file

    tok = random_tokenizer("tiny-24khz")
    tok.save_pretrained(tmp_path)
    assert not any("parametrizations" in k for k in load_file(tmp_path / "model.safetensors"))
    loaded = AudioTokenizer.from_pretrained(tmp_path)
    assert loaded.config == tok.config
    x = make_audio(5000)
    assert torch.equal(loaded.encode(x, 24000).codes, tok.encode(x, 24000).codes)


def test_strict_loading_names_the_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    tok = random_tokenizer("tiny-44khz")
    tok.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    bad = dict(weights)
    del bad["decoder.conv2.bias"]
    bad["encoder.extra.weight"] = torch.zeros(1)
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: decoder\.conv2\.bias.*unexpected keys: encoder\.extra"):
        AudioTokenizer.from_pretrained(tmp_path)
    bad = dict(weights)
    bad["quantizer.quantizers.0.codebook.weight"] = torch.zeros(10, 4)
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"quantizers\.0\.codebook\.weight: checkpoint \(10, 4\)"):
        AudioTokenizer.from_pretrained(tmp_path)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    random_tokenizer("tiny-44khz").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["config"] = DACConfig.preset("tiny-24khz").to_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architecture_hash .* does not match its config"):
        AudioTokenizer.from_pretrained(tmp_path)  # the stored hash is verified on load
    cfg["config"]["decoder_dim"] = 16  # another architecture, relabelled with its own hash: the weights do not fit
    cfg["architecture_hash"] = DACConfig.from_dict(cfg["config"]).architecture_hash()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="another model"):
        AudioTokenizer.from_pretrained(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/audiotok_pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pth_loading_never_runs_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "metadata": _Evil()}, f)
    if os.path.exists("/tmp/audiotok_pwned"):
        os.remove("/tmp/audiotok_pwned")
    with pytest.raises(ValueError, match="weights_only"):
        AudioTokenizer.from_pretrained(path)
    assert not os.path.exists("/tmp/audiotok_pwned")


def test_unknown_or_broken_sources(tmp_path):
    with pytest.raises(FileNotFoundError):
        AudioTokenizer.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "encodec"}))
    with pytest.raises(ValueError, match="model_type='encodec'"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_checkpoint(tmp_path)


def test_export_transformers_refuses_what_it_cannot_represent(tmp_path):
    tok = random_tokenizer(DACConfig.preset("tiny-44khz", latent_dim=16))
    with pytest.raises(ValueError, match="latent"):
        tok.export_transformers(tmp_path)


def test_default_model_error_says_so(monkeypatch, tmp_path):
    import audiotok.weights.hub as hub

    monkeypatch.setattr(hub, "PRETRAINED_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="ships no default model"):
        AudioTokenizer.from_pretrained()


def test_plain_weights_survive_the_trainable_weight_norm_round_trip():
    from conftest import random_tokenizer

    from audiotok.weights.checkpoint import fold_state_dict, load_weights

    plain = random_tokenizer(DACConfig.preset("tiny-44khz"), seed=3).model.state_dict()
    parametrized = load_weights(build_model(random_tokenizer(DACConfig.preset("tiny-44khz"), seed=4).checkpoint(),
                                            folded=False), plain)
    back = fold_state_dict(parametrized.state_dict())
    assert back.keys() == plain.keys() and all(torch.equal(back[k], plain[k]) for k in plain)


def test_an_earlier_bundled_model_id_says_so():
    """.atok files name the model that wrote them; an earlier release's bundled model is not here."""
    with pytest.raises(FileNotFoundError, match="not the model this audiotok release bundles"):
        AudioTokenizer.from_pretrained("audiotok-24khz-v0")


@pytest.mark.parametrize("model_id", SAME_CODES_AS)
def test_an_earlier_bundled_model_with_the_same_codes_loads_the_bundled_one(model_id):
    tok = AudioTokenizer.from_pretrained(model_id)
    assert tok.model_id == DEFAULT_MODEL_ID


def test_hub_id_offline_cached_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        AudioTokenizer.from_pretrained("descript/dac_44khz")
    # A cache laid out as huggingface_hub writes it: refs/main -> snapshots/<revision>/
    repo = tmp_path / "models--descript--dac_16khz"
    snapshot = repo / "snapshots" / ("a" * 40)
    random_tokenizer("tiny-16khz").export_transformers(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    tok = AudioTokenizer.from_pretrained("dac_16khz")
    assert tok.model_id == "dac_16khz" and tok.sample_rate == 16000


def test_notice_is_saved_and_logged_once_per_process_when_the_model_encodes(tmp_path, caplog, monkeypatch):
    from audiotok.tokenizer import NOTICE_ENV
    from audiotok.weights.checkpoint import save_folder

    tok = random_tokenizer("tiny-16khz")
    checkpoint = tok.checkpoint()
    checkpoint.notice = f"an early checkpoint, not for production ({tmp_path.name})"
    save_folder(checkpoint, tmp_path)
    audio = make_audio(1600)

    def notices(action) -> int:
        caplog.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a log line, not a Python warning with a source line
            with caplog.at_level(logging.WARNING, logger="audiotok"):
                action()
        shown = [r for r in caplog.records if checkpoint.notice in r.getMessage()]
        assert all(r.levelno == logging.WARNING for r in shown)
        return len(shown)

    loaded = AudioTokenizer.from_pretrained(tmp_path)
    assert loaded.notice == checkpoint.notice
    assert notices(lambda: AudioTokenizer.from_pretrained(tmp_path).decode(tok.encode(audio, 16000))) == 0
    with monkeypatch.context() as env:
        env.setenv(NOTICE_ENV, "1")  # its own switch
        assert notices(lambda: loaded.encode(audio, 16000)) == 0
        env.setenv(NOTICE_ENV, "0")
        env.setenv("RANK", "1")  # a torchrun rank but the first
        assert notices(lambda: loaded.encode(audio, 16000)) == 0
    assert notices(lambda: loaded.encode(audio, 16000)) == 1
    assert notices(lambda: AudioTokenizer.from_pretrained(tmp_path).encode(audio, 16000)) == 0  # once per process

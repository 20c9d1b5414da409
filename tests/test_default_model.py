"""The model that ships inside the package: loads offline with no argument, and round-trips."""

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from audiotok import AudioTokenizer, cli
from audiotok.checkpoint import codes_fingerprint, load_checkpoint
from audiotok.codefile import CodeFile
from audiotok.hub import DEFAULT_MODEL_ID, PRETRAINED_DIR, SAME_CODES_AS
from audiotok.metrics import codebook_utilization, mel_distance

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "speech.flac"


def test_default_model_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AudioTokenizer.from_pretrained()
    assert "early" in tok.notice  # says so (logged once per process) while it is an early checkpoint
    assert tok.model_id == DEFAULT_MODEL_ID
    assert (tok.sample_rate, tok.n_codebooks, tok.codebook_size) == (24000, 10, 1024)
    assert tok.config.bitrate() <= 8000
    assert (PRETRAINED_DIR / "default" / "model.safetensors").stat().st_size < 40e6
    same = AudioTokenizer.from_pretrained(DEFAULT_MODEL_ID)
    alias = AudioTokenizer.from_pretrained("default")
    assert same.model_id == alias.model_id == DEFAULT_MODEL_ID
    assert all(torch.equal(a, b) for a, b in zip(tok.model.state_dict().values(), same.model.state_dict().values()))


def test_default_model_writes_the_codes_of_the_models_it_stands_in_for():
    weights = load_checkpoint(PRETRAINED_DIR / "default").state_dict
    fingerprint = codes_fingerprint(weights)
    assert all(fingerprint == theirs for theirs in SAME_CODES_AS.values()), (fingerprint, SAME_CODES_AS)
    decoder = next(k for k in weights if k.startswith("decoder."))
    quantizer = next(k for k in weights if k.startswith("quantizer."))
    assert codes_fingerprint({**weights, decoder: weights[decoder] + 1}) == fingerprint
    assert codes_fingerprint({**weights, quantizer: weights[quantizer] + 1e-6}) != fingerprint


def test_default_model_round_trip_and_cli(tmp_path):
    audio, sr = sf.read(EXAMPLE, dtype="float32")
    tok = AudioTokenizer.from_pretrained()
    enc = tok.encode(audio, sr)
    decoded = tok.decode(enc)
    assert decoded.shape == (1, 1, round(len(audio) * tok.sample_rate / sr))
    assert torch.isfinite(decoded).all() and decoded.abs().max() > 0.01
    # The CLI's default model, and decoding a code file without naming the model.
    assert cli.main(["encode", str(EXAMPLE), str(tmp_path / "speech.atok"), "--no-progress"]) == 0
    assert cli.main(["decode", str(tmp_path / "speech.atok"), str(tmp_path / "speech.wav"), "--no-progress"]) == 0
    wav, wav_sr = sf.read(tmp_path / "speech.wav", dtype="float32")
    assert wav_sr == tok.sample_rate
    torch.testing.assert_close(torch.from_numpy(wav), decoded[0, 0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("model_id", SAME_CODES_AS)
def test_code_files_of_an_earlier_model_with_the_same_codes_decode(tmp_path, model_id):
    audio, sr = sf.read(EXAMPLE, dtype="float32")
    tok = AudioTokenizer.from_pretrained()
    enc = tok.encode(audio, sr)
    expected = tok.decode(enc)[0, 0]
    tok.model_id = model_id  # as that model wrote it
    CodeFile.from_encoded(tok, enc).save(tmp_path / "old.atok")
    assert cli.main(["decode", str(tmp_path / "old.atok"), str(tmp_path / "old.wav"), "--no-progress"]) == 0
    wav, _ = sf.read(tmp_path / "old.wav", dtype="float32")
    torch.testing.assert_close(torch.from_numpy(wav), expected, rtol=0, atol=1e-4)


def test_default_model_codes_carry_the_input():
    """Guards against shipping a collapsed model, whose codebooks use one code each and whose output
    does not depend on the input (as the first v0 checkpoint did)."""
    audio, sr = sf.read(EXAMPLE, dtype="float32")
    assert sr == 24000  # the model's rate: no resampling in the comparison below
    tok = AudioTokenizer.from_pretrained()
    enc = tok.encode(audio, sr)
    utilization = codebook_utilization(enc.codes, tok.codebook_size, enc.lengths)
    assert utilization.overall > 0.3 and utilization.per_codebook[0] > 0.3, utilization  # collapsed: 0.0
    own = mel_distance(tok.decode(enc)[0, 0], audio, sr)
    # The same sounds in another order: a model that ignores its input does as well on it.
    other = mel_distance(tok.decode(tok.encode(audio[::-1].copy(), sr))[0, 0], audio, sr)
    assert own < 0.7 * other, (own, other)


def test_default_model_decodes_in_bf16_close_to_float32():
    """A bf16 decoder keeps its last block and output layer in float32: all-bf16 adds a noise floor
    (mel distance to the float32 output about 0.6 on this clip, against 0.02 with the float32 tail)."""
    audio, sr = sf.read(EXAMPLE, dtype="float32")
    tok = AudioTokenizer.from_pretrained()
    enc = tok.encode(audio, sr)
    reference = tok.decode(enc)[0, 0]
    tok.to(decoder_dtype=torch.bfloat16)
    assert tok.model.decoder.conv1.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for m in tok.model.decoder.float32_tail() for p in m.parameters())
    assert mel_distance(tok.decode(enc)[0, 0], reference, sr) < 0.1


def test_info_and_help_name_the_bundled_model_and_the_aliases(capsys):
    assert cli.main(["info"]) == 0
    fields = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert fields["model_id"] == DEFAULT_MODEL_ID and fields["aliases"] == "default"
    assert "dac_16khz, 16khz = descript/dac_16khz" in fields["model_names"]
    assert cli.main(["info", "default", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_id"] == DEFAULT_MODEL_ID
    with pytest.raises(SystemExit):
        cli.main(["encode", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert f"default = {DEFAULT_MODEL_ID} (bundled)" in usage and "dac_44khz, 44khz = descript/dac_44khz" in usage
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert f"default = {DEFAULT_MODEL_ID} (bundled)" in " ".join(capsys.readouterr().out.split())

"""The model that ships inside the package: loads offline with no argument, and round-trips."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from audiotok import AudioTokenizer, CodecIdentity, cli
from audiotok.formats.codefile import CodeFile
from audiotok.metrics import codebook_utilization, mel_distance
from audiotok.weights.checkpoint import codes_fingerprint, load_checkpoint
from audiotok.weights.hub import DEFAULT_MODEL_ID, PRETRAINED_DIR, SAME_CODES_AS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "speech.flac"
DATA = Path(__file__).resolve().parent / "data"
#: The first 2 s of EXAMPLE encoded by the float32 weights the bundled fp16 ones were rounded from (the
#: training run's moving average of its weights), and their float32 decode of it (FLAC, 24-bit: 128 dB SNR).
FP32_CODES, FP32_DECODED = DATA / "speech-2s-v0.6-fp32.atok", DATA / "speech-2s-v0.6-fp32-decoded.flac"
#: The same 2 s as earlier bundled models (float32 weights) coded them, by model id.
EARLIER_CODES = {f"audiotok-24khz-{v}": DATA / f"speech-2s-{v}-fp32.atok" for v in ("v0.3", "v0.4", "v0.5")}

#: The bundled weights are stored in fp16 and upcast on loading. Their fingerprint, and the one of the
#: float32 weights they were rounded from, whose codes they decode.
FINGERPRINT, FP32_FINGERPRINT = "985648103ae2931a", "4ad35b4007468308"
#: Decoding the same codes with the fp16-stored weights against the float32 ones: SNR in dB (measured
#: 68.3 dB on FP32_CODES) and the largest sample difference on FP32_CODES (measured 1.3e-04).
DECODE_SNR_DB, DECODE_MAX_ABS = 60.0, 1e-3


def test_default_model_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AudioTokenizer.from_pretrained()
    assert "early" in tok.notice  # says so (logged once per process) while it is an early checkpoint
    assert tok.model_id == DEFAULT_MODEL_ID
    assert (tok.sample_rate, tok.n_codebooks, tok.codebook_size) == (24000, 10, 1024)
    assert tok.config.bitrate() <= 8000
    weights = PRETRAINED_DIR / "default" / "model.safetensors"
    assert weights.stat().st_size < 20e6  # 9.5M parameters in fp16
    assert {v.dtype for v in load_file(weights).values()} == {torch.float16}
    assert {p.dtype for p in tok.model.parameters()} == {torch.float32}  # upcast on loading
    same = AudioTokenizer.from_pretrained(DEFAULT_MODEL_ID)
    alias = AudioTokenizer.from_pretrained("default")
    assert same.model_id == alias.model_id == DEFAULT_MODEL_ID
    assert all(torch.equal(a, b) for a, b in zip(tok.model.state_dict().values(), same.model.state_dict().values()))


def test_default_model_decodes_the_codes_of_the_models_it_stands_in_for():
    checkpoint = load_checkpoint(PRETRAINED_DIR / "default")
    weights = checkpoint.state_dict
    fingerprint = codes_fingerprint(weights)
    assert fingerprint == FINGERPRINT == AudioTokenizer.from_pretrained().codes_fingerprint
    assert checkpoint.decodes_codes_of == (FP32_FINGERPRINT,)
    assert set(SAME_CODES_AS.values()) <= set(checkpoint.decodes_codes_of), SAME_CODES_AS
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
    old = CodeFile.from_encoded(tok, enc)  # as that model wrote it:
    dataclasses.replace(old, codec=CodecIdentity(model_id, old.codec.config_hash, SAME_CODES_AS[model_id])).save(
        tmp_path / "old.atok")
    assert cli.main(["decode", str(tmp_path / "old.atok"), str(tmp_path / "old.wav"), "--no-progress"]) == 0
    wav, _ = sf.read(tmp_path / "old.wav", dtype="float32")
    torch.testing.assert_close(torch.from_numpy(wav), expected, rtol=0, atol=1e-4)


def snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    return 10 * math.log10(float((reference ** 2).sum()) / float(((reference - other) ** 2).sum()))


def test_code_files_of_the_float32_weights_decode_within_tolerance(tmp_path):
    """Code files written with the float32 weights (fingerprint FP32_FINGERPRINT) decode with the
    fp16-stored weights, by the API and the CLI, within DECODE_SNR_DB of the float32 decode."""
    old = CodeFile.load(FP32_CODES)
    assert (old.codec.model_id, old.codec.codes_fingerprint) == (DEFAULT_MODEL_ID, FP32_FINGERPRINT)
    reference = torch.from_numpy(sf.read(FP32_DECODED, dtype="float32")[0])
    tok = AudioTokenizer.from_pretrained()
    decoded = tok.decode(old.to_encoded())[0, 0]
    assert snr_db(reference, decoded) >= DECODE_SNR_DB, snr_db(reference, decoded)
    assert (reference - decoded).abs().max() <= DECODE_MAX_ABS
    assert cli.main(["decode", str(FP32_CODES), str(tmp_path / "old.wav"), "--subtype", "FLOAT", "--no-progress"]) == 0
    wav = torch.from_numpy(sf.read(tmp_path / "old.wav", dtype="float32")[0])
    assert snr_db(reference, wav) >= DECODE_SNR_DB
    # Any other fingerprint is still refused: the bundled model does not decode every file of its id.
    other = dataclasses.replace(old, codec=dataclasses.replace(old.codec, codes_fingerprint="0123456789abcdef"))
    other.save(tmp_path / "other.atok")
    assert cli.main(["decode", str(tmp_path / "other.atok"), str(tmp_path / "other.wav"), "--no-progress"]) != 0
    with pytest.raises(ValueError, match="same architecture with other weights"):
        tok.decode(other.to_encoded())


def test_default_model_writes_nearly_the_codes_of_the_float32_weights():
    """Rounding the encoder and quantizer to fp16 can move a few codes (none on this clip: 100.0% are
    identical), so the bundled model has a fingerprint of its own."""
    audio, sr = sf.read(EXAMPLE, dtype="float32")
    old = CodeFile.load(FP32_CODES)
    enc = AudioTokenizer.from_pretrained().encode(audio[: 2 * sr], sr)
    assert enc.codec is not None and enc.codec.codes_fingerprint == FINGERPRINT
    same = enc.codes[0] == old.codes[0]
    assert same.float().mean() >= 0.99 and same[0].float().mean() >= 0.995, same.float().mean(-1)


@pytest.mark.parametrize("model_id", sorted(EARLIER_CODES))
def test_code_files_of_earlier_models_are_refused_with_what_to_do(model_id, tmp_path, capsys):
    """v0.4 re-trained v0.3's encoder and quantizer, and v0.5 and v0.6 trained them further: earlier
    codes mean other sounds to the bundled model. Decoding them is refused, naming both models; asking for
    an earlier model by name says which build bundles it."""
    old = CodeFile.load(EARLIER_CODES[model_id])
    assert old.codec.model_id == model_id and model_id not in SAME_CODES_AS
    refusal = f"codes of model '{model_id}'.*not those of model '{DEFAULT_MODEL_ID}'"
    with pytest.raises(ValueError, match=refusal):
        AudioTokenizer.from_pretrained().decode(old.to_encoded())
    assert cli.main(["decode", str(EARLIER_CODES[model_id]), str(tmp_path / "old.wav"), "--no-progress"]) == 2
    assert "give the model that wrote the codes with --model" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not the model this audiotok release bundles"):
        AudioTokenizer.from_pretrained(model_id)


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

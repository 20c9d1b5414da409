"""Weights stored in fp16 or bf16: loaded upcast, written by every checkpoint writer, and a copy
rounded from other weights decodes their codes (``decodes_codes_of``) within a stated tolerance."""

import json
import math

import pytest
import torch
from conftest import make_audio, random_tokenizer
from safetensors.torch import load_file, save_file

from audiotok import AudioTokenizer, cli
from audiotok.formats.codefile import CodeFile
from audiotok.weights.checkpoint import cast_weights, codes_fingerprint, load_checkpoint

#: Decoding the same codes with weights stored in fp16 against the float32 original, on the tiny random
#: model (measured 56 to 60 dB over seeds 0-3; bf16, with 8 bits of mantissa against fp16's 11, 39 to 42
#: dB). The bundled model has its own, tighter tolerance (tests/test_default_model.py).
FP16_DECODE_SNR_DB = 50.0


def snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    return 10 * math.log10(float((reference ** 2).sum()) / max(float(((reference - other) ** 2).sum()), 1e-30))


@pytest.fixture
def tok():
    return random_tokenizer("tiny-24khz")


@pytest.fixture
def audio():
    return make_audio(24000)


def test_fp16_folder_is_half_the_size_and_loads_as_float32(tmp_path, tok):
    tok.save_pretrained(tmp_path / "fp32")
    tok.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    stored = load_file(tmp_path / "fp16" / "model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16}
    sizes = [(tmp_path / name / "model.safetensors").stat().st_size for name in ("fp32", "fp16")]
    assert sizes[1] < 0.52 * sizes[0], sizes
    loaded = AudioTokenizer.from_pretrained(tmp_path / "fp16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    # exactly the stored values, upcast
    weights = loaded.model.state_dict()
    assert all(torch.equal(weights[k], v.float()) for k, v in stored.items())
    # the dtype asked for still wins (the decoder's float32 tail aside)
    half = AudioTokenizer.from_pretrained(tmp_path / "fp16", dtype=torch.bfloat16)
    assert half.model.encoder.conv1.weight.dtype == torch.bfloat16
    assert half.codes_fingerprint == loaded.codes_fingerprint  # taken before the cast


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_any_folder_with_half_precision_tensors_loads_upcast(tmp_path, tok, audio, dtype):
    """A folder written by another tool (here: the safetensors file rewritten in half precision, no
    ``decodes_codes_of``) loads too, and runs as the rounded weights would in float32."""
    tok.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v.to(dtype) for k, v in weights.items()}, tmp_path / "model.safetensors")
    checkpoint = load_checkpoint(tmp_path)
    assert {v.dtype for v in checkpoint.state_dict.values()} == {torch.float32}
    assert checkpoint.decodes_codes_of == ()
    loaded = AudioTokenizer.from_pretrained(tmp_path)
    rounded = {k: v.to(dtype).float() for k, v in tok.model.state_dict().items()}
    assert loaded.codes_fingerprint == codes_fingerprint(rounded) != tok.codes_fingerprint


def test_fp16_copy_decodes_the_originals_codes_within_tolerance(tmp_path, tok, audio):
    tok.save_pretrained(tmp_path, dtype="fp16")
    copy = AudioTokenizer.from_pretrained(tmp_path)
    # Rounding moved the encoder and quantizer weights: another fingerprint, which records the original's.
    assert copy.codes_fingerprint != tok.codes_fingerprint
    assert json.loads((tmp_path / "config.json").read_text())["decodes_codes_of"] == [tok.codes_fingerprint]
    assert copy.decodes_codes_of == (tok.codes_fingerprint,)
    encoded = tok.encode(audio, 24000)
    reference = tok.decode(encoded)
    decoded = copy.decode(encoded)  # the original's EncodedAudio: accepted
    assert reference.abs().mean() > 0.05  # not a comparison between near-silent signals
    assert snr_db(reference, decoded) >= FP16_DECODE_SNR_DB
    assert not torch.equal(reference, decoded)  # the weights did change
    # The codes mostly agree; the copy's own encodings record its own fingerprint.
    own = copy.encode(audio, 24000)
    assert own.codec == copy.identity
    assert (own.codes == encoded.codes).float().mean() > 0.95


def test_bf16_copy_is_further_from_float32_than_the_fp16_tolerance(tmp_path, tok, audio):
    """The tolerance above tells fp16 from bf16 storage (and so can fail)."""
    tok.save_pretrained(tmp_path, dtype=torch.bfloat16)
    copy = AudioTokenizer.from_pretrained(tmp_path)
    encoded = tok.encode(audio, 24000)
    copy.check_codec(tok.identity, "the test holds")  # it decodes the codes of the weights it was rounded from
    assert snr_db(tok.decode(encoded), copy.decode(encoded)) < FP16_DECODE_SNR_DB


def test_code_files_of_the_original_decode_with_the_copy_and_others_are_refused(tmp_path, tok, audio):
    import soundfile as sf

    tok.save_pretrained(tmp_path / "original")
    tok.save_pretrained(tmp_path / "copy", dtype=torch.float16)
    copy = AudioTokenizer.from_pretrained(tmp_path / "copy")
    sf.write(tmp_path / "in.wav", audio[0], 24000, subtype="FLOAT")
    assert cli.main(["encode", str(tmp_path / "in.wav"), str(tmp_path / "x.atok"), "--model",
                     str(tmp_path / "original"), "--no-progress"]) == 0
    code_file = CodeFile.load(tmp_path / "x.atok")
    assert code_file.codec.codes_fingerprint == tok.codes_fingerprint
    code_file.check_compatible(copy)
    assert cli.main(["decode", str(tmp_path / "x.atok"), str(tmp_path / "x.wav"), "--model",
                     str(tmp_path / "copy"), "--no-progress"]) == 0
    # Another model of the same architecture: refused, with the message that says why.
    other = random_tokenizer("tiny-24khz", seed=1)
    with pytest.raises(ValueError, match="other weights, whose codes mean other sounds"):
        code_file.check_compatible(other)
    with pytest.raises(ValueError, match="same architecture with other weights"):
        other.decode(tok.encode(audio, 24000))
    # The original does not decode the copy's codes silently either: it is not the copy's rounding.
    with pytest.raises(ValueError, match="same architecture with other weights"):
        tok.decode(copy.encode(audio, 24000))
    # A code file names the weights that wrote its codes: not written for codes of other weights.
    with pytest.raises(ValueError, match="same architecture with other weights.* Use the model that wrote them"):
        CodeFile.from_encoded(copy, tok.encode(audio, 24000))


def test_decodes_codes_of_survives_saving_again_and_every_format(tmp_path, tok):
    tok.save_pretrained(tmp_path / "copy", dtype="fp16")
    copy = AudioTokenizer.from_pretrained(tmp_path / "copy")
    copy.save_pretrained(tmp_path / "again")  # float32, as loaded: the same weights, the same list
    copy.export_transformers(tmp_path / "hf", dtype="fp16")
    copy.export_original(tmp_path / "o.pth", dtype="fp16")
    for source in ("again", "hf"):
        loaded = AudioTokenizer.from_pretrained(tmp_path / source)
        assert loaded.codes_fingerprint == copy.codes_fingerprint, source
        assert loaded.decodes_codes_of == (tok.codes_fingerprint,), source
    # The original format stores weight norm's (g, v), each rounded: the folded weights move again.
    loaded = AudioTokenizer.from_pretrained(tmp_path / "o.pth")
    assert loaded.codes_fingerprint != copy.codes_fingerprint
    assert loaded.decodes_codes_of == (tok.codes_fingerprint, copy.codes_fingerprint)
    assert {v.dtype for v in load_file(tmp_path / "hf" / "model.safetensors").values()} == {torch.float16}
    blob = torch.load(tmp_path / "o.pth", weights_only=True)
    assert {v.dtype for v in blob["state_dict"].values()} == {torch.float16}
    # A model saved at the precision it already has lists nothing new (not its own fingerprint).
    tok.save_pretrained(tmp_path / "plain")
    assert "decodes_codes_of" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_cli_convert_dtype_and_info(tmp_path, tok, capsys):
    tok.save_pretrained(tmp_path / "src")
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "audiotok",
                     "--dtype", "fp16"]) == 0
    sizes = [(tmp_path / name / "model.safetensors").stat().st_size for name in ("src", "dst")]
    assert sizes[1] < 0.52 * sizes[0], sizes
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "dst"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["decodes_codes_of"] == tok.codes_fingerprint
    assert info["codes_fingerprint"] != tok.codes_fingerprint
    with pytest.raises(SystemExit):
        cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "x"), "--to", "audiotok", "--dtype", "int8"])


def test_weights_out_of_fp16_range_are_refused(tok):
    weights = dict(tok.model.state_dict())
    weights["decoder.conv2.weight"] = weights["decoder.conv2.weight"] * 1e6
    with pytest.raises(ValueError, match="beyond the range of torch.float16"):
        cast_weights(weights, torch.float16)
    with pytest.raises(ValueError, match="weights are stored as fp32, fp16, bf16"):
        cast_weights(weights, "int8")
    stored, _ = cast_weights(weights, torch.bfloat16)  # bf16 has float32's range
    assert torch.isfinite(stored["decoder.conv2.weight"]).all()


def test_a_broken_decodes_codes_of_is_an_error(tmp_path, tok):
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for bad in ("98443b3c04d63f4f", ["not-a-fingerprint"], [None]):
        config["decodes_codes_of"] = bad
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="decodes_codes_of"):
            load_checkpoint(tmp_path)

"""Adversarial input, case by case (the matrix in SECURITY.md): untrusted code files and model folders,
ambiguous or out-of-range audio, edited encodings, paths taken from data, and how the CLI fails."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import make_audio, random_tokenizer

import audiotok.weights.hub
from audiotok import AudioTokenizer, CodecIdentity
from audiotok.audio import load_audio
from audiotok.cli import main
from audiotok.cli.files import decode_path
from audiotok.formats.codefile import CodeFile
from audiotok.utils.untrusted import shown

SR = 44100


@pytest.fixture(scope="module")
def tok() -> AudioTokenizer:
    return random_tokenizer("tiny-44khz", seed=0)


@pytest.fixture(scope="module")
def twin() -> AudioTokenizer:
    """The same architecture as ``tok`` with other weights."""
    return random_tokenizer("tiny-44khz", seed=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny"
    tok.save_pretrained(folder)
    return folder


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------------------------------------
# Audio


def test_audio_as_soundfile_returns_it_is_refused(tok):
    audio = make_audio(SR // 2, channels=2).T  # [T, C] = [22050, 2]
    with pytest.raises(ValueError, match=r"looks like \[T, C\].*pass audio.T"):
        tok.encode(audio, SR)
    with pytest.raises(ValueError, match="audio.T"):
        tok.encode([audio], SR)
    assert tok.encode(audio.T, SR).codes.shape[-1] == -(-SR // 2 // tok.hop_length)


@pytest.mark.parametrize("scale, message", [(2**15, "integer PCM in a float array.*32768"),
                                            (1e6, "peak amplitude 1e\\+06")])
def test_loud_audio_warns(tok, scale, message):
    audio = make_audio(4000)
    if scale == 2**15:
        audio = np.round(audio * scale)  # int16 values in a float array
    else:
        audio = audio * scale / np.abs(audio).max()
    with pytest.warns(UserWarning, match=message):
        tok.encode(audio, SR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode(make_audio(4000), SR)  # audio in [-1, 1]: no warning
        tok.encode((make_audio(4000) * 2**15).astype(np.int16), SR)  # int16 arrays are scaled


def test_huge_amplitude_is_an_error_not_zero_codes(tok):
    audio = np.full((1, 4000), 3e38, dtype=np.float32)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="non-finite latents"):
        tok.encode(audio, SR)


def test_nan_weights_are_an_error_on_decode(tok):
    broken = random_tokenizer("tiny-44khz", seed=0)
    with torch.no_grad():
        broken.model.decoder.conv2.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite audio"):
        broken.decode(tok.encode(make_audio(4000), SR).codes)


@pytest.mark.parametrize("rate", [1, 999, 2**50, 10**7])
def test_sample_rates_are_bounded(tok, rate):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="sample_rate"):
        tok.encode(make_audio(4000), rate)
    assert time.perf_counter() - start < 5


def test_resampling_factor_is_bounded():
    from audiotok.audio import resample

    with pytest.raises(ValueError, match="factor above 64"):
        resample(make_audio(100), 1000, 768_000)


def test_truncated_wav_warns(tmp_path):
    path = tmp_path / "t.wav"
    sf.write(path, make_audio(8000)[0], 16000, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="truncated"):
        audio, _ = load_audio(path)
    assert 3900 < audio.shape[1] < 4100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sf.write(path, make_audio(8000)[0], 16000, subtype="PCM_16")
        load_audio(path)


def test_threads_encode_as_serial_work(tok):
    from concurrent.futures import ThreadPoolExecutor

    clips = [make_audio(3000 + 500 * i, seed=i) for i in range(8)]
    serial = [tok.encode(c, SR).codes for c in clips]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda c: tok.encode(c, SR).codes, clips))
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))


# ---------------------------------------------------------------------------------------------
# Arguments and edited encodings


@pytest.mark.parametrize("kwargs, message", [
    ({"n_quantizers": 2.0}, "n_quantizers must be an integer"),
    ({"n_quantizers": True}, "n_quantizers must be an integer"),
    ({"chunk_seconds": float("nan")}, "chunk_seconds"),
    ({"batch_seconds": "10"}, "batch_seconds"),
])
def test_bad_encode_arguments(tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tok.encode(make_audio(4000), SR, **kwargs)


@pytest.mark.parametrize("edit, message", [
    (lambda e: {"lengths": e.lengths + 100}, "exceed"),
    (lambda e: {"lengths": torch.zeros_like(e.lengths)}, "lengths must be positive"),
    (lambda e: {"lengths": e.lengths.float()}, "integer tensor"),
    (lambda e: {"lengths": e.lengths[:0]}, r"\[B\]"),
    (lambda e: {"num_samples": torch.zeros_like(e.num_samples)}, "num_samples must be positive"),
    (lambda e: {"sample_rate": 0}, "sample_rate"),
    (lambda e: {"sample_rate": 2**50}, "sample_rate"),
    (lambda e: {"codes": e.codes[0]}, r"\[B, K, F\]"),
    (lambda e: {"codec": dataclasses.replace(e.codec, config_hash="0" * 16)}, "config hash"),
])
def test_edited_encodings_are_value_errors(tok, edit, message):
    encoded = tok.encode(make_audio(4000, batch=2), SR)
    with pytest.raises(ValueError, match=message):
        tok.decode(dataclasses.replace(encoded, **edit(encoded)))


def test_decode_checks_the_model_that_encoded(tok, twin):
    encoded = tok.encode(make_audio(4000), SR)
    assert encoded.codec == CodecIdentity("random", tok.config.architecture_hash(), tok.codes_fingerprint)
    assert tok.codes_fingerprint != twin.codes_fingerprint
    with pytest.raises(ValueError, match="same architecture with other weights"):
        twin.decode(encoded)
    torch.testing.assert_close(twin.decode(encoded, allow_other_weights=True), twin.decode(encoded.codes)[..., :4000])
    other = random_tokenizer("tiny-24khz")
    with pytest.raises(ValueError, match="config hash"):
        other.decode(encoded, allow_other_weights=True)
    with pytest.raises(ValueError, match="same architecture with other weights"):
        CodeFile.from_encoded(twin, encoded)  # a code file never names a model that did not write its codes


def test_the_fingerprint_is_that_of_the_weights_not_their_dtype(tok):
    half = random_tokenizer("tiny-44khz", seed=0).to(dtype=torch.bfloat16)
    assert half.codes_fingerprint == tok.codes_fingerprint


# ---------------------------------------------------------------------------------------------
# Model folders (config.json is untrusted)


def _edited(model_dir: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(model_dir / "model.safetensors")
    data = json.loads((model_dir / "config.json").read_text())
    edit(data)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("config"), "no 'config' entry"),
    (lambda d: d["config"].update(encoder_rates=320), "encoder_rates must be a list of integers"),
    (lambda d: d["config"].update(quantizer_dropout="high"), "quantizer_dropout must be a number"),
    (lambda d: d["config"].update(n_codebooks=10_000_000), "n_codebooks=10000000 is above"),
    (lambda d: d["config"].update(decoder_dim=16_777_216), "decoder_dim=16777216 is above"),
    (lambda d: d["config"].update(decoder_dim=32_768, encoder_dim=4096), "billion parameters"),
    (lambda d: d["config"].update(sample_rate=48000), "architecture_hash .* does not match"),
    (lambda d: d.update(config=[1, 2]), "config must be an object"),
    (lambda d: d.update(format_version="9"), "format_version must be an integer, got '9'"),
    (lambda d: d.update(format_version=9), "newer audiotok"),
])
def test_bad_config_json_is_a_value_error_before_any_allocation(model_dir, tmp_path, edit, message):
    folder = _edited(model_dir, tmp_path, edit)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        AudioTokenizer.from_pretrained(folder)
    assert time.perf_counter() - start < 5


def test_transformers_config_values_are_checked_by_name(model_dir, tmp_path):
    folder = tmp_path / "hf"
    AudioTokenizer.from_pretrained(model_dir).export_transformers(folder)
    data = json.loads((folder / "config.json").read_text())
    for key, value, message in [("downsampling_ratios", 320, "encoder_rates"), ("n_codebooks", "9", "n_codebooks")]:
        (folder / "config.json").write_text(json.dumps({**data, key: value}))
        with pytest.raises(ValueError, match=message):
            AudioTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# Code files name a model; they never choose what is loaded


@pytest.mark.parametrize("model_id", ["../../tmp/x", "attacker-org/evil-codec", "descript/dac_44khz"])
def test_a_code_file_never_chooses_the_model(tmp_path, capsys, monkeypatch, tok, model_dir, model_id):
    atok = tmp_path / "x.atok"
    cf = CodeFile.from_encoded(tok, tok.encode(make_audio(4000), SR))
    dataclasses.replace(cf, codec=dataclasses.replace(cf.codec, model_id=model_id)).save(atok)
    loaded = []
    real = AudioTokenizer.from_pretrained.__func__

    def recording(cls, source=None, **kwargs):
        loaded.append(source)
        return real(cls, source, **kwargs)

    monkeypatch.setattr(AudioTokenizer, "from_pretrained", classmethod(recording))
    monkeypatch.setattr(audiotok.weights.hub, "_download", lambda repo: pytest.fail(f"downloaded {repo}"))
    rc, _, err = run(capsys, "decode", atok, tmp_path / "x.wav")
    assert rc == 2 and "bundled" in err and "--model" in err and "Traceback" not in err
    assert loaded == [None]  # the bundled model, never the file's model_id
    assert run(capsys, "decode", atok, tmp_path / "x.wav", "--model", model_dir)[0] == 0


def test_code_files_carry_the_weights_fingerprint(tmp_path, tok, twin):
    atok = CodeFile.from_encoded(tok, tok.encode(make_audio(4000), SR)).save(tmp_path / "x.atok")
    assert CodeFile.load(atok).codec.codes_fingerprint == tok.codes_fingerprint
    with pytest.raises(ValueError, match="same architecture with other weights"):
        decode_path(atok, tmp_path / "x.wav", twin)
    assert not (tmp_path / "x.wav").exists()
    decode_path(atok, tmp_path / "x.wav", twin, allow_other_weights=True)
    assert (tmp_path / "x.wav").exists()
    # files written before the fingerprint existed decode as before
    unrecorded = dataclasses.replace(tok.identity, codes_fingerprint=None)
    old = dataclasses.replace(CodeFile.load(atok), codec=unrecorded).save(tmp_path / "old.atok")
    assert "codes_fingerprint" not in CodeFile.load(old)._metadata("none")
    decode_path(old, tmp_path / "old.wav", twin)


def test_a_bad_fingerprint_in_a_file_is_refused(tmp_path, tok):
    from safetensors.numpy import save_file

    cf = CodeFile.from_encoded(tok, tok.encode(make_audio(4000), SR))
    meta = {**cf._metadata("none"), "codes_fingerprint": "../../etc"}
    save_file({"codes": cf.codes.numpy().astype(np.uint16)}, tmp_path / "x.atok", metadata=meta)
    with pytest.raises(ValueError, match="codes_fingerprint"):
        CodeFile.load(tmp_path / "x.atok")


# ---------------------------------------------------------------------------------------------
# The command line: one line per failure, distinct exit codes


def test_cli_exit_codes(tmp_path, capsys, monkeypatch, model_dir):
    src = tmp_path / "a.wav"
    sf.write(src, make_audio(4000)[0], SR)
    for usage_error in (["encode", str(src)], ["frobnicate"], ["decode", "a", "b", "--format", "mp3"]):
        with pytest.raises(SystemExit) as exit_:
            main(usage_error)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("audiotok: error:"), err
    fifo = tmp_path / "fifo.wav"
    os.mkfifo(fifo)
    rc, _, err = run(capsys, "encode", fifo, tmp_path / "x.atok", "--model", model_dir)
    assert rc == 2 and "not a regular file or folder" in err
    import audiotok.cli.files

    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(audiotok.cli.files, "encode_path", bug)
    rc, _, err = run(capsys, "encode", src, tmp_path / "x.atok", "--model", model_dir)
    assert rc == 3 and err.count("\n") == 1 and "internal error (ZeroDivisionError" in err


def test_long_file_names_encode(tmp_path, capsys, model_dir):
    src = tmp_path / ("n" * 240 + ".wav")
    sf.write(src, make_audio(4000)[0], SR)
    rc, _, err = run(capsys, "encode", src, tmp_path, "--model", model_dir)
    assert rc == 0, err
    assert (tmp_path / ("n" * 240 + ".atok")).is_file()


def test_truncated_wav_warns_in_one_line(tmp_path, capsys, model_dir):
    src = tmp_path / "t.wav"
    sf.write(src, make_audio(8000)[0], SR, subtype="PCM_16")
    src.write_bytes(src.read_bytes()[:9000])
    rc, _, err = run(capsys, "encode", src, tmp_path / "t.atok", "--model", model_dir)
    assert rc == 0 and err.startswith("audiotok: warning:") and "truncated" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Paths taken from data


def _manifest(root: Path, rows: list[tuple[str, str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "category", "source", "license", "path", "sr", "channels", "seconds", "format",
                    "subtype"])
        w.writerows(["train", category, "t", "CC0", path, 0, 1, 0, "WAV", ""] for category, path in rows)
    return root


@pytest.mark.parametrize("category, path, message", [
    ("../../x", "a.wav", "not a plain name"),
    ("speech/../..", "a.wav", "not a plain name"),
    ("speech", "../outside.wav", "not a relative path inside"),
    ("speech", "/etc/passwd", "not a relative path inside"),
])
def test_pack_data_stays_inside_its_folders(tmp_path, category, path, message):
    from audiotok.data.config import sources_from_manifest
    from audiotok.data.pack import pack_manifest

    root = _manifest(tmp_path / "corpus", [("speech", "a.wav"), (category, path)])
    sf.write(root / "a.wav", make_audio(48000)[0], 24000)
    with pytest.raises(ValueError, match=message):
        pack_manifest(root, tmp_path / "out" / "packed", excerpt_seconds=1.0)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()
    if category == "speech":
        with pytest.raises(ValueError, match=message):
            sources_from_manifest(root)


def test_pack_data_reads_outside_its_root_only_when_told(tmp_path):
    from audiotok.data.pack import pack_manifest

    outside = tmp_path / "elsewhere" / "b.wav"
    outside.parent.mkdir()
    sf.write(outside, make_audio(48000)[0], 24000)
    root = _manifest(tmp_path / "corpus", [("speech", str(outside)), ("speech", "../elsewhere/b.wav")])
    parts = pack_manifest(root, tmp_path / "packed", excerpt_seconds=1.0, outside_root=True)
    written = [p for p in (tmp_path / "packed").rglob("*") if p.is_file()]
    assert parts and written and all(p.resolve().is_relative_to((tmp_path / "packed").resolve()) for p in written)
    assert not any(p.name.startswith(".") for p in written)


# ---------------------------------------------------------------------------------------------
# Issue 26: stored fields that disagree, text from files, JSON of the wrong shape


def _cli(*args) -> subprocess.CompletedProcess:
    """The installed command line as a user runs it (this checkout's package), in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "audiotok", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def _no_raw_control(text: str) -> bool:
    """No character a terminal acts on, but the newlines that end lines."""
    return all(c.isprintable() for line in text.splitlines() for c in line)


def test_shown_escapes_what_a_terminal_acts_on():
    assert shown("plain é text") == "plain é text"
    evil = "a\x1b[2J\x1b]0;title\x07b\nc\rd\u202ee\udcff"
    assert shown(evil) == "a\\x1b[2J\\x1b]0;title\\x07b\\nc\\rd\\u202ee\\udcff"
    assert shown(shown(evil)) == shown(evil) and shown(evil).isprintable()


def test_a_code_file_whose_rates_disagree_with_its_model_is_refused_by_the_cli(tmp_path, tok, model_dir):
    from safetensors.numpy import save_file

    cf = CodeFile.from_encoded(tok, tok.encode(make_audio(8000), SR))
    edited = {**cf._metadata("none"), "sample_rate": "22050", "source_sample_rate": "22050"}
    del edited["crc32"]  # as a file written before the checksum: only the model can tell
    save_file({"codes": cf.codes.numpy().astype(np.uint16)}, str(tmp_path / "rates.atok"), metadata=edited)
    flipped = cf.codes.numpy().astype(np.uint16)
    flipped[0, 0, 3] ^= 1  # still a valid code
    save_file({"codes": flipped}, str(tmp_path / "flipped.atok"), metadata=cf._metadata("none"))
    for name, message in (("rates", "state sample_rate=22050 \\(the model has 44100\\).*edited or damaged"),
                          ("flipped", "checksum mismatch")):
        proc = _cli("decode", tmp_path / f"{name}.atok", tmp_path / f"{name}.wav", "--model", model_dir)
        assert proc.returncode == 2 and not (tmp_path / f"{name}.wav").exists(), proc.stderr
        assert re.search(f"{name}.atok: .*{message}", proc.stderr) and proc.stderr.count("\n") == 1, proc.stderr
    # In a folder, a damaged file is skipped and listed; the others decode.
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("rates", "flipped"):
        (tmp_path / f"{name}.atok").rename(folder / f"{name}.atok")
    cf.save(folder / "good.atok")
    proc = _cli("decode", folder, tmp_path / "out", "--model", model_dir)
    assert proc.returncode == 1 and "decoded 1 of 3 files; skipped 2" in proc.stdout, proc.stderr
    assert (tmp_path / "out" / "good.wav").exists()


def test_text_from_files_reaches_the_terminal_escaped(tmp_path, tok, model_dir):
    evil = "evil\x1b[2J\x1b[H\nnext line\u202e"
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, "model_id": evil, "notice": evil}))
    cf = CodeFile.from_encoded(tok, tok.encode(make_audio(4000), SR))
    atok = dataclasses.replace(cf, codec=dataclasses.replace(cf.codec, model_id=evil)).save(tmp_path / "x.atok")
    for args in (("info", folder), ("info", atok), ("encode", atok, tmp_path / "y.atok", "--model", folder),
                 ("decode", atok, tmp_path / "x.wav", "--model", tmp_path / "nope"),
                 ("decode", atok, tmp_path / "x.wav")):
        proc = _cli(*args)
        assert "\x1b" not in proc.stdout + proc.stderr and "\u202e" not in proc.stdout + proc.stderr, args
        assert _no_raw_control(proc.stdout) and _no_raw_control(proc.stderr), args
    proc = _cli("info", atok)
    assert proc.returncode == 0 and "evil\\x1b[2J\\x1b[H\\nnext line\\u202e" in proc.stdout
    sf.write(tmp_path / "a.wav", make_audio(4000)[0], SR)
    proc = _cli("encode", tmp_path / "a.wav", tmp_path / "a.atok", "--model", folder, "-q")  # the notice: encoding
    assert "warning: evil\\x1b[2J\\x1b[H\\nnext line\\u202e: evil\\x1b" in proc.stderr  # the notice, one line
    assert proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize("text, message", [
    ("[1]", "config.json: the top level must be an object, got an array"),
    ("[" * 5000 + "]" * 5000, "config.json: JSON nested 5000 deep"),
    ('{"format": "audiotok", "config": {}, "model_id": 5}', "config.json: model_id must be a string, got 5"),
    ('{"format": "audiotok", "config": [1]}', "config.json: config must be an object, got an array"),
    ('{"format": "audiotok"}', "config.json: the file has no 'config' entry"),
    ('{"format": "audiotok", "config": {}, "notice": {"a": 1}}', "notice must be a string or null"),
    ('{"model_type": "dac", "sampling_rate": NaN}', "config.json: not valid JSON \\(NaN is not a number"),
    ('{"model_type": "dac", "_name_or_path": ["x"]}', "_name_or_path must be a string"),
    ("\xff\xfe", "config.json: not UTF-8 text"),
])
def test_config_json_of_the_wrong_shape_is_one_line_naming_the_file(tmp_path, capsys, text, message):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    start = time.perf_counter()
    rc, _, err = run(capsys, "info", folder)
    assert rc == 2 and re.search(message, err) and err.count("\n") == 1, err
    assert "internal error" not in err and time.perf_counter() - start < 5


def test_model_weights_that_disagree_with_config_json_are_refused(model_dir, tmp_path, capsys):
    folder = _edited(model_dir, tmp_path, lambda d: (d.pop("architecture_hash"), d["config"].update(n_codebooks=3)))
    rc, _, err = run(capsys, "info", folder)
    assert rc == 2 and "do not fit this architecture" in err and "unexpected keys" in err

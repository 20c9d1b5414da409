"""The ``audiotok`` command line (audiotok.cli), run in-process and once as ``python -m audiotok``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audiotok import AudioTokenizer, DACConfig, EncodedAudio
from audiotok.cli import main
from audiotok.formats.codefile import CodeFile


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model folder whose stored model_id is its own path (decode never loads it from the codes)."""
    folder = tmp_path_factory.mktemp("model") / "tiny"
    tok = AudioTokenizer.from_config("tiny-44khz", seed=0)
    tok.model_id = str(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok(model_dir) -> AudioTokenizer:
    return AudioTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    """A model with another architecture (other config hash)."""
    folder = tmp_path_factory.mktemp("other") / "wide"
    AudioTokenizer.from_config(DACConfig.preset("tiny-44khz", codebook_dim=8), seed=1).save_pretrained(folder)
    return folder


def write_inputs(root: Path) -> dict[str, Path]:
    """Short test files: mono 44.1 kHz, stereo (independent channels), 22050 Hz mono, and broken ones."""
    rng = np.random.default_rng(0)
    files = {
        "mono": root / "mono.wav",
        "stereo": root / "sub" / "stereo.wav",
        "low": root / "sub" / "deeper" / "low.flac",
    }
    for f in files.values():
        f.parent.mkdir(parents=True, exist_ok=True)
    sf.write(files["mono"], 0.3 * rng.standard_normal(9000), 44100)
    sf.write(files["stereo"], 0.3 * rng.standard_normal((7000, 2)), 44100)
    sf.write(files["low"], 0.3 * rng.standard_normal(5000), 22050)
    (root / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + rng.bytes(40))
    sf.write(root / "sub" / "empty.wav", np.zeros((0, 1)), 44100)
    nan = 0.1 * rng.standard_normal(3000)
    nan[100] = np.nan
    sf.write(root / "sub" / "nan.wav", nan, 44100, subtype="FLOAT")
    (root / "notes.txt").write_text("not audio")
    (root / "._mono.wav").write_bytes(b"\x00\x05\x16\x07" + rng.bytes(60))  # macOS resource fork: ignored
    (root / ".cache").mkdir()
    sf.write(root / ".cache" / "hidden.wav", np.zeros(100), 44100)  # hidden folder: ignored
    return files


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    return write_inputs(tmp_path / "in")


def expected_codes(tok: AudioTokenizer, path: Path, n_quantizers=None) -> tuple[torch.Tensor, EncodedAudio]:
    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    enc = tok.encode(audio.T, sr, n_quantizers)
    return enc.codes[:, :, : int(enc.lengths[0])], enc


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------
# encode / decode of single files


@pytest.mark.parametrize("name", ["mono", "stereo", "low"])
def test_encode_decode_file(tmp_path, capsys, model_dir, tok, inputs, name):
    src = inputs[name]
    atok = tmp_path / "out" / f"{name}.atok"
    rc, out, err = run(capsys, "encode", src, atok, "--model", model_dir)
    assert rc == 0, err
    assert str(atok) in out

    cf = CodeFile.load(atok)
    codes, enc = expected_codes(tok, src)
    assert torch.equal(cf.codes, codes)
    info = sf.info(src)
    assert (cf.num_samples, cf.source_sample_rate, cf.channels) == (info.frames, info.samplerate, info.channels)
    assert cf.codec == tok.identity and cf.codec.model_id == str(model_dir)

    wav = tmp_path / "dec" / f"{name}.wav"
    rc, _, err = run(capsys, "decode", atok, wav, "--model", model_dir)
    assert rc == 0, err
    audio, sr = sf.read(wav, dtype="float32", always_2d=True)
    assert sr == 44100 and audio.shape == (round(info.frames * 44100 / info.samplerate), 1)
    assert sf.info(wav).subtype == "PCM_16"
    expected = tok.decode(enc)[0, 0].numpy()
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(audio[:, 0], np.clip(expected, -1, 1), rtol=0, atol=2**-15)
    rc, _, err = run(capsys, "decode", atok, wav, "--subtype", "float", "--model", model_dir)
    assert rc == 0, err
    np.testing.assert_array_equal(sf.read(wav, dtype="float32")[0], expected)  # exactly what the model produced


def test_decode_sample_rate_and_subtype(tmp_path, capsys, model_dir, tok, inputs):
    atok = tmp_path / "low.atok"
    assert run(capsys, "encode", inputs["low"], atok, "--model", model_dir)[0] == 0
    out = tmp_path / "low.wav"
    for rate, want in (("source", 22050), ("16000", 16000)):
        rc, _, err = run(capsys, "decode", atok, out, "--sample-rate", rate, "--subtype", "PCM_24",
                         "--model", model_dir)
        assert rc == 0, err
        info = sf.info(out)
        assert (info.samplerate, info.frames, info.subtype) == (want, round(5000 * want / 22050), "PCM_24")
    audio, _ = sf.read(out, dtype="float32")
    model_rate, _ = tok.decode(CodeFile.load(atok).to_encoded())[0, 0].numpy(), None
    assert np.abs(audio).max() > 0.01 and np.isfinite(audio).all() and len(model_rate) == round(5000 * 44100 / 22050)
    rc, _, err = run(capsys, "decode", atok, tmp_path / "low.flac", "--subtype", "FLOAT", "--model", model_dir)
    assert rc == 2 and "cannot write .flac files as FLOAT" in err
    with pytest.raises(SystemExit):
        main(["decode", str(atok), str(out), "--sample-rate", "fast"])


def test_quiet_dtype_compile_options_and_default_device(tmp_path, capsys, model_dir, inputs, monkeypatch):
    from audiotok.nn import layers
    from audiotok.utils.distributed import rank_device

    monkeypatch.setattr(layers, "cpu_has_bf16_kernels", lambda: True)  # no slow-bf16 warning on any CPU

    assert rank_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    args = ["encode", inputs["mono"], tmp_path / "m.atok", "--model", model_dir, "--dtype", "bf16"]
    rc, out, err = run(capsys, *args, "--quiet", "--n-quantizers", "3")
    assert rc == 0 and out == err == ""
    assert CodeFile.load(tmp_path / "m.atok").shape[1] == 3
    rc, out, err = run(capsys, "-q", "decode", tmp_path / "m.atok", tmp_path / "m.wav", "--model", model_dir)
    assert rc == 0 and out == err == "" and sf.info(tmp_path / "m.wav").frames == 9000


def test_the_notice_is_shown_once_when_the_model_encodes_apart_from_quiet(tmp_path, capsys, model_dir, inputs,
                                                                          monkeypatch):
    from audiotok.tokenizer import NOTICE_ENV
    from audiotok.weights.checkpoint import load_checkpoint, save_folder

    noted = load_checkpoint(model_dir)
    noted.notice = f"a test notice {tmp_path.name}"
    save_folder(noted, tmp_path / "noted")
    notice = f"audiotok: warning: {noted.model_id}: {noted.notice}"
    atok, wav = tmp_path / "m.atok", tmp_path / "m.wav"
    assert run(capsys, "encode", inputs["mono"], atok, "--model", model_dir)[0] == 0
    for args in (["decode", atok, wav, "--model", tmp_path / "noted"], ["info", tmp_path / "noted"], ["info"],
                 ["convert", tmp_path / "noted", tmp_path / "copy", "--to", "audiotok"]):  # no model encodes
        rc, _, err = run(capsys, *args)
        assert rc == 0 and err == "", (args, err)
    monkeypatch.setenv(NOTICE_ENV, "1")  # silenced on its own
    rc, out, err = run(capsys, "encode", inputs["mono"], atok, "--model", tmp_path / "noted")
    assert rc == 0 and err == "" and str(atok) in out
    monkeypatch.delenv(NOTICE_ENV)
    rc, out, err = run(capsys, "encode", inputs["mono"], atok, "--model", tmp_path / "noted", "-q")
    assert rc == 0 and out == "" and err.splitlines() == [notice]  # -q keeps warnings
    rc, _, err = run(capsys, "encode", inputs["mono"], atok, "--model", tmp_path / "noted")
    assert rc == 0 and err == ""  # once per process

    rc, out, err = run(capsys, "encode", tmp_path / "in", tmp_path / "codes", "--model", model_dir, "-q")
    assert rc == 1 and "skipped 3" in out
    assert sum("audiotok: warning: skipped" in line for line in err.splitlines()) == 3  # -q keeps skipped files
    rc, out, err = run(capsys, "encode", tmp_path / "in", tmp_path / "codes2", "--model", model_dir, "-qq")
    assert rc == 1 and "skipped 3" in out and err == ""  # -qq: errors only


def test_progress_over_the_chunks_of_one_file(tmp_path, capsys, tok, inputs):
    from audiotok.cli.files import decode_path, encode_path

    encode_path(tok, inputs["mono"], tmp_path / "m.atok", progress=True)
    assert "encoding:   0%|          | 0.0/0.2 s of audio" in capsys.readouterr().err
    decode_path(tmp_path / "m.atok", tmp_path / "m.wav", tok, progress=True)
    assert "decoding:   0%|          | 0.0/0.2 s of audio" in capsys.readouterr().err
    encode_path(tok, inputs["mono"], tmp_path / "m.atok", progress=False)
    assert capsys.readouterr().err == ""


def test_encode_options(tmp_path, capsys, model_dir, tok, inputs):
    atok = tmp_path / "s.atok"
    rc, _, err = run(capsys, "encode", inputs["stereo"], atok, "--model", model_dir, "--n-quantizers", "2",
                     "--pack-10bit", "--per-channel")
    assert rc == 0, err
    cf = CodeFile.load(atok)
    assert cf.packing == "10bit" and cf.shape[:2] == (2, 2) and cf.channels == 2
    audio, sr = sf.read(inputs["stereo"], dtype="float32", always_2d=True)
    for c in range(2):
        enc = tok.encode(audio[:, c], sr, n_quantizers=2)
        assert torch.equal(cf.codes[c], enc.codes[0])
    assert not torch.equal(cf.codes[0], cf.codes[1])

    rc, _, err = run(capsys, "decode", atok, tmp_path / "s.flac", "--model", model_dir)
    assert rc == 0, err
    info = sf.info(tmp_path / "s.flac")
    assert (info.channels, info.frames, info.subtype) == (2, 7000, "PCM_24")


def test_output_into_existing_folder(tmp_path, capsys, model_dir, inputs):
    (tmp_path / "o").mkdir()
    rc, _, err = run(capsys, "encode", inputs["mono"], tmp_path / "o", "--model", model_dir)
    assert rc == 0, err
    assert (tmp_path / "o" / "mono.atok").is_file()
    rc, _, err = run(capsys, "decode", tmp_path / "o" / "mono.atok", tmp_path / "o", "--format", "flac",
                     "--model", model_dir)
    assert rc == 0, err
    assert (tmp_path / "o" / "mono.flac").is_file()


def test_one_file_gives_one_line_with_duration_frames_codebooks_bitrate_and_speed(tmp_path, capsys, model_dir,
                                                                                   inputs):
    kbps = 44100 / 512 * 4 * 6 / 1000  # frames per second x codebooks x bits per code
    line = re.compile(r"(en|de)coded (\S+) -> (\S+): (\d+\.\d\d) s of audio, (\d+) frames x (\d+) codebooks"
                      r"(?: x (\d+) channels)? \((\d+\.\d\d) kbps\), ([\d.e+]+)x real time")
    atok, wav = tmp_path / "s.atok", tmp_path / "s.wav"
    for command, src, dst, extra, channels in (("encode", inputs["stereo"], atok, ["--per-channel"], 2),
                                               ("decode", atok, wav, [], 2),
                                               ("encode", inputs["low"], atok, ["--n-quantizers", "2"], 1)):
        rc, out, err = run(capsys, command, src, dst, "--model", model_dir, *extra)
        assert rc == 0 and err == "", err
        found = line.fullmatch(out.strip())
        assert found, out
        assert (found[1], found[2], found[3]) == (command[:2], str(src), str(dst))
        header = CodeFile.load(atok)
        assert float(found[4]) == pytest.approx(header.duration, abs=0.006)
        assert header.shape == (channels, int(found[6]), int(found[5])) and int(found[7] or 1) == channels
        assert float(found[8]) == pytest.approx(channels * kbps * int(found[6]) / 4, abs=0.006)
        assert float(found[9]) > 0
    assert run(capsys, "encode", inputs["mono"], atok, "--model", model_dir, "-q")[1] == ""


@pytest.mark.parametrize("args", [
    ["encode", "{in}/missing.wav", "{tmp}/x.atok"],
    ["encode", "{in}/notes.txt", "{tmp}/x.atok"],  # not audio
    ["encode", "{in}/corrupt.wav", "{tmp}/x.atok"],
    ["encode", "{in}/sub/empty.wav", "{tmp}/x.atok"],
    ["encode", "{in}/mono.wav", "{in}/mono.wav/x.atok"],  # an output inside a file
    ["encode", "{in}", "{in}/mono.wav/codes"],
    ["decode", "{tmp}/missing.atok", "{tmp}/x.wav"],
    ["decode", "{in}/mono.wav", "{tmp}/x.wav"],  # not a code file
    ["decode", "{tmp}/good.atok", "{in}/mono.wav/x.wav"],
    ["decode", "{tmp}", "{in}/mono.wav/decoded"],
])
@pytest.mark.parametrize("model", [True, False])
def test_inputs_and_outputs_are_checked_before_the_model_loads(tmp_path, capsys, model_dir, tok, inputs,
                                                               monkeypatch, args, model):
    fill = {"in": tmp_path / "in", "tmp": tmp_path}
    CodeFile.from_encoded(tok, expected_codes(tok, inputs["mono"])[1]).save(tmp_path / "good.atok")
    loads = []

    def load(*a, **kw):
        loads.append(a)
        return real(*a, **kw)

    real = AudioTokenizer.from_pretrained
    monkeypatch.setattr(AudioTokenizer, "from_pretrained", load)
    rc, _, err = run(capsys, *(a.format(**fill) for a in args), *(["--model", model_dir] if model else []))
    assert rc == 2 and err.startswith("audiotok: error:") and err.count("\n") == 1, err
    assert loads == []  # reported before any model loaded
    rc, _, err = run(capsys, "decode", tmp_path / "good.atok", tmp_path / "good.wav", "--model", model_dir)
    assert rc == 0 and len(loads) == 1, err  # a good call does load it, through the same function


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_an_output_folder_without_write_permission_is_refused_before_the_model_loads(tmp_path, capsys, inputs):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    rc, _, err = run(capsys, "encode", inputs["mono"], locked / "sub" / "x.atok", "--model", tmp_path / "nowhere")
    assert rc == 2 and f"no permission to create files in {locked}" in err


# ---------------------------------------------------------------------------------------------
# Folders


def test_encode_decode_folder_with_bad_files(tmp_path, capsys, model_dir, tok, inputs):
    src, out, dec = tmp_path / "in", tmp_path / "codes", tmp_path / "decoded"
    rc, stdout, stderr = run(capsys, "encode", src, out, "--model", model_dir)
    assert rc == 1
    assert "encoded 3 of 6 files; skipped 3" in stdout
    for name, reason in (("corrupt.wav", "cannot read audio"), ("empty.wav", "empty"), ("nan.wav", "NaN")):
        assert any(name in line and reason in line for line in stdout.splitlines()), (name, stdout)
        assert any(name in line and "warning" in line for line in stderr.splitlines()), (name, stderr)
    assert "Traceback" not in stderr

    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["mono.atok", "sub/deeper/low.atok", "sub/stereo.atok"]
    for rel, path in zip(written, (inputs["mono"], inputs["low"], inputs["stereo"])):
        assert torch.equal(CodeFile.load(out / rel).codes, expected_codes(tok, path)[0])

    rc, stdout, stderr = run(capsys, "decode", out, dec, "--model", model_dir)
    assert rc == 0, stderr
    assert "decoded 3 of 3 files" in stdout
    decoded = sorted(p.relative_to(dec).as_posix() for p in dec.rglob("*") if p.is_file())
    assert decoded == ["mono.wav", "sub/deeper/low.wav", "sub/stereo.wav"]
    assert sf.info(dec / "sub" / "deeper" / "low.wav").frames == 10000  # 5000 samples at 22050 -> 44100 Hz

    # A corrupt code file in the folder is skipped and makes the exit status 1.
    (out / "sub" / "broken.atok").write_bytes((out / "mono.atok").read_bytes()[:50])
    rc, stdout, _ = run(capsys, "decode", out, tmp_path / "decoded2", "--model", model_dir)
    assert rc == 1
    assert "broken.atok" in stdout and "decoded 3 of 4 files" in stdout


def test_folder_all_good_and_extensions(tmp_path, capsys, model_dir):
    src = tmp_path / "in"
    files = write_inputs(src)
    for f in src.rglob("*"):
        if f.is_file() and f not in files.values():
            f.unlink()
    shutil.copy(files["mono"], src / "mono.flac.bak")
    rc, stdout, _ = run(capsys, "encode", src, tmp_path / "a", "--model", model_dir)
    assert rc == 0 and "encoded 3 of 3 files" in stdout
    rc, stdout, _ = run(capsys, "encode", src, tmp_path / "b", "--model", model_dir, "--extensions", "FLAC")
    assert rc == 0 and "encoded 1 of 1 file" in stdout
    assert [p.name for p in (tmp_path / "b").rglob("*.atok")] == ["low.atok"]


def test_same_stem_files_do_not_collide(tmp_path, capsys, model_dir):
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "a.wav", 0.1 * np.ones(3000), 44100)
    sf.write(src / "a.flac", -0.1 * np.ones(4000), 44100)
    rc, _, _ = run(capsys, "encode", src, tmp_path / "o", "--model", model_dir)
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.flac.atok", "a.wav.atok"]
    assert CodeFile.load(tmp_path / "o" / "a.flac.atok").num_samples == 4000


# ---------------------------------------------------------------------------------------------
# Errors


def test_wrong_model_is_refused(tmp_path, capsys, model_dir, other_model_dir, tok, inputs):
    atok = tmp_path / "codes" / "x.atok"
    assert run(capsys, "encode", inputs["mono"], atok, "--model", model_dir)[0] == 0
    other_hash = AudioTokenizer.from_pretrained(other_model_dir).config.architecture_hash()
    rc, _, err = run(capsys, "decode", atok, tmp_path / "x.wav", "--model", other_model_dir)
    assert rc == 2
    assert err.startswith("audiotok: error:") and "Traceback" not in err
    assert tok.config.architecture_hash() in err and other_hash in err
    assert not (tmp_path / "x.wav").exists()
    # A folder is checked as a whole before anything is decoded.
    rc, _, err = run(capsys, "decode", tmp_path / "codes", tmp_path / "dec", "--model", other_model_dir)
    assert rc == 2 and other_hash in err
    assert not (tmp_path / "dec").exists()


def test_without_model_only_the_bundled_model_decodes(tmp_path, capsys, inputs):
    folder = tmp_path / "m"
    AudioTokenizer.from_config("tiny-44khz", seed=0).save_pretrained(folder)  # model_id "random"
    atok = tmp_path / "x.atok"
    assert run(capsys, "encode", inputs["mono"], atok, "--model", folder)[0] == 0
    rc, _, err = run(capsys, "decode", atok, tmp_path / "x.wav")
    assert rc == 2 and "'random'" in err and "--model" in err and "bundled" in err
    assert run(capsys, "decode", atok, tmp_path / "x.wav", "--model", folder)[0] == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["encode", "{in}/missing.wav", "{tmp}/x.atok", "--model", "{model}"], "no such file"),
        (["encode", "{in}/corrupt.wav", "{tmp}/x.atok", "--model", "{model}"], "cannot read audio"),
        (["encode", "{in}/mono.wav", "{tmp}/x.wav", "--model", "{model}"], "must end with .atok"),
        (["encode", "{in}/mono.wav", "{tmp}/x.atok", "--model", "{model}", "--n-quantizers", "5"], "1..4"),
        (["encode", "{in}/mono.wav", "{tmp}/x.atok", "--model", "{model}", "--device", "nonsense"], "device"),
        (["decode", "{in}/mono.wav", "{tmp}/x.wav", "--model", "{model}"], "truncated or corrupt"),
        (["info", "{tmp}/nothing-here"], "no such file"),
        (["convert", "{model}", "{tmp}/x.bin", "--to", "original"], ".pth"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path, capsys, model_dir, inputs, args, message):
    fill = {"in": tmp_path / "in", "tmp": tmp_path, "model": model_dir}
    rc, _, err = run(capsys, *(a.format(**fill) for a in args))
    assert rc == 2
    assert err.startswith("audiotok: error:") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "x.atok").exists()


def test_missing_default_model_exits_2(tmp_path, capsys, inputs, monkeypatch):
    import audiotok.weights.hub

    monkeypatch.setattr(audiotok.weights.hub, "PRETRAINED_DIR", tmp_path / "empty")  # a build without the model
    rc, _, err = run(capsys, "encode", tmp_path / "in" / "mono.wav", tmp_path / "x.atok")
    assert rc == 2 and "ships no default model" in err and "Traceback" not in err
    assert not (tmp_path / "x.atok").exists()


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["encode", "a", "b", "--n-quantizers", "0"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# info and convert


def test_info_model_and_code_file(tmp_path, capsys, model_dir, tok, inputs):
    rc, out, _ = run(capsys, "info", model_dir)
    assert rc == 0
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields["format"] == "audiotok"
    assert fields["config_hash"] == tok.config.architecture_hash()
    assert fields["codes_fingerprint"] == tok.codes_fingerprint
    assert fields["codebooks"] == "4 x 64 x 4" and fields["hop_length"] == "512"
    params = [int(fields[f"params_{k}"]) for k in ("encoder", "quantizer", "decoder")]
    assert sum(params) == int(fields["params_total"]) == sum(p.numel() for p in tok.model.parameters())
    assert float(fields["bitrate_kbps"]) == pytest.approx(44100 / 512 * 4 * 6 / 1000, abs=1e-3)

    atok = tmp_path / "x.atok"
    assert run(capsys, "encode", inputs["stereo"], atok, "--model", model_dir, "--pack-10bit")[0] == 0
    rc, out, _ = run(capsys, "info", atok, "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["code_shape"] == [1, 4, 14] and info["channels"] == 2 and info["packing"] == "10bit"
    assert info["num_samples"] == 7000 and info["config_hash"] == tok.config.architecture_hash()
    assert info["codes_fingerprint"] == tok.codes_fingerprint


def test_python_dash_m_info(model_dir, tok):
    proc = subprocess.run([sys.executable, "-m", "audiotok", "info", str(model_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert tok.config.architecture_hash() in proc.stdout and "audiotok" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "audiotok", "info", str(model_dir / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_convert_all_formats_and_back(tmp_path, capsys, model_dir, tok, inputs):
    audio, sr = sf.read(inputs["stereo"], dtype="float32", always_2d=True)
    reference = tok.encode(audio.T, sr).codes
    targets = {"audiotok": tmp_path / "a", "transformers": tmp_path / "t", "original": tmp_path / "o" / "m.pth"}
    for fmt, dst in targets.items():
        rc, _, err = run(capsys, "convert", model_dir, dst, "--to", fmt)
        assert rc == 0, err
        rc, out, _ = run(capsys, "info", dst, "--json")
        assert json.loads(out)["format"] == fmt
        back = tmp_path / f"back-{fmt}"
        assert run(capsys, "convert", dst, back, "--to", "audiotok")[0] == 0
        for source in (dst, back):
            converted = AudioTokenizer.from_pretrained(source)
            assert converted.config.architecture_hash() == tok.config.architecture_hash()
            assert torch.equal(converted.encode(audio.T, sr).codes, reference), (fmt, source)
        # Codes written with the converted model decode with the original one, and the other way round.
        atok = tmp_path / f"{fmt}.atok"
        assert run(capsys, "encode", inputs["stereo"], atok, "--model", dst)[0] == 0
        assert torch.equal(CodeFile.load(atok).codes, reference)
        assert run(capsys, "decode", atok, tmp_path / f"{fmt}.wav", "--model", model_dir)[0] == 0

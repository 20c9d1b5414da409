"""The ``.atok`` code file format (audiotok.formats.codefile)."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from audiotok import AudioTokenizer, CodecIdentity, DACConfig, EncodedAudio
from audiotok.formats.codefile import (
    FORMAT_NAME,
    CodeFile,
    pack_codes_10bit,
    read_header,
    unpack_codes_10bit,
)

# The inputs here are well-formed audio: a warning (such as the tokenizer's loudness warning) is a failure.
pytestmark = pytest.mark.filterwarnings("error::UserWarning")


@pytest.fixture(scope="module")
def tok() -> AudioTokenizer:
    return AudioTokenizer.from_config("tiny-44khz", seed=0)


def make_code_file(c=2, k=3, f=7, codebook_size=1024, seed=0, channels=None) -> CodeFile:
    g = torch.Generator().manual_seed(seed)
    hop = 512
    return CodeFile(
        codes=torch.randint(0, codebook_size, (c, k, f), generator=g),
        codec=CodecIdentity("some/model", "0123456789abcdef"), sample_rate=44100, hop_length=hop, n_codebooks=k,
        codebook_size=codebook_size, num_samples=(f - 1) * hop + 5, source_sample_rate=44100,
        channels=channels or c,
    )


def file_contents(path):
    with safe_open(str(path), framework="np") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def rewrite(path, out, meta_changes=None, tensors=None):
    """Copy an .atok file with edited metadata and/or tensors."""
    meta, old = file_contents(path)
    meta = {**meta, **(meta_changes or {})}
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file(tensors if tensors is not None else old, str(out), metadata=meta)
    return out


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("pack", [False, True])
def test_round_trip(tmp_path, pack):
    cf = make_code_file()
    path = cf.save(tmp_path / "x.atok", pack_10bit=pack)
    back = CodeFile.load(path)
    assert back.codes.dtype == torch.int64
    assert torch.equal(back.codes, cf.codes)
    for name in ("codec", "sample_rate", "hop_length", "n_codebooks", "codebook_size",
                 "num_samples", "source_sample_rate", "channels"):
        assert getattr(back, name) == getattr(cf, name), name
    assert back.packing == ("10bit" if pack else "none")

    meta, tensors = file_contents(path)
    assert meta["format"] == FORMAT_NAME and meta["format_version"] == "1"
    assert meta["shape"] == "2,3,7" and meta["config_hash"] == "0123456789abcdef"
    if pack:
        assert list(tensors) == ["codes_packed"]
        assert tensors["codes_packed"].dtype == np.uint8 and tensors["codes_packed"].shape == (5 * 11,)  # 42 codes
    else:
        assert list(tensors) == ["codes"]
        assert tensors["codes"].dtype == np.uint16 and tensors["codes"].shape == (2, 3, 7)
        assert np.array_equal(tensors["codes"], cf.codes.numpy())


def test_packed_file_is_smaller(tmp_path):
    cf = make_code_file(c=1, k=9, f=400)
    plain = os.path.getsize(cf.save(tmp_path / "a.atok"))
    packed = os.path.getsize(cf.save(tmp_path / "b.atok", pack_10bit=True))
    assert packed < plain - 0.35 * 9 * 400 * 2


def test_header_only(tmp_path):
    cf = make_code_file(c=1, channels=2)
    header = read_header(cf.save(tmp_path / "x.atok"))
    assert header.shape == (1, 3, 7) and header.channels == 2 and header.num_samples == cf.num_samples
    assert header.output_samples == cf.num_samples


# ---------------------------------------------------------------------------------------------
# 10-bit packing


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 8, 9, 1001])
def test_unpack_is_bit_exact(count):
    codes = np.random.default_rng(count).integers(0, 1024, count)
    codes[:2] = [0, 1023][: min(2, count)]  # the extremes
    packed = pack_codes_10bit(codes)
    assert packed.dtype == np.uint8 and packed.size == 5 * -(-count // 4)
    assert np.array_equal(unpack_codes_10bit(packed, count), codes)


def test_packing_matches_documented_layout():
    codes = np.random.default_rng(0).integers(0, 1024, 10)
    # Reference writer, straight from the module docstring: groups of four, a | b<<10 | c<<20 | d<<30,
    # five bytes little-endian, zero padding.
    padded = list(codes) + [0] * 2
    expected = b"".join(
        int(padded[i] | padded[i + 1] << 10 | padded[i + 2] << 20 | padded[i + 3] << 30).to_bytes(5, "little")
        for i in range(0, 12, 4)
    )
    assert pack_codes_10bit(codes).tobytes() == expected
    # Reference reader: an LSB-first bit stream.
    bits = int.from_bytes(expected, "little")
    assert [(bits >> (10 * i)) & 0x3FF for i in range(10)] == list(codes)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="1024"):
        pack_codes_10bit(np.array([0, 1024]))
    with pytest.raises(ValueError, match="1024"):
        make_code_file(codebook_size=2048).to_bytes(pack_10bit=True)


def test_unpack_rejects_bad_length_and_padding():
    packed = pack_codes_10bit(np.arange(5))
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes_10bit(packed[:-1], 5)
    dirty = packed.copy()
    dirty[-1] |= 0x80  # a bit of the padding code
    with pytest.raises(ValueError, match="padding"):
        unpack_codes_10bit(dirty, 5)


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_save_leaves_no_temp_file_and_overwrites(tmp_path):
    out = tmp_path / "deep" / "er" / "x.atok"
    make_code_file(seed=1).save(out)
    cf = make_code_file(seed=2)
    cf.save(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.atok"]
    assert torch.equal(CodeFile.load(out).codes, cf.codes)


def test_failed_save_keeps_old_file_and_cleans_up(tmp_path, monkeypatch):
    out = tmp_path / "x.atok"
    old = make_code_file(seed=1)
    old.save(out)
    before = out.read_bytes()

    def broken_replace(src, dst):
        assert os.path.dirname(src) == os.path.dirname(dst)  # the temp file is in the same folder
        raise OSError("disk full")

    monkeypatch.setattr("audiotok.formats.codefile.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        make_code_file(seed=2).save(out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.atok"]


# ---------------------------------------------------------------------------------------------
# Bad files


@pytest.mark.parametrize("pack", [False, True])
def test_truncated_file_raises_value_error(tmp_path, pack):
    data = make_code_file().to_bytes(pack_10bit=pack)
    for n in (0, 5, 8, 20, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"t{n}.atok"
        bad.write_bytes(data[:n])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            CodeFile.load(bad)


def test_garbage_and_missing_files(tmp_path):
    bad = tmp_path / "g.atok"
    bad.write_bytes(b"RIFF" + bytes(range(200)))
    with pytest.raises(ValueError, match=str(bad.name)):
        CodeFile.load(bad)
    with pytest.raises(FileNotFoundError):
        CodeFile.load(tmp_path / "missing.atok")


def test_safetensors_without_our_format_is_rejected(tmp_path):
    path = tmp_path / "w.atok"
    save_file({"codes": np.zeros((1, 1, 1), np.uint16)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an audiotok codes file"):
        CodeFile.load(path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format": "something-else"}, "not an audiotok codes file"),
        ({"format_version": "2"}, "newer audiotok"),
        ({"format_version": "x"}, "format_version"),
        ({"config_hash": None}, "missing required fields: config_hash"),
        ({"num_samples": None, "channels": None}, "num_samples, channels"),
        ({"num_samples": "many"}, "not an integer"),
        ({"packing": "zip"}, "unknown packing"),
        ({"shape": "2,3"}, "three positive integers"),
        ({"shape": "2,3,8"}, "shape"),  # the tensor is [2, 3, 7]
        ({"n_codebooks": "4"}, "n_codebooks=4"),
        ({"num_samples": "441000"}, "frames"),
        ({"channels": "3"}, "coded channels"),
        ({"packing": "10bit"}, "no 'codes_packed' tensor"),
    ],
)
def test_bad_metadata_raises(tmp_path, changes, message):
    good = make_code_file().save(tmp_path / "good.atok")
    assert CodeFile.load(good)  # the unedited file is fine
    with pytest.raises(ValueError, match=message):
        CodeFile.load(rewrite(good, tmp_path / "bad.atok", changes))


def test_codes_disagreeing_with_metadata_raise(tmp_path):
    good = make_code_file(codebook_size=64).save(tmp_path / "good.atok")
    _, tensors = file_contents(good)
    codes = tensors["codes"]
    with pytest.raises(ValueError, match="uint16"):
        CodeFile.load(rewrite(good, tmp_path / "a.atok", tensors={"codes": codes.astype(np.int32)}))
    with pytest.raises(ValueError, match="shape"):
        CodeFile.load(rewrite(good, tmp_path / "b.atok", tensors={"codes": codes[:, :, :-1].copy()}))
    high = codes.copy()
    high[0, 0, 0] = 64
    with pytest.raises(ValueError, match="out of range"):
        CodeFile.load(rewrite(good, tmp_path / "c.atok", tensors={"codes": high}))
    packed = make_code_file(codebook_size=64).save(tmp_path / "p.atok", pack_10bit=True)
    _, tensors = file_contents(packed)
    with pytest.raises(ValueError, match="bytes"):
        truncated = {"codes_packed": tensors["codes_packed"][:-5].copy()}
        CodeFile.load(rewrite(packed, tmp_path / "d.atok", tensors=truncated))


def test_header_is_json_readable_without_safetensors(tmp_path):
    """What a reader in another language does: 8-byte length, JSON header, raw little-endian data."""
    cf = make_code_file(c=1, k=2, f=3)
    data = cf.save(tmp_path / "x.atok").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    meta = header["__metadata__"]
    assert meta["packing"] == "none" and meta["shape"] == "1,2,3"
    info = header["codes"]
    assert info["dtype"] == "U16" and info["shape"] == [1, 2, 3]
    begin, end = info["data_offsets"]
    raw = np.frombuffer(data[8 + n + begin: 8 + n + end], dtype="<u2").reshape(1, 2, 3)
    assert np.array_equal(raw, cf.codes.numpy())


# ---------------------------------------------------------------------------------------------
# With a tokenizer


def test_from_encoded_and_compatibility(tmp_path, tok):
    rng = np.random.default_rng(0)
    clips = [rng.uniform(-0.5, 0.5, n).astype(np.float32) for n in (3000, 5000)]  # in [-1, 1]: no loudness warning
    enc = tok.encode(clips, 22050, n_quantizers=3)
    cf = CodeFile.from_encoded(tok, enc, index=0, channels=2)
    frames = int(enc.lengths[0])
    assert frames < enc.codes.shape[-1]  # item 0 is padded in the batch; the file keeps its own frames
    assert torch.equal(cf.codes, enc.codes[0:1, :, :frames])
    assert (cf.num_samples, cf.source_sample_rate, cf.channels, cf.n_codebooks) == (3000, 22050, 2, 3)
    assert (cf.sample_rate, cf.hop_length, cf.codebook_size) == (44100, 512, 64)
    assert cf.codec == CodecIdentity(tok.model_id, tok.config.architecture_hash(), tok.codes_fingerprint)
    cf.check_compatible(tok)

    back = CodeFile.load(cf.save(tmp_path / "x.atok", pack_10bit=True))
    back.check_compatible(tok)
    again = back.to_encoded()
    assert torch.equal(again.codes, cf.codes) and again.lengths.tolist() == [frames]
    assert again.num_samples.tolist() == [3000] and again.sample_rate == 22050
    audio = tok.decode(again)
    assert audio.shape == (1, 1, round(3000 * 44100 / 22050))
    single = EncodedAudio(enc.codes[0:1, :, :frames], enc.lengths[0:1], enc.num_samples[0:1], 22050)
    assert torch.equal(audio, tok.decode(single))

    with pytest.raises(ValueError, match="out of range"):
        CodeFile.from_encoded(tok, enc, index=2, channels=1)
    with pytest.raises(ValueError, match="equal lengths"):
        CodeFile.from_encoded(tok, enc, index=[0, 1], channels=2)


def test_per_channel_items(tok):
    rng = np.random.default_rng(1)
    stereo = rng.uniform(-0.5, 0.5, (2, 4000)).astype(np.float32)
    enc = tok.encode([stereo[0:1], stereo[1:2]], 44100)
    cf = CodeFile.from_encoded(tok, enc, index=[0, 1], channels=2)
    assert cf.shape == (2, 4, 8)
    assert torch.equal(cf.codes, enc.codes)
    assert not torch.equal(cf.codes[0], cf.codes[1])
    # The same from a [B, C, K, F] batch (a tokenizer coding channels one by one).
    per_channel = EncodedAudio(enc.codes[None], enc.lengths[:1], enc.num_samples[:1], 44100)
    assert torch.equal(CodeFile.from_encoded(tok, per_channel, index=0, channels=2).codes, cf.codes)
    with pytest.raises(ValueError, match="single item"):
        CodeFile.from_encoded(tok, per_channel, index=[0, 0], channels=2)


def test_channels_recorded_without_being_told(tmp_path, tok):
    """The file records the source's channel count from the encoding: a stereo file mixed to mono,
    coded per channel, or listed item by item, and a code file's own round trip."""
    rng = np.random.default_rng(2)
    stereo = rng.uniform(-0.5, 0.5, (2, 4000)).astype(np.float32)
    sf.write(tmp_path / "stereo.wav", stereo.T, 44100, subtype="FLOAT")
    mixed = tok.encode(tmp_path / "stereo.wav")
    assert mixed.channels.tolist() == [2]
    cf = CodeFile.from_encoded(tok, mixed)
    assert (cf.shape[0], cf.channels) == (1, 2)
    assert CodeFile.from_encoded(tok, cf.to_encoded()).channels == 2
    assert CodeFile.from_encoded(tok, tok.encode(stereo, 44100, mono=False)).channels == 2
    items = CodeFile.from_encoded(tok, tok.encode([stereo[0:1], stereo[1:2]], 44100), index=[0, 1])
    assert (items.shape[0], items.channels) == (2, 2)
    assert CodeFile.from_encoded(tok, items.to_encoded(), index=[0, 1]).channels == 2
    assert CodeFile.from_encoded(tok, tok.encode([stereo, stereo[0]], 44100), index=1).channels == 1


def test_wrong_hash_is_refused(tmp_path, tok):
    other = AudioTokenizer.from_config(DACConfig.preset("tiny-44khz", codebook_dim=8), seed=0)
    other.model_id = "other-model"
    enc = tok.encode(np.zeros(2000, np.float32), 44100)
    cf = CodeFile.load(CodeFile.from_encoded(tok, enc, 0, 1).save(tmp_path / "x.atok"))
    with pytest.raises(ValueError) as err:
        cf.check_compatible(other)
    msg = str(err.value)
    for part in (tok.model_id, tok.config.architecture_hash(), "other-model", other.config.architecture_hash()):
        assert part in msg
    with pytest.raises(ValueError, match="config hash"):
        read_header(tmp_path / "x.atok").check_compatible(other)


def test_constructor_validates():
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        CodeFile(**{**make_code_file(codebook_size=64).__dict__, "codes": torch.full((2, 3, 7), 64)})
    with pytest.raises(ValueError, match="C, K, F"):
        CodeFile(**{**make_code_file().__dict__, "codes": torch.zeros(3, 7, dtype=torch.long)})
    with pytest.raises(ValueError, match="integer"):
        CodeFile(**{**make_code_file().__dict__, "codes": torch.zeros(2, 3, 7)})


# ---------------------------------------------------------------------------------------------
# Fields that disagree with each other (issue 26)


@pytest.mark.parametrize("pack", [False, True])
def test_a_flipped_bit_anywhere_is_refused(tmp_path, pack):
    path = make_code_file(codebook_size=1024).save(tmp_path / "x.atok", pack_10bit=pack)
    meta, tensors = file_contents(path)
    assert len(meta["crc32"]) == 8
    name = "codes_packed" if pack else "codes"
    flipped = tensors[name].copy()
    flipped.reshape(-1)[5] ^= 1  # one bit of one code: still a valid code
    with pytest.raises(ValueError, match="checksum mismatch"):
        CodeFile.load(rewrite(path, tmp_path / "codes.atok", tensors={name: flipped}))
    # Metadata that still agrees with itself (one more source sample) is covered too.
    with pytest.raises(ValueError, match="checksum mismatch"):
        CodeFile.load(rewrite(path, tmp_path / "meta.atok", {"num_samples": str(int(meta["num_samples"]) + 1)}))
    with pytest.raises(ValueError, match="crc32='xyz' is not 8 lowercase hex digits"):
        CodeFile.load(rewrite(path, tmp_path / "bad.atok", {"crc32": "xyz"}))
    # Files written before the checksum have none and are still read.
    back = CodeFile.load(rewrite(path, tmp_path / "old.atok", {"crc32": None}))
    assert torch.equal(back.codes, make_code_file(codebook_size=1024).codes)


def test_a_config_hash_that_is_not_a_hash_is_refused(tmp_path):
    path = make_code_file().save(tmp_path / "x.atok")
    with pytest.raises(ValueError, match="config_hash='../x' is not 16 lowercase hex digits"):
        read_header(rewrite(path, tmp_path / "y.atok", {"config_hash": "../x", "crc32": None}))


def test_rates_that_disagree_with_the_config_hash_are_refused(tmp_path, tok):
    enc = tok.encode(np.zeros(8000, np.float32), 44100)
    path = CodeFile.from_encoded(tok, enc, 0, 1).save(tmp_path / "x.atok")
    # Half the rates: consistent in itself (the same frames), and an old file (no checksum).
    halved = {"sample_rate": "22050", "source_sample_rate": "22050", "crc32": None}
    for name, change in (("sample_rate", halved), ("hop_length", {"hop_length": "511", "crc32": None})):
        edited = CodeFile.load(rewrite(path, tmp_path / f"{name}.atok", change))
        with pytest.raises(ValueError, match=f"state {name}=.*yet their config_hash .* the file was edited"):
            edited.check_compatible(tok)

"""AudioTokenizer: input handling, encode/decode contracts and errors."""

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import make_audio, random_tokenizer

from audiotok import AudioTokenizer, EncodedAudio


@pytest.fixture(scope="module")
def tok():
    return random_tokenizer("tiny-24khz")


def test_inference_setup(tok):
    assert not tok.model.training
    assert tok.model.is_folded
    enc = tok.encode(make_audio(3000), 24000)
    assert not enc.codes.requires_grad and enc.codes.dtype == torch.int64
    assert tok.decode(enc).requires_grad is False
    assert tok.to("cpu").device == torch.device("cpu")
    assert next(tok.model.parameters()).device.type == "cpu"


def test_input_ranks_and_types_agree(tok):
    x = make_audio(4000)  # [1, T]
    ref = tok.encode(x, 24000).codes
    assert ref.shape == (1, tok.n_codebooks, 13)
    for variant in (x[0], torch.from_numpy(x), torch.from_numpy(x)[None], [x[0]], [torch.from_numpy(x)]):
        assert torch.equal(tok.encode(variant, 24000).codes, ref)
    batch = make_audio(4000, batch=3)
    codes = tok.encode(batch, 24000).codes
    assert codes.shape == (3, tok.n_codebooks, 13)
    assert torch.equal(codes[1:2], tok.encode(batch[1], 24000).codes)


def test_pcm_is_scaled(tok):
    x = make_audio(3000)[0]
    pcm16 = np.round(x * 32767).astype(np.int16)
    pcm32 = pcm16.astype(np.int32) << 16
    ref = tok.encode(pcm16.astype(np.float32) / 32768, 24000).codes
    assert torch.equal(tok.encode(pcm16, 24000).codes, ref)
    assert torch.equal(tok.encode(torch.from_numpy(pcm16), 24000).codes, ref)
    assert torch.equal(tok.encode(pcm32, 24000).codes, ref)


def test_downmix_is_channel_mean(tok):
    stereo = make_audio(3000, channels=2)
    assert torch.equal(tok.encode(stereo, 24000).codes, tok.encode(stereo.mean(0), 24000).codes)


def test_resampling_and_original_lengths(tok):
    x = make_audio(4800)  # 0.1 s at 48 kHz
    enc = tok.encode(x, 48000)
    assert enc.sample_rate == 48000 and enc.num_samples.tolist() == [4800]
    assert enc.lengths.tolist() == [8]  # 2400 samples at 24 kHz / hop 320 -> 7.5 -> 8 frames
    y = tok.decode(enc)
    assert y.shape == (1, 1, 2400)
    # Resampling goes through soxr, not a naive decimation.
    import soxr

    expected = soxr.resample(x[0], 48000, 24000, quality="VHQ")
    assert torch.equal(enc.codes, tok.encode(expected, 24000).codes)


def test_clips_of_different_lengths(tok):
    clips = [make_audio(n, seed=n)[0] for n in (1000, 5000, 333, 5000)]
    enc = tok.encode(clips, 24000)
    assert enc.codes.shape == (4, tok.n_codebooks, 16)
    assert enc.lengths.tolist() == [4, 16, 2, 16]
    assert enc.num_samples.tolist() == [1000, 5000, 333, 5000]
    audio = tok.decode(enc)
    assert audio.shape == (4, 1, 5000)
    for i, clip in enumerate(clips):
        alone = tok.encode(clip, 24000)
        n = enc.lengths[i]
        assert torch.equal(enc.codes[i, :, :n], alone.codes[0])
        torch.testing.assert_close(audio[i, :, : len(clip)], tok.decode(alone)[0])
        assert (audio[i, :, len(clip):] == 0).all()


def test_n_quantizers_and_partial_decode(tok):
    x = make_audio(6000)
    full = tok.encode(x, 24000)
    two = tok.encode(x, 24000, n_quantizers=2)
    assert two.codes.shape[1] == 2
    assert torch.equal(two.codes, full.codes[:, :2])
    coarse = tok.decode(full.codes[:, :2])
    assert coarse.shape == (1, 1, 19 * 320)
    torch.testing.assert_close(coarse, tok.decode(two.codes))
    assert not torch.allclose(coarse, tok.decode(full.codes))
    assert tok.decode(full.codes[0]).shape == (1, 1, 19 * 320)  # [K, F] is accepted


def test_reconstruction_quality_is_not_the_point_but_decode_is_deterministic(tok):
    x = make_audio(5000)
    a = tok.decode(tok.encode(x, 24000))
    b = tok.decode(tok.encode(x, 24000))
    assert torch.equal(a, b)


@pytest.mark.parametrize("audio, match", [
    (np.zeros(0, np.float32), "empty"),
    (np.zeros((1, 0), np.float32), "empty"),
    (np.array([0.0, np.nan, 0.1], np.float32), "NaN or Inf"),
    (np.array([0.0, np.inf, 0.1], np.float32), "NaN or Inf"),
    (np.zeros((1, 1, 1, 100), np.float32), "expected"),
    (np.zeros((1, 2, 100), np.float32)[:, :, :0], "empty"),
    ([np.zeros((1, 1, 10), np.float32)], "clip 0"),
    ([], "empty list"),
    (np.zeros(10, np.complex64), "unsupported audio dtype"),
])
def test_bad_audio(tok, audio, match):
    with pytest.raises(ValueError, match=match):
        tok.encode(audio, 24000)


@pytest.mark.parametrize("rate", [0, -16000, 44100.5, None, "44100", float("nan"), True])
def test_bad_sample_rate(tok, rate):
    with pytest.raises(ValueError, match="sample_rate"):
        tok.encode(make_audio(100), rate)


def test_bad_n_quantizers(tok):
    with pytest.raises(ValueError, match="n_quantizers"):
        tok.encode(make_audio(1000), 24000, n_quantizers=tok.n_codebooks + 1)
    with pytest.raises(ValueError, match="n_quantizers"):
        tok.encode(make_audio(1000), 24000, n_quantizers=0)


@pytest.mark.parametrize("codes, match", [
    (torch.full((1, 2, 5), 64), r"\[0, 64\)"),
    (torch.full((1, 2, 5), -1), r"\[0, 64\)"),
    (torch.zeros(1, 5, 5, dtype=torch.long), "5 codebooks"),
    (torch.zeros(1, 2, 5), "integers"),
    (torch.zeros(5, dtype=torch.long), "shape"),
    (torch.zeros(1, 2, 0, dtype=torch.long), "empty"),
])
def test_bad_codes(tok, codes, match):
    with pytest.raises(ValueError, match=match):
        tok.decode(codes)


def test_too_short_to_resample(tok):
    with pytest.raises(ValueError, match="too short"):
        tok.encode(np.ones(1, np.float32) * 0.1, 96000)


def test_encoded_audio_moves_between_devices(tok):
    enc = tok.encode(make_audio(1000), 24000)
    moved = enc.to("cpu")
    assert isinstance(moved, EncodedAudio) and torch.equal(moved.codes, enc.codes)


def test_from_config_preset_and_repr():
    tok = AudioTokenizer.from_config("tiny-16khz", seed=0)
    assert tok.sample_rate == 16000 and tok.hop_length == 320 and tok.frame_rate == 50
    assert "tiny" not in repr(tok) and "sample_rate=16000" in repr(tok)


def test_bf16_decoder_keeps_exact_codes():
    fp32 = random_tokenizer("tiny-24khz")
    mixed = random_tokenizer("tiny-24khz").to(decoder_dtype=torch.bfloat16)
    assert mixed.model.decoder.conv1.weight.dtype == torch.bfloat16
    assert mixed.model.encoder.conv1.weight.dtype == torch.float32
    x = make_audio(6000)
    enc = mixed.encode(x, 24000)
    assert torch.equal(enc.codes, fp32.encode(x, 24000).codes)
    audio, reference = mixed.decode(enc), fp32.decode(enc)
    assert audio.dtype == torch.float32
    assert 0 < (audio - reference).abs().max() < 0.1  # bf16 rounding, not a different signal
    mixed.to(dtype=torch.float32)  # a plain dtype resets the decoder too
    assert mixed.model.decoder.conv1.weight.dtype == torch.float32


@pytest.mark.parametrize("kernels", [False, True])
def test_bf16_on_a_cpu_without_bf16_kernels_is_warned_once(kernels, monkeypatch, caplog):
    from audiotok.nn import layers

    assert isinstance(layers.cpu_has_bf16_kernels(), bool)  # this machine's answer
    monkeypatch.setattr(layers, "cpu_has_bf16_kernels", lambda: kernels)
    layers.warn_if_cpu_bf16_is_slow.cache_clear()
    tok = random_tokenizer("tiny-24khz")
    tok.to(dtype=torch.float32)
    assert "bf16" not in caplog.text
    tok.to(decoder_dtype=torch.bfloat16)
    tok.to(dtype=torch.bfloat16)
    warned = caplog.text.count("bf16 on this CPU runs convolutions without native kernels")
    assert warned == (0 if kernels else 1) and ("torch.float32" in caplog.text) != kernels
    layers.warn_if_cpu_bf16_is_slow.cache_clear()


def test_compiled_tokenizer_gives_the_eager_codes():
    """``compile=True`` (fused Snake, writing into the spent buffers) encodes to eager mode's codes, and
    decodes to its audio within float rounding (the decoder runs channels-last on CPU)."""
    eager = random_tokenizer("tiny-24khz")
    compiled = AudioTokenizer(random_tokenizer("tiny-24khz").model, compile=True)
    x = make_audio(72000)  # the first encoder block's activations are large enough to be fused
    enc = eager.encode(x, 24000)
    assert torch.equal(compiled.encode(x, 24000).codes, enc.codes)
    torch.testing.assert_close(compiled.decode(enc), eager.decode(enc), rtol=1e-4, atol=1e-5)


def _chunks(codes: torch.Tensor, sizes: list[int]):
    start = 0
    for size in sizes:
        yield codes[..., start:start + size]
        start += size


@pytest.mark.parametrize("sizes", [[1] * 23, [3, 1, 7, 12], [23], [2, 21]])
def test_decode_stream_equals_decode(tok, sizes):
    codes = torch.randint(0, tok.codebook_size, (2, tok.n_codebooks, 23), generator=torch.Generator().manual_seed(1))
    whole = tok.decode(codes)
    pieces = list(tok.decode_stream(_chunks(codes, sizes)))
    assert all(p.shape[:2] == (2, 1) and p.shape[-1] % tok.hop_length == 0 and p.shape[-1] for p in pieces)
    torch.testing.assert_close(torch.cat(pieces, dim=-1), whole, atol=1e-5, rtol=1e-4)
    single = list(tok.decode_stream(codes[0, :, f] for f in range(23)))  # [K] frames of one stream
    torch.testing.assert_close(torch.cat(single, dim=-1), whole[:1], atol=1e-5, rtol=1e-4)


def test_decode_stream_latency(tok):
    """Frame f's audio comes out when frame f + latency arrives; in milliseconds, latency / frame rate."""
    assert tok.stream_latency_frames == 10
    assert tok.stream_latency_ms == pytest.approx(1000 * 10 / 75)
    codes = torch.randint(0, tok.codebook_size, (tok.n_codebooks, 30), generator=torch.Generator().manual_seed(2))
    arrived: list[int] = []
    for chunk_frames in (1, 4):
        arrived.clear()
        emitted = 0
        stream = tok.decode_stream((codes[:, f] for f in range(30) if not arrived.append(f)), chunk_frames)
        for piece in stream:
            frames_out = piece.shape[-1] // tok.hop_length
            emitted += frames_out
            if len(arrived) < 30:  # while frames still arrive, exactly those with full right context are out
                assert emitted == len(arrived) - tok.stream_latency_frames
                assert frames_out >= chunk_frames
        assert emitted == 30


def test_decode_stream_errors(tok):
    codes = torch.zeros(tok.n_codebooks, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="does not continue"):
        list(tok.decode_stream([codes, codes[:2]]))
    with pytest.raises(ValueError, match="chunk_frames"):
        list(tok.decode_stream([codes], chunk_frames=0))
    with pytest.raises(ValueError, match="code values"):
        list(tok.decode_stream([codes + tok.codebook_size]))
    assert list(tok.decode_stream([])) == []


def test_encode_takes_what_datasets_and_feature_extractors_give(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    a, b = make_audio(3000, seed=1)[0], make_audio(5000, seed=2)[0]
    want = tok.encode([a, b], 16000)
    # lists of Python floats (a batch, as feature extractors take it), sampling_rate= as they name it
    same = tok.encode([a.tolist(), b.tolist()], sampling_rate=16000)
    assert torch.equal(same.codes, want.codes) and torch.equal(same.lengths, want.lengths)
    assert torch.equal(tok.encode(a.tolist(), sampling_rate=16000).codes, tok.encode(a, 16000).codes)
    # datasets Audio values: decoded {"array", "sampling_rate"} and undecoded {"bytes", "path"}
    records = [{"array": a, "sampling_rate": 16000, "path": None}, {"array": b.tolist(), "sampling_rate": 16000}]
    assert torch.equal(tok.encode(records).codes, want.codes)
    sf.write(tmp_path / "b.wav", b, 16000, subtype="FLOAT")
    undecoded = [{"bytes": None, "path": str(tmp_path / "a.npy")}, {"bytes": (tmp_path / "b.wav").read_bytes()}]
    with pytest.raises(FileNotFoundError, match="a.npy"):
        tok.encode(undecoded)
    one = tok.encode(undecoded[1])
    assert torch.equal(one.unbatch()[0], want.unbatch()[1])
    # records of different rates are each resampled; lengths count at the model rate
    mixed = tok.encode([{"array": a, "sampling_rate": 16000}, {"array": b, "sampling_rate": 22050}])
    assert torch.equal(mixed.unbatch()[0], want.unbatch()[0])
    assert torch.equal(mixed.unbatch()[1], tok.encode(b, 22050).unbatch()[0])
    assert mixed.sample_rate == tok.sample_rate and tok.decode(mixed).shape[-1] == int(mixed.num_samples.max())
    with pytest.raises(ValueError, match="give the audio's sample_rate"):
        tok.encode(a)
    with pytest.raises(ValueError, match="not sample_rate=8000"):
        tok.encode(records, 8000)
    with pytest.raises(ValueError, match="differ"):
        tok.encode(a, 16000, sampling_rate=8000)
    with pytest.raises(ValueError, match="neither 'array'"):
        tok.encode({"audio": a})


def test_encode_takes_paths_of_audio_files(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    a, b = make_audio(3000, channels=2, seed=1), make_audio(5000, seed=2)
    sf.write(tmp_path / "a.flac", a.T, 22050)
    sf.write(tmp_path / "b.wav", b.T, 16000, subtype="FLOAT")
    read_a = sf.read(tmp_path / "a.flac", dtype="float32", always_2d=True)[0].T  # FLAC is 16-bit: as read
    one = tok.encode(str(tmp_path / "a.flac"))
    assert torch.equal(one.codes, tok.encode(read_a, 22050).codes) and one.sample_rate == 22050
    assert int(one.num_samples[0]) == 3000
    both = tok.encode([tmp_path / "a.flac", tmp_path / "b.wav"])  # os.PathLike, a batch of files
    assert torch.equal(both.unbatch()[1], tok.encode(b, 16000).unbatch()[0])
    assert torch.equal(both.unbatch()[0], tok.encode(read_a, 22050).unbatch()[0])
    assert torch.equal(tok.encode(tmp_path / "b.wav", 16000).codes, tok.encode(b, 16000).codes)
    with pytest.raises(ValueError, match=r"b\.wav is at 16000 Hz, not sample_rate=22050"):
        tok.encode(tmp_path / "b.wav", 22050)
    with pytest.raises(FileNotFoundError, match="clip.wav: no such file"):
        tok.encode("clip.wav")
    (tmp_path / "notes.txt").write_text("not audio")
    with pytest.raises(ValueError, match=r"notes\.txt: cannot read audio file") as error:
        tok.encode(str(tmp_path / "notes.txt"))
    assert "\n" not in str(error.value)


def test_encode_each_returns_codes_or_the_error_per_clip(tok, monkeypatch):
    rng = np.random.default_rng(0)
    clips = [rng.uniform(-0.5, 0.5, n).astype(np.float32) for n in (3000, 900, 5000, 2000)]
    whole = tok.encode_each(clips, 3, batch_seconds=10.0)
    for clip, codes in zip(clips, whole):
        assert torch.equal(codes, tok.encode(clip, tok.sample_rate, 3).codes[0, :, :codes.shape[-1]])
        assert codes.shape == (3, tok.num_frames(len(clip)))
    run_plan, bad = tok.run_plan, clips[2]

    def failing(plan, progress=False):  # a group holding the bad clip fails, so does the bad clip alone
        if any(len(x) == len(bad) for x in plan.items):
            raise RuntimeError("boom")
        return run_plan(plan, progress)

    monkeypatch.setattr(tok, "run_plan", failing)
    out = tok.encode_each(clips, 3, batch_seconds=10.0)
    assert isinstance(out[2], RuntimeError) and str(out[2]) == "boom"
    for j in (0, 1, 3):  # retried clip by clip after their group failed
        assert torch.equal(out[j], whole[j])


def test_invalid_audio_is_named_with_its_reason():
    from audiotok.audio import audio_fault, check_samples
    assert audio_fault(np.zeros((1, 0), np.float32)) == "empty"
    assert audio_fault(np.array([[0.0, np.inf]], np.float32)) == "nonfinite"
    assert audio_fault(np.array([[0.5, -np.inf, 0.2]], np.float32)) == "nonfinite"  # caught by the min
    assert audio_fault(np.array([[0.5, 0.1], [np.nan, -2.0]], np.float32)) == "nonfinite"
    assert audio_fault(np.zeros((2, 3), np.float32)) is None
    assert check_samples(np.array([[0.25, -0.75], [0.5, 0.0]], np.float32), "x") == 0.75  # the peak, either sign
    with pytest.raises(ValueError, match=r"x.wav: audio contains NaN or Inf samples \(shape \(1, 2\)\)"):
        check_samples(np.array([[np.nan, 0.0]], np.float32), "x.wav: audio")
    check_samples(np.zeros((1, 3), np.float32), "fine")

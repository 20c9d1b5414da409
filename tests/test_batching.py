"""Exact padded batching, exact chunking of long audio, per-channel coding, determinism."""

import numpy as np
import pytest
import torch
from conftest import make_audio, random_tokenizer

from audiotok.nn.config import DACConfig
from audiotok.nn.model import DAC, input_span
from audiotok.segments import LENGTH_STEPS, SHORTEST, ShapeGrid, make_batches, plan_segments, round_up

INF = float("inf")


@pytest.fixture(scope="module", params=["tiny-44khz", "tiny-24khz"])
def tok(request):
    return random_tokenizer(request.param)


def test_padded_batch_equals_each_clip_alone(tok):
    hop = tok.hop_length
    lengths = [1, hop - 1, hop, hop + 1, 7 * hop + 13, 40 * hop, 40 * hop - 5, 3 * hop]
    clips = [make_audio(n, seed=i)[0] for i, n in enumerate(lengths)]
    batched = tok.encode(clips, tok.sample_rate, batch_seconds=INF)
    decoded = tok.decode(batched, batch_seconds=INF)
    for i, clip in enumerate(clips):
        alone = tok.encode(clip, tok.sample_rate)
        n = int(batched.lengths[i])
        assert torch.equal(batched.codes[i, :, :n], alone.codes[0]), f"clip {i} ({len(clip)} samples)"
        assert (batched.codes[i, :, n:] == 0).all()
        torch.testing.assert_close(decoded[i, :, : len(clip)], tok.decode(alone)[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("chunk_seconds", [0.1, 0.45])
def test_chunked_encoding_equals_whole(tok, chunk_seconds):
    sr = tok.sample_rate
    x = make_audio(int(1.6 * sr) + 17, seed=1)
    whole = tok.encode(x, sr, chunk_seconds=INF)
    chunked = tok.encode(x, sr, chunk_seconds=chunk_seconds, batch_seconds=chunk_seconds)
    assert torch.equal(chunked.codes, whole.codes)
    assert torch.equal(chunked.lengths, whole.lengths)
    y_whole = tok.decode(whole, chunk_seconds=INF)
    y_chunked = tok.decode(whole, chunk_seconds=chunk_seconds, batch_seconds=chunk_seconds)
    assert y_chunked.shape == y_whole.shape == (1, 1, x.shape[-1])
    torch.testing.assert_close(y_chunked, y_whole, rtol=0, atol=1e-4)


def test_codes_do_not_depend_on_batch_or_chunk_or_repetition(tok):
    sr = tok.sample_rate
    clips = [make_audio(int(sr * s), seed=i)[0] for i, s in enumerate([0.4, 1.3, 0.07, 2.2])]
    ref = tok.encode(clips, sr, chunk_seconds=INF, batch_seconds=INF).codes
    for chunk, batch in [(0.2, 0.2), (0.5, 3.0), (1.0, 0.1), (INF, 0.5)]:
        assert torch.equal(tok.encode(clips, sr, chunk_seconds=chunk, batch_seconds=batch).codes, ref)
    assert torch.equal(tok.encode(clips, sr, chunk_seconds=INF, batch_seconds=INF).codes, ref)


def test_each_forward_pass_is_bounded_by_the_chunk(tok, monkeypatch):
    sr, hop = tok.sample_rate, tok.hop_length
    seen = []
    encode = tok.model.encode

    def spy(x, *args, **kwargs):
        seen.append(x.shape)
        return encode(x, *args, **kwargs)

    monkeypatch.setattr(tok.model, "encode", spy)
    tok.encode(make_audio(int(5 * sr)), sr, chunk_seconds=0.5, batch_seconds=0.5)
    left, right = tok.model.context_frames["encoder"]
    bound = (round(0.5 * tok.frame_rate) + left + right) * hop
    assert len(seen) > 5
    assert max(s[0] * s[-1] for s in seen) <= bound


def test_per_channel_coding(tok):
    sr = tok.sample_rate
    stereo = make_audio(int(0.5 * sr), channels=2, seed=4)
    stereo[1] *= -0.5
    enc = tok.encode(stereo, sr, mono=False)
    assert enc.codes.shape == (1, 2, tok.n_codebooks, enc.lengths[0])
    for c in range(2):
        assert torch.equal(enc.codes[0, c], tok.encode(stereo[c], sr).codes[0])
    audio = tok.decode(enc)
    assert audio.shape == (1, 2, stereo.shape[-1])
    for c in range(2):
        torch.testing.assert_close(audio[0, c], tok.decode(tok.encode(stereo[c], sr))[0, 0], rtol=0, atol=1e-4)
    assert torch.equal(tok.encode(stereo, sr).codes, tok.encode(stereo.mean(0), sr).codes)  # mono default
    with pytest.raises(ValueError, match="channel count"):
        tok.encode([stereo, stereo[0]], sr, mono=False)


GEOMETRIES = [DACConfig.preset("tiny-24khz"),
              DACConfig(encoder_dim=2, encoder_rates=[3, 1, 2], decoder_dim=8, decoder_rates=[1, 6], n_codebooks=2,
                        codebook_size=8, codebook_dim=2)]


@pytest.mark.parametrize("config", GEOMETRIES, ids=["tiny-24khz", "odd-and-unit-strides"])
def test_receptive_field_is_exact(config):
    """The spans read from the built convolutions, measured: an input just outside the span leaves
    frame ``f``'s latent (encoder) or samples (decoder) unchanged; the span's edge inputs change them."""
    model = DAC(config).double().eval()
    hop, f = model.hop_length, 60  # frame f's inputs lie inside the 2f frames
    x = torch.randn(1, 1, 2 * f * hop, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    z = torch.randn(1, config.latent_dim, 2 * f, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cases = [(model.encoder, x, input_span(model.encoder, 0, 0), f * hop, slice(f, f + 1)),
             (model.decoder, z, input_span(model.decoder, 0, hop - 1), f, slice(f * hop, (f + 1) * hop))]
    assert all(0 <= at + lo and at + hi < inputs.shape[-1] for _, inputs, (lo, hi), at, _ in cases)
    with torch.inference_mode():
        for stack, inputs, (lo, hi), at, out in cases:
            ref = stack(inputs)[..., out]
            for offset, changes in [(lo - 1, False), (lo, True), (hi, True), (hi + 1, False)]:
                y = inputs.clone()
                y[..., at + offset] += 1.0
                assert (not torch.equal(stack(y)[..., out], ref)) == changes, (type(stack).__name__, offset)
    assert model.context_frames["decoder"] == (-lo, hi)  # the decoder's span, in frames


def test_segments_partition_every_item():
    frames = [1, 9, 10, 11, 57]
    for chunk in (None, 1, 4, 10):
        segments = plan_segments(frames, chunk, (3, 2))
        for item, n in enumerate(frames):
            kept = sorted((s.keep_start, s.keep_stop) for s in segments if s.item == item)
            assert kept[0][0] == 0 and kept[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(kept, kept[1:]))  # no gap, no overlap
            for s in segments:
                if s.item == item:
                    assert s.start == max(0, s.keep_start - 3) and s.stop == min(n, s.keep_stop + 2)
                    assert chunk is None or s.keep_stop - s.keep_start <= chunk
        batches = make_batches(segments, 20)
        assert sorted(map(id, segments)) == sorted(id(s) for b in batches for s in b.segments)
        for b in batches:
            assert b.frames == max(s.size for s in b.segments)
            assert len(b.segments) == 1 or len(b.segments) * b.frames <= 20
    with pytest.raises(ValueError):
        plan_segments([5], 0, (1, 1))


def test_round_up_steps_geometrically():
    for steps in (1, 2, 8):
        grid = sorted({round_up(n, steps) for n in range(1, 4097)})
        for k in range(12):  # `steps` values per octave (every integer below 2 * steps)
            assert len([g for g in grid if 2**k <= g < 2 ** (k + 1)]) == min(steps, 2**k)
        for n in range(1, 4097):  # the smallest grid value not below n, less than n / steps above it
            g = round_up(n, steps)
            assert g == min(v for v in grid if v >= n) and g - n < n / steps
    capped = ShapeGrid(longest=507)
    assert [capped.length(n) for n in (1, SHORTEST, 17, 449, 480, 481, 507, 508, 600)] == [
        SHORTEST, SHORTEST, 18, 480, 480, 507, 507, 512, 640]  # past `longest` (whole items): on the grid
    assert ShapeGrid(None).length(5000) == round_up(5000, LENGTH_STEPS) == 5120


def test_bucketed_batches_keep_the_budget_with_few_shapes():
    """Many plans of random lengths (a bulk job's pools): every batch within the budget, padded to its
    grid length, full or a power of two rows; the shapes stay few where unbucketed ones keep growing."""
    rng = np.random.default_rng(0)
    chunk, context, budget = 500, (3, 4), 5000
    grid = ShapeGrid(chunk + sum(context))
    shapes: dict[bool, set] = {True: set(), False: set()}
    computed = {True: 0, False: 0}
    for _ in range(300):
        segments = plan_segments(rng.integers(1, 3000, rng.integers(1, 40)).tolist(), chunk, context)
        for bucketed in (True, False):
            batches = make_batches(segments, budget, grid if bucketed else None)
            assert sorted(map(id, segments)) == sorted(id(s) for b in batches for s in b.segments)
            for b in batches:
                longest, rows = max(s.size for s in b.segments), len(b.segments)
                assert b.frames == (grid.length(longest) if bucketed else longest)
                assert rows * b.frames <= budget
                if bucketed:
                    assert rows in (budget // b.frames, 1 << (rows.bit_length() - 1))
                shapes[bucketed].add((rows, b.frames))
                computed[bucketed] += rows * b.frames
    assert len(shapes[True]) < 150 < 350 < len(shapes[False])
    assert computed[True] < 1.01 * computed[False]  # padding to the grid, less padding in split last batches


def test_buckets_change_the_shapes_not_the_codes(tok, monkeypatch):
    sr, hop = tok.sample_rate, tok.hop_length
    clips = [make_audio(n, seed=i)[0] for i, n in enumerate([hop - 3, 5 * hop + 1, int(0.37 * sr), int(1.3 * sr) + 5,
                                                            int(0.61 * sr)])]
    stereo = make_audio(int(0.8 * sr) + 11, channels=2, seed=9)
    stereo[1] *= -0.5
    budgets = [(INF, INF), (0.25, 0.6), (0.5, 2.0)]
    shapes, encode = [], tok.model.encode

    def spy(x, *args, **kwargs):
        shapes.append(tuple(x.shape))
        return encode(x, *args, **kwargs)

    monkeypatch.setattr(tok.model, "encode", spy)
    runs = {}
    for buckets in (False, True):
        monkeypatch.setattr(tok, "buckets", buckets)
        shapes.clear()
        encoded = [tok.encode(clips, sr, chunk_seconds=c, batch_seconds=b) for c, b in budgets]
        encoded.append(tok.encode(stereo, sr, mono=False, chunk_seconds=0.25, batch_seconds=0.6))
        each = tok.encode_each(clips, chunk_seconds=0.25, batch_seconds=0.6)
        decoded = [tok.decode(encoded[0], chunk_seconds=c, batch_seconds=b) for c, b in budgets]
        decoded.append(tok.decode(encoded[-1], chunk_seconds=0.25, batch_seconds=0.6))
        runs[buckets] = encoded, each, decoded, list(shapes)
    for off, on in zip(runs[False][0], runs[True][0]):
        assert torch.equal(off.codes, on.codes) and torch.equal(off.lengths, on.lengths)
    assert all(torch.equal(off, on) for off, on in zip(runs[False][1], runs[True][1]))
    for off, on in zip(runs[False][2], runs[True][2]):  # other conv widths: float rounding may differ
        torch.testing.assert_close(on, off, rtol=0, atol=1e-5)
    caps = {tok.frame_budgets(c)[0] + sum(tok.model.context_frames["encoder"]) for c in (0.25, 0.5)}
    assert runs[False][3] != runs[True][3]
    assert all(t % hop == 0 and (t // hop in caps or round_up(t // hop, LENGTH_STEPS) == t // hop >= SHORTEST)
               for _, _, t in runs[True][3])


def test_buckets_by_device_and_autotuning_restored(tok, monkeypatch):
    assert not tok.bucketed  # CPU: only padding
    monkeypatch.setattr(tok, "device", torch.device("cuda"))  # nothing runs: the defaults only
    assert tok.bucketed
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with pytest.raises(RuntimeError, match="inside"):
        with tok.autotuning():
            assert torch.backends.cudnn.benchmark
            raise RuntimeError("inside")
    assert not torch.backends.cudnn.benchmark
    monkeypatch.setattr(tok, "buckets", False)
    with tok.autotuning():
        assert not torch.backends.cudnn.benchmark and not tok.bucketed


def test_bad_budgets(tok):
    with pytest.raises(ValueError, match="chunk_seconds"):
        tok.encode(np.zeros(100, np.float32), tok.sample_rate, chunk_seconds=0)

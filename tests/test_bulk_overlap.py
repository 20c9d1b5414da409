"""Host preparation for the encoder: it overlaps the encoder (issue 24: while the model runs on
batch n, batch n + 1 is already being prepared, in the tokenizer's encode loop and in the bulk job's;
checked by intervals with a slowed fake preparation and a slowed encoder, never by wall-clock
thresholds), and the bulk readers prepare audio as the tokenizer does (issue 25)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import make_audio

from audiotok.bulk import BulkConfig, Decoded, InputSpec, prepare, tokenize_dataset
from audiotok.data.sources import Record
from audiotok.prefetch import prefetch

#: How long the slowed steps take: long against a thread switch on a busy machine.
SLOW = 0.1


def slow_down(tok, monkeypatch) -> tuple[list, list]:
    """Slow ``tok``'s padding of each forward pass and its encoder by :data:`SLOW` each; returns the
    lists of ``(start, end)`` intervals they record, in order."""
    prepared: list[tuple[float, float]] = []
    encoded: list[tuple[float, float]] = []
    pad, encode = tok.padded_inputs, tok.model.encode

    def slow_pad(plan):
        for x in pad(plan):
            start = time.perf_counter()
            time.sleep(SLOW)
            prepared.append((start, time.perf_counter()))
            yield x

    def slow_encode(*args, **kwargs):
        start = time.perf_counter()
        time.sleep(SLOW)
        out = encode(*args, **kwargs)
        encoded.append((start, time.perf_counter()))
        return out

    monkeypatch.setattr(tok, "padded_inputs", slow_pad)
    monkeypatch.setattr(tok.model, "encode", slow_encode)
    return prepared, encoded


def assert_overlap(prepared: list, encoded: list, n: int) -> None:
    assert len(encoded) == len(prepared) == n
    for i in range(n - 1):  # batch i + 1 was being prepared before the encoder was done with batch i
        assert prepared[i + 1][0] < encoded[i][1], (i, prepared, encoded)


def test_encode_pads_the_next_pass_while_the_model_runs(tiny_tokenizer, monkeypatch):
    tok = tiny_tokenizer
    clips = [make_audio(tok.sample_rate // 4, seed=i)[0] for i in range(4)]
    want = tok.encode(clips, tok.sample_rate, batch_seconds=0.25).codes
    prepared, encoded = slow_down(tok, monkeypatch)
    got = tok.encode(clips, tok.sample_rate, batch_seconds=0.25).codes  # one clip per forward pass
    assert torch.equal(got, want)
    assert_overlap(prepared, encoded, 4)


def test_bulk_job_prepares_batch_n_plus_1_while_encoding_batch_n(tiny_tokenizer, monkeypatch, tmp_path):
    tok = tiny_tokenizer
    for i in range(4):
        sf.write(tmp_path / f"clip{i}.wav", make_audio(tok.sample_rate // 4, seed=i)[0], tok.sample_rate,
                 subtype="FLOAT")
    cfg = BulkConfig(InputSpec("folder", str(tmp_path)), str(tmp_path / "out"), num_workers=0,
                     batch_seconds=0.25, progress=False, lease_seconds=2.0)
    prepared, encoded = slow_down(tok, monkeypatch)
    summary = tokenize_dataset(cfg, tokenizer=tok)
    assert summary.records == 4 and summary.failures == 0
    assert_overlap(prepared, encoded, 4)


def test_prefetch_keeps_order_raises_in_place_and_stops_on_close():
    def numbers():
        yield from range(3)
        raise KeyError("boom")

    got = []
    with pytest.raises(KeyError, match="boom"):
        for x in prefetch(numbers(), depth=2):
            got.append(x)
    assert got == [0, 1, 2]

    pulled = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield i
            i += 1

    before = threading.active_count()
    ahead = prefetch(endless(), depth=2)
    assert [next(ahead) for _ in range(5)] == list(range(5))
    ahead.close()
    assert threading.active_count() == before
    assert len(pulled) <= 5 + 2 + 1  # never more than depth ahead (plus the one being put)
    assert np.array_equal(pulled, np.arange(len(pulled)))
    with pytest.raises(ValueError):
        next(prefetch([1], depth=0))


@pytest.mark.parametrize("rate,channels,mono", [(44100, 1, True), (16000, 2, True), (48000, 2, False),
                                                 (22050, 1, False)])
def test_bulk_readers_prepare_audio_as_the_tokenizer_does(tiny_tokenizer, rate, channels, mono):
    tok = tiny_tokenizer
    clip = make_audio(rate // 3, channels, seed=rate)
    decoded = prepare(0, 0, Record("k", clip, rate), tok.sample_rate, mono)
    assert isinstance(decoded, Decoded)
    want = tok.prepare_audio(clip, rate, mono)
    assert want.shape[0] == (1 if mono else channels) and want.dtype == np.float32
    np.testing.assert_array_equal(decoded.audio.numpy(), want)
    # what encode codes is that audio: coding it at the model rate gives the same codes
    direct = tok.encode(clip, rate, mono=mono).codes
    assert torch.equal(tok.encode(decoded.audio.numpy(), tok.sample_rate, mono=mono).codes, direct)

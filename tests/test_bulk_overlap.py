"""Host preparation for the encoder: it overlaps the encoder (issue 24: while the model runs on
batch n, batch n + 1 is already being prepared, in the tokenizer's encode loop and in the bulk job's;
checked by intervals with a slowed fake preparation and a slowed encoder, never by wall-clock
thresholds), and the bulk readers prepare audio as the tokenizer does (issue 25)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import make_audio

from audiotok.bulk import BulkConfig, Decoded, InputSpec, prepare, tokenize_dataset
from audiotok.bulk.parts import PartLoop
from audiotok.bulk.writer import PartWriter
from audiotok.data.sources import Record
from audiotok.utils.prefetch import WriteBehind, prefetch
from audiotok.utils.store import LocalStore

#: How long the slowed steps take: long against a thread switch on a busy machine.
SLOW = 0.1


def slowed(fn, seconds: float, intervals: list):
    """``fn`` made ``seconds`` slower, recording each call's ``(start, end)`` in ``intervals``."""

    def slow(*args, **kwargs):
        start = time.perf_counter()
        time.sleep(seconds)
        out = fn(*args, **kwargs)
        intervals.append((start, time.perf_counter()))
        return out

    return slow


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

    monkeypatch.setattr(tok, "padded_inputs", slow_pad)
    monkeypatch.setattr(tok.model, "encode", slowed(encode, SLOW, encoded))
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


def clips_folder(tok, folder, n: int, seconds: float = 0.25):
    """``n`` clips of ``seconds`` at the model's rate in ``folder``: one forward pass each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sf.write(folder / f"clip{i}.wav", make_audio(int(tok.sample_rate * seconds), seed=i)[0], tok.sample_rate,
                 subtype="FLOAT")


def test_bulk_job_encodes_pool_n_plus_1_while_writing_pool_n(tiny_tokenizer, monkeypatch, tmp_path):
    tok = tiny_tokenizer
    clips_folder(tok, tmp_path / "in", 4)
    cfg = BulkConfig(InputSpec("folder", str(tmp_path / "in")), str(tmp_path / "out"), num_workers=0,
                     batch_seconds=0.25, pool_seconds=0.25, progress=False, lease_seconds=2.0)  # a pool per clip
    encoded: list[tuple[float, float]] = []
    written: list[tuple[float, float]] = []
    monkeypatch.setattr(tok.model, "encode", slowed(tok.model.encode, SLOW, encoded))
    # writing that takes its time, as an upload to an object store does
    monkeypatch.setattr(PartWriter, "add_record", slowed(PartWriter.add_record, 2 * SLOW, written))
    summary = tokenize_dataset(cfg, tokenizer=tok)
    assert summary.records == 4 and summary.failures == 0
    assert len(encoded) == len(written) == 4
    for i in range(3):  # pool i + 1 was being encoded before pool i was written
        assert encoded[i + 1][0] < written[i][1], (i, encoded, written)


def test_bulk_job_encodes_while_its_claims_are_written(tiny_tokenizer, monkeypatch, tmp_path):
    """Claims on a slow store (offers, confirmations, renewals, releases: round trips to an object
    store) are kept by the claims thread while the encoder runs: none runs in the encoder's thread
    between its first and its last call, and some run during its calls."""
    tok = tiny_tokenizer
    clips_folder(tok, tmp_path / "in", 6)
    cfg = BulkConfig(InputSpec("folder", str(tmp_path / "in")), str(tmp_path / "out"), num_workers=0,
                     batch_seconds=0.25, pool_seconds=0.25, part_records=2, progress=False,
                     lease_seconds=1.0)  # 3 parts, a pool per clip, renewals every 0.25 s
    encoded: list[tuple[float, float]] = []
    claimed: list[tuple[float, float, int]] = []  # each claim operation's (start, end, thread)

    def slow_claims(operation):
        def slow(self, name, *args):
            if not name.startswith(".bulk/claims/"):
                return operation(self, name, *args)
            start = time.perf_counter()
            time.sleep(SLOW)
            out = operation(self, name, *args)
            claimed.append((start, time.perf_counter(), threading.get_ident()))
            return out
        return slow

    for name in ("exists", "read_bytes", "write_bytes", "delete"):
        monkeypatch.setattr(LocalStore, name, slow_claims(getattr(LocalStore, name)))
    monkeypatch.setattr(tok.model, "encode", slowed(tok.model.encode, SLOW, encoded))
    summary = tokenize_dataset(cfg, tokenizer=tok)
    assert summary.records == 6 and summary.failures == 0
    first, last = encoded[0][0], encoded[-1][1]
    meanwhile = [c for c in claimed if c[1] > first and c[0] < last]
    assert len(meanwhile) >= 6  # offers and confirmations of the third part, releases, renewals
    assert threading.get_ident() not in {thread for _, _, thread in meanwhile}
    assert any(start < e_end and e_start < end for start, end, _ in meanwhile for e_start, e_end in encoded)


class WriteNow:
    """The calls run at once in the caller's thread: the bulk loop as it was before its writer and
    claims threads."""

    def __init__(self, depth: int = 1, name: str = ""):
        pass

    def submit(self, call):
        return [call()]

    def results(self, wait: bool = False) -> list:
        return []

    def close(self) -> list:
        return []


def claims_now(depth: int = 1, name: str = "audiotok-write") -> WriteBehind | WriteNow:
    """The writer thread as it is, the claims thread's steps run at once in the loop's thread."""
    return WriteNow() if name == "audiotok-claims" else WriteBehind(depth, name)


def output_files(out) -> dict[str, bytes]:
    """Every file of a bulk job's output folder (its manifest without its ``created`` time)."""
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    manifest.pop("created")
    return {**files, "manifest.json": json.dumps(manifest).encode()}


def test_writing_behind_the_encoder_gives_the_same_files(tiny_tokenizer, monkeypatch, tmp_path):
    tok = tiny_tokenizer
    clips_folder(tok, tmp_path / "in", 5)
    (tmp_path / "in" / "clip5.wav").write_bytes(b"not audio")  # a failure, in the progress files

    def run(name: str) -> dict[str, bytes]:
        cfg = BulkConfig(InputSpec("folder", str(tmp_path / "in")), str(tmp_path / name), num_workers=0,
                         batch_seconds=0.25, pool_seconds=0.5, part_records=3, shard_records=2, progress=False,
                         lease_seconds=2.0)
        summary = tokenize_dataset(cfg, tokenizer=tok)
        assert summary.records == 5 and summary.failures == 1
        return output_files(tmp_path / name)

    monkeypatch.setattr(PartWriter, "add_record", slowed(PartWriter.add_record, SLOW / 2, []))
    behind = run("behind")  # the writer thread lags the encoder
    monkeypatch.setattr("audiotok.bulk.parts.WriteBehind", WriteNow)
    now = run("now")
    assert len([n for n in now if n.startswith("part-")]) == 3 and ".bulk/done/part-000001.json" in now
    assert behind == now


def test_a_part_taken_over_is_dropped_after_the_writes_handed_over(tiny_tokenizer, monkeypatch, tmp_path, caplog):
    """A part another process claims mid-way: its unfinished shard is dropped once the writer thread has
    written what was handed to it, and the part is done again when that claim lapses: the same files."""
    tok = tiny_tokenizer
    clips_folder(tok, tmp_path / "in", 4)

    def run(name: str) -> dict[str, bytes]:
        cfg = BulkConfig(InputSpec("folder", str(tmp_path / "in")), str(tmp_path / name), num_workers=0,
                         batch_seconds=0.25, pool_seconds=0.25, progress=False, lease_seconds=2.0)
        assert tokenize_dataset(cfg, tokenizer=tok).failures == 0
        return output_files(tmp_path / name)

    want = run("reference")
    claim, encode = tmp_path / "out/.bulk/claims/part-000000.json", tok.model.encode

    def encode_then_lose_the_part(*args, **kwargs):
        if len(encoded) == 1:  # the second pool: another process claims the part for a second
            claim.write_text(json.dumps({"owner": "elsewhere/1/x", "expires": time.time() + 1.0}))
        return encode(*args, **kwargs)

    events: list[tuple[str, PartWriter]] = []  # the writers themselves: no id reused
    add_record, abort = PartWriter.add_record, PartWriter.abort

    def slow_add_record(self, *args):  # the writes are still pending when the part is lost
        time.sleep(SLOW)
        add_record(self, *args)
        events.append(("add", self))

    def logged_abort(self):
        events.append(("abort", self))
        abort(self)

    encoded: list = []
    monkeypatch.setattr(tok.model, "encode", slowed(encode_then_lose_the_part, 0, encoded))
    monkeypatch.setattr(PartWriter, "add_record", slow_add_record)
    monkeypatch.setattr(PartWriter, "abort", logged_abort)
    monkeypatch.setattr(PartLoop, "renew_due", property(lambda self: True))  # renewed after every bundle
    # claims kept in the loop's thread: the loss is seen at the renewal after the claim is taken
    monkeypatch.setattr("audiotok.bulk.parts.WriteBehind", claims_now)
    got = run("out")
    assert "part 0 was taken over by another process" in caplog.text
    [(dropped, lost)] = [(i, w) for i, (what, w) in enumerate(events) if what == "abort"]
    added = [i for i, (what, w) in enumerate(events) if what == "add" and w is lost]
    assert added and max(added) < dropped  # dropped after the writes handed over before, none after
    assert len(encoded) > 4  # encoded again after the other claim lapsed
    assert got == want


def test_write_behind_keeps_order_bounds_its_queue_and_raises_at_the_next_handoff():
    ran: list[int] = []
    gate, failing = threading.Event(), threading.Event()

    def call(i: int):
        def run() -> int:
            gate.wait()
            ran.append(i)
            return i
        return run

    def boom() -> int:
        failing.wait()
        raise KeyError("boom")

    before = threading.active_count()
    behind: WriteBehind[int] = WriteBehind(depth=1)
    assert behind.submit(call(0)) + behind.submit(call(1)) == []  # 0 runs (held by the gate), 1 waits
    threading.Timer(SLOW, gate.set).start()
    got = behind.submit(call(2))  # no place until 0 ends
    assert gate.is_set()
    assert got + behind.results(wait=True) == [0, 1, 2] == ran
    assert behind.submit(boom) == [] and behind.submit(call(3)) == []
    failing.set()
    with pytest.raises(KeyError, match="boom"):
        behind.results(wait=True)
    with pytest.raises(KeyError, match="boom"):
        behind.close()
    assert ran == [0, 1, 2]  # nothing after the failed call ran
    assert threading.active_count() == before
    with pytest.raises(RuntimeError):
        behind.submit(call(4))


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

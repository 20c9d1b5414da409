"""Issue 26, round three: workers that end with their parent, failures reported with their meaning,
codes of another model, bounded memory, partial results that say so, and resumes that notice changes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return not sys.platform.startswith("linux")


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux ``/proc``)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"after {seconds} s: {what}")
        time.sleep(0.1)


def run_script(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=ENV, stdout=subprocess.PIPE,
                            text=True)


def kill_and_check_workers_end(proc: subprocess.Popen, workers: list[int]) -> None:
    try:
        assert workers and all(alive(w) for w in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        wait_until(lambda: not any(alive(w) for w in workers), 20, f"workers {workers} outlived their parent")
    finally:
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)
        proc.kill()


# ---------------------------------------------------------------------------------------------
# Class 4: processes left behind


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="lists child processes through /proc")
def test_bulk_readers_end_when_the_job_is_killed(tmp_path):
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000)
    proc = run_script("""
        import sys, time
        from types import SimpleNamespace
        from audiotok.bulk import InputSpec
        from audiotok.bulk.torch_engine import LoaderReads
        source = InputSpec("folder", sys.argv[1]).build()
        config = SimpleNamespace(num_workers=2, mono=True, min_seconds=0.0)
        job = SimpleNamespace(config=config, source=source, parts=source.partition(10),
                              tokenizer=SimpleNamespace(sample_rate=16000))
        reads = LoaderReads(job, 10.0)  # two workers, blocked on their task queue
        print("ready", flush=True)
        time.sleep(600)
    """, str(tmp_path))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    wait_until(lambda: len(children(proc.pid)) >= 2, 60, "the DataLoader workers did not start")
    kill_and_check_workers_end(proc, children(proc.pid))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="lists child processes through /proc")
def test_the_watchdog_thread_ends_a_worker_without_the_parent_death_signal():
    """What ends workers on macOS, where there is no PR_SET_PDEATHSIG."""
    proc = run_script("""
        import multiprocessing, os, time
        from audiotok.utils import workers

        def child(parent):
            workers._set_parent_death_signal = lambda: None
            workers.die_with_parent(parent, poll=0.1)
            time.sleep(600)

        if __name__ == "__main__":
            multiprocessing.get_context("fork").Process(target=child, args=(os.getpid(),)).start()
            print("ready", flush=True)
            time.sleep(600)
    """)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    wait_until(lambda: len(children(proc.pid)) >= 1, 30, "the worker did not start")
    kill_and_check_workers_end(proc, children(proc.pid))


# ---------------------------------------------------------------------------------------------
# Shared fixtures: a tiny model folder and a folder of short clips


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from conftest import random_tokenizer

    folder = tmp_path_factory.mktemp("model")
    random_tokenizer("tiny-44khz").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok(model_dir):
    from audiotok import AudioTokenizer

    return AudioTokenizer.from_pretrained(model_dir)


def write_clips(folder: Path, names: list[str], seconds: float = 0.1, rate: int = 16000) -> None:
    import soundfile as sf
    from conftest import make_audio

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        sf.write(folder / name, make_audio(int(seconds * rate), seed=i)[0], rate)


def enospc(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


# ---------------------------------------------------------------------------------------------
# Class 5: failures reported with their meaning


def test_a_failing_store_is_a_storage_error(tmp_path, monkeypatch):
    import fsspec

    from audiotok.utils.io import StorageError
    from audiotok.utils.store import FsspecStore, LocalStore

    local = LocalStore(tmp_path / "out")
    monkeypatch.setattr(os, "replace", enospc)
    with pytest.raises(StorageError, match=r"out/a\.json: No space left on device") as e:
        local.write_json("a.json", {})
    assert e.value.errno == 28
    monkeypatch.undo()

    remote = FsspecStore("memory://reliab/out")
    fs = fsspec.filesystem("memory")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Could not connect to the endpoint URL\nsecond line")

    for method in ("pipe_file", "cat_file", "isfile", "put_file"):
        monkeypatch.setattr(type(fs), method, unreachable)
    with pytest.raises(StorageError, match=r"^memory://reliab/out/a\.json: ConnectionError: Could not connect[^\n]*$"):
        remote.write_json("a.json", {})
    with pytest.raises(StorageError):
        remote.exists("a.json")


def test_the_bulk_recipe_exits_4_when_the_output_storage_fails(tmp_path, model_dir, monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "recipes"))
    try:
        import tokenize_dataset as recipe
    finally:
        sys.path.remove(str(REPO / "recipes"))
    import audiotok.utils.store

    write_clips(tmp_path / "in", ["a.wav", "b.wav"])
    monkeypatch.setattr(audiotok.utils.store, "replace_durably", enospc)  # publishing a shard finds the disk full
    args = ["--input", str(tmp_path / "in"), "--input-type", "folder", "--output", str(tmp_path / "out"),
            "--model", str(model_dir), "--device", "cpu", "--num-workers", "0", "--no-progress"]
    assert recipe.main(args) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "run the same command again" in err
    monkeypatch.undo()
    assert recipe.main(args) == 0  # the storage works again: the job resumes and ends


@pytest.mark.parametrize("device", ["meta", "cuda:7", "nonsense"])
def test_a_device_that_cannot_run_is_exit_2(tmp_path, model_dir, capsys, device):
    from audiotok.cli.main import main

    write_clips(tmp_path, ["a.wav"])
    assert main(["encode", str(tmp_path / "a.wav"), str(tmp_path / "a.atok"), "--model", str(model_dir),
                 "--device", device]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and device in err and "internal error" not in err


# ---------------------------------------------------------------------------------------------
# Class 10 (CLI): a full disk stops a folder run; a rerun keeps what was written


def test_a_full_disk_stops_a_folder_encode_and_the_rerun_keeps_what_was_written(tmp_path, model_dir, capsys,
                                                                                 monkeypatch):
    from audiotok.cli.main import main
    from audiotok.formats.codefile import CodeFile

    write_clips(tmp_path / "in", ["a.wav", "b.wav", "c.wav"])
    save, calls, full = CodeFile.save, [], [True]

    def second_fails(self, path, *args):  # the disk is full at the second file of the first run
        calls.append(path)
        if len(calls) == 2 and full and full.pop():
            enospc()
        return save(self, path, *args)

    monkeypatch.setattr(CodeFile, "save", second_fails)
    args = ["encode", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(model_dir)]
    assert main(args) == 4
    assert len(calls) == 2, "every remaining file was tried after the disk was full"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b.atok: No space left on device" in err[0] and "run the same command again" in err[0]
    first = (tmp_path / "out" / "a.atok").stat().st_mtime_ns
    assert not (tmp_path / "out" / "b.atok").exists()

    calls.clear()
    assert main(args) == 0
    assert [p.name for p in calls] == ["b.atok", "c.atok"]
    assert (tmp_path / "out" / "a.atok").stat().st_mtime_ns == first
    assert "encoded 2 of 3 files (1 already encoded by an earlier run, kept)" in capsys.readouterr().out
    calls.clear()
    assert main([*args, "--n-quantizers", "1"]) == 0  # other settings: encoded again
    assert len(calls) == 3
    calls.clear()
    assert main([*args, "--n-quantizers", "1", "--overwrite"]) == 0
    assert len(calls) == 3


# ---------------------------------------------------------------------------------------------
# Class 9: partial results that look whole


def test_a_path_that_is_no_audio_file_nor_a_folder_of_audio_is_an_error(tmp_path, model_dir, capsys):
    from audiotok.cli.main import main

    (tmp_path / "x.wav").mkdir()
    (tmp_path / "x.wav" / "notes.txt").write_text("not audio")
    for command in ("encode", "decode"):
        assert main([command, str(tmp_path / "x.wav"), str(tmp_path / "out"), "--model", str(model_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "x.wav: a folder without" in err


def _encoded(path: Path, fmt: str, subtype: str, seconds: float = 4.0) -> bytes:
    import soundfile as sf
    from conftest import make_audio

    sf.write(path, make_audio(int(seconds * 16000))[0], 16000, format=fmt, subtype=subtype)
    return path.read_bytes()


@pytest.mark.parametrize("fmt,subtype,why", [
    ("OGG", "VORBIS", "end-of-stream page"), ("OGG", "OPUS", "end-of-stream"), ("MP3", "MPEG_LAYER_III", "declares"),
    ("FLAC", "PCM_16", "decoding stopped")])
def test_truncated_compressed_files_are_read_with_a_warning_naming_what_was_read(tmp_path, fmt, subtype, why):
    import warnings

    from audiotok.audio import load_audio

    whole = tmp_path / f"whole.{fmt.lower()}"
    data = _encoded(whole, fmt, subtype, seconds=10.0)  # longer than a block read (65536 frames)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full, rate = load_audio(whole)  # a whole file: no warning
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=rf"cut\.{fmt.lower()}: partial audio: .*{why}.*; \d+ frames \([\d.]+ s\) "
                                          "were read") as record:
        part, _ = load_audio(cut)
    assert 0 < part.shape[-1] < full.shape[-1]
    assert f"{part.shape[-1]} frames" in str(record[0].message)


def test_outputs_appear_whole_or_not_at_all(tmp_path, tok):
    import numpy as np

    from audiotok.audio import audio_writer, save_audio
    from audiotok.cli.files import decode_path, encode_path

    with pytest.raises(KeyboardInterrupt):  # a writer killed mid-way
        with audio_writer(tmp_path / "a.wav", 16000, 1) as write:
            write(np.zeros(1000, np.float32))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    save_audio(tmp_path / "b.wav", np.zeros(100, np.float32), 16000)
    assert [p.name for p in tmp_path.iterdir()] == ["b.wav"]

    write_clips(tmp_path / "in", ["c.wav"], seconds=1.0)
    encode_path(tok, tmp_path / "in" / "c.wav", tmp_path / "c.atok")

    def interrupted(*args, **kwargs):
        yield np.zeros((1, 100), np.float32)
        raise KeyboardInterrupt

    import audiotok.cli.files as files

    original = files.resample_blocks
    files.resample_blocks = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            decode_path(tmp_path / "c.atok", tmp_path / "c.wav", tok)
    finally:
        files.resample_blocks = original
    assert not (tmp_path / "c.wav").exists() and not list(tmp_path.glob(".c.wav*"))


# ---------------------------------------------------------------------------------------------
# Class 8: memory that grows with a lie or a large valid input


def test_a_header_declaring_too_much_is_refused_before_reading(tmp_path, monkeypatch):
    import struct

    import audiotok.audio as audio

    data = bytearray(_encoded(tmp_path / "a.flac", "FLAC", "PCM_16", seconds=1.0))
    # STREAMINFO (after "fLaC" and its 4-byte block header): the low 36 bits of bytes 10..17 count the samples
    (packed,) = struct.unpack(">Q", data[18:26])
    data[18:26] = struct.pack(">Q", (packed & ~((1 << 36) - 1)) | (1 << 35))
    (tmp_path / "lie.flac").write_bytes(data)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"lie\.flac: its header declares 34359738368 frames .* split the recording"):
        audio.load_audio(tmp_path / "lie.flac")
    assert time.monotonic() - t0 < 5

    monkeypatch.setattr(audio, "MAX_AUDIO_SAMPLES", 1000)  # the limit holds whatever a header declares
    with pytest.raises(ValueError, match="declares 16000 frames"):
        audio.load_audio(tmp_path / "a.flac")
    monkeypatch.setattr(audio, "_check_declared", lambda *args: None)
    with pytest.raises(ValueError, match="holds more than 1000 samples"):
        audio.load_audio(tmp_path / "a.flac")


def test_a_wav_header_claiming_2_gb_reads_what_the_file_holds(tmp_path):
    import struct

    from audiotok.audio import load_audio

    data = bytearray(_encoded(tmp_path / "a.wav", "WAV", "PCM_16", seconds=1.0))
    at = data.find(b"data")
    data[at + 4: at + 8] = struct.pack("<I", 2_000_000_000)
    (tmp_path / "lie.wav").write_bytes(data)
    with pytest.warns(UserWarning, match=r"lie\.wav: partial audio: its header announces 2000000000 .*16000 frames"):
        audio, _ = load_audio(tmp_path / "lie.wav")
    assert audio.shape == (1, 16000)


def test_long_code_files_decode_piece_by_piece_as_whole_decoding(tmp_path, tok, monkeypatch):
    import numpy as np
    import soundfile as sf
    import torch

    from audiotok.audio import resample
    from audiotok.cli.files import decode_path
    from audiotok.formats.codefile import CodeFile
    from audiotok.tokenizer import DEFAULT_SECONDS, EncodedAudio

    monkeypatch.setitem(DEFAULT_SECONDS, "cpu", (2.0, 2.0))  # pieces of 172 frames: a long file, made short
    frames = 600
    codes = torch.randint(0, tok.codebook_size, (1, 1, frames))
    num_samples = int((frames * tok.hop_length - 200) * 16000 / tok.sample_rate)  # at 16 kHz, the source's rate
    encoded = EncodedAudio(codes, torch.tensor([frames]), torch.tensor([num_samples]), 16000, tok.identity)
    code_file = CodeFile.from_encoded(tok, encoded, 0, 1)
    code_file.save(tmp_path / "long.atok")
    whole = tok.decode(code_file.to_encoded())[:, 0].numpy()
    chunk = tok.frame_budgets()[0]
    assert chunk is not None and chunk < frames / 3  # several pieces

    import audiotok.cli.files as files

    pieces: list[int] = []
    resample_blocks = files.resample_blocks

    def recorded(blocks, *rates):  # the decoded pieces on their way to the resampler and the file
        return resample_blocks((pieces.append(b.shape[-1]) or b for b in blocks), *rates)

    monkeypatch.setattr(files, "resample_blocks", recorded)
    decode_path(tmp_path / "long.atok", tmp_path / "long.wav", tok, subtype="FLOAT", sample_rate="source")
    assert len(pieces) > 2 and max(pieces) <= 2 * chunk * tok.hop_length  # bounded memory
    assert sum(pieces) == whole.shape[-1]
    written, written_rate = sf.read(tmp_path / "long.wav", dtype="float32", always_2d=True)
    assert written_rate == 16000
    np.testing.assert_allclose(written.T, resample(whole, tok.sample_rate, 16000), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Class 6: codes of another model mixed in


def write_dataset(root: Path, tok, shards: dict[str, object], fmt: str = "webdataset") -> None:
    """A code dataset whose manifest names ``tok`` and lists ``shards`` (name -> the tokenizer that wrote it)."""
    import numpy as np

    from audiotok.formats.codedataset import SHARD_WRITERS, Manifest, ShardEntry, dataset_metadata
    from audiotok.utils.store import LocalStore

    entries = []
    for name, writer_tok in shards.items():
        metadata = dataset_metadata(writer_tok.identity, writer_tok.config, 2, True)
        with SHARD_WRITERS[fmt](root / name, metadata) as shard:
            for i in range(3):
                frames = 5 + i
                shard.add({"key": f"{Path(name).stem}_{i}", "source_key": f"{i}.wav", "channels": 1,
                           "num_samples": frames * tok.hop_length, "sample_rate": tok.sample_rate, "n_frames": frames,
                           "model_id": writer_tok.model_id}, np.full((2, frames), i, np.uint16))
        entries.append(ShardEntry(name, shard.records, shard.frames))
    Manifest(tok.identity, tok.config, tuple(entries), n_quantizers=2, mono=True).write(LocalStore(root))


@pytest.mark.parametrize("fmt,suffix", [("webdataset", ".tar"), ("parquet", ".parquet")])
def test_a_shard_of_another_model_is_refused(tmp_path, tok, fmt, suffix):
    from conftest import random_tokenizer

    from audiotok.lm import CodeDataset

    other = random_tokenizer("tiny-44khz", seed=1)  # the same architecture and name, other weights
    assert other.model_id == tok.model_id and other.codes_fingerprint != tok.codes_fingerprint
    write_dataset(tmp_path, tok, {f"a{suffix}": tok, f"b{suffix}": other}, fmt)
    records = iter(CodeDataset(tmp_path))
    assert [next(records).key for _ in range(3)] == ["a_0", "a_1", "a_2"]
    with pytest.raises(ValueError, match=rf"b\{suffix}.*codes_fingerprint '{other.codes_fingerprint}' \(the manifest "
                                         rf"says '{tok.codes_fingerprint}'\)"):
        next(records)


def test_a_shard_listed_twice_is_refused(tmp_path, tok):
    import json

    from audiotok.lm import CodeDataset

    write_dataset(tmp_path, tok, {"a.tar": tok})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"].append({**manifest["shards"][0], "path": "./a.tar"})
    manifest["records"] *= 2
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json: shard 'a\.tar' is listed 2 times"):
        CodeDataset(tmp_path)


@pytest.mark.parametrize("fmt,suffix", [("webdataset", ".tar"), ("parquet", ".parquet")])
def test_a_truncated_shard_is_an_error_naming_it(tmp_path, tok, fmt, suffix):
    from audiotok.lm import CodeDataset

    write_dataset(tmp_path, tok, {f"a{suffix}": tok}, fmt)
    shard = tmp_path / f"a{suffix}"
    data = shard.read_bytes()
    end = len(data)
    if fmt == "webdataset":  # where the last member's data ends (zero blocks pad a tar after it)
        import tarfile

        with tarfile.open(shard) as tar:
            end = max(m.offset_data + m.size for m in tar.getmembers())
    for cut in (100, end // 3, end // 2, end - 100, end - 1):
        shard.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"^{tmp_path}/a\{suffix}: ") as e:
            list(CodeDataset(tmp_path))
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Class 10 (bulk): a resume notices a changed input


def test_a_resume_on_a_changed_listing_of_the_same_size_is_refused(tmp_path, model_dir, monkeypatch):
    from audiotok.bulk import BulkConfig, InputSpec, tokenize_dataset, torch_engine

    write_clips(tmp_path / "in", ["a.wav", "b.wav", "c.wav"])
    config = BulkConfig(InputSpec("folder", str(tmp_path / "in")), str(tmp_path / "out"), str(model_dir),
                        num_workers=0, part_records=2, device="cpu", progress=False)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch_engine, "work", killed)  # the job is planned, then killed
    with pytest.raises(KeyboardInterrupt):
        tokenize_dataset(config)
    monkeypatch.undo()
    (tmp_path / "in" / "b.wav").rename(tmp_path / "in" / "d.wav")  # the same count, another listing
    with pytest.raises(ValueError, match=r"another listing of the input .*\(3 files then, 3 now.*new --output"):
        tokenize_dataset(config)
    (tmp_path / "in" / "d.wav").rename(tmp_path / "in" / "b.wav")
    assert tokenize_dataset(config).records == 3

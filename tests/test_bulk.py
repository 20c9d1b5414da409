"""Bulk tokenization (audiotok.bulk, recipes/tokenize_dataset.py): exact codes, formats, manifest, resume, ranks."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audiotok import AudioTokenizer
from audiotok.bulk import BulkConfig, InputSpec, record_key, safe_name, tokenize_dataset
from audiotok.bulk.writer import PartWriter
from audiotok.segments import LENGTH_STEPS, SHORTEST, round_up

REPO = Path(__file__).resolve().parents[1]

# name -> (rate, channels, seconds); the 1.1 s file is chunked (chunk_seconds=0.5)
GOOD = {
    "a/mono16k.wav": (16000, 1, 0.3),
    "a/stereo44k.flac": (44100, 2, 0.3),
    "b/long22k.flac": (22050, 1, 1.1),
    "b/tone48k.wav": (48000, 1, 0.3),
    "c/v1.two.dots.wav": (8000, 1, 0.2),
    "c/stereo24k.wav": (24000, 2, 0.25),
}
BAD = {"bad/corrupt.wav": "decode", "bad/empty.wav": "empty", "bad/nan.wav": "nonfinite",
       "bad/noframes.wav": "empty", "bad/onesample96k.wav": "short"}


def noise(rng, seconds, sr, channels):
    t = np.arange(round(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 330 * t)[:, None] + 0.1 * rng.standard_normal((len(t), channels))
    return x.astype(np.float32)


def write_corpus(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name, (sr, ch, sec) in GOOD.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / name, noise(rng, sec, sr, ch), sr, subtype="PCM_16" if name.endswith(".wav") else "PCM_24")
    (root / "bad").mkdir()
    (root / "bad/corrupt.wav").write_bytes(rng.bytes(3000))
    (root / "bad/empty.wav").write_bytes(b"")
    sf.write(root / "bad/noframes.wav", np.zeros((0, 1), np.float32), 16000)
    nan = noise(rng, 0.2, 16000, 1)
    nan[50:60] = np.nan
    sf.write(root / "bad/nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(root / "bad/onesample96k.wav", np.full((1, 1), 0.1, np.float32), 96000, subtype="FLOAT")
    (root / "a/notes.txt").write_text("not audio")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny model gains nothing from more, and on a busy 2-core machine
    OpenMP threads waiting for each other make every forward pass ~50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    AudioTokenizer.from_config("tiny-44khz", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok(model_dir):
    return AudioTokenizer.from_pretrained(model_dir)


_cache: dict = {}


def direct_codes(tok, path, n_quantizers=None, mono=True) -> np.ndarray:
    """What tokenizer.encode gives for the file alone: [K, F] (mono) or [C, K, F]."""
    key = (str(path), n_quantizers, mono)
    if key not in _cache:
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
        enc = tok.encode(audio.T, sr, n_quantizers, mono=mono)
        _cache[key] = enc.codes[0].numpy()
    return _cache[key]


def read_output(out: Path) -> tuple[dict, dict[str, tuple[dict, np.ndarray]]]:
    """(manifest, {key: (metadata, codes)}) read back from the shards listed in the manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    records: dict[str, tuple[dict, np.ndarray]] = {}
    keys: list[str] = []
    for shard in manifest["shards"]:
        path = out / shard["path"]
        n = 0
        if path.suffix == ".tar":
            members: dict[str, dict[str, bytes]] = {}
            with tarfile.open(path) as tar:
                for m in tar:
                    key, ext = m.name.split(".", 1)
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
            for key, files in members.items():
                assert set(files) - {"meta.json"} == {"codes.npy", "json"}
                meta = json.loads(files["json"])
                if "meta.json" in files:  # kept metadata, read with plain tarfile + json
                    meta["metadata"] = json.loads(files["meta.json"])
                codes = np.load(io.BytesIO(files["codes.npy"]), allow_pickle=False)
                assert codes.dtype == np.uint16
                records[key] = (meta, codes)
                keys.append(key)
                n += 1
        else:
            import pyarrow.parquet as pq

            for row in pq.read_table(path).to_pylist():
                codes = np.array(row["codes"], dtype=np.uint16)  # nested lists [K][F] or [C][K][F]
                meta = {k: v for k, v in row.items() if k != "codes" and not k.startswith("meta.")}
                kept = {k[len("meta."):]: json.loads(v) for k, v in row.items() if k.startswith("meta.")}
                if kept:
                    meta["metadata"] = kept
                records[row["key"]] = (meta, codes)
                keys.append(row["key"])
                n += 1
        assert n == shard["records"]
        assert shard["frames"] == sum(records[k][0]["n_frames"] for k in keys[-n:])
    assert len(keys) == len(set(keys)) == manifest["records"]
    return manifest, records


def check_against_direct(records, tok, path_of, n_quantizers=None, mono=True):
    """Every record's codes equal the direct encode of its source file; every file appears once."""
    seen = []
    for key, (meta, codes) in records.items():
        path = path_of(meta["source_key"])
        want = direct_codes(tok, path, n_quantizers, mono)
        np.testing.assert_array_equal(codes, want, err_msg=meta["source_key"])
        info = sf.info(path)
        assert (meta["num_samples"], meta["sample_rate"], meta["channels"]) == (
            info.frames, info.samplerate, info.channels)
        assert meta["n_frames"] == codes.shape[-1] and meta["key"] == key and meta["model_id"] == "random"
        assert "." not in key and "/" not in key
        seen.append(os.path.basename(path))
    return sorted(seen)


def config(spec, out, model_dir, **kw) -> BulkConfig:
    kw = {"num_workers": 2, "progress": False, "batch_seconds": 1.0, "chunk_seconds": 0.5, "lease_seconds": 2.0, **kw}
    return BulkConfig(spec, str(out), str(model_dir), **kw)


def file_times(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*"))}


# ---------------------------------------------------------------------------------------------


def test_keys_are_webdataset_safe():
    assert safe_name("a/b/song.v2.final.flac") == "song_v2_final"
    assert safe_name("/data/shard-000.tar:sample.000") == "sample_000"
    assert safe_name("17:clip.wav") == "clip" and safe_name("17") == "17" and safe_name("..") == "record"
    assert record_key("x/y.wav", 3, 12) == "y_p3_12"
    assert len(safe_name("n" * 500)) == 64


@pytest.fixture(scope="module")
def folder_job(corpus, model_dir, tmp_path_factory):
    """The corpus folder tokenized to WebDataset shards of two records, parts of four files, two workers."""
    out = tmp_path_factory.mktemp("folder-job") / "out"
    cfg = config(InputSpec("folder", str(corpus)), out, model_dir, shard_records=2, part_records=4)
    return cfg, tokenize_dataset(cfg)


def test_folder_to_webdataset_exact_and_rerun_does_nothing(corpus, tok, folder_job):
    cfg, summary = folder_job
    out = Path(cfg.output)
    manifest, records = read_output(out)

    assert check_against_direct(records, tok, lambda k: corpus / k) == sorted(os.path.basename(f) for f in GOOD)
    assert manifest["format"] == "audiotok-code-dataset" and manifest["format_version"] == 3
    assert manifest["metadata"] == []
    assert manifest["config"] == tok.config.to_dict() and manifest["config_hash"] == tok.config.architecture_hash()
    assert manifest["codes_fingerprint"] == tok.codes_fingerprint
    assert (manifest["hop_length"], manifest["frame_rate"]) == (512, tok.frame_rate)
    assert (manifest["n_quantizers"], manifest["mono"], manifest["model_id"]) == (4, True, "random")
    assert manifest["input"] == {"type": "folder", "path": str(corpus)}
    assert manifest["records"] == len(GOOD) == summary.records == summary.run_records
    hours = sum(round(sec * sr) / sr for sr, _, sec in GOOD.values()) / 3600
    assert manifest["audio_hours"] == pytest.approx(hours) and summary.audio_hours == pytest.approx(hours)
    assert {f["key"]: f["reason"] for f in manifest["failures"]} == BAD
    assert all(set(f) == {"key", "reason", "detail"} for f in manifest["failures"])
    assert summary.failures == len(BAD) and summary.throughput > 0
    # 11 files in parts of 4: [a, a, b, b] in two shards of two, [bad x 4] in none, [bad, c, c] in one
    shards = sorted(p.name for p in out.glob("part-*"))
    assert shards == [s["path"] for s in manifest["shards"]] == [
        "part-000000-0000.tar", "part-000000-0001.tar", "part-000002-0000.tar"]
    assert [s["records"] for s in manifest["shards"]] == [2, 2, 2]
    assert sorted(p.name for p in out.iterdir()) == [".bulk", "manifest.json", *shards]
    plan = json.loads((out / ".bulk/plan.json").read_text())
    assert plan["parts"] == [{"rows": [0, 4]}, {"rows": [4, 8]}, {"rows": [8, 11]}]
    assert plan["job"]["part_records"] == 4 and plan["job"]["shard_records"] == 2
    assert sorted(p.name for p in (out / ".bulk/done").iterdir()) == [f"part-00000{i}.json" for i in range(3)]
    assert not list((out / ".bulk/claims").iterdir())  # released when done
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    # readable with webdataset itself
    import webdataset as wds

    urls = [str(out / s["path"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert sorted(s["__key__"] for s in samples) == sorted(records)
    for s in samples:
        np.testing.assert_array_equal(s["codes.npy"], records[s["__key__"]][1])

    # a finished job run again does nothing
    before = file_times(out)
    again = tokenize_dataset(cfg)
    assert file_times(out) == before
    assert again.run_records == 0 and again.records == len(GOOD)
    assert "nothing to do" in str(again)


def test_saved_hf_dataset_to_parquet_per_channel(corpus, model_dir, tok, tmp_path):
    from datasets import Audio, Dataset, load_dataset

    files = [str(corpus / f) for f in sorted(GOOD)] + [str(corpus / "bad/corrupt.wav"), str(corpus / "bad/nan.wav")]
    saved = tmp_path / "saved"
    Dataset.from_dict({"sound": files}).cast_column("sound", Audio()).save_to_disk(str(saved))
    out = tmp_path / "out"
    spec = InputSpec("hf", str(saved), audio_column="sound")
    tokenize_dataset(config(spec, out, model_dir, format="parquet", mono=False, n_quantizers=2, num_workers=1))
    manifest, records = read_output(out)
    by_name = {os.path.basename(f): f for f in files}
    names = check_against_direct(records, tok, lambda k: by_name[k.split(":", 1)[1]], n_quantizers=2, mono=False)
    assert names == sorted(os.path.basename(f) for f in GOOD)
    assert all(codes.ndim == 3 and codes.shape[:2] == (meta["channels"], 2) for meta, codes in records.values())
    assert (manifest["mono"], manifest["n_quantizers"]) == (False, 2)
    assert manifest["input"] == {"type": "hf", "path": str(saved), "split": "train", "audio_column": "sound",
                                 "streaming": False}
    assert sorted(f["reason"] for f in manifest["failures"]) == ["decode", "nonfinite"]

    import pyarrow.parquet as pq

    shard = out / manifest["shards"][0]["path"]
    schema = pq.read_schema(shard)
    assert [(f.name, str(f.type)) for f in schema] == [
        ("key", "string"), ("codes", "list<element: list<element: list<element: uint16>>>"), ("n_frames", "int32"),
        ("num_samples", "int64"), ("sample_rate", "int32"), ("channels", "int16"), ("source_key", "string"),
        ("model_id", "string")]
    assert json.loads(schema.metadata[b"audiotok"]) == {
        "model_id": tok.model_id, "config_hash": manifest["config_hash"], "codes_fingerprint": tok.codes_fingerprint,
        "sample_rate": tok.sample_rate, "hop_length": tok.hop_length, "frame_rate": tok.frame_rate,
        "n_quantizers": 2, "codebook_size": tok.codebook_size, "mono": False}
    # datasets reads the codes as arrays, with no reshaping
    ds = load_dataset("parquet", data_files=[str(out / s["path"]) for s in manifest["shards"]], split="train")
    assert len(ds) == len(GOOD)
    for row in ds.with_format("numpy"):
        np.testing.assert_array_equal(row["codes"], records[row["key"]][1])


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_audiofolder_and_streaming_with_workers(corpus, model_dir, tok, tmp_path, streaming):
    """An audio folder through datasets' audiofolder builder; streaming with two DataLoader workers
    (datasets would split a stream among workers a second time: every record must still come once)."""
    out = tmp_path / "out"
    spec = InputSpec("hf", str(corpus / "a"), streaming=streaming)
    tokenize_dataset(config(spec, out, model_dir, num_workers=2, shard_records=1))
    manifest, records = read_output(out)
    check_against_direct(records, tok, lambda k: corpus / "a" / os.path.basename(k.split(":", 1)[1]))
    assert sorted(os.path.basename(m["source_key"]) for m, _ in records.values()) == ["mono16k.wav", "stereo44k.flac"]
    assert manifest["failures"] == []


def write_tars(root: Path, corpus: Path) -> dict[str, str]:
    """Two WebDataset shards of the good files (as flac / wav bytes), plus a sample without audio
    and one with corrupt audio. Returns {sample key: source file}."""
    import webdataset as wds

    names = sorted(GOOD)
    where = {}
    for s in range(2):
        with wds.TarWriter(str(root / f"in-{s:02d}.tar")) as w:
            for i, name in enumerate(names[s::2]):
                key = f"s{s}/item{i:03d}"
                ext = name.rsplit(".", 1)[1]
                w.write({"__key__": key, ext: (corpus / name).read_bytes(), "txt": b"caption"})
                where[key] = str(corpus / name)
            if s == 1:
                w.write({"__key__": "s1/notes", "txt": b"hello"})
                w.write({"__key__": "s1/junk", "flac": b"junk" * 100})
    return where


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [2, 3])  # 2 tars, 2 parts: a third worker has nothing to read
def test_webdataset_input(corpus, model_dir, tok, tmp_path, workers):
    where = write_tars(tmp_path, corpus)
    out = tmp_path / "out"
    spec = InputSpec("webdataset", str(tmp_path / "in-{00..01}.tar"))
    tokenize_dataset(config(spec, out, model_dir, num_workers=workers, format="parquet"))
    manifest, records = read_output(out)
    names = check_against_direct(records, tok, lambda k: where[k.rsplit(":", 1)[1]])
    assert names == sorted(os.path.basename(f) for f in GOOD)
    assert sorted((f["key"].rsplit(":", 1)[1], f["reason"]) for f in manifest["failures"]) == [
        ("s1/junk", "decode"), ("s1/notes", "noaudio")]
    assert manifest["input"]["path"] == str(tmp_path / "in-{00..01}.tar")

    # the audio member is a setting: with flac only, the wav samples have no audio
    out2 = tmp_path / "flac-only"
    spec = InputSpec("webdataset", [str(tmp_path / "in-00.tar"), str(tmp_path / "in-01.tar")], audio_keys="flac")
    tokenize_dataset(config(spec, out2, model_dir, num_workers=0))
    manifest2, records2 = read_output(out2)
    assert all(m["source_key"].endswith(tuple(k for k, f in where.items() if f.endswith(".flac")))
               for m, _ in records2.values())
    n_wav = sum(f.endswith(".wav") for f in where.values())
    assert [f["reason"] for f in manifest2["failures"]].count("noaudio") == n_wav + 1


def test_min_seconds_skips_short_records(corpus, model_dir, tmp_path):
    out = tmp_path / "out"
    summary = tokenize_dataset(config(InputSpec("folder", str(corpus / "c")), out, model_dir, min_seconds=0.22))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["records"] == 1 and summary.failures == 1
    assert manifest["failures"][0]["key"] == "v1.two.dots.wav" and manifest["failures"][0]["reason"] == "short"


def test_loud_records_are_counted_once_not_warned_per_clip(model_dir, tok, tmp_path, caplog):
    """Audio beyond [-1, 1] (as resampled full-scale recordings are) is coded as ``encode`` codes it; the
    job logs one count instead of one UserWarning per clip."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, peak in enumerate([1.3, 0.5, 1.1]):
        x = noise(rng, 0.3, 24000, 1)
        sf.write(folder / f"{i}.wav", x * (peak / np.abs(x).max()), 24000, subtype="FLOAT")
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="audiotok.bulk"), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tokenize_dataset(config(InputSpec("folder", str(folder)), out, model_dir, num_workers=0))
    loud = [r.getMessage() for r in caplog.records if "peak above 1" in r.getMessage()]
    assert len(loud) == 1 and loud[0].startswith("2 of the 3 records")
    _, records = read_output(out)
    with pytest.warns(UserWarning, match="peak amplitude"):
        check_against_direct(records, tok, lambda key: folder / key)


def test_bucketed_job_writes_the_same_codes_autotuned(corpus, model_dir, tok, tmp_path, monkeypatch):
    """A tokenizer with shape buckets (the CUDA default) writes the codes ``encode`` gives without them,
    its passes on the grid, and the job runs under its autotuning (``cudnn.benchmark`` on CUDA)."""
    bucketed = AudioTokenizer.from_pretrained(model_dir)
    bucketed.buckets = True
    shapes, encode, entered = [], bucketed.model.encode, []

    def spy(x, *args, **kwargs):
        shapes.append(x.shape[-1] // bucketed.hop_length)
        return encode(x, *args, **kwargs)

    @contextlib.contextmanager
    def autotuning():
        entered.append(len(shapes))
        yield
        entered.append(len(shapes))

    monkeypatch.setattr(bucketed.model, "encode", spy)
    monkeypatch.setattr(bucketed, "autotuning", autotuning)
    out = tmp_path / "out"
    tokenize_dataset(config(InputSpec("folder", str(corpus)), out, model_dir, num_workers=0), tokenizer=bucketed)
    _, records = read_output(out)
    assert check_against_direct(records, tok, lambda k: corpus / k) == sorted(os.path.basename(f) for f in GOOD)
    cap = bucketed.frame_budgets(0.5)[0] + sum(bucketed.model.context_frames["encoder"])
    assert shapes and all(f == cap or f == round_up(f, LENGTH_STEPS) >= SHORTEST for f in shapes)
    assert entered == [0, len(shapes)]  # every pass inside the block


def _counting(decode, calls):
    """``decode`` that counts its calls in ``calls["n"]``."""
    def counting(*args):
        calls["n"] += 1
        return decode(*args)
    return counting


@pytest.mark.parametrize("kind", ["webdataset", "hf-streaming", "folder"])
def test_part_stream_resumes_at_a_position(corpus, tmp_path, monkeypatch, kind):
    from audiotok.bulk import part_stream
    from audiotok.data import sources

    if kind == "webdataset":
        write_tars(tmp_path, corpus)
        source = InputSpec("webdataset", str(tmp_path / "in-*.tar")).build()
        want = [{"shard": str(tmp_path / f"in-0{i}.tar")} for i in range(2)]  # one part per tar
        everything = [x.key for x in source.records()]
    elif kind == "hf-streaming":
        source = InputSpec("hf", str(corpus / "a"), streaming=True).build()
        want = [{"shard": 0, "of": 1}]  # one part per shard of the stream: audiofolder makes one
        everything = [x.key.split(":", 1)[1] for x in source.records()]
    else:
        source = InputSpec("folder", str(corpus)).build()
        want = [{"rows": [0, 4]}, {"rows": [4, 8]}, {"rows": [8, 11]}]
        everything = [x.key for x in source.records()]
    parts = source.partition(4)
    assert parts == want
    seen = []
    for part in parts:
        full = [(pos, type(x).__name__, x.key) for pos, x in part_stream(source, part)]
        assert [pos for pos, *_ in full] == list(range(len(full)))
        seen += [key.split(":", 1)[1] if kind == "hf-streaming" else key for _, _, key in full]
        calls = {"n": 0}
        for name in ("decode_bytes", "decode_file"):
            monkeypatch.setattr(sources, name, _counting(getattr(sources, name), calls))
        start = (len(full) + 1) // 2
        rest = [(pos, type(x).__name__, x.key) for pos, x in part_stream(source, part, start)]
        monkeypatch.undo()
        assert rest == full[start:]
        assert calls["n"] <= len(full) - start  # the first `start` items were not decoded
        assert list(part_stream(source, part, len(full))) == []  # all done: nothing left
        with pytest.raises(ValueError, match="fewer than start"):  # the input shrank since the job began
            list(part_stream(source, part, len(full) + 1))
    assert sorted(seen) == sorted(everything)  # the parts cover every item once
    if kind == "hf-streaming":  # a stable reference: row within the stream's shard
        assert [x.key.split(":", 1)[0] for _, x in part_stream(source, parts[0])] == ["shard0.0", "shard0.1"]


class Crash(Exception):
    pass


@pytest.mark.parametrize("kind,where", [("folder", "mid-shard"), ("folder", "after-shard-publish"),
                                        ("webdataset", "mid-shard")])
def test_kill_and_resume(corpus, model_dir, folder_job, tmp_path, monkeypatch, kind, where):
    from audiotok.utils.store import LocalStore

    if kind == "folder":
        spec = InputSpec("folder", str(corpus))
        _, want = read_output(Path(folder_job[0].output))  # the same job, uninterrupted
        bad = sorted(BAD)
    else:  # a streaming source: resuming passes over the done samples without decoding them
        write_tars(tmp_path, corpus)
        spec = InputSpec("webdataset", str(tmp_path / "in-*.tar"), keep=["txt"])
        tokenize_dataset(config(spec, tmp_path / "reference", model_dir, shard_records=2, part_records=4))
        reference, want = read_output(tmp_path / "reference")
        bad = sorted(f["key"] for f in reference["failures"])

    out = tmp_path / "out"
    cfg = config(spec, out, model_dir, shard_records=2, part_records=4)
    calls = {"n": 0}
    # like a killed process, leave unfinished temporary files behind
    monkeypatch.setattr(PartWriter, "abort", lambda self: None)
    if where == "mid-shard":  # dies with a partial temporary shard on disk, after a shard was committed
        original = PartWriter.add_record

        def add_record(self, *args):
            if self.shard is not None and self.shard.records and list(out.glob("part-*")):
                raise Crash()  # a shard is half written, another one is in place
            original(self, *args)

        monkeypatch.setattr(PartWriter, "add_record", add_record)
    else:  # dies after a shard file is in place but before the progress file records it
        original = LocalStore.put_file

        def put_file(self, *args):
            original(self, *args)
            calls["n"] += 1
            if calls["n"] == 2:
                raise Crash()

        monkeypatch.setattr(LocalStore, "put_file", put_file)
    with pytest.raises(Crash):
        tokenize_dataset(cfg)
    assert not (out / "manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    if where == "after-shard-publish":
        assert len(kept) == 2  # one recorded, one orphan
    else:
        assert len(kept) >= 1 and len(list(out.glob(".part-*.tmp"))) == 1  # a shard open
    monkeypatch.undo()

    with pytest.raises(ValueError, match="other settings.*shard_records"):  # other shards: refused
        tokenize_dataset(config(spec, out, model_dir, shard_records=3, part_records=4))
    # resumed with another number of workers: the parts do not depend on it
    summary = tokenize_dataset(config(spec, out, model_dir, shard_records=2, part_records=4, num_workers=1))
    manifest, records = read_output(out)
    assert summary.run_records < len(GOOD)  # resumed, not redone
    assert sorted(records) == sorted(want)
    for key, (meta, codes) in records.items():
        assert meta == want[key][0]
        np.testing.assert_array_equal(codes, want[key][1])
    assert sorted(f["key"] for f in manifest["failures"]) == bad
    assert sorted(p.name for p in out.glob("part-*")) == sorted(s["path"] for s in manifest["shards"])
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    recorded = {p.name for p in out.glob("part-*")} & set(kept)
    assert recorded and any(kept[n] == (out / n).stat().st_mtime_ns for n in recorded)  # committed shards kept


# ---------------------------------------------------------------------------------------------
# Elastic work split: processes come and go


ELASTIC = ["--part-records", "2", "--shard-records", "1", "--lease-seconds", "5"]


def launch(corpus: Path, out: Path, model_dir: Path) -> subprocess.Popen:
    """recipes/tokenize_dataset.py on the corpus folder, in its own process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "recipes/tokenize_dataset.py"), "--input", str(corpus), "--input-type",
           "folder", "--output", str(out), "--model", str(model_dir), "--num-workers", "0", "--device", "cpu",
           "--batch-seconds", "1", "--chunk-seconds", "0.5", "--no-progress", *ELASTIC]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent, env=env)


def kill_mid_job(proc: subprocess.Popen, out: Path) -> None:
    """SIGKILL ``proc`` once a shard is in place and ``proc`` holds the claim on an unfinished part."""
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]  # finished before it could be killed
        claims = list((out / ".bulk/claims").glob("*.json")) if list(out.glob("part-*")) else []
        for claim in claims:
            try:
                owner = json.loads(claim.read_text())["owner"]
            except (OSError, ValueError):
                continue
            if f"/{proc.pid}/" in owner and not (out / ".bulk/done" / claim.name).exists():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return
        time.sleep(0.01)
    raise AssertionError("no shard within 180 s")


@pytest.fixture(scope="module")
def elastic_reference(corpus, model_dir, tmp_path_factory):
    """The corpus tokenized uninterrupted by one process, with the settings of :data:`ELASTIC`."""
    out = tmp_path_factory.mktemp("elastic") / "reference"
    tokenize_dataset(config(InputSpec("folder", str(corpus)), out, model_dir, num_workers=0, part_records=2,
                            shard_records=1))
    return out, read_output(out)


def assert_same_output(out: Path, reference) -> None:
    """Record for record (keys, metadata, codes) and failure for failure, with nothing left over; the
    shards are byte-for-byte those of the reference (what makes racing writers harmless)."""
    ref, (want_manifest, want) = reference
    for shard in want_manifest["shards"]:
        assert (out / shard["path"]).read_bytes() == (ref / shard["path"]).read_bytes()
    manifest, records = read_output(out)  # no key twice (read_output checks it)
    assert sorted(records) == sorted(want)
    for key, (meta, codes) in records.items():
        assert meta == want[key][0]
        np.testing.assert_array_equal(codes, want[key][1])
    assert manifest["failures"] == want_manifest["failures"] and manifest["shards"] == want_manifest["shards"]
    assert sorted(p.name for p in out.glob("part-*")) == sorted(s["path"] for s in manifest["shards"])
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not list((out / ".bulk/claims").iterdir())  # released, or removed with the manifest


def test_kill_one_of_two_processes_and_finish_with_one(corpus, model_dir, elastic_reference, tmp_path):
    out = tmp_path / "out"
    first, second = launch(corpus, out, model_dir), launch(corpus, out, model_dir)
    kill_mid_job(first, out)
    assert second.wait(timeout=240) == 1, second.communicate()[1][-3000:]  # 1: some records failed
    assert f"{len(GOOD)} records" in second.communicate()[0]
    assert_same_output(out, elastic_reference)


def test_resume_a_one_process_job_with_three(corpus, model_dir, elastic_reference, tmp_path):
    out = tmp_path / "out"
    kill_mid_job(launch(corpus, out, model_dir), out)
    assert not (out / "manifest.json").exists() and list(out.glob("part-*"))
    procs = [launch(corpus, out, model_dir) for _ in range(3)]
    for proc in procs:
        assert proc.wait(timeout=240) == 1, proc.communicate()[1][-3000:]
    assert_same_output(out, elastic_reference)


def test_a_claim_is_honoured_until_its_lease_lapses(corpus, model_dir, folder_job, tmp_path):
    """A part claimed by a process elsewhere is left alone until its claim expires, then taken over."""
    out = tmp_path / "out"
    expires = time.time() + 3
    (out / ".bulk/claims").mkdir(parents=True)
    (out / ".bulk/claims/part-000001.json").write_text(json.dumps({"owner": "elsewhere/1/x", "expires": expires}))
    tokenize_dataset(config(InputSpec("folder", str(corpus)), out, model_dir, shard_records=2, part_records=4))
    assert (out / ".bulk/done/part-000001.json").stat().st_mtime >= expires
    _, want = read_output(Path(folder_job[0].output))
    _, records = read_output(out)
    assert sorted(records) == sorted(want)


def test_outputs_of_earlier_versions_are_refused(corpus, model_dir, tmp_path):
    (tmp_path / "out/.bulk").mkdir(parents=True)
    (tmp_path / "out/.bulk/rank-000.json").write_text("{}")  # the per-rank split of earlier versions
    with pytest.raises(ValueError, match="earlier audiotok version"):
        tokenize_dataset(config(InputSpec("folder", str(corpus / "a")), tmp_path / "out", model_dir))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_sidecar_shards_zip_with_their_input(corpus, model_dir, tok, tmp_path):
    """--layout sidecar: in-00.tar -> in-00.codes.tar, sample for sample, so a zipped read pairs them."""
    import webdataset as wds

    from audiotok.lm import CodeDataset

    where = write_tars(tmp_path, corpus)
    out = tmp_path / "out"
    spec = InputSpec("webdataset", str(tmp_path / "in-*.tar"), keep=["txt"])
    tokenize_dataset(config(spec, out, model_dir, layout="sidecar", shard_records=1))  # one shard per input shard
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["path"] for s in manifest["shards"]] == ["in-00.codes.tar", "in-01.codes.tar"]
    assert manifest["layout"] == "sidecar" and manifest["records"] == len(GOOD)
    assert sorted((f["key"].rsplit(":", 1)[1], f["reason"]) for f in manifest["failures"]) == [
        ("s1/junk", "metadata"), ("s1/notes", "noaudio")]  # junk has no txt member
    pairs = 0
    for i in range(2):
        url = str(tmp_path / f"in-0{i}.tar")
        audio = wds.WebDataset(url, shardshuffle=False)
        codes = wds.WebDataset(str(out / f"in-0{i}.codes.tar"), shardshuffle=False).decode()
        samples = list(zip(audio, codes, strict=True))
        for a, c in samples:
            key = a["__key__"]
            assert c["__key__"] == key
            if key in where:  # a good sample: its codes, record fields and kept text
                np.testing.assert_array_equal(c["codes.npy"], direct_codes(tok, where[key]))
                assert c["json"]["key"] == key and c["json"]["source_key"] == f"{url}:{key}"
                assert c["meta.json"] == {"txt": a["txt"].decode()} and "failure.txt" not in c
            else:  # a failed one: the reason, no codes
                assert set(c) - {"__key__", "__url__", "__local_path__"} == {"failure.txt"}
                assert c["failure.txt"].split(":")[0] == {"s1/notes": "noaudio", "s1/junk": "metadata"}[key]
        pairs += len(samples)
    assert pairs == len(where) + 2
    assert sorted(r.key for r in CodeDataset(out)) == sorted(where)  # the code-dataset reader passes failures over

    for bad in ({"format": "parquet"}, {"spec": InputSpec("folder", str(corpus))}):
        with pytest.raises(ValueError, match="sidecar layout needs webdataset input and format"):
            config(bad.pop("spec", spec), out, model_dir, layout="sidecar", **bad)


def test_torchrun_two_processes(corpus, model_dir, tok, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "recipes/tokenize_dataset.py"), "--input", str(corpus), "--input-type", "folder",
           "--output", str(out), "--model", str(model_dir), "--num-workers", "1", "--device", "cpu",
           "--batch-seconds", "1", "--chunk-seconds", "0.5", "--part-records", "1", "--lease-seconds", "5",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]  # some records failed
    assert f"{len(GOOD)} records" in proc.stdout and f"{len(BAD)} failures" in proc.stdout
    manifest, records = read_output(out)
    assert check_against_direct(records, tok, lambda k: corpus / k) == sorted(os.path.basename(f) for f in GOOD)
    assert sorted(f["key"] for f in manifest["failures"]) == sorted(BAD)
    assert len(list((out / ".bulk/done").iterdir())) == 11  # one part per file (--part-records 1)


def test_recipes_run_without_path_workarounds(tmp_path):
    """The deprecated recipes/tokenize.py still runs (with a message) and no longer shadows the
    standard library's tokenize module for the other recipes of its folder."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    old = subprocess.run([sys.executable, str(REPO / "recipes/tokenize.py"), "--help"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path, env=env)
    assert old.returncode == 0, old.stderr[-3000:]
    assert "deprecated" in old.stderr and "tokenize_dataset.py" in old.stderr and "--input-type" in old.stdout
    for recipe in ("train.py", "pack_data.py", "train_lm.py", "sample_lm.py"):
        proc = subprocess.run([sys.executable, str(REPO / "recipes" / recipe), "--help"], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path, env=env)
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-3000:]


def test_dataset_map_recipe_gives_the_bulk_codes(corpus, model_dir, tok, tmp_path):
    """The README's Dataset.map(batched=True) recipe codes each record as bulk tokenization does."""
    from datasets import Audio, Dataset

    files = [str(corpus / f) for f in sorted(GOOD)]
    ds = Dataset.from_dict({"audio": files}).cast_column("audio", Audio(decode=False))

    def tokenize(batch):
        return {"codes": [c.tolist() for c in tok.encode(batch["audio"]).unbatch()]}

    mapped = ds.map(tokenize, batched=True, batch_size=4)
    ds.save_to_disk(str(tmp_path / "saved"))
    tokenize_dataset(config(InputSpec("hf", str(tmp_path / "saved")), tmp_path / "out", model_dir))
    _, records = read_output(tmp_path / "out")
    bulk = {os.path.basename(meta["source_key"].split(":", 1)[1]): codes for meta, codes in records.values()}
    assert sorted(bulk) == sorted(os.path.basename(f) for f in files)
    for row in mapped:
        np.testing.assert_array_equal(np.array(row["codes"]), bulk[os.path.basename(row["audio"]["path"])])


def _recipe():
    spec = importlib.util.spec_from_file_location("tokenize_recipe", REPO / "recipes" / "tokenize_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tokenize_recipe_exit_status_errors_and_unread_files(corpus, model_dir, tmp_path, capsys, caplog, monkeypatch):
    recipe = _recipe()
    common = ["--input-type", "folder", "--model", str(model_dir), "--num-workers", "0", "--no-progress",
              "--batch-seconds", "1", "--chunk-seconds", "0.5"]
    assert recipe.main(["--input", str(corpus), "--output", str(tmp_path / "all"), *common]) == 1  # bad records
    out = capsys.readouterr().out
    assert f"{len(GOOD)} records" in out and f"{len(BAD)} failures" in out
    assert any("not read" in r.getMessage() and "1 .txt" in r.getMessage() for r in caplog.records)
    assert recipe.main(["--input", str(corpus / "a"), "--output", str(tmp_path / "good"), *common]) == 0

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = ["--input", str(corpus / "a"), "--output", str(tmp_path / "hub"), *common, "--model", "someone/no-model"]
    assert recipe.main(args) == 2
    err = capsys.readouterr().err  # (log lines of the run may come first)
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("tokenize_dataset: error: could not load 'someone/no-model'")
    assert "Traceback" not in err

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    args = ["--input", str(corpus / "a"), "--output", str(tmp_path / "pq"), *common, "--format", "parquet"]
    assert recipe.main(args) == 2
    err = capsys.readouterr().err
    assert err.endswith("tokenize_dataset: error: parquet needs the pyarrow package: pip install 'audiotok[data]'\n")
    assert not (tmp_path / "pq").exists()  # checked before any work


# ---------------------------------------------------------------------------------------------
# Kept metadata


def kept_metadata_input(kind: str, corpus: Path, root: Path) -> tuple[InputSpec, dict[str, dict], list[str]]:
    """A small input of each kind with a text field per item, one item without it (folder and
    webdataset) and one corrupt clip. Returns (spec, {source audio file name: metadata}, failure reasons)."""
    names = ["a/mono16k.wav", "b/tone48k.wav"]
    want = {os.path.basename(n): {"text": f"words of {i}", "speaker": {"id": i}} for i, n in enumerate(names)}
    if kind == "hf":
        from datasets import Audio, Dataset

        files = [str(corpus / n) for n in names] + [str(corpus / "bad/corrupt.wav")]
        texts = [want[os.path.basename(f)]["text"] for f in files[:2]] + ["bad"]
        Dataset.from_dict({"audio": files, "text": texts, "speaker": [{"id": 0}, {"id": 1}, {"id": 2}]}).cast_column(
            "audio", Audio()).save_to_disk(str(root / "saved"))
        return InputSpec("hf", str(root / "saved"), keep="text,speaker"), want, ["decode"]
    if kind == "folder":
        for n in names:
            target = root / "clips" / os.path.basename(n)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((corpus / n).read_bytes())
            target.with_suffix(".txt").write_text(want[target.name]["text"])
            target.with_suffix(".json").write_text(json.dumps({"id": want[target.name]["speaker"]["id"]}))
        (root / "clips/nosidecar.wav").write_bytes((corpus / names[0]).read_bytes())
        want = {k: {"txt": v["text"], "json": v["speaker"]} for k, v in want.items()}
        return InputSpec("folder", str(root / "clips"), keep=["txt", "json"]), want, ["metadata"]
    import webdataset as wds

    with wds.TarWriter(str(root / "in-00.tar")) as w:
        for n in names:
            meta = want[os.path.basename(n)]
            w.write({"__key__": os.path.basename(n).split(".")[0], "wav": (corpus / n).read_bytes(),
                     "txt": meta["text"].encode(), "json": json.dumps(meta["speaker"]).encode()})
        w.write({"__key__": "notext", "wav": (corpus / names[0]).read_bytes(), "json": b"{}"})
        w.write({"__key__": "corrupt", "wav": (corpus / "bad/corrupt.wav").read_bytes(), "txt": b"x", "json": b"{}"})
    want = {k: {"txt": v["text"], "json": v["speaker"]} for k, v in want.items()}
    return InputSpec("webdataset", str(root / "in-00.tar"), keep="txt,json"), want, ["decode", "metadata"]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
@pytest.mark.parametrize("kind", ["hf", "folder", "webdataset"])
def test_kept_metadata_round_trips(corpus, model_dir, tmp_path, kind, fmt):
    from audiotok.lm import CodeDataset, CodeVocabulary, TextTokenizer
    from audiotok.lm.text import TextCodeDataset

    spec, want, reasons = kept_metadata_input(kind, corpus, tmp_path)
    out = tmp_path / "out"
    tokenize_dataset(config(spec, out, model_dir, format=fmt, num_workers=0))
    manifest, records = read_output(out)  # plain tarfile / pyarrow
    assert manifest["format_version"] == 3 and manifest["metadata"] == spec.keep
    assert sorted(f["reason"] for f in manifest["failures"]) == reasons

    def name(source_key: str) -> str:  # the audio file an item came from
        if kind == "hf":  # "{row}:{path}"
            return os.path.basename(source_key.split(":", 1)[1])
        if kind == "folder":  # the path in the folder
            return source_key
        return source_key.rsplit(":", 1)[1] + ".wav"  # "{shard}:{sample key}"

    assert {name(meta["source_key"]): meta["metadata"] for meta, _ in records.values()} == want
    dataset = CodeDataset(out)
    assert {name(r.meta["source_key"]): r.metadata for r in dataset} == want
    if fmt == "webdataset":  # webdataset itself decodes the kept metadata member
        import webdataset as wds

        urls = [str(out / s["path"]) for s in manifest["shards"]]
        assert {s["__key__"]: s["meta.json"] for s in wds.WebDataset(urls, shardshuffle=False).decode()} == {
            key: meta["metadata"] for key, (meta, _) in records.items()}

    # the text field reaches a text-conditioned prior's examples
    text_key = "text" if kind == "hf" else "txt"
    text = TextTokenizer(None, max_len=24)
    vocab = CodeVocabulary.for_codec(dataset.config)
    examples = list(TextCodeDataset(dataset, vocab, "flatten", text, seq_len=8, text_key=text_key))
    texts = [r.metadata[text_key] for r in dataset]
    assert len(examples) == len(texts) == 2
    for example, t in zip(examples, texts):
        ids, mask = text.prefix([t])
        assert torch.equal(example["text_ids"], ids[0]) and torch.equal(example["text_mask"], mask[0])


def test_keep_rejects_unknown_hf_columns(corpus, tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"audio": [str(corpus / "a/mono16k.wav")]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="no column 'text'"):
        InputSpec("hf", str(tmp_path / "saved"), keep=["text"]).build()


def test_a_job_resumed_with_other_weights_is_refused(corpus, tmp_path):
    """A model folder updated in place (same name and architecture, other weights) would mix two
    models' codes in one dataset, under a manifest naming the second."""
    model = tmp_path / "model"
    AudioTokenizer.from_config("tiny-44khz", seed=0).save_pretrained(model)
    cfg = config(InputSpec("folder", str(corpus / "a")), tmp_path / "out", model, num_workers=0)
    tokenize_dataset(cfg)
    AudioTokenizer.from_config("tiny-44khz", seed=1).save_pretrained(model)
    with pytest.raises(ValueError, match="other settings.*codes_fingerprint"):
        tokenize_dataset(cfg)


def test_encode_items_failures_and_the_systematic_error(tok, monkeypatch):
    from audiotok.bulk.encode import encode_items
    from audiotok.bulk.inputs import Decoded
    rng = np.random.default_rng(1)
    items = [Decoded(0, i, f"k{i}", torch.from_numpy(rng.uniform(-0.5, 0.5, (2, 2000 + 100 * i)).astype(np.float32)),
                     2000, tok.sample_rate, 2) for i in range(4)]
    good = encode_items(tok, items, 2, 10.0, None, mono=False)
    assert [r.shape for r in good] == [(2, 2, tok.num_frames(2000 + 100 * i)) for i in range(4)]
    assert all(r.dtype == np.uint16 for r in good)
    monkeypatch.setattr(tok, "encode_each", lambda clips, *a, **k: [
        RuntimeError(f"clip {j}") if j in (2, 3) else torch.zeros(2, 7, dtype=torch.long) for j in range(len(clips))])
    out = encode_items(tok, items, 2, 10.0, None, mono=False)
    assert isinstance(out[0], np.ndarray) and out[0].shape == (2, 2, 7)
    assert (out[1].key, out[1].reason, out[1].detail) == ("k1", "encode", "RuntimeError: clip 2")  # its first error
    monkeypatch.setattr(tok, "encode_each", lambda clips, *a, **k: [RuntimeError("gpu")] * len(clips))
    assert all(r.reason == "encode" for r in encode_items(tok, items[:3], 2, 10.0, None, mono=False))  # 6 clips
    with pytest.raises(RuntimeError, match="encoding failed for all 8 clips of a pool"):
        encode_items(tok, items, 2, 10.0, None, mono=False)

"""Training-data pipeline: sources (folder, HF, WebDataset, manifest), processing, mixing, resume."""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audiotok.data import (
    PAPER_GROUP_WEIGHTS,
    AudioFolderSource,
    DataConfig,
    ExcerptDataset,
    HFDatasetSource,
    SourceGroup,
    WebDatasetSource,
    build_sources,
    build_validation_set,
    decode_file,
    loudness,
    mixture,
    normalize_loudness,
    peak_limit,
    random_phase_shift,
    salient_excerpt,
    sources_from_manifest,
)

GOOD = ["a/sine16k.wav", "a/stereo44k.flac", "b/c/noise22k.ogg"]
BAD = {"bad/corrupt.wav": "decode", "bad/empty.wav": "empty", "bad/noframes.wav": "empty", "bad/nan.wav": "nonfinite"}


def tone(freq: float, sr: int, seconds: float, amp: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_bad_files(root) -> None:
    (root / "bad").mkdir(parents=True, exist_ok=True)
    (root / "bad/corrupt.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "bad/empty.wav").write_bytes(b"")
    sf.write(root / "bad/noframes.wav", np.zeros((0, 1), np.float32), 16000)
    nan = tone(500, 16000, 0.5)
    nan[100:200] = np.nan
    sf.write(root / "bad/nan.wav", nan, 16000, subtype="FLOAT")


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    """Three good files (int16 mono 16 kHz, stereo FLAC 44.1 kHz, Vorbis 22.05 kHz), four bad ones."""
    root = tmp_path_factory.mktemp("audio")
    for d in ("a", "b/c"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    pcm = (tone(440, 16000, 1.0) * 32767).astype(np.int16)
    sf.write(root / GOOD[0], pcm, 16000, subtype="PCM_16")
    sf.write(root / GOOD[1], (rng.standard_normal((22050, 2)) * 0.1).astype(np.float32), 44100)
    sf.write(root / GOOD[2], (rng.standard_normal(15435) * 0.1).astype(np.float32), 22050)
    write_bad_files(root)
    (root / "a/readme.txt").write_text("not audio")
    return root


def good_only(root):
    return AudioFolderSource(root / "a"), AudioFolderSource(root / "b")


# ---------------------------------------------------------------------------------------------
# Sources


def test_folder_source_decodes_and_counts_bad_records(audio_dir, caplog):
    src = AudioFolderSource(audio_dir)
    assert [src.key(i) for i in range(len(src))] == sorted(GOOD + list(BAD))
    with caplog.at_level(logging.WARNING, logger="audiotok.data.sources"):
        records = list(src)
    assert [r.key for r in records] == sorted(GOOD)
    shapes = {r.key: (r.audio.shape, r.sample_rate, r.audio.dtype) for r in records}
    assert shapes == {
        GOOD[0]: ((1, 16000), 16000, np.float32),
        GOOD[1]: ((2, 22050), 44100, np.float32),
        GOOD[2]: ((1, 15435), 22050, np.float32),
    }
    pcm, _ = sf.read(audio_dir / GOOD[0], dtype="int16")
    np.testing.assert_array_equal(records[0].audio[0], pcm / 32768.0)
    expected = {}
    for reason in BAD.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(src.skipped.counts) == expected
    assert src.skipped.examples["nonfinite"] == ["bad/nan.wav"]
    assert sum("skipping" in r.message for r in caplog.records) == len(BAD)


def test_file_clip_reads_ranges_and_flags_nan(audio_dir):
    src = AudioFolderSource(audio_dir)
    index = {src.key(i): i for i in range(len(src))}
    clip = src.clip(index[GOOD[1]])
    full = src.load(index[GOOD[1]]).audio
    assert (clip.num_frames, clip.sample_rate) == (22050, 44100)
    np.testing.assert_array_equal(clip.read(1000, 500), full[:, 1000:1500])
    for name in ("bad/corrupt.wav", "bad/empty.wav", "bad/noframes.wav"):
        with pytest.raises(Exception, match=BAD[name]):
            src.clip(index[name])
    with pytest.raises(Exception, match="nonfinite"):
        src.clip(index["bad/nan.wav"]).read(0, 1000)


def saved_hf_dataset(tmp_path, values, name):
    from datasets import Audio, Dataset

    ds = Dataset.from_dict({"audio": values, "n": list(range(len(values)))}).cast_column("audio", Audio())
    ds.save_to_disk(str(tmp_path / name))
    return tmp_path / name


def test_hf_saved_dataset_matches_files(audio_dir, tmp_path):
    files = [str(audio_dir / f) for f in GOOD + ["bad/corrupt.wav"]]
    expected = [decode_file(f, f).audio for f in files[:3]]
    by_path = HFDatasetSource(saved_hf_dataset(tmp_path, files, "paths"))
    with_bytes = HFDatasetSource(
        saved_hf_dataset(tmp_path, [{"bytes": open(f, "rb").read(), "path": os.path.basename(f)} for f in files], "b")
    )
    for src in (by_path, with_bytes):
        assert len(src) == 4 and src.size == 4
        got = list(src)
        assert len(got) == 3 and src.skipped.counts == {"decode": 1}
        for rec, want in zip(got, expected):
            np.testing.assert_array_equal(rec.audio, want)
    assert by_path.load(2).key == "2:noise22k.ogg"  # save_to_disk embedded the files' bytes
    np.testing.assert_array_equal(with_bytes.clip(1).read(0, 100), expected[1][:, :100])

    from datasets import Dataset

    arrays = Dataset.from_dict({"audio": [{"array": expected[0][0].tolist(), "sampling_rate": 16000}]})
    arrays.save_to_disk(str(tmp_path / "arrays"))
    rec = HFDatasetSource(tmp_path / "arrays").load(0)
    assert rec.sample_rate == 16000
    np.testing.assert_array_equal(rec.audio, expected[0])


def test_hf_audiofolder_and_streaming_parts(audio_dir, tmp_path):
    folder = HFDatasetSource(audio_dir / "a")  # load_dataset("audiofolder"), no torchcodec needed
    assert [r.audio.shape for r in folder] == [(1, 16000), (2, 22050)]
    assert type(folder.clip(1)).__name__ == "FileClip"  # local paths are read lazily
    saved = saved_hf_dataset(tmp_path, [str(audio_dir / f) for f in GOOD * 3], "rep")
    stream = HFDatasetSource(saved, streaming=True)
    assert not stream.random_access
    with pytest.raises(TypeError):
        stream.load(0)
    parts = [[r.key.split(":")[1] for r in stream.records(p, 2)] for p in range(2)]
    assert len(parts[0]) + len(parts[1]) == 9 and abs(len(parts[0]) - len(parts[1])) == 1
    assert sorted(parts[0] + parts[1]) == sorted(os.path.basename(f) for f in GOOD * 3)


def write_shards(root, n_shards=2, per_shard=3):
    """WebDataset shards written with webdataset.TarWriter: audio as flac or wav bytes, plus a
    sample without audio and one with corrupt audio in shard 0."""
    import webdataset as wds

    rng = np.random.default_rng(1)
    expected = {}
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"shard-{s:02d}.tar")) as w:
            for i in range(per_shard):
                key, ext = f"s{s}_{i:03d}", ("flac", "wav")[i % 2]
                audio = (rng.standard_normal((1, 4000 + 100 * i)) * 0.1).astype(np.float32)
                buf = io.BytesIO()
                sf.write(buf, audio.T, 16000, format=ext.upper(), subtype="PCM_24" if ext == "flac" else "FLOAT")
                w.write({"__key__": key, ext: buf.getvalue(), "json": b'{"speaker": 1}'})
                expected[key] = sf.read(io.BytesIO(buf.getvalue()), dtype="float32", always_2d=True)[0].T
            if s == 0:
                w.write({"__key__": "s0_text", "txt": b"hello"})
                w.write({"__key__": "s0_junk", "wav": np.random.default_rng(2).bytes(500)})
    return expected


def test_webdataset_source_yields_records_and_skips(tmp_path):
    expected = write_shards(tmp_path)
    src = WebDatasetSource(str(tmp_path / "shard-{00..01}.tar"))
    assert src.shards == [str(tmp_path / "shard-00.tar"), str(tmp_path / "shard-01.tar")]
    assert WebDatasetSource(str(tmp_path / "shard-*.tar")).shards == src.shards
    got = {r.key.rsplit(":", 1)[1]: r for r in src}
    assert sorted(got) == sorted(expected)
    for key, audio in expected.items():
        np.testing.assert_array_equal(got[key].audio, audio)
        assert got[key].sample_rate == 16000
    assert src.skipped.counts == {"noaudio": 1, "decode": 1}

    # a truncated shard: what precedes the damage is read, the rest is skipped and counted
    data = (tmp_path / "shard-00.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 700])
    cut = WebDatasetSource([str(tmp_path / "cut.tar"), str(tmp_path / "shard-01.tar")])
    keys = [r.key.rsplit(":", 1)[1] for r in cut]
    assert keys[-3:] == ["s1_000", "s1_001", "s1_002"] and 1 <= len(keys) - 3 < 3
    assert cut.skipped.counts["shard"] >= 1


@pytest.mark.parametrize("num_parts", [1, 2, 3, 4])
def test_stream_parts_cover_everything_once(tmp_path, num_parts):
    expected = write_shards(tmp_path, n_shards=3, per_shard=2)  # 3 shards: by shard, or by sample for 4 parts
    src = WebDatasetSource(str(tmp_path / "shard-*.tar"))
    for epoch, seed in [(0, None), (1, 7)]:
        parts = [
            [r.key for r in src.records(p, num_parts, epoch, seed) if not isinstance(r, Exception)]
            for p in range(num_parts)
        ]
        keys = [k for part in parts for k in part]
        assert len(keys) == len(set(keys)) == len(expected)
        assert all(parts)


# ---------------------------------------------------------------------------------------------
# Processing


def test_loudness_normalization_reaches_target():
    rng = np.random.default_rng(0)
    burst = (rng.standard_normal((1, 44100)) * 0.01).astype(np.float32)
    assert loudness(burst, 44100) < -35
    out = normalize_loudness(burst, 44100, -16.0)
    assert abs(loudness(out, 44100) - (-16.0)) < 0.5
    # clips shorter than the 400 ms gating block: measured as the tiled clip, not -inf or padded
    short = burst[:, :4410]
    assert abs(loudness(short, 44100) - loudness(np.tile(short, 10), 44100)) < 0.3
    assert abs(loudness(normalize_loudness(short, 44100), 44100) - (-16.0)) < 0.5
    silence = np.zeros((1, 1000), np.float32)
    assert loudness(silence, 44100) == -math.inf
    np.testing.assert_array_equal(normalize_loudness(silence, 44100), silence)


def test_peak_limit_and_phase_shift():
    x = tone(1000, 16000, 0.5, amp=3.0)[None]
    limited = peak_limit(x)
    assert np.isclose(np.abs(limited).max(), 1.0) and np.allclose(limited * 3.0, x, atol=1e-6)
    assert peak_limit(x / 10) is not None and np.array_equal(peak_limit(x / 10), x / 10)

    rng = np.random.default_rng(0)
    noise = (rng.standard_normal((1, 8000)) * 0.1).astype(np.float32)
    a = random_phase_shift(noise, np.random.default_rng(5))
    b = random_phase_shift(noise, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - noise).max() > 0.05 and a.dtype == np.float32
    spec_in, spec_out = np.abs(np.fft.rfft(noise))[0, 1:-1], np.abs(np.fft.rfft(a))[0, 1:-1]
    np.testing.assert_allclose(spec_out, spec_in, rtol=1e-3, atol=1e-3)
    assert abs(loudness(a, 16000) - loudness(noise, 16000)) < 0.2


def test_salient_excerpt_avoids_silent_region():
    sr, rng = 16000, np.random.default_rng(0)
    audio = np.zeros((1, 3 * sr), np.float32)
    audio[:, 2 * sr :] = rng.standard_normal(sr) * 0.1  # 2 s of silence, then 1 s of noise

    def silent_picks(tries):
        picks = [salient_excerpt(audio, sr, 0.3, np.random.default_rng(s), tries=tries) for s in range(30)]
        assert all(p.shape == (1, 4800) for p in picks)
        return sum(loudness(p, sr) <= -40 for p in picks)

    assert silent_picks(tries=8) == 0
    assert silent_picks(tries=1) >= 10  # the check above is not vacuous
    short = salient_excerpt(audio[:, -1000:], sr, 0.3, rng)
    assert short.shape == (1, 4800) and not short[:, 1000:].any()
    np.testing.assert_array_equal(short[:, :1000], audio[:, -1000:])


# ---------------------------------------------------------------------------------------------
# Mixed excerpt stream


def make_dataset(audio_dir, **kw):
    groups = {
        "one": SourceGroup(2.0, [AudioFolderSource(audio_dir / "a")]),
        "two": SourceGroup(1.0, [AudioFolderSource(audio_dir / "b")]),
    }
    return ExcerptDataset(groups, 16000, kw.pop("duration", 0.2), seed=kw.pop("seed", 3), **kw)


def test_excerpts_are_deterministic_and_resume_exactly(audio_dir):
    ds = make_dataset(audio_dir)
    ref = [ds.excerpt(i) for i in range(7)]
    assert all(x.shape == (1, 3200) and x.dtype == torch.float32 and x.abs().max() <= 1 for x in ref)
    assert not torch.equal(ref[0], ref[1])
    assert all(torch.equal(a, b) for a, b in zip(ref, itertools.islice(make_dataset(audio_dir), 7)))
    assert not torch.equal(make_dataset(audio_dir, seed=4).excerpt(0), ref[0])

    first = make_dataset(audio_dir)
    assert all(torch.equal(a, b) for a, b in zip(itertools.islice(first, 4), ref))
    state = first.state_dict()
    assert state["position"] == 4
    resumed = make_dataset(audio_dir)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(itertools.islice(resumed, 3), ref[4:7]))
    with pytest.raises(ValueError, match="seed"):
        make_dataset(audio_dir, seed=9).load_state_dict(state)


def test_excerpts_skip_bad_files(audio_dir):
    ds = ExcerptDataset({"all": SourceGroup(1.0, [AudioFolderSource(audio_dir)])}, 16000, 0.2, seed=0)
    xs = [ds.excerpt(i) for i in range(12)]
    assert all(torch.isfinite(x).all() and x.abs().max() > 0 for x in xs)
    assert ds.entries[0][1].skipped.total > 0


def test_ranks_and_workers_split_indices_without_overlap(audio_dir):
    for world, workers, block in [(1, 1, 1), (2, 1, 3), (2, 3, 2), (3, 2, 1)]:
        seen = []
        for rank in range(world):
            ds = make_dataset(audio_dir, rank=rank, world_size=world, block_size=block)
            n = 60 // world // workers
            per_rank = sorted(pos for w in range(workers) for pos in itertools.islice(ds.positions(w, workers), n))
            assert per_rank == list(range(len(per_rank)))  # workers partition the rank's positions
            seen += [ds.global_index(p) for p in per_rank]
        assert sorted(seen) == list(range(len(seen)))  # ranks partition the global indices
    ds = make_dataset(audio_dir, rank=1, world_size=2, block_size=2)
    assert [ds.global_index(p) for p in range(6)] == [2, 3, 6, 7, 10, 11]
    # resuming mid-block: the first worker finishes the block, the next blocks alternate
    assert [list(itertools.islice(ds.positions(w, 2, start=3), 3)) for w in range(2)] == [[3, 6, 7], [4, 5, 8]]
    got = list(itertools.islice(ds, 3))
    assert all(torch.equal(x, make_dataset(audio_dir).excerpt(g)) for x, g in zip(got, [2, 3, 6]))


def test_dataloader_workers_deliver_rank_order_and_resume(audio_dir):
    ds = make_dataset(audio_dir, block_size=2)
    ref = torch.stack([ds.excerpt(i) for i in range(8)])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(itertools.islice(loader, 4))
    assert torch.equal(torch.cat(batches), ref)
    ds.load_state_dict(ds.state_dict(consumed=6))
    first = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)))
    assert torch.equal(first, ref[6:8])


def test_mixing_weights_are_respected(tmp_path):
    freqs = {"speech": 250.0, "music": 1000.0, "general": 3000.0}
    groups = {}
    for n, (name, f) in enumerate(freqs.items()):
        (tmp_path / name).mkdir()
        for k in range(n + 1):  # 1, 2, 3 files
            sf.write(tmp_path / name / f"{k}.wav", tone(f, 16000, 0.5), 16000)
        groups[name] = SourceGroup(PAPER_GROUP_WEIGHTS[name], [AudioFolderSource(tmp_path / name)])
    ds = ExcerptDataset(groups, 16000, 0.064, seed=0)
    counts = dict.fromkeys(freqs, 0)
    for i in range(600):
        peak = np.argmax(np.abs(np.fft.rfft(ds.excerpt(i)[0].numpy()))) * 16000 / 1024
        counts[min(freqs, key=lambda g: abs(freqs[g] - peak))] += 1
    for name, want in PAPER_GROUP_WEIGHTS.items():
        assert abs(counts[name] / 600 - want) < 0.06, counts
    _, p = mixture(groups, balance=False)  # no-data-balance: weighted by number of files
    np.testing.assert_allclose(p, [1 / 6, 2 / 6, 3 / 6])


# ---------------------------------------------------------------------------------------------
# Manifest, config, validation


def write_manifest(audio_dir):
    rows = [
        ("train", "speech", GOOD[0]), ("train", "instrument", GOOD[1]), ("train", "music", GOOD[2]),
        ("train", "general", "bad/corrupt.wav"), ("eval", "speech", GOOD[0]), ("eval8k", "speech8k", GOOD[2]),
    ]
    with open(audio_dir / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "category", "source", "license", "path", "sr", "channels", "seconds", "format", "subtype"])
        for split, cat, path in rows:
            w.writerow([split, cat, "test", "CC0", path, 16000, 1, 1.0, "WAV", "PCM_16"])
    return audio_dir / "manifest.csv"


def test_manifest_sources(audio_dir):
    manifest = write_manifest(audio_dir)
    train = sources_from_manifest(manifest)
    assert {g: [s.key(i) for i in range(len(s))] for g, s in train.items()} == {
        "speech": [GOOD[0]], "music": [GOOD[1], GOOD[2]], "general": ["bad/corrupt.wav"],
    }
    assert list(train["general"]) == [] and train["general"].skipped.counts == {"decode": 1}
    assert set(sources_from_manifest(audio_dir, ("eval", "eval8k"))) == {"speech", "speech8k"}
    [music] = build_sources({"type": "manifest", "path": str(manifest), "group": "music"})
    assert len(music) == 2
    with pytest.raises(ValueError, match="no files"):
        build_sources({"type": "manifest", "path": str(manifest), "group": "nope"})


def test_data_config_builds_datasets(audio_dir, tmp_path):
    write_shards(tmp_path)
    manifest = write_manifest(audio_dir)
    raw = {
        "sample_rate": 16000,
        "duration": 0.25,
        "groups": {
            "speech": {"weight": 0.5, "sources": [{"type": "manifest", "path": str(manifest), "group": "speech"}]},
            "music": {"weight": 0.3, "sources": [{"type": "folder", "root": str(audio_dir / "b")}]},
            "general": {
                "weight": 0.2, "sources": [{"type": "webdataset", "urls": str(tmp_path / "shard-{00..01}.tar")}],
            },
        },
        "val_groups": {"speech": {"sources": [{"type": "folder", "root": str(audio_dir / "a")}]}},
        "val_duration": 1.0,
        "val_per_group": 3,
    }
    config = DataConfig.from_dict(raw)
    assert DataConfig.from_dict(config.to_dict()) == config
    ds = config.train_dataset(rank=1, world_size=2, block_size=2)
    xs = list(itertools.islice(ds, 12))  # includes streaming WebDataset draws
    assert all(x.shape == (1, 4000) and torch.isfinite(x).all() for x in xs)
    again = config.train_dataset(rank=1, world_size=2, block_size=2)
    assert all(torch.equal(a, b) for a, b in zip(xs, itertools.islice(again, 12)))
    stream = ExcerptDataset({"w": SourceGroup(1.0, build_sources(raw["groups"]["general"]["sources"][0]))}, 16000, 0.25)
    assert len(list(itertools.islice(stream, 10))) == 10  # 6 good samples an epoch: cycles on
    skipped = stream.entries[0][1].skipped.counts  # the two bad samples, once per epoch read
    assert set(skipped) == {"noaudio", "decode"} and skipped["noaudio"] == skipped["decode"] >= 1
    with pytest.raises(ValueError, match="no records"):
        ExcerptDataset({"x": SourceGroup(1.0, [AudioFolderSource(tmp_path)])}, 16000)  # no audio in tmp_path
    val = config.validation_set()
    assert [(e.group, e.key, tuple(e.audio.shape)) for e in val] == [
        ("speech", "sine16k.wav", (1, 16000)), ("speech", "stereo44k.flac", (1, 16000)),
    ]
    assert all(torch.equal(a.audio, b.audio) for a, b in zip(val, config.validation_set()))
    with pytest.raises(ValueError, match="unknown"):
        DataConfig.from_dict({**raw, "batch": 3})
    with pytest.raises(ValueError, match="type"):
        build_sources({"type": "s3"})


def test_validation_set_spreads_over_sources(audio_dir):
    everything = AudioFolderSource(audio_dir)  # a/sine, a/stereo, b/c/noise, 4 bad files
    val = build_validation_set({"x": [AudioFolderSource(audio_dir / "a"), everything]}, 16000, 0.5, 5)
    # 3 asked of the 2-file folder, the rest of everything: indices 0, 2, 4 (bad/empty.wav -> 1)
    assert [e.key for e in val] == ["sine16k.wav", "stereo44k.flac", GOOD[0], GOOD[2], GOOD[1]]
    assert everything.skipped.counts == {"empty": 1}
    assert all(e.group == "x" and e.audio.shape == (1, 8000) for e in val)
    assert all(abs(loudness(e.audio.numpy(), 16000) + 16) < 0.5 for e in val)


def test_validation_set_passes_over_clips_shorter_than_its_excerpts(tmp_path):
    for i, seconds in enumerate([0.3, 1.2, 0.4, 1.5, 2.0, 0.2]):
        sf.write(tmp_path / f"clip{i}.wav", tone(300 + 100 * i, 16000, seconds).astype(np.float32), 16000)
    source = AudioFolderSource(tmp_path)
    val = build_validation_set({"x": source}, 16000, 1.0, 3)
    assert [e.key for e in val] == ["clip4.wav", "clip1.wav", "clip3.wav"]  # no padded excerpt
    val = build_validation_set({"x": source}, 16000, 1.0, 5)  # too few long clips: short ones fill in
    assert [e.key for e in val] == ["clip1.wav", "clip3.wav", "clip4.wav", "clip0.wav", "clip2.wav"]
    assert all(e.audio.shape == (1, 16000) for e in val)


@pytest.mark.skipif(
    not os.environ.get("AUDIOTOK_REAL_AUDIO"), reason="set AUDIOTOK_REAL_AUDIO to a recipes/fetch_real_audio.py folder"
)
def test_real_audio_manifest():
    groups = sources_from_manifest(os.environ["AUDIOTOK_REAL_AUDIO"], "train")
    ds = ExcerptDataset({g: SourceGroup(1.0, [s]) for g, s in groups.items()}, 44100, seed=0)
    xs = list(itertools.islice(ds, 16))
    assert all(x.shape == (1, 16758) and x.abs().max() <= 1 and x.abs().max() > 0 for x in xs)


def test_pack_manifest_into_opus_parts(tmp_path, caplog):
    from audiotok.data.pack import pack_manifest

    src = tmp_path / "corpus"
    (src / "s").mkdir(parents=True)
    files = {"s/a.wav": (440, 16000, 5.5, "speech"), "s/b.flac": (1000, 44100, 4.2, "music"),
             "s/c.wav": (2500, 48000, 0.5, "general")}  # c is shorter than a 1 s piece: dropped
    rows = []
    for path, (freq, sr, seconds, category) in files.items():
        sf.write(src / path, np.stack([tone(freq, sr, seconds)] * 2, 1), sr)  # stereo: downmixed
        rows.append(("train", category, path))
    (src / "s/bad.wav").write_bytes(b"RIFF not audio")
    rows += [("train", "speech", "s/bad.wav"), ("eval", "speech", "s/a.wav")]
    with open(src / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "category", "source", "license", "path", "sr", "channels", "seconds", "format", "subtype"])
        w.writerows([split, cat, "test", "CC0", path, 0, 2, 0, "WAV", ""] for split, cat, path in rows)

    budget = 0.015  # MiB: a few 2 s Opus excerpts per part (24 kbps: about 6 KB each)
    with caplog.at_level(logging.WARNING):
        parts = pack_manifest(src, tmp_path / "packed", excerpt_seconds=2.0, part_mib=budget, seed=3)
    assert "bad.wav" in caplog.text  # skipped and logged, not fatal
    assert len(parts) >= 2 and [p.name for p in parts] == [f"part-{i:03d}" for i in range(len(parts))]
    seconds = {}
    for part in parts:
        manifest = list(csv.DictReader(open(part / "manifest.csv")))
        sizes = [(part / r["path"]).stat().st_size for r in manifest]
        assert len(sizes) == 1 or sum(sizes) <= budget * 2**20
        for r in manifest:
            audio, sr = sf.read(part / r["path"], dtype="float32")
            assert sr == 24000 and audio.ndim == 1 and float(r["seconds"]) == pytest.approx(len(audio) / sr, abs=0.01)
            freq = {"s__a": 440, "s__b": 1000}[Path(r["path"]).name.rsplit("-", 1)[0]]
            spectrum = np.abs(np.fft.rfft(audio))
            assert abs(np.argmax(spectrum) * sr / len(audio) - freq) < 5  # the same tone, after Opus
            seconds[r["category"]] = seconds.get(r["category"], 0) + float(r["seconds"])
    # Pieces of 2 s; a last piece under 1 s (the 0.2 s of b, all of c) is dropped.
    assert seconds == pytest.approx({"speech": 5.5, "music": 4.0}, abs=0.05)
    glob = str(tmp_path / "packed" / "part-*")
    for group, pieces in [("speech", 3), ("music", 2)]:  # a glob reads every part as one corpus
        spec = {"type": "manifest", "path": glob, "group": group}
        assert sum(len(source) for source in build_sources(spec)) == pieces
    assert len(pack_manifest(src, tmp_path / "one", excerpt_seconds=2.0, part_mib=budget, max_parts=1)) == 1
    with caplog.at_level(logging.WARNING):  # in worker processes: the same parts
        caplog.clear()
        pack_manifest(src, tmp_path / "pooled", excerpt_seconds=2.0, part_mib=budget, seed=3, workers=2)
        assert "bad.wav" in caplog.text
        two = pack_manifest(src, tmp_path / "two", excerpt_seconds=2.0, part_mib=budget, seed=3, workers=2,
                            max_parts=2)

    def files(folder):  # manifests as written, Opus files decoded (each Ogg stream has a random serial number)
        return {str(f.relative_to(folder)): sf.read(f)[0].tobytes() if f.suffix == ".opus" else f.read_bytes()
                for f in sorted(folder.rglob("*")) if f.is_file()}

    assert files(tmp_path / "pooled") == files(tmp_path / "packed")
    assert [p.name for p in two] == ["part-000", "part-001"] and files(tmp_path / "two") == {
        k: v for k, v in files(tmp_path / "packed").items() if k.split("/")[0] in ("part-000", "part-001")}
    with pytest.raises(ValueError, match="Opus"):
        pack_manifest(src, tmp_path / "x", sample_rate=44100)
    with pytest.raises(FileExistsError):
        pack_manifest(src, tmp_path / "packed")


def _noisy_corpus(root: Path, seconds: float = 6.0) -> Path:
    """A manifest folder of two files of tones in noise (which Opus codes at the rate it is given, where
    a pure tone takes less), speech and music, 24 kHz."""
    (root / "s").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "category", "source", "license", "path", "sr", "channels", "seconds", "format", "subtype"])
        for name, freq, category in (("a", 440, "speech"), ("b", 1000, "music")):
            audio = tone(freq, 24000, seconds, 0.2) + 0.05 * rng.standard_normal(int(24000 * seconds))
            sf.write(root / "s" / f"{name}.wav", audio.astype(np.float32), 24000)
            w.writerow(["train", category, "test", "CC0", f"s/{name}.wav", 24000, 1, seconds, "WAV", "PCM_16"])
    return root


def test_pack_bitrate_sets_the_bytes_per_second(tmp_path):
    """The bitrate asked for is the bitrate the packed files have (measured, not trusted), and they decode."""
    from audiotok.data.pack import pack_manifest

    src = _noisy_corpus(tmp_path / "corpus")
    measured = {}
    for kbps in (16, 48):
        parts = pack_manifest(src, tmp_path / f"p{kbps}", excerpt_seconds=2.0, bitrate_kbps=kbps)
        rows = [(part, r) for part in parts for r in csv.DictReader(open(part / "manifest.csv"))]
        assert len(rows) == 6  # 2 files x 3 excerpts of 2 s
        size = sum((part / r["path"]).stat().st_size for part, r in rows)
        seconds = sum(float(r["seconds"]) for _, r in rows)
        measured[kbps] = size * 8 / 1000 / seconds
        for part, r in rows:
            audio, sr = sf.read(part / r["path"], dtype="float32")
            assert sr == 24000 and len(audio) == pytest.approx(2 * 24000, abs=1)
            assert np.sqrt(np.mean(audio ** 2)) > 0.1  # sound, not silence
        # libopus's VBR lands near the target; the Ogg pages add about 1 kbps to 2 s files
        assert kbps <= measured[kbps] <= 1.2 * kbps, measured
    assert measured[48] > 2.5 * measured[16], measured
    with pytest.raises(ValueError, match="6.0 to 256.0 kbps"):
        pack_manifest(src, tmp_path / "x", bitrate_kbps=4)


def test_pack_parts_are_numbered_deterministically(tmp_path):
    """The same manifest and settings give the same parts, so part k can be carried in call k: the first
    part of a run cut short (max_parts) is the first part of a whole run (the same manifest and the same
    decoded audio; the files' bytes differ only in the Ogg stream's random serial number)."""
    from audiotok.data.pack import pack_manifest

    src = _noisy_corpus(tmp_path / "corpus")
    whole = pack_manifest(src, tmp_path / "whole", excerpt_seconds=2.0, part_mib=0.012)
    first = pack_manifest(src, tmp_path / "first", excerpt_seconds=2.0, part_mib=0.012, max_parts=1)
    assert len(whole) >= 3 and [p.name for p in first] == ["part-000"]

    def files(part: Path) -> dict[str, object]:
        return {str(f.relative_to(part)): f.read_bytes() if f.suffix == ".csv" else sf.read(f)[0].tobytes()
                for f in sorted(part.rglob("*")) if f.is_file()}

    assert files(first[0]) == files(whole[0])
    other_seed = pack_manifest(src, tmp_path / "seed1", excerpt_seconds=2.0, part_mib=0.012, seed=1)
    assert files(other_seed[0]) != files(whole[0])  # the order comes from the seed


def test_pack_data_recipe_takes_a_bitrate_and_reports_hours_per_mib(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    src = _noisy_corpus(tmp_path / "corpus")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = {}
    for bitrate in ("16", "auto"):
        proc = subprocess.run([sys.executable, str(repo / "recipes" / "pack_data.py"), str(src),
                               str(tmp_path / f"p-{bitrate}"), "--excerpt-seconds", "2", "--bitrate", bitrate],
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[bitrate] = proc.stdout
    assert "kbps" in out["16"] and "h per MiB" in out["16"].splitlines()[-1]
    kbps = {b: float(text.splitlines()[0].split(", ")[-1].split()[0]) for b, text in out.items()}
    assert 16 <= kbps["16"] <= 19 < kbps["auto"], kbps  # libopus's own choice: 35 to 38 kbps
    proc = subprocess.run([sys.executable, str(repo / "recipes" / "pack_data.py"), str(src), str(tmp_path / "x"),
                           "--bitrate", "fast"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "not a bitrate in kbps or 'auto'" in proc.stderr

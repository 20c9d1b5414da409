"""LM feed: codebook patterns, vocabulary, packing, and the code-dataset reader."""

from __future__ import annotations

import io
import json
import tarfile
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import random_tokenizer

from audiotok import DACConfig
from audiotok.bulk import ParquetShardWriter
from audiotok.formats.codedataset import FORMAT_VERSION
from audiotok.lm import (
    IGNORE_INDEX,
    CodebookPattern,
    CodeDataset,
    CodeRecord,
    CodeVocabulary,
    LMTokenDataset,
    apply_pattern,
    invert_pattern,
    pack_sequences,
    pad_to_length,
)
from audiotok.lm.stream import ExampleBatches
from audiotok.utils.distributed import DistEnv

PATTERNS = list(CodebookPattern)


# -- patterns -------------------------------------------------------------------------------------


def test_patterns_known_layout():
    codes = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint16)  # K=2, F=3
    assert apply_pattern(codes, "flatten").tolist() == [1, 4, 2, 5, 3, 6]
    assert apply_pattern(codes, "delay").tolist() == [[1, 2, 3, -1], [-1, 4, 5, 6]]
    assert apply_pattern(codes, "parallel").tolist() == [[1, 2, 3], [4, 5, 6]]
    k3 = np.arange(6).reshape(3, 2)  # K=3, F=2
    assert apply_pattern(k3, CodebookPattern.DELAY, pad_value=9).tolist() == [
        [0, 1, 9, 9],
        [9, 2, 3, 9],
        [9, 9, 4, 5],
    ]
    assert apply_pattern(k3, "flatten").tolist() == [0, 2, 4, 1, 3, 5]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_torch_in_torch_out(pattern):
    codes = torch.randint(0, 100, (4, 7), dtype=torch.int32)
    seq = apply_pattern(codes, pattern)
    assert isinstance(seq, torch.Tensor) and seq.dtype == torch.long
    back = invert_pattern(seq, pattern, 4)
    assert back.dtype == torch.long and back.is_contiguous() and torch.equal(back, codes.long())


def test_pattern_round_trips_random():
    rng = np.random.default_rng(0)
    for _ in range(300):
        k, f = int(rng.integers(1, 10)), int(rng.integers(1, 51))
        codes = rng.integers(0, 1024, (k, f))
        for pattern in PATTERNS:
            seq = apply_pattern(codes, pattern)
            assert seq.shape == {"flatten": (k * f,), "delay": (k, f + k - 1), "parallel": (k, f)}[pattern.value]
            np.testing.assert_array_equal(invert_pattern(seq, pattern, k), codes)


def test_invert_pattern_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of n_codebooks"):
        invert_pattern(np.arange(7), "flatten", 2)
    with pytest.raises(ValueError, match="rows"):
        invert_pattern(np.zeros((3, 5), np.int64), "parallel", 2)
    with pytest.raises(ValueError, match="shorter"):
        invert_pattern(np.full((4, 2), -1), "delay", 4)
    bad = apply_pattern(np.ones((2, 3), np.int64), "delay")
    bad[1, 0] = 7
    with pytest.raises(ValueError, match="pad marker"):
        invert_pattern(bad, "delay", 2)
    with pytest.raises(TypeError, match="integers"):
        apply_pattern(np.ones((2, 3), np.float32), "flatten")
    with pytest.raises(ValueError, match="unison|is not a valid"):
        apply_pattern(np.ones((2, 3), np.int64), "unison")


# -- vocabulary -----------------------------------------------------------------------------------


def test_vocabulary_layout_known_examples():
    codes = np.array([[0, 3], [1, 2]])  # S=4, K=2
    v = CodeVocabulary(4, 2)
    assert (v.vocab_size, v.pad_id, v.bos_id, v.eos_id) == (11, 8, 9, 10)
    assert v.encode(codes, "flatten").tolist() == [9, 0, 5, 3, 6, 10]
    assert v.encode(codes, "delay").tolist() == [[9, 0, 3, 8, 10], [9, 8, 5, 6, 10]]
    assert v.encode(codes, "parallel").tolist() == [[9, 0, 3, 10], [9, 5, 6, 10]]
    assert v.encode(codes, "flatten", add_bos=False, add_eos=False).tolist() == [0, 5, 3, 6]

    flat = CodeVocabulary(4, 2, offsets=False)
    assert (flat.vocab_size, flat.pad_id, flat.bos_id, flat.eos_id) == (7, 4, 5, 6)
    assert flat.encode(codes, "flatten").tolist() == [5, 0, 1, 3, 2, 6]
    assert flat.encode(codes, "delay").tolist() == [[5, 0, 3, 4, 6], [5, 4, 1, 2, 6]]

    custom = CodeVocabulary(4, 2, special=("bos", "eos", "pad", "sep"))
    assert custom.special_ids == {"bos": 8, "eos": 9, "pad": 10, "sep": 11} and custom.vocab_size == 12


def test_vocabulary_round_trips_random():
    rng = np.random.default_rng(1)
    for trial in range(300):
        k, f, size = int(rng.integers(1, 10)), int(rng.integers(1, 51)), int(rng.integers(2, 1025))
        codes = rng.integers(0, size, (k, f)).astype(np.uint16 if trial % 2 else np.int64)
        for offsets in (True, False):
            vocab = CodeVocabulary(size, k + int(rng.integers(0, 2)), offsets=offsets)
            for pattern in PATTERNS:
                bos, eos = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
                ids = vocab.encode(codes, pattern, add_bos=bos, add_eos=eos)
                assert ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < vocab.vocab_size
                if pattern is CodebookPattern.FLATTEN and offsets:
                    body = ids[int(bos) : len(ids) - int(eos)]
                    np.testing.assert_array_equal(body // size, np.arange(k * f) % k)
                back = vocab.decode(ids, pattern, n_codebooks=k, has_bos=bos, has_eos=eos)
                assert back.dtype == np.int64
                np.testing.assert_array_equal(back, codes)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_vocabulary_torch_round_trip(pattern):
    vocab = CodeVocabulary(16, 3)
    codes = torch.randint(0, 16, (3, 5))
    ids = vocab.encode(codes, pattern)
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.int64
    assert torch.equal(vocab.decode(ids, pattern), codes)


def test_vocabulary_decode_errors():
    v = CodeVocabulary(4, 2)
    ids = v.encode(np.array([[0, 3], [1, 2]]), "flatten")  # [9, 0, 5, 3, 6, 10]
    with pytest.raises(ValueError, match=r"id 11 .* outside \[0, 11\)"):
        v.decode(np.r_[ids[:-1], 11])
    with pytest.raises(ValueError, match="outside"):
        v.decode(np.r_[ids[:2], -1, ids[3:]])
    swapped = ids.copy()
    swapped[[1, 2]] = swapped[[2, 1]]
    with pytest.raises(ValueError, match="code id of codebook 1, expected a code id of codebook 0"):
        v.decode(swapped)
    with pytest.raises(ValueError, match="missing bos"):
        v.decode(ids[1:])
    with pytest.raises(ValueError, match="missing eos"):
        v.decode(ids[:-1])
    with pytest.raises(ValueError, match="missing bos"):
        v.decode(np.array([], np.int64))
    with pytest.raises(ValueError, match="special token 'eos'"):
        v.decode(np.r_[ids[:3], 10, ids[4:]])
    with pytest.raises(ValueError, match="special token 'pad'"):
        v.decode(np.r_[ids[:-1], 8, 8, 10])
    with pytest.raises(ValueError, match="multiple of n_codebooks"):
        v.decode(np.r_[ids[:-1], 0, 10])
    with pytest.raises(ValueError, match="1-D"):
        v.decode(ids[None])

    delay = v.encode(np.array([[0, 3], [1, 2]]), "delay")  # [[9, 0, 3, 8, 10], [9, 8, 5, 6, 10]]
    bad = delay.copy()
    bad[0, 3] = 1
    with pytest.raises(ValueError, match="pad marker 8"):
        v.decode(bad, "delay")
    bad = delay.copy()
    bad[1, 2] = 8
    with pytest.raises(ValueError, match="special token 'pad'"):
        v.decode(bad, "delay")
    bad = delay.copy()
    bad[1, 0] = 0
    with pytest.raises(ValueError, match="missing bos"):
        v.decode(bad, "delay")
    with pytest.raises(ValueError, match="expected n_codebooks=1"):
        v.decode(delay, "delay", n_codebooks=1)
    parallel = v.encode(np.array([[0, 3], [1, 2]]), "parallel")
    with pytest.raises(ValueError, match="codebook 1, expected a code id of codebook 0"):
        v.decode(parallel[::-1].copy(), "parallel")
    # Without offsets only specials can be misplaced; a code id fits any codebook.
    v_flat = CodeVocabulary(4, 2, offsets=False)
    np.testing.assert_array_equal(v_flat.decode(np.array([5, 1, 0, 6])), [[1], [0]])
    with pytest.raises(ValueError, match="special token 'bos'"):
        v_flat.decode(np.array([5, 1, 5, 6]))


def test_vocabulary_encode_and_constructor_errors():
    v = CodeVocabulary(4, 2)
    with pytest.raises(ValueError, match=r"code 4 at codebook 1, frame 0 is outside \[0, 4\)"):
        v.encode(np.array([[0], [4]]))
    with pytest.raises(ValueError, match="3 codebooks"):
        v.encode(np.zeros((3, 2), np.int64))
    with pytest.raises(ValueError, match="2-D"):
        v.encode(np.zeros(4, np.int64))
    no_pad = CodeVocabulary(4, 2, special=("bos", "eos"))
    assert no_pad.pad_id is None and no_pad.encode(np.zeros((2, 1), np.int64)).tolist() == [8, 0, 4, 9]
    with pytest.raises(ValueError, match="no 'pad' special token"):
        no_pad.encode(np.zeros((2, 1), np.int64), "delay")
    with pytest.raises(ValueError, match="no 'bos'"):
        CodeVocabulary(4, 2, special=("pad",)).encode(np.zeros((2, 1), np.int64))
    with pytest.raises(ValueError, match="distinct"):
        CodeVocabulary(4, 2, special=("pad", "pad"))
    with pytest.raises(ValueError, match="codebook_size"):
        CodeVocabulary(0, 2)


def test_vocabulary_dict_round_trip():
    for v in (CodeVocabulary(1024, 9), CodeVocabulary(64, 4, offsets=False, special=("pad", "bos", "eos", "sep"))):
        data = json.loads(json.dumps(v.to_dict()))
        assert CodeVocabulary.from_dict(data) == v
    data = CodeVocabulary(1024, 9).to_dict()
    data["vocab_size"] = 5
    with pytest.raises(ValueError, match="vocab_size"):
        CodeVocabulary.from_dict(data)


# -- packing --------------------------------------------------------------------------------------


def test_pack_sequences_blocks_and_labels():
    seqs = [np.array([1, 2, 3]), np.array([4, 5, 6, 7]), np.array([8, 9])]
    blocks = list(pack_sequences(seqs, seq_len=4, pad_id=0))
    assert [b["input_ids"].tolist() for b in blocks] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert [b["attention_mask"].tolist() for b in blocks] == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert blocks[2]["labels"].tolist() == [9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert all(b["input_ids"].dtype == torch.int64 for b in blocks)
    dropped = list(pack_sequences(seqs, seq_len=4, pad_id=0, drop_remainder=True))
    assert [b["input_ids"].tolist() for b in dropped] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    # A long sequence spans blocks; an exact fit leaves no partial block.
    long = list(pack_sequences([torch.arange(1, 10)], seq_len=3, pad_id=0))
    assert [b["input_ids"].tolist() for b in long] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert list(pack_sequences([], seq_len=3, pad_id=0)) == []


def test_pack_sequences_multistream():
    v = CodeVocabulary(4, 2)
    seqs = [v.encode(np.array([[0, 1], [2, 3]]), "delay"), v.encode(np.array([[3], [3]]), "delay")]
    blocks = list(pack_sequences(seqs, seq_len=6, pad_id=v.pad_id))
    assert [b["input_ids"].tolist() for b in blocks] == [
        [[9, 0, 1, 8, 10, 9], [9, 8, 6, 7, 10, 9]],
        [[3, 8, 10, 8, 8, 8], [8, 7, 10, 8, 8, 8]],
    ]
    assert blocks[1]["attention_mask"].tolist() == [1, 1, 1, 0, 0, 0]
    labels = blocks[1]["labels"]
    assert labels[:, 3:].eq(IGNORE_INDEX).all() and labels[:, :3].eq(blocks[1]["input_ids"][:, :3]).all()
    with pytest.raises(ValueError, match="cannot pack"):
        list(pack_sequences([np.zeros((2, 3), np.int64), np.zeros((3, 3), np.int64)], seq_len=2, pad_id=0))


def test_pad_to_length():
    out = pad_to_length([7, 8], seq_len=4, pad_id=1)
    assert out["input_ids"].tolist() == [7, 8, 1, 1]
    assert out["attention_mask"].tolist() == [1, 1, 0, 0]
    assert out["labels"].tolist() == [7, 8, IGNORE_INDEX, IGNORE_INDEX]
    with pytest.raises(ValueError, match="does not fit"):
        pad_to_length([1, 2, 3], seq_len=2, pad_id=0)


def test_packed_batch_trains_gpt2():
    transformers = pytest.importorskip("transformers")
    vocab = CodeVocabulary(64, 4)
    rng = np.random.default_rng(0)
    seqs = (vocab.encode(rng.integers(0, 64, (4, int(n)))) for n in rng.integers(3, 20, 10))
    blocks = list(pack_sequences(seqs, seq_len=32, pad_id=vocab.pad_id))
    batch = torch.utils.data.default_collate(blocks)
    assert batch["input_ids"].shape == (len(blocks), 32) and batch["attention_mask"][-1, -1] == 0
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab.vocab_size, n_layer=1, n_head=2, n_embd=32, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    out = model(**batch)
    assert out.logits.shape == (len(blocks), 32, vocab.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()


# -- code datasets --------------------------------------------------------------------------------

CONFIG = DACConfig.preset("tiny-16khz")  # 4 codebooks of 64 entries, hop 320


def make_records(prefix: str, n: int, rng: np.random.Generator, stereo: bool = False) -> list[CodeRecord]:
    records = []
    for i in range(n):
        f = int(rng.integers(1, 12))
        shape = (2, 4, f) if stereo and i % 2 == 0 else (4, f)
        key = f"{prefix}/{i:03d}.x"  # keys may hold slashes and dots
        meta = dict(key=key, source_key=f"src/{key}.wav", num_samples=f * 320 - 5, sample_rate=16000,
                    n_frames=f, channels=len(shape) - 1, model_id="tiny")
        records.append(CodeRecord(key, rng.integers(0, 64, shape).astype(np.uint16), meta))
    return records


def write_tar(path, records: list[CodeRecord]) -> None:
    with tarfile.open(path, "w") as tar:
        for r in records:
            buf = io.BytesIO()
            np.save(buf, r.codes)
            for name, data in ((f"{r.key}.codes.npy", buf.getvalue()), (f"{r.key}.json", json.dumps(r.meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


PARQUET_V1_SCHEMA = pa.schema([  # format_version 1: raw bytes and a shape column
    ("key", pa.string()), ("codes", pa.binary()), ("shape", pa.list_(pa.int32())), ("n_frames", pa.int32()),
    ("num_samples", pa.int64()), ("sample_rate", pa.int32()), ("channels", pa.int16()),
    ("source_key", pa.string()), ("model_id", pa.string()),
])


def write_parquet_v1(path, records: list[CodeRecord]) -> None:
    rows = [dict(r.meta, codes=r.codes.astype("<u2").tobytes(order="C"), shape=list(r.codes.shape)) for r in records]
    pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_V1_SCHEMA), path)


def write_parquet(path, records: list[CodeRecord]) -> None:
    writer = ParquetShardWriter(path, {"mono": records[0].codes.ndim == 2})
    for r in records:
        writer.add(r.meta, r.codes)
    writer.close()


def write_dataset(root, shards: list[tuple[str, list[CodeRecord]]], codes_fingerprint: str | None = None) -> None:
    """A code dataset of ``shards``, with a format-2 manifest (written before ``codes_fingerprint``) unless
    ``codes_fingerprint`` is given."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, records in shards:
        write = write_tar if name.endswith(".tar") else write_parquet_v1 if "-v1" in name else write_parquet
        write(root / name, records)
        entries.append({"path": name, "records": len(records), "frames": sum(r.codes.shape[-1] for r in records)})
    manifest = {
        "format": "audiotok-code-dataset", "format_version": 2, "model_id": "tiny", "config": CONFIG.to_dict(),
        "config_hash": CONFIG.architecture_hash(), "hop_length": CONFIG.hop_length, "frame_rate": CONFIG.frame_rate,
        "shards": entries, "records": sum(e["records"] for e in entries), "audio_hours": 0.001,
        "failures": [{"key": "bad.wav", "reason": "decode"}],
    }
    if codes_fingerprint is not None:
        manifest.update(format_version=3, codes_fingerprint=codes_fingerprint)
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def code_dataset(tmp_path_factory):
    """Three tar shards and two Parquet shards (format versions 1 and 2), with [K, F] and [C, K, F] records."""
    rng = np.random.default_rng(0)
    shards = [
        ("shard-00000.tar", make_records("a", 4, rng, stereo=True)),
        ("shard-00001.tar", make_records("b", 3, rng)),
        ("shard-00002-v1.parquet", make_records("c", 5, rng, stereo=True)),
        ("shard-00003.tar", make_records("d", 2, rng)),
        ("shard-00004.parquet", make_records("e", 3, rng)),
    ]
    root = tmp_path_factory.mktemp("codes") / "ds"
    write_dataset(root, shards)
    return root, [r for _, records in shards for r in records]


def test_code_dataset_reads_tar_and_parquet(code_dataset):
    root, expected = code_dataset
    ds = CodeDataset(root)
    assert len(ds) == len(expected) == 17 and ds.config == CONFIG
    got = list(ds)
    assert [r.key for r in got] == [r.key for r in expected]
    for r, e in zip(got, expected):
        assert r.codes.dtype == np.uint16 and r.codes.shape == e.codes.shape
        np.testing.assert_array_equal(r.codes, e.codes)
        assert r.meta == e.meta
        assert r.channel_codes.shape == ((2,) if e.codes.ndim == 3 else (1,)) + e.codes.shape[-2:]
    assert sum(r.codes.ndim == 3 for r in got) == 5
    assert list(ds) and [r.key for r in ds] == [r.key for r in expected]  # iterable more than once


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_split_by_rank_covers_every_record_once(code_dataset, world_size):
    root, expected = code_dataset
    ds = CodeDataset(root)
    parts = [ds.split_by_rank(rank, world_size) for rank in range(world_size)]
    keys = [r.key for part in parts for r in part]
    assert sorted(keys) == sorted(r.key for r in expected)
    assert sum(len(p) for p in parts) == len(ds) and len(ds.shards) == 5
    with pytest.raises(ValueError, match="rank"):
        ds.split_by_rank(world_size, world_size)


def test_code_dataset_vocabulary(code_dataset):
    ds = CodeDataset(code_dataset[0])
    assert CodeVocabulary.for_codec(ds.config) == CodeVocabulary(64, 4)
    assert CodeVocabulary.for_codec(ds.config, offsets=False, n_codebooks=2).vocab_size == 64 + 3


def test_code_dataset_rejects_bad_manifests_and_shards(tmp_path):
    rng = np.random.default_rng(3)
    write_dataset(tmp_path, [("shard-00000.tar", make_records("a", 2, rng))])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    too_new = {"format_version": FORMAT_VERSION + 1}
    for change, match in (({"format": "other"}, "format"), (too_new, "format_version")):
        (tmp_path / "manifest.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(ValueError, match=match):
            CodeDataset(tmp_path)
    outside = tmp_path.parent / "outside.tar"
    for path in ("../outside.tar", str(outside), "", None):  # a manifest never points a reader elsewhere
        bad_shard = {**manifest["shards"][0], "path": path}
        (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "shards": [bad_shard]}))
        with pytest.raises(ValueError, match="not a relative path inside the dataset folder"):
            CodeDataset(tmp_path)
    manifest["shards"][0]["records"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest.json: entries disagree .*: records 2 \(expected 3\)"):
        CodeDataset(tmp_path)
    manifest["records"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="read 2 records of .* frames, the manifest lists 3 of"):
        list(CodeDataset(tmp_path))

    record = make_records("z", 1, rng)[0]
    write_tar(tmp_path / "shard-00000.tar", [CodeRecord(record.key, record.codes.astype(np.int32), record.meta)])
    manifest["shards"][0]["records"] = manifest["records"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="int32 codes"):
        list(CodeDataset(tmp_path))
    with tarfile.open(tmp_path / "shard-00000.tar", "w") as tar:
        info = tarfile.TarInfo("lonely.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ValueError, match="'lonely' has no codes member"):
        list(CodeDataset(tmp_path))


def test_code_dataset_checks_the_weights_that_wrote_it(tmp_path, code_dataset):
    tok, twin = random_tokenizer("tiny-16khz"), random_tokenizer("tiny-16khz", seed=1)  # other weights
    assert tok.codes_fingerprint != twin.codes_fingerprint
    write_dataset(tmp_path / "ds", [("shard-00000.tar", make_records("a", 2, np.random.default_rng(4)))],
                  codes_fingerprint=tok.codes_fingerprint)
    ds = CodeDataset(tmp_path / "ds")
    assert (ds.model_id, ds.codes_fingerprint) == ("tiny", tok.codes_fingerprint)
    ds.check_codec(tok)
    with pytest.raises(ValueError, match="same architecture with other weights") as err:
        ds.check_codec(twin)
    for part in ("'tiny'", tok.codes_fingerprint, repr(twin.model_id), twin.codes_fingerprint):
        assert part in str(err.value)
    with pytest.raises(ValueError, match="config hash"):
        ds.check_codec(random_tokenizer("tiny-24khz"))
    old = CodeDataset(code_dataset[0])  # written before the manifest recorded the fingerprint
    assert old.codes_fingerprint is None
    old.check_codec(twin)  # the architecture alone is checked
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    for bad in ("../../etc", tok.codes_fingerprint.upper(), 7):
        (tmp_path / "ds" / "manifest.json").write_text(json.dumps({**manifest, "codes_fingerprint": bad}))
        with pytest.raises(ValueError, match="codes_fingerprint"):
            CodeDataset(tmp_path / "ds")


def test_parquet_shard_loads_with_datasets(code_dataset, tmp_path):
    datasets = pytest.importorskip("datasets")
    root, expected = code_dataset
    hf = datasets.load_dataset("parquet", data_files=str(root / "shard-00004.parquet"), split="train",
                               cache_dir=str(tmp_path)).with_format("numpy")
    assert hf.num_rows == 3
    for row in hf:
        record = next(r for r in expected if r.key == row["key"])
        np.testing.assert_array_equal(row["codes"], record.codes)  # an array, no reshaping
        assert row["n_frames"] == record.codes.shape[-1]


def decode_stream(vocab: CodeVocabulary, blocks, pattern: str = "flatten") -> list[np.ndarray]:
    """Split packed flatten blocks back into sequences at each eos and decode them."""
    tokens = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in blocks]).numpy()
    ends = np.flatnonzero(tokens == vocab.eos_id) + 1
    return [vocab.decode(seq, pattern) for seq in np.split(tokens, ends)[:-1]]


def test_lm_token_dataset_flatten(code_dataset):
    root, expected = code_dataset
    ds = CodeDataset(root)
    vocab = CodeVocabulary.for_codec(ds.config)
    blocks = list(LMTokenDataset(ds, vocab, seq_len=16))
    assert all(b["input_ids"].shape == (16,) for b in blocks)
    channels = [c for r in expected for c in r.channel_codes]
    decoded = decode_stream(vocab, blocks)
    assert len(decoded) == len(channels) == 22
    for got, want in zip(decoded, channels):
        np.testing.assert_array_equal(got, want)

    # First two codebooks, right channel only (mono records serve as every channel).
    vocab2 = CodeVocabulary.for_codec(ds.config, n_codebooks=2)
    blocks = list(LMTokenDataset(ds, vocab2, seq_len=8, channel=1, drop_remainder=True))
    decoded = decode_stream(vocab2, blocks)
    assert len(blocks) == sum(len(r.channel_codes[0, 0]) * 2 + 2 for r in expected) // 8
    assert len(expected) - 2 <= len(decoded) < len(expected)  # the dropped partial block cut the last one
    for got, r in zip(decoded, expected):
        np.testing.assert_array_equal(got, r.channel_codes[-1, :2])
    with pytest.raises(ValueError, match="channel 2 was asked for"):
        list(LMTokenDataset(ds, vocab, seq_len=8, channel=2))


def test_lm_token_dataset_delay_and_workers(code_dataset):
    root, expected = code_dataset
    ds = CodeDataset(root)
    vocab = CodeVocabulary.for_codec(ds.config)
    blocks = list(LMTokenDataset(ds, vocab, "delay", seq_len=10, n_codebooks=3, channel=0))
    assert all(b["input_ids"].shape == (3, 10) and b["labels"].shape == (3, 10) for b in blocks)
    row0 = torch.cat([b["input_ids"][0][b["attention_mask"].bool()] for b in blocks])
    assert int((row0 == vocab.bos_id).sum()) == len(expected)

    lm = LMTokenDataset(ds, vocab, seq_len=16)
    single = list(lm)
    # Each worker reads its own shards: decoded per worker, together they are every sequence once.
    per_worker = []
    for worker in range(2):
        info = SimpleNamespace(id=worker, num_workers=2)
        with mock.patch("audiotok.lm.dataset.get_worker_info", return_value=info):
            per_worker.append(list(lm))
    both = [a.tobytes() for blocks in per_worker for a in decode_stream(vocab, blocks)]
    assert sorted(both) == sorted(a.tobytes() for a in decode_stream(vocab, single))
    # A real DataLoader with two worker processes yields the same tokens.
    loader = torch.utils.data.DataLoader(lm, batch_size=None, num_workers=2)
    tokens = sorted(torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in loader]).tolist())
    assert tokens == sorted(torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in single]).tolist())


class RecordIds:
    """An example source (:class:`~audiotok.lm.stream.ExampleSource`): one example per record, its index in
    ``keys``; ``read`` counts the records read (in this process)."""

    seq_len = 1

    def __init__(self, keys: list[str], skip: bool = False):
        self.index, self.skip, self.read = {k: i for i, k in enumerate(keys)}, skip, 0

    def examples(self, records):
        for record in records:
            self.read += 1
            if not self.skip:
                yield {"id": torch.tensor(self.index[record.key])}


def _ids(batches, n: int) -> list[int]:
    return [i for _ in range(n) for i in next(batches)["id"].tolist()]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_example_batches_shuffle_each_epoch_and_resume_from_their_state(code_dataset, num_workers):
    root, expected = code_dataset
    ds, keys = CodeDataset(root), [r.key for r in expected]  # 17 records in shards of 4, 3, 5, 2 and 3

    def batches(source=None, **changes):
        settings = dict(seed=5, window=3, num_workers=num_workers, env=DistEnv()) | changes
        return ExampleBatches(ds, source or RecordIds(keys), 2, **settings)

    straight = batches()
    ids = _ids(straight, 26)  # 52 examples
    straight.close()  # its worker processes end
    readers = [ids] if num_workers == 0 else [ids[0::2], ids[1::2]]  # the readers take turns
    shards = [[0, 1, 2, 3, 4]] if num_workers == 0 else [[0, 2, 4], [1, 3]]  # reader r: shards r, r + 2, ...
    sizes = [4, 3, 5, 2, 3]
    for taken, own in zip(readers, shards):  # each epoch of a reader holds each of its records once, in its order
        records = sorted(i for s in own for i in range(sum(sizes[:s]), sum(sizes[:s + 1])))
        epochs = [taken[e * len(records): (e + 1) * len(records)] for e in range(len(taken) // len(records))]
        assert len(epochs) >= 2 and all(sorted(epoch) == records for epoch in epochs)
        assert len({tuple(epoch) for epoch in epochs}) > 1 and epochs[0] != records  # shuffled, not all alike
    for stop in (4, 9, 17):  # in the first epoch, early in the second, at the end of the second (one reader)
        first = batches()
        _ids(first, stop)
        source = RecordIds(keys)
        resumed = batches(source)
        resumed.load_state_dict(first.state_dict())
        assert _ids(resumed, 26 - stop) == ids[2 * stop:], stop
        first.close()
        resumed.close()
        if num_workers == 0:  # the data before is not read: at most its shard up to a window, and a batch
            assert source.read <= (2 * 3 - 1) + 2 * (26 - stop) + 3, (stop, source.read)
    with pytest.raises(ValueError, match="cannot resume the data position: it has seed=5, this run 6"):
        batches(seed=6).load_state_dict(first.state_dict())
    empty = batches(RecordIds(keys, skip=True))
    with pytest.raises(ValueError, match="rank 0 has too few codes for one example of 1 steps in its 5 shard"):
        next(empty)
    empty.close()


# -- manifests and shards that disagree, or are of the wrong shape (issue 26) ------------------------


def _dataset(tmp_path, records=None, **manifest_changes):
    """A one-shard tar dataset of ``records`` (default: two [4, F] records) with its manifest edited."""
    records = records if records is not None else make_records("a", 2, np.random.default_rng(5))
    write_dataset(tmp_path, [("shard-00000.tar", records)])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, **manifest_changes}))
    return tmp_path


@pytest.mark.parametrize("edit, message", [
    (lambda m: [], "manifest.json: the top level must be an object, got an array"),
    (lambda m: "[" * 5000 + "]" * 5000, "manifest.json: JSON nested 5000 deep"),
    (lambda m: {k: v for k, v in m.items() if k != "shards"}, "manifest.json: the file has no 'shards' entry"),
    (lambda m: {**m, "shards": [1]}, r"manifest.json: shards\[0\] must be an object, got 1"),
    (lambda m: {**m, "shards": [{**m["shards"][0], "records": "2"}]}, r"shards\[0\].records must be an integer"),
    (lambda m: {**m, "config": "tiny"}, "manifest.json: config must be an object, got 'tiny'"),
    (lambda m: {**m, "audio_hours": float("nan")}, "not valid JSON \\(NaN"),
])
def test_manifests_of_the_wrong_shape_are_one_error_naming_the_file(tmp_path, edit, message):
    root = _dataset(tmp_path)
    value = edit(json.loads((root / "manifest.json").read_text()))
    (root / "manifest.json").write_text(value if isinstance(value, str) else json.dumps(value))
    with pytest.raises(ValueError, match=message):
        CodeDataset(root)


@pytest.mark.parametrize("changes, message", [
    ({"config_hash": "0123456789abcdef"}, "entries disagree with its config and shards: config_hash"),
    ({"hop_length": 640}, r"hop_length 640 \(expected 320\)"),
    ({"frame_rate": 25.0}, r"frame_rate 25.0 \(expected 50.0\)"),
    ({"n_quantizers": 9}, "n_quantizers 9 is not within the config's 4 codebooks"),
    ({"config": {**CONFIG.to_dict(), "n_codebooks": 0}}, "manifest.json: invalid config"),
])
def test_manifest_entries_that_disagree_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        CodeDataset(_dataset(tmp_path, **changes))


def _record(key: str, codes: np.ndarray, **meta) -> CodeRecord:
    f = codes.shape[-1]
    fields = dict(key=key, source_key=key, num_samples=f * 320 - 5, sample_rate=16000, n_frames=f, channels=1,
                  model_id="tiny")
    return CodeRecord(key, codes.astype(np.uint16), {**fields, **meta})


@pytest.mark.parametrize("record, changes, message", [
    (_record("k", np.zeros((3, 5))), {"n_quantizers": 4}, r"'k' has 3 codebooks \(the manifest says n_quantizers 4"),
    (_record("k", np.full((4, 5), 64)), {}, r"'k' has code 64 \(the codebooks have 64 entries\)"),
    (_record("k", np.zeros((4, 5)), num_samples=5 * 640), {}, "'k': codes have 5 frames but num_samples=3200"),
    (_record("k", np.zeros((4, 5)), sample_rate=0), {}, "'k': sample_rate must be an integer >= 1"),
    (_record("k", np.zeros((4, 5)), n_frames="5"), {}, "record 'k': n_frames must be an integer, got '5'"),
    (_record("k", np.zeros((2, 4, 5)), channels=2), {"mono": True}, r"'k' has codes of shape \(2, 4, 5\)"),
    (_record("k", np.zeros((2, 4, 5)), channels=3), {}, "'k' has 2 coded channels"),
])
def test_records_that_disagree_with_the_manifest_are_refused(tmp_path, record, changes, message):
    root = _dataset(tmp_path, [record], **changes)
    with pytest.raises(ValueError, match=message):
        list(CodeDataset(root))


def test_shard_counts_and_parquet_metadata_must_match_the_manifest(tmp_path):
    root = _dataset(tmp_path / "frames")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0]["frames"] += 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="read 2 records of .* frames, the manifest lists 2 of"):
        list(CodeDataset(root))

    records = make_records("p", 2, np.random.default_rng(6))
    root = tmp_path / "parquet"
    write_dataset(root, [("shard-00000.parquet", records)])
    writer = ParquetShardWriter(root / "shard-00000.parquet", {"mono": True, "hop_length": 512, "config_hash": "x"})
    for r in records:
        writer.add(r.meta, r.codes)
    writer.close()
    with pytest.raises(ValueError, match="metadata disagrees with the manifest: hop_length 512 .*, config_hash 'x'"):
        list(CodeDataset(root))


def test_info_on_a_code_dataset_gives_per_codebook_statistics(tmp_path, capsys):
    """`audiotok info DATASET`: the token rate and, per codebook, distinct codes, perplexity and entropy
    of the code histogram, checked against a direct count over every channel of every record."""
    from audiotok.cli import main

    rng = np.random.default_rng(3)
    records = make_records("a", 6, rng, stereo=True)
    write_dataset(tmp_path / "ds", [("shard-00000.tar", records[:3]), ("shard-00001.tar", records[3:])])
    assert main(["info", str(tmp_path / "ds"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    channels = [c for r in records for c in r.codes.reshape(-1, 4, r.codes.shape[-1])]
    flat = np.concatenate(channels, axis=1)
    assert (info["records"], info["records_read"], info["frames_read"]) == (6, 6, flat.shape[1])
    assert info["tokens_per_second"] == pytest.approx(CONFIG.frame_rate * 4, abs=1e-3)
    for k, row in enumerate(flat):
        counts = np.bincount(row, minlength=64)
        p = counts[counts > 0] / row.size
        entropy = float(-(p * np.log2(p)).sum())
        assert info["distinct_codes"][k] == int((counts > 0).sum())
        assert info["entropy_bits"][k] == pytest.approx(entropy, abs=1e-3)
        assert info["perplexity"][k] == pytest.approx(2**entropy, abs=0.06)
    assert main(["info", str(tmp_path / "ds"), "--max-records", "1", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    c0, f0 = records[0].codes.reshape(-1, 4, records[0].codes.shape[-1]).shape[0], records[0].codes.shape[-1]
    assert (first["records_read"], first["frames_read"]) == (1, c0 * f0)  # every channel's frames
    assert main(["info", str(tmp_path / "ds")]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["distinct_codes"].split() == [str(d) for d in info["distinct_codes"]]

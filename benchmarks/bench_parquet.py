"""Parquet code shards: file size and read speed of the nested-list layout (format_version 2)
against the raw-bytes layout it replaced (version 1: ``codes`` as bytes plus a ``shape`` column).

Codes come from the bundled model on real audio (the real-audio eval split's speech and music, cut
into ``--record-seconds`` records), so zstd sees the codes' real statistics. Both layouts hold the
same records in the same row groups; reads are timed with the library's reader
(``audiotok.lm.CodeDataset``: records as uint16 arrays) and with ``datasets`` (``load_dataset(
"parquet")``: version 2 gives arrays, version 1 bytes that need ``np.frombuffer(...).reshape``).

    python benchmarks/bench_parquet.py --data data/real-audio --minutes 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from audiotok import AudioTokenizer, CodeDataset
from audiotok.audio import load_audio
from audiotok.data.config import read_manifest
from audiotok.formats.codedataset import Manifest, ParquetShardWriter, ShardEntry, dataset_metadata
from audiotok.utils.store import LocalStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

V1_SCHEMA = pa.schema([
    ("key", pa.string()), ("codes", pa.binary()), ("shape", pa.list_(pa.int32())), ("n_frames", pa.int32()),
    ("num_samples", pa.int64()), ("sample_rate", pa.int32()), ("channels", pa.int16()),
    ("source_key", pa.string()), ("model_id", pa.string()),
])


def real_codes(tok: AudioTokenizer, data: str, minutes: float, record_seconds: float) -> list[np.ndarray]:
    """uint16 [K, F] records cut from the codes of eval-split speech and music files."""
    rows = [r for r in read_manifest(data) if r["split"] == "eval" and r["category"] in ("speech", "music")]
    rows.sort(key=lambda r: (r["category"] != "music", r["path"]))
    frames = round(record_seconds * tok.frame_rate)
    records, seconds = [], 0.0
    for row in rows:
        if seconds >= minutes * 60:
            break
        audio, sr = load_audio(Path(data) / row["path"])
        audio = audio[:, : int(sr * min(60.0, minutes * 60 - seconds))]  # at most a minute per file
        codes = tok.encode(audio, sr).codes[0].numpy().astype(np.uint16)
        seconds += audio.shape[1] / sr
        records += [codes[:, i:i + frames] for i in range(0, codes.shape[1] - frames + 1, frames)]
    return records


def meta(i: int, codes: np.ndarray, tok: AudioTokenizer) -> dict:
    n = codes.shape[1]
    return {"key": f"rec{i:05d}", "source_key": f"file{i}.flac", "num_samples": n * tok.hop_length,
            "sample_rate": tok.sample_rate, "n_frames": n, "channels": 1, "model_id": tok.model_id}


def write_v1(path: Path, records: list[np.ndarray], tok: AudioTokenizer, row_group: int = 256) -> None:
    with pq.ParquetWriter(str(path), V1_SCHEMA, compression="zstd") as writer:
        for start in range(0, len(records), row_group):
            rows = [dict(meta(start + j, c, tok), codes=c.astype("<u2").tobytes(), shape=list(c.shape))
                    for j, c in enumerate(records[start:start + row_group])]
            writer.write_table(pa.Table.from_pylist(rows, schema=V1_SCHEMA))


def write_v2(path: Path, records: list[np.ndarray], tok: AudioTokenizer) -> None:
    with ParquetShardWriter(path, dataset_metadata(tok.identity, tok.config, tok.n_codebooks, True)) as writer:
        for i, codes in enumerate(records):
            writer.add(meta(i, codes, tok), codes)


def write_manifest(folder: Path, shard: str, records: list[np.ndarray], tok: AudioTokenizer) -> None:
    entry = ShardEntry(shard, len(records), sum(c.shape[1] for c in records))
    Manifest(tok.identity, tok.config, (entry,), audio_hours=0.0, format_version=2).write(LocalStore(folder))


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(name: str, write, tmp: Path, records: list[np.ndarray], tok: AudioTokenizer,
            repeats: int) -> tuple[str, int, float, float, float]:
    """(name, file bytes, CodeDataset seconds, datasets row-by-row seconds, datasets batched seconds)."""
    import datasets

    folder = tmp / name.split(":")[0]
    folder.mkdir()
    write(folder / "shard.parquet", records, tok)
    write_manifest(folder, "shard.parquet", records, tok)
    library = best_of(lambda: sum(r.codes.size for r in CodeDataset(folder)), repeats)
    ds = datasets.load_dataset("parquet", data_files=str(folder / "shard.parquet"), split="train",
                               cache_dir=str(tmp / "hf" / folder.name))
    v1 = name.startswith("v1")  # bytes, reshaped by hand

    def rows() -> int:
        if v1:
            return sum(np.frombuffer(r["codes"], "<u2").reshape(r["shape"]).size for r in ds)
        return sum(r["codes"].size for r in ds.with_format("numpy"))

    def batches() -> int:
        if v1:
            return sum(np.frombuffer(c, "<u2").size for b in ds.iter(batch_size=64) for c in b["codes"])
        return sum(c.size for b in ds.with_format("numpy").iter(batch_size=64) for c in b["codes"])

    return name, (folder / "shard.parquet").stat().st_size, library, best_of(rows, repeats), best_of(batches, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/real-audio", help="real-audio folder (recipes/fetch_real_audio.py)")
    p.add_argument("--minutes", type=float, default=4.0, help="audio to code (default 4)")
    p.add_argument("--record-seconds", type=float, default=2.0, help="seconds per record (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="reads timed per layout (best kept)")
    args = p.parse_args()
    import datasets

    datasets.disable_progress_bars()
    tok = AudioTokenizer.from_pretrained()
    records = real_codes(tok, args.data, args.minutes, args.record_seconds)
    print(f"{len(records)} records of {args.record_seconds} s ({records[0].shape[0]} x {records[0].shape[1]} codes), "
          f"bundled model; {machine(torch.device('cpu'))}")
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(name, write, Path(tmp), records, tok, args.repeats)
                   for name, write in (("v1: bytes + shape", write_v1), ("v2: nested lists", write_v2))]
        raw = sum(c.nbytes for c in records)
        print(f"\nraw uint16 codes: {raw / 1e6:.2f} MB")
        print("| layout | file size | CodeDataset | datasets, row by row | datasets, batches of 64 |")
        print("|---|---|---|---|---|")
        for name, size, library, hf, batched in results:
            print(f"| {name} | {size / 1e6:.2f} MB ({size / raw:.2f} x raw) | {len(records) / library:,.0f} records/s "
                  f"| {len(records) / hf:,.0f} records/s | {len(records) / batched:,.0f} records/s |")


if __name__ == "__main__":
    main()

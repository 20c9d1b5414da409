"""Bulk tokenization throughput, end to end: hours of audio tokenized per hour of wall time.

Generates a corpus (``--minutes`` of audio as FLAC files of about ``--file-seconds`` each, at mixed
sample rates, some stereo) in a temporary folder, then times, on the same files:

* ``read``: reading, decoding, downmixing and resampling in the DataLoader workers, no model;
* ``encode``: the model alone on the already decoded and resampled clips (length-bucketed batches);
* ``end to end``: ``audiotok.bulk.tokenize_dataset`` (read, decode, resample, encode, write shards).

    python benchmarks/bench_tokenize.py                                 # CPU, 2 min of audio, random 44khz weights
    python benchmarks/bench_tokenize.py --minutes 60 --device cuda --dtype bf16 --num-workers 8
    python benchmarks/bench_tokenize.py --model descript/dac_44khz --format parquet
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import machine  # noqa: E402
from conftest import random_tokenizer  # noqa: E402  (weights with realistic scale)

from audiotok import AudioTokenizer  # noqa: E402
from audiotok.bulk import DTYPES, BulkConfig, InputSpec, PartReader, tokenize_dataset  # noqa: E402
from audiotok.bulk.inputs import Decoded, identity_collate  # noqa: E402
from audiotok.layers import use_fused_snake  # noqa: E402

RATES = (44100, 48000, 22050, 16000)


def make_corpus(root: Path, minutes: float, file_seconds: float, seed: int = 0) -> tuple[int, float]:
    """FLAC files (16-bit) totalling ``minutes``: lengths 0.25x..1.75x ``file_seconds``, rates
    cycling through 44.1/48/22.05/16 kHz, every third file stereo. -> (files, seconds)."""
    rng = np.random.default_rng(seed)
    total, n = 0.0, 0
    while total < minutes * 60:
        seconds = min(file_seconds * rng.uniform(0.25, 1.75), minutes * 60 - total + 0.5)
        sr, channels = RATES[n % len(RATES)], 2 if n % 3 == 2 else 1
        t = np.arange(int(seconds * sr)) / sr
        tone = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t)
        x = tone[:, None] + 0.05 * rng.standard_normal((len(t), channels))
        folder = root / f"{n // 100:03d}"
        folder.mkdir(exist_ok=True)
        sf.write(folder / f"clip{n:05d}.flac", x.astype(np.float32), sr, subtype="PCM_16")
        total += len(t) / sr
        n += 1
    return n, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model source (default: random weights of --preset)")
    p.add_argument("--preset", default="44khz")
    p.add_argument("--minutes", type=float, default=2.0, help="audio in the generated corpus")
    p.add_argument("--file-seconds", type=float, default=10.0, help="mean file duration")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--batch-seconds", type=float, help="default per device")
    p.add_argument("--format", default="webdataset", choices=["webdataset", "parquet"])
    p.add_argument("--threads", type=int, help="torch intra-op threads of the main process")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if args.model:
        tok = AudioTokenizer.from_pretrained(args.model, device, DTYPES[args.dtype], args.compile)
        name = args.model
    else:
        tok = random_tokenizer(args.preset).to(device, DTYPES[args.dtype])
        use_fused_snake(tok.model, args.compile)
        name = f"random {args.preset}"
    batch_seconds = tok.resolve_seconds(None, args.batch_seconds)[1]

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        files, seconds = make_corpus(corpus, args.minutes, args.file_seconds)
        hours = seconds / 3600
        rows = []

        # read: decode + resample in workers
        spec = InputSpec("folder", str(corpus))
        source = spec.build()
        workers = max(1, args.num_workers)
        reader = PartReader(source, {w: 0 for w in range(workers)}, 0, workers, workers, tok.sample_rate,
                            bundle_seconds=60.0)
        start = time.perf_counter()
        clips = []
        for bundle in DataLoader(reader, batch_size=None, num_workers=args.num_workers, collate_fn=identity_collate):
            clips += [x.audio[0].numpy() for x in bundle.items if isinstance(x, Decoded)]
        rows.append(("read (decode + resample)", time.perf_counter() - start))

        # encode only (one warm-up pass on a short clip first)
        tok.encode(clips[0][: tok.sample_rate], tok.sample_rate)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tok.encode(clips, tok.sample_rate, batch_seconds=batch_seconds)  # batches planned by the tokenizer
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append(("encode (model only)", time.perf_counter() - start))

        # end to end
        cfg = BulkConfig(spec, str(Path(tmp) / "out"), format=args.format, num_workers=args.num_workers,
                         batch_seconds=args.batch_seconds, progress=False)
        start = time.perf_counter()
        summary = tokenize_dataset(cfg, tokenizer=tok)
        rows.append(("end to end (tokenize_dataset)", time.perf_counter() - start))
        assert summary.records == files and summary.failures == 0, summary

    print(f"## bulk tokenization: {name} ({tok.sample_rate} Hz, {tok.n_codebooks} codebooks), {args.dtype}"
          f"{' compile' if args.compile else ''} on {args.device}")
    print(f"{machine(device)}, torch {torch.__version__}; {files} FLAC files, {seconds / 60:.1f} min of audio, "
          f"{args.num_workers} workers, batch {batch_seconds:g} s, {args.format}\n")
    print("| stage                          | wall (s) | h audio / h |  x real |")
    print("|--------------------------------|----------|-------------|---------|")
    for stage, t in rows:
        print(f"| {stage:<30} | {t:8.2f} | {hours / (t / 3600):11.1f} | {seconds / t:7.1f} |")


if __name__ == "__main__":
    main()

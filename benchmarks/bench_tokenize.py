"""Bulk tokenization throughput per stage and end to end: where the time of a bulk job goes.

Generates a corpus (``--minutes`` of audio as FLAC files of about ``--file-seconds`` each, at mixed
sample rates, some stereo) in a temporary folder, or takes the audio files of ``--folder``, then times,
on the same files, each stage alone in the main process and the whole job:

* ``read``: the files' bytes;
* ``decode``: the bytes to float32 samples (libsndfile);
* ``resample``: downmix to mono and resample to the model's rate (soxr);
* ``encode``: the model alone on the resampled clips, batches planned by the tokenizer
  (``--batch-seconds`` may list several values, ``--buckets`` both ``on`` and ``off``: each is timed,
  the first is used elsewhere);
* ``write``: the codes into code shards (``--format``);
* ``end to end``: ``audiotok.bulk.tokenize_dataset`` (reading, decoding and resampling in
  ``--num-workers`` DataLoader workers, encoding and writing in the main process), with the encoder's
  busy share of the wall time and its idle time between forward passes: what the job waits on when
  the encoder is not busy (reading and decoding, padding, writing; the shards of a pool are written
  while the next is encoded), the distinct input shapes it ran, and its rate on calls of a shape it
  had not run before (cuDNN autotuning, compiled kernels specializing) against shapes seen before.
  ``--store-latency`` makes each operation on the output (a file written, read, deleted, checked or
  listed: shards and the job's claims, progress files and done markers) wait first, like a round trip
  to an object store, and ``--part-records`` sets how many files a part (a shard
  published, a done marker) has;
* ``steady state``: the end to end job from the end of its first encoder call to the end of its last
  (start-up, the first pool and batch, and compilation left out), counting the audio of the later calls.

Rates are in hours of audio per hour of wall time (and times real time); ``share`` is each stage's part
of the stages' sum. The model is the bottleneck when ``encode`` is most of the sum and the end to end
rate is close to ``encode``'s.

    python benchmarks/bench_tokenize.py                                   # CPU, the bundled model, 2 min
    python benchmarks/bench_tokenize.py --threads 1 --num-workers 1 --batch-seconds 5 10 20
    python benchmarks/bench_tokenize.py --model descript/dac_44khz --device cuda --dtype bf16 --compile \\
        --minutes 60 --num-workers 8 --batch-seconds 600
    python benchmarks/bench_tokenize.py --preset 44khz                    # random weights, 44.1 kHz architecture
    python benchmarks/bench_tokenize.py --preset tiny-44khz --part-records 2 --store-latency 0.2  # a remote store
    python benchmarks/bench_tokenize.py --buckets off on       # shape buckets (default: per device) on and off
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import machine  # noqa: E402
from conftest import random_tokenizer  # noqa: E402  (weights with realistic scale)

from audiotok import AudioTokenizer  # noqa: E402
from audiotok.audio import AUDIO_EXTENSIONS, downmix, find_files, read_audio_bytes, resample  # noqa: E402
from audiotok.bulk import DTYPES, BulkConfig, InputSpec, default_workers, tokenize_dataset  # noqa: E402
from audiotok.formats.codedataset import SHARD_WRITERS, dataset_metadata, record_key  # noqa: E402
from audiotok.nn.layers import use_fused_snake  # noqa: E402
from audiotok.utils.store import LocalStore  # noqa: E402

RATES = (44100, 48000, 22050, 16000)


def make_corpus(root: Path, minutes: float, file_seconds: float, seed: int = 0) -> None:
    """FLAC files (16-bit) totalling ``minutes``: lengths 0.25x..1.75x ``file_seconds``, rates
    cycling through 44.1/48/22.05/16 kHz, every third file stereo."""
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


def encoder_calls(tok: AudioTokenizer, sync) -> list[tuple[float, float, int, tuple[int, ...]]]:
    """Wrap ``tok.model.encode`` to record each call's ``(start, end, samples given, input shape)``
    (device work synchronized at the end: the loop waits for the codes right after anyway); returns the
    list it fills."""
    calls: list[tuple[float, float, int, tuple[int, ...]]] = []
    encode = tok.model.encode

    def recorded(audio, *args, **kwargs):
        start = time.perf_counter()
        out = encode(audio, *args, **kwargs)
        sync()
        calls.append((start, time.perf_counter(), audio.numel(), tuple(audio.shape)))
        return out

    tok.model.encode = recorded
    return calls


def slow_store(seconds: float) -> None:
    """Make every operation of the job on its output's store (files written, read, deleted, checked,
    listed: shards, claims, progress files, done markers) wait ``seconds`` first, as an object store's
    round trip does."""
    def slowed(operation):
        def slow(self, *args):
            time.sleep(seconds)
            return operation(self, *args)
        return slow

    for name in ("exists", "list", "read_bytes", "open", "write_bytes", "put_file", "delete"):
        setattr(LocalStore, name, slowed(getattr(LocalStore, name)))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="a model source (default: the bundled model)")
    p.add_argument("--preset", help="random weights of this architecture preset instead of --model")
    p.add_argument("--folder", type=Path, help="audio files to tokenize (default: a generated corpus)")
    p.add_argument("--minutes", type=float, default=2.0, help="audio in the generated corpus")
    p.add_argument("--file-seconds", type=float, default=10.0, help="mean file duration")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--num-workers", type=int, default=default_workers(), help="default: audiotok.bulk.default_workers")
    p.add_argument("--batch-seconds", type=float, nargs="+", help="default per device")
    p.add_argument("--buckets", nargs="+", choices=["on", "off"],
                   help="pad forward passes to a few fixed shapes (AudioTokenizer.buckets; default per device)")
    p.add_argument("--format", default="webdataset", choices=["webdataset", "parquet"])
    p.add_argument("--part-records", type=int, default=1000, help="files per part of the job")
    p.add_argument("--store-latency", type=float, default=0.0,
                   help="seconds each operation on the output waits first (an object store's round trip)")
    p.add_argument("--threads", type=int, help="torch intra-op threads of the main process")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if args.preset:
        tok = random_tokenizer(args.preset).to(device, DTYPES[args.dtype])
        use_fused_snake(tok.model, args.compile)
        name = f"random {args.preset}"
    else:
        tok = AudioTokenizer.from_pretrained(args.model, device, DTYPES[args.dtype], args.compile)
        name = tok.model_id
    batches = args.batch_seconds or [tok.resolve_seconds()[1]]
    buckets = [b == "on" for b in args.buckets] if args.buckets else [tok.bucketed]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.folder
        if corpus is None:
            corpus = Path(tmp) / "corpus"
            corpus.mkdir()
            make_corpus(corpus, args.minutes, args.file_seconds)
        files = find_files(corpus, AUDIO_EXTENSIONS)
        rows: list[tuple[str, float]] = []

        data, t = timed(lambda: [f.read_bytes() for f in files])
        rows.append(("read", t))
        decoded, t = timed(lambda: [read_audio_bytes(d) for d in data])
        rows.append(("decode", t))
        clips, t = timed(lambda: [resample(downmix(a), sr, tok.sample_rate)[0] for a, sr in decoded])
        rows.append(("resample (+ downmix)", t))
        seconds = sum(len(c) for c in clips) / tok.sample_rate
        hours = seconds / 3600

        tok.encode(clips[0][: tok.sample_rate], tok.sample_rate)  # warm-up
        encode_rows = []
        for b in batches:
            for bucketed in reversed(buckets):  # the first setting last: the one the job runs with
                def encode(b=b):
                    enc = tok.encode(clips, tok.sample_rate, batch_seconds=b, chunk_seconds=min(b, 60.0))
                    sync()
                    return enc
                tok.buckets = bucketed
                enc, t = timed(encode)
                encode_rows.append((f"encode, batch {b:g} s{', buckets' if bucketed else ''}", t))
        encode_rows[:len(buckets)] = encode_rows[len(buckets) - 1::-1]
        rows.append(encode_rows[0])
        tok.buckets = buckets[0]

        metadata = dataset_metadata(tok.identity, tok.config, tok.n_codebooks, True)

        def write() -> None:
            codes = enc.codes.numpy().astype(np.uint16)
            shard = SHARD_WRITERS[args.format]
            with shard(Path(tmp) / f"shard{shard.suffix}", metadata) as writer:
                for i, f in enumerate(files):
                    n = int(enc.lengths[i])
                    meta = {"key": record_key(f.stem, 0, i), "source_key": f.name, "num_samples": len(clips[i]),
                            "sample_rate": tok.sample_rate, "n_frames": n, "channels": 1, "model_id": tok.model_id}
                    writer.add(meta, codes[i, :, :n])

        _, t = timed(write)
        rows.append(("write", t))
        stages = sum(t for _, t in rows)

        cfg = BulkConfig(InputSpec("folder", str(corpus)), str(Path(tmp) / "out"), format=args.format,
                         num_workers=args.num_workers, batch_seconds=batches[0], part_records=args.part_records,
                         progress=False)
        if args.store_latency:
            slow_store(args.store_latency)
        calls = encoder_calls(tok, sync)
        summary, end_to_end = timed(lambda: tokenize_dataset(cfg, tokenizer=tok))
        assert summary.records == len(files) and summary.failures == 0, summary
        del tok.model.encode
        gaps = np.array([b[0] - a[1] for a, b in zip(calls, calls[1:])] or [0.0])
        busy = sum(end - start for start, end, *_ in calls)
        new: dict[tuple[int, ...], tuple[float, int]] = {}  # each shape's first call: (seconds, samples)
        for start, end, samples, shape in calls:
            new.setdefault(shape, (end - start, samples))
        seen = [(end - start, samples) for start, end, samples, _ in calls]
        seen_time, seen_samples = (sum(x) for x in zip(*seen)) if seen else (0.0, 0)
        new_time, new_samples = (sum(x) for x in zip(*new.values())) if new else (0.0, 0)
        seen_time, seen_samples = seen_time - new_time, seen_samples - new_samples

    print(f"## bulk tokenization: {name} ({tok.sample_rate} Hz, {tok.n_codebooks} codebooks), {args.dtype}"
          f"{' compile' if args.compile else ''} on {args.device}, shape buckets {'on' if buckets[0] else 'off'}")
    print(f"{machine(device)}, torch {torch.__version__}; {len(files)} files, {seconds / 60:.1f} min of audio, "
          f"{args.num_workers} DataLoader workers, {args.format}, {args.part_records} files per part, "
          f"store latency {args.store_latency:g} s\n")
    print("| stage                          | wall (s) | h audio / h |  x real | share |")
    print("|--------------------------------|----------|-------------|---------|-------|")
    for stage, t in rows:
        print(f"| {stage:<30} | {t:8.2f} | {hours / (t / 3600):11.1f} | {seconds / t:7.1f} | {t / stages:5.0%} |")
    for stage, t in encode_rows[1:]:
        print(f"| {stage:<30} | {t:8.2f} | {hours / (t / 3600):11.1f} | {seconds / t:7.1f} |       |")
    print(f"| {'end to end (tokenize_dataset)':<30} | {end_to_end:8.2f} | {hours / (end_to_end / 3600):11.1f} | "
          f"{seconds / end_to_end:7.1f} |       |")
    print(f"\nend to end: {len(calls)} encoder calls, busy {busy / end_to_end:.0%} of the wall time; encoder idle "
          f"between calls: median {1e3 * np.median(gaps):.1f} ms, mean {1e3 * gaps.mean():.1f} ms, max "
          f"{1e3 * gaps.max():.1f} ms ({gaps.sum():.2f} s in all; the rest of the wall time is before the first call, "
          f"reading the first pool, and after the last, writing)")
    rate = tok.sample_rate
    print(f"end to end: {len(new)} distinct encoder input shapes in {len(calls)} calls; calls of a new shape "
          f"{new_samples / rate / max(new_time, 1e-9):.1f}x real time ({new_time:.2f} s), of a shape seen before "
          f"{seen_samples / rate / max(seen_time, 1e-9):.1f}x ({seen_time:.2f} s)")
    if len(calls) > 1:  # the audio after the first call, over the time from its end to the last call's end
        steady = (1 - calls[0][2] / sum(c[2] for c in calls)) * seconds / (calls[-1][1] - calls[0][1])
        print(f"steady state (from the end of the first encoder call to the end of the last): {steady:.1f}x real "
              f"time, {steady:.1f} h of audio per hour")


if __name__ == "__main__":
    main()

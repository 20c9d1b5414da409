"""Running a bulk tokenization job: progress files, the encode loop, per-rank indexes, the manifest."""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..codedataset import MANIFEST_NAME, SHARD_WRITERS, ShardWriter, dataset_metadata, manifest_header, record_key
from ..codes import check_n_quantizers, check_uint16
from ..data.sources import DecodeError, SkipCounter, WebDatasetSource
from ..distributed import DistEnv, init_process_group, rank_device, shutdown
from ..io import read_json, write_json_atomic
from ..segments import make_batches, plan_segments
from ..tokenizer import DTYPES, AudioTokenizer
from .inputs import Decoded, Failure, InputSpec, PartReader, identity_collate, source_fingerprint

logger = logging.getLogger("audiotok.bulk")

#: Folder (inside the output) for per-part progress and per-rank index files.
STATE_DIR = ".bulk"
FORMATS = tuple(SHARD_WRITERS)


@dataclass
class BulkConfig:
    """Settings of a bulk job (the ``recipes/tokenize_dataset.py`` options).

    Attributes:
        input: what to read.
        output: output folder (shared by all ranks; on several nodes, a shared filesystem).
        model: anything :meth:`AudioTokenizer.from_pretrained` loads (default: the bundled model;
            ignored when a tokenizer is passed).
        format: ``webdataset`` (tar shards) or ``parquet``.
        n_quantizers: codebooks stored (default: all of the model's).
        mono: downmix to mono (codes ``[K, F]``); ``False`` codes each channel (``[C, K, F]``).
        batch_seconds: most audio, padding included, per forward pass (default per device).
        chunk_seconds: longest audio per forward pass; longer files are chunked exactly (default per device).
        pool_seconds: audio collected before sorting by length into batches (default ``max(4 * batch, 120)``).
        num_workers: DataLoader workers per rank for reading, decoding and resampling (0: in process).
        shard_records, shard_frames: a shard is closed at this many records or code frames.
        min_seconds: records shorter than this are skipped as ``short``.
        dtype: ``fp32`` (exact), ``bf16`` or ``fp16``.
        device: ``cpu``, ``cuda`` (``cuda:LOCAL_RANK`` under torchrun) ... (default: cuda when available).
        compile: fuse Snake activations with ``torch.compile``.
        progress: show a progress bar (rank 0).
    """

    input: InputSpec
    output: str
    model: str | None = None
    format: str = "webdataset"
    n_quantizers: int | None = None
    mono: bool = True
    batch_seconds: float | None = None
    chunk_seconds: float | None = None
    pool_seconds: float | None = None
    num_workers: int = 2
    shard_records: int = 10000
    shard_frames: int = 20_000_000
    min_seconds: float = 0.0
    dtype: str = "fp32"
    device: str | None = None
    compile: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.num_workers < 0 or self.shard_records < 1 or self.shard_frames < 1:
            raise ValueError("num_workers must be >= 0, shard_records and shard_frames >= 1")
        for name in ("batch_seconds", "chunk_seconds", "pool_seconds"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")


@dataclass
class BulkSummary:
    """What a job holds (``records``, ``audio_hours``, ``failures``, ``shards``: the whole output on
    rank 0, this rank's parts elsewhere) and what this run did (``run_*``, over all ranks on rank 0)."""

    output: str
    records: int
    audio_hours: float
    failures: int
    shards: int
    run_records: int
    run_audio_hours: float
    run_failures: int
    seconds: float
    world_size: int = 1
    failure_reasons: dict[str, int] | None = None

    @property
    def throughput(self) -> float:
        """Hours of audio tokenized per hour of wall time in this run."""
        return self.run_audio_hours / (self.seconds / 3600) if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted((self.failure_reasons or {}).items()))
        lines = [
            f"{self.output}: {self.records} records, {self.audio_hours:.4f} h of audio in {self.shards} shards; "
            f"{self.failures} failures" + (f" ({reasons})" if reasons else ""),
        ]
        if self.run_records or self.run_failures:
            lines.append(
                f"this run: {self.run_records} records, {self.run_audio_hours:.4f} h, {self.run_failures} failures "
                f"in {self.seconds:.1f} s on {self.world_size} process{'es' if self.world_size > 1 else ''}: "
                f"{self.throughput:.1f} h of audio per hour"
            )
        else:
            lines.append("this run: nothing to do (every record was already tokenized)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Per-part progress


def shard_name(part: int, workers_per_rank: int, index: int, suffix: str) -> str:
    rank, worker = divmod(part, workers_per_rank)
    return f"shard-r{rank:03d}-w{worker:02d}-{index:05d}{suffix}"


class PartProgress:
    """``.bulk/part-NNNNN.json``: the completed shards of a part, its committed failures and the
    stream position they cover (every position below ``position`` is in a shard or a failure).

    Loading it removes the part's leftovers of an interrupted run: temporary files, and shards
    written but not yet recorded here (they are written again).
    """

    def __init__(self, out: Path, part: int, job: dict[str, Any], listing: list[str] | None = None):
        self.out, self.part = out, part
        self.workers_per_rank = job["workers_per_rank"]
        self.path = out / STATE_DIR / f"part-{part:05d}.json"
        if self.path.exists():
            data = read_json(self.path)
            if data.get("job") != job:
                old = data.get("job") or {}
                diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
                raise ValueError(
                    f"{out} holds a job with other settings ({', '.join(diff)}: {[old.get(k) for k in diff]} "
                    f"now {[job.get(k) for k in diff]}); resume with the same command, world size and "
                    f"--num-workers, or write to a new --output"
                )
        else:
            data = {"part": part, "job": job, "position": 0, "done": False, "shards": [], "failures": []}
            write_json_atomic(self.path, data)
        self.data = data
        self._clean(os.listdir(out) if listing is None else listing)

    def _clean(self, listing: list[str]) -> None:
        rank, worker = divmod(self.part, self.workers_per_rank)
        prefix = f"shard-r{rank:03d}-w{worker:02d}-"
        keep = {s["path"] for s in self.shards}
        for name in keep:
            if not (self.out / name).is_file():
                raise FileNotFoundError(f"{self.out / name} is recorded in {self.path} but missing")
        for name in listing:
            stale = name.startswith(prefix) and name not in keep
            temp = name.startswith("." + prefix) and name.endswith(".tmp")
            if stale or temp:
                logger.info("removing %s left by an interrupted run", self.out / name)
                (self.out / name).unlink(missing_ok=True)

    @property
    def position(self) -> int:
        return self.data["position"]

    @property
    def done(self) -> bool:
        return self.data["done"]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.data["shards"]

    def commit(self, shard: dict[str, Any] | None, failures: list[dict[str, Any]], position: int, done: bool) -> None:
        if shard is not None:
            self.data["shards"].append(shard)
        self.data["failures"].extend(failures)
        self.data["position"], self.data["done"] = position, done
        write_json_atomic(self.path, self.data)


class PartWriter:
    """Writes the results of one part, in position order, to its shards; commits a shard (file
    moved into place, then progress updated) when it reaches ``shard_records`` or ``shard_frames``."""

    def __init__(self, progress: PartProgress, fmt: str, shard_records: int, shard_frames: int,
                 metadata: dict[str, Any], kept_fields: tuple[str, ...] = ()):
        self.progress, self.fmt, self.metadata, self.kept_fields = progress, fmt, metadata, kept_fields
        self.shard_records, self.shard_frames = shard_records, shard_frames
        self.position = progress.position
        self.shard: ShardWriter | None = None
        self.shard_start = self.position
        self.failures: list[dict[str, Any]] = []

    def _advance(self, position: int) -> None:
        if position != self.position:
            raise RuntimeError(f"part {self.progress.part}: got position {position}, expected {self.position}")
        self.position += 1

    def add_failure(self, failure: Failure) -> None:
        self._advance(failure.position)
        self.failures.append({**failure.to_dict(), "position": failure.position})

    def add_record(self, position: int, meta: dict[str, Any], codes: np.ndarray) -> None:
        self._advance(position)
        if self.shard is None:
            name = shard_name(self.progress.part, self.progress.workers_per_rank, len(self.progress.shards),
                              SHARD_WRITERS[self.fmt].suffix)
            self.shard = SHARD_WRITERS[self.fmt](self.progress.out / name, self.metadata, self.kept_fields)
            self.shard_start = self.progress.position
        self.shard.add(meta, codes)
        if self.shard.records >= self.shard_records or self.shard.frames >= self.shard_frames:
            self.commit()

    def commit(self, done: bool = False) -> None:
        entry = None
        if self.shard is not None:
            self.shard.close()
            entry = {"path": self.shard.path.name, "records": self.shard.records, "frames": self.shard.frames,
                     "seconds": self.shard.seconds, "start": self.shard_start, "end": self.position}
        if entry is not None or self.failures or done:
            self.progress.commit(entry, self.failures, self.position, done)
        self.shard, self.failures = None, []

    def finish(self, end: int) -> None:
        if end != self.position:
            raise RuntimeError(f"part {self.progress.part} ended at {end} but {self.position} positions were written")
        self.commit(done=True)

    def abort(self) -> None:
        if self.shard is not None:
            self.shard.abort()
            self.shard = None


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_items(tokenizer: AudioTokenizer, items: list[Decoded], n_quantizers: int, batch_seconds: float,
                 chunk_seconds: float | None, mono: bool = True) -> list[np.ndarray | Failure]:
    """Codes (uint16 ``[K, F]`` when ``mono``, else ``[C, K, F]``) or a :class:`Failure` per item.

    Every channel is coded as a clip of its own (what ``encode(..., mono=False)`` does); clips are
    grouped by the tokenizer's own batch planner (:func:`audiotok.segments.make_batches` under
    :meth:`AudioTokenizer.frame_budgets`), so ``encode`` runs each group as the batch it plans,
    exact padded (and chunked) encoding included. A group is the unit of retry: one that fails is retried
    clip by clip; a clip that still fails makes its item a ``Failure("encode")``. If every clip of
    eight or more fails, the error is systematic (device, model) and is raised instead.
    """
    clips = [(i, c) for i, item in enumerate(items) for c in range(item.audio.shape[0])]
    frames = [tokenizer.num_frames(items[i].audio.shape[-1]) for i, _ in clips]
    codes: dict[tuple[int, int], np.ndarray] = {}
    errors: dict[int, str] = {}
    first_error: Exception | None = None
    max_frames = tokenizer.frame_budgets(chunk_seconds, batch_seconds)[1]

    def run(group: list[int]) -> None:
        audio = [items[clips[j][0]].audio[clips[j][1]].numpy() for j in group]
        enc = tokenizer.encode(audio, tokenizer.sample_rate, n_quantizers, chunk_seconds=chunk_seconds,
                               batch_seconds=batch_seconds)
        out = enc.codes.numpy()
        for b, j in enumerate(group):
            codes[clips[j]] = out[b, :, : int(enc.lengths[b])].astype(np.uint16)

    for batch in make_batches(plan_segments(frames, None, (0, 0)), max_frames):
        group = [segment.item for segment in batch]
        try:
            run(group)
            continue
        except Exception as e:  # noqa: BLE001 - out of memory, odd inputs: retry clip by clip
            first_error = first_error or e
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            if len(group) == 1:
                errors.setdefault(clips[group[0]][0], f"{type(e).__name__}: {e}")
                continue
        for j in group:
            try:
                run([j])
            except Exception as e:  # noqa: BLE001
                errors.setdefault(clips[j][0], f"{type(e).__name__}: {e}")
    if first_error is not None and len(clips) >= 8 and not codes:
        raise RuntimeError(f"encoding failed for all {len(clips)} clips of a pool") from first_error
    results: list[np.ndarray | Failure] = []
    for i, item in enumerate(items):
        if i in errors:
            results.append(Failure(item.part, item.position, item.key, "encode", errors[i]))
        elif mono:
            results.append(codes[(i, 0)])
        else:
            results.append(np.stack([codes[(i, c)] for c in range(item.audio.shape[0])]))
    return results


# ---------------------------------------------------------------------------------------------
# The job


def _rank_index(rank: int, world_size: int, num_parts: int, job: dict[str, Any],
                parts: Iterable[PartProgress]) -> dict[str, Any]:
    parts = list(parts)
    shards = [s for p in parts for s in p.shards]
    return {
        "rank": rank, "world_size": world_size, "num_parts": num_parts, "job": job,
        "parts": [p.part for p in parts], "done": all(p.done for p in parts),
        "records": sum(s["records"] for s in shards), "frames": sum(s["frames"] for s in shards),
        "seconds": sum(s["seconds"] for s in shards),
        "shards": [{"path": s["path"], "records": s["records"], "frames": s["frames"]} for s in shards],
        "failures": [{k: f[k] for k in ("key", "reason", "detail")} for p in parts for f in p.data["failures"]],
    }


def _write_if_changed(path: Path, obj: dict[str, Any], ignore: tuple[str, ...] = ()) -> bool:
    if path.exists():
        try:
            old = read_json(path)
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and {k: v for k, v in old.items() if k not in ignore} == {
            k: v for k, v in obj.items() if k not in ignore
        }:
            return False
    write_json_atomic(path, obj)
    return True


def build_manifest(out: Path, world_size: int, tokenizer: AudioTokenizer, spec: InputSpec, n_quantizers: int,
                   mono: bool) -> dict[str, Any]:
    """Merge the per-rank indexes into the manifest (``created`` left out)."""
    indexes = []
    for r in range(world_size):
        path = out / STATE_DIR / f"rank-{r:03d}.json"
        if not path.exists():
            raise RuntimeError(f"{path} is missing: rank {r} has not finished")
        index = read_json(path)
        if not index["done"]:
            raise RuntimeError(f"{path}: rank {r} has not finished")
        indexes.append(index)
    return {
        **manifest_header(tokenizer.model_id, tokenizer.config),
        "shards": [s for ix in indexes for s in ix["shards"]],
        "records": sum(ix["records"] for ix in indexes),
        "audio_hours": sum(ix["seconds"] for ix in indexes) / 3600,
        "failures": [f for ix in indexes for f in ix["failures"]],
        "input": spec.to_dict(),
        "n_quantizers": n_quantizers,
        "mono": mono,
        "metadata": list(spec.keep),
    }


def _progress_bar(enabled: bool):
    """Hours of source audio tokenized and the rate in hours of audio per second."""
    from tqdm.auto import tqdm

    return tqdm(total=None, unit="h", desc="tokenize", disable=not enabled, dynamic_ncols=True,
                bar_format="{desc}: {n:.4f} h of audio [{elapsed}{postfix}]")


def tokenize_dataset(config: BulkConfig, tokenizer: AudioTokenizer | None = None) -> BulkSummary:
    """Tokenize ``config.input`` into ``config.output`` (see :mod:`audiotok.bulk`).

    Under ``torchrun`` each rank processes its parts; rank 0 writes the manifest once every rank
    has finished. Running the same command again resumes an interrupted job, or does nothing for a
    finished one. Returns a :class:`BulkSummary`.
    """
    t0 = time.perf_counter()
    env = DistEnv.from_environ()
    # gloo: only barriers and small gathers; a long timeout, since ranks wait at the final barrier
    # for the slowest one
    own_group = init_process_group(env, "gloo", timeout=datetime.timedelta(days=7))
    try:
        return _run(config, tokenizer, env, t0)
    finally:
        if own_group:
            shutdown()


def _run(config: BulkConfig, tokenizer: AudioTokenizer | None, env: DistEnv, t0: float) -> BulkSummary:
    if tokenizer is None:
        device = rank_device(config.device, env.local_rank)
        tokenizer = AudioTokenizer.from_pretrained(config.model, device, DTYPES[config.dtype], config.compile)
    check_uint16(tokenizer.codebook_size)
    k = check_n_quantizers(config.n_quantizers, tokenizer.n_codebooks)
    chunk_seconds, batch_seconds = tokenizer.resolve_seconds(config.chunk_seconds, config.batch_seconds)
    pool_seconds = config.pool_seconds or max(4 * batch_seconds, 120.0)

    source = config.input.build()
    workers = max(1, config.num_workers)
    num_parts = env.world_size * workers
    if isinstance(source, WebDatasetSource) and len(source.shards) < num_parts and env.rank == 0:
        logger.warning("%d tar shards for %d parts (ranks x workers): every part reads every shard and keeps "
                       "1/%d of the samples; use at least as many shards as parts", len(source.shards),
                       num_parts, num_parts)
    job = {
        "format": config.format, "model_id": tokenizer.model_id, "config_hash": tokenizer.config.architecture_hash(),
        "n_quantizers": k, "mono": config.mono, "dtype": str(tokenizer.dtype).replace("torch.", ""),
        "min_seconds": config.min_seconds, "input": config.input.to_dict(), "source": source_fingerprint(source),
        "world_size": env.world_size, "workers_per_rank": workers, "num_parts": num_parts,
    }
    out = Path(config.output)
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    listing = os.listdir(out)
    parts = [PartProgress(out, env.rank * workers + w, job, listing) for w in range(workers)]
    todo = {p.part: p.position for p in parts if not p.done}

    stats = {"records": 0, "seconds": 0.0, "failures": 0}
    reasons = SkipCounter(f"tokenize rank {env.rank}")
    if todo:
        logger.info("rank %d: parts %s of %d, resuming at positions %s", env.rank, sorted(todo), num_parts, todo)
        _encode_parts(config, tokenizer, source, env, parts, todo, workers, num_parts, k, batch_seconds,
                      chunk_seconds, pool_seconds, stats, reasons)

    index = _rank_index(env.rank, env.world_size, num_parts, job, parts)
    _write_if_changed(out / STATE_DIR / f"rank-{env.rank:03d}.json", index)
    run_stats: list[Any] = [stats]
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        run_stats = [None] * env.world_size
        dist.all_gather_object(run_stats, stats)
    seconds = time.perf_counter() - t0
    run_records = int(sum(s["records"] for s in run_stats))
    run_hours = sum(s["seconds"] for s in run_stats) / 3600
    run_failures = int(sum(s["failures"] for s in run_stats))
    if env.rank == 0:
        manifest = build_manifest(out, env.world_size, tokenizer, config.input, k, config.mono)
        manifest["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        _write_if_changed(out / MANIFEST_NAME, manifest, ignore=("created",))
        counts: dict[str, int] = {}
        for f in manifest["failures"]:
            counts[f["reason"]] = counts.get(f["reason"], 0) + 1
        return BulkSummary(str(out), manifest["records"], manifest["audio_hours"], len(manifest["failures"]),
                           len(manifest["shards"]), run_records, run_hours, run_failures, seconds,
                           env.world_size, counts)
    return BulkSummary(str(out), index["records"], index["seconds"] / 3600, len(index["failures"]),
                       len(index["shards"]), run_records, run_hours, run_failures, seconds, env.world_size,
                       dict(reasons.counts))


def _encode_parts(config: BulkConfig, tokenizer: AudioTokenizer, source, env: DistEnv, parts: list[PartProgress],
                  todo: dict[int, int], workers: int, num_parts: int, k: int, batch_seconds: float,
                  chunk_seconds: float | None, pool_seconds: float, stats: dict[str, Any],
                  reasons: SkipCounter) -> None:
    reader = PartReader(source, todo, env.rank, workers, num_parts, tokenizer.sample_rate, config.mono,
                        config.min_seconds, bundle_seconds=pool_seconds / (2 * workers))
    loader = DataLoader(reader, batch_size=None, num_workers=config.num_workers, collate_fn=identity_collate,
                        in_order=False, prefetch_factor=2 if config.num_workers else None)
    metadata = dataset_metadata(tokenizer.model_id, tokenizer.config, k, config.mono)
    writers = {p.part: PartWriter(p, config.format, config.shard_records, config.shard_frames, metadata,
                                  tuple(config.input.keep))
               for p in parts if p.part in todo}
    remaining = None
    if source.random_access:
        remaining = sum(len(range(p, len(source), num_parts)) - start for p, start in todo.items())
    bar = _progress_bar(config.progress and env.rank == 0)
    started = time.perf_counter()
    pool: list[Decoded | Failure] = []
    pool_samples = 0
    ends: dict[int, int] = {}

    def flush() -> None:
        nonlocal pool, pool_samples
        decoded = [x for x in pool if isinstance(x, Decoded)]
        results = encode_items(tokenizer, decoded, k, batch_seconds, chunk_seconds, config.mono) if decoded else []
        by_item = {id(x): r for x, r in zip(decoded, results)}
        hours = 0.0
        for item in sorted(pool, key=lambda x: (x.part, x.position)):
            result = by_item[id(item)] if isinstance(item, Decoded) else item
            writer = writers[item.part]
            if isinstance(result, Failure):
                writer.add_failure(result)
                reasons.add(DecodeError(result.key, result.reason, result.detail))
                stats["failures"] += 1
                continue
            assert isinstance(item, Decoded)  # a Failure item is its own result
            meta = {
                "key": record_key(item.key, item.part, item.position), "source_key": item.key,
                "num_samples": item.num_samples, "sample_rate": item.sample_rate,
                "n_frames": int(result.shape[-1]), "channels": item.channels, "model_id": tokenizer.model_id,
                "metadata": item.metadata,
            }
            writer.add_record(item.position, meta, result)
            stats["records"] += 1
            stats["seconds"] += item.seconds
            hours += item.seconds / 3600
        for part, end in ends.items():
            writers[part].finish(end)
        pool, pool_samples = [], 0
        ends.clear()
        rate = stats["seconds"] / 3600 / max(time.perf_counter() - started, 1e-9)
        postfix = (f"{rate:.3g} h/s ({rate * 3600:.3g}x real time), {stats['records']} records, "
                   f"{stats['failures']} failed")
        if remaining is not None:
            postfix += f", {stats['records'] + stats['failures']}/{remaining} items"
        bar.set_postfix_str(postfix, refresh=False)
        bar.update(hours)

    try:
        for bundle in loader:
            pool.extend(bundle.items)
            pool_samples += sum(x.audio.numel() for x in bundle.items if isinstance(x, Decoded))
            if bundle.end is not None:
                ends[bundle.part] = bundle.end
            if pool_samples >= pool_seconds * tokenizer.sample_rate or ends:
                flush()
        flush()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()

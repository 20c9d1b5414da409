"""Running a bulk tokenization job: the plan, the encode loop over claimed parts, the manifest (claims:
:mod:`audiotok.bulk.claims`; a part's shards, progress and done marker: :mod:`audiotok.bulk.writer`)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import re
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from ..codedataset import (
    PART_SHARD,
    SHARD_WRITERS,
    Manifest,
    ShardEntry,
    dataset_metadata,
    record_key,
    sidecar_name,
)
from ..codes import check_n_quantizers, check_uint16
from ..data.sources import AudioSource, DecodeError, SkipCounter
from ..distributed import DistEnv, init_process_group, rank_device, shutdown
from ..prefetch import prefetch
from ..segments import make_batches, plan_segments
from ..store import Store, open_store
from ..tokenizer import DTYPES, AudioTokenizer, EncodePlan
from ..untrusted import check_number
from ..workers import worker_init
from .claims import STATE_DIR, Claims, Scheduler, default_owner, state_path
from .inputs import Bundle, Decoded, Failure, InputSpec, PartReader, identity_collate, source_fingerprint
from .writer import DONE_SHAPE, PartWriter

logger = logging.getLogger("audiotok.bulk")

PLAN_NAME = f"{STATE_DIR}/plan.json"
#: ``.bulk/plan.json``: the job's settings and the input's parts (compared whole with a new job's).
PLAN_SHAPE = {"job": dict, "parts": list}
FORMATS = tuple(SHARD_WRITERS)
#: ``pooled``: a part's records in shards of ``shard_records``; ``sidecar``: one code shard per input
#: WebDataset shard, sample for sample.
LAYOUTS = ("pooled", "sidecar")
#: ``torch``: processes launched by hand or by torchrun, decoding in DataLoader workers; ``ray``: a
#: Ray cluster's actors and tasks (:mod:`audiotok.bulk.ray_engine`). The output is the same.
ENGINES = ("torch", "ray")


def default_workers() -> int:
    """Reading workers per process by default: the cores this process may use, shared among the job's
    processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``), less one for the process's own
    encoding and writing; at least 1, at most 16. Decoding and resampling run about 1,000 h of
    audio per hour on one core (benchmarks/README.md), so a GPU encoding several thousand needs
    several cores feeding it; beyond 16 the bundles held ahead only cost memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(16, cores // local - 1))


@dataclass
class BulkConfig:
    """Settings of a bulk job (the ``recipes/tokenize_dataset.py`` options).

    Attributes:
        input: what to read.
        output: output folder (shared by all processes; on several nodes, a shared filesystem), or an
            fsspec URL such as ``s3://bucket/codes`` (:func:`audiotok.store.open_store`).
        model: anything :meth:`AudioTokenizer.from_pretrained` loads (default: the bundled model;
            ignored when a tokenizer is passed).
        format: ``webdataset`` (tar shards) or ``parquet``.
        layout: ``pooled`` (shards ``part-{part}-{n}``) or ``sidecar`` (WebDataset input and format
            only: ``NAME.tar`` -> ``NAME.codes.tar`` with the input's sample keys; see :mod:`audiotok.bulk`).
        n_quantizers: codebooks stored (default: all of the model's).
        mono: downmix to mono (codes ``[K, F]``); ``False`` codes each channel (``[C, K, F]``).
        batch_seconds: most audio, padding included, per forward pass (default per device).
        chunk_seconds: longest audio per forward pass; longer files are chunked exactly (default per device).
        pool_seconds: audio collected before sorting by length into batches (default ``max(4 * batch, 120)``).
        num_workers: DataLoader workers per process for reading, decoding and resampling (0: in process;
            default :func:`default_workers`).
        part_records: rows per part of a random-access input (folder, saved Hugging Face dataset);
            part of the job's plan.
        shard_records, shard_frames: a shard is closed at this many records or code frames (pooled).
        min_seconds: records shorter than this are skipped as ``short``.
        dtype: ``fp32`` (exact), ``bf16`` or ``fp16``.
        device: ``cpu``, ``cuda`` (``cuda:LOCAL_RANK`` under torchrun) ... (default: cuda when available).
        compile: fuse Snake activations with ``torch.compile``.
        progress: show a progress bar (rank 0).
        lease_seconds: a claim on a part lapses this long after its last renewal (renewed every
            quarter of it while the part is worked on); then another process takes the part over.
        owner: this process's claim owner id (default ``{host}/{pid}/{random}``).
        storage_options: options of the fsspec filesystem of an ``output`` URL (credentials,
            ``endpoint_url``; see :mod:`audiotok.urls`); not written anywhere.
        engine: ``torch`` (this process, one of any number working on the job) or ``ray`` (this
            process drives actors on a Ray cluster; see :mod:`audiotok.bulk.ray_engine`).
        ray_actors: encoding actors (ray; default: one per GPU of the cluster with a CUDA
            ``device``, else half its CPUs); ``num_workers`` is then the read tasks per actor.
        ray_address: the Ray cluster to join (``auto``, ``ray://host:10001``; default: the one
            ``RAY_ADDRESS`` or a local ``ray start`` names, else a local instance started for the job).
    """

    input: InputSpec
    output: str
    model: str | None = None
    format: str = "webdataset"
    layout: str = "pooled"
    n_quantizers: int | None = None
    mono: bool = True
    batch_seconds: float | None = None
    chunk_seconds: float | None = None
    pool_seconds: float | None = None
    num_workers: int = field(default_factory=lambda: default_workers())
    part_records: int = 1000
    shard_records: int = 10000
    shard_frames: int = 20_000_000
    min_seconds: float = 0.0
    dtype: str = "fp32"
    device: str | None = None
    compile: bool = False
    progress: bool = True
    lease_seconds: float = 600.0
    owner: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    engine: str = "torch"
    ray_actors: int | None = None
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.ray_actors is not None and self.ray_actors < 1:
            raise ValueError(f"ray_actors must be >= 1, got {self.ray_actors}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "sidecar" and (self.input.type != "webdataset" or self.format != "webdataset"):
            raise ValueError(f"the sidecar layout needs webdataset input and format, got {self.input.type} "
                             f"input and {self.format} format")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        check_number(self.num_workers, "num_workers", minimum=0, integer=True)
        for name in ("part_records", "shard_records", "shard_frames"):
            check_number(getattr(self, name), name, minimum=1, integer=True)
        for name in ("batch_seconds", "chunk_seconds", "pool_seconds", "lease_seconds"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), name, above=0)
        check_number(self.min_seconds, "min_seconds", minimum=0)


@dataclass
class BulkSummary:
    """What the output holds (``records``, ``audio_hours``, ``failures``, ``shards``, from the
    manifest) and what this run did (``run_*``, over all ranks under torchrun, else this process)."""

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
# The plan and shard names


def load_plan(store: Store, plan: dict[str, Any]) -> None:
    """Write ``plan`` to ``.bulk/plan.json``, or check that the one there is the same: a job resumes
    only on the input it was planned for (``ValueError`` naming what changed). A plan written before
    the input's ``listing`` was recorded is checked without it."""
    if store.exists(PLAN_NAME):
        old = store.read_json(PLAN_NAME, PLAN_SHAPE)
        then, now = (old.get("job") or {}).get("source"), plan["job"]["source"]
        if isinstance(then, dict) and "listing" not in then:
            now = {k: v for k, v in now.items() if k != "listing"}
            plan = {**plan, "job": {**plan["job"], "source": now}}
        if isinstance(then, dict) and then.get("listing", now.get("listing")) != now.get("listing"):
            raise ValueError(
                f"{store.url} holds a job planned on another listing of the input {plan['job']['input']['path']!r} "
                f"({then.get('size')} files then, {now.get('size')} now; files were renamed, added or removed): "
                f"resuming would encode some files twice and miss others. Restore the input, or write to a new "
                f"--output")
        if old != plan:
            a, b = old.get("job") or {}, plan["job"]
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) or ["parts"]
            raise ValueError(
                f"{store.url} holds a job with other settings ({', '.join(diff)}: {[a.get(k) for k in diff]} "
                f"now {[b.get(k) for k in diff]}); resume with the same settings, or write to a new --output")
    else:
        if any(re.fullmatch(rf"{re.escape(STATE_DIR)}/(part|rank)-\d+\.json", n) for n in store.list(STATE_DIR)):
            raise ValueError(f"{store.url} holds a job of an earlier audiotok version, which this one cannot "
                             "resume: write to a new --output")
        store.write_json(PLAN_NAME, plan)  # every process computes the same plan: racing writes agree


# ---------------------------------------------------------------------------------------------
# Encoding


#: The tokenizer's warning for audio beyond [-1, 1] (``audiotok.audio``): a bulk job counts such
#: records and logs the count once instead (resampling makes full-scale recordings peak slightly above 1).
LOUD_WARNING = r"clip \d+ has peak amplitude"


def encode_items(tokenizer: AudioTokenizer, items: list[Decoded], n_quantizers: int, batch_seconds: float,
                 chunk_seconds: float | None, mono: bool = True) -> list[np.ndarray | Failure]:
    """Codes (uint16 ``[K, F]`` when ``mono``, else ``[C, K, F]``) or a :class:`Failure` per item.

    Every channel is coded as a clip of its own (what ``encode(..., mono=False)`` does); clips are
    grouped by the tokenizer's own batch planner (:func:`audiotok.segments.make_batches` under
    :meth:`AudioTokenizer.frame_budgets`), so ``encode`` runs each group as the batch it plans,
    exact padded (and chunked) encoding included. The next group is planned and padded (in pinned
    memory on CUDA) in a background thread while the model runs the current one
    (:meth:`AudioTokenizer.plan_encode`, :func:`audiotok.prefetch.prefetch`); reading, decoding and
    resampling run in the job's readers. A group is the unit of retry: one that fails is retried
    clip by clip; a clip that still fails makes its item a ``Failure("encode")``. If every clip of
    eight or more fails, the error is systematic (device, model) and is raised instead.
    """
    clips = [(i, c) for i, item in enumerate(items) for c in range(item.audio.shape[0])]
    frames = [tokenizer.num_frames(items[i].audio.shape[-1]) for i, _ in clips]
    codes: dict[tuple[int, int], np.ndarray] = {}
    errors: dict[int, str] = {}
    first_error: Exception | None = None
    max_frames = tokenizer.frame_budgets(chunk_seconds, batch_seconds)[1]

    def plan(group: list[int]) -> EncodePlan:
        audio = [items[clips[j][0]].audio[clips[j][1]].numpy() for j in group]
        return tokenizer.plan_encode(audio, tokenizer.sample_rate, n_quantizers, chunk_seconds=chunk_seconds,
                                     batch_seconds=batch_seconds, pad=True)

    def planned(groups: list[list[int]]) -> Iterator[tuple[list[int], EncodePlan | Exception]]:
        for group in groups:
            try:
                yield group, plan(group)
            except Exception as e:  # noqa: BLE001 - the group's failure, handled where it is run
                yield group, e

    def run(group: list[int], planned: EncodePlan | Exception) -> None:
        if isinstance(planned, Exception):
            raise planned
        enc = tokenizer.run_plan(planned)
        out = enc.codes.numpy()
        for b, j in enumerate(group):
            codes[clips[j]] = out[b, :, : int(enc.lengths[b])].astype(np.uint16)

    groups = [[segment.item for segment in batch] for batch in make_batches(plan_segments(frames, None, (0, 0)),
                                                                            max_frames)]
    # one warning per clip would flood a job's log: counted by the caller. The filter is the process's,
    # so it covers the thread that plans (and pads) group n + 1 while the model runs group n.
    with warnings.catch_warnings(), contextlib.closing(prefetch(planned(groups))) as ahead:
        warnings.filterwarnings("ignore", LOUD_WARNING, UserWarning)
        for group, ready in ahead:
            try:
                run(group, ready)
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
                    run([j], plan([j]))
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


def build_manifest(store: Store, num_parts: int, tokenizer: AudioTokenizer, config: BulkConfig,
                   n_quantizers: int) -> Manifest:
    """The manifest from the done markers, in part order (``created`` left out): the same whoever builds it."""
    done = [store.read_json(state_path("done", p), DONE_SHAPE) for p in range(num_parts)]
    shards = [s for d in done for s in d["shards"]]
    return Manifest(
        tokenizer.identity, tokenizer.config, tuple(ShardEntry(s["path"], s["records"], s["frames"]) for s in shards),
        audio_hours=sum(s["seconds"] for s in shards) / 3600,
        failures=tuple({k: f[k] for k in ("key", "reason", "detail")} for d in done for f in d["failures"]),
        input=config.input.to_dict(), n_quantizers=n_quantizers, mono=config.mono, metadata=tuple(config.input.keep),
        layout=config.layout)


def write_manifest(store: Store, manifest: Manifest) -> None:
    """Write the manifest unless the same one (but for ``created``) is there; then remove shards no
    part records (left by a run whose failures differed), staging leftovers and the claims of killed
    processes (one killed after it wrote a done marker, before it deleted its claim)."""
    try:
        old: Manifest | None = Manifest.read(store)
    except (OSError, ValueError):  # none yet (FileNotFoundError), or one of another job
        old = None
    if old is None or dataclasses.replace(old, created=None) != manifest:
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        dataclasses.replace(manifest, created=created).write(store)
    listed = {s.path for s in manifest.shards}
    for name in store.list():
        if "/" not in name and PART_SHARD.fullmatch(name) and name not in listed:
            logger.info("removing %s: no part records it", name)
            store.delete(name)
    for name in store.list(f"{STATE_DIR}/claims"):
        store.delete(name)
    for name in store.clean_staging():
        logger.info("removed %s left by an interrupted run", name)


def _progress_bar(enabled: bool):
    """Hours of source audio tokenized and the rate in hours of audio per second."""
    from tqdm.auto import tqdm

    return tqdm(total=None, unit="h", desc="tokenize", disable=not enabled, dynamic_ncols=True,
                bar_format="{desc}: {n:.4f} h of audio [{elapsed}{postfix}]")


def tokenize_dataset(config: BulkConfig, tokenizer: AudioTokenizer | None = None) -> BulkSummary:
    """Tokenize ``config.input`` into ``config.output`` (see :mod:`audiotok.bulk`).

    Any number of processes (torchrun ranks or independent launches) may run the same job at once:
    they claim parts through the output folder until every part is done, and the manifest is
    written when all are. Running the same command again resumes an interrupted job (with any
    number of processes), or does nothing for a finished one. ``config.engine="ray"`` runs the job
    on a Ray cluster instead (:mod:`audiotok.bulk.ray_engine`; ``tokenizer`` must then be ``None``:
    its actors load ``config.model``). Returns a :class:`BulkSummary`.
    """
    if config.engine == "ray":
        from .ray_engine import tokenize_with_ray

        if tokenizer is not None:
            raise ValueError("the ray engine loads config.model in each of its actors: pass no tokenizer")
        return tokenize_with_ray(config)
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
        tokenizer = load_tokenizer(config, rank_device(config.device, env.local_rank))
    job = plan_job(config, tokenizer)
    if env.world_size > len(job.parts) and env.world_size > 1 and env.rank == 0:
        logger.warning("%d parts for %d processes: some will have nothing to do", len(job.parts), env.world_size)
    owner = config.owner or default_owner()
    offset = env.rank * len(job.parts) // env.world_size if env.world_size > 1 else zlib.crc32(owner.encode())
    stats = work(job, owner, offset, LoaderReads, config.progress and env.rank == 0)

    run_stats: list[Any] = [stats]
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.barrier()
        run_stats = [None] * env.world_size
        dist.all_gather_object(run_stats, stats)
    if env.rank == 0:
        write_manifest(job.store, build_manifest(job.store, len(job.parts), tokenizer, config, job.n_quantizers))
    if distributed:
        dist.barrier()
    return summarize(job, run_stats, time.perf_counter() - t0, env.world_size)


# ---------------------------------------------------------------------------------------------
# The steps every engine shares: plan, work on parts, summarize


@dataclass
class Job:
    """A planned job as one process sees it (:func:`plan_job`): settings, model, input, parts, output."""

    config: BulkConfig
    tokenizer: AudioTokenizer
    n_quantizers: int
    source: AudioSource
    parts: list[dict[str, Any]]
    store: Store


def load_tokenizer(config: BulkConfig, device: str | torch.device) -> AudioTokenizer:
    """``config.model`` on ``device`` with the job's dtype (and ``torch.compile`` if asked)."""
    return AudioTokenizer.from_pretrained(config.model, device, DTYPES[config.dtype], config.compile)


def plan_job(config: BulkConfig, tokenizer: AudioTokenizer) -> Job:
    """Cut the input into parts and write ``.bulk/plan.json`` (or check the one there): what every
    process of a job does first, with the same result (see :mod:`audiotok.bulk`)."""
    check_uint16(tokenizer.codebook_size)
    k = check_n_quantizers(config.n_quantizers, tokenizer.n_codebooks)
    source = config.input.build()
    parts = source.partition(config.part_records)
    if config.layout == "sidecar":
        names = [sidecar_name(p["shard"]) for p in parts]
        if len(set(names)) != len(names):
            raise ValueError("the sidecar layout needs input shards with distinct file names")
    job = {
        "format": config.format, "layout": config.layout, **tokenizer.identity.to_dict(), "n_quantizers": k,
        "mono": config.mono,
        "dtype": str(tokenizer.dtype).replace("torch.", ""), "min_seconds": config.min_seconds,
        "shard_records": config.shard_records, "shard_frames": config.shard_frames,
        "part_records": config.part_records if source.random_access else None,
        "input": config.input.to_dict(), "source": source_fingerprint(source),
    }
    store = open_store(config.output, config.storage_options)
    load_plan(store, {"job": job, "parts": parts})
    return Job(config, tokenizer, k, source, parts, store)


class PartReads(Protocol):
    """How a process reads the parts it claims: :meth:`read` asks for a part from a position;
    :meth:`next_bundle` returns the next :class:`~audiotok.bulk.inputs.Bundle` of any part asked for
    (each part's in position order, the last with its ``end``); ``workers`` parts are read at once."""

    workers: int

    def read(self, part: int, start: int) -> None: ...

    def next_bundle(self) -> Bundle: ...

    def close(self) -> None:
        """Every part asked for was read to its end: stop the readers."""

    def abort(self) -> None:
        """Stop the readers, parts unfinished."""


#: ``reads(job, pool_seconds)``: the readers of an engine (bundles of about ``pool_seconds / (2 * workers)``).
ReadsFactory = Callable[[Job, float], PartReads]


class LoaderReads:
    """The torch engine's readers: ``max(1, num_workers)`` DataLoader workers (or the process
    itself with ``num_workers=0``), each reading whole parts (:class:`~audiotok.bulk.inputs.PartReader`);
    they end with this process (:func:`audiotok.workers.die_with_parent`), even when it is killed."""

    def __init__(self, job: Job, pool_seconds: float):
        config = job.config
        self.workers = max(1, config.num_workers)
        self.tasks: Any = mp.SimpleQueue()
        reader = PartReader(job.source, job.parts, self.tasks, job.tokenizer.sample_rate, config.mono,
                            config.min_seconds, bundle_seconds=pool_seconds / (2 * self.workers))
        loader = DataLoader(reader, batch_size=None, num_workers=config.num_workers, collate_fn=identity_collate,
                            in_order=False, prefetch_factor=2 if config.num_workers else None,
                            worker_init_fn=worker_init())
        self.it = iter(loader)  # workers start now and wait for tasks

    def read(self, part: int, start: int) -> None:
        self.tasks.put((part, start))

    def next_bundle(self) -> Bundle:
        return next(self.it)

    def close(self) -> None:
        self.abort()
        for _ in self.it:
            raise RuntimeError("a reader gave a bundle after every part was done")

    def abort(self) -> None:
        for _ in range(self.workers):  # let idle workers end
            self.tasks.put(None)


def work(job: Job, owner: str, offset: int, reads: ReadsFactory, progress: bool = False) -> dict[str, Any]:
    """Claim parts of ``job`` as ``owner`` (trying them in order from ``offset``) and encode them,
    reading them with ``reads``, until every part of the job is done (by this process or others).
    Returns what this process did: ``{"records", "seconds", "failures", "loud"}``."""
    config, tok = job.config, job.tokenizer
    chunk_seconds, batch_seconds = tok.resolve_seconds(config.chunk_seconds, config.batch_seconds)
    pool_seconds = config.pool_seconds or max(4 * batch_seconds, 120.0)
    claims = Claims(job.store, owner, config.lease_seconds)
    scheduler = Scheduler(job.store, claims, len(job.parts), offset % max(1, len(job.parts)))
    settings = _Settings(batch_seconds, chunk_seconds, pool_seconds)
    if not scheduler.refresh_done():
        _encode_parts(job, settings, scheduler, reads(job, pool_seconds), progress, SkipCounter(f"tokenize {owner}"))
        if settings.stats["loud"]:
            logger.warning("%d of the %d records coded by this process peak above 1 (a full-scale recording "
                           "resampled overshoots slightly): their loudest samples are coded clipped",
                           settings.stats["loud"], settings.stats["records"])
    return settings.stats


def summarize(job: Job, run_stats: list[dict[str, Any]], seconds: float, processes: int) -> BulkSummary:
    """The :class:`BulkSummary` of a finished job: the manifest's totals, and ``run_stats`` (what
    each of ``processes`` processes did, from :func:`work`)."""
    manifest = Manifest.read(job.store)
    counts: dict[str, int] = {}
    for f in manifest.failures:
        counts[f["reason"]] = counts.get(f["reason"], 0) + 1
    return BulkSummary(job.config.output, manifest.records, manifest.audio_hours or 0.0, len(manifest.failures),
                       len(manifest.shards), int(sum(s["records"] for s in run_stats)),
                       sum(s["seconds"] for s in run_stats) / 3600, int(sum(s["failures"] for s in run_stats)),
                       seconds, processes, counts)


@dataclass
class _Settings:
    """What the encode loop needs besides the job: the resolved audio budgets, and what it did."""

    batch_seconds: float
    chunk_seconds: float | None
    pool_seconds: float
    stats: dict[str, Any] = field(default_factory=lambda: {"records": 0, "seconds": 0.0, "failures": 0, "loud": 0})


def _encode_parts(job: Job, settings: _Settings, scheduler: Scheduler, reads: PartReads, progress: bool,
                  reasons: SkipCounter) -> None:
    """Claim parts, have ``reads`` read them and encode them until every part of the job is done."""
    config, tok, k, stats = job.config, job.tokenizer, job.n_quantizers, settings.stats
    store, claims = scheduler.store, scheduler.claims
    workers = reads.workers
    metadata = dataset_metadata(tok.identity, tok.config, k, config.mono)
    sidecar = config.layout == "sidecar"
    writers: dict[int, PartWriter] = {}  # claimed parts being read
    dropped: set[int] = set()  # parts another process took over, read to their end and ignored
    bar = _progress_bar(progress)
    started = time.perf_counter()
    pool: list[Decoded | Failure] = []
    pool_samples = 0
    ends: dict[int, int] = {}

    next_claim = 0.0  # when to look for parts again after a scan found too few
    offered: list[int] = []  # claims written, to be confirmed ``claims.settle`` seconds after ``offered_at``
    offered_at = 0.0

    def fill() -> None:
        """Confirm offered claims that have settled (their parts go to the workers), offer new ones."""
        nonlocal next_claim, offered, offered_at
        now = time.time()
        if offered and now >= offered_at + claims.settle:
            for part in scheduler.confirm(offered):
                url = job.parts[part].get("shard", "") if sidecar else ""
                writer = PartWriter(store, part, config.format, config.shard_records, config.shard_frames,
                                    metadata, tuple(config.input.keep), sidecar_name(url) if sidecar else None, url)
                writers[part] = writer
                reads.read(part, writer.position)
            offered = []
        want = workers + 1 - len(writers) - len(dropped)
        if want > 0 and not offered and now >= next_claim:
            offered, offered_at = scheduler.propose(want, set(writers) | dropped), now
            if len(offered) < want:
                next_claim = now + min(claims.lease / 4, 5.0)

    def renew() -> None:
        for part in claims.renew(list(writers)):
            logger.warning("part %d was taken over by another process: leaving it", part)
            writers.pop(part).abort()
            dropped.add(part)

    def flush() -> None:
        nonlocal pool, pool_samples, next_claim
        pool = [x for x in pool if x.part in writers]
        decoded = [x for x in pool if isinstance(x, Decoded)]
        results = (encode_items(tok, decoded, k, settings.batch_seconds, settings.chunk_seconds, config.mono)
                   if decoded else [])
        by_item = {id(x): r for x, r in zip(decoded, results)}
        stats["loud"] += sum(float(x.audio.abs().max()) > 1.0 for x in decoded)
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
            sample = writer.sample_key(item.key) if sidecar else None
            meta = {
                "key": sample if sample is not None else record_key(item.key, item.part, item.position),
                "source_key": item.key, "num_samples": item.num_samples, "sample_rate": item.sample_rate,
                "n_frames": int(result.shape[-1]), "channels": item.channels, "model_id": tok.model_id,
                "metadata": item.metadata,
            }
            writer.add_record(item.position, meta, result)
            stats["records"] += 1
            stats["seconds"] += item.seconds
            hours += item.seconds / 3600
        for part, end in ends.items():
            if part in writers:
                writers[part].finish(end)  # still held if this fails: the claim is released below
                del writers[part]
                claims.release(part)
                scheduler.done.add(part)
            dropped.discard(part)
        if ends:
            next_claim = 0.0
        pool, pool_samples = [], 0
        ends.clear()
        rate = stats["seconds"] / 3600 / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix_str(f"{rate:.3g} h/s ({rate * 3600:.3g}x real time), {stats['records']} records, "
                            f"{stats['failures']} failed, {len(scheduler.done)}/{len(job.parts)} parts",
                            refresh=False)
        bar.update(hours)

    try:
        while True:
            fill()
            if not writers and not dropped:
                if offered:
                    time.sleep(max(0.0, offered_at + claims.settle - time.time()))
                    continue
                if scheduler.refresh_done():
                    break
                scheduler.wait()  # every part left is claimed by a live process
                next_claim = 0.0
                continue
            bundle = reads.next_bundle()
            pool.extend(bundle.items)
            pool_samples += sum(x.audio.numel() for x in bundle.items if isinstance(x, Decoded))
            if bundle.end is not None:
                ends[bundle.part] = bundle.end
            if pool_samples >= settings.pool_seconds * tok.sample_rate or ends:
                flush()
            if claims.renew_due:
                renew()
        reads.close()
    except BaseException:
        reads.abort()
        for w in writers.values():
            w.abort()
        for part in [*writers, *offered]:  # give the parts back at once (a killed process's claims lapse)
            try:
                claims.release(part)
            except OSError:
                pass
        raise
    finally:
        bar.close()

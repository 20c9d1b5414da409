"""A bulk tokenization job as every engine shares it: its settings (:class:`BulkConfig`), its plan
(:func:`plan_job`, ``.bulk/plan.json``), and at the end its manifest and :class:`BulkSummary`. The
engines (:mod:`audiotok.bulk.torch_engine`, :mod:`audiotok.bulk.ray_engine`) depend on this module and
run the part loop (:mod:`audiotok.bulk.parts`) in each of their processes."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..codes import check_n_quantizers, check_uint16
from ..data.sources import AudioSource
from ..formats.codedataset import PART_SHARD, SHARD_WRITERS, Manifest, ShardEntry, sidecar_name
from ..tokenizer import DTYPES, AudioTokenizer
from ..utils.store import Store, open_store
from ..utils.untrusted import check_number
from ..utils.workers import available_cpus
from .claims import STATE_DIR, state_path
from .inputs import InputSpec, source_fingerprint
from .writer import DONE_SHAPE

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
    cores = available_cpus()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(16, cores // local - 1))


@dataclass
class BulkConfig:
    """Settings of a bulk job (the ``recipes/tokenize_dataset.py`` options).

    Attributes:
        input: what to read.
        output: output folder (shared by all processes; on several nodes, a shared filesystem), or an
            fsspec URL such as ``s3://bucket/codes`` (:func:`audiotok.utils.store.open_store`).
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
            ``endpoint_url``; see :mod:`audiotok.utils.urls`); not written anywhere.
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
# The plan: what every process of a job does first


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
# The end: the manifest and the summary


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


def summarize(job: Job, run_stats: list[dict[str, Any]], seconds: float, processes: int) -> BulkSummary:
    """The :class:`BulkSummary` of a finished job: the manifest's totals, and ``run_stats`` (what
    each of ``processes`` processes did, from :func:`audiotok.bulk.parts.work`)."""
    manifest = Manifest.read(job.store)
    counts: dict[str, int] = {}
    for f in manifest.failures:
        counts[f["reason"]] = counts.get(f["reason"], 0) + 1
    return BulkSummary(job.config.output, manifest.records, manifest.audio_hours or 0.0, len(manifest.failures),
                       len(manifest.shards), int(sum(s["records"] for s in run_stats)),
                       sum(s["seconds"] for s in run_stats) / 3600, int(sum(s["failures"] for s in run_stats)),
                       seconds, processes, counts)

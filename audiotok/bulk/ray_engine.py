"""The Ray engine of bulk tokenization (``BulkConfig(engine="ray")``, ``--engine ray``): the same job
on a Ray cluster, with the same output (see :mod:`audiotok.bulk`, section "Ray engine").

The driver (the process that calls :func:`~audiotok.bulk.tokenize_dataset`) plans the job, starts
encoding actors and waits for them; each actor is one process of the job as the torch engine runs
it (:func:`~audiotok.bulk.parts.work`: claims, part writers, progress, done markers), with its parts
read by Ray tasks (:class:`RayReads`) instead of DataLoader workers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from ..data.sources import AudioSource
from ..tokenizer import NOTICE_ENV
from ..utils.distributed import rank_device
from ..utils.io import StorageError
from .claims import default_owner, done_parts
from .inputs import Bundle, InputSpec, read_bundles
from .job import BulkConfig, BulkSummary, Job, build_manifest, load_tokenizer, plan_job, summarize, write_manifest
from .parts import work

try:
    import ray
    from ray.exceptions import RayError
except ImportError:  # pragma: no cover - the message is tested with ray hidden
    raise ImportError("the ray engine needs Ray: pip install 'audiotok[ray]'") from None

logger = logging.getLogger("audiotok.bulk")

#: Options of a read task: one CPU; at most two bundles ready ahead of its actor (what the
#: DataLoader's ``prefetch_factor`` is to the torch engine).
READ_TASK: dict[str, Any] = {"num_cpus": 1, "num_returns": "streaming", "_generator_backpressure_num_objects": 2}


def tokenize_with_ray(config: BulkConfig) -> BulkSummary:
    """Run the job of ``config`` on a Ray cluster (``config.ray_address``; joined if this process is
    not connected yet, and left at the end), then write the manifest. Resumes as the torch engine
    does, from the output's done markers and progress files."""
    t0 = time.perf_counter()
    # the plan and the manifest need the model's identity, not its speed: loaded on the CPU here
    job = plan_job(config, load_tokenizer(replace(config, compile=False), "cpu"))
    stats: list[dict[str, Any]] = []
    actors = 1
    if len(done_parts(job.store)) < len(job.parts):
        job.tokenizer.show_notice()  # here, once: the actors are started with AUDIOTOK_NO_NOTICE=1
        joined = not ray.is_initialized()
        if joined:
            check_reachable(config.ray_address or os.environ.get("RAY_ADDRESS"))
            ray.init(address=config.ray_address, logging_level=logging.WARNING)
        try:
            stats, actors = _run_actors(job)
        finally:
            if joined:
                ray.shutdown()
    write_manifest(job.store, build_manifest(job.store, len(job.parts), job.tokenizer, config, job.n_quantizers))
    return summarize(job, stats, time.perf_counter() - t0, actors)


def check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """``ConnectionError`` unless the cluster at ``address`` (``host:port`` or ``ray://host:port``)
    accepts a connection within ``timeout`` seconds: ``ray.init`` would retry for minutes. Other
    addresses (``None``, ``auto``, ``local``) are left to ``ray.init``."""
    found = re.fullmatch(r"(?:ray://)?\[?([^\[\]/]+?)\]?:(\d+)/?", address or "")
    if found is None:
        return
    try:
        socket.create_connection((found[1], int(found[2])), timeout).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at {address} ({e}): start one (ray start --head) or "
                              "leave out --ray-address (and RAY_ADDRESS) for a local instance") from None


def placement(config: BulkConfig, resources: dict[str, float]) -> tuple[str, int]:
    """``(device, actors)``: the actors' device (``cuda``: one GPU each) and how many, for a cluster
    with ``resources`` (``ray.cluster_resources()``). ``ValueError`` when the cluster has no GPU for
    a CUDA device, or the actors would leave no CPU to read with (each actor takes one)."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    device = torch.device(config.device or ("cuda" if gpus else "cpu"))
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"the ray engine gives each actor one GPU: use --device cuda, not {device}")
        if not gpus:
            raise ValueError("--device cuda, but the Ray cluster has no GPU")
    actors = config.ray_actors or (gpus if device.type == "cuda" else max(1, cpus // 2))
    if actors >= cpus:
        raise ValueError(f"{actors} actors take {actors} of the Ray cluster's {cpus} CPUs, leaving none for "
                         "the read tasks: use fewer --ray-actors")
    return device.type, actors


def _run_actors(job: Job) -> tuple[list[dict[str, Any]], int]:
    """Start the actors, wait until each has ended; what those that finished did, and how many there were."""
    config = job.config
    device, count = placement(config, ray.cluster_resources())
    encoder = Encoder.options(**actor_options(device))
    # each actor is its own claim owner and shows no bar of its own (the driver shows parts done)
    actor_config = replace(config, device=device, progress=False, owner=None)
    actors: list[Any] = [encoder.remote(actor_config) for _ in range(count)]
    pending = [actor.work.remote(i * len(job.parts) // count) for i, actor in enumerate(actors)]
    stats: list[dict[str, Any]] = []
    errors: list[RayError] = []
    bar = _parts_bar(config.progress, len(job.parts))
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=5.0)
            for ref in ready:
                try:
                    stats.append(ray.get(ref))
                except RayError as e:  # died, or its work raised: its claims were released or lapse
                    logger.warning("a Ray actor stopped; the others take its parts over: %s", _last_line(e))
                    errors.append(e)
            bar.update(len(done_parts(job.store)) - bar.n)
    except BaseException:  # interrupted: the actors' claims lapse (at once where their host sees them gone)
        for actor in actors:
            ray.kill(actor)
        raise
    finally:
        bar.close()
    for actor in actors:  # ended: their work holds no claim
        actor.__ray_terminate__.remote()
    if errors and len(done_parts(job.store)) < len(job.parts):
        storage = [e for e in errors if isinstance(e, StorageError)]  # Ray's errors are instances of their cause
        if storage:
            raise StorageError(_last_line(storage[0])) from storage[0]
        raise RuntimeError(f"every Ray actor stopped before the job was done ({len(errors)} errors; run the "
                           f"same command again to resume); the first: {_last_line(errors[0])}") from errors[0]
    return stats, count


def actor_options(device: str) -> dict[str, Any]:
    """Ray options of an encoding actor on ``device`` (``cpu`` or ``cuda``): a CPU, a GPU for CUDA, and the
    model's notice silenced (:data:`~audiotok.tokenizer.NOTICE_ENV`; the driver shows it once)."""
    return {"num_cpus": 1, "num_gpus": 1 if device == "cuda" else 0, "runtime_env": {"env_vars": {NOTICE_ENV: "1"}}}


def _last_line(error: Exception) -> str:
    """The last line of a Ray error (whose text holds the remote traceback): the remote exception."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def _parts_bar(enabled: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="part", desc="tokenize", disable=not enabled, dynamic_ncols=True)


class _Encoder:
    """An encoding actor: the model on its device, working on the job's parts as one torch-engine
    process does (claiming them as its own owner), its parts read by :class:`RayReads`."""

    def __init__(self, config: BulkConfig):
        # CUDA: the one GPU Ray gave this actor (cuda:0 of its visible devices)
        self.job = plan_job(config, load_tokenizer(config, rank_device(config.device)))

    def work(self, offset: int) -> dict[str, Any]:
        with self.job.tokenizer.autotuning():
            return work(self.job, default_owner(), offset, RayReads)


Encoder = ray.remote(_Encoder)


class RayReads:
    """A Ray task per part read (``num_cpus=1``, anywhere in the cluster), ``max(1, num_workers)`` at
    once, each streaming its part's bundles (:func:`~audiotok.bulk.inputs.read_bundles`) back to the
    actor (:class:`~audiotok.bulk.parts.PartReads`)."""

    def __init__(self, job: Job, pool_seconds: float):
        self.job = job
        self.workers = max(1, job.config.num_workers)
        self.bundle_seconds = pool_seconds / (2 * self.workers)
        self.waiting: deque[tuple[int, int]] = deque()
        self.running: list[Any] = []  # ObjectRefGenerator of each part being read

    def read(self, part: int, start: int) -> None:
        self.waiting.append((part, start))
        self._start()

    def _start(self) -> None:
        config, rate = self.job.config, self.job.tokenizer.sample_rate
        while self.waiting and len(self.running) < self.workers:
            part, start = self.waiting.popleft()
            self.running.append(_read_part.remote(config.input, self.job.parts[part], part, start, rate, config.mono,
                                                  config.min_seconds, self.bundle_seconds))

    def next_bundle(self) -> Bundle:
        while self.running:
            ready, _ = ray.wait(self.running, num_returns=1)
            generator: Any = ready[0]
            try:
                ref = next(generator)
            except StopIteration:  # the part was read to its end
                self.running.remove(generator)
                self._start()
                continue
            return ray.get(ref)
        raise RuntimeError("a bundle was asked for while no part is being read")

    def close(self) -> None:
        if self.waiting:
            raise RuntimeError("parts were still to be read after every part was done")
        for generator in self.running:  # read to their ends: only the end of the stream is left
            for _ in generator:
                raise RuntimeError("a reader gave a bundle after its part's end")
        self.running.clear()

    def abort(self) -> None:
        for generator in self.running:
            ray.cancel(generator)
        self.running.clear()
        self.waiting.clear()


@ray.remote(**READ_TASK)
def _read_part(spec: InputSpec, part_spec: dict[str, Any], part: int, start: int, sample_rate: int, mono: bool,
               min_seconds: float, bundle_seconds: float) -> Iterator[Bundle]:
    yield from read_bundles(_source(spec), part_spec, part, start, sample_rate, mono, min_seconds, bundle_seconds)


_sources: dict[str, AudioSource] = {}


def _source(spec: InputSpec) -> AudioSource:
    """``spec.build()``, kept for the next part this Ray worker process reads (a folder is listed once)."""
    key = json.dumps(spec.source_spec(), sort_keys=True, default=str)
    if key not in _sources:
        _sources.clear()
        _sources[key] = spec.build()
    return _sources[key]

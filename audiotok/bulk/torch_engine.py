"""The torch engine of bulk tokenization (``BulkConfig(engine="torch")``, the default): this process
is one of any number working on the job (launched by hand or by torchrun), its parts read by
DataLoader workers (:class:`LoaderReads`)."""

from __future__ import annotations

import datetime
import logging
import time
import zlib
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from ..tokenizer import AudioTokenizer
from ..utils.distributed import DistEnv, init_process_group, rank_device, shutdown
from ..utils.workers import worker_init
from .claims import default_owner
from .inputs import Bundle, PartReader, identity_collate
from .job import BulkConfig, BulkSummary, Job, build_manifest, load_tokenizer, plan_job, summarize, write_manifest
from .parts import work

logger = logging.getLogger("audiotok.bulk")


def tokenize_with_torch(config: BulkConfig, tokenizer: AudioTokenizer | None = None) -> BulkSummary:
    """Run the job of ``config`` in this process, one of the job's (torchrun's ranks, or independent
    launches), with ``tokenizer`` (default: ``config.model`` on this rank's device); the manifest is
    written when every part is done."""
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
    with tokenizer.autotuning():  # bucketed shapes on CUDA: each timed once for the whole job
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


class LoaderReads:
    """The torch engine's readers: ``max(1, num_workers)`` DataLoader workers (or the process
    itself with ``num_workers=0``), each reading whole parts (:class:`~audiotok.bulk.inputs.PartReader`);
    they end with this process (:func:`audiotok.utils.workers.die_with_parent`), even when it is killed."""

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

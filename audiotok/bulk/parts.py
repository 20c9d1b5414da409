"""One process's work on a bulk job: claim parts (:mod:`audiotok.bulk.claims`), have the engine's
readers read them, encode their records in pools (:mod:`audiotok.bulk.encode`) and write them with a
part writer per part (:mod:`audiotok.bulk.writer`), until every part of the job is done. Both engines
run it: in each torch process, in each Ray actor.

The writing runs behind the encoding, in one thread (:class:`~audiotok.utils.prefetch.WriteBehind`): the
model encodes pool n + 1 while pool n's records are added to their shards and shards, progress files
and done markers are published. The writes are those of a loop that would write each pool before
encoding the next, in the same order, so the output is the same bytes; at most two pools are in
writing at once. A part's claim is given back, and the part counted done, only once its done marker
is written; a write that fails stops the writing and is raised in the loop, which fails as before.

The claims (:mod:`audiotok.bulk.claims`: offers, confirmations once settled, renewals, releases; round
trips to the store, slow on an object store) are kept by a second such thread: the loop hands it each
step and goes on encoding; what a step brings back (parts won, to be read; parts another process took
over, to be dropped) is taken up in the loop. The loop decides as before what to claim and when; the
steps run one at a time in the order given, so a part is read only once its claim is won and it is
not done, and given back only once its done marker is written. When the loop fails, it waits for the
steps handed over and gives back every claim this process may still hold."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import numpy as np

from ..data.sources import DecodeError, SkipCounter
from ..formats.codedataset import dataset_metadata, record_key, sidecar_name
from ..utils.prefetch import WriteBehind
from .claims import Claims, Scheduler
from .encode import encode_items
from .inputs import Bundle, Decoded, Failure
from .job import Job
from .writer import PartWriter

logger = logging.getLogger("audiotok.bulk")


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


#: A pool's writes, in order: a failure, or a record's ``(position, fields, codes)``, each with its part's writer.
Rows = list[tuple[PartWriter, Failure | tuple[int, dict[str, Any], np.ndarray]]]

#: ``reads(job, pool_seconds)``: the readers of an engine (bundles of about ``pool_seconds / (2 * workers)``).
ReadsFactory = Callable[[Job, float], PartReads]

#: What a step of the claims thread brings back: what the loop then does with its outcome, if anything.
Then = Callable[[], None] | None


def work(job: Job, owner: str, offset: int, reads: ReadsFactory, progress: bool = False) -> dict[str, Any]:
    """Claim parts of ``job`` as ``owner`` (trying them in order from ``offset``) and encode them,
    reading them with ``reads``, until every part of the job is done (by this process or others).
    Returns what this process did: ``{"records", "seconds", "failures", "loud"}``."""
    config, tok = job.config, job.tokenizer
    chunk_seconds, batch_seconds = tok.resolve_seconds(config.chunk_seconds, config.batch_seconds)
    pool_seconds = config.pool_seconds or max(4 * batch_seconds, 120.0)
    claims = Claims(job.store, owner, config.lease_seconds)
    scheduler = Scheduler(job.store, claims, len(job.parts), offset % max(1, len(job.parts)))
    stats: dict[str, Any] = {"records": 0, "seconds": 0.0, "failures": 0, "loud": 0}
    if not scheduler.refresh_done():
        PartLoop(job, scheduler, reads(job, pool_seconds), (batch_seconds, chunk_seconds, pool_seconds), stats,
                 SkipCounter(f"tokenize {owner}"), progress).run()
        if stats["loud"]:
            logger.warning("%d of the %d records coded by this process peak above 1 (a full-scale recording "
                           "resampled overshoots slightly): their loudest samples are coded clipped",
                           stats["loud"], stats["records"])
    return stats


class PartLoop:
    """The loop of :func:`work`, in named steps on its state: :meth:`fill` claims parts and hands them
    to the readers, :meth:`add` pools the records read, :meth:`flush` encodes the pool and hands its
    writes to the writer thread (finishing the parts read to their end), :meth:`finished` gives back
    the parts whose done marker it wrote, :meth:`renew` keeps the claims, :meth:`abort` gives the parts
    back when the loop fails. The claim traffic runs in the claims thread (:meth:`ask`); the methods it
    runs there (:meth:`offer`, :meth:`confirm`, :meth:`renewal`) touch only the scheduler and return
    the loop's next step."""

    def __init__(self, job: Job, scheduler: Scheduler, reads: PartReads, budgets: tuple[float, float | None, float],
                 stats: dict[str, Any], reasons: SkipCounter, progress: bool):
        """``budgets``: the job's ``(batch_seconds, chunk_seconds, pool_seconds)``; ``stats``: what the
        loop did, added to; ``reasons``: counts the records that failed."""
        tok, config = job.tokenizer, job.config
        self.job, self.scheduler, self.claims, self.reads = job, scheduler, scheduler.claims, reads
        self.batch_seconds, self.chunk_seconds, pool_seconds = budgets
        self.pool_samples_max = pool_seconds * tok.sample_rate
        self.metadata = dataset_metadata(tok.identity, tok.config, job.n_quantizers, config.mono)
        self.sidecar = config.layout == "sidecar"
        self.stats, self.reasons = stats, reasons
        self.writers: dict[int, PartWriter] = {}  # claimed parts being read, or written to their end
        self.closing: set[int] = set()  # parts of writers read to their end: their done marker is being written
        self.behind: WriteBehind[list[int]] = WriteBehind(depth=1)  # a pool written, one waiting
        # the claim steps: an offer or confirmation, a renewal and releases (the loop waits beyond those)
        self.claiming: WriteBehind[Then] = WriteBehind(depth=4, name="audiotok-claims")
        self.news: list[Then] = []  # what steps of the claims thread brought back, to take up in order
        self.taking = 0  # parts asked for and not back yet: being offered, settling or confirmed
        self.settling: list[tuple[list[int], float]] = []  # claims offered and when: confirmed ``claims.settle`` after
        self.renew_at = time.time() + self.claims.lease / 4
        self.dropped: set[int] = set()  # parts another process took over, read to their end and ignored
        self.pool: list[Decoded | Failure] = []
        self.pool_samples = 0
        self.ends: dict[int, int] = {}  # parts read to their end in the pool: their end position
        self.next_claim = 0.0  # when to look for parts again after a scan found too few
        self.bar = _progress_bar(progress)
        self.started = time.perf_counter()

    def run(self) -> None:
        """Claim parts, have the readers read them and encode them until every part of the job is done."""
        try:
            while True:
                self.finished(self.behind.results())
                self.fill()
                if len(self.writers) == len(self.closing) and not self.dropped:  # nothing is being read
                    if self.closing:
                        self.finished(self.behind.results(wait=True))
                    elif not self.wait():
                        break
                    continue
                self.add(self.reads.next_bundle())
                if self.pool_samples >= self.pool_samples_max or self.ends:
                    self.flush()
                if self.renew_due:
                    self.renew()
            self.reads.close()
            self.finished(self.behind.close())
            self.claiming.close()
        except BaseException as e:
            self.abort(e)
            raise
        finally:
            self.bar.close()

    def ask(self, step: Callable[[], Then]) -> None:
        """Hand ``step`` to the claims thread; what it brings back is taken up by :meth:`fill`."""
        self.news += self.claiming.submit(step)

    def fill(self) -> None:
        """Take up what the claims thread brought back (parts won go to the readers); have it confirm
        offered claims that have settled, and offer new ones."""
        news, self.news = self.news + self.claiming.results(), []
        for then in news:
            if then is not None:
                then()
        now = time.time()
        while self.settling and now >= self.settling[0][1] + self.claims.settle:
            self.ask(partial(self.confirm, self.settling.pop(0)[0]))
        want = self.reads.workers + 1 - len(self.writers) + len(self.closing) - len(self.dropped) - self.taking
        if want > 0 and now >= self.next_claim:
            self.taking += want
            self.ask(partial(self.offer, want, set(self.dropped)))

    def offer(self, want: int, dropped: set[int]) -> Then:
        """In the claims thread: offer claims on up to ``want`` free parts, not held nor ``dropped``."""
        offered, at = self.scheduler.propose(want, dropped), time.time()

        def then() -> None:
            if len(offered) < want:
                self.next_claim = at + min(self.claims.lease / 4, 5.0)
            self.taking -= want - len(offered)
            if offered:
                self.settling.append((offered, at))

        return then

    def confirm(self, offered: list[int]) -> Then:
        """In the claims thread: the writers of the ``offered`` parts won (their progress read), to be read."""
        config = self.job.config
        writers = []
        for part in self.scheduler.confirm(offered):
            url = self.job.parts[part].get("shard", "") if self.sidecar else ""
            writers.append(PartWriter(self.scheduler.store, part, config.format, config.shard_records,
                                      config.shard_frames, self.metadata, tuple(config.input.keep),
                                      sidecar_name(url) if self.sidecar else None, url))

        def then() -> None:
            for writer in writers:
                self.writers[writer.part] = writer
                self.reads.read(writer.part, writer.position)
            self.taking -= len(offered)

        return then

    def wait(self) -> bool:
        """Nothing is being read: wait for claims being taken, or for parts other processes hold.
        ``False`` when every part of the job is done."""
        if self.settling:
            time.sleep(max(0.0, self.settling[0][1] + self.claims.settle - time.time()))
            return True
        self.news += self.claiming.results(wait=True)  # the claims thread is idle: the scheduler is ours
        if any(self.news):  # parts won, or left
            return True
        if self.scheduler.refresh_done():
            return False
        self.scheduler.wait()  # every part left is claimed by a live process
        self.next_claim = 0.0
        return True

    def add(self, bundle: Bundle) -> None:
        """Pool the records of ``bundle`` (and its part's end, if it is the last)."""
        self.pool.extend(bundle.items)
        self.pool_samples += sum(x.audio.numel() for x in bundle.items if isinstance(x, Decoded))
        if bundle.end is not None:
            self.ends[bundle.part] = bundle.end

    @property
    def renew_due(self) -> bool:
        return time.time() >= self.renew_at

    def renew(self) -> None:
        """Have this process's claims renewed (every quarter lease); the parts another process took
        over are left."""
        self.renew_at = time.time() + self.claims.lease / 4
        self.ask(partial(self.renewal, list(self.writers)))

    def renewal(self, parts: list[int]) -> Then:
        """In the claims thread: renew the claims on ``parts``."""
        lost = self.claims.renew(parts)
        return partial(self.leave, lost) if lost else None

    def leave(self, parts: list[int]) -> None:
        """Leave the ``parts`` another process took over."""
        for part in parts:
            if part not in self.writers or part in self.closing:
                continue  # done, or being finished: the files are those the process that took it over writes
            logger.warning("part %d was taken over by another process: leaving it", part)
            self.finished(self.behind.submit(partial(_drop, self.writers.pop(part))))
            self.dropped.add(part)

    def flush(self) -> None:
        """Encode the pool and hand its records and failures, in part and position order, and the
        end of the parts read to their end, to the writer thread."""
        config, tok = self.job.config, self.job.tokenizer
        pool = [x for x in self.pool if x.part in self.writers]
        decoded = [x for x in pool if isinstance(x, Decoded)]
        results = (encode_items(tok, decoded, self.job.n_quantizers, self.batch_seconds, self.chunk_seconds,
                                config.mono) if decoded else [])
        by_item = {id(x): r for x, r in zip(decoded, results)}
        self.stats["loud"] += sum(float(x.audio.abs().max()) > 1.0 for x in decoded)
        rows: Rows = []
        hours = 0.0
        for item in sorted(pool, key=lambda x: (x.part, x.position)):
            result = by_item[id(item)] if isinstance(item, Decoded) else item
            if isinstance(result, Failure):
                self.count_failure(result)
                rows.append((self.writers[item.part], result))
                continue
            assert isinstance(item, Decoded)  # a Failure item is its own result
            rows.append((self.writers[item.part], (item.position, self.record_fields(item, result), result)))
            self.stats["records"] += 1
            self.stats["seconds"] += item.seconds
            hours += item.seconds / 3600
        ends = [(self.writers[part], end) for part, end in self.ends.items() if part in self.writers]
        self.closing.update(w.part for w, _ in ends)
        self.dropped -= set(self.ends)
        if self.ends:
            self.next_claim = 0.0
        self.pool, self.pool_samples, self.ends = [], 0, {}
        self.finished(self.behind.submit(partial(_write, rows, ends)))
        self.show_progress(hours)

    def count_failure(self, failure: Failure) -> None:
        self.reasons.add(DecodeError(failure.key, failure.reason, failure.detail))
        self.stats["failures"] += 1

    def record_fields(self, item: Decoded, codes: np.ndarray) -> dict[str, Any]:
        """The record's fields (:data:`~audiotok.formats.codedataset.RECORD_FIELDS` and its kept ``metadata``)."""
        sample = self.writers[item.part].sample_key(item.key) if self.sidecar else None
        return {
            "key": sample if sample is not None else record_key(item.key, item.part, item.position),
            "source_key": item.key, "num_samples": item.num_samples, "sample_rate": item.sample_rate,
            "n_frames": int(codes.shape[-1]), "channels": item.channels, "model_id": self.job.tokenizer.model_id,
            "metadata": item.metadata,
        }

    def finished(self, done: list[list[int]]) -> None:
        """The parts whose done marker the writer thread wrote (lists of them): give their claims back."""
        parts = [p for ps in done for p in ps]
        for part in parts:
            del self.writers[part]
            self.closing.discard(part)
        if parts:
            self.ask(partial(self.scheduler.release, parts))

    def show_progress(self, hours: float) -> None:
        stats = self.stats
        rate = stats["seconds"] / 3600 / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{rate:.3g} h/s ({rate * 3600:.3g}x real time), {stats['records']} records, "
                                 f"{stats['failures']} failed, {len(self.scheduler.done)}/{len(self.job.parts)} parts",
                                 refresh=False)
        self.bar.update(hours)

    def abort(self, error: BaseException) -> None:
        """Stop the readers, let the writer and claims threads end the steps handed to them (unless one
        failed), drop the unfinished shards, and give back every claim this process may hold at once
        (a killed process's claims lapse)."""
        self.reads.abort()
        for thread, what in ((self.behind, "writing the output"), (self.claiming, "keeping the claims")):
            try:
                thread.close()
            except BaseException as e:  # noqa: BLE001 - the loop is failing with ``error`` already
                if e is not error:
                    logger.warning("%s failed too: %s: %s", what, type(e).__name__, e)
        for w in self.writers.values():
            w.abort()
        for part in sorted(self.claims.held):
            try:
                self.claims.release(part)
            except OSError:
                pass


def _write(rows: Rows, ends: list[tuple[PartWriter, int]]) -> list[int]:
    """In the writer thread: a pool's ``rows`` in order, then the parts of ``ends`` finished at their end
    position (their last shard and done marker); returns those parts."""
    for writer, row in rows:
        if isinstance(row, Failure):
            writer.add_failure(row)
        else:
            writer.add_record(*row)
    for writer, end in ends:
        writer.finish(end)
    return [writer.part for writer, _ in ends]


def _drop(writer: PartWriter) -> list[int]:
    """In the writer thread, after the writes handed over before: drop the unfinished shard of a part
    taken over by another process."""
    writer.abort()
    return []


def _progress_bar(enabled: bool):
    """Hours of source audio tokenized and the rate in hours of audio per second."""
    from tqdm.auto import tqdm

    return tqdm(total=None, unit="h", desc="tokenize", disable=not enabled, dynamic_ncols=True,
                bar_format="{desc}: {n:.4f} h of audio [{elapsed}{postfix}]")

"""Training excerpts mixed from weighted groups of sources, with exact resume; validation excerpts.

Index layout. Excerpts are numbered by a global index ``g``; with random-access sources excerpt
``g`` is a pure function of ``(seed, g)`` (its generator is ``numpy.random.default_rng([seed, g])``).
Global indices are dealt to ranks in blocks of ``block_size``: block ``b`` covers
``[b * block_size, (b + 1) * block_size)`` and belongs to rank ``b % world_size``. A rank's own
excerpts, in order, are its *positions* 0, 1, 2, ...; with DataLoader workers, rank block ``k``
goes to worker ``(k - k0) % num_workers`` (``k0``: the block the iteration starts in). A DataLoader
built with ``batch_size=block_size`` fetches worker batches round-robin, so it delivers the
rank's positions in order whatever ``num_workers`` is, and batch ``j`` of the rank holds global
blocks ``j * world_size + rank``. Ranks and workers never share an index.

Resume. ``state_dict()`` records the rank position; ``load_state_dict`` on a fresh dataset makes
iteration continue from there, reproducing the same excerpts as an uninterrupted run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .sources import AudioSource, DecodeError, Record
from .transforms import ArrayClip, Clip, process_excerpt

#: Group weights of the DAC paper.
PAPER_GROUP_WEIGHTS = {"speech": 1 / 2, "music": 1 / 3, "general": 1 / 6}


@dataclass
class SourceGroup:
    """Sources of one kind (speech, music, ...) drawn with probability ``weight`` (normalized over
    groups); the sources in a group are equally likely."""

    weight: float
    sources: list[AudioSource]


def mixture(
    groups: Mapping[str, SourceGroup], balance: bool = True
) -> tuple[list[tuple[str, AudioSource]], np.ndarray]:
    """``([(group name, source), ...], probabilities)`` of drawing each source.

    ``balance=True``: group weights, split equally among a group's sources. ``balance=False``
    (the paper's no-data-balance ablation): proportional to source size (``source.size``: files,
    rows or samples), i.e. a uniform draw over all records; every source must know its size.
    """
    entries = [(name, src) for name, group in groups.items() for src in group.sources]
    if not entries:
        raise ValueError("no audio sources configured")
    for name, group in groups.items():
        if not group.sources:
            raise ValueError(f"group {name!r} has no sources")
    for name, src in entries:
        if src.random_access and len(src) == 0:
            raise ValueError(f"group {name!r}: source {src.name!r} has no records")
    if balance:
        weights = []
        for name, group in groups.items():
            if group.weight < 0 or not math.isfinite(group.weight):
                raise ValueError(f"group {name!r}: weight must be finite and >= 0, got {group.weight}")
            weights += [group.weight / len(group.sources)] * len(group.sources)
    else:
        unknown = [src.name for _, src in entries if src.size is None]
        if unknown:
            raise ValueError(f"balance=False weights sources by size, unknown for {unknown}: give them a size")
        weights = [float(src.size or 0) for _, src in entries]  # every size is known here
    p = np.asarray(weights, dtype=np.float64)
    if p.sum() <= 0:
        raise ValueError("all source weights are zero")
    return entries, p / p.sum()


class ExcerptDataset(IterableDataset):
    """Infinite stream of ``[1, N]`` float32 training excerpts, ``N = round(duration * sample_rate)``.

    Each excerpt: draw a source (see :func:`mixture`), a record (uniform index for random-access
    sources, the next record of this worker's part for streaming ones), then
    :func:`~audiotok.data.transforms.process_excerpt`. Unusable records are counted in the
    source's ``skipped`` and redrawn, up to ``max_draws`` draws per excerpt.

    Determinism: see the module docstring. Streaming sources are read in parts split by
    ``(rank, worker)`` (``rank * num_workers + worker`` of ``world_size * num_workers``), so an
    excerpt drawn from them depends on that split and on what the worker read before; after a
    resume they restart with a shard order seeded by the resume position rather than replaying
    what was read, so only random-access sources resume exactly.
    """

    def __init__(
        self,
        groups: Mapping[str, SourceGroup],
        sample_rate: int,
        duration: float = 0.38,
        *,
        balance: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        block_size: int = 1,
        min_loudness: float = -40.0,
        salient_tries: int = 8,
        loudness_target: float = -16.0,
        phase_shift: bool = True,
        max_draws: int = 32,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if block_size < 1 or max_draws < 1:
            raise ValueError("block_size and max_draws must be >= 1")
        self.entries, self.probs = mixture(groups, balance)
        self.sample_rate, self.duration = int(sample_rate), float(duration)
        self.num_samples = round(self.duration * self.sample_rate)
        self.seed, self.rank, self.world_size, self.block_size = int(seed), rank, world_size, block_size
        self.process_kwargs: dict[str, Any] = dict(
            min_loudness=min_loudness, tries=salient_tries, loudness_target=loudness_target, phase_shift=phase_shift
        )
        self.max_draws = max_draws
        self.position = 0

    # -- index layout ---------------------------------------------------------------------------

    def global_index(self, position: int) -> int:
        """Global excerpt index of this rank's ``position``."""
        block, offset = divmod(position, self.block_size)
        return (block * self.world_size + self.rank) * self.block_size + offset

    def positions(self, worker_id: int = 0, num_workers: int = 1, start: int | None = None) -> Iterator[int]:
        """This rank's positions from ``start`` (default: :attr:`position`) that worker
        ``worker_id`` of ``num_workers`` produces, in order (infinite)."""
        start = self.position if start is None else start
        first_block = start // self.block_size
        for block in itertools.count(first_block + worker_id, num_workers):
            lo = max(block * self.block_size, start)
            yield from range(lo, (block + 1) * self.block_size)

    # -- excerpts -------------------------------------------------------------------------------

    def excerpt(self, index: int) -> torch.Tensor:
        """Global excerpt ``index`` as ``[1, N]``; needs random-access sources only."""
        return self._make(index, streams=None)

    def _make(self, index: int, streams: dict[int, Iterator[Record | DecodeError]] | None) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, index])
        for _ in range(self.max_draws):
            e = int(rng.choice(len(self.entries), p=self.probs))
            source = self.entries[e][1]
            try:
                if source.random_access:
                    clip = source.clip(int(rng.integers(len(source))))
                elif streams is None:
                    raise TypeError(f"excerpt() needs random-access sources; {source.name!r} is streaming")
                else:
                    item = next(streams[e])
                    if isinstance(item, DecodeError):
                        raise item
                    clip = ArrayClip(item.audio, item.sample_rate, item.key)
                x = process_excerpt(clip, clip.sample_rate, self.sample_rate, self.duration, rng, **self.process_kwargs)
            except DecodeError as err:
                source.skipped.add(err)
                continue
            return torch.from_numpy(x)
        skipped = {src.name: dict(src.skipped.counts) for _, src in self.entries if src.skipped.total}
        raise ValueError(f"excerpt {index}: no usable audio in {self.max_draws} draws (skipped so far: {skipped}); "
                         f"check the sources' files")

    def _stream(self, source: AudioSource, part: int, num_parts: int, seed: int) -> Iterator[Record | DecodeError]:
        for epoch in itertools.count():
            empty = True
            for item in source.records(part, num_parts, epoch, seed):
                empty = False
                yield item
            if empty:
                raise ValueError(f"{source.name}: part {part} of {num_parts} has no records")

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self.position
        part, num_parts = self.rank * num_workers + worker_id, self.world_size * num_workers
        streams = {}
        for e, (_, source) in enumerate(self.entries):
            if not source.random_access:
                seed = int(np.random.SeedSequence([self.seed, start, e]).generate_state(1)[0])
                streams[e] = self._stream(source, part, num_parts, seed)
        for position in self.positions(worker_id, num_workers, start):
            x = self._make(self.global_index(position), streams)
            if info is None:
                self.position = position + 1
            yield x

    # -- resume ---------------------------------------------------------------------------------

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """Resume point: ``consumed`` excerpts taken by this rank (default: :attr:`position`,
        which only advances when iterating in this process; with DataLoader workers pass the
        number of excerpts the rank has taken from the loader, e.g. ``steps * batch_size``)."""
        return {
            "position": self.position if consumed is None else int(consumed),
            "seed": self.seed,
            "world_size": self.world_size,
            "block_size": self.block_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`); seed, world size and block size must match.
        The state of a run begun on the resident path (:meth:`ResidentBatches.state_dict
        <audiotok.data.resident.ResidentBatches.state_dict>`: per-rank batches) continues at its step."""
        if "step" in state:
            state = {"position": state["step"] * state["batch_size"], "seed": state["seed"],
                     "world_size": self.world_size, "block_size": state["batch_size"]}
        for name in ("seed", "world_size", "block_size"):
            if int(state[name]) != getattr(self, name):
                raise ValueError(f"cannot resume: state has {name}={state[name]}, this dataset {getattr(self, name)}")
        self.position = int(state["position"])


class Excerpt(NamedTuple):
    """A validation excerpt: ``audio`` is ``[1, N]`` float32."""

    group: str
    key: str
    audio: torch.Tensor


def build_validation_set(
    groups: Mapping[str, SourceGroup | AudioSource | Sequence[AudioSource]],
    sample_rate: int,
    duration: float = 5.0,
    per_group: int = 16,
    *,
    seed: int = 0,
    min_loudness: float = -40.0,
    salient_tries: int = 8,
    loudness_target: float = -16.0,
) -> list[Excerpt]:
    """A fixed list of ``[1, N]`` excerpts: up to ``per_group`` records per group, one salient
    excerpt each (same processing as training, without the random phase shift).

    A group's quota is shared equally among its sources (what a short source leaves goes to the
    next ones). Random-access sources give records at
    evenly spaced indices (then the other indices in order, when some are unusable); streaming
    sources their first usable records. Records shorter than ``duration`` are passed over while
    longer ones turn up among a source's first ``8 * quota`` candidates: their excerpts would be
    mostly zero padding, and a codec's output under digital silence would dominate the metric.
    Excerpt ``n`` of group number ``k`` uses ``default_rng([seed, k, n])``.
    """
    out: list[Excerpt] = []
    for k, (name, group) in enumerate(groups.items()):
        if isinstance(group, SourceGroup):
            sources = group.sources
        else:
            sources = [group] if isinstance(group, AudioSource) else list(group)
        n = 0
        for s, source in enumerate(sources):
            quota = math.ceil((per_group - n) / (len(sources) - s))
            taken = 0
            for clip in _long_first(_candidate_clips(source, quota), duration, 8 * quota) if quota else ():
                try:
                    x = process_excerpt(
                        clip, clip.sample_rate, sample_rate, duration, np.random.default_rng([seed, k, n]),
                        min_loudness=min_loudness, tries=salient_tries, loudness_target=loudness_target,
                        phase_shift=False,
                    )
                except DecodeError as err:
                    source.skipped.add(err)
                    continue
                out.append(Excerpt(name, clip.key, torch.from_numpy(x)))
                n, taken = n + 1, taken + 1
                if taken == quota:
                    break
    return out


def _long_first(clips: Iterator[Clip], duration: float, scan: int) -> Iterator[Clip]:
    """The clips of at least ``duration`` seconds among the first ``scan``, then the shorter ones
    among them, then the rest in order."""
    short = []
    for clip in itertools.islice(clips, scan):
        if clip.num_frames >= duration * clip.sample_rate:
            yield clip
        else:
            short.append(clip)
    yield from short
    yield from clips


def _candidate_clips(source: AudioSource, quota: int) -> Iterator[Clip]:
    """Streaming: records in order. Random access: indices ``k * n // quota`` (k < quota) first,
    then the others in order."""
    if not source.random_access:
        for item in source:
            yield ArrayClip(item.audio, item.sample_rate, item.key)
        return
    n = len(source)
    spread = sorted({k * n // quota for k in range(quota)})
    taken = set(spread)
    for i in itertools.chain(spread, (i for i in range(n) if i not in taken)):
        try:
            yield source.clip(i)
        except DecodeError as err:
            source.skipped.add(err)

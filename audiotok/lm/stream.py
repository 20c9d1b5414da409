"""Batches of a code dataset's training examples, in a shuffled order that a resumed run continues from a
state dict (:meth:`ExampleBatches.state_dict`), without reading the data that came before.

Order. A rank reads its part of the shards through ``R`` readers: its ``num_workers`` DataLoader workers,
or the process itself when there are none. Reader ``r`` takes shards ``r, r + R, ...`` of the part and
goes through them epoch after epoch, each epoch in an order drawn from ``(seed, rank, r, epoch)``; a
shard's examples come in windows of ``window`` consecutive examples, each window in an order drawn from
``(seed, rank, r, epoch, shard, window index)``. The readers take turns, an example each (the DataLoader's
round robin; a reader whose shards hold no example drops out), and ``batch`` examples in a row make a batch.

Position. After each example, its reader's ``[epoch, j, k]`` (``k`` examples taken from the ``j``-th shard
of the epoch's order) and the reader whose turn comes next. A resumed reader starts at its position: it
reads its shard from the start of the window that holds example ``k`` (a shard is read in order), and
nothing of the shards before.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..formats.codedataset import CodeDataset, CodeRecord
from ..utils.distributed import DistEnv, gather_objects
from ..utils.workers import stop_workers, worker_init

Example = dict[str, torch.Tensor]
T = TypeVar("T")


class ExampleSource(Protocol):
    """What makes a shard's records into training examples (:class:`~audiotok.lm.LMTokenDataset`,
    :class:`~audiotok.lm.text.TextCodeDataset`)."""

    seq_len: int

    def examples(self, records: Iterable[CodeRecord]) -> Iterator[Example]:
        """The examples of ``records``, in order."""


def windowed(items: Iterable[T], window: int, seed: list[int], start: int = 0) -> Iterator[tuple[int, T]]:
    """``(i, item)`` for the positions ``i >= start`` of ``items`` shuffled in windows: window ``w`` (positions
    ``w * window`` to ``(w + 1) * window - 1``) comes in the order of a permutation drawn from ``(*seed, w)``.
    The items before the window of ``start`` are read and dropped."""
    w = start // window
    rest = itertools.islice(items, w * window, None)
    while chunk := list(itertools.islice(rest, window)):
        order = np.random.default_rng([*seed, w]).permutation(len(chunk))
        for offset in range(max(0, start - w * window), len(chunk)):
            yield w * window + offset, chunk[order[offset]]
        w += 1


class _Readers(IterableDataset):
    """The readers' examples as ``(reader, its position after the example, example)``; DataLoader worker ``w``
    (or the process itself, ``w = 0``) runs reader ``(first + w) % len(positions)`` from its position."""

    def __init__(self, codes: CodeDataset, source: ExampleSource, seed: list[int], window: int,
                 positions: list[list[int]], first: int):
        super().__init__()
        self.codes, self.source, self.seed, self.window = codes, source, seed, window
        self.positions, self.first = positions, first

    def __iter__(self) -> Iterator[tuple[int, list[int], Example]]:
        worker = get_worker_info()
        reader = (self.first + (0 if worker is None else worker.id)) % len(self.positions)
        part = self.codes.split_by_rank(reader, len(self.positions))
        epoch, start, taken = self.positions[reader]
        while part.shards:
            whole, found = start == taken == 0, False
            for j, k, example in self._epoch(part, [*self.seed, reader, epoch], start, taken):
                found = True
                yield reader, [epoch, j, k + 1], example
            if whole and not found:
                return  # no shard of this reader holds an example
            epoch, start, taken = epoch + 1, 0, 0

    def _epoch(self, part: CodeDataset, seed: list[int], start: int, taken: int) -> Iterator[tuple[int, int, Example]]:
        """``(j, k, example)``: an epoch of ``part`` in the order of ``seed``, from example ``taken`` of its
        ``start``-th shard."""
        n = len(part.shards)
        order = np.random.default_rng(seed).permutation(n)
        for j in range(start, n):
            shard = int(order[j])
            examples = self.source.examples(part.split_by_rank(shard, n))
            for k, example in windowed(examples, self.window, [*seed, shard], taken if j == start else 0):
                yield j, k, example


class ExampleBatches:
    """Endless batches of ``batch`` examples of ``codes`` (this rank's part of a code dataset) made by
    ``source``, in the order of the module docstring: each a dict of ``[batch, ...]`` tensors.

    ``window`` examples are shuffled together; ``num_workers`` DataLoader workers read (0: this process).
    """

    def __init__(self, codes: CodeDataset, source: ExampleSource, batch: int, *, seed: int, window: int,
                 num_workers: int, env: DistEnv):
        self.codes, self.source, self.batch, self.window = codes, source, batch, window
        self.seed, self.num_workers, self.env = seed, num_workers, env
        self.positions = [[0, 0, 0] for _ in range(max(1, num_workers))]  # each reader's [epoch, j, k]
        self.next = 0  # the reader whose turn comes next
        self._items: Iterator[Any] | None = None

    def __iter__(self) -> ExampleBatches:
        return self

    def __next__(self) -> Example:
        if self._items is None:
            readers = _Readers(self.codes, self.source, [self.seed, self.env.rank], self.window,
                               [list(p) for p in self.positions], self.next)
            # its own generator: starting the loader must not draw from torch's global RNG (dropout); workers
            # end with this process and leave SIGTERM and SIGINT to it (audiotok.utils.workers)
            loader = DataLoader(readers, batch_size=None, num_workers=self.num_workers, generator=torch.Generator(),
                                worker_init_fn=worker_init(ignore_stop_signals=True))
            self._items = iter(loader)
        examples = []
        for _ in range(self.batch):
            item = next(self._items, None)
            if item is None:
                raise ValueError(f"{self.codes.root}: rank {self.env.rank} has too few codes for one example of "
                                 f"{self.source.seq_len} steps in its {len(self.codes.shards)} shard(s)")
            reader, position, example = item
            self.positions[reader], self.next = list(position), (reader + 1) % len(self.positions)
            examples.append(example)
        return torch.utils.data.default_collate(examples)

    def close(self) -> None:
        """End the reading (the worker processes); the next batch starts it again."""
        if self._items is not None:
            stop_workers(self._items)
            self._items = None

    def state_dict(self) -> dict[str, Any]:
        """The position of every rank after the batches taken: every rank calls this at the same point."""
        mine = {"positions": self.positions, "next": self.next}
        return {"seed": self.seed, "world_size": self.env.world_size, "readers": len(self.positions),
                "ranks": gather_objects(mine, self.env)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at this rank's position in ``state`` (from :meth:`state_dict`); ``ValueError`` when it
        has another seed, number of ranks or of readers."""
        ours = {"seed": self.seed, "world_size": self.env.world_size, "readers": len(self.positions)}
        for name, value in ours.items():
            if state[name] != value:
                raise ValueError(f"cannot resume the data position: it has {name}={state[name]}, this run {value}")
        mine = state["ranks"][self.env.rank]
        self.close()
        self.positions, self.next = [list(p) for p in mine["positions"]], int(mine["next"])

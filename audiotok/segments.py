"""Planning exact chunked, length-bucketed batches over sequences of frames.

A long item is cut into chunks of frames; each chunk is computed with enough context frames on
both sides (the network's receptive field, see :attr:`audiotok.nn.model.DAC.context_frames`) that the
frames it keeps equal those of the whole sequence. Chunks and short items are then grouped,
longest first, into padded batches under a frame budget: padded to their longest segment, or with a
:class:`ShapeGrid` to one of a few fixed shapes, so that a job of any inputs runs a few dozen
distinct input shapes (what cuDNN autotuning, CUDA graphs and compiled kernels are made for).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Frames ``start:stop`` of item ``item`` go through the network; ``keep_start:keep_stop`` are kept."""

    item: int
    start: int
    stop: int
    keep_start: int
    keep_stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def plan_segments(frames: list[int], chunk: int | None, context: tuple[int, int]) -> list[Segment]:
    """Cut items of ``frames[i]`` frames into chunks of at most ``chunk`` kept frames (None: never)."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be at least one frame, got {chunk}")
    left, right = context
    segments = []
    for item, n in enumerate(frames):
        if chunk is None or n <= chunk:
            segments.append(Segment(item, 0, n, 0, n))
            continue
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            segments.append(Segment(item, max(0, a - left), min(n, b + right), a, b))
    return segments


#: Steps per octave of :class:`ShapeGrid`'s lengths: a segment is padded by less than 1/8 of its
#: length (5% on average over bench_buckets.py's length mixes).
LENGTH_STEPS = 8
#: :class:`ShapeGrid`'s shortest length in frames (shorter segments are padded to it): where the grid
#: starts its steps of 1/8.
SHORTEST = 2 * LENGTH_STEPS


def round_up(n: int, steps: int) -> int:
    """``n`` rounded up to the geometric grid of ``steps`` (a power of two) values per octave:
    ``m * 2**e`` with ``steps <= m < 2 * steps``, and every integer below ``2 * steps``. At most
    ``n / steps`` more than ``n``; ``steps=1``: the next power of two."""
    e = max(0, n.bit_length() - steps.bit_length())
    return -(-n >> e) << e


@dataclass(frozen=True)
class ShapeGrid:
    """The padded lengths of bucketed forward passes: segment lengths rounded up by steps of 1/8
    (:data:`LENGTH_STEPS`) from :data:`SHORTEST` frames, up to ``longest``: the longest segment of a
    plan (chunk plus context; ``None`` when items are not chunked), itself a length of the grid. A
    pass of length ``L`` has ``max_frames // L`` rows, or a power of two fewer (:func:`make_batches`),
    so that a plan's shapes are at most ``sum(2 + log2(max_frames / L))`` over its lengths ``L``."""

    longest: int | None

    def length(self, size: int) -> int:
        """The padded length of a pass whose longest segment has ``size`` frames."""
        padded = round_up(max(size, SHORTEST), LENGTH_STEPS)
        return padded if self.longest is None or size > self.longest else min(padded, self.longest)


@dataclass(frozen=True)
class Batch:
    """One forward pass: ``segments``, each zero-padded to ``frames`` frames: an input ``[B, ..., frames]``
    with ``B = len(segments)``."""

    segments: tuple[Segment, ...]
    frames: int


def make_batches(segments: list[Segment], max_frames: int, grid: ShapeGrid | None = None) -> list[Batch]:
    """Group segments, longest first, so that each padded batch holds at most ``max_frames`` frames
    (a single segment longer than that still gets a batch of its own).

    Batches are padded to their longest segment, or with ``grid`` to its length
    (:meth:`ShapeGrid.length`); then every batch but the last has ``max_frames // frames`` rows, and
    the last one is split into batches of powers of two rows (13 rows: 8, 4 and 1), each padded to its
    own longest segment's length: shapes come from a fixed set, and no batch computes empty rows."""
    def padded(size: int) -> int:
        return size if grid is None else grid.length(size)

    groups: list[list[Segment]] = []
    for seg in sorted(segments, key=lambda s: s.size, reverse=True):
        if groups and (len(groups[-1]) + 1) * padded(groups[-1][0].size) <= max_frames:
            groups[-1].append(seg)
        else:
            groups.append([seg])
    if grid is not None and groups:
        last = groups.pop()
        while last:
            rows = 1 << (len(last).bit_length() - 1)
            if len(last) == max_frames // padded(last[0].size):
                rows = len(last)  # a full batch keeps its count (not a power of two in general)
            groups.append(last[:rows])
            last = last[rows:]
    return [Batch(tuple(group), padded(group[0].size)) for group in groups]

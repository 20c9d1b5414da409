"""Planning exact chunked, length-bucketed batches over sequences of frames.

A long item is cut into chunks of frames; each chunk is computed with enough context frames on
both sides (the network's receptive field, see :attr:`audiotok.nn.model.DAC.context_frames`) that the
frames it keeps equal those of the whole sequence. Chunks and short items are then grouped,
longest first, into padded batches under a frame budget.
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


def make_batches(segments: list[Segment], max_frames: int) -> list[list[Segment]]:
    """Group segments, longest first, so that each padded batch holds at most ``max_frames`` frames
    (a single segment longer than that still gets a batch of its own)."""
    batches: list[list[Segment]] = []
    for seg in sorted(segments, key=lambda s: s.size, reverse=True):
        if batches and (len(batches[-1]) + 1) * batches[-1][0].size <= max_frames:
            batches[-1].append(seg)
        else:
            batches.append([seg])
    return batches
